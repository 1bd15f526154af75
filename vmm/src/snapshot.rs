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
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{MemoryConfig, MemoryRestoreMode, RestoreConfig, SeccompMode, VmConfig};
use crate::event_monitor::{emit_vm, VmEvent};
use crate::events::VmEvents;
use crate::memory::guest_memory_from_config;
use crate::state::VmState;
use crate::vm::Vm;
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

/// One guest-physical range whose bytes are in `memory-ranges`, in file order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    pub gpa: u64,
    pub length: u64,
}

/// The content of `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub vm: VmState,
    pub memory_ranges: Vec<MemoryRange>,
}

/// The directory of a `file:///dir` URL (the only scheme upstream supports).
pub fn snapshot_directory(url: &str) -> Result<PathBuf, Error> {
    match url.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        _ => Err(Error::Snapshot(format!(
            "{url:?}: only file:///absolute/dir URLs are supported"
        ))),
    }
}

fn io_error(path: &Path, operation: &str) -> impl FnOnce(std::io::Error) -> Error {
    let what = format!("{operation} {}", path.display());
    move |e| Error::Snapshot(format!("{what}: {e}"))
}

/// Writes the paused `vm` into the directory of `destination_url` (created if missing).
pub fn save(vm: &Vm, destination_url: &str) -> Result<(), Error> {
    let dir = snapshot_directory(destination_url)?;
    std::fs::create_dir_all(&dir).map_err(io_error(&dir, "creating"))?;
    let state = vm.save_state()?;

    // RAM mapped shared from a file is already on the host; everything else is copied.
    let memory = vm.memory();
    let copied: Vec<MemoryRange> = memory
        .iter()
        .filter(|region| {
            !(region.file_offset().is_some() && region.flags() & libc::MAP_SHARED != 0)
        })
        .map(|region| MemoryRange {
            gpa: region.start_addr().0,
            length: region.len(),
        })
        .collect();
    let memory_path = dir.join(MEMORY_FILE);
    let mut memory_file = File::create(&memory_path).map_err(io_error(&memory_path, "creating"))?;
    for range in &copied {
        let length = usize::try_from(range.length)
            .map_err(|_| Error::Snapshot(format!("range of {:#x} bytes", range.length)))?;
        for (gpa, chunk) in copy_chunks(range.gpa, length) {
            memory
                .write_all_volatile_to(GuestAddress(gpa), &mut memory_file, chunk)
                .map_err(|e| Error::Snapshot(format!("writing guest RAM at {gpa:#x}: {e}")))?;
        }
    }
    memory_file
        .sync_all()
        .map_err(io_error(&memory_path, "syncing"))?;

    write_json(&dir.join(CONFIG_FILE), vm.config())?;
    write_json(
        &dir.join(STATE_FILE),
        &SnapshotState {
            vm: state,
            memory_ranges: copied,
        },
    )?;
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    let file = File::create(path).map_err(io_error(path, "creating"))?;
    let mut writer = BufWriter::new(file);
    serde_json::to_writer(&mut writer, value)
        .map_err(|e| Error::Snapshot(format!("writing {}: {e}", path.display())))?;
    writer.flush().map_err(io_error(path, "writing"))?;
    writer
        .get_ref()
        .sync_all()
        .map_err(io_error(path, "syncing"))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let file = File::open(path).map_err(io_error(path, "opening"))?;
    serde_json::from_reader(BufReader::new(file))
        .map_err(|e| Error::Snapshot(format!("{}: {e}", path.display())))
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
    let state: SnapshotState = read_json(&dir.join(STATE_FILE))?;
    let memory = if on_demand {
        // A populated page cannot be filled on demand any more: never prefault lazy RAM.
        guest_memory_from_config(&without_anonymous_prefault(&config.memory))?
    } else {
        guest_memory_from_config(&config.memory)?
    };

    let memory_path = dir.join(MEMORY_FILE);
    let mut memory_file = File::open(&memory_path).map_err(io_error(&memory_path, "opening"))?;
    let expected: u64 = state.memory_ranges.iter().map(|range| range.length).sum();
    let actual = memory_file
        .metadata()
        .map_err(io_error(&memory_path, "reading"))?
        .len();
    if actual != expected {
        return Err(Error::Snapshot(format!(
            "{} holds {actual} bytes, state.json lists {expected}",
            memory_path.display()
        )));
    }
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
                            Error::Snapshot(format!("reading guest RAM at {gpa:#x}: {e}"))
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
            .map_err(|e| Error::Snapshot(format!("OnDemand restore: {e}")))?;
        log::info!("OnDemand restore: {lazy_bytes:#x} bytes of guest RAM filled on first touch");
    }

    let mut vm = Vm::new(&config, memory, events, seccomp)?;
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
    let config: VmConfig = serde_json::from_value(raw)
        .map_err(|e| Error::Snapshot(format!("{}: {e}", path.display())))?;
    config
        .validate()
        .map_err(|e| Error::Snapshot(format!("{}: {e}", path.display())))?;
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
