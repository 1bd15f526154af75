//! Continuous checkpoints: epochs a VM that dies without warning is rolled back to.
//!
//! One walk per checkpoint, like the power-fail save's: pause vCPUs, quiesce devices, persist
//! the pages written in the ending epoch, save the volatile state into the state slot that does
//! not hold the last epoch's, commit the epoch record, start an empty undo log, write-protect
//! guest RAM, resume. Recovery ([`VmHandle::recover`]) of a VM recorded as running finds the
//! last committed epoch of its run, puts the undo log's pages back and hands out the epoch's
//! state. Design, format and the argument why recovery always yields a committed epoch:
//! `docs/checkpoints.md`.

use std::fmt;
use std::time::{Duration, Instant};

use crate::allocator::align_up;
use crate::checkpoint_area::{self, CheckpointArea, Epoch, PAGE_SIZE};
use crate::coordinator::NvHost;
use crate::error::{Error, HostError, Result};
use crate::fault_injection::{self, FaultPoint};
use crate::persistence::Persistence;
use crate::region::{find_mut, Region};
use crate::state_slots::ValidSlot;
use crate::superblock::FORMAT_VERSION_CHECKPOINTS;
use crate::undo_log::{LogState, UndoLog};
use crate::vm_handle::{state_area, RecoveredVm, VmHandle};
use crate::vm_table::{Extent, RunRecord, ShutdownKind, VmEntry};

/// Undo-log pages per guest page when the VMM names no capacity: one eighth of guest RAM, at
/// least 64 pages. A checkpoint interval that writes more pages than this ends early (the
/// handler gets `UndoLogFull` and asks for a checkpoint).
pub const DEFAULT_UNDO_FRACTION: u64 = 8;
pub const MIN_UNDO_PAGES: u64 = 64;

/// The default undo-log capacity for `memory_size` bytes of guest RAM, in pages.
pub fn default_undo_pages(memory_size: u64) -> u64 {
    (memory_size.div_ceil(PAGE_SIZE) / DEFAULT_UNDO_FRACTION).max(MIN_UNDO_PAGES)
}

/// A step of the checkpoint walk, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointPhase {
    PauseVcpus,
    QuiesceDevices,
    PersistMemory,
    SaveState,
    Commit,
    WriteProtect,
    Resume,
}

impl CheckpointPhase {
    pub fn name(self) -> &'static str {
        match self {
            CheckpointPhase::PauseVcpus => "pause-vcpus",
            CheckpointPhase::QuiesceDevices => "quiesce-devices",
            CheckpointPhase::PersistMemory => "persist-memory",
            CheckpointPhase::SaveState => "save-state",
            CheckpointPhase::Commit => "commit",
            CheckpointPhase::WriteProtect => "write-protect",
            CheckpointPhase::Resume => "resume",
        }
    }
}

impl fmt::Display for CheckpointPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a committed checkpoint did and how long it took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointReport {
    /// The committed epoch (its state sequence).
    pub seq: u64,
    /// Each phase that ran, in order, with its duration.
    pub phases: Vec<(CheckpointPhase, Duration)>,
    /// From the start of the pause to the end of the resume: what the guest lost.
    pub paused: Duration,
    /// Pages the undo log held for the epoch that ended (written by the guest in it).
    pub undo_pages: u64,
    /// Bytes of the volatile state saved.
    pub state_bytes: usize,
    /// The first checkpoint of an armed run: all guest memory was persisted, not only the
    /// pages the undo log named.
    pub arming: bool,
}

impl CheckpointReport {
    pub fn phase(&self, phase: CheckpointPhase) -> Option<Duration> {
        self.phases
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, d)| *d)
    }
}

fn host_step(phase: CheckpointPhase, source: HostError) -> Error {
    Error::CheckpointHostStep {
        phase: phase.name(),
        source,
    }
}

