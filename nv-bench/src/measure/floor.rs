//! A-floor. How close an NV in-place recovery comes to the least a process can do here to run
//! the saved guest again, and how fast the VMM is gone after a power-fail save commits.
//!
//! One `counter` guest on an NV region on tmpfs is booted and power-failed once. Then, with
//! the repetitions interleaved: `nv-floor` (this package's minimal helper: a KVM VM over the
//! VM's extent, vCPU 0 with the saved registers, KVM_RUN to the guest's first exit) and the
//! real recovery (`--nv ..,recover=on`, to its `resumed` event, read from a FIFO as the VMM
//! writes it), which then gets SIGPWR: signal to committed, committed to process gone, signal
//! to process gone. Every time is the host's `CLOCK_MONOTONIC`, from just before the spawn.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nv_extension::{OpenOptions, Region};

use crate::error::{BenchError, Result};
use crate::launch::{Launch, MemoryBacking, TestGuest};
use crate::measure::service::EXIT_POWER_FAIL_SAVED;
use crate::measure::{Bench, LINE_TIMEOUT};
use crate::monotonic::monotonic_ns;
use crate::output::CsvTable;
use crate::running_vm::RunningVm;
use crate::stats::median;

const VM: &str = "floor";
/// The guest size: 1 GiB of RAM (one memory slot).
const RAM_BYTES: u64 = 1 << 30;
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

fn ms(from: u128, to: u128) -> f64 {
    to.saturating_sub(from) as f64 / 1e6
}

fn failure(command: &str, detail: impl Into<String>) -> BenchError {
    BenchError::Command {
        command: command.into(),
        detail: detail.into(),
    }
}

/// One floor run: ms from the spawn to `running`, to the first exit, the kernel's VM teardown,
/// and the spawn to the process gone.
struct FloorRun {
    /// From the spawn to its `main`: the process start alone.
    main: f64,
    running: f64,
    /// KVM_SET_USER_MEMORY_REGION alone.
    registration: f64,
    first_exit: f64,
    exit_reason: String,
    teardown: f64,
    gone: f64,
}

fn floor_once(
    helper: &Path,
    region: &Path,
    extent: (u64, u64),
    registers: &Path,
) -> Result<FloorRun> {
    let started = monotonic_ns();
    let output = Command::new(helper)
        .arg(region)
        .arg(extent.0.to_string())
        .arg(extent.1.to_string())
        .arg(registers)
        .output()
        .map_err(|e| BenchError::io("running nv-floor", e))?;
    let gone = monotonic_ns();
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(failure(
            "nv-floor",
            format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        ));
    }
    let stamp = |key: &str| -> Result<(u128, String)> {
        let line = text
            .lines()
            .find(|line| line.split(' ').next() == Some(key))
            .ok_or_else(|| failure("nv-floor", format!("no {key} line in {text:?}")))?;
        let mut fields = line.split(' ').skip(1);
        let at = fields
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| failure("nv-floor", format!("bad line {line:?}")))?;
        Ok((at, fields.collect::<Vec<_>>().join(" ")))
    };
    let (main, _) = stamp("main")?;
    let (created, _) = stamp("created")?;
    let (registered, _) = stamp("registered")?;
    let (running, _) = stamp("running")?;
    let (exit, reason) = stamp("exit")?;
    let (destroyed, _) = stamp("destroyed")?;
    Ok(FloorRun {
        main: ms(started, main),
        running: ms(started, running),
        registration: ms(created, registered),
        first_exit: ms(started, exit),
        exit_reason: reason,
        teardown: ms(exit, destroyed),
        gone: ms(started, gone),
    })
}

/// One recovery and its power-fail exit, in ms from the spawn (or from the signal).
struct RecoveryRun {
    resumed_event: f64,
    /// From the spawn to the instant the VMM released the vCPUs (its `resumed in place` log
    /// line, stamped on the host's clock as it is written): the floor's `running`.
    released: Option<f64>,
    /// The VMM's own figure: the sum of its recovery phases, from its exec.
    vmm_from_exec: Option<f64>,
    phases: Vec<(String, f64)>,
    signal_to_committed: Option<f64>,
    committed_to_gone: Option<f64>,
    signal_to_gone: f64,
}

