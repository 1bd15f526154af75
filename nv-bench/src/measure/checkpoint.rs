//! Checkpoints: kvstore throughput with continuous NV checkpoints every 1, 10 and 100 ms
//! against none, in one run, each VM on an NV region on tmpfs; from the VMM's own
//! `vm.nv-status` the median and p99 pause per checkpoint and the undo-log bytes and write
//! faults per epoch. `NV_CHECKPOINT_BLOCK_PAGES` in the environment reaches the VMMs (pages
//! logged per write fault; see docs/checkpoints.md).

use std::time::Instant;

use crate::environment::create_sparse_file;
use crate::error::{BenchError, Result};
use crate::launch::{MemoryBacking, TestGuest};
use crate::measure::snapshot::wait_for_socket;
use crate::measure::{Bench, LINE_TIMEOUT};
use crate::output::CsvTable;
use crate::profile::keys_label;
use crate::throughput::{mean_rate, ops_samples, samples_since};
use crate::vmm_process::run_command;

/// The guest's own pace, as in D.
const PERIOD_MS: u32 = 100;
const LOG_DISK_BYTES: u64 = 8 << 30;
/// A logged page's 4 KiB copy and its 64-byte entry header (docs/checkpoints.md).
const UNDO_BYTES_PER_PAGE: u64 = 4096 + 64;

/// What one VM showed.
struct Measured {
    ops_per_sec: f64,
    epochs: u64,
    /// Of `epochs`, those ended early by a full undo log (or output hold).
    early_epochs: u64,
    pause_median_us: u64,
    pause_p99_us: u64,
    undo_bytes_mean: u64,
    write_faults_mean: u64,
    /// `vm.nv-status`'s median per phase of the pause, in the walk's order.
    phases: Vec<(String, u64)>,
}

pub fn run(bench: &mut Bench) -> Result<()> {
    bench.summary.line("");
    bench.summary.line(
        "== Checkpoints: kvstore throughput with checkpoint_ms = 1, 10, 100 vs off, pause and undo log",
    );
    bench.summary.line(format!(
        "checkpoint method: one VM per interval, one after the other in this run; {:.1} s warm-up \
         after serving, then the mean over {:.1} s of host-stamped lines; pause (median, p99) and \
         undo bytes per epoch from vm.nv-status over the last 1024 checkpoints",
        bench.profile.overhead_warmup.as_secs_f64(),
        bench.profile.overhead_window.as_secs_f64()
    ));
    let mut table = CsvTable::new(&[
        "keys",
        "checkpoint_ms",
        "ops_per_s",
        "ratio vs off",
        "epochs",
        "early epochs",
        "pause median us",
        "pause p99 us",
        "undo bytes per epoch",
        "write faults per epoch",
        "phase medians us",
    ]);
    // Undo pages per epoch at 10 ms (the last keys' run): the tracking floor's page count.
    let mut pages_at_10ms = None;
    for &keys in &bench.profile.checkpoint_keys.clone() {
        let mut baseline = None;
        for interval in bench.profile.checkpoint_intervals_ms.clone() {
            let measured = measure_one(bench, keys, interval)?;
            if interval == 0 {
                baseline = Some(measured.ops_per_sec);
            }
            if interval == 10 {
                pages_at_10ms = Some(measured.undo_bytes_mean / UNDO_BYTES_PER_PAGE);
            }
            let ratio = baseline.map(|base| measured.ops_per_sec / base);
            let name = if interval == 0 {
                "off".to_string()
            } else {
                format!("{interval} ms")
            };
            bench.summary.line(format!(
                "checkpoint keys={} {name}: {:.2} Mops/s{}{}",
                keys_label(keys),
                measured.ops_per_sec / 1e6,
                ratio
                    .filter(|_| interval > 0)
                    .map(|r| format!(", ratio vs off = {r:.3}x"))
                    .unwrap_or_default(),
                if interval > 0 {
                    format!(
                        "; {} epochs ({} early: log full), pause median {} us, p99 {} us, \
                         undo log {} bytes and {} write faults per epoch; phase medians (us): {}",
                        measured.epochs,
                        measured.early_epochs,
                        measured.pause_median_us,
                        measured.pause_p99_us,
                        measured.undo_bytes_mean,
                        measured.write_faults_mean,
                        phase_line(&measured.phases)
                    )
                } else {
                    String::new()
                }
            ));
            table.push(vec![
                keys_label(keys),
                name,
                format!("{:.0}", measured.ops_per_sec),
                ratio.map(|r| format!("{r:.3}x")).unwrap_or_default(),
                measured.epochs.to_string(),
                measured.early_epochs.to_string(),
                measured.pause_median_us.to_string(),
                measured.pause_p99_us.to_string(),
                measured.undo_bytes_mean.to_string(),
                measured.write_faults_mean.to_string(),
                phase_line(&measured.phases),
            ]);
        }
    }
    table.write(&bench.out_dir, "checkpoint.csv")?;
    bench.summary.table(
        "Checkpoints: kvstore throughput and cost by interval",
        &table,
    );
    if !bench.profile.checkpoint_tracking_floor {
        return Ok(());
    }
    tracking_floor(bench, pages_at_10ms)
}

