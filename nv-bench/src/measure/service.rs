//! C. Time to recovered service: the kvstore guest under load, a power failure, and the time
//! until its throughput is back at >= 90% of the pre-failure level, for
//! (1) NV in-place recovery, (2) copy snapshot + restore, (3) cold restart with log replay,
//! and upstream's OnDemand restore (resumes at once, pays for its pages on first touch).
//!
//! The clock starts at the failure (the signal or kill), so each method's save is included;
//! the restart is started as soon as the old VMM is gone (a host's own reboot time is the
//! same for all three and left out). Throughput comes from host-stamped `kv ops=` lines.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::environment::create_sparse_file;
use crate::error::Result;
use crate::launch::{Launch, MemoryBacking, TestGuest};
use crate::measure::snapshot::{pause_and_snapshot, wait_for_socket};
use crate::measure::{each_variant_repeatedly, Bench, StepNames, LINE_TIMEOUT};
use crate::output::{seconds, CsvTable};
use crate::plot::{self, LineChart, Series};
use crate::profile::keys_label;
use crate::running_vm::RunningVm;
use crate::serial::TimedLine;
use crate::stats::median;
use crate::throughput::{level_samples, mean_rate, ops_samples, rates, time_to_service};

/// Progress lines every 50 ms: the resolution of "back in service" (100 ms, the guest's own
/// pace, would round every method up by up to two periods).
const PERIOD_MS: u32 = 50;
/// The plot shows this much of the time before the failure (the CSV keeps twice the level
/// window).
const PLOTTED_BEFORE_FAILURE_S: f64 = 1.5;
/// The plot averages this many consecutive intervals, so the curves of a loaded 2-core host
/// stay readable; the CSV and every reported time use the raw intervals.
const PLOT_SMOOTHING: usize = 4;

/// A trailing moving mean over [`PLOT_SMOOTHING`] points, computed separately before and
/// after the failure (t = 0) so no point mixes the two VMs.
fn smoothed_for_plot(curve: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let before: Vec<(f64, f64)> = curve.iter().copied().filter(|&(t, _)| t < 0.0).collect();
    let after: Vec<(f64, f64)> = curve.iter().copied().filter(|&(t, _)| t >= 0.0).collect();
    [before, after]
        .iter()
        .flat_map(|part| {
            (0..part.len()).map(move |end| {
                let window = &part[end.saturating_sub(PLOT_SMOOTHING - 1)..=end];
                let mean = window.iter().map(|&(_, rate)| rate).sum::<f64>() / window.len() as f64;
                (part[end].0, mean)
            })
        })
        .collect()
}

/// "Back in service": this fraction of the pre-failure throughput.
pub const SERVICE_FRACTION: f64 = 0.9;
/// Bound for service to come back after a failure.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound for the power-fail save (the VMM exits when it is committed).
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);
/// Exit code of a VMM whose VM was saved by a power-fail save (`EX_TEMPFAIL`).
pub const EXIT_POWER_FAIL_SAVED: i32 = 75;
/// Sparse log disk; a full run appends about 1 GB.
const LOG_DISK_BYTES: u64 = 16 << 30;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Method {
    NvInPlace,
    CopyRestore,
    /// Upstream's fast restore: resume at once, fetch pages on first touch (userfaultfd).
    OnDemandRestore,
    ColdRestart,
}

impl Method {
    pub const ALL: [Method; 4] = [
        Method::NvInPlace,
        Method::CopyRestore,
        Method::OnDemandRestore,
        Method::ColdRestart,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Method::NvInPlace => "NV in-place recovery",
            Method::CopyRestore => "copy snapshot/restore",
            Method::OnDemandRestore => "snapshot/OnDemand restore",
            Method::ColdRestart => "cold restart + log replay",
        }
    }
}

/// The outcome of one failure and recovery.
struct ServiceRun {
    level: f64,
    save: Duration,
    first_line_after_restart: Option<Duration>,
    service_after_restart: Duration,
    service_after_failure: Duration,
    replayed_records: Option<u64>,
    /// (seconds since the failure, ops/s) before and after.
    curve: Vec<(f64, f64)>,
}

