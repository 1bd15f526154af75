//! Regions in a mapped file: a regular file, plain (msync) or on a DAX filesystem (MAP_SYNC), or
//! a device-DAX character device (opened by [`super::devdax::open`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::mapping::{flock, unlock_metadata, SharedMapping, MAP_SHARED_VALIDATE, MAP_SYNC};
use super::{Persistence, PersistenceMode};
use crate::error::{Error, Result};

/// A file mapped shared: a regular file (DAX when the filesystem accepts `MAP_SYNC`) that can
/// grow, or a devdax device of fixed size (`mode` `DevDax`).
pub struct FileBackend {
    file: File,
    path: PathBuf,
    mapping: SharedMapping,
    mode: PersistenceMode,
    /// False for a region opened read-only: writes, growth and reservations are refused.
    writable: bool,
}

impl FileBackend {
    /// Maps the whole of an open regular file.
    ///
    /// `MAP_SYNC` is tried first; a filesystem that refuses it (EOPNOTSUPP, or
    /// EINVAL from kernels without MAP_SHARED_VALIDATE) gets a plain shared
    /// mapping made durable by msync instead, and the fallback is logged.
    ///
    /// A read-only backend (`writable` false) maps `PROT_READ` and refuses every change.
    pub fn open(file: File, path: &Path, writable: bool) -> Result<Self> {
        let len = file_len(&file, path)?;
        let (mapping, mode) = map(&file, path, len, None, writable)?;
        Ok(Self::with_mapping(file, path, mapping, mode, writable))
    }

    pub(super) fn with_mapping(
        file: File,
        path: &Path,
        mapping: SharedMapping,
        mode: PersistenceMode,
        writable: bool,
    ) -> Self {
        FileBackend {
            file,
            path: path.to_path_buf(),
            mapping,
            mode,
            writable,
        }
    }

    /// Whether space can be allocated or punched: not on a devdax device (fully backed, holes
    /// impossible), refused on a read-only region.
    fn space_is_managed(&self, operation: &'static str) -> Result<bool> {
        if self.is_devdax() {
            return Ok(false);
        }
        self.refuse_if_read_only(operation)?;
        Ok(true)
    }

    /// `fallocate(flags | KEEP_SIZE)`; a filesystem without support (EOPNOTSUPP) is no error.
    fn fallocate(
        &self,
        flags: libc::c_int,
        offset: libc::off_t,
        len: libc::off_t,
    ) -> std::io::Result<()> {
        // SAFETY: fallocate on a descriptor we own; KEEP_SIZE leaves the file length alone.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                flags | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok(()),
            _ => Err(err),
        }
    }

    fn is_devdax(&self) -> bool {
        self.mode == PersistenceMode::DevDax
    }

    fn refuse_if_read_only(&self, operation: &'static str) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                path: self.path.clone(),
                operation,
            })
        }
    }

    fn remap(&mut self, len: u64) -> Result<()> {
        // Keep the mode chosen at open: a DAX file stays MAP_SYNC.
        let (mapping, _) = map(&self.file, &self.path, len, Some(self.mode), self.writable)?;
        self.mapping = mapping;
        Ok(())
    }
}

fn file_len(file: &File, path: &Path) -> Result<u64> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))
}

fn map(
    file: &File,
    path: &Path,
    len: u64,
    forced: Option<PersistenceMode>,
    writable: bool,
) -> Result<(SharedMapping, PersistenceMode)> {
    let len = usize::try_from(len)
        .map_err(|_| Error::CannotGrow("file larger than the address space"))?;
    if forced != Some(PersistenceMode::PlainFile) && len > 0 {
        match SharedMapping::new(file, len, MAP_SHARED_VALIDATE | MAP_SYNC, 0, writable) {
            Ok(mapping) => return Ok((mapping, PersistenceMode::DaxFile)),
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                ) =>
            {
                if forced == Some(PersistenceMode::DaxFile) {
                    return Err(Error::io(
                        format!("MAP_SYNC remap of {}", path.display()),
                        err,
                    ));
                }
                log::info!(
                    "{}: filesystem refuses MAP_SYNC ({err}); using msync persistence",
                    path.display()
                );
            }
            Err(err) => return Err(Error::io(format!("mmap {}", path.display()), err)),
        }
    }
    let mapping = SharedMapping::new(file, len, libc::MAP_SHARED, 0, writable)
        .map_err(|e| Error::io(format!("mmap {}", path.display()), e))?;
    Ok((mapping, PersistenceMode::PlainFile))
}

