//! The control loop's answers to REST API requests: each `ApiRequest` the HTTP thread sends is
//! carried out on the control loop's thread (which owns the VM) and answered exactly once.
//!
//! Refusals by the VM's state come from the shared table `api::lifecycle::check_state`
//! (upstream's statuses and messages: 404 only for a VM that does not exist where upstream says
//! so, 500 otherwise). Failures of an operation are answered by their kind (`Error::kind`): 400 an
//! unusable request, 404 an NV region or VM that does not exist, 409 an NV request the VM's
//! recorded state refuses, 500 a failure; the body is `["Error from API", <operation>, <causes>]`.

use std::time::Duration;

use nv_extension::ShutdownKind;

use crate::api::lifecycle::{check_state, not_implemented, Operation, StateRefusal};
use crate::api::{
    ApiError, ApiRequest, ApiResponse, VmInfoResponse, VmState as ApiVmState, VmmPingResponse,
};
use crate::event_monitor::{emit_vm, hold_back, VmEvent};
use crate::nv;
use crate::vm::VmRunState;
use crate::{Error, ErrorKind};

use super::{Vmm, VmmExit};

mod hotplug_api;

pub(super) use hotplug_api::VhostUserAddJob;

/// The upstream release whose API this VMM serves. `vmm.ping` reports it as `version`, because
/// that is what scripts compare to decide which API they may use.
const UPSTREAM_VERSION: &str = "53.0.0";

