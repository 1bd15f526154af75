//! Continuous NV checkpoints end to end (`--nv ...,checkpoint_ms=N`): the counter guest runs on
//! an NV region with checkpoints every 10 ms, its VMM dies without warning (SIGKILL, or an abort
//! at a fault point inside a checkpoint or inside recovery) at many random instants, and every
//! `recover=on` must resume it: never refused, never rebooted, the guest's own checksums intact,
//! and exactly from the last epoch a VMM reported committed before the death, or from the one
//! in progress at the death: no time enters the bound.
//!
//! How the test knows the epochs: each VMM runs with `-vv` and logs every epoch it commits
//! (`checkpoint seq N committed`, written after the commit) and the one it resumed. Once a VMM
//! is dead, `Region::inspect_recovery_memory` (read only) says which epoch a recovery would
//! resume and what the guest's mailbox holds in that epoch's memory: the guest stores its
//! counter there after every batch of steps (`mailbox_at=`). The guest prints a line at once when
//! its clock jumped by more than 20 ms (the TSC only moves forward across the gap, which the test
//! makes at least that long), so its first line after the resume is at most one batch past the
//! epoch's mailbox. Real KVM; never skipped silently.
//!
//! The last test does the same with a disk (the blkcheck guest checking its whole disk against
//! its memory): the disk must be rolled back with the guest.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::harness::{
    assert_early_checkpoints_never_failed, counter_lines, guest_arguments, scratch_dir,
};
use integration_tests::process::VmmProcess;

const INTERVAL_MS: u64 = 10;
const KILLS: usize = 200;
/// Guest-physical addresses of the guest's area and of its mailbox (in 64 MiB of RAM).
const AREA_AT: u64 = 0x100_0000;
const MAILBOX_AT: u64 = 0x180_0000;
const MAILBOX_MAGIC: u64 = 0x786f_626c_6961_6d63;
/// Steps the guest makes between two mailbox stores (and between two looks at its clock).
const BATCH: u64 = 4096;
const TIMEOUT: Duration = Duration::from_secs(30);
/// Fault points that abort the VMM inside a checkpoint or inside recovery from one.
const FAULT_POINTS: [&str; 5] = [
    "ckpt-undo-data",
    "ckpt-epoch-state",
    "ckpt-epoch-commit",
    "ckpt-recover-apply",
    "ckpt-recover-record",
];

fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn spawn(dir: &Path, label: &str, arguments: &[String], env: &[(&str, &str)]) -> VmmProcess {
    VmmProcess::spawn_with_serial_file(dir, label, arguments, env).with_timeout(TIMEOUT)
}

/// The arguments that boot the test guest `guest` with `parameters` in 64 MiB of RAM as the VM
/// `vm` of a new 160 MiB NV region `region`, checkpointed every `checkpoint_ms`.
fn checkpointed_boot(
    guest: &str,
    parameters: &str,
    region: &Path,
    vm: &str,
    checkpoint_ms: u64,
) -> Vec<String> {
    let mut arguments = guest_arguments(guest, parameters, "64M");
    arguments.extend([
        "--nv".into(),
        format!(
            "region={},vm={vm},create=on,region_size=160M,checkpoint_ms={checkpoint_ms}",
            region.display()
        ),
    ]);
    arguments
}

/// The counter guest of `checkpointed_boot` with its 4 MiB area and its mailbox, as the VM `c`.
fn checkpointed_counter(region: &Path) -> Vec<String> {
    let parameters = format!("area_mb=4 area_at={AREA_AT:#x} mailbox_at={MAILBOX_AT:#x}");
    checkpointed_boot("counter", &parameters, region, "c", INTERVAL_MS)
}

/// The arguments that recover the VM `vm` of `region` in place.
fn recover_arguments(region: &Path, vm: &str) -> Vec<String> {
    vec![
        "--nv".to_string(),
        format!("region={},vm={vm},recover=on", region.display()),
    ]
}

