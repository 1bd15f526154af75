//! Opening an NV VM for a run: open (or create) its region, claim the VM, map its RAM from the
//! region's extent, reconcile the stored config with what this run asks, then build the
//! [`Vm`] over that memory and boot it or resume its saved state in place.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nv_extension::{MemoryBacking, OpenOptions, Region, RunKind, VmHandle};
use vm_memory::GuestMemoryMmap;

use super::{nv_error, setup_error, NvVm};
use crate::api::{NvRecoverConfig, NvShutdownKind};
use crate::config::{
    default_console, default_deadline_ms, default_serial, NvConfig, SeccompMode, VmConfig,
};
use crate::event_monitor;
use crate::events::VmEvents;
use crate::kvm_vm::EarlyKvmVm;
use crate::memory::guest_memory_from_file;
use crate::recovery_ahead::RecoveryAhead;
use crate::startup_phases::PhaseClock;
use crate::state::VmState;
use crate::vm::Vm;
use crate::{Error, ErrorKind};

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
    /// The phases of the start so far (a recovery's breakdown, see `startup_phases`).
    pub phases: PhaseClock,
    /// A recovery's KVM VM, created and given `memory` on a thread of its own while the
    /// region was opened and the config and state parsed (`None`: built in line by [`start`]).
    pub early_vm: Option<EarlyKvmVm>,
}

/// Maps the VM's extent of the region as guest RAM: shared, in place, nothing read.
fn map_memory(nv: &NvConfig, handle: &VmHandle) -> Result<GuestMemoryMmap, Error> {
    map_backing(nv, handle.memory_backing().map_err(|e| nv_error(nv, e))?)
}

