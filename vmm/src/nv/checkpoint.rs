//! Continuous epoch checkpoints of an NV VM (`--nv ...,checkpoint_ms=N`,
//! `PUT vm.nv-checkpoint`). Every interval the control loop asks the coordinator for one epoch
//! (`nv_extension::checkpoint_vm`), which walks [`CheckpointHost`]: pause the vCPUs, quiesce the
//! devices, save the volatile state, commit the epoch, write-protect guest RAM again, resume.
//! Between two checkpoints the [`WriteTracker`]'s thread hands every page the guest (or a device
//! thread) writes for the first time in the epoch to the region's undo log
//! (`UndoLog::record_undo`, durable before the write goes on), so that a VMM killed without
//! warning is recovered to the last epoch by `recover=on`. Each in-process disk gets a
//! [`DiskUndoHook`] (`disk_undo.rs`): before the device writes, the old bytes go into the same
//! undo log (`UndoLog::record_disk_write`), and a recovery writes them back
//! ([`super::disk_undo::ConfiguredDisks`]), so the disk matches the rolled-back memory; a disk
//! whose writes the VMM does not see (vhost-user) is refused. `docs/checkpoints.md` has the design and the measured costs.
//!
//! Output commit: while checkpoints are on, the VM's virtio-net devices hold the frames the
//! guest transmits in their [`OutputHold`]; the running epoch is sealed once the devices are
//! quiet for a checkpoint, and its frames go to the taps only after that checkpoint committed.
//! A client therefore never sees an answer that a rollback could take back.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devices::virtio::{
    BeforeWrite, BlockWriteHookSlot, GuestWriteGate, GuestWriteGateSlot, OutputHold,
};
use nv_extension::{CheckpointPhase, HostError, NvHost, UndoLog, UndoRecord};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, VolatileSlice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::block_choice::BlockChoice;
use super::disk_undo::{disk_hook_slots, DiskUndoHook};
use super::host::VmHost;
use super::measurement_overrides;
use super::{nv_error, NvVm};
use crate::api::{NvCheckpointStatus, NvPhaseTiming};
use crate::config::SeccompMode;
use crate::event_monitor::{hold_back, VmEvent};
use crate::userfaultfd::{
    DeviceWrite, DeviceWrites, EpochLock, FirstWrite, FirstWriteSink, TrackedRange, WriteTracker,
    WriteTrackerStats,
};
use crate::vm::{Vm, VmRunState};
use crate::{CheckpointError, Error};

/// How many recent checkpoints `vm.nv-status` summarises (median and p99 pause).
const RECENT: usize = 1024;

const PAGE_BYTES: usize = 4096;

/// Pages logged (and lifted) per write fault: the faulting page's aligned block of this many
/// pages, those not logged yet in the epoch (`UndoLog::record_undo_block`). Chosen by
/// measurement with nv-bench `checkpoint` (docs/checkpoints.md, "Costs"); a measurement may
/// override it (`measurement_overrides::block_pages`).
const BLOCK_PAGES: u64 = 64;

/// The undo log's capacity for a VM of `memory_size` bytes: the default, or the measurement
/// override's.
fn undo_pages(memory_size: u64) -> u64 {
    measurement_overrides::undo_pages()
        .unwrap_or_else(|| nv_extension::default_undo_pages(memory_size))
}

/// The undo log as the write tracker's sink: a tracked range's page is the page at
/// `ram_offsets[range] + offset` of the VM's RAM extent.
struct UndoSink {
    log: UndoLog,
    ram_offsets: Vec<u64>,
    /// Set while a checkpoint quiesces the devices: the log's reserve is usable then.
    quiescing: Arc<AtomicBool>,
    /// Entries of an epoch's log a vCPU's write fault may not take: see [`UndoSink::reserve`].
    reserve: u64,
    /// Entries an epoch's log holds (the area's capacity; less in a test build, see
    /// [`test_undo_limit`]).
    capacity: u64,
    /// The length of each range of `ram_offsets`: a block's pages past its end are not lifted.
    range_lengths: Vec<u64>,
    /// How many pages a fault logs outside the reserve (blocks of [`BLOCK_PAGES`]).
    blocks: BlockChoice,
    /// New pages of the largest device request that found no room since a device request
    /// last went through: vCPU write faults leave at least this many entries free, so the
    /// guest's own writes cannot keep a device request waiting epoch after epoch.
    device_need: u64,
}

impl UndoSink {
    /// The log's last eighth (at least one entry) is kept from vCPU write faults: device
    /// requests may use it (they record their pages before writing, all or none, and wait for
    /// the next epoch at a request boundary when they do not fit: `docs/checkpoints.md`
    /// section 9), so the guest's own writes cannot leave a device request no room, and the
    /// early checkpoint that a full log asks for serves the held pages from it.
    fn reserve(capacity: u64) -> u64 {
        (capacity / 8).max(1)
    }

