//! The VMM control loop: one thread that owns the VM and reacts to everything that can end or
//! change it: the guest's power-off and reset requests, vCPU failures, SIGTERM/SIGINT, API
//! requests and the power-fail signal. Everything arrives as a readable fd in one epoll, and
//! nothing on this thread waits on a file it does not own (long requests run on a worker,
//! `long_operation.rs`), so a power-fail save starts as soon as SIGPWR arrives.
//!
//! Signals and an NV VM: a signal the VMM can act on never loses the VM. SIGPWR saves it
//! (power fail, exit 75); SIGTERM/SIGINT save it too (planned suspend, exit 0) unless SIGPWR is
//! pending as well, which wins (power fail, exit 75); a signal during a save waits for the save.

mod api_dispatch;
mod long_operation;
mod swap;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;

use nv_extension::{SaveReport, ShutdownKind, StopCause};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::{self, ApiMessage};
use crate::config::{ApiSocketConfig, SeccompMode, VmConfig};
use crate::events::VmEvents;
use crate::memory::guest_memory_from_config;
use crate::nv::{self, NvVm};
use crate::recovery_ahead::RecoveryAhead;
use crate::seccomp_filters::{apply_filter_for_mode, ThreadKind};
use crate::signal_events::{
    event_fd_pair, install_power_fail_signal, mask_without, route_to_event_fd, take_pending,
};
use crate::vm::Vm;
use crate::Error;

/// Exit code of a VMM whose VM ended cleanly (guest power-off, the reset of a VM not in NV
/// memory, SIGTERM/SIGINT).
pub const EXIT_CLEAN: i32 = 0;
/// Exit code of a VMM whose VM failed to start or failed while running.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code of a VMM whose NV guest reset itself (an i8042 or system-event reset request, or a
/// triple fault): the VMM ends instead of rebooting over persistent RAM, and the region records
/// a guest reset (next start: cold boot).
pub const EXIT_GUEST_RESET: i32 = 3;

/// epoll tokens: which fd became readable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ControlEvent {
    GuestShutdown = 1,
    GuestReset = 2,
    VcpuFailed = 3,
    TerminationSignal = 4,
    /// SIGPWR: the host is running on battery; save the NV VM now.
    PowerFailSignal = 5,
    /// The API thread queued requests (its wake EventFd).
    ApiRequest = 6,
    /// A long request's worker finished (`long_operation.rs`).
    LongOperationDone = 7,
    /// A virtio driver set DRIVER_OK: activate the device here, not on the vCPU.
    DeviceActivation = 8,
    /// The NV checkpoint timer: take an epoch checkpoint (`nv/checkpoint.rs`).
    Checkpoint = 9,
    /// The checkpoint fault thread holds a page (undo log full, or recording failed).
    CheckpointAttention = 10,
}

impl ControlEvent {
    fn from_token(token: u64) -> Option<ControlEvent> {
        [
            ControlEvent::GuestShutdown,
            ControlEvent::GuestReset,
            ControlEvent::VcpuFailed,
            ControlEvent::TerminationSignal,
            ControlEvent::PowerFailSignal,
            ControlEvent::ApiRequest,
            ControlEvent::LongOperationDone,
            ControlEvent::DeviceActivation,
            ControlEvent::Checkpoint,
            ControlEvent::CheckpointAttention,
        ]
        .into_iter()
        .find(|event| *event as u64 == token)
    }
}

/// What ended the control loop.
#[derive(Debug, PartialEq, Eq)]
pub enum VmmExit {
    GuestShutdown,
    /// The guest of a VM not in NV memory asked for a reset.
    GuestReset,
    /// The NV VM's guest reset itself (`StopCause::GuestReset`) or any guest triple-faulted
    /// (`StopCause::TripleFault`): the VMM ends instead of rebooting, and says so.
    ResetInstead(StopCause),
    TerminationSignal,
    VcpuFailed(String),
    /// `vmm.shutdown` over the API.
    VmmShutdown,
    /// The NV VM's state was saved in place (power fail or planned suspend); it waits for
    /// `recover=on`. `into_detached_region`: the region's path no longer named the file the
    /// save committed into (`SaveReport::region_file_changed`).
    NvSaved {
        kind: ShutdownKind,
        into_detached_region: bool,
    },
    /// `vm.nv-swap-out` committed: the VM lives in its swap file, its NV memory is free.
    NvSwappedOut,
}