fn map_backing(nv: &NvConfig, backing: MemoryBacking) -> Result<GuestMemoryMmap, Error> {
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

/// Guest RAM a recovery mapped from the region's directory before its claim, and where from.
/// Nothing may run on it until the claim has confirmed the place ([`MappedAhead::confirmed`]).
#[derive(Debug)]
pub(crate) struct MappedAhead {
    memory: GuestMemoryMmap,
    offset: u64,
    size: u64,
    dax: bool,
}

impl MappedAhead {
    /// Maps VM `nv.vm`'s extent as the directory gives it, without claiming the VM. `None` if
    /// the directory does not give one (a swapped-out VM, no such VM, ...) or it cannot be
    /// mapped: the claim, or the mapping after it, then reports the error exactly as without
    /// this step.
    pub(crate) fn map(nv: &NvConfig, region: &Region) -> Option<MappedAhead> {
        let backing = region.memory_backing_unclaimed(&nv.vm).ok()?;
        let (offset, size, dax) = (backing.offset, backing.size, backing.dax);
        let memory = map_backing(nv, backing).ok()?;
        Some(MappedAhead {
            memory,
            offset,
            size,
            dax,
        })
    }

    /// Gives the mapping to `vm`, whose thread registers it once the KVM VM exists.
    pub(crate) fn hand_to(&self, vm: &EarlyKvmVm) {
        vm.register(&self.memory);
    }

    /// The mapping (a clone: it shares the mappings), for a thread that registers it itself.
    pub(crate) fn guest_memory(&self) -> GuestMemoryMmap {
        self.memory.clone()
    }

    /// The mapping, if it is of the very extent the claimed `handle` owns; `None` (and the
    /// mapping dropped) if the directory changed between the read and the claim.
    fn confirmed(self, nv: &NvConfig, handle: &VmHandle) -> Result<Option<GuestMemoryMmap>, Error> {
        let claimed = handle.memory_backing().map_err(|e| nv_error(nv, e))?;
        if (claimed.offset, claimed.size, claimed.dax) == (self.offset, self.size, self.dax) {
            return Ok(Some(self.memory));
        }
        log::warn!(
            "VM {:?}: its extent moved between the directory read and the claim \
             ({:#x}+{:#x} -> {:#x}+{:#x}); mapping it again",
            nv.vm,
            self.offset,
            self.size,
            claimed.offset,
            claimed.size
        );
        Ok(None)
    }
}

/// Opens, claims and maps the VM `config.nv` names: a cold boot of `config` or, with
/// `recover=on`, a resume of the stored VM. `seccomp`: the mode the VM's vCPU threads will run
/// under. A recovery builds its KVM VM on what `ahead` began if the caller started it (see
/// [`RecoveryAhead`]), otherwise it starts the VM here; anything else drops it.
pub fn prepare(
    config: &VmConfig,
    seccomp: SeccompMode,
    ahead: Option<RecoveryAhead>,
) -> Result<PreparedVm, Error> {
    let phases = PhaseClock::since_process_start();
    let nv = config.nv.clone().ok_or(Error::NoVmConfig)?;
    if let Some(file) = &nv.swap_in {
        let mut progress = super::swap::SwapProgressCell::new(super::swap::Direction::In);
        super::swap::prepare_swap_in(&nv, Path::new(file), Some(config), &mut progress)
    } else if nv.recover {
        prepare_recovery(&nv, Some(config), phases, seccomp, ahead)
    } else {
        prepare_cold_boot(&nv, config)
    }
}

/// `vm.nv-recover`: the stored VM, exactly as stored, into an empty VMM.
pub fn prepare_api_recovery(
    request: &NvRecoverConfig,
    seccomp: SeccompMode,
) -> Result<PreparedVm, Error> {
    let nv = NvConfig {
        region: request.region.clone(),
        vm: request.vm.clone(),
        recover: true,
        deadline_ms: default_deadline_ms(),
        ..NvConfig::default()
    };
    prepare_recovery(&nv, None, PhaseClock::new(), seccomp, None)
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
            let reserve = if nv.sparse {
                nv_extension::MemoryReservation::Sparse
            } else {
                nv_extension::MemoryReservation::Allocated
            };
            region
                .create_vm_with(&nv.vm, memory_size, &stored_config, reserve)
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
            previous_end: (&summary).into(),
            last_save: None,
            recovery: None,
        },
        config: config.clone(),
        memory,
        start: NvStart::ColdBoot,
        phases: PhaseClock::new(),
        early_vm: None,
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
    let stored_checkpoint_ms = config.nv.as_ref().and_then(|n| n.checkpoint_ms);
    let mut nv = nv.clone();
    if let Some(given) = command_line {
        if given.serial != default_serial() {
            config.serial = given.serial.clone();
        }
        if given.console != default_console() {
            config.console = given.console.clone();
        }
        // The taps may be handed over anew (`--net fd=`, the old descriptors died with the old
        // process) or named anew, by position; the rest of each device (MAC, queues) is the
        // guest's and stays as stored.
        for (stored, given) in config
            .net
            .iter_mut()
            .flatten()
            .zip(given.net.iter().flatten())
        {
            if given.fds.is_some() || given.tap.is_some() {
                stored.fds = given.fds.clone();
                stored.tap = given.tap.clone();
            }
        }
    }
    // The deadline is a property of the VM: keep the stored one unless this run sets another.
    if nv.deadline_ms == default_deadline_ms() {
        nv.deadline_ms = stored_deadline.unwrap_or(nv.deadline_ms);
    }
    // So is the checkpoint interval: a VM recovered from a checkpoint goes on checkpointing.
    if nv.checkpoint_ms.is_none() {
        nv.checkpoint_ms = stored_checkpoint_ms;
    }
    config.nv = Some(nv);
    config
}

fn prepare_recovery(
    nv: &NvConfig,
    command_line: Option<&VmConfig>,
    mut phases: PhaseClock,
    seccomp: SeccompMode,
    ahead: Option<RecoveryAhead>,
) -> Result<PreparedVm, Error> {
    if nv.create || nv.format {
        return Err(setup_error(
            nv,
            ErrorKind::InvalidRequest,
            "create=on and format=on do not apply to recover=on",
        ));
    }
    // The KVM VM is created meanwhile (nothing that can run the guest: its vCPUs come after
    // the claim), and given the RAM as soon as it is mapped (`kvm_vm`). The binary may have
    // begun both, and opened the region, before the VMM set itself up (`recovery_ahead`).
    let (early_vm, region_ahead, mapped_ahead) = match ahead {
        Some(ahead) => ahead.into_parts(nv, seccomp)?,
        None => (EarlyKvmVm::start(seccomp)?, None, None),
    };
    let region = match region_ahead {
        Some(region) => region,
        None => Region::open(&nv.region, &OpenOptions::default()).map_err(|e| nv_error(nv, e))?,
    };
    let summary = region.vm(&nv.vm).map_err(|e| nv_error(nv, e))?;
    // The RAM is mapped from the directory and its registration begun before the claim, so
    // that it overlaps the claim and the parsing. Safe without the claim: a mapping and a
    // memory slot read nothing, and the VM has no vCPU until the claim confirmed the extent. A
    // failed claim drops both (its error is the one reported, as before).
    let mapped_ahead = mapped_ahead.or_else(|| {
        let mapped = MappedAhead::map(nv, &region);
        if let Some(mapped) = &mapped {
            mapped.hand_to(&early_vm);
        }
        mapped
    });
    let handle = region.claim_vm(&nv.vm).map_err(|e| nv_error(nv, e))?;
    phases.mark("region-open-claim");
    prepare_claimed_timed(
        nv,
        (&summary).into(),
        handle,
        command_line,
        phases,
        Some(early_vm),
        mapped_ahead,
    )
}

