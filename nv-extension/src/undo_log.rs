//! The live undo log of a checkpointing VM: what the VMM's write-fault handler calls.
//!
//! At each checkpoint the VMM write-protects guest RAM; the first write to a page in the new
//! epoch faults to its handler thread, which calls [`UndoLog::record_undo`] with the page's
//! offset. That copies the page's current content (still the epoch's, the guest is blocked on
//! it) into the region's undo log and makes it durable before returning; only then may the
//! handler lift the protection. The checkpoint walk (`checkpoint::checkpoint_vm`) starts each
//! epoch on the same log, so the two never interleave half-way.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::checkpoint_area::{CheckpointArea, PAGE_SIZE};
use crate::error::{Error, Result};
use crate::region::Region;
use crate::vm_table::Extent;

/// What [`UndoLog::record_undo`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UndoRecord {
    /// The page's content is durable in the log: the page may be written.
    Recorded,
    /// The page was logged in this epoch already: it may be written.
    AlreadyRecorded,
    /// No epoch is armed (before the first checkpoint, or after checkpoints were disabled):
    /// nothing can be rolled back, so nothing is logged and the page may be written.
    NotArmed,
}

/// What [`UndoLog::record_undo_block`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UndoBlock {
    /// What happened to the faulting page.
    pub record: UndoRecord,
    /// The guest offsets logged by this call (the faulting page among them when `record` is
    /// `Recorded`; empty otherwise), sorted.
    pub logged: Vec<u64>,
}

/// Counters of the current epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UndoLogStatus {
    /// The committed epoch (its state sequence) being logged against; `None` when not armed.
    pub epoch: Option<u64>,
    /// Pages logged in this epoch.
    pub pages: u64,
    /// Entries taken in this epoch: pages and disk blocks (each takes one entry).
    pub entries: u64,
    /// Entries (pages or disk blocks) the log holds at most.
    pub capacity_pages: u64,
}

pub(crate) struct LogState {
    pub(crate) area: CheckpointArea,
    /// The VM's guest RAM in the region, and its size.
    pub(crate) memory: Extent,
    pub(crate) memory_size: u64,
    /// The epoch entries are logged against; `None`: not armed.
    pub(crate) epoch: Option<u64>,
    /// Guest offsets logged in this epoch, in log order (the next entry's index is the length).
    pub(crate) pages: Vec<u64>,
    /// One bit per guest page: logged in this epoch.
    logged: Vec<u64>,
    /// Disk blocks logged in this epoch, as (disk, block number), and how many entries they
    /// took (the log's entries are pages and disk blocks, in the order they were recorded).
    pub(crate) disk_blocks: std::collections::HashSet<(u16, u64)>,
}

impl LogState {
    fn bit(&self, page_offset: u64) -> (usize, u64) {
        let page = page_offset / PAGE_SIZE;
        ((page / 64) as usize, 1 << (page % 64))
    }

    fn is_logged(&self, page_offset: u64) -> bool {
        let (word, mask) = self.bit(page_offset);
        self.logged[word] & mask != 0
    }

    /// Entries of the log taken in this epoch (pages and disk blocks): the next entry's index.
    pub(crate) fn entries_used(&self) -> u64 {
        (self.pages.len() + self.disk_blocks.len()) as u64
    }

    /// Starts logging against epoch `seq` (just committed) with an empty log.
    pub(crate) fn start_epoch(&mut self, seq: u64) {
        self.disk_blocks.clear();
        for page in std::mem::take(&mut self.pages) {
            let (word, mask) = self.bit(page);
            self.logged[word] &= !mask;
        }
        self.epoch = Some(seq);
    }

    /// Disarms durably: no epoch of this run can be recovered any more.
    pub(crate) fn disarm(&mut self, region: &Region) -> Result<()> {
        let mut shared = region.lock();
        self.area.disarm(shared.store.as_mut())?;
        self.start_epoch(0);
        self.epoch = None;
        Ok(())
    }
}

