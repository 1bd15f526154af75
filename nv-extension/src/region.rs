//! An open NV region: the VMM-facing API over superblock, VM table, allocator and state slots.
//!
//! Every metadata change is one transaction: take the cross-process lock,
//! re-read superblock and table from the medium (another VMM may have changed
//! them), apply the change, commit it with the two-copy protocol, unlock.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::allocator::{self, align_up};
use crate::error::{Error, Result};
use crate::fault_injection::{self, FaultPoint};
use crate::identity::{OwnerRecord, Uuid};
use crate::persistence::devdax::{self, DevDaxBackend};
use crate::persistence::file_mmap::FileBackend;
use crate::persistence::{cache_flush, read_vec, Persistence, PersistenceMode};
use crate::state_slots::StateArea;
use crate::superblock::{self, ShutdownMarker, Superblock};
use crate::vm_table::{self, Extent, RunKind, RunRecord, ShutdownKind, VmEntry, VmTable};

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
    /// Layout parameters used only when formatting.
    pub extent_alignment: u64,
    pub state_slot_len: u64,
    pub table_copy_len: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            create_if_missing: false,
            format: false,
            region_size: None,
            extent_alignment: DEFAULT_EXTENT_ALIGNMENT,
            state_slot_len: DEFAULT_STATE_SLOT_LEN,
            table_copy_len: DEFAULT_TABLE_COPY_LEN,
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
}

/// Where the VMM maps guest RAM from.
#[derive(Debug)]
pub struct MemoryBacking {
    /// A duplicate of the region's descriptor; map it `MAP_SHARED` (and `MAP_SYNC` when `dax`).
    pub file: File,
    pub offset: u64,
    pub size: u64,
    pub dax: bool,
}

/// What recovery hands back to the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredVm {
    pub config_blob: Vec<u8>,
    pub state_blob: Vec<u8>,
    pub seq: u64,
    pub shutdown_kind: ShutdownKind,
}

struct Shared {
    store: Box<dyn Persistence>,
    path: PathBuf,
    superblock: Superblock,
}

/// An open NV region; cheap to clone, shared by its VM handles.
#[derive(Clone)]
pub struct Region {
    shared: Arc<Mutex<Shared>>,
}

/// Reads one superblock copy; a copy beyond the end of the store counts as absent.
fn read_superblock_copy(store: &dyn Persistence, index: usize) -> Result<Option<Superblock>> {
    let offset = Superblock::copy_offset(index);
    if offset + superblock::ENCODED_LEN as u64 > store.len() {
        return Ok(None);
    }
    let mut buf = [0u8; superblock::ENCODED_LEN];
    store.read(offset, &mut buf)?;
    Superblock::decode(&buf)
}

fn read_superblock(store: &dyn Persistence) -> Result<Option<Superblock>> {
    let sb = superblock::select([
        read_superblock_copy(store, 0),
        read_superblock_copy(store, 1),
    ])?;
    if let Some(sb) = &sb {
        if sb.region_size > store.len() {
            return Err(Error::Truncated {
                expected: sb.region_size,
                actual: store.len(),
            });
        }
    }
    Ok(sb)
}

fn write_superblock(store: &mut dyn Persistence, sb: &Superblock) -> Result<()> {
    let offset = Superblock::copy_offset((sb.generation % 2) as usize);
    store.write(offset, &sb.encode())?;
    store.persist(offset, superblock::ENCODED_LEN as u64)
}

fn table_copy_offset(sb: &Superblock, index: usize) -> u64 {
    sb.table_offset + index as u64 * sb.table_copy_len
}

fn read_table_copy(store: &dyn Persistence, sb: &Superblock, index: usize) -> Result<VmTable> {
    let offset = table_copy_offset(sb, index);
    let mut header = [0u8; vm_table::HEADER_LEN];
    store.read(offset, &mut header)?;
    let (generation, body_len, count, body_crc) =
        VmTable::decode_header(&header, sb.table_copy_len)?;
    let body = read_vec(store, offset + vm_table::HEADER_LEN as u64, body_len)?;
    if crc32c::crc32c(&body) != body_crc {
        return Err(Error::CorruptVmTable("body checksum mismatch".into()));
    }
    let table = VmTable::decode_body(generation, &body, count)?;
    validate_extents(sb, &table)?;
    Ok(table)
}

