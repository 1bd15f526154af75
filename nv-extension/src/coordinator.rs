//! The power-fail coordinator: one walk from "power is failing" to "state committed".
//!
//! Phases, in order: pause vCPUs, quiesce devices, persist guest memory, save
//! the VMM's volatile state, commit it. Nothing reaches the region until the
//! commit, so a failure in any earlier phase leaves the last committed state
//! (and the VM's "running" record) exactly as they were; and the coordinator
//! then undoes the pause itself ([`NvHost::resume`]), so every embedder gets a
//! failed save undone the same way.

use std::fmt;
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

pub use crate::error::HostError;
use crate::error::{Error, Result};
use crate::fault_injection::{self, FaultPoint};
use crate::vm_handle::VmHandle;
use crate::vm_table::ShutdownKind;

/// The crate's only door to a VMM.
///
/// [`save_vm`] calls `pause_vcpus`, `quiesce_devices`, `guest_memory_ranges` and `save_state`
/// in that order, each at most once. The undo rule: when a save fails after `pause_vcpus` was
/// called (that call failed, or any later phase did), the coordinator calls `resume` exactly
/// once before it returns the error; after a save that committed it never does, and the VM
/// stays paused for the caller to stop. A save that dies at an injected fault point undoes
/// nothing: the process is gone.
pub trait NvHost {
    /// Stop every vCPU; returns when none runs guest code.
    fn pause_vcpus(&mut self) -> std::result::Result<(), HostError>;
    /// Finish or rewind in-flight device I/O and fdatasync disk backends.
    fn quiesce_devices(&mut self) -> std::result::Result<(), HostError>;
    /// The host's mappings of guest RAM (for cache write-back in DAX mode). They borrow the
    /// host, so they stay mapped while the coordinator writes their cache lines back.
    fn guest_memory_ranges(&self) -> Vec<VolatileSlice<'_>>;
    /// The VMM's volatile state (vCPUs, irqchip, clock, devices), versioned and opaque here.
    fn save_state(&mut self) -> std::result::Result<Vec<u8>, HostError>;
    /// Undo what `pause_vcpus` and `quiesce_devices` did (whichever ran, even partly): leave
    /// the VM as the save found it, running if it ran. Called after a failed save, and at the
    /// end of every checkpoint ([`crate::checkpoint::checkpoint_vm`]), committed or not.
    fn resume(&mut self) -> std::result::Result<(), HostError>;
    /// Checkpoints only: write-protect all of guest RAM, so that the first write to each page
    /// from now on stops (vCPU or device thread alike) until the VMM's fault handler has called
    /// [`crate::UndoLog::record_undo`] for it and lifted the protection. Called once per
    /// checkpoint, with vCPUs paused, after the epoch committed and before `resume`. Must not
    /// return `Ok` unless every page is protected. Hosts without checkpoints keep the default,
    /// which refuses.
    fn write_protect_memory(&mut self) -> std::result::Result<(), HostError> {
        Err("this host cannot write-protect guest memory".into())
    }
}

/// A phase of the save, numbered as `NV_FAULT_AFTER_PHASE` counts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SavePhase {
    PauseVcpus = 1,
    QuiesceDevices = 2,
    PersistMemory = 3,
    SaveState = 4,
    Commit = 5,
}

impl SavePhase {
    pub const ALL: [SavePhase; 5] = [
        SavePhase::PauseVcpus,
        SavePhase::QuiesceDevices,
        SavePhase::PersistMemory,
        SavePhase::SaveState,
        SavePhase::Commit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SavePhase::PauseVcpus => "pause-vcpus",
            SavePhase::QuiesceDevices => "quiesce-devices",
            SavePhase::PersistMemory => "persist-memory",
            SavePhase::SaveState => "save-state",
            SavePhase::Commit => "commit",
        }
    }
}

impl fmt::Display for SavePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a completed save did and how long each phase took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveReport {
    pub kind: ShutdownKind,
    /// Sequence number of the committed state.
    pub seq: u64,
    pub state_bytes: usize,
    /// Every phase in order with its duration.
    pub phases: Vec<(SavePhase, Duration)>,
    pub total: Duration,
    pub deadline: Duration,
    pub deadline_overrun: bool,
    /// Set when, right after the commit, the region's path no longer named the file the save
    /// went into (deleted, renamed or replaced while the VM ran): the state is committed in
    /// that file, which a recovery through the path will not find. Says what happened.
    pub region_file_changed: Option<String>,
}

impl SaveReport {
    pub fn phase(&self, phase: SavePhase) -> Option<Duration> {
        self.phases
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, d)| *d)
    }
}

