//! NV checkpoints and disks: while checkpoints are on, each in-process disk asks a
//! [`DiskUndoHook`] before it writes, so the old bytes are durable in the undo log first
//! (`UndoLog::record_disk_write`); a recovery writes them back through [`ConfiguredDisks`], the
//! disks of the stored config by position. `docs/checkpoints.md` section 10 has the design.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use devices::virtio::{BeforeWrite, BlockWriteHook, BlockWriteHookSlot, DiskImage};
use nv_extension::{DiskUndoTarget, HostError, UndoLog};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::vm::Vm;
use crate::{CheckpointError, Error};

/// The undo log as an in-process disk's write hook: the old bytes of the blocks a write is
/// about to change are durable in the log before the device writes. A full log defers the
/// write (the device takes it again after the next resume) and asks for an early checkpoint.
pub(super) struct DiskUndoHook {
    log: UndoLog,
    /// The disk's position in the VM's config.
    disk: u16,
    attention: EventFd,
}

impl DiskUndoHook {
    pub(super) fn new(log: UndoLog, disk: u16, attention: EventFd) -> Self {
        DiskUndoHook {
            log,
            disk,
            attention,
        }
    }
}

impl BlockWriteHook for DiskUndoHook {
    fn before_write(&self, image: &DiskImage<'_>, offset: u64, len: u64) -> BeforeWrite {
        let mut read_old = |at: u64, buf: &mut [u8]| image.read_at(at, buf);
        match self
            .log
            .record_disk_write(self.disk, offset, len, image.len(), &mut read_old)
        {
            Ok(_) => BeforeWrite::Proceed,
            Err(nv_extension::Error::UndoLogFull { .. }) => {
                // The control loop takes an early checkpoint; its resume retries the write.
                let _ = self.attention.write(1);
                BeforeWrite::Defer
            }
            Err(error) => {
                log::error!(
                    "disk {}: logging its old bytes at {offset:#x} failed, the write fails: {error}",
                    self.disk
                );
                BeforeWrite::Fail(error.to_string())
            }
        }
    }
}

/// The write-hook slots of `vm`'s disks, in config order, or the first disk whose writes the
/// VMM cannot see: checkpoints would roll its guest back but not its disk. Refused too while
/// a disk's removal is pending (its eject would renumber the disks after it).
pub(super) fn disk_hook_slots(vm: &Vm) -> Result<Vec<BlockWriteHookSlot>, Error> {
    if let Some(id) = vm.devices.disk_removal_pending() {
        return Err(Error::CheckpointsWhileDiskRemovalPending(id));
    }
    let disks = vm.devices.disk_write_hooks();
    if disks.len() > usize::from(u16::MAX) {
        return Err(Error::Checkpoint(CheckpointError::UncoverableDisk {
            id: disks[usize::from(u16::MAX)].0.clone(),
            reason: "more disks than a checkpoint's undo entries can name",
        }));
    }
    disks
        .into_iter()
        .map(|(id, slot)| {
            slot.ok_or(Error::Checkpoint(CheckpointError::UncoverableDisk {
                id,
                reason: "a vhost-user disk's writes never pass through the VMM, so they cannot \
                         be undone",
            }))
        })
        .collect()
}

/// What a recovery writes a checkpoint's old disk bytes back through: the disks of the VM's
/// stored config, by position, opened on first use.
pub(super) struct ConfiguredDisks<'a> {
    config: &'a VmConfig,
    open: BTreeMap<u16, File>,
}

impl<'a> ConfiguredDisks<'a> {
    pub(super) fn new(config: &'a VmConfig) -> Self {
        ConfiguredDisks {
            config,
            open: BTreeMap::new(),
        }
    }

    fn file(&mut self, disk: u16) -> Result<&File, HostError> {
        if !self.open.contains_key(&disk) {
            let config = self
                .config
                .disks
                .iter()
                .flatten()
                .nth(usize::from(disk))
                .ok_or_else(|| format!("the VM's config has no disk {disk}"))?;
            let path = match (&config.path, config.vhost_user) {
                (Some(path), false) => path,
                _ => return Err(format!("disk {disk} is not an image file the VMM writes").into()),
            };
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| format!("disk {disk} ({path}): {e}"))?;
            self.open.insert(disk, file);
        }
        Ok(&self.open[&disk])
    }
}

impl DiskUndoTarget for ConfiguredDisks<'_> {
    fn write_disk(&mut self, disk: u16, offset: u64, data: &[u8]) -> Result<(), HostError> {
        Ok(self.file(disk)?.write_all_at(data, offset)?)
    }

    fn sync_disk(&mut self, disk: u16) -> Result<(), HostError> {
        Ok(self.file(disk)?.sync_data()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;
    use crate::ErrorKind;

    /// `PUT vm.nv-checkpoint` on a VM with a disk the VMM cannot see is the caller's mistake
    /// (a 400 naming the disk), not a failure of the VMM.
    #[test]
    fn an_uncoverable_disk_is_a_bad_request_naming_it() {
        let error = Error::Checkpoint(CheckpointError::UncoverableDisk {
            id: "vb".to_owned(),
            reason: "a vhost-user disk's writes never pass through the VMM",
        });
        assert_eq!(error.kind(), ErrorKind::InvalidRequest);
        let text = format!("{error}: {}", std::error::Error::source(&error).unwrap());
        assert!(
            text.contains("\"vb\"") && text.contains("vhost-user"),
            "{text}"
        );
    }

    /// Recovery writes old disk bytes into the stored config's images by position, and refuses
    /// a disk it cannot write (vhost-user, or none at that position).
    #[test]
    fn configured_disks_write_by_position_and_refuse_what_they_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.img");
        std::fs::write(&image, vec![0u8; 8192]).unwrap();
        let config = VmConfig {
            disks: Some(vec![
                DiskConfig::parse(&format!("path={}", image.display())).unwrap(),
                DiskConfig::parse("vhost_user=on,socket=/s").unwrap(),
            ]),
            ..VmConfig::default()
        };
        let mut disks = ConfiguredDisks::new(&config);
        disks.write_disk(0, 4096, &[7; 512]).unwrap();
        disks.sync_disk(0).unwrap();
        let bytes = std::fs::read(&image).unwrap();
        assert_eq!(&bytes[4096..4608], &[7; 512]);
        assert!(bytes[..4096].iter().all(|b| *b == 0));
        assert!(disks.write_disk(1, 0, &[1; 512]).is_err());
        assert!(disks.write_disk(2, 0, &[1; 512]).is_err());
    }
}
