//! Issue 15's memory measurements, in one section (`nv-bench memory`, part of `all`):
//!
//! - **B at any size**: NV in-place recovery of VMs of 256 MiB up to 64 GiB, in sparse regions
//!   on tmpfs (`sparse=on`: only what the guest touches, a few MiB, is ever allocated), and
//!   the ratio of the largest to the smallest;
//! - **first touch with huge pages**: time for kvstore to fill a 256 MiB and a 1 GiB table
//!   (every page touched once) on 2 MiB pages against 4 KiB pages, for anonymous RAM
//!   (`thp=on` against `thp=off`) and for an NV region (a tmpfs mounted `huge=always` against
//!   `/dev/shm`, which has no `huge=`);
//! - **D at full speed**: kvstore throughput on NV (both tmpfs kinds) against anonymous RAM with
//!   many interleaved repetitions, median and spread.
//!
//! The huge tmpfs is mounted by this section (it needs root) and unmounted at its end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::detached_teardown::ExitingVmm;
use crate::error::{BenchError, Result};
use crate::launch::{Launch, MemoryBacking};
use crate::measure::floor::parse_recovery_line;
use crate::measure::overhead::throughputs_in_one_window;
use crate::measure::power_fail::{first_line_after_start, Recovery};
use crate::measure::{each_variant_repeatedly, Bench, StepNames, LINE_TIMEOUT};
use crate::output::{seconds, CsvTable};
use crate::profile::{keys_label, size_label};
use crate::running_vm::RunningVm;
use crate::stats::median;

const MIB: u64 = 1 << 20;
/// A progress line every 10 ms, as in A/B.
const PERIOD_MS: u32 = 10;
/// B at any size: kvstore's table is 4 MiB whatever the RAM, so the guest touches the same few
/// MiB in every VM and only the RAM size differs.
const FLAT_KEYS: u64 = 4 * MIB / 32;
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest the kernel's teardown of an exited VMM's KVM VM may take before a recovery.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A tmpfs mounted `huge=always` for this run, unmounted on drop.
struct HugeTmpfs {
    path: PathBuf,
}