/// Saves a running VM in place: after `Ok`, `handle.recover()` returns this state.
///
/// The guest stays paused afterwards; the caller stops the VMM (power fail)
/// or exits cleanly (planned suspend). On `Err` the previous committed state
/// is intact, the VM is still recorded as running (so a later death is
/// reported as an unsafe shutdown rather than resumed from older state), and
/// the host was told to [`resume`](NvHost::resume) if it had been paused.
pub fn save_vm(
    handle: &mut VmHandle,
    host: &mut dyn NvHost,
    kind: ShutdownKind,
    deadline: Duration,
) -> Result<SaveReport> {
    fault_injection::check_configuration()?;
    if kind == ShutdownKind::Checkpoint {
        return Err(Error::InvalidCheckpointRequest(
            "a save is a power-fail or a planned suspend; checkpoints go through checkpoint_vm"
                .to_string(),
        ));
    }
    // From here the first phase calls `pause_vcpus`: any failure is undone.
    let outcome = run_phases(handle, host, kind, deadline);
    if outcome.is_err() {
        if let Err(e) = host.resume() {
            log::error!(
                "VM {:?}: resuming after the failed save failed, the VM stays paused: {e}",
                handle.name()
            );
        }
    }
    outcome
}

fn run_phases(
    handle: &mut VmHandle,
    host: &mut dyn NvHost,
    kind: ShutdownKind,
    deadline: Duration,
) -> Result<SaveReport> {
    let vm = handle.name().to_string();
    log::info!(
        "VM {vm:?}: {kind} save started (deadline {} ms)",
        deadline.as_millis()
    );
    let started = Instant::now();
    let mut phases = Vec::with_capacity(SavePhase::ALL.len());
    let mut state = Vec::new();
    let mut seq = 0;
    for phase in SavePhase::ALL {
        let phase_started = Instant::now();
        let outcome = match phase {
            SavePhase::PauseVcpus => host.pause_vcpus().map_err(|e| host_step(phase, e)),
            SavePhase::QuiesceDevices => host.quiesce_devices().map_err(|e| host_step(phase, e)),
            SavePhase::PersistMemory => handle.persist_guest_memory(&host.guest_memory_ranges()),
            SavePhase::SaveState => host
                .save_state()
                .map(|s| state = s)
                .map_err(|e| host_step(phase, e)),
            SavePhase::Commit => handle.commit_state(&state, kind).map(|s| seq = s),
        };
        let took = phase_started.elapsed();
        if let Err(e) = outcome {
            log::error!(
                "VM {vm:?}: {kind} save failed in phase {} {phase} after {} us: {e}",
                phase as u8,
                took.as_micros()
            );
            return Err(e);
        }
        log::info!(
            "VM {vm:?}: phase {} {phase} took {} us",
            phase as u8,
            took.as_micros()
        );
        phases.push((phase, took));
        fault_injection::reached(FaultPoint::AfterPhase(phase as u8));
    }
    let total = started.elapsed();
    let deadline_overrun = total > deadline;
    if deadline_overrun {
        log::warn!(
            "VM {vm:?}: {kind} save took {} us, over the {} us deadline",
            total.as_micros(),
            deadline.as_micros()
        );
    }
    log::info!(
        "VM {vm:?}: {kind} save committed seq {seq} ({} state bytes) in {} us",
        state.len(),
        total.as_micros()
    );
    // After the commit, off the timed path: the save went into the file this process holds
    // open, which may be all that is left of the region, but whoever recovers goes through the
    // path. One fstat + stat.
    let region_file_changed = match handle.region().check_path() {
        Ok(()) => None,
        Err(e) => {
            log::error!(
                "VM {vm:?}: saved seq {seq} into a region file its path no longer names: {e}; \
                 recovery through the path will not find this save"
            );
            Some(e.to_string())
        }
    };
    let report = SaveReport {
        kind,
        seq,
        state_bytes: state.len(),
        phases,
        total,
        deadline,
        deadline_overrun,
        region_file_changed,
    };
    // After the commit and outside the timed phases: the state is safe whatever happens here,
    // and this is only for the operator who looks at the region later.
    match handle.record_save_report(&report) {
        Ok(true) => {}
        Ok(false) => log::info!("VM {vm:?}: the state fills its slot; no room for the save report"),
        Err(e) => log::warn!("VM {vm:?}: recording the save report failed (the save stands): {e}"),
    }
    Ok(report)
}