/// The UTC wall-clock time of a log line (`cloud-hypervisor: 2026-11-28T03:57:12.646204Z: ..`),
/// in microseconds since the Unix epoch.
fn log_line_time_us(line: &str) -> Option<u128> {
    let stamp = line
        .strip_prefix("cloud-hypervisor: ")?
        .split("Z: ")
        .next()?;
    let (date, time) = stamp.split_once('T')?;
    let mut date = date.split('-').map(|f| f.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (hms, fraction) = time.split_once('.')?;
    let mut hms = hms.split(':').map(|f| f.parse::<i64>().ok());
    let (hour, minute, second) = (hms.next()??, hms.next()??, hms.next()??);
    let micros: i64 = fraction.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (March-based years).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    u128::try_from(seconds * 1_000_000 + micros).ok()
}

/// `(... 5123 us from exec): process-start 812 us, vmm-init 301 us, ...` of the `-v` log.
pub(super) fn parse_recovery_line(log: &str) -> (Option<f64>, Vec<(String, f64)>) {
    let Some(line) = log
        .lines()
        .find(|line| line.contains("resumed in place from seq"))
    else {
        return (None, Vec::new());
    };
    let from_exec = line
        .split(" us from exec)")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|n| n.trim().parse::<f64>().ok())
        .map(|us| us / 1000.0);
    let phases = line
        .split("): ")
        .nth(1)
        .unwrap_or("")
        .split(", ")
        .filter_map(|phase| {
            let mut words = phase.split(' ');
            let name = words.next()?.to_string();
            let us: f64 = words.next()?.parse().ok()?;
            Some((name, us / 1000.0))
        })
        .collect();
    (from_exec, phases)
}

fn make_fifo(path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    integration_tests::harness::make_fifo(path)
        .map_err(|e| BenchError::io(format!("mkfifo {}", path.display()), e))
}

fn recover_once(bench: &Bench, region: &Path, index: usize) -> Result<RecoveryRun> {
    let fifo = bench.tmpfs.join(&format!("floor-events-{index}"));
    make_fifo(&fifo)?;
    let log = bench.tmpfs.join(&format!("floor-recovery-{index}.log"));
    let serial = bench.tmpfs.join("floor-serial");
    let (sender, events) = mpsc::channel::<(&'static str, u128)>();
    let reader_path = fifo.clone();
    // Opens the FIFO (waiting for the VMM to open it) and stamps the events as they come.
    let reader = std::thread::spawn(move || {
        let Ok(file) = std::fs::File::open(&reader_path) else {
            return;
        };
        for line in BufReader::new(file).lines() {
            let Ok(line) = line else { return };
            let at = monotonic_ns();
            for name in ["resumed", "committed"] {
                if line.contains(&format!("\"event\": \"{name}\"")) {
                    let _ = sender.send((name, at));
                }
            }
        }
    });
    let stderr = std::fs::File::create(&log)
        .map_err(|e| BenchError::io(format!("creating {}", log.display()), e))?;
    let mut arguments = vec![
        "-v".to_string(),
        "--nv".into(),
        format!("region={},vm={VM},recover=on", region.display()),
        "--serial".into(),
        format!("file={}", serial.display()),
        "--event-monitor".into(),
        format!("path={}", fifo.display()),
    ];
    arguments.extend(bench.vmm_arguments.iter().cloned());
    let started = monotonic_ns();
    // The log's timestamps are wall-clock time: the spawn on the same clock.
    let started_wall_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_micros())
        .unwrap_or(0);
    let mut child = Command::new(&bench.binaries.cloud_hypervisor)
        .args(&arguments)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| BenchError::io("starting the recovering VMM", e))?;
    let resumed = match events.recv_timeout(EVENT_TIMEOUT) {
        Ok(("resumed", at)) => at,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failure(
                "cloud-hypervisor recover=on",
                format!(
                    "no resumed event ({other:?}); log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            ));
        }
    };
    // The guest runs a little (its vCPU is in KVM_RUN), as after any recovery.
    std::thread::sleep(Duration::from_millis(30));
    let signalled = monotonic_ns();
    // SAFETY: kill(2) on the pid of our own child, which has not been waited for yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGPWR) };
    let status = child
        .wait()
        .map_err(|e| BenchError::io("waiting for the VMM", e))?;
    let gone = monotonic_ns();
    let _ = reader.join();
    let committed = events
        .try_iter()
        .find(|(name, _)| *name == "committed")
        .map(|(_, at)| at);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if status.code() != Some(EXIT_POWER_FAIL_SAVED) {
        return Err(failure(
            "cloud-hypervisor after SIGPWR",
            format!("{status}, expected exit code {EXIT_POWER_FAIL_SAVED}; log: {text}"),
        ));
    }
    let (vmm_from_exec, phases) = parse_recovery_line(&text);
    let released = text
        .lines()
        .find(|line| line.contains("resumed in place from seq"))
        .and_then(log_line_time_us)
        .map(|at| at.saturating_sub(started_wall_us) as f64 / 1000.0);
    let _ = std::fs::remove_file(&fifo);
    let _ = std::fs::remove_file(&log);
    Ok(RecoveryRun {
        resumed_event: ms(started, resumed),
        released,
        vmm_from_exec,
        phases,
        signal_to_committed: committed.map(|at| ms(signalled, at)),
        committed_to_gone: committed.map(|at| ms(at, gone)),
        signal_to_gone: ms(signalled, gone),
    })
}

