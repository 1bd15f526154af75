//! Continuous NV checkpoints with a disk (issue 16, item 3, disk part): the blkcheck guest
//! writes sequence-numbered blocks to a virtio-blk disk with `checkpoint_ms=10` and, before
//! each batch, reads every block back and checks it holds what the guest's memory says it last
//! wrote there (`verify=all`). Its VMM is SIGKILLed at random instants (also during recovery,
//! and at the fault point between an undo entry's data and its header), and every `recover=on`
//! must resume it: never refused, never rebooted, and the guest's own whole-disk check passes
//! after the rollback, then it goes on writing. Without the disk undo, a rollback leaves
//! blocks the guest wrote after the epoch on the disk, and that check fails. Real KVM; never
//! skipped silently.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::harness::{guest_cmdline, scratch_dir, test_guest};
use integration_tests::process::VmmProcess;

const INTERVAL_MS: u64 = 10;
const KILLS: usize = 150;
const BLOCKS: u64 = 32;
const TIMEOUT: Duration = Duration::from_secs(30);

fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn spawn(dir: &Path, label: &str, arguments: &[String], env: &[(&str, &str)]) -> VmmProcess {
    VmmProcess::spawn_with_serial_file(dir, label, arguments, env).with_timeout(TIMEOUT)
}

/// The `completed seq=` values of a blkcheck log, in order.
fn completed(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|line| line.strip_prefix("blkcheck: completed seq="))
        .filter_map(|seq| seq.trim().parse().ok())
        .collect()
}

/// Asserts a recovered run resumed the guest (no new boot line, no FAIL) and that it verified
/// the whole disk at least once since (a completed batch after a full one).
fn assert_resumed(run: usize, log: &str, stderr: &str) {
    assert!(
        !log.contains("blkcheck: disk sectors="),
        "run {run}: the guest booted again instead of resuming\n{log}\n{stderr}"
    );
    assert!(
        !log.contains("FAIL"),
        "run {run}: the disk does not match the rolled-back guest\n{log}\n{stderr}"
    );
}

#[derive(Clone, Copy, Debug)]
enum Death {
    Running(Duration),
    Recovering(Duration),
    /// Abort after an undo entry's data is durable, before its header (page or disk block).
    UndoData,
}

#[test]
fn sigkill_at_random_instants_leaves_the_disk_as_the_rolled_back_guest_believes() {
    integration_tests::require_kvm!();
    let started = Instant::now();
    let dir = scratch_dir();
    let dir = dir.path();
    let region = dir.join("region");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(BLOCKS * 4096))
        .expect("disk image");
    let boot = vec![
        "--kernel".to_string(),
        test_guest("blkcheck").display().to_string(),
        "--cmdline".into(),
        guest_cmdline(&format!(
            "blocks={BLOCKS} rounds=1000000 batch=4 verify=all"
        )),
        "--memory".into(),
        "size=64M".into(),
        "--disk".into(),
        format!("path={}", disk.display()),
        "--nv".into(),
        format!(
            "region={},vm=b,create=on,region_size=160M,checkpoint_ms={INTERVAL_MS}",
            region.display()
        ),
    ];
    let recover = vec![
        "--nv".to_string(),
        format!("region={},vm=b,recover=on", region.display()),
    ];
    let mut vmm = spawn(dir, "boot", &boot, &[]);
    let log = vmm.wait_serial("a few batches", |log| {
        completed(log).len() >= 3 || log.contains("FAIL")
    });
    assert!(!log.contains("FAIL"), "{log}");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut deaths = [0usize; 3];
    let mut death = Death::Running(Duration::from_millis(50));
    let mut progress = Vec::new();
    for run in 0..KILLS {
        match death {
            Death::Running(delay) | Death::Recovering(delay) => {
                std::thread::sleep(delay);
                vmm.signal(libc::SIGKILL);
                let status = vmm.wait_exit();
                assert_eq!(
                    status.signal(),
                    Some(libc::SIGKILL),
                    "run {run}: the VMM ended before the kill ({status})\n{}",
                    vmm.stderr_log()
                );
            }
            Death::UndoData => {
                let status = vmm
                    .wait_exit_within(Duration::from_secs(3))
                    .unwrap_or_else(|| vmm.wait_exit());
                assert!(
                    matches!(status.signal(), Some(libc::SIGABRT | libc::SIGKILL)),
                    "run {run}: the VMM ended on its own ({status})\n{}",
                    vmm.stderr_log()
                );
            }
        }
        drop(vmm);
        death = match next_random(&mut seed) % 10 {
            0..=6 => Death::Running(Duration::from_millis(next_random(&mut seed) % 120)),
            7..=8 => Death::Recovering(Duration::from_millis(next_random(&mut seed) % 60)),
            _ => Death::UndoData,
        };
        let env: Vec<(&str, &str)> = match death {
            Death::UndoData => vec![("NV_FAULT_AFTER_PHASE", "ckpt-undo-data")],
            _ => Vec::new(),
        };
        let label = format!("recover{run}");
        vmm = spawn(dir, &label, &recover, &env);
        match death {
            Death::Running(_) => {
                // Two batches after the resume: the second one's whole-disk check ran wholly
                // after the rollback.
                let log = vmm.wait_serial("two batches after recovery", |log| {
                    completed(log).len() >= 2 || log.contains("FAIL")
                });
                assert_resumed(run, &log, &vmm.stderr_log());
                progress.push(*completed(&log).last().unwrap());
                deaths[0] += 1;
            }
            Death::Recovering(_) => deaths[1] += 1,
            Death::UndoData => deaths[2] += 1,
        }
        for leftover in [format!("{label}.serial"), format!("{label}.stderr")] {
            let _ = std::fs::remove_file(dir.join(leftover));
        }
    }
    if let Death::Running(delay) | Death::Recovering(delay) = death {
        std::thread::sleep(delay);
        vmm.signal(libc::SIGKILL);
    }
    let _ = vmm.wait_exit();
    drop(vmm);
    let mut last = spawn(dir, "last", &recover, &[]);
    let log = last.wait_serial("three batches after the last recovery", |log| {
        completed(log).len() >= 3 || log.contains("FAIL")
    });
    assert_resumed(KILLS, &log, &last.stderr_log());
    last.signal(libc::SIGKILL);
    let _ = last.wait_exit();
    // The guest went on writing across the deaths: the runs that lived reached later blocks.
    assert!(
        progress.last() > progress.first(),
        "the guest made no progress across the deaths: {progress:?}"
    );
    eprintln!(
        "{KILLS} deaths ({} running, {} in recovery, {} at ckpt-undo-data) in {:.1} s; the \
         rolled-back guest's whole-disk check passed after every recovery (seq {:?} .. {:?})",
        deaths[0],
        deaths[1],
        deaths[2],
        started.elapsed().as_secs_f64(),
        progress.first(),
        progress.last()
    );
}
