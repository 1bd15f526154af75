//! The control loop's answers to REST API requests: each `ApiRequest` the HTTP thread sends is
//! carried out on the control loop's thread (which owns the VM) and answered exactly once.
//!
//! Statuses follow the contract in `api/mod.rs`: 404 when no VM is created (or, for `vm.create`
//! and `vm.nv-recover`, when one already is), 405 for an operation in the wrong VM state, 400 for
//! an unusable configuration, 409 for an NV request the VM's recorded state refuses, 500 when the
//! operation itself failed, 501 for what this VMM does not implement.

use nv_extension::ShutdownKind;

use crate::api::{
    ApiError, ApiRequest, ApiResponse, VmInfoResponse, VmState as ApiVmState, VmmPingResponse,
};
use crate::event_monitor::{emit_vm, VmEvent};
use crate::nv;
use crate::vm::VmRunState;
use crate::{Error, ErrorKind};

use super::{Vmm, VmmExit};

/// The version `vmm.ping` reports.
const VERSION: &str = env!("CARGO_PKG_VERSION");

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
}

/// The HTTP status an operation's failure maps to, by its kind (see `Error::kind`): 400 for an
/// unusable request, 404 for a VM or NV region that does not exist, 409 for a request the current
/// state refuses (recovery of an unsafely shut down or never saved VM, a VM another live process
/// owns), 405 for the wrong VM state, 500 for an operation that failed.
pub(super) fn api_error(error: Error) -> ApiError {
    let message = error.to_string();
    match error.kind() {
        ErrorKind::InvalidRequest => ApiError::bad_request(message),
        ErrorKind::NotFound => ApiError::not_found(message),
        ErrorKind::Conflict => ApiError::conflict(message),
        ErrorKind::WrongState => ApiError::wrong_state(message),
        ErrorKind::Internal => ApiError::internal(message),
    }
}

pub(super) fn not_created() -> ApiError {
    ApiError::not_found("no VM is created")
}

pub(super) fn not_booted() -> ApiError {
    ApiError::wrong_state("the VM is not booted")
}

/// After `vm.shutdown` (and within `vm.reboot`) the next boot starts the guest afresh. For an NV
/// VM that means a cold boot over its extent, even if this run began as a recovery
/// (`recover=on`): the run just ended cleanly, so there is no saved state to resume.
pub(super) fn cold_boot_config(mut config: crate::config::VmConfig) -> crate::config::VmConfig {
    if let Some(nv) = config.nv.as_mut() {
        nv.recover = false;
        nv.force_cold = false;
    }
    config
}

