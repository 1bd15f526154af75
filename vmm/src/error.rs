//! The one error type of the `vmm` crate. Every variant names what failed and, where a path or a
//! size is involved, which one, so that an operator reading a single log line knows what to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no VM to run: the command line describes none (missing --kernel?)")]
    NoVmConfig,
    #[error("no kernel given (--kernel)")]
    NoKernel,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (12 required)")]
    KvmApiVersion(i32),
    #[error("the host KVM lacks a required capability: {0}")]
    KvmCapabilityMissing(&'static str),
    #[error("KVM {operation} failed: {source}")]
    Kvm {
        operation: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: KVM {operation} failed: {source}")]
    VcpuKvm {
        vcpu: u8,
        operation: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("invalid memory configuration: {0}")]
    MemoryConfig(String),
    #[error("guest memory file {path}: {operation} failed: {source}")]
    MemoryFile {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory: mapping {size:#x} bytes failed: {reason}")]
    MemoryMap { size: u64, reason: String },
    #[error("guest memory layout: {0}")]
    MemoryLayout(String),
    #[error("{vcpus} vCPUs requested, this host's KVM supports at most {max}")]
    TooManyVcpus { vcpus: u8, max: usize },
    #[error("loading the kernel {path}: {reason}")]
    KernelLoad { path: PathBuf, reason: String },
    #[error("setting up the boot registers: {0}")]
    BootRegisters(String),
    #[error("device setup: {0}")]
    Device(String),
    #[error("serial output {path}: {source}")]
    SerialOutput {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path}: {source}")]
    DiskImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot spawn the {thread} thread: {source}")]
    ThreadSpawn {
        thread: String,
        #[source]
        source: std::io::Error,
    },
    #[error("installing the vCPU kick signal handler failed: {0}")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("holding or releasing SIGPWR (power-fail signal) failed: {0}")]
    PowerFailSignalMask(String),
    #[error("only {parked} of {total} vCPUs parked within {timeout_ms} ms")]
    PauseTimeout {
        parked: usize,
        total: usize,
        timeout_ms: u64,
    },
    #[error("operation not valid while the VM is {0}")]
    InvalidVmState(&'static str),
    #[error("vCPU {vcpu} failed: {reason}")]
    VcpuFailed { vcpu: u8, reason: String },
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// `vm.snapshot` of a VM that is not paused (upstream's words); nothing was written.
    #[error("Trying to snapshot while VM is running")]
    SnapshotVmRunning,
    /// `vm.snapshot` into a path that is not an existing directory (upstream's words; upstream
    /// does not create it and neither do we).
    #[error("Destination is not a directory: {0:?}")]
    SnapshotDestination(PathBuf),
    /// Writing a snapshot failed; the files this attempt created are removed.
    #[error("snapshot: {operation} {path}: {source}")]
    SnapshotIo {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A VM state (a snapshot's `state.json`, an NV state slot) that cannot be what a VM was
    /// in: wrong shape, length or value. Refused before any of it reaches KVM.
    #[error("invalid VM state: {0}")]
    InvalidState(String),
    #[error("API server: {0}")]
    Api(String),
    #[error("seccomp: {0}")]
    Seccomp(String),
    #[error("VM state: {0}")]
    State(String),
    #[error("event fd {operation}: {source}")]
    EventFd {
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("control loop epoll {operation}: {source}")]
    Epoll {
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// An NV region operation failed. The cause is part of the message and deliberately not a
    /// `#[source]`: the CLI prints the chain, and "unsafe shutdown — state incomplete" must read
    /// once.
    #[error("{context}: {error}")]
    Nv {
        context: String,
        error: nv_extension::Error,
    },
    #[error("the VM would not boot again, so it was left as it is: {0}")]
    NotBootable(String),
    #[error("no VM in NV memory runs in this VMM")]
    NoNvVm,
    #[error(transparent)]
    Landlock(#[from] crate::landlock::LandlockError),
    #[error("--nv region={region},vm={vm}: {reason}")]
    NvSetup {
        region: String,
        vm: String,
        reason: String,
        kind: ErrorKind,
    },
}

/// What kind of failure an [`Error`] is: what the API answers it with (400, 404, 409, 405, 500),
/// decided by the variant (and, for NV errors, by `nv_extension::ErrorKind`), never by its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is unusable: a bad value or configuration.
    InvalidRequest,
    /// What the request names does not exist (the NV region or VM, the VM to operate on).
    NotFound,
    /// The request is valid but the current state refuses it: recovery of a VM with no
    /// resumable state, a VM owned by another live process, a saved state a cold boot would
    /// overwrite.
    Conflict,
    /// The VM is in the wrong run state for the operation (not booted, not paused, ...).
    WrongState,
    /// The operation was attempted and failed.
    Internal,
}

impl From<nv_extension::ErrorKind> for ErrorKind {
    fn from(kind: nv_extension::ErrorKind) -> Self {
        match kind {
            nv_extension::ErrorKind::NotFound => ErrorKind::NotFound,
            nv_extension::ErrorKind::Conflict => ErrorKind::Conflict,
            nv_extension::ErrorKind::InvalidInput => ErrorKind::InvalidRequest,
            nv_extension::ErrorKind::Internal => ErrorKind::Internal,
        }
    }
}

impl Error {
    /// The kind of this failure. Every variant is listed, so a new one must be classified.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidVmState(_) => ErrorKind::WrongState,
            Error::NoVmConfig
            | Error::NoKernel
            | Error::MemoryConfig(_)
            | Error::TooManyVcpus { .. }
            | Error::InvalidState(_)
            | Error::Snapshot(_) => ErrorKind::InvalidRequest,
            Error::SnapshotVmRunning => ErrorKind::WrongState,
            Error::NoNvVm => ErrorKind::NotFound,
            Error::NotBootable(_) => ErrorKind::Conflict,
            Error::Nv { error, .. } => error.kind().into(),
            Error::NvSetup { kind, .. } => *kind,
            Error::KvmOpen(_)
            | Error::KvmApiVersion(_)
            | Error::KvmCapabilityMissing(_)
            | Error::Kvm { .. }
            | Error::VcpuKvm { .. }
            | Error::MemoryFile { .. }
            | Error::MemoryMap { .. }
            | Error::MemoryLayout(_)
            | Error::KernelLoad { .. }
            | Error::BootRegisters(_)
            | Error::Device(_)
            | Error::SerialOutput { .. }
            | Error::DiskImage { .. }
            | Error::ThreadSpawn { .. }
            | Error::SignalHandler(_)
            | Error::PowerFailSignalMask(_)
            | Error::PauseTimeout { .. }
            | Error::VcpuFailed { .. }
            | Error::Api(_)
            | Error::SnapshotDestination(_)
            | Error::SnapshotIo { .. }
            | Error::Seccomp(_)
            | Error::State(_)
            | Error::EventFd { .. }
            | Error::Epoll { .. }
            | Error::Landlock(_) => ErrorKind::Internal,
        }
    }
}
