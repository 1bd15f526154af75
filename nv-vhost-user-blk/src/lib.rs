//! What NV-Hypervisor's vhost-user backends share (`nv-vhost-user-blk`, `nv-vhost-user-net`):
//! logging to stderr, a fresh worker exit event per session, and the session loop that serves
//! one front-end at a time and waits for the next when it goes (a VMM that lost power comes
//! back as a new process on the same socket).

use std::path::PathBuf;
use std::time::Duration;

use log::{error, info, warn};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringMutex};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Which side of the socket the backend is.
#[derive(Clone, Debug)]
pub enum SocketSide {
    /// Listen at the path (created; an old one is replaced): the VMM connects
    /// (`vhost_mode=client` on its side, upstream's default).
    Listen(PathBuf),
    /// Connect to the path, retrying while it is missing or refuses: the VMM listens
    /// (`vhost_mode=server` on its side).
    Connect(PathBuf),
}

/// A new exit event pair for a session's worker thread: the daemon ends the thread through it
/// when the front-end goes, so the next session starts clean.
pub fn new_exit_event() -> Option<(EventConsumer, EventNotifier)> {
    match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
        Ok(pair) => Some(pair),
        Err(e) => {
            error!("cannot create the worker's exit event: {e}");
            None
        }
    }
}

/// Serves front-ends one after the other, forever: each session on a new daemon, set up by
/// `on_session` (e.g. to watch a tap) before it starts.
pub fn serve_sessions<B>(
    name: &str,
    backend: B,
    side: &SocketSide,
    on_session: impl Fn(&VhostUserDaemon<B>) -> std::io::Result<()>,
) -> anyhow::Result<()>
where
    B: VhostUserBackend<Bitmap = (), Vring = VringMutex> + Clone + 'static,
{
    loop {
        let mut daemon = VhostUserDaemon::new(
            name.to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| anyhow::anyhow!("cannot start the vhost-user daemon: {e:?}"))?;
        on_session(&daemon)?;
        let result = match side {
            SocketSide::Listen(socket) => daemon.serve(socket),
            SocketSide::Connect(socket) => {
                let Some(path) = socket.to_str() else {
                    anyhow::bail!("socket path {} is not UTF-8", socket.display());
                };
                match daemon.start_client(path) {
                    Ok(()) => {
                        info!("connected to {path}");
                        daemon.wait()
                    }
                    Err(e) => {
                        warn!("cannot connect to {path} ({e:?}); retrying");
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                }
            }
        };
        match result {
            Ok(()) => info!("front-end disconnected; waiting for the next"),
            Err(e) => error!("front-end session ended: {e:?}; waiting for the next"),
        }
    }
}

/// Log lines to stderr, one per record, prefixed with the program's name.
pub fn init_logging(program: &'static str) -> anyhow::Result<()> {
    let logger = Box::leak(Box::new(StderrLogger { program }));
    log::set_logger(logger).map(|()| log::set_max_level(log::LevelFilter::Info))?;
    Ok(())
}

struct StderrLogger {
    program: &'static str,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprintln!("{}: {}: {}", self.program, record.level(), record.args());
        }
    }

    fn flush(&self) {}
}
