//! Everything NV in the VMM: opening (or creating) a VM in an NV region, mapping its RAM from the
//! region's extent, starting it cold or resuming its saved state in place, the power-fail and
//! planned-suspend save through `nv_extension::save_vm`, and the NV answers of the API.
//!
//! The region layout stays inside `nv-extension`: this module only asks it for a VM handle, the
//! (file, offset, size) of the VM's RAM, the config and state blobs, and hands it a [`NvHost`]
//! that pauses and saves a [`Vm`]. The power-fail path reads top-down:
//! SIGPWR or `vm.power-fail` -> control loop (`vmm.rs`) -> [`save`] -> `nv_extension::save_vm`
//! -> [`VmHost`] (pause vCPUs, drain and fdatasync disks, `Vm::save_state`) -> region commit.
//! `docs/recovery.md` explains the sequence, the clock and the exit codes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nv_extension::{
    NvHost, OpenOptions, PersistenceMode, Region, RunKind, RunRecord, SaveReport, ShutdownKind,
    StopCause, VmHandle, VmSummary,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::block_signal;

use crate::api::{
    NvLastSave, NvPersistenceMode, NvPhaseTiming, NvRecoverConfig, NvRegionListing, NvRegionVm,
    NvShutdownKind, NvStatus,
};
use crate::config::{
    default_console, default_deadline_ms, default_serial, NvConfig, SeccompMode, VmConfig,
};
use crate::event_monitor;
use crate::events::VmEvents;
use crate::memory::guest_memory_from_file;
use crate::signal_events::route_to_event_fd;
use crate::state::VmState;
use crate::vm::{Vm, VmRunState};
use crate::{Error, ErrorKind};

/// Exit code of a VMM whose VM was saved by a power-fail save: "state saved, powered off".
/// 75 is `EX_TEMPFAIL` of sysexits.h: the VM is not gone, it waits for `recover=on`.
pub const EXIT_POWER_FAIL_SAVED: i32 = 75;

/// Exit code of a VMM whose save committed into a region file that its path no longer names
/// (deleted, renamed or replaced while the VM ran): the state is in that file only, which
/// `recover=on` through the path will not find. 74 is `EX_IOERR` of sysexits.h.
pub const EXIT_SAVED_INTO_DETACHED_REGION: i32 = 74;

/// Set once a save of this process went into a detached region file (see
/// [`EXIT_SAVED_INTO_DETACHED_REGION`]); one VM per process, so one flag.
static SAVED_INTO_DETACHED_REGION: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// A VM of an NV region, claimed by this process for as long as the value lives.
pub struct NvVm {
    handle: VmHandle,
    config: NvConfig,
    /// How the VM's previous run ended, read before this run was recorded.
    previous_end: NvShutdownKind,
    /// The save this process performed, once it committed.
    last_save: Option<SaveReport>,
}

impl std::fmt::Debug for NvVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NvVm({:?} in {})", self.config.vm, self.config.region)
    }
}

/// How the VM starts over its NV memory.
#[derive(Debug)]
pub enum NvStart {
    /// Load the kernel and boot (a new VM, a powered-off one, or `force-cold=on`).
    ColdBoot,
    /// Load the committed state `seq` and continue the guest where it stopped.
    Resume { state: Box<VmState>, seq: u64 },
}

/// An NV VM with its memory mapped, ready to be built into a [`Vm`] by [`start`].
#[derive(Debug)]
pub struct PreparedVm {
    pub nv: NvVm,
    /// The config the VM runs with (for a recovery: the stored one plus command-line overrides).
    pub config: VmConfig,
    pub memory: GuestMemoryMmap,
    pub start: NvStart,
}

fn nv_error(nv: &NvConfig, error: nv_extension::Error) -> Error {
    Error::Nv {
        context: format!("NV region {}, VM {:?}", nv.region, nv.vm),
        error,
    }
}

fn setup_error(nv: &NvConfig, kind: ErrorKind, reason: impl Into<String>) -> Error {
    Error::NvSetup {
        region: nv.region.clone(),
        vm: nv.vm.clone(),
        reason: reason.into(),
        kind,
    }
}

