//! The legacy devices as upstream cloud-hypervisor users drive them from the command line, end to
//! end on KVM with the `devcheck` and `counter` test guests: `--serial pty` / `--console pty`
//! (path in the log and in `vm.info`, output out and input in, a new pty after an NV recovery),
//! `--pvpanic` (the guest's panic on the event monitor and in the log), `ch-remote power-button`
//! (the ACPI GED's event read by the guest, also when pending across a snapshot), and serial
//! outputs that must never stall the VMM (a FIFO without a reader, `/dev/full`) or leak (created
//! 0600).
//!
//! The binary is built on first use (`integration_tests::binaries`); `CLOUD_HYPERVISOR_BIN=/path`
//! tests that binary instead.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration_tests::api_client;
use integration_tests::harness::{
    counter_lines, guest_arguments, point_serial_to, read_events, read_log, scratch_dir,
    serial_file_arguments, strings,
};
use integration_tests::process::VmmProcess;
use vmm::nv::EXIT_POWER_FAIL_SAVED;

/// Generous bound for a guest line or a VMM exit (boot is ring-0 emulated here).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Spawns a VMM with stderr captured to `dir/<label>.stderr`.
fn spawn(dir: &Path, label: &str, arguments: &[String]) -> VmmProcess {
    VmmProcess::spawn(dir, label, arguments, &[]).with_timeout(TIMEOUT)
}

/// What a devcheck guest run (`pvpanic=1 exit=reset`, serial to a file, events to a file) left:
/// its serial output, its events and the VMM's stderr. `--pvpanic` when `pvpanic` says so. The
/// run must exit 0, the guest must have read `supported` (the port's supported-events bitmap),
/// and the serial file the VMM created must be its owner's only (issue 10 hardening: guest
/// output may hold secrets).
fn pvpanic_run(
    label: &str,
    pvpanic: bool,
    supported: &str,
) -> (String, Vec<serde_json::Value>, String) {
    let dir = scratch_dir();
    let serial = dir.path().join("serial.log");
    let events = dir.path().join("events");
    let mut arguments = guest_arguments("devcheck", "pvpanic=1 exit=reset", "32M");
    if pvpanic {
        arguments.push("--pvpanic".into());
    }
    arguments.extend(serial_file_arguments(&serial));
    arguments.extend([
        "--event-monitor".into(),
        format!("path={}", events.display()),
    ]);
    let mut vmm = spawn(dir.path(), label, &arguments);
    let stderr = vmm.expect_exit(0, label);
    let mode = std::fs::metadata(&serial).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{label}: serial file mode {mode:o}");
    let output = read_log(&serial);
    assert!(
        output.contains(&format!("devcheck: pvpanic supported={supported}")),
        "{label}: {output}"
    );
    (output, read_events(&events), stderr)
}

#[test]
fn pvpanic_reports_a_guest_panic_on_the_event_monitor_and_in_the_log() {
    integration_tests::require_kvm!();
    // The guest read the supported-events bitmap: PANICKED and CRASH_LOADED.
    let (output, events, stderr) = pvpanic_run("pvpanic", true, "0x03");
    assert!(output.contains("devcheck: panic reported"), "{output}");
    // Upstream's event: source "guest", event "panic", the kind in property "event".
    let panics: Vec<_> = events
        .into_iter()
        .filter(|event| event["source"] == "guest")
        .collect();
    assert_eq!(panics.len(), 1, "{panics:#?}");
    assert_eq!(panics[0]["event"], "panic");
    assert_eq!(panics[0]["properties"]["event"], "panic");
    assert!(
        stderr.contains("pvpanic: the guest reported a panic event"),
        "no log line at the default level:\n{stderr}"
    );
}

#[test]
fn without_pvpanic_the_port_is_unowned_and_nothing_is_reported() {
    integration_tests::require_kvm!();
    // An unowned port floats high.
    let (_, events, stderr) = pvpanic_run("no-pvpanic", false, "0xff");
    assert!(events.iter().all(|event| event["source"] != "guest"));
    assert!(!stderr.contains("pvpanic"), "{stderr}");
}

/// What the devcheck guest prints once it read the power-button bit from the GED register.
const POWER_BUTTON_SEEN: &str = "devcheck: power button events=0x08";

/// `ch-remote --api-socket socket <arguments>`; it must succeed (exit 0, nothing printed).
fn ch_remote_ok(socket: &Path, arguments: &[&str]) {
    let output = integration_tests::harness::run_ch_remote(socket, arguments);
    assert!(
        output.status.success() && output.stdout.is_empty(),
        "ch-remote {arguments:?}: {output:?}"
    );
}

