//! Compatibility with upstream cloud-hypervisor v53 on the wire, pinned as facts against a real
//! `cloud-hypervisor` process on KVM: what upstream's own `ch-remote` and scripts written for
//! upstream rely on. Every answer is read by `integration_tests::api_client`, which parses as
//! upstream's client does (status = the trimmed text after `HTTP/1.1 `; error bodies must be JSON
//! arrays of strings).
//!
//! Pinned: the status line without reason phrase; upstream's status and body for each request
//! and VM state it was observed in; `vmm.ping`'s members; the event monitor's format and its
//! sequences for reboot, `vmm.shutdown`, a failed boot and a failed reboot; and the HTTP defects
//! of issue 10 (NUL byte in a path, conflicting Content-Length, idle or slow clients starving the
//! API, two VMMs on one socket path, a socket path too long to connect to).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration_tests::api_client::{self, Answer};
use integration_tests::harness::{guest_cmdline, read_log, strings, wait_for_log};
use integration_tests::process::VmmProcess;
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A `cloud-hypervisor` with an API socket and an event monitor in `dir`; killed on drop.
struct Vmm {
    process: VmmProcess,
    socket: PathBuf,
    events: PathBuf,
}

impl Vmm {
    fn spawn(dir: &Path, name: &str, socket: &Path) -> Vmm {
        let events = dir.join(format!("{name}.events"));
        let arguments = [
            "--api-socket".to_string(),
            format!("path={}", socket.display()),
            "--event-monitor".to_string(),
            format!("path={}", events.display()),
        ];
        Vmm {
            process: VmmProcess::spawn(dir, name, &arguments, &[]).with_timeout(TIMEOUT),
            socket: socket.to_path_buf(),
            events,
        }
    }

    fn start(dir: &Path, name: &str) -> Vmm {
        let mut vmm = Self::spawn(dir, name, &dir.join(format!("{name}.sock")));
        vmm.wait_serving();
        vmm
    }

    fn wait_serving(&mut self) {
        self.process.wait_for_socket(&self.socket, TIMEOUT);
    }

    fn call(&self, method: &str, op: &str, body: &str) -> Answer {
        api_client::call(&self.socket, method, op, body, TIMEOUT)
    }

    /// An error answer: its status and its messages (a JSON array of strings, or the test fails).
    fn error(&self, method: &str, op: &str, body: &str) -> (u16, Vec<String>) {
        let answer = self.call(method, op, body);
        (
            answer.status,
            answer.error_messages().unwrap_or_else(|e| panic!("{e}")),
        )
    }

    /// Ends the VMM over the API and returns its events as `source:event`.
    fn shutdown(mut self) -> Vec<Value> {
        assert_eq!(self.call("PUT", "vmm.shutdown", "").status, 204);
        assert_eq!(
            self.process.wait_exit_code(),
            0,
            "{}",
            self.process.stderr_log()
        );
        read_events(&self.events)
    }
}

/// Reads an event file as upstream writes it: pretty-printed objects, each followed by a blank
/// line, each `{timestamp: {secs, nanos}, source, event, properties}`.
fn read_events(path: &Path) -> Vec<Value> {
    let text = read_log(path);
    assert!(text.ends_with("}\n\n"), "{text:?}");
    let mut events = Vec::new();
    for chunk in text.split("\n\n").filter(|chunk| !chunk.is_empty()) {
        assert!(
            chunk.starts_with("{\n  \""),
            "not pretty-printed: {chunk:?}"
        );
        let event: Value = serde_json::from_str(chunk).expect("one JSON object per chunk");
        let object = event.as_object().unwrap();
        let mut keys: Vec<&String> = object.keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["event", "properties", "source", "timestamp"],
            "{chunk}"
        );
        assert!(event["timestamp"]["secs"].is_u64(), "{chunk}");
        assert!(event["timestamp"]["nanos"].is_u64(), "{chunk}");
        events.push(event);
    }
    events
}

fn names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["source"] == "vm" || e["source"] == "vmm")
        .map(|e| {
            format!(
                "{} {}",
                e["source"].as_str().unwrap(),
                e["event"].as_str().unwrap()
            )
        })
        .collect()
}