/// Maps the VM's extent of the region as guest RAM: shared, in place, nothing read.
fn map_memory(nv: &NvConfig, handle: &VmHandle) -> Result<GuestMemoryMmap, Error> {
    let backing = handle.memory_backing().map_err(|e| nv_error(nv, e))?;
    if backing.dax {
        log::info!(
            "NV region {} is DAX: guest RAM mapped MAP_SYNC, persisted by cache write-back",
            nv.region
        );
    }
    guest_memory_from_file(
        backing.file,
        Path::new(&nv.region),
        backing.offset,
        backing.size,
        backing.dax,
    )
}

fn previous_end(summary: &VmSummary) -> NvShutdownKind {
    match summary.state {
        RunRecord::Created => NvShutdownKind::Never,
        RunRecord::Running { .. } if summary.owner_pid.is_some() => NvShutdownKind::Running,
        RunRecord::Running { .. } => NvShutdownKind::Unsafe,
        RunRecord::Saved {
            kind: ShutdownKind::PowerFail,
            ..
        } => NvShutdownKind::PowerFail,
        RunRecord::Saved {
            kind: ShutdownKind::PlannedSuspend,
            ..
        } => NvShutdownKind::Suspend,
        RunRecord::PoweredOff { cause, .. } => match cause {
            StopCause::PowerOff => NvShutdownKind::Clean,
            StopCause::GuestReset => NvShutdownKind::GuestReset,
            StopCause::TripleFault => NvShutdownKind::TripleFault,
        },
    }
}

/// Opens, claims and maps the VM `config.nv` names: a cold boot of `config` or, with
/// `recover=on`, a resume of the stored VM.
pub fn prepare(config: &VmConfig) -> Result<PreparedVm, Error> {
    let nv = config.nv.clone().ok_or(Error::NoVmConfig)?;
    if nv.recover {
        prepare_recovery(&nv, Some(config))
    } else {
        prepare_cold_boot(&nv, config)
    }
}

/// `vm.nv-recover`: the stored VM, exactly as stored, into an empty VMM.
pub fn prepare_api_recovery(request: &NvRecoverConfig) -> Result<PreparedVm, Error> {
    let nv = NvConfig {
        region: request.region.clone(),
        vm: request.vm.clone(),
        recover: true,
        deadline_ms: default_deadline_ms(),
        ..NvConfig::default()
    };
    prepare_recovery(&nv, None)
}

/// An NV VM's RAM is its extent of the region: a memory zone backed by a file of its own cannot be.
fn refuse_zone_files(nv: &NvConfig, config: &VmConfig) -> Result<(), Error> {
    if config
        .memory
        .zones
        .iter()
        .flatten()
        .any(|zone| zone.file.is_some())
    {
        return Err(setup_error(
            nv,
            ErrorKind::InvalidRequest,
            "--memory-zone file= cannot be combined with --nv: the VM's RAM is its extent of the region",
        ));
    }
    Ok(())
}

