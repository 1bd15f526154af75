//! NV regions for VMs whose RAM lives in non-volatile memory.
//!
//! A region (a file, a DAX file or a devdax device) holds many VMs: their
//! guest RAM extents, their config, and a double-buffered area for the
//! volatile state saved when the host loses power. This crate owns the
//! on-media format and the commit protocol; it knows nothing of KVM and
//! reaches a VMM only through [`coordinator::NvHost`].
//!
//! Entry points: [`Region::open`], [`Region::claim_vm`], [`VmHandle::recover`],
//! [`coordinator::save_vm`], [`VmHandle::swap_out`], [`Region::swap_in`]; continuous
//! checkpoints: [`VmHandle::enable_checkpoints`], [`UndoLog::record_undo`],
//! [`checkpoint::checkpoint_vm`] (`docs/checkpoints.md`). Format: `docs/nv-format.md`; protocol:
//! `docs/commit-protocol.md`.

pub mod allocator;
pub mod checkpoint;
pub mod checkpoint_area;
pub mod coordinator;
mod disk_undo;
pub mod error;
pub mod fault_injection;
mod format;
pub mod identity;
mod le_bytes;
mod metadata_io;
pub mod owner_process;
pub mod persistence;
pub mod region;
mod region_identity;
pub mod save_report;
pub mod state_slots;
pub mod superblock;
pub mod swap;
mod swap_file;
mod swap_ops;
pub mod undo_log;
pub mod vm_handle;
pub mod vm_table;

pub use allocator::FreeSpace;
pub use checkpoint::{checkpoint_vm, default_undo_pages, CheckpointPhase, CheckpointReport};
pub use checkpoint_area::{DiskUndoTarget, NoDisks, CHECKPOINT_FAULT_POINTS};
pub use coordinator::{save_vm, NvHost, SavePhase, SaveReport};
pub use error::{Error, ErrorKind, HostError, Result, SwapFileProblem};
pub use identity::Uuid;
pub use owner_process::{wait_for_any_exit, OwnerProcess};
pub use persistence::PersistenceMode;
pub use region::{MemoryReservation, OpenOptions, Region, VmSummary};
pub use superblock::ShutdownMarker;
pub use swap::{
    inspect_swap_file, SwapFileSummary, SwapInReport, SwapOutReport, SwapProgress, SwapRecord,
    SWAP_FAULT_POINTS,
};
pub use undo_log::{UndoBlock, UndoLog, UndoLogStatus, UndoRecord};
pub use vm_handle::{MemoryBacking, RecoveredVm, VmHandle};
pub use vm_table::{RunKind, RunRecord, ShutdownKind, StopCause};
