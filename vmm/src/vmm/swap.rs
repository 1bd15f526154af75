//! `vm.nv-swap-out` and `vm.nv-swap-in` on the control loop: the short steps that change the VM
//! run here (the destination check, the pause and planned-suspend save, the resume after a
//! failure, building the swapped-in VM), the long one (writing or reading many GiB) on a worker
//! thread (`long_operation.rs`), so `vm.nv-status` shows the progress and a signal is acted on
//! meanwhile. `nv/swap.rs` has the steps themselves.
//!
//! During a swap-out the worker holds the VM's claim ([`NvVm`]) and the paused VM stays here:
//! a power failure or SIGTERM then ends the VMM at once, since the VM's state is committed
//! already (planned suspend): it is resident, or swapped out with a complete file.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use nv_extension::{ShutdownKind, SwapOutReport};

use crate::api::{ApiError, ApiResponse, NvSwapInConfig, NvSwapOutConfig, Operation, StateRefusal};
use crate::nv::{self, NvVm, PreparedVm, SwapProgressCell, SwapWatch};
use crate::vm::VmRunState;
use crate::Error;

use super::api_dispatch::api_error;
use super::long_operation::{spawn_worker, Job};
use super::{Vmm, VmmExit};

/// What a swap-out worker hands back: the VM's claim and how the swap-out went (`Err` of the
/// outer result: the worker panicked, and the claim is gone with it).
pub(super) type SwapOutOutcome = Result<(NvVm, Result<SwapOutReport, Error>), Error>;

/// A swap-out on its worker: the claim comes back with the result.
pub(super) struct SwapOutJob {
    pub watch: Arc<SwapWatch>,
    /// The planned-suspend save the swap-out writes.
    pub seq: u64,
    /// Whether the VM ran before the swap-out paused it (a failed swap-out resumes it then).
    pub was_running: bool,
    pub result: Receiver<SwapOutOutcome>,
}

/// A swap-in on its worker: the VM comes back resident and ready to resume.
pub(super) struct SwapInJob {
    pub watch: Arc<SwapWatch>,
    pub result: Receiver<Result<PreparedVm, Error>>,
}

/// The VM's state is committed (planned suspend) whatever the worker does: the end of a VMM
/// that stops during or after a swap-out it could not finish.
fn saved_exit() -> VmmExit {
    VmmExit::NvSaved {
        kind: ShutdownKind::PlannedSuspend,
        into_detached_region: false,
    }
}

impl Vmm {
    pub(super) fn start_swap_out(&mut self, request: NvSwapOutConfig, reply: Sender<ApiResponse>) {
        let operation = Operation::NvSwapOut;
        let refuse = |error: Error| {
            let _ = reply.send(Err(api_error(operation, error)));
        };
        let Some(destination) =
            crate::config::swap_file_url_path(&request.destination_url).map(PathBuf::from)
        else {
            // The route checked it; never trust that twice removed.
            let _ = reply.send(Err(ApiError::invalid_request(format!(
                "{}: destination_url {:?}: {}",
                operation.path(),
                request.destination_url,
                crate::config::SWAP_URL_EXPECTED
            ))));
            return;
        };
        let (Some(nv_vm), Some(vm)) = (self.nv.as_mut(), self.vm.as_mut()) else {
            return refuse(Error::NoNvVm);
        };
        // Refused before anything is paused or saved.
        if let Err(e) = nv::check_swap_out_destination(nv_vm, &destination) {
            return refuse(e);
        }
        let was_running = match vm.run_state() {
            VmRunState::Running => true,
            VmRunState::Paused => false,
            state => return refuse(Error::InvalidVmState(state.name())),
        };
        // Pauses a running VM; on failure the coordinator resumed it and it keeps running.
        let report = match nv::save(nv_vm, vm, ShutdownKind::PlannedSuspend, "swap-out") {
            Ok(report) => report,
            Err(e) => return refuse(e),
        };
        let mut nv_vm = self.nv.take().expect("checked above");
        let mut progress = SwapProgressCell::new(crate::api::NvSwapDirection::Out);
        progress.watch_vm(&nv_vm);
        let watch = progress.watch();
        let worker_destination = destination.clone();
        let spawned = spawn_worker("vm-swap-out", &self.long_operation_done, move || {
            let result = nv::swap_out(&mut nv_vm, &worker_destination, &mut progress);
            Ok((nv_vm, result))
        });
        let result = match spawned {
            Ok(result) => {
                log::info!(
                    "vm.nv-swap-out to {}: seq {} committed, written by a worker thread",
                    destination.display(),
                    report.seq
                );
                result
            }
            Err(e) => {
                // The claim went with the closure (released: the VM stays saved at its seq).
                // Finish as a worker that failed would, so the VMM ends as a planned suspend.
                let (sender, result) = std::sync::mpsc::channel();
                let _ = sender.send(Err(e));
                if let Err(e) = self.long_operation_done.write(1) {
                    log::error!("vm.nv-swap-out: cannot wake the control loop: {e}");
                }
                result
            }
        };
        self.begin_long_operation(
            operation,
            reply,
            Job::SwapOut(SwapOutJob {
                watch,
                seq: report.seq,
                was_running,
                result,
            }),
        );
    }