pub fn run(bench: &mut Bench) -> Result<()> {
    bench.summary.line("");
    bench.summary.line(format!(
        "== C. time to recovered service (throughput back at >= {:.0}% of its pre-failure level, from the failure)",
        SERVICE_FRACTION * 100.0
    ));
    bench.summary.line(format!(
        "C load before the failure: {:.0} s; level = mean over the last {:.0} s; a progress line every {PERIOD_MS} ms; log disk in the disk directory",
        bench.profile.service_load.as_secs_f64(),
        bench.profile.level_window.as_secs_f64(),
    ));
    let mut table = CsvTable::new(&[
        "keys",
        "method",
        "repetition",
        "level_ops_per_s",
        "save_s",
        "first_line_after_restart_s",
        "service_after_restart_s",
        "service_after_failure_s",
        "replayed_records",
    ]);
    let mut medians = CsvTable::new(&[
        "keys",
        "method",
        "runs",
        "median s from failure to >=90%",
        "all runs (s)",
        "median ratio to NV",
    ]);
    let mut curves = CsvTable::new(&["keys", "method", "t_since_failure_s", "ops_per_s"]);
    for &keys in &bench.profile.service_keys.clone() {
        let runs = each_variant_repeatedly(
            bench,
            &Method::ALL,
            bench.profile.service_repetitions,
            StepNames {
                letter: "C",
                keys,
                repetition: "run",
                detail: ": load, failure, recovery",
            },
            Method::label,
            |bench, method, repetition| {
                let run = measure_one(bench, keys, method)?;
                table.push(vec![
                    keys.to_string(),
                    method.label().into(),
                    repetition.to_string(),
                    format!("{:.0}", run.level),
                    seconds(run.save.as_secs_f64()),
                    run.first_line_after_restart
                        .map(|d| seconds(d.as_secs_f64()))
                        .unwrap_or_default(),
                    seconds(run.service_after_restart.as_secs_f64()),
                    seconds(run.service_after_failure.as_secs_f64()),
                    run.replayed_records
                        .map(|n| n.to_string())
                        .unwrap_or_default(),
                ]);
                bench.summary.line(format!(
                "C keys={} {} run {repetition}: level {:.2} Mops/s, save {:.1} ms, first line {} \
                 after restart, back at >=90% {:.3} s after the failure ({:.3} s after restart){}",
                keys_label(keys),
                method.label(),
                run.level / 1e6,
                run.save.as_secs_f64() * 1e3,
                run.first_line_after_restart
                    .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
                    .unwrap_or_else(|| "-".into()),
                run.service_after_failure.as_secs_f64(),
                run.service_after_restart.as_secs_f64(),
                run.replayed_records
                    .map(|n| format!(", replayed {n} log records"))
                    .unwrap_or_default()
            ));
                Ok(run)
            },
        );
        let times = |done: &[ServiceRun]| -> Vec<f64> {
            done.iter()
                .map(|run| run.service_after_failure.as_secs_f64())
                .collect()
        };
        let nv_median = runs
            .iter()
            .find(|(method, _)| *method == Method::NvInPlace)
            .and_then(|(_, done)| median(&times(done)));
        let mut series = Vec::new();
        for (method, done) in &runs {
            let values = times(done);
            let Some(middle) = median(&values) else {
                continue;
            };
            let ratio = nv_median.map(|nv| middle / nv);
            medians.push(vec![
                keys_label(keys),
                method.label().into(),
                done.len().to_string(),
                format!("{middle:.3}"),
                values
                    .iter()
                    .map(|v| format!("{v:.3}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                ratio.map(|r| format!("{r:.1}x")).unwrap_or_default(),
            ]);
            // The plotted curve is the run closest to the median.
            let Some(shown) = done.iter().min_by(|a, b| {
                let distance =
                    |run: &ServiceRun| (run.service_after_failure.as_secs_f64() - middle).abs();
                distance(a).total_cmp(&distance(b))
            }) else {
                continue;
            };
            for &(t, rate) in &shown.curve {
                curves.push(vec![
                    keys.to_string(),
                    method.label().into(),
                    format!("{t:.4}"),
                    format!("{rate:.0}"),
                ]);
            }
            series.push(Series {
                name: method.label().into(),
                points: smoothed_for_plot(&shown.curve)
                    .into_iter()
                    .filter(|&(t, _)| t >= -PLOTTED_BEFORE_FAILURE_S)
                    .map(|(t, r)| (t, r / 1e6))
                    .collect(),
            });
            bench.summary.line(format!(
                "C keys={} {}: median {middle:.3} s from the failure to >=90% throughput over {} run(s)",
                keys_label(keys),
                method.label(),
                done.len()
            ));
            if let (Some(ratio), false) = (ratio, *method == Method::NvInPlace) {
                bench.summary.line(format!(
                    "C keys={} RATIO {} / NV in-place = {ratio:.1}x (median time from failure to >=90% throughput)",
                    keys_label(keys),
                    method.label()
                ));
            }
        }
        if !series.is_empty() {
            let title = format!(
                "C. kvstore throughput around a power failure at t=0 ({} keys, median run)",
                keys_label(keys)
            );
            plot::line_chart(
                &bench
                    .out_dir
                    .join(format!("c_service_{}.png", keys_label(keys))),
                &LineChart {
                    title: &title,
                    x_label: "seconds since the power failure",
                    y_label: "million ops/s (mean of 4 intervals, 200 ms)",
                    log_y: false,
                    markers: false,
                    // Four missing periods: the VM is down, not slow.
                    max_gap: Some(4.0 * f64::from(PERIOD_MS) / 1e3),
                    break_at: Some(0.0),
                },
                &series,
            )?;
        }
    }
    table.write(&bench.out_dir, "c_service.csv")?;
    bench.summary.table(
        "C. time to recovered service (seconds from the failure to >= 90% of the pre-failure level)",
        &medians,
    );
    curves.write(&bench.out_dir, "c_throughput.csv")?;
    Ok(())
}

fn measure_one(bench: &Bench, keys: u64, method: Method) -> Result<ServiceRun> {
    let tag = format!("c-{keys}-{method:?}");
    // The log lives on disk, as a database's would; page cache keeps replay reads warm, which
    // only flatters the cold restart.
    let log_disk = bench.disk.join(&format!("{tag}.log"));
    create_sparse_file(&log_disk, LOG_DISK_BYTES)?;
    let region = bench.tmpfs.join(&format!("{tag}.region"));
    let snapshot_dir = bench.disk.join(&format!("{tag}.snapshot"));
    let result = measure_with(bench, keys, method, &tag, &log_disk, &region, &snapshot_dir);
    let _ = std::fs::remove_file(&log_disk);
    let _ = std::fs::remove_file(&region);
    let _ = std::fs::remove_dir_all(&snapshot_dir);
    result
}

#[allow(clippy::too_many_arguments)]
fn measure_with(
    bench: &Bench,
    keys: u64,
    method: Method,
    tag: &str,
    log_disk: &std::path::Path,
    region: &std::path::Path,
    snapshot_dir: &std::path::Path,
) -> Result<ServiceRun> {
    let guest = bench.kvstore(
        keys,
        TestGuest::ram_for_keys(keys),
        PERIOD_MS,
        Some(log_disk.into()),
    );
    let backing = match method {
        Method::NvInPlace => MemoryBacking::NvRegion {
            region: region.into(),
            vm: "kv".into(),
        },
        Method::CopyRestore | Method::OnDemandRestore | Method::ColdRestart => {
            MemoryBacking::Anonymous
        }
    };
    let socket: Option<PathBuf> = matches!(method, Method::CopyRestore | Method::OnDemandRestore)
        .then(|| bench.tmpfs.join(&format!("{tag}.sock")));
    let mut vm = bench.boot_serving(guest.clone(), backing, tag, socket.clone())?;
    let serial = vm.serial.path().to_path_buf();

    // Load, then the level from the last window before the failure.
    let serving_at = Instant::now();
    let load = bench.profile.service_load;
    vm.wait_for("the load period", load + LINE_TIMEOUT, |lines| {
        lines
            .last()
            .is_some_and(|line| line.at >= serving_at + load)
    })?;
    let before = ops_samples(&vm.serial.lines());
    let level = mean_rate(&level_samples(&before, bench.profile.level_window))
        .ok_or_else(|| vm.timeout("two progress lines before the failure", load))?;

    // The failure.
    let failed_at = Instant::now();
    match method {
        Method::NvInPlace => {
            vm.power_fail(SAVE_TIMEOUT)?;
        }
        Method::CopyRestore | Method::OnDemandRestore => {
            let socket = socket.as_deref().unwrap_or(std::path::Path::new(""));
            wait_for_socket(socket, Duration::from_secs(5))?;
            pause_and_snapshot(&bench.binaries.ch_remote, socket, snapshot_dir)?;
        }
        Method::ColdRestart => {}
    }
    let pre_lines = vm.kill();
    let save = failed_at.elapsed();

    // The restart, as soon as the old VMM is gone.
    let launch = match method {
        Method::NvInPlace => Launch::NvRecover {
            region: region.into(),
            vm: "kv".into(),
        },
        Method::CopyRestore | Method::OnDemandRestore => Launch::Restore {
            snapshot_dir: snapshot_dir.into(),
            on_demand: method == Method::OnDemandRestore,
        },
        Method::ColdRestart => Launch::Boot {
            guest,
            backing: MemoryBacking::Anonymous,
        },
    };
    let mut restarted = RunningVm::start(
        &bench.binaries.cloud_hypervisor,
        &launch,
        &serial,
        None,
        &bench.disk.join(&format!("{tag}.restart.vmm")),
        &bench.vmm_arguments,
    )?;
    let restart_at = restarted.started();
    let back = |lines: &[TimedLine]| {
        time_to_service(
            &rates(&ops_samples(lines)),
            restart_at,
            level,
            SERVICE_FRACTION,
        )
    };
    let lines = restarted.wait_for("throughput back at 90%", SERVICE_TIMEOUT, |lines| {
        back(lines).is_some()
    })?;
    let service_after_restart = back(&lines).unwrap_or_default();
    let tail_until = restart_at + service_after_restart + bench.profile.service_tail;
    restarted.wait_for(
        "the curve after recovery",
        bench.profile.service_tail + LINE_TIMEOUT,
        |lines| lines.last().is_some_and(|line| line.at >= tail_until),
    )?;
    let post_lines = restarted.kill();

    let since_failure = |at: Instant| {
        if at >= failed_at {
            at.duration_since(failed_at).as_secs_f64()
        } else {
            -failed_at.duration_since(at).as_secs_f64()
        }
    };
    let shown_from = failed_at - bench.profile.level_window * 2;
    let mut curve: Vec<(f64, f64)> = rates(&ops_samples(&pre_lines))
        .into_iter()
        .filter(|point| point.at >= shown_from)
        .map(|point| (since_failure(point.at), point.ops_per_sec))
        .collect();
    curve.extend(
        rates(&ops_samples(&post_lines))
            .into_iter()
            .map(|point| (since_failure(point.at), point.ops_per_sec)),
    );
    let first_line_after_restart = ops_samples(&post_lines)
        .first()
        .map(|sample| sample.at.duration_since(restart_at));
    let replayed_records = post_lines.iter().find_map(|line| {
        line.text
            .strip_prefix("kvstore: replayed ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    });
    Ok(ServiceRun {
        level,
        save,
        first_line_after_restart,
        service_after_restart,
        service_after_failure: restart_at.duration_since(failed_at) + service_after_restart,
        replayed_records,
        curve,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_smoothing_never_mixes_the_two_sides_of_the_failure() {
        let curve = [(-0.2, 10.0), (-0.1, 20.0), (0.1, 100.0), (0.2, 200.0)];
        let smoothed = smoothed_for_plot(&curve);
        assert_eq!(
            smoothed,
            [(-0.2, 10.0), (-0.1, 15.0), (0.1, 100.0), (0.2, 150.0)]
        );
    }
}
