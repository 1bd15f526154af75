//! A. Power-fail save time by phase, and B. recovery to running (command start to the guest's
//! first new serial line), at the RAM sizes of issue 6, with the guest's RAM touched.
//!
//! The guest is kvstore with its table filling the RAM (it writes every page before it
//! serves), no log disk. A: SIGPWR to the VMM; the VMM's own per-phase record of the commit
//! is read from its output, and the host also times signal to exit. B: NV `recover=on` in
//! place vs upstream-style copy `vm.snapshot` + `--restore` (and OnDemand where offered).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use crate::launch::{Launch, MemoryBacking};
use crate::measure::snapshot::{pause_and_snapshot, wait_for_socket};
use crate::measure::{Bench, LINE_TIMEOUT};
use crate::output::{seconds, CsvTable};
use crate::plot::{self, LineChart, Series};
use crate::profile::size_label;
use crate::running_vm::RunningVm;
use crate::save_log::{parse_last_save, SaveTimings};
use crate::stats::median;
use crate::throughput::parse_ops;

const SAVE_TIMEOUT: Duration = Duration::from_secs(300);
/// Progress lines every 10 ms: "first new serial line" then waits at most 10 ms for the
/// guest's pace, not 100 ms (the guest resumes mid-period with its clock continued).
const PERIOD_MS: u32 = 10;
/// Room left for the image, stack and buffers next to the table.
const NON_TABLE_BYTES: u64 = 64 << 20;
/// Guest RAM below the 32-bit device hole: the only contiguous RAM the table can use.
const RAM_BELOW_HOLE: u64 = 0xC000_0000;

/// The bytes of RAM the guest touches in a VM of `ram` bytes: kvstore's table is a power of
/// two (16-byte slots, load factor 1/2) in contiguous RAM, i.e. below the device hole, with
/// room for the image. 256 MiB -> 128 MiB, 1 GiB -> 512 MiB, 4 GiB -> 2 GiB.
pub fn touched_table_bytes(ram: u64) -> u64 {
    let usable = ram.min(RAM_BELOW_HOLE).saturating_sub(NON_TABLE_BYTES);
    if usable == 0 {
        return 0;
    }
    1u64 << (63 - usable.leading_zeros())
}

/// The key count whose table is exactly `table_bytes`.
fn keys_for_table(table_bytes: u64) -> u64 {
    (table_bytes / 32).max(1)
}
const PHASES: [&str; 5] = [
    "pause-vcpus",
    "quiesce-devices",
    "persist-memory",
    "save-state",
    "commit",
];

/// Where an NV region lives.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RegionKind {
    /// tmpfs: memory that outlives the process, like an NVDIMM.
    Tmpfs,
    /// A file on disk: the save's msync writes the dirty pages.
    DiskFile,
}

impl RegionKind {
    fn label(self) -> &'static str {
        match self {
            RegionKind::Tmpfs => "tmpfs",
            RegionKind::DiskFile => "disk-file",
        }
    }
}

/// What the sizes loop collects for the summary and the plots.
#[derive(Default)]
struct Collected {
    /// (size, kind, saves): VMM-reported totals in ms, in cycle order.
    saves: Vec<(u64, RegionKind, Vec<f64>)>,
    /// (size, method label, recoveries).
    recoveries: Vec<(u64, String, Vec<Recovery>)>,
}

