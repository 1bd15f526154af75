//! The crate's single error type.

use std::path::PathBuf;

use crate::identity::Uuid;

/// Error returned by a host-trait method; opaque to this crate.
pub type HostError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong in an NV region.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not an NV region ({reason}); pass format=on to format it (destroys its contents)"
    )]
    NotARegion { path: PathBuf, reason: String },
    #[error(
        "NV region format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedFormatVersion { found: u32, supported: u32 },
    #[error("NV region superblock is corrupt: {0}")]
    CorruptSuperblock(String),
    #[error(
        "NV region is truncated: superblock says {expected} bytes, the backing store has {actual}"
    )]
    Truncated { expected: u64, actual: u64 },
    #[error("NV region VM table is corrupt: {0}")]
    CorruptVmTable(String),
    #[error("no VM named {0:?} in the NV region")]
    VmNotFound(String),
    #[error("a VM named {0:?} already exists in the NV region")]
    VmExists(String),
    #[error("invalid VM name {name:?}: {reason}")]
    InvalidVmName { name: String, reason: &'static str },
    #[error("invalid size {size}: {reason}")]
    InvalidSize { size: u64, reason: &'static str },
    /// No room for the extents asked for (guest RAM and state area of one VM), and the region
    /// cannot grow. `free` is the sum of every free extent, `largest_free` the largest one.
    #[error("{}", out_of_space_message(*requested, *free, *largest_free))]
    OutOfSpace {
        requested: u64,
        free: u64,
        largest_free: u64,
    },
    #[error("NV region VM table is full: {needed} bytes needed, a table copy holds {capacity}")]
    VmTableFull { needed: u64, capacity: u64 },
    #[error("VM {0:?} has a saved state that matches its memory; recover or cold-boot it before resizing")]
    ResizeWouldDiscardState(String),
    #[error("VM {vm:?} is owned by a running process (pid {pid})")]
    OwnedByLiveProcess { vm: String, pid: u32 },
    #[error("this handle no longer owns VM {0:?} (another process took it over)")]
    OwnershipLost(String),
    #[error("unsafe shutdown — state incomplete, cold boot only")]
    UnsafeShutdown,
    /// The run record names a committed save, but the slot that must hold it fails its checks:
    /// the medium, not the shutdown, is at fault.
    #[error(
        "VM {vm:?}: the committed save seq {seq} is unreadable: {detail} (media damage?); \
         cold boot only"
    )]
    DamagedState {
        vm: String,
        seq: u64,
        detail: String,
    },
    /// The region's path no longer names the file this process has open (deleted, renamed or
    /// replaced while the region was in use).
    #[error("NV region {path}: {detail}")]
    RegionFileChanged { path: PathBuf, detail: String },
    /// The path names something that cannot hold a region; nothing was opened.
    #[error("{path} is {what}: an NV region is a regular file or a devdax character device")]
    NotARegionFile { path: PathBuf, what: String },
    /// A write to a region opened read-only (`OpenOptions::read_only`).
    #[error("NV region {path} is open read-only: {operation} refused")]
    ReadOnly {
        path: PathBuf,
        operation: &'static str,
    },
    #[error("VM {0:?} has no saved state to recover (it was never run or was powered off)")]
    NothingToRecover(String),
    #[error("VM state of {len} bytes does not fit a state slot of {capacity} bytes")]
    StateTooLarge { len: u64, capacity: u64 },
    #[error("{operation} needs a file-backed NV region")]
    NoFileBacking { operation: &'static str },
    #[error("the NV region cannot grow ({0})")]
    CannotGrow(&'static str),
    #[error("{0}")]
    Unsupported(String),
    #[error("power-fail save: host step '{phase}' failed: {source}")]
    HostStep {
        phase: &'static str,
        #[source]
        source: HostError,
    },
    #[error(
        "NV_FAULT_AFTER_PHASE={0:?} is not a fault point (1..5, commit-payload, commit-header, \
         a swap point: swap-out-*, swap-in-*, or a checkpoint point: ckpt-*)"
    )]
    InvalidFaultPoint(String),
    /// The undo log of the current checkpoint epoch holds as many pages as it can: the page
    /// must not be written before a checkpoint starts a new epoch (docs/checkpoints.md).
    #[error("checkpoint undo log full ({capacity_pages} pages); a checkpoint must start a new epoch first")]
    UndoLogFull { capacity_pages: u64 },
    /// A checkpoint step of the host failed (`coordinator::NvHost`).
    #[error("checkpoint: host step '{phase}' failed: {source}")]
    CheckpointHostStep {
        phase: &'static str,
        #[source]
        source: HostError,
    },
    /// Recovery could not write a checkpoint epoch's old disk bytes back (`DiskUndoTarget`).
    #[error("VM {vm:?}: rolling disk {disk} back to the checkpoint failed: {source}")]
    DiskUndo {
        vm: String,
        disk: u16,
        #[source]
        source: HostError,
    },
    /// The checkpoint area of a VM fails a check that only media damage (or a bug) explains.
    #[error("VM {vm:?}: checkpoint area damaged: {detail}")]
    DamagedCheckpoint { vm: String, detail: String },
    /// An undo log handed to a checkpoint of another VM, or a page outside guest memory.
    #[error("checkpoint: {0}")]
    InvalidCheckpointRequest(String),
    /// The VM's memory and state are in a swap file, not in the region.
    #[error("VM {vm:?} is swapped out to {path}; swap it in first")]
    SwappedOut { vm: String, path: PathBuf },
    /// A swap-in of a VM that is resident: the file is stale (a swap-in that committed but
    /// could not remove it, or a copy).
    #[error(
        "VM {vm:?} is resident in the NV region already: swap file {path} refused \
         (a leftover of an earlier swap-in? delete it)"
    )]
    ResidentAlready { vm: String, path: PathBuf },
    /// A swap-out destination that exists: never overwritten.
    #[error("swap destination {0} exists already (refused, never overwritten)")]
    SwapDestinationExists(PathBuf),
    /// A swap file that cannot be swapped in, and why.
    #[error("swap file {path}: {problem}")]
    SwapFile {
        path: PathBuf,
        #[source]
        problem: SwapFileProblem,
    },
}

