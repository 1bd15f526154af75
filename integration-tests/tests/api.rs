//! The REST API end to end on KVM, as an operator meets it: real `cloud-hypervisor` processes
//! (default `--seccomp true`) driven over their `--api-socket`, both with raw HTTP and through the
//! built `ch-remote` binary. Every request body sent and every response body received on success
//! is validated against `docs/openapi.yaml` (`integration_tests::openapi`); every error case is
//! followed by a `vmm.ping` to show the VMM still serves.
//!
//! Covered: every upstream path of the v53 spec (implemented ones through a VM lifecycle,
//! the others answered 501), the NV endpoints (status, regions, power-fail, nv-recover,
//! nv-suspend), protocol errors (bad JSON, wrong method, unknown path, garbage), operations in the
//! wrong VM state, `vm.snapshot` then `vm.restore` into a fresh VMM process for `Copy` and
//! `OnDemand` (the counter guest continues, no second boot), `--restore` on the command line, and
//! the upstream lifecycle events in `--event-monitor` files.
//!
//! The binaries are built once by the first test that needs them (`integration_tests::binaries`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::api_client;
use integration_tests::binaries;
use integration_tests::harness::{
    assert_counter_advances, counter_lines, event_names, guest_arguments, guest_cmdline,
    last_counter_in, point_serial_to, read_log, test_guest, wait_for_continuation,
    wait_for_counter_lines, wait_for_log,
};
use integration_tests::openapi;
use integration_tests::process;
use serde_json::{json, Value};
use vmm::api::{check_state, VmState, ROUTES};

/// Boot is emulated ring-0 code here: a generous bound for a guest's first lines.
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound for a VMM process to end once asked to.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Guest RAM of every VM here: small, so first-touch and copy costs stay low.
const GUEST_RAM: u64 = 64 << 20;
/// What `vm.power-fail` ends the VMM with (`vmm::nv::EXIT_POWER_FAIL_SAVED`).
const EXIT_POWER_FAIL_SAVED: i32 = 75;

/// The NV-Hypervisor extension paths of `docs/openapi.yaml`.
const NV_OPERATIONS: [&str; 5] = [
    "vm.nv-status",
    "vm.power-fail",
    "vm.nv-suspend",
    "vm.nv-recover",
    "vmm.nv-regions",
];

/// One answer over the socket.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not a JSON body ({e}): {}", self.body))
    }
}

/// What a `ch-remote` run printed and returned.
#[derive(Debug)]
struct ChRemoteRun {
    code: i32,
    stdout: String,
    stderr: String,
}

/// A `cloud-hypervisor` process with its API socket, event file and stderr in `dir`; killed on
/// drop if still running.
struct VmmProcess {
    process: process::VmmProcess,
    socket: PathBuf,
    events: PathBuf,
}

impl VmmProcess {
    fn start(dir: &Path, name: &str, arguments: &[String]) -> VmmProcess {
        let socket = dir.join(format!("{name}.sock"));
        let events = dir.join(format!("{name}.events"));
        let mut all = vec![
            "--api-socket".to_string(),
            format!("path={}", socket.display()),
            "--event-monitor".to_string(),
            format!("path={}", events.display()),
        ];
        all.extend_from_slice(arguments);
        let mut process =
            process::VmmProcess::spawn(dir, name, &all, &[]).with_timeout(EXIT_TIMEOUT);
        process.wait_for_socket(&socket, BOOT_TIMEOUT);
        VmmProcess {
            process,
            socket,
            events,
        }
    }

    /// Sends raw bytes and reads the answer (the request must ask for `Connection: close`, or
    /// be one the server closes after).
    fn raw(&self, request: &[u8]) -> Reply {
        let (status, body) = api_client::exchange(&self.socket, request, BOOT_TIMEOUT);
        Reply { status, body }
    }

    /// One API call; on success its request and response bodies must match the spec.
    fn call(&self, method: &str, op: &str, body: Option<&str>) -> Reply {
        let payload = body.unwrap_or("");
        let (status, reply_body) =
            api_client::request(&self.socket, method, op, payload, BOOT_TIMEOUT);
        let reply = Reply {
            status,
            body: reply_body,
        };
        if let Err(error) =
            openapi::check_exchange(method, op, body, reply.status, reply.body.as_bytes())
        {
            panic!("{error}");
        }
        reply
    }

