//! Continuous epoch checkpoints of an NV VM (`--nv ...,checkpoint_ms=N`,
//! `PUT vm.nv-checkpoint`). Every interval the control loop asks the coordinator for one epoch
//! (`nv_extension::checkpoint_vm`), which walks [`CheckpointHost`]: pause the vCPUs, quiesce the
//! devices, save the volatile state, commit the epoch, write-protect guest RAM again, resume.
//! Between two checkpoints the [`WriteTracker`]'s thread hands every page the guest (or a device
//! thread) writes for the first time in the epoch to the region's undo log
//! (`UndoLog::record_undo`, durable before the write goes on), so that a VMM killed without
//! warning is recovered to the last epoch by `recover=on`. `docs/checkpoints.md` has the design
//! and the measured costs.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use nv_extension::{HostError, NvHost, UndoLog, UndoRecord};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, VolatileSlice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::host::VmHost;
use super::{nv_error, NvVm};
use crate::api::NvCheckpointStatus;
use crate::config::SeccompMode;
use crate::userfaultfd::{
    EpochLock, FirstWrite, FirstWriteSink, TrackedRange, WriteTracker, WriteTrackerStats,
};
use crate::vm::{Vm, VmRunState};
use crate::{CheckpointError, Error};

/// How many recent checkpoints `vm.nv-status` summarises (median and p99 pause).
const RECENT: usize = 1024;

const PAGE_BYTES: usize = 4096;

/// Pages logged (and lifted) per write fault: the faulting page's aligned block of this many
/// pages, those not logged yet in the epoch (`UndoLog::record_undo_block`). Chosen by
/// measurement with nv-bench `checkpoint` (docs/checkpoints.md, "Costs").
const BLOCK_PAGES: u64 = 64;

/// Overrides [`BLOCK_PAGES`] for measurements (a power of two, 1 ..= 512).
const BLOCK_PAGES_VARIABLE: &str = "NV_CHECKPOINT_BLOCK_PAGES";

fn block_pages() -> u64 {
    std::env::var(BLOCK_PAGES_VARIABLE)
        .ok()
        .and_then(|value| value.parse::<u64>().ok())
        .filter(|pages| pages.is_power_of_two() && *pages <= 512)
        .unwrap_or(BLOCK_PAGES)
}

/// The undo log as the write tracker's sink: a tracked range's page is the page at
/// `ram_offsets[range] + offset` of the VM's RAM extent.
struct UndoSink {
    log: UndoLog,
    ram_offsets: Vec<u64>,
    range_lengths: Vec<u64>,
    block_pages: u64,
}

impl FirstWriteSink for UndoSink {
    fn record(&mut self, range_index: usize, offset: usize) -> FirstWrite {
        let ram_offset = self.ram_offsets[range_index];
        let range_end = ram_offset + self.range_lengths[range_index];
        match self
            .log
            .record_undo_block(ram_offset + offset as u64, self.block_pages)
        {
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
}

/// The coordinator's door for one checkpoint: [`VmHost`]'s pause, quiesce, save and resume,
/// plus the write protection. The tracker's lock is taken once the devices are quiet (a device
/// thread blocked on a protected page is served until then) and held until the VM resumes, so
/// no page is recorded in one epoch and unprotected in the next.
struct CheckpointHost<'a> {
    vm: VmHost<'a>,
    tracker: &'a WriteTracker<UndoSink>,
    lock: Option<EpochLock<'a, UndoSink>>,
}

impl NvHost for CheckpointHost<'_> {
    fn pause_vcpus(&mut self) -> Result<(), HostError> {
        self.vm.pause_vcpus()
    }

    fn quiesce_devices(&mut self) -> Result<(), HostError> {
        self.vm.quiesce_devices()?;
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
            Some(lock) => Ok(lock.protect_lifted().map(|_| ())?),
            None => Err("write protection asked for before the devices were quiesced".into()),
        }
    }

    fn resume(&mut self) -> Result<(), HostError> {
        self.lock = None;
        self.vm.resume()
    }
}

/// Checkpoints turned on: the VM's undo log and the tracker feeding it.
struct Active {
    log: UndoLog,
    tracker: WriteTracker<UndoSink>,
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
    last_seq: Option<u64>,
    /// (pause, undo bytes, write faults of the epoch) of the most recent checkpoints, oldest
    /// first.
    recent: VecDeque<(Duration, u64, u64)>,
    /// The write tracker's counters at the last checkpoint.
    tracker_at_last: WriteTrackerStats,
}

fn timer_error(e: vmm_sys_util::errno::Error) -> Error {
    Error::Checkpoint(CheckpointError::Timer(e))
}

impl Checkpoints {
    pub fn new(seccomp: SeccompMode) -> Result<Self, Error> {
        Ok(Checkpoints {
            timer: TimerFd::new().map_err(timer_error)?,
            attention: EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
                operation: "create (checkpoint attention)",
                source,
            })?,
            interval: Duration::ZERO,
            active: None,
            seccomp,
            epochs: 0,
            last_seq: None,
            recent: VecDeque::with_capacity(RECENT),
            tracker_at_last: WriteTrackerStats::default(),
        })
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
        self.active = None;
    }

    /// The timer fired: take a checkpoint unless the VM is not running (paused by `vm.pause`,
    /// or held by a long operation): then the next tick does.
    pub fn tick(&mut self, nv: Option<&NvVm>, vm: Option<&mut Vm>) -> Result<(), Error> {
        let _ = self.timer.wait();
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
        if vm.run_state == VmRunState::Running {
            log::info!(
                "VM {:?}: the undo log is full, checkpointing early",
                nv.name()
            );
            self.checkpoint(nv, vm)?;
        }
        Ok(())
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
        let undo_pages = nv_extension::default_undo_pages(nv.handle.memory_size());
        let log = nv
            .handle
            .begin_run_checkpointed(undo_pages)
            .map_err(|e| nv_error(&nv.config, e))?;
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
        let undo_pages = nv_extension::default_undo_pages(nv.handle.memory_size());
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
        let block_pages = block_pages();
        let sink = UndoSink {
            log: log.clone(),
            ram_offsets,
            range_lengths,
            block_pages,
        };
        let attention = self
            .attention
            .try_clone()
            .map_err(|source| Error::EventFd {
                operation: "clone (checkpoint attention)",
                source,
            })?;
        let tracker = WriteTracker::start(ranges, sink, attention, self.seccomp)
            .map_err(|e| Error::Checkpoint(CheckpointError::WriteTracking(e)))?;
        log::info!(
            "VM {:?}: checkpoints on, undo log of {} pages per epoch, {block_pages} pages logged \
             per write fault",
            nv.name(),
            log.capacity_pages()
        );
        Ok(Active { log, tracker })
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
        };
        let report = nv_extension::checkpoint_vm(&nv.handle, &mut host, &active.log);
        drop(host);
        // Pages held for a full log go on in the new epoch.
        active.tracker.retry_held();
        let report = report.map_err(|e| nv_error(&nv.config, e))?;
        self.epochs += 1;
        self.last_seq = Some(report.seq);
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        let stats = active.tracker.stats();
        let since = self.tracker_at_last;
        self.tracker_at_last = stats;
        let faults = stats.faults - since.faults;
        // Each logged page: its 4 KiB and a 64-byte entry header (docs/checkpoints.md).
        self.recent
            .push_back((report.paused, report.undo_pages * (4096 + 64), faults));
        log::debug!(
            "VM {:?}: checkpoint seq {}: paused {} us ({}), {} undo pages, {faults} write \
             faults, {} pages lifted, fault thread {} us recording, {} us lifting",
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
