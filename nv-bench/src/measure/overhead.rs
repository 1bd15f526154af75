//! D. Overhead of keeping guest RAM in NV: kvstore throughput on an NV region and on a
//! shared file (both on tmpfs) against anonymous memory, same guest, same machine, with the
//! repetitions interleaved so that machine drift hits every backing alike.

use std::time::Instant;

use crate::environment::create_sparse_file;
use crate::error::Result;
use crate::launch::{MemoryBacking, TestGuest};
use crate::measure::{each_variant_repeatedly, Bench, StepNames, LINE_TIMEOUT};
use crate::output::CsvTable;
use crate::plot;
use crate::profile::keys_label;
use crate::stats::median;
use crate::throughput::{mean_rate, ops_samples, samples_since};

/// The guest's own pace (100 ms): fewest serial exits, so the memory's cost stands out.
const PERIOD_MS: u32 = 100;

/// Log disks are sparse; this bounds what a run can append (the guest stops logging, and
/// says so, if it ever fills).
const LOG_DISK_BYTES: u64 = 8 << 30;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backing {
    Anonymous,
    SharedFile,
    NvRegion,
}

impl Backing {
    const ALL: [Backing; 3] = [Backing::Anonymous, Backing::SharedFile, Backing::NvRegion];

    fn label(self) -> &'static str {
        match self {
            Backing::Anonymous => "anonymous",
            Backing::SharedFile => "shared-file (tmpfs)",
            Backing::NvRegion => "nv-region (tmpfs)",
        }
    }
}

pub fn run(bench: &mut Bench) -> Result<()> {
    bench.summary.line("");
    bench
        .summary
        .line("== D. overhead: kvstore throughput, NV-backed vs anonymous RAM");
    bench.summary.line(format!(
        "D method: {} repetition(s) per backing, interleaved; {:.1} s warm-up after serving, then \
         the mean over a {:.1} s window of host-stamped lines (one per {PERIOD_MS} ms); log disk on tmpfs",
        bench.profile.overhead_repetitions,
        bench.profile.overhead_warmup.as_secs_f64(),
        bench.profile.overhead_window.as_secs_f64()
    ));
    let mut table = CsvTable::new(&["keys", "backing", "repetition", "ops_per_s", "window_s"]);
    let mut bars = Vec::new();
    let mut medians = CsvTable::new(&[
        "keys",
        "backing",
        "runs",
        "median Mops/s",
        "ratio vs anonymous",
    ]);
    for &keys in &bench.profile.overhead_keys.clone() {
        let results = each_variant_repeatedly(
            bench,
            &Backing::ALL,
            bench.profile.overhead_repetitions,
            StepNames {
                letter: "D",
                keys,
                repetition: "repetition",
                detail: "",
            },
            Backing::label,
            |bench, backing, repetition| {
                let (rate, window) = measure_one(bench, keys, backing, repetition)?;
                table.push(vec![
                    keys.to_string(),
                    backing.label().into(),
                    repetition.to_string(),
                    format!("{rate:.0}"),
                    format!("{window:.3}"),
                ]);
                Ok(rate)
            },
        );
        let anonymous = results
            .iter()
            .find(|(b, _)| *b == Backing::Anonymous)
            .and_then(|(_, rates)| median(rates));
        for (backing, rates) in &results {
            let Some(value) = median(rates) else { continue };
            bars.push((
                format!("{} {}", keys_label(keys), backing.label()),
                value / 1e6,
            ));
            let ratio = match (backing, anonymous) {
                (Backing::Anonymous, _) | (_, None) => None,
                (_, Some(base)) => Some(value / base),
            };
            medians.push(vec![
                keys_label(keys),
                backing.label().into(),
                rates.len().to_string(),
                format!("{:.2}", value / 1e6),
                ratio.map(|r| format!("{r:.3}x")).unwrap_or_default(),
            ]);
            let ratio = ratio
                .map(|r| format!(", ratio vs anonymous = {r:.3}x"))
                .unwrap_or_default();
            bench.summary.line(format!(
                "D keys={} {}: median {:.2} Mops/s over {} run(s){ratio}",
                keys_label(keys),
                backing.label(),
                value / 1e6,
                rates.len()
            ));
        }
    }
    table.write(&bench.out_dir, "d_overhead.csv")?;
    bench
        .summary
        .table("D. kvstore throughput by RAM backing", &medians);
    if !bars.is_empty() {
        plot::bar_chart(
            &bench.out_dir.join("d_overhead.png"),
            "D. kvstore throughput by RAM backing (median)",
            "million ops/s",
            &bars,
        )?;
    }
    Ok(())
}

/// One run: boot, warm up, then the mean rate over the window from host-stamped lines.
fn measure_one(
    bench: &Bench,
    keys: u64,
    backing: Backing,
    repetition: usize,
) -> Result<(f64, f64)> {
    let tag = format!("d-{keys}-{repetition}-{backing:?}");
    let memory = match backing {
        Backing::Anonymous => MemoryBacking::Anonymous,
        Backing::SharedFile => MemoryBacking::SharedFile(bench.tmpfs.join(&format!("{tag}.ram"))),
        Backing::NvRegion => MemoryBacking::NvRegion {
            region: bench.tmpfs.join(&format!("{tag}.region")),
            vm: "kv".into(),
        },
    };
    throughput_in_window(bench, keys, memory, &tag)
}