    /// A call that must fail with `status` and say why; the VMM must still serve afterwards.
    fn refused(&self, method: &str, op: &str, body: Option<&str>, status: u16) -> String {
        let reply = self.call(method, op, body);
        assert_eq!(reply.status, status, "{method} {op}: {}", reply.body);
        // docs/openapi.yaml lists what every path answers (`call` checked it); the NV paths
        // are held to it even for routing errors.
        if NV_OPERATIONS.contains(&op.split('?').next().unwrap_or(op)) && status != 400 {
            if let Err(error) = openapi::check_error_status(method, op, status) {
                panic!("{error}: {}", reply.body);
            }
        }
        assert!(
            !reply.body.trim().is_empty(),
            "{method} {op}: an error answer must carry a message"
        );
        self.assert_serving();
        reply.body
    }

    fn assert_serving(&self) {
        let reply = self.call("GET", "vmm.ping", None);
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    fn ch_remote(&self, arguments: &[&str]) -> ChRemoteRun {
        ch_remote_on(&self.socket, arguments)
    }

    /// `ch-remote` for a verb that answers JSON: it must succeed and print a body the spec
    /// describes for `method /op`.
    fn ch_remote_json(&self, arguments: &[&str], method: &str, op: &str) -> Value {
        let run = self.ch_remote(arguments);
        assert_eq!(run.code, 0, "ch-remote {arguments:?}: {}", run.stderr);
        if let Err(error) = openapi::check_exchange(method, op, None, 200, run.stdout.as_bytes()) {
            panic!("ch-remote {arguments:?}: {error}");
        }
        serde_json::from_str(&run.stdout).unwrap()
    }

    /// `ch-remote` for a verb answered 204: exit 0, nothing printed.
    fn ch_remote_ok(&self, arguments: &[&str]) {
        let run = self.ch_remote(arguments);
        assert_eq!(run.code, 0, "ch-remote {arguments:?}: {}", run.stderr);
        assert_eq!(run.stdout.trim(), "", "ch-remote {arguments:?}");
    }

    /// `ch-remote` for a verb that must fail: exit 1 and a message on stderr; the VMM must still
    /// serve afterwards.
    fn ch_remote_refused(&self, arguments: &[&str]) -> String {
        let run = self.ch_remote(arguments);
        assert_eq!(run.code, 1, "ch-remote {arguments:?}: {run:?}");
        assert!(run.stderr.contains("Error"), "{run:?}");
        self.assert_serving();
        run.stderr
    }

    /// `vmm.shutdown` over raw HTTP; the process must end with 0.
    fn shutdown(mut self) -> Vec<String> {
        assert_eq!(self.call("PUT", "vmm.shutdown", None).status, 204);
        let code = self.process.wait_exit_code();
        let stderr = self.process.stderr_log();
        assert_eq!(code, 0, "{stderr}");
        assert!(
            !stderr.contains("seccomp: forbidden system call"),
            "seccomp trap:\n{stderr}"
        );
        self.event_names()
    }

    /// `source:event` of every event written so far.
    fn event_names(&self) -> Vec<String> {
        event_names(&self.events)
    }
}

fn ch_remote_on(socket: &Path, arguments: &[&str]) -> ChRemoteRun {
    let output = Command::new(binaries::ch_remote())
        .arg("--api-socket")
        .arg(socket)
        .args(arguments)
        .stdin(Stdio::null())
        .output()
        .expect("running ch-remote");
    ChRemoteRun {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Asserts that `expected` occurs in `events` in this order (other events may come between).
/// The events of a VMM that boots a VM, pauses it and snapshots it, in order.
const BOOTED_PAUSED_AND_SNAPSHOTTED: [&str; 7] = [
    "vmm:starting",
    "vm:booting",
    "vm:booted",
    "vm:pausing",
    "vm:paused",
    "vm:snapshotting",
    "vm:snapshotted",
];

fn assert_events_in_order(events: &[String], expected: &[&str]) {
    let mut remaining = events.iter();
    for wanted in expected {
        assert!(
            remaining.any(|event| event == wanted),
            "event {wanted} missing or out of order in {events:?}"
        );
    }
}

/// A `vm.create` body: the counter guest on anonymous RAM, serial to `serial_log`, and
/// optionally a disk.
fn counter_config(serial_log: &Path, disk: Option<&Path>) -> String {
    let mut config = json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": GUEST_RAM},
        "payload": {"kernel": test_guest("counter").display().to_string(), "cmdline": guest_cmdline("")},
        "serial": {"mode": "File", "file": serial_log.display().to_string()},
        "console": {"mode": "Off"},
    });
    if let Some(disk) = disk {
        config["disks"] = json!([{"path": disk.display().to_string(), "id": "disk0"}]);
    }
    config.to_string()
}

/// Every upstream path, every implemented operation through a VM's lifecycle, and the error
/// cases, with raw HTTP; then the events of that lifecycle in order.
#[test]
fn raw_http_drives_every_endpoint_and_errors_leave_the_vmm_serving() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let serial_log = dir.path().join("serial.log");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|file| file.set_len(1 << 20))
        .unwrap();
    // As upstream, vm.snapshot writes into an existing directory and never creates it.
    std::fs::create_dir(dir.path().join("snapshot")).unwrap();
    let snapshot = format!("file://{}", dir.path().join("snapshot").display());
    let vmm = VmmProcess::start(dir.path(), "vmm", &[]);

    let ping = vmm.call("GET", "vmm.ping", None).json();
    assert_eq!(ping["pid"], vmm.process.pid());

    // No VM yet: upstream's statuses (404 only where it says "not created" or "config is
    // missing", 500 for "not running").
    for (method, op, status) in [
        ("GET", "vm.info", 404),
        ("GET", "vm.counters", 500),
        ("PUT", "vm.boot", 404),
        ("PUT", "vm.pause", 500),
        ("PUT", "vm.resume", 500),
        ("PUT", "vm.shutdown", 500),
        ("PUT", "vm.reboot", 404),
        ("PUT", "vm.power-button", 500),
    ] {
        vmm.refused(method, op, None, status);
    }
    assert_eq!(vmm.call("PUT", "vm.delete", None).status, 204);
    let snapshot_body = json!({ "destination_url": snapshot }).to_string();
    vmm.refused("PUT", "vm.snapshot", Some(&snapshot_body), 500);

    // Protocol errors.
    vmm.refused("PUT", "vm.create", Some("{"), 400);
    vmm.refused("PUT", "vm.create", None, 400);
    vmm.refused("PUT", "vm.snapshot", Some(r#"{"destination_url": 7}"#), 400);
    for (config, reason) in [
        (
            r#"{"payload": {"kernel": "/k"}, "net": [{"tap": "tap0", "num_queues": 3}]}"#,
            "num_queues",
        ),
        (
            r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 0, "max_vcpus": 1}}"#,
            "vCPU",
        ),
    ] {
        let message = vmm.refused("PUT", "vm.create", Some(config), 400);
        assert!(message.contains(reason), "{config}: {message}");
    }
    vmm.refused("GET", "vm.boot", None, 400);
    vmm.refused("PUT", "vmm.ping", None, 400);
    vmm.refused("GET", "vm.frobnicate", None, 404);
    let reply = vmm.raw(b"GET /api/v2/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(reply.status, 404, "{}", reply.body);
    let reply = vmm.raw(b"HELLO\r\n\r\n");
    assert!((400..500).contains(&reply.status), "{reply:?}");
    vmm.assert_serving();

    // Every upstream operation this VMM does not implement, without a VM: upstream's answer
    // for the state (404 or 500), or 501 where the state would allow it.
    let unimplemented: Vec<_> = ROUTES
        .iter()
        .filter(|route| route.operation.is_unimplemented())
        .map(|route| (route, route.operation))
        .collect();
    assert!(unimplemented.len() >= 13, "{unimplemented:?}");
    for (route, operation) in &unimplemented {
        let expected = check_state(*operation, None)
            .err()
            .map_or(501, |e| e.status);
        vmm.refused(route.method.as_str(), route.op, Some("{}"), expected);
    }

    // NV operations without an NV VM.
    vmm.refused("GET", "vm.nv-status", None, 404);
    vmm.refused("PUT", "vm.power-fail", None, 404);
    vmm.refused("PUT", "vm.nv-suspend", None, 404);
    vmm.refused("GET", "vmm.nv-regions", None, 400);
    let missing_region = dir.path().join("no-region");
    let reply = vmm.call(
        "GET",
        &format!("vmm.nv-regions?region={}", missing_region.display()),
        None,
    );
    assert!(reply.status >= 400, "{reply:?}");
    assert!(reply.body.contains("no-region"), "{reply:?}");
    vmm.assert_serving();

    // The lifecycle.
    let config = counter_config(&serial_log, Some(&disk));
    assert_eq!(vmm.call("PUT", "vm.create", Some(&config)).status, 204);
    let message = vmm.refused("PUT", "vm.create", Some(&config), 500);
    assert!(message.contains("VM is already created"), "{message}");
    let nv_recover = json!({"region": missing_region.display().to_string(), "vm": "a"});
    vmm.refused("PUT", "vm.nv-recover", Some(&nv_recover.to_string()), 409);
    let restore_body = json!({ "source_url": snapshot }).to_string();
    vmm.refused("PUT", "vm.restore", Some(&restore_body), 500);
    let info = vmm.call("GET", "vm.info", None).json();
    assert_eq!(info["state"], "Created");
    assert_eq!(info["config"]["disks"][0]["id"], "disk0");
    vmm.refused("PUT", "vm.pause", None, 500);
    vmm.refused("PUT", "vm.snapshot", Some(&snapshot_body), 500);

    assert_eq!(vmm.call("PUT", "vm.boot", None).status, 204);
    wait_for_counter_lines(&serial_log, 2, BOOT_TIMEOUT);
    let message = vmm.refused("PUT", "vm.boot", None, 500);
    assert!(message.contains("VM is already created"), "{message}");
    let message = vmm.refused("PUT", "vm.resume", None, 500);
    assert!(
        message.contains("InvalidStateTransition(Running, Running)"),
        "{message}"
    );
    // With a VM running, the unimplemented operations say so (receiving a migration needs an
    // empty VMM, as upstream).
    for (route, operation) in &unimplemented {
        let expected = check_state(*operation, Some(VmState::Running))
            .err()
            .map_or(501, |e| e.status);
        let message = vmm.refused(route.method.as_str(), route.op, Some("{}"), expected);
        assert!(message.contains(operation.failure()), "{message}");
    }
    let info = vmm.call("GET", "vm.info", None).json();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["memory_actual_size"], GUEST_RAM);
    let counters = vmm.call("GET", "vm.counters", None).json();
    assert!(counters["disk0"].is_object(), "{counters}");
    let message = vmm.refused("PUT", "vm.snapshot", Some(&snapshot_body), 500);
    assert!(
        message.contains("Trying to snapshot while VM is running"),
        "{message}"
    );
    // Refused before anything was written.
    assert_eq!(
        std::fs::read_dir(dir.path().join("snapshot"))
            .unwrap()
            .count(),
        0,
        "a refused snapshot wrote into its destination"
    );

    assert_eq!(vmm.call("PUT", "vm.pause", None).status, 204);
    vmm.refused("PUT", "vm.pause", None, 500);
    assert_eq!(vmm.call("GET", "vm.info", None).json()["state"], "Paused");
    let bad_url = json!({"destination_url": "http://host/snap"}).to_string();
    vmm.refused("PUT", "vm.snapshot", Some(&bad_url), 400);
    assert_eq!(
        vmm.call("PUT", "vm.snapshot", Some(&snapshot_body)).status,
        204
    );
    for file in ["config.json", "state.json", "memory-ranges"] {
        assert!(dir.path().join("snapshot").join(file).exists(), "{file}");
    }
    assert_eq!(vmm.call("PUT", "vm.resume", None).status, 204);
    let lines = counter_lines(&read_log(&serial_log)).len();
    wait_for_counter_lines(&serial_log, lines + 1, BOOT_TIMEOUT);

    assert_eq!(vmm.call("PUT", "vm.reboot", None).status, 204);
    wait_for_counter_lines(&serial_log, 1, BOOT_TIMEOUT);
    assert_eq!(vmm.call("PUT", "vm.shutdown", None).status, 204);
    assert_eq!(vmm.call("GET", "vm.info", None).json()["state"], "Created");
    vmm.refused("PUT", "vm.shutdown", None, 500);
    vmm.refused("PUT", "vm.resume", None, 500);
    assert_eq!(vmm.call("PUT", "vm.delete", None).status, 204);
    vmm.refused("GET", "vm.info", None, 404);

    let events = vmm.shutdown();
    assert_events_in_order(
        &events,
        &[
            &BOOTED_PAUSED_AND_SNAPSHOTTED[..],
            &[
                "vm:resuming",
                "vm:resumed",
                "vm:rebooting",
                "vm:rebooted",
                "vm:shutdown",
                "vm:deleted",
                "vmm:shutdown",
            ],
        ]
        .concat(),
    );
    // Upstream's reboot says nothing of the shutdown and boot inside it.
    let rebooting = events.iter().rposition(|e| e == "vm:rebooting").unwrap();
    assert_eq!(events[rebooting + 1], "vm:rebooted", "{events:?}");
}