/// Where the guest's mailbox is in the region file: found once, it stays (in-place recovery).
/// The undo log holds copies of the mailbox's page too; guest RAM is the one at a 2 MiB
/// boundary of the file (the region's extent alignment) plus the mailbox's guest address.
fn find_mailbox(region: &Path) -> u64 {
    let bytes = std::fs::read(region).expect("reading the region");
    let magic = MAILBOX_MAGIC.to_le_bytes();
    let candidates: Vec<u64> = (MAILBOX_AT as usize..bytes.len().saturating_sub(16))
        .step_by(2 << 20)
        .filter(|at| bytes[*at..*at + 8] == magic)
        .map(|at| at as u64)
        .collect();
    assert_eq!(
        candidates.len(),
        1,
        "the guest's mailbox is not in the region once: {candidates:x?}"
    );
    candidates[0]
}

fn mailbox_counter(region: &File, at: u64) -> u64 {
    let mut word = [0u8; 16];
    region
        .read_exact_at(&mut word, at)
        .expect("reading the mailbox");
    assert_eq!(
        u64::from_le_bytes(word[..8].try_into().unwrap()),
        MAILBOX_MAGIC,
        "the mailbox moved"
    );
    u64::from_le_bytes(word[8..].try_into().unwrap())
}

/// The guest's steps per host millisecond between `since` (an instant and the mailbox then)
/// and `now`, if long enough apart to tell.
fn steps_per_ms(since: (Instant, u64), now: (Instant, u64)) -> Option<f64> {
    let elapsed_ms = now.0.duration_since(since.0).as_secs_f64() * 1000.0;
    (elapsed_ms >= 20.0 && now.1 > since.1).then(|| (now.1 - since.1) as f64 / elapsed_ms)
}

/// What one death was.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// SIGKILL while the guest runs, `delay` after its first line.
    Running(Duration),
    /// SIGKILL `delay` after the recovering VMM was started (inside recovery or just after).
    Recovering(Duration),
    /// `abort()` at a fault point of nv-extension (inside a checkpoint or a recovery).
    Fault(&'static str),
}

/// Ends this run's VMM by `death` and checks it died that way.
fn die(vmm: &mut VmmProcess, death: Death, run: usize) {
    match death {
        Death::Running(delay) | Death::Recovering(delay) => {
            std::thread::sleep(delay);
            vmm.signal(libc::SIGKILL);
            let status = vmm.wait_exit();
            // A recovery aborted by nothing may have ended on its own only by failing.
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "run {run}: the VMM ended before the kill ({status})\n{}",
                vmm.stderr_log()
            );
        }
        Death::Fault(point) => {
            // A point recovery may pass by (an empty undo log has no half) is replaced by a
            // kill.
            let status = vmm
                .wait_exit_within(Duration::from_secs(3))
                .unwrap_or_else(|| vmm.wait_exit());
            assert!(
                matches!(status.signal(), Some(libc::SIGABRT | libc::SIGKILL)),
                "run {run}: the VMM ended on its own at {point} ({status})\n{}",
                vmm.stderr_log()
            );
        }
    }
}

/// The last death of a series (a fault point ends the VMM itself); the caller then recovers
/// once more.
fn last_death(mut vmm: VmmProcess, death: Death) {
    if let Death::Running(delay) | Death::Recovering(delay) = death {
        std::thread::sleep(delay);
        vmm.signal(libc::SIGKILL);
    }
    let _ = vmm.wait_exit();
}

/// Removes a run's serial and stderr logs (hundreds of runs).
fn remove_run_logs(dir: &Path, label: &str) {
    for leftover in [format!("{label}.serial"), format!("{label}.stderr")] {
        let _ = std::fs::remove_file(dir.join(leftover));
    }
}

/// Asserts that the recovered run resumed the guest (no reboot, checksums intact) and returns
/// its first counter.
fn assert_resumed(run: usize, log: &str, stderr: &str) -> u64 {
    assert!(
        !log.contains("counter: boot"),
        "run {run}: the guest booted again instead of resuming\n{log}\n{stderr}"
    );
    assert!(
        !log.contains("MISMATCH"),
        "run {run}: the guest's checksum failed after recovery\n{log}"
    );
    let lines = counter_lines(log);
    assert!(
        lines.iter().all(|line| line.ok),
        "run {run}: a line is not ok\n{log}"
    );
    lines[0].counter
}