    fn ram_offset(&self, range_index: usize, offset: usize) -> u64 {
        self.ram_offsets[range_index] + offset as u64
    }
}

impl FirstWriteSink for UndoSink {
    fn record(&mut self, range_index: usize, offset: usize) -> FirstWrite {
        let page = self.ram_offset(range_index, offset);
        // A page logged already (by a device request before it writes, or in a block that
        // reached past a range) is lifted whatever room the log has: nothing waits on it.
        if self.log.is_logged(page) {
            return FirstWrite::Lift;
        }
        let quiescing = self.quiescing.load(Ordering::SeqCst);
        let status = self.log.status();
        let mut block_pages = 1;
        if let Some(epoch) = status.epoch {
            let reserve = if quiescing {
                0
            } else {
                self.reserve.max(self.device_need)
            };
            if status.entries + reserve >= self.capacity {
                return FirstWrite::Hold {
                    full: true,
                    reason: format!(
                        "the undo log is full ({} of {} pages; the rest is kept for device \
                         requests and the checkpoint)",
                        status.entries, self.capacity
                    ),
                };
            }
            block_pages = self.blocks.pages_for(epoch, page);
            // A block must not eat into the reserve, and the reserve serves single pages.
            if quiescing || status.entries + reserve + block_pages > self.capacity {
                block_pages = 1;
            }
        }
        let ram_offset = self.ram_offsets[range_index];
        let range_end = ram_offset + self.range_lengths[range_index];
        match self.log.record_undo_block(page, block_pages) {
            Ok(block) if block.record == UndoRecord::Recorded => {
                // Runs of adjacent logged pages inside this range (a block may reach past it).
                let mut runs: Vec<(usize, usize)> = Vec::new();
                for page in block.logged {
                    if page < ram_offset || page >= range_end {
                        continue;
                    }
                    let at = (page - ram_offset) as usize;
                    match runs.last_mut() {
                        Some((start, length)) if *start + *length == at => *length += PAGE_BYTES,
                        _ => runs.push((at, PAGE_BYTES)),
                    }
                }
                FirstWrite::LiftRuns(runs)
            }
            Ok(_) => FirstWrite::Lift,
            Err(error) => FirstWrite::Hold {
                full: matches!(error, nv_extension::Error::UndoLogFull { .. }),
                reason: error.to_string(),
            },
        }
    }

    fn record_for_device(&mut self, pages: &[(usize, usize)]) -> DeviceWrite {
        if pages.len() as u64 > self.capacity {
            return DeviceWrite::TooLarge(format!(
                "a request writing {} pages of guest memory, more than the {} an epoch's undo \
                 log holds",
                pages.len(),
                self.capacity
            ));
        }
        let offsets: Vec<u64> = pages
            .iter()
            .map(|&(range_index, offset)| self.ram_offset(range_index, offset))
            .collect();
        let status = self.log.status();
        if status.epoch.is_some() {
            let new = offsets
                .iter()
                .filter(|&&page| !self.log.is_logged(page))
                .count() as u64;
            if new > 0 && status.entries + new > self.capacity {
                self.device_need = self.device_need.max(new);
                return DeviceWrite::Full;
            }
        }
        match self.log.record_undo_pages(&offsets) {
            Ok(_) => {
                self.device_need = 0;
                DeviceWrite::Ready
            }
            Err(nv_extension::Error::UndoLogFull { .. }) => {
                self.device_need = self.device_need.max(pages.len() as u64);
                DeviceWrite::Full
            }
            Err(error) => DeviceWrite::Failed(error.to_string()),
        }
    }
}

/// The undo log as the VM's guest-write gate: a device request's pages are logged before it
/// writes any of them, or the request waits for the next epoch at its boundary.
struct DeviceWriteGate {
    writes: Arc<DeviceWrites<UndoSink>>,
}

impl GuestWriteGate for DeviceWriteGate {
    fn before_guest_writes(&self, ranges: &[(usize, usize)]) -> BeforeWrite {
        match self.writes.prepare(ranges) {
            DeviceWrite::Ready => BeforeWrite::Proceed,
            // The early checkpoint was asked for; the device's resume after it serves the
            // request again.
            DeviceWrite::Full => BeforeWrite::Defer,
            // Checkpoints stop (asked for already), which needs no device to quiesce: until
            // then the device's write waits in its fault, as any writer's does, and stopping
            // lifts every protection.
            DeviceWrite::Failed(_) => BeforeWrite::Proceed,
            DeviceWrite::TooLarge(reason) => BeforeWrite::Fail(reason),
        }
    }
}

