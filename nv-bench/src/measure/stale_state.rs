//! E. What happens when a saved state is resumed over guest memory that moved on after it was
//! taken. Issue 6 asks to show where upstream's fast paths are unsafe: a snapshot of a VM
//! whose RAM is a shared file holds no memory (the file is the memory), so restoring it
//! after the guest ran on puts old registers over newer memory. NV keeps a per-VM run
//! record for exactly this case and refuses the resume.
//!
//! The guest is `counter`, which keeps a checksum of a memory area and prints its counter.

use std::time::Duration;

use integration_tests::harness::counter_lines;

use crate::error::{BenchError, Result};
use crate::launch::{Launch, MemoryBacking, TestGuest};
use crate::measure::snapshot::{pause_and_snapshot, wait_for_socket};
use crate::measure::{Bench, LINE_TIMEOUT};
use crate::output::CsvTable;
use crate::running_vm::RunningVm;
use crate::serial::TimedLine;
use crate::vmm_process::run_command;

const RAM_BYTES: u64 = 64 << 20;
/// Progress lines the guest prints after the snapshot, before the VM dies.
const LINES_AFTER_SNAPSHOT: usize = 5;
/// How long the restored guest is watched.
const WATCH: Duration = Duration::from_secs(3);

/// One scenario: its outcome in words, or why it could not be run.
type Case = fn(&Bench) -> Result<String>;

pub fn run(bench: &mut Bench) -> Result<()> {
    bench.summary.line("");
    bench
        .summary
        .line("== E. resuming a saved state over guest memory that moved on after it was taken");
    let mut table = CsvTable::new(&["path", "outcome"]);
    let cases: [(&str, Case); 2] = [
        (
            "upstream-style snapshot of shared-file RAM, guest ran on, VM died, --restore",
            shared_memory_snapshot,
        ),
        (
            "NV: recovered, guest ran on, VM died without a save (SIGKILL), recover=on",
            nv_unsaved_death,
        ),
    ];
    for (path, case) in cases {
        match case(bench) {
            Ok(outcome) => {
                bench.summary.line(format!("E {path}: {outcome}"));
                table.push(vec![path.into(), outcome]);
            }
            Err(error) => bench
                .summary
                .not_measured(&format!("E {path}"), &error.to_string()),
        }
    }
    table.write(&bench.out_dir, "e_stale_state.csv")?;
    bench
        .summary
        .table("E. resuming a state over memory that moved on", &table);
    Ok(())
}

fn counter_guest(bench: &Bench) -> TestGuest {
    TestGuest {
        image: bench.counter_image.clone(),
        parameters: "area_mb=8".into(),
        ram_bytes: RAM_BYTES,
        tsc_khz: bench.tsc_khz,
        period_ms: 100,
        log_disk: None,
    }
}

fn counters(lines: &[TimedLine]) -> Vec<u64> {
    let mut text: String = lines.iter().map(|l| format!("{}\n", l.text)).collect();
    text.push('\n');
    counter_lines(&text).iter().map(|l| l.counter).collect()
}

fn start(
    bench: &Bench,
    launch: &Launch,
    tag: &str,
    socket: Option<&std::path::Path>,
) -> Result<RunningVm> {
    RunningVm::start(
        &bench.binaries.cloud_hypervisor,
        launch,
        &bench.disk.join("e.serial"),
        socket,
        &bench.disk.join(&format!("e-{tag}.vmm")),
        &bench.vmm_arguments,
    )
}

