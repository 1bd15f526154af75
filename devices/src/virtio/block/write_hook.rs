//! What a virtio-blk device asks before it changes its image: an optional hook, installed and
//! removed from outside while the device runs (the VMM's continuous checkpoints log the old
//! bytes there, `docs/checkpoints.md`). The device knows nothing of what the hook does.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, RwLock};

/// The image as the hook may read it: its current bytes, before the write.
pub struct DiskImage<'a> {
    pub(crate) file: &'a File,
    pub(crate) len: u64,
}

impl DiskImage<'_> {
    /// The image's size in bytes as the guest sees it (whole sectors).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the image has no sector.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills `buf` with the image's bytes at `offset` (one `pread64` per call, looped).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// What the device does with a write after asking the hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BeforeWrite {
    /// Write now.
    Proceed,
    /// Not now: the device puts the request back on its queue, serves nothing more, and takes
    /// it again the next time it is resumed (the hook has asked for that to happen).
    Defer,
    /// Never: the request fails with IOERR, the image is not touched.
    Fail(String),
}

/// Called on the device's I/O thread before bytes `offset..offset + len` of the image change.
pub trait BlockWriteHook: Send + Sync {
    fn before_write(&self, image: &DiskImage<'_>, offset: u64, len: u64) -> BeforeWrite;
}

/// Where a device looks for its hook; clones share it, so the owner of a clone installs or
/// removes the hook of a running device.
#[derive(Clone, Default)]
pub struct BlockWriteHookSlot(Arc<RwLock<Option<Arc<dyn BlockWriteHook>>>>);

impl BlockWriteHookSlot {
    /// Installs `hook` (`None` removes it); requests served from now on ask it.
    pub fn install(&self, hook: Option<Arc<dyn BlockWriteHook>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    pub(crate) fn current(&self) -> Option<Arc<dyn BlockWriteHook>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl std::fmt::Debug for BlockWriteHookSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let installed = self.current().is_some();
        write!(f, "BlockWriteHookSlot {{ installed: {installed} }}")
    }
}
