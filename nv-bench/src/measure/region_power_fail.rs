//! G. One UPS event for a whole region (issue 12): 16 counter VMs, each its own VMM process, in
//! one tmpfs region; one `ch-remote nv-persist power-fail --region` saves them all. Printed: the
//! slowest and the median save (the VMMs' own save reports, as the command prints them), the
//! slowest pause-vcpus phase (how long a busy vCPU thread took to leave the guest: 16 spinning
//! guests on a 2-core host wait for the scheduler there), the slowest save without that phase,
//! and the command's wall time; then every VM recovers in place for the next cycle. It prints
//! whether the VMMs may raise their priority for the save (`CAP_SYS_NICE`, which they inherit
//! from nv-bench; run it under `capsh --drop=cap_sys_nice --` to compare). A last
//! cycle pauses every guest first (`ch-remote pause`), so that no vCPU competes for the cores.
//!
//! Not in `--quick`: on this host, VMMs that set up their VM while other guests already spin can
//! wait in the kernel (`__synchronize_srcu` under KVM) for tens of seconds when the machine is
//! loaded. That makes G take 2 s or several minutes, which is too unpredictable for the suite.
//! The first line of each VM is therefore awaited with the boot bound of the other sections.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use crate::launch::{Launch, MemoryBacking, TestGuest};
use crate::measure::snapshot::wait_for_socket;
use crate::measure::{Bench, LINE_TIMEOUT, SERVING_TIMEOUT};
use crate::output::CsvTable;
use crate::running_vm::RunningVm;
use crate::stats::median;
use crate::vmm_process::run_command;

/// VMs in the region.
const VMS: usize = 16;
/// Guest RAM of each: the counter guest with a 1 MiB area needs little.
const RAM: u64 = 16 << 20;
/// The goal for the slowest save on tmpfs.
const GOAL_MS: f64 = 5.0;
const SAVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The save times (ms) of a `power-fail --region` output: `NAME: committed seq N, save T ms`.
fn save_times(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter_map(|line| {
            line.split_once(": committed seq ")?
                .1
                .split_once(", save ")?
                .1
                .strip_suffix(" ms")?
                .parse()
                .ok()
        })
        .collect()
}

/// Whether `/proc/<pid>/status` text grants `CAP_SYS_NICE` (bit 23 of `CapEff`): the VMMs
/// nv-bench starts inherit it, and with it a power-fail save runs at `SCHED_FIFO`.
fn has_sys_nice(status: &str) -> Option<bool> {
    const CAP_SYS_NICE: u32 = 23;
    let mask = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    let mask = u64::from_str_radix(mask, 16).ok()?;
    Some(mask & (1 << CAP_SYS_NICE) != 0)
}

/// Per VM of a region listing with a recorded last save: (total, pause-vcpus phase), in ms.
fn save_phases(listing: &serde_json::Value) -> Vec<(f64, f64)> {
    let Some(vms) = listing["vms"].as_array() else {
        return Vec::new();
    };
    vms.iter()
        .filter_map(|vm| {
            let save = &vm["last_save"];
            let pause = save["phases"]
                .as_array()?
                .iter()
                .find(|phase| phase["phase"] == "pause-vcpus")?["duration_us"]
                .as_f64()?;
            Some((save["total_us"].as_f64()? / 1e3, pause / 1e3))
        })
        .collect()
}