/// Over the guest's `GAP_MS` (20): a clock jump longer than that between two batches makes it
/// print a line at once. The test starts every recovery it checks at least this long after the
/// death, so the guest's first line after the resume is within a batch of the epoch's counter.
/// (Its TSC is the host's and counts at the `tsc_khz=` it was given.)
const GUEST_GAP: Duration = Duration::from_millis(21);

/// The epochs a VMM's log says it committed (`checkpoint seq N committed`, at `-vv`) or resumed
/// from (`resuming ... state seq N`), in order; complete lines only.
fn reported_epochs(stderr: &str) -> Vec<u64> {
    stderr
        .split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .filter_map(|line| {
            let seq = if let Some((_, after)) = line.split_once("checkpoint seq ") {
                after.split_once(" committed")?.0
            } else {
                line.split_once(": resuming ")?
                    .1
                    .split_once(" state seq ")?
                    .1
            };
            seq.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// The epoch a recovering VMM's log says it resumed (`resuming ... state seq N`).
fn resumed_epoch(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|line| {
        let after = line
            .split_once(": resuming ")?
            .1
            .split_once(" state seq ")?
            .1;
        after.split_whitespace().next()?.parse().ok()
    })
}

/// What a recovery of the region would resume now (the VMM is dead; nothing is written): the
/// epoch's sequence and the counter its memory holds in the guest's mailbox.
fn recoverable_epoch(region: &Path) -> (u64, u64) {
    let options = nv_extension::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let mut mailbox = [0u8; 16];
    let recovered = nv_extension::Region::open(region, &options)
        .and_then(|region| region.inspect_recovery_memory("c", MAILBOX_AT, &mut mailbox))
        .unwrap_or_else(|e| panic!("inspecting the recovery of {}: {e}", region.display()));
    assert_eq!(
        u64::from_le_bytes(mailbox[..8].try_into().unwrap()),
        MAILBOX_MAGIC,
        "no mailbox in the epoch's memory"
    );
    (
        recovered.seq,
        u64::from_le_bytes(mailbox[8..].try_into().unwrap()),
    )
}

#[test]
fn sigkill_at_random_instants_resumes_every_time_from_the_last_reported_epoch() {
    integration_tests::require_kvm!();
    let started = Instant::now();
    let dir = scratch_dir();
    let dir = dir.path();
    let region = dir.join("region");
    // A second `-v` (the harness adds one): at debug level every committed epoch is logged.
    let mut boot = checkpointed_counter(&region);
    boot.push("-v".into());
    let mut recover = recover_arguments(&region, "c");
    recover.push("-v".into());
    let mut vmm = spawn(dir, "boot", &boot, &[]);
    vmm.wait_serial("three counter lines", |log| counter_lines(log).len() >= 3);
    let mailbox = find_mailbox(&region);
    let region_file = File::open(&region).unwrap();
    // The guest's pace, host time, checkpoints included (only to print the loss in ms); each
    // run that lives long enough measures it again for its own death.
    let mut watched = (Instant::now(), mailbox_counter(&region_file, mailbox));
    std::thread::sleep(Duration::from_millis(300));
    let mut rate = steps_per_ms(
        watched,
        (Instant::now(), mailbox_counter(&region_file, mailbox)),
    )
    .expect("the guest makes no progress");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut losses_ms = Vec::new();
    let mut deaths = [0usize; 3];
    // How often recovery found the epoch in progress at the death committed (its log line
    // not yet written) rather than the last one reported.
    let mut in_progress = 0usize;
    // The newest epoch any VMM of the series reported committed (or resumed from) so far.
    let mut reported = 0u64;
    // The epoch the running recovery must resume, once there is one.
    let mut expected = None;
    let mut death = Death::Running(Duration::ZERO);
    let mut label = "boot".to_string();
    // Every death is followed by a recovery; the last one must resume as well (then it is
    // killed, unchecked).
    for run in 0..KILLS {
        // The death of this run's VMM, then what it left in the region.
        die(&mut vmm, death, run);
        deaths[match death {
            Death::Running(_) => 0,
            Death::Recovering(_) => 1,
            Death::Fault(_) => 2,
        }] += 1;
        let dead_at = Instant::now();
        let killed_at = mailbox_counter(&region_file, mailbox);
        let stderr = vmm.stderr_log();
        // A recovery that got as far as resuming resumed the epoch the region held.
        if let (Some(resumed), Some(expected)) = (resumed_epoch(&stderr), expected) {
            assert_eq!(
                resumed, expected,
                "run {run}: resumed epoch {resumed}, not the one the region held\n{stderr}"
            );
        }
        let guest_ran = matches!(death, Death::Running(_));
        if guest_ran {
            rate = steps_per_ms(watched, (Instant::now(), killed_at)).unwrap_or(rate);
        }
        drop(vmm);
        // Nothing committed is lost, nothing is invented: recovery resumes the last epoch any
        // VMM reported committed, or the one that was in progress at the death (committed, its
        // log line not written yet), never an older or a newer one.
        let newest = reported_epochs(&stderr).into_iter().max().unwrap_or(0);
        reported = reported.max(newest);
        let (epoch, epoch_counter) = recoverable_epoch(&region);
        assert!(
            epoch >= reported,
            "run {run}: epoch {reported} was reported committed, but recovery would resume \
             the older epoch {epoch}\n{stderr}"
        );
        assert!(
            epoch <= reported + 1,
            "run {run}: recovery would resume epoch {epoch}, newer than the one in progress \
             after the last reported, {reported}\n{stderr}"
        );
        in_progress += usize::from(epoch > reported);
        reported = epoch;
        expected = Some(epoch);
        // The epoch's counter is one the guest had before the death.
        assert!(
            epoch_counter <= killed_at,
            "run {run}: epoch {epoch} holds counter {epoch_counter}, beyond {killed_at} at the \
             death"
        );
        // Its logs are read: hundreds of runs.
        remove_run_logs(dir, &label);

        // The next death: mostly while the guest runs, else inside recovery; the last recovery
        // runs and is checked.
        death = match next_random(&mut seed) % 20 {
            _ if run == KILLS - 1 => Death::Running(Duration::ZERO),
            0..=13 => Death::Running(Duration::from_millis(next_random(&mut seed) % 100)),
            14..=16 => Death::Recovering(Duration::from_millis(next_random(&mut seed) % 80)),
            _ => Death::Fault(FAULT_POINTS[next_random(&mut seed) as usize % FAULT_POINTS.len()]),
        };
        let env: Vec<(&str, &str)> = match death {
            Death::Fault(point) => vec![("NV_FAULT_AFTER_PHASE", point)],
            _ => Vec::new(),
        };
        if matches!(death, Death::Running(_)) {
            // Far enough from the epoch that the guest notices the gap and prints at once.
            std::thread::sleep(GUEST_GAP.saturating_sub(dead_at.elapsed()));
        }
        label = format!("recover{run}");
        vmm = spawn(dir, &label, &recover, &env);
        match death {
            Death::Running(_) => {
                let log = vmm.wait_serial("a counter line after recovery", |log| {
                    !counter_lines(log).is_empty() || log.contains("MISMATCH")
                });
                let stderr = vmm.stderr_log();
                let resumed_at = assert_resumed(run, &log, &stderr);
                watched = (Instant::now(), mailbox_counter(&region_file, mailbox));
                assert_eq!(
                    resumed_epoch(&stderr),
                    Some(epoch),
                    "run {run}: not the epoch the region holds\n{stderr}"
                );
                // The guest resumed the epoch's own state: its mailbox lags its counter by at
                // most a batch, and its first line comes at the end of the batch the epoch cut
                // (or at once, if the epoch came after the batch's mailbox store).
                assert!(
                    (epoch_counter..=epoch_counter + BATCH).contains(&resumed_at),
                    "run {run}: resumed at counter {resumed_at}, but epoch {epoch} holds \
                     {epoch_counter}\n{log}"
                );
                if guest_ran {
                    losses_ms.push(killed_at.saturating_sub(epoch_counter) as f64 / rate);
                }
            }
            Death::Recovering(_) | Death::Fault(_) => {}
        }
    }
    vmm.signal(libc::SIGKILL);
    let _ = vmm.wait_exit();

    losses_ms.sort_by(f64::total_cmp);
    eprintln!(
        "{KILLS} deaths ({} running, {} in recovery, {} at fault points) in {:.1} s; recovery \
         resumed the last epoch reported committed, or the one in progress at the death \
         ({in_progress} times), every time; guest time lost per death running: median {:.1} ms, \
         max {:.1} ms (interval {INTERVAL_MS} ms)",
        deaths[0],
        deaths[1],
        deaths[2],
        started.elapsed().as_secs_f64(),
        losses_ms[losses_ms.len() / 2],
        losses_ms.last().unwrap()
    );
}

/// A power-fail save (SIGPWR) of a VM with checkpoints on is newer than any epoch, so recovery
/// resumes from the save, not from the last epoch: the guest's first counter after recovery is
/// at least the one its mailbox held in the saved memory (a rollback to the epoch would give
/// less), its checksums hold, and it did not boot again.
#[test]
fn a_power_fail_save_with_checkpoints_on_resumes_from_the_save_not_the_epoch() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let dir = dir.path();
    let region = dir.join("region");
    let boot = checkpointed_counter(&region);
    let mut vmm = spawn(dir, "boot", &boot, &[]);
    vmm.wait_serial("three counter lines", |log| counter_lines(log).len() >= 3);
    // Several epochs pass, so an epoch older than the save stands in the region.
    std::thread::sleep(Duration::from_millis(10 * INTERVAL_MS));
    let stderr = vmm.signal_and_expect_exit(
        libc::SIGPWR,
        vmm::nv::EXIT_POWER_FAIL_SAVED,
        "power-fail exit",
    );
    assert!(
        stderr.contains("power-fail save committed"),
        "no save report:\n{stderr}"
    );
    let mailbox = find_mailbox(&region);
    let saved = mailbox_counter(&File::open(&region).unwrap(), mailbox);
    drop(vmm);

    let recover = recover_arguments(&region, "c");
    let mut vmm = spawn(dir, "recover", &recover, &[]);
    let log = vmm.wait_serial("a counter line", |log| !counter_lines(log).is_empty());
    let first = assert_resumed(0, &log, &vmm.stderr_log());
    assert!(
        first >= saved,
        "recovered from counter {first}, older than the saved memory's {saved}: rolled back"
    );
    vmm.kill();
}

/// Issue 16's first edge: a vCPU blocked on a full undo log (its page stays protected, the
/// early checkpoint withheld by the test build's `NV_HOLD_FULL_LOG`, so it waits as long as the
/// test likes) when SIGPWR comes. The guest fills its 24 MiB area right after boot, far more
/// pages than the undo log of 64 MiB of RAM (one eighth of its pages) holds, so it blocks in
/// that first pass. The kick must get the vCPU out of its wait on the page, so the power-fail
/// save completes promptly; recovery resumes exactly the saved memory (the blocked write is
/// re-executed after the resume): the guest finishes its pass and every checksum of the area
/// holds, without a boot.
#[test]
fn sigpwr_while_a_vcpu_waits_on_a_full_undo_log_saves_promptly_and_recovers_exactly() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let dir = dir.path();
    let region = dir.join("region");
    let parameters = format!("area_mb=24 area_at={AREA_AT:#x}");
    let boot = checkpointed_boot("counter", &parameters, &region, "c", 3_600_000);
    let mut vmm = spawn(dir, "boot", &boot, &[("NV_HOLD_FULL_LOG", "1")]);
    vmm.wait_stderr("the undo log full", |log| {
        log.contains("the undo log is full; NV_HOLD_FULL_LOG")
    });
    // The guest is stuck on the page it could not log: no line comes.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        counter_lines(&vmm.serial_log()).is_empty(),
        "the guest ran on past a full undo log:\n{}",
        vmm.serial_log()
    );
    let kicked = Instant::now();
    let stderr = vmm.signal_and_expect_exit(
        libc::SIGPWR,
        vmm::nv::EXIT_POWER_FAIL_SAVED,
        "power-fail exit",
    );
    let took = kicked.elapsed();
    let report = stderr
        .lines()
        .find(|line| line.contains("power-fail save committed"))
        .unwrap_or_else(|| panic!("no save report:\n{stderr}"));
    eprintln!("SIGPWR to exit {took:?}: {report}");
    // The vCPU pause gives up after 2 s; a kick that did not reach the waiting vCPU would have
    // failed the save or taken that long.
    assert!(
        took < Duration::from_millis(1500),
        "the save took {took:?}:\n{stderr}"
    );
    drop(vmm);

    let recover = recover_arguments(&region, "c");
    let mut vmm = spawn(dir, "recover", &recover, &[]);
    let log = vmm.wait_serial("two counter lines", |log| {
        counter_lines(log).len() >= 2 || log.contains("MISMATCH")
    });
    assert_resumed(0, &log, &vmm.stderr_log());
    assert!(
        vmm.stderr_log().contains("resuming power-fail state"),
        "{}",
        vmm.stderr_log()
    );
    vmm.kill();
}

