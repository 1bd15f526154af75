//! An open NV region: the VMM-facing API over superblock, VM table, allocator and state slots.
//!
//! Every metadata change is one transaction: take the cross-process lock,
//! re-read superblock and table from the medium (another VMM may have changed
//! them), apply the change, commit it with the two-copy protocol, unlock.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::allocator::{self, align_up, FreeSpace};
use crate::coordinator::SaveReport;
use crate::error::{Error, Result};
use crate::format::format;
use crate::identity::{OwnerRecord, Uuid};
use crate::metadata_io::{read_superblock, read_table, write_superblock, write_table};
use crate::owner_process::OwnerProcess;
use crate::persistence::devdax;
use crate::persistence::file_mmap::FileBackend;
use crate::persistence::{read_vec, Persistence, PersistenceMode};
use crate::region_identity;
use crate::save_report;
use crate::superblock::{ShutdownMarker, Superblock};
use crate::swap::SwapRecord;
use crate::vm_handle::{recoverable_state, state_area, MemoryBacking, RecoveredVm, VmHandle};
use crate::vm_table::{self, Extent, RunRecord, ShutdownKind, VmEntry, VmTable};

/// Default extent alignment: huge-page sized, as devdax requires.
pub const DEFAULT_EXTENT_ALIGNMENT: u64 = 2 << 20;
/// Default state slot: room for a few vCPUs' registers, MSRs, xsave and device state.
pub const DEFAULT_STATE_SLOT_LEN: u64 = 1 << 20;
/// Default VM table copy: superblocks + two copies fill the first 2 MiB.
pub const DEFAULT_TABLE_COPY_LEN: u64 = (1 << 20) - 4096;

/// How to open (and if need be create or format) a region.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Create and format a plain-file region if the path does not exist (or is an empty file).
    pub create_if_missing: bool,
    /// Format a store that holds no valid superblock. Never touches a valid region.
    pub format: bool,
    /// Size of a newly formatted region; `None`: just the metadata, grown as VMs are added.
    pub region_size: Option<u64>,
    /// Open for reading only (listings): the descriptor and the mapping are read-only, and
    /// every operation that would write is refused (`Error::ReadOnly`). Excludes
    /// `create_if_missing` and `format`.
    pub read_only: bool,
    /// Layout parameters used only when formatting.
    pub extent_alignment: u64,
    pub state_slot_len: u64,
    pub table_copy_len: u64,
}

/// Whether a new VM's RAM extent is allocated in a file region when the VM is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryReservation {
    /// Allocated now (`fallocate`): a full file system is an error at create time, not a
    /// SIGBUS at the guest's first touch.
    Allocated,
    /// Left as a hole, allocated page by page as the guest touches it: a VM larger than what the
    /// backing can hold at once (sparse benchmarks, overcommitted hosts).
    Sparse,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            create_if_missing: false,
            format: false,
            region_size: None,
            read_only: false,
            extent_alignment: DEFAULT_EXTENT_ALIGNMENT,
            state_slot_len: DEFAULT_STATE_SLOT_LEN,
            table_copy_len: DEFAULT_TABLE_COPY_LEN,
        }
    }
}

impl OpenOptions {
    /// The layout of a small region (tests, fuzzing): 4 KiB extent alignment, 8 KiB state slots
    /// and table copies, so that a region with a few VMs stays a few pages. Everything else is
    /// the default: set `create_if_missing` or `format` on top.
    pub fn compact() -> Self {
        OpenOptions {
            extent_alignment: 4096,
            state_slot_len: 8192,
            table_copy_len: 8192,
            ..OpenOptions::default()
        }
    }
}

/// One line of `list_vms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSummary {
    pub name: String,
    pub uuid: Uuid,
    pub memory_size: u64,
    pub state: RunRecord,
    /// What ended the last run, if it ended with a save.
    pub shutdown_kind: Option<ShutdownKind>,
    /// Sequence of the last completed save, if any.
    pub last_save_seq: Option<u64>,
    /// Pid of the live process owning the VM, if any.
    pub owner_pid: Option<u32>,
    /// How the last completed save went, if its report was recorded (durations to the
    /// microsecond). Kept after the VM resumes, until its next save.
    pub last_save: Option<SaveReport>,
    /// Where the VM is when it is swapped out (`status()` "swapped-out"); `None` when resident.
    pub swap: Option<SwapRecord>,
    /// The committed checkpoint epoch of the VM's current run (its state sequence), which a
    /// recovery after a death without a save rolls back to (`docs/checkpoints.md`).
    pub checkpoint_epoch: Option<u64>,
}

