//! vhost-user front-ends: a virtio device whose queues an external process (the backend) serves
//! over a Unix socket, speaking the vhost-user protocol through the `vhost` crate's frontend.
//!
//! The VMM keeps the transport (virtio-pci registers, MSI-X) and the queues' configuration; the
//! backend gets the guest RAM (file descriptors and offsets of the regions), the rings'
//! addresses, the queue-notify eventfds (kick) and one eventfd per queue it writes when it used
//! buffers (call). Around a save the rings are stopped with GET_VRING_BASE, which answers the
//! next available index the backend will take: every request it took before is then in the used
//! ring, so the transport's saved queue state says exactly where each ring stands. A restore (a
//! recovery after a power failure, a snapshot restore, a resume) connects again, sends the
//! memory table of the mapping it has now and SET_VRING_BASE from those positions. See
//! `docs/devices.md`.

mod blk;
mod frontend;
mod fs;
mod net;

use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

use crate::{Error, Result};

pub use blk::{VhostUserBlk, VhostUserBlkLink, VHOST_USER_BLK_MAX_QUEUE_SIZE};
pub(crate) use frontend::{vhost_user_device_methods, VhostUserRings};
pub use frontend::{VhostUserConnection, VhostUserMode};
pub use fs::{VhostUserFs, VhostUserFsLink, VIRTIO_FS_MAX_REQUEST_QUEUES, VIRTIO_FS_TAG_LEN};
pub use net::{VhostUserNet, VhostUserNetLink, VhostUserNetParams, VHOST_USER_NET_MAX_QUEUE_PAIRS};