/// A devcheck guest polling the GED register (`ged=1 exit=reset`) behind an API socket, once it
/// said it polls. Returns the VMM and its socket.
fn spawn_ged_guest(dir: &Path, label: &str) -> (VmmProcess, PathBuf) {
    let socket = dir.join(format!("{label}.sock"));
    let mut arguments = guest_arguments("devcheck", "ged=1 exit=reset", "32M");
    arguments.extend(["--api-socket".into(), format!("path={}", socket.display())]);
    let mut vmm =
        VmmProcess::spawn_with_serial_file(dir, label, &arguments, &[]).with_timeout(TIMEOUT);
    vmm.wait_for_socket(&socket, TIMEOUT);
    vmm.wait_serial("the guest polling the GED", |log| {
        log.contains("devcheck: ged ready")
    });
    (vmm, socket)
}

#[test]
fn power_button_reaches_the_guest_as_the_ged_event() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let (mut vmm, socket) = spawn_ged_guest(dir.path(), "ged");
    // Nothing pending before the press: the guest keeps polling.
    std::thread::sleep(Duration::from_millis(300));
    let before = vmm.serial_log();
    assert!(!before.contains("power button"), "{before}");
    ch_remote_ok(&socket, &["power-button"]);
    let log = vmm.wait_serial("the power button event", |log| {
        log.contains("devcheck: done")
    });
    assert!(log.contains(POWER_BUTTON_SEEN), "{log}");
    vmm.expect_exit(0, "ged");
}

/// A press the guest has not read yet (the VM paused) is in the snapshot: the restored guest
/// reads it from the GED register.
#[test]
fn a_pending_power_button_press_survives_snapshot_and_restore() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let (mut first, socket) = spawn_ged_guest(dir.path(), "first");
    ch_remote_ok(&socket, &["pause"]);
    ch_remote_ok(&socket, &["power-button"]);
    let snapshot_dir = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot_dir).unwrap();
    let snapshot = format!("file://{}", snapshot_dir.display());
    ch_remote_ok(&socket, &["snapshot", &snapshot]);
    first.kill();
    let before = first.serial_log();
    assert!(
        !before.contains("power button"),
        "read while paused:\n{before}"
    );

    let log = dir.path().join("restored.serial");
    point_serial_to(&snapshot_dir, &log);
    let arguments = [
        "--restore".into(),
        format!("source_url={snapshot},resume=true"),
    ];
    let mut restored = spawn(dir.path(), "restored", &arguments).with_serial(log);
    let text = restored.wait_serial("the power button event", |log| {
        log.contains("devcheck: done")
    });
    assert!(text.contains(POWER_BUTTON_SEEN), "{text}");
    assert!(!text.contains("devcheck: boot"), "booted again:\n{text}");
    restored.expect_exit(0, "restored");
}

/// The path after `marker` in `log` (up to the next whitespace).
fn path_after(log: &str, marker: &str) -> Option<PathBuf> {
    let start = log.find(marker)? + marker.len();
    log[start..].split_whitespace().next().map(PathBuf::from)
}

const SERIAL_PTY_MARKER: &str = "the guest's serial port is on ";

/// A user's end of a pty: non-blocking, reads accumulate.
struct PtyUser {
    file: File,
    seen: Vec<u8>,
}

impl PtyUser {
    fn open(path: &Path) -> PtyUser {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        PtyUser {
            file,
            seen: Vec::new(),
        }
    }

    /// Reads until what was seen contains `needle`; returns everything seen.
    fn read_until(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&self.seen).into_owned();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?} on the pty; seen:\n{text}"
            );
            match self.file.read(&mut buf) {
                Ok(n) => self.seen.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("reading the pty: {e}; seen:\n{text}"),
            }
        }
    }
}

