//! Whether a region's path still names the file this process has open.
//!
//! A region file deleted or replaced (`rm`, `mv` over it, a restored backup) while a VM runs
//! leaves the VMM writing into an inode no path reaches: a save there "commits", and the
//! recovery, which opens the path, finds another file or none. One `fstat` of the open
//! descriptor and one `stat` of the path tell: the same device and inode, and a link count
//! above zero, mean the path still leads to what this process writes.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Error, Result};

/// `Ok` when `path` names `file`; otherwise `RegionFileChanged` saying what happened.
pub(crate) fn check(file: &File, path: &Path) -> Result<()> {
    let open = file
        .metadata()
        .map_err(|e| Error::io(format!("fstat of NV region {}", path.display()), e))?;
    let changed = |detail: String| Error::RegionFileChanged {
        path: path.to_path_buf(),
        detail,
    };
    let unlinked = open.nlink() == 0;
    match std::fs::metadata(path) {
        Ok(now) if now.dev() == open.dev() && now.ino() == open.ino() => Ok(()),
        Ok(now) => Err(changed(format!(
            "the path now names another file (device {:#x} inode {}), not the open region \
             (device {:#x} inode {}{})",
            now.dev(),
            now.ino(),
            open.dev(),
            open.ino(),
            if unlinked {
                ", which has no name left: it was replaced"
            } else {
                ", which lives on under another name"
            }
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(changed(if unlinked {
            format!(
                "the file was deleted while in use (inode {} has no name left)",
                open.ino()
            )
        } else {
            format!(
                "the path no longer exists; the open region (inode {}) was renamed",
                open.ino()
            )
        })),
        Err(e) => Err(Error::io(
            format!("stat of NV region {}", path.display()),
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletion_replacement_and_renaming_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        std::fs::write(&path, b"r").unwrap();
        let file = File::open(&path).unwrap();
        check(&file, &path).unwrap();

        let moved = dir.path().join("moved");
        std::fs::rename(&path, &moved).unwrap();
        let text = check(&file, &path).unwrap_err().to_string();
        assert!(text.contains("renamed"), "{text}");

        std::fs::write(&path, b"new").unwrap();
        let text = check(&file, &path).unwrap_err().to_string();
        assert!(text.contains("lives on under another name"), "{text}");

        std::fs::remove_file(&moved).unwrap();
        let text = check(&file, &path).unwrap_err().to_string();
        assert!(text.contains("it was replaced"), "{text}");

        std::fs::remove_file(&path).unwrap();
        let error = check(&file, &path).unwrap_err();
        assert!(
            error.to_string().contains("deleted while in use"),
            "{error}"
        );
        assert!(matches!(error, Error::RegionFileChanged { .. }));
    }
}
