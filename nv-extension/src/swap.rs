//! Swapping a VM out of its region to a file on secondary storage, and back in.
//!
//! Swap-out ([`VmHandle::swap_out`]) writes the VM's memory, its committed state and its config
//! to a swap file (format: [`crate::swap_file`], docs/multi-vm.md), makes the file durable under
//! its final name, and only then records in the VM table, in one update, that the VM is swapped
//! out (the file's path, size and checksum) and frees its extents. Swap-in ([`Region::swap_in`])
//! verifies the whole file before it touches the region, reserves extents, loads memory and
//! state, and in one update makes the VM resident again; the file is removed only after that.
//! A crash at any instant therefore leaves the VM resident, or swapped out with a complete
//! verified file, or both: never neither.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Result;
use crate::identity::Uuid;
use crate::region::Region;
use crate::vm_handle::VmHandle;

/// How far a swap has come, in bytes of the VM's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwapProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// Where a swapped-out VM is: kept in its VM-table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapRecord {
    /// Absolute path of the swap file.
    pub path: PathBuf,
    /// Size of the complete file in bytes.
    pub file_size: u64,
    /// The file's final checksum (CRC32C of every byte before its trailer).
    pub checksum: u32,
}

/// What a completed swap-out did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapOutReport {
    pub path: PathBuf,
    pub file_size: u64,
    /// Bytes of guest memory written to the file (never-touched and all-zero pages are not).
    pub memory_bytes_written: u64,
    pub memory_size: u64,
    /// The committed save the file holds.
    pub seq: u64,
    pub took: Duration,
}

/// What a completed swap-in did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapInReport {
    pub path: PathBuf,
    pub file_size: u64,
    pub seq: u64,
    pub took: Duration,
    /// Whether the file was removed (false with `keep`, or when removing it failed: logged).
    pub file_removed: bool,
}

/// The identity a swap file's header gives (see [`inspect_swap_file`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapFileSummary {
    pub vm_name: String,
    pub vm_uuid: Uuid,
    pub region_uuid: Uuid,
    /// The region's path when the VM was swapped out.
    pub region_path: PathBuf,
    pub memory_size: u64,
    pub seq: u64,
    pub file_size: u64,
}

/// Every swap fault point (feature `fault-injection`, `NV_FAULT_AFTER_PHASE=<name>`), in the
/// order the two paths reach them.
pub const SWAP_FAULT_POINTS: &[&str] = &[
    // Swap-out.
    "swap-out-partial",
    "swap-out-written",
    "swap-out-linked",
    "swap-out-committed",
    // Swap-in.
    "swap-in-checked",
    "swap-in-reserved",
    "swap-in-partial",
    "swap-in-loaded",
    "swap-in-committed",
];

impl VmHandle {
    /// Writes this VM to a swap file at `destination` and frees its extents.
    ///
    /// Call after a committed planned-suspend save, with the vCPUs paused (memory is read from
    /// the region). `destination` must not exist: it is refused before anything is written, and
    /// never overwritten. On `Ok` the handle no longer owns a resident VM: every later
    /// state-changing call on it is refused (`Error::SwappedOut`) and dropping it changes
    /// nothing. On `Err` the VM is still resident with its committed save, no file is left at
    /// `destination` and the handle is usable. `progress` is called as memory is written.
    pub fn swap_out(
        &mut self,
        destination: &Path,
        progress: &mut dyn FnMut(SwapProgress),
    ) -> Result<SwapOutReport> {
        crate::swap_ops::swap_out(self, destination, progress)
    }
}

impl Region {
    /// Swaps the VM in `source` back into this region and claims it.
    ///
    /// The whole file is verified before the region is touched. `expected_name`: `Some(name)`
    /// (from `--nv vm=NAME`) must equal the file's VM name. The returned handle owns the VM,
    /// whose record is the committed save it was swapped out with (a planned suspend when the
    /// VMM swapped it out): resume it with [`VmHandle::recover`].
    /// The file is removed once the VM is durably resident, unless `keep`. `progress` covers
    /// the whole call: its first half while the file is verified, its second while memory is
    /// loaded.
    pub fn swap_in(
        &self,
        source: &Path,
        expected_name: Option<&str>,
        keep: bool,
        progress: &mut dyn FnMut(SwapProgress),
    ) -> Result<(VmHandle, SwapInReport)> {
        crate::swap_ops::swap_in(self, source, expected_name, keep, progress)
    }
}

/// Reads only the header (cheap): which region and VM a swap file belongs to.
pub fn inspect_swap_file(path: &Path) -> Result<SwapFileSummary> {
    crate::swap_file::inspect(path)
}