/// Boots the counter guest on a fresh NV region and power-fails it: the state every
/// repetition starts from. Returns the region path.
fn prepare_saved_vm(bench: &mut Bench) -> Result<PathBuf> {
    let region = bench.tmpfs.join("floor-region");
    let _ = std::fs::remove_file(&region);
    let launch = Launch::Boot {
        guest: TestGuest {
            image: bench.counter_image.clone(),
            parameters: "area_mb=8".into(),
            ram_bytes: RAM_BYTES,
            tsc_khz: bench.tsc_khz,
            period_ms: 10,
            log_disk: None,
        },
        backing: MemoryBacking::NvRegion {
            region: region.clone(),
            vm: VM.into(),
        },
    };
    let mut vm = RunningVm::start(
        &bench.binaries.cloud_hypervisor,
        &launch,
        &bench.tmpfs.join("floor-serial"),
        None,
        &bench.tmpfs.join("floor-boot.log"),
        &bench.vmm_arguments,
    )?;
    vm.wait_for_lines("counter=", 2, LINE_TIMEOUT)?;
    vm.power_fail(LINE_TIMEOUT)?;
    Ok(region)
}

/// Cuts vCPU 0's saved segment and general registers out of the committed state, and finds
/// the VM's extent in the region.
fn saved_registers(region: &Path, out: &Path) -> Result<(u64, u64)> {
    let opened = Region::open(region, &OpenOptions::default())?;
    let saved = opened.inspect_recovery(VM)?;
    let state: serde_json::Value = serde_json::from_slice(&saved.state_blob)
        .map_err(|e| failure("reading the saved state", e.to_string()))?;
    let vcpu = &state["vcpus"][0];
    let registers = serde_json::json!({ "regs": vcpu["regs"], "sregs": vcpu["sregs"] });
    std::fs::write(out, registers.to_string())
        .map_err(|e| BenchError::io(format!("writing {}", out.display()), e))?;
    let handle = opened.claim_vm(VM)?;
    let backing = handle.memory_backing()?;
    Ok((backing.offset, backing.size))
}

fn spread(values: &[f64]) -> String {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match median(&finite) {
        Some(m) => format!(
            "median {m:.2} ms (min {min:.2}, max {max:.2}, n={})",
            finite.len()
        ),
        None => "no values".into(),
    }
}

