//! Copy-based snapshot and restore in upstream's directory layout (`vm.snapshot`, `vm.restore`,
//! `--restore`): `destination_url=file:///dir` receives `config.json` (the `VmConfig`),
//! `state.json` (our `VmState` plus the table of copied memory ranges) and `memory-ranges` (the
//! copied guest RAM, the ranges back to back).
//!
//! As upstream, RAM that already lives in a shared file is not copied: the restored VM maps the
//! same file again through its config. This is the baseline NV recovery is measured against; it
//! is only as safe as the shared file is unchanged since the snapshot.
//!
//! Restore reads `memory-ranges` back into fresh anonymous RAM (`Copy`), or with
//! `memory_restore_mode: OnDemand` registers that RAM with a userfaultfd and lets the VM run at
//! once, each page filled on its first touch (see `userfaultfd.rs`).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{MemoryConfig, MemoryRestoreMode, RestoreConfig, SeccompMode, VmConfig};
use crate::event_monitor::{emit_vm, VmEvent};
use crate::events::VmEvents;
use crate::memory::guest_memory_from_config;
use crate::state::VmState;
use crate::vm::{Vm, VmRunState};
use crate::Error;

/// Linux moves at most 0x7fff_f000 bytes in one read(2) or write(2), and vm-memory's exact copies
/// issue a single call per slice: a RAM range of 2 GiB or more is copied in pieces of this size.
const COPY_CHUNK: usize = 1 << 30;

/// `(guest address, length)` pieces of at most `COPY_CHUNK` bytes covering `length` bytes at `gpa`.
fn copy_chunks(gpa: u64, length: usize) -> impl Iterator<Item = (u64, usize)> {
    (0..length)
        .step_by(COPY_CHUNK)
        .map(move |done| (gpa + done as u64, COPY_CHUNK.min(length - done)))
}

const CONFIG_FILE: &str = "config.json";
const STATE_FILE: &str = "state.json";
const MEMORY_FILE: &str = "memory-ranges";

/// `format` of our `state.json` envelope (see `docs/vmm.md`, "Snapshot files").
const STATE_FORMAT: &str = "nv-hypervisor-vm-state";
/// Version of the envelope and of `SnapshotState` inside it.
const STATE_FORMAT_VERSION: u32 = 1;
/// A `state.json` larger than this is refused unread (a few vCPUs take tens of KiB).
const MAX_STATE_FILE: u64 = 64 << 20;

/// One guest-physical range whose bytes are in `memory-ranges`, in file order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    pub gpa: u64,
    pub length: u64,
}

/// The content of `state.json` (inside its checksummed envelope).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub vm: VmState,
    pub memory_ranges: Vec<MemoryRange>,
}

/// `state.json` as written: the content verbatim, with its CRC-32C over exactly those bytes.
#[derive(Serialize)]
struct StateEnvelopeOut<'a> {
    format: &'static str,
    version: u32,
    crc32c: u32,
    content: &'a RawValue,
}

/// `state.json` as read: every member optional, so a missing one is named.
#[derive(Deserialize)]
struct StateEnvelopeIn<'a> {
    format: Option<String>,
    version: Option<u32>,
    crc32c: Option<u32>,
    #[serde(borrow)]
    content: Option<&'a RawValue>,
}

/// The directory of a `file:///dir` URL (the only scheme upstream supports).
pub fn snapshot_directory(url: &str) -> Result<PathBuf, Error> {
    match crate::config::snapshot_url_dir(url) {
        Some(path) => Ok(PathBuf::from(path)),
        None => Err(Error::Snapshot(format!(
            "{url:?}: only file:///absolute/dir URLs are supported"
        ))),
    }
}

fn io_error(path: &Path, operation: &str) -> impl FnOnce(std::io::Error) -> Error {
    let what = format!("{operation} {}", path.display());
    move |e| Error::snapshot(what, e)
}

fn write_error(path: &Path, operation: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::SnapshotIo {
        path,
        operation,
        source,
    }
}