pub fn run(bench: &mut Bench) -> Result<()> {
    bench.summary.line("");
    bench.summary.line(
        "== A. power-fail save time by phase / B. recovery to running (first new serial line)",
    );
    let touched: Vec<String> = bench
        .profile
        .ram_sizes
        .iter()
        .map(|&ram| {
            format!(
                "{} RAM -> {} touched",
                size_label(ram),
                size_label(touched_table_bytes(ram))
            )
        })
        .collect();
    bench.summary.line(format!(
        "A/B guest: kvstore, no log disk, a progress line every {PERIOD_MS} ms; it writes its whole \
         table before serving. The table is a power of two in contiguous RAM below the 3 GiB \
         device hole, so: {}",
        touched.join(", ")
    ));
    let mut save_table = CsvTable::new(&[
        "ram_bytes",
        "touched_bytes",
        "region",
        "cycle",
        "dirty",
        "host_signal_to_exit_s",
        "vmm_total_us",
        "pause-vcpus_us",
        "quiesce-devices_us",
        "persist-memory_us",
        "save-state_us",
        "commit_us",
        "deadline_overrun",
    ]);
    let mut recovery_table = CsvTable::new(&[
        "ram_bytes",
        "method",
        "cycle",
        "to_first_new_serial_line_s",
        "to_resumed_event_s",
    ]);
    let mut collected = Collected::default();
    let mut save_summary = CsvTable::new(&[
        "RAM",
        "touched",
        "region",
        "saves",
        "median ms",
        "first save ms (all RAM dirty)",
        "pause-vcpus us",
        "quiesce-devices us",
        "persist-memory us",
        "save-state us",
        "commit us",
    ]);
    let mut recovery_summary = CsvTable::new(&[
        "RAM",
        "method",
        "runs",
        "to first new serial line, median ms",
        "to resumed event, median ms",
    ]);
    for &size in &bench.profile.ram_sizes.clone() {
        for kind in [RegionKind::Tmpfs, RegionKind::DiskFile] {
            bench.summary.progress(format!(
                "A/B {} on a {} region: boot, then {} power failures and recoveries",
                size_label(size),
                kind.label(),
                bench.profile.power_fail_cycles
            ));
            let outcome = nv_cycles(bench, size, kind, &mut save_table, &mut recovery_table);
            match outcome {
                Ok((saves, recoveries)) => {
                    report_saves(bench, size, kind, &saves, &mut save_summary);
                    collected.saves.push((
                        size,
                        kind,
                        saves.iter().map(|s| s.total_us as f64 / 1e3).collect(),
                    ));
                    collected.recoveries.push((
                        size,
                        format!("NV in place ({})", kind.label()),
                        recoveries,
                    ));
                }
                Err(error) => bench.summary.not_measured(
                    &format!(
                        "A/B NV power-fail at {} ({} region)",
                        size_label(size),
                        kind.label()
                    ),
                    &error.to_string(),
                ),
            }
        }
        bench.summary.progress(format!(
            "B {}: copy snapshot/restore baseline",
            size_label(size)
        ));
        match copy_cycles(bench, size, &mut recovery_table) {
            Ok(baseline) => {
                bench.summary.line(format!(
                    "B {} copy snapshot (pause + vm.snapshot): median {:.1} ms over {}",
                    size_label(size),
                    median(&baseline.snapshots).unwrap_or(f64::NAN) * 1e3,
                    baseline.snapshots.len()
                ));
                match baseline.restores {
                    Ok(restores) => {
                        collected
                            .recoveries
                            .push((size, "copy restore".into(), restores))
                    }
                    Err(why) => bench
                        .summary
                        .not_measured(&format!("B copy restore at {}", size_label(size)), &why),
                }
                match baseline.on_demand {
                    Ok(seconds) => {
                        collected
                            .recoveries
                            .push((size, "OnDemand restore".into(), vec![seconds]))
                    }
                    Err(why) => bench
                        .summary
                        .not_measured(&format!("B OnDemand restore at {}", size_label(size)), &why),
                }
            }
            Err(error) => bench.summary.not_measured(
                &format!("B copy snapshot/restore at {}", size_label(size)),
                &error.to_string(),
            ),
        }
        report_recoveries(bench, size, &collected, &mut recovery_summary);
    }
    report_flatness(bench, &collected);
    save_table.write(&bench.out_dir, "a_save.csv")?;
    bench
        .summary
        .table("A. power-fail save time (VMM-reported)", &save_summary);
    bench.summary.table(
        "B. recovery to running (from the command's start)",
        &recovery_summary,
    );
    recovery_table.write(&bench.out_dir, "b_recovery.csv")?;
    plot_results(bench, &collected)
}