impl HugeTmpfs {
    fn mount(parent: &Path) -> std::result::Result<Self, String> {
        let path = parent.join(format!("nv-bench-{}-huge", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // The size is a limit, not an allocation: only what guests touch is used.
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "huge=always,size=8g", "nv-bench-huge"])
            .arg(&path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !output.status.success() {
            let _ = std::fs::remove_dir(&path);
            return Err(format!(
                "mount -t tmpfs -o huge=always failed (root needed): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Self { path })
    }

    fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for HugeTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

pub fn run(bench: &mut Bench) -> Result<()> {
    bench.summary.line("");
    bench.summary.line(
        "== Memory (issue 15): B recovery up to 64 GiB, first touch with huge pages, D with spread",
    );
    let huge = match HugeTmpfs::mount(Path::new("/tmp")) {
        Ok(huge) => {
            bench.summary.line(format!(
                "huge-page stand-in: tmpfs mounted huge=always at {}",
                huge.path.display()
            ));
            Some(huge)
        }
        Err(why) => {
            bench
                .summary
                .not_measured("NV on a huge-page tmpfs (first touch, D)", &why);
            None
        }
    };
    flat_recovery(bench)?;
    first_touch(bench, huge.as_ref())?;
    full_speed(bench, huge.as_ref())?;
    Ok(())
}

/// `nv-bench memory-flat`: B at any size alone (no huge tmpfs, no first touch, no D).
pub fn run_flat(bench: &mut Bench) -> Result<()> {
    bench.summary.line("");
    bench
        .summary
        .line("== Memory (issue 15), B at any size only: recovery up to 64 GiB");
    flat_recovery(bench)
}

/// B at any size: boot on a sparse region, then power failures and in-place recoveries.
fn flat_recovery(bench: &mut Bench) -> Result<()> {
    let sizes = bench.profile.flat_ram_sizes.clone();
    bench.summary.line(format!(
        "B-flat method: kvstore with a {} table (the same pages touched at every size) on a sparse \
         tmpfs region (sparse=on), {} power failure(s) and recoveries per size; times from the \
         command's start; the VMM's own figures from its `-v` line (exec to vCPUs released, and \
         the part of it spent waiting for KVM's memory registration)",
        size_label(FLAT_KEYS * 32),
        bench.profile.flat_cycles
    ));
    let mut table = CsvTable::new(&[
        "ram_bytes",
        "cycle",
        "teardown_wait_s",
        "to_first_new_serial_line_s",
        "to_resumed_event_s",
        "vmm_exec_to_released_s",
        "vmm_registration_wait_s",
        "vmm_irqchip_pit_s",
    ]);
    let mut medians: Vec<(u64, f64, f64)> = Vec::new();
    // Per size: the median of the VMM's own time without its wait for KVM's registration.
    let mut vmm_shares: Vec<(u64, f64, f64)> = Vec::new();
    for &size in &sizes {
        bench.summary.progress(format!(
            "B-flat {}: boot, power failures, recoveries",
            size_label(size)
        ));
        match flat_cycles(bench, size, &mut table) {
            Ok(recoveries) => {
                let first: Vec<f64> = recoveries.iter().map(|r| r.times.first_line).collect();
                let resumed: Vec<f64> = recoveries
                    .iter()
                    .filter_map(|r| r.times.resumed_event)
                    .collect();
                let own: Vec<f64> = recoveries
                    .iter()
                    .filter_map(FlatRecovery::vmm_share)
                    .collect();
                let own_without_irqchip: Vec<f64> = recoveries
                    .iter()
                    .filter_map(FlatRecovery::vmm_share_without_irqchip_pit)
                    .collect();
                if let (Some(share), Some(without)) = (median(&own), median(&own_without_irqchip)) {
                    bench.summary.line(format!(
                        "B-flat {} the VMM's own share (exec to vCPUs released less its wait for \
                         KVM's memory registration): median {:.1} ms, {:.1} ms less its \
                         irqchip-pit phase too, over {}",
                        size_label(size),
                        share * 1e3,
                        without * 1e3,
                        own.len()
                    ));
                    vmm_shares.push((size, share, without));
                }
                let (first, resumed) = (
                    median(&first).unwrap_or(f64::NAN),
                    median(&resumed).unwrap_or(f64::NAN),
                );
                bench.summary.line(format!(
                    "B-flat {} NV in place (sparse tmpfs region): median {:.1} ms to the first new \
                     serial line, {:.1} ms to the resumed event, over {}",
                    size_label(size),
                    first * 1e3,
                    resumed * 1e3,
                    recoveries.len()
                ));
                medians.push((size, first, resumed));
            }
            Err(error) => bench.summary.not_measured(
                &format!("B-flat recovery at {}", size_label(size)),
                &error.to_string(),
            ),
        }
    }
    table.write(&bench.out_dir, "b_flat_recovery.csv")?;
    // What KVM alone costs per size: a new VM with the RAM registered, nothing else.
    let mut registration = Vec::new();
    for &size in &sizes {
        let (took, irqchip_pit) = memory_registration_seconds(size);
        bench.summary.line(format!(
            "B-flat {} KVM floor: KVM_CREATE_VM + KVM_SET_USER_MEMORY_REGION of the RAM (anonymous, \
             untouched), median {:.1} ms over {MEMSLOT_REPETITIONS}; then KVM_CREATE_IRQCHIP + \
             KVM_CREATE_PIT2, median {:.2} ms",
            size_label(size),
            took * 1e3,
            irqchip_pit * 1e3
        ));
        registration.push((size, took));
    }
    if let (Some(smallest), Some(largest)) = (medians.first(), medians.last()) {
        if largest.0 > smallest.0 {
            bench.summary.line(format!(
                "B RATIO NV in-place recovery median {} / {} = {:.2}x to the resumed event, \
                 {:.2}x to the first new serial line (goal <= 1.2x)",
                size_label(largest.0),
                size_label(smallest.0),
                largest.2 / smallest.2,
                largest.1 / smallest.1
            ));
            let floor = |size: u64| {
                registration
                    .iter()
                    .find(|(s, _)| *s == size)
                    .map(|(_, t)| *t)
                    .unwrap_or(0.0)
            };
            let (small_floor, large_floor) = (floor(smallest.0), floor(largest.0));
            bench.summary.line(format!(
                "B RATIO NV in-place recovery median {} / {} without KVM's memory registration = \
                 {:.2}x to the resumed event (registration alone: {:.1} ms vs {:.1} ms, {:.1}x)",
                size_label(largest.0),
                size_label(smallest.0),
                (largest.2 - large_floor) / (smallest.2 - small_floor),
                large_floor * 1e3,
                small_floor * 1e3,
                large_floor / small_floor
            ));
        }
    }
    if let (Some(smallest), Some(largest)) = (vmm_shares.first(), vmm_shares.last()) {
        if largest.0 > smallest.0 {
            bench.summary.line(format!(
                "B RATIO the VMM's own share of recovery {} / {} = {:.2}x ({:.1} ms vs {:.1} ms; \
                 exec to vCPUs released less the wait for KVM's memory registration, each \
                 recovery's own -v figures); {:.2}x less the irqchip-pit phase too ({:.1} ms vs \
                 {:.1} ms: KVM's SRCU waits after a large registration land there)",
                size_label(largest.0),
                size_label(smallest.0),
                largest.1 / smallest.1,
                largest.1 * 1e3,
                smallest.1 * 1e3,
                largest.2 / smallest.2,
                largest.2 * 1e3,
                smallest.2 * 1e3
            ));
        }
    }
    Ok(())
}

/// One B-flat recovery: the host's stamps and the VMM's own figures.
struct FlatRecovery {
    times: Recovery,
    /// The VMM's `-v` recovery line: exec to vCPUs released, and the `kvm-vm-memory` phase
    /// (what was left of the wait for the `vm-create` thread's memory registration), seconds.
    vmm_exec_to_released: Option<f64>,
    vmm_registration_wait: Option<f64>,
    /// Its `irqchip-pit` phase, seconds.
    vmm_irqchip_pit: Option<f64>,
}

impl FlatRecovery {
    /// What the VMM spent on its own: exec to vCPUs released, less the registration wait.
    fn vmm_share(&self) -> Option<f64> {
        Some(self.vmm_exec_to_released? - self.vmm_registration_wait?)
    }

    /// The same, less the `irqchip-pit` phase as well.
    fn vmm_share_without_irqchip_pit(&self) -> Option<f64> {
        Some(self.vmm_share()? - self.vmm_irqchip_pit?)
    }
}

/// The VMM's figures from its `-v` log, seconds: exec to vCPUs released, then its
/// `kvm-vm-memory` and `irqchip-pit` phases.
fn vmm_recovery_figures(log: &str) -> (Option<f64>, Option<f64>, Option<f64>) {
    let (from_exec_ms, phases) = parse_recovery_line(log);
    let phase = |wanted: &str| {
        phases
            .iter()
            .find(|(name, _)| name == wanted)
            .map(|(_, ms)| *ms / 1e3)
    };
    (
        from_exec_ms.map(|ms| ms / 1e3),
        phase("kvm-vm-memory"),
        phase("irqchip-pit"),
    )
}

/// The recovering VMM's log once its recovery line is in it (it follows the `resumed` event).
fn recovery_log(vm: &RunningVm) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let log = vm.process.stderr_log();
        if log.contains(RECOVERY_LINE) || std::time::Instant::now() >= deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

const RECOVERY_LINE: &str = "resumed in place from seq";

/// The extra arguments of a recovering VMM: the run's, with `-v` for its recovery line.
fn verbose_arguments(run_arguments: &[String]) -> Vec<String> {
    let mut arguments = run_arguments.to_vec();
    let verbose = |a: &String| a == "-v" || a == "--verbose" || (a.starts_with("-vv"));
    if !arguments.iter().any(verbose) {
        arguments.push("-v".into());
    }
    arguments
}

const MEMSLOT_REPETITIONS: usize = 5;

/// Median seconds to create a KVM VM and register `size` bytes of untouched anonymous RAM with
/// it: the part of any VMM's start that KVM itself makes grow with RAM size.
///
/// Also the median seconds of `KVM_CREATE_IRQCHIP` + `KVM_CREATE_PIT2` right after it, as a VMM
/// creates them: on this host they often wait for a KVM SRCU grace period after a large
/// registration (2-4.5 ms after 64 GiB), never after a small one.
fn memory_registration_seconds(size: u64) -> (f64, f64) {
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        return (f64::NAN, f64::NAN);
    };
    let (registrations, after): (Vec<f64>, Vec<f64>) = (0..MEMSLOT_REPETITIONS)
        .map(|_| {
            let started = std::time::Instant::now();
            let vm = integration_tests::minimal_vm::MinimalVm::new(&kvm, size as usize, |_| {});
            let registered = started.elapsed().as_secs_f64();
            let pit = kvm_bindings::kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            let irqchip_started = std::time::Instant::now();
            let created = vm
                .vm
                .create_irq_chip()
                .and_then(|()| vm.vm.create_pit2(pit));
            let irqchip_pit = match created {
                Ok(()) => irqchip_started.elapsed().as_secs_f64(),
                Err(_) => f64::NAN,
            };
            drop(vm);
            (registered, irqchip_pit)
        })
        .unzip();
    (
        median(&registrations).unwrap_or(f64::NAN),
        median(&after).unwrap_or(f64::NAN),
    )
}

/// Boots a `size` VM on a sparse region, then power-fails and recovers it `cycles` times; the
/// recoveries' (to first line, to resumed) seconds.
fn flat_cycles(bench: &Bench, size: u64, table: &mut CsvTable) -> Result<Vec<FlatRecovery>> {
    let tag = format!("bflat-{size}");
    let region = bench.tmpfs.join(&format!("{tag}.region"));
    let result = (|| {
        let guest = bench.kvstore(FLAT_KEYS, size, PERIOD_MS, None);
        let backing = MemoryBacking::SparseNvRegion {
            region: region.clone(),
            vm: "kv".into(),
        };
        let mut vm = bench.boot_serving(guest, backing, &tag, None)?;
        vm.wait_for_lines("kv ops=", 1, LINE_TIMEOUT)?;
        let mut recoveries = Vec::new();
        let recovery_arguments = verbose_arguments(&bench.vmm_arguments);
        for cycle in 0..bench.profile.flat_cycles {
            let exiting = ExitingVmm::before_exit(vm.process.pid() as u32);
            vm.power_fail(SAVE_TIMEOUT)?;
            drop(vm.kill());
            let teardown = exiting.wait_for_teardown(TEARDOWN_TIMEOUT)?;
            vm = RunningVm::start(
                &bench.binaries.cloud_hypervisor,
                &Launch::NvRecover {
                    region: region.clone(),
                    vm: "kv".into(),
                },
                &bench.disk.join(&format!("{tag}.serial")),
                None,
                &bench.disk.join(&format!("{tag}.recover{cycle}.vmm")),
                &recovery_arguments,
            )?;
            let times = first_line_after_start(&mut vm)?;
            let (vmm_exec_to_released, vmm_registration_wait, vmm_irqchip_pit) =
                vmm_recovery_figures(&recovery_log(&vm));
            let optional = |value: Option<f64>| value.map(seconds).unwrap_or_default();
            table.push(vec![
                size.to_string(),
                cycle.to_string(),
                seconds(teardown.as_secs_f64()),
                seconds(times.first_line),
                optional(times.resumed_event),
                optional(vmm_exec_to_released),
                optional(vmm_registration_wait),
                optional(vmm_irqchip_pit),
            ]);
            recoveries.push(FlatRecovery {
                times,
                vmm_exec_to_released,
                vmm_registration_wait,
                vmm_irqchip_pit,
            });
        }
        drop(vm.kill());
        Ok(recoveries)
    })();
    let _ = std::fs::remove_file(&region);
    result
}

/// The RAM backings compared by first touch and D.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backing {
    /// Upstream's default: private anonymous RAM advised for THP.
    AnonymousThp,
    /// `thp=off`: 4 KiB pages.
    Anonymous4k,
    /// An NV region on `/dev/shm` (no `huge=`): 4 KiB pages.
    NvPlainTmpfs,
    /// An NV region on the tmpfs mounted `huge=always`.
    NvHugeTmpfs,
}

impl Backing {
    fn label(self) -> &'static str {
        match self {
            Backing::AnonymousThp => "anonymous thp=on",
            Backing::Anonymous4k => "anonymous thp=off",
            Backing::NvPlainTmpfs => "nv-region /dev/shm (4 KiB)",
            Backing::NvHugeTmpfs => "nv-region huge tmpfs (2 MiB)",
        }
    }

    fn memory(self, bench: &Bench, huge: Option<&HugeTmpfs>, tag: &str) -> MemoryBacking {
        let region = |path: PathBuf| MemoryBacking::NvRegion {
            region: path,
            vm: "kv".into(),
        };
        let name = format!("{tag}.region");
        match (self, huge) {
            (Backing::AnonymousThp, _) => MemoryBacking::Anonymous,
            (Backing::Anonymous4k, _) => MemoryBacking::AnonymousThpOff,
            (Backing::NvHugeTmpfs, Some(huge)) => region(huge.join(&name)),
            (Backing::NvPlainTmpfs | Backing::NvHugeTmpfs, _) => region(bench.tmpfs.join(&name)),
        }
    }
}

/// The variants measurable on this host: the huge tmpfs only if it was mounted.
fn backings(candidates: &[Backing], huge: Option<&HugeTmpfs>) -> Vec<Backing> {
    candidates
        .iter()
        .copied()
        .filter(|b| *b != Backing::NvHugeTmpfs || huge.is_some())
        .collect()
}

/// Seconds from the command's start to `kvstore: serving` with a table of `table_bytes`
/// (kvstore writes every slot before it serves: each page is touched once).
fn time_to_serving(
    bench: &Bench,
    table_bytes: u64,
    memory: MemoryBacking,
    tag: &str,
) -> Result<f64> {
    let keys = table_bytes / 32;
    let guest = bench.kvstore(
        keys,
        crate::launch::TestGuest::ram_for_keys(keys),
        100,
        None,
    );
    let vm = bench.boot_serving(guest, memory.clone(), tag, None);
    let result = vm.and_then(|vm| {
        let serving = vm
            .serial
            .lines()
            .iter()
            .find(|line| line.text.contains("kvstore: serving"))
            .map(|line| line.at.duration_since(vm.started()).as_secs_f64())
            .ok_or_else(|| BenchError::GuestFailed {
                line: "no serving line".into(),
            });
        drop(vm.kill());
        serving
    });
    if let MemoryBacking::NvRegion { region, .. } = &memory {
        let _ = std::fs::remove_file(region);
    }
    result
}

/// First touch of each table size (256 MiB and 1 GiB in a full run) on huge pages against 4 KiB
/// pages, over the boot with the profile's smallest table.
fn first_touch(bench: &mut Bench, huge: Option<&HugeTmpfs>) -> Result<()> {
    let variants = backings(
        &[
            Backing::AnonymousThp,
            Backing::Anonymous4k,
            Backing::NvHugeTmpfs,
            Backing::NvPlainTmpfs,
        ],
        huge,
    );
    bench.summary.line(format!(
        "THP method: command start to kvstore's `serving` with a table of each size (every page \
         written once; boot without the table is the 2 MiB row), {} repetition(s) interleaved",
        bench.profile.first_touch_repetitions
    ));
    let mut table = CsvTable::new(&["table_bytes", "backing", "repetition", "to_serving_s"]);
    let mut summary = CsvTable::new(&["table", "backing", "runs", "median s to serving"]);
    let mut medians: Vec<(u64, Backing, f64)> = Vec::new();
    let tables = bench.profile.first_touch_tables.clone();
    for &size in &tables {
        let results = each_variant_repeatedly(
            bench,
            &variants,
            bench.profile.first_touch_repetitions,
            StepNames {
                letter: "THP",
                keys: size / 32,
                repetition: "repetition",
                detail: "",
            },
            Backing::label,
            |bench, backing, repetition| {
                let tag = format!("thp-{size}-{repetition}-{backing:?}");
                let memory = backing.memory(bench, huge, &tag);
                let took = time_to_serving(bench, size, memory, &tag)?;
                table.push(vec![
                    size.to_string(),
                    backing.label().into(),
                    repetition.to_string(),
                    seconds(took),
                ]);
                Ok(took)
            },
        );
        for (backing, times) in results {
            if let Some(value) = median(&times) {
                summary.push(vec![
                    size_label(size),
                    backing.label().into(),
                    times.len().to_string(),
                    format!("{value:.3}"),
                ]);
                medians.push((size, backing, value));
            }
        }
    }
    table.write(&bench.out_dir, "thp_first_touch.csv")?;
    bench
        .summary
        .table("THP. first touch: command start to serving", &summary);
    let find = |size: u64, backing: Backing| {
        medians
            .iter()
            .find(|(s, b, _)| *s == size && *b == backing)
            .map(|(_, _, v)| *v)
    };
    let Some((&boot, larger)) = tables.split_first() else {
        return Ok(());
    };
    for &size in larger {
        for (small, large) in [
            (Backing::Anonymous4k, Backing::AnonymousThp),
            (Backing::NvPlainTmpfs, Backing::NvHugeTmpfs),
        ] {
            let (Some(base_small), Some(base_large)) = (find(boot, small), find(boot, large))
            else {
                continue;
            };
            let (Some(small_time), Some(large_time)) = (find(size, small), find(size, large))
            else {
                continue;
            };
            let (touch_small, touch_large) = (small_time - base_small, large_time - base_large);
            bench.summary.line(format!(
                "THP RATIO first touch of {} {} / {} = {:.1}x ({:.3} s vs {:.3} s over the boot \
                 without the table)",
                size_label(size),
                small.label(),
                large.label(),
                touch_small / touch_large,
                touch_small,
                touch_large
            ));
        }
    }
    Ok(())
}

/// D with enough repetitions to tell 2% apart on a loaded host: each repetition runs the
/// variant and the baseline (anonymous, `thp=on`) side by side over the same window, so that
/// load from the rest of the machine hits both alike, and takes the ratio of the pair. A pair of
/// two baselines shows what the method itself cannot tell apart.
fn full_speed(bench: &mut Bench, huge: Option<&HugeTmpfs>) -> Result<()> {
    let variants = backings(
        &[
            Backing::AnonymousThp,
            Backing::NvPlainTmpfs,
            Backing::NvHugeTmpfs,
            Backing::Anonymous4k,
        ],
        huge,
    );
    let keys = bench.profile.full_speed_keys;
    let repetitions = bench.profile.full_speed_repetitions;
    bench.summary.line(format!(
        "D-pairs method: kvstore {} keys; {repetitions} repetitions per backing, each running it \
         side by side with anonymous thp=on (boot order alternating, both VMMs pinned to one CPU) \
         over the same {:.1} s window after {:.1} s of warm-up; the ratio is taken per pair, then \
         its median and range",
        keys_label(keys),
        bench.profile.overhead_window.as_secs_f64(),
        bench.profile.overhead_warmup.as_secs_f64()
    ));
    let mut table = CsvTable::new(&[
        "keys",
        "backing",
        "repetition",
        "ops_per_s",
        "baseline_ops_per_s",
        "ratio",
    ]);
    let results = each_variant_repeatedly(
        bench,
        &variants,
        repetitions,
        StepNames {
            letter: "D-pairs",
            keys,
            repetition: "pair",
            detail: " (with anonymous thp=on)",
        },
        Backing::label,
        |bench, backing, repetition| {
            let tag = format!("dpair-{repetition}-{backing:?}");
            let pair = [
                (backing.memory(bench, huge, &tag), tag.clone()),
                (MemoryBacking::Anonymous, format!("{tag}-base")),
            ];
            // Alternate which one boots first (and so warms up a little longer).
            let order: Vec<_> = if repetition % 2 == 0 {
                pair.to_vec()
            } else {
                pair.iter().rev().cloned().collect()
            };
            let rates = throughputs_in_one_window(bench, keys, &order)?;
            let (rate, base) = if repetition % 2 == 0 {
                (rates[0].0, rates[1].0)
            } else {
                (rates[1].0, rates[0].0)
            };
            table.push(vec![
                keys.to_string(),
                backing.label().into(),
                repetition.to_string(),
                format!("{rate:.0}"),
                format!("{base:.0}"),
                format!("{:.4}", rate / base),
            ]);
            Ok(rate / base)
        },
    );
    table.write(&bench.out_dir, "d_pairs.csv")?;
    let mut summary = CsvTable::new(&[
        "backing",
        "pairs",
        "median ratio to anonymous thp=on",
        "min",
        "max",
    ]);
    for (backing, ratios) in &results {
        let Some(value) = median(ratios) else {
            continue;
        };
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(0.0, f64::max);
        let what = if *backing == Backing::AnonymousThp {
            "(the method's own noise: baseline against baseline)"
        } else {
            ""
        };
        summary.push(vec![
            backing.label().into(),
            ratios.len().to_string(),
            format!("{value:.3}x"),
            format!("{min:.3}x"),
            format!("{max:.3}x"),
        ]);
        bench.summary.line(format!(
            "D RATIO {} / anonymous thp=on side by side = {value:.3}x (median of {} pairs, range \
             {min:.3}x-{max:.3}x) {what}",
            backing.label(),
            ratios.len()
        ));
    }
    bench.summary.table(
        "D-pairs. kvstore throughput side by side with anonymous thp=on",
        &summary,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_share_is_exec_to_released_less_the_registration_wait() {
        let log = "cloud-hypervisor: ... VM \"kv\": resumed in place from seq 2 in 17443 us \
                   (19868 us from exec): process-start 4712 us, region-open-claim 166 us, \
                   kvm-vm-memory 12773 us, irqchip-pit 2437 us, resume 18 us\n";
        let (exec_to_released, wait, irqchip_pit) = vmm_recovery_figures(log);
        assert_eq!(exec_to_released, Some(19.868e-3));
        assert_eq!(wait, Some(12.773e-3));
        assert_eq!(irqchip_pit, Some(2.437e-3));
        let recovery = FlatRecovery {
            times: Recovery {
                first_line: 0.03,
                resumed_event: Some(0.02),
            },
            vmm_exec_to_released: exec_to_released,
            vmm_registration_wait: wait,
            vmm_irqchip_pit: irqchip_pit,
        };
        let share = recovery.vmm_share().unwrap();
        assert!((share - 7.095e-3).abs() < 1e-9, "{share}");
        let without = recovery.vmm_share_without_irqchip_pit().unwrap();
        assert!((without - 4.658e-3).abs() < 1e-9, "{without}");
        // A VMM without the line (not verbose, or a build without phases) has no share.
        assert_eq!(vmm_recovery_figures("no such line"), (None, None, None));
    }

    #[test]
    fn recoveries_are_verbose_once() {
        assert_eq!(verbose_arguments(&[]), ["-v"]);
        let seccomp = ["--seccomp".to_string(), "false".to_string()];
        assert_eq!(verbose_arguments(&seccomp), ["--seccomp", "false", "-v"]);
        assert_eq!(verbose_arguments(&["-vv".to_string()]), ["-vv"]);
        assert_eq!(verbose_arguments(&["-v".to_string()]), ["-v"]);
    }
}
