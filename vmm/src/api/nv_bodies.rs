//! The NV answers of the API built from what `nv-extension` reports: how a VM last ended, how
//! its region persists stores, and how its last save went (`vm.nv-status`, `vmm.nv-regions`).

use nv_extension::{PersistenceMode, RunRecord, SaveReport, ShutdownKind, StopCause, VmSummary};

use super::{NvLastSave, NvPersistenceMode, NvPhaseTiming, NvRecoveryTimings, NvShutdownKind};
use crate::startup_phases::PhaseClock;

/// How the VM's previous run ended, from its record in the region's VM table.
impl From<&VmSummary> for NvShutdownKind {
    fn from(summary: &VmSummary) -> NvShutdownKind {
        if summary.swap.is_some() {
            return NvShutdownKind::SwappedOut;
        }
        match summary.state {
            RunRecord::Created => NvShutdownKind::Never,
            RunRecord::Running { .. } if summary.owner_pid.is_some() => NvShutdownKind::Running,
            RunRecord::Running { .. } => NvShutdownKind::Unsafe,
            RunRecord::Saved { kind, .. } => kind.into(),
            RunRecord::PoweredOff { cause, .. } => match cause {
                StopCause::PowerOff => NvShutdownKind::Clean,
                StopCause::GuestReset => NvShutdownKind::GuestReset,
                StopCause::TripleFault => NvShutdownKind::TripleFault,
            },
        }
    }
}

impl From<ShutdownKind> for NvShutdownKind {
    fn from(kind: ShutdownKind) -> NvShutdownKind {
        match kind {
            ShutdownKind::PowerFail => NvShutdownKind::PowerFail,
            ShutdownKind::PlannedSuspend => NvShutdownKind::Suspend,
            ShutdownKind::Checkpoint => NvShutdownKind::Checkpoint,
        }
    }
}

impl From<PersistenceMode> for NvPersistenceMode {
    fn from(mode: PersistenceMode) -> NvPersistenceMode {
        match mode {
            PersistenceMode::DaxFile => NvPersistenceMode::DaxMapSync,
            PersistenceMode::DevDax => NvPersistenceMode::Devdax,
            // Volatile exists only for nv-extension's own tests; a path-opened region is never it.
            PersistenceMode::PlainFile | PersistenceMode::Volatile => NvPersistenceMode::Msync,
        }
    }
}

impl From<&PhaseClock> for NvRecoveryTimings {
    fn from(phases: &PhaseClock) -> NvRecoveryTimings {
        NvRecoveryTimings {
            total_us: phases.total().as_micros() as u64,
            from_exec: phases.from_process_start(),
            phases: phases
                .phases()
                .iter()
                .map(|(phase, took)| NvPhaseTiming {
                    phase: (*phase).to_string(),
                    duration_us: took.as_micros() as u64,
                })
                .collect(),
        }
    }
}

impl From<&SaveReport> for NvLastSave {
    fn from(report: &SaveReport) -> NvLastSave {
        NvLastSave {
            sequence: report.seq,
            kind: report.kind.into(),
            total_us: report.total.as_micros() as u64,
            deadline_us: Some(report.deadline.as_micros() as u64),
            deadline_overrun: report.deadline_overrun,
            phases: report
                .phases
                .iter()
                .map(|(phase, took)| NvPhaseTiming {
                    phase: phase.name().to_string(),
                    duration_us: took.as_micros() as u64,
                })
                .collect(),
        }
    }
}