/// The floor of write tracking on this host for the pages kvstore logged per 10 ms epoch in
/// this run: `nv-track`'s sweep and bounds (a minimal ring-3 guest; see its doc).
fn tracking_floor(bench: &mut Bench, pages: Option<u64>) -> Result<()> {
    let pages = pages.filter(|&p| p > 0).unwrap_or(1100);
    let output = std::process::Command::new(&bench.binaries.nv_track)
        .args([pages.to_string(), "20".to_string()])
        .output()
        .map_err(|e| BenchError::io("running nv-track", e))?;
    if !output.status.success() {
        return Err(BenchError::Command {
            command: "nv-track".into(),
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    bench.summary.line(format!(
        "checkpoint tracking floor (nv-track, {pages} pages per epoch as kvstore logged at 10 ms):"
    ));
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        bench.summary.line(format!("  {line}"));
    }
    Ok(())
}

/// `pause-vcpus 12 quiesce-devices 3 ...`: the phases' medians, in the walk's order.
fn phase_line(phases: &[(String, u64)]) -> String {
    phases
        .iter()
        .map(|(phase, us)| format!("{phase} {us}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn measure_one(bench: &Bench, keys: u64, interval_ms: u64) -> Result<Measured> {
    let tag = format!("ckpt-{keys}-{interval_ms}");
    let region = bench.tmpfs.join(&format!("{tag}.region"));
    let log_disk = bench.tmpfs.join(&format!("{tag}.log"));
    let socket = bench.tmpfs.join(&format!("{tag}.sock"));
    create_sparse_file(&log_disk, LOG_DISK_BYTES)?;
    let ram = TestGuest::ram_for_keys(keys);
    let guest = bench.kvstore(keys, ram, PERIOD_MS, Some(log_disk.clone()));
    let memory = MemoryBacking::NvRegion {
        region: region.clone(),
        vm: "kv".into(),
    };
    let result = (|| {
        let mut vm = bench.boot_serving(guest, memory, &tag, Some(socket.clone()))?;
        wait_for_socket(&socket, LINE_TIMEOUT)?;
        let api = |verb: &[&str]| {
            let mut arguments = vec!["--api-socket".to_string(), socket.display().to_string()];
            arguments.extend(verb.iter().map(|word| word.to_string()));
            run_command(&bench.binaries.ch_remote, &arguments, LINE_TIMEOUT)
        };
        if interval_ms > 0 {
            api(&[
                "nv-persist",
                "checkpoint",
                "--interval-ms",
                &interval_ms.to_string(),
            ])?;
        }
        let window_start = Instant::now() + bench.profile.overhead_warmup;
        let window_end = window_start + bench.profile.overhead_window;
        vm.wait_for(
            "the end of the measured window",
            LINE_TIMEOUT + bench.profile.overhead_window,
            |lines| lines.last().is_some_and(|line| line.at >= window_end),
        )?;
        let status = api(&["nv-persist", "status"])?;
        let samples: Vec<_> = samples_since(&ops_samples(&vm.serial.lines()), window_start)
            .into_iter()
            .filter(|s| s.at <= window_end)
            .collect();
        let ops_per_sec = mean_rate(&samples).ok_or_else(|| {
            vm.timeout(
                "two progress lines in the window",
                bench.profile.overhead_window,
            )
        })?;
        vm.kill();
        let status: serde_json::Value =
            serde_json::from_str(&status).map_err(|e| BenchError::Command {
                command: "ch-remote nv-persist status".into(),
                detail: format!("not JSON: {e}: {status}"),
            })?;
        let field = |name: &str| status["checkpoint"][name].as_u64().unwrap_or(0);
        Ok(Measured {
            ops_per_sec,
            epochs: field("epochs"),
            early_epochs: field("early_epochs"),
            pause_median_us: field("recent_pause_median_us"),
            pause_p99_us: field("recent_pause_p99_us"),
            undo_bytes_mean: field("recent_undo_bytes_mean"),
            write_faults_mean: field("recent_write_faults_mean"),
            phases: status["checkpoint"]["recent_phase_median_us"]
                .as_array()
                .map(|phases| {
                    phases
                        .iter()
                        .map(|p| {
                            (
                                p["phase"].as_str().unwrap_or("?").to_string(),
                                p["duration_us"].as_u64().unwrap_or(0),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    })();
    for file in [&region, &log_disk, &socket] {
        let _ = std::fs::remove_file(file);
    }
    result
}