impl Persistence for FileBackend {
    fn mode(&self) -> PersistenceMode {
        self.mode
    }
    fn len(&self) -> u64 {
        self.mapping.len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.mapping.read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.refuse_if_read_only("write")?;
        self.mapping.write(offset, data)
    }
    fn persist(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.mode.is_dax() {
            self.mapping.write_back(offset, len)
        } else {
            self.mapping.msync(offset, len)
        }
    }
    /// A plain file: one `msync` over the ranges' span. It writes back only the dirty pages
    /// in it (the clean ones between the ranges cost a look-up, on tmpfs nothing at all) and
    /// syncs the file once, where one call per range syncs it (a journal commit on ext4) once
    /// each. DAX: each range's cache lines, as `persist` (a line not asked for costs its
    /// write-back).
    fn persist_ranges(&mut self, ranges: &[(u64, u64)]) -> Result<()> {
        match (ranges.first(), ranges.last()) {
            (Some(&(start, _)), Some(&(last, last_len))) if !self.mode.is_dax() => {
                self.mapping.msync(start, last + last_len - start)
            }
            _ => super::persist_each(self, ranges),
        }
    }
    fn grow(&mut self, new_len: u64) -> Result<()> {
        if self.is_devdax() {
            return Err(Error::CannotGrow("a devdax device has a fixed size"));
        }
        self.refuse_if_read_only("growing the file")?;
        if new_len <= self.len() {
            return Ok(());
        }
        let current = file_len(&self.file, &self.path)?;
        if current < new_len {
            self.file.set_len(new_len).map_err(|e| {
                Error::io(
                    format!("growing {} to {new_len} bytes", self.path.display()),
                    e,
                )
            })?;
            // The new size is metadata: make it durable before anything is placed there.
            self.file
                .sync_all()
                .map_err(|e| Error::io(format!("fsync {}", self.path.display()), e))?;
        }
        self.remap(new_len)
    }
    fn reserve(&mut self, offset: u64, len: u64) -> Result<()> {
        if !self.space_is_managed("reserving space")? {
            return Ok(());
        }
        // A sparse file that runs out of space faults (SIGBUS) on the guest's first touch;
        // allocating now turns that into an error at create time. Where the filesystem cannot
        // (e.g. some network filesystems) the file stays sparse.
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(Error::CannotGrow("extent beyond the file offset range"));
        };
        self.fallocate(0, offset, len).map_err(|err| {
            Error::io(
                format!(
                    "reserving {len} bytes at {offset:#x} in {}",
                    self.path.display()
                ),
                err,
            )
        })
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        if !self.space_is_managed("discarding space")? {
            return Ok(());
        }
        // Where the filesystem cannot punch holes the space stays allocated.
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Ok(());
        };
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE, offset, len)
            .map_err(|err| Error::io(format!("punching a hole in {}", self.path.display()), err))
    }
    fn refresh(&mut self) -> Result<()> {
        if self.is_devdax() {
            return Ok(()); // a device never changes size
        }
        let current = file_len(&self.file, &self.path)?;
        if current < self.len() {
            // Someone truncated the region under us; touching the lost tail would SIGBUS.
            return Err(Error::Truncated {
                expected: self.len(),
                actual: current,
            });
        }
        if current > self.len() {
            self.remap(current)?;
        }
        Ok(())
    }
    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
    fn lock_metadata(&self) -> Result<()> {
        flock(&self.file, libc::LOCK_EX)
    }
    fn unlock_metadata(&self) {
        unlock_metadata(&self.file, &self.path);
    }
}

impl std::fmt::Debug for FileBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FileBackend({}, fd {}, {:?})",
            self.path.display(),
            self.file.as_raw_fd(),
            self.mode
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The devdax rules of the shared backend, on a regular file standing in for the device.
    #[test]
    fn a_devdax_store_has_a_fixed_size_needs_no_space_management_and_writes_back() {
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(8192).unwrap();
        let open = |writable| {
            let file = image.reopen().unwrap();
            let mapping = SharedMapping::new(&file, 8192, libc::MAP_SHARED, 0, writable).unwrap();
            FileBackend::with_mapping(
                file,
                image.path(),
                mapping,
                PersistenceMode::DevDax,
                writable,
            )
        };
        let mut store = open(true);
        assert_eq!(store.mode(), PersistenceMode::DevDax);
        store.write(4096, b"persistent").unwrap();
        store.persist(4096, 10).unwrap();
        let mut back = [0u8; 10];
        store.read(4096, &mut back).unwrap();
        assert_eq!(&back, b"persistent");
        assert!(matches!(store.grow(16384), Err(Error::CannotGrow(_))));
        store.reserve(0, 8192).unwrap();
        store.discard(0, 4096).unwrap();
        store.read(4096, &mut back).unwrap();
        assert_eq!(&back, b"persistent", "discard punched no hole in a device");

        let mut read_only = open(false);
        assert!(matches!(
            read_only.write(0, b"x"),
            Err(Error::ReadOnly { .. })
        ));
        read_only.reserve(0, 4096).unwrap();
        read_only.discard(0, 4096).unwrap();
        read_only.refresh().unwrap();
        assert_eq!(read_only.len(), 8192);
    }
}
