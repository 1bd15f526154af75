//! Swapping a VM out of its region to a file and back (`vm.nv-swap-out`, `vm.nv-swap-in`,
//! `--nv ...,swap-in=FILE`). The file format, its checks and the one VM-table update that moves
//! the VM between region and file are nv-extension's (`VmHandle::swap_out`, `Region::swap_in`,
//! docs/multi-vm.md); this side orders the steps around the VM and reports progress.
//!
//! Swap-out: the destination is checked before anything is paused; the control loop pauses the
//! VM and commits a planned-suspend save (`save()`), then a worker thread runs [`swap_out`]
//! while `vm.nv-status` answers with the progress. Until the table update the VM is resident
//! with that committed save: a failure resumes it ([`resume_after_failed_swap_out`]), a crash
//! leaves it recoverable with `recover=on`.
//!
//! Swap-in: [`prepare_swap_in`] has nv-extension verify the whole file and make the VM resident
//! (claimed by this process, saved at the file's seq), then takes the in-place recovery path of
//! `recover=on` (`prepare::prepare_claimed`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nv_extension::{OpenOptions, Region, RunKind, SwapOutReport, SwapProgress};

use super::prepare::{prepare_claimed, PreparedVm};
use super::{nv_error, setup_error, NvVm};
use crate::api::{NvShutdownKind, NvStatus, NvSwapDirection, NvSwapInConfig, NvSwapProgress};
use crate::config::{default_deadline_ms, NvConfig, VmConfig};
use crate::event_monitor;
use crate::{Error, ErrorKind};

/// At most this many progress events per second (and one at the end).
const PROGRESS_EVENT_INTERVAL: Duration = Duration::from_millis(100);

/// Which way a swap moves the VM.
pub type Direction = NvSwapDirection;

fn direction_name(direction: Direction) -> &'static str {
    match direction {
        NvSwapDirection::Out => "out",
        NvSwapDirection::In => "in",
    }
}

/// What the control loop reads of a swap a worker runs: its progress, and the VM's status as
/// it was when the swap began (`vm.nv-status` answers with both).
#[derive(Debug)]
pub struct SwapWatch {
    direction: Direction,
    done_bytes: AtomicU64,
    total_bytes: AtomicU64,
    status: Mutex<Option<NvStatus>>,
}

impl SwapWatch {
    pub fn direction(&self) -> Direction {
        self.direction
    }

    pub fn progress(&self) -> NvSwapProgress {
        NvSwapProgress {
            direction: self.direction,
            done_bytes: self.done_bytes.load(Ordering::Relaxed),
            total_bytes: self.total_bytes.load(Ordering::Relaxed),
        }
    }

    /// `vm.nv-status` during the swap: `None` until the worker knows which VM it moves.
    pub fn status(&self) -> Option<NvStatus> {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.clone().map(|mut status| {
            status.swap = Some(self.progress());
            status
        })
    }

    fn set_status(&self, status: NvStatus) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
    }
}

/// The worker's side of a [`SwapWatch`]: records progress and emits the progress events.
#[derive(Debug)]
pub struct SwapProgressCell {
    watch: Arc<SwapWatch>,
    vm: String,
    last_event: Option<Instant>,
}

impl SwapProgressCell {
    pub fn new(direction: Direction) -> SwapProgressCell {
        SwapProgressCell {
            watch: Arc::new(SwapWatch {
                direction,
                done_bytes: AtomicU64::new(0),
                total_bytes: AtomicU64::new(0),
                status: Mutex::new(None),
            }),
            vm: String::new(),
            last_event: None,
        }
    }

    /// A share for the control loop.
    pub fn watch(&self) -> Arc<SwapWatch> {
        Arc::clone(&self.watch)
    }

    fn direction(&self) -> &'static str {
        direction_name(self.watch.direction)
    }

    /// From now on `vm.nv-status` answers with `nv`'s status and this swap's progress (0 of
    /// its memory). Called on the control loop before the worker starts, so that a status
    /// request never finds the swap without one.
    pub fn watch_vm(&mut self, nv: &NvVm) {
        self.vm = nv.config.vm.clone();
        self.watch
            .total_bytes
            .store(nv.memory_size(), Ordering::Relaxed);
        if let Ok(status) = super::status(nv, None, None) {
            self.watch.set_status(status);
        }
    }

    /// Records `progress`; emits a `swap-progress` event at most every 100 ms, and at the end.
    pub fn update(&mut self, progress: SwapProgress) {
        self.watch
            .total_bytes
            .store(progress.total_bytes, Ordering::Relaxed);
        self.watch
            .done_bytes
            .store(progress.done_bytes, Ordering::Relaxed);
        let finished = progress.done_bytes >= progress.total_bytes;
        let due = self
            .last_event
            .is_none_or(|last| last.elapsed() >= PROGRESS_EVENT_INTERVAL);
        if finished || due {
            self.last_event = Some(Instant::now());
            event_monitor::nv::swap_progress(
                self.direction(),
                &self.vm,
                progress.done_bytes,
                progress.total_bytes,
            );
        }
    }
}