/// Every upstream `ch-remote` verb against a real VMM, output checked against the spec, errors
/// on stderr with exit code 1.
#[test]
fn ch_remote_drives_every_verb() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let serial_log = dir.path().join("serial.log");
    let config_path = dir.path().join("vm.json");
    let config = counter_config(&serial_log, None);
    std::fs::write(&config_path, &config).unwrap();
    openapi::check_exchange("PUT", "vm.create", Some(&config), 204, b"").unwrap();
    // As upstream, vm.snapshot writes into an existing directory and never creates it.
    std::fs::create_dir(dir.path().join("snapshot")).unwrap();
    let snapshot = format!("file://{}", dir.path().join("snapshot").display());
    let vmm = VmmProcess::start(dir.path(), "vmm", &[]);

    let ping = vmm.ch_remote_json(&["ping"], "GET", "vmm.ping");
    assert_eq!(ping["pid"], vmm.process.pid());
    vmm.ch_remote_refused(&["info"]);
    vmm.ch_remote_refused(&["boot"]);
    vmm.ch_remote_ok(&["create", config_path.to_str().unwrap()]);
    vmm.ch_remote_refused(&["create", config_path.to_str().unwrap()]);
    let info = vmm.ch_remote_json(&["info"], "GET", "vm.info");
    assert_eq!(info["state"], "Created");
    vmm.ch_remote_refused(&["pause"]);
    vmm.ch_remote_ok(&["boot"]);
    wait_for_counter_lines(&serial_log, 2, BOOT_TIMEOUT);
    assert_eq!(
        vmm.ch_remote_json(&["info"], "GET", "vm.info")["state"],
        "Running"
    );
    vmm.ch_remote_json(&["counters"], "GET", "vm.counters");
    vmm.ch_remote_refused(&["resume"]);
    vmm.ch_remote_refused(&["snapshot", &snapshot]);
    vmm.ch_remote_ok(&["pause"]);
    vmm.ch_remote_ok(&["snapshot", &snapshot]);
    vmm.ch_remote_ok(&["resume"]);
    vmm.ch_remote_ok(&["power-button"]);
    vmm.ch_remote_ok(&["reboot"]);
    wait_for_counter_lines(&serial_log, 1, BOOT_TIMEOUT);

    // The NV family without an NV VM or region.
    vmm.ch_remote_refused(&["nv-persist", "status"]);
    vmm.ch_remote_refused(&["nv-persist", "power-fail"]);
    vmm.ch_remote_refused(&["nv-persist", "suspend"]);
    vmm.ch_remote_refused(&[
        "nv-persist",
        "recover",
        "--region",
        "/nonexistent",
        "--vm",
        "a",
    ]);
    let message = vmm.ch_remote_refused(&["nv-persist", "list", "--region", "/nonexistent"]);
    assert!(message.contains("/nonexistent"), "{message}");

    vmm.ch_remote_ok(&["shutdown"]);
    vmm.ch_remote_ok(&["delete"]);
    vmm.ch_remote_refused(&["info"]);
    // Restore into this (now empty) VMM, with upstream's key=value syntax.
    let message = vmm.ch_remote_refused(&["restore", "source_url=file:///nonexistent-snapshot"]);
    assert!(message.contains("nonexistent-snapshot"), "{message}");
    vmm.ch_remote_ok(&["restore", &format!("source_url={snapshot},resume=on")]);
    assert_eq!(
        vmm.ch_remote_json(&["info"], "GET", "vm.info")["state"],
        "Running"
    );

    // Usage errors never reach the VMM.
    assert_eq!(vmm.ch_remote(&["frobnicate"]).code, 2);
    assert_eq!(vmm.ch_remote(&["restore", "resume=on"]).code, 1);
    let missing = ch_remote_on(&dir.path().join("nobody.sock"), &["ping"]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stderr.contains("nobody.sock"), "{missing:?}");

    let mut vmm = vmm;
    vmm.ch_remote_ok(&["shutdown-vmm"]);
    assert_eq!(
        vmm.process.wait_exit_code(),
        0,
        "{}",
        vmm.process.stderr_log()
    );
}