/// The files one `save` created, removed again unless the save completes: a failed snapshot
/// leaves no half-written files behind (nor names that would make the next attempt fail).
struct CreatedFiles(Vec<PathBuf>);

impl CreatedFiles {
    /// Creates `path` for writing: owner-only (0600), never over an existing file and never
    /// through a symlink (`O_EXCL | O_NOFOLLOW`), so a link planted in the destination cannot
    /// redirect the VM's memory or state into another file.
    fn create(&mut self, path: &Path) -> Result<File, Error> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(write_error(path, "creating"))?;
        self.0.push(path.to_path_buf());
        Ok(file)
    }

    fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for CreatedFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            if let Err(e) = remove_file(path) {
                log::warn!("removing {} of the failed snapshot: {e}", path.display());
            }
        }
    }
}

/// `unlinkat(AT_FDCWD, path, 0)`: what the VMM's seccomp filter allows (`std::fs::remove_file`
/// calls `unlink`, which it does not).
fn remove_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is a NUL-terminated path that outlives the call; unlinkat touches no memory
    // of ours besides reading it.
    if unsafe { libc::unlinkat(libc::AT_FDCWD, name.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Writes the paused `vm` into the existing directory of `destination_url`.
///
/// Checked before anything is created: the VM is paused (`SnapshotVmRunning` otherwise) and the
/// destination is a directory (`SnapshotDestination`; it is not created, as upstream). The
/// files are new (an existing one is an error), 0600, `memory-ranges` first and `state.json`
/// last; on failure the files written so far are removed.
///
/// RAM mapped shared from a file the VM's config names is not copied (upstream's rule: the
/// restore maps the file again). A VM in NV memory is the exception: its RAM is an extent of
/// the region, which the config does not name, so all of it is copied and the snapshot
/// restores as an ordinary VM (its config has no `nv`).
pub fn save(vm: &Vm, destination_url: &str) -> Result<(), Error> {
    let dir = snapshot_directory(destination_url)?;
    match vm.run_state() {
        VmRunState::Paused => {}
        VmRunState::Running => return Err(Error::SnapshotVmRunning),
        other => return Err(Error::InvalidVmState(other.name())),
    }
    if !std::fs::metadata(&dir).is_ok_and(|metadata| metadata.is_dir()) {
        return Err(Error::SnapshotDestination(dir));
    }
    let state = vm.save_state()?;
    let mut config = vm.config().clone();
    let in_nv_memory = config.nv.take().is_some();
    if in_nv_memory {
        // NV RAM is a shared mapping, and a vhost-user backend maps it: the restored VM's RAM
        // is shared too (a memfd it can send in SET_MEM_TABLE), as `shared=on` would give.
        config.memory.shared = true;
    }

    let memory = vm.memory();
    let copied: Vec<MemoryRange> = memory
        .iter()
        .filter(|region| in_nv_memory || !is_shared_file_mapping(region))
        .map(|region| MemoryRange {
            gpa: region.start_addr().0,
            length: region.len(),
        })
        .collect();
    let mut created = CreatedFiles(Vec::new());
    let memory_path = dir.join(MEMORY_FILE);
    let mut memory_file = created.create(&memory_path)?;
    for range in &copied {
        let length = usize::try_from(range.length)
            .map_err(|_| Error::Snapshot(format!("range of {:#x} bytes", range.length)))?;
        for (gpa, chunk) in copy_chunks(range.gpa, length) {
            memory
                .write_all_volatile_to(GuestAddress(gpa), &mut memory_file, chunk)
                .map_err(|e| Error::SnapshotIo {
                    path: memory_path.clone(),
                    operation: "writing guest RAM into",
                    source: std::io::Error::other(format!("at {gpa:#x}: {e}")),
                })?;
        }
    }
    memory_file
        .sync_all()
        .map_err(write_error(&memory_path, "syncing"))?;

    let config_json =
        serde_json::to_vec(&config).map_err(|e| Error::snapshot("encoding the VM config", e))?;
    write_new_file(&mut created, &dir.join(CONFIG_FILE), &config_json)?;
    let state_json = encode_state(&SnapshotState {
        vm: state,
        memory_ranges: copied,
    })?;
    write_new_file(&mut created, &dir.join(STATE_FILE), &state_json)?;
    File::open(&dir)
        .and_then(|directory| directory.sync_all())
        .map_err(write_error(&dir, "syncing the directory"))?;
    created.keep();
    Ok(())
}

/// A shared mapping of a file that has a name: the restore maps that file again. A memfd
/// (`shared=on` RAM without a file) has no name (no link) and goes with the process, so its
/// bytes are copied like anonymous RAM.
fn is_shared_file_mapping(region: &vm_memory::GuestRegionMmap) -> bool {
    region.flags() & libc::MAP_SHARED != 0
        && region
            .file_offset()
            .and_then(|file_offset| file_offset.file().metadata().ok())
            .is_some_and(|metadata| metadata.nlink() > 0)
}

fn write_new_file(created: &mut CreatedFiles, path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut file = created.create(path)?;
    file.write_all(bytes)
        .map_err(write_error(path, "writing"))?;
    file.sync_all().map_err(write_error(path, "syncing"))
}

/// `state.json`: `{"format", "version", "crc32c", "content"}`, the CRC-32C over the bytes of
/// `content` exactly as they stand in the file.
fn encode_state(state: &SnapshotState) -> Result<Vec<u8>, Error> {
    let encode_error = |e: serde_json::Error| Error::snapshot("encoding the state", e);
    let content = serde_json::to_string(state).map_err(encode_error)?;
    let crc32c = crc32c::crc32c(content.as_bytes());
    let content = RawValue::from_string(content).map_err(encode_error)?;
    serde_json::to_vec(&StateEnvelopeOut {
        format: STATE_FORMAT,
        version: STATE_FORMAT_VERSION,
        crc32c,
        content: &content,
    })
    .map_err(encode_error)
}

/// Reads `state.json`: the envelope, its version and checksum, then the content. Any fault is
/// an `Error::Snapshot` naming the file and what is wrong with it.
fn decode_state(path: &Path, text: &str) -> Result<SnapshotState, Error> {
    let refuse = |reason: String| Error::Snapshot(format!("{}: {reason}", path.display()));
    let envelope: StateEnvelopeIn =
        serde_json::from_str(text).map_err(|e| refuse(format!("not a VM state file: {e}")))?;
    match envelope.format.as_deref() {
        Some(STATE_FORMAT) => {}
        Some(other) => return Err(refuse(format!("format {other:?} is not {STATE_FORMAT:?}"))),
        None => {
            return Err(refuse(
                "no checksummed envelope (\"format\" missing): written by an older build or \
                 not by this VMM; refused"
                    .to_string(),
            ))
        }
    }
    match envelope.version {
        Some(STATE_FORMAT_VERSION) => {}
        Some(other) => {
            return Err(refuse(format!(
                "state format version {other} is not supported (this build reads version \
                 {STATE_FORMAT_VERSION})"
            )))
        }
        None => return Err(refuse("\"version\" missing".to_string())),
    }
    let content = envelope
        .content
        .ok_or_else(|| refuse("\"content\" missing".to_string()))?;
    let stored = envelope
        .crc32c
        .ok_or_else(|| refuse("no checksum (\"crc32c\" missing); refused".to_string()))?;
    let computed = crc32c::crc32c(content.get().as_bytes());
    if stored != computed {
        return Err(refuse(format!(
            "checksum mismatch (stored {stored:#010x}, content has {computed:#010x}): the file \
             was changed or damaged after it was written"
        )));
    }
    serde_json::from_str(content.get()).map_err(|e| refuse(format!("content: {e}")))
}

/// Reads and decodes `state.json` (bounded in size).
fn read_state(path: &Path) -> Result<SnapshotState, Error> {
    let file = File::open(path).map_err(io_error(path, "opening"))?;
    let mut text = String::new();
    file.take(MAX_STATE_FILE + 1)
        .read_to_string(&mut text)
        .map_err(io_error(path, "reading"))?;
    if text.len() as u64 > MAX_STATE_FILE {
        return Err(Error::Snapshot(format!(
            "{}: larger than {MAX_STATE_FILE} bytes; refused",
            path.display()
        )));
    }
    decode_state(path, &text)
}

/// Checks a snapshot's state against its config before any memory is built or copied: the VM
/// state itself (`VmState::validate`), its disks, and the memory ranges (ordered, disjoint,
/// page aligned, their total the size of `memory-ranges`).
fn validate_snapshot(
    config: &VmConfig,
    state: &SnapshotState,
    memory_file_len: u64,
) -> Result<(), Error> {
    if config.nv.is_some() {
        return Err(Error::Snapshot(
            "config.json describes a VM in NV memory: its RAM is not in this snapshot (an \
             older build wrote such snapshots without copying it); refused"
                .to_string(),
        ));
    }
    state.vm.validate(usize::from(config.cpus.boot_vcpus))?;
    // Hotplugged disks are in the config and carried by the state's hotplug part.
    let hotplugged = state.vm.devices.hotplugged_ids();
    let disks = crate::device_manager::without_hotplugged(config, &hotplugged)
        .disks
        .as_ref()
        .map_or(0, Vec::len);
    if state.vm.devices.disks.len() != disks {
        return Err(Error::InvalidState(format!(
            "the state has {} disks, config.json has {disks}",
            state.vm.devices.disks.len()
        )));
    }
    let mut end = 0u64;
    let mut total = 0u64;
    for range in &state.memory_ranges {
        let range_end = range.gpa.checked_add(range.length);
        if range.length == 0
            || range.gpa % 4096 != 0
            || range.length % 4096 != 0
            || range.gpa < end
            || range_end.is_none()
        {
            return Err(Error::InvalidState(format!(
                "memory range {:#x}+{:#x} is empty, unaligned, out of order or overlapping",
                range.gpa, range.length
            )));
        }
        end = range_end.unwrap_or(u64::MAX);
        total = total.saturating_add(range.length);
    }
    if total != memory_file_len {
        return Err(Error::InvalidState(format!(
            "{MEMORY_FILE} holds {memory_file_len} bytes, state.json lists {total}"
        )));
    }
    Ok(())
}

/// Every guest RAM mapping the snapshot must have copied (all but shared file mappings) is
/// exactly one listed range: guest RAM left out would start as zeros under a running guest.
fn check_ranges_cover_memory(
    memory: &vm_memory::GuestMemoryMmap,
    ranges: &[MemoryRange],
) -> Result<(), Error> {
    let needed: Vec<MemoryRange> = memory
        .iter()
        .filter(|region| !is_shared_file_mapping(region))
        .map(|region| MemoryRange {
            gpa: region.start_addr().0,
            length: region.len(),
        })
        .collect();
    if needed != ranges {
        let show = |ranges: &[MemoryRange]| {
            ranges
                .iter()
                .map(|r| format!("{:#x}+{:#x}", r.gpa, r.length))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(Error::InvalidState(format!(
            "the memory ranges [{}] are not the guest RAM this config copies [{}]",
            show(ranges),
            show(&needed)
        )));
    }
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let file = File::open(path).map_err(io_error(path, "opening"))?;
    serde_json::from_reader(BufReader::new(file))
        .map_err(|e| Error::snapshot(path.display().to_string(), e))
}

/// Builds a VM from the snapshot directory of `restore.source_url`: its config, its memory (shared
/// files mapped again, the rest copied back from `memory-ranges`, or with
/// `memory_restore_mode: OnDemand` filled page by page on first touch) and its state. The VM is
/// left paused unless `restore.resume` is set.
pub fn restore(
    restore: &RestoreConfig,
    events: Arc<VmEvents>,
    seccomp: SeccompMode,
) -> Result<Vm, Error> {
    let on_demand = restore.memory_restore_mode == MemoryRestoreMode::OnDemand;
    if on_demand && restore.prefault {
        return Err(Error::Snapshot(
            "prefault=true contradicts memory_restore_mode=OnDemand (pages are filled on first \
             touch); use Copy to have every page in place before the VM runs"
                .to_string(),
        ));
    }
    emit_vm(VmEvent::Restoring);
    let dir = snapshot_directory(&restore.source_url)?;
    let config = read_config(&dir.join(CONFIG_FILE))?;
    let state = read_state(&dir.join(STATE_FILE))?;
    let memory_path = dir.join(MEMORY_FILE);
    let mut memory_file = File::open(&memory_path).map_err(io_error(&memory_path, "opening"))?;
    let memory_file_len = memory_file
        .metadata()
        .map_err(io_error(&memory_path, "reading"))?
        .len();
    // Everything checkable is checked before guest RAM is built or a byte is copied.
    validate_snapshot(&config, &state, memory_file_len)?;
    let memory = if on_demand {
        // A populated page cannot be filled on demand any more: never prefault lazy RAM.
        guest_memory_from_config(&without_anonymous_prefault(&config.memory))?
    } else {
        guest_memory_from_config(&config.memory)?
    };
    check_ranges_cover_memory(&memory, &state.memory_ranges)?;

    let mut lazy = Vec::new();
    let mut file_offset = 0u64;
    for range in &state.memory_ranges {
        let length = usize::try_from(range.length)
            .ok()
            .filter(|&length| memory.check_range(GuestAddress(range.gpa), length))
            .ok_or_else(|| {
                Error::Snapshot(format!(
                    "memory range {:#x}+{:#x} is not guest RAM of this config",
                    range.gpa, range.length
                ))
            })?;
        match lazy_range(&memory, range, file_offset).filter(|_| on_demand) {
            Some(lazy_range) => lazy.push(lazy_range),
            None => {
                // Copy: also for RAM that userfaultfd cannot fill (a private file mapping).
                memory_file
                    .seek(SeekFrom::Start(file_offset))
                    .map_err(io_error(&memory_path, "seeking"))?;
                for (gpa, chunk) in copy_chunks(range.gpa, length) {
                    memory
                        .read_exact_volatile_from(GuestAddress(gpa), &mut memory_file, chunk)
                        .map_err(|e| {
                            Error::snapshot(format!("reading guest RAM at {gpa:#x}"), e)
                        })?;
                }
            }
        }
        file_offset += range.length;
    }
    if !lazy.is_empty() {
        let lazy_bytes: usize = lazy.iter().map(|range| range.length).sum();
        // The thread detaches: it ends by itself when the VM's memory is unmapped.
        crate::userfaultfd::start(lazy, &memory_file, seccomp)
            .map_err(|e| Error::snapshot("OnDemand restore", e))?;
        log::info!("OnDemand restore: {lazy_bytes:#x} bytes of guest RAM filled on first touch");
    }

    let layout = state.vm.devices.restore_layout();
    let mut vm = Vm::new_restoring(&config, &layout, memory, events, seccomp)?;
    vm.restore_state(&state.vm)?;
    emit_vm(VmEvent::Restored);
    if restore.resume {
        vm.resume()?;
    }
    Ok(vm)
}

/// The snapshot's `config.json`, held to the same rules as a `vm.create` body: an upstream
/// member this VMM does not implement is refused by name rather than dropped.
fn read_config(path: &Path) -> Result<VmConfig, Error> {
    let raw: serde_json::Value = read_json(path)?;
    crate::upstream_fields::check_vm_config_fields(&raw)
        .map_err(|e| Error::Snapshot(format!("{}: {e}", path.display())))?;
    let config: VmConfig =
        serde_json::from_value(raw).map_err(|e| Error::snapshot(path.display().to_string(), e))?;
    config
        .validate()
        .map_err(|e| Error::snapshot(path.display().to_string(), e))?;
    Ok(config)
}

fn without_anonymous_prefault(memory: &MemoryConfig) -> MemoryConfig {
    let mut memory = memory.clone();
    memory.prefault = false;
    for zone in memory.zones.iter_mut().flatten() {
        if zone.file.is_none() {
            zone.prefault = false;
        }
    }
    memory
}

/// The userfaultfd range of a copied `range` whose bytes start at `file_offset` in
/// `memory-ranges`, when the guest RAM there is anonymous (userfaultfd fills anonymous and
/// shared-anonymous memory, not private file mappings) and lies within one mapping.
fn lazy_range(
    memory: &vm_memory::GuestMemoryMmap,
    range: &MemoryRange,
    file_offset: u64,
) -> Option<crate::userfaultfd::LazyRange> {
    let region = memory.find_region(GuestAddress(range.gpa))?;
    if region.file_offset().is_some() {
        return None;
    }
    let offset_in_region = range.gpa - region.start_addr().0;
    if offset_in_region.checked_add(range.length)? > region.len() {
        return None;
    }
    let host_address = memory.get_host_address(GuestAddress(range.gpa)).ok()?;
    Some(crate::userfaultfd::LazyRange {
        host_address: host_address as usize,
        length: usize::try_from(range.length).ok()?,
        source_offset: usize::try_from(file_offset).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::sample_state;

    #[test]
    fn a_config_json_that_is_not_json_keeps_the_parser_error_as_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(&path, b"{ not json").unwrap();
        let error = read_config(&path).unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::InvalidRequest);
        let chain: Vec<&(dyn std::error::Error + 'static)> =
            std::iter::successors(std::error::Error::source(&error), |&cause| cause.source())
                .collect();
        let json = chain
            .iter()
            .find_map(|cause| cause.downcast_ref::<serde_json::Error>())
            .expect("the serde_json error itself is in the chain");
        assert_eq!(
            error.to_string(),
            format!("snapshot: {}: {json}", path.display())
        );
        let missing = read_config(&dir.path().join("missing.json")).unwrap_err();
        let io =
            std::iter::successors(std::error::Error::source(&missing), |&cause| cause.source())
                .find_map(|cause| cause.downcast_ref::<std::io::Error>())
                .expect("the io error itself is in the chain");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }

    fn snapshot_state() -> SnapshotState {
        SnapshotState {
            vm: sample_state(1),
            memory_ranges: vec![
                MemoryRange {
                    gpa: 0,
                    length: 0x10_0000,
                },
                MemoryRange {
                    gpa: 0x1_0000_0000,
                    length: 0x2000,
                },
            ],
        }
    }

    fn decode(text: &str) -> Result<SnapshotState, Error> {
        decode_state(Path::new("/s/state.json"), text)
    }

    fn refusal(text: &str) -> String {
        let error = decode(text).unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::InvalidRequest, "{error}");
        error.to_string()
    }

    #[test]
    fn the_state_file_is_a_checksummed_envelope_that_round_trips() {
        let state = snapshot_state();
        let bytes = encode_state(&state).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let envelope: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(envelope["format"], STATE_FORMAT);
        assert_eq!(envelope["version"], 1);
        let content = &text[text.find("\"content\":").unwrap() + 10..text.len() - 1];
        assert_eq!(
            envelope["crc32c"].as_u64().unwrap(),
            u64::from(crc32c::crc32c(content.as_bytes()))
        );
        let back = decode(&text).unwrap();
        assert_eq!(back.memory_ranges, state.memory_ranges);
        assert_eq!(
            serde_json::to_string(&back.vm).unwrap(),
            serde_json::to_string(&state.vm).unwrap()
        );
    }

    #[test]
    fn a_changed_unsealed_or_foreign_state_file_is_refused_by_name() {
        let text = String::from_utf8(encode_state(&snapshot_state()).unwrap()).unwrap();
        // One digit of the content changed, the checksum left as it was.
        let at = text.find("\"rflags\"").unwrap_or(text.len() / 2);
        let position = text[at..].find(|c: char| c.is_ascii_digit()).unwrap() + at;
        let mut tampered = text.clone().into_bytes();
        tampered[position] = if tampered[position] == b'7' {
            b'8'
        } else {
            b'7'
        };
        let message = refusal(std::str::from_utf8(&tampered).unwrap());
        assert!(message.contains("checksum mismatch"), "{message}");
        assert!(message.contains("/s/state.json"), "{message}");

        let envelope: serde_json::Value = serde_json::from_str(&text).unwrap();
        let bare = envelope["content"].to_string();
        assert!(refusal(&bare).contains("no checksummed envelope"));
        let mut unsealed = envelope.clone();
        unsealed.as_object_mut().unwrap().remove("crc32c");
        assert!(refusal(&unsealed.to_string()).contains("no checksum"));
        let mut future = envelope.clone();
        future["version"] = 2.into();
        assert!(refusal(&future.to_string()).contains("version 2"));
        let mut foreign = envelope;
        foreign["format"] = "something-else".into();
        assert!(refusal(&foreign.to_string()).contains("something-else"));
        assert!(refusal("{not json").contains("not a VM state file"));
    }

    #[test]
    fn snapshot_state_is_checked_against_its_config_and_memory_file() {
        let state = snapshot_state();
        let config = VmConfig::default();
        let total = 0x10_0000 + 0x2000;
        validate_snapshot(&config, &state, total).unwrap();
        let text = validate_snapshot(&config, &state, total - 1)
            .unwrap_err()
            .to_string();
        assert!(text.contains("memory-ranges holds"), "{text}");

        let mut two = config.clone();
        two.cpus.boot_vcpus = 2;
        two.cpus.max_vcpus = 2;
        let error = validate_snapshot(&two, &state, total).unwrap_err();
        assert!(error.to_string().contains("1 vCPUs"), "{error}");
        assert_eq!(error.kind(), crate::ErrorKind::InvalidRequest);

        let mut overlapping = state.clone();
        overlapping.memory_ranges[1].gpa = 0x8_0000;
        assert!(validate_snapshot(&config, &overlapping, total).is_err());
        let mut unaligned = state.clone();
        unaligned.memory_ranges[1].length = 0x2001;
        assert!(validate_snapshot(&config, &unaligned, total + 1).is_err());

        let mut nv = config;
        nv.nv = Some(crate::config::NvConfig::default());
        let text = validate_snapshot(&nv, &state, total)
            .unwrap_err()
            .to_string();
        assert!(text.contains("NV memory"), "{text}");
    }

    #[test]
    fn only_absolute_file_urls_are_accepted() {
        assert_eq!(
            snapshot_directory("file:///var/snap").unwrap(),
            PathBuf::from("/var/snap")
        );
        for bad in ["/var/snap", "file://relative", "http://host/snap", ""] {
            let error = snapshot_directory(bad).unwrap_err().to_string();
            assert!(error.contains("file:///"), "{bad}: {error}");
        }
    }

    #[test]
    fn large_ranges_are_copied_in_pieces_below_the_syscall_limit() {
        let three_gib = 3 << 30;
        let pieces: Vec<(u64, usize)> = copy_chunks(0x1000, three_gib).collect();
        assert_eq!(
            pieces,
            vec![
                (0x1000, 1 << 30),
                (0x1000 + (1 << 30), 1 << 30),
                (0x1000 + (2 << 30), 1 << 30)
            ]
        );
        let odd: Vec<(u64, usize)> = copy_chunks(0, (1 << 30) + 4096).collect();
        assert_eq!(odd, vec![(0, 1 << 30), (1 << 30, 4096)]);
        assert_eq!(copy_chunks(0, 0).count(), 0);
        assert!(pieces.iter().all(|&(_, len)| len < 0x7fff_f000));
    }
}
