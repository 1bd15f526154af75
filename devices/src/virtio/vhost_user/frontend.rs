//! What every vhost-user device shares: the connection to its backend (client or server side of
//! the socket, reconnected after the backend was lost) and the rings the backend serves
//! (activation, GET_VRING_BASE before a save, SET_MEM_TABLE and SET_VRING_BASE after a
//! restore). A device adds its features and configuration space (`blk`, `net`) and may keep a
//! queue for the VMM to serve ([`OwnQueue`]: virtio-net's control queue).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{accept, connect, io_error, vhost_error, Session, VHOST_USER_CONNECT_TIMEOUT};
use crate::virtio::io_thread::{IoThread, QueueWorker};
use crate::virtio::transport::lock_queue;
use crate::virtio::{ActivationContext, VirtioInterrupt};
use crate::{Error, Result};

/// The `VirtioDevice` methods every vhost-user device has alike: a `link` with `queue_sizes`,
/// `features`, `config_space` and `socket()` (whose configuration space is read-only to the
/// driver), and `rings` ([`VhostUserRings`]) that activation, reset, pause and resume go to.
macro_rules! vhost_user_device_methods {
    ($kind:literal) => {
        fn queue_max_sizes(&self) -> &[u16] {
            &self.link.queue_sizes
        }

        fn available_features(&self) -> u64 {
            self.link.features
        }

        fn read_config(&self, offset: u64, data: &mut [u8]) {
            $crate::virtio::read_config_space(&self.link.config_space, offset, data);
        }

        fn write_config(&mut self, offset: u64, data: &[u8]) {
            log::warn!(
                "{} {}: ignoring {}-byte write to read-only config at {offset:#x}",
                $kind,
                self.link.socket().display(),
                data.len()
            );
        }

        fn activate(&mut self, ctx: $crate::virtio::ActivationContext) -> $crate::Result<()> {
            self.rings.activate(ctx)
        }

        fn reset(&mut self) {
            self.rings.reset();
        }

        fn pause(&mut self) -> $crate::Result<()> {
            self.rings.pause()
        }

        fn resume(&mut self) -> $crate::Result<()> {
            self.rings.resume()
        }
    };
}
pub(crate) use vhost_user_device_methods;

/// Which side of the socket the VMM is (upstream's `vhost_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VhostUserMode {
    /// The backend listens on the socket, the VMM connects (upstream's default).
    #[default]
    Client,
    /// The VMM listens on the socket (it creates it), the backend connects.
    Server,
}

/// The connection to one backend, shared by every device built for it (the one the VM boots
/// with, the one a restore rebuilds the transport around). The session is `None` after the
/// backend was lost, until the next activation or resume reconnects.
#[derive(Clone)]
pub struct VhostUserConnection {
    socket: PathBuf,
    session: Arc<Mutex<Option<Session>>>,
    /// Server mode: the socket the VMM listens on, kept for the backend's reconnections.
    listener: Option<Arc<UnixListener>>,
    /// Each session also negotiates the DEVICE_STATE protocol feature when the backend offers
    /// it (a device whose backend holds state of its own: virtio-fs).
    device_state: bool,
}

impl VhostUserConnection {
    /// Opens the session with the backend at `socket`: as a client, connecting (retrying while
    /// the socket is missing or refuses connections); as a server, creating the socket (a stale
    /// one at the path is replaced) and waiting for the backend to connect. Both wait up to
    /// [`VHOST_USER_CONNECT_TIMEOUT`] and then fail with an error naming the socket.
    pub fn open(socket: &Path, mode: VhostUserMode) -> Result<Self> {
        Self::open_negotiating(socket, mode, false)
    }

    /// [`VhostUserConnection::open`] for a device whose backend has internal state that the
    /// rings do not describe (virtiofsd's FUSE session): every session also negotiates the
    /// DEVICE_STATE protocol feature when the backend offers it, so that state can be saved
    /// ([`VhostUserConnection::save_device_state`]) and loaded into a new backend
    /// ([`VhostUserRings::load_device_state_on_setup`]).
    pub fn open_with_device_state(socket: &Path, mode: VhostUserMode) -> Result<Self> {
        Self::open_negotiating(socket, mode, true)
    }

