//! Crash-injection harness (the pmemcheck/pmreorder model).
//!
//! A recording backend logs every store and every persist while random
//! create / claim / run / save / config / power-off / resize / delete operations drive
//! a region. Then the log is cut after every event, and each cut is turned
//! into several crash images: everything persisted before the cut is on the
//! medium; of the stores not yet persisted, each 8-byte word independently
//! keeps the durable value or takes any prefix of its pending stores (so
//! stores are dropped, torn at 8 bytes, and reordered across words).
//!
//! Each image is opened and checked: it opens (once the format completed) or
//! is refused with a typed error, never panics; every VM's size, config and
//! recovery outcome equal the committed state just before or just after the
//! interrupted operation (so a recovered state is byte-identical to a
//! committed one, no committed state is lost, and a torn save is never
//! resumable); a running VM implies the region's unsafe-shutdown marker; a
//! recorded save report only ever describes the save the VM's record names
//! (never a torn, older or other VM's save); and the recovered region still
//! accepts a new save.
//!
//! Swap-out and swap-in are among the operations (swap files on a real temporary directory;
//! the region's stores are the ones cut): a VM recorded as swapped out must swap in from its
//! file in every image, with the state it had, so every cut leaves it resident or swapped out
//! with a complete file, never neither.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nv_extension::persistence::memory::MemoryBackend;
use nv_extension::save_report::RECORD_LEN;
use nv_extension::{Error, OpenOptions, Region, RunKind, ShutdownKind, ShutdownMarker, VmHandle};

mod common;
use common::crash_model::{replay_event, selected_by, Event, Pending, RecordingBackend, Rng};
use common::save_blob;

const PAGE: u64 = 4096;
const SLOT_LEN: u64 = 4096;
const SCENARIOS: u64 = 400;
const OPS_PER_SCENARIO: usize = 48;
const VARIANTS_PER_CUT: usize = 3;
const NAMES: [&str; 4] = ["alpha", "beta", "gamma", "delta"];