/// Boots on an NV region, then `cycles` times: SIGPWR, save, recover in place.
fn nv_cycles(
    bench: &Bench,
    size: u64,
    kind: RegionKind,
    save_table: &mut CsvTable,
    recovery_table: &mut CsvTable,
) -> Result<(Vec<SaveTimings>, Vec<Recovery>)> {
    let tag = format!("ab-{size}-{kind:?}");
    let dir = match kind {
        RegionKind::Tmpfs => &bench.tmpfs,
        RegionKind::DiskFile => &bench.disk,
    };
    let region = dir.join(&format!("{tag}.region"));
    let result = (|| {
        let keys = keys_for_table(touched_table_bytes(size));
        let guest = bench.kvstore(keys, size, PERIOD_MS, None);
        let backing = MemoryBacking::NvRegion {
            region: region.clone(),
            vm: "kv".into(),
        };
        let mut vm = bench.boot_serving(guest, backing, &tag, None)?;
        vm.wait_for_lines("kv ops=", 1, LINE_TIMEOUT)?;
        let mut saves = Vec::new();
        let mut recoveries = Vec::new();
        for cycle in 0..bench.profile.power_fail_cycles {
            let signalled = Instant::now();
            vm.power_fail(SAVE_TIMEOUT)?;
            let host_save = signalled.elapsed();
            let output = std::fs::read_to_string(vm.process.stderr_path()).unwrap_or_default();
            let timings = parse_last_save(&output).ok_or_else(|| BenchError::NoPhaseTimings {
                log: vm.process.stderr_path().to_path_buf(),
            })?;
            let phase = |name: &str| {
                timings
                    .phases
                    .iter()
                    .find(|(phase, _)| phase == name)
                    .map(|(_, us)| us.to_string())
                    .unwrap_or_default()
            };
            let mut row = vec![
                size.to_string(),
                touched_table_bytes(size).to_string(),
                kind.label().into(),
                cycle.to_string(),
                if cycle == 0 {
                    "all RAM (after boot)"
                } else {
                    "since recovery"
                }
                .into(),
                seconds(host_save.as_secs_f64()),
                timings.total_us.to_string(),
            ];
            row.extend(PHASES.iter().map(|name| phase(name)));
            row.push(timings.deadline_overrun.to_string());
            save_table.push(row);
            saves.push(timings);
            drop(vm.kill());

            let serial = bench.disk.join(&format!("{tag}.serial"));
            vm = RunningVm::start(
                &bench.binaries.cloud_hypervisor,
                &Launch::NvRecover {
                    region: region.clone(),
                    vm: "kv".into(),
                },
                &serial,
                None,
                &bench.disk.join(&format!("{tag}.recover{cycle}.vmm")),
                &bench.vmm_arguments,
            )?;
            let recovery = first_line_after_start(&mut vm)?;
            recovery_table.push(recovery.row(
                size,
                &format!("NV in place ({})", kind.label()),
                cycle,
            ));
            recoveries.push(recovery);
        }
        drop(vm.kill());
        Ok((saves, recoveries))
    })();
    let _ = std::fs::remove_file(&region);
    result
}

/// Seconds from the VMM command's start to the guest's first new progress line, and to the
/// VMM's `resumed` event if it sent one. The guest may have been stopped in the middle of a
/// line; the rest of that line comes first and is not a new line. Fails if the guest booted
/// again (its boot messages start with `kvstore:`) instead of continuing.
/// How long after the guest's first new line the VMM's `resumed` event may still be on its way
/// to the host's stamp (written by the VMM's event-monitor thread, read by a follower thread).
const RESUMED_EVENT_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) fn first_line_after_start(vm: &mut RunningVm) -> Result<Recovery> {
    let lines = vm.wait_for(
        "the first new progress line after recovery",
        LINE_TIMEOUT * 4,
        |lines| lines.iter().any(|line| parse_ops(&line.text).is_some()),
    )?;
    if let Some(boot) = lines.iter().find(|line| line.text.starts_with("kvstore:")) {
        return Err(BenchError::GuestFailed {
            line: format!(
                "the guest booted again instead of continuing: {:?}",
                boot.text
            ),
        });
    }
    let first = lines
        .iter()
        .find(|line| parse_ops(&line.text).is_some())
        .map(|line| line.at)
        .unwrap_or_else(Instant::now);
    let since_start = |at: Instant| at.duration_since(vm.started()).as_secs_f64();
    Ok(Recovery {
        first_line: since_start(first),
        resumed_event: vm
            .wait_for_resumed_event(RESUMED_EVENT_TIMEOUT)
            .map(since_start),
    })
}