impl Vmm {
    /// Carries out `request` and says what to answer.
    pub(super) fn answer(&mut self, request: ApiRequest) -> Answer {
        match request {
            ApiRequest::VmmPing => Answer::body(&VmmPingResponse {
                build_version: VERSION.to_string(),
                version: VERSION.to_string(),
                pid: i64::from(std::process::id()),
                features: Vec::new(),
            }),
            ApiRequest::VmmShutdown => Answer {
                response: Ok(None),
                exit: Some(VmmExit::VmmShutdown),
            },
            ApiRequest::VmCreate(config) => {
                if self.vm_config.is_some() {
                    return Answer::error(ApiError::not_found("a VM is already created"));
                }
                self.vm_config = Some(*config);
                Answer::done()
            }
            ApiRequest::VmBoot => self.api_boot(),
            ApiRequest::VmDelete => {
                self.end_vm_run(&VmmExit::TerminationSignal);
                if self.vm_config.take().is_some() {
                    emit_vm(VmEvent::Deleted);
                }
                Answer::done()
            }
            ApiRequest::VmInfo => self.api_info(),
            ApiRequest::VmCounters => match (&self.vm_config, &self.vm) {
                (None, _) => Answer::error(not_created()),
                (Some(_), None) => Answer::body(&crate::api::VmCounters::new()),
                (Some(_), Some(vm)) => Answer::body(&vm.counters()),
            },
            ApiRequest::VmPause => self.with_booted_vm(|vm| vm.pause()),
            ApiRequest::VmResume => self.with_booted_vm(|vm| vm.resume()),
            ApiRequest::VmShutdown => {
                if self.vm_config.is_none() {
                    return Answer::error(not_created());
                }
                if self.vm.is_none() {
                    return Answer::error(not_booted());
                }
                // As upstream: the VM stops, its config stays and it can be booted again.
                self.stop_for_cold_boot();
                Answer::done()
            }
            ApiRequest::VmReboot => {
                if self.vm_config.is_none() {
                    return Answer::error(not_created());
                }
                if self.vm.is_none() {
                    return Answer::error(not_booted());
                }
                // Whatever would make the boot fail is refused while the guest still runs.
                if let Err(e) = self.check_reboot() {
                    return Answer::error(api_error(e));
                }
                emit_vm(VmEvent::Rebooting);
                self.stop_for_cold_boot();
                let answer = self.api_boot();
                if answer.response.is_ok() {
                    emit_vm(VmEvent::Rebooted);
                }
                answer
            }
            ApiRequest::VmPowerButton => Answer::error(ApiError::not_implemented(
                "vm.power-button needs ACPI, which this VMM does not offer",
            )),
            // They wait on files: the control loop hands them to a worker thread before `answer`
            // (`long_operation.rs`), so they never get here.
            ApiRequest::VmSnapshot(_) | ApiRequest::VmRestore(_) => Answer::error(
                ApiError::internal("vm.snapshot and vm.restore run on a worker thread"),
            ),
            ApiRequest::NvStatus => match self.nv.as_ref() {
                None => Answer::error(ApiError::not_found("this VMM runs no NV VM")),
                Some(nv_vm) => match nv::status(nv_vm) {
                    Ok(status) => Answer::body(&status),
                    Err(e) => Answer::error(api_error(e)),
                },
            },
            ApiRequest::NvPowerFail => self.api_nv_save(ShutdownKind::PowerFail),
            ApiRequest::NvSuspend => self.api_nv_save(ShutdownKind::PlannedSuspend),
            ApiRequest::NvRecover(request) => {
                if self.vm_config.is_some() || self.vm.is_some() {
                    return Answer::error(ApiError::not_found(
                        "a VM is already created: vm.nv-recover needs an empty VMM",
                    ));
                }
                let started = nv::prepare_api_recovery(&request).and_then(|prepared| {
                    let config = prepared.config.clone();
                    self.start_nv_vm(prepared).map(|()| config)
                });
                match started {
                    Ok(config) => {
                        self.vm_config = Some(config);
                        Answer::done()
                    }
                    Err(e) => Answer::error(api_error(e)),
                }
            }
            ApiRequest::NvRegions(query) => match nv::region_listing(&query.region) {
                Ok(listing) => Answer::body(&listing),
                Err(e) => Answer::error(api_error(e)),
            },
        }
    }

    /// Stops the running VM cleanly and keeps its config for a cold boot.
    fn stop_for_cold_boot(&mut self) {
        self.end_vm_run(&VmmExit::TerminationSignal);
        self.vm_config = self.vm_config.take().map(cold_boot_config);
    }

    fn api_boot(&mut self) -> Answer {
        let Some(config) = self.vm_config.clone() else {
            return Answer::error(not_created());
        };
        if self.vm.is_some() {
            return Answer::error(ApiError::wrong_state("the VM is already booted"));
        }
        match self.boot_vm(&config) {
            Ok(()) => Answer::done(),
            Err(e) => Answer::error(api_error(e)),
        }
    }

    fn api_info(&self) -> Answer {
        let Some(config) = self.vm_config.clone() else {
            return Answer::error(not_created());
        };
        let (state, memory_actual_size) = match &self.vm {
            None => (ApiVmState::Created, None),
            Some(vm) => {
                let state = match vm.run_state() {
                    VmRunState::Created => ApiVmState::Created,
                    VmRunState::Running => ApiVmState::Running,
                    VmRunState::Paused => ApiVmState::Paused,
                    VmRunState::Shutdown => ApiVmState::Shutdown,
                };
                (state, Some(vm.memory_actual_size()))
            }
        };
        Answer::body(&VmInfoResponse {
            config,
            state,
            memory_actual_size,
        })
    }

    fn with_booted_vm(
        &mut self,
        operation: impl FnOnce(&mut crate::Vm) -> Result<(), Error>,
    ) -> Answer {
        if self.vm_config.is_none() {
            return Answer::error(not_created());
        }
        match self.vm.as_mut() {
            None => Answer::error(not_booted()),
            Some(vm) => match operation(vm) {
                Ok(()) => Answer::done(),
                Err(e) => Answer::error(api_error(e)),
            },
        }
    }

    /// `vm.power-fail` / `vm.nv-suspend`: answered once the state is committed, then the VMM
    /// ends; a failed save is answered with 500 and the VM keeps running.
    fn api_nv_save(&mut self, kind: ShutdownKind) -> Answer {
        if self.nv.is_none() {
            return Answer::error(ApiError::not_found("this VMM runs no NV VM"));
        }
        match self.nv_save(kind, "api") {
            Ok(_) => Answer {
                response: Ok(None),
                exit: Some(VmmExit::NvSaved(kind)),
            },
            Err(e) => Answer::error(api_error(e)),
        }
    }
}