/// What is wrong with a swap file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SwapFileProblem {
    #[error("truncated ({size} bytes): {detail}")]
    Truncated { size: u64, detail: String },
    #[error("not a swap file (foreign magic)")]
    ForeignMagic,
    #[error(
        "swap file format version {found} is not supported (this build reads version {supported})"
    )]
    FutureVersion { found: u32, supported: u32 },
    #[error("checksum mismatch at chunk {chunk} (memory offset {offset:#x})")]
    ChunkChecksum { chunk: u64, offset: u64 },
    #[error("{0}")]
    Corrupt(String),
    #[error("it belongs to another region ({file_region}, this region is {region})")]
    OtherRegion { file_region: Uuid, region: Uuid },
    #[error("it holds VM {found:?}, not {expected:?}")]
    NameMismatch { expected: String, found: String },
    /// The VM is swapped out, but its table entry names another file (or another save).
    #[error("it is not the file VM {vm:?} was swapped out to: {detail}")]
    NotTheRecordedFile { vm: String, detail: String },
}

/// `region full`: what was asked for and what is free. When the total would do but no single
/// extent is large enough, it says the region is fragmented: guest RAM is one extent.
fn out_of_space_message(requested: u64, free: u64, largest_free: u64) -> String {
    let asked = format!("NV region is full: {requested} bytes asked for");
    if requested <= free {
        format!(
            "{asked}, {free} bytes free in total but fragmented: the largest free extent is \
             {largest_free} bytes and a VM's guest RAM must be one extent; delete or swap out a VM \
             next to a free extent to make room"
        )
    } else {
        format!(
            "{asked}, {free} bytes free in total, the largest free extent is {largest_free} bytes"
        )
    }
}

/// What kind of failure an [`Error`] is, so that a caller can answer it (an HTTP status, an exit
/// code) by its kind rather than by reading the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The region (its path) or the named VM does not exist.
    NotFound,
    /// The request is valid but the VM's or region's current state refuses it: recovery of a VM
    /// with no resumable state (unsafe shutdown, nothing saved), a VM owned by another live
    /// process, a name already taken, a resize that would discard a saved state.
    Conflict,
    /// A value the caller chose cannot be used: a VM name or size, a file that is not a region
    /// (or of a format version this build does not read), an operation the region's kind lacks.
    InvalidInput,
    /// The region or the host failed: I/O, a damaged region, no space left, a failed save step.
    Internal,
}

impl Error {
    /// The kind of this failure. Every variant is listed, so a new one must be classified.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            Error::VmNotFound(_) => ErrorKind::NotFound,
            Error::VmExists(_)
            | Error::ResizeWouldDiscardState(_)
            | Error::OwnedByLiveProcess { .. }
            | Error::OwnershipLost(_)
            | Error::UnsafeShutdown
            | Error::RegionFileChanged { .. }
            | Error::NothingToRecover(_)
            | Error::SwappedOut { .. }
            | Error::ResidentAlready { .. }
            | Error::SwapDestinationExists(_) => ErrorKind::Conflict,
            Error::NotARegion { .. }
            | Error::UnsupportedFormatVersion { .. }
            | Error::InvalidVmName { .. }
            | Error::InvalidSize { .. }
            | Error::NoFileBacking { .. }
            | Error::NotARegionFile { .. }
            | Error::InvalidCheckpointRequest(_)
            | Error::Unsupported(_)
            | Error::SwapFile { .. } => ErrorKind::InvalidInput,
            Error::Io { .. }
            | Error::CorruptSuperblock(_)
            | Error::Truncated { .. }
            | Error::CorruptVmTable(_)
            | Error::DamagedState { .. }
            | Error::ReadOnly { .. }
            | Error::OutOfSpace { .. }
            | Error::VmTableFull { .. }
            | Error::StateTooLarge { .. }
            | Error::CannotGrow(_)
            | Error::HostStep { .. }
            | Error::UndoLogFull { .. }
            | Error::CheckpointHostStep { .. }
            | Error::DamagedCheckpoint { .. }
            | Error::DiskUndo { .. }
            | Error::InvalidFaultPoint(_) => ErrorKind::Internal,
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Wraps the current `errno` with what was being done.
    pub(crate) fn last_os(context: impl Into<String>) -> Self {
        Self::io(context, std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_and_lookups_are_told_apart_from_failures() {
        let missing = Error::io(
            "opening /nope",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(missing.kind(), ErrorKind::NotFound);
        let denied = Error::io(
            "opening /r",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(denied.kind(), ErrorKind::Internal);
        assert_eq!(Error::VmNotFound("a".into()).kind(), ErrorKind::NotFound);
        assert_eq!(Error::UnsafeShutdown.kind(), ErrorKind::Conflict);
        assert_eq!(
            Error::NothingToRecover("a".into()).kind(),
            ErrorKind::Conflict
        );
        let owned = Error::OwnedByLiveProcess {
            vm: "a".into(),
            pid: 1,
        };
        assert_eq!(owned.kind(), ErrorKind::Conflict);
        let name = Error::InvalidVmName {
            name: "../a".into(),
            reason: "bad",
        };
        assert_eq!(name.kind(), ErrorKind::InvalidInput);
        assert_eq!(
            Error::CorruptVmTable("x".into()).kind(),
            ErrorKind::Internal
        );
    }
}