fn host_step(phase: SavePhase, source: HostError) -> Error {
    Error::HostStep {
        phase: phase.name(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::memory::MemoryBackend;
    use crate::region::{OpenOptions, Region};
    use crate::vm_table::RunKind;
    use std::path::Path;

    /// Records the calls it gets; can be told to fail one step.
    #[derive(Default)]
    struct MockHost {
        calls: Vec<&'static str>,
        fail: Option<&'static str>,
        state: Vec<u8>,
        delay: Duration,
    }

    impl MockHost {
        fn step(&mut self, name: &'static str) -> std::result::Result<(), HostError> {
            self.calls.push(name);
            std::thread::sleep(self.delay);
            if self.fail == Some(name) {
                return Err(format!("{name} exploded").into());
            }
            Ok(())
        }
    }

    impl NvHost for MockHost {
        fn pause_vcpus(&mut self) -> std::result::Result<(), HostError> {
            self.step("pause")
        }
        fn quiesce_devices(&mut self) -> std::result::Result<(), HostError> {
            self.step("quiesce")
        }
        fn guest_memory_ranges(&self) -> Vec<VolatileSlice<'_>> {
            // The test region is not DAX: persisting goes through the region's own mapping.
            Vec::new()
        }
        fn save_state(&mut self) -> std::result::Result<Vec<u8>, HostError> {
            self.step("save_state")?;
            Ok(self.state.clone())
        }
        fn resume(&mut self) -> std::result::Result<(), HostError> {
            self.step("resume")
        }
    }

    /// A VM of `memory` bytes, running, in a small in-memory region.
    fn running_vm(memory: u64) -> (Region, VmHandle) {
        let options = OpenOptions {
            format: true,
            ..OpenOptions::compact()
        };
        let region = Region::open_store(
            Box::new(MemoryBackend::default()),
            Path::new("mem"),
            &options,
        )
        .unwrap();
        region.create_vm("vm", memory, b"cfg").unwrap();
        let handle = region.claim_vm("vm").unwrap();
        handle.begin_run(RunKind::ColdBoot).unwrap();
        (region, handle)
    }

    /// A power-fail save of `handle` through `host` with a generous deadline.
    fn power_fail_save(handle: &mut VmHandle, host: &mut MockHost) -> Result<SaveReport> {
        save_vm(
            handle,
            host,
            ShutdownKind::PowerFail,
            Duration::from_secs(5),
        )
    }

    #[test]
    fn phases_run_in_order_and_the_report_matches_the_commit() {
        let (_region, mut handle) = running_vm(16384);
        let mut host = MockHost {
            state: b"registers".to_vec(),
            ..MockHost::default()
        };
        let report = power_fail_save(&mut handle, &mut host).unwrap();
        // A save that commits leaves the VM paused: no resume.
        assert_eq!(host.calls, ["pause", "quiesce", "save_state"]);
        assert_eq!(
            report.phases.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            SavePhase::ALL
        );
        assert_eq!(report.seq, 1);
        assert_eq!(report.state_bytes, 9);
        assert!(!report.deadline_overrun);
        assert!(report.total >= report.phases.iter().map(|(_, d)| *d).sum());
        let recovered = handle.recover().unwrap();
        assert_eq!(recovered.state_blob, b"registers");
        assert_eq!(recovered.seq, 1);
        assert_eq!(recovered.shutdown_kind, ShutdownKind::PowerFail);
    }

    #[test]
    fn deadline_overrun_is_reported() {
        let (_region, mut handle) = running_vm(4096);
        let mut host = MockHost {
            delay: Duration::from_millis(2),
            ..MockHost::default()
        };
        let report = save_vm(
            &mut handle,
            &mut host,
            ShutdownKind::PlannedSuspend,
            Duration::from_millis(1),
        )
        .unwrap();
        assert!(report.deadline_overrun);
        assert!(report.phase(SavePhase::PauseVcpus).unwrap() >= Duration::from_millis(2));
    }

    #[test]
    fn a_failing_host_step_keeps_the_previous_state_and_is_reported() {
        for failing in ["pause", "quiesce", "save_state"] {
            let (_region, mut handle) = running_vm(4096);
            let mut host = MockHost {
                state: b"first".to_vec(),
                ..MockHost::default()
            };
            power_fail_save(&mut handle, &mut host).unwrap();
            handle.begin_run(RunKind::Resume).unwrap();
            host.state = b"second".to_vec();
            host.fail = Some(failing);
            host.calls.clear();
            let err = power_fail_save(&mut handle, &mut host).unwrap_err();
            assert!(matches!(err, Error::HostStep { .. }), "{err}");
            assert!(
                err.to_string().contains(&format!("{failing} exploded")),
                "{err}"
            );
            // No phase after the failing one; the pause is undone, once.
            let failed_at = host.calls.iter().position(|c| *c == failing).unwrap();
            assert_eq!(host.calls[failed_at + 1..], ["resume"], "{:?}", host.calls);
            // Still running: a death now is an unsafe shutdown, never a resume of "first".
            assert!(matches!(handle.recover(), Err(Error::UnsafeShutdown)));
            let slot = handle.region().list_vms().unwrap()[0].clone();
            assert_eq!(slot.last_save_seq, Some(1));
            // The committed state is intact: a retry that succeeds commits seq 2.
            host.fail = None;
            let report = power_fail_save(&mut handle, &mut host).unwrap();
            assert_eq!(report.seq, 2);
            assert_eq!(handle.recover().unwrap().state_blob, b"second");
        }
    }

    #[test]
    fn a_failed_commit_is_undone_too() {
        let (_region, mut handle) = running_vm(4096);
        // More state than the 8 KiB slot holds: the commit phase fails, after every host step.
        let mut host = MockHost {
            state: vec![7; 16384],
            ..MockHost::default()
        };
        let err = power_fail_save(&mut handle, &mut host).unwrap_err();
        assert!(!matches!(err, Error::HostStep { .. }), "{err}");
        assert_eq!(host.calls, ["pause", "quiesce", "save_state", "resume"]);
        assert!(matches!(handle.recover(), Err(Error::UnsafeShutdown)));
    }
}
