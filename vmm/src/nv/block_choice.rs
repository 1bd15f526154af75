//! How many pages one write fault logs: the faulting page alone, or its whole aligned block.
//!
//! Logging a block on one fault saves the faults of its other pages when the guest writes
//! them too (a guest filling memory, or a small table written all over), and costs a copy and
//! a protection change of every page of the block when it does not (a large table written at
//! random: kvstore with 1M keys writes one 16-byte slot in each of a few dozen blocks per
//! epoch before the next checkpoint protects them again). So a block is logged whole only on
//! evidence that the guest writes more than one of its pages: its second fault in the same
//! epoch, or a second fault in the previous epoch (a block written densely then is logged whole
//! at its first fault in this one). A block logged whole at its first fault earns nothing for
//! the next epoch: it has to show its density again, so a block that stops being written
//! densely goes back to single pages after one epoch. Off by default (every fault logs its
//! whole block) until a quiet host shows it better: `NV_CHECKPOINT_BLOCK_POLICY=evidence` turns
//! it on for measurements; `docs/checkpoints.md` section 7 has what was measured.

/// One bit per block of guest memory.
struct BlockSet(Vec<u64>);

impl BlockSet {
    fn new(blocks: u64) -> Self {
        BlockSet(vec![0; blocks.div_ceil(64) as usize])
    }

    fn contains(&self, block: u64) -> bool {
        self.0
            .get((block / 64) as usize)
            .is_some_and(|word| word & (1 << (block % 64)) != 0)
    }

    fn insert(&mut self, block: u64) {
        if let Some(word) = self.0.get_mut((block / 64) as usize) {
            *word |= 1 << (block % 64);
        }
    }

    fn clear(&mut self) {
        self.0.fill(0);
    }
}

/// The per-epoch history that [`BlockChoice::pages_for`] decides on.
pub(super) struct BlockChoice {
    /// Pages of a block (a power of two).
    block_pages: u64,
    /// Whether a block waits for a second fault before it is logged whole; `false` logs the
    /// whole block at every first fault (the fixed policy, for measurements).
    on_evidence: bool,
    /// The epoch the sets below describe.
    epoch: Option<u64>,
    /// Blocks one of whose pages was logged alone in this epoch.
    faulted: BlockSet,
    /// Blocks logged whole after a second fault in this epoch.
    dense_now: BlockSet,
    /// The same, of the previous epoch.
    dense_before: BlockSet,
}

impl BlockChoice {
    /// For `memory_size` bytes of guest memory in blocks of `block_pages` (a power of two).
    pub(super) fn new(memory_size: u64, block_pages: u64, on_evidence: bool) -> Self {
        let block_pages = block_pages.max(1);
        let blocks = memory_size.div_ceil(block_pages * 4096);
        BlockChoice {
            block_pages,
            on_evidence,
            epoch: None,
            faulted: BlockSet::new(blocks),
            dense_now: BlockSet::new(blocks),
            dense_before: BlockSet::new(blocks),
        }
    }

    /// The block size in pages.
    pub(super) fn block_pages(&self) -> u64 {
        self.block_pages
    }

    /// Pages to log for a write fault on the page at guest offset `page_offset` in `epoch`
    /// (not logged in it yet): 1 or the block size.
    pub(super) fn pages_for(&mut self, epoch: u64, page_offset: u64) -> u64 {
        if !self.on_evidence || self.block_pages == 1 {
            return self.block_pages;
        }
        if self.epoch != Some(epoch) {
            std::mem::swap(&mut self.dense_before, &mut self.dense_now);
            self.dense_now.clear();
            self.faulted.clear();
            self.epoch = Some(epoch);
        }
        let block = page_offset / (self.block_pages * 4096);
        if self.faulted.contains(block) {
            self.dense_now.insert(block);
            return self.block_pages;
        }
        if self.dense_before.contains(block) {
            return self.block_pages;
        }
        self.faulted.insert(block);
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    /// A block's first fault in an epoch logs its page alone, the second the whole block; a
    /// block that needed a second fault is logged whole at its first in the next epoch, and
    /// alone again in the one after if it showed nothing since.
    #[test]
    fn a_block_is_logged_whole_only_after_a_second_fault() {
        let mut choice = BlockChoice::new(64 * PAGE, 8, true);
        // Epoch 1: block 0 written twice, block 1 once.
        assert_eq!(choice.pages_for(1, 0), 1);
        assert_eq!(choice.pages_for(1, 9 * PAGE), 1);
        assert_eq!(choice.pages_for(1, 3 * PAGE), 8);
        // Epoch 2: block 0 whole at once, block 1 alone again.
        assert_eq!(choice.pages_for(2, 5 * PAGE), 8);
        assert_eq!(choice.pages_for(2, 8 * PAGE), 1);
        // Epoch 3: block 0 earned nothing in epoch 2, so alone again.
        assert_eq!(choice.pages_for(3, PAGE), 1);
        // The last block of memory is tracked too.
        assert_eq!(choice.pages_for(3, 63 * PAGE), 1);
        assert_eq!(choice.pages_for(3, 56 * PAGE), 8);
    }

    /// The fixed policy (for measurements) and a block of one page log the block every time.
    #[test]
    fn the_fixed_policy_logs_the_block_at_every_fault() {
        let mut fixed = BlockChoice::new(64 * PAGE, 16, false);
        assert_eq!(fixed.pages_for(1, 0), 16);
        assert_eq!(fixed.pages_for(1, 40 * PAGE), 16);
        let mut single = BlockChoice::new(64 * PAGE, 1, true);
        assert_eq!(single.pages_for(1, 0), 1);
        assert_eq!(single.pages_for(1, 0), 1);
    }
}
