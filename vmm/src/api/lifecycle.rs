//! Which operation the VM's state refuses, and with what answer: one table shared by the control
//! loop (`vmm/api_dispatch.rs`) and the server's own tests, so the two cannot disagree.
//!
//! The statuses and messages are upstream cloud-hypervisor v53's, as observed on the wire: an
//! operation on a VM that does not exist is `404` only where upstream answers "VM is not created"
//! or "VM config is missing" (`vm.info`, `vm.boot`, `vm.reboot`, `vm.resize`, `vm.resize-zone`);
//! every other refusal by state is `500`.

use super::{ApiError, VmState};

/// The operations the control loop answers, each with the sentence upstream puts second in an
/// error body (the first being the layer, "Error from API").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    VmmPing,
    VmmShutdown,
    Create,
    Boot,
    Delete,
    Info,
    Counters,
    Pause,
    Resume,
    Shutdown,
    Reboot,
    PowerButton,
    Nmi,
    Snapshot,
    Restore,
    Coredump,
    Resize,
    ResizeDisk,
    ResizeZone,
    AddDevice,
    AddUserDevice,
    AddDisk,
    AddFs,
    AddGenericVhostUser,
    AddPmem,
    AddNet,
    AddVsock,
    AddVdpa,
    RemoveDevice,
    ReceiveMigration,
    SendMigration,
    NvStatus,
    NvPowerFail,
    NvSuspend,
    NvRecover,
    NvRegions,
    NvSwapOut,
    NvSwapIn,
    NvCheckpoint,
}

impl Operation {
    /// What failed, from the client's point of view.
    pub fn failure(self) -> &'static str {
        use Operation::*;
        match self {
            VmmPing => "The VMM could not be pinged",
            VmmShutdown => "The VMM could not shutdown",
            Create => "The VM could not be created",
            Boot => "The VM could not boot",
            Delete => "The VM could not be deleted",
            Info | Counters => "The VM info is not available",
            Pause => "The VM could not be paused",
            Resume => "The VM could not resume",
            Shutdown => "The VM could not shutdown",
            Reboot => "The VM could not reboot",
            PowerButton => "Error triggering power button",
            Nmi => "Error triggering NMI",
            Snapshot => "The VM could not be snapshotted",
            Restore => "The VM could not be restored",
            Coredump => "The VM could not be coredumped",
            Resize => "The VM could not be resized",
            ResizeDisk => "The disk could not be resized",
            ResizeZone => "The memory zone could not be resized",
            AddDevice => "The device could not be added to the VM",
            AddUserDevice => "The user device could not be added to the VM",
            AddDisk => "The disk could not be added to the VM",
            AddFs => "The fs could not be added to the VM",
            AddGenericVhostUser => "The generic vhost-user device could not be added to the VM",
            AddPmem => "The pmem device could not be added to the VM",
            AddNet => "The network device could not be added to the VM",
            AddVsock => "The vsock device could not be added to the VM",
            AddVdpa => "The vDPA device could not be added to the VM",
            RemoveDevice => "The device could not be removed from the VM",
            ReceiveMigration => "Error starting migration receiver",
            SendMigration => "Error starting migration sender",
            NvStatus => "The NV status is not available",
            NvPowerFail => "The VM could not be saved for a power failure",
            NvSuspend => "The VM could not be suspended",
            NvRecover => "The VM could not be recovered",
            NvRegions => "The NV region could not be listed",
            NvSwapOut => "The VM could not be swapped out",
            NvSwapIn => "The VM could not be swapped in",
            NvCheckpoint => "The checkpoint interval could not be set",
        }
    }

    /// The API path (after `/api/v1/`) of this operation.
    pub const fn path(self) -> &'static str {
        use Operation::*;
        match self {
            VmmPing => "vmm.ping",
            VmmShutdown => "vmm.shutdown",
            Create => "vm.create",
            Boot => "vm.boot",
            Delete => "vm.delete",
            Info => "vm.info",
            Counters => "vm.counters",
            Pause => "vm.pause",
            Resume => "vm.resume",
            Shutdown => "vm.shutdown",
            Reboot => "vm.reboot",
            PowerButton => "vm.power-button",
            Nmi => "vm.nmi",
            Snapshot => "vm.snapshot",
            Restore => "vm.restore",
            Coredump => "vm.coredump",
            Resize => "vm.resize",
            ResizeDisk => "vm.resize-disk",
            ResizeZone => "vm.resize-zone",
            AddDevice => "vm.add-device",
            AddUserDevice => "vm.add-user-device",
            AddDisk => "vm.add-disk",
            AddFs => "vm.add-fs",
            AddGenericVhostUser => "vm.add-generic-vhost-user",
            AddPmem => "vm.add-pmem",
            AddNet => "vm.add-net",
            AddVsock => "vm.add-vsock",
            AddVdpa => "vm.add-vdpa",
            RemoveDevice => "vm.remove-device",
            ReceiveMigration => "vm.receive-migration",
            SendMigration => "vm.send-migration",
            NvStatus => "vm.nv-status",
            NvPowerFail => "vm.power-fail",
            NvSuspend => "vm.nv-suspend",
            NvRecover => "vm.nv-recover",
            NvRegions => "vmm.nv-regions",
            NvSwapOut => "vm.nv-swap-out",
            NvSwapIn => "vm.nv-swap-in",
            NvCheckpoint => "vm.nv-checkpoint",
        }
    }

    /// True for the upstream operations this VMM does not carry out (after the state checks
    /// upstream makes, they are answered `501`; see docs/api.md).
    pub fn is_unimplemented(self) -> bool {
        use Operation::*;
        matches!(
            self,
            Nmi | Coredump
                | Resize
                | ResizeDisk
                | ResizeZone
                | AddDevice
                | AddUserDevice
                | AddGenericVhostUser
                | AddPmem
                | AddVsock
                | AddVdpa
                | ReceiveMigration
                | SendMigration
        )
    }
}

