//! API requests whose work waits on files the VMM does not control run on a worker thread, never
//! on the control loop: `vm.snapshot` (writes a directory: a FIFO, a stalled NFS mount or a full
//! pipe there would block), `vm.restore` (reads one) and `vmm.nv-regions` (opens any path). The
//! control loop keeps reacting to signals and other requests meanwhile, so a power-fail save
//! never waits behind them.
//!
//! While a snapshot is written the worker shares the paused VM (`Arc<Vm>`): `vm.info`,
//! `vm.counters`, `vm.nv-status` and `vmm.ping` are answered, a save (SIGPWR, SIGTERM,
//! `vm.power-fail`, `vm.nv-suspend`) goes ahead through shared access (`nv::save_paused`), and
//! every request that would change the VM is refused with 409 naming the snapshot. A VMM that ends
//! before the worker finished abandons it: its client gets 503 and the VM is never unmapped under
//! it (the process exits). `snapshot::save` creates only new files (`O_EXCL|O_NOFOLLOW`: an old
//! snapshot in the directory makes it fail without touching it) and writes `state.json` and
//! `config.json` last, so an abandoned or failed snapshot is never taken for a complete one.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use crate::api::{
    check_state, ApiError, ApiMessage, ApiRequest, ApiResponse, Operation, VmInfoResponse,
    VmState as ApiVmState,
};
use crate::config::{RestoreConfig, SeccompMode};
use crate::event_monitor::{emit_vm, VmEvent};
use crate::events::VmEvents;
use crate::vm::{Vm, VmRunState};
use crate::{nv, Error};

use super::api_dispatch::api_error;
use super::api_dispatch::VhostUserAddJob;
use super::swap::{SwapInJob, SwapOutJob};
use super::{Vmm, VmmExit};
use crate::nv::SwapWatch;

/// What the worker is doing and how its result comes back.
pub(super) enum Job {
    /// Writing a snapshot of the paused VM, which the control loop keeps a share of.
    Snapshot {
        vm: Arc<Vm>,
        result: Receiver<Result<(), Error>>,
    },
    /// Building a VM from a snapshot directory.
    Restore { result: Receiver<Result<Vm, Error>> },
    /// Writing the saved, paused VM to a swap file (`swap.rs`); the VM stays in `Vmm::vm`.
    SwapOut(SwapOutJob),
    /// Bringing a VM back from a swap file into this empty VMM (`swap.rs`).
    SwapIn(SwapInJob),
    /// Connecting a hotplugged vhost-user device's backend (`hotplug_api.rs`); the VM stays in
    /// `Vmm::vm` and runs.
    VhostUserAdd(VhostUserAddJob),
}

/// The one long operation in progress.
pub(super) struct LongOperation {
    request: Operation,
    started: Instant,
    reply: Sender<ApiResponse>,
    job: Job,
}

impl LongOperation {
    /// The paused VM a snapshot worker shares, if this is a snapshot.
    pub(super) fn shared_vm(&self) -> Option<&Vm> {
        match &self.job {
            Job::Snapshot { vm, .. } => Some(vm),
            Job::Restore { .. } | Job::SwapOut(_) | Job::SwapIn(_) | Job::VhostUserAdd(_) => None,
        }
    }

    /// The seq of the committed save a swap-out writes, if this is one.
    pub(super) fn swap_out_seq(&self) -> Option<u64> {
        match &self.job {
            Job::SwapOut(job) => Some(job.seq),
            _ => None,
        }
    }

    /// The swap this operation runs, if it is one.
    fn swap_watch(&self) -> Option<&SwapWatch> {
        match &self.job {
            Job::SwapOut(job) => Some(&job.watch),
            Job::SwapIn(job) => Some(&job.watch),
            _ => None,
        }
    }

    fn busy(&self, refused: &str) -> ApiError {
        ApiError::conflict(format!(
            "{} has been running for {} ms: {refused} must wait until it is done",
            self.request.path(),
            self.started.elapsed().as_millis()
        ))
    }
}

/// Whether `request` may be carried out while a long operation runs: reads, the saves (they
/// must never wait), and `vmm.shutdown` (the way out of a snapshot that never ends).
fn allowed_meanwhile(request: &ApiRequest) -> bool {
    matches!(
        request,
        ApiRequest::VmmPing
            | ApiRequest::VmmShutdown
            | ApiRequest::VmInfo
            | ApiRequest::VmCounters
            | ApiRequest::NvStatus
            | ApiRequest::NvPowerFail
            | ApiRequest::NvSuspend
            | ApiRequest::NvRegions(_)
    )
}