// ---- The same with a disk (issue 16, item 3, disk part) ----
//
// The blkcheck guest writes sequence-numbered blocks to a virtio-blk disk with
// `checkpoint_ms=10` and, before each batch, reads every block back and checks it holds what the
// guest's memory says it last wrote there (`verify=all`). Its VMM dies at random instants
// (SIGKILL while running or during recovery, abort at `ckpt-undo-data`), and every `recover=on`
// must resume it: never refused, never rebooted, the guest's own whole-disk check passing after
// the rollback, and it goes on writing. Without the disk undo, a rollback leaves blocks the
// guest wrote after the epoch on the disk, and that check fails.

/// Deaths of the disk test, and the blocks its guest writes round after round.
const DISK_KILLS: usize = 150;
const BLOCKS: u64 = 32;

/// The boot arguments of the blkcheck guest (whole-disk verification, batches of 4) on a new
/// `BLOCKS`-block `disk.img` in `dir`, as VM `vm` of `region` with checkpoints on; `extra` is
/// appended to the guest's parameters.
fn checkpointed_blkcheck(dir: &Path, region: &Path, vm: &str, extra: &str) -> Vec<String> {
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(BLOCKS * 4096))
        .expect("disk image");
    let parameters = format!("blocks={BLOCKS} rounds=1000000 batch=4 verify=all{extra}");
    let mut boot = checkpointed_boot("blkcheck", &parameters, region, vm, INTERVAL_MS);
    boot.extend(["--disk".into(), format!("path={}", disk.display())]);
    boot
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
fn assert_disk_resumed(run: usize, log: &str, stderr: &str) {
    assert!(
        !log.contains("blkcheck: disk sectors="),
        "run {run}: the guest booted again instead of resuming\n{log}\n{stderr}"
    );
    assert!(
        !log.contains("FAIL"),
        "run {run}: the disk does not match the rolled-back guest\n{log}\n{stderr}"
    );
}