    fn open_negotiating(socket: &Path, mode: VhostUserMode, device_state: bool) -> Result<Self> {
        let listener = match mode {
            VhostUserMode::Client => None,
            VhostUserMode::Server => Some(Arc::new(listen(socket)?)),
        };
        let connection = VhostUserConnection {
            socket: socket.to_owned(),
            session: Arc::new(Mutex::new(None)),
            listener,
            device_state,
        };
        *connection.lock() = Some(connection.new_session()?);
        Ok(connection)
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn lock(&self) -> MutexGuard<'_, Option<Session>> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session: connected (client) or accepted (server), bounded.
    fn new_session(&self) -> Result<Session> {
        let session = match &self.listener {
            None => connect(&self.socket, VHOST_USER_CONNECT_TIMEOUT),
            Some(listener) => accept(listener, &self.socket, VHOST_USER_CONNECT_TIMEOUT),
        };
        match session {
            Ok(mut session) if self.device_state => {
                negotiate_device_state(&self.socket, &mut session)?;
                Ok(session)
            }
            other => other,
        }
    }

    /// Whether the open session can carry the backend's device state (the backend offered
    /// DEVICE_STATE and this connection asked for it).
    pub fn carries_device_state(&self) -> bool {
        self.lock().as_ref().is_some_and(|session| {
            session
                .protocol_features
                .contains(VhostUserProtocolFeatures::DEVICE_STATE)
        })
    }

    /// Reads the backend's internal state (SET_DEVICE_STATE_FD, direction save, phase stopped,
    /// then CHECK_DEVICE_STATE). The device's rings must be stopped (GET_VRING_BASE, which a
    /// pause does). `None` when there is no session (the backend was lost) or the backend does
    /// not offer DEVICE_STATE: the device is saved without it, as before.
    pub fn save_device_state(&self) -> Result<Option<Vec<u8>>> {
        let mut guard = self.lock();
        let Some(session) = guard.as_mut() else {
            return Ok(None);
        };
        if !session
            .protocol_features
            .contains(VhostUserProtocolFeatures::DEVICE_STATE)
        {
            return Ok(None);
        }
        save_device_state(&self.socket, session).map(Some)
    }

    /// Runs `step` on the open session (an error when the backend was lost).
    pub(crate) fn with_session<R>(
        &self,
        step: impl FnOnce(&mut Session) -> Result<R>,
    ) -> Result<R> {
        match self.lock().as_mut() {
            Some(session) => step(session),
            None => Err(Error::VhostUser {
                socket: self.socket.clone(),
                what: "not connected".to_owned(),
                source: None,
            }),
        }
    }
}

/// Most bytes of device state the front-end takes from a backend: the state goes into the
/// VM's saved state (an NV state slot is 1 MiB by default), so more is refused with an error
/// instead of crowding out the rest.
pub const MAX_DEVICE_STATE_LEN: usize = 256 << 10;

/// How long a backend may take to write its device state into the pipe (or to read it).
pub const DEVICE_STATE_TIMEOUT: Duration = Duration::from_secs(2);

/// Adds DEVICE_STATE to the session's protocol features when the backend offers it: a second
/// GET_PROTOCOL_FEATURES / SET_PROTOCOL_FEATURES before anything else is set up.
fn negotiate_device_state(socket: &Path, session: &mut Session) -> Result<()> {
    if !session.rings_need_enable() {
        return Ok(());
    }
    let offered = session
        .frontend
        .get_protocol_features()
        .map_err(vhost_error(socket, "GET_PROTOCOL_FEATURES"))?;
    if !offered.contains(VhostUserProtocolFeatures::DEVICE_STATE) {
        info!(
            "vhost-user backend at {}: no DEVICE_STATE protocol feature; its internal state is \
             not saved",
            socket.display()
        );
        return Ok(());
    }
    let features = session.protocol_features | VhostUserProtocolFeatures::DEVICE_STATE;
    session
        .frontend
        .set_protocol_features(features)
        .map_err(vhost_error(socket, "SET_PROTOCOL_FEATURES"))?;
    session.protocol_features = features;
    Ok(())
}

/// Sends SET_DEVICE_STATE_FD (`direction`, phase stopped) with the backend's end of a new
/// pipe (the write end to save, the read end to load) and returns the front-end's end: the
/// other end of the pipe, or the descriptor the backend handed back to use instead.
fn device_state_pipe(
    socket: &Path,
    session: &mut Session,
    direction: VhostTransferStateDirection,
) -> Result<OwnedFd> {
    let (reader, writer) =
        std::io::pipe().map_err(io_error(socket, "cannot create the device-state pipe"))?;
    let (backend_end, own_end) = match direction {
        VhostTransferStateDirection::SAVE => (OwnedFd::from(writer), OwnedFd::from(reader)),
        VhostTransferStateDirection::LOAD => (OwnedFd::from(reader), OwnedFd::from(writer)),
    };
    let returned = session
        .frontend
        .set_device_state_fd(direction, VhostTransferStatePhase::STOPPED, backend_end)
        .map_err(vhost_error(
            socket,
            &format!("SET_DEVICE_STATE_FD ({direction:?})"),
        ))?;
    Ok(returned.map_or(own_end, OwnedFd::from))
}

/// Sends CHECK_DEVICE_STATE once the pipe is done with (always, so the backend's transfer is
/// over even when the front-end's side failed), then gives the transfer's result, or the
/// backend's failure described by `refusal`.
fn check_device_state<T>(
    socket: &Path,
    session: &mut Session,
    transfer: Result<T>,
    refusal: &str,
    done: &str,
    bytes: impl FnOnce(&T) -> usize,
    started: Instant,
) -> Result<T> {
    let checked = session.frontend.check_device_state().map_err(vhost_error(
        socket,
        &format!("CHECK_DEVICE_STATE ({refusal})"),
    ));
    let transferred = transfer?;
    checked?;
    info!(
        "vhost-user backend at {}: device state {done}, {} bytes in {} us",
        socket.display(),
        bytes(&transferred),
        started.elapsed().as_micros()
    );
    Ok(transferred)
}

/// SET_DEVICE_STATE_FD (save, stopped), reads the pipe to its end (bounded by
/// [`DEVICE_STATE_TIMEOUT`] and [`MAX_DEVICE_STATE_LEN`]), then CHECK_DEVICE_STATE.
fn save_device_state(socket: &Path, session: &mut Session) -> Result<Vec<u8>> {
    let started = Instant::now();
    let reader = device_state_pipe(socket, session, VhostTransferStateDirection::SAVE)?;
    let read = read_to_end_bounded(socket, reader, DEVICE_STATE_TIMEOUT, MAX_DEVICE_STATE_LEN);
    let refusal = "the backend could not save its state";
    check_device_state(socket, session, read, refusal, "saved", Vec::len, started)
}

/// SET_DEVICE_STATE_FD (load, stopped), writes `state` into the pipe and closes it (bounded by
/// [`DEVICE_STATE_TIMEOUT`]), then CHECK_DEVICE_STATE: an error names the socket when the
/// backend refuses the state.
fn load_device_state(socket: &Path, session: &mut Session, state: &[u8]) -> Result<()> {
    let started = Instant::now();
    if !session
        .protocol_features
        .contains(VhostUserProtocolFeatures::DEVICE_STATE)
    {
        return Err(Error::VhostUser {
            socket: socket.to_owned(),
            what: format!(
                "the saved state has {} bytes of the backend's device state, but this backend \
                 does not offer the DEVICE_STATE protocol feature to take it",
                state.len()
            ),
            source: None,
        });
    }
    let writer = device_state_pipe(socket, session, VhostTransferStateDirection::LOAD)?;
    let written = write_all_bounded(socket, writer, state, DEVICE_STATE_TIMEOUT);
    let refusal = "the backend refused the saved device state";
    check_device_state(
        socket,
        session,
        written,
        refusal,
        "loaded",
        |_| state.len(),
        started,
    )
}

/// Waits until `fd` is ready for `events` or `deadline` passed.
fn wait_ready(socket: &Path, fd: &impl AsRawFd, events: i16, deadline: Instant) -> Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::VhostUser {
                socket: socket.to_owned(),
                what: format!(
                    "the device-state transfer did not finish within {}s",
                    DEVICE_STATE_TIMEOUT.as_secs()
                ),
                source: None,
            });
        }
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        };
        let timeout_ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: `poll` points at one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, timeout_ms) };
        if ready > 0 {
            return Ok(());
        }
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_error(socket, "cannot wait on the device-state pipe")(e));
            }
        }
    }
}

