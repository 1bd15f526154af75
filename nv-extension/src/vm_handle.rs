//! A claimed VM: guest memory backing, run records, saves and recovery.

use std::fs::File;

use vm_memory::VolatileSlice;

use crate::checkpoint;
use crate::checkpoint_area::{CheckpointArea, DiskUndoTarget, NoDisks};
use crate::coordinator::SaveReport;
use crate::error::{Error, Result};
use crate::fault_injection::{self, FaultPoint};
use crate::identity::{OwnerRecord, Uuid};
use crate::persistence::{cache_flush, Persistence, PersistenceMode};
use crate::region::{find_mut, Region, Shared};
use crate::save_report;
use crate::state_slots::{SlotCondition, StateArea};
use crate::superblock::ShutdownMarker;
use crate::vm_table::{Extent, RunKind, RunRecord, ShutdownKind, StopCause, VmEntry, VmTable};

/// Where the VMM maps guest RAM from.
#[derive(Debug)]
pub struct MemoryBacking {
    /// A duplicate of the region's descriptor; map it `MAP_SHARED` (and `MAP_SYNC` when `dax`).
    pub file: File,
    pub offset: u64,
    pub size: u64,
    pub dax: bool,
}

impl MemoryBacking {
    /// `size` bytes of guest RAM at `extent` of the region `shared` describes.
    pub(crate) fn of_extent(shared: &Shared, extent: Extent, size: u64) -> Result<MemoryBacking> {
        let file = shared
            .store
            .file()
            .ok_or(Error::NoFileBacking {
                operation: "mapping guest memory",
            })?
            .try_clone()
            .map_err(|e| Error::io("duplicating the region descriptor", e))?;
        Ok(MemoryBacking {
            file,
            offset: extent.offset,
            size,
            dax: shared.store.mode().is_dax(),
        })
    }
}

/// What recovery hands back to the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredVm {
    pub config_blob: Vec<u8>,
    pub state_blob: Vec<u8>,
    pub seq: u64,
    pub shutdown_kind: ShutdownKind,
}

pub(crate) fn state_area(entry: &VmEntry) -> StateArea {
    StateArea {
        vm_uuid: entry.uuid,
        area: entry.state,
    }
}

/// The resumable state of a VM: only a complete save that the run record vouches for.
pub(crate) fn recoverable_state(store: &dyn Persistence, entry: &VmEntry) -> Result<RecoveredVm> {
    if let Some(swap) = &entry.swap {
        return Err(Error::SwappedOut {
            vm: entry.name.clone(),
            path: swap.path.clone(),
        });
    }
    let (seq, kind) = match entry.record {
        RunRecord::Saved { seq, kind } => (seq, kind),
        // Died without a save: only a committed checkpoint epoch of this run can bring it back.
        RunRecord::Running { .. } => return checkpoint::recoverable_epoch(store, entry),
        RunRecord::Created | RunRecord::PoweredOff { .. } => {
            return Err(Error::NothingToRecover(entry.name.clone()))
        }
    };
    let area = state_area(entry);
    // A checkpointed resume cut before its record said "running" left its first epoch's slot
    // (a copy of save `seq`) next to the save: the save stands.
    let newest = checkpoint::behind_resume_epoch(store, entry, seq, area.newest(store)?)?;
    match newest {
        Some(slot) if slot.seq == seq => Ok(RecoveredVm {
            config_blob: entry.config.clone(),
            state_blob: slot.payload,
            seq,
            shutdown_kind: kind,
        }),
        // A slot newer than the record: a save that never committed. Trust neither.
        Some(slot) if slot.seq > seq => Err(Error::UnsafeShutdown),
        // The commit made slot `seq` durable before the record named it, and nothing touches
        // that slot until the record says "running" again: whatever is wrong with it now
        // happened to the medium, and the operator must hear that, not "unsafe shutdown".
        _ => Err(Error::DamagedState {
            vm: entry.name.clone(),
            seq,
            detail: damaged_slot_detail(store, &area, seq)?,
        }),
    }
}

