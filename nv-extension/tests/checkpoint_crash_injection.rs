//! Crash injection over continuous checkpoints (issue 16, item 5), and over the disk undo of
//! item 3: the VM has a disk whose writes (each logged with `UndoLog::record_disk_write`
//! first, as the block device does) are stores of their own, lost unless synced; checkpoints
//! and saves sync it at their quiesce (only if written since its last sync, as the VMM
//! does); recovery writes the old blocks back and syncs. A
//! recovered image must also hold exactly the committed epoch's disk. Two deliberate breaks
//! (the disk written before its undo entry is durable; no disk sync at the quiesce) are run
//! too, and must be caught.
//!
//! A VM runs under random operations: guest writes (a write to a page not writable in the epoch
//! logs it with `UndoLog::record_undo_block` first, as the VMM's write-fault handler does, and
//! then only the pages that call reports logged become writable until the next checkpoint; the
//! block is 1, 2 or 4 pages by scenario; an `UndoLogFull` forces an early checkpoint), checkpoints, recoveries in place (the VMM died,
//! the next one rolls back to the last epoch and runs on), and now and then a power-fail save
//! and a restart, or a power-off and a cold boot. Every store and persist of the region and every guest store is recorded (see
//! `common::crash_model`), the record is cut after every event, and each cut becomes crash
//! images in which unpersisted stores are dropped, torn or kept. Each image is recovered as a
//! restarted VMM would: the outcome must be exactly a committed epoch's memory and state (or
//! the completed power-fail save's), the one committed before the interrupted operation or
//! the one it committed, or "unsafe shutdown" only where no epoch of the run has committed.
//! Cuts inside a recovery are crashes during recovery: recovering the image is recovering
//! again. Prints the cut counts per kind of operation.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nv_extension::persistence::memory::MemoryBackend;
use nv_extension::{
    checkpoint_vm, save_vm, Error, OpenOptions, Region, RunKind, ShutdownKind, UndoLog, UndoRecord,
    VmHandle,
};

mod common;
use common::crash_model::{
    replay_event_with_disk, selected_by, DiskPort, Event, GuestPort, Pending, RecordingBackend, Rng,
};
use common::BlobHost;
use nv_extension::{HostError, NvHost};
use vm_memory::VolatileSlice;

const PAGE: u64 = 4096;
/// Guest RAM of the VM, in pages.
const PAGES: u64 = 8;
/// Undo-log pages the VM asks for: fewer than it has, so full logs force early checkpoints.
const UNDO_PAGES: u64 = 3;
const SCENARIOS: u64 = 200;
/// Scenarios of each deliberate break (each must show violations).
const BREAK_SCENARIOS: u64 = 12;
const OPS_PER_SCENARIO: usize = 40;
const VARIANTS_PER_CUT: usize = 3;
/// The VM's disk: five 4 KiB blocks and a partial one.
const DISK_LEN: u64 = 5 * 4096 + 1024;
const SECTOR: u64 = 512;

/// A deliberate defect, to show the harness catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Break {
    None,
    /// The block device writes the disk before it logs the old bytes.
    DiskBeforeUndo,
    /// Checkpoints and saves do not sync the disk at their quiesce.
    NoDiskSync,
}

/// What a recovery must yield.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// Powered off: nothing to recover, the next start is a cold boot.
    Nothing,
    /// No epoch of the current run committed and no save completed: "unsafe shutdown".
    Unsafe,
    /// This state and exactly this guest memory.
    Committed {
        seq: u64,
        kind: ShutdownKind,
        state: Vec<u8>,
        memory: Vec<u8>,
        disk: Vec<u8>,
    },
}

/// Which kind of operation a cut interrupts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    /// A guest write with its undo-log entry.
    UndoWrite,
    /// A disk write with its undo-log entries.
    DiskWrite,
    /// A checkpoint (epoch commit).
    Checkpoint,
    /// Recovery in place: the undo log applied.
    Recovery,
    /// A power-fail save, or the restart after one or after a recovery.
    Other,
}