impl VmmExit {
    pub fn exit_code(&self) -> i32 {
        match self {
            VmmExit::GuestShutdown
            | VmmExit::GuestReset
            | VmmExit::TerminationSignal
            | VmmExit::VmmShutdown
            | VmmExit::NvSwappedOut => EXIT_CLEAN,
            VmmExit::VcpuFailed(_) => EXIT_FAILURE,
            VmmExit::ResetInstead(_) => EXIT_GUEST_RESET,
            VmmExit::NvSaved {
                into_detached_region: true,
                ..
            } => nv::EXIT_SAVED_INTO_DETACHED_REGION,
            VmmExit::NvSaved {
                kind: ShutdownKind::PowerFail,
                ..
            } => nv::EXIT_POWER_FAIL_SAVED,
            // `save_vm` refuses the checkpoint kind: no save ends with it.
            VmmExit::NvSaved {
                kind: ShutdownKind::PlannedSuspend | ShutdownKind::Checkpoint,
                ..
            } => EXIT_CLEAN,
        }
    }

    /// The end after a committed save of `kind` that `report` describes.
    pub fn nv_saved(kind: ShutdownKind, report: &SaveReport) -> VmmExit {
        VmmExit::NvSaved {
            kind,
            into_detached_region: report.region_file_changed.is_some(),
        }
    }
}

pub struct Vmm {
    epoll_fd: RawFd,
    seccomp: SeccompMode,
    events: Arc<VmEvents>,
    termination: EventFd,
    power_fail_signal: EventFd,
    vm: Option<Vm>,
    /// The VM's config once one is created (`vm.create`, or the command line), booted or not.
    vm_config: Option<VmConfig>,
    /// Requests from the API thread and the EventFd it writes after queueing one.
    api: Option<(Receiver<ApiMessage>, EventFd)>,
    /// Set while `vm` runs in an NV region.
    nv: Option<NvVm>,
    /// A long request running on a worker thread (`long_operation.rs`); while it writes a
    /// snapshot, it holds the VM and `vm` is `None`.
    long_operation: Option<long_operation::LongOperation>,
    /// Written by a long request's worker when it is done.
    long_operation_done: EventFd,
    /// The process ends right after the control loop (`crate::run`): once a save committed, the
    /// VM is left as it is (vCPU threads parked, guest memory mapped) for the exit to drop.
    exit_after_loop: bool,
    /// The NV checkpoint timer and write tracker (off unless `checkpoint_ms` or
    /// `vm.nv-checkpoint` turned them on).
    checkpoints: nv::Checkpoints,
}