#[test]
fn serial_pty_carries_output_and_input_and_its_path_is_in_vm_info() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let socket = dir.path().join("api.sock");
    // No `exit=reset`: when the VMM exits, the terminal hangs up and output not yet read is gone
    // (docs/devices.md), so the test reads everything before it ends the VMM.
    let mut arguments = guest_arguments("devcheck", "echo=2", "32M");
    arguments.extend(strings(&[
        "--serial",
        "pty",
        "--console",
        "pty",
        "--api-socket",
        &socket.display().to_string(),
    ]));
    let mut vmm = spawn(dir.path(), "pty", &arguments);
    // Logged at the default level, so an operator can attach without the API.
    let stderr = vmm.wait_stderr("the serial pty path", |log| {
        log.contains(SERIAL_PTY_MARKER) && log.contains("--console pty: ")
    });
    let serial_pty = path_after(&stderr, SERIAL_PTY_MARKER).unwrap();
    let console_pty = path_after(&stderr, "--console pty: ").unwrap();
    assert!(serial_pty.starts_with("/dev/pts"), "{stderr}");
    assert_ne!(serial_pty, console_pty);

    // Upstream reports the path in the `file` member of a `Pty` serial / console.
    let (status, body) = api_client::request(&socket, "GET", "vm.info", "", TIMEOUT);
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["config"]["serial"]["mode"], "Pty");
    assert_eq!(
        info["config"]["serial"]["file"],
        serial_pty.display().to_string()
    );
    assert_eq!(info["config"]["console"]["mode"], "Pty");
    assert_eq!(
        info["config"]["console"]["file"],
        console_pty.display().to_string()
    );

    // Attached after the guest started: what it wrote before waits in the terminal.
    let mut user = PtyUser::open(&serial_pty);
    user.read_until("devcheck: echo ready\n");
    user.file.write_all(b"hello through the pty\n").unwrap();
    user.read_until("echo: hello through the pty\n");
    // More than the UART's 64-byte receive FIFO in one go: nothing is lost or reordered.
    let long: String = (0..150)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    user.file.write_all(format!("{long}\n").as_bytes()).unwrap();
    let text = user.read_until("devcheck: done\n");
    assert!(text.contains(&format!("echo: {long}\n")), "{text}");
    vmm.signal(libc::SIGTERM);
    let status = vmm.wait_exit();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", vmm.stderr_log());
}

#[test]
fn an_nv_recovery_opens_a_new_serial_pty_and_logs_it() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let region = dir.path().join("region");
    let nv = |extra: &str| format!("region={},vm=pty-vm{extra}", region.display());
    let mut arguments = guest_arguments("counter", "area_mb=1", "32M");
    arguments.extend(strings(&[
        "--nv",
        &nv(",create=on"),
        "--serial",
        "pty",
        "--console",
        "off",
    ]));
    let mut first = spawn(dir.path(), "first", &arguments);
    let stderr = first.wait_stderr("the serial pty path", |log| log.contains(SERIAL_PTY_MARKER));
    let mut user = PtyUser::open(&path_after(&stderr, SERIAL_PTY_MARKER).unwrap());
    let before = user.read_until(" ok\n");
    assert!(before.contains("counter: boot"), "{before}");
    first.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "SIGPWR");
    drop(user);

    // The stored config says `Pty`: the recovered VM gets a pty of its own and says where.
    let mut second = spawn(
        dir.path(),
        "second",
        &strings(&["--nv", &nv(",recover=on")]),
    );
    let stderr = second.wait_stderr("the new serial pty path", |log| {
        log.contains(SERIAL_PTY_MARKER)
    });
    let mut user = PtyUser::open(&path_after(&stderr, SERIAL_PTY_MARKER).unwrap());
    let after = user.read_until(" ok\n");
    assert!(
        !after.contains("counter: boot"),
        "booted again instead of continuing:\n{after}"
    );
    let last_before = counter_lines(&before).last().unwrap().counter;
    let first_after = counter_lines(&after).first().unwrap().counter;
    assert!(
        first_after > last_before,
        "counter {last_before} before the power failure, {first_after} after"
    );
    second.signal(libc::SIGTERM);
    assert_eq!(second.wait_exit().code(), Some(0));
}