/// Which slot fails and how, for a committed save `seq` that no valid slot holds.
fn damaged_slot_detail(store: &dyn Persistence, area: &StateArea, seq: u64) -> Result<String> {
    let conditions = [area.inspect_slot(store, 0)?, area.inspect_slot(store, 1)?];
    // The slot whose intact header names the save, then any slot with a damaged header.
    let named = conditions
        .iter()
        .enumerate()
        .find_map(|(index, c)| match c {
            SlotCondition::Damaged {
                seq: Some(found),
                what,
            } if *found == seq => Some((index, *what)),
            _ => None,
        });
    let damaged_header = conditions
        .iter()
        .enumerate()
        .find_map(|(index, c)| match c {
            SlotCondition::Damaged { seq: None, what } => Some((index, *what)),
            _ => None,
        });
    Ok(match named.or(damaged_header) {
        Some((index, what)) => format!("state slot {index}: {what}"),
        None => "no state slot holds it (slot headers missing or overwritten)".to_string(),
    })
}

/// Exclusive use of one VM of a region by this process.
pub struct VmHandle {
    pub(crate) region: Region,
    pub(crate) name: String,
    uuid: Uuid,
    pub(crate) claim: OwnerRecord,
    memory_size: u64,
    pub(crate) memory: Extent,
    /// Set by a completed swap-out: the VM is no longer in the region, this handle owns nothing.
    pub(crate) swapped_out: Option<std::path::PathBuf>,
}

impl VmHandle {
    /// A handle for `entry`, whose owner record `claim` has just been committed.
    pub(crate) fn new(region: Region, entry: &VmEntry, claim: OwnerRecord) -> Self {
        VmHandle {
            region,
            name: entry.name.clone(),
            uuid: entry.uuid,
            claim,
            memory_size: entry.memory_size,
            memory: entry.memory,
            swapped_out: None,
        }
    }