fn counter_config(dir: &Path) -> String {
    let kernel = integration_tests::guests::guest_image("counter").expect("counter guest");
    json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64u64 << 20},
        "payload": {"kernel": kernel.display().to_string(), "cmdline": guest_cmdline("")},
        "serial": {"mode": "File", "file": dir.join("serial.log").display().to_string()},
        "console": {"mode": "Off"},
    })
    .to_string()
}

#[test]
fn upstream_status_lines_and_bodies_in_every_state() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let vmm = Vmm::start(dir.path(), "vmm");

    // The status line: code, one space, CRLF, whatever the status.
    for (method, op, line) in [
        ("GET", "vmm.ping", "HTTP/1.1 200 "),
        ("PUT", "vm.delete", "HTTP/1.1 204 "),
        ("GET", "vm.info", "HTTP/1.1 404 "),
        ("GET", "vm.boot", "HTTP/1.1 400 "),
        ("PUT", "vm.pause", "HTTP/1.1 500 "),
    ] {
        let answer = vmm.call(method, op, "");
        assert_eq!(answer.status_line, line, "{method} {op}: {answer:?}");
    }

    // vmm.ping: upstream's four members.
    let ping = vmm.call("GET", "vmm.ping", "");
    assert_eq!(ping.status, 200);
    assert_eq!(ping.header("Content-Type"), Some("application/json"));
    let ping: Value = serde_json::from_str(&ping.body).unwrap();
    assert_eq!(ping["version"], "53.0.0");
    assert!(ping["build_version"]
        .as_str()
        .unwrap()
        .starts_with("v53.0.0"));
    assert_eq!(ping["pid"], vmm.process.pid());
    let features = ping["features"].as_array().unwrap();
    assert!(features.contains(&json!("kvm")), "{ping}");

    // No VM.
    let no_vm: &[(&str, &str, &str, u16, &[&str])] = &[
        (
            "GET",
            "vm.info",
            "",
            404,
            &[
                "Error from API",
                "The VM info is not available",
                "VM is not created",
            ],
        ),
        (
            "PUT",
            "vm.boot",
            "",
            404,
            &[
                "Error from API",
                "The VM could not boot",
                "VM config is missing",
            ],
        ),
        (
            "PUT",
            "vm.pause",
            "",
            500,
            &[
                "Error from API",
                "The VM could not be paused",
                "VM is not running",
            ],
        ),
        (
            "PUT",
            "vm.shutdown",
            "",
            500,
            &[
                "Error from API",
                "The VM could not shutdown",
                "VM is not running",
            ],
        ),
        (
            "GET",
            "vm.counters",
            "",
            500,
            &[
                "Error from API",
                "The VM info is not available",
                "VM is not running",
            ],
        ),
        (
            "PUT",
            "vm.snapshot",
            r#"{"destination_url":"file:///nonexistent/snap"}"#,
            500,
            &[
                "Error from API",
                "The VM could not be snapshotted",
                "VM is not running",
            ],
        ),
        (
            "PUT",
            "vm.resize",
            r#"{"desired_vcpus":2}"#,
            404,
            &[
                "Error from API",
                "The VM could not be resized",
                "VM is not created",
            ],
        ),
        ("GET", "vm.boot", "", 400, &["Bad Request"]),
        ("GET", "vm.nosuch", "", 404, &["Not Found"]),
        (
            "PUT",
            "vm.create",
            "{not json",
            400,
            &[
                "Failed to deserialize JSON",
                "key must be a string at line 1 column 2",
            ],
        ),
    ];
    for (method, op, body, status, messages) in no_vm {
        assert_eq!(
            vmm.error(method, op, body),
            (*status, strings(messages)),
            "{method} {op}"
        );
    }
    assert_eq!(vmm.call("PUT", "vm.delete", "").status, 204);

    // Created, then running.
    assert_eq!(
        vmm.call("PUT", "vm.create", &counter_config(dir.path()))
            .status,
        204
    );
    assert_eq!(
        vmm.error("PUT", "vm.create", &counter_config(dir.path())),
        (
            500,
            strings(&[
                "Error from API",
                "The VM could not be created",
                "VM is already created"
            ])
        )
    );
    assert_eq!(vmm.call("PUT", "vm.boot", "").status, 204);
    assert_eq!(
        vmm.error("PUT", "vm.resume", ""),
        (
            500,
            strings(&[
                "Error from API",
                "The VM could not resume",
                "Invalid transition: InvalidStateTransition(Running, Running)"
            ])
        )
    );
    assert_eq!(
        vmm.error("PUT", "vm.boot", ""),
        (
            500,
            strings(&[
                "Error from API",
                "The VM could not boot",
                "VM is already created"
            ])
        )
    );
    let snapshot_dir = dir.path().join("snap");
    let snapshot =
        json!({"destination_url": format!("file://{}", snapshot_dir.display())}).to_string();
    assert_eq!(
        vmm.error("PUT", "vm.snapshot", &snapshot),
        (
            500,
            strings(&[
                "Error from API",
                "The VM could not be snapshotted",
                "Trying to snapshot while VM is running"
            ])
        )
    );
    assert!(
        !snapshot_dir.exists(),
        "a refused snapshot created its directory"
    );
    let counters = vmm.call("GET", "vm.counters", "");
    assert_eq!(counters.status, 200);
    // Operations we do not carry out: a clear error in upstream's form, once the state allows.
    let (status, messages) = vmm.error("PUT", "vm.nmi", "");
    assert_eq!(status, 501);
    assert_eq!(&messages[..2], ["Error from API", "Error triggering NMI"]);
    // The ACPI power button (the GED's event) is pressed, as upstream.
    assert_eq!(vmm.call("PUT", "vm.power-button", "").status, 204);
    // Paused: pausing again is upstream's invalid transition.
    assert_eq!(vmm.call("PUT", "vm.pause", "").status, 204);
    // A press while paused stays pending for the guest.
    assert_eq!(vmm.call("PUT", "vm.power-button", "").status, 204);
    assert_eq!(
        vmm.error("PUT", "vm.pause", "").1[2],
        "Invalid transition: InvalidStateTransition(Paused, Paused)"
    );
    assert_eq!(vmm.call("PUT", "vm.delete", "").status, 204);
    assert_eq!(vmm.call("PUT", "vm.delete", "").status, 204);
    vmm.shutdown();
}