/// The in-place recovery of a VM this process has claimed already (`recover=on`, or a swap-in
/// that just made it resident): its stored config with this run's overrides, its committed
/// state, its memory mapped. `previous_end`: how its last run ended, for `vm.nv-status`.
pub(super) fn prepare_claimed(
    nv: &NvConfig,
    previous_end: NvShutdownKind,
    handle: VmHandle,
    command_line: Option<&VmConfig>,
) -> Result<PreparedVm, Error> {
    prepare_claimed_timed(
        nv,
        previous_end,
        handle,
        command_line,
        PhaseClock::new(),
        None,
        None,
    )
}

/// [`prepare_claimed`] continuing the phases `phases` began; the RAM goes to `early_vm` (if
/// any) as soon as it is mapped, so its registration overlaps the parsing of config and state.
/// `mapped_ahead`: the RAM as mapped (and given to `early_vm`) before the claim.
fn prepare_claimed_timed(
    nv: &NvConfig,
    previous_end: NvShutdownKind,
    handle: VmHandle,
    command_line: Option<&VmConfig>,
    mut phases: PhaseClock,
    early_vm: Option<EarlyKvmVm>,
    mapped_ahead: Option<MappedAhead>,
) -> Result<PreparedVm, Error> {
    // Mapping reads nothing (`map_memory`); the size is checked against the config below.
    // Mapped ahead, this phase is only the claim's confirmation of the place.
    let (memory, early_vm) = match mapped_ahead {
        Some(ahead) => match ahead.confirmed(nv, &handle)? {
            Some(memory) => (memory, early_vm),
            // `early_vm` was given the stale mapping: the VM is built in line instead.
            None => (map_memory(nv, &handle)?, None),
        },
        None => {
            let memory = map_memory(nv, &handle)?;
            if let Some(early_vm) = &early_vm {
                early_vm.register(&memory);
            }
            (memory, early_vm)
        }
    };
    phases.mark("memory-map");
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
    phases.mark("config-parse");
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
        // A rollback to a checkpoint epoch also writes the epoch's old disk bytes back.
        let saved = handle
            .recover_with_disks(&mut super::disk_undo::ConfiguredDisks::new(&config))
            .map_err(|e| nv_error(nv, e))?;
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
    phases.mark("state-read");
    Ok(PreparedVm {
        nv: NvVm {
            handle,
            config: config.nv.clone().unwrap_or_else(|| nv.clone()),
            previous_end,
            last_save: None,
            recovery: None,
        },
        config,
        memory,
        start,
        phases,
        early_vm,
    })
}