/// What recovery of a VM must say.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Recovery {
    Nothing,
    Unsafe,
    State {
        seq: u64,
        blob: Vec<u8>,
    },
    /// Swapped out: the file it swaps in from holds this save.
    Swapped {
        seq: u64,
        blob: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ModelVm {
    memory_size: u64,
    config: Vec<u8>,
    recovery: Recovery,
}

type Model = BTreeMap<String, ModelVm>;

fn options() -> OpenOptions {
    OpenOptions {
        format: true,
        extent_alignment: PAGE,
        state_slot_len: SLOT_LEN,
        table_copy_len: 2 * PAGE,
        ..OpenOptions::default()
    }
}

/// A recorded run: the event log and, per completed operation, where it ended and the model after it.
struct Trace {
    initial_len: usize,
    /// Creates and resizes refused because a fixed-size store was full.
    out_of_space: u64,
    events: Vec<Event>,
    /// (events logged when the operation finished, committed model after it)
    checkpoints: Vec<(usize, Model)>,
    /// The events up to here belong to the format; images cut earlier may be refused.
    format_end: usize,
    /// Event ranges of the swap-outs and swap-ins.
    swaps: Vec<std::ops::Range<usize>>,
}

fn record(seed: u64, swap_dir: &Path) -> Trace {
    let mut rng = Rng::new(seed);
    let log = Arc::new(Mutex::new(Vec::new()));
    // Every fifth scenario runs on a fixed-size store (like a devdax device) that fills up.
    let growable = !seed.is_multiple_of(5);
    let initial_len = if growable {
        0
    } else {
        6 * PAGE + 2 * (3 * PAGE + 2 * SLOT_LEN)
    } as usize;
    let store = RecordingBackend {
        inner: Arc::new(Mutex::new(MemoryBackend::new(vec![0; initial_len]))),
        log: log.clone(),
        growable,
    };
    let region =
        Region::open_store(Box::new(store), Path::new("recorded"), &options()).expect("format");
    let format_end = log.lock().unwrap().len();
    let mut model = Model::new();
    let mut checkpoints = vec![(format_end, model.clone())];
    let mut handles: BTreeMap<String, VmHandle> = BTreeMap::new();
    let mut out_of_space = 0;
    let mut swaps = Vec::new();

    for op in 0..OPS_PER_SCENARIO {
        let name = NAMES[rng.below(NAMES.len() as u64) as usize].to_string();
        let op_start = log.lock().unwrap().len();
        match rng.below(14) {
            0 | 1 => {
                let memory_size = (1 + rng.below(3)) * PAGE;
                let config = rng.blob(0, 40);
                match region.create_vm(&name, memory_size, &config) {
                    Ok(_) => {
                        assert!(
                            !model.contains_key(&name),
                            "{seed}: duplicate create accepted"
                        );
                        model.insert(
                            name,
                            ModelVm {
                                memory_size,
                                config,
                                recovery: Recovery::Nothing,
                            },
                        );
                    }
                    Err(Error::VmExists(_)) => assert!(model.contains_key(&name)),
                    Err(Error::OutOfSpace { .. }) => out_of_space += 1,
                    Err(e) => panic!("{seed}: create failed: {e}"),
                }
            }
            2 => {
                handles.remove(&name);
                match region.delete_vm(&name) {
                    Ok(()) => assert!(model.remove(&name).is_some()),
                    Err(Error::VmNotFound(_)) => assert!(!model.contains_key(&name)),
                    Err(e) => panic!("{seed}: delete failed: {e}"),
                }
            }
            3 | 4 => {
                if let Some(vm) = model
                    .get_mut(&name)
                    .filter(|vm| !matches!(vm.recovery, Recovery::Swapped { .. }))
                {
                    let handle = match handles.remove(&name) {
                        Some(h) => h,
                        None => region.claim_vm(&name).expect("claim"),
                    };
                    let kind = if vm.recovery == Recovery::Nothing {
                        RunKind::ColdBoot
                    } else {
                        RunKind::Resume
                    };
                    handle.begin_run(kind).expect("begin_run");
                    vm.recovery = Recovery::Unsafe;
                    handles.insert(name, handle);
                }
            }
            5 | 6 => {
                if let Some(handle) = handles.get_mut(&name) {
                    let vm = model.get_mut(&name).unwrap();
                    if vm.recovery == Recovery::Unsafe {
                        let blob = rng.blob(1, SLOT_LEN - 64);
                        let kind = if rng.below(2) == 0 {
                            ShutdownKind::PowerFail
                        } else {
                            ShutdownKind::PlannedSuspend
                        };
                        let report = save_blob(handle, &blob, kind).expect("save");
                        // A state that leaves room in its slot gets its report recorded.
                        if blob.len() as u64 + 64 + RECORD_LEN as u64 <= SLOT_LEN {
                            let recorded = region.last_save_report(&name).unwrap();
                            assert_eq!(
                                recorded.map(|r| (r.seq, r.kind, r.state_bytes)),
                                Some((report.seq, kind, blob.len())),
                                "seed {seed}: save report not recorded"
                            );
                        }
                        vm.recovery = Recovery::State {
                            seq: report.seq,
                            blob,
                        };
                    }
                }
            }
            7 => {
                if let Some(handle) = handles.get(&name) {
                    let config = rng.blob(0, 300);
                    handle.set_config_blob(&config).expect("set config");
                    model.get_mut(&name).unwrap().config = config;
                } else if let Some(handle) = handles.values().next() {
                    if rng.below(2) == 0 {
                        handle.mark_powered_off().expect("power off");
                        model.get_mut(handle.name()).unwrap().recovery = Recovery::Nothing;
                    }
                }
            }
            8 => {
                let memory_size = (1 + rng.below(4)) * PAGE;
                match region.resize_vm(&name, memory_size) {
                    Ok(_) => model.get_mut(&name).unwrap().memory_size = memory_size,
                    Err(Error::VmNotFound(_)) => assert!(!model.contains_key(&name)),
                    Err(Error::OwnedByLiveProcess { .. }) => assert!(handles.contains_key(&name)),
                    Err(Error::ResizeWouldDiscardState(_)) => {
                        assert!(matches!(model[&name].recovery, Recovery::State { .. }))
                    }
                    Err(Error::SwappedOut { .. }) => {
                        assert!(matches!(model[&name].recovery, Recovery::Swapped { .. }))
                    }
                    Err(Error::OutOfSpace { .. }) => out_of_space += 1,
                    Err(e) => panic!("{seed}: resize failed: {e}"),
                }
            }
            9 => {
                handles.remove(&name); // releases the owner record
            }
            10 | 11 => {
                // Any VM of ours with a committed save that matches its memory.
                let saved = handles.keys().find_map(|name| match &model[name].recovery {
                    Recovery::State { seq, blob } => Some((name.clone(), *seq, blob.clone())),
                    _ => None,
                });
                if let Some((name, seq, blob)) = saved {
                    let mut handle = handles.remove(&name).unwrap();
                    let file = swap_dir.join(format!("{seed}-{op}.swap"));
                    let report = handle.swap_out(&file, &mut |_| {}).expect("swap-out");
                    assert_eq!(report.seq, seq);
                    model.get_mut(&name).unwrap().recovery = Recovery::Swapped { seq, blob };
                    swaps.push(op_start..log.lock().unwrap().len());
                }
            }
            _ => {
                let swapped = model.iter().find_map(|(name, vm)| match &vm.recovery {
                    Recovery::Swapped { seq, blob } => Some((name.clone(), *seq, blob.clone())),
                    _ => None,
                });
                if let Some((name, seq, blob)) = swapped {
                    let file = region.vm(&name).unwrap().swap.unwrap().path;
                    // Kept: images cut before this swap-in still need the file.
                    match region.swap_in(&file, Some(&name), true, &mut |_| {}) {
                        Ok((handle, _)) => {
                            model.get_mut(&name).unwrap().recovery = Recovery::State { seq, blob };
                            handles.insert(name, handle);
                        }
                        Err(Error::OutOfSpace { .. }) => out_of_space += 1,
                        Err(e) => panic!("{seed}: swap-in failed: {e}"),
                    }
                    swaps.push(op_start..log.lock().unwrap().len());
                }
            }
        }
        // The live region must agree with the model before anything is cut.
        assert_eq!(
            observe_live(&region, &model),
            model,
            "seed {seed}: live region diverged from the model"
        );
        checkpoints.push((log.lock().unwrap().len(), model.clone()));
    }
    drop(handles);
    drop(region);
    let events = log.lock().unwrap().clone();
    Trace {
        initial_len,
        out_of_space,
        events,
        checkpoints,
        format_end,
        swaps,
    }
}

fn recovery_of(
    result: nv_extension::Result<nv_extension::RecoveredVm>,
) -> Result<Recovery, String> {
    match result {
        Ok(r) => Ok(Recovery::State {
            seq: r.seq,
            blob: r.state_blob,
        }),
        Err(Error::UnsafeShutdown) => Ok(Recovery::Unsafe),
        Err(Error::NothingToRecover(_)) => Ok(Recovery::Nothing),
        Err(e) => Err(e.to_string()),
    }
}

/// A VM's recorded save report must describe the save its run record names, and, when that
/// save is the resumable state, that very state.
fn check_save_report(vm: &nv_extension::VmSummary, recovery: &Recovery) -> Result<(), String> {
    let Some(report) = &vm.last_save else {
        return Ok(());
    };
    if Some(report.seq) != vm.last_save_seq {
        return Err(format!(
            "VM {}: report of save {} but the record names {:?}",
            vm.name, report.seq, vm.last_save_seq
        ));
    }
    if let Recovery::State { seq, blob } = recovery {
        if report.seq != *seq
            || report.state_bytes != blob.len()
            || Some(report.kind) != vm.shutdown_kind
        {
            return Err(format!(
                "VM {}: report {report:?} does not describe the resumable state {seq} ({} bytes)",
                vm.name,
                blob.len()
            ));
        }
    }
    Ok(())
}

/// The live region as a model; a swapped-out VM's save is taken from `expected` once its
/// sequence matches (the crash images check the file's contents by swapping it in).
fn observe_live(region: &Region, expected: &Model) -> Model {
    region
        .list_vms()
        .unwrap()
        .into_iter()
        .map(|vm| {
            let recovery = match (&vm.swap, expected.get(&vm.name).map(|m| &m.recovery)) {
                (Some(_), Some(Recovery::Swapped { seq, blob }))
                    if vm.last_save_seq == Some(*seq) =>
                {
                    Recovery::Swapped {
                        seq: *seq,
                        blob: blob.clone(),
                    }
                }
                (Some(swap), _) => panic!("VM {} swapped out to {swap:?} unexpectedly", vm.name),
                (None, _) => recovery_of(region.inspect_recovery(&vm.name)).unwrap(),
            };
            check_save_report(&vm, &recovery).unwrap();
            (
                vm.name.clone(),
                ModelVm {
                    memory_size: vm.memory_size,
                    config: region.config_blob(&vm.name).unwrap(),
                    recovery,
                },
            )
        })
        .collect::<Model>()
}

/// Opens a crash image the way a restarted VMM would and reads every VM through a claim, or,
/// for a swapped-out VM, through a swap-in of its file (kept: other images need it).
fn observe_crashed(region: &Region) -> Result<Model, String> {
    let mut model = Model::new();
    for vm in region.list_vms().map_err(|e| e.to_string())? {
        let (handle, recovery) = if let Some(swap) = &vm.swap {
            let (handle, _) = region
                .swap_in(&swap.path, Some(&vm.name), true, &mut |_| {})
                .map_err(|e| format!("swapped-out VM {} lost: {e}", vm.name))?;
            let recovered = handle.recover().map_err(|e| e.to_string())?;
            let recovery = Recovery::Swapped {
                seq: recovered.seq,
                blob: recovered.state_blob,
            };
            (handle, recovery)
        } else {
            let handle = region
                .claim_vm(&vm.name)
                .map_err(|e| format!("claim {}: {e}", vm.name))?;
            let recovery = recovery_of(handle.recover())?;
            check_save_report(&vm, &recovery)?;
            (handle, recovery)
        };
        let config = handle.config_blob().map_err(|e| e.to_string())?;
        model.insert(
            vm.name.clone(),
            ModelVm {
                memory_size: vm.memory_size,
                config,
                recovery,
            },
        );
    }
    Ok(model)
}

#[derive(Default)]
struct Tally {
    cuts: u64,
    /// Cuts inside a swap-out or swap-in, and the images of them that showed a swapped-out VM.
    swap_cuts: u64,
    swapped_images: u64,
    violations: u64,
    refused_before_format: u64,
    resaves: u64,
}

impl Tally {
    fn violation(&mut self, seed: u64, cut: usize, variant: usize, what: String) {
        if self.violations < 10 {
            eprintln!("VIOLATION seed {seed} cut {cut} variant {variant}: {what}");
        }
        self.violations += 1;
    }
}

fn check_image(
    image: Vec<u8>,
    before: &Model,
    after: &Model,
    resave: bool,
) -> Result<(bool, bool), String> {
    let region = match Region::open_store(
        Box::new(MemoryBackend::new(image)),
        Path::new("crashed"),
        &OpenOptions::default(),
    ) {
        Ok(region) => region,
        Err(e) => return Err(format!("committed region refused: {e}")),
    };
    let seen = observe_crashed(&region)?;
    let swapped = seen
        .values()
        .any(|vm| matches!(vm.recovery, Recovery::Swapped { .. }));
    if seen != *before && seen != *after {
        return Err(format!(
            "state matches neither side of the interrupted operation\n  seen:   {seen:?}\n  before: {before:?}\n  after:  {after:?}"
        ));
    }
    if seen.values().any(|vm| vm.recovery == Recovery::Unsafe)
        && region.shutdown_marker() != ShutdownMarker::VmsRunning
    {
        return Err("a VM is running but the region is marked clean".into());
    }
    if resave {
        if let Some((name, _)) = seen.iter().next() {
            let mut handle = region.claim_vm(name).map_err(|e| e.to_string())?;
            handle
                .begin_run(RunKind::Resume)
                .map_err(|e| e.to_string())?;
            save_blob(&mut handle, b"after-crash", ShutdownKind::PowerFail)
                .map_err(|e| format!("save after crash: {e}"))?;
            let recovered = handle.recover().map_err(|e| e.to_string())?;
            if recovered.state_blob != b"after-crash" {
                return Err("save after crash not recovered".into());
            }
            return Ok((true, swapped));
        }
    }
    Ok((false, swapped))
}

fn replay(seed: u64, trace: &Trace, tally: &mut Tally) {
    let mut rng = Rng::new(seed ^ 0xC0FFEE);
    let mut durable: Vec<u8> = vec![0; trace.initial_len];
    let mut pending = Pending::default();
    let mut checkpoint = 0; // index of the last operation completed at the cut
    for cut in 0..=trace.events.len() {
        while checkpoint + 1 < trace.checkpoints.len() && trace.checkpoints[checkpoint + 1].0 <= cut
        {
            checkpoint += 1;
        }
        let in_swap = trace.swaps.iter().any(|swap| swap.contains(&cut));
        for variant in 0..VARIANTS_PER_CUT {
            tally.cuts += 1;
            tally.swap_cuts += in_swap as u64;
            let image = pending.crash_image(&durable, &mut rng, variant);
            if cut < trace.format_end {
                // Interrupted format: refusing is fine, panicking or accepting garbage is not.
                match Region::open_store(
                    Box::new(MemoryBackend::new(image)),
                    Path::new("crashed"),
                    &OpenOptions::default(),
                ) {
                    Err(_) => tally.refused_before_format += 1,
                    Ok(region) => {
                        if let Err(e) = observe_crashed(&region) {
                            tally.violation(
                                seed,
                                cut,
                                variant,
                                format!("half-formatted region opened but unusable: {e}"),
                            );
                        }
                    }
                }
                continue;
            }
            let before = &trace.checkpoints[checkpoint].1;
            let after = &trace.checkpoints[(checkpoint + 1).min(trace.checkpoints.len() - 1)].1;
            let resave = rng.below(8) == 0;
            match check_image(image, before, after, resave) {
                Ok((resaved, swapped)) => {
                    tally.resaves += resaved as u64;
                    tally.swapped_images += (in_swap && swapped) as u64;
                }
                Err(what) => tally.violation(seed, cut, variant, what),
            }
        }
        if let Some(event) = trace.events.get(cut) {
            replay_event(event, &mut durable, &mut pending);
        }
    }
}

fn main() {
    // `cargo test` passes libtest's arguments here too: honour --list, --ignored and name
    // filters the way libtest would, so `cargo test -p nv-extension some_other_test` skips us.
    if !selected_by("crash_injection", std::env::args().skip(1).collect()) {
        return;
    }
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut events = 0;
    let mut out_of_space = 0;
    let mut swaps = 0;
    for seed in 1..=SCENARIOS {
        let swap_dir = tempfile::tempdir().expect("swap directory");
        let trace = record(seed, swap_dir.path());
        events += trace.events.len();
        out_of_space += trace.out_of_space;
        swaps += trace.swaps.len();
        replay(seed, &trace, &mut tally);
    }
    println!(
        "crash injection: {} cuts, {} violations ({SCENARIOS} scenarios, {events} recorded events, \
         {} refused mid-format, {} re-saved after the crash, {out_of_space} allocations refused for space, {:.1} s)",
        tally.cuts,
        tally.violations,
        tally.refused_before_format,
        tally.resaves,
        started.elapsed().as_secs_f64()
    );
    println!(
        "crash injection over swaps: {swaps} swap-outs and swap-ins, {} cuts inside them, \
         {} of their images with a VM swapped out (each swapped in from its file)",
        tally.swap_cuts, tally.swapped_images
    );
    assert!(tally.cuts >= 100_000, "too few cuts: {}", tally.cuts);
    assert!(
        tally.swap_cuts >= 5_000 && tally.swapped_images > 0,
        "too few swap cuts: {} ({} swapped)",
        tally.swap_cuts,
        tally.swapped_images
    );
    if tally.violations > 0 {
        std::process::exit(1);
    }
}