#[test]
fn event_monitor_sequences_match_upstream() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let vmm = Vmm::start(dir.path(), "vmm");
    // A reboot with no VM fails, and still says `rebooting`.
    assert_eq!(vmm.error("PUT", "vm.reboot", "").0, 404);
    // A boot with no config fails, and still says `booting`.
    assert_eq!(vmm.error("PUT", "vm.boot", "").0, 404);
    // A boot that fails further in (the kernel is not loadable) says `booting` once, no
    // `booted`.
    let empty_kernel = dir.path().join("empty-kernel");
    std::fs::write(&empty_kernel, b"").unwrap();
    let mut broken: Value = serde_json::from_str(&counter_config(dir.path())).unwrap();
    broken["payload"]["kernel"] = json!(empty_kernel.display().to_string());
    assert_eq!(
        vmm.call("PUT", "vm.create", &broken.to_string()).status,
        204
    );
    assert!(vmm.call("PUT", "vm.boot", "").status >= 400);
    assert_eq!(vmm.call("PUT", "vm.delete", "").status, 204);
    let booted_before = names(&read_events_now(&vmm.events));
    assert_eq!(
        booted_before,
        [
            "vmm starting",
            "vm rebooting",
            "vm booting",
            "vm booting",
            "vm deleted"
        ],
    );

    assert_eq!(
        vmm.call("PUT", "vm.create", &counter_config(dir.path()))
            .status,
        204
    );
    assert_eq!(vmm.call("PUT", "vm.boot", "").status, 204);
    let serial = dir.path().join("serial.log");
    let (_, booted) = wait_for_log(&serial, TIMEOUT, |text| text.contains("counter"));
    assert!(booted, "{}", read_log(&serial));
    assert_eq!(vmm.call("PUT", "vm.reboot", "").status, 204);
    let events = vmm.shutdown();
    let tail: Vec<String> = names(&events).split_off(booted_before.len());
    assert_eq!(
        tail,
        [
            "vm booting",
            "vm booted",
            // Nothing between the two: no shutdown, booting or booted of the reboot itself.
            "vm rebooting",
            "vm rebooted",
            // vmm.shutdown with a VM.
            "vm shutdown",
            "vm deleted",
            "vmm shutdown",
        ]
    );
    let nanos = |event: &Value| {
        event["timestamp"]["secs"].as_u64().unwrap() * 1_000_000_000
            + event["timestamp"]["nanos"].as_u64().unwrap()
    };
    assert!(events
        .windows(2)
        .all(|pair| nanos(&pair[0]) <= nanos(&pair[1])));
    assert!(events
        .iter()
        .all(|e| e["properties"].is_null() || e["properties"].is_object()));
}