struct Op {
    kind: OpKind,
    /// The events of the operation: `start..end`.
    start: usize,
    end: usize,
    before: Outcome,
    after: Outcome,
}

struct Trace {
    events: Vec<Event>,
    /// The events up to here set the VM up (format, create, claim, first run).
    setup_end: usize,
    ops: Vec<Op>,
}

fn options() -> OpenOptions {
    OpenOptions {
        format: true,
        extent_alignment: PAGE,
        state_slot_len: PAGE,
        table_copy_len: 2 * PAGE,
        ..OpenOptions::default()
    }
}

/// The running VM of a scenario, seen from the VMM.
struct Vm {
    handle: VmHandle,
    log: UndoLog,
    guest: GuestPort,
    disk: DiskPort,
    breakage: Break,
    /// What recovery must yield right now.
    committed: Outcome,
    /// Pages the guest may write without a fault (bit per page): lifted in this epoch. A
    /// checkpoint or a new run protects all of them again.
    writable: u64,
    /// Pages logged per fault (`record_undo_block`).
    block_pages: u64,
}

/// [`BlobHost`], and the quiesce syncs the disk (as the VMM's does), unless broken.
struct DiskHost<'a> {
    blob: BlobHost,
    disk: &'a DiskPort,
    sync: bool,
}

impl NvHost for DiskHost<'_> {
    fn pause_vcpus(&mut self) -> Result<(), HostError> {
        self.blob.pause_vcpus()
    }
    fn quiesce_devices(&mut self) -> Result<(), HostError> {
        // As the VMM's quiesce: only a disk written since its last sync is synced.
        if self.sync {
            self.disk.sync_if_written();
        }
        self.blob.quiesce_devices()
    }
    fn guest_memory_ranges(&self) -> Vec<VolatileSlice<'_>> {
        Vec::new()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, HostError> {
        self.blob.save_state()
    }
    fn resume(&mut self) -> Result<(), HostError> {
        self.blob.resume()
    }
    fn write_protect_memory(&mut self) -> Result<(), HostError> {
        self.blob.write_protect_memory()
    }
}

impl Vm {
    fn memory(&self) -> Vec<u8> {
        self.guest
            .read(self.handle.memory_region_offset(), (PAGES * PAGE) as usize)
    }

    /// Writes `data` at `at` of guest page `page`; a page not writable faults first, as to the
    /// VMM's handler: its block is logged and exactly the pages logged become writable. A full
    /// log gets an early checkpoint first, as the VMM's handler asks for one.
    fn guest_write(&mut self, rng: &mut Rng, page: u64, at: u64, data: &[u8]) -> Vec<Op> {
        let mut early = Vec::new();
        while self.writable & (1 << page) == 0 {
            match self.log.record_undo_block(page * PAGE, self.block_pages) {
                Ok(block) if block.record == UndoRecord::Recorded => {
                    assert!(block.logged.contains(&(page * PAGE)));
                    for logged in block.logged {
                        self.writable |= 1 << (logged / PAGE);
                    }
                }
                Ok(_) => self.writable |= 1 << page,
                Err(Error::UndoLogFull { .. }) => early.push(self.checkpoint(rng)),
                Err(e) => panic!("record_undo_block: {e}"),
            }
        }
        self.guest
            .write(self.handle.memory_region_offset() + page * PAGE + at, data);
        early
    }

    /// Writes `data` at byte `at` of the disk, logging the old blocks first as the block
    /// device does; a full log gets an early checkpoint first.
    fn disk_write(&mut self, rng: &mut Rng, at: u64, data: &[u8]) -> Vec<Op> {
        let start = self.guest.events();
        if self.breakage == Break::DiskBeforeUndo {
            self.disk.write(at, data);
        }
        let mut early = Vec::new();
        let disk = self.disk.clone();
        let mut read_old = |offset: u64, buf: &mut [u8]| {
            disk.read(offset, buf);
            Ok(())
        };
        loop {
            match self
                .log
                .record_disk_write(0, at, data.len() as u64, DISK_LEN, &mut read_old)
            {
                Ok(_) => break,
                Err(Error::UndoLogFull { .. }) => {
                    // The blocks that fit were logged: that part is a disk write of its own.
                    let start = early.last().map_or(start, |op: &Op| op.end);
                    early.push(Op {
                        kind: OpKind::DiskWrite,
                        start,
                        end: self.guest.events(),
                        before: self.committed.clone(),
                        after: self.committed.clone(),
                    });
                    early.push(self.checkpoint(rng));
                }
                Err(e) => panic!("record_disk_write: {e}"),
            }
        }
        if self.breakage != Break::DiskBeforeUndo {
            self.disk.write(at, data);
        }
        early
    }