/// One recovery's times from the command start, in seconds.
#[derive(Clone, Copy)]
pub(super) struct Recovery {
    /// To the guest's first new serial line (what issue 6 asks for); includes up to one of the
    /// guest's ~100 ms print periods.
    pub(super) first_line: f64,
    /// To the VMM's `resumed` event: the VM is running again.
    pub(super) resumed_event: Option<f64>,
}

impl Recovery {
    fn row(&self, size: u64, method: &str, cycle: usize) -> Vec<String> {
        vec![
            size.to_string(),
            method.to_string(),
            cycle.to_string(),
            seconds(self.first_line),
            self.resumed_event.map(seconds).unwrap_or_default(),
        ]
    }
}

struct CopyBaseline {
    snapshots: Vec<f64>,
    restores: std::result::Result<Vec<Recovery>, String>,
    on_demand: std::result::Result<Recovery, String>,
}

/// Anonymous RAM, then `cycles` times: pause + snapshot, kill, `--restore`; then one
/// OnDemand restore of the last snapshot.
fn copy_cycles(bench: &Bench, size: u64, recovery_table: &mut CsvTable) -> Result<CopyBaseline> {
    let tag = format!("ab-{size}-copy");
    let snapshot_dir = bench.disk.join(&format!("{tag}.snapshot"));
    let socket = bench.tmpfs.join(&format!("{tag}.sock"));
    let result = (|| {
        let keys = keys_for_table(touched_table_bytes(size));
        let guest = bench.kvstore(keys, size, PERIOD_MS, None);
        let mut booted =
            bench.boot_serving(guest, MemoryBacking::Anonymous, &tag, Some(socket.clone()))?;
        booted.wait_for_lines("kv ops=", 1, LINE_TIMEOUT)?;
        let mut running = Some(booted);
        let mut snapshots = Vec::new();
        let mut restores = Vec::new();
        let mut copy_failure = None;
        for cycle in 0..bench.profile.copy_restore_cycles {
            let Some(vm) = running.take() else { break };
            wait_for_socket(&socket, Duration::from_secs(10))?;
            let took = pause_and_snapshot(&bench.binaries.ch_remote, &socket, &snapshot_dir)?;
            snapshots.push(took.as_secs_f64());
            drop(vm.kill());
            let _ = std::fs::remove_file(&socket);
            // A failed copy restore still leaves a good snapshot for the OnDemand one.
            let restored = restore(bench, &tag, &snapshot_dir, Some(&socket), false, cycle)
                .and_then(|mut restored| {
                    let recovery = first_line_after_start(&mut restored)?;
                    Ok((restored, recovery))
                });
            match restored {
                Ok((restored, recovery)) => {
                    recovery_table.push(recovery.row(size, "copy restore", cycle));
                    restores.push(recovery);
                    running = Some(restored);
                }
                Err(error) => {
                    copy_failure = Some(error.to_string());
                    break;
                }
            }
        }
        if let Some(vm) = running {
            drop(vm.kill());
        }
        let on_demand = restore(bench, &tag, &snapshot_dir, None, true, 0)
            .and_then(|mut vm| {
                let took = first_line_after_start(&mut vm);
                drop(vm.kill());
                took
            })
            .map_err(|e| e.to_string());
        if let Ok(recovery) = &on_demand {
            recovery_table.push(recovery.row(size, "OnDemand restore", 0));
        }
        Ok(CopyBaseline {
            snapshots,
            restores: match copy_failure {
                Some(why) => Err(why),
                None => Ok(restores),
            },
            on_demand,
        })
    })();
    let _ = std::fs::remove_dir_all(&snapshot_dir);
    let _ = std::fs::remove_file(&socket);
    result
}

fn restore(
    bench: &Bench,
    tag: &str,
    snapshot_dir: &Path,
    socket: Option<&Path>,
    on_demand: bool,
    cycle: usize,
) -> Result<RunningVm> {
    // The restored VM writes to the serial file named in the snapshot's config.
    let serial: PathBuf = bench.disk.join(&format!("{tag}.serial"));
    RunningVm::start(
        &bench.binaries.cloud_hypervisor,
        &Launch::Restore {
            snapshot_dir: snapshot_dir.to_path_buf(),
            on_demand,
        },
        &serial,
        socket,
        &bench
            .disk
            .join(&format!("{tag}.restore{cycle}-{on_demand}.vmm")),
        &bench.vmm_arguments,
    )
}