/// What `vm.nv-swap-out` checks before the VM is paused: the destination must not exist (a
/// swap-out never replaces a file) and its directory must.
pub fn check_swap_out_destination(nv: &NvVm, destination: &Path) -> Result<(), Error> {
    let refuse = |kind, reason: String| Err(setup_error(&nv.config, kind, reason));
    if std::fs::symlink_metadata(destination).is_ok() {
        return refuse(
            ErrorKind::Conflict,
            format!(
                "swap-out destination {} exists already: a swap-out never overwrites a file",
                destination.display()
            ),
        );
    }
    let parent = destination.parent().unwrap_or(Path::new("/"));
    match std::fs::metadata(parent) {
        Ok(metadata) if metadata.is_dir() => Ok(()),
        Ok(_) => refuse(
            ErrorKind::InvalidRequest,
            format!(
                "swap-out destination {}: {} is not a directory",
                destination.display(),
                parent.display()
            ),
        ),
        Err(e) => refuse(
            ErrorKind::NotFound,
            format!(
                "swap-out destination {}: directory {}: {e}",
                destination.display(),
                parent.display()
            ),
        ),
    }
}

/// Writes the VM, saved (planned suspend) and paused, to `destination` and frees its extent
/// (`VmHandle::swap_out`). Runs on a worker thread; `progress` is read by the control loop. On
/// `Ok` the VM lives in the file only and this process must end without touching it; on `Err`
/// it is resident with its committed save and the handle still owns it.
pub fn swap_out(
    nv: &mut NvVm,
    destination: &Path,
    progress: &mut SwapProgressCell,
) -> Result<SwapOutReport, Error> {
    progress.watch_vm(nv);
    let path = destination.display().to_string();
    event_monitor::nv::swap_started(progress.direction(), &nv.config.vm, &path, nv.memory_size());
    let result = nv
        .handle
        .swap_out(destination, &mut |step| progress.update(step))
        .map_err(|e| nv_error(&nv.config, e));
    match &result {
        Ok(report) => {
            event_monitor::nv::swap_committed(
                progress.direction(),
                &nv.config.vm,
                &path,
                report.file_size,
                report.seq,
                report.took,
            );
            // The operator's record of where the VM is now.
            log::warn!(
                "VM {:?}: swapped out to {} (seq {}, {} of {} MiB of memory written, file {} \
                 bytes) in {} us; its NV memory is free",
                nv.config.vm,
                report.path.display(),
                report.seq,
                report.memory_bytes_written >> 20,
                report.memory_size >> 20,
                report.file_size,
                report.took.as_micros()
            );
        }
        Err(e) => {
            event_monitor::nv::swap_failed(
                progress.direction(),
                &nv.config.vm,
                &path,
                &e.to_string(),
            );
            log::error!("VM {:?}: swap-out to {path} failed: {e}", nv.config.vm);
        }
    }
    result
}

/// After a failed swap-out the VM is resident with the planned-suspend save the swap-out made:
/// record that it runs again before any guest code runs, so that a later crash is not taken
/// for that save (the guest moves on from it).
pub fn resume_after_failed_swap_out(nv: &NvVm) -> Result<(), Error> {
    nv.begin_run(RunKind::Resume)
}

/// `vm.nv-swap-in`: the region is the one given, or the one the file records; the VM's name,
/// if given, must be the file's.
pub fn prepare_api_swap_in(
    request: &NvSwapInConfig,
    progress: &mut SwapProgressCell,
) -> Result<PreparedVm, Error> {
    let source =
        crate::config::swap_file_url_path(&request.source_url).ok_or_else(|| Error::NvSetup {
            region: request.region.clone().unwrap_or_default(),
            vm: request.vm.clone().unwrap_or_default(),
            reason: format!(
                "source_url {:?}: {}",
                request.source_url,
                crate::config::SWAP_URL_EXPECTED
            ),
            kind: ErrorKind::InvalidRequest,
        })?;
    let summary =
        nv_extension::inspect_swap_file(Path::new(source)).map_err(|error| Error::Nv {
            context: format!("swap file {source}"),
            error,
        })?;
    let nv = NvConfig {
        region: request
            .region
            .clone()
            .unwrap_or_else(|| summary.region_path.display().to_string()),
        vm: request.vm.clone().unwrap_or(summary.vm_name),
        deadline_ms: default_deadline_ms(),
        swap_in: Some(source.to_string()),
        keep: request.keep,
        ..NvConfig::default()
    };
    prepare_swap_in(&nv, Path::new(source), None, progress)
}