/// Builds the VM over its NV memory and runs it: boots it, or restores the saved state and
/// resumes. The run is recorded in the region before any guest code runs.
pub fn start(
    prepared: PreparedVm,
    events: Arc<VmEvents>,
    seccomp: SeccompMode,
    checkpoints: &mut super::Checkpoints,
) -> Result<(Vm, NvVm), Error> {
    let started = Instant::now();
    let PreparedVm {
        mut nv,
        config,
        memory,
        start,
        mut phases,
        early_vm,
    } = prepared;
    let layout = match &start {
        NvStart::Resume { state, .. } => state.devices.restore_layout(),
        NvStart::ColdBoot => Default::default(),
    };
    let mut vm = match early_vm {
        // Its slots point at the same mappings as `memory` (a clone), which the VM keeps.
        Some(early_vm) => {
            drop(memory);
            // The state it is built to take (below): its vCPUs get theirs as soon as they exist.
            let restoring = match &start {
                NvStart::Resume { state, .. } => Some(&**state),
                NvStart::ColdBoot => None,
            };
            Vm::new_on_early(
                early_vm,
                &config,
                &layout,
                restoring,
                events,
                seccomp,
                &mut phases,
            )?
        }
        None => Vm::new_timed(&config, &layout, memory, events, seccomp, &mut phases)?,
    };
    match start {
        NvStart::ColdBoot => {
            nv.begin_run(RunKind::ColdBoot)?;
            vm.boot()?;
            if let Some(interval) = nv.config.checkpoint_ms.filter(|ms| *ms > 0) {
                checkpoints.set_interval(&nv, &mut vm, Duration::from_millis(interval))?;
            }
            log::info!("VM {:?}: cold boot over NV memory", nv.config.vm);
        }
        NvStart::Resume { state, seq } => {
            vm.restore_state(&state)?;
            phases.mark("state-restore");
            // Only now: recording the run destroys the state just loaded, so a failure before
            // this point leaves it resumable.
            // With checkpoints the run begins with the resumed state as its first epoch and
            // guest RAM write-protected: from the guest's first instruction on, a failure
            // without warning finds an epoch to roll back to.
            match nv.config.checkpoint_ms.filter(|ms| *ms > 0) {
                Some(interval) => {
                    checkpoints.begin_resumed_run(&nv, &vm, Duration::from_millis(interval))?
                }
                None => nv.begin_run(RunKind::Resume)?,
            }
            phases.mark("record-run");
            vm.resume_timed(&mut phases)?;
            let took = phases.last_mark().saturating_duration_since(started);
            log::info!(
                "VM {:?}: resumed in place from seq {seq} in {} us{}: {}",
                nv.config.vm,
                took.as_micros(),
                if phases.from_process_start() {
                    format!(" ({} us from exec)", phases.total().as_micros())
                } else {
                    String::new()
                },
                phases.describe()
            );
            event_monitor::nv::recovered(&nv.config.vm, seq, took);
            nv.recovery = Some(phases);
        }
    }
    Ok((vm, nv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NvShutdownKind;
    use crate::config::{ConsoleConfig, ConsoleOutputMode, MemoryConfig};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    fn nv_config(region: &Path) -> NvConfig {
        NvConfig {
            region: region.display().to_string(),
            vm: "vm0".into(),
            create: true,
            deadline_ms: default_deadline_ms(),
            ..NvConfig::default()
        }
    }

    /// `vm0` of 4 MiB created in the region at `region` (the region too, if it is new).
    fn created_vm(region: &Path) -> PreparedVm {
        prepare(
            &vm_config(nv_config(region), 4 << 20),
            SeccompMode::Disabled,
            None,
        )
        .unwrap()
    }

    /// `--nv` for the in-place recovery of `vm0` in the region at `region`.
    fn recovery_config(region: &Path) -> NvConfig {
        NvConfig {
            create: false,
            recover: true,
            ..nv_config(region)
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
        let prepared = prepare(&config, SeccompMode::Disabled, None).unwrap();
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
        let message = |config: &VmConfig| {
            prepare(config, SeccompMode::Disabled, None)
                .unwrap_err()
                .to_string()
        };
        let kind = |config: &VmConfig| {
            prepare(config, SeccompMode::Disabled, None)
                .unwrap_err()
                .kind()
        };

        let mut missing = nv_config(&region);
        missing.create = false;
        let text = message(&vm_config(missing.clone(), 4 << 20));
        assert!(text.contains("No such file"), "{text}");
        assert_eq!(
            kind(&vm_config(missing.clone(), 4 << 20)),
            ErrorKind::NotFound
        );
        assert!(!region.exists(), "no region is created without create=on");

        drop(created_vm(&region));
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
        prepare(&vm_config(format, 4 << 20), SeccompMode::Disabled, None).unwrap();
    }

    #[test]
    fn a_reboot_is_checked_against_the_running_vm_before_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let region = dir.path().join("region");
        let prepared = created_vm(&region);
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
        let prepared = created_vm(&region);
        prepared.nv.begin_run(RunKind::ColdBoot).unwrap();
        // The process "dies" here: the handle is dropped without a save.
        drop(prepared);
        let mut recover = recovery_config(&region);
        let refused = prepare(
            &vm_config(recover.clone(), 4 << 20),
            SeccompMode::Disabled,
            None,
        )
        .unwrap_err();
        let text = refused.to_string();
        assert!(
            text.contains("unsafe shutdown — state incomplete"),
            "{text}"
        );
        assert_eq!(refused.kind(), ErrorKind::Conflict);
        recover.force_cold = true;
        let prepared = prepare(&vm_config(recover, 4 << 20), SeccompMode::Disabled, None).unwrap();
        assert!(matches!(prepared.start, NvStart::ColdBoot));
        assert_eq!(prepared.nv.previous_end, NvShutdownKind::Unsafe);
    }

    /// The RAM is mapped, and handed to the KVM VM being built, before the claim; a claim
    /// that fails afterwards (here: the VM belongs to a live process) still refuses with the
    /// very error it gave before, and leaves the region as it was, byte for byte.
    #[test]
    fn a_claim_refused_after_the_ram_was_mapped_ahead_reports_the_same_error() {
        let dir = tempfile::tempdir().unwrap();
        let region_path = dir.path().join("region");
        let owner = created_vm(&region_path);
        let recover = recovery_config(&region_path);
        // What the recovery does before its claim succeeds on a VM owned by someone else.
        let region = Region::open(&recover.region, &OpenOptions::default()).unwrap();
        assert!(MappedAhead::map(&recover, &region).is_some());
        drop(region);
        let before = std::fs::read(&region_path).unwrap();
        // Also as the binary does it: the VM started and the region opened and mapped from
        // the raw arguments before anything else (`recovery_ahead`).
        let from_arguments = || begun_by_main(&region_path);
        for ahead in [
            None,
            Some(RecoveryAhead::with_vm(
                EarlyKvmVm::start(SeccompMode::Disabled).unwrap(),
            )),
            Some(from_arguments()),
        ] {
            let refused = prepare(
                &vm_config(recover.clone(), 4 << 20),
                SeccompMode::Disabled,
                ahead,
            )
            .unwrap_err();
            let expected = nv_error(
                &recover,
                nv_extension::Error::OwnedByLiveProcess {
                    vm: "vm0".into(),
                    pid: std::process::id(),
                },
            );
            assert_eq!(refused.to_string(), expected.to_string());
            assert_eq!(refused.kind(), ErrorKind::Conflict);
            assert!(std::fs::read(&region_path).unwrap() == before);
        }
        drop(owner);
    }

    /// What the binary's `main` begins for `--nv region=<region_path>,vm=vm0,recover=on
    /// --seccomp false` (`recovery_ahead`): the VM started, the region opened and the RAM mapped.
    fn begun_by_main(region_path: &Path) -> RecoveryAhead {
        let arguments: Vec<std::ffi::OsString> = [
            "--nv",
            &format!("region={},vm=vm0,recover=on", region_path.display()),
            "--seccomp",
            "false",
        ]
        .iter()
        .map(Into::into)
        .collect();
        RecoveryAhead::start(&arguments).unwrap()
    }

    /// What the binary's `main` begins from the raw arguments (the VM, the region opened, the
    /// RAM mapped and handed over) is used only by a recovery of that same VM under the same
    /// seccomp mode: otherwise the region and the mapping are dropped (and a new KVM VM
    /// started).
    #[test]
    fn what_main_began_is_used_only_by_a_recovery_of_the_same_vm() {
        let dir = tempfile::tempdir().unwrap();
        let region_path = dir.path().join("region");
        drop(created_vm(&region_path));
        let begin = || begun_by_main(&region_path);
        let mut recover = recovery_config(&region_path);
        let (_, region, mapped) = begin().into_parts(&recover, SeccompMode::Disabled).unwrap();
        assert!(region.is_some() && mapped.is_some());
        // Begun under `--seccomp false`, asked for under another mode: the threads would run
        // under the wrong filter, so nothing is used.
        let (_, region, mapped) = begin().into_parts(&recover, SeccompMode::Log).unwrap();
        assert!(region.is_none() && mapped.is_none());
        recover.vm = "vm1".into();
        let (_, region, mapped) = begin().into_parts(&recover, SeccompMode::Disabled).unwrap();
        assert!(region.is_none() && mapped.is_none());
    }

    /// A region that the `vm-create` thread could not open ahead (here: it does not exist) is
    /// opened again by the recovery, which reports the error it always reported.
    #[test]
    fn a_region_that_failed_to_open_ahead_fails_where_it_always_did() {
        let dir = tempfile::tempdir().unwrap();
        let region_path = dir.path().join("missing");
        let recover = recovery_config(&region_path);
        let failure = |ahead| {
            let error = prepare(
                &vm_config(recover.clone(), 4 << 20),
                SeccompMode::Disabled,
                ahead,
            )
            .unwrap_err();
            (error.to_string(), error.kind())
        };
        let expected = failure(None);
        assert!(expected.0.contains("No such file"), "{}", expected.0);
        assert_eq!(failure(Some(begun_by_main(&region_path))), expected);
        assert!(!region_path.exists());
    }

    /// A mapping made from the directory is used only if the claim confirms its place: one of
    /// another extent (the directory changed in between) is dropped, and the recovery maps the
    /// claimed extent anew.
    #[test]
    fn a_mapping_ahead_is_used_only_for_the_extent_the_claim_confirms() {
        let dir = tempfile::tempdir().unwrap();
        let region_path = dir.path().join("region");
        drop(created_vm(&region_path));
        let nv = nv_config(&region_path);
        let region = Region::open(&nv.region, &OpenOptions::default()).unwrap();
        let ahead = MappedAhead::map(&nv, &region).unwrap();
        let mapped_at = ahead.memory.iter().next().unwrap().as_ptr();
        let handle = region.claim_vm(&nv.vm).unwrap();
        let confirmed = ahead.confirmed(&nv, &handle).unwrap().unwrap();
        assert_eq!(confirmed.iter().next().unwrap().as_ptr(), mapped_at);

        let mut moved = MappedAhead::map(&nv, &region).unwrap();
        moved.offset += 2 << 20;
        assert!(moved.confirmed(&nv, &handle).unwrap().is_none());
    }

    /// The binary starts the KVM VM ahead only for an in-place recovery.
    #[test]
    fn a_vm_is_started_ahead_only_for_a_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let mut nv = nv_config(&dir.path().join("region"));
        assert!(
            EarlyKvmVm::start_for(&vm_config(nv.clone(), 4 << 20), SeccompMode::Disabled).is_none()
        );
        assert!(EarlyKvmVm::start_for(&VmConfig::default(), SeccompMode::Disabled).is_none());
        nv.create = false;
        nv.recover = true;
        assert!(
            EarlyKvmVm::start_for(&vm_config(nv.clone(), 4 << 20), SeccompMode::Disabled).is_some()
        );
        nv.swap_in = Some("/swap".into());
        assert!(EarlyKvmVm::start_for(&vm_config(nv, 4 << 20), SeccompMode::Disabled).is_none());
    }

    fn serial_to_file(path: &str) -> ConsoleConfig {
        ConsoleConfig {
            mode: ConsoleOutputMode::File,
            file: Some(path.into()),
            socket: None,
            iommu: false,
        }
    }

    #[test]
    fn recovery_keeps_the_stored_config_and_takes_the_serial_override() {
        let stored = VmConfig {
            serial: serial_to_file("/old"),
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
        let checkpointed = VmConfig {
            nv: Some(NvConfig {
                checkpoint_ms: Some(10),
                ..NvConfig::default()
            }),
            ..VmConfig::default()
        };
        let recovered = recovered_config(checkpointed.clone(), &recover, None);
        assert_eq!(recovered.nv.as_ref().unwrap().checkpoint_ms, Some(10));
        let turned_off = NvConfig {
            checkpoint_ms: Some(0),
            ..recover.clone()
        };
        let recovered = recovered_config(checkpointed, &turned_off, None);
        assert_eq!(recovered.nv.as_ref().unwrap().checkpoint_ms, Some(0));
        assert!(kept.nv.as_ref().unwrap().recover);
        let command_line = VmConfig {
            serial: serial_to_file("/new"),
            console: default_console(),
            ..VmConfig::default()
        };
        let overridden = recovered_config(stored, &recover, Some(&command_line));
        assert_eq!(overridden.serial.file.as_deref(), Some("/new"));
    }
}