    fn host(&self, state: Vec<u8>) -> DiskHost<'_> {
        DiskHost {
            blob: BlobHost(state),
            disk: &self.disk,
            sync: self.breakage != Break::NoDiskSync,
        }
    }

    fn checkpoint(&mut self, rng: &mut Rng) -> Op {
        let start = self.guest.events();
        let before = self.committed.clone();
        let state = rng.blob(1, PAGE - 64);
        let report = checkpoint_vm(&self.handle, &mut self.host(state.clone()), &self.log)
            .expect("checkpoint");
        self.writable = 0;
        self.committed = Outcome::Committed {
            seq: report.seq,
            kind: ShutdownKind::Checkpoint,
            state,
            memory: self.memory(),
            disk: self.disk.content(),
        };
        Op {
            kind: OpKind::Checkpoint,
            start,
            end: self.guest.events(),
            before,
            after: self.committed.clone(),
        }
    }
}

fn record(seed: u64, breakage: Break) -> Trace {
    let mut rng = Rng::new(seed);
    let store = RecordingBackend {
        inner: Arc::new(Mutex::new(MemoryBackend::default())),
        log: Arc::new(Mutex::new(Vec::new())),
        growable: true,
    };
    let guest = GuestPort::of(&store);
    let disk = DiskPort::of(&store, DISK_LEN as usize);
    let region =
        Region::open_store(Box::new(store), Path::new("recorded"), &options()).expect("format");
    region
        .create_vm("vm", PAGES * PAGE, b"cfg")
        .expect("create");
    let handle = region.claim_vm("vm").expect("claim");
    handle.begin_run(RunKind::ColdBoot).expect("begin_run");
    let log = handle.enable_checkpoints(UNDO_PAGES).expect("enable");
    // The guest's first life: some memory content before any checkpoint.
    for page in 0..PAGES {
        guest.write(
            handle.memory_region_offset() + page * PAGE,
            &rng.blob(PAGE, PAGE),
        );
    }
    disk.write(0, &rng.blob(DISK_LEN, DISK_LEN));
    disk.sync();
    let setup_end = guest.events();
    let mut vm = Vm {
        handle,
        log,
        guest,
        disk,
        breakage,
        committed: Outcome::Unsafe,
        writable: 0,
        block_pages: 1 << (seed % 3),
    };
    let mut ops = Vec::new();
    for _ in 0..OPS_PER_SCENARIO {
        let start = vm.guest.events();
        let before = vm.committed.clone();
        match rng.below(52) {
            40..=51 => {
                // Whole sectors, up to 8 KiB (at most three blocks: the log holds three).
                let sectors = 1 + rng.below(2 * PAGE / SECTOR);
                let len = sectors * SECTOR;
                let at = rng.below((DISK_LEN - len) / SECTOR + 1) * SECTOR;
                let data = rng.blob(len, len);
                let early = vm.disk_write(&mut rng, at, &data);
                let early_end = early.last().map_or(start, |op| op.end);
                ops.extend(early);
                ops.push(Op {
                    kind: OpKind::DiskWrite,
                    start: early_end,
                    end: vm.guest.events(),
                    before: vm.committed.clone(),
                    after: vm.committed.clone(),
                });
            }
            0..=23 => {
                let page = rng.below(PAGES);
                let len = 1 + rng.below(64);
                let at = rng.below(PAGE - len + 1);
                let data = rng.blob(len, len);
                let early = vm.guest_write(&mut rng, page, at, &data);
                let early_end = early.last().map_or(start, |op| op.end);
                ops.extend(early);
                ops.push(Op {
                    kind: OpKind::UndoWrite,
                    start: early_end,
                    end: vm.guest.events(),
                    before: vm.committed.clone(),
                    after: vm.committed.clone(),
                });
            }
            24..=33 => ops.push(vm.checkpoint(&mut rng)),
            34..=38 => {
                // The VMM died; the next one recovers in place and runs on.
                if vm.committed == Outcome::Unsafe {
                    continue;
                }
                let recovered = vm
                    .handle
                    .recover_with_disks(&mut vm.disk.clone())
                    .expect("recover");
                let Outcome::Committed {
                    seq, memory, disk, ..
                } = &vm.committed
                else {
                    unreachable!()
                };
                assert_eq!(recovered.seq, *seq, "seed {seed}: recovered another epoch");
                assert_eq!(&vm.memory(), memory, "seed {seed}: memory not rolled back");
                if breakage == Break::None {
                    assert_eq!(
                        &vm.disk.content(),
                        disk,
                        "seed {seed}: disk not rolled back"
                    );
                }
                let rolled_back = vm.guest.events();
                ops.push(Op {
                    kind: OpKind::Recovery,
                    start,
                    end: rolled_back,
                    before: before.clone(),
                    after: before.clone(),
                });
                restart(&mut vm, &mut rng, &mut ops, rolled_back, RunKind::Resume);
            }
            39 if rng.below(2) == 0 => {
                // The guest powers off; the next start is a cold boot, whose epochs must never
                // be confused with the last run's.
                vm.handle.mark_powered_off().expect("power off");
                vm.committed = Outcome::Nothing;
                let stopped = vm.guest.events();
                ops.push(Op {
                    kind: OpKind::Other,
                    start,
                    end: stopped,
                    before,
                    after: Outcome::Nothing,
                });
                restart(&mut vm, &mut rng, &mut ops, stopped, RunKind::ColdBoot);
            }
            _ => {
                let state = rng.blob(1, PAGE - 64);
                let report = save_vm(
                    &mut vm.handle,
                    &mut DiskHost {
                        blob: BlobHost(state.clone()),
                        disk: &vm.disk,
                        sync: breakage != Break::NoDiskSync,
                    },
                    ShutdownKind::PowerFail,
                    std::time::Duration::from_secs(5),
                )
                .expect("power-fail save");
                vm.committed = Outcome::Committed {
                    seq: report.seq,
                    kind: ShutdownKind::PowerFail,
                    state,
                    memory: vm.memory(),
                    disk: vm.disk.content(),
                };
                let saved = vm.guest.events();
                ops.push(Op {
                    kind: OpKind::Other,
                    start,
                    end: saved,
                    before,
                    after: vm.committed.clone(),
                });
                restart(&mut vm, &mut rng, &mut ops, saved, RunKind::Resume);
            }
        }
    }
    let events = vm.guest.log.lock().unwrap().clone();
    // Every event after the set-up belongs to exactly one operation.
    let mut at = setup_end;
    for op in &ops {
        assert_eq!(
            op.start, at,
            "seed {seed}: operations overlap or leave a gap"
        );
        at = op.end;
    }
    Trace {
        events,
        setup_end,
        ops,
    }
}

