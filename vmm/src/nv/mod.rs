//! Everything NV in the VMM, one file per concern:
//!
//! - `prepare` ([`prepare()`], [`start`]): open (or create) the VM in its NV region, claim it,
//!   map its RAM from the region's extent, reconcile the stored config with the command line,
//!   and start it cold or resume its saved state in place;
//! - `host`: the [`nv_extension::NvHost`] over a [`crate::Vm`] (pause through `Vm`'s one pause
//!   path, drain and fdatasync disks, `Vm::save_state`);
//! - `save` ([`save()`], [`save_paused`]): the power-fail and planned-suspend saves through
//!   `nv_extension::save_vm`;
//! - `swap` ([`swap_out`], [`prepare_api_swap_in`]): moving a VM to a swap file and back;
//! - here: the claimed VM ([`NvVm`]) and the NV answers of the API (built by the conversions in
//!   `api/nv_bodies.rs`).
//!
//! The region layout stays inside `nv-extension`: this module only asks it for a VM handle, the
//! (file, offset, size) of the VM's RAM, the config and state blobs. The power-fail path reads
//! top-down: SIGPWR or `vm.power-fail` -> control loop (`vmm.rs`) -> [`save()`] ->
//! `nv_extension::save_vm` -> `host::VmHost` -> region commit. Nothing here depends on the
//! control loop. `docs/recovery.md` explains the sequence, the clock and the exit codes.

mod block_choice;
mod checkpoint;
mod disk_undo;
mod host;
mod measurement_overrides;
mod prepare;
mod save;
mod swap;

use nv_extension::{OpenOptions, Region, RunKind, SaveReport, StopCause, VmHandle};

use vm_memory::GuestMemoryMmap;

use crate::api::{
    NvCheckpointStatus, NvLastSave, NvMemoryMapping, NvRecoveryTimings, NvRegionListing,
    NvRegionVm, NvShutdownKind, NvStatus, NvSwapFile,
};
use crate::config::NvConfig;
use crate::startup_phases::PhaseClock;
use crate::{Error, ErrorKind};

pub use checkpoint::Checkpoints;
pub(crate) use prepare::MappedAhead;
pub use prepare::{check_cold_boot, prepare, prepare_api_recovery, start, NvStart, PreparedVm};
pub use save::{describe_save, save, save_paused};
pub use swap::{
    check_swap_out_destination, prepare_api_swap_in, resume_after_failed_swap_out, swap_out,
    SwapProgressCell, SwapWatch,
};

/// Exit code of a VMM whose VM was saved by a power-fail save: "state saved, powered off".
/// 75 is `EX_TEMPFAIL` of sysexits.h: the VM is not gone, it waits for `recover=on`.
pub const EXIT_POWER_FAIL_SAVED: i32 = 75;

/// Exit code of a VMM whose save committed into a region file that its path no longer names
/// (deleted, renamed or replaced while the VM ran): the state is in that file only, which
/// `recover=on` through the path will not find. 74 is `EX_IOERR` of sysexits.h.
pub const EXIT_SAVED_INTO_DETACHED_REGION: i32 = 74;

/// A VM of an NV region, claimed by this process for as long as the value lives.
pub struct NvVm {
    handle: VmHandle,
    config: NvConfig,
    /// How the VM's previous run ended, read before this run was recorded.
    previous_end: NvShutdownKind,
    /// The save this process performed, once it committed.
    last_save: Option<SaveReport>,
    /// Where this run's in-place recovery spent its time (a resumed VM only).
    recovery: Option<PhaseClock>,
}

impl std::fmt::Debug for NvVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NvVm({:?} in {})", self.config.vm, self.config.region)
    }
}

/// Replaces the config stored with the VM in its region (a device was hotplugged or ejected):
/// a recovery then builds the VM with the devices it has now.
pub fn store_config(nv_vm: &NvVm, config: &crate::config::VmConfig) -> Result<(), Error> {
    let blob = serde_json::to_vec(config)
        .map_err(|e| Error::State(format!("serializing the VM config: {e}")))?;
    nv_vm
        .handle
        .set_config_blob(&blob)
        .map_err(|e| nv_error(&nv_vm.config, e))
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

/// `GET vm.nv-status` of the VM this VMM runs. The last save is the one this process made, or
/// else the one the region recorded (the save this run recovered from, made by a process that
/// has exited since). `memory`, the running VM's RAM, adds how the host maps it.
pub fn status(
    nv: &NvVm,
    memory: Option<&GuestMemoryMmap>,
    checkpoint: Option<NvCheckpointStatus>,
) -> Result<NvStatus, Error> {
    let region = nv.handle.region();
    let summary = region
        .vm(&nv.config.vm)
        .map_err(|e| nv_error(&nv.config, e))?;
    let last_save = nv.last_save.as_ref().or(summary.last_save.as_ref());
    Ok(NvStatus {
        region: nv.config.region.clone(),
        persistence_mode: region.persistence_mode().into(),
        vm: nv.config.vm.clone(),
        last_save_sequence: summary.last_save_seq,
        shutdown_kind: nv.previous_end,
        deadline_ms: nv.config.deadline_ms,
        last_save: last_save.map(NvLastSave::from),
        swap: None,
        recovery: nv.recovery.as_ref().map(NvRecoveryTimings::from),
        memory_mapping: memory.and_then(memory_mapping),
        checkpoint,
    })
}

/// The huge-page facts of `memory`; `None` (logged) if `/proc/self/smaps` cannot be read.
fn memory_mapping(memory: &GuestMemoryMmap) -> Option<NvMemoryMapping> {
    match crate::memory::huge_page_report(memory) {
        Ok(report) => Some(NvMemoryMapping {
            aligned_2m: report.aligned,
            thp_advised: report.advised,
            huge_page_bytes: report.huge_page_bytes,
        }),
        Err(e) => {
            log::warn!("reading /proc/self/smaps for vm.nv-status: {e}");
            None
        }
    }
}

/// `GET vmm.nv-regions?region=PATH` (and `ch-remote nv-persist list` without a socket): every VM
/// of a region, its state, owner and how it last ended, and the region's free space. Opens the
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
    let (vms, free) = region
        .list_vms()
        .and_then(|vms| Ok((vms, region.free_space()?)))
        .map_err(|error| Error::Nv {
            context: context(),
            error,
        })?;
    Ok(NvRegionListing {
        region: path.to_string(),
        persistence_mode: region.persistence_mode().into(),
        size: region.size(),
        free_bytes: free.free_bytes,
        largest_free_extent: free.largest_free_extent,
        vms: vms
            .iter()
            .map(|summary| NvRegionVm {
                name: summary.name.clone(),
                uuid: summary.uuid.to_string(),
                memory_size: summary.memory_size,
                state: summary.status().to_string(),
                owner_pid: summary.owner_pid,
                shutdown_kind: summary.into(),
                last_save_sequence: summary.last_save_seq,
                resumable: region.inspect_recovery(&summary.name).is_ok(),
                last_save: summary.last_save.as_ref().map(NvLastSave::from),
                swap_file: summary.swap.as_ref().map(|record| NvSwapFile {
                    path: record.path.display().to_string(),
                    file_size: record.file_size,
                }),
            })
            .collect(),
    })
}
