//! What every vhost-user device shares: the connection to its backend (client or server side of
//! the socket, reconnected after the backend was lost) and the rings the backend serves
//! (activation, GET_VRING_BASE before a save, SET_MEM_TABLE and SET_VRING_BASE after a
//! restore). A device adds its features and configuration space (`blk`, `net`).

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
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
}

impl VhostUserConnection {
    /// Opens the session with the backend at `socket`: as a client, connecting (retrying while
    /// the socket is missing or refuses connections); as a server, creating the socket (a stale
    /// one at the path is replaced) and waiting for the backend to connect. Both wait up to
    /// [`VHOST_USER_CONNECT_TIMEOUT`] and then fail with an error naming the socket.
    pub fn open(socket: &Path, mode: VhostUserMode) -> Result<Self> {
        let listener = match mode {
            VhostUserMode::Client => None,
            VhostUserMode::Server => Some(Arc::new(listen(socket)?)),
        };
        let connection = VhostUserConnection {
            socket: socket.to_owned(),
            session: Arc::new(Mutex::new(None)),
            listener,
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
        match &self.listener {
            None => connect(&self.socket, VHOST_USER_CONNECT_TIMEOUT),
            Some(listener) => accept(listener, &self.socket, VHOST_USER_CONNECT_TIMEOUT),
        }
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
}

/// What an activation set up.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Arc<Mutex<Queue>>>,
    /// Queue-notify eventfds (the ioeventfds at the notify addresses), handed over as kicks.
    kicks: Vec<EventFd>,
    /// One per queue, handed over as calls; the relay thread turns them into interrupts.
    calls: Vec<EventFd>,
    relay: IoThread,
    acked_features: u64,
    /// The session in use has not had SET_FEATURES and SET_MEM_TABLE yet (a new connection).
    needs_setup: bool,
    /// Which queues the backend runs now.
    running: Vec<bool>,
}

impl VhostUserRings {
    pub fn new(connection: VhostUserConnection, kind: &'static str) -> Self {
        VhostUserRings {
            connection,
            kind,
            active: None,
        }
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
        for (index, queue) in active.queues.iter().enumerate() {
            if !std::mem::take(&mut active.running[index]) {
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
        let calls = (0..ctx.queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd))
            .collect::<Result<Vec<_>>>()?;
        let relay_evts = calls
            .iter()
            .map(|e| e.try_clone().map_err(Error::EventFd))
            .collect::<Result<Vec<_>>>()?;
        let relay = IoThread::spawn_watching(
            &format!("{}-call", self.kind),
            CallRelay {
                interrupt: ctx.interrupt.clone(),
                queues: ctx.queues.len() as u16,
                kind: self.kind,
            },
            relay_evts,
            &[],
            ctx.start_paused,
            ctx.io_thread_start.clone(),
        )?;
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            running: vec![false; ctx.queues.len()],
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
    for (index, queue) in active.queues.iter().enumerate() {
        let (config, base) = {
            let queue = lock_queue(queue)?;
            if !queue.ready() || active.running[index] {
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
        if session.rings_need_enable() {
            session
                .frontend
                .set_vring_enable(index, true)
                .map_err(vhost_error(socket, "SET_VRING_ENABLE"))?;
        }
        active.running[index] = true;
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
}

impl QueueWorker for CallRelay {
    fn process_queues(&mut self, _pause_requested: &AtomicBool) {
        for queue in 0..self.queues {
            if let Err(e) = self.interrupt.signal_used_queue(queue) {
                error!("{}: cannot raise queue {queue}'s interrupt: {e}", self.kind);
            }
        }
    }
}