/// The next run after a recovery or a save: "running" again, checkpoints on, nothing
/// committed for this run yet.
/// A resume after a save or a recovery starts checkpointed half of the time
/// (`begin_run_checkpointed`: the save is epoch 1 of the new run, no unsafe window).
fn restart(vm: &mut Vm, rng: &mut Rng, ops: &mut Vec<Op>, start: usize, kind: RunKind) {
    let before = vm.committed.clone();
    vm.writable = 0;
    vm.disk.reopened();
    match (&before, kind == RunKind::Resume && rng.below(2) == 0) {
        (
            Outcome::Committed {
                seq,
                state,
                memory,
                disk,
                ..
            },
            true,
        ) => {
            vm.log = vm
                .handle
                .begin_run_checkpointed(UNDO_PAGES)
                .expect("begin_run_checkpointed");
            vm.committed = Outcome::Committed {
                seq: seq + 1,
                kind: ShutdownKind::Checkpoint,
                state: state.clone(),
                memory: memory.clone(),
                disk: disk.clone(),
            };
            assert_eq!(vm.log.status().epoch, Some(seq + 1));
        }
        _ => {
            vm.handle.begin_run(kind).expect("begin_run");
            vm.log = vm.handle.enable_checkpoints(UNDO_PAGES).expect("enable");
            vm.committed = Outcome::Unsafe;
        }
    }
    ops.push(Op {
        kind: OpKind::Other,
        start,
        end: vm.guest.events(),
        before,
        after: vm.committed.clone(),
    });
}