/// The events written so far (the writer thread may lag a little behind an answer).
fn read_events_now(path: &Path) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = Vec::new();
    while Instant::now() < deadline {
        let text = read_log(path);
        if text.ends_with("}\n\n") {
            let events = read_events(path);
            if events.len() == last.len() && !events.is_empty() {
                return events;
            }
            last = events;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    last
}

/// Issue 10, items on the HTTP server, each against the real process.
#[test]
fn http_defects_of_issue_10_stay_fixed() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let vmm = Vmm::start(dir.path(), "vmm");

    // A NUL byte in a path: a 400 from the API, not a 500 from a system call.
    let answer = vmm.call("GET", "vmm.nv-regions?region=%2Ftmp%2Fa%00b", "");
    assert_eq!(answer.status, 400, "{answer:?}");
    let answer = vmm.call(
        "PUT",
        "vm.nv-recover",
        r#"{"region":"/tmp/a\u0000b","vm":"x"}"#,
    );
    assert_eq!(answer.status, 400, "{answer:?}");

    // Two different Content-Length headers: 400 at once, not 408 after 10 s.
    let started = Instant::now();
    let answer = api_client::exchange_answer(
        &vmm.socket,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 50\r\n\r\n{}",
        TIMEOUT,
    );
    assert_eq!(answer.status, 400);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Idle and slow clients (more than the server's 16 slots) must not lock others out.
    let mut hogs = Vec::new();
    for index in 0..24 {
        let mut hog = UnixStream::connect(&vmm.socket).unwrap();
        if index % 2 == 1 {
            hog.write_all(b"GET /api/v1/vmm.pi").unwrap();
        }
        hogs.push(hog);
    }
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(vmm.call("GET", "vmm.ping", "").status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(hogs);
    vmm.shutdown();
}

/// Issue 10: two VMMs started on one `--api-socket` path both ran and one of them became
/// unreachable. Now one serves and the other fails at once with a clear error.
#[test]
fn two_vmms_on_one_socket_path_never_both_start() {
    integration_tests::require_kvm!();
    for round in 0..8 {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let mut first = Vmm::spawn(dir.path(), "first", &socket);
        let mut second = Vmm::spawn(dir.path(), "second", &socket);
        // One of them ends with an error; the other serves.
        let deadline = Instant::now() + TIMEOUT;
        let (loser, mut winner) = loop {
            if let Some(status) = first.process.try_wait() {
                break ((first, status), second);
            }
            if let Some(status) = second.process.try_wait() {
                break ((second, status), first);
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: both VMMs still run"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let (loser, status) = loser;
        assert_eq!(status.code(), Some(1), "round {round}");
        let message = loser.process.stderr_log();
        assert!(
            message.contains("another process is already serving"),
            "{message}"
        );
        winner.wait_serving();
        let ping: Value = serde_json::from_str(&winner.call("GET", "vmm.ping", "").body).unwrap();
        assert_eq!(ping["pid"], winner.process.pid(), "round {round}");
        drop(winner);
    }
}

/// Issue 10: a socket path longer than a Unix socket address holds started and served nowhere.
#[test]
fn socket_path_over_107_bytes_is_refused_at_start() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s".repeat(110));
    let mut vmm = Vmm::spawn(dir.path(), "long", &socket);
    assert_eq!(vmm.process.wait_exit_code(), 1);
    let message = vmm.process.stderr_log();
    assert!(message.contains("107"), "{message}");
    assert!(!socket.exists());
}