fn prepare_cold_boot(nv: &NvConfig, config: &VmConfig) -> Result<PreparedVm, Error> {
    let memory_config = &config.memory;
    refuse_zone_files(nv, config)?;
    let memory_size = memory_config.total_size();
    let options = OpenOptions {
        create_if_missing: nv.create,
        format: nv.format,
        region_size: nv.region_size,
        ..OpenOptions::default()
    };
    let region = Region::open(&nv.region, &options).map_err(|e| nv_error(nv, e))?;
    let stored_config = serde_json::to_vec(config).map_err(|e| {
        setup_error(
            nv,
            ErrorKind::Internal,
            format!("serializing the VM config: {e}"),
        )
    })?;
    let summary = match region.vm(&nv.vm) {
        Ok(summary) => {
            if summary.memory_size != memory_size {
                return Err(setup_error(
                    nv,
                    ErrorKind::Conflict,
                    format!(
                        "the VM has {} MiB of RAM in the region, --memory asks for {} MiB",
                        summary.memory_size >> 20,
                        memory_size >> 20
                    ),
                ));
            }
            // A cold boot overwrites memory the saved state belongs to: never do that silently.
            if let Ok(saved) = region.inspect_recovery(&nv.vm) {
                return Err(setup_error(
                    nv,
                    ErrorKind::Conflict,
                    format!(
                        "the VM holds a saved state ({}, seq {}): resume it with recover=on, \
                         or discard it with recover=on,force-cold=on",
                        saved.shutdown_kind, saved.seq
                    ),
                ));
            }
            summary
        }
        Err(nv_extension::Error::VmNotFound(_)) if nv.create => {
            log::info!(
                "creating VM {:?} with {} MiB of RAM in NV region {}",
                nv.vm,
                memory_size >> 20,
                nv.region
            );
            region
                .create_vm(&nv.vm, memory_size, &stored_config)
                .map_err(|e| nv_error(nv, e))?
        }
        Err(nv_extension::Error::VmNotFound(_)) => {
            return Err(setup_error(
                nv,
                ErrorKind::NotFound,
                "no such VM in the region; pass create=on to create it",
            ))
        }
        Err(e) => return Err(nv_error(nv, e)),
    };
    let handle = region.claim_vm(&nv.vm).map_err(|e| nv_error(nv, e))?;
    handle
        .set_config_blob(&stored_config)
        .map_err(|e| nv_error(nv, e))?;
    let memory = map_memory(nv, &handle)?;
    Ok(PreparedVm {
        nv: NvVm {
            handle,
            config: nv.clone(),
            previous_end: previous_end(&summary),
            last_save: None,
        },
        config: config.clone(),
        memory,
        start: NvStart::ColdBoot,
    })
}

/// What a cold boot of `config` over the NV VM running now (`vm.reboot`) would refuse, checked
/// before that VM is stopped: a file-backed memory zone, or a RAM size other than its extent's.
pub fn check_cold_boot(config: &VmConfig, running: &NvVm) -> Result<(), Error> {
    let Some(nv) = config.nv.as_ref() else {
        return Ok(());
    };
    refuse_zone_files(nv, config)?;
    let memory_size = config.memory.total_size();
    if nv.region == running.config.region
        && nv.vm == running.config.vm
        && memory_size != running.memory_size()
    {
        return Err(setup_error(
            nv,
            ErrorKind::Conflict,
            format!(
                "the VM has {} MiB of RAM in the region, --memory asks for {} MiB",
                running.memory_size() >> 20,
                memory_size >> 20
            ),
        ));
    }
    Ok(())
}

/// The stored config with what the recovering command line may change: where the serial port
/// and console go, and the NV options of this run. `command_line` is `None` for `vm.nv-recover`.
fn recovered_config(stored: VmConfig, nv: &NvConfig, command_line: Option<&VmConfig>) -> VmConfig {
    let mut config = stored;
    let stored_deadline = config.nv.as_ref().map(|n| n.deadline_ms);
    let mut nv = nv.clone();
    if let Some(given) = command_line {
        if given.serial != default_serial() {
            config.serial = given.serial.clone();
        }
        if given.console != default_console() {
            config.console = given.console.clone();
        }
    }
    // The deadline is a property of the VM: keep the stored one unless this run sets another.
    if nv.deadline_ms == default_deadline_ms() {
        nv.deadline_ms = stored_deadline.unwrap_or(nv.deadline_ms);
    }
    config.nv = Some(nv);
    config
}

