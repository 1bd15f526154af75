//! The power-fail and planned-suspend save: the coordinator (`nv_extension::save_vm`) walks
//! its phases through [`VmHost`]; this side times nothing itself, it reports: the NV events,
//! the operator's one log line, and the detached-region case.

use std::time::Duration;

use nv_extension::{SaveReport, ShutdownKind};

use super::host::VmHost;
use super::{nv_error, NvVm, EXIT_SAVED_INTO_DETACHED_REGION};
use crate::event_monitor;
use crate::vm::{Vm, VmRunState};
use crate::Error;

/// Saves the VM in place through the coordinator. On success the VM stays paused and the caller
/// ends the VMM; on failure the previous state is intact, the coordinator has resumed the VM if
/// the save paused it, and it keeps running (a retry may succeed; a death now is an unsafe
/// shutdown).
pub fn save(
    nv: &mut NvVm,
    vm: &mut Vm,
    kind: ShutdownKind,
    trigger: &str,
) -> Result<SaveReport, Error> {
    save_through(nv, &mut VmHost::exclusive(vm), kind, trigger)
}

/// Saves a VM that is paused and shared with a thread reading it (a `vm.snapshot` worker): the
/// same save as [`save`], through shared access only. A VM that is not paused is refused.
pub fn save_paused(
    nv: &mut NvVm,
    vm: &Vm,
    kind: ShutdownKind,
    trigger: &str,
) -> Result<SaveReport, Error> {
    if vm.run_state != VmRunState::Paused {
        return Err(Error::InvalidVmState(vm.run_state.name()));
    }
    save_through(nv, &mut VmHost::Shared(vm), kind, trigger)
}

fn save_through(
    nv: &mut NvVm,
    host: &mut VmHost<'_>,
    kind: ShutdownKind,
    trigger: &str,
) -> Result<SaveReport, Error> {
    let deadline = Duration::from_millis(nv.config.deadline_ms);
    event_monitor::nv::power_fail_started(&nv.config.vm, trigger, deadline);
    let report = nv_extension::save_vm(&mut nv.handle, host, kind, deadline)
        .map_err(|e| nv_error(&nv.config, e))?;
    for (phase, took) in &report.phases {
        event_monitor::nv::phase_done(phase.name(), *took);
    }
    event_monitor::nv::committed(&nv.config.vm, report.seq, report.total);
    // One line at the default log level: the operator's record that the VM is safe.
    log::warn!("{}", describe_save(&nv.config.vm, &report));
    if let Some(changed) = &report.region_file_changed {
        log::error!(
            "VM {:?}: THE SAVE IS NOT WHERE RECOVERY LOOKS: {changed}. Seq {} is committed only \
             in the file this process held open; recover=on with region={} will not find it \
             (exit code {EXIT_SAVED_INTO_DETACHED_REGION})",
            nv.config.vm,
            report.seq,
            nv.config.region
        );
    }
    nv.last_save = Some(report.clone());
    Ok(report)
}

/// `VM "a": power-fail save committed seq 3 in 812 us (deadline 50 ms): pause-vcpus 120 us, ...`
pub fn describe_save(vm: &str, report: &SaveReport) -> String {
    let phases: Vec<String> = report
        .phases
        .iter()
        .map(|(phase, took)| format!("{phase} {} us", took.as_micros()))
        .collect();
    format!(
        "VM {vm:?}: {} save committed seq {} ({} state bytes) in {} us (deadline {} ms{}): {}",
        report.kind,
        report.seq,
        report.state_bytes,
        report.total.as_micros(),
        report.deadline.as_millis(),
        if report.deadline_overrun {
            ", OVERRUN"
        } else {
            ""
        },
        phases.join(", ")
    )
}