/// Recovers a crash image as a restarted VMM would and says what it yielded.
fn recover_image(image: Vec<u8>, disk_image: Vec<u8>) -> Result<Outcome, String> {
    let store = RecordingBackend {
        inner: Arc::new(Mutex::new(MemoryBackend::new(image))),
        log: Arc::new(Mutex::new(Vec::new())),
        growable: true,
    };
    let medium = GuestPort::of(&store);
    let mut disk = DiskPort::of(&store, 0);
    *disk.bytes.lock().unwrap() = disk_image;
    let region = Region::open_store(
        Box::new(store),
        Path::new("crashed"),
        &OpenOptions::default(),
    )
    .map_err(|e| format!("region refused: {e}"))?;
    let handle = region
        .claim_vm("vm")
        .map_err(|e| format!("claim refused: {e}"))?;
    let recovered = match handle.recover_with_disks(&mut disk) {
        Ok(recovered) => recovered,
        Err(Error::UnsafeShutdown) => return Ok(Outcome::Unsafe),
        Err(Error::NothingToRecover(_)) => return Ok(Outcome::Nothing),
        Err(e) => return Err(format!("recovery failed: {e}")),
    };
    let memory = medium.read(handle.memory_region_offset(), (PAGES * PAGE) as usize);
    Ok(Outcome::Committed {
        seq: recovered.seq,
        kind: recovered.shutdown_kind,
        state: recovered.state_blob,
        memory,
        disk: disk.content(),
    })
}

#[derive(Default)]
struct Tally {
    /// Cuts per operation kind, in `OpKind` order.
    cuts: [u64; 5],
    violations: u64,
    /// Images that recovered to an epoch (rather than "unsafe").
    rolled_back: u64,
    /// Do not print violations (a deliberate break expects them).
    quiet: bool,
}

fn kind_index(kind: OpKind) -> usize {
    match kind {
        OpKind::UndoWrite => 0,
        OpKind::Checkpoint => 1,
        OpKind::Recovery => 2,
        OpKind::Other => 3,
        OpKind::DiskWrite => 4,
    }
}