fn prepare_recovery(nv: &NvConfig, command_line: Option<&VmConfig>) -> Result<PreparedVm, Error> {
    if nv.create || nv.format {
        return Err(setup_error(
            nv,
            ErrorKind::InvalidRequest,
            "create=on and format=on do not apply to recover=on",
        ));
    }
    let region = Region::open(&nv.region, &OpenOptions::default()).map_err(|e| nv_error(nv, e))?;
    let summary = region.vm(&nv.vm).map_err(|e| nv_error(nv, e))?;
    let handle = region.claim_vm(&nv.vm).map_err(|e| nv_error(nv, e))?;
    let stored_blob = handle.config_blob().map_err(|e| nv_error(nv, e))?;
    let stored: VmConfig = serde_json::from_slice(&stored_blob).map_err(|e| {
        setup_error(
            nv,
            ErrorKind::Internal,
            format!("the stored VM config is unreadable: {e}"),
        )
    })?;
    let config = recovered_config(stored, nv, command_line);
    config.validate().map_err(|e| {
        setup_error(
            nv,
            ErrorKind::Internal,
            format!("the recovered VM config: {e}"),
        )
    })?;
    if config.memory.total_size() != handle.memory_size() {
        return Err(setup_error(
            nv,
            ErrorKind::Internal,
            format!(
                "the stored config asks for {} bytes of RAM, the region holds {}",
                config.memory.total_size(),
                handle.memory_size()
            ),
        ));
    }
    let start = if nv.force_cold {
        match handle.recover() {
            Ok(saved) => log::warn!(
                "force-cold=on: discarding the saved state ({}, seq {}) and cold-booting",
                saved.shutdown_kind,
                saved.seq
            ),
            Err(e) => log::warn!("force-cold=on: cold-booting over the VM's memory ({e})"),
        }
        NvStart::ColdBoot
    } else {
        let saved = handle.recover().map_err(|e| nv_error(nv, e))?;
        let state: VmState = serde_json::from_slice(&saved.state_blob).map_err(|e| {
            setup_error(
                nv,
                ErrorKind::Internal,
                format!("saved state seq {} is unreadable: {e}", saved.seq),
            )
        })?;
        log::info!(
            "VM {:?}: resuming {} state seq {} ({} bytes)",
            nv.vm,
            saved.shutdown_kind,
            saved.seq,
            saved.state_blob.len()
        );
        NvStart::Resume {
            state: Box::new(state),
            seq: saved.seq,
        }
    };
    let memory = map_memory(nv, &handle)?;
    Ok(PreparedVm {
        nv: NvVm {
            handle,
            config: config.nv.clone().unwrap_or_else(|| nv.clone()),
            previous_end: previous_end(&summary),
            last_save: None,
        },
        config,
        memory,
        start,
    })
}

/// Builds the VM over its NV memory and runs it: boots it, or restores the saved state and
/// resumes. The run is recorded in the region before any guest code runs.
pub fn start(
    prepared: PreparedVm,
    events: Arc<VmEvents>,
    seccomp: SeccompMode,
) -> Result<(Vm, NvVm), Error> {
    let started = Instant::now();
    let PreparedVm {
        nv,
        config,
        memory,
        start,
    } = prepared;
    let mut vm = Vm::new(&config, memory, events, seccomp)?;
    match start {
        NvStart::ColdBoot => {
            nv.begin_run(RunKind::ColdBoot)?;
            vm.boot()?;
            log::info!("VM {:?}: cold boot over NV memory", nv.config.vm);
        }
        NvStart::Resume { state, seq } => {
            vm.restore_state(&state)?;
            // Only now: recording the run destroys the state just loaded, so a failure before
            // this point leaves it resumable.
            nv.begin_run(RunKind::Resume)?;
            vm.resume()?;
            let took = started.elapsed();
            log::info!(
                "VM {:?}: resumed in place from seq {seq} in {} us",
                nv.config.vm,
                took.as_micros()
            );
            event_monitor::nv::recovered(&nv.config.vm, seq, took);
        }
    }
    Ok((vm, nv))
}

impl NvVm {
    pub fn name(&self) -> &str {
        &self.config.vm
    }

    pub fn config(&self) -> &NvConfig {
        &self.config
    }

    pub fn last_save(&self) -> Option<&SaveReport> {
        self.last_save.as_ref()
    }

    fn begin_run(&self, kind: RunKind) -> Result<(), Error> {
        self.handle
            .begin_run(kind)
            .map_err(|e| nv_error(&self.config, e))
    }