/// Takes one epoch checkpoint of a running VM; the VM runs again afterwards.
///
/// Calls `pause_vcpus`, `quiesce_devices`, `guest_memory_ranges` (first checkpoint of an
/// armed log only), `save_state`, `write_protect_memory` and `resume`, in that order, each at
/// most once. On any failure before the commit the previous epoch stands, unchanged, and the
/// host is resumed. If `write_protect_memory` fails after the commit, the epoch records are
/// destroyed (a crash is an unsafe shutdown again, as without checkpoints), the log is
/// disarmed, and the host is resumed; if even that destroying fails, the VM stays paused and
/// the error says so. A failed `resume` after a commit is returned as such: the epoch stands.
pub fn checkpoint_vm(
    handle: &VmHandle,
    host: &mut dyn NvHost,
    log: &UndoLog,
) -> Result<CheckpointReport> {
    fault_injection::check_configuration()?;
    handle.check_resident()?;
    let started = Instant::now();
    let mut phases = Vec::with_capacity(7);
    let mut mark = |phase, since: Instant| phases.push((phase, since.elapsed()));

    let at = Instant::now();
    host.pause_vcpus()
        .map_err(|e| host_step(CheckpointPhase::PauseVcpus, e))
        .inspect_err(|_| resume_after_failure(handle, host))?;
    mark(CheckpointPhase::PauseVcpus, at);
    let at = Instant::now();
    host.quiesce_devices()
        .map_err(|e| host_step(CheckpointPhase::QuiesceDevices, e))
        .inspect_err(|_| resume_after_failure(handle, host))?;
    mark(CheckpointPhase::QuiesceDevices, at);

    let mut state = log.lock_state();
    let committed = commit_under_log(handle, host, &mut state, &mut mark);
    let (seq, undo_pages, state_bytes, arming) = match committed {
        Ok(done) => done,
        Err(e) => {
            drop(state);
            resume_after_failure(handle, host);
            return Err(e);
        }
    };
    let at = Instant::now();
    if let Err(e) = host.write_protect_memory() {
        let error = host_step(CheckpointPhase::WriteProtect, e);
        // Committed, but the guest's next writes would not be logged: the epoch must go.
        if let Err(disarm) = state.disarm(log.region()) {
            log::error!(
                "VM {:?}: checkpoint {seq} committed but guest memory not write-protected \
                 ({error}), and destroying the epoch failed: {disarm}; the VM stays paused",
                handle.name()
            );
            return Err(disarm);
        }
        drop(state);
        log::error!(
            "VM {:?}: checkpoint {seq} withdrawn: {error}; checkpoints are off",
            handle.name()
        );
        resume_after_failure(handle, host);
        return Err(error);
    }
    drop(state);
    mark(CheckpointPhase::WriteProtect, at);
    let at = Instant::now();
    host.resume()
        .map_err(|e| host_step(CheckpointPhase::Resume, e))?;
    mark(CheckpointPhase::Resume, at);
    let paused = started.elapsed();
    log::debug!(
        "VM {:?}: checkpoint {seq}: {undo_pages} undo pages, {state_bytes} state bytes, \
         paused {} us",
        handle.name(),
        paused.as_micros()
    );
    Ok(CheckpointReport {
        seq,
        phases,
        paused,
        undo_pages,
        state_bytes,
        arming,
    })
}

/// Persist, save, commit and start the new epoch, under the log's lock (the fault handler
/// waits): returns (seq, undo pages of the ended epoch, state bytes, arming).
fn commit_under_log(
    handle: &VmHandle,
    host: &mut dyn NvHost,
    state: &mut LogState,
    mark: &mut impl FnMut(CheckpointPhase, Instant),
) -> Result<(u64, u64, usize, bool)> {
    if state.area.vm_uuid != handle.uuid() || state.memory != handle.memory {
        return Err(Error::InvalidCheckpointRequest(format!(
            "the undo log is not VM {:?}'s",
            handle.name()
        )));
    }
    let at = Instant::now();
    let arming = state.epoch.is_none();
    let undo_pages = state.pages.len() as u64;
    if arming {
        // Nothing tracked the writes before: all of guest memory is the epoch's.
        handle.persist_guest_memory(&host.guest_memory_ranges())?;
    } else {
        persist_pages(handle.region(), state.memory.offset, &state.pages)?;
    }
    mark(CheckpointPhase::PersistMemory, at);
    let at = Instant::now();
    let blob = host
        .save_state()
        .map_err(|e| host_step(CheckpointPhase::SaveState, e))?;
    mark(CheckpointPhase::SaveState, at);
    let at = Instant::now();
    let seq = handle.commit_epoch(&state.area, &blob)?;
    state.start_epoch(seq);
    mark(CheckpointPhase::Commit, at);
    Ok((seq, undo_pages, blob.len(), arming))
}

/// Makes the guest pages at `pages` (offsets) durable, adjacent pages in one range.
fn persist_pages(region: &Region, memory_offset: u64, pages: &[u64]) -> Result<()> {
    let mut sorted = pages.to_vec();
    sorted.sort_unstable();
    let mut shared = region.lock();
    let mut run: Option<(u64, u64)> = None;
    for page in sorted {
        run = match run {
            Some((start, len)) if start + len == page => Some((start, len + PAGE_SIZE)),
            Some((start, len)) => {
                shared.store.persist(memory_offset + start, len)?;
                Some((page, PAGE_SIZE))
            }
            None => Some((page, PAGE_SIZE)),
        };
    }
    if let Some((start, len)) = run {
        shared.store.persist(memory_offset + start, len)?;
    }
    Ok(())
}