/// The coordinator's door for one checkpoint: [`VmHost`]'s pause, quiesce, save and resume,
/// plus the write protection. The tracker's lock is taken once the devices are quiet (a device
/// thread blocked on a protected page is served until then) and held until the VM resumes, so
/// no page is recorded in one epoch and unprotected in the next.
struct CheckpointHost<'a> {
    vm: VmHost<'a>,
    tracker: &'a WriteTracker<UndoSink>,
    lock: Option<EpochLock<'a, UndoSink>>,
    /// The network output gate, sealed once the devices are quiet.
    hold: &'a OutputHold,
    /// The output epoch sealed by this checkpoint: released once it committed.
    sealed: Option<u64>,
    /// The undo sink's "quiescing" flag (see [`UndoSink::reserve`]).
    quiescing: &'a AtomicBool,
}

impl NvHost for CheckpointHost<'_> {
    fn pause_vcpus(&mut self) -> Result<(), HostError> {
        self.vm.pause_vcpus_briefly()
    }

    fn quiesce_devices(&mut self) -> Result<(), HostError> {
        // The vCPUs are paused: a page still held is one a device thread waits on (or a parked
        // vCPU will write again), and that device cannot stop before it is served.
        self.quiescing.store(true, Ordering::SeqCst);
        self.tracker.retry_held();
        self.vm.quiesce_devices()?;
        // No device transmits now: every frame held so far was produced before this state.
        self.sealed = Some(self.hold.seal());
        self.lock = Some(self.tracker.lock_epoch());
        Ok(())
    }

    fn guest_memory_ranges(&self) -> Vec<VolatileSlice<'_>> {
        self.vm.guest_memory_ranges()
    }

    fn save_state(&mut self) -> Result<Vec<u8>, HostError> {
        self.vm.save_state()
    }

    fn write_protect_memory(&mut self) -> Result<(), HostError> {
        match &mut self.lock {
            Some(lock) => Ok(lock
                .protect_lifted(measurement_overrides::protect_gap_pages())
                .map(|_| ())?),
            None => Err("write protection asked for before the devices were quiesced".into()),
        }
    }

    fn resume(&mut self) -> Result<(), HostError> {
        self.lock = None;
        self.quiescing.store(false, Ordering::SeqCst);
        self.vm.resume()
    }
}

/// Checkpoints turned on: the VM's undo log and the tracker feeding it.
struct Active {
    log: UndoLog,
    tracker: WriteTracker<UndoSink>,
    /// The VM's network output gate, armed while this is.
    hold: Arc<OutputHold>,
    /// Shared with the undo sink: a checkpoint is quiescing the devices.
    quiescing: Arc<AtomicBool>,
    /// The disks asking [`DiskUndoHook`]s before each write.
    disks: Vec<BlockWriteHookSlot>,
    /// Where the VM's devices ask before they write guest memory.
    guest_writes: GuestWriteGateSlot,
}

impl Drop for Active {
    fn drop(&mut self) {
        for slot in &self.disks {
            slot.install(None);
        }
        self.guest_writes.install(None);
    }
}

/// The checkpoint timer, the tracker's attention EventFd and, while checkpoints are on, the
/// undo log and the write tracker. The control loop watches [`Checkpoints::timer_fd`] and
/// [`Checkpoints::attention_fd`].
pub struct Checkpoints {
    timer: TimerFd,
    attention: EventFd,
    interval: Duration,
    active: Option<Active>,
    seccomp: SeccompMode,
    epochs: u64,
    /// Of `epochs`, those taken early (a full undo log or output hold).
    early_epochs: u64,
    last_seq: Option<u64>,
    /// (pause, undo bytes, write faults of the epoch) of the most recent checkpoints, oldest
    /// first.
    recent: VecDeque<(Duration, u64, u64)>,
    /// The phases of the same checkpoints, each as the walk reported them.
    recent_phases: VecDeque<PhaseTimes>,
    /// The write tracker's counters at the last checkpoint.
    tracker_at_last: WriteTrackerStats,
}

/// Test builds (`fault-injection`): with `NV_HOLD_FULL_LOG` set, a full undo log takes no early
/// checkpoint, so the writer stays blocked on its page until the next timer tick: an end-to-end
/// test then sends SIGPWR while a vCPU waits on a full log.
pub const HOLD_FULL_LOG_VAR: &str = "NV_HOLD_FULL_LOG";

#[cfg(feature = "fault-injection")]
fn early_checkpoints_withheld() -> bool {
    std::env::var_os(HOLD_FULL_LOG_VAR).is_some()
}

#[cfg(not(feature = "fault-injection"))]
fn early_checkpoints_withheld() -> bool {
    false
}

