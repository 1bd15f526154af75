//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in this crate's public API.
///
/// Guest-caused faults on the data path (a bad descriptor chain, an out-of-range sector) are not
/// errors of the API: they are answered to the guest with a virtio status and logged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bus range at {base:#x} with length {len:#x} is empty or wraps around")]
    BusRangeInvalid { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps the device already at {existing_base:#x}+{existing_len:#x}")]
    BusOverlap {
        base: u64,
        len: u64,
        existing_base: u64,
        existing_len: u64,
    },
    #[error("no device on the bus at address {0:#x}")]
    NoDeviceAt(u64),
    #[error("the device at {0:#x} panicked earlier and its lock is poisoned")]
    DeviceLockPoisoned(u64),
    #[error("a thread panicked while changing the bus's ranges and its lock is poisoned")]
    BusLockPoisoned,
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("{what} state has version {found}, this build understands version {expected}")]
    StateVersion {
        what: &'static str,
        found: u32,
        expected: u32,
    },
    #[error("vhost-user backend at {socket}: {what}")]
    VhostUser {
        socket: PathBuf,
        what: String,
        #[source]
        source: Option<vhost::Error>,
    },
    #[error("vhost-user backend at {socket}: {what}")]
    VhostUserIo {
        socket: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot raise the GED interrupt: {0}")]
    GedInterrupt(#[source] io::Error),
    #[error("serial state is invalid: {0}")]
    SerialState(String),
    #[error("pseudo-terminal: {operation} failed: {source}")]
    Pty {
        operation: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot flush the serial output: {0}")]
    SerialFlush(#[source] io::Error),
    #[error("virtio state is for device type {found}, the device given is type {expected}")]
    DeviceTypeMismatch { found: u32, expected: u32 },
    #[error("virtio state has {found} queues, the device has {expected}")]
    QueueCountMismatch { found: usize, expected: usize },
    #[error("virtio queue {index} state is invalid: {source}")]
    QueueState {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("virtio queue {0} is not ready or its rings are outside guest memory")]
    QueueNotUsable(usize),
    #[error("a virtio queue's lock is poisoned (a thread panicked while holding it)")]
    QueueLockPoisoned,
    #[error("the device state can only be taken while the device is paused")]
    NotPaused,
    #[error("the device is already activated")]
    AlreadyActivated,
    #[error("cannot set up the I/O thread's epoll: {0}")]
    Epoll(#[source] io::Error),
    #[error("cannot start the I/O thread: {0}")]
    ThreadSpawn(#[source] io::Error),
    #[error("cannot signal the I/O thread: {0}")]
    ThreadSignal(#[source] io::Error),
    #[error("the I/O thread is gone (it exited or panicked)")]
    IoThreadGone,
    #[error("the I/O thread did not reach a quiescent point within {0:?}")]
    PauseTimeout(std::time::Duration),
    #[error("virtio-net: {0}")]
    Tap(#[source] crate::virtio::TapError),
    #[error("virtio-net: {asked} queue pairs asked for, the tap has {tap} descriptors")]
    NetQueuePairs { asked: usize, tap: usize },
    #[error("cannot open disk image {path}: {source}")]
    DiskOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read entropy source {path}: {source}")]
    RngSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot flush the console output: {0}")]
    ConsoleFlush(#[source] io::Error),
    #[error("cannot flush the disk image to stable storage: {0}")]
    DiskFlush(#[source] io::Error),
    #[error("PCI: {0}")]
    Pci(#[from] crate::pci::PciError),
}

/// Shorthand used across the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Refuses a saved `what` state of another version than the `expected` one of this build.
pub(crate) fn check_state_version(what: &'static str, found: u32, expected: u32) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(Error::StateVersion {
            what,
            found,
            expected,
        })
    }
}