/// One API request that may find no socket yet or no answer (`None`), unlike
/// `api_client::request`, which panics on both.
fn try_request(socket: &Path, method: &str, endpoint: &str) -> Option<(u16, String)> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Issue 10 item 9: `--serial file=FIFO` with no reader blocked start-up in open(2), and the
/// VMM ignored SIGTERM while it hung there.
#[test]
fn a_serial_fifo_without_reader_neither_blocks_start_up_nor_sigterm() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let fifo = dir.path().join("serial.fifo");
    integration_tests::harness::make_fifo(&fifo).expect("mkfifo");
    let socket = dir.path().join("api.sock");
    let mut arguments = guest_arguments("counter", "area_mb=1", "32M");
    arguments.extend(serial_file_arguments(&fifo));
    arguments.extend(["--api-socket".into(), socket.display().to_string()]);
    let mut vmm = spawn(dir.path(), "fifo", &arguments);
    // The VM runs: `vm.info` answers Running (the control loop only answers once start-up is
    // done).
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some((200, body)) = try_request(&socket, "GET", "vm.info") {
            let info: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(info["state"], "Running", "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the VMM did not finish starting with a FIFO nobody reads\nstderr:\n{}",
            vmm.stderr_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A reader attaching later gets the guest's output.
    let mut reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while !String::from_utf8_lossy(&seen).contains(" ok\n") {
        assert!(Instant::now() < deadline, "no guest output on the FIFO");
        let mut buf = [0u8; 4096];
        match reader.read(&mut buf) {
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("reading the FIFO: {e}"),
        }
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("counter: boot\n"));
    drop(reader);
    vmm.signal(libc::SIGTERM);
    let status = vmm
        .wait_exit_within(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("SIGTERM ignored\nstderr:\n{}", vmm.stderr_log()));
    assert_eq!(
        (status.code(), status.signal()),
        (Some(0), None),
        "stderr:\n{}",
        vmm.stderr_log()
    );
}

/// Issue 10 item 9: `--serial file=/dev/full` logged one warning per byte the guest wrote.
#[test]
fn serial_output_to_dev_full_is_reported_once_not_per_byte() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let mut arguments = guest_arguments("devcheck", "lines=40 exit=reset", "32M");
    arguments.extend(strings(&["--serial", "file=/dev/full", "--console", "off"]));
    let mut vmm = spawn(dir.path(), "full", &arguments);
    let status = vmm.wait_exit();
    let stderr = vmm.stderr_log();
    // The guest wrote about 1000 bytes and still ran to its end.
    assert_eq!(status.code(), Some(0), "{status}\nstderr:\n{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("/dev/full"))
        .collect();
    assert!(
        !lines.is_empty() && lines.len() <= 2,
        "expected the first failure and at most one summary, got {} lines:\n{stderr}",
        lines.len()
    );
    assert!(lines[0].contains("No space left on device"), "{stderr}");
    // The summary at the end counts what was dropped after the first failure.
    if let Some(summary) = lines.get(1) {
        assert!(
            summary.contains("bytes of guest output dropped"),
            "{summary}"
        );
    }
}

/// Runs devcheck with `exit=<exit>` (info logging, events to a file) and returns the VMM's
/// stderr and the events, after asserting the run ended the VMM with exit code 0.
fn acpi_exit_run(label: &str, exit: &str) -> (String, Vec<serde_json::Value>) {
    let dir = scratch_dir();
    let serial = dir.path().join("serial.log");
    let events = dir.path().join("events");
    let mut arguments = guest_arguments("devcheck", &format!("exit={exit}"), "32M");
    arguments.extend(serial_file_arguments(&serial));
    arguments.extend([
        "--event-monitor".into(),
        format!("path={}", events.display()),
        "-v".into(),
    ]);
    let mut vmm = spawn(dir.path(), label, &arguments);
    let stderr = vmm.expect_exit(0, label);
    let output = read_log(&serial);
    assert!(output.contains("devcheck: done"), "{label}: {output}");
    (stderr, read_events(&events))
}

fn vm_event_names(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .filter(|event| event["source"] == "vm")
        .map(|event| event["event"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Runs devcheck with `exit=<exit>` and asserts how the VMM ended: its log says `expected`
/// and not `unexpected`, and the VM's `shutdown` event was emitted.
fn assert_acpi_exit(exit: &str, expected: &str, unexpected: &str) {
    let (stderr, events) = acpi_exit_run(exit, exit);
    assert!(stderr.contains(expected), "{stderr}");
    assert!(!stderr.contains(unexpected), "{stderr}");
    assert!(
        vm_event_names(&events).contains(&"shutdown".to_string()),
        "{events:?}"
    );
}

/// A guest that writes SLP_TYP 5 | SLP_EN (what the FADT and `\_S5` announce) to the ACPI
/// sleep control port 0x600 powers the VM off: the VMM ends as for any guest power off.
#[test]
fn acpi_sleep_control_s5_powers_the_vm_off() {
    integration_tests::require_kvm!();
    assert_acpi_exit("acpi-off", "guest powered off", "reset");
}

/// The FADT's reset register (port 0x600, value 1) resets the VM: the VMM ends as for an
/// i8042 reset.
#[test]
fn acpi_reset_register_resets_the_vm() {
    integration_tests::require_kvm!();
    assert_acpi_exit("acpi-reset", "guest requested a reset", "guest powered off");
}
