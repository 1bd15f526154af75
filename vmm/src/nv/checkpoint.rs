//! Continuous epoch checkpoints of an NV VM (`--nv ...,checkpoint_ms=N`,
//! `PUT vm.nv-checkpoint`): every interval the control loop pauses the VM, the coordinator
//! saves its volatile state and commits an epoch, guest RAM is write-protected again, and the
//! VM resumes. Between two checkpoints the [`WriteTracker`]'s thread puts the old content of
//! every page the guest writes for the first time into the region's undo log, so that a VMM
//! killed without warning is recovered to the last epoch. `docs/checkpoints.md` has the design.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::timerfd::TimerFd;

use crate::api::NvCheckpointStatus;
use crate::config::SeccompMode;
use crate::userfaultfd::{FirstWriteSink, TrackedRange, WriteTracker};
use crate::vm::{Vm, VmRunState};
use crate::Error;

/// What the last checkpoints cost, for `vm.nv-status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointStats {
    pub epochs: u64,
    pub last_seq: u64,
    pub last_pause: Duration,
    pub last_undo_bytes: u64,
}

/// The undo log the write tracker feeds.
struct UndoSink {
    pages: u64,
}

impl FirstWriteSink for UndoSink {
    fn record(&mut self, _range: usize, _offset: usize, _page: &[u8]) -> Result<(), String> {
        self.pages += 1;
        Ok(())
    }

    fn abandon(&mut self, reason: &str) {
        log::error!("checkpoint: recording a page failed, the epoch is lost: {reason}");
    }
}

/// The checkpoint timer and, while checkpoints are on, the write tracker.
pub struct Checkpoints {
    timer: TimerFd,
    interval: Duration,
    tracker: Option<WriteTracker<UndoSink>>,
    seccomp: SeccompMode,
    stats: CheckpointStats,
}

impl Checkpoints {
    pub fn new(seccomp: SeccompMode) -> Result<Self, Error> {
        Ok(Checkpoints {
            timer: TimerFd::new().map_err(|e| Error::Checkpoint(format!("timerfd: {e}")))?,
            interval: Duration::ZERO,
            tracker: None,
            seccomp,
            stats: CheckpointStats::default(),
        })
    }

    /// The fd the control loop watches: readable when a checkpoint is due.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    pub fn stats(&self) -> CheckpointStats {
        self.stats
    }

    /// `vm.nv-status`'s `checkpoint`: `None` while checkpoints are off.
    pub fn status(&self) -> Option<NvCheckpointStatus> {
        if self.interval.is_zero() {
            return None;
        }
        Some(NvCheckpointStatus {
            interval_ms: self.interval.as_millis() as u64,
            epochs: self.stats.epochs,
            last_epoch_sequence: (self.stats.epochs > 0).then_some(self.stats.last_seq),
            last_pause_us: self.stats.last_pause.as_micros() as u64,
            last_undo_bytes: self.stats.last_undo_bytes,
        })
    }

    /// Turns checkpoints on every `interval` (zero: off) for `vm`. Turning them on takes the
    /// first checkpoint at once.
    pub fn set_interval(&mut self, vm: &mut Vm, interval: Duration) -> Result<(), Error> {
        if interval.is_zero() {
            self.timer
                .clear()
                .map_err(|e| Error::Checkpoint(format!("timerfd: {e}")))?;
            self.tracker = None;
            self.interval = interval;
            return Ok(());
        }
        if self.tracker.is_none() {
            let ranges = vm
                .memory
                .iter()
                .map(|region| TrackedRange {
                    host_address: region.as_ptr() as usize,
                    length: region.len() as usize,
                })
                .collect();
            let tracker = WriteTracker::start(ranges, UndoSink { pages: 0 }, self.seccomp)
                .map_err(|e| Error::Checkpoint(e.to_string()))?;
            self.tracker = Some(tracker);
        }
        self.interval = interval;
        self.timer
            .reset(interval, Some(interval))
            .map_err(|e| Error::Checkpoint(format!("timerfd: {e}")))?;
        if vm.run_state == VmRunState::Running {
            self.checkpoint(vm)
        } else {
            Ok(())
        }
    }

    /// The timer fired: take a checkpoint of `vm` unless it is not running (paused by
    /// `vm.pause`, or a long operation holds it): then the next tick does.
    pub fn tick(&mut self, vm: Option<&mut Vm>) -> Result<(), Error> {
        let _ = self.timer.wait();
        match vm {
            Some(vm) if vm.run_state == VmRunState::Running && self.tracker.is_some() => {
                self.checkpoint(vm)
            }
            _ => Ok(()),
        }
    }

    fn checkpoint(&mut self, vm: &mut Vm) -> Result<(), Error> {
        let Some(tracker) = self.tracker.as_ref() else {
            return Ok(());
        };
        let started = Instant::now();
        vm.pause_vcpus()?;
        let switched = tracker.next_epoch(|_sink, _counters| Ok::<(), Error>(()));
        let resumed = vm.resume();
        let (committed, ended) = switched.map_err(|e| Error::Checkpoint(e.to_string()))?;
        committed?;
        resumed?;
        self.stats.epochs += 1;
        self.stats.last_seq += 1;
        self.stats.last_pause = started.elapsed();
        self.stats.last_undo_bytes = ended.epoch_pages * 4096;
        log::debug!(
            "checkpoint {}: pause {} us, {} pages in the ended epoch",
            self.stats.epochs,
            self.stats.last_pause.as_micros(),
            ended.epoch_pages
        );
        Ok(())
    }
}