fn resume_after_failure(handle: &VmHandle, host: &mut dyn NvHost) {
    if let Err(e) = host.resume() {
        log::error!(
            "VM {:?}: resuming after the failed checkpoint failed, the VM stays paused: {e}",
            handle.name()
        );
    }
}

/// The epoch of `entry`'s current run that recovery would roll back to, if one committed.
pub(crate) fn committed_epoch(store: &dyn Persistence, entry: &VmEntry) -> Result<Option<Epoch>> {
    let RunRecord::Running { since_seq, .. } = entry.record else {
        return Ok(None);
    };
    if entry.checkpoint.len == 0 || entry.swap.is_some() {
        return Ok(None);
    }
    let area = CheckpointArea::new(entry.uuid, entry.checkpoint);
    Ok(area
        .newest_epoch(store)?
        .filter(|e| e.seq > since_seq && e.run_since_seq == since_seq))
}

/// The state slot a save must not overwrite: the committed epoch's while one stands (a failed
/// later checkpoint may have left a newer slot), otherwise none (the caller keeps the newest).
pub(crate) fn slot_to_keep(store: &dyn Persistence, entry: &VmEntry) -> Result<Option<ValidSlot>> {
    let Some(epoch) = committed_epoch(store, entry)? else {
        return Ok(None);
    };
    let slots = state_area(entry);
    for index in 0..2 {
        if let Some(slot) = slots.read_slot(store, index)? {
            if slot.seq == epoch.seq {
                return Ok(Some(slot));
            }
        }
    }
    Ok(None)
}

/// What recovery of a running VM yields: its committed epoch's state, or an unsafe shutdown.
pub(crate) fn recoverable_epoch(store: &dyn Persistence, entry: &VmEntry) -> Result<RecoveredVm> {
    let Some(epoch) = committed_epoch(store, entry)? else {
        return Err(Error::UnsafeShutdown);
    };
    match slot_to_keep(store, entry)? {
        Some(slot) => Ok(RecoveredVm {
            config_blob: entry.config.clone(),
            state_blob: slot.payload,
            seq: epoch.seq,
            shutdown_kind: ShutdownKind::Checkpoint,
        }),
        // The slot was durable before the epoch record named it and stays untouched while the
        // record stands: only the medium can have lost it.
        None => Err(Error::DamagedState {
            vm: entry.name.clone(),
            seq: epoch.seq,
            detail: "the state slot of the committed checkpoint epoch is gone".to_string(),
        }),
    }
}

/// Rolls guest memory back to `recovered`'s epoch (undo log applied, durable), drops a later
/// state slot that never committed, and records the VM as saved at that epoch. The caller
/// commits the entry change; a crash before that recovers the same way again.
pub(crate) fn roll_back(
    store: &mut dyn Persistence,
    entry: &mut VmEntry,
    recovered: &RecoveredVm,
) -> Result<u64> {
    let area = CheckpointArea::new(entry.uuid, entry.checkpoint);
    let memory_size = entry.memory_size;
    let applied = area.apply(store, recovered.seq, entry.memory, memory_size, &entry.name)?;
    fault_injection::reached(FaultPoint::Checkpoint("ckpt-recover-record"));
    let slots = state_area(entry);
    for index in 0..2 {
        if let Some(slot) = slots.read_slot(store, index)? {
            if slot.seq > recovered.seq {
                slots.invalidate(store, index)?;
            }
        }
    }
    entry.record = RunRecord::Saved {
        seq: recovered.seq,
        kind: ShutdownKind::Checkpoint,
    };
    Ok(applied)
}