/// Boots the counter guest, pauses and snapshots it over the API, ends that VMM, and restores
/// the snapshot into a fresh VMM process with `mode`: the counter must continue from where it
/// was, without booting again. Both processes' event streams must tell the lifecycle in order.
fn snapshot_restores_into_a_fresh_vmm(mode: &str, through_ch_remote: bool) {
    let dir = tempfile::tempdir().unwrap();
    let first_log = dir.path().join("first.log");
    let second_log = dir.path().join("second.log");
    let snapshot_dir = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot_dir).unwrap();
    let snapshot = format!("file://{}", snapshot_dir.display());

    let first = VmmProcess::start(dir.path(), "first", &[]);
    let config = counter_config(&first_log, None);
    assert_eq!(first.call("PUT", "vm.create", Some(&config)).status, 204);
    assert_eq!(first.call("PUT", "vm.boot", None).status, 204);
    wait_for_counter_lines(&first_log, 2, BOOT_TIMEOUT);
    assert_eq!(first.call("PUT", "vm.pause", None).status, 204);
    let snapshot_body = json!({ "destination_url": snapshot }).to_string();
    assert_eq!(
        first
            .call("PUT", "vm.snapshot", Some(&snapshot_body))
            .status,
        204
    );
    let before = last_counter_in(&first_log);
    let first_events = first.shutdown();
    assert_events_in_order(
        &first_events,
        &[
            &BOOTED_PAUSED_AND_SNAPSHOTTED[..],
            &["vm:shutdown", "vmm:shutdown"],
        ]
        .concat(),
    );
    assert_eq!(
        std::fs::metadata(snapshot_dir.join("memory-ranges"))
            .unwrap()
            .len(),
        GUEST_RAM,
        "anonymous RAM is copied whole"
    );
    point_serial_to(&snapshot_dir, &second_log);

    let second = VmmProcess::start(dir.path(), "second", &[]);
    if through_ch_remote {
        second.ch_remote_ok(&[
            "restore",
            &format!("source_url={snapshot},resume=on,memory_restore_mode={mode}"),
        ]);
    } else {
        let restore = json!({
            "source_url": snapshot,
            "resume": true,
            "memory_restore_mode": mode,
        })
        .to_string();
        assert_eq!(second.call("PUT", "vm.restore", Some(&restore)).status, 204);
    }
    wait_for_continuation(&second_log, before, BOOT_TIMEOUT);
    let info = second.call("GET", "vm.info", None).json();
    assert_eq!(info["state"], "Running");
    // A second restore into the same VMM is refused: it has a VM now.
    let restore = json!({ "source_url": snapshot }).to_string();
    second.refused("PUT", "vm.restore", Some(&restore), 500);
    // The restored VM snapshots again (after OnDemand this reads pages never touched since the
    // restore through the fault server), and that snapshot restores too.
    let again_dir = dir.path().join("again");
    std::fs::create_dir(&again_dir).unwrap();
    let again = format!("file://{}", again_dir.display());
    assert_eq!(second.call("PUT", "vm.pause", None).status, 204);
    let again_body = json!({ "destination_url": again }).to_string();
    assert_eq!(
        second.call("PUT", "vm.snapshot", Some(&again_body)).status,
        204
    );
    let middle = last_counter_in(&second_log);
    assert_eq!(second.call("PUT", "vm.resume", None).status, 204);
    let second_events = second.shutdown();
    assert_events_in_order(
        &second_events,
        &[
            "vmm:starting",
            "vm:restoring",
            "vm:restored",
            "vm:resuming",
            "vm:resumed",
            "vm:shutdown",
            "vmm:shutdown",
        ],
    );
    assert!(
        !second_events.iter().any(|event| event == "vm:booting"),
        "{second_events:?}"
    );

    let third_log = dir.path().join("third.log");
    point_serial_to(&again_dir, &third_log);
    let third = VmmProcess::start(
        dir.path(),
        "third",
        &[
            "--restore".into(),
            format!("source_url={again},resume=true"),
        ],
    );
    let text = wait_for_counter_lines(&third_log, 2, BOOT_TIMEOUT);
    assert!(!text.contains("counter: boot"), "booted again:\n{text}");
    let after = assert_counter_advances(&text, 2);
    assert!(after[0].counter > middle, "{text}");
    third.shutdown();
}

