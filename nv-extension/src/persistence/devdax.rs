//! Regions on a device-DAX character device (`/dev/daxX.Y`).
//!
//! A devdax device has no page cache and no filesystem: a mapping reaches the
//! persistent media directly, so a store is durable once its cache line is
//! written back. The device size and mapping alignment come from sysfs; the
//! mapping must start and end on that alignment (2 MiB typically).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::file_mmap::FileBackend;
use super::mapping::SharedMapping;
use super::PersistenceMode;
use crate::error::{Error, Result};

/// Default devdax alignment when sysfs does not say.
const DEFAULT_ALIGN: u64 = 2 << 20;

/// Size and alignment of a devdax device, read from sysfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevDaxGeometry {
    pub size: u64,
    pub align: u64,
}

/// Whether `path` names a character device (devdax regions are character devices).
pub fn is_char_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| m.file_type().is_char_device())
        .unwrap_or(false)
}

/// Reads the device geometry from `/sys/dev/char/MAJ:MIN/{size,align}`.
pub fn geometry(file: &File, path: &Path) -> Result<DevDaxGeometry> {
    let rdev = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
        .rdev();
    geometry_of_device(rdev, path)
}

/// The geometry of character device `rdev` (named `path`), without opening it: a device that
/// is not devdax has no `size` in sysfs and is refused.
pub fn geometry_of_device(rdev: u64, path: &Path) -> Result<DevDaxGeometry> {
    let sys = PathBuf::from(format!(
        "/sys/dev/char/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    parse_geometry(&sys).map_err(|reason| {
        Error::Unsupported(format!(
            "{} is a character device but not a usable devdax device: {reason}",
            path.display()
        ))
    })
}

/// Parses a sysfs device directory (split out so it can be tested on a fake tree).
pub fn parse_geometry(sys_dir: &Path) -> std::result::Result<DevDaxGeometry, String> {
    let read_u64 = |name: &str| -> std::result::Result<Option<u64>, String> {
        match std::fs::read_to_string(sys_dir.join(name)) {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| format!("{}/{name} holds {:?}", sys_dir.display(), text.trim())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}/{name}: {e}", sys_dir.display())),
        }
    };
    let size = read_u64("size")?.ok_or_else(|| format!("{}/size missing", sys_dir.display()))?;
    let align = read_u64("align")?.unwrap_or(DEFAULT_ALIGN);
    if !align.is_power_of_two() || size == 0 || size % align != 0 {
        return Err(format!("size {size} / alignment {align} unusable"));
    }
    Ok(DevDaxGeometry { size, align })
}

/// Maps the whole device shared, at its sysfs alignment; read-only unless `writable`. The store
/// is a [`FileBackend`] of mode `DevDax`: fixed size, durable by cache-line write-back.
pub fn open(file: File, path: &Path, writable: bool) -> Result<FileBackend> {
    let geometry = geometry(&file, path)?;
    let len = usize::try_from(geometry.size)
        .map_err(|_| Error::Unsupported("devdax device larger than the address space".into()))?;
    let mapping = SharedMapping::new(
        &file,
        len,
        libc::MAP_SHARED,
        geometry.align as usize,
        writable,
    )
    .map_err(|e| Error::io(format!("mmap {}", path.display()), e))?;
    Ok(FileBackend::with_mapping(
        file,
        path,
        mapping,
        PersistenceMode::DevDax,
        writable,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_comes_from_sysfs_with_a_2mib_default_alignment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("size"), "1073741824\n").unwrap();
        assert_eq!(
            parse_geometry(dir.path()).unwrap(),
            DevDaxGeometry {
                size: 1 << 30,
                align: 2 << 20
            }
        );
        std::fs::write(dir.path().join("align"), "1073741824\n").unwrap();
        assert_eq!(parse_geometry(dir.path()).unwrap().align, 1 << 30);
        std::fs::write(dir.path().join("align"), "3000\n").unwrap();
        assert!(parse_geometry(dir.path()).is_err());
        std::fs::remove_file(dir.path().join("size")).unwrap();
        assert!(parse_geometry(dir.path())
            .unwrap_err()
            .contains("size missing"));
    }

    #[test]
    fn a_regular_file_is_not_a_char_device() {
        let file = tempfile::NamedTempFile::new().unwrap();
        assert!(!is_char_device(file.path()));
        assert!(is_char_device(Path::new("/dev/null")));
    }
}