pub(crate) struct Shared {
    pub(crate) store: Box<dyn Persistence>,
    pub(crate) path: PathBuf,
    pub(crate) superblock: Superblock,
}

impl VmSummary {
    /// One word for listings: what the VM is doing, or what its next start must be.
    pub fn status(&self) -> &'static str {
        if self.swap.is_some() {
            return "swapped-out";
        }
        match self.state {
            RunRecord::Created => "created",
            RunRecord::Running { .. } if self.owner_pid.is_some() => "running",
            // Recorded as running, but its process is gone: it died without a save, and
            // recovers from its last checkpoint epoch if it has one.
            RunRecord::Running { .. } if self.checkpoint_epoch.is_some() => "checkpointed",
            RunRecord::Running { .. } => "unsafe",
            RunRecord::Saved {
                kind: ShutdownKind::PowerFail,
                ..
            } => "power-failed",
            RunRecord::Saved {
                kind: ShutdownKind::PlannedSuspend,
                ..
            } => "suspended",
            RunRecord::Saved {
                kind: ShutdownKind::Checkpoint,
                ..
            } => "checkpoint-recovered",
            RunRecord::PoweredOff { .. } => "powered-off",
        }
    }
}

/// An open NV region; cheap to clone, shared by its VM handles.
#[derive(Clone)]
pub struct Region {
    shared: Arc<Mutex<Shared>>,
}

/// What a path names, in words, when it cannot hold a region.
fn unusable_file_type(file_type: std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_file() || file_type.is_char_device() {
        None
    } else if file_type.is_dir() {
        Some("a directory")
    } else if file_type.is_fifo() {
        Some("a FIFO")
    } else if file_type.is_socket() {
        Some("a socket")
    } else if file_type.is_block_device() {
        Some("a block device")
    } else {
        Some("not a regular file")
    }
}

/// Checks what `path` names before anything opens it: opening a FIFO blocks, opening some
/// character devices acts on them. A character device must be devdax (its sysfs geometry).
fn check_file_type(path: &Path, metadata: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if let Some(what) = unusable_file_type(metadata.file_type()) {
        return Err(Error::NotARegionFile {
            path: path.to_path_buf(),
            what: what.to_string(),
        });
    }
    if metadata.file_type().is_char_device() {
        devdax::geometry_of_device(metadata.rdev(), path).map_err(|_| Error::NotARegionFile {
            path: path.to_path_buf(),
            what: "a character device that is not device-DAX".to_string(),
        })?;
    }
    Ok(())
}

/// Opens the region's file after checking its type, and checks again on the open descriptor
/// (the path may have changed in between; `O_NONBLOCK` keeps a FIFO swapped in from blocking).
fn open_checked(path: &Path, options: &OpenOptions, metadata: &std::fs::Metadata) -> Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    check_file_type(path, metadata)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!options.read_only)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io(format!("opening NV region {}", path.display()), e))?;
    let opened = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    if opened.dev() != metadata.dev() || opened.ino() != metadata.ino() {
        return Err(Error::RegionFileChanged {
            path: path.to_path_buf(),
            detail: "the path changed while it was being opened".to_string(),
        });
    }
    Ok(file)
}

fn open_store(path: &Path, options: &OpenOptions) -> Result<(Box<dyn Persistence>, bool)> {
    if options.read_only && (options.create_if_missing || options.format) {
        return Err(Error::Unsupported(
            "a region opened read-only cannot be created or formatted".to_string(),
        ));
    }
    let created;
    let file = match std::fs::metadata(path) {
        Ok(metadata) => {
            let file = open_checked(path, options, &metadata)?;
            created = metadata.is_file() && metadata.len() == 0 && options.create_if_missing;
            file
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && options.create_if_missing => {
            // Created empty; whoever takes the region lock first formats it (the
            // other sees the superblock once it holds the lock).
            created = true;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| Error::io(format!("creating NV region {}", path.display()), e))?
        }
        Err(e) => {
            return Err(Error::io(
                format!("opening NV region {}", path.display()),
                e,
            ))
        }
    };
    let writable = !options.read_only;
    let file_type = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
        .file_type();
    let store: Box<dyn Persistence> = {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_char_device() {
            Box::new(devdax::open(file, path, writable)?)
        } else if file_type.is_file() {
            Box::new(FileBackend::open(file, path, writable)?)
        } else {
            return Err(Error::NotARegionFile {
                path: path.to_path_buf(),
                what: unusable_file_type(file_type)
                    .unwrap_or("not a regular file")
                    .to_string(),
            });
        }
    };
    Ok((store, created))
}