fn body<T: serde::Serialize>(value: &T) -> ApiResponse {
    serde_json::to_value(value)
        .map(Some)
        .map_err(|e| ApiError::internal(format!("encoding the answer: {e}")))
}

/// Starts `work` on a thread named `name`; when it is done its result goes to the returned
/// receiver and `done` is written (the control loop watches it).
pub(super) fn spawn_worker<T: Send + 'static>(
    name: &str,
    done: &EventFd,
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<Receiver<Result<T, Error>>, Error> {
    let done = done.try_clone().map_err(|source| Error::EventFd {
        operation: "clone (long operation)",
        source,
    })?;
    let name = name.to_string();
    let thread_name = name.clone();
    let (sender, receiver) = channel();
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            // `work` drops what it borrowed of the VM before the control loop hears of it (also
            // when it panics: the unwinding drops it). A panic is answered as a failure rather
            // than leaving the operation in progress for ever.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .unwrap_or_else(|_| Err(Error::Snapshot(format!("{name}: the worker panicked"))));
            let _ = sender.send(result);
            if let Err(e) = done.write(1) {
                log::error!("{name}: cannot wake the control loop: {e}");
            }
        })
        .map_err(|source| Error::ThreadSpawn {
            thread: "long operation".to_string(),
            source,
        })?;
    Ok(receiver)
}

impl Vmm {
    /// Takes over `message` if it is a long request (started on a worker) or conflicts with the
    /// long operation in progress (refused); otherwise gives it back for `answer`.
    pub(super) fn route_long_request(&mut self, message: ApiMessage) -> Option<ApiMessage> {
        if let Some(operation) = &self.long_operation {
            if !allowed_meanwhile(&message.request) {
                let refusal = operation.busy(message.request.operation().path());
                let _ = message.reply.send(Err(refusal));
                return None;
            }
            if let Some(watch) = operation.swap_watch() {
                let answer = match &message.request {
                    ApiRequest::NvStatus => Some(match watch.status() {
                        Some(status) => body(&status),
                        None => Err(operation.busy(message.request.operation().path())),
                    }),
                    ApiRequest::NvPowerFail | ApiRequest::NvSuspend => {
                        operation.swap_out_seq().map(|seq| {
                            Err(ApiError::conflict(format!(
                                "vm.nv-swap-out is in progress: the VM's state is committed \
                                 already (seq {seq}, planned suspend)"
                            )))
                        })
                    }
                    _ => None,
                };
                if let Some(answer) = answer {
                    let _ = message.reply.send(answer);
                    return None;
                }
            }
            if let Some(vm) = operation.shared_vm() {
                let answer = match &message.request {
                    ApiRequest::VmInfo => Some(body(&VmInfoResponse {
                        config: self
                            .vm_config
                            .clone()
                            .unwrap_or_else(|| vm.config().clone()),
                        state: ApiVmState::Paused,
                        memory_actual_size: Some(vm.memory_actual_size()),
                        device_tree: Some(VmInfoResponse::device_tree(&vm.device_resources())),
                    })),
                    ApiRequest::VmCounters => Some(body(&vm.counters())),
                    _ => None,
                };
                if let Some(answer) = answer {
                    let _ = message.reply.send(answer);
                    return None;
                }
            }
        }
        let ApiMessage { request, reply } = message;
        match request {
            ApiRequest::VmSnapshot(request) => {
                self.start_snapshot(request.destination_url, reply);
                None
            }
            ApiRequest::VmRestore(request) => {
                self.start_restore(request, reply);
                None
            }
            ApiRequest::NvSwapOut(request) => {
                self.start_swap_out(request, reply);
                None
            }
            ApiRequest::NvSwapIn(request) => {
                self.start_swap_in(request, reply);
                None
            }
            ApiRequest::NvRegions(query) => {
                let region = query.region;
                let listing = move || -> Result<(), Error> {
                    let answer = match nv::region_listing(&region) {
                        Ok(listing) => body(&listing),
                        Err(e) => Err(api_error(Operation::NvRegions, e)),
                    };
                    let _ = reply.send(answer);
                    Ok(())
                };
                // Answered by the thread itself: nothing for the control loop to take back.
                if let Err(e) = std::thread::Builder::new()
                    .name("nv-regions".into())
                    .spawn(listing)
                {
                    log::error!("vmm.nv-regions: cannot start its thread: {e}");
                }
                None
            }
            request @ (ApiRequest::VmAddDisk(_)
            | ApiRequest::VmAddNet(..)
            | ApiRequest::VmAddFs(_)) => self.start_vhost_user_add(ApiMessage { request, reply }),
            request => Some(ApiMessage { request, reply }),
        }
    }