/// `build_version`: upstream puts its `git describe` here; ours names the upstream release, then
/// this build, so a human sees which VMM answers and a version parser still reads 53.0.0.
fn build_version() -> String {
    format!(
        "v{UPSTREAM_VERSION}-nv-hypervisor-{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// What `vmm.ping` lists in `features`: the hypervisor this build drives (upstream lists its
/// compile-time features; `kvm` is the only one of them we have).
const FEATURES: &[&str] = &["kvm"];

/// What answering one request did: the answer, and whether the VMM must now end.
pub(super) struct Answer {
    pub response: ApiResponse,
    pub exit: Option<VmmExit>,
}

impl Answer {
    fn reply(response: ApiResponse) -> Answer {
        Answer {
            response,
            exit: None,
        }
    }

    fn done() -> Answer {
        Answer::reply(Ok(None))
    }

    fn body<T: serde::Serialize>(value: &T) -> Answer {
        Answer::reply(
            serde_json::to_value(value)
                .map(Some)
                .map_err(|e| ApiError::internal(format!("encoding the answer: {e}"))),
        )
    }

    fn error(error: ApiError) -> Answer {
        Answer::reply(Err(error))
    }

    fn from(result: Result<(), ApiError>) -> Answer {
        match result {
            Ok(()) => Answer::done(),
            Err(error) => Answer::error(error),
        }
    }
}

/// The answer to `operation` failing with `error`, by the error's kind (see `Error::kind`).
pub(super) fn api_error(operation: Operation, error: Error) -> ApiError {
    let status = match error.kind() {
        ErrorKind::InvalidRequest => 400,
        ErrorKind::NotFound => 404,
        ErrorKind::Conflict => 409,
        ErrorKind::WrongState | ErrorKind::Internal => 500,
    };
    ApiError::failed(status, operation, &error)
}

/// After `vm.shutdown` (and within `vm.reboot`) the next boot starts the guest afresh. For an NV
/// VM that means a cold boot over its extent, even if this run began as a recovery
/// (`recover=on`): the run just ended cleanly, so there is no saved state to resume.
pub(super) fn cold_boot_config(mut config: crate::config::VmConfig) -> crate::config::VmConfig {
    if let Some(nv) = config.nv.as_mut() {
        nv.recover = false;
        nv.force_cold = false;
        nv.swap_in = None;
        nv.keep = false;
    }
    config
}

impl Vmm {
    /// Carries out `request` and says what to answer.
    pub(super) fn answer(&mut self, request: ApiRequest) -> Answer {
        match request {
            ApiRequest::VmmPing => Answer::body(&VmmPingResponse {
                build_version: build_version(),
                version: UPSTREAM_VERSION.to_string(),
                pid: i64::from(std::process::id()),
                features: FEATURES.iter().map(|f| f.to_string()).collect(),
            }),
            ApiRequest::VmmShutdown => {
                // As upstream: the VM is deleted first (`vm shutdown`, `vm deleted`), then the
                // binary reports `vmm shutdown` on its way out.
                self.delete_vm(&VmmExit::VmmShutdown);
                Answer {
                    response: Ok(None),
                    exit: Some(VmmExit::VmmShutdown),
                }
            }
            ApiRequest::VmCreate(config) => {
                if let Err(error) = check_state(Operation::Create, self.api_state()) {
                    return Answer::error(error);
                }
                self.vm_config = Some(*config);
                Answer::done()
            }
            ApiRequest::VmBoot => Answer::from(self.api_boot()),
            ApiRequest::VmDelete => {
                self.delete_vm(&VmmExit::TerminationSignal);
                Answer::done()
            }
            ApiRequest::VmInfo => self.api_info(),
            ApiRequest::VmCounters => {
                if let Err(error) = check_state(Operation::Counters, self.api_state()) {
                    return Answer::error(error);
                }
                match &self.vm {
                    Some(vm) => Answer::body(&vm.counters()),
                    None => Answer::body(&crate::api::VmCounters::new()),
                }
            }
            ApiRequest::VmPause => self.with_booted_vm(Operation::Pause, |vm| vm.pause()),
            ApiRequest::VmResume => self.with_booted_vm(Operation::Resume, |vm| vm.resume()),
            ApiRequest::VmPowerButton => {
                self.with_booted_vm(Operation::PowerButton, |vm| vm.power_button())
            }
            ApiRequest::VmShutdown => {
                if let Err(error) = check_state(Operation::Shutdown, self.api_state()) {
                    return Answer::error(error);
                }
                // As upstream: the VM stops, its config stays and it can be booted again.
                self.stop_for_cold_boot();
                Answer::done()
            }
            ApiRequest::VmReboot => {
                // Upstream reports `rebooting` first, even when the reboot then fails, and
                // nothing of the shutdown and boot inside it.
                emit_vm(VmEvent::Rebooting);
                if let Err(error) = check_state(Operation::Reboot, self.api_state()) {
                    return Answer::error(error);
                }
                // Whatever would make the boot fail is refused while the guest still runs.
                if let Err(e) = self.check_reboot() {
                    return Answer::error(api_error(Operation::Reboot, e));
                }
                let rebooted = {
                    let _inner = hold_back(&[VmEvent::Shutdown, VmEvent::Booting, VmEvent::Booted]);
                    self.stop_for_cold_boot();
                    self.boot_configured_vm(Operation::Reboot)
                };
                if rebooted.is_ok() {
                    emit_vm(VmEvent::Rebooted);
                }
                Answer::from(rebooted)
            }
            ApiRequest::VmAddDisk(disk) => {
                self.api_add_device(hotplug_api::AddedDevice::Disk(disk))
            }
            ApiRequest::VmAddNet(net, fds) => {
                self.api_add_device(hotplug_api::AddedDevice::Net(net, fds))
            }
            ApiRequest::VmAddFs(fs) => self.api_add_device(hotplug_api::AddedDevice::Fs(fs)),
            ApiRequest::VmRemoveDevice(request) => self.api_remove_device(&request.id),
            ApiRequest::Unimplemented(operation) => Answer::error(
                check_state(operation, self.api_state())
                    .err()
                    .unwrap_or_else(|| not_implemented(operation)),
            ),
            // They wait on files: the control loop hands them to a worker thread before `answer`
            // (`long_operation.rs`), so they never get here.
            ApiRequest::VmSnapshot(_)
            | ApiRequest::VmRestore(_)
            | ApiRequest::NvSwapOut(_)
            | ApiRequest::NvSwapIn(_) => Answer::error(ApiError::internal(
                "vm.snapshot, vm.restore, vm.nv-swap-out and vm.nv-swap-in run on a worker thread",
            )),
            ApiRequest::NvStatus => match self.nv.as_ref() {
                None => Answer::error(api_error(Operation::NvStatus, Error::NoNvVm)),
                Some(nv_vm) => match nv::status(
                    nv_vm,
                    self.vm.as_ref().map(|vm| vm.memory()),
                    self.checkpoints.status(),
                ) {
                    Ok(status) => Answer::body(&status),
                    Err(e) => Answer::error(api_error(Operation::NvStatus, e)),
                },
            },
            ApiRequest::NvCheckpoint(request) => Answer::from(
                self.set_checkpoint_interval(Duration::from_millis(request.interval_ms))
                    .map_err(|e| api_error(Operation::NvCheckpoint, e)),
            ),
            ApiRequest::NvPowerFail => {
                self.api_nv_save(Operation::NvPowerFail, ShutdownKind::PowerFail)
            }
            ApiRequest::NvSuspend => {
                self.api_nv_save(Operation::NvSuspend, ShutdownKind::PlannedSuspend)
            }
            ApiRequest::NvRecover(request) => {
                if self.vm_config.is_some() || self.vm.is_some() {
                    // Our endpoint, our status: the request is fine, the VMM's state refuses it.
                    return Answer::error(ApiError::failed(
                        409,
                        Operation::NvRecover,
                        &StateRefusal::AlreadyCreated,
                    ));
                }
                let started =
                    nv::prepare_api_recovery(&request, self.seccomp).and_then(|prepared| {
                        let config = prepared.config.clone();
                        self.start_nv_vm(prepared).map(|()| config)
                    });
                match started {
                    Ok(config) => {
                        self.vm_config = Some(config);
                        self.record_pty_paths();
                        Answer::done()
                    }
                    Err(e) => Answer::error(api_error(Operation::NvRecover, e)),
                }
            }
            ApiRequest::NvRegions(query) => match nv::region_listing(&query.region) {
                Ok(listing) => Answer::body(&listing),
                Err(e) => Answer::error(api_error(Operation::NvRegions, e)),
            },
        }
    }

    /// The VM's state as the lifecycle table sees it: `None` without a VM, `Created` for a
    /// config not booted, else the running VM's state.
    pub(super) fn api_state(&self) -> Option<ApiVmState> {
        match (&self.vm_config, &self.vm) {
            (_, Some(vm)) => Some(match vm.run_state() {
                VmRunState::Created => ApiVmState::Created,
                VmRunState::Running => ApiVmState::Running,
                VmRunState::Paused => ApiVmState::Paused,
                VmRunState::Shutdown => ApiVmState::Shutdown,
            }),
            (Some(_), None) => Some(ApiVmState::Created),
            (None, None) => None,
        }
    }

    /// `vm.delete` (and the first half of `vmm.shutdown`): stops the VM if it runs (`vm
    /// shutdown`), forgets its config (`vm deleted`). Deleting nothing succeeds quietly.
    fn delete_vm(&mut self, exit: &VmmExit) {
        self.end_vm_run(exit);
        if self.vm_config.take().is_some() {
            emit_vm(VmEvent::Deleted);
        }
    }

    /// Stops the running VM cleanly and keeps its config for a cold boot.
    fn stop_for_cold_boot(&mut self) {
        self.end_vm_run(&VmmExit::TerminationSignal);
        self.vm_config = self.vm_config.take().map(cold_boot_config);
    }

    /// `vm.boot`: upstream reports `booting` before anything can fail.
    fn api_boot(&mut self) -> Result<(), ApiError> {
        emit_vm(VmEvent::Booting);
        check_state(Operation::Boot, self.api_state())?;
        // `booting` is reported already; a VM torn down because its boot failed never ran, so
        // its teardown is no `shutdown` either (upstream reports none).
        let _reported = hold_back(&[VmEvent::Booting, VmEvent::Shutdown]);
        self.boot_configured_vm(Operation::Boot)
    }

    /// Boots the VM of the stored config.
    fn boot_configured_vm(&mut self, operation: Operation) -> Result<(), ApiError> {
        let config = self
            .vm_config
            .clone()
            .ok_or_else(|| ApiError::refused(operation, StateRefusal::MissingConfig))?;
        self.boot_vm(&config)
            .map_err(|error| api_error(operation, error))
    }

    fn api_info(&self) -> Answer {
        if let Err(error) = check_state(Operation::Info, self.api_state()) {
            return Answer::error(error);
        }
        let Some(config) = self.vm_config.clone() else {
            return Answer::error(ApiError::refused(Operation::Info, StateRefusal::NotCreated));
        };
        let (state, memory_actual_size, device_tree) = match &self.vm {
            None => (ApiVmState::Created, None, None),
            Some(vm) => {
                let state = match vm.run_state() {
                    VmRunState::Created => ApiVmState::Created,
                    VmRunState::Running => ApiVmState::Running,
                    VmRunState::Paused => ApiVmState::Paused,
                    VmRunState::Shutdown => ApiVmState::Shutdown,
                };
                let device_tree = VmInfoResponse::device_tree(&vm.device_resources());
                (state, Some(vm.memory_actual_size()), Some(device_tree))
            }
        };
        Answer::body(&VmInfoResponse {
            config,
            state,
            memory_actual_size,
            device_tree,
        })
    }

    fn with_booted_vm(
        &mut self,
        operation: Operation,
        action: impl FnOnce(&mut crate::Vm) -> Result<(), Error>,
    ) -> Answer {
        if let Err(error) = check_state(operation, self.api_state()) {
            return Answer::error(error);
        }
        match self.vm.as_mut() {
            None => Answer::error(ApiError::refused(operation, StateRefusal::NotRunning)),
            Some(vm) => match action(vm) {
                Ok(()) => Answer::done(),
                Err(e) => Answer::error(api_error(operation, e)),
            },
        }
    }

    /// `vm.power-fail` / `vm.nv-suspend`: answered once the state is committed, then the VMM
    /// ends; a failed save is answered with 500 and the VM keeps running.
    fn api_nv_save(&mut self, operation: Operation, kind: ShutdownKind) -> Answer {
        if self.nv.is_none() {
            return Answer::error(api_error(operation, Error::NoNvVm));
        }
        match self.nv_save(kind, "api") {
            Ok(report) => Answer {
                response: Ok(None),
                exit: Some(VmmExit::nv_saved(kind, &report)),
            },
            Err(e) => Answer::error(api_error(operation, e)),
        }
    }
}