    pub(super) fn start_swap_in(&mut self, request: NvSwapInConfig, reply: Sender<ApiResponse>) {
        let operation = Operation::NvSwapIn;
        if self.vm_config.is_some() || self.vm.is_some() {
            // Our endpoint, our status: the request is fine, the VMM's state refuses it.
            let _ = reply.send(Err(ApiError::failed(
                409,
                operation,
                &StateRefusal::AlreadyCreated,
            )));
            return;
        }
        let mut progress = SwapProgressCell::new(crate::api::NvSwapDirection::In);
        let watch = progress.watch();
        let source = request.source_url.clone();
        let spawned = spawn_worker("vm-swap-in", &self.long_operation_done, move || {
            nv::prepare_api_swap_in(&request, &mut progress)
        });
        match spawned {
            Ok(result) => {
                log::info!("vm.nv-swap-in from {source}: read by a worker thread");
                self.begin_long_operation(
                    operation,
                    reply,
                    Job::SwapIn(SwapInJob { watch, result }),
                );
            }
            Err(e) => {
                let _ = reply.send(Err(api_error(operation, e)));
            }
        }
    }

    /// The swap-out worker is done. Success: answer 204, then the VMM ends (the VM lives in
    /// the file). Failure: the VM is resident with its save; record that it runs again and
    /// resume it if it ran, then answer the error.
    pub(super) fn finish_swap_out(
        &mut self,
        job: SwapOutJob,
        outcome: SwapOutOutcome,
    ) -> (ApiResponse, Option<VmmExit>) {
        let operation = Operation::NvSwapOut;
        match outcome {
            Ok((nv_vm, Ok(_report))) => {
                // The handle owns no resident VM any more: dropping it changes nothing.
                drop(nv_vm);
                (Ok(None), Some(VmmExit::NvSwappedOut))
            }
            Ok((nv_vm, Err(error))) => {
                if let Err(e) = nv::resume_after_failed_swap_out(&nv_vm) {
                    log::error!(
                        "VM {:?}: the swap-out failed and the VM cannot be recorded as running \
                         again ({e}); it stays saved at seq {}: recover it with recover=on",
                        nv_vm.name(),
                        job.seq
                    );
                    self.nv = Some(nv_vm);
                    return (Err(api_error(operation, error)), Some(saved_exit()));
                }
                self.nv = Some(nv_vm);
                if job.was_running {
                    if let Some(vm) = self.vm.as_mut() {
                        if let Err(e) = vm.resume() {
                            log::error!("the swap-out failed and the VM did not resume: {e}");
                        }
                    }
                }
                log::warn!(
                    "the swap-out failed, the VM stays resident and {}: {error}",
                    if job.was_running {
                        "runs on"
                    } else {
                        "stays paused"
                    }
                );
                (Err(api_error(operation, error)), None)
            }
            Err(panicked) => {
                log::error!(
                    "vm.nv-swap-out: {panicked}; the VM stays saved at seq {}: recover it with \
                     recover=on",
                    job.seq
                );
                (Err(api_error(operation, panicked)), Some(saved_exit()))
            }
        }
    }

    /// The swap-in worker is done: run the resident VM (its saved state, in place).
    pub(super) fn finish_swap_in(&mut self, outcome: Result<PreparedVm, Error>) -> ApiResponse {
        // `start_nv_vm` keeps the config the VM runs with (the stored one) for `vm.info`.
        outcome
            .and_then(|prepared| self.start_nv_vm(prepared))
            .map(|()| None)
            .map_err(|e| api_error(Operation::NvSwapIn, e))
    }

    /// The seq of the save a swap-out in progress writes, if one runs.
    pub(super) fn swap_out_in_progress(&self) -> Option<u64> {
        self.long_operation
            .as_ref()
            .and_then(|op| op.swap_out_seq())
    }
}