/// How long a connection waits for a backend whose socket is missing or refuses connections
/// (a backend being restarted) before it gives up with an error naming the socket.
pub const VHOST_USER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest queue a vhost-user front-end sets up (the split ring's limit).
pub(crate) const MAX_QUEUE_SIZE: u16 = 32768;

/// How long one request waits for the backend's answer: a socket that accepts but does not
/// speak vhost-user fails here instead of hanging the VMM.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Protocol features the front-end can use: the device configuration space (GET_CONFIG) and
/// the number of queues (GET_QUEUE_NUM).
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::CONFIG.union(VhostUserProtocolFeatures::MQ);

/// An open session with a backend, past SET_OWNER and the protocol-feature negotiation.
pub(crate) struct Session {
    pub frontend: Frontend,
    /// The virtio features the backend offers (with VHOST_USER_F_PROTOCOL_FEATURES).
    pub backend_features: u64,
    /// The protocol features both sides use.
    pub protocol_features: VhostUserProtocolFeatures,
}

impl Session {
    /// Whether the rings start disabled and need SET_VRING_ENABLE.
    pub fn rings_need_enable(&self) -> bool {
        self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Checks the backend serves at least `asked` queues (GET_QUEUE_NUM with the MQ protocol
    /// feature; one without it). `device` names the device in the error.
    pub fn check_queues(&mut self, socket: &Path, asked: usize, device: &str) -> Result<()> {
        let invalid = |what: String| Error::VhostUser {
            socket: socket.to_owned(),
            what,
            source: None,
        };
        if self
            .protocol_features
            .contains(VhostUserProtocolFeatures::MQ)
        {
            let backend_queues = self
                .frontend
                .get_queue_num()
                .map_err(vhost_error(socket, "GET_QUEUE_NUM"))?;
            if backend_queues < asked as u64 {
                return Err(invalid(format!(
                    "serves {backend_queues} queues, {device} asks for {asked}"
                )));
            }
        } else if asked > 1 {
            return Err(invalid(format!(
                "does not offer several queues, {device} asks for {asked}"
            )));
        }
        Ok(())
    }
}

/// Connects to the backend at `socket`, retrying while the socket is missing or refuses
/// connections until `timeout` passed, then opens the session.
pub(crate) fn connect(socket: &Path, timeout: Duration) -> Result<Session> {
    let started = Instant::now();
    let mut announced = false;
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && started.elapsed() < timeout =>
            {
                if !announced {
                    warn!(
                        "vhost-user backend at {} not there yet ({e}); retrying for up to {}s",
                        socket.display(),
                        timeout.as_secs()
                    );
                    announced = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(Error::VhostUserIo {
                    socket: socket.to_owned(),
                    what: format!(
                        "cannot connect (gave up after {:.1}s)",
                        started.elapsed().as_secs_f64()
                    ),
                    source,
                })
            }
        }
    };
    open_session(socket, stream)
}

/// Waits on `listener` (bound at `socket`, non-blocking) for a backend to connect until
/// `timeout` passed, then opens the session: the front-end's side of `vhost_mode=server`.
pub(crate) fn accept(listener: &UnixListener, socket: &Path, timeout: Duration) -> Result<Session> {
    let started = Instant::now();
    let mut announced = false;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && started.elapsed() < timeout => {
                if !announced {
                    info!(
                        "vhost-user: waiting up to {}s for a backend to connect to {}",
                        timeout.as_secs(),
                        socket.display()
                    );
                    announced = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(Error::VhostUserIo {
                    socket: socket.to_owned(),
                    what: format!(
                        "no backend connected (gave up after {:.1}s)",
                        started.elapsed().as_secs_f64()
                    ),
                    source,
                })
            }
        }
    };
    let blocking = set_non_blocking(&stream, false);
    blocking.map_err(|source| Error::VhostUserIo {
        socket: socket.to_owned(),
        what: "cannot make the connection blocking".to_owned(),
        source,
    })?;
    open_session(socket, stream)
}

/// Sets or clears O_NONBLOCK with fcntl: the VMM thread's seccomp filter has no FIONBIO ioctl,
/// which std's `set_nonblocking` uses (a hotplug in server mode listens and accepts under it).
pub(crate) fn set_non_blocking(socket: &impl AsRawFd, non_blocking: bool) -> std::io::Result<()> {
    let fd = socket.as_raw_fd();
    // SAFETY: F_GETFL only reads the status flags of a descriptor the caller holds open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let flags = if non_blocking {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: F_SETFL only sets the status flags of the same open descriptor.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens the session on a connected `stream`: SET_OWNER, GET_FEATURES and the protocol
/// features, every reply bounded by [`REPLY_TIMEOUT`].
fn open_session(socket: &Path, stream: UnixStream) -> Result<Session> {
    let io_error = |what: &str| io_error(socket, what);
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(io_error("cannot set the reply timeout"))?;
    stream
        .set_write_timeout(Some(REPLY_TIMEOUT))
        .map_err(io_error("cannot set the request timeout"))?;
    let mut frontend = Frontend::from_stream(stream, u64::from(u16::MAX));
    let request = |what: &'static str| vhost_error(socket, what);
    frontend
        .set_owner()
        .map_err(request("SET_OWNER (is this a vhost-user socket?)"))?;
    let backend_features = frontend.get_features().map_err(request("GET_FEATURES"))?;
    let mut protocol_features = VhostUserProtocolFeatures::empty();
    if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let offered = frontend
            .get_protocol_features()
            .map_err(request("GET_PROTOCOL_FEATURES"))?;
        protocol_features = offered & WANTED_PROTOCOL_FEATURES;
        frontend
            .set_protocol_features(protocol_features)
            .map_err(request("SET_PROTOCOL_FEATURES"))?;
    }
    info!(
        "vhost-user backend at {}: connected, features {backend_features:#x}, protocol features \
         {:#x}",
        socket.display(),
        protocol_features.bits()
    );
    Ok(Session {
        frontend,
        backend_features,
        protocol_features,
    })
}

/// Maps a failed socket operation `what` to the socket's error.
pub(crate) fn io_error(socket: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let socket: PathBuf = socket.to_owned();
    let what = what.to_owned();
    move |source| Error::VhostUserIo {
        socket,
        what,
        source,
    }
}

/// Maps a failed request `what` to the socket's error.
pub(crate) fn vhost_error(socket: &Path, what: &str) -> impl FnOnce(vhost::Error) -> Error {
    let socket: PathBuf = socket.to_owned();
    let what = what.to_owned();
    move |source| Error::VhostUser {
        socket,
        what: format!("{what} failed"),
        source: Some(source),
    }
}
