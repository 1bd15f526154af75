//! Copy-based snapshot and restore in upstream's directory layout (`vm.snapshot`, `vm.restore`,
//! `--restore`): `destination_url=file:///dir` receives `config.json` (the `VmConfig`),
//! `state.json` (our `VmState` plus the table of copied memory ranges) and `memory-ranges` (the
//! copied guest RAM, the ranges back to back).
//!
//! As upstream, RAM that already lives in a shared file is not copied: the restored VM maps the
//! same file again through its config. This is the baseline NV recovery is measured against; it
//! is only as safe as the shared file is unchanged since the snapshot.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{MemoryRestoreMode, RestoreConfig, SeccompMode, VmConfig};
use crate::events::VmEvents;
use crate::memory::guest_memory_from_config;
use crate::state::VmState;
use crate::vm::Vm;
use crate::Error;

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
        memory
            .write_all_volatile_to(GuestAddress(range.gpa), &mut memory_file, length)
            .map_err(|e| Error::Snapshot(format!("writing guest RAM at {:#x}: {e}", range.gpa)))?;
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
/// files mapped again, the rest copied back from `memory-ranges`) and its state. The VM is left
/// paused unless `restore.resume` is set.
pub fn restore(
    restore: &RestoreConfig,
    events: Arc<VmEvents>,
    seccomp: SeccompMode,
) -> Result<Vm, Error> {
    if restore.memory_restore_mode == MemoryRestoreMode::OnDemand {
        return Err(Error::Snapshot(
            "memory_restore_mode=OnDemand is not supported by this VMM; use Copy".to_string(),
        ));
    }
    let dir = snapshot_directory(&restore.source_url)?;
    let config: VmConfig = read_json(&dir.join(CONFIG_FILE))?;
    let state: SnapshotState = read_json(&dir.join(STATE_FILE))?;
    let memory = guest_memory_from_config(&config.memory)?;

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
        memory
            .read_exact_volatile_from(GuestAddress(range.gpa), &mut memory_file, length)
            .map_err(|e| Error::Snapshot(format!("reading guest RAM at {:#x}: {e}", range.gpa)))?;
    }

    let mut vm = Vm::new(&config, memory, events, seccomp)?;
    vm.restore_state(&state.vm)?;
    if restore.resume {
        vm.resume()?;
    }
    Ok(vm)
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
}