/// Reads `fd` (a pipe) to its end, at most `limit` bytes, within `timeout`.
fn read_to_end_bounded(
    socket: &Path,
    fd: OwnedFd,
    timeout: Duration,
    limit: usize,
) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut file = std::fs::File::from(fd);
    let mut state = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        wait_ready(socket, &file, libc::POLLIN, deadline)?;
        let n = match std::io::Read::read(&mut file, &mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(socket, "cannot read the device state")(e)),
        };
        if n == 0 {
            return Ok(state);
        }
        if state.len() + n > limit {
            return Err(Error::VhostUser {
                socket: socket.to_owned(),
                what: format!(
                    "the backend's device state is larger than {limit} bytes, the most a saved \
                     state takes"
                ),
                source: None,
            });
        }
        state.extend_from_slice(&chunk[..n]);
    }
}

/// Writes `state` into `fd` (a pipe) within `timeout`, in pieces the pipe takes without
/// blocking, then closes it so the backend reads its end.
fn write_all_bounded(socket: &Path, fd: OwnedFd, state: &[u8], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut file = std::fs::File::from(fd);
    let mut rest = state;
    while !rest.is_empty() {
        wait_ready(socket, &file, libc::POLLOUT, deadline)?;
        // A pipe ready for writing takes PIPE_BUF bytes without blocking.
        let piece = rest.len().min(libc::PIPE_BUF);
        match std::io::Write::write(&mut file, &rest[..piece]) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(socket, "cannot write the device state")(e)),
        }
    }
    Ok(())
}