pub fn run(bench: &mut Bench) -> Result<()> {
    bench.summary.line("");
    bench.summary.line(
        "== A-floor: recovery vs the least a process can do; exit after the commit (1 GiB counter guest, NV region on tmpfs) ==",
    );
    let helper = bench.binaries.nv_floor.clone();
    let region = prepare_saved_vm(bench)?;
    let registers = bench.tmpfs.join("floor-registers.json");
    let extent = saved_registers(&region, &registers)?;
    let repetitions = bench.profile.floor_repetitions;
    let mut table = CsvTable::new(&[
        "repetition",
        "floor_exec_to_main_ms",
        "floor_exec_to_running_ms",
        "floor_memory_registration_ms",
        "floor_exec_to_first_exit_ms",
        "floor_first_exit",
        "floor_vm_teardown_ms",
        "floor_exec_to_gone_ms",
        "recovery_exec_to_resumed_event_ms",
        "recovery_exec_to_vcpus_released_ms",
        "recovery_vmm_reported_from_exec_ms",
        "sigpwr_to_committed_ms",
        "committed_to_gone_ms",
        "sigpwr_to_gone_ms",
    ]);
    let mut floors = Vec::new();
    let mut recoveries = Vec::new();
    for index in 0..repetitions {
        bench
            .summary
            .progress(format!("A-floor repetition {}/{repetitions}", index + 1));
        // Alternate which goes first, so drift and cache warmth hit both alike.
        let (floor, recovery) = if index % 2 == 0 {
            let floor = floor_once(&helper, &region, extent, &registers)?;
            (floor, recover_once(bench, &region, index)?)
        } else {
            let recovery = recover_once(bench, &region, index)?;
            (floor_once(&helper, &region, extent, &registers)?, recovery)
        };
        let optional = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
        table.push(vec![
            index.to_string(),
            format!("{:.3}", floor.main),
            format!("{:.3}", floor.running),
            format!("{:.3}", floor.registration),
            format!("{:.3}", floor.first_exit),
            floor.exit_reason.clone(),
            format!("{:.3}", floor.teardown),
            format!("{:.3}", floor.gone),
            format!("{:.3}", recovery.resumed_event),
            optional(recovery.released),
            optional(recovery.vmm_from_exec),
            optional(recovery.signal_to_committed),
            optional(recovery.committed_to_gone),
            format!("{:.3}", recovery.signal_to_gone),
        ]);
        floors.push(floor);
        recoveries.push(recovery);
    }
    table.write(&bench.out_dir, "a_floor.csv")?;
    bench
        .summary
        .table("A-floor. floor and recovery, interleaved (ms)", &table);
    let floor_main: Vec<f64> = floors.iter().map(|f| f.main).collect();
    let floor_running: Vec<f64> = floors.iter().map(|f| f.running).collect();
    let floor_exit: Vec<f64> = floors.iter().map(|f| f.first_exit).collect();
    let teardown: Vec<f64> = floors.iter().map(|f| f.teardown).collect();
    let registration: Vec<f64> = floors.iter().map(|f| f.registration).collect();
    let resumed: Vec<f64> = recoveries.iter().map(|r| r.resumed_event).collect();
    let reported: Vec<f64> = recoveries.iter().filter_map(|r| r.vmm_from_exec).collect();
    let released: Vec<f64> = recoveries.iter().filter_map(|r| r.released).collect();
    let summary = &mut bench.summary;
    summary.line(format!(
        "A-floor floor exec->main (nv-floor's process start): {}",
        spread(&floor_main)
    ));
    summary.line(format!(
        "A-floor floor exec->running (nv-floor, before its first KVM_RUN): {}",
        spread(&floor_running)
    ));
    summary.line(format!(
        "A-floor floor KVM_SET_USER_MEMORY_REGION of the 1 GiB extent: {}",
        spread(&registration)
    ));
    summary.line(format!(
        "A-floor floor exec->first guest exit: {} (first exit: {})",
        spread(&floor_exit),
        floors
            .first()
            .map(|f| f.exit_reason.as_str())
            .unwrap_or("-")
    ));
    summary.line(format!(
        "A-floor recovery exec->resumed event (host, read from the event FIFO): {}",
        spread(&resumed)
    ));
    summary.line(format!(
        "A-floor recovery exec->vCPUs released (host clock, the VMM's `resumed in place` log line): {}",
        spread(&released)
    ));
    summary.line(format!(
        "A-floor recovery exec->resumed as the VMM reports it (sum of its phases): {}",
        spread(&reported)
    ));
    // The same instant on both sides: the process lets its vCPU run (nv-floor just before its
    // KVM_RUN; the VMM once it released the parked vCPU threads), by the host's clock.
    if let (Some(recovery), Some(floor)) = (median(&released), median(&floor_running)) {
        summary.line(format!(
            "A-floor RATIO recovery exec->vCPUs released / floor exec->running (medians) = {:.2}x",
            recovery / floor
        ));
    }
    // What a client sees: the `resumed` event read from the monitor, through the VMM's
    // event writer thread and a FIFO (the floor has neither).
    if let (Some(recovery), Some(floor)) = (median(&resumed), median(&floor_running)) {
        summary.line(format!(
            "A-floor RATIO recovery exec->resumed event / floor exec->running (medians) = {:.2}x",
            recovery / floor
        ));
    }
    let mut names: Vec<String> = Vec::new();
    for run in &recoveries {
        for (name, _) in &run.phases {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    let phases: Vec<String> = names
        .iter()
        .map(|name| {
            let values: Vec<f64> = recoveries
                .iter()
                .filter_map(|r| r.phases.iter().find(|(n, _)| n == name).map(|(_, v)| *v))
                .collect();
            format!("{name} {:.3}", median(&values).unwrap_or(f64::NAN))
        })
        .collect();
    summary.line(format!(
        "A-floor recovery phases, median ms (VMM -v log): {}",
        phases.join(", ")
    ));
    let column = |pick: &dyn Fn(&RecoveryRun) -> Option<f64>| -> Vec<f64> {
        recoveries.iter().filter_map(pick).collect()
    };
    summary.line(format!(
        "A-exit SIGPWR->committed event: {}",
        spread(&column(&|r| r.signal_to_committed))
    ));
    summary.line(format!(
        "A-exit committed event->process gone (reaped): {}",
        spread(&column(&|r| r.committed_to_gone))
    ));
    summary.line(format!(
        "A-exit SIGPWR->process gone (reaped): {}",
        spread(&column(&|r| Some(r.signal_to_gone)))
    ));
    summary.line(format!(
        "A-exit the kernel's teardown of a KVM VM (nv-floor closing its vCPU and VM fds): {}",
        spread(&teardown)
    ));
    let _ = std::fs::remove_file(&region);
    let _ = std::fs::remove_file(&registers);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recovery_line_gives_the_total_and_each_phase() {
        let log = "x INFO -- other\ncloud-hypervisor: ... VM \"floor\": resumed in place from seq 3 \
                   in 4000 us (5123 us from exec): process-start 812 us, vmm-init 301 us, resume 29 us\n";
        let (total, phases) = parse_recovery_line(log);
        assert_eq!(total, Some(5.123));
        assert_eq!(
            phases,
            vec![
                ("process-start".to_string(), 0.812),
                ("vmm-init".to_string(), 0.301),
                ("resume".to_string(), 0.029)
            ]
        );
        assert_eq!(parse_recovery_line("nothing"), (None, Vec::new()));
    }

    #[test]
    fn a_log_line_time_is_microseconds_since_the_epoch() {
        // `date -u -d 2026-11-28T03:57:12Z +%s` = 1795838232.
        let line = "cloud-hypervisor: 2026-11-28T03:57:12.646204Z: <main> INFO:vmm/src/nv/prepare.rs:428 -- x";
        assert_eq!(log_line_time_us(line), Some(1_795_838_232_646_204));
        let leap_day = "cloud-hypervisor: 2024-02-29T00:00:00.000001Z: <main> INFO: y";
        assert_eq!(log_line_time_us(leap_day), Some(1_709_164_800_000_001));
        assert_eq!(log_line_time_us("no timestamp"), None);
    }
}