/// Why the VM's state refuses an operation (upstream's VM error texts, which scripts match).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateRefusal {
    #[error("VM is not created")]
    NotCreated,
    #[error("VM config is missing")]
    MissingConfig,
    #[error("VM is not running")]
    NotRunning,
    #[error("VM is already created")]
    AlreadyCreated,
    #[error("Invalid transition: InvalidStateTransition({0:?}, {1:?})")]
    InvalidTransition(VmState, VmState),
    #[error("Trying to snapshot while VM is running")]
    SnapshotWhileRunning,
}

impl StateRefusal {
    /// `404` for a VM (or config) that does not exist, `500` for everything else, as upstream.
    pub fn status(self) -> u16 {
        match self {
            StateRefusal::NotCreated | StateRefusal::MissingConfig => 404,
            _ => 500,
        }
    }
}

/// Checks `operation` against the VM's state: `None` when no VM is created, `Some(Created)` when
/// one is created but not booted, else its run state. `Err` is the whole answer.
pub fn check_state(operation: Operation, state: Option<VmState>) -> Result<(), ApiError> {
    use Operation::*;
    use VmState::{Paused, Running};
    let booted = matches!(state, Some(Running | Paused));
    let refusal = match operation {
        Create | Restore | ReceiveMigration if state.is_some() => {
            Some(StateRefusal::AlreadyCreated)
        }
        Boot if state.is_none() => Some(StateRefusal::MissingConfig),
        Boot if booted => Some(StateRefusal::AlreadyCreated),
        Info | Resize | ResizeZone | AddDisk | AddNet | AddFs | RemoveDevice if state.is_none() => {
            Some(StateRefusal::NotCreated)
        }
        Reboot if !booted => Some(StateRefusal::NotCreated),
        Pause if state == Some(Paused) => Some(StateRefusal::InvalidTransition(Paused, Paused)),
        Resume if state == Some(Running) => Some(StateRefusal::InvalidTransition(Running, Running)),
        Snapshot if state == Some(Running) => Some(StateRefusal::SnapshotWhileRunning),
        Counters | Pause | Resume | Shutdown | Snapshot | PowerButton | Nmi | Coredump
        | ResizeDisk | AddDevice | AddUserDevice | AddGenericVhostUser | AddPmem | AddVsock
        | AddVdpa | SendMigration
            if !booted =>
        {
            Some(StateRefusal::NotRunning)
        }
        _ => None,
    };
    match refusal {
        Some(refusal) => Err(ApiError::refused(operation, refusal)),
        None => Ok(()),
    }
}

