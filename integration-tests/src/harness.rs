//! Helpers shared by the KVM end-to-end tests: the /dev/kvm gate, the test guests' command line,
//! waiting on a guest's serial log, and parsing the counter guest's progress lines.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The test guest `name` (`integration-tests/guests/`), built on first use; a build failure
/// fails the test with the compiler's message.
pub fn test_guest(name: &str) -> PathBuf {
    crate::guests::guest_image(name)
        .unwrap_or_else(|e| panic!("building the {name} test guest: {e}"))
}

/// A scratch directory for regions and logs: on tmpfs when there is one (regions stand in for
/// NV memory there), else the system temp dir. Removed when dropped.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).expect("tempdir in /dev/shm")
    } else {
        tempfile::tempdir().expect("tempdir")
    }
}

/// Set to `1` to let KVM tests skip on a machine without `/dev/kvm` (they print that they did).
pub const SKIP_KVM_ENV: &str = "NV_SKIP_KVM";

/// Returns `true` when the KVM tests can run. Without `/dev/kvm` this panics, failing the test
/// loudly, unless `NV_SKIP_KVM=1` is set: then it prints a skip notice and returns `false`.
pub fn kvm_available(test: &str) -> bool {
    let skip_requested = std::env::var(SKIP_KVM_ENV).as_deref() == Ok("1");
    kvm_gate(Path::new("/dev/kvm"), skip_requested, test)
}

/// The KVM gate at the top of a KVM test: returns from the test (the caller) when
/// `kvm_available` says to skip, naming the test by its own function name.
#[macro_export]
macro_rules! require_kvm {
    () => {{
        fn here() {}
        if !$crate::harness::kvm_available($crate::harness::enclosing_function(
            ::std::any::type_name_of_val(&here),
        )) {
            return;
        }
    }};
}

/// The name of the function that holds `here`, from `here`'s type name
/// (`crate::module::function::here`): what `require_kvm!` reports a skip or failure under.
pub fn enclosing_function(here: &str) -> &str {
    let path = here.strip_suffix("::here").unwrap_or(here);
    path.rsplit("::").next().unwrap_or(path)
}

/// `kvm_available` with its inputs explicit, so the gate itself can be tested.
fn kvm_gate(device: &Path, skip_requested: bool, test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .is_ok();
    if usable {
        return true;
    }
    if skip_requested {
        eprintln!(
            "SKIPPED {test}: {} is not usable and {SKIP_KVM_ENV}=1 is set",
            device.display()
        );
        return false;
    }
    panic!(
        "{test}: {} is missing or not accessible; KVM tests never skip silently \
         (set {SKIP_KVM_ENV}=1 to skip them explicitly)",
        device.display()
    );
}

/// The rate the guests' TSC counts at (KVM_GET_TSC_KHZ, `tsc.rs`), asked once.
pub fn guest_tsc_khz() -> u32 {
    static KHZ: OnceLock<u32> = OnceLock::new();
    *KHZ.get_or_init(|| {
        crate::tsc::guest_tsc_khz()
            .unwrap_or_else(|e| panic!("reading the guest TSC rate for tsc_khz=: {e}"))
    })
}

/// A test guest's kernel command line: `parameters` plus `tsc_khz=` with the real TSC rate. The
/// guests pace themselves by the TSC ("a line about every 100 ms") and assume 2 GHz unless told.
pub fn guest_cmdline(parameters: &str) -> String {
    cmdline_with_tsc(parameters, guest_tsc_khz())
}

/// `parameters` plus `tsc_khz=tsc_khz`.
pub fn cmdline_with_tsc(parameters: &str, tsc_khz: u32) -> String {
    let tsc = format!("tsc_khz={tsc_khz}");
    if parameters.trim().is_empty() {
        tsc
    } else {
        format!("{} {tsc}", parameters.trim())
    }
}

