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

/// Makes the guest pages at `pages` (offsets) durable: adjacent pages in one range, the ranges
/// in ascending order, in one call to the store (`Persistence::persist_ranges`: a plain file
/// syncs them with one `msync` over their span, DAX writes back exactly these lines).
fn persist_pages(region: &Region, memory_offset: u64, pages: &[u64]) -> Result<()> {
    let ranges: Vec<(u64, u64)> = page_runs(pages)
        .into_iter()
        .map(|(start, len)| (memory_offset + start, len))
        .collect();
    region.lock().store.persist_ranges(&ranges)
}

/// The runs of adjacent 4 KiB pages `pages` (offsets, in any order, repeats allowed) cover,
/// as (offset, length), ascending and disjoint, adjacent runs merged. The undo log lists pages
/// in blocks, each ascending, so the runs are built first and only they are sorted.
pub(crate) fn page_runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &page in pages {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == page => *len += PAGE_SIZE,
            _ => runs.push((page, PAGE_SIZE)),
        }
    }
    range_merge::merge_ranges(runs, 0)
}

fn resume_after_failure(handle: &VmHandle, host: &mut dyn NvHost) {
    if let Err(e) = host.resume() {
        log::error!(
            "VM {:?}: resuming after the failed checkpoint failed, the VM stays paused: {e}",
            handle.name()
        );
    }
}

