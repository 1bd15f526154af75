//! The NV-Hypervisor VMM library, built on the rust-vmm crates. It knows nothing of the NV region
//! layout: it reaches NV only through the `nv-extension` coordinator and its host trait.

pub mod api;
mod boot_cpu;
pub mod config;
mod detached_teardown;
pub mod device_manager;
mod error;
pub mod event_monitor;
pub mod events;
#[cfg(test)]
mod fresh_test_process;
pub mod kvm_vm;
pub mod landlock;
pub mod memory;
pub mod nv;
pub mod pci_segment;
mod power_fail_priority;
pub mod recovery_ahead;
pub use option_parser;
pub mod seccomp_filters;
pub mod signal_events;
pub mod snapshot;
pub mod startup_phases;
pub mod state;
pub mod upstream_fields;
pub mod userfaultfd;
pub mod vcpu;
mod vcpu_builder;
pub mod vm;
#[allow(clippy::module_inception)]
pub mod vmm;

pub use error::{CheckpointError, DeviceCause, Error, ErrorKind, SnapshotCause};
pub use state::VmState;
pub use vm::{Vm, VmRunState};
pub use vmm::{Vmm, VmmExit};

/// Runs one VMM process as the command line asked and returns its exit code: 0 when the VM ended
/// cleanly (guest power-off, the reset of a VM not in NV memory, SIGTERM/SIGINT of a VM not in
/// NV memory, `vmm.shutdown`), 1 when it failed while running, 3 (`vmm::EXIT_GUEST_RESET`) when
/// an NV guest reset or any guest triple-faulted, `VmmExit::exit_code` after an NV
/// power-fail or suspend save (SIGTERM/SIGINT of an NV VM is a suspend save). A failure to start
/// is an `Err` (the binary exits 1).
pub fn run(launch: config::VmmLaunch) -> Result<i32, Error> {
    run_with(launch, None)
}

/// [`run`], with an in-place recovery's KVM VM already being created (and perhaps its region
/// opened and its RAM mapped): the binary begins that first thing in `main`
/// ([`recovery_ahead::RecoveryAhead`]). It is used only if `launch` is that recovery without
/// `--landlock`; otherwise it is dropped and the VM, if any, is built as [`run`] builds it.
pub fn run_with(
    launch: config::VmmLaunch,
    started_early: Option<recovery_ahead::RecoveryAhead>,
) -> Result<i32, Error> {
    if launch.vm.is_none() && launch.api_socket.is_none() && launch.restore.is_none() {
        return Err(Error::NoVmConfig);
    }
    if launch.vm.is_some() && launch.restore.is_some() {
        return Err(Error::Snapshot(
            "--restore brings its own VM config; do not combine it with --kernel".to_string(),
        ));
    }
    // --landlock: the API thread restricts itself once its socket is bound, the control loop
    // before the VM is built (its vCPU and I/O threads inherit the restriction).
    let landlock = launch
        .landlock
        .as_ref()
        .map(|settings| landlock::LandlockPolicy::for_launch(&launch, settings));
    if let Some(policy) = &landlock {
        landlock::restrict_api_thread_to(policy);
    }
    // A recovery's KVM VM is created while the VMM sets itself up (nothing that can run the
    // guest, `kvm_vm`), if the binary did not start it already. Not under --landlock: a thread
    // started before the policy is enforced would not be restricted by it.
    let early_vm = match (&launch.vm, &landlock) {
        (Some(config), None) => started_early.or_else(|| {
            kvm_vm::EarlyKvmVm::start_for(config, launch.seccomp)
                .map(recovery_ahead::RecoveryAhead::with_vm)
        }),
        _ => {
            // Its thread ends, and the VM goes, once it is dropped.
            drop(started_early);
            None
        }
    };
    let mut vmm = Vmm::new(launch.seccomp)?;
    vmm.exit_after_loop();
    // The API first, as upstream does: a VM given on the command line is then visible to it.
    if let Some(socket) = launch.api_socket {
        vmm.start_api(socket)?;
    }
    if let Some(policy) = &landlock {
        policy.enforce()?;
    }
    if let Some(config) = launch.vm {
        vmm.boot_vm_on(&config, early_vm)?;
    }
    if let Some(restore) = launch.restore {
        vmm.restore_vm(&restore)?;
    }
    let exit = vmm.control_loop()?;
    match &exit {
        VmmExit::VcpuFailed(reason) => log::error!("VM stopped: {reason}"),
        other => log::info!("VMM ending: {other:?}"),
    }
    Ok(exit.exit_code())
}