/// A VM's undo log, shared by the fault-handler thread and the checkpoint walk. Cheap to clone;
/// every clone is the same log.
#[derive(Clone)]
pub struct UndoLog {
    state: Arc<Mutex<LogState>>,
    region: Region,
    vm: String,
}

impl UndoLog {
    pub(crate) fn new(
        region: Region,
        vm: &str,
        area: CheckpointArea,
        memory: Extent,
        memory_size: u64,
    ) -> Self {
        let pages = memory_size.div_ceil(PAGE_SIZE);
        UndoLog {
            state: Arc::new(Mutex::new(LogState {
                area,
                memory,
                memory_size,
                epoch: None,
                pages: Vec::new(),
                logged: vec![0; pages.div_ceil(64) as usize],
                disk_blocks: Default::default(),
            })),
            region,
            vm: vm.to_string(),
        }
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, LogState> {
        // Every change to the state is complete before its guard drops, except a failed
        // write_entry, which leaves the next index unused: a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn region(&self) -> &Region {
        &self.region
    }

    /// The VM this log belongs to.
    pub fn vm_name(&self) -> &str {
        &self.vm
    }

    /// Logs the current content of the guest page at byte offset `page_offset` (4 KiB aligned,
    /// inside guest memory) for the current epoch, durably, before it returns; call it from the
    /// write-fault handler before lifting the page's write protection, and lift it only on
    /// `Ok`. Takes a mutex and the region's in-process lock; no cross-process lock, no syscall
    /// but the persist (msync of 4 KiB + 64 bytes, or cache write-back on DAX).
    ///
    /// `Err(UndoLogFull)`: the log holds its capacity; leave the page protected and the vCPU
    /// blocked, ask for a checkpoint (which starts a new, empty epoch), then call again.
    pub fn record_undo(&self, page_offset: u64) -> Result<UndoRecord> {
        Ok(self.record_undo_block(page_offset, 1)?.record)
    }

    /// As [`UndoLog::record_undo`] for the page at `page_offset`, and with it every other page
    /// of its aligned block of `block_pages` pages (a power of two) not yet logged in this
    /// epoch, as far as the log has room (the faulting page first): one fault then pays for a
    /// block the guest is about to write. The pages' data is made durable in one persist, then
    /// their headers in one. The handler may lift the protection of exactly the pages in
    /// [`UndoBlock::logged`] (sorted), and of no other: every page not logged in the epoch
    /// must stay write-protected.
    pub fn record_undo_block(&self, page_offset: u64, block_pages: u64) -> Result<UndoBlock> {
        let mut state = self.lock_state();
        if !page_offset.is_multiple_of(PAGE_SIZE) || page_offset >= state.memory_size {
            return Err(Error::InvalidCheckpointRequest(format!(
                "page offset {page_offset:#x} is not a 4 KiB page of the VM's {} bytes",
                state.memory_size
            )));
        }
        let nothing = |record| UndoBlock {
            record,
            logged: Vec::new(),
        };
        let Some(epoch) = state.epoch else {
            return Ok(nothing(UndoRecord::NotArmed));
        };
        if state.is_logged(page_offset) {
            return Ok(nothing(UndoRecord::AlreadyRecorded));
        }
        let index = state.entries_used();
        let room = state.area.capacity.saturating_sub(index);
        if room == 0 {
            return Err(Error::UndoLogFull {
                capacity_pages: state.area.capacity,
            });
        }
        let block_bytes = block_pages.max(1).next_power_of_two() * PAGE_SIZE;
        let block_start = page_offset & !(block_bytes - 1);
        let block_end = (block_start + block_bytes).min(state.memory_size);
        let mut targets = vec![page_offset];
        targets.extend(
            (block_start..block_end)
                .step_by(PAGE_SIZE as usize)
                .filter(|&page| page != page_offset && !state.is_logged(page))
                .take(room as usize - 1),
        );
        self.log_pages(&mut state, epoch, targets)
    }

    /// Logs every page of `page_offsets` (4 KiB aligned, inside guest memory, in any order,
    /// duplicates allowed) not yet logged in this epoch, **all or none**, durably before it
    /// returns: their data in one persist, then their headers in one. A device thread calls it
    /// at a request boundary with every page the request will write, before it writes any
    /// (`docs/checkpoints.md` section 9): `Err(UndoLogFull)` when the log has no room for all
    /// of them, and then nothing was logged. `AlreadyRecorded` when every page was logged
    /// already; [`UndoBlock::logged`] names the pages this call logged.
    pub fn record_undo_pages(&self, page_offsets: &[u64]) -> Result<UndoBlock> {
        let mut state = self.lock_state();
        if let Some(&bad) = page_offsets
            .iter()
            .find(|&&page| !page.is_multiple_of(PAGE_SIZE) || page >= state.memory_size)
        {
            return Err(Error::InvalidCheckpointRequest(format!(
                "page offset {bad:#x} is not a 4 KiB page of the VM's {} bytes",
                state.memory_size
            )));
        }
        let Some(epoch) = state.epoch else {
            return Ok(UndoBlock {
                record: UndoRecord::NotArmed,
                logged: Vec::new(),
            });
        };
        let mut targets: Vec<u64> = page_offsets
            .iter()
            .copied()
            .filter(|&page| !state.is_logged(page))
            .collect();
        targets.sort_unstable();
        targets.dedup();
        if targets.is_empty() {
            return Ok(UndoBlock {
                record: UndoRecord::AlreadyRecorded,
                logged: Vec::new(),
            });
        }
        let room = state.area.capacity.saturating_sub(state.entries_used());
        if (targets.len() as u64) > room {
            return Err(Error::UndoLogFull {
                capacity_pages: state.area.capacity,
            });
        }
        self.log_pages(&mut state, epoch, targets)
    }

    /// Writes `targets` (not logged in the epoch, at most the log's room) as the next entries,
    /// data then headers, each persisted, and marks them logged.
    fn log_pages(
        &self,
        state: &mut LogState,
        epoch: u64,
        mut targets: Vec<u64>,
    ) -> Result<UndoBlock> {
        let index = state.entries_used();
        {
            let mut shared = self.region.lock();
            let mut data = vec![0u8; targets.len() * PAGE_SIZE as usize];
            for (&target, page) in targets
                .iter()
                .zip(data.chunks_exact_mut(PAGE_SIZE as usize))
            {
                shared.store.read(state.memory.offset + target, page)?;
            }
            state
                .area
                .write_entries(shared.store.as_mut(), index, epoch, &targets, &data)?;
        }
        for &target in &targets {
            let (word, mask) = state.bit(target);
            state.logged[word] |= mask;
            state.pages.push(target);
        }
        targets.sort_unstable();
        Ok(UndoBlock {
            record: UndoRecord::Recorded,
            logged: targets,
        })
    }

    /// Whether the page at `page_offset` is logged in the current epoch (its content at the
    /// epoch is durable, so it may be written).
    pub fn is_logged(&self, page_offset: u64) -> bool {
        let state = self.lock_state();
        state.epoch.is_some() && page_offset < state.memory_size && state.is_logged(page_offset)
    }

    /// The current epoch and how full its log is.
    pub fn status(&self) -> UndoLogStatus {
        let state = self.lock_state();
        UndoLogStatus {
            epoch: state.epoch,
            pages: state.pages.len() as u64,
            entries: state.entries_used(),
            capacity_pages: state.area.capacity,
        }
    }

    /// Pages the log holds at most per epoch.
    pub fn capacity_pages(&self) -> u64 {
        self.lock_state().area.capacity
    }
}

impl std::fmt::Debug for UndoLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UndoLog({:?}, {:?})", self.vm, self.status())
    }
}

/// The fault-handler thread holds a clone while the control loop checkpoints.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<UndoLog>();
};