/// Refuses an undo log whose area is not the one the VM's entry names (moved by another
/// `enable_checkpoints`).
fn check_area(entry: &VmEntry, area: &CheckpointArea) -> Result<()> {
    if entry.checkpoint != area.extent {
        return Err(Error::InvalidCheckpointRequest(format!(
            "VM {:?}'s checkpoint area changed under its undo log",
            entry.name
        )));
    }
    Ok(())
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

/// `buf.len()` bytes of `entry`'s guest memory from `guest_offset` as a recovery now would
/// leave them: memory as it stands, with each page the committed epoch's undo log holds put
/// back (`CheckpointArea::logged_page`). Only reads.
pub(crate) fn recoverable_memory(
    store: &dyn Persistence,
    entry: &VmEntry,
    guest_offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    let end = guest_offset
        .checked_add(buf.len() as u64)
        .filter(|end| *end <= entry.memory_size)
        .ok_or(Error::InvalidSize {
            size: guest_offset,
            reason: "the range is not inside the VM's guest memory",
        })?;
    store.read(entry.memory.offset + guest_offset, buf)?;
    let Some(epoch) = committed_epoch(store, entry)? else {
        return Ok(());
    };
    let area = CheckpointArea::new(entry.uuid, entry.checkpoint);
    let first_page = guest_offset - guest_offset % PAGE_SIZE;
    for page in (first_page..end).step_by(PAGE_SIZE as usize) {
        let Some(content) = area.logged_page(store, epoch.seq, page)? else {
            continue;
        };
        let from = page.max(guest_offset);
        let to = (page + PAGE_SIZE).min(end);
        buf[(from - guest_offset) as usize..(to - guest_offset) as usize]
            .copy_from_slice(&content[(from - page) as usize..(to - page) as usize]);
    }
    Ok(())
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

/// For a VM recorded as saved at `saved`: when `newest` is a newer slot that the area's epoch
/// record vouches for as the first epoch of a checkpointed resume from that save
/// ([`VmHandle::begin_run_checkpointed`] cut before its "running" record), the save's own slot;
/// otherwise `newest` unchanged.
pub(crate) fn behind_resume_epoch(
    store: &dyn Persistence,
    entry: &VmEntry,
    saved: u64,
    newest: Option<ValidSlot>,
) -> Result<Option<ValidSlot>> {
    let Some(slot) = newest.as_ref().filter(|slot| slot.seq > saved) else {
        return Ok(newest);
    };
    if entry.checkpoint.len == 0 {
        return Ok(newest);
    }
    let area = CheckpointArea::new(entry.uuid, entry.checkpoint);
    let vouched = area
        .newest_epoch(store)?
        .is_some_and(|e| e.seq == slot.seq && e.run_since_seq == saved);
    if !vouched {
        return Ok(newest);
    }
    state_area(entry).read_slot(store, 1 - slot.index)
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

/// Writes epoch `seq`'s old disk bytes back through `disks` and syncs them: part of the
/// rollback, before memory and before the record "saved" (so a crash recovers again, whole).
pub(crate) fn roll_back_disks(
    store: &dyn Persistence,
    entry: &VmEntry,
    seq: u64,
    disks: &mut dyn checkpoint_area::DiskUndoTarget,
) -> Result<u64> {
    CheckpointArea::new(entry.uuid, entry.checkpoint).apply_disk(store, seq, &entry.name, disks)
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

    /// Starts a resumed run that is recoverable from its first instant: like
    /// [`VmHandle::begin_run`]`(RunKind::Resume)` followed by [`VmHandle::enable_checkpoints`]
    /// and a checkpoint, without the window in between and without persisting guest memory
    /// again. Only for a VM whose record says "saved at N" (a completed save, or a recovery from
    /// an epoch: memory is durable and is exactly save N's); its state is committed again as
    /// epoch N + 1 of the new run *before* the record says "running", so every crash from here
    /// on recovers to it or to a later epoch. Returns the log armed for that epoch, empty.
    ///
    /// The VMM must write-protect all of guest RAM (as `NvHost::write_protect_memory` does)
    /// before any guest code or device writes it; a cold boot has no committed state and takes
    /// the ordinary path (`begin_run`, `enable_checkpoints`, an arming `checkpoint_vm`).
    pub fn begin_run_checkpointed(&self, undo_pages: u64) -> Result<UndoLog> {
        let log = self.enable_checkpoints(undo_pages)?;
        let mut state = log.lock_state();
        let area = state.area;
        let (saved, seq) = self
            .transact_owned(|shared, entry| {
                let RunRecord::Saved { seq: saved, .. } = entry.record else {
                    return Err(Error::InvalidCheckpointRequest(format!(
                        "VM {:?} has no completed save to resume from ({})",
                        entry.name, entry.record
                    )));
                };
                check_area(entry, &area)?;
                let store = shared.store.as_mut();
                let slots = state_area(entry);
                let newest = slots.newest(store)?;
                let slot = match &newest {
                    Some(slot) if slot.seq == saved => slot.clone(),
                    _ => {
                        return Err(Error::DamagedState {
                            vm: entry.name.clone(),
                            seq: saved,
                            detail: "no valid state slot holds the save".to_string(),
                        })
                    }
                };
                let seq = saved.checked_add(1).ok_or_else(|| {
                    Error::CorruptVmTable(format!("VM {:?}: save sequence exhausted", entry.name))
                })?;
                // Epoch record, then its slot, both before the record says "running": while it
                // still says "saved", recovery takes the save (a newer slot only where this
                // epoch record vouches for it: `behind_resume_epoch`).
                area.commit_epoch(store, seq, saved)?;
                slots.write(store, Some(&slot), seq, &slot.payload)?;
                Region::update_superblock(shared, |sb| {
                    sb.shutdown_marker = crate::superblock::ShutdownMarker::VmsRunning
                })?;
                entry.record = RunRecord::Running {
                    since_seq: saved,
                    kind: crate::vm_table::RunKind::Resume,
                };
                Ok(((saved, seq), true))
            })?
            .0;
        // As `begin_run` does: save N must never be resumed again, even from a table copy
        // rolled back by media damage; epoch `seq` holds the same state.
        self.transact_owned(|shared, entry| {
            let slots = state_area(entry);
            for index in 0..2 {
                if let Some(slot) = slots.read_slot(shared.store.as_ref(), index)? {
                    if slot.seq == saved {
                        slots.invalidate(shared.store.as_mut(), index)?;
                    }
                }
            }
            Ok(((), false))
        })?;
        state.start_epoch(seq);
        drop(state);
        Ok(log)
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
                check_area(entry, area)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::memory::MemoryBackend;
    use crate::region::OpenOptions;
    use crate::undo_log::{UndoBlock, UndoRecord};
    use crate::vm_table::RunKind;
    use crate::NvHost;
    use std::path::Path;
    use vm_memory::VolatileSlice;

    const PAGES: u64 = 8;

    #[test]
    fn page_runs_merge_adjacent_and_repeated_pages_into_ascending_ranges() {
        let page = |n: u64| n * PAGE_SIZE;
        // Blocks as the undo log lists them (each ascending, blocks in fault order), a
        // repeated page, a block adjacent to an earlier one and one overlapping it.
        let pages = [
            page(64),
            page(65),
            page(66),
            page(3),
            page(4),
            page(3),
            page(67),
            page(62),
            page(63),
            page(100),
            page(5),
        ];
        assert_eq!(
            page_runs(&pages),
            vec![
                (page(3), page(3)),
                (page(62), page(6)),
                (page(100), page(1))
            ]
        );
        assert!(page_runs(&[]).is_empty());
        assert_eq!(page_runs(&[page(7)]), vec![(page(7), page(1))]);
    }

    /// Records its calls; `state` is what `save_state` returns; can fail one step.
    #[derive(Default)]
    struct MockHost {
        calls: Vec<&'static str>,
        state: Vec<u8>,
        fail: Option<&'static str>,
    }

    impl MockHost {
        fn step(&mut self, name: &'static str) -> std::result::Result<(), HostError> {
            self.calls.push(name);
            match self.fail {
                Some(failing) if failing == name => Err(format!("{name} exploded").into()),
                _ => Ok(()),
            }
        }
    }

    impl NvHost for MockHost {
        fn pause_vcpus(&mut self) -> std::result::Result<(), HostError> {
            self.step("pause")
        }
        fn quiesce_devices(&mut self) -> std::result::Result<(), HostError> {
            self.step("quiesce")
        }
        fn guest_memory_ranges(&self) -> Vec<VolatileSlice<'_>> {
            Vec::new()
        }
        fn save_state(&mut self) -> std::result::Result<Vec<u8>, HostError> {
            self.step("save_state")?;
            Ok(self.state.clone())
        }
        fn resume(&mut self) -> std::result::Result<(), HostError> {
            self.step("resume")
        }
        fn write_protect_memory(&mut self) -> std::result::Result<(), HostError> {
            self.step("write_protect")
        }
    }

    fn running_vm() -> (Region, VmHandle) {
        let options = OpenOptions {
            format: true,
            ..OpenOptions::compact()
        };
        let region = Region::open_store(
            Box::new(MemoryBackend::default()),
            Path::new("mem"),
            &options,
        )
        .unwrap();
        region.create_vm("vm", PAGES * PAGE_SIZE, b"cfg").unwrap();
        let handle = region.claim_vm("vm").unwrap();
        handle.begin_run(RunKind::ColdBoot).unwrap();
        (region, handle)
    }

    /// What the guest does on a write fault: log the page, then write it.
    fn guest_write(handle: &VmHandle, log: &UndoLog, page: u64, byte: u8) {
        log.record_undo(page * PAGE_SIZE).unwrap();
        let mut shared = handle.region().lock();
        let at = handle.memory_region_offset() + page * PAGE_SIZE;
        shared
            .store
            .write(at, &vec![byte; PAGE_SIZE as usize])
            .unwrap();
    }

    fn memory(handle: &VmHandle) -> Vec<u8> {
        let shared = handle.region().lock();
        let mut bytes = vec![0; (PAGES * PAGE_SIZE) as usize];
        shared
            .store
            .read(handle.memory_region_offset(), &mut bytes)
            .unwrap();
        bytes
    }

    /// The region as a restarted VMM finds it after SIGKILL: the same bytes, a new claim.
    fn crash(region: &Region) -> (Region, VmHandle) {
        let bytes = {
            let shared = region.lock();
            let mut bytes = vec![0; shared.store.len() as usize];
            shared.store.read(0, &mut bytes).unwrap();
            bytes
        };
        let region = Region::open_store(
            Box::new(MemoryBackend::new(bytes)),
            Path::new("crashed"),
            &OpenOptions::default(),
        )
        .unwrap();
        // The dead process's claim is still recorded; a test process has the same pid, so
        // take it over as a restarted VMM would once the old one is gone.
        region
            .transact(|_, table| {
                table.entries[0].owner = crate::identity::OwnerRecord::default();
                Ok(((), true))
            })
            .unwrap();
        let handle = region.claim_vm("vm").unwrap();
        (region, handle)
    }

    /// The guest writes `pages` again (logged in the running epoch, so the write goes straight
    /// to memory) and the VMM dies: recovery gives back the epoch's memory, `at_epoch`.
    fn assert_logged_pages_roll_back(
        region: &Region,
        handle: &VmHandle,
        pages: &[u64],
        at_epoch: &[u8],
    ) {
        for page in pages {
            let mut shared = handle.region().lock();
            let at = handle.memory_region_offset() + page * PAGE_SIZE;
            shared.store.write(at, &[0xee; 64]).unwrap();
        }
        let (_crashed, recovered_handle) = crash(region);
        recovered_handle.recover().unwrap();
        assert_eq!(memory(&recovered_handle), at_epoch);
    }

    #[test]
    fn inspecting_a_recovery_shows_the_epochs_memory_without_writing_it() {
        let (region, handle) = running_vm();
        let log = handle.enable_checkpoints(4).unwrap();
        let mut host = MockHost {
            state: b"epoch".to_vec(),
            ..MockHost::default()
        };
        guest_write(&handle, &log, 1, 0x11);
        let epoch = checkpoint_vm(&handle, &mut host, &log).unwrap();
        let at_epoch = memory(&handle);
        guest_write(&handle, &log, 1, 0x22);
        guest_write(&handle, &log, 2, 0x33);
        guest_write(&handle, &log, 1, 0x44);
        let at_death = memory(&handle);
        assert_ne!(at_death, at_epoch);

        let (crashed, recovered_handle) = crash(&region);
        let mut inspected = vec![0; at_epoch.len()];
        let inspection = crashed
            .inspect_recovery_memory("vm", 0, &mut inspected)
            .unwrap();
        assert_eq!(
            (inspection.seq, inspection.shutdown_kind),
            (epoch.seq, ShutdownKind::Checkpoint)
        );
        assert_eq!(inspected, at_epoch);
        // A range across the edge of two logged pages takes its part of each.
        let at = 2 * PAGE_SIZE - 8;
        let mut edge = [0u8; 16];
        crashed
            .inspect_recovery_memory("vm", at, &mut edge)
            .unwrap();
        assert_eq!(edge[..], at_epoch[at as usize..at as usize + 16]);
        assert!(matches!(
            crashed.inspect_recovery_memory("vm", PAGES * PAGE_SIZE - 8, &mut edge),
            Err(Error::InvalidSize { .. })
        ));
        // Only read: memory is as the death left it until the recovery rolls it back, to
        // exactly what the inspection showed; after it, memory as it stands is the epoch's.
        assert_eq!(memory(&recovered_handle), at_death);
        assert_eq!(recovered_handle.recover().unwrap().seq, epoch.seq);
        assert_eq!(memory(&recovered_handle), at_epoch);
        let mut after = vec![0; at_epoch.len()];
        crashed
            .inspect_recovery_memory("vm", 0, &mut after)
            .unwrap();
        assert_eq!(after, at_epoch);
    }

    #[test]
    fn recovery_rolls_memory_and_state_back_to_the_last_committed_epoch() {
        let (region, handle) = running_vm();
        let log = handle.enable_checkpoints(4).unwrap();
        assert_eq!(log.record_undo(0).unwrap(), UndoRecord::NotArmed);
        let mut host = MockHost {
            state: b"epoch-1".to_vec(),
            ..MockHost::default()
        };
        guest_write(&handle, &log, 1, 0x11);
        assert_eq!(log.status().pages, 0);
        let first = checkpoint_vm(&handle, &mut host, &log).unwrap();
        assert!(first.arming);
        assert_eq!(
            host.calls,
            ["pause", "quiesce", "save_state", "write_protect", "resume"]
        );
        guest_write(&handle, &log, 1, 0x22);
        guest_write(&handle, &log, 2, 0x33);
        assert_eq!(
            log.record_undo(PAGE_SIZE).unwrap(),
            UndoRecord::AlreadyRecorded
        );
        host.state = b"epoch-2".to_vec();
        let second = checkpoint_vm(&handle, &mut host, &log).unwrap();
        assert!(!second.arming);
        assert_eq!(second.undo_pages, 2);
        assert_eq!(second.seq, first.seq + 1);
        let at_second = memory(&handle);
        // The guest moves on; a failed checkpoint in between changes nothing.
        guest_write(&handle, &log, 2, 0x44);
        guest_write(&handle, &log, 5, 0x55);
        host.fail = Some("save_state");
        assert!(checkpoint_vm(&handle, &mut host, &log).is_err());
        guest_write(&handle, &log, 7, 0x77);
        assert_eq!(log.status().pages, 3);

        let (crashed, recovered_handle) = crash(&region);
        let listed = crashed.vm("vm").unwrap();
        assert_eq!(listed.checkpoint_epoch, Some(second.seq));
        // Claimed by this (live) process here; once its owner is gone it lists as recoverable.
        assert_eq!(listed.status(), "running");
        let orphaned = crate::VmSummary {
            owner_pid: None,
            ..listed
        };
        assert_eq!(orphaned.status(), "checkpointed");
        assert_eq!(
            crashed.inspect_recovery("vm").unwrap().shutdown_kind,
            ShutdownKind::Checkpoint
        );
        let recovered = recovered_handle.recover().unwrap();
        assert_eq!(
            (
                recovered.seq,
                recovered.state_blob.as_slice(),
                recovered.shutdown_kind
            ),
            (second.seq, &b"epoch-2"[..], ShutdownKind::Checkpoint)
        );
        assert_eq!(memory(&recovered_handle), at_second);
        // Recovered once, recorded as saved at that epoch: recovering again says the same.
        assert_eq!(recovered_handle.recover().unwrap(), recovered);
        assert_eq!(crashed.vm("vm").unwrap().status(), "checkpoint-recovered");
        // The next run starts clean: its own crash before a checkpoint is unsafe.
        recovered_handle.begin_run(RunKind::Resume).unwrap();
        assert!(matches!(
            recovered_handle.recover(),
            Err(Error::UnsafeShutdown)
        ));
    }

    #[test]
    fn a_completed_power_fail_save_wins_over_the_epoch() {
        let (region, mut handle) = running_vm();
        let log = handle.enable_checkpoints(4).unwrap();
        let mut host = MockHost {
            state: b"epoch".to_vec(),
            ..MockHost::default()
        };
        checkpoint_vm(&handle, &mut host, &log).unwrap();
        guest_write(&handle, &log, 3, 0x99);
        let at_save = memory(&handle);
        host.state = b"power-fail".to_vec();
        crate::save_vm(
            &mut handle,
            &mut host,
            ShutdownKind::PowerFail,
            Duration::from_secs(5),
        )
        .unwrap();
        let (_crashed, handle) = crash(&region);
        let recovered = handle.recover().unwrap();
        assert_eq!(recovered.shutdown_kind, ShutdownKind::PowerFail);
        assert_eq!(recovered.state_blob, b"power-fail");
        assert_eq!(memory(&handle), at_save);
    }

    #[test]
    fn a_checkpointed_resume_is_recoverable_before_its_first_checkpoint() {
        let (region, mut handle) = running_vm();
        guest_write(&handle, &handle.enable_checkpoints(4).unwrap(), 0, 0x10);
        let at_save = memory(&handle);
        crate::save_vm(
            &mut handle,
            &mut MockHost {
                state: b"saved".to_vec(),
                ..MockHost::default()
            },
            ShutdownKind::PowerFail,
            Duration::from_secs(5),
        )
        .unwrap();
        let (region, handle) = {
            drop(region);
            let (crashed, handle) = crash(handle.region());
            assert_eq!(handle.recover().unwrap().state_blob, b"saved");
            (crashed, handle)
        };
        let log = handle.begin_run_checkpointed(4).unwrap();
        let epoch = log.status().epoch.unwrap();
        // The guest runs at once, protected from the first instant.
        guest_write(&handle, &log, 0, 0x20);
        guest_write(&handle, &log, 6, 0x60);
        let (_crashed, handle) = crash(&region);
        let recovered = handle.recover().unwrap();
        assert_eq!(
            (
                recovered.seq,
                recovered.state_blob.as_slice(),
                recovered.shutdown_kind
            ),
            (epoch, &b"saved"[..], ShutdownKind::Checkpoint)
        );
        assert_eq!(memory(&handle), at_save);
        // A VM without a completed save has nothing to resume checkpointed.
        handle.begin_run(RunKind::Resume).unwrap();
        assert!(matches!(
            handle.begin_run_checkpointed(4),
            Err(Error::InvalidCheckpointRequest(_))
        ));
    }

    #[test]
    fn a_full_log_refuses_until_the_next_checkpoint() {
        let (_region, handle) = running_vm();
        let log = handle.enable_checkpoints(1).unwrap();
        let capacity = log.capacity_pages();
        // 1 page asked for, the 4 KiB-aligned compact region gives exactly what fits.
        assert!((1..PAGES).contains(&capacity), "{capacity}");
        let mut host = MockHost::default();
        checkpoint_vm(&handle, &mut host, &log).unwrap();
        for page in 0..capacity {
            guest_write(&handle, &log, page, 1);
        }
        assert!(matches!(
            log.record_undo(capacity * PAGE_SIZE),
            Err(Error::UndoLogFull { capacity_pages }) if capacity_pages == capacity
        ));
        checkpoint_vm(&handle, &mut host, &log).unwrap();
        assert_eq!(
            log.record_undo(capacity * PAGE_SIZE).unwrap(),
            UndoRecord::Recorded
        );
        assert!(log.record_undo(PAGES * PAGE_SIZE).is_err());
        assert!(log.record_undo(1).is_err());
    }

    /// A block logs the faulting page and the block's pages not logged yet, as far as the log
    /// has room (the faulting page first), and recovery restores every one of them.
    #[test]
    fn a_block_logs_its_unlogged_pages_as_far_as_the_log_has_room() {
        let (region, handle) = running_vm();
        let log = handle.enable_checkpoints(4).unwrap();
        let mut host = MockHost::default();
        assert_eq!(
            log.record_undo_block(2 * PAGE_SIZE, 4).unwrap(),
            UndoBlock {
                record: UndoRecord::NotArmed,
                logged: Vec::new()
            }
        );
        checkpoint_vm(&handle, &mut host, &log).unwrap();
        let capacity = log.capacity_pages();
        assert!((4..PAGES).contains(&capacity), "{capacity}");
        guest_write(&handle, &log, 1, 0x11);
        let block = log.record_undo_block(2 * PAGE_SIZE, 4).unwrap();
        assert_eq!(block.record, UndoRecord::Recorded);
        assert_eq!(block.logged, [0, 2 * PAGE_SIZE, 3 * PAGE_SIZE]);
        assert_eq!(
            log.record_undo_block(3 * PAGE_SIZE, 4).unwrap().record,
            UndoRecord::AlreadyRecorded
        );
        assert_eq!(log.status().pages, 4);
        // The next epoch: with one free entry a block logs only its faulting page.
        checkpoint_vm(&handle, &mut host, &log).unwrap();
        let at_epoch = memory(&handle);
        for page in 1 + PAGES - capacity..PAGES {
            guest_write(&handle, &log, page, 0x40 + page as u8);
        }
        assert_eq!(log.status().pages + 1, capacity);
        let last = log.record_undo_block(PAGE_SIZE, 4).unwrap();
        assert_eq!(last.logged, [PAGE_SIZE]);
        assert!(matches!(
            log.record_undo_block(0, 4),
            Err(Error::UndoLogFull { .. })
        ));
        assert_logged_pages_roll_back(&region, &handle, &[1, 5, 6, 7], &at_epoch);
    }

    /// A device request's pages are logged all or none: a log without room for all of them
    /// logs nothing (the device defers the request to the next epoch), and recovery restores
    /// the pages it logged.
    #[test]
    fn a_device_request_logs_all_its_pages_or_none() {
        let (region, handle) = running_vm();
        let log = handle.enable_checkpoints(4).unwrap();
        let mut host = MockHost::default();
        assert_eq!(
            log.record_undo_pages(&[PAGE_SIZE]).unwrap().record,
            UndoRecord::NotArmed
        );
        checkpoint_vm(&handle, &mut host, &log).unwrap();
        let capacity = log.capacity_pages();
        assert!((4..PAGES).contains(&capacity), "{capacity}");
        let at_epoch = memory(&handle);
        // Out of order, with a duplicate: logged once each, sorted.
        let request = log
            .record_undo_pages(&[3 * PAGE_SIZE, PAGE_SIZE, 3 * PAGE_SIZE])
            .unwrap();
        assert_eq!(request.record, UndoRecord::Recorded);
        assert_eq!(request.logged, [PAGE_SIZE, 3 * PAGE_SIZE]);
        assert_eq!(
            log.record_undo_pages(&[PAGE_SIZE, 3 * PAGE_SIZE])
                .unwrap()
                .record,
            UndoRecord::AlreadyRecorded
        );
        // Fill the log but for one entry: a request of two new pages logs neither.
        let free: Vec<u64> = (0..PAGES)
            .filter(|page| ![1, 3].contains(page))
            .take((capacity - 3) as usize)
            .collect();
        for &page in &free {
            log.record_undo(page * PAGE_SIZE).unwrap();
        }
        let unlogged: Vec<u64> = (0..PAGES)
            .filter(|page| ![1, 3].contains(page) && !free.contains(page))
            .take(2)
            .map(|page| page * PAGE_SIZE)
            .collect();
        assert_eq!(unlogged.len(), 2, "the test VM has too few pages");
        let entries = log.status().entries;
        assert!(matches!(
            log.record_undo_pages(&unlogged),
            Err(Error::UndoLogFull { .. })
        ));
        assert_eq!(
            log.status().entries,
            entries,
            "a refused request logged pages"
        );
        // One of them fits; an already logged page alongside takes no entry.
        let last = log.record_undo_pages(&[unlogged[0], PAGE_SIZE]).unwrap();
        assert_eq!(last.logged, [unlogged[0]]);
        assert!(log.record_undo_pages(&[7]).is_err());
        assert_logged_pages_roll_back(&region, &handle, &[1, 3], &at_epoch);
    }

    #[test]
    fn a_failed_write_protect_withdraws_the_epoch() {
        let (region, handle) = running_vm();
        let log = handle.enable_checkpoints(4).unwrap();
        let mut host = MockHost::default();
        checkpoint_vm(&handle, &mut host, &log).unwrap();
        host.fail = Some("write_protect");
        host.calls.clear();
        let err = checkpoint_vm(&handle, &mut host, &log).unwrap_err();
        assert!(err.to_string().contains("write_protect exploded"), "{err}");
        assert_eq!(host.calls.last(), Some(&"resume"));
        assert_eq!(log.status().epoch, None);
        assert_eq!(log.record_undo(0).unwrap(), UndoRecord::NotArmed);
        let (_crashed, handle) = crash(&region);
        assert!(matches!(handle.recover(), Err(Error::UnsafeShutdown)));
    }

    #[test]
    fn epochs_of_an_earlier_run_are_never_recovered() {
        let (region, handle) = running_vm();
        let log = handle.enable_checkpoints(4).unwrap();
        let mut host = MockHost::default();
        checkpoint_vm(&handle, &mut host, &log).unwrap();
        handle.mark_powered_off().unwrap();
        handle.begin_run(RunKind::ColdBoot).unwrap();
        let (_crashed, handle) = crash(&region);
        assert!(matches!(handle.recover(), Err(Error::UnsafeShutdown)));
    }

    #[test]
    fn disabling_checkpoints_makes_a_crash_unsafe_again() {
        let (region, handle) = running_vm();
        let log = handle.enable_checkpoints(4).unwrap();
        checkpoint_vm(&handle, &mut MockHost::default(), &log).unwrap();
        handle.disable_checkpoints(&log).unwrap();
        assert_eq!(log.record_undo(0).unwrap(), UndoRecord::NotArmed);
        let (_crashed, handle) = crash(&region);
        assert!(matches!(handle.recover(), Err(Error::UnsafeShutdown)));
    }

    #[test]
    fn the_area_is_a_third_extent_the_table_keeps_and_delete_frees() {
        let (region, handle) = running_vm();
        let before = region.free_space().unwrap();
        let log = handle.enable_checkpoints(16).unwrap();
        assert_eq!(log.capacity_pages(), 16);
        let after = region.free_space().unwrap();
        assert!(after.free_bytes < before.free_bytes || region.size() > 0);
        // The same size again keeps the area; another size moves it.
        let again = handle.enable_checkpoints(16).unwrap();
        assert_eq!(again.capacity_pages(), 16);
        let (crashed, _) = crash(&region);
        let entry = crashed
            .transact(|_, table| Ok((table.entries[0].clone(), false)))
            .unwrap();
        assert_eq!(
            entry.checkpoint.len,
            checkpoint_area::area_len_for(16).unwrap()
        );
        assert_eq!(
            crashed.lock().superblock.format_version,
            FORMAT_VERSION_CHECKPOINTS
        );
        drop(handle);
        region.delete_vm("vm").unwrap();
        assert!(region.list_vms().unwrap().is_empty());
    }

    /// A disk image in memory, as the VMM's recovery target sees it.
    #[derive(Default)]
    struct VecDisks {
        disks: Vec<Vec<u8>>,
        synced: Vec<u16>,
    }

    impl crate::DiskUndoTarget for VecDisks {
        fn write_disk(
            &mut self,
            disk: u16,
            offset: u64,
            data: &[u8],
        ) -> std::result::Result<(), HostError> {
            let image = self.disks.get_mut(disk as usize).ok_or("no such disk")?;
            image[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn sync_disk(&mut self, disk: u16) -> std::result::Result<(), HostError> {
            self.synced.push(disk);
            Ok(())
        }
    }

    /// What the block device does: log the old bytes, then write.
    fn disk_write(log: &UndoLog, disks: &mut VecDisks, disk: u16, offset: u64, bytes: &[u8]) {
        let image = &mut disks.disks[disk as usize];
        let len = image.len() as u64;
        let snapshot = image.clone();
        let mut read_old = |at: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&snapshot[at as usize..at as usize + buf.len()]);
            Ok(())
        };
        log.record_disk_write(disk, offset, bytes.len() as u64, len, &mut read_old)
            .unwrap();
        image[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
    }

    #[test]
    fn recovery_rolls_disks_back_with_memory() {
        let (region, handle) = running_vm();
        let log = handle.enable_checkpoints(16).unwrap();
        // Disk 1 ends with a partial block (3.5 blocks); disk 0 is two blocks.
        let mut disks = VecDisks {
            disks: vec![vec![0xd0; 8192], vec![0xd1; 3 * 4096 + 2048]],
            ..VecDisks::default()
        };
        // Before the first checkpoint nothing is armed.
        let mut never = |_: u64, _: &mut [u8]| -> std::io::Result<()> { panic!("read") };
        assert_eq!(
            log.record_disk_write(0, 0, 512, 8192, &mut never).unwrap(),
            UndoRecord::NotArmed
        );
        let mut host = MockHost {
            state: b"epoch-1".to_vec(),
            ..MockHost::default()
        };
        checkpoint_vm(&handle, &mut host, &log).unwrap();
        disk_write(&log, &mut disks, 1, 4096 - 512, &[1; 1536]);
        guest_write(&handle, &log, 1, 0x11);
        host.state = b"epoch-2".to_vec();
        let second = checkpoint_vm(&handle, &mut host, &log).unwrap();
        assert_eq!((second.undo_pages, log.disk_blocks_logged()), (1, 0));
        let (disks_at_second, memory_at_second) = (disks.disks.clone(), memory(&handle));
        // Across two blocks, the same block again (logged once), the partial last block, and
        // guest pages logged in between share the log.
        disk_write(&log, &mut disks, 1, 4096 - 512, &[2; 1024]);
        guest_write(&handle, &log, 2, 0x22);
        disk_write(&log, &mut disks, 1, 4096, &[3; 512]);
        disk_write(&log, &mut disks, 1, 3 * 4096, &[4; 2048]);
        disk_write(&log, &mut disks, 0, 4096, &[5; 4096]);
        assert_eq!(log.disk_blocks_logged(), 4);
        assert_eq!(log.status().pages, 1);
        let mut again = |_: u64, _: &mut [u8]| -> std::io::Result<()> { panic!("read again") };
        assert_eq!(
            log.record_disk_write(1, 4096, 4096, 14336, &mut again)
                .unwrap(),
            UndoRecord::AlreadyRecorded
        );
        // Ranges that are not whole sectors of the disk are refused.
        assert!(log
            .record_disk_write(1, 100, 512, 14336, &mut again)
            .is_err());
        assert!(log
            .record_disk_write(1, 14336, 512, 14336, &mut again)
            .is_err());
        assert_ne!(disks.disks, disks_at_second);

        let (crashed, handle) = crash(&region);
        // Without the disks, recovery refuses rather than roll back memory alone.
        let refused = handle.recover().unwrap_err();
        assert!(
            matches!(refused, Error::DiskUndo { disk: 0 | 1, .. }),
            "{refused}"
        );
        let recovered = handle.recover_with_disks(&mut disks).unwrap();
        assert_eq!(recovered.seq, second.seq);
        assert_eq!(recovered.state_blob, b"epoch-2");
        assert_eq!(disks.disks, disks_at_second);
        assert_eq!(memory(&handle), memory_at_second);
        disks.synced.sort_unstable();
        assert_eq!(disks.synced, [0, 1]);
        // Recorded as saved at the epoch: recovering again touches no disk.
        assert_eq!(handle.recover().unwrap(), recovered);
        drop(crashed);
    }

    #[test]
    fn disk_blocks_fill_the_log_with_pages() {
        let (_region, handle) = running_vm();
        let log = handle.enable_checkpoints(1).unwrap();
        let capacity = log.capacity_pages();
        let mut host = MockHost::default();
        checkpoint_vm(&handle, &mut host, &log).unwrap();
        guest_write(&handle, &log, 0, 1);
        let disk_len = (capacity + 4) * 4096;
        let mut disks = VecDisks {
            disks: vec![vec![7; disk_len as usize]],
            ..VecDisks::default()
        };
        let mut read_old = |_: u64, buf: &mut [u8]| {
            buf.fill(7);
            Ok(())
        };
        // capacity - 1 entries are left: a write of `capacity` blocks logs what fits, then
        // says full; after the checkpoint it goes through.
        let len = capacity * 4096;
        assert!(matches!(
            log.record_disk_write(0, 0, len, disk_len, &mut read_old),
            Err(Error::UndoLogFull { .. })
        ));
        assert_eq!(log.disk_blocks_logged(), capacity - 1);
        assert!(matches!(
            log.record_undo(PAGE_SIZE),
            Err(Error::UndoLogFull { .. })
        ));
        checkpoint_vm(&handle, &mut host, &log).unwrap();
        assert_eq!(
            log.record_disk_write(0, 0, len, disk_len, &mut read_old)
                .unwrap(),
            UndoRecord::Recorded
        );
        // More blocks than the log holds can never fit: refused, not full.
        assert!(matches!(
            log.record_disk_write(0, 0, len + 4096, disk_len, &mut read_old),
            Err(Error::InvalidCheckpointRequest(_))
        ));
        disk_write(&log, &mut disks, 0, 0, &[1; 512]);
    }
}