/// Binds the server-mode socket at `socket`, non-blocking. A socket file left there by an
/// earlier VMM (one that lost power) is replaced; any other file is an error.
fn listen(socket: &Path) -> Result<UnixListener> {
    let io_error = |what: &str| io_error(socket, what);
    if let Ok(metadata) = std::fs::symlink_metadata(socket) {
        if !metadata.file_type().is_socket() {
            return Err(io_error("cannot listen: the path is a file, not a socket")(
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        std::fs::remove_file(socket).map_err(io_error("cannot remove the old socket"))?;
    }
    let listener = UnixListener::bind(socket).map_err(io_error("cannot listen"))?;
    super::set_non_blocking(&listener, true)
        .map_err(io_error("cannot make the socket non-blocking"))?;
    Ok(listener)
}

/// The rings of one vhost-user device: what an activation sets up with the backend, stopped
/// (GET_VRING_BASE) on pause and reset, started again (reconnecting when needed) on resume.
pub(crate) struct VhostUserRings {
    connection: VhostUserConnection,
    /// Names the device kind in logs ("vhost-user-blk").
    kind: &'static str,
    active: Option<Active>,
    /// The backend's device state from a saved state, loaded into the next new session after
    /// its SET_FEATURES and SET_MEM_TABLE and before its rings start; dropped once they run.
    device_state_to_load: Option<Vec<u8>>,
    /// The device's last queue, served by the VMM instead of the backend.
    own_queue: Option<Arc<dyn OwnQueue>>,
}

/// What an activation set up.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Arc<Mutex<Queue>>>,
    /// Queue-notify eventfds (the ioeventfds at the notify addresses), handed over as kicks.
    kicks: Vec<EventFd>,
    /// One per backend queue, handed over as calls; the relay thread turns them into
    /// interrupts.
    calls: Vec<EventFd>,
    relay: IoThread,
    acked_features: u64,
    /// The session in use has not had SET_FEATURES and SET_MEM_TABLE yet (a new connection).
    needs_setup: bool,
    /// Which queues the backend runs now (changed with the connection locked; the call relay
    /// reads them to switch rings on and off for an [`OwnQueue`]).
    running: Arc<[AtomicBool]>,
    /// How many of the queues (the first ones) the backend serves; the rest are the
    /// [`OwnQueue`]'s.
    backend_queues: usize,
    own_queue: Option<Arc<dyn OwnQueue>>,
}

/// A queue the VMM serves itself instead of handing it to the backend: virtio-net's control
/// queue, always the device's last. Its notifies wake the call relay thread, which serves it
/// there; a pause of the relay therefore waits for a request in progress, and nothing stays
/// popped across a save.
pub(crate) trait OwnQueue: Send + Sync {
    /// Serves what the driver posted on `queue` until none is left or `pause_requested` is set;
    /// `switch` turns backend ring `index` on or off (SET_VRING_ENABLE). Returns whether
    /// entries were used.
    fn serve(
        &self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        pause_requested: &AtomicBool,
        switch: &mut dyn FnMut(usize, bool),
    ) -> bool;
    /// Whether backend ring `index` runs enabled when it starts.
    fn ring_enabled(&self, index: usize) -> bool;
    /// The driver reset the device, or activated it anew (not a restored one).
    fn reset(&self);
}

impl VhostUserRings {
    pub fn new(connection: VhostUserConnection, kind: &'static str) -> Self {
        VhostUserRings {
            connection,
            kind,
            active: None,
            device_state_to_load: None,
            own_queue: None,
        }
    }

    /// Keeps the device's last queue to the VMM: `own` serves it, and says which backend rings
    /// run enabled.
    pub fn with_own_queue(mut self, own: Arc<dyn OwnQueue>) -> Self {
        self.own_queue = Some(own);
        self
    }

    /// Gives the backend `state` (saved with [`VhostUserConnection::save_device_state`]) when
    /// this device sets up its next session: SET_DEVICE_STATE_FD (load) and
    /// CHECK_DEVICE_STATE, after SET_FEATURES and SET_MEM_TABLE, before any ring starts. A
    /// backend that refuses it fails the activation (or the resume) with an error naming the
    /// socket.
    pub fn load_device_state_on_setup(&mut self, state: Vec<u8>) {
        self.device_state_to_load = Some(state);
    }

    /// Makes sure the session is open and set up for the activation: reconnects (bounded) after
    /// the backend was lost, then SET_FEATURES and SET_MEM_TABLE on a new session.
    fn ready_session(&mut self) -> Result<()> {
        let connection = self.connection.clone();
        let mut guard = connection.lock();
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        if guard.is_none() {
            info!(
                "vhost-user backend at {}: reconnecting",
                connection.socket.display()
            );
            *guard = Some(connection.new_session()?);
            active.needs_setup = true;
        }
        let Some(session) = guard.as_mut() else {
            return Ok(());
        };
        if active.needs_setup {
            if let Err(e) = set_up(&connection.socket, session, active) {
                *guard = None;
                return Err(e);
            }
            if let Some(state) = &self.device_state_to_load {
                if let Err(e) = load_device_state(&connection.socket, session, state) {
                    *guard = None;
                    return Err(e);
                }
            }
            active.needs_setup = false;
        }
        Ok(())
    }

    /// Starts every ready queue from the position in its `Queue`, then kicks it once: what the
    /// guest posted before (or across a power failure) is served.
    fn start_rings(&mut self) -> Result<()> {
        self.ready_session()?;
        let connection = self.connection.clone();
        let mut guard = connection.lock();
        let (Some(active), Some(session)) = (self.active.as_mut(), guard.as_mut()) else {
            return Ok(());
        };
        let result = start_rings(&connection.socket, self.kind, session, active);
        if result.is_err() {
            *guard = None;
            active.needs_setup = true;
        } else if active.running.iter().any(|r| r.load(Ordering::SeqCst)) {
            // The backend serves the guest now: its state moves on from the loaded one.
            self.device_state_to_load = None;
        }
        result
    }

    /// Stops the running rings with GET_VRING_BASE and records where they stand in the queues:
    /// the next available entry the backend answers, the used index from the used ring (every
    /// request it took is there once the ring is stopped). A backend that cannot answer (gone)
    /// leaves the used index as the next available entry: the requests it had taken but not
    /// completed are served again after the reconnect (block requests may be repeated, a
    /// network's receive buffers are offered again).
    fn stop_rings(&mut self) {
        let connection = self.connection.clone();
        let socket = connection.socket.display().to_string();
        let kind = self.kind;
        let mut guard = connection.lock();
        let Some(active) = self.active.as_mut() else {
            return;
        };
        for (index, queue) in active.queues.iter().enumerate().take(active.backend_queues) {
            if !active.running[index].swap(false, Ordering::SeqCst) {
                continue;
            }
            let Ok(mut queue) = lock_queue(queue) else {
                error!("{kind} {socket}: queue {index} lock poisoned");
                continue;
            };
            let used = match queue.used_idx(&active.mem, Ordering::Acquire) {
                Ok(used) => used.0,
                Err(e) => {
                    error!("{kind} {socket}: cannot read queue {index}'s used index: {e}");
                    queue.next_used()
                }
            };
            let base = match guard.as_mut() {
                Some(session) => match session.frontend.get_vring_base(index) {
                    Ok(base) => Some(base as u16),
                    Err(e) => {
                        error!(
                            "vhost-user backend at {socket}: GET_VRING_BASE of queue {index} \
                             failed ({e}); the backend is taken as lost and requests it had \
                             not completed will be served again after it is back"
                        );
                        *guard = None;
                        None
                    }
                },
                None => None,
            };
            // A backend may answer GET_VRING_BASE with requests still in flight (it counts them
            // taken): wait, bounded, until each is in the used ring, one used entry per request.
            let used = match base {
                Some(base) => wait_for_used(&queue, &active.mem, base, used),
                None => queue
                    .used_idx(&active.mem, Ordering::Acquire)
                    .map_or(used, |u| u.0),
            };
            let base = match base {
                Some(base) if base != used => {
                    error!(
                        "vhost-user backend at {socket}: queue {index} stopped at {base} with \
                         requests {used}..{base} not completed after {}s; they will be served \
                         again",
                        IN_FLIGHT_TIMEOUT.as_secs()
                    );
                    used
                }
                Some(base) => base,
                None => used,
            };
            queue.set_next_avail(base);
            queue.set_next_used(used);
        }
        if guard.is_none() {
            active.needs_setup = true;
        }
    }

    /// Activation: the call eventfds and their relay thread, then (unless the device starts
    /// paused, as a restored one does) the session's setup and the rings.
    pub fn activate(&mut self, ctx: ActivationContext) -> Result<()> {
        if self.active.is_some() {
            return Err(Error::AlreadyActivated);
        }
        let backend_queues = ctx.queues.len() - usize::from(self.own_queue.is_some());
        let calls = (0..backend_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd))
            .collect::<Result<Vec<_>>>()?;
        let mut relay_evts = calls
            .iter()
            .map(|e| e.try_clone().map_err(Error::EventFd))
            .collect::<Result<Vec<_>>>()?;
        let running: Arc<[AtomicBool]> = (0..backend_queues)
            .map(|_| AtomicBool::new(false))
            .collect();
        let own = match &self.own_queue {
            Some(own) => {
                if !ctx.start_paused {
                    own.reset();
                }
                let index = backend_queues;
                relay_evts.push(ctx.queue_evts[index].try_clone().map_err(Error::EventFd)?);
                Some(OwnQueueService {
                    own: own.clone(),
                    index,
                    queue: ctx.queues[index].clone(),
                    mem: ctx.mem.clone(),
                    connection: self.connection.clone(),
                    running: running.clone(),
                    kicks: ctx.queue_evts[..backend_queues]
                        .iter()
                        .map(|e| e.try_clone().map_err(Error::EventFd))
                        .collect::<Result<Vec<_>>>()?,
                })
            }
            None => None,
        };
        let relay = IoThread::spawn_watching(
            &format!("{}-call", self.kind),
            CallRelay {
                interrupt: ctx.interrupt.clone(),
                queues: backend_queues as u16,
                kind: self.kind,
                own,
            },
            relay_evts,
            &[],
            ctx.start_paused,
            ctx.io_thread_start.clone(),
        )?;
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            running,
            backend_queues,
            own_queue: self.own_queue.clone(),
            queues: ctx.queues,
            kicks: ctx.queue_evts,
            calls,
            relay,
            acked_features: ctx.acked_features,
            needs_setup: true,
        });
        let result = if ctx.start_paused {
            self.ready_session()
        } else {
            self.start_rings()
        };
        if result.is_err() {
            self.active = None;
        }
        result
    }

    pub fn reset(&mut self) {
        self.stop_rings();
        self.active = None;
        if let Some(own) = &self.own_queue {
            own.reset();
        }
    }

    /// Stops the rings (their positions go into the queues, which the transport saves) and the
    /// call relay; a call not relayed yet becomes the queue's interrupt here.
    pub fn pause(&mut self) -> Result<()> {
        self.stop_rings();
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        active.relay.pause()?;
        // The transport's saved interrupt status raises it again after a restore.
        for (queue, call) in active.calls.iter().enumerate() {
            if call.read().is_ok() {
                if let Err(e) = active.interrupt.signal_used_queue(queue as u16) {
                    error!("{}: cannot raise queue {queue}'s interrupt: {e}", self.kind);
                }
            }
        }
        Ok(())
    }

    /// Starts the rings again from the queues' positions (reconnecting and sending the memory
    /// table first when the backend was lost or this is a restored device), then the relay.
    pub fn resume(&mut self) -> Result<()> {
        if self.active.is_none() {
            return Ok(());
        }
        self.start_rings()?;
        if let Some(active) = self.active.as_mut() {
            active.relay.resume()?;
        }
        Ok(())
    }
}