/// Checks that the table's extents are inside the data area, aligned and disjoint.
fn validate_extents(sb: &Superblock, table: &VmTable) -> Result<()> {
    let mut extents = Vec::new();
    for entry in &table.entries {
        let slot_len = entry.state.len / 2;
        if entry.memory_size == 0
            || entry.memory_size > entry.memory.len
            || entry.state.len % 2 != 0
            || slot_len < 2 * crate::state_slots::HEADER_LEN as u64
        {
            return Err(Error::CorruptVmTable(format!(
                "VM {:?} has impossible sizes",
                entry.name
            )));
        }
        for extent in [entry.memory, entry.state] {
            let end = extent.offset.checked_add(extent.len);
            if extent.offset < sb.data_start
                || extent.offset % sb.extent_alignment != 0
                || end.is_none_or(|end| end > sb.region_size)
            {
                return Err(Error::CorruptVmTable(format!(
                    "VM {:?} has an extent outside the data area",
                    entry.name
                )));
            }
            extents.push(extent);
        }
    }
    extents.sort_by_key(|x| x.offset);
    if extents
        .windows(2)
        .any(|pair| pair[0].end() > pair[1].offset)
    {
        return Err(Error::CorruptVmTable("overlapping extents".into()));
    }
    Ok(())
}

fn read_table(store: &dyn Persistence, sb: &Superblock) -> Result<VmTable> {
    match (read_table_copy(store, sb, 0), read_table_copy(store, sb, 1)) {
        (Ok(a), Ok(b)) => Ok(if b.generation > a.generation { b } else { a }),
        (Ok(t), Err(_)) | (Err(_), Ok(t)) => Ok(t),
        (Err(e), Err(_)) => Err(e),
    }
}

fn write_table(store: &mut dyn Persistence, sb: &Superblock, table: &VmTable) -> Result<()> {
    let body = table.encode_body();
    let capacity = sb.table_copy_len - vm_table::HEADER_LEN as u64;
    if body.len() as u64 > capacity {
        return Err(Error::VmTableFull {
            needed: body.len() as u64,
            capacity,
        });
    }
    let offset = table_copy_offset(sb, (table.generation % 2) as usize);
    // Body first and durable, then the header that vouches for it.
    store.write(offset + vm_table::HEADER_LEN as u64, &body)?;
    store.persist(offset + vm_table::HEADER_LEN as u64, body.len() as u64)?;
    store.write(offset, &table.encode_header(&body))?;
    store.persist(offset, vm_table::HEADER_LEN as u64)
}

/// Writes a fresh, empty region over whatever the store holds.
fn format(store: &mut dyn Persistence, options: &OpenOptions) -> Result<Superblock> {
    let align = options.extent_alignment;
    if !align.is_power_of_two() || align < 4096 {
        return Err(Error::InvalidSize {
            size: align,
            reason: "extent alignment must be a power of two of at least 4096",
        });
    }
    if !options.state_slot_len.is_multiple_of(4096) || options.state_slot_len < 4096 {
        return Err(Error::InvalidSize {
            size: options.state_slot_len,
            reason: "state slot size must be a non-zero multiple of 4096",
        });
    }
    if !options.table_copy_len.is_multiple_of(4096) || options.table_copy_len < 4096 {
        return Err(Error::InvalidSize {
            size: options.table_copy_len,
            reason: "VM table copy size must be a non-zero multiple of 4096",
        });
    }
    let table_offset = superblock::AREA_LEN;
    let data_start =
        align_up(table_offset + 2 * options.table_copy_len, align).ok_or(Error::InvalidSize {
            size: options.table_copy_len,
            reason: "VM table too large",
        })?;
    let region_size = match options.region_size {
        Some(size) => {
            let size = size & !(align - 1);
            if size < data_start {
                return Err(Error::InvalidSize {
                    size,
                    reason: "region too small for its metadata",
                });
            }
            size
        }
        // An existing device or file keeps its size; a new file starts with the metadata only.
        None => (store.len() & !(align - 1)).max(data_start),
    };
    if store.len() < region_size {
        store.grow(region_size)?;
    }
    let sb = Superblock {
        generation: 1,
        region_uuid: Uuid::random()?,
        region_size,
        extent_alignment: align,
        table_offset,
        table_copy_len: options.table_copy_len,
        data_start,
        state_slot_len: options.state_slot_len,
        shutdown_marker: ShutdownMarker::Clean,
    };
    // Old superblocks and table headers must be gone before the new ones appear,
    // or an old copy with a higher generation would win.
    let zero_header = [0u8; superblock::ENCODED_LEN];
    for index in 0..2 {
        store.write(Superblock::copy_offset(index), &zero_header)?;
        store.write(
            table_copy_offset(&sb, index),
            &zero_header[..vm_table::HEADER_LEN],
        )?;
    }
    store.persist(0, table_offset + 2 * sb.table_copy_len)?;
    write_table(
        store,
        &sb,
        &VmTable {
            generation: 1,
            entries: Vec::new(),
        },
    )?;
    write_superblock(store, &sb)?;
    log::info!(
        "formatted NV region {} ({} bytes)",
        sb.region_uuid,
        region_size
    );
    Ok(sb)
}