/// Brings the VM `nv.vm` of region `nv.region` back from the swap file `source` and prepares
/// its in-place resume. `command_line`: the `--nv ...,swap-in=FILE` run's config (serial and
/// console overrides), `None` for the API.
pub fn prepare_swap_in(
    nv: &NvConfig,
    source: &Path,
    command_line: Option<&VmConfig>,
    progress: &mut SwapProgressCell,
) -> Result<PreparedVm, Error> {
    progress.vm = nv.vm.clone();
    let path = source.display().to_string();
    let failed = |progress: &SwapProgressCell, error: Error| {
        event_monitor::nv::swap_failed(progress.direction(), &nv.vm, &path, &error.to_string());
        error
    };
    let region = Region::open(&nv.region, &OpenOptions::default())
        .map_err(|e| failed(progress, nv_error(nv, e)))?;
    progress.watch.set_status(NvStatus {
        region: nv.region.clone(),
        persistence_mode: region.persistence_mode().into(),
        vm: nv.vm.clone(),
        last_save_sequence: None,
        shutdown_kind: NvShutdownKind::SwappedOut,
        checkpoint: None,
        deadline_ms: nv.deadline_ms,
        last_save: None,
        swap: None,
        recovery: None,
        memory_mapping: None,
    });
    event_monitor::nv::swap_started(progress.direction(), &nv.vm, &path, 0);
    let (handle, report) = region
        .swap_in(source, Some(&nv.vm), nv.keep, &mut |step| {
            progress.update(step)
        })
        .map_err(|e| failed(progress, nv_error(nv, e)))?;
    event_monitor::nv::swap_committed(
        progress.direction(),
        &nv.vm,
        &path,
        report.file_size,
        report.seq,
        report.took,
    );
    log::warn!(
        "VM {:?}: swapped in from {} (seq {}, file {} bytes) in {} us; the file is {}",
        nv.vm,
        report.path.display(),
        report.seq,
        report.file_size,
        report.took.as_micros(),
        if report.file_removed {
            "removed"
        } else {
            "kept (keep=on)"
        }
    );
    // The VM is resident now: what runs is the VM of the region, as after recover=on.
    let resident = NvConfig {
        swap_in: None,
        keep: false,
        recover: true,
        ..nv.clone()
    };
    prepare_claimed(&resident, NvShutdownKind::SwappedOut, handle, command_line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NvPersistenceMode;
    use crate::config::SeccompMode;

    fn status() -> NvStatus {
        NvStatus {
            region: "/r".into(),
            persistence_mode: NvPersistenceMode::Msync,
            vm: "a".into(),
            last_save_sequence: Some(3),
            shutdown_kind: NvShutdownKind::Running,
            deadline_ms: 50,
            last_save: None,
            swap: None,
            recovery: None,
            memory_mapping: None,
            checkpoint: None,
        }
    }

    /// What `SwapProgressCell::update` stores, without its event (the event monitor is global
    /// to the test process, and another test reads it; the end-to-end tests check the events).
    fn record(watch: &SwapWatch, done_bytes: u64, total_bytes: u64) {
        watch.total_bytes.store(total_bytes, Ordering::Relaxed);
        watch.done_bytes.store(done_bytes, Ordering::Relaxed);
    }

    #[test]
    fn the_control_loop_sees_the_workers_progress_in_the_status() {
        let cell = SwapProgressCell::new(NvSwapDirection::Out);
        let watch = cell.watch();
        // Before the worker knows the VM, there is no status to show.
        assert_eq!(watch.status(), None);
        watch.set_status(status());
        record(&cell.watch, 4 << 20, 32 << 20);
        let shown = watch.status().unwrap();
        assert_eq!(
            shown.swap,
            Some(NvSwapProgress {
                direction: NvSwapDirection::Out,
                done_bytes: 4 << 20,
                total_bytes: 32 << 20,
            })
        );
        assert_eq!(shown.last_save_sequence, Some(3));
        let json = serde_json::to_value(&shown).unwrap();
        assert_eq!(json["swap"]["direction"], "out");
        assert_eq!(json["swap"]["done_bytes"], 4 << 20);
        record(&cell.watch, 32 << 20, 32 << 20);
        assert_eq!(watch.progress().done_bytes, 32 << 20);
        // A status without a swap omits the member.
        assert!(serde_json::to_value(status())
            .unwrap()
            .get("swap")
            .is_none());
    }

    #[test]
    fn an_existing_destination_is_refused_before_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let region = dir.path().join("region");
        let config = VmConfig {
            memory: crate::config::MemoryConfig {
                size: 4 << 20,
                ..Default::default()
            },
            nv: Some(NvConfig {
                region: region.display().to_string(),
                vm: "a".into(),
                create: true,
                deadline_ms: default_deadline_ms(),
                ..NvConfig::default()
            }),
            ..VmConfig::default()
        };
        let prepared = super::super::prepare(&config, SeccompMode::Disabled, None).unwrap();
        let existing = dir.path().join("taken");
        std::fs::write(&existing, b"x").unwrap();
        let refused = check_swap_out_destination(&prepared.nv, &existing).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Conflict);
        assert!(refused.to_string().contains("exists already"), "{refused}");
        // A dangling symlink is a name that exists too.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        assert_eq!(
            check_swap_out_destination(&prepared.nv, &link)
                .unwrap_err()
                .kind(),
            ErrorKind::Conflict
        );
        let missing_dir = dir.path().join("no/such/dir/file");
        assert_eq!(
            check_swap_out_destination(&prepared.nv, &missing_dir)
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
        check_swap_out_destination(&prepared.nv, &dir.path().join("free")).unwrap();
        assert_eq!(std::fs::read(&existing).unwrap(), b"x");
    }
}