    /// Its worker runs: the loop holds the request's reply until [`Self::finish_long_operation`].
    pub(super) fn begin_long_operation(
        &mut self,
        request: Operation,
        reply: Sender<ApiResponse>,
        job: Job,
    ) {
        self.long_operation = Some(LongOperation {
            request,
            started: Instant::now(),
            reply,
            job,
        });
    }

    fn start_snapshot(&mut self, destination_url: String, reply: Sender<ApiResponse>) {
        // Refused by state (upstream's statuses) before anything is touched on disk.
        if let Err(error) = check_state(Operation::Snapshot, self.api_state()) {
            let _ = reply.send(Err(error));
            return;
        }
        let Some(vm) = self.vm.take() else {
            let _ = reply.send(Err(ApiError::refused(
                Operation::Snapshot,
                crate::api::StateRefusal::NotRunning,
            )));
            return;
        };
        if vm.run_state() != VmRunState::Paused {
            let state = vm.run_state().name();
            self.vm = Some(vm);
            let _ = reply.send(Err(api_error(
                Operation::Snapshot,
                Error::InvalidVmState(state),
            )));
            return;
        }
        emit_vm(VmEvent::Snapshotting);
        let vm = Arc::new(vm);
        let shared = Arc::clone(&vm);
        let url = destination_url.clone();
        let spawned = spawn_worker("vm-snapshot", &self.long_operation_done, move || {
            let result = crate::snapshot::save(&shared, &url);
            drop(shared);
            result
        });
        match spawned {
            Ok(result) => {
                log::info!("vm.snapshot to {destination_url}: written by a worker thread");
                self.begin_long_operation(Operation::Snapshot, reply, Job::Snapshot { vm, result });
            }
            Err(e) => {
                // The worker never started: the only other share is gone.
                match Arc::try_unwrap(vm) {
                    Ok(vm) => self.vm = Some(vm),
                    Err(_) => {
                        log::error!("vm.snapshot: the VM is still shared after a failed start")
                    }
                }
                let _ = reply.send(Err(api_error(Operation::Snapshot, e)));
            }
        }
    }

    fn start_restore(&mut self, restore: RestoreConfig, reply: Sender<ApiResponse>) {
        if let Err(error) = check_state(Operation::Restore, self.api_state()) {
            let _ = reply.send(Err(error));
            return;
        }
        let events: Arc<VmEvents> = Arc::clone(&self.events);
        let seccomp: SeccompMode = self.seccomp;
        let source = restore.source_url.clone();
        let spawned = spawn_worker("vm-restore", &self.long_operation_done, move || {
            crate::snapshot::restore(&restore, events, seccomp)
        });
        match spawned {
            Ok(result) => {
                log::info!("vm.restore from {source}: read by a worker thread");
                self.begin_long_operation(Operation::Restore, reply, Job::Restore { result });
            }
            Err(e) => {
                let _ = reply.send(Err(api_error(Operation::Restore, e)));
            }
        }
    }