fn open_store(path: &Path, options: &OpenOptions) -> Result<(Box<dyn Persistence>, bool)> {
    let created;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(file) => {
            let empty = file
                .metadata()
                .map(|m| m.is_file() && m.len() == 0)
                .unwrap_or(false);
            created = empty && options.create_if_missing;
            file
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && options.create_if_missing => {
            created = true;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
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
    let store: Box<dyn Persistence> = if devdax::is_char_device(path) {
        Box::new(DevDaxBackend::open(file, path)?)
    } else {
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        if !meta.is_file() {
            return Err(Error::NotARegion {
                path: path.to_path_buf(),
                reason: "neither a regular file nor a devdax device".into(),
            });
        }
        Box::new(FileBackend::open(file, path)?)
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
        let result = Self::load_or_format(store.as_mut(), path, options);
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

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock cannot leave the medium inconsistent
        // (every update is a commit), so a poisoned lock is still usable.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `change` on the current table under the cross-process lock and commits it
    /// if it returns `true` alongside its result.
    fn transact<T>(
        &self,
        change: impl FnOnce(&mut Shared, &mut VmTable) -> Result<(T, bool)>,
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
            Ok(value)
        })();
        shared.store.unlock_metadata();
        result
    }

    fn update_superblock(shared: &mut Shared, change: impl FnOnce(&mut Superblock)) -> Result<()> {
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

    pub fn list_vms(&self) -> Result<Vec<VmSummary>> {
        self.transact(|_, table| Ok((table.entries.iter().map(summary).collect(), false)))
    }

    pub fn vm(&self, name: &str) -> Result<VmSummary> {
        self.transact(|_, table| Ok((summary(find(table, name)?), false)))
    }

    /// A VM's stored config, readable without owning the VM (listings, status).
    pub fn config_blob(&self, name: &str) -> Result<Vec<u8>> {
        self.transact(|_, table| Ok((find(table, name)?.config.clone(), false)))
    }

    /// Adds a VM with `memory_size` bytes of guest RAM (a multiple of 4 KiB).
    pub fn create_vm(&self, name: &str, memory_size: u64, config_blob: &[u8]) -> Result<VmSummary> {
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
            let sb = shared.superblock.clone();
            let too_big = Error::InvalidSize {
                size: memory_size,
                reason: "guest memory too large",
            };
            let memory_len = align_up(memory_size, sb.extent_alignment).ok_or(too_big)?;
            let state_len =
                align_up(2 * sb.state_slot_len, sb.extent_alignment).unwrap_or(u64::MAX);
            let lengths = [memory_len, state_len];
            let (offsets, needed) = allocator::place(
                table,
                sb.data_start,
                sb.region_size,
                sb.extent_alignment,
                &lengths,
            )
            .ok_or(Error::OutOfSpace {
                requested: memory_len,
                largest_free: 0,
            })?;
            if needed > sb.region_size {
                // Grow the store first, then record the new size: a crash in
                // between leaves unused bytes at the end, never a table entry
                // pointing past the region.
                if let Err(e) = shared.store.grow(needed) {
                    log::debug!("cannot grow region: {e}");
                    return Err(Error::OutOfSpace {
                        requested: memory_len.saturating_add(state_len),
                        largest_free: allocator::largest_free(
                            table,
                            sb.data_start,
                            sb.region_size,
                            sb.extent_alignment,
                        ),
                    });
                }
                Self::update_superblock(shared, |sb| sb.region_size = needed)?;
            }
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
                record: RunRecord::Created,
                owner: OwnerRecord::default(),
                config: config_blob.to_vec(),
            };
            let result = summary(&entry);
            table.entries.push(entry);
            Ok((result, true))
        })
    }

    /// Removes a VM; refused while a live process owns it.
    pub fn delete_vm(&self, name: &str) -> Result<()> {
        self.transact(|_, table| {
            let entry = find(table, name)?;
            if entry.owner.is_live() {
                return Err(Error::OwnedByLiveProcess {
                    vm: name.to_string(),
                    pid: entry.owner.pid,
                });
            }
            table.entries.retain(|e| e.name != name);
            Ok(((), true))
        })
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
            if !entry.owner.is_none() {
                log::info!(
                    "VM {name:?}: taking over from dead owner pid {}",
                    entry.owner.pid
                );
            }
            entry.owner = claim;
            Ok(((entry.uuid, entry.memory_size, entry.memory), true))
        });
        match result {
            Ok((uuid, memory_size, memory)) => Ok(VmHandle {
                region: self.clone(),
                name: name.to_string(),
                uuid,
                claim,
                memory_size,
                memory,
            }),
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
}