impl VmHandle {
    /// Gives the VM a checkpoint area whose undo log holds `undo_pages` guest pages per epoch
    /// (at least that many: the area is rounded up to the region's extent alignment), or keeps
    /// the one it has if it is that size, and returns its log, not yet armed: the first
    /// [`checkpoint_vm`] arms it. Any epoch the area held is destroyed first. Call after
    /// [`VmHandle::begin_run`]; see [`default_undo_pages`].
    pub fn enable_checkpoints(&self, undo_pages: u64) -> Result<UndoLog> {
        self.check_resident()?;
        let too_big = Error::InvalidSize {
            size: undo_pages,
            reason: "checkpoint undo log must hold 1 to 2^31 pages",
        };
        if undo_pages == 0 || undo_pages > 1 << 31 {
            return Err(too_big);
        }
        let wanted = checkpoint_area::area_len_for(undo_pages).ok_or(too_big)?;
        let entry = self.region.transact(|shared, table| {
            let entry = find_mut(table, &self.name)?;
            if entry.owner != self.claim {
                return Err(Error::OwnershipLost(self.name.clone()));
            }
            if entry.checkpoint.len > 0 {
                CheckpointArea::new(entry.uuid, entry.checkpoint).disarm(shared.store.as_mut())?;
            }
            let len = align_up(wanted, shared.superblock.extent_alignment).unwrap_or(u64::MAX);
            if entry.checkpoint.len == len {
                return Ok((entry.clone(), false));
            }
            if len / PAGE_SIZE > u64::from(u32::MAX) {
                return Err(Error::InvalidSize {
                    size: undo_pages,
                    reason: "checkpoint area too large",
                });
            }
            let mut without = table.clone();
            find_mut(&mut without, &self.name)?.checkpoint.len = 0;
            let offset = Region::allocate(shared, &without, &[len])?[0];
            let extent = Extent { offset, len };
            // Whatever the space held before, no epoch record of it may be believed.
            let uuid = table.find(&self.name).map(|e| e.uuid).unwrap_or_default();
            CheckpointArea::new(uuid, extent).disarm(shared.store.as_mut())?;
            // An older build must refuse the region before it could meet the new entry.
            Region::update_superblock(shared, |sb| {
                sb.format_version = sb.format_version.max(FORMAT_VERSION_CHECKPOINTS)
            })?;
            let entry = find_mut(table, &self.name)?;
            entry.checkpoint = extent;
            Ok((entry.clone(), true))
        })?;
        let area = CheckpointArea::new(entry.uuid, entry.checkpoint);
        log::info!(
            "VM {:?}: checkpoint area of {} bytes, undo log of {} pages",
            self.name,
            entry.checkpoint.len,
            area.capacity
        );
        Ok(UndoLog::new(
            self.region.clone(),
            &self.name,
            area,
            entry.memory,
            entry.memory_size,
        ))
    }

    /// Stops checkpoints: destroys the epoch records durably (a crash from now on is an unsafe
    /// shutdown, as without checkpoints) and disarms `log` (`record_undo` answers `NotArmed`).
    /// The area stays allocated for the next [`VmHandle::enable_checkpoints`].
    pub fn disable_checkpoints(&self, log: &UndoLog) -> Result<()> {
        self.check_resident()?;
        log.lock_state().disarm(log.region())
    }

    /// Commits `state_blob` as the next epoch of this run: into the state slot that does not
    /// hold the standing epoch's, durable, then the epoch record, durable. Returns its sequence.
    pub(crate) fn commit_epoch(&self, area: &CheckpointArea, state_blob: &[u8]) -> Result<u64> {
        Ok(self
            .transact_owned(|shared, entry| {
                let RunRecord::Running { since_seq, .. } = entry.record else {
                    return Err(Error::InvalidCheckpointRequest(format!(
                        "VM {:?} is not running ({})",
                        entry.name, entry.record
                    )));
                };
                if entry.checkpoint != area.extent {
                    return Err(Error::InvalidCheckpointRequest(format!(
                        "VM {:?}'s checkpoint area changed under its undo log",
                        entry.name
                    )));
                }
                let store = shared.store.as_mut();
                let slots = state_area(entry);
                let newest = slots.newest(store)?;
                let keep = slot_to_keep(store, entry)?.or(newest.clone());
                let seq = entry
                    .record
                    .last_seq()
                    .max(newest.map_or(0, |s| s.seq))
                    .max(area.newest_epoch(store)?.map_or(0, |e| e.seq))
                    .checked_add(1)
                    .ok_or_else(|| {
                        Error::CorruptVmTable(format!(
                            "VM {:?}: save sequence exhausted",
                            entry.name
                        ))
                    })?;
                slots.write(store, keep.as_ref(), seq, state_blob)?;
                fault_injection::reached(FaultPoint::Checkpoint("ckpt-epoch-state"));
                area.commit_epoch(store, seq, since_seq)?;
                fault_injection::reached(FaultPoint::Checkpoint("ckpt-epoch-commit"));
                Ok((seq, false))
            })?
            .0)
    }

    /// Byte offset of the VM's guest RAM in the region (tests and tools that address guest
    /// pages through the region).
    pub fn memory_region_offset(&self) -> u64 {
        self.memory.offset
    }
}