#[test]
fn sigkill_at_random_instants_leaves_the_disk_as_the_rolled_back_guest_believes() {
    integration_tests::require_kvm!();
    let started = Instant::now();
    let dir = scratch_dir();
    let dir = dir.path();
    let region = dir.join("region");
    let boot = checkpointed_blkcheck(dir, &region, "b", "");
    let recover = recover_arguments(&region, "b");
    let mut vmm = spawn(dir, "boot", &boot, &[]);
    let log = vmm.wait_serial("a few batches", |log| {
        completed(log).len() >= 3 || log.contains("FAIL")
    });
    assert!(!log.contains("FAIL"), "{log}");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut deaths = [0usize; 3];
    let mut death = Death::Running(Duration::from_millis(50));
    let mut progress = Vec::new();
    for run in 0..DISK_KILLS {
        die(&mut vmm, death, run);
        drop(vmm);
        death = match next_random(&mut seed) % 10 {
            0..=6 => Death::Running(Duration::from_millis(next_random(&mut seed) % 120)),
            7..=8 => Death::Recovering(Duration::from_millis(next_random(&mut seed) % 60)),
            _ => Death::Fault("ckpt-undo-data"),
        };
        let env: Vec<(&str, &str)> = match death {
            Death::Fault(point) => vec![("NV_FAULT_AFTER_PHASE", point)],
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
                assert_disk_resumed(run, &log, &vmm.stderr_log());
                progress.push(*completed(&log).last().unwrap());
                deaths[0] += 1;
            }
            Death::Recovering(_) => deaths[1] += 1,
            Death::Fault(_) => deaths[2] += 1,
        }
        remove_run_logs(dir, &label);
    }
    last_death(vmm, death);
    let mut last = spawn(dir, "last", &recover, &[]);
    let log = last.wait_serial("three batches after the last recovery", |log| {
        completed(log).len() >= 3 || log.contains("FAIL")
    });
    assert_disk_resumed(DISK_KILLS, &log, &last.stderr_log());
    last.signal(libc::SIGKILL);
    let _ = last.wait_exit();
    // The guest went on writing across the deaths: the runs that lived reached later blocks.
    assert!(
        progress.last() > progress.first(),
        "the guest made no progress across the deaths: {progress:?}"
    );
    eprintln!(
        "{DISK_KILLS} deaths ({} running, {} in recovery, {} at ckpt-undo-data) in {:.1} s; the \
         rolled-back guest's whole-disk check passed after every recovery (seq {:?} .. {:?})",
        deaths[0],
        deaths[1],
        deaths[2],
        started.elapsed().as_secs_f64(),
        progress.first(),
        progress.last()
    );
}

