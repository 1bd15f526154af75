//! The `ch-remote` binary against the real API server (vmm::api) with a fake control loop:
//! output, exit codes and error messages as an operator's script sees them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use serde_json::{json, Value};
use vmm::api::{start_http_server, ApiError, ApiMessage, ApiRequest};
use vmm::config::ApiSocketConfig;
use vmm_sys_util::eventfd::EventFd;

struct FakeVmm {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    received: Arc<Mutex<Vec<String>>>,
}

impl FakeVmm {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let (to_vmm, from_api) = mpsc::channel::<ApiMessage>();
        let wake = EventFd::new(0).unwrap();
        let fake_wake = wake.try_clone().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&received);
        thread::spawn(move || {
            while fake_wake.read().is_ok() {
                while let Ok(message) = from_api.try_recv() {
                    log.lock().unwrap().push(format!("{:?}", message.request));
                    let answer = match message.request {
                        ApiRequest::VmmPing => Ok(Some(json!({
                            "build_version": "test", "version": "v53.0",
                            "pid": 42, "features": ["nv"]
                        }))),
                        ApiRequest::VmInfo => Err(ApiError::not_found("VM is not created")),
                        ApiRequest::NvRegions(query) => {
                            Ok(Some(json!({"region": query.region, "vms": []})))
                        }
                        _ => Ok(None),
                    };
                    let _ = message.reply.send(answer);
                }
            }
        });
        start_http_server(
            ApiSocketConfig::Path(socket.to_str().unwrap().to_owned()),
            to_vmm,
            wake,
        )
        .unwrap();
        FakeVmm {
            _dir: dir,
            socket,
            received,
        }
    }

    fn ch_remote(&self, args: &[&str]) -> Output {
        ch_remote_on(&self.socket, args)
    }
}

fn ch_remote_on(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ch-remote"))
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn ping_prints_pretty_json() {
    let vmm = FakeVmm::start();
    let output = vmm.ch_remote(&["ping"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("\n  \"version\": \"v53.0\""), "{text}");
    let value: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["pid"], 42);
}

#[test]
fn server_error_goes_to_stderr_with_exit_1() {
    let vmm = FakeVmm::start();
    let output = vmm.ch_remote(&["info"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).is_empty());
    assert!(
        stderr(&output).contains("GET vm.info failed: HTTP 404: VM is not created"),
        "{}",
        stderr(&output)
    );
    // A 204 succeeds silently.
    let boot = vmm.ch_remote(&["boot"]);
    assert!(boot.status.success());
    assert!(stdout(&boot).is_empty() && stderr(&boot).is_empty());
}

#[test]
fn nv_verbs_reach_the_control_loop_with_their_arguments() {
    let vmm = FakeVmm::start();
    let list = vmm.ch_remote(&["nv-persist", "list", "--region", "/tmp/a b&c"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let value: Value = serde_json::from_str(&stdout(&list)).unwrap();
    assert_eq!(value["region"], "/tmp/a b&c");
    for args in [
        &[
            "nv-persist",
            "recover",
            "--region",
            "/dev/dax0.0",
            "--vm",
            "db",
        ][..],
        &["nv-persist", "status"],
        &["nv-persist", "power-fail"],
        &["nv-persist", "suspend"],
        &[
            "restore",
            "source_url=file:///snap,resume=on,memory_restore_mode=ondemand",
        ],
        &["snapshot", "file:///snap"],
        &["shutdown-vmm"],
    ] {
        let output = vmm.ch_remote(args);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
    }
    let received = vmm.received.lock().unwrap().join("\n");
    assert!(
        received.contains(r#"NvRecover(NvRecoverConfig { region: "/dev/dax0.0", vm: "db" })"#),
        "{received}"
    );
    assert!(
        received.contains("NvStatus\nNvPowerFail\nNvSuspend"),
        "{received}"
    );
    assert!(received.contains("resume: true"), "{received}");
    assert!(received.contains("OnDemand"), "{received}");
    assert!(
        received.contains(r#"VmSnapshot(VmSnapshotConfig { destination_url: "file:///snap" })"#),
        "{received}"
    );
    assert!(received.ends_with("VmmShutdown"), "{received}");
}

#[test]
fn usage_errors_exit_2_and_bad_arguments_exit_1() {
    let vmm = FakeVmm::start();
    assert_eq!(vmm.ch_remote(&["explode"]).status.code(), Some(2));
    let bad_restore = vmm.ch_remote(&["restore", "resume=on"]);
    assert_eq!(bad_restore.status.code(), Some(1));
    assert!(stderr(&bad_restore).contains("source_url"));
    // Nothing reached the VMM.
    assert!(vmm.received.lock().unwrap().is_empty());
}

#[test]
fn missing_socket_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let output = ch_remote_on(&socket, &["ping"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("nobody.sock"),
        "{}",
        stderr(&output)
    );
}