impl Region {
    /// Opens the region at `path` (a file, a DAX file or `/dev/daxX.Y`).
    pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Region> {
        let path = path.as_ref();
        let (store, created) = open_store(path, options)?;
        let options = OpenOptions {
            format: options.format || created,
            ..options.clone()
        };
        Self::open_store(store, path, &options)
    }

    /// Opens a region on any backend (tests, crash replay).
    pub fn open_store(
        mut store: Box<dyn Persistence>,
        path: &Path,
        options: &OpenOptions,
    ) -> Result<Region> {
        store.lock_metadata()?;
        // Another process may have formatted or grown the store since we mapped it.
        let result = store
            .refresh()
            .and_then(|()| Self::load_or_format(store.as_mut(), path, options));
        store.unlock_metadata();
        let superblock = result?;
        let mode = store.mode();
        log::debug!(
            "opened NV region {} at {} in {mode} mode",
            superblock.region_uuid,
            path.display()
        );
        Ok(Region {
            shared: Arc::new(Mutex::new(Shared {
                store,
                path: path.to_path_buf(),
                superblock,
            })),
        })
    }

    fn load_or_format(
        store: &mut dyn Persistence,
        path: &Path,
        options: &OpenOptions,
    ) -> Result<Superblock> {
        let not_a_region = |reason: String| Error::NotARegion {
            path: path.to_path_buf(),
            reason,
        };
        match read_superblock(store) {
            Ok(Some(sb)) => {
                read_table(store, &sb)?;
                Ok(sb)
            }
            Ok(None) if options.format => format(store, options),
            Ok(None) => {
                let probe = read_vec(store, 0, store.len().min(4096) as usize)?;
                Err(not_a_region(if store.is_empty() {
                    "empty".into()
                } else if probe.iter().all(|b| *b == 0) {
                    "zero-filled, no superblock".into()
                } else {
                    "no NV region magic".into()
                }))
            }
            Err(Error::CorruptSuperblock(_)) if options.format => format(store, options),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock cannot leave the medium inconsistent
        // (every update is a commit), so a poisoned lock is still usable.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `change` on the current table under the cross-process lock and commits it
    /// if it returns `true` alongside its result.
    pub(crate) fn transact<T>(
        &self,
        change: impl FnOnce(&mut Shared, &mut VmTable) -> Result<(T, bool)>,
    ) -> Result<T> {
        self.transact_then(change, |_, _| Ok(()))
    }

    /// Like [`Region::transact`], then runs `after_commit` still under the lock.
    pub(crate) fn transact_then<T>(
        &self,
        change: impl FnOnce(&mut Shared, &mut VmTable) -> Result<(T, bool)>,
        after_commit: impl FnOnce(&mut Shared, &T) -> Result<()>,
    ) -> Result<T> {
        let mut shared = self.lock();
        shared.store.lock_metadata()?;
        let result = (|| {
            shared.store.refresh()?;
            let sb = read_superblock(shared.store.as_ref())?.ok_or_else(|| Error::NotARegion {
                path: shared.path.clone(),
                reason: "superblock vanished".into(),
            })?;
            shared.superblock = sb;
            let mut table = read_table(shared.store.as_ref(), &shared.superblock)?;
            let (value, changed) = change(&mut shared, &mut table)?;
            if changed {
                table.generation = table
                    .generation
                    .checked_add(1)
                    .ok_or_else(|| Error::CorruptVmTable("generation exhausted".into()))?;
                let sb = shared.superblock.clone();
                write_table(shared.store.as_mut(), &sb, &table)?;
            }
            after_commit(&mut shared, &value)?;
            Ok(value)
        })();
        shared.store.unlock_metadata();
        result
    }

    pub(crate) fn update_superblock(
        shared: &mut Shared,
        change: impl FnOnce(&mut Superblock),
    ) -> Result<()> {
        let mut sb = shared.superblock.clone();
        change(&mut sb);
        if sb == shared.superblock {
            return Ok(());
        }
        sb.generation = sb
            .generation
            .checked_add(1)
            .ok_or_else(|| Error::CorruptSuperblock("generation exhausted".into()))?;
        write_superblock(shared.store.as_mut(), &sb)?;
        shared.superblock = sb;
        Ok(())
    }

    pub fn persistence_mode(&self) -> PersistenceMode {
        self.lock().store.mode()
    }

    /// `Ok` while the region's path still names the file this region has open; otherwise
    /// `RegionFileChanged` (deleted, renamed or replaced since it was opened). One `fstat` and
    /// one `stat`. A region without a file (tests) always passes.
    pub fn check_path(&self) -> Result<()> {
        let shared = self.lock();
        match shared.store.file() {
            Some(file) => region_identity::check(file, &shared.path),
            None => Ok(()),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    pub fn uuid(&self) -> Uuid {
        self.lock().superblock.region_uuid
    }

    pub fn size(&self) -> u64 {
        self.lock().superblock.region_size
    }

    pub fn shutdown_marker(&self) -> ShutdownMarker {
        self.lock().superblock.shutdown_marker
    }

    /// Free space inside the region's current size (`allocator::FreeSpace`).
    pub fn free_space(&self) -> Result<FreeSpace> {
        self.transact(|shared, table| {
            let sb = &shared.superblock;
            let free =
                allocator::free_space(table, sb.data_start, sb.region_size, sb.extent_alignment);
            Ok((free, false))
        })
    }

    /// The live process that owns VM `name`, held by a pidfd (`owner_process`); `None` when no
    /// live process owns it. Works on a region opened read-only.
    pub fn owner_process(&self, name: &str) -> Result<Option<OwnerProcess>> {
        self.transact(|_, table| Ok((OwnerProcess::open(&find(table, name)?.owner)?, false)))
    }

    pub fn list_vms(&self) -> Result<Vec<VmSummary>> {
        self.transact(|shared, table| {
            let summaries = table
                .entries
                .iter()
                .map(|entry| summary(shared.store.as_ref(), entry))
                .collect::<Result<_>>()?;
            Ok((summaries, false))
        })
    }

    pub fn vm(&self, name: &str) -> Result<VmSummary> {
        self.transact(|shared, table| {
            Ok((summary(shared.store.as_ref(), find(table, name)?)?, false))
        })
    }

    /// The report of VM `name`'s last completed save, if it was recorded.
    pub fn last_save_report(&self, name: &str) -> Result<Option<SaveReport>> {
        self.transact(|shared, table| {
            Ok((
                last_save_report(shared.store.as_ref(), find(table, name)?)?,
                false,
            ))
        })
    }

    /// Where VM `name`'s RAM is, read from the directory without claiming the VM: a recovery
    /// maps it (nothing read) while it claims the VM. Only the claim makes the extent the
    /// caller's: compare it with the claimed handle's [`VmHandle::memory_backing`] before
    /// anything can run on it.
    pub fn memory_backing_unclaimed(&self, name: &str) -> Result<MemoryBacking> {
        self.transact(|shared, table| {
            let entry = find(table, name)?;
            refuse_swapped_out(entry)?;
            Ok((
                MemoryBacking::of_extent(shared, entry.memory, entry.memory_size)?,
                false,
            ))
        })
    }

    /// A VM's stored config, readable without owning the VM (listings, status).
    pub fn config_blob(&self, name: &str) -> Result<Vec<u8>> {
        self.transact(|_, table| Ok((find(table, name)?.config.clone(), false)))
    }

    /// Adds a VM with `memory_size` bytes of guest RAM (a multiple of 4 KiB), its RAM extent
    /// allocated.
    pub fn create_vm(&self, name: &str, memory_size: u64, config_blob: &[u8]) -> Result<VmSummary> {
        self.create_vm_with(name, memory_size, config_blob, MemoryReservation::Allocated)
    }

    /// Adds a VM as [`Region::create_vm`] does, its RAM extent allocated or left sparse as
    /// `reservation` says (the state extent is always allocated).
    pub fn create_vm_with(
        &self,
        name: &str,
        memory_size: u64,
        config_blob: &[u8],
        reservation: MemoryReservation,
    ) -> Result<VmSummary> {
        vm_table::validate_name(name)?;
        if memory_size == 0 || !memory_size.is_multiple_of(4096) {
            return Err(Error::InvalidSize {
                size: memory_size,
                reason: "guest memory must be a non-zero multiple of 4096 bytes",
            });
        }
        let uuid = Uuid::random()?;
        self.transact(|shared, table| {
            if table.find(name).is_some() {
                return Err(Error::VmExists(name.to_string()));
            }
            let align = shared.superblock.extent_alignment;
            let too_big = Error::InvalidSize {
                size: memory_size,
                reason: "guest memory too large",
            };
            let memory_len = align_up(memory_size, align).ok_or(too_big)?;
            let state_len =
                align_up(2 * shared.superblock.state_slot_len, align).unwrap_or(u64::MAX);
            let offsets = match reservation {
                MemoryReservation::Allocated => {
                    Self::allocate(shared, table, &[memory_len, state_len])?
                }
                MemoryReservation::Sparse => {
                    let offsets = Self::place_extents(shared, table, &[memory_len, state_len])?;
                    shared.store.reserve(offsets[1], state_len)?;
                    offsets
                }
            };
            let entry = VmEntry {
                name: name.to_string(),
                uuid,
                memory_size,
                memory: Extent {
                    offset: offsets[0],
                    len: memory_len,
                },
                state: Extent {
                    offset: offsets[1],
                    len: state_len,
                },
                checkpoint: Extent { offset: 0, len: 0 },
                record: RunRecord::Created,
                owner: OwnerRecord::default(),
                config: config_blob.to_vec(),
                swap: None,
            };
            let result = summary(shared.store.as_ref(), &entry)?;
            table.entries.push(entry);
            Ok((result, true))
        })
    }

    /// Places extents of the given lengths, growing the store if it can and must.
    pub(crate) fn allocate(
        shared: &mut Shared,
        table: &VmTable,
        lengths: &[u64],
    ) -> Result<Vec<u64>> {
        let offsets = Self::place_extents(shared, table, lengths)?;
        for (offset, len) in offsets.iter().zip(lengths) {
            shared.store.reserve(*offset, *len)?;
        }
        Ok(offsets)
    }

    /// Places extents of `lengths` (growing the store if needed) without reserving their
    /// space: the caller reserves what it will not write itself.
    pub(crate) fn place_extents(
        shared: &mut Shared,
        table: &VmTable,
        lengths: &[u64],
    ) -> Result<Vec<u64>> {
        let sb = shared.superblock.clone();
        let requested = lengths
            .iter()
            .fold(0u64, |sum, len| sum.saturating_add(*len));
        let out_of_space = |table: &VmTable| {
            let free =
                allocator::free_space(table, sb.data_start, sb.region_size, sb.extent_alignment);
            Error::OutOfSpace {
                requested,
                free: free.free_bytes,
                largest_free: free.largest_free_extent,
            }
        };
        let (offsets, needed) = allocator::place(
            table,
            sb.data_start,
            sb.region_size,
            sb.extent_alignment,
            lengths,
        )
        .ok_or_else(|| out_of_space(table))?;
        if needed > sb.region_size {
            // Grow the store first, then record the new size: a crash in
            // between leaves unused bytes at the end, never a table entry
            // pointing past the region.
            if let Err(e) = shared.store.grow(needed) {
                log::debug!("cannot grow region: {e}");
                return Err(out_of_space(table));
            }
            Self::update_superblock(shared, |sb| sb.region_size = needed)?;
        }
        Ok(offsets)
    }

    /// Changes a VM's guest memory size (a multiple of 4 KiB).
    ///
    /// The memory may move to a new extent and is not copied, so only a VM
    /// that will cold-boot next may be resized: one with a resumable saved
    /// state is refused, as is one owned by a live process.
    pub fn resize_vm(&self, name: &str, memory_size: u64) -> Result<VmSummary> {
        if memory_size == 0 || !memory_size.is_multiple_of(4096) {
            return Err(Error::InvalidSize {
                size: memory_size,
                reason: "guest memory must be a non-zero multiple of 4096 bytes",
            });
        }
        self.transact(|shared, table| {
            let entry = find(table, name)?;
            if entry.owner.is_live() {
                return Err(Error::OwnedByLiveProcess {
                    vm: name.to_string(),
                    pid: entry.owner.pid,
                });
            }
            refuse_swapped_out(entry)?;
            if matches!(entry.record, RunRecord::Saved { .. }) {
                return Err(Error::ResizeWouldDiscardState(name.to_string()));
            }
            let align = shared.superblock.extent_alignment;
            let memory_len = align_up(memory_size, align).ok_or(Error::InvalidSize {
                size: memory_size,
                reason: "guest memory too large",
            })?;
            let memory = if memory_len <= entry.memory.len {
                // Shrink in place; the tail becomes free space.
                Extent {
                    offset: entry.memory.offset,
                    len: memory_len,
                }
            } else {
                // Place as if the old extent were already free (it may be reused in place).
                let mut without = table.clone();
                find_mut(&mut without, name)?.memory.len = 0;
                let offsets = Self::allocate(shared, &without, &[memory_len])?;
                Extent {
                    offset: offsets[0],
                    len: memory_len,
                }
            };
            let entry = find_mut(table, name)?;
            entry.memory = memory;
            entry.memory_size = memory_size;
            Ok((summary(shared.store.as_ref(), entry)?, true))
        })
    }

    /// Removes a VM; refused while a live process owns it.
    ///
    /// Once the table no longer names them, the VM's extents are discarded
    /// (hole-punched in a file) while the lock still keeps other processes
    /// from reusing them: the space returns to the filesystem and the next VM
    /// placed there does not start on this guest's data.
    pub fn delete_vm(&self, name: &str) -> Result<()> {
        self.transact_then(
            |_, table| {
                let entry = find(table, name)?;
                if entry.owner.is_live() {
                    return Err(Error::OwnedByLiveProcess {
                        vm: name.to_string(),
                        pid: entry.owner.pid,
                    });
                }
                let freed = [entry.memory, entry.state, entry.checkpoint];
                table.entries.retain(|e| e.name != name);
                Ok((freed, true))
            },
            |shared, freed| {
                for extent in freed.iter().filter(|x| x.len > 0) {
                    if let Err(e) = shared.store.discard(extent.offset, extent.len) {
                        // The delete is committed; unreclaimed space is only a cost.
                        log::warn!("VM {name:?} deleted, but its space was not discarded: {e}");
                    }
                }
                Ok(())
            },
        )
        .map(|_| ())
    }

    /// Takes ownership of a VM; refused while another live process (or handle) owns it.
    pub fn claim_vm(&self, name: &str) -> Result<VmHandle> {
        let claim = OwnerRecord::new_claim()?;
        let result = self.transact(|_, table| {
            let entry = find_mut(table, name)?;
            if entry.owner.is_live() {
                return Err(Error::OwnedByLiveProcess {
                    vm: name.to_string(),
                    pid: entry.owner.pid,
                });
            }
            refuse_swapped_out(entry)?;
            if !entry.owner.is_none() {
                log::info!(
                    "VM {name:?}: taking over from dead owner pid {}",
                    entry.owner.pid
                );
            }
            entry.owner = claim;
            Ok((entry.clone(), true))
        });
        match result {
            Ok(entry) => Ok(VmHandle::new(self.clone(), &entry, claim)),
            Err(e) => {
                claim.release();
                Err(e)
            }
        }
    }

    /// What `VmHandle::recover` would return, without claiming the VM (status listings).
    pub fn inspect_recovery(&self, name: &str) -> Result<RecoveredVm> {
        self.transact(|shared, table| {
            Ok((
                recoverable_state(shared.store.as_ref(), find(table, name)?)?,
                false,
            ))
        })
    }

    /// [`Region::inspect_recovery`], and `buf.len()` bytes of the VM's guest memory from
    /// `guest_offset` as that recovery would leave them: after a death without a save, the
    /// committed epoch's undo log put back over memory as it stands. Nothing is written, so a
    /// test or a tool can hold a recovery to the epoch before it runs.
    pub fn inspect_recovery_memory(
        &self,
        name: &str,
        guest_offset: u64,
        buf: &mut [u8],
    ) -> Result<RecoveredVm> {
        self.transact(|shared, table| {
            let store = shared.store.as_ref();
            let entry = find(table, name)?;
            let recovered = recoverable_state(store, entry)?;
            crate::checkpoint::recoverable_memory(store, entry, guest_offset, buf)?;
            Ok((recovered, false))
        })
    }
}

/// `SwappedOut` for a VM whose memory and state are in a swap file.
pub(crate) fn refuse_swapped_out(entry: &VmEntry) -> Result<()> {
    match &entry.swap {
        Some(swap) => Err(Error::SwappedOut {
            vm: entry.name.clone(),
            path: swap.path.clone(),
        }),
        None => Ok(()),
    }
}

/// The entry of VM `name`. A name no VM can have is refused as such (`InvalidVmName`), so a
/// caller learns its request was malformed rather than that the VM is missing.
pub(crate) fn find<'a>(table: &'a VmTable, name: &str) -> Result<&'a VmEntry> {
    vm_table::validate_name(name)?;
    table
        .find(name)
        .ok_or_else(|| Error::VmNotFound(name.to_string()))
}

pub(crate) fn find_mut<'a>(table: &'a mut VmTable, name: &str) -> Result<&'a mut VmEntry> {
    vm_table::validate_name(name)?;
    table
        .find_mut(name)
        .ok_or_else(|| Error::VmNotFound(name.to_string()))
}