/// Issue 16, `docs/checkpoints.md` section 9: a device thread that writes guest memory while
/// the undo log is full. The test build's `NV_UNDO_LIMIT_PAGES=8` gives every epoch a log of
/// 8 entries, so the blkcheck guest's own writes fill it again and again, and early
/// checkpoints follow one another. Each of its disk reads (`verify=all` reads the whole disk
/// before every batch, `verify_span=4`: four blocks per request into pages only the device
/// writes) writes up to six pages of guest memory on the virtio-blk thread: four buffer pages,
/// the status byte, the used ring. Before the fix the thread wrote them into protected pages
/// and, the log full, waited in the write fault in the middle of the request; the checkpoint's
/// one-entry reserve could not serve them all, the I/O thread never reached its quiescent
/// point, and the guest stopped (the checkpoint failed after 10 s, again and again). Now the
/// device logs a request's pages before it writes any, and waits for the next epoch at the
/// request's boundary when they do not fit: the guest goes on, and no checkpoint fails.
#[test]
fn disk_reads_with_a_tiny_undo_log_wait_for_the_next_epoch_between_requests() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let dir = dir.path();
    let region = dir.join("region");
    let boot = checkpointed_blkcheck(dir, &region, "t", " verify_span=4");
    let mut vmm = spawn(dir, "boot", &boot, &[("NV_UNDO_LIMIT_PAGES", "8")]);
    let log = vmm.wait_serial("100 batches, each reading the whole disk", |log| {
        completed(log).len() >= 100 || log.contains("FAIL")
    });
    assert!(!log.contains("FAIL"), "{log}");
    let early = assert_early_checkpoints_never_failed(&vmm);
    eprintln!("{early} early checkpoints");
    vmm.kill();
}

