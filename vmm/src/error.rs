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
    #[error("guest memory: mapping {size:#x} bytes failed: {what}: {source}")]
    MemoryMap {
        size: u64,
        /// The backing and the guest address of the mapping.
        what: String,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest memory: mapping {size:#x} bytes failed: size exceeds usize")]
    MemoryMapTooLarge { size: u64 },
    /// A layout the configuration asks for cannot be built (a message, no underlying error).
    #[error("guest memory layout: {0}")]
    MemoryLayout(String),
    #[error("guest memory layout: building the guest memory map: {0}")]
    GuestMemoryMap(#[source] vm_memory::GuestRegionCollectionError),
    #[error("{vcpus} vCPUs requested, this host's KVM supports at most {max}")]
    TooManyVcpus { vcpus: u8, max: usize },
    #[error("loading the kernel {path}: {source}")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the kernel {path}: initramfs: {source}")]
    InitramfsOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the kernel {path}: {source}")]
    KernelLoad {
        path: PathBuf,
        #[source]
        source: arch::Error,
    },
    #[error("writing the ACPI tables: {0}")]
    AcpiTables(#[source] arch::acpi::AcpiError),
    #[error("setting up the boot registers: {0}")]
    BootRegisters(#[source] arch::Error),
    #[error("setting up the boot registers: initial MSR list: {0}")]
    BootMsrList(#[source] vmm_sys_util::fam::Error),
    #[error("setting up the boot registers: KVM refused boot MSR {0:#x}")]
    BootMsrRefused(u32),
    /// A hotplugged device's id is taken already (upstream's message).
    #[error("Identifier {0} is not unique")]
    DuplicateDeviceId(String),
    /// `vm.remove-device` names no device (upstream's message).
    #[error("Unknown device id: {0:?}")]
    UnknownDeviceId(String),
    /// A device configuration that cannot be set up (a message, no underlying error).
    #[error("device setup: {0}")]
    Device(String),
    /// Setting up, pausing, resuming or flushing `device` failed.
    #[error("device setup: {device}: {source}")]
    DeviceFailed {
        device: String,
        #[source]
        source: DeviceCause,
    },
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
    /// `threads` says where each vCPU thread was (its step, and the host's view of it).
    #[error("only {parked} of {total} vCPUs parked within {timeout_ms} ms: {threads}")]
    PauseTimeout {
        parked: usize,
        total: usize,
        timeout_ms: u64,
        threads: String,
    },
    #[error("operation not valid while the VM is {0}")]
    InvalidVmState(&'static str),
    /// A snapshot that cannot be taken or restored (a message, no underlying error).
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// Reading, decoding or restoring `what` of a snapshot failed.
    #[error("snapshot: {what}: {source}")]
    SnapshotFailed {
        what: String,
        /// Boxed: some causes are large, and every `Result<_, Error>` would carry their size.
        #[source]
        source: Box<SnapshotCause>,
    },
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
    Api(#[source] crate::api::ApiServerError),
    #[error("seccomp: {0}")]
    Seccomp(#[source] crate::seccomp_filters::SeccompError),
    /// A VM state that does not fit this VM (a message, no underlying error).
    #[error("VM state: {0}")]
    State(String),
    /// A KVM state buffer (MSR list, xsave area) of `what` could not be allocated.
    #[error("VM state: {what}: {source}")]
    StateBuffer {
        what: String,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// Saving or restoring the state of `device` failed.
    #[error("VM state: {device}: {source}")]
    DeviceState {
        device: String,
        #[source]
        source: DeviceCause,
    },
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
    #[error("the VM would not boot again, so it was left as it is: {0}")]
    NotBootableConfig(#[source] crate::config::ConfigError),
    /// `vm.nv-checkpoint` on a VM whose devices cannot follow checkpoints (a vhost-user net).
    #[error("checkpoints refused: {0}")]
    CheckpointRefused(#[source] crate::config::ConfigError),
    /// `vm.remove-device` of a disk while checkpoints are on: the epoch's disk undo entries
    /// name disks by their position, which the removal would shift.
    #[error(
        "disk {0} cannot be removed while NV checkpoints are on (the epoch's disk undo entries \
         name disks by position); turn checkpoints off first (vm.nv-checkpoint interval_ms 0)"
    )]
    DiskRemovalWhileCheckpointed(String),
    /// Checkpoints turned on while the guest has yet to eject a disk `vm.remove-device` asked
    /// for: its eject would shift the positions the epoch's disk undo entries name disks by.
    #[error(
        "NV checkpoints cannot start while the removal of disk {0} is pending (the guest has not \
         ejected it yet, and its eject would shift the disk positions the undo entries name)"
    )]
    CheckpointsWhileDiskRemovalPending(String),
    #[error("the VM would not boot again, so it was left as it is: {what} {path}: {source}")]
    NotBootableFile {
        what: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("NV checkpoints")]
    Checkpoint(#[source] CheckpointError),
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

/// Why a device could not be set up or its state saved or restored: the error of the layer
/// below, kept whole (as this cause's `source()`) so that the chain reaches the root cause.
#[derive(Debug, thiserror::Error)]
pub enum DeviceCause {
    #[error("{0}")]
    Device(#[from] devices::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Platform(#[from] arch::Error),
    #[error("{0}")]
    Pci(#[from] devices::pci::PciError),
}

/// Why a snapshot could not be read, decoded or restored: the error of the layer below.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotCause {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    OnDemand(#[from] crate::userfaultfd::UffdError),
}

impl Error {
    /// `what` of a snapshot could not be read, decoded or restored because of `cause`.
    pub fn snapshot(what: impl Into<String>, cause: impl Into<SnapshotCause>) -> Self {
        Error::SnapshotFailed {
            what: what.into(),
            source: Box::new(cause.into()),
        }
    }

    /// `device` failed to be set up (or paused, resumed, flushed) because of `cause`.
    pub fn device(device: impl Into<String>, cause: impl Into<DeviceCause>) -> Self {
        Error::DeviceFailed {
            device: device.into(),
            source: cause.into(),
        }
    }

    /// The state of `device` could not be saved or restored because of `cause`.
    pub fn device_state(device: impl Into<String>, cause: impl Into<DeviceCause>) -> Self {
        Error::DeviceState {
            device: device.into(),
            source: cause.into(),
        }
    }
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
            | Error::Snapshot(_)
            | Error::SnapshotFailed { .. } => ErrorKind::InvalidRequest,
            Error::SnapshotVmRunning => ErrorKind::WrongState,
            Error::Checkpoint(CheckpointError::UncoverableDisk { .. }) => ErrorKind::InvalidRequest,
            Error::NoNvVm | Error::UnknownDeviceId(_) => ErrorKind::NotFound,
            Error::DuplicateDeviceId(_) => ErrorKind::Conflict,
            Error::NotBootable(_) | Error::NotBootableConfig(_) | Error::NotBootableFile { .. } => {
                ErrorKind::Conflict
            }
            Error::CheckpointRefused(_)
            | Error::DiskRemovalWhileCheckpointed(_)
            | Error::CheckpointsWhileDiskRemovalPending(_) => ErrorKind::Conflict,
            Error::Nv { error, .. } => error.kind().into(),
            Error::NvSetup { kind, .. } => *kind,
            Error::KvmOpen(_)
            | Error::KvmApiVersion(_)
            | Error::KvmCapabilityMissing(_)
            | Error::Kvm { .. }
            | Error::VcpuKvm { .. }
            | Error::MemoryFile { .. }
            | Error::MemoryMap { .. }
            | Error::MemoryMapTooLarge { .. }
            | Error::MemoryLayout(_)
            | Error::GuestMemoryMap(_)
            | Error::KernelOpen { .. }
            | Error::InitramfsOpen { .. }
            | Error::KernelLoad { .. }
            | Error::AcpiTables(_)
            | Error::BootRegisters(_)
            | Error::BootMsrList(_)
            | Error::BootMsrRefused(_)
            | Error::Device(_)
            | Error::DeviceFailed { .. }
            | Error::DeviceState { .. }
            | Error::StateBuffer { .. }
            | Error::SerialOutput { .. }
            | Error::DiskImage { .. }
            | Error::ThreadSpawn { .. }
            | Error::SignalHandler(_)
            | Error::Checkpoint(_)
            | Error::PowerFailSignalMask(_)
            | Error::PauseTimeout { .. }
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

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::fs::File;
    use std::path::PathBuf;

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::api::cause_chain;

    /// The causes of `error`, outermost first, as `source()` reaches them.
    fn sources(error: &Error) -> Vec<&(dyn std::error::Error + 'static)> {
        std::iter::successors(error.source(), |&cause| cause.source()).collect()
    }

    #[test]
    fn an_arch_failure_is_reachable_through_source_down_to_the_io_error() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        // A directory opens but cannot be read (EISDIR): arch's ReadKernel with an io cause.
        let mut kernel = File::open(std::env::temp_dir()).unwrap();
        let arch_error = arch::load_kernel(&memory, &mut kernel, "console=ttyS0", None, None)
            .expect_err("a directory is no kernel");
        let error = Error::KernelLoad {
            path: PathBuf::from("/boot/vmlinux"),
            source: arch_error,
        };
        let chain = sources(&error);
        assert!(
            matches!(
                chain
                    .first()
                    .and_then(|cause| cause.downcast_ref::<arch::Error>()),
                Some(arch::Error::ReadKernel(_))
            ),
            "first cause is arch's error: {chain:?}"
        );
        let root = chain
            .last()
            .and_then(|cause| cause.downcast_ref::<std::io::Error>())
            .expect("the root cause is the io error");
        assert_eq!(root.raw_os_error(), Some(libc::EISDIR));
        // The API body and the CLI line name each cause once, as the flattened string did.
        assert_eq!(
            cause_chain(&error),
            vec![format!(
                "loading the kernel /boot/vmlinux: cannot read the kernel image: {root}"
            )]
        );
    }

    #[test]
    fn a_device_failure_keeps_the_device_error_as_its_cause() {
        let cause = devices::Error::DiskOpen {
            path: PathBuf::from("/x.img"),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let error = Error::device("disk /x.img", cause);
        assert_eq!(error.kind(), ErrorKind::Internal);
        let chain = sources(&error);
        assert!(
            chain
                .iter()
                .any(|cause| cause.downcast_ref::<devices::Error>().is_some()),
            "the devices error itself is reachable: {chain:?}"
        );
        assert!(
            chain
                .iter()
                .any(|cause| cause.downcast_ref::<std::io::Error>().is_some()),
            "the io error is reachable: {chain:?}"
        );
        assert_eq!(cause_chain(&error), vec![error.to_string()]);
        assert_eq!(
            error.to_string(),
            format!(
                "device setup: disk /x.img: cannot open disk image /x.img: {}",
                std::io::Error::from_raw_os_error(libc::ENOENT)
            )
        );
    }
}

/// Why continuous NV checkpoints could not be started or kept going (the region's own errors
/// are [`Error::Nv`]).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("the checkpoint timer failed")]
    Timer(#[source] vmm_sys_util::errno::Error),
    #[error("write-protecting guest RAM failed")]
    WriteTracking(#[source] crate::userfaultfd::UffdError),
    #[error("guest RAM is not mapped from the NV region")]
    RamNotInRegion,
    #[error("disk {id:?} cannot be rolled back with the guest: {reason}; checkpoints are refused")]
    UncoverableDisk { id: String, reason: &'static str },
}
