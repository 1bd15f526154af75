//! Disk writes in a checkpointing VM: the old bytes of every disk block written after the
//! epoch began go into the same undo log as guest pages, durable before the write, and
//! recovery writes them back, so the disk matches the rolled-back memory.
//!
//! The VMM's block device asks [`UndoLog::record_disk_write`] before each write (and before
//! anything else that changes the image), with a function that reads the image's current
//! bytes. Blocks are 4 KiB ([`DISK_UNDO_BLOCK`]), aligned on the disk; each is logged at most
//! once per epoch (the first write's old content is the epoch's). Recovery reaches the disks
//! only through a [`DiskUndoTarget`] the VMM gives to [`VmHandle::recover_with_disks`]: this
//! crate never opens a disk. Format and the ordering argument: `docs/checkpoints.md`.

use std::io;

use crate::checkpoint_area::{DiskUndoBlock, DISK_UNDO_BLOCK, DISK_UNDO_SECTOR};
use crate::error::{Error, Result};
use crate::undo_log::{UndoLog, UndoRecord};

impl UndoLog {
    /// Logs, for the current epoch and durably before it returns, the bytes of disk `disk`
    /// (its position in the VM's stored configuration; `disk_len` bytes, a multiple of 512)
    /// that a write of `len` bytes at `offset` (both multiples of 512) is about to change:
    /// every 4 KiB block it touches that this epoch has not logged yet. `read_old(offset, buf)`
    /// fills `buf` with the image's current bytes at `offset`; it is called under the log's
    /// lock, so it must not wait for the checkpoint. Call it from the device's I/O path, and
    /// write only on `Ok`.
    ///
    /// `Ok(Recorded)`: some blocks were logged now; `Ok(AlreadyRecorded)`: all were before;
    /// `Ok(NotArmed)`: no epoch stands, nothing to log. `Err(UndoLogFull)`: the blocks that fit
    /// were logged, the rest not: do not write; ask for a checkpoint and call again after it.
    /// A write needing more blocks than the whole log holds is refused
    /// (`InvalidCheckpointRequest`), as is a range outside the disk.
    pub fn record_disk_write(
        &self,
        disk: u16,
        offset: u64,
        len: u64,
        disk_len: u64,
        read_old: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<UndoRecord> {
        let aligned = [offset, len, disk_len]
            .iter()
            .all(|v| v.is_multiple_of(DISK_UNDO_SECTOR));
        let end = offset.checked_add(len).filter(|&end| end <= disk_len);
        let Some(end) = end.filter(|_| aligned && len > 0) else {
            return Err(Error::InvalidCheckpointRequest(format!(
                "disk {disk}: a write of {len} bytes at {offset:#x} is not whole sectors of its \
                 {disk_len} bytes"
            )));
        };
        let mut state = self.lock_state();
        let Some(epoch) = state.epoch else {
            return Ok(UndoRecord::NotArmed);
        };
        let capacity = state.area.capacity;
        let (first_block, last_block) = (offset / DISK_UNDO_BLOCK, (end - 1) / DISK_UNDO_BLOCK);
        if last_block - first_block + 1 > capacity {
            return Err(Error::InvalidCheckpointRequest(format!(
                "disk {disk}: a write of {len} bytes needs more undo entries than the log's \
                 {capacity}"
            )));
        }
        let room = capacity.saturating_sub(state.entries_used());
        let mut blocks = Vec::new();
        let mut full = false;
        for block in first_block..=last_block {
            if state.disk_blocks.contains(&(disk, block)) {
                continue;
            }
            if blocks.len() as u64 == room {
                full = true;
                break;
            }
            let at = block * DISK_UNDO_BLOCK;
            let mut data = vec![0u8; (disk_len - at).min(DISK_UNDO_BLOCK) as usize];
            read_old(at, &mut data).map_err(|source| Error::Io {
                context: format!("reading disk {disk}'s old bytes at {at:#x} for the undo log"),
                source,
            })?;
            blocks.push(DiskUndoBlock {
                disk,
                offset: at,
                data,
            });
        }
        if !blocks.is_empty() {
            let first = state.entries_used();
            let mut shared = self.region().lock();
            state
                .area
                .write_disk_entries(shared.store.as_mut(), first, epoch, &blocks)?;
            drop(shared);
            for block in &blocks {
                state
                    .disk_blocks
                    .insert((disk, block.offset / DISK_UNDO_BLOCK));
            }
        }
        if full {
            return Err(Error::UndoLogFull {
                capacity_pages: capacity,
            });
        }
        Ok(if blocks.is_empty() {
            UndoRecord::AlreadyRecorded
        } else {
            UndoRecord::Recorded
        })
    }

    /// Disk blocks logged in the current epoch.
    pub fn disk_blocks_logged(&self) -> u64 {
        self.lock_state().disk_blocks.len() as u64
    }
}