/// Test builds (`fault-injection`): `NV_UNDO_LIMIT_PAGES=N` makes every epoch's undo log hold
/// N entries (at most its real capacity; at least 4, what a test guest's disk read or network
/// receive writes), a tiny log without a tiny region.
#[cfg(feature = "fault-injection")]
fn test_undo_limit() -> Option<u64> {
    std::env::var("NV_UNDO_LIMIT_PAGES")
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|limit| limit.max(4))
}

#[cfg(not(feature = "fault-injection"))]
fn test_undo_limit() -> Option<u64> {
    None
}

/// The walk's phases in order: the index of a phase's duration in [`PhaseTimes`].
const PHASES: [CheckpointPhase; 7] = [
    CheckpointPhase::PauseVcpus,
    CheckpointPhase::QuiesceDevices,
    CheckpointPhase::PersistMemory,
    CheckpointPhase::SaveState,
    CheckpointPhase::Commit,
    CheckpointPhase::WriteProtect,
    CheckpointPhase::Resume,
];

/// One checkpoint's phase durations, by [`PHASES`] index (no allocation per checkpoint).
type PhaseTimes = [Option<Duration>; PHASES.len()];

fn phase_times(phases: &[(CheckpointPhase, Duration)]) -> PhaseTimes {
    let mut times = [None; PHASES.len()];
    for (phase, took) in phases {
        if let Some(index) = PHASES.iter().position(|p| p == phase) {
            times[index] = Some(*took);
        }
    }
    times
}

/// The median of each phase over `checkpoints`, in the walk's order, each over the checkpoints
/// that ran it; phases none ran are left out.
fn phase_medians(checkpoints: &VecDeque<PhaseTimes>) -> Vec<NvPhaseTiming> {
    PHASES
        .iter()
        .enumerate()
        .filter_map(|(index, phase)| {
            let mut took: Vec<u64> = checkpoints
                .iter()
                .filter_map(|times| times[index])
                .map(|d| d.as_micros() as u64)
                .collect();
            took.sort_unstable();
            let median = *took.get((took.len().checked_sub(1)?) / 2)?;
            Some(NvPhaseTiming {
                phase: phase.name().to_string(),
                duration_us: median,
            })
        })
        .collect()
}

fn timer_error(e: vmm_sys_util::errno::Error) -> Error {
    Error::Checkpoint(CheckpointError::Timer(e))
}