/// The recorded report of the save the VM's run record names as its last one.
fn last_save_report(store: &dyn Persistence, entry: &VmEntry) -> Result<Option<SaveReport>> {
    save_report::read(store, &state_area(entry), entry.record.last_seq())
}

fn summary(store: &dyn Persistence, entry: &VmEntry) -> Result<VmSummary> {
    let (shutdown_kind, last_save) = match entry.record {
        RunRecord::Saved { seq, kind } => (Some(kind), seq),
        other => (None, other.last_seq()),
    };
    Ok(VmSummary {
        name: entry.name.clone(),
        uuid: entry.uuid,
        memory_size: entry.memory_size,
        state: entry.record,
        shutdown_kind,
        last_save_seq: (last_save > 0).then_some(last_save),
        owner_pid: entry.owner.is_live().then_some(entry.owner.pid),
        // A swapped-out VM's save is in its file (its state extent is free).
        last_save: match entry.swap {
            Some(_) => None,
            None => last_save_report(store, entry)?,
        },
        swap: entry.swap.clone(),
        checkpoint_epoch: crate::checkpoint::committed_epoch(store, entry)?.map(|e| e.seq),
    })
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = self.lock();
        write!(
            f,
            "Region({}, {})",
            shared.path.display(),
            shared.superblock.region_uuid
        )
    }
}