    /// The worker said it is done: take its result back and answer its request. Returns `Some`
    /// when the VMM must now end (a swap-out that committed, or one that cannot go back).
    pub(super) fn finish_long_operation(&mut self) -> Option<VmmExit> {
        let _ = self.long_operation_done.read();
        let operation = self.long_operation.take()?;
        let LongOperation {
            request,
            started,
            reply,
            job,
        } = operation;
        let took = started.elapsed().as_millis();
        let answer = match job {
            Job::Snapshot { vm, result } => {
                let Ok(result) = result.try_recv() else {
                    // Not done after all (a stray wake-up): keep waiting.
                    self.long_operation = Some(LongOperation {
                        request,
                        started,
                        reply,
                        job: Job::Snapshot { vm, result },
                    });
                    return None;
                };
                match Arc::try_unwrap(vm) {
                    Ok(vm) => self.vm = Some(vm),
                    // Cannot happen: the worker drops its share before it reports.
                    Err(vm) => {
                        log::error!("vm.snapshot: the worker still holds the VM; it stays shared");
                        std::mem::forget(vm);
                    }
                }
                match result {
                    Ok(()) => {
                        log::info!("vm.snapshot done in {took} ms");
                        emit_vm(VmEvent::Snapshotted);
                        Ok(None)
                    }
                    Err(e) => {
                        log::warn!("vm.snapshot failed after {took} ms: {e}");
                        Err(api_error(Operation::Snapshot, e))
                    }
                }
            }
            Job::Restore { result } => {
                let Ok(result) = result.try_recv() else {
                    self.long_operation = Some(LongOperation {
                        request,
                        started,
                        reply,
                        job: Job::Restore { result },
                    });
                    return None;
                };
                match result {
                    Ok(vm) => {
                        log::info!("VM restored in {took} ms");
                        self.vm_config = Some(vm.config().clone());
                        self.vm = Some(vm);
                        Ok(None)
                    }
                    Err(e) => Err(api_error(Operation::Restore, e)),
                }
            }
            Job::SwapOut(job) => {
                let Ok(outcome) = job.result.try_recv() else {
                    self.long_operation = Some(LongOperation {
                        request,
                        started,
                        reply,
                        job: Job::SwapOut(job),
                    });
                    return None;
                };
                log::info!("vm.nv-swap-out finished in {took} ms");
                let (answer, exit) = self.finish_swap_out(job, outcome);
                let _ = reply.send(answer);
                return exit;
            }
            Job::SwapIn(job) => {
                let Ok(outcome) = job.result.try_recv() else {
                    self.long_operation = Some(LongOperation {
                        request,
                        started,
                        reply,
                        job: Job::SwapIn(job),
                    });
                    return None;
                };
                log::info!("vm.nv-swap-in finished in {took} ms");
                self.finish_swap_in(outcome)
            }
            Job::VhostUserAdd(job) => {
                let Ok(connected) = job.result.try_recv() else {
                    self.long_operation = Some(LongOperation {
                        request,
                        started,
                        reply,
                        job: Job::VhostUserAdd(job),
                    });
                    return None;
                };
                log::info!(
                    "{}: the vhost-user backend answered in {took} ms",
                    request.path()
                );
                self.finish_vhost_user_add(request, job, connected)
            }
        };
        let _ = reply.send(answer);
        None
    }

    /// The VMM ends while a worker still runs: answer its client, and never unmap the VM under
    /// a snapshot worker (its share is leaked; the process exits next).
    pub(super) fn abandon_long_operation(&mut self) {
        let Some(operation) = self.long_operation.take() else {
            return;
        };
        log::warn!(
            "{} abandoned unfinished after {} ms: the VMM is ending{}",
            operation.request.path(),
            operation.started.elapsed().as_millis(),
            match operation.job {
                Job::Snapshot { .. } =>
                    " (the snapshot directory has no complete state.json: it cannot be restored)",
                Job::SwapOut(_) =>
                    " (the VM's state is committed: it is resident, or swapped \
                                    out with a complete file)",
                Job::Restore { .. } | Job::SwapIn(_) => "",
                Job::VhostUserAdd(_) => " (the device was not added)",
            }
        );
        let _ = operation.reply.send(Err(ApiError::new(
            503,
            format!(
                "the VMM is ending: {} was abandoned unfinished",
                operation.request.path()
            ),
        )));
        if let Job::Snapshot { vm, .. } = operation.job {
            std::mem::forget(vm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reads_saves_and_vmm_shutdown_go_ahead_during_a_long_operation() {
        for allowed in [
            ApiRequest::VmmPing,
            ApiRequest::VmmShutdown,
            ApiRequest::VmInfo,
            ApiRequest::VmCounters,
            ApiRequest::NvStatus,
            ApiRequest::NvPowerFail,
            ApiRequest::NvSuspend,
        ] {
            assert!(
                allowed_meanwhile(&allowed),
                "{}",
                allowed.operation().path()
            );
        }
        for refused in [
            ApiRequest::VmResume,
            ApiRequest::VmPause,
            ApiRequest::VmShutdown,
            ApiRequest::VmReboot,
            ApiRequest::VmBoot,
            ApiRequest::VmDelete,
            ApiRequest::NvSwapOut(Default::default()),
            ApiRequest::NvSwapIn(Default::default()),
        ] {
            assert!(
                !allowed_meanwhile(&refused),
                "{}",
                refused.operation().path()
            );
        }
    }
}