/// The checkpoint timer, non-blocking: a request handled in the same epoll batch as its tick
/// may have cleared it (checkpoints off) or re-armed it, which drops the expirations epoll saw;
/// the tick's read must then find nothing instead of blocking the control loop.
fn nonblocking_timer() -> Result<TimerFd, Error> {
    let timer = TimerFd::new().map_err(timer_error)?;
    // SAFETY: F_GETFL/F_SETFL on a descriptor `timer` owns; they change only its status flags.
    let set = unsafe {
        let flags = libc::fcntl(timer.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !set {
        return Err(timer_error(vmm_sys_util::errno::Error::last()));
    }
    Ok(timer)
}

impl Checkpoints {
    pub fn new(seccomp: SeccompMode) -> Result<Self, Error> {
        Ok(Checkpoints {
            timer: nonblocking_timer()?,
            attention: EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
                operation: "create (checkpoint attention)",
                source,
            })?,
            interval: Duration::ZERO,
            active: None,
            seccomp,
            epochs: 0,
            early_epochs: 0,
            last_seq: None,
            recent: VecDeque::with_capacity(RECENT),
            recent_phases: VecDeque::with_capacity(RECENT),
            tracker_at_last: WriteTrackerStats::default(),
        })
    }

    /// Whether checkpoints are on (an epoch may hold undo entries of the VM's disks).
    pub fn is_on(&self) -> bool {
        self.active.is_some()
    }

    /// Readable when a checkpoint is due.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Readable when the fault thread holds a page (undo log full, or recording failed).
    pub fn attention_fd(&self) -> RawFd {
        self.attention.as_raw_fd()
    }

    /// `vm.nv-status`'s `checkpoint`: `None` while checkpoints are off.
    pub fn status(&self) -> Option<NvCheckpointStatus> {
        if self.interval.is_zero() {
            return None;
        }
        let mut pauses: Vec<u64> = self
            .recent
            .iter()
            .map(|(pause, _, _)| pause.as_micros() as u64)
            .collect();
        pauses.sort_unstable();
        let quantile = |q: f64| {
            pauses
                .get(((pauses.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        let (last_pause, last_undo, _) = self.recent.back().copied().unwrap_or_default();
        let mean = |field: fn(&(Duration, u64, u64)) -> u64| {
            if self.recent.is_empty() {
                0
            } else {
                self.recent.iter().map(field).sum::<u64>() / self.recent.len() as u64
            }
        };
        Some(NvCheckpointStatus {
            interval_ms: self.interval.as_millis() as u64,
            epochs: self.epochs,
            last_epoch_sequence: self.last_seq,
            last_pause_us: last_pause.as_micros() as u64,
            last_undo_bytes: last_undo,
            recent_pause_median_us: quantile(0.5),
            recent_pause_p99_us: quantile(0.99),
            recent_undo_bytes_mean: mean(|(_, bytes, _)| *bytes),
            recent_write_faults_mean: mean(|(_, _, faults)| *faults),
            early_epochs: self.early_epochs,
            recent_phase_median_us: phase_medians(&self.recent_phases),
        })
    }

    /// Turns checkpoints of `nv`'s VM `vm` on every `interval`, or off (zero). Turning them on
    /// takes the first (arming) checkpoint at once, also of a paused VM (a recovery arms them
    /// before the guest runs again).
    pub fn set_interval(
        &mut self,
        nv: &NvVm,
        vm: &mut Vm,
        interval: Duration,
    ) -> Result<(), Error> {
        if interval.is_zero() {
            self.timer.clear().map_err(timer_error)?;
            self.interval = interval;
            return self.stop(nv);
        }
        if self.active.is_none() {
            self.active = Some(self.start(nv, vm)?);
            self.tracker_at_last = WriteTrackerStats::default();
        }
        self.interval = interval;
        self.timer
            .reset(interval, Some(interval))
            .map_err(timer_error)?;
        match vm.run_state {
            VmRunState::Running | VmRunState::Paused => self.checkpoint(nv, vm),
            _ => Ok(()),
        }
    }

    /// The VM's run ended (or its start failed): forget its log and lift the protection, without
    /// touching the region (how the run ended is recorded there by the caller).
    pub fn end_run(&mut self) {
        let _ = self.timer.clear();
        self.interval = Duration::ZERO;
        if let Some(active) = self.active.take() {
            // The run may end in a rollback (a vCPU failure leaves the epoch standing): the
            // frames of the uncommitted epoch must never go out.
            let dropped = active.hold.disarm_and_discard();
            if dropped > 0 {
                log::info!("{dropped} network frames of an uncommitted epoch dropped");
            }
        }
    }

    /// A save that is newer than every held frame committed (power failure, planned suspend):
    /// nothing can roll back past them any more, so the held frames go out now. The hold stays
    /// armed: a VM that runs on after the save (a swap-out that failed) still checkpoints.
    pub fn saved(&mut self) {
        if let Some(active) = self.active.as_ref() {
            active.hold.release(active.hold.seal());
        }
    }

    /// The timer fired: take a checkpoint unless the VM is not running (paused by `vm.pause`,
    /// or held by a long operation): then the next tick does.
    pub fn tick(&mut self, nv: Option<&NvVm>, vm: Option<&mut Vm>) -> Result<(), Error> {
        if let Err(error) = self.timer.wait() {
            if error.errno() == libc::EAGAIN {
                // No expiration left: cleared or re-armed since epoll saw it (see
                // `nonblocking_timer`). Nothing is due.
                return Ok(());
            }
        }
        match (nv, vm) {
            (Some(nv), Some(vm)) if vm.run_state == VmRunState::Running => self.checkpoint(nv, vm),
            _ => Ok(()),
        }
    }

    /// The fault thread holds a page: a full undo log takes an early checkpoint (the new epoch's
    /// log is empty) and records the held pages again; any other recording failure stops
    /// checkpoints (the epochs are destroyed first, then the pages are released).
    pub fn attend(&mut self, nv: Option<&NvVm>, vm: Option<&mut Vm>) -> Result<(), Error> {
        let _ = self.attention.read();
        let (Some(nv), Some(vm)) = (nv, vm) else {
            return Ok(());
        };
        let Some(active) = self.active.as_ref() else {
            return Ok(());
        };
        if let Some(reason) = active.tracker.failure() {
            log::error!(
                "VM {:?}: recording a page in the undo log failed ({reason}): checkpoints are off",
                nv.name()
            );
            self.timer.clear().map_err(timer_error)?;
            self.interval = Duration::ZERO;
            return self.stop(nv);
        }
        if early_checkpoints_withheld() {
            log::warn!(
                "VM {:?}: the undo log is full; {HOLD_FULL_LOG_VAR} withholds the early checkpoint",
                nv.name()
            );
            return Ok(());
        }
        if vm.run_state == VmRunState::Running {
            log::info!(
                "VM {:?}: the undo log or the network output hold is full, checkpointing early",
                nv.name()
            );
            self.checkpoint(nv, vm)?;
            self.early_epochs += 1;
            self.restart_interval()?;
        }
        Ok(())
    }

    /// After an early checkpoint the next epoch gets a whole interval. The timer's next tick
    /// was due one interval after the previous tick, often a moment after the early
    /// checkpoint: so short an epoch pays a whole pause, and a new fault for every page the
    /// guest writes again, for nothing. The loss bound holds: the next checkpoint is at most
    /// one interval after this one.
    fn restart_interval(&mut self) -> Result<(), Error> {
        if self.interval.is_zero() {
            return Ok(());
        }
        self.timer
            .reset(self.interval, Some(self.interval))
            .map_err(timer_error)
    }

    /// A VM resumed from a completed save (or a recovered epoch) with checkpoints on: instead
    /// of `begin_run(Resume)`, the run begins with that state committed again as its first
    /// epoch (`begin_run_checkpointed`), so no instant of it is unrecoverable; guest RAM is
    /// write-protected here, before the caller resumes the guest.
    pub fn begin_resumed_run(
        &mut self,
        nv: &NvVm,
        vm: &Vm,
        interval: Duration,
    ) -> Result<(), Error> {
        disk_hook_slots(vm)?;
        let undo_pages = undo_pages(nv.handle.memory_size());
        let log = nv
            .handle
            .begin_run_checkpointed(undo_pages)
            .map_err(|e| nv_error(&nv.config, e))?;
        // Reported as every committed epoch is (`checkpoint`), at info: once per run.
        self.last_seq = log.status().epoch;
        if let Some(seq) = self.last_seq {
            log::info!(
                "VM {:?}: checkpoint seq {seq} committed: the resumed state, as the run's first \
                 epoch",
                nv.name()
            );
        }
        let active = self.start_with_log(nv, vm, log)?;
        self.tracker_at_last = WriteTrackerStats::default();
        active
            .tracker
            .lock_epoch()
            .protect_all()
            .map_err(|e| Error::Checkpoint(CheckpointError::WriteTracking(e)))?;
        self.active = Some(active);
        self.interval = interval;
        self.timer
            .reset(interval, Some(interval))
            .map_err(timer_error)
    }

    fn start(&self, nv: &NvVm, vm: &Vm) -> Result<Active, Error> {
        disk_hook_slots(vm)?;
        let undo_pages = undo_pages(nv.handle.memory_size());
        let log = nv
            .handle
            .enable_checkpoints(undo_pages)
            .map_err(|e| nv_error(&nv.config, e))?;
        self.start_with_log(nv, vm, log)
    }

    fn start_with_log(&self, nv: &NvVm, vm: &Vm, log: UndoLog) -> Result<Active, Error> {
        let backing = nv
            .handle
            .memory_backing()
            .map_err(|e| nv_error(&nv.config, e))?;
        let mut ranges = Vec::new();
        let mut ram_offsets = Vec::new();
        let mut range_lengths = Vec::new();
        for region in vm.memory.iter() {
            let Some(file_offset) = region.file_offset() else {
                return Err(Error::Checkpoint(CheckpointError::RamNotInRegion));
            };
            ranges.push(TrackedRange {
                host_address: region.as_ptr() as usize,
                length: region.len() as usize,
            });
            ram_offsets.push(file_offset.start() - backing.offset);
            range_lengths.push(region.len());
        }
        let quiescing = Arc::new(AtomicBool::new(false));
        let blocks = BlockChoice::new(
            nv.handle.memory_size(),
            measurement_overrides::block_pages().unwrap_or(BLOCK_PAGES),
            measurement_overrides::blocks_on_evidence(),
        );
        let block_pages = blocks.block_pages();
        let capacity = test_undo_limit().map_or(log.capacity_pages(), |limit| {
            limit.min(log.capacity_pages())
        });
        let sink = UndoSink {
            log: log.clone(),
            ram_offsets,
            quiescing: Arc::clone(&quiescing),
            reserve: UndoSink::reserve(capacity),
            capacity,
            range_lengths,
            blocks,
            device_need: 0,
        };
        let attention = self.attention_clone()?;
        let hold_attention = self.attention_clone()?;
        let tracker = WriteTracker::start(ranges, sink, attention, self.seccomp)
            .map_err(|e| Error::Checkpoint(CheckpointError::WriteTracking(e)))?;
        // Before the epoch is armed (the caller's next step) every disk asks the log first.
        let disks = disk_hook_slots(vm)?;
        for (index, slot) in disks.iter().enumerate() {
            self.install_disk_hook(&log, index, slot)?;
        }
        // And every device logs the guest pages a request writes before it writes them.
        let guest_writes = vm.devices.guest_write_gate();
        guest_writes.install(Some(Arc::new(DeviceWriteGate {
            writes: tracker.device_writes(),
        })));
        // From here on a frame the guest transmits waits for the epoch that produced it.
        let hold = vm.devices.net_output_hold();
        hold.arm(hold_attention);
        log::info!(
            "VM {:?}: checkpoints on, undo log of {capacity} pages per epoch, up to {block_pages} \
             pages logged per write fault",
            nv.name()
        );
        Ok(Active {
            log,
            tracker,
            hold,
            quiescing,
            disks,
            guest_writes,
        })
    }

    fn attention_clone(&self) -> Result<EventFd, Error> {
        self.attention.try_clone().map_err(|source| Error::EventFd {
            operation: "clone (checkpoint attention)",
            source,
        })
    }

    fn install_disk_hook(
        &self,
        log: &UndoLog,
        index: usize,
        slot: &BlockWriteHookSlot,
    ) -> Result<(), Error> {
        let attention = self.attention_clone()?;
        slot.install(Some(Arc::new(DiskUndoHook::new(
            log.clone(),
            index as u16,
            attention,
        ))));
        Ok(())
    }

    /// A disk was hot-added: while checkpoints are on, it asks the undo log before each write
    /// too (installed before the guest's driver can have found it). A disk whose writes the VMM
    /// cannot see was refused before it was added (config validation).
    pub fn cover_new_disks(&mut self, vm: &Vm) -> Result<(), Error> {
        let Some(active) = self.active.as_ref() else {
            return Ok(());
        };
        let slots = disk_hook_slots(vm)?;
        for (index, slot) in slots.iter().enumerate().skip(active.disks.len()) {
            self.install_disk_hook(&active.log, index, slot)?;
        }
        if let Some(active) = self.active.as_mut() {
            active.disks = slots;
        }
        Ok(())
    }

    /// Destroys the epochs, then lifts the write protection (in that order: a page written
    /// unlogged while an epoch stands would make that epoch a lie).
    fn stop(&mut self, nv: &NvVm) -> Result<(), Error> {
        let Some(active) = self.active.as_ref() else {
            return Ok(());
        };
        nv.handle
            .disable_checkpoints(&active.log)
            .map_err(|e| nv_error(&nv.config, e))?;
        // No epoch stands any more: nothing can take the held frames back.
        active.hold.disarm_and_release();
        self.active = None;
        log::info!("VM {:?}: checkpoints off", nv.name());
        Ok(())
    }

    fn checkpoint(&mut self, nv: &NvVm, vm: &mut Vm) -> Result<(), Error> {
        let Some(active) = self.active.as_ref() else {
            return Ok(());
        };
        let mut host = CheckpointHost {
            vm: VmHost::exclusive(vm),
            tracker: &active.tracker,
            lock: None,
            hold: &active.hold,
            sealed: None,
            quiescing: &active.quiescing,
        };
        // A checkpoint is one operation built from a pause and a resume: as for the other
        // composite operations, their `vm` events are held back (docs/api.md, "Events"). Every
        // 10 ms they would be 400 events a second in the event log, and each one wakes the
        // event-monitor thread inside the pause.
        let quiet = hold_back(&[
            VmEvent::Pausing,
            VmEvent::Paused,
            VmEvent::Resuming,
            VmEvent::Resumed,
        ]);
        let report = nv_extension::checkpoint_vm(&nv.handle, &mut host, &active.log);
        drop(quiet);
        let sealed = host.sealed;
        drop(host);
        active.quiescing.store(false, Ordering::SeqCst);
        if let (Ok(_), Some(sealed)) = (&report, sealed) {
            // The epoch committed: its frames (and those of any earlier failed checkpoint) go.
            active.hold.release(sealed);
        }
        // Pages held for a full log go on in the new epoch.
        active.tracker.retry_held();
        let report = report.map_err(|e| nv_error(&nv.config, e))?;
        self.epochs += 1;
        self.last_seq = Some(report.seq);
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        if self.recent_phases.len() == RECENT {
            self.recent_phases.pop_front();
        }
        let stats = active.tracker.stats();
        let since = self.tracker_at_last;
        self.tracker_at_last = stats;
        let faults = stats.faults - since.faults;
        // Each logged page: its 4 KiB and a 64-byte entry header (docs/checkpoints.md).
        self.recent
            .push_back((report.paused, report.undo_pages * (4096 + 64), faults));
        self.recent_phases.push_back(phase_times(&report.phases));
        // After the commit: a death before this line leaves one epoch newer than the last
        // reported (the KVM test of the loss bound reads "checkpoint seq N committed").
        log::debug!(
            "VM {:?}: checkpoint seq {} committed: paused {} us ({}), {} undo pages, {faults} \
             write faults, {} pages lifted, fault thread {} us recording, {} us lifting",
            nv.name(),
            report.seq,
            report.paused.as_micros(),
            report
                .phases
                .iter()
                .map(|(phase, took)| format!("{phase:?} {}", took.as_micros()))
                .collect::<Vec<_>>()
                .join(", "),
            report.undo_pages,
            stats.lifted_pages - since.lifted_pages,
            (stats.recording - since.recording).as_micros(),
            (stats.lifting - since.lifting).as_micros(),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(micros: u64) -> Duration {
        Duration::from_micros(micros)
    }

    #[test]
    fn phase_medians_are_per_phase_in_the_walks_order() {
        let mut recent = VecDeque::new();
        // Reported out of order on purpose: the status lists the walk's order.
        for (pause, persist, protect) in [(10, 300, 7), (30, 100, 9), (20, 200, 8)] {
            recent.push_back(phase_times(&[
                (CheckpointPhase::WriteProtect, us(protect)),
                (CheckpointPhase::PauseVcpus, us(pause)),
                (CheckpointPhase::PersistMemory, us(persist)),
            ]));
        }
        // A failed walk that stopped after the pause contributes to that phase only.
        recent.push_back(phase_times(&[(CheckpointPhase::PauseVcpus, us(40))]));
        let medians: Vec<(String, u64)> = phase_medians(&recent)
            .into_iter()
            .map(|timing| (timing.phase, timing.duration_us))
            .collect();
        assert_eq!(
            medians,
            vec![
                ("pause-vcpus".to_string(), 20),
                ("persist-memory".to_string(), 200),
                ("write-protect".to_string(), 8),
            ]
        );
        assert!(phase_medians(&VecDeque::new()).is_empty());
    }

    /// An early checkpoint restarts the interval: the timer's tick that was due a moment later
    /// moves a whole interval on (before, the epoch after an early checkpoint lasted only what
    /// was left of the interval: at 10 ms kvstore's took 945 checkpoints in 7 s).
    #[test]
    fn an_early_checkpoint_restarts_the_interval() {
        /// (next tick due in, period) of the checkpoint timer.
        fn timer_state(checkpoints: &Checkpoints) -> (Duration, Duration) {
            // SAFETY: itimerspec is plain data, for which all zeroes is a valid value.
            let mut state: libc::itimerspec = unsafe { std::mem::zeroed() };
            // SAFETY: `state` is a live itimerspec the call fills; the fd is the timer's.
            assert_eq!(
                unsafe { libc::timerfd_gettime(checkpoints.timer_fd(), &mut state) },
                0
            );
            let duration = |t: libc::timespec| Duration::new(t.tv_sec as u64, t.tv_nsec as u32);
            (duration(state.it_value), duration(state.it_interval))
        }
        let mut checkpoints = Checkpoints::new(SeccompMode::Disabled).unwrap();
        let hour = Duration::from_secs(3600);
        checkpoints.interval = hour;
        // The next tick is due in a millisecond, then every hour.
        checkpoints
            .timer
            .reset(Duration::from_millis(1), Some(hour))
            .unwrap();
        checkpoints.restart_interval().unwrap();
        let (due, period) = timer_state(&checkpoints);
        assert_eq!(period, hour);
        assert!(
            due > hour - Duration::from_secs(60),
            "the next tick is due in {due:?}, not a whole interval on"
        );
        // Checkpoints off: nothing is re-armed.
        checkpoints.timer.clear().unwrap();
        checkpoints.interval = Duration::ZERO;
        checkpoints.restart_interval().unwrap();
        assert_eq!(timer_state(&checkpoints), (Duration::ZERO, Duration::ZERO));
    }

    /// The control loop may handle the timer's event after a request in the same epoll batch
    /// turned checkpoints off (`vm.nv-checkpoint` with `interval_ms: 0` clears the timer and
    /// its expirations). That stale tick must return, not block the control loop on the
    /// timer's read for ever (it then never handled SIGPWR again: the net test's last save hung
    /// with the main thread in `timerfd_read`).
    #[test]
    fn a_tick_after_the_timer_was_cleared_returns() {
        let mut checkpoints = Checkpoints::new(SeccompMode::Disabled).unwrap();
        checkpoints
            .timer
            .reset(Duration::from_millis(1), Some(Duration::from_millis(1)))
            .unwrap();
        let mut ready = libc::pollfd {
            fd: checkpoints.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `ready` is one valid pollfd for the duration of the call.
        assert_eq!(unsafe { libc::poll(&mut ready, 1, -1) }, 1);
        checkpoints.timer.clear().unwrap();
        let (done, ticked) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let result = checkpoints.tick(None, None);
            let _ = done.send(result.is_ok());
        });
        // Generous: the tick does nothing; only a blocked read never answers.
        let answer = ticked.recv_timeout(Duration::from_secs(30));
        assert_eq!(
            answer,
            Ok(true),
            "the stale tick blocked on the cleared timer"
        );
    }
}