fn find<'a>(table: &'a VmTable, name: &str) -> Result<&'a VmEntry> {
    table
        .find(name)
        .ok_or_else(|| Error::VmNotFound(name.to_string()))
}

fn find_mut<'a>(table: &'a mut VmTable, name: &str) -> Result<&'a mut VmEntry> {
    table
        .find_mut(name)
        .ok_or_else(|| Error::VmNotFound(name.to_string()))
}

fn summary(entry: &VmEntry) -> VmSummary {
    let (shutdown_kind, last_save) = match entry.record {
        RunRecord::Saved { seq, kind } => (Some(kind), seq),
        other => (None, other.last_seq()),
    };
    VmSummary {
        name: entry.name.clone(),
        uuid: entry.uuid,
        memory_size: entry.memory_size,
        state: entry.record,
        shutdown_kind,
        last_save_seq: (last_save > 0).then_some(last_save),
        owner_pid: entry.owner.is_live().then_some(entry.owner.pid),
    }
}

fn state_area(entry: &VmEntry) -> StateArea {
    StateArea {
        vm_uuid: entry.uuid,
        area: entry.state,
    }
}

/// The resumable state of a VM: only a complete save that the run record vouches for.
fn recoverable_state(store: &dyn Persistence, entry: &VmEntry) -> Result<RecoveredVm> {
    let (seq, kind) = match entry.record {
        RunRecord::Saved { seq, kind } => (seq, kind),
        RunRecord::Running { .. } => return Err(Error::UnsafeShutdown),
        RunRecord::Created | RunRecord::PoweredOff { .. } => {
            return Err(Error::NothingToRecover(entry.name.clone()))
        }
    };
    match state_area(entry).newest(store)? {
        Some(slot) if slot.seq == seq => Ok(RecoveredVm {
            config_blob: entry.config.clone(),
            state_blob: slot.payload,
            seq,
            shutdown_kind: kind,
        }),
        // The record says saved but the slot is gone or newer: trust neither.
        _ => Err(Error::UnsafeShutdown),
    }
}

/// Exclusive use of one VM of a region by this process.
pub struct VmHandle {
    region: Region,
    name: String,
    uuid: Uuid,
    claim: OwnerRecord,
    memory_size: u64,
    memory: Extent,
}

impl VmHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    pub fn memory_size(&self) -> u64 {
        self.memory_size
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    pub fn persistence_mode(&self) -> PersistenceMode {
        self.region.persistence_mode()
    }

    /// Runs `change` on this VM's entry, after checking this handle still owns it.
    fn transact_owned<T>(
        &self,
        change: impl FnOnce(&mut Shared, &mut VmEntry) -> Result<(T, bool)>,
    ) -> Result<(T, VmTable)> {
        self.region.transact(|shared, table| {
            let entry = find_mut(table, &self.name)?;
            if entry.owner != self.claim {
                return Err(Error::OwnershipLost(self.name.clone()));
            }
            let (value, changed) = change(shared, entry)?;
            Ok(((value, table.clone()), changed))
        })
    }

    /// The file, offset and size the VMM maps guest RAM from.
    pub fn memory_backing(&self) -> Result<MemoryBacking> {
        let shared = self.region.lock();
        let file = shared
            .store
            .file()
            .ok_or(Error::NoFileBacking {
                operation: "mapping guest memory",
            })?
            .try_clone()
            .map_err(|e| Error::io("duplicating the region descriptor", e))?;
        Ok(MemoryBacking {
            file,
            offset: self.memory.offset,
            size: self.memory_size,
            dax: shared.store.mode().is_dax(),
        })
    }

    pub fn config_blob(&self) -> Result<Vec<u8>> {
        Ok(self
            .transact_owned(|_, entry| Ok((entry.config.clone(), false)))?
            .0)
    }

    pub fn set_config_blob(&self, config_blob: &[u8]) -> Result<()> {
        self.transact_owned(|_, entry| {
            entry.config = config_blob.to_vec();
            Ok(((), true))
        })
        .map(|_| ())
    }

