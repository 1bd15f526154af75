//! The raw disk image behind a virtio-blk device: positioned reads and writes straight between
//! the file and guest memory, fdatasync.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use log::warn;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

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
    /// Something may have changed the file since the last completed fdatasync: set by every
    /// call that changes it *after* the change (before the request completes), cleared by a
    /// flush *before* its fdatasync starts. So a cleared flag means every change whose request
    /// completed is covered by an fdatasync that started after it; a change racing a flush
    /// leaves the flag set for the next one. Starts set: this process has no idea what an
    /// earlier one left unsynced.
    unsynced: AtomicBool,
    /// fdatasyncs issued (the flushes that found the file unchanged issue none).
    syncs: AtomicU64,
}

impl RawDisk {
    pub(crate) fn open(path: &Path, readonly: bool) -> Result<Self> {
        let open_error = |source: io::Error| Error::DiskOpen {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(open_error)?;
        let metadata = file.metadata().map_err(open_error)?;
        // Seeking to the end sizes regular files and block devices alike (a block device's
        // metadata length is 0). Later I/O is positioned, so the file offset left here is unused.
        let size = file.seek(SeekFrom::End(0)).map_err(open_error)?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            warn!(
                "disk image {} is {} bytes, not a multiple of {SECTOR_SIZE}: the tail is not visible to the guest",
                path.display(),
                size
            );
        }
        Ok(Self {
            file,
            readonly,
            capacity_sectors: size / SECTOR_SIZE,
            id: disk_id(metadata.dev(), metadata.ino()),
            unsynced: AtomicBool::new(true),
            syncs: AtomicU64::new(0),
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

    /// A cursor at byte `offset` of the image, for vm-memory's volatile I/O: guest buffers are
    /// read from and written to the file with `pread`/`pwrite` on the guest mapping itself, so no
    /// data passes through a host buffer.
    pub(crate) fn at(&self, offset: u64) -> DiskCursor<'_> {
        DiskCursor {
            file: &self.file,
            unsynced: &self.unsynced,
            offset,
        }
    }

    /// The image as a write hook reads it.
    pub(crate) fn image(&self) -> super::write_hook::DiskImage<'_> {
        super::write_hook::DiskImage {
            file: &self.file,
            len: self.capacity_sectors * SECTOR_SIZE,
        }
    }

    /// fdatasync: completed writes survive a host power failure once this returns. Skipped
    /// when nothing changed the file since the last fdatasync (a checkpoint's quiesce flushes
    /// every disk, ~4 ms on ext4 even with nothing to write).
    pub(crate) fn flush(&self) -> io::Result<()> {
        // Cleared before the fdatasync starts: a change that sets it again after this point
        // may be missed by this fdatasync, and the next flush syncs it.
        if !self.unsynced.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.file.sync_data().inspect_err(|_| {
            // Nothing is known durable: the next flush must try again.
            self.unsynced.store(true, Ordering::SeqCst);
        })
    }

    /// fdatasyncs issued so far.
    #[cfg(test)]
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

type VolatileResult<T> = std::result::Result<T, VolatileMemoryError>;

/// Positioned I/O on a [`RawDisk`]; every transfer advances `offset`, the file offset is never
/// used. One `pread64`/`pwrite64` per call, as the block I/O thread's seccomp filter allows;
/// `read_exact_volatile`/`write_all_volatile` loop over short transfers.
pub(crate) struct DiskCursor<'a> {
    file: &'a File,
    /// The disk's [`RawDisk::unsynced`], set after each write.
    unsynced: &'a AtomicBool,
    offset: u64,
}

impl DiskCursor<'_> {
    /// Runs one positioned system call `io(fd, offset)` and advances by the count it returns.
    fn transfer(
        &mut self,
        io: impl FnOnce(libc::c_int, libc::off64_t) -> isize,
    ) -> VolatileResult<usize> {
        let offset = libc::off64_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(io::Error::from(io::ErrorKind::InvalidInput))
        })?;
        // A negative count is the only failure; any other count fits `usize`.
        let n = usize::try_from(io(self.file.as_raw_fd(), offset))
            .map_err(|_| VolatileMemoryError::IOError(io::Error::last_os_error()))?;
        self.offset += n as u64;
        Ok(n)
    }
}