/// The VMM moves handles between its control and vCPU threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Region>();
    assert_send_sync::<VmHandle>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::memory::MemoryBackend;

    const PAGE: u64 = 4096;

    /// A store of a fixed size, as a devdax device is: growing it is refused.
    struct FixedStore(MemoryBackend);

    impl Persistence for FixedStore {
        fn mode(&self) -> PersistenceMode {
            self.0.mode()
        }
        fn len(&self) -> u64 {
            self.0.len()
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.0.read(offset, buf)
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
            self.0.write(offset, data)
        }
        fn persist(&mut self, offset: u64, len: u64) -> Result<()> {
            self.0.persist(offset, len)
        }
        fn grow(&mut self, new_len: u64) -> Result<()> {
            if new_len > self.0.len() {
                return Err(Error::CannotGrow("a fixed-size test store"));
            }
            Ok(())
        }
    }

    /// A compact region of `data_pages` pages of data area on a store that cannot grow.
    /// Each VM takes its guest RAM plus a state area of 4 pages (two 8 KiB slots).
    fn fixed_region(data_pages: u64) -> (Region, u64) {
        let probe = Region::open_store(
            Box::new(MemoryBackend::default()),
            Path::new("probe"),
            &OpenOptions {
                format: true,
                ..OpenOptions::compact()
            },
        )
        .unwrap();
        let data_start = probe.lock().superblock.data_start;
        let size = data_start + data_pages * PAGE;
        let store = FixedStore(MemoryBackend::new(vec![0; size as usize]));
        let region = Region::open_store(
            Box::new(store),
            Path::new("fixed"),
            &OpenOptions {
                format: true,
                ..OpenOptions::compact()
            },
        )
        .unwrap();
        assert_eq!(region.size(), size);
        (region, data_start)
    }

    const STATE_PAGES: u64 = 4;

    #[test]
    fn region_full_names_what_was_asked_and_what_is_free() {
        let (region, _) = fixed_region(24);
        for name in ["a", "b", "c", "d"] {
            region.create_vm(name, 2 * PAGE, b"").unwrap();
        }
        assert_eq!(region.free_space().unwrap(), FreeSpace::default());
        // Two holes of 6 pages, not next to each other.
        region.delete_vm("a").unwrap();
        region.delete_vm("c").unwrap();
        assert_eq!(
            region.free_space().unwrap(),
            FreeSpace {
                free_bytes: 12 * PAGE,
                largest_free_extent: 6 * PAGE
            }
        );

        // 8 pages of RAM + 4 of state: the total is free, but in no single extent.
        let error = region.create_vm("big", 8 * PAGE, b"").unwrap_err();
        assert!(
            matches!(
                error,
                Error::OutOfSpace {
                    requested,
                    free,
                    largest_free
                } if requested == 12 * PAGE && free == 12 * PAGE && largest_free == 6 * PAGE
            ),
            "{error:?}"
        );
        let message = error.to_string();
        for part in [
            "NV region is full: 49152 bytes asked for",
            "49152 bytes free in total but fragmented",
            "the largest free extent is 24576 bytes",
            "guest RAM must be one extent",
        ] {
            assert!(message.contains(part), "{part:?} not in {message:?}");
        }

        // More than is free at all: no word of fragmentation.
        let error = region.create_vm("huge", 20 * PAGE, b"").unwrap_err();
        let message = error.to_string();
        assert_eq!(
            message,
            "NV region is full: 98304 bytes asked for, 49152 bytes free in total, the largest \
             free extent is 24576 bytes"
        );
        assert_eq!(error.kind(), crate::ErrorKind::Internal);

        // A refused create changed nothing; a VM that fits a hole still goes there.
        assert_eq!(region.list_vms().unwrap().len(), 2);
        region.create_vm("small", 2 * PAGE, b"").unwrap();
        assert_eq!(region.free_space().unwrap().free_bytes, 6 * PAGE);
    }

    /// A small deterministic generator (xorshift), so that a failure replays.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn mixed_size_churn_keeps_the_space_accounted_and_refuses_only_what_cannot_fit() {
        const DATA_PAGES: u64 = 96;
        let (region, data_start) = fixed_region(DATA_PAGES);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut live: Vec<(String, u64)> = Vec::new();
        let (mut created, mut fragmented, mut full) = (0, 0, 0);
        for step in 0..2000 {
            let before = region.free_space().unwrap();
            if live.len() < 16 && (live.is_empty() || !next(&mut rng).is_multiple_of(3)) {
                let pages = [1, 2, 3, 5, 8, 13][(next(&mut rng) % 6) as usize];
                let name = format!("vm{step}");
                let asked = (pages + STATE_PAGES) * PAGE;
                match region.create_vm(&name, pages * PAGE, b"") {
                    Ok(summary) => {
                        assert_eq!(summary.memory_size, pages * PAGE);
                        assert!(asked <= before.free_bytes, "step {step}");
                        live.push((name, pages));
                        created += 1;
                    }
                    Err(Error::OutOfSpace {
                        requested,
                        free,
                        largest_free,
                    }) => {
                        assert_eq!(requested, asked, "step {step}");
                        assert_eq!(free, before.free_bytes, "step {step}");
                        assert_eq!(largest_free, before.largest_free_extent, "step {step}");
                        // First fit places RAM and state in one extent that holds both, so a
                        // refusal means no single free extent holds the whole request.
                        assert!(
                            largest_free < asked,
                            "step {step}: {pages} pages refused with {before:?}"
                        );
                        if asked <= free {
                            fragmented += 1;
                        } else {
                            full += 1;
                        }
                        assert_eq!(region.free_space().unwrap(), before, "step {step}");
                    }
                    Err(e) => panic!("step {step}: {e}"),
                }
            } else {
                let index = (next(&mut rng) % live.len() as u64) as usize;
                let (name, _) = live.swap_remove(index);
                region.delete_vm(&name).unwrap();
            }
            // Every byte of the data area is either some live VM's or free, never both.
            let used: u64 = live.iter().map(|(_, p)| (p + STATE_PAGES) * PAGE).sum();
            let free = region.free_space().unwrap();
            assert_eq!(
                used + free.free_bytes,
                region.size() - data_start,
                "step {step}"
            );
            assert!(free.largest_free_extent <= free.free_bytes);
            let listed = region.list_vms().unwrap();
            assert_eq!(listed.len(), live.len(), "step {step}");
        }
        assert!(created > 100, "{created} creates");
        assert!(fragmented > 0, "the churn never fragmented the region");
        assert!(full > 0, "the churn never filled the region");
    }
}