    /// Records "running since seq N" durably; call before any guest code runs.
    ///
    /// Once that record is durable, the slot holding state N is destroyed as
    /// well: guest memory is about to move on, so state N must never be
    /// resumed again, even if media damage to the newest VM-table copy rolls
    /// the table back to the copy that still said "saved at seq N".
    pub fn begin_run(&self, kind: RunKind) -> Result<()> {
        let (since_seq, _) = self.transact_owned(|shared, entry| {
            // Region marker first: a running VM always implies a dirty region.
            Region::update_superblock(shared, |sb| {
                sb.shutdown_marker = ShutdownMarker::VmsRunning
            })?;
            let since_seq = entry.record.last_seq();
            entry.record = RunRecord::Running { since_seq, kind };
            Ok((since_seq, true))
        })?;
        if since_seq == 0 {
            return Ok(());
        }
        self.transact_owned(|shared, entry| {
            let area = state_area(entry);
            if let Some(slot) = area.newest(shared.store.as_ref())? {
                if slot.seq == since_seq {
                    area.invalidate(shared.store.as_mut(), slot.index)?;
                }
            }
            Ok(((), false))
        })
        .map(|_| ())
    }

    /// Records that the guest stopped without a save (powered off); the next start is cold.
    pub fn mark_powered_off(&self) -> Result<()> {
        let ((), table) = self.transact_owned(|_, entry| {
            entry.record = RunRecord::PoweredOff {
                after_seq: entry.record.last_seq(),
            };
            Ok(((), true))
        })?;
        self.mark_clean_if_idle(&table)
    }

    /// The last complete save, if the VM's record says it ended with one.
    pub fn recover(&self) -> Result<RecoveredVm> {
        Ok(self
            .transact_owned(|shared, entry| {
                Ok((recoverable_state(shared.store.as_ref(), entry)?, false))
            })?
            .0)
    }

    /// Makes guest memory durable: msync of the extent, or cache write-back on DAX.
    ///
    /// `host_ranges` are the VMM's own mappings of guest RAM; on DAX they are
    /// flushed directly (the lines are in this CPU's caches under those
    /// addresses). Without them the region's own mapping of the extent is used.
    pub fn persist_guest_memory(&self, host_ranges: &[(*const u8, usize)]) -> Result<()> {
        let mut shared = self.region.lock();
        if shared.store.mode().is_dax() && !host_ranges.is_empty() {
            for &(start, len) in host_ranges {
                // SAFETY: the host trait promises these are live mappings of guest
                // RAM for the duration of the save (vCPUs are paused, nothing unmaps).
                unsafe { cache_flush::write_back(start, len)? };
            }
            return Ok(());
        }
        shared.store.persist(self.memory.offset, self.memory_size)
    }

    /// Commits a saved state: payload, slot header, then "saved at seq N". Returns N.
    pub fn commit_state(&self, state_blob: &[u8], kind: ShutdownKind) -> Result<u64> {
        let (seq, table) = self.transact_owned(|shared, entry| {
            let area = state_area(entry);
            let newest = area.newest(shared.store.as_ref())?;
            let seq = entry
                .record
                .last_seq()
                .max(newest.as_ref().map_or(0, |s| s.seq))
                .checked_add(1)
                .ok_or_else(|| {
                    Error::CorruptVmTable(format!("VM {:?}: save sequence exhausted", entry.name))
                })?;
            area.write(shared.store.as_mut(), newest.as_ref(), seq, state_blob)?;
            fault_injection::reached(FaultPoint::CommitHeader);
            entry.record = RunRecord::Saved { seq, kind };
            Ok((seq, true))
        })?;
        self.mark_clean_if_idle(&table)?;
        Ok(seq)
    }

    /// Sets the region's clean marker once no VM is recorded as running.
    fn mark_clean_if_idle(&self, table: &VmTable) -> Result<()> {
        let running = |t: &VmTable| {
            t.entries
                .iter()
                .any(|e| matches!(e.record, RunRecord::Running { .. }))
        };
        if running(table) {
            return Ok(());
        }
        // Re-check under the lock: another process may have started a VM since.
        self.region.transact(|shared, current| {
            if !running(current) {
                Region::update_superblock(shared, |sb| sb.shutdown_marker = ShutdownMarker::Clean)?;
            }
            Ok(((), false))
        })
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        let claim = self.claim;
        let released = self
            .region
            .transact(|_, table| match table.find_mut(&self.name) {
                Some(entry) if entry.owner == claim => {
                    entry.owner = OwnerRecord::default();
                    Ok(((), true))
                }
                _ => Ok(((), false)),
            });
        if let Err(e) = released {
            // The record stays; it is stale as soon as this process exits.
            log::warn!("VM {:?}: could not clear the owner record: {e}", self.name);
        }
        claim.release();
    }
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VmHandle({:?}, {})", self.name, self.uuid)
    }
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