/// How long a stopped ring's requests in flight may take to reach the used ring.
const IN_FLIGHT_TIMEOUT: Duration = Duration::from_secs(5);

/// Polls the used index of `queue` until it reaches `base` or [`IN_FLIGHT_TIMEOUT`] passed;
/// returns the last one read (`fallback` when it cannot be read).
fn wait_for_used(queue: &Queue, mem: &GuestMemoryMmap, base: u16, fallback: u16) -> u16 {
    let deadline = Instant::now() + IN_FLIGHT_TIMEOUT;
    loop {
        let used = queue
            .used_idx(mem, Ordering::Acquire)
            .map_or(fallback, |u| u.0);
        if used == base || Instant::now() >= deadline {
            return used;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// SET_FEATURES (the driver's, those the backend offers, plus the protocol-features bit; the
/// bits the front-end itself provides, such as a MAC in the configuration space, stay here)
/// and SET_MEM_TABLE from the guest RAM's regions, each a file descriptor and an offset.
fn set_up(socket: &Path, session: &mut Session, active: &Active) -> Result<()> {
    let protocol_bit = session.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    session
        .frontend
        .set_features((active.acked_features & session.backend_features) | protocol_bit)
        .map_err(vhost_error(socket, "SET_FEATURES"))?;
    let regions = active
        .mem
        .iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|e| Error::VhostUser {
                socket: socket.to_owned(),
                what: format!(
                    "guest RAM at {:#x} has no file descriptor to share: vhost-user needs RAM the \
                     backend can map (an NV VM, or a shared file-backed memory zone)",
                    region.start_addr().0
                ),
                source: Some(e),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    session
        .frontend
        .set_mem_table(&regions)
        .map_err(vhost_error(socket, "SET_MEM_TABLE"))?;
    Ok(())
}

fn start_rings(
    socket: &Path,
    kind: &str,
    session: &mut Session,
    active: &mut Active,
) -> Result<()> {
    let host_address = |mem: &GuestMemoryMmap, gpa: u64, what: &str| {
        mem.get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|e| Error::VhostUser {
                socket: socket.to_owned(),
                what: format!("the {what} at guest {gpa:#x} is outside guest RAM: {e}"),
                source: None,
            })
    };
    for (index, queue) in active.queues.iter().enumerate().take(active.backend_queues) {
        let (config, base) = {
            let queue = lock_queue(queue)?;
            if !queue.ready() || active.running[index].load(Ordering::SeqCst) {
                continue;
            }
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host_address(&active.mem, queue.desc_table(), "descriptor table")?,
                used_ring_addr: host_address(&active.mem, queue.used_ring(), "used ring")?,
                avail_ring_addr: host_address(&active.mem, queue.avail_ring(), "available ring")?,
                log_addr: None,
            };
            (config, queue.next_avail())
        };
        let frontend = &mut session.frontend;
        frontend
            .set_vring_num(index, config.queue_size)
            .map_err(vhost_error(socket, "SET_VRING_NUM"))?;
        frontend
            .set_vring_addr(index, &config)
            .map_err(vhost_error(socket, "SET_VRING_ADDR"))?;
        frontend
            .set_vring_base(index, base)
            .map_err(vhost_error(socket, "SET_VRING_BASE"))?;
        frontend
            .set_vring_call(index, &active.calls[index])
            .map_err(vhost_error(socket, "SET_VRING_CALL"))?;
        frontend
            .set_vring_kick(index, &active.kicks[index])
            .map_err(vhost_error(socket, "SET_VRING_KICK"))?;
        let enabled = active
            .own_queue
            .as_ref()
            .is_none_or(|own| own.ring_enabled(index));
        if session.rings_need_enable() {
            // Explicitly off too: a ring stopped and started again on the same session may
            // have been on before.
            session
                .frontend
                .set_vring_enable(index, enabled)
                .map_err(vhost_error(socket, "SET_VRING_ENABLE"))?;
        }
        active.running[index].store(true, Ordering::SeqCst);
        // A kick the guest gave while the ring was stopped (or before a power failure) is not
        // in this eventfd: kick once, an empty ring costs the backend one look.
        if let Err(e) = active.kicks[index].write(1) {
            warn!(
                "{kind} {}: cannot kick queue {index}: {e}",
                socket.display()
            );
        }
    }
    Ok(())
}

/// Turns the backend's call eventfds into the queues' interrupts (MSI-X vectors the driver
/// assigned). Which call fired is not told apart: every queue is signalled, and a driver finds
/// nothing new on a queue whose call did not fire.
struct CallRelay {
    interrupt: Arc<VirtioInterrupt>,
    queues: u16,
    kind: &'static str,
    /// The queue the VMM serves, whose notify also wakes this thread.
    own: Option<OwnQueueService>,
}

/// What the relay thread needs to serve an [`OwnQueue`].
struct OwnQueueService {
    own: Arc<dyn OwnQueue>,
    index: usize,
    queue: Arc<Mutex<Queue>>,
    mem: GuestMemoryMmap,
    connection: VhostUserConnection,
    running: Arc<[AtomicBool]>,
    /// The backend rings' kicks: a ring switched on is kicked once, so what the driver posted
    /// while it was off is served.
    kicks: Vec<EventFd>,
}

impl OwnQueueService {
    /// Serves the queue; SET_VRING_ENABLE goes to each ring the backend runs now (a ring that
    /// does not run gets its state when it starts, from [`OwnQueue::ring_enabled`]).
    fn serve(&self, kind: &str, interrupt: &VirtioInterrupt, pause_requested: &AtomicBool) {
        let socket = self.connection.socket().display().to_string();
        let mut switch = |index: usize, enabled: bool| {
            let mut guard = self.connection.lock();
            let Some(session) = guard.as_mut() else {
                return;
            };
            if !self
                .running
                .get(index)
                .is_some_and(|r| r.load(Ordering::SeqCst))
            {
                return;
            }
            if let Err(e) = session.frontend.set_vring_enable(index, enabled) {
                error!(
                    "vhost-user backend at {socket}: SET_VRING_ENABLE of queue {index} failed \
                     ({e}); it is set again when the backend is back"
                );
                return;
            }
            if enabled {
                if let Err(e) = self.kicks[index].write(1) {
                    warn!("{kind} {socket}: cannot kick queue {index}: {e}");
                }
            }
        };
        let used = match lock_queue(&self.queue) {
            Ok(mut queue) => self
                .own
                .serve(&mut queue, &self.mem, pause_requested, &mut switch),
            Err(e) => {
                error!("{kind} {socket}: queue {}: {e}", self.index);
                false
            }
        };
        let notify = used
            && lock_queue(&self.queue)
                .map(|mut q| q.needs_notification(&self.mem).unwrap_or(true))
                .unwrap_or(true);
        if notify {
            if let Err(e) = interrupt.signal_used_queue(self.index as u16) {
                error!("{kind}: cannot raise queue {}'s interrupt: {e}", self.index);
            }
        }
    }
}

impl QueueWorker for CallRelay {
    fn process_queues(&mut self, pause_requested: &AtomicBool) {
        if let Some(own) = &self.own {
            own.serve(self.kind, &self.interrupt, pause_requested);
        }
        for queue in 0..self.queues {
            if let Err(e) = self.interrupt.signal_used_queue(queue) {
                error!("{}: cannot raise queue {queue}'s interrupt: {e}", self.kind);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKET: &str = "/run/test/fs.sock";

    #[test]
    fn device_state_goes_through_a_pipe_both_ways() {
        let socket = Path::new(SOCKET);
        let (reader, writer) = std::io::pipe().unwrap();
        // More than a pipe holds: the reader must run while the writer writes.
        let state: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expected = state.clone();
        let writing = std::thread::spawn(move || {
            write_all_bounded(
                socket,
                OwnedFd::from(writer),
                &state,
                Duration::from_secs(10),
            )
        });
        let read = read_to_end_bounded(
            socket,
            OwnedFd::from(reader),
            Duration::from_secs(10),
            MAX_DEVICE_STATE_LEN,
        )
        .unwrap();
        writing.join().unwrap().unwrap();
        assert_eq!(read, expected);
    }

    #[test]
    fn a_state_larger_than_the_limit_is_an_error_naming_the_socket() {
        let socket = Path::new(SOCKET);
        let (reader, writer) = std::io::pipe().unwrap();
        let writing = std::thread::spawn(move || {
            // The reader gives up and closes its end: this write then fails, as a backend's.
            let _ = write_all_bounded(
                socket,
                OwnedFd::from(writer),
                &[7u8; 10_000],
                Duration::from_secs(10),
            );
        });
        let error =
            read_to_end_bounded(socket, OwnedFd::from(reader), Duration::from_secs(10), 4096)
                .unwrap_err()
                .to_string();
        writing.join().unwrap();
        assert!(error.contains(SOCKET), "{error}");
        assert!(error.contains("larger than 4096 bytes"), "{error}");
    }

    #[test]
    fn a_backend_that_never_finishes_its_state_is_an_error_after_the_bound() {
        let socket = Path::new(SOCKET);
        let (reader, writer) = std::io::pipe().unwrap();
        let started = Instant::now();
        let error = read_to_end_bounded(
            socket,
            OwnedFd::from(reader),
            Duration::from_millis(200),
            4096,
        )
        .unwrap_err()
        .to_string();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            error.contains(SOCKET) && error.contains("did not finish"),
            "{error}"
        );
        drop(writer);
    }
}
