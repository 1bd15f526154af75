//! The `ch-remote` binary as an operator's script sees it: output, exit codes and stderr.
//!
//! Most tests talk to `UpstreamFake`, a small server that answers in upstream cloud-hypervisor
//! v53's wire format (`HTTP/1.1 200 ` without a reason phrase, errors as JSON arrays of strings)
//! and records each request, so they pin the client's behaviour whatever our VMM's server sends
//! today. The last tests drive a real VMM (`vmm`'s API server and control loop) in this process.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use serde_json::{json, Value};
use vmm::config::{ApiSocketConfig, SeccompMode};
use vmm::Vmm;

/// One request as the fake server received it.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    method: String,
    path: String,
    body: Option<String>,
}

type Answer = dyn Fn(&Seen) -> Vec<u8> + Send + Sync;

struct UpstreamFake {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// An answer in upstream's format: no reason phrase; a body only with its Content-Length.
fn upstream_answer(status: u16, body: Option<&str>) -> Vec<u8> {
    match body {
        Some(body) => format!(
            "HTTP/1.1 {status} \r\nServer: Cloud Hypervisor API\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        None => format!("HTTP/1.1 {status} \r\nServer: Cloud Hypervisor API\r\n\r\n"),
    }
    .into_bytes()
}

impl UpstreamFake {
    fn start(answer: impl Fn(&Seen) -> Vec<u8> + Send + Sync + 'static) -> Self {
        let answer: Arc<Answer> = Arc::new(answer);
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                if let Some(request) = read_request(&mut stream) {
                    log.lock().unwrap().push(request.clone());
                    let _ = stream.write_all(&answer(&request));
                }
            }
        });
        UpstreamFake {
            _dir: dir,
            socket,
            seen,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn read_request(stream: &mut UnixStream) -> Option<Seen> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = request.parse(&buffer) {
            let length = request
                .headers
                .iter()
                .find(|header| header.name.eq_ignore_ascii_case("content-length"))
                .map(|header| std::str::from_utf8(header.value).unwrap().parse().unwrap());
            if buffer.len() >= head + length.unwrap_or(0) {
                return Some(Seen {
                    method: request.method?.to_owned(),
                    path: request.path?.to_owned(),
                    body: length.map(|_| String::from_utf8_lossy(&buffer[head..]).into_owned()),
                });
            }
        }
        let count = stream.read(&mut chunk).ok()?;
        if count == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..count]);
    }
}

fn ch_remote_on(socket: &Path, args: &[&str]) -> Output {
    ch_remote_with_stdin(Some(socket), args, "")
}

fn ch_remote_with_stdin(socket: Option<&Path>, args: &[&str], stdin: &str) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ch-remote"));
    if let Some(socket) = socket {
        command.arg("--api-socket").arg(socket);
    }
    let mut child = command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const PING: &str =
    r#"{"build_version":"v53.0.0","version":"53.0.0","pid":4242,"features":["io_uring","kvm"]}"#;

#[test]
fn ping_and_info_print_the_body_on_one_line() {
    let info =
        r#"{"config":{"cpus":{"boot_vcpus":1}},"state":"Running","memory_actual_size":536870912}"#;
    let fake = UpstreamFake::start(move |seen| match seen.path.as_str() {
        "/api/v1/vmm.ping" => upstream_answer(200, Some(PING)),
        _ => upstream_answer(200, Some(info)),
    });
    let ping = ch_remote_on(&fake.socket, &["ping"]);
    assert_eq!(ping.status.code(), Some(0), "{}", stderr(&ping));
    assert_eq!(stdout(&ping), format!("{PING}\n"));
    assert!(stderr(&ping).is_empty());
    let shown = ch_remote_on(&fake.socket, &["info"]);
    assert_eq!(shown.status.code(), Some(0), "{}", stderr(&shown));
    assert_eq!(stdout(&shown), format!("{info}\n"));
    assert_eq!(
        fake.seen(),
        vec![
            Seen {
                method: "GET".into(),
                path: "/api/v1/vmm.ping".into(),
                body: None
            },
            Seen {
                method: "GET".into(),
                path: "/api/v1/vm.info".into(),
                body: None
            },
        ]
    );
}