fn replay(seed: u64, trace: &Trace, tally: &mut Tally) {
    let mut rng = Rng::new(seed ^ 0x5EED);
    let mut durable = Vec::new();
    let mut pending = Pending::default();
    let mut disk = Vec::new();
    let mut disk_pending = Pending::default();
    let mut op = 0;
    let last = trace.ops.last().map_or(trace.setup_end, |op| op.end);
    for cut in 0..=last {
        if cut >= trace.setup_end {
            while op < trace.ops.len() && trace.ops[op].end < cut {
                op += 1;
            }
            // The operation the cut interrupts (operations follow one another without a gap;
            // a cut at an operation's end belongs to it, and "after" it holds).
            let current = &trace.ops[op];
            let (before, after) = (&current.before, &current.after);
            for variant in 0..VARIANTS_PER_CUT {
                tally.cuts[kind_index(current.kind)] += 1;
                let image = pending.crash_image(&durable, &mut rng, variant);
                let disk_image = disk_pending.crash_image(&disk, &mut rng, variant);
                match recover_image(image, disk_image) {
                    Ok(seen) if seen == *before || seen == *after => {
                        tally.rolled_back += matches!(seen, Outcome::Committed { .. }) as u64;
                    }
                    Ok(seen) => {
                        if tally.violations < 10 && !tally.quiet {
                            eprintln!(
                                "VIOLATION seed {seed} cut {cut} variant {variant} ({:?}): \
                                 recovered {} but expected {} or {}",
                                current.kind,
                                describe(&seen),
                                describe(before),
                                describe(after)
                            );
                        }
                        tally.violations += 1;
                    }
                    Err(what) => {
                        if tally.violations < 10 && !tally.quiet {
                            eprintln!("VIOLATION seed {seed} cut {cut} variant {variant}: {what}");
                        }
                        tally.violations += 1;
                    }
                }
            }
        }
        if let Some(event) = trace.events.get(cut) {
            if disk.is_empty() {
                disk.resize(DISK_LEN as usize, 0);
            }
            replay_event_with_disk(
                event,
                (&mut durable, &mut pending),
                (&mut disk, &mut disk_pending),
            );
        }
    }
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Unsafe => "unsafe shutdown".to_string(),
        Outcome::Nothing => "nothing to recover".to_string(),
        Outcome::Committed {
            seq,
            kind,
            memory,
            disk,
            ..
        } => format!(
            "{kind} seq {seq} (memory crc {:08x}, disk crc {:08x})",
            crc32c::crc32c(memory),
            crc32c::crc32c(disk)
        ),
    }
}

/// Records and replays `scenarios` scenarios with `breakage`: the tally, recorded events,
/// checkpoints and recoveries in place.
fn run(scenarios: u64, breakage: Break) -> (Tally, usize, usize, usize) {
    let mut tally = Tally {
        quiet: breakage != Break::None,
        ..Tally::default()
    };
    let mut events = 0;
    let mut checkpoints = 0;
    let mut recoveries = 0;
    for seed in 1..=scenarios {
        let trace = record(seed, breakage);
        events += trace.events.len();
        checkpoints += trace
            .ops
            .iter()
            .filter(|op| op.kind == OpKind::Checkpoint)
            .count();
        recoveries += trace
            .ops
            .iter()
            .filter(|op| op.kind == OpKind::Recovery)
            .count();
        replay(seed, &trace, &mut tally);
    }
    (tally, events, checkpoints, recoveries)
}

fn main() {
    if !selected_by(
        "checkpoint_crash_injection",
        std::env::args().skip(1).collect(),
    ) {
        return;
    }
    let started = Instant::now();
    let (tally, events, checkpoints, recoveries) = run(SCENARIOS, Break::None);
    let [undo, commit, recovery, other, disk] = tally.cuts;
    let proven = undo + commit + recovery + disk;
    println!(
        "checkpoint crash injection: {proven} cuts over undo-log writes ({undo}), disk writes \
         ({disk}), epoch commits ({commit}) and recovery-apply ({recovery}), plus {other} over \
         saves and restarts; {} violations ({SCENARIOS} scenarios, {events} recorded events, \
         {checkpoints} checkpoints, {recoveries} recoveries in place, {} images rolled back to \
         a committed state, {:.1} s)",
        tally.violations,
        tally.rolled_back,
        started.elapsed().as_secs_f64()
    );
    assert!(proven >= 100_000, "too few cuts: {proven}");
    assert!(
        undo >= 10_000 && commit >= 10_000 && recovery >= 5_000 && disk >= 10_000,
        "too few cuts of a kind: {:?}",
        tally.cuts
    );
    if tally.violations > 0 {
        std::process::exit(1);
    }
    // The harness must see a disk that is not the epoch's: each deliberate break is caught.
    for breakage in [Break::DiskBeforeUndo, Break::NoDiskSync] {
        let (broken, ..) = run(BREAK_SCENARIOS, breakage);
        println!(
            "deliberate break {breakage:?}: {} violations in {} cuts",
            broken.violations,
            broken.cuts.iter().sum::<u64>()
        );
        assert!(broken.violations > 0, "{breakage:?} went unnoticed");
    }
}