/// Boots kvstore with `keys` keys on `memory`, warms up, then measures the mean rate (and the
/// window's length) from host-stamped lines; the log disk is on tmpfs. Removes its files.
pub fn throughput_in_window(
    bench: &Bench,
    keys: u64,
    memory: MemoryBacking,
    tag: &str,
) -> Result<(f64, f64)> {
    let mut rates = throughputs_in_one_window(bench, keys, &[(memory, tag.to_string())])?;
    Ok(rates.remove(0))
}

/// As [`throughput_in_window`] for several VMs at once (each `(memory, tag)`): all are booted,
/// then measured over the same window, so that load from the rest of the machine hits them
/// alike. The rates come back in `vms`' order.
pub fn throughputs_in_one_window(
    bench: &Bench,
    keys: u64,
    vms: &[(MemoryBacking, String)],
) -> Result<Vec<(f64, f64)>> {
    let ram = TestGuest::ram_for_keys(keys);
    let mut running = Vec::new();
    let mut files = Vec::new();
    let booted = (|| {
        for (memory, tag) in vms {
            // The log goes to tmpfs for every backing alike: this isolates the memory's cost.
            let log_disk = bench.tmpfs.join(&format!("{tag}.log"));
            create_sparse_file(&log_disk, LOG_DISK_BYTES)?;
            files.push(log_disk.clone());
            match memory {
                MemoryBacking::SharedFile(path) => {
                    files.push(path.clone());
                    // As upstream, `--memory-zone file=` must name an existing file.
                    create_sparse_file(path, 0)?;
                }
                MemoryBacking::NvRegion { region, .. }
                | MemoryBacking::SparseNvRegion { region, .. } => files.push(region.clone()),
                MemoryBacking::Anonymous | MemoryBacking::AnonymousThpOff => {}
            }
            let guest = bench.kvstore(keys, ram, PERIOD_MS, Some(log_disk));
            running.push(bench.boot_serving(guest, memory.clone(), tag, None)?);
            if let MemoryBacking::NvRegion { region, .. }
            | MemoryBacking::SparseNvRegion { region, .. } = memory
            {
                check_region_holds_ram(region, ram)?;
            }
        }
        Ok(())
    })();
    let result = booted.and_then(|()| {
        if running.len() > 1 {
            share_one_cpu(&running)?;
        }
        let serving_at = Instant::now();
        let window_start = serving_at + bench.profile.overhead_warmup;
        let window_end = window_start + bench.profile.overhead_window;
        running
            .iter_mut()
            .map(|vm| {
                vm.wait_for(
                    "the end of the measured window",
                    LINE_TIMEOUT + bench.profile.overhead_window,
                    |lines| lines.last().is_some_and(|line| line.at >= window_end),
                )?;
                let samples = samples_since(&ops_samples(&vm.serial.lines()), window_start);
                let samples: Vec<_> = samples.into_iter().filter(|s| s.at <= window_end).collect();
                let rate = mean_rate(&samples).ok_or_else(|| {
                    vm.timeout(
                        "two progress lines in the window",
                        bench.profile.overhead_window,
                    )
                })?;
                let window = samples
                    .last()
                    .zip(samples.first())
                    .map(|(last, first)| last.at.duration_since(first.at).as_secs_f64())
                    .unwrap_or(0.0);
                Ok((rate, window))
            })
            .collect()
    });
    for vm in running {
        vm.kill();
    }
    for file in files {
        let _ = std::fs::remove_file(file);
    }
    result
}

/// Pins every thread of every VMM in `running` to the same CPU, so that side-by-side guests
/// share it evenly (the scheduler's fairness between equal threads) and load from the rest of
/// the machine slows them alike; on separate CPUs one may share its CPU with a build and the
/// other not.
fn share_one_cpu(running: &[crate::running_vm::RunningVm]) -> Result<()> {
    let last_cpu = std::thread::available_parallelism()
        .map(|n| n.get() - 1)
        .unwrap_or(0);
    for vm in running {
        let pid = vm.process.pid().to_string();
        let cpu = last_cpu.to_string();
        let status = std::process::Command::new("taskset")
            .args(["--all-tasks", "--cpu-list", "--pid", &cpu, &pid])
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| crate::error::BenchError::io("running taskset".to_string(), e))?;
        if !status.success() {
            return Err(crate::error::BenchError::Command {
                command: format!("taskset --all-tasks --cpu-list --pid {cpu} {pid}"),
                detail: format!("exited with {status}"),
            });
        }
    }
    Ok(())
}

/// An NV run must really be on the region: a VMM that ignored `--nv` would measure anonymous
/// memory under the NV label.
fn check_region_holds_ram(region: &std::path::Path, ram: u64) -> Result<()> {
    let length = std::fs::metadata(region).map(|m| m.len()).unwrap_or(0);
    if length < ram {
        return Err(crate::error::BenchError::Command {
            command: format!("--nv region={}", region.display()),
            detail: format!(
                "the region file is {length} bytes, less than the guest's {ram} bytes of RAM: \
                 the VMM did not place the VM in the region"
            ),
        });
    }
    Ok(())
}