#[test]
fn api_error_exits_1_with_the_messages_numbered_on_stderr() {
    let fake = UpstreamFake::start(|_| {
        upstream_answer(
            404,
            Some(r#"["Error from API","The VM info is not available","VM is not created"]"#),
        )
    });
    let output = ch_remote_on(&fake.socket, &["info"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).is_empty());
    assert_eq!(
        stderr(&output),
        "Error: ch-remote exited with the following chain of errors:\n\
         \x20 0: http client error\n\
         \x20 1: Server responded with NotFound\n\
         \x20 2: Error from API\n\
         \x20 3: The VM info is not available\n\
         \x20 4: VM is not created\n"
    );
}

#[test]
fn non_json_error_body_is_reported_as_such() {
    let fake = UpstreamFake::start(|_| {
        b"HTTP/1.1 500 \r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nVM is Running"
            .to_vec()
    });
    let output = ch_remote_on(&fake.socket, &["pause"]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(
        text.contains(
            "  X: Can't get remote's error messages from JSON response: expected value at \
             line 1 column 1: body='VM is Running'"
        ),
        "{text}"
    );
}

#[test]
fn status_line_with_a_reason_phrase_fails_as_upstream() {
    // Upstream's client reads "200 OK" as the status number and fails, though the VMM did the work.
    let fake = UpstreamFake::start(|_| {
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}".to_vec()
    });
    let output = ch_remote_on(&fake.socket, &["ping"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).is_empty());
    assert!(
        stderr(&output).contains("  1: Error parsing HTTP status code\n"),
        "{}",
        stderr(&output)
    );
    assert_eq!(fake.seen().len(), 1);
}

#[test]
fn every_verb_sends_upstreams_request() {
    let fake = UpstreamFake::start(|_| upstream_answer(204, None));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vm.json");
    std::fs::write(&config, r#"{"payload":{"kernel":"/k"}}"#).unwrap();
    let config = config.to_str().unwrap().to_owned();
    let cases: Vec<(Vec<&str>, &str, &str, Option<Value>)> = vec![
        (vec!["ping"], "GET", "vmm.ping", None),
        (vec!["shutdown-vmm"], "PUT", "vmm.shutdown", None),
        (vec!["boot"], "PUT", "vm.boot", None),
        (vec!["delete"], "PUT", "vm.delete", None),
        (vec!["shutdown"], "PUT", "vm.shutdown", None),
        (vec!["reboot"], "PUT", "vm.reboot", None),
        (vec!["pause"], "PUT", "vm.pause", None),
        (vec!["resume"], "PUT", "vm.resume", None),
        (vec!["power-button"], "PUT", "vm.power-button", None),
        (vec!["info"], "GET", "vm.info", None),
        (vec!["counters"], "GET", "vm.counters", None),
        (vec!["nmi"], "PUT", "vm.nmi", None),
        (
            vec!["create", &config],
            "PUT",
            "vm.create",
            Some(json!({"payload": {"kernel": "/k"}})),
        ),
        (
            vec!["snapshot", "file:///snap"],
            "PUT",
            "vm.snapshot",
            Some(json!({"destination_url": "file:///snap"})),
        ),
        (
            vec!["restore", "source_url=file:///snap,resume=on"],
            "PUT",
            "vm.restore",
            Some(json!({"source_url": "file:///snap", "resume": true})),
        ),
        (
            vec!["coredump", "file:///core"],
            "PUT",
            "vm.coredump",
            Some(json!({"destination_url": "file:///core"})),
        ),
        (
            vec!["resize", "--cpus", "2"],
            "PUT",
            "vm.resize",
            Some(json!({"desired_vcpus": 2, "desired_ram": null, "desired_balloon": null})),
        ),
        (
            vec!["resize-disk", "--disk", "d0", "--size", "1G"],
            "PUT",
            "vm.resize-disk",
            Some(json!({"id": "d0", "desired_size": 1u64 << 30})),
        ),
        (
            vec!["resize-zone", "--id", "mem0", "--size", "1G"],
            "PUT",
            "vm.resize-zone",
            Some(json!({"id": "mem0", "desired_ram": 1u64 << 30})),
        ),
        (
            vec!["add-device", "path=/sys/bus/pci/devices/0000:01:00.0/"],
            "PUT",
            "vm.add-device",
            Some(json!({"path": "/sys/bus/pci/devices/0000:01:00.0/"})),
        ),
        (
            vec!["add-disk", "path=/d.raw,readonly=on"],
            "PUT",
            "vm.add-disk",
            Some(json!({"path": "/d.raw", "readonly": true})),
        ),
        (
            vec!["add-fs", "tag=t,socket=/fs.sock"],
            "PUT",
            "vm.add-fs",
            Some(json!({"tag": "t", "socket": "/fs.sock"})),
        ),
        (
            vec!["add-net", "tap=tap0"],
            "PUT",
            "vm.add-net",
            Some(json!({"tap": "tap0"})),
        ),
        (
            vec!["add-pmem", "file=/p.img,size=2M"],
            "PUT",
            "vm.add-pmem",
            Some(json!({"file": "/p.img", "size": 2u64 << 20})),
        ),
        (
            vec!["add-vsock", "cid=3,socket=/v.sock"],
            "PUT",
            "vm.add-vsock",
            Some(json!({"cid": 3, "socket": "/v.sock"})),
        ),
        (
            vec!["add-vdpa", "path=/dev/vhost-vdpa-0"],
            "PUT",
            "vm.add-vdpa",
            Some(json!({"path": "/dev/vhost-vdpa-0"})),
        ),
        (
            vec!["add-user-device", "socket=/u.sock"],
            "PUT",
            "vm.add-user-device",
            Some(json!({"socket": "/u.sock"})),
        ),
        (
            vec!["remove-device", "_disk0"],
            "PUT",
            "vm.remove-device",
            Some(json!({"id": "_disk0"})),
        ),
        (
            vec!["send-migration", "destination_url=unix:/m.sock,local=on"],
            "PUT",
            "vm.send-migration",
            Some(json!({"destination_url": "unix:/m.sock", "local": true})),
        ),
        (
            vec!["receive-migration", "receiver_url=unix:/m.sock"],
            "PUT",
            "vm.receive-migration",
            Some(json!({"receiver_url": "unix:/m.sock"})),
        ),
        (vec!["nv-persist", "status"], "GET", "vm.nv-status", None),
        (
            vec!["nv-persist", "power-fail"],
            "PUT",
            "vm.power-fail",
            None,
        ),
        (vec!["nv-persist", "suspend"], "PUT", "vm.nv-suspend", None),
        (
            vec![
                "nv-persist",
                "recover",
                "--region",
                "/dev/dax0.0",
                "--vm",
                "db",
            ],
            "PUT",
            "vm.nv-recover",
            Some(json!({"region": "/dev/dax0.0", "vm": "db"})),
        ),
        (
            vec!["nv-persist", "list", "--region", "/r"],
            "GET",
            "vmm.nv-regions?region=%2Fr",
            None,
        ),
        (
            vec!["nv-persist", "swap-out", "--path", "/swap/db"],
            "PUT",
            "vm.nv-swap-out",
            Some(json!({"destination_url": "file:///swap/db"})),
        ),
        (
            vec![
                "nv-persist",
                "swap-in",
                "--path",
                "/swap/db",
                "--region",
                "/dev/dax0.0",
                "--keep",
            ],
            "PUT",
            "vm.nv-swap-in",
            Some(json!({"source_url": "file:///swap/db", "region": "/dev/dax0.0", "keep": true})),
        ),
    ];
    for (args, method, op, body) in &cases {
        let output = ch_remote_on(&fake.socket, args);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{args:?}: {}",
            stderr(&output)
        );
        // A 204 prints nothing.
        assert!(
            stdout(&output).is_empty() && stderr(&output).is_empty(),
            "{args:?}"
        );
        let seen = fake.seen().pop().unwrap();
        assert_eq!(
            (seen.method.as_str(), seen.path.as_str()),
            (*method, format!("/api/v1/{op}").as_str()),
            "{args:?}"
        );
        let sent: Option<Value> = seen.body.map(|text| serde_json::from_str(&text).unwrap());
        assert_eq!(&sent, body, "{args:?}");
    }
    assert_eq!(fake.seen().len(), cases.len());
}

#[test]
fn create_reads_stdin_without_a_path_or_with_dash() {
    let fake = UpstreamFake::start(|_| upstream_answer(204, None));
    let config = "{\"cpus\":{\"boot_vcpus\":1}}\n";
    for args in [&["create"][..], &["create", "-"]] {
        let output = ch_remote_with_stdin(Some(&fake.socket), args, config);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let seen = fake.seen().pop().unwrap();
        assert_eq!(seen.path, "/api/v1/vm.create");
        assert_eq!(seen.body.as_deref(), Some(config));
    }
}

#[test]
fn usage_errors_exit_2_and_bad_arguments_exit_1_without_a_request() {
    let fake = UpstreamFake::start(|_| upstream_answer(204, None));
    let socket = Some(fake.socket.as_path());
    // Usage errors: clap's exit code 2.
    for args in [
        &[][..],
        &["explode"],
        &["add-disk"],
        &["resize-zone", "--id", "z"],
        &["ping", "--bogus"],
        &["nv-persist", "recover", "--vm", "a"],
    ] {
        let output = ch_remote_with_stdin(socket, args, "");
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(!stderr(&output).is_empty(), "{args:?}");
    }
    // No arguments at all shows the usage.
    let bare = ch_remote_with_stdin(None, &[], "");
    assert_eq!(bare.status.code(), Some(2));
    assert!(stderr(&bare).contains("Usage:"), "{}", stderr(&bare));

    // Arguments that parse but cannot become a request: 1, with upstream's messages.
    for (args, message) in [
        (
            &["receive-migration", "unix:/tmp/mig.sock"][..],
            "  0: Error parsing receive-migration syntax\n  1: unknown option: \"unix:/tmp/mig.sock\"\n",
        ),
        (
            &["add-disk", "path=/a,bogus=1"],
            "  0: Error parsing disk syntax\n  1: unknown option: \"bogus\"\n",
        ),
        (
            &["restore", "resume=on"],
            "  0: Error parsing restore syntax\n  1: source_url missing\n",
        ),
        (&["resize", "--cpus", "x"], "  0: Error parsing CPU count\n"),
        (
            &["create", "/nonexistent/vm.json"],
            "  0: Error reading from file /nonexistent/vm.json\n",
        ),
    ] {
        let output = ch_remote_with_stdin(socket, args, "");
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let text = stderr(&output);
        assert!(
            text.starts_with("Error: ch-remote exited with the following chain of errors:\n"),
            "{text}"
        );
        assert!(text.contains(message), "{args:?}: {text}");
    }
    // Without --api-socket: 1, as upstream.
    let no_socket = ch_remote_with_stdin(None, &["ping"], "");
    assert_eq!(no_socket.status.code(), Some(1));
    assert!(stderr(&no_socket).contains("api-socket"));
    // Nothing reached the VMM.
    assert!(fake.seen().is_empty(), "{:?}", fake.seen());
}

#[test]
fn missing_socket_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let output = ch_remote_on(&socket, &["ping"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("Error opening HTTP socket")
            && stderr(&output).contains("nobody.sock"),
        "{}",
        stderr(&output)
    );
}

/// A real VMM in this process, without a VM: the API server and the control loop of `vmm`
/// (`Vmm::start_api`, `Vmm::control_loop`, seccomp on), as `cloud-hypervisor --api-socket` runs
/// them.
struct RealVmm {
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl RealVmm {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let config = ApiSocketConfig::Path(socket.to_str().unwrap().to_owned());
        let (ready, started) = mpsc::channel();
        thread::spawn(move || {
            let mut vmm = Vmm::new(SeccompMode::Enforce).expect("creating the VMM");
            vmm.start_api(config).expect("serving the API");
            ready.send(()).unwrap();
            vmm.control_loop().expect("the control loop");
        });
        started.recv().expect("the VMM started");
        RealVmm { _dir: dir, socket }
    }
}

/// Each verb's arguments reach the VMM: its answer names them (an NV region, a snapshot
/// directory), or is the refusal the VMM's state calls for.
#[test]
fn verbs_reach_the_real_control_loop_with_their_arguments() {
    let vmm = RealVmm::start();
    for (args, refusal) in [
        (
            &["nv-persist", "list", "--region", "/tmp/a b&c"][..],
            "/tmp/a b&c",
        ),
        (
            &[
                "nv-persist",
                "recover",
                "--region",
                "/nonexistent/dax0.0",
                "--vm",
                "db",
            ],
            "/nonexistent/dax0.0",
        ),
        (&["nv-persist", "status"], "no VM in NV memory"),
        (&["nv-persist", "power-fail"], "no VM in NV memory"),
        (&["nv-persist", "suspend"], "no VM in NV memory"),
        (
            &["nv-persist", "swap-out", "--path", "/nonexistent/swap"],
            "no VM in NV memory",
        ),
        (
            &["nv-persist", "swap-in", "--path", "/nonexistent/swap"],
            "/nonexistent/swap",
        ),
        (
            &[
                "restore",
                "source_url=file:///nonexistent/snap,resume=on,memory_restore_mode=ondemand",
            ],
            "/nonexistent/snap",
        ),
        (
            &["snapshot", "file:///nonexistent/snap"],
            "VM is not running",
        ),
    ] {
        let output = ch_remote_on(&vmm.socket, args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(stdout(&output).is_empty(), "{args:?}");
        let errors = stderr(&output);
        assert!(errors.contains("Error from API"), "{args:?}: {errors}");
        assert!(errors.contains(refusal), "{args:?}: {errors}");
    }
    let output = ch_remote_on(&vmm.socket, &["shutdown-vmm"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).is_empty());
}

#[test]
fn real_server_ping_and_errors() {
    let vmm = RealVmm::start();
    let ping = ch_remote_on(&vmm.socket, &["ping"]);
    assert_eq!(ping.status.code(), Some(0), "{}", stderr(&ping));
    let text = stdout(&ping);
    assert_eq!(text.lines().count(), 1, "{text}");
    let value: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["pid"], std::process::id());
    assert_eq!(value["version"], "53.0.0");
    let info = ch_remote_on(&vmm.socket, &["info"]);
    assert_eq!(info.status.code(), Some(1));
    assert!(stdout(&info).is_empty());
    assert!(
        stderr(&info).contains("1: Server responded with NotFound\n"),
        "{}",
        stderr(&info)
    );
    assert!(
        stderr(&info).contains("VM is not created"),
        "{}",
        stderr(&info)
    );
}