    /// Records that the VM stopped without a save (guest power-off, `vm.shutdown`): its next
    /// start is a cold boot, and `recover=on` says there is nothing to recover.
    pub fn mark_powered_off(&self) {
        self.mark_stopped(StopCause::PowerOff);
    }

    /// Records that the VM stopped without a save for `cause` (a clean power-off, or a guest
    /// reset or triple fault the VMM ended on): its next start is a cold boot, and the region's
    /// listing says which.
    pub fn mark_stopped(&self, cause: StopCause) {
        if let Err(e) = self.handle.mark_stopped(cause) {
            log::error!(
                "VM {:?}: recording the stop ({cause}) failed, the VM will look unsafely shut \
                 down: {e}",
                self.config.vm
            );
        }
    }

    /// Guest RAM of this VM in the region, in bytes.
    pub fn memory_size(&self) -> u64 {
        self.handle.memory_size()
    }
}

/// The [`NvHost`] over one [`Vm`] this thread may change (pause it if it runs).
struct VmHost<'a> {
    vm: &'a mut Vm,
    /// False when the VM was already paused (`vm.pause`): vCPUs and disks are quiet already.
    was_running: bool,
}

impl NvHost for VmHost<'_> {
    fn pause_vcpus(&mut self) -> Result<(), nv_extension::HostError> {
        if self.was_running {
            self.vm.vcpus.pause()?;
            // As `Vm::pause`: parked vCPUs make the VM resumable even if a later phase fails.
            self.vm.run_state = VmRunState::Paused;
        }
        Ok(())
    }

    fn quiesce_devices(&mut self) -> Result<(), nv_extension::HostError> {
        if self.was_running {
            // Waits for every request the disks' I/O threads have popped: each one completes
            // (used ring updated) before the state is read, so none is half done.
            self.vm.devices.pause()?;
        }
        self.vm.devices.flush_disks()?;
        Ok(())
    }

    fn guest_memory_ranges(&self) -> Vec<(*const u8, usize)> {
        memory_ranges(self.vm)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, nv_extension::HostError> {
        let state = self.vm.save_state()?;
        Ok(serde_json::to_vec(&state)?)
    }
}

/// The [`NvHost`] over a paused [`Vm`] another thread reads too (a `vm.snapshot` worker): every
/// phase only reads it, so the power-fail save never waits for that thread.
struct PausedVmHost<'a> {
    vm: &'a Vm,
}

impl NvHost for PausedVmHost<'_> {
    fn pause_vcpus(&mut self) -> Result<(), nv_extension::HostError> {
        Ok(())
    }

    fn quiesce_devices(&mut self) -> Result<(), nv_extension::HostError> {
        // Paused: the disks took no request since and finished those they had.
        self.vm.devices.flush_disks()?;
        Ok(())
    }

    fn guest_memory_ranges(&self) -> Vec<(*const u8, usize)> {
        memory_ranges(self.vm)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, nv_extension::HostError> {
        let state = self.vm.save_state()?;
        Ok(serde_json::to_vec(&state)?)
    }
}

fn memory_ranges(vm: &Vm) -> Vec<(*const u8, usize)> {
    vm.memory
        .iter()
        .map(|region| (region.as_ptr() as *const u8, region.len() as usize))
        .collect()
}

/// Saves the running VM in place through the coordinator. On success the VM stays paused and
/// the caller ends the VMM; on failure the previous state is intact, the VM is resumed if it was
/// running, and it keeps running (a retry may succeed; a death now is an unsafe shutdown).
pub fn save(
    nv: &mut NvVm,
    vm: &mut Vm,
    kind: ShutdownKind,
    trigger: &str,
) -> Result<SaveReport, Error> {
    let was_running = vm.run_state == VmRunState::Running;
    let mut host = VmHost {
        vm: &mut *vm,
        was_running,
    };
    let outcome = save_through(nv, &mut host, kind, trigger);
    if outcome.is_err() && was_running && vm.run_state == VmRunState::Paused {
        if let Err(resume) = vm.resume() {
            log::error!("resuming the VM after the failed save: {resume}");
        }
    }
    outcome
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
    save_through(nv, &mut PausedVmHost { vm }, kind, trigger)
}

