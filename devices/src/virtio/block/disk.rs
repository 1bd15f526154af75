//! The raw disk image behind a virtio-blk device: positioned reads and writes, fdatasync.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use log::warn;

use super::SECTOR_SIZE;
use crate::{Error, Result};

/// Length of the virtio-blk device ID string.
pub(crate) const DISK_ID_LEN: usize = 20;

/// A raw image file. All I/O is positioned (`pread`/`pwrite`), so the file offset is never
/// shared state and several threads may use one `RawDisk`.
pub(crate) struct RawDisk {
    file: File,
    readonly: bool,
    capacity_sectors: u64,
    id: [u8; DISK_ID_LEN],
}

impl RawDisk {
    pub(crate) fn open(path: &Path, readonly: bool) -> Result<Self> {
        let open_error = |source: io::Error| Error::DiskOpen {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(open_error)?;
        let metadata = file.metadata().map_err(open_error)?;
        if !metadata.len().is_multiple_of(SECTOR_SIZE) {
            warn!(
                "disk image {} is {} bytes, not a multiple of {SECTOR_SIZE}: the tail is not visible to the guest",
                path.display(),
                metadata.len()
            );
        }
        Ok(Self {
            file,
            readonly,
            capacity_sectors: metadata.len() / SECTOR_SIZE,
            id: disk_id(metadata.dev(), metadata.ino()),
        })
    }

    pub(crate) fn readonly(&self) -> bool {
        self.readonly
    }

    pub(crate) fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub(crate) fn id(&self) -> &[u8; DISK_ID_LEN] {
        &self.id
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// fdatasync: completed writes survive a host power failure once this returns.
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// An ID stable for the life of the image file (device and inode numbers), so the guest sees the
/// same disk ID after an in-place recovery.
fn disk_id(dev: u64, ino: u64) -> [u8; DISK_ID_LEN] {
    let text = format!("{dev:x}-{ino:x}");
    let mut id = [0u8; DISK_ID_LEN];
    let len = text.len().min(DISK_ID_LEN);
    id[..len].copy_from_slice(&text.as_bytes()[..len]);
    id
}