// SAFETY (both impls): the descriptor stays open while `self.file` is borrowed, and the guard
// points at `buf.len()` bytes of mapped guest memory valid while it lives (the invariant of
// `VolatileSlice`); the kernel writes (pread) or reads (pwrite) at most `buf.len()` bytes there.
impl ReadVolatile for DiskCursor<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> VolatileResult<usize> {
        let guard = buf.ptr_guard_mut();
        let n = self.transfer(|fd, offset| {
            // SAFETY: see above the impl.
            unsafe { libc::pread64(fd, guard.as_ptr().cast(), buf.len(), offset) }
        })?;
        buf.bitmap().mark_dirty(0, n);
        Ok(n)
    }
}

impl WriteVolatile for DiskCursor<'_> {
    fn write_volatile<B: BitmapSlice>(&mut self, buf: &VolatileSlice<B>) -> VolatileResult<usize> {
        let guard = buf.ptr_guard();
        let written = self.transfer(|fd, offset| {
            // SAFETY: see above the impl of `ReadVolatile`.
            unsafe { libc::pwrite64(fd, guard.as_ptr().cast(), buf.len(), offset) }
        });
        // After the pwrite returned (even failed or short: it may have changed some bytes),
        // before the request can complete: a flush that clears the flag from now on starts
        // its fdatasync after this write.
        self.unsynced.store(true, Ordering::SeqCst);
        written
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_rounds_down_to_whole_sectors() {
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(3 * SECTOR_SIZE + 100).unwrap();
        let disk = RawDisk::open(image.path(), false).unwrap();
        assert_eq!(disk.capacity_sectors(), 3);
        assert!(!disk.readonly());
        assert_eq!(
            disk.id(),
            RawDisk::open(image.path(), true).unwrap().id(),
            "the ID is a property of the file, not of the open"
        );
    }

    #[test]
    fn a_flush_syncs_only_what_changed_since_the_last_sync() {
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(4 * SECTOR_SIZE).unwrap();
        let disk = RawDisk::open(image.path(), false).unwrap();
        disk.flush().unwrap();
        assert_eq!(
            disk.syncs(),
            1,
            "a disk just opened may hold an earlier run's writes"
        );
        disk.flush().unwrap();
        disk.flush().unwrap();
        assert_eq!(
            disk.syncs(),
            1,
            "nothing written since the last sync: no fdatasync"
        );

        // A read changes nothing.
        let mut buf = vec![0u8; SECTOR_SIZE as usize];
        let mut slice = VolatileSlice::from(&mut buf[..]);
        disk.at(0).read_exact_volatile(&mut slice).unwrap();
        disk.flush().unwrap();
        assert_eq!(disk.syncs(), 1, "a read is no reason to sync");

        let data = vec![7u8; SECTOR_SIZE as usize];
        let mut data_copy = data.clone();
        disk.at(SECTOR_SIZE)
            .write_all_volatile(&VolatileSlice::from(&mut data_copy[..]))
            .unwrap();
        disk.flush().unwrap();
        assert_eq!(disk.syncs(), 2, "a written disk is synced");
        disk.flush().unwrap();
        assert_eq!(disk.syncs(), 2, "and once is enough");
        let mut back = vec![0u8; SECTOR_SIZE as usize];
        std::os::unix::fs::FileExt::read_exact_at(image.as_file(), &mut back, SECTOR_SIZE).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn a_missing_image_is_a_typed_error_naming_it() {
        let err = RawDisk::open(Path::new("/nonexistent/disk.img"), false)
            .err()
            .unwrap();
        assert!(matches!(err, Error::DiskOpen { .. }));
        assert!(err.to_string().contains("/nonexistent/disk.img"));
    }
}