    /// Refuses once this handle's VM has been swapped out.
    pub(crate) fn check_resident(&self) -> Result<()> {
        match &self.swapped_out {
            Some(path) => Err(Error::SwappedOut {
                vm: self.name.clone(),
                path: path.clone(),
            }),
            None => Ok(()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    pub fn memory_size(&self) -> u64 {
        self.memory_size
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    pub fn persistence_mode(&self) -> PersistenceMode {
        self.region.persistence_mode()
    }

    /// Runs `change` on this VM's entry, after checking this handle still owns it.
    pub(crate) fn transact_owned<T>(
        &self,
        change: impl FnOnce(&mut Shared, &mut VmEntry) -> Result<(T, bool)>,
    ) -> Result<(T, VmTable)> {
        self.check_resident()?;
        self.region.transact(|shared, table| {
            let entry = find_mut(table, &self.name)?;
            if entry.owner != self.claim {
                return Err(Error::OwnershipLost(self.name.clone()));
            }
            let (value, changed) = change(shared, entry)?;
            Ok(((value, table.clone()), changed))
        })
    }

    /// The file, offset and size the VMM maps guest RAM from.
    pub fn memory_backing(&self) -> Result<MemoryBacking> {
        self.check_resident()?;
        MemoryBacking::of_extent(&self.region.lock(), self.memory, self.memory_size)
    }

    pub fn config_blob(&self) -> Result<Vec<u8>> {
        Ok(self
            .transact_owned(|_, entry| Ok((entry.config.clone(), false)))?
            .0)
    }

    pub fn set_config_blob(&self, config_blob: &[u8]) -> Result<()> {
        self.transact_owned(|_, entry| {
            entry.config = config_blob.to_vec();
            Ok(((), true))
        })
        .map(|_| ())
    }

    /// Records "running since seq N" durably; call before any guest code runs.
    ///
    /// Once that record is durable, the slot holding state N is destroyed as
    /// well: guest memory is about to move on, so state N must never be
    /// resumed again, even if media damage to the newest VM-table copy rolls
    /// the table back to the copy that still said "saved at seq N".
    pub fn begin_run(&self, kind: RunKind) -> Result<()> {
        let (since_seq, _) = self.transact_owned(|shared, entry| {
            // Epochs of an earlier run go before the record says "running": none may ever be
            // taken for one of this run.
            if entry.checkpoint.len > 0 {
                CheckpointArea::new(entry.uuid, entry.checkpoint).disarm(shared.store.as_mut())?;
            }
            // Region marker first: a running VM always implies a dirty region.
            Region::update_superblock(shared, |sb| {
                sb.shutdown_marker = ShutdownMarker::VmsRunning
            })?;
            let since_seq = entry.record.last_seq();
            entry.record = RunRecord::Running { since_seq, kind };
            Ok((since_seq, true))
        })?;
        if since_seq == 0 {
            return Ok(());
        }
        self.transact_owned(|shared, entry| {
            let area = state_area(entry);
            if let Some(slot) = area.newest(shared.store.as_ref())? {
                if slot.seq == since_seq {
                    area.invalidate(shared.store.as_mut(), slot.index)?;
                }
            }
            Ok(((), false))
        })
        .map(|_| ())
    }

    /// Records that the guest stopped without a save (powered off); the next start is cold.
    pub fn mark_powered_off(&self) -> Result<()> {
        self.mark_stopped(StopCause::PowerOff)
    }

    /// Records that the VM stopped without a save for `cause` (a clean power-off, a guest reset
    /// or triple fault the VMM ended on); the next start is cold.
    pub fn mark_stopped(&self, cause: StopCause) -> Result<()> {
        let ((), table) = self.transact_owned(|_, entry| {
            entry.record = RunRecord::PoweredOff {
                after_seq: entry.record.last_seq(),
                cause,
            };
            Ok(((), true))
        })?;
        self.mark_clean_if_idle(&table)
    }

    /// The last complete save, if the VM's record says it ended with one. Refused when the
    /// region's path no longer names the file this handle holds: a VM resumed from it would
    /// save where no later recovery looks.
    ///
    /// A VM that died without a save but with a committed checkpoint epoch is rolled back to
    /// it here: its undo log is applied to guest memory and it is recorded as saved at that
    /// epoch (`ShutdownKind::Checkpoint`), so a crash during this recovers again.
    ///
    /// An epoch that logged disk writes is refused here (`DiskUndo`): use
    /// [`VmHandle::recover_with_disks`].
    pub fn recover(&self) -> Result<RecoveredVm> {
        self.recover_with_disks(&mut NoDisks)
    }

    /// [`VmHandle::recover`], and a rollback to a checkpoint epoch also writes the epoch's old
    /// disk bytes back through `disks` (then syncs them) before guest memory is rolled back and
    /// the VM recorded as saved.
    pub fn recover_with_disks(&self, disks: &mut dyn DiskUndoTarget) -> Result<RecoveredVm> {
        self.region.check_path()?;
        let (recovered, table) = self.transact_owned(|shared, entry| {
            let recovered = recoverable_state(shared.store.as_ref(), entry)?;
            if !matches!(entry.record, RunRecord::Running { .. }) {
                return Ok((recovered, false));
            }
            let disk_blocks =
                checkpoint::roll_back_disks(shared.store.as_ref(), entry, recovered.seq, disks)?;
            if disk_blocks > 0 {
                log::info!(
                    "VM {:?}: {disk_blocks} disk blocks rolled back to checkpoint epoch {}",
                    entry.name,
                    recovered.seq
                );
            }
            let applied = checkpoint::roll_back(shared.store.as_mut(), entry, &recovered)?;
            log::info!(
                "VM {:?}: rolled back to checkpoint epoch {} ({applied} undo pages applied)",
                entry.name,
                recovered.seq
            );
            Ok((recovered, true))
        })?;
        if recovered.shutdown_kind == ShutdownKind::Checkpoint {
            self.mark_clean_if_idle(&table)?;
        }
        Ok(recovered)
    }

    /// Makes guest memory durable: msync of the extent, or cache write-back on DAX.
    ///
    /// `host_ranges` are the VMM's own mappings of guest RAM; on DAX they are
    /// flushed directly (the lines are in this CPU's caches under those
    /// addresses). Without them the region's own mapping of the extent is used.
    pub fn persist_guest_memory(&self, host_ranges: &[VolatileSlice<'_>]) -> Result<()> {
        self.check_resident()?;
        let mut shared = self.region.lock();
        if shared.store.mode().is_dax() && !host_ranges.is_empty() {
            for range in host_ranges {
                let start = range.ptr_guard();
                // SAFETY: a `VolatileSlice` is valid memory of `len()` bytes for as long as it
                // lives, and it outlives this call; write-back only moves cache lines.
                unsafe { cache_flush::write_back(start.as_ptr(), range.len())? };
            }
            return Ok(());
        }
        shared.store.persist(self.memory.offset, self.memory_size)
    }

    /// Commits a saved state: payload, slot header, then "saved at seq N". Returns N.
    pub fn commit_state(&self, state_blob: &[u8], kind: ShutdownKind) -> Result<u64> {
        let (seq, table) = self.transact_owned(|shared, entry| {
            let area = state_area(entry);
            let newest = area.newest(shared.store.as_ref())?;
            let seq = entry
                .record
                .last_seq()
                .max(newest.as_ref().map_or(0, |s| s.seq))
                .checked_add(1)
                .ok_or_else(|| {
                    Error::CorruptVmTable(format!("VM {:?}: save sequence exhausted", entry.name))
                })?;
            // The standing checkpoint epoch's slot survives a save cut short: it may be all
            // that recovery has.
            let keep = checkpoint::slot_to_keep(shared.store.as_ref(), entry)?.or(newest);
            area.write(shared.store.as_mut(), keep.as_ref(), seq, state_blob)?;
            fault_injection::reached(FaultPoint::CommitHeader);
            entry.record = RunRecord::Saved { seq, kind };
            Ok((seq, true))
        })?;
        self.mark_clean_if_idle(&table)?;
        Ok(seq)
    }

    /// Keeps `report` (of the save just committed) in the region, next to its state, for
    /// whoever opens the region later. Outside the commit protocol: the save is complete
    /// whether or not this runs. Returns `false` when the state filled its slot and left no room.
    pub fn record_save_report(&self, report: &SaveReport) -> Result<bool> {
        Ok(self
            .transact_owned(|shared, entry| {
                let area = state_area(entry);
                let written = match area.newest(shared.store.as_ref())? {
                    Some(slot) if slot.seq == report.seq => save_report::write(
                        shared.store.as_mut(),
                        &area,
                        slot.index,
                        slot.payload.len() as u64,
                        report,
                    )?,
                    // Not the committed save (it cannot be, under the claim): keep nothing.
                    _ => false,
                };
                Ok((written, false))
            })?
            .0)
    }

    /// The report of the VM's last completed save, if it was recorded (see `save_report`).
    pub fn last_save_report(&self) -> Result<Option<SaveReport>> {
        self.region.last_save_report(&self.name)
    }

    /// Sets the region's clean marker once no VM is recorded as running.
    fn mark_clean_if_idle(&self, table: &VmTable) -> Result<()> {
        let running = |t: &VmTable| {
            t.entries
                .iter()
                .any(|e| matches!(e.record, RunRecord::Running { .. }))
        };
        if running(table) {
            return Ok(());
        }
        // Re-check under the lock: another process may have started a VM since.
        self.region.transact(|shared, current| {
            if !running(current) {
                Region::update_superblock(shared, |sb| sb.shutdown_marker = ShutdownMarker::Clean)?;
            }
            Ok(((), false))
        })
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        let claim = self.claim;
        if self.swapped_out.is_some() {
            // The swap-out cleared the owner record with the VM's extents: nothing to undo.
            claim.release();
            return;
        }
        let released = self
            .region
            .transact(|_, table| match table.find_mut(&self.name) {
                Some(entry) if entry.owner == claim => {
                    entry.owner = OwnerRecord::default();
                    Ok(((), true))
                }
                _ => Ok(((), false)),
            });
        if let Err(e) = released {
            // The record stays; it is stale as soon as this process exits.
            log::warn!("VM {:?}: could not clear the owner record: {e}", self.name);
        }
        claim.release();
    }
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VmHandle({:?}, {})", self.name, self.uuid)
    }
}