/// The answer to an upstream operation this VMM does not implement, once its state checks passed.
pub fn not_implemented(operation: Operation) -> ApiError {
    let reason = match operation {
        Operation::Nmi => "this VMM does not inject NMIs".to_owned(),
        _ => format!("{} is not implemented by NV-Hypervisor", operation.path()),
    };
    ApiError {
        status: 501,
        layer: super::API_LAYER,
        message: operation.failure().to_owned(),
        causes: vec![reason],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(operation: Operation, state: Option<VmState>) -> (u16, Vec<String>) {
        match check_state(operation, state) {
            Ok(()) => (0, Vec::new()),
            Err(error) => (error.status, error.body()),
        }
    }

    #[test]
    fn upstream_rows_are_reproduced() {
        use Operation::*;
        use VmState::{Created, Paused, Running};
        let body = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            answer(Info, None),
            (
                404,
                body(&[
                    "Error from API",
                    "The VM info is not available",
                    "VM is not created"
                ])
            )
        );
        assert_eq!(
            answer(Boot, None),
            (
                404,
                body(&[
                    "Error from API",
                    "The VM could not boot",
                    "VM config is missing"
                ])
            )
        );
        assert_eq!(answer(Pause, None).0, 500);
        assert_eq!(answer(Shutdown, None).1[2], "VM is not running");
        assert_eq!(
            answer(Counters, None),
            (
                500,
                body(&[
                    "Error from API",
                    "The VM info is not available",
                    "VM is not running"
                ])
            )
        );
        assert_eq!(
            answer(Snapshot, None),
            (
                500,
                body(&[
                    "Error from API",
                    "The VM could not be snapshotted",
                    "VM is not running"
                ])
            )
        );
        assert_eq!(
            answer(Resize, None),
            (
                404,
                body(&[
                    "Error from API",
                    "The VM could not be resized",
                    "VM is not created"
                ])
            )
        );
        assert_eq!(answer(Delete, None), (0, vec![]));
        assert_eq!(
            answer(Resume, Some(Running)),
            (
                500,
                body(&[
                    "Error from API",
                    "The VM could not resume",
                    "Invalid transition: InvalidStateTransition(Running, Running)"
                ])
            )
        );
        assert_eq!(
            answer(Boot, Some(Running)),
            (
                500,
                body(&[
                    "Error from API",
                    "The VM could not boot",
                    "VM is already created"
                ])
            )
        );
        assert_eq!(
            answer(Create, Some(Created)),
            (
                500,
                body(&[
                    "Error from API",
                    "The VM could not be created",
                    "VM is already created"
                ])
            )
        );
        assert_eq!(
            answer(Snapshot, Some(Running)),
            (
                500,
                body(&[
                    "Error from API",
                    "The VM could not be snapshotted",
                    "Trying to snapshot while VM is running"
                ])
            )
        );
        assert_eq!(answer(Snapshot, Some(Paused)), (0, vec![]));
        assert_eq!(answer(Boot, Some(Created)), (0, vec![]));
        assert_eq!(answer(Info, Some(Created)), (0, vec![]));
        assert_eq!(answer(Reboot, Some(Created)).0, 404);
        assert_eq!(answer(Pause, Some(Created)).0, 500);
    }

    #[test]
    fn unimplemented_operations_check_state_first() {
        assert_eq!(answer(Operation::Nmi, None).0, 500);
        assert_eq!(answer(Operation::Nmi, Some(VmState::Running)).0, 0);
        let error = not_implemented(Operation::Nmi);
        assert_eq!(error.status, 501);
        assert_eq!(error.body()[1], "Error triggering NMI");
        assert!(Operation::AddPmem.is_unimplemented());
        assert!(!Operation::AddFs.is_unimplemented());
        assert!(!Operation::AddDisk.is_unimplemented());
        assert!(!Operation::Snapshot.is_unimplemented());
    }
}