/// An epoch's disk undo entries name disks by their position in the VM's config, which a disk's
/// removal would shift: `vm.remove-device` of a disk is refused (409, naming it) while
/// checkpoints are on, and accepted once they are off. The other way round, too: while the
/// guest has not ejected a disk it was asked to give up (the counter guest never does),
/// turning checkpoints on is refused (409, naming the disk), since the eject would come in
/// an epoch whose entries name disks by the old positions.
#[test]
fn a_disk_is_not_removed_while_checkpoints_are_on_nor_checkpoints_started_while_it_goes() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let dir = dir.path();
    let region = dir.join("region");
    let disk = dir.join("disk.img");
    File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk image");
    let socket = dir.join("api.sock");
    let mut boot = checkpointed_boot("counter", "", &region, "r", INTERVAL_MS);
    boot.extend([
        "--disk".into(),
        format!("path={},id=data0", disk.display()),
        "--api-socket".into(),
        format!("path={}", socket.display()),
    ]);
    let mut vmm = spawn(dir, "boot", &boot, &[]);
    vmm.wait_for_socket(&socket, TIMEOUT);
    vmm.wait_serial("a counter line", |log| !counter_lines(log).is_empty());
    let request = |method: &str, path: &str, body: &str| {
        integration_tests::api_client::request(&socket, method, path, body, TIMEOUT)
    };
    let (status, answer) = request("PUT", "vm.remove-device", r#"{"id":"data0"}"#);
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer.contains("data0") && answer.contains("checkpoints"),
        "{answer}"
    );
    let (status, answer) = request("PUT", "vm.nv-checkpoint", r#"{"interval_ms":0}"#);
    assert_eq!(status, 204, "{answer}");
    let (status, answer) = request("PUT", "vm.remove-device", r#"{"id":"data0"}"#);
    assert_eq!(status, 204, "{answer}");
    let (status, answer) = request(
        "PUT",
        "vm.nv-checkpoint",
        &format!(r#"{{"interval_ms":{INTERVAL_MS}}}"#),
    );
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer.contains("data0") && answer.contains("removal"),
        "{answer}"
    );
    let (status, answer) = request("GET", "vm.nv-status", "");
    assert_eq!(status, 200, "{answer}");
    let nv_status: serde_json::Value = serde_json::from_str(&answer).expect("nv-status JSON");
    assert!(
        nv_status["checkpoint"].is_null(),
        "checkpoints stayed off: {answer}"
    );
    vmm.kill();
}

/// A checkpoint is one operation built from a pause and a resume: like the other composite
/// operations (docs/api.md, "Events") it reports none of their `vm` events. At 10 ms they were
/// 400 events a second in the event log, and waking the event-monitor thread inside every
/// pause made the resume wait for the CPU.
#[test]
fn checkpoints_report_no_pause_or_resume_events() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let dir = dir.path();
    let region = dir.join("region");
    let events = dir.join("events.json");
    let socket = dir.join("api.sock");
    let mut boot = checkpointed_counter(&region);
    boot.extend([
        "--event-monitor".into(),
        format!("path={}", events.display()),
        "--api-socket".into(),
        format!("path={}", socket.display()),
    ]);
    let mut vmm = spawn(dir, "boot", &boot, &[]);
    vmm.wait_serial("three counter lines", |log| counter_lines(log).len() >= 3);
    let ch_remote = |verb: &[&str]| {
        let output = std::process::Command::new(integration_tests::binaries::ch_remote())
            .arg("--api-socket")
            .arg(&socket)
            .args(verb)
            .output()
            .expect("running ch-remote");
        assert!(output.status.success(), "ch-remote {verb:?}: {output:?}");
        output.stdout
    };
    let status: serde_json::Value =
        serde_json::from_slice(&ch_remote(&["nv-persist", "status"])).expect("status JSON");
    let epochs = status["checkpoint"]["epochs"].as_u64().unwrap_or(0);
    assert!(epochs >= 5, "only {epochs} checkpoints ran: {status}");
    // A clean exit writes every queued event out.
    ch_remote(&["shutdown-vmm"]);
    vmm.wait_exit();
    let names = integration_tests::harness::event_names(&events);
    assert!(
        names.iter().any(|name| name == "vm:booted") && names.iter().any(|n| n == "vmm:shutdown"),
        "the event log is incomplete: {names:?}"
    );
    let reported: Vec<&String> = names
        .iter()
        .filter(|name| {
            ["vm:pausing", "vm:paused", "vm:resuming", "vm:resumed"].contains(&name.as_str())
        })
        .collect();
    assert!(
        reported.is_empty(),
        "{epochs} checkpoints reported pause/resume events: {reported:?}"
    );
}