fn report_saves(
    bench: &mut Bench,
    size: u64,
    kind: RegionKind,
    saves: &[SaveTimings],
    summary_table: &mut CsvTable,
) {
    let totals: Vec<f64> = saves.iter().map(|s| s.total_us as f64 / 1e3).collect();
    let phase_values: Vec<f64> = PHASES
        .iter()
        .map(|name| {
            let values: Vec<f64> = saves
                .iter()
                .filter_map(|s| {
                    s.phases
                        .iter()
                        .find(|(p, _)| p == name)
                        .map(|(_, us)| *us as f64)
                })
                .collect();
            median(&values).unwrap_or(f64::NAN)
        })
        .collect();
    let phase_medians: Vec<String> = PHASES
        .iter()
        .zip(&phase_values)
        .map(|(name, value)| format!("{name} {value:.0} us"))
        .collect();
    let mut row = vec![
        size_label(size),
        size_label(touched_table_bytes(size)),
        kind.label().into(),
        totals.len().to_string(),
        format!("{:.3}", median(&totals).unwrap_or(f64::NAN)),
        format!("{:.3}", totals.first().copied().unwrap_or(f64::NAN)),
    ];
    row.extend(phase_values.iter().map(|value| format!("{value:.0}")));
    summary_table.push(row);
    bench.summary.line(format!(
        "A {} {} region: save median {:.3} ms over {} saves (first, all RAM dirty: {:.3} ms); phase medians: {}",
        size_label(size),
        kind.label(),
        median(&totals).unwrap_or(f64::NAN),
        totals.len(),
        totals.first().copied().unwrap_or(f64::NAN),
        phase_medians.join(", ")
    ));
}

/// Median seconds to the first new serial line.
fn first_line_median(recoveries: &[Recovery]) -> Option<f64> {
    median(&recoveries.iter().map(|r| r.first_line).collect::<Vec<_>>())
}

/// Median seconds to the `resumed` event (recoveries without the event are left out).
fn resumed_median(recoveries: &[Recovery]) -> Option<f64> {
    median(
        &recoveries
            .iter()
            .filter_map(|r| r.resumed_event)
            .collect::<Vec<_>>(),
    )
}

fn recoveries_of<'a>(collected: &'a Collected, size: u64, label: &str) -> Option<&'a [Recovery]> {
    collected
        .recoveries
        .iter()
        .find(|(s, l, _)| *s == size && l == label)
        .map(|(_, _, values)| values.as_slice())
}

fn report_recoveries(
    bench: &mut Bench,
    size: u64,
    collected: &Collected,
    summary_table: &mut CsvTable,
) {
    let milliseconds = |value: Option<f64>| {
        value
            .map(|seconds| format!("{:.1} ms", seconds * 1e3))
            .unwrap_or_else(|| "-".into())
    };
    for (s, label, values) in &collected.recoveries {
        if *s == size {
            summary_table.push(vec![
                size_label(size),
                label.clone(),
                values.len().to_string(),
                first_line_median(values)
                    .map(|v| format!("{:.1}", v * 1e3))
                    .unwrap_or_default(),
                resumed_median(values)
                    .map(|v| format!("{:.1}", v * 1e3))
                    .unwrap_or_default(),
            ]);
            bench.summary.line(format!(
                "B {} {label}: command start to first new serial line, median {} over {} \
                 (to the VMM's resumed event: {})",
                size_label(size),
                milliseconds(first_line_median(values)),
                values.len(),
                milliseconds(resumed_median(values))
            ));
        }
    }
    let nv = recoveries_of(collected, size, "NV in place (tmpfs)");
    let copy = recoveries_of(collected, size, "copy restore");
    if let (Some(nv), Some(copy)) = (nv, copy) {
        if let (Some(nv_line), Some(copy_line)) = (first_line_median(nv), first_line_median(copy)) {
            bench.summary.line(format!(
                "B {} RATIO copy restore / NV in place (tmpfs) = {:.1}x (to first new serial line)",
                size_label(size),
                copy_line / nv_line
            ));
        }
        if let (Some(nv_event), Some(copy_event)) = (resumed_median(nv), resumed_median(copy)) {
            bench.summary.line(format!(
                "B {} RATIO copy restore / NV in place (tmpfs) = {:.1}x (to the resumed event)",
                size_label(size),
                copy_event / nv_event
            ));
        }
    }
}