fn shared_memory_snapshot(bench: &Bench) -> Result<String> {
    let ram = bench.tmpfs.join("e.ram");
    // As upstream, `--memory-zone file=` must name an existing file.
    crate::environment::create_sparse_file(&ram, 0)?;
    let socket = bench.tmpfs.join("e.sock");
    let snapshot_dir = bench.disk.join("e.snapshot");
    let launch = Launch::Boot {
        guest: counter_guest(bench),
        backing: MemoryBacking::SharedFile(ram.clone()),
    };
    let result = (|| {
        let mut vm = start(bench, &launch, "boot", Some(&socket))?;
        vm.wait_for_lines("counter=", 3, LINE_TIMEOUT)?;
        wait_for_socket(&socket, Duration::from_secs(5))?;
        pause_and_snapshot(&bench.binaries.ch_remote, &socket, &snapshot_dir)?;
        let snapshot_files = std::fs::metadata(snapshot_dir.join("memory-ranges"))
            .map(|m| m.len())
            .unwrap_or(0);
        run_command(
            &bench.binaries.ch_remote,
            &[
                "--api-socket".into(),
                socket.display().to_string(),
                "resume".into(),
            ],
            Duration::from_secs(10),
        )?;
        let lines_at_snapshot = counters(&vm.serial.lines()).len();
        vm.wait_for(
            "the guest running on after the snapshot",
            LINE_TIMEOUT,
            |lines| counters(lines).len() >= lines_at_snapshot + LINES_AFTER_SNAPSHOT,
        )?;
        let before = vm.kill();
        let last_before = counters(&before).last().copied().unwrap_or(0);
        let _ = std::fs::remove_file(&socket);

        let mut restored = start(
            bench,
            &Launch::Restore {
                snapshot_dir: snapshot_dir.clone(),
                on_demand: false,
            },
            "restore",
            None,
        )?;
        let watched = restored.wait_for(
            "the restored guest's lines",
            WATCH + LINE_TIMEOUT,
            |lines| {
                lines
                    .last()
                    .is_some_and(|l| l.at >= restored_started(lines) + WATCH)
            },
        );
        let outcome = match watched {
            Err(BenchError::GuestFailed { line }) => format!(
                "RESUMED, then the guest itself found its memory inconsistent: {line:?} \
                 (memory-ranges held {snapshot_files} bytes: the RAM was not in the snapshot)"
            ),
            Err(other) => return Err(other),
            Ok(lines) => {
                let after = counters(&lines);
                match after.first() {
                    Some(&first) if first < last_before => format!(
                        "RESUMED a stale state: the counter went back from {last_before} to {first} \
                         over memory written after the snapshot, and nothing refused it \
                         (memory-ranges held {snapshot_files} bytes)"
                    ),
                    Some(&first) => format!(
                        "resumed; the counter went on from {last_before} to {first} (no visible harm this time)"
                    ),
                    None => "resumed; the guest printed no progress line".into(),
                }
            }
        };
        drop(restored.kill());
        Ok(outcome)
    })();
    let _ = std::fs::remove_file(&ram);
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_dir_all(&snapshot_dir);
    result
}

/// The host time of the first line seen, as the origin of the watch window.
fn restored_started(lines: &[TimedLine]) -> std::time::Instant {
    lines
        .first()
        .map(|l| l.at)
        .unwrap_or_else(std::time::Instant::now)
}

fn nv_unsaved_death(bench: &Bench) -> Result<String> {
    let region = bench.tmpfs.join("e.region");
    let recover = Launch::NvRecover {
        region: region.clone(),
        vm: "counter".into(),
    };
    let result = (|| {
        let boot = Launch::Boot {
            guest: counter_guest(bench),
            backing: MemoryBacking::NvRegion {
                region: region.clone(),
                vm: "counter".into(),
            },
        };
        let mut vm = start(bench, &boot, "nv-boot", None)?;
        vm.wait_for_lines("counter=", 3, LINE_TIMEOUT)?;
        vm.power_fail(Duration::from_secs(60))?;
        drop(vm.kill());
        let mut recovered = start(bench, &recover, "nv-recover", None)?;
        recovered.wait_for("the recovered guest running on", LINE_TIMEOUT, |lines| {
            counters(lines).len() >= LINES_AFTER_SNAPSHOT
        })?;
        // The host dies with no warning: no save, the guest's memory is newer than the state.
        drop(recovered.kill());
        let mut again = start(bench, &recover, "nv-recover-again", None)?;
        let Some(status) = again.exit_within(Duration::from_secs(30))? else {
            let lines = again.serial.lines();
            drop(again.kill());
            return Ok(format!(
                "RESUMED a stale state ({} lines printed)",
                lines.len()
            ));
        };
        let refusal = again
            .process
            .stderr_tail(5)
            .lines()
            .last()
            .unwrap_or("")
            .trim()
            .to_string();
        Ok(format!(
            "refused (exit code {}): {refusal}",
            status
                .code()
                .map(|c| c.to_string())
                .unwrap_or_else(|| status.to_string())
        ))
    })();
    let _ = std::fs::remove_file(&region);
    result
}