impl Vmm {
    /// `seccomp` is applied to every thread the VMM runs: the control loop's own thread when the
    /// loop starts, each vCPU thread when it starts.
    pub fn new(seccomp: SeccompMode) -> Result<Vmm, Error> {
        let epoll_fd = epoll::create(true).map_err(|source| Error::Epoll {
            operation: "create",
            source,
        })?;
        let vmm = Vmm {
            epoll_fd,
            seccomp,
            events: Arc::new(VmEvents::new()?),
            termination: route_to_event_fd(&[libc::SIGTERM, libc::SIGINT], "termination")?,
            power_fail_signal: install_power_fail_signal()?,
            vm: None,
            vm_config: None,
            api: None,
            nv: None,
            long_operation: None,
            long_operation_done: EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
                operation: "create (long operation)",
                source,
            })?,
            exit_after_loop: false,
            checkpoints: nv::Checkpoints::new(seccomp)?,
        };
        let events = Arc::clone(&vmm.events);
        vmm.watch(events.shutdown.as_raw_fd(), ControlEvent::GuestShutdown)?;
        vmm.watch(events.reset.as_raw_fd(), ControlEvent::GuestReset)?;
        vmm.watch(events.vcpu_failed.as_raw_fd(), ControlEvent::VcpuFailed)?;
        vmm.watch(
            events.device_activation.as_raw_fd(),
            ControlEvent::DeviceActivation,
        )?;
        vmm.watch(vmm.termination.as_raw_fd(), ControlEvent::TerminationSignal)?;
        vmm.watch(
            vmm.power_fail_signal.as_raw_fd(),
            ControlEvent::PowerFailSignal,
        )?;
        vmm.watch(
            vmm.long_operation_done.as_raw_fd(),
            ControlEvent::LongOperationDone,
        )?;
        vmm.watch(vmm.checkpoints.timer_fd(), ControlEvent::Checkpoint)?;
        vmm.watch(
            vmm.checkpoints.attention_fd(),
            ControlEvent::CheckpointAttention,
        )?;
        Ok(vmm)
    }

    fn watch(&self, fd: RawFd, event: ControlEvent) -> Result<(), Error> {
        epoll::ctl(
            self.epoll_fd,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            fd,
            epoll::Event::new(epoll::Events::EPOLLIN, event as u64),
        )
        .map_err(|source| Error::Epoll {
            operation: "add",
            source,
        })
    }

    /// Serves the REST API on `socket`: the HTTP thread queues requests, the control loop answers
    /// them (see `api_dispatch.rs`).
    pub fn start_api(&mut self, socket: ApiSocketConfig) -> Result<(), Error> {
        let (wake, server_wake) = event_fd_pair("create (API wake)", "clone (API wake)")?;
        let (sender, receiver) = channel();
        let limits = api::ServerLimits {
            seccomp: self.seccomp,
            ..Default::default()
        };
        api::start_http_server_with_limits(socket, sender, server_wake, limits)
            .map_err(Error::Api)?;
        self.serve_api_requests(receiver, wake)
    }

    /// Answers the requests queued on `requests`, whose sender writes `wake` after queueing
    /// one: how `start_api` connects its HTTP server (the API tests put their own in front).
    pub fn serve_api_requests(
        &mut self,
        requests: Receiver<ApiMessage>,
        wake: EventFd,
    ) -> Result<(), Error> {
        self.watch(wake.as_raw_fd(), ControlEvent::ApiRequest)?;
        self.api = Some((requests, wake));
        Ok(())
    }

    /// Builds guest memory and the VM from `config`, then boots it.
    pub fn boot_vm(&mut self, config: &VmConfig) -> Result<(), Error> {
        self.boot_vm_on(config, None)
    }

    /// [`Vmm::boot_vm`]; an NV recovery builds its KVM VM on what `ahead` began if given
    /// (started while the VMM set itself up, `recovery_ahead`), anything else drops it.
    pub fn boot_vm_on(
        &mut self,
        config: &VmConfig,
        ahead: Option<RecoveryAhead>,
    ) -> Result<(), Error> {
        self.vm_config = Some(config.clone());
        if config.nv.is_some() {
            return self.start_nv_vm(nv::prepare(config, self.seccomp, ahead)?);
        }
        let memory = guest_memory_from_config(&config.memory)?;
        let mut vm = Vm::new(config, memory, Arc::clone(&self.events), self.seccomp)?;
        vm.boot()?;
        log::info!("VM booted with {} vCPU(s)", config.cpus.boot_vcpus);
        self.vm = Some(vm);
        self.record_pty_paths();
        Ok(())
    }

    /// Copies the paths of the ptys the VM's devices opened (`--serial pty`, `--console pty`)
    /// into the config `vm.info` shows, where upstream reports them.
    pub(crate) fn record_pty_paths(&mut self) {
        if let (Some(config), Some(vm)) = (self.vm_config.as_mut(), self.vm.as_ref()) {
            for (kept, running) in [
                (&mut config.serial, &vm.config().serial),
                (&mut config.console, &vm.config().console),
            ] {
                if kept.mode == crate::config::ConsoleOutputMode::Pty {
                    kept.file.clone_from(&running.file);
                }
            }
        }
    }

    /// Builds the VM of a copy-based snapshot (`--restore`, `vm.restore`); `snapshot::restore`
    /// emits the restoring/restored events (before the resume, as upstream orders them).
    pub fn restore_vm(&mut self, restore: &crate::config::RestoreConfig) -> Result<(), Error> {
        let vm = crate::snapshot::restore(restore, Arc::clone(&self.events), self.seccomp)?;
        log::info!("VM restored from {}", restore.source_url);
        self.vm_config = Some(vm.config().clone());
        self.vm = Some(vm);
        Ok(())
    }

    /// Runs a VM over its NV memory: cold boot, or resume in place (`recover=on`, `vm.nv-recover`).
    pub fn start_nv_vm(&mut self, prepared: nv::PreparedVm) -> Result<(), Error> {
        // The VM's config is what it runs with: for a recovery the one stored in the region (RAM
        // size, kernel, disks), not the recovering command line's, so a reboot boots that.
        let config = prepared.config.clone();
        let (vm, nv) = nv::start(
            prepared,
            Arc::clone(&self.events),
            self.seccomp,
            &mut self.checkpoints,
        )?;
        self.vm_config = Some(config);
        self.vm = Some(vm);
        self.nv = Some(nv);
        self.record_pty_paths();
        Ok(())
    }

    /// `vm.nv-checkpoint`: turns the NV VM's checkpoints on every `interval`, or off (zero); the
    /// interval becomes the VM's (stored in the region, so a recovery keeps it).
    pub fn set_checkpoint_interval(&mut self, interval: Duration) -> Result<(), Error> {
        if let Some(config) = self.vm_config.as_ref().filter(|_| !interval.is_zero()) {
            config
                .validate_checkpointed_devices()
                .map_err(Error::CheckpointRefused)?;
        }
        match (self.nv.as_ref(), self.vm.as_mut()) {
            (Some(nv_vm), Some(vm)) => self.checkpoints.set_interval(nv_vm, vm, interval)?,
            _ => return Err(Error::NoNvVm),
        }
        if let (Some(nv_vm), Some(config)) = (self.nv.as_ref(), self.vm_config.as_mut()) {
            if let Some(nv_config) = config.nv.as_mut() {
                nv_config.checkpoint_ms = Some(interval.as_millis() as u64);
                nv::store_config(nv_vm, config)?;
            }
        }
        Ok(())
    }

    /// The NV VM this VMM runs, if any (`vm.nv-status`).
    pub fn nv_vm(&self) -> Option<&NvVm> {
        self.nv.as_ref()
    }

    /// Saves the NV VM in place (SIGPWR, SIGTERM/SIGINT, `vm.power-fail`, `vm.nv-suspend`).
    /// After `Ok` the VMM must end with `VmmExit::nv_saved(kind, &report)`; after `Err` the VM keeps
    /// running. A snapshot being written does not hold it up: the save reads the paused VM
    /// alongside the snapshot worker, which is then abandoned.
    pub fn nv_save(&mut self, kind: ShutdownKind, trigger: &str) -> Result<SaveReport, Error> {
        let Some(nv_vm) = self.nv.as_mut() else {
            return Err(Error::NoNvVm);
        };
        if let Some(vm) = self.vm.as_mut() {
            let report = nv::save(nv_vm, vm, kind, trigger)?;
            // Newer than every frame held for output commit: they may go out now.
            self.checkpoints.saved();
            return Ok(report);
        }
        match self.long_operation.as_ref().and_then(|op| op.shared_vm()) {
            Some(vm) => {
                log::warn!("saving the VM while vm.snapshot writes it: the snapshot is abandoned");
                nv::save_paused(nv_vm, vm, kind, trigger)
            }
            None => Err(Error::NoNvVm),
        }
    }

    /// Whether SIGPWR arrived (and was not acted on yet); consumes it. It may have written its
    /// EventFd, or still be pending: blocked outside `epoll_pwait`, which returned with other
    /// events just as it came.
    fn take_power_fail_signal(&self) -> bool {
        let delivered = self.power_fail_signal.read().is_ok();
        take_pending(libc::SIGPWR) || delivered
    }

    pub fn vm(&mut self) -> Option<&mut Vm> {
        self.vm.as_mut()
    }

    /// Runs until the VM ends; returns why.
    pub fn control_loop(&mut self) -> Result<VmmExit, Error> {
        crate::startup_phases::note_serving();
        // Threads spawned from here on (vCPUs of a later VM) inherit this filter too.
        apply_filter_for_mode(ThreadKind::Vmm, self.seccomp).map_err(Error::Seccomp)?;
        let mut ready = vec![epoll::Event::new(epoll::Events::empty(), 0); 8];
        // SIGPWR is blocked in this thread and every thread it started; it is delivered only
        // while the loop waits, and only here (see `signal_events::install_power_fail_signal`).
        let wait_mask = mask_without(&[libc::SIGPWR])?;
        loop {
            let count = match wait_for_events(self.epoll_fd, &wait_mask, &mut ready) {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Epoll {
                        operation: "wait",
                        source,
                    })
                }
            };
            let mut kinds: Vec<ControlEvent> = ready[..count]
                .iter()
                .filter_map(|event| {
                    let token = event.data;
                    let kind = ControlEvent::from_token(token);
                    if kind.is_none() {
                        log::warn!("control loop: unknown epoll token {token}");
                    }
                    kind
                })
                .collect();
            // A SIGPWR that came just as other events did is still pending (blocked again when
            // `epoll_pwait` returned): take it now. Then SIGPWR first, whatever else became
            // ready with it: nothing may delay the save.
            if take_pending(libc::SIGPWR) && !kinds.contains(&ControlEvent::PowerFailSignal) {
                kinds.push(ControlEvent::PowerFailSignal);
            }
            kinds.sort_by_key(|kind| *kind != ControlEvent::PowerFailSignal);
            for kind in kinds {
                if let Some(exit) = self.handle(kind)? {
                    self.abandon_long_operation();
                    self.end_vm_run(&exit);
                    self.finish_api_requests();
                    return Ok(exit);
                }
            }
        }
    }

    /// Handles one readable fd; returns `Some` when the VMM must end.
    fn handle(&mut self, kind: ControlEvent) -> Result<Option<VmmExit>, Error> {
        match kind {
            ControlEvent::GuestShutdown => {
                let _ = self.events.shutdown.read();
                log::info!("guest powered off");
                Ok(Some(VmmExit::GuestShutdown))
            }
            ControlEvent::GuestReset => {
                let _ = self.events.reset.read();
                // Upstream reboots here. We end the VMM instead: a cold boot over persistent RAM
                // would silently replace a recoverable guest, so restarting is left to whoever
                // runs us (see docs/vmm.md). For an NV VM, and for any triple fault (a guest
                // crash), the exit code and the region say so rather than "powered off".
                let cause = if self.events.take_triple_fault() {
                    StopCause::TripleFault
                } else {
                    StopCause::GuestReset
                };
                let vm = self.nv.as_ref().map(|nv_vm| nv_vm.name().to_string());
                match (cause, vm) {
                    (StopCause::GuestReset, None) => {
                        log::info!("guest requested a reset: ending the VMM");
                        Ok(Some(VmmExit::GuestReset))
                    }
                    (cause, vm) => {
                        log::warn!(
                            "{}: ending the VMM instead of rebooting (exit code \
                             {EXIT_GUEST_RESET}){}",
                            match cause {
                                StopCause::TripleFault => "guest triple fault (the guest crashed)",
                                _ => "guest reset requested",
                            },
                            match vm {
                                Some(vm) => format!(
                                    "; VM {vm:?} is recorded as stopped by a {cause}, its next \
                                     start is a cold boot"
                                ),
                                None => String::new(),
                            }
                        );
                        Ok(Some(VmmExit::ResetInstead(cause)))
                    }
                }
            }
            ControlEvent::VcpuFailed => {
                let _ = self.events.vcpu_failed.read();
                let reasons: Vec<String> = self
                    .events
                    .take_failures()
                    .into_iter()
                    .map(|f| format!("vCPU {}: {}", f.vcpu, f.reason))
                    .collect();
                Ok(Some(VmmExit::VcpuFailed(reasons.join("; "))))
            }
            ControlEvent::TerminationSignal => {
                let _ = self.termination.read();
                if let Some(seq) = self.swap_out_in_progress() {
                    log::warn!(
                        "SIGTERM/SIGINT during a swap-out: the VM's state is committed already \
                         (seq {seq}, planned suspend); ending now, the VM is resident or swapped \
                         out with a complete file"
                    );
                    return Ok(Some(VmmExit::NvSaved {
                        kind: ShutdownKind::PlannedSuspend,
                        into_detached_region: false,
                    }));
                }
                if self.nv.is_none() {
                    log::info!("SIGTERM/SIGINT: shutting the VM down");
                    return Ok(Some(VmmExit::TerminationSignal));
                }
                Ok(self.save_on_termination())
            }
            ControlEvent::Checkpoint | ControlEvent::CheckpointAttention => {
                let nv_vm = self.nv.as_ref();
                let result = if kind == ControlEvent::Checkpoint {
                    self.checkpoints.tick(nv_vm, self.vm.as_mut())
                } else {
                    self.checkpoints.attend(nv_vm, self.vm.as_mut())
                };
                // A failed checkpoint leaves the last committed epoch standing; the next tick
                // tries again (`vm.nv-status` shows the epochs not advancing).
                if let Err(e) = result {
                    log::error!("NV checkpoint failed: {e}");
                }
                Ok(None)
            }
            ControlEvent::ApiRequest => Ok(self.answer_api_requests()),
            ControlEvent::LongOperationDone => Ok(self.finish_long_operation()),
            ControlEvent::DeviceActivation => {
                let _ = self.events.device_activation.read();
                // A snapshot worker may hold the (paused) VM: a device activated now starts
                // paused, and its saved state says activated either way.
                let vm = self.vm.as_ref().or_else(|| {
                    self.long_operation
                        .as_ref()
                        .and_then(|operation| operation.shared_vm())
                });
                if let Some(vm) = vm {
                    vm.activate_pending_devices();
                }
                self.forget_ejected_devices();
                Ok(None)
            }
            ControlEvent::PowerFailSignal => {
                let _ = self.power_fail_signal.read();
                if let Some(seq) = self.swap_out_in_progress() {
                    log::warn!(
                        "SIGPWR during a swap-out: the VM's state is committed already (seq \
                         {seq}); ending now, the VM is resident or swapped out with a complete \
                         file"
                    );
                    return Ok(Some(VmmExit::NvSaved {
                        kind: ShutdownKind::PowerFail,
                        into_detached_region: false,
                    }));
                }
                if self.nv.is_none() {
                    // Not an error: a UPS hook signals every VMM, NV or not.
                    log::warn!("SIGPWR: no VM in NV memory runs here, nothing to save; ignored");
                    return Ok(None);
                }
                log::warn!("SIGPWR: host power is failing, saving the VM in place");
                let raised = self.set_power_fail_priority(true);
                match self.nv_save(ShutdownKind::PowerFail, "signal") {
                    Ok(report) => {
                        if !self.exit_after_loop {
                            self.set_power_fail_priority(false);
                        }
                        Ok(Some(VmmExit::nv_saved(ShutdownKind::PowerFail, &report)))
                    }
                    Err(e) => {
                        if raised {
                            self.set_power_fail_priority(false);
                        }
                        log::error!("SIGPWR: the save failed, the VM keeps running: {e}");
                        Ok(None)
                    }
                }
            }
        }
    }

    /// What `vm.reboot` checks before it stops the running guest, so that a reboot that cannot
    /// work leaves the guest running: the config it will cold-boot (for a recovered NV VM, the
    /// one stored in the region) is valid, its kernel, initramfs and disks can be opened, and an
    /// NV VM keeps its extent's RAM size. Files are opened non-blocking (a FIFO never waits).
    fn check_reboot(&self) -> Result<(), Error> {
        let Some(config) = self.vm_config.clone().map(api_dispatch::cold_boot_config) else {
            return Ok(());
        };
        config.validate().map_err(Error::NotBootableConfig)?;
        let open = |what: &str, path: &str, write: bool| -> Result<(), Error> {
            let fail = |source: std::io::Error| Error::NotBootableFile {
                what: what.to_owned(),
                path: path.to_owned(),
                source,
            };
            let metadata = std::fs::metadata(path).map_err(fail)?;
            let file_type = metadata.file_type();
            if !(file_type.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&file_type))
            {
                return Err(Error::NotBootable(format!(
                    "{what} {path}: not a regular file or block device"
                )));
            }
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map(drop)
                .map_err(fail)
        };
        let kernel = config
            .payload
            .kernel
            .as_deref()
            .ok_or_else(|| Error::NotBootable("the VM's config names no kernel".to_string()))?;
        open("kernel", kernel, false)?;
        if let Some(initramfs) = config.payload.initramfs.as_deref() {
            open("initramfs", initramfs, false)?;
        }
        for disk in config.disks.iter().flatten() {
            if let Some(path) = disk.path.as_deref() {
                open("disk", path, !disk.readonly)?;
            }
        }
        if let Some(nv_vm) = &self.nv {
            nv::check_cold_boot(&config, nv_vm)?;
        }
        Ok(())
    }

    /// SIGTERM/SIGINT with an NV VM: save it in place rather than lose it. A planned suspend
    /// (exit 0), unless SIGPWR came too, before or during the save: then the power failure wins
    /// (exit 75). If the save fails the VM keeps running, as after a failed SIGPWR save: stopping
    /// it now would lose it (`vm.shutdown` discards it on purpose).
    fn save_on_termination(&mut self) -> Option<VmmExit> {
        let power_failing = self.take_power_fail_signal();
        let kind = if power_failing {
            log::warn!("SIGTERM/SIGINT with SIGPWR pending: saving the VM for the power failure");
            ShutdownKind::PowerFail
        } else {
            log::warn!("SIGTERM/SIGINT: saving the VM in place (planned suspend) before exiting");
            ShutdownKind::PlannedSuspend
        };
        match self.nv_save(kind, "signal") {
            Ok(report) if kind == ShutdownKind::PlannedSuspend && self.take_power_fail_signal() => {
                log::warn!(
                    "SIGPWR arrived during the planned-suspend save: the VM is saved (recorded \
                     as planned-suspend); exiting with the power-fail code"
                );
                Some(VmmExit::nv_saved(ShutdownKind::PowerFail, &report))
            }
            Ok(report) => Some(VmmExit::nv_saved(kind, &report)),
            Err(e) => {
                log::error!(
                    "SIGTERM/SIGINT: the save failed, the VM keeps running (a forced stop now is \
                     an unsafe shutdown; vm.shutdown discards it cleanly): {e}"
                );
                None
            }
        }
    }

    /// Answers every queued API request; returns `Some` when one of them ends the VMM (the rest
    /// are answered 503).
    fn answer_api_requests(&mut self) -> Option<VmmExit> {
        let messages: Vec<ApiMessage> = match &self.api {
            Some((receiver, wake)) => {
                let _ = wake.read();
                receiver.try_iter().collect()
            }
            None => return None,
        };
        let mut messages = messages.into_iter();
        while let Some(message) = messages.next() {
            log::debug!("API request: {:?}", message.request);
            let Some(message) = self.route_long_request(message) else {
                continue;
            };
            let answer = self.answer(message.request);
            // The client may have gone; the operation is done either way.
            let _ = message.reply.send(answer.response);
            if let Some(exit) = answer.exit {
                for unanswered in messages {
                    let _ = unanswered
                        .reply
                        .send(Err(api::ApiError::new(503, "the VMM is shutting down")));
                }
                return Some(exit);
            }
        }
        None
    }

    /// Before the process ends: answers what is still queued and lets the HTTP thread write the
    /// answers out (bounded wait).
    fn finish_api_requests(&mut self) {
        if let Some((receiver, _)) = &self.api {
            if !api::finish_pending_requests(receiver, Duration::from_secs(1)) {
                log::warn!("some API answers were not written before the VMM ended");
            }
        }
    }

    /// Raises (or lowers again) the control loop and the VM's vCPU threads for a power-fail
    /// save (`power_fail_priority`). Returns whether the control loop was raised.
    fn set_power_fail_priority(&self, raised: bool) -> bool {
        let done = if raised {
            crate::power_fail_priority::raise_control_loop()
        } else {
            crate::power_fail_priority::lower_control_loop();
            true
        };
        if done {
            if let Some(vm) = &self.vm {
                vm.vcpus.set_power_fail_priority(raised);
            }
        }
        done
    }

    /// Says that the process exits as soon as [`Vmm::control_loop`] returns (what `crate::run`
    /// does): after a committed save the loop then leaves the VM standing instead of stopping
    /// it, see [`Vmm::end_vm_run`].
    pub fn exit_after_loop(&mut self) {
        self.exit_after_loop = true;
    }

    /// Stops the VM (if one runs) and records how its NV run ended. After a committed save in a
    /// process that exits next, nothing of the VM matters any more: its state is in the region
    /// and its memory is the region's. Stopping and joining the vCPU and device threads and
    /// unmapping guest RAM would only delay the exit (tens of ms), so the VM is left to the
    /// process exit, which ends the threads and drops the mappings at once.
    fn end_vm_run(&mut self, exit: &VmmExit) {
        if self.exit_after_loop && matches!(exit, VmmExit::NvSaved { .. }) {
            if let Some(vm) = self.vm.take() {
                log::debug!(
                    "the VM's state is committed: leaving its threads and memory to the exit"
                );
                // The kernel's teardown of the VM (tens of ms of grace periods on a busy host)
                // then runs in a helper, not in this process's exit.
                crate::detached_teardown::hand_off(vm.vm_fd.as_raw_fd());
                // Every thread of the process, KVM's own worker included, must run its exit
                // before the process is gone: none of them waits behind the host's load.
                crate::power_fail_priority::raise_other_threads_for_exit();
                std::mem::forget(vm);
                // What `Vm::shutdown` would have said: the events stay as they were.
                crate::event_monitor::emit_vm(crate::event_monitor::VmEvent::Shutdown);
            }
        } else {
            self.shutdown_vm();
        }
        self.end_nv_run(exit);
    }

    fn shutdown_vm(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            vm.shutdown();
        }
        // Only once no vCPU runs: a write after the protection is lifted would go unlogged
        // while the region still holds an epoch to roll back to.
        self.checkpoints.end_run();
    }

    /// Records how the NV VM's run ended (after its vCPUs stopped) and releases it. A clean end
    /// makes the next start a cold boot; a vCPU failure stays "running" in the region, so
    /// recovery refuses it as an unsafe shutdown rather than resuming a broken guest.
    fn end_nv_run(&mut self, exit: &VmmExit) {
        if let Some(nv_vm) = self.nv.take() {
            match exit {
                VmmExit::GuestShutdown
                | VmmExit::GuestReset
                | VmmExit::TerminationSignal
                | VmmExit::VmmShutdown => nv_vm.mark_powered_off(),
                VmmExit::ResetInstead(cause) => nv_vm.mark_stopped(*cause),
                VmmExit::VcpuFailed(_) | VmmExit::NvSaved { .. } | VmmExit::NvSwappedOut => {}
            }
        }
    }
}

/// `epoll_pwait` with `mask` as the thread's signal mask while it waits (the epoll crate only
/// wraps `epoll_wait`).
fn wait_for_events(
    epoll_fd: RawFd,
    mask: &libc::sigset_t,
    ready: &mut [epoll::Event],
) -> std::io::Result<usize> {
    let capacity = libc::c_int::try_from(ready.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `epoll::Event` is `repr(C, packed)` with the layout of `libc::epoll_event`; the
    // kernel writes at most `capacity` of them into `ready`, which holds that many. `mask` is a
    // valid sigset_t that lives across the call.
    let count = unsafe {
        libc::epoll_pwait(
            epoll_fd,
            ready.as_mut_ptr().cast::<libc::epoll_event>(),
            capacity,
            -1,
            mask,
        )
    };
    usize::try_from(count).map_err(|_| std::io::Error::last_os_error())
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown_vm();
        let _ = epoll::close(self.epoll_fd);
    }
}