fn report_flatness(bench: &mut Bench, collected: &Collected) {
    let sizes = &bench.profile.ram_sizes;
    let (Some(&smallest), Some(&largest)) = (sizes.first(), sizes.last()) else {
        return;
    };
    if smallest == largest {
        return;
    }
    let save_median = |size: u64| {
        collected
            .saves
            .iter()
            .find(|(s, k, _)| *s == size && *k == RegionKind::Tmpfs)
            .and_then(|(_, _, v)| median(v))
    };
    // Largest over smallest RAM: how far from flat (1.0x) a median grows with the VM.
    let mut flat_ratio = |what: &str, median: &dyn Fn(u64) -> Option<f64>| {
        if let (Some(small), Some(large)) = (median(smallest), median(largest)) {
            bench.summary.line(format!(
                "{what} {} / {} = {:.2}x (flat = 1.0x)",
                size_label(largest),
                size_label(smallest),
                large / small
            ));
        }
    };
    flat_ratio("A RATIO tmpfs save median", &save_median);
    let recovery_median = |size: u64| {
        recoveries_of(collected, size, "NV in place (tmpfs)").and_then(first_line_median)
    };
    flat_ratio("B RATIO NV in-place recovery median", &recovery_median);
}

fn plot_results(bench: &Bench, collected: &Collected) -> Result<()> {
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    let mut save_series = Vec::new();
    for kind in [RegionKind::Tmpfs, RegionKind::DiskFile] {
        let points: Vec<(f64, f64)> = collected
            .saves
            .iter()
            .filter(|(_, k, _)| *k == kind)
            .filter_map(|(size, _, v)| Some((gib(*size), median(v)?)))
            .collect();
        if !points.is_empty() {
            save_series.push(Series {
                name: format!("{} region", kind.label()),
                points,
            });
        }
    }
    milliseconds_by_ram_chart(
        &bench.out_dir.join("a_save.png"),
        "A. power-fail save time (median, VMM-reported)",
        &save_series,
    )?;
    let mut labels: Vec<&str> = Vec::new();
    for (_, label, _) in &collected.recoveries {
        if !labels.contains(&label.as_str()) {
            labels.push(label);
        }
    }
    let recovery_series: Vec<Series> = labels
        .iter()
        .map(|label| Series {
            name: label.to_string(),
            points: collected
                .recoveries
                .iter()
                .filter(|(_, l, _)| l == label)
                .filter_map(|(size, _, v)| Some((gib(*size), first_line_median(v)? * 1e3)))
                .collect(),
        })
        .collect();
    milliseconds_by_ram_chart(
        &bench.out_dir.join("b_recovery.png"),
        "B. recovery to running: command start to first new serial line (median)",
        &recovery_series,
    )?;
    Ok(())
}

/// A chart of milliseconds (log scale) by guest RAM in GiB, one line a series; nothing to draw
/// (no series) writes no file.
fn milliseconds_by_ram_chart(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    if series.is_empty() {
        return Ok(());
    }
    plot::line_chart(
        path,
        &LineChart {
            title,
            x_label: "guest RAM (GiB)",
            y_label: "milliseconds (log)",
            log_y: true,
            markers: true,
            max_gap: None,
            break_at: None,
        },
        series,
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_the_largest_power_of_two_that_fits_below_the_hole() {
        const MIB: u64 = 1 << 20;
        assert_eq!(touched_table_bytes(128 * MIB), 64 * MIB);
        assert_eq!(touched_table_bytes(256 * MIB), 128 * MIB);
        assert_eq!(touched_table_bytes(1024 * MIB), 512 * MIB);
        assert_eq!(touched_table_bytes(4096 * MIB), 2048 * MIB);
        assert_eq!(touched_table_bytes(32 * MIB), 0);
        // keys=N needs 16 * next_pow2(2N) bytes: exactly the table.
        let keys = keys_for_table(512 * MIB);
        assert_eq!(16 * (2 * keys).next_power_of_two(), 512 * MIB);
    }
}