/// Reads the serial log at `path` (empty while it does not exist yet).
pub fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The events of an `--event-monitor` file (JSON objects one after the other, pretty-printed or
/// not; none while it does not exist yet); fails the test on anything else.
pub fn read_events(path: &Path) -> Vec<serde_json::Value> {
    let text = read_log(path);
    serde_json::Deserializer::from_str(&text)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{} is not a JSON event stream: {e}\n{text}", path.display()))
}

/// The events of an `--event-monitor` file as `source:event` (`vmm:starting`, `vm:booted`, ...).
pub fn event_names(path: &Path) -> Vec<String> {
    read_events(path)
        .iter()
        .map(|event| {
            format!(
                "{}:{}",
                event["source"].as_str().unwrap_or("?"),
                event["event"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// Owned copies of `items` (command-line arguments written as literals).
pub fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| item.to_string()).collect()
}

/// The command-line arguments that boot the test guest `name` with `parameters` on its command
/// line (and the real `tsc_khz=`) in `memory` of RAM (`--memory size=`).
pub fn guest_arguments(name: &str, parameters: &str, memory: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        test_guest(name).display().to_string(),
        "--cmdline".into(),
        guest_cmdline(parameters),
        "--memory".into(),
        format!("size={memory}"),
    ]
}

/// Polls the serial log until `done` accepts its complete lines or `timeout` passes. Returns the
/// complete lines last read and whether `done` accepted them.
///
/// `done` never sees a line still being written: a guest writes its serial a byte at a time, so
/// a read can end inside a line ("blkcheck: done" before its " ok"), and a wait that matched
/// such a half line let tests go on with a line that was not there yet.
pub fn wait_for_log(path: &Path, timeout: Duration, done: impl Fn(&str) -> bool) -> (String, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let log = complete_lines(&read_log(path)).to_string();
        if done(&log) {
            return (log, true);
        }
        if Instant::now() >= deadline {
            return (log, false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `timeout` for `count` counter lines in the serial log at `log` (or a `FAIL` from
/// the guest) and returns the log; fails the test if they do not come.
pub fn wait_for_counter_lines(log: &Path, count: usize, timeout: Duration) -> String {
    let (text, done) = wait_for_log(log, timeout, |text| {
        counter_lines(text).len() >= count || text.contains("FAIL")
    });
    assert!(done, "no {count} counter lines in time:\n{text}");
    text
}

/// Waits for 3 counter lines in the serial log at `log` of a VM restored or recovered from a
/// state whose last counter was `before`, and checks that the guest continued: no new boot, an
/// advancing counter that starts above `before`. Returns the log.
pub fn wait_for_continuation(log: &Path, before: u64, timeout: Duration) -> String {
    let text = wait_for_counter_lines(log, 3, timeout);
    assert!(!text.contains("counter: boot"), "booted again:\n{text}");
    let after = assert_counter_advances(&text, 3);
    assert!(
        after[0].counter > before,
        "the guest did not continue, the counter restarted: {} after {before}",
        after[0].counter
    );
    text
}

/// The arguments that send the guest's serial port to the file `serial` with the console off.
pub fn serial_file_arguments(serial: &Path) -> [String; 4] {
    [
        "--serial".into(),
        format!("file={}", serial.display()),
        "--console".into(),
        "off".into(),
    ]
}

/// The counter of the last complete counter line in the serial log at `log`; fails the test if
/// there is none.
pub fn last_counter_in(log: &Path) -> u64 {
    counter_lines(&read_log(log))
        .last()
        .unwrap_or_else(|| panic!("no counter line in {}", log.display()))
        .counter
}

/// Points the serial file in a snapshot's `config.json` at `log`, so the restored VM writes
/// where the test reads.
pub fn point_serial_to(snapshot_dir: &Path, log: &Path) {
    let path = snapshot_dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["serial"]["file"] = serde_json::json!(log.display().to_string());
    std::fs::write(&path, config.to_string()).unwrap();
}

/// One progress line of the counter guest: `counter=<n> sum=<hex> ok`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterLine {
    pub counter: u64,
    pub sum: String,
    pub ok: bool,
}

/// The counter guest's progress lines in `log`, in order. Lines of other shapes are skipped; a
/// torn last line (still being written) is ignored.
pub fn counter_lines(log: &str) -> Vec<CounterLine> {
    complete_lines(log)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let counter = words.next()?.strip_prefix("counter=")?.parse().ok()?;
            let sum = words.next()?.strip_prefix("sum=")?.to_string();
            let ok = words.next() == Some("ok");
            Some(CounterLine { counter, sum, ok })
        })
        .collect()
}

/// Asserts that the counter guest's lines in `log` are all `ok` and strictly increasing.
pub fn assert_counter_advances(log: &str, at_least: usize) -> Vec<CounterLine> {
    let lines = counter_lines(log);
    assert!(
        lines.len() >= at_least,
        "expected at least {at_least} counter lines, got {}:\n{log}",
        lines.len()
    );
    for pair in lines.windows(2) {
        assert!(
            pair[1].counter > pair[0].counter,
            "counter went from {} to {}:\n{log}",
            pair[0].counter,
            pair[1].counter
        );
    }
    assert!(
        lines.iter().all(|line| line.ok),
        "a checksum line is not ok:\n{log}"
    );
    lines
}

/// Whether the test guest `guest` (e.g. "blkcheck") ended: its "`guest`: done" line, or a FAIL
/// line, was written whole. A guest writes its serial a byte at a time, so a log read in the
/// middle of "blkcheck: done ok" shows "blkcheck: done" before the " ok". (The serial waits,
/// `wait_for_log` and `VmmProcess::wait_serial`, pass complete lines only already.)
pub fn guest_finished(log: &str, guest: &str) -> bool {
    let whole = complete_lines(log);
    whole.contains(&format!("{guest}: done")) || whole.contains("FAIL")
}

/// `log` up to and with its last newline: a line still being written is left out.
pub fn complete_lines(log: &str) -> &str {
    log.rfind('\n').map_or("", |end| &log[..=end])
}

/// The smpcheck guest's progress lines in `log`, in order: each line's counters, one per vCPU
/// (`smpcheck cpus=<n> cpu0=<count> cpu1=<count> ...`). A torn last line is ignored.
pub fn smp_counter_lines(log: &str) -> Vec<Vec<u64>> {
    complete_lines(log)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "smpcheck" {
                return None;
            }
            let cpus: usize = words.next()?.strip_prefix("cpus=")?.parse().ok()?;
            let counts = words
                .enumerate()
                .map(|(index, word)| word.strip_prefix(&format!("cpu{index}="))?.parse().ok())
                .collect::<Option<Vec<u64>>>()?;
            (counts.len() == cpus).then_some(counts)
        })
        .collect()
}

/// Asserts that the smpcheck guest's log has at least `at_least` progress lines for `cpus`
/// vCPUs and no failure, that no vCPU's counter ever goes below its value on the line above,
/// and that every one has grown from the first line to the last: all of them run. Returns the
/// lines.
///
/// A counter may stand still between two neighbouring lines: with two vCPUs on this host's two
/// cores and a load average of 10 to 25, the host starved an AP's thread for a whole 100 ms
/// window (its thread runnable, preempted in `xfer_to_guest_mode_handle_work`) in 21 of 330
/// runs of `smp.rs`, for one to three lines, while the boot vCPU reported on. A counter that
/// restarts goes down, and one that stopped for good does not grow: both still fail.
pub fn assert_smp_counters_advance(log: &str, cpus: usize, at_least: usize) -> Vec<Vec<u64>> {
    assert!(!log.contains("FAIL"), "the guest failed:\n{log}");
    let lines = smp_counter_lines(log);
    assert!(
        lines.len() >= at_least,
        "expected at least {at_least} smpcheck lines, got {}:\n{log}",
        lines.len()
    );
    for line in &lines {
        assert_eq!(line.len(), cpus, "a line for another vCPU count:\n{log}");
    }
    for pair in lines.windows(2) {
        for (cpu, (earlier, later)) in pair[0].iter().zip(&pair[1]).enumerate() {
            assert!(
                later >= earlier,
                "vCPU {cpu} went back: {earlier} then {later}:\n{log}"
            );
        }
    }
    let (first, last) = (&lines[0], &lines[lines.len() - 1]);
    for (cpu, (start, end)) in first.iter().zip(last).enumerate() {
        assert!(
            end > start,
            "vCPU {cpu} did not count over {} lines: {start} then {end}:\n{log}",
            lines.len()
        );
    }
    lines
}

/// Runs `ch-remote --api-socket socket <arguments>` (stdin closed) and returns what it did.
pub fn run_ch_remote(socket: &Path, arguments: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::binaries::ch_remote())
        .arg("--api-socket")
        .arg(socket)
        .args(arguments)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running ch-remote")
}

/// Creates a FIFO at `path` (mode 0600), as the tests and nv-bench use to hold a VMM at its
/// `--event-monitor` or serial open.
pub fn make_fifo(path: &Path) -> std::io::Result<()> {
    use rustix::fs::{mkfifoat, Mode, CWD};
    mkfifoat(CWD, path, Mode::RUSR | Mode::WUSR).map_err(std::io::Error::from)
}

/// The early checkpoints a VMM with a tiny undo log (`NV_UNDO_LIMIT_PAGES`) took, checked:
/// at least ten (the log filled again and again), and none failed (a device that never
/// reached its quiescent point fails its checkpoint, after 10 s). Returns their count.
pub fn assert_early_checkpoints_never_failed(vmm: &crate::process::VmmProcess) -> usize {
    let stderr = vmm.stderr_log();
    let early = stderr.matches("checkpointing early").count();
    assert!(
        early >= 10,
        "only {early} early checkpoints:\n{}",
        vmm.stderr_tail(20)
    );
    assert!(
        !stderr.contains("NV checkpoint failed") && !stderr.contains("quiescent point"),
        "a checkpoint failed:\n{}",
        vmm.stderr_tail(40)
    );
    early
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CI failure of `a_backend_lost_at_the_save_and_absent_at_recovery_loses_nothing`: the
    /// log was read between "blkcheck: done" and " ok\n", and the test failed a guest that passed.
    #[test]
    fn a_guest_has_finished_only_once_its_last_line_is_whole() {
        assert!(!guest_finished(
            "blkcheck: completed seq=1\nblkcheck: done",
            "blkcheck"
        ));
        assert!(guest_finished("blkcheck: done ok\n", "blkcheck"));
        assert!(!guest_finished("blkcheck: FAI", "blkcheck"));
        assert!(guest_finished("blkcheck: FAIL block 3\n", "blkcheck"));
        assert!(!guest_finished("fscheck: done ok\n", "blkcheck"));
    }

    /// The torn-line flakes (conrng, hpcheck's function line, blkcheck and fscheck): a serial
    /// log read between two writes of one line. The old wait handed `done` the raw log and
    /// accepted the half line; the wait now goes on until the line is whole.
    #[test]
    fn a_serial_wait_does_not_match_a_line_still_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial");
        let finished = |log: &str| log.contains("blkcheck: done") || log.contains("FAIL");
        std::fs::write(&serial, "blkcheck: completed seq=1\nblkcheck: done").unwrap();
        assert!(
            finished(&read_log(&serial)),
            "the raw log matches the half line"
        );
        let (log, done) = wait_for_log(&serial, Duration::from_millis(200), finished);
        assert!(!done, "the wait accepted a torn line: {log:?}");
        assert_eq!(log, "blkcheck: completed seq=1\n");

        std::fs::write(&serial, "blkcheck: completed seq=1\nblkcheck: done ok\n").unwrap();
        let (log, done) = wait_for_log(&serial, Duration::from_millis(200), finished);
        assert!(done && log.ends_with("blkcheck: done ok\n"), "{log:?}");
    }

    #[test]
    fn complete_lines_keep_the_last_newline_and_drop_a_torn_tail() {
        assert_eq!(complete_lines("a\nb\nc"), "a\nb\n");
        assert_eq!(complete_lines("a\nb\n"), "a\nb\n");
        assert_eq!(complete_lines("torn"), "");
        assert_eq!(complete_lines(""), "");
    }

    #[test]
    fn smpcheck_lines_are_parsed_per_vcpu() {
        let log = "smpcheck: boot\nsmpcheck cpus=2 cpu0=10 cpu1=7\nsmpcheck waiting 3\n\
                   smpcheck cpus=2 cpu0=11\nsmpcheck cpus=1 cpu0=12\nsmpcheck cpus=2 cpu0=13 cpu1=9\n\
                   smpcheck cpus=2 cpu0=14 cpu1=1";
        assert_eq!(
            smp_counter_lines(log),
            vec![vec![10, 7], vec![12], vec![13, 9]]
        );
    }

    #[test]
    #[should_panic(expected = "vCPU 1 did not count")]
    fn a_vcpu_that_stops_counting_fails_the_check() {
        assert_smp_counters_advance(
            "smpcheck cpus=2 cpu0=1 cpu1=5\nsmpcheck cpus=2 cpu0=2 cpu1=5\n",
            2,
            2,
        );
    }

    #[test]
    #[should_panic(expected = "vCPU 1 went back")]
    fn a_vcpu_that_restarts_fails_the_check() {
        assert_smp_counters_advance(
            "smpcheck cpus=2 cpu0=1 cpu1=5\nsmpcheck cpus=2 cpu0=2 cpu1=3\n\
             smpcheck cpus=2 cpu0=3 cpu1=9\n",
            2,
            3,
        );
    }

    /// What the host did to an AP at load 20: one 100 ms window with its thread starved
    /// (the strict line-to-line rule failed 21 runs in 330 on this).
    #[test]
    fn a_vcpu_starved_for_one_window_still_counts() {
        let log = "smpcheck cpus=2 cpu0=22327296 cpu1=48836336\n\
                   smpcheck cpus=2 cpu0=47157248 cpu1=63308796\n\
                   smpcheck cpus=2 cpu0=94310400 cpu1=63308796\n\
                   smpcheck cpus=2 cpu0=117710400 cpu1=87410796\n";
        assert_eq!(assert_smp_counters_advance(log, 2, 4).len(), 4);
    }

    #[test]
    fn require_kvm_names_the_test_it_gates() {
        fn here() {}
        assert_eq!(
            enclosing_function(std::any::type_name_of_val(&here)),
            "require_kvm_names_the_test_it_gates"
        );
    }

    #[test]
    #[should_panic(expected = "never skip silently")]
    fn a_missing_kvm_device_fails_the_test() {
        kvm_gate(Path::new("/nonexistent/kvm"), false, "gate");
    }

    #[test]
    fn a_missing_kvm_device_skips_only_when_asked() {
        assert!(!kvm_gate(Path::new("/nonexistent/kvm"), true, "gate"));
    }

    #[test]
    fn guest_command_lines_carry_the_real_tsc_rate() {
        if !kvm_available("guest_command_lines_carry_the_real_tsc_rate") {
            return;
        }
        let khz = guest_tsc_khz();
        assert!((500_000..10_000_000).contains(&khz), "{khz} kHz");
        assert_eq!(guest_cmdline(""), format!("tsc_khz={khz}"));
        assert_eq!(
            guest_cmdline(" area_mb=2 "),
            format!("area_mb=2 tsc_khz={khz}")
        );
    }

    #[test]
    fn parses_counter_lines_and_ignores_the_rest() {
        let log =
            "counter: boot\ncounter=4096 sum=0x1f ok\nnoise\ncounter=8192 sum=0x2a ok\ncounter=9";
        let lines = counter_lines(log);
        assert_eq!(
            lines,
            vec![
                CounterLine {
                    counter: 4096,
                    sum: "0x1f".into(),
                    ok: true
                },
                CounterLine {
                    counter: 8192,
                    sum: "0x2a".into(),
                    ok: true
                },
            ]
        );
    }

    #[test]
    #[should_panic(expected = "counter went from")]
    fn a_counter_going_backwards_fails() {
        assert_counter_advances("counter=5 sum=0x1 ok\ncounter=3 sum=0x1 ok\n", 2);
    }

    #[test]
    #[should_panic(expected = "not ok")]
    fn a_mismatch_fails() {
        assert_counter_advances("counter=5 sum=0x1 ok\ncounter=7 sum=0x1 bad\n", 2);
    }
}
