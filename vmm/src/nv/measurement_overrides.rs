//! Measurement-only overrides of checkpoint settings, read from the VMM's environment: for
//! nv-bench and by-hand A/B runs, none set by default, and none a setting an operator needs
//! (docs/checkpoints.md section 7, "Costs"). A value that does not parse, or is out of range, is
//! ignored as if unset: the measured default applies. Test builds' knobs (`NV_HOLD_FULL_LOG`,
//! `NV_UNDO_LIMIT_PAGES`) are not here: they exist only with `fault-injection`, in
//! `checkpoint.rs`.

use std::str::FromStr;
use std::sync::OnceLock;

/// Overrides the undo log's capacity (entries per epoch; default
/// `nv_extension::default_undo_pages`): a positive number of pages.
const UNDO_PAGES_VARIABLE: &str = "NV_CHECKPOINT_UNDO_PAGES";

/// Overrides the pages one write fault logs (`BLOCK_PAGES` in `checkpoint.rs`): a power of two,
/// 1 ..= 512.
const BLOCK_PAGES_VARIABLE: &str = "NV_CHECKPOINT_BLOCK_PAGES";

/// `evidence` logs a block whole only once it shows that the guest writes more than one of its
/// pages (`BlockChoice`), the faulting page alone before; otherwise every fault logs its whole
/// block. The evidence policy is not the default until a quiet host shows it better
/// (docs/checkpoints.md section 7).
const BLOCK_POLICY_VARIABLE: &str = "NV_CHECKPOINT_BLOCK_POLICY";

/// `N` protects two lifted ranges at most N pages apart with one `UFFDIO_WRITEPROTECT` (the
/// pages between, protected already, are protected again). Unset, only adjacent ranges merge:
/// on this host a protection change costs per page, not per call (docs/checkpoints.md
/// section 7).
const PROTECT_GAP_VARIABLE: &str = "NV_CHECKPOINT_PROTECT_GAP_PAGES";

/// `variable`'s value as a `T`, where it is set and parses.
fn parsed<T: FromStr>(variable: &str) -> Option<T> {
    std::env::var(variable).ok()?.parse().ok()
}

/// [`UNDO_PAGES_VARIABLE`], where set to a positive number.
pub(super) fn undo_pages() -> Option<u64> {
    parsed::<u64>(UNDO_PAGES_VARIABLE).filter(|pages| *pages > 0)
}

/// [`BLOCK_PAGES_VARIABLE`], where set to a power of two up to 512.
pub(super) fn block_pages() -> Option<u64> {
    parsed::<u64>(BLOCK_PAGES_VARIABLE).filter(|pages| pages.is_power_of_two() && *pages <= 512)
}

/// Whether [`BLOCK_POLICY_VARIABLE`] asks for the evidence policy.
pub(super) fn blocks_on_evidence() -> bool {
    parsed::<String>(BLOCK_POLICY_VARIABLE).is_some_and(|policy| policy == "evidence")
}

/// [`PROTECT_GAP_VARIABLE`] (0 where unset), read once per process.
pub(super) fn protect_gap_pages() -> usize {
    static GAP: OnceLock<usize> = OnceLock::new();
    *GAP.get_or_init(|| parsed(PROTECT_GAP_VARIABLE).unwrap_or(0))
}