fn save_through(
    nv: &mut NvVm,
    host: &mut dyn NvHost,
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
        SAVED_INTO_DETACHED_REGION.store(true, std::sync::atomic::Ordering::SeqCst);
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

/// The exit code of a VMM whose VM was saved with `kind`.
pub fn exit_code_after_save(kind: ShutdownKind) -> i32 {
    if SAVED_INTO_DETACHED_REGION.load(std::sync::atomic::Ordering::SeqCst) {
        return EXIT_SAVED_INTO_DETACHED_REGION;
    }
    match kind {
        ShutdownKind::PowerFail => EXIT_POWER_FAIL_SAVED,
        ShutdownKind::PlannedSuspend => crate::vmm::EXIT_CLEAN,
    }
}

fn persistence_mode(mode: PersistenceMode) -> NvPersistenceMode {
    match mode {
        PersistenceMode::DaxFile => NvPersistenceMode::DaxMapSync,
        PersistenceMode::DevDax => NvPersistenceMode::Devdax,
        // Volatile exists only for nv-extension's own tests; a path-opened region is never it.
        PersistenceMode::PlainFile | PersistenceMode::Volatile => NvPersistenceMode::Msync,
    }
}

fn last_save_body(report: &SaveReport) -> NvLastSave {
    NvLastSave {
        sequence: report.seq,
        kind: match report.kind {
            ShutdownKind::PowerFail => NvShutdownKind::PowerFail,
            ShutdownKind::PlannedSuspend => NvShutdownKind::Suspend,
        },
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

/// `GET vm.nv-status` of the VM this VMM runs. The last save is the one this process made, or
/// else the one the region recorded (the save this run recovered from, made by a process that
/// has exited since).
pub fn status(nv: &NvVm) -> Result<NvStatus, Error> {
    let region = nv.handle.region();
    let summary = region
        .vm(&nv.config.vm)
        .map_err(|e| nv_error(&nv.config, e))?;
    let last_save = nv.last_save.as_ref().or(summary.last_save.as_ref());
    Ok(NvStatus {
        region: nv.config.region.clone(),
        persistence_mode: persistence_mode(region.persistence_mode()),
        vm: nv.config.vm.clone(),
        last_save_sequence: summary.last_save_seq,
        shutdown_kind: nv.previous_end,
        deadline_ms: nv.config.deadline_ms,
        last_save: last_save.map(last_save_body),
    })
}

/// `GET vmm.nv-regions?region=PATH`: every VM of a region and how each last ended. Opens the
/// region read-only, after checking that the path names a regular file or a devdax device:
/// nothing is created, formatted, claimed or written.
pub fn region_listing(path: &str) -> Result<NvRegionListing, Error> {
    let context = || format!("NV region {path}");
    let read_only = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let region = Region::open(path, &read_only).map_err(|error| Error::Nv {
        context: context(),
        error,
    })?;
    let vms = region.list_vms().map_err(|error| Error::Nv {
        context: context(),
        error,
    })?;
    Ok(NvRegionListing {
        region: path.to_string(),
        persistence_mode: persistence_mode(region.persistence_mode()),
        size: region.size(),
        vms: vms
            .iter()
            .map(|summary| NvRegionVm {
                name: summary.name.clone(),
                uuid: summary.uuid.to_string(),
                memory_size: summary.memory_size,
                shutdown_kind: previous_end(summary),
                last_save_sequence: summary.last_save_seq,
                resumable: region.inspect_recovery(&summary.name).is_ok(),
                last_save: summary.last_save.as_ref().map(last_save_body),
            })
            .collect(),
    })
}

/// Holds SIGPWR pending in the calling thread and every thread it starts later. The binary calls
/// this first thing in `main`: until the handler is installed ([`install_power_fail_signal`])
/// SIGPWR's default action would kill the process and lose the save, and a UPS daemon may signal
/// a VMM that has only just been started. A signal that arrives meanwhile waits; the control
/// loop takes it when it first waits for events.
pub fn hold_power_fail_signal() -> Result<(), Error> {
    match block_signal(libc::SIGPWR) {
        // Already held (e.g. inherited across exec): exactly what is wanted.
        Ok(()) | Err(vmm_sys_util::signal::Error::SignalAlreadyBlocked(_)) => Ok(()),
        Err(e) => Err(Error::PowerFailSignalMask(e.to_string())),
    }
}

/// Routes SIGPWR (what UPS daemons send when the host runs on battery) to the returned EventFd,
/// which the control loop watches. Replaces SIGPWR's default action, which would kill the VMM.
///
/// SIGPWR stays blocked in the calling thread (the control loop's) and so in every thread it
/// starts (vCPUs, API, workers): the control loop unblocks it only while it waits in
/// `epoll_pwait`. It is therefore only ever delivered to the control loop's thread, never to a
/// vCPU thread that may not run for milliseconds on a busy host: a SIGPWR sent before a SIGTERM
/// has always written its EventFd before the control loop looks at the SIGTERM, so the power
/// failure wins (`docs/recovery.md`, "Signals and long requests"). One held pending by
/// [`hold_power_fail_signal`] is delivered at the control loop's first wait.
pub fn install_power_fail_signal() -> Result<EventFd, Error> {
    let event = route_to_event_fd(&[libc::SIGPWR], "power fail")?;
    hold_power_fail_signal()?;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConsoleConfig, ConsoleOutputMode, MemoryConfig};

    fn nv_config(region: &Path) -> NvConfig {
        NvConfig {
            region: region.display().to_string(),
            vm: "vm0".into(),
            create: true,
            deadline_ms: default_deadline_ms(),
            ..NvConfig::default()
        }
    }

    fn vm_config(nv: NvConfig, memory: u64) -> VmConfig {
        VmConfig {
            memory: MemoryConfig {
                size: memory,
                ..MemoryConfig::default()
            },
            serial: default_serial(),
            console: default_console(),
            nv: Some(nv),
            ..VmConfig::default()
        }
    }

    #[test]
    fn cold_boot_creates_the_vm_and_stores_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let region = dir.path().join("region");
        let config = vm_config(nv_config(&region), 4 << 20);
        let prepared = prepare(&config).unwrap();
        assert!(matches!(prepared.start, NvStart::ColdBoot));
        assert_eq!(
            prepared.memory.iter().map(|r| r.len()).sum::<u64>(),
            4 << 20
        );
        assert_eq!(prepared.nv.previous_end, NvShutdownKind::Never);
        let stored: VmConfig =
            serde_json::from_slice(&prepared.nv.handle.config_blob().unwrap()).unwrap();
        assert_eq!(stored, config);
        // Guest RAM is the region's extent: a store through the mapping lands in the file.
        let host = prepared.memory.iter().next().unwrap().as_ptr();
        // SAFETY: `host` is the start of a live 4 MiB shared mapping owned by `prepared.memory`.
        unsafe { host.write_volatile(0xa5) };
        let backing = prepared.nv.handle.memory_backing().unwrap();
        let mut byte = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&backing.file, &mut byte, backing.offset)
            .unwrap();
        assert_eq!(byte[0], 0xa5);
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let region = dir.path().join("region");
        let message = |config: &VmConfig| prepare(config).unwrap_err().to_string();
        let kind = |config: &VmConfig| prepare(config).unwrap_err().kind();

        let mut missing = nv_config(&region);
        missing.create = false;
        let text = message(&vm_config(missing.clone(), 4 << 20));
        assert!(text.contains("No such file"), "{text}");
        assert_eq!(
            kind(&vm_config(missing.clone(), 4 << 20)),
            ErrorKind::NotFound
        );
        assert!(!region.exists(), "no region is created without create=on");

        drop(prepare(&vm_config(nv_config(&region), 4 << 20)).unwrap());
        missing.vm = "other".into();
        let text = message(&vm_config(missing.clone(), 4 << 20));
        assert!(text.contains("create=on"), "{text}");
        assert_eq!(kind(&vm_config(missing, 4 << 20)), ErrorKind::NotFound);
        let text = message(&vm_config(nv_config(&region), 8 << 20));
        assert!(text.contains("4 MiB of RAM in the region"), "{text}");
        assert_eq!(
            kind(&vm_config(nv_config(&region), 8 << 20)),
            ErrorKind::Conflict
        );

        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, vec![0x5a; 1 << 20]).unwrap();
        let text = message(&vm_config(nv_config(&garbage), 4 << 20));
        assert!(text.contains("format=on"), "{text}");
        assert_eq!(
            kind(&vm_config(nv_config(&garbage), 4 << 20)),
            ErrorKind::InvalidRequest
        );
        assert_eq!(std::fs::read(&garbage).unwrap(), vec![0x5a; 1 << 20]);
        let mut format = nv_config(&garbage);
        format.format = true;
        prepare(&vm_config(format, 4 << 20)).unwrap();
    }

    #[test]
    fn a_reboot_is_checked_against_the_running_vm_before_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let region = dir.path().join("region");
        let prepared = prepare(&vm_config(nv_config(&region), 4 << 20)).unwrap();
        let running = &prepared.nv;
        check_cold_boot(&vm_config(nv_config(&region), 4 << 20), running).unwrap();
        // What a recovering command line without --memory would have asked for (its default).
        let refused =
            check_cold_boot(&vm_config(nv_config(&region), 512 << 20), running).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Conflict);
        assert!(
            refused.to_string().contains("4 MiB of RAM in the region"),
            "{refused}"
        );
        check_cold_boot(&VmConfig::default(), running).unwrap();
    }

    #[test]
    fn a_vm_that_never_saved_is_not_recovered_unless_cold() {
        let dir = tempfile::tempdir().unwrap();
        let region = dir.path().join("region");
        let prepared = prepare(&vm_config(nv_config(&region), 4 << 20)).unwrap();
        prepared.nv.begin_run(RunKind::ColdBoot).unwrap();
        // The process "dies" here: the handle is dropped without a save.
        drop(prepared);
        let mut recover = nv_config(&region);
        recover.create = false;
        recover.recover = true;
        let refused = prepare(&vm_config(recover.clone(), 4 << 20)).unwrap_err();
        let text = refused.to_string();
        assert!(
            text.contains("unsafe shutdown — state incomplete"),
            "{text}"
        );
        assert_eq!(refused.kind(), ErrorKind::Conflict);
        recover.force_cold = true;
        let prepared = prepare(&vm_config(recover, 4 << 20)).unwrap();
        assert!(matches!(prepared.start, NvStart::ColdBoot));
        assert_eq!(prepared.nv.previous_end, NvShutdownKind::Unsafe);
    }

    #[test]
    fn recovery_keeps_the_stored_config_and_takes_the_serial_override() {
        let stored = VmConfig {
            serial: ConsoleConfig {
                mode: ConsoleOutputMode::File,
                file: Some("/old".into()),
                socket: None,
                iommu: false,
            },
            nv: Some(NvConfig {
                deadline_ms: 200,
                ..NvConfig::default()
            }),
            ..VmConfig::default()
        };
        let recover = NvConfig {
            region: "/r".into(),
            vm: "a".into(),
            recover: true,
            deadline_ms: default_deadline_ms(),
            ..NvConfig::default()
        };
        let kept = recovered_config(stored.clone(), &recover, None);
        assert_eq!(kept.serial, stored.serial);
        assert_eq!(kept.nv.as_ref().unwrap().deadline_ms, 200);
        assert!(kept.nv.as_ref().unwrap().recover);
        let command_line = VmConfig {
            serial: ConsoleConfig {
                mode: ConsoleOutputMode::File,
                file: Some("/new".into()),
                socket: None,
                iommu: false,
            },
            console: default_console(),
            ..VmConfig::default()
        };
        let overridden = recovered_config(stored, &recover, Some(&command_line));
        assert_eq!(overridden.serial.file.as_deref(), Some("/new"));
    }
}