fn ch_remote(bench: &Bench, arguments: &[&str]) -> Result<(bool, String)> {
    let output = Command::new(&bench.binaries.ch_remote)
        .args(arguments)
        .output()
        .map_err(|e| BenchError::io("running ch-remote", e))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.stdout.is_empty() {
        return Err(BenchError::Command {
            command: format!("ch-remote {}", arguments.join(" ")),
            detail: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok((output.status.success(), stdout))
}

/// One cycle's numbers.
struct Cycle {
    slowest_ms: f64,
    median_ms: f64,
    slowest_pause_ms: f64,
    /// The slowest save without its pause-vcpus phase: the save path's own work.
    slowest_after_pause_ms: f64,
    command_ms: f64,
}

fn power_fail_all(bench: &Bench, region: &str, vms: &mut [RunningVm]) -> Result<Cycle> {
    let started = Instant::now();
    let (success, stdout) = ch_remote(bench, &["nv-persist", "power-fail", "--region", region])?;
    let command_ms = started.elapsed().as_secs_f64() * 1e3;
    if !success {
        return Err(BenchError::Command {
            command: format!("ch-remote nv-persist power-fail --region {region}"),
            detail: stdout,
        });
    }
    for vm in vms.iter_mut() {
        vm.wait_exit("the power-fail save", SAVE_TIMEOUT)?;
    }
    let times = save_times(&stdout);
    let (_, listing) = ch_remote(bench, &["nv-persist", "list", "--region", region])?;
    let listing: serde_json::Value =
        serde_json::from_str(&listing).map_err(|e| BenchError::Command {
            command: "ch-remote nv-persist list".into(),
            detail: e.to_string(),
        })?;
    let phases = save_phases(&listing);
    let slowest =
        |values: &mut dyn Iterator<Item = f64>| values.max_by(f64::total_cmp).unwrap_or(f64::NAN);
    Ok(Cycle {
        slowest_ms: slowest(&mut times.iter().copied()),
        median_ms: median(&times).unwrap_or(f64::NAN),
        slowest_pause_ms: slowest(&mut phases.iter().map(|(_, pause)| *pause)),
        slowest_after_pause_ms: slowest(&mut phases.iter().map(|(total, pause)| total - pause)),
        command_ms,
    })
}

fn measure(bench: &mut Bench, table: &mut CsvTable) -> Result<Vec<(&'static str, Cycle)>> {
    let region = bench.tmpfs.join("sixteen.nv");
    let region_text = region.display().to_string();
    let names: Vec<String> = (0..VMS).map(|i| format!("vm{i:02}")).collect();
    let socket_of = |bench: &Bench, name: &str| bench.tmpfs.join(&format!("f-{name}.sock"));
    let start = |bench: &Bench, launch: Launch, name: &str, cycle: usize, api: bool| {
        let tag = format!("f-{name}-{cycle}");
        let socket = api.then(|| socket_of(bench, name));
        RunningVm::start(
            &bench.binaries.cloud_hypervisor,
            &launch,
            &bench.disk.join(&format!("{tag}.serial")),
            socket.as_deref(),
            &bench.disk.join(&format!("{tag}.vmm")),
            &bench.vmm_arguments,
        )
    };
    let mut vms = Vec::new();
    for name in &names {
        let guest = TestGuest {
            image: bench.counter_image.clone(),
            parameters: "area_mb=1".into(),
            ram_bytes: RAM,
            tsc_khz: bench.tsc_khz,
            period_ms: 100,
            log_disk: None,
        };
        let backing = MemoryBacking::NvRegion {
            region: region.clone(),
            vm: name.clone(),
        };
        vms.push(start(
            bench,
            Launch::Boot { guest, backing },
            name,
            0,
            false,
        )?);
    }
    // The running cycles, then one with every guest paused first (`ch-remote pause`): no vCPU
    // competes for the cores then, so the save path's own cost across 16 VMMs shows.
    let cycles = bench.profile.region_cycles;
    let mut results = Vec::new();
    for cycle in 0..=cycles {
        let paused = cycle == cycles;
        for (vm, name) in vms.iter_mut().zip(&names) {
            vm.wait_for_lines("counter=", 1, SERVING_TIMEOUT)?;
            if paused {
                let socket = socket_of(bench, name);
                wait_for_socket(&socket, LINE_TIMEOUT)?;
                let socket = socket.display().to_string();
                run_command(
                    &bench.binaries.ch_remote,
                    &["--api-socket".into(), socket, "pause".into()],
                    LINE_TIMEOUT,
                )?;
            }
        }
        let result = power_fail_all(bench, &region_text, &mut vms)?;
        let guests = if paused { "paused" } else { "running" };
        table.push(vec![
            cycle.to_string(),
            guests.to_string(),
            format!("{:.3}", result.slowest_ms),
            format!("{:.3}", result.median_ms),
            format!("{:.3}", result.slowest_pause_ms),
            format!("{:.3}", result.slowest_after_pause_ms),
            format!("{:.1}", result.command_ms),
        ]);
        results.push((guests, result));
        vms.clear();
        if !paused {
            for name in &names {
                let launch = Launch::NvRecover {
                    region: region.clone(),
                    vm: name.clone(),
                };
                let api = cycle + 1 == cycles;
                vms.push(start(bench, launch, name, cycle + 1, api)?);
            }
        }
    }
    Ok(results)
}

pub fn run(bench: &mut Bench) -> Result<()> {
    if bench.profile.region_cycles == 0 {
        return Ok(());
    }
    bench.summary.line("");
    bench.summary.line(format!(
        "== G. {VMS} VMs in one tmpfs region power-failed by one `ch-remote nv-persist power-fail --region`"
    ));
    let priority = match std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(has_sys_nice)
    {
        Some(true) => "yes (CAP_SYS_NICE)",
        Some(false) => "no (no CAP_SYS_NICE: the saves run at normal priority)",
        None => "unknown",
    };
    bench.summary.line(format!(
        "G the VMMs may run their power-fail save at SCHED_FIFO: {priority}"
    ));
    bench.summary.progress(format!(
        "G: {VMS} counter VMs, {} cycles",
        bench.profile.region_cycles
    ));
    let mut table = CsvTable::new(&[
        "cycle",
        "guests",
        "slowest_save_ms",
        "median_save_ms",
        "slowest_pause_vcpus_ms",
        "slowest_save_without_pause_ms",
        "command_ms",
    ]);
    match measure(bench, &mut table) {
        Ok(cycles) => {
            for (index, (guests, cycle)) in cycles.iter().enumerate() {
                bench.summary.line(format!(
                    "G cycle {index} (guests {guests}): slowest save {:.3} ms, median save {:.3} ms (goal: slowest < {GOAL_MS} ms: {}); slowest pause-vcpus phase {:.3} ms, slowest save without it {:.3} ms; the command took {:.1} ms",
                    cycle.slowest_ms,
                    cycle.median_ms,
                    if cycle.slowest_ms < GOAL_MS { "met" } else { "NOT met" },
                    cycle.slowest_pause_ms,
                    cycle.slowest_after_pause_ms,
                    cycle.command_ms,
                ));
            }
        }
        Err(error) => bench
            .summary
            .not_measured("G 16 VMs power-failed by one command", &error.to_string()),
    }
    table.write(&bench.out_dir, "g_region_power_fail.csv")?;
    bench.summary.table(
        "G. 16 VMs power-failed by one `nv-persist power-fail --region`",
        &table,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_times_and_pause_are_read_from_the_command_and_the_listing() {
        let stdout = "a: committed seq 3, save 1.500 ms\nb: committed seq 1, save time not recorded\n\
                      c: error: VMM pid 4 exited without a committed save\nd: committed seq 2, save 0.250 ms\n\
                      total: 3 committed, 1 failed, 0 not running, of 4 VMs\n";
        assert_eq!(save_times(stdout), vec![1.5, 0.25]);
        let listing = serde_json::json!({"vms": [
            {"last_save": {"total_us": 1000, "phases": [{"phase": "pause-vcpus", "duration_us": 900}]}},
            {"last_save": {"total_us": 11500, "phases": [{"phase": "commit", "duration_us": 9000},
                                      {"phase": "pause-vcpus", "duration_us": 2100}]}},
            {"name": "never saved"}
        ]});
        assert_eq!(save_phases(&listing), vec![(1.0, 0.9), (11.5, 2.1)]);
    }

    #[test]
    fn sys_nice_is_bit_23_of_the_effective_capabilities() {
        let root = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(has_sys_nice(root), Some(true));
        let dropped = "CapEff:\t000001ffff7fffff\n";
        assert_eq!(has_sys_nice(dropped), Some(false));
        assert_eq!(has_sys_nice("CapEff:\t0000000000000000\n"), Some(false));
        assert_eq!(has_sys_nice("no such line"), None);
    }
}