/// The restored VM writes its serial output to a log of its own: edit the snapshot's config.
#[test]
fn copy_restore_into_a_fresh_vmm_continues_the_guest() {
    integration_tests::require_kvm!();
    snapshot_restores_into_a_fresh_vmm("Copy", true);
}

#[test]
fn on_demand_restore_into_a_fresh_vmm_continues_the_guest() {
    integration_tests::require_kvm!();
    snapshot_restores_into_a_fresh_vmm("OnDemand", false);
}

/// `--restore source_url=..,resume=true` on the command line, for both memory restore modes,
/// and the contradiction `prefault=on` with OnDemand refused at start with exit code 1.
#[test]
fn command_line_restore_resumes_the_guest() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let first_log = dir.path().join("first.log");
    let snapshot_dir = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot_dir).unwrap();
    let snapshot = format!("file://{}", snapshot_dir.display());
    let first = VmmProcess::start(
        dir.path(),
        "first",
        &[
            guest_arguments("counter", "", &format!("{}M", GUEST_RAM >> 20)),
            vec!["--serial".into(), format!("file={}", first_log.display())],
        ]
        .concat(),
    );
    wait_for_counter_lines(&first_log, 2, BOOT_TIMEOUT);
    first.ch_remote_ok(&["pause"]);
    first.ch_remote_ok(&["snapshot", &snapshot]);
    let before = last_counter_in(&first_log);
    first.shutdown();

    for mode in ["copy", "ondemand"] {
        let log = dir.path().join(format!("{mode}.log"));
        point_serial_to(&snapshot_dir, &log);
        let restored = VmmProcess::start(
            dir.path(),
            mode,
            &[
                "--restore".into(),
                format!("source_url={snapshot},resume=true,memory_restore_mode={mode}"),
            ],
        );
        let text = wait_for_counter_lines(&log, 2, BOOT_TIMEOUT);
        assert!(
            !text.contains("counter: boot"),
            "{mode}: booted again:\n{text}"
        );
        let after = assert_counter_advances(&text, 2);
        assert!(after[0].counter > before, "{mode}: {text}");
        assert_eq!(
            restored.call("GET", "vm.info", None).json()["state"],
            "Running"
        );
        restored.shutdown();
    }

    let output = Command::new(binaries::cloud_hypervisor())
        .args([
            "--restore",
            &format!("source_url={snapshot},prefault=on,memory_restore_mode=ondemand"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("prefault"), "{stderr}");
}

/// The NV endpoints on an NV VM: status and region listing (raw and `ch-remote nv-persist`),
/// `vm.power-fail` (answered, then the VMM ends with 75), `vm.nv-recover` into an empty VMM (the
/// counter continues), `vm.nv-suspend` (clean exit), and the listing afterwards.
#[test]
fn nv_endpoints_save_and_recover_over_the_api() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let region = dir.path().join("region");
    let first_log = dir.path().join("first.log");
    let mut first = VmmProcess::start(
        dir.path(),
        "first",
        &[
            guest_arguments("counter", "", &format!("{}M", GUEST_RAM >> 20)),
            vec![
                "--serial".into(),
                format!("file={}", first_log.display()),
                "--nv".into(),
                format!("region={},vm=api,create=on", region.display()),
            ],
        ]
        .concat(),
    );
    wait_for_counter_lines(&first_log, 2, BOOT_TIMEOUT);
    let status = first.call("GET", "vm.nv-status", None).json();
    assert_eq!(status["vm"], "api");
    // NV RAM is advised for huge pages; the smaps-derived facts are reported while it runs.
    let mapping = &status["memory_mapping"];
    assert_eq!(mapping["thp_advised"], true, "{status}");
    assert!(mapping["aligned_2m"].is_boolean(), "{status}");
    assert!(mapping["huge_page_bytes"].is_u64(), "{status}");
    let status = first.ch_remote_json(&["nv-persist", "status"], "GET", "vm.nv-status");
    assert_eq!(status["vm"], "api");
    let regions_op = format!("vmm.nv-regions?region={}", region.display());
    let listing = first.call("GET", &regions_op, None).json();
    assert_eq!(listing["vms"][0]["name"], "api", "{listing}");
    first.ch_remote_json(
        &["nv-persist", "list", "--region", region.to_str().unwrap()],
        "GET",
        "vmm.nv-regions",
    );
    let recover = json!({"region": region.display().to_string(), "vm": "api"}).to_string();
    first.refused("PUT", "vm.nv-recover", Some(&recover), 409);

    // An empty VMM asking for what it cannot have: each answer's status says why.
    let spare = VmmProcess::start(dir.path(), "spare", &[]);
    let recover_body = |region: &Path, vm: &str| {
        json!({"region": region.display().to_string(), "vm": vm}).to_string()
    };
    let message = spare.refused("PUT", "vm.nv-recover", Some(&recover), 409);
    assert!(message.contains("owned by a running process"), "{message}");
    let message = spare.refused(
        "PUT",
        "vm.nv-recover",
        Some(&recover_body(&region, "nope")),
        404,
    );
    assert!(message.contains("nope"), "{message}");
    // A region that is missing or is no region: recovering from it and listing it are refused
    // alike.
    let bad_region_refused = |region: &Path, status: u16| {
        let recover = recover_body(region, "api");
        spare.refused("PUT", "vm.nv-recover", Some(&recover), status);
        let listing = format!("vmm.nv-regions?region={}", region.display());
        spare.refused("GET", &listing, None, status);
    };
    bad_region_refused(&dir.path().join("no-region"), 404);
    let not_a_region = dir.path().join("garbage");
    std::fs::write(&not_a_region, vec![0x5a; 1 << 20]).unwrap();
    bad_region_refused(&not_a_region, 400);
    spare.refused(
        "PUT",
        "vm.nv-recover",
        Some(&recover_body(&region, "bad name")),
        400,
    );
    assert_eq!(first.call("PUT", "vm.power-fail", None).status, 204);
    assert_eq!(first.process.wait_exit_code(), EXIT_POWER_FAIL_SAVED);
    let before = last_counter_in(&first_log);
    let log_before = read_log(&first_log);

    let mut second = VmmProcess::start(dir.path(), "second", &[]);
    let listing = second.call("GET", &regions_op, None).json();
    assert_eq!(listing["vms"][0]["resumable"], true, "{listing}");
    // The save's report outlives the process that saved: the listing and ch-remote show it.
    let saved = listing["vms"][0]["last_save"].clone();
    assert_eq!(saved["kind"], "PowerFail", "{listing}");
    assert_eq!(
        saved["sequence"], listing["vms"][0]["last_save_sequence"],
        "{listing}"
    );
    assert_eq!(saved["deadline_us"], 50_000, "{listing}");
    assert_eq!(
        saved["phases"].as_array().map(Vec::len),
        Some(5),
        "{listing}"
    );
    let phase_sum: u64 = saved["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|phase| phase["duration_us"].as_u64().unwrap())
        .sum();
    assert!(
        phase_sum <= saved["total_us"].as_u64().unwrap(),
        "{listing}"
    );
    let listed = second.ch_remote_json(
        &["nv-persist", "list", "--region", region.to_str().unwrap()],
        "GET",
        "vmm.nv-regions",
    );
    assert_eq!(listed["vms"][0]["last_save"], saved);
    second.ch_remote_ok(&[
        "nv-persist",
        "recover",
        "--region",
        region.to_str().unwrap(),
        "--vm",
        "api",
    ]);
    // The recovered VM keeps the config stored in the region, serial log included; whatever
    // the log held before may or may not be kept, so only what follows is looked at.
    let after_recovery = |text: &str| -> String {
        text.strip_prefix(log_before.as_str())
            .unwrap_or(text)
            .to_string()
    };
    let (text, resumed) = wait_for_log(&first_log, BOOT_TIMEOUT, |text| {
        counter_lines(&after_recovery(text)).len() >= 2
    });
    let text = after_recovery(&text);
    assert!(resumed, "no progress after the recovery:\n{text}");
    assert!(!text.contains("counter: boot"), "booted again:\n{text}");
    let lines = assert_counter_advances(&text, 2);
    assert!(lines[0].counter > before, "{text}");
    assert_eq!(
        second.call("GET", "vm.info", None).json()["state"],
        "Running"
    );
    // The recovered VM reports the save it was recovered from.
    let status = second.call("GET", "vm.nv-status", None).json();
    assert_eq!(status["last_save"], saved, "{status}");
    assert_eq!(status["shutdown_kind"], "PowerFail", "{status}");
    // And where its recovery spent its time: from the request (no exec), phase by phase.
    let recovery = &status["recovery"];
    assert_eq!(recovery["from_exec"], false, "{status}");
    let phases = recovery["phases"].as_array().expect("recovery phases");
    let names: Vec<&str> = phases.iter().filter_map(|p| p["phase"].as_str()).collect();
    assert_eq!(
        names,
        [
            "region-open-claim",
            "memory-map",
            "config-parse",
            "state-read",
            "kvm-vm-memory",
            "irqchip-pit",
            "device-setup",
            "vcpu-creation",
            "vcpu-threads-seccomp",
            "state-restore",
            "record-run",
            "resume"
        ],
        "{status}"
    );
    let sum: u64 = phases
        .iter()
        .filter_map(|p| p["duration_us"].as_u64())
        .sum();
    let total = recovery["total_us"].as_u64().expect("total_us");
    assert!(
        total >= sum && total <= sum + names.len() as u64,
        "{status}"
    );
    // Running again (its saved state no longer resumable), the VM still lists that save.
    let listing = second.call("GET", &regions_op, None).json();
    assert_eq!(listing["vms"][0]["resumable"], false, "{listing}");
    assert_eq!(listing["vms"][0]["last_save"], saved, "{listing}");
    second.ch_remote_ok(&["nv-persist", "suspend"]);
    assert_eq!(
        second.process.wait_exit_code(),
        0,
        "{}",
        second.process.stderr_log()
    );

    let third = VmmProcess::start(dir.path(), "third", &[]);
    let listing = third.call("GET", &regions_op, None).json();
    assert_eq!(listing["vms"][0]["shutdown_kind"], "Suspend", "{listing}");
    assert_eq!(
        listing["vms"][0]["last_save"]["kind"], "Suspend",
        "{listing}"
    );
    assert!(
        listing["vms"][0]["last_save"]["sequence"].as_u64() > saved["sequence"].as_u64(),
        "{listing}"
    );
    // Resumed once more, then ended without a save: nothing is left to recover (409).
    assert_eq!(
        third.call("PUT", "vm.nv-recover", Some(&recover)).status,
        204
    );
    third.shutdown();
    let message = spare.refused("PUT", "vm.nv-recover", Some(&recover), 409);
    assert!(message.contains("no saved state"), "{message}");
    spare.shutdown();
}
