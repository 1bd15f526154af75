//! The API server driven over a real Unix socket, in front of the real control loop
//! ([`Vmm::control_loop`], answering by `vmm/api_dispatch.rs`), with real VMs on KVM where a
//! test needs one. Answers are read with the workspace's one client (`api_client`), and every
//! exchange with the real control loop is validated against `docs/openapi.yaml` (see
//! [`conformance`]). A few tests put a scripted control loop behind the server, for failures the
//! real one never produces (a dropped reply, a loop that is gone); their exchanges are not
//! checked against the spec, since no VMM answers them.

mod conformance;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::IntoRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use api_client::Connection;
use serde_json::{json, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::config::SeccompMode;
use crate::Vmm;

/// A test server on a temporary socket plus the real control loop behind it.
struct TestServer {
    dir: tempfile::TempDir,
    socket: PathBuf,
    /// Names of the requests the control loop received, in order.
    received: Arc<Mutex<Vec<String>>>,
}

fn test_limits() -> ServerLimits {
    ServerLimits {
        max_header_bytes: 4096,
        max_body_bytes: 64 << 10,
        request_timeout: Duration::from_millis(1500),
        first_byte_timeout: Duration::from_millis(1000),
        write_timeout: Duration::from_secs(5),
        reply_timeout: Duration::from_secs(10),
        max_connections: 8,
        max_connections_per_client: 4,
        seccomp: SeccompMode::Enforce,
    }
}

impl TestServer {
    /// A server for a test that boots a VM: `None` when KVM tests are skipped explicitly.
    fn start_on_kvm(test: &str) -> Option<Self> {
        kvm_available(test).then(Self::start)
    }

    fn start() -> Self {
        Self::start_with(test_limits())
    }

    fn start_with(limits: ServerLimits) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&received);
        let (dir, socket) =
            server_with_loop(limits, move |from_api, wake| spawn_vmm(from_api, wake, log));
        TestServer {
            dir,
            socket,
            received,
        }
    }

    /// A connection whose exchanges are checked against the spec.
    fn connect(&self) -> Client {
        Client {
            checked: true,
            ..Client::connect(&self.socket)
        }
    }

    /// One request on a fresh connection, validated against the spec.
    fn call(&self, method: &str, op: &str, body: Option<&str>) -> Reply {
        self.connect().call(method, op, body)
    }

    fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }

    /// Sends `request` as raw bytes on a new connection and reads the one answer, after which
    /// the server must have closed the connection.
    fn answer_then_close(&self, request: &[u8]) -> Reply {
        let mut client = self.connect();
        client.send(request);
        let reply = client.read_reply();
        assert!(
            client.closed_by_server(),
            "still open after {:?}",
            String::from_utf8_lossy(request)
        );
        reply
    }
}

/// The real control loop on its own thread (seccomp on, as in the binary), and a relay in front
/// of it that records the name of each request it passes on. Once the loop has ended (after
/// `vmm.shutdown`), the relay answers as the server does for a VMM that is gone.
fn spawn_vmm(from_api: Receiver<ApiMessage>, wake: EventFd, received: Arc<Mutex<Vec<String>>>) {
    let (to_vmm, requests) = mpsc::channel::<ApiMessage>();
    let vmm_wake = EventFd::new(EFD_NONBLOCK).unwrap();
    let loop_wake = vmm_wake.try_clone().unwrap();
    let (ready, started) = mpsc::channel();
    thread::spawn(move || {
        let mut vmm = Vmm::new(SeccompMode::Enforce).expect("creating the VMM");
        vmm.serve_api_requests(requests, loop_wake)
            .expect("serving API requests");
        ready.send(()).unwrap();
        vmm.control_loop().expect("the control loop");
    });
    started.recv().expect("the VMM thread started");
    thread::spawn(move || {
        while wake.read().is_ok() {
            for message in from_api.try_iter() {
                received
                    .lock()
                    .unwrap()
                    .push(format!("{:?}", message.request));
                if let Err(mpsc::SendError(message)) = to_vmm.send(message) {
                    let _ = message.reply.send(Err(shutting_down()));
                    return;
                }
                vmm_wake.write(1).unwrap();
            }
        }
    });
}

/// Starts a server with the default limits on `config`, in front of a real control loop.
fn serve_real(config: ApiSocketConfig) -> Result<JoinHandle<()>, ApiServerError> {
    let (to_vmm, from_api) = mpsc::channel();
    let wake = EventFd::new(0).unwrap();
    spawn_vmm(from_api, wake.try_clone().unwrap(), Default::default());
    start_http_server(config, to_vmm, wake)
}

/// Why a server may not start on `config` (it would have no control loop behind it).
fn refused_socket(config: ApiSocketConfig) -> ApiServerError {
    let (to_vmm, _from_api) = mpsc::channel();
    start_http_server(config, to_vmm, EventFd::new(0).unwrap()).expect_err("the server started")
}

/// The status of `vmm.ping` on a fresh connection to the real control loop at `socket`.
fn ping(socket: &Path) -> u16 {
    let mut client = Client::connect(socket);
    client.checked = true;
    client.call("GET", "vmm.ping", None).status
}

/// A server on a temporary socket in front of a control loop: `script` runs on its own thread
/// with the queued requests and the eventfd the server writes after queueing one. The real one
/// ([`spawn_vmm`]), or a scripted one for failures the real one never produces.
fn server_with_loop(
    limits: ServerLimits,
    script: impl FnOnce(Receiver<ApiMessage>, EventFd) + Send + 'static,
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let (to_vmm, from_api) = mpsc::channel::<ApiMessage>();
    let wake = EventFd::new(0).unwrap();
    let script_wake = wake.try_clone().unwrap();
    thread::spawn(move || script(from_api, script_wake));
    start_http_server_with_limits(
        ApiSocketConfig::Path(socket.to_str().unwrap().to_owned()),
        to_vmm,
        wake,
        limits,
    )
    .unwrap();
    (dir, socket)
}

/// A script that hands every request to `answer`, as it comes.
fn answer_each(
    answer: impl Fn(ApiMessage) + Send + 'static,
) -> impl FnOnce(Receiver<ApiMessage>, EventFd) + Send + 'static {
    move |requests, wake| {
        while wake.read().is_ok() {
            requests.try_iter().for_each(&answer);
        }
    }
}

/// Whether KVM end-to-end parts may run: `/dev/kvm` is there, or skipping was asked for
/// explicitly (`NV_SKIP_KVM=1`); never a silent skip.
pub(crate) fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("NV_SKIP_KVM").as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: no /dev/kvm and NV_SKIP_KVM=1 is set");
        return false;
    }
    panic!("{test}: /dev/kvm is missing; set NV_SKIP_KVM=1 to skip KVM tests explicitly");
}

/// A PVH kernel that halts at once (`hlt; jmp .-1` at ring 0): enough for a real VM to boot, run,
/// pause, snapshot and reboot on KVM, with no guest work to emulate. One PT_LOAD maps the whole
/// file at 1 MiB; a PT_NOTE holds the Xen PHYS32_ENTRY note the PVH boot looks for.
fn halting_kernel(dir: &Path) -> PathBuf {
    const LOAD: u64 = 0x10_0000;
    const NOTE: usize = 64 + 2 * 56;
    const CODE: usize = NOTE + 20;
    let mut image = vec![0u8; CODE];
    image.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
    let length = image.len() as u64;
    let entry = LOAD + CODE as u64;
    let fields: &[(usize, &[u8])] = &[
        (0, b"\x7fELF\x02\x01\x01"),
        (16, &2u16.to_le_bytes()),  // ET_EXEC
        (18, &62u16.to_le_bytes()), // EM_X86_64
        (20, &1u32.to_le_bytes()),
        (24, &entry.to_le_bytes()),
        (32, &64u64.to_le_bytes()), // program headers right after this header
        (52, &64u16.to_le_bytes()),
        (54, &56u16.to_le_bytes()),
        (56, &2u16.to_le_bytes()),
        (64, &1u32.to_le_bytes()), // PT_LOAD, RWX, file offset 0
        (68, &7u32.to_le_bytes()),
        (80, &LOAD.to_le_bytes()),
        (88, &LOAD.to_le_bytes()),
        (96, &length.to_le_bytes()),
        (104, &length.to_le_bytes()),
        (120, &4u32.to_le_bytes()), // PT_NOTE
        (128, &(NOTE as u64).to_le_bytes()),
        (152, &20u64.to_le_bytes()),
        (160, &20u64.to_le_bytes()),
        (NOTE, &4u32.to_le_bytes()), // name size, descriptor size, XEN_ELFNOTE_PHYS32_ENTRY
        (NOTE + 4, &4u32.to_le_bytes()),
        (NOTE + 8, &18u32.to_le_bytes()),
        (NOTE + 12, b"Xen\0"),
        (NOTE + 16, &(entry as u32).to_le_bytes()),
    ];
    for (offset, bytes) in fields {
        image[*offset..*offset + bytes.len()].copy_from_slice(bytes);
    }
    let path = dir.join("halt.elf");
    std::fs::write(&path, image).unwrap();
    path
}

/// A VM that boots on KVM: the halting kernel, 64 MiB of RAM, one disk, no console.
fn bootable_vm_config(dir: &Path) -> String {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
        "payload": {"kernel": halting_kernel(dir), "cmdline": "console=ttyS0"},
        "disks": [{"path": disk, "readonly": false}],
        "serial": {"mode": "Off"},
        "console": {"mode": "Off"}
    })
    .to_string()
}

/// An HTTP answer as the client saw it.
type Reply = api_client::Answer;

/// What the tests read in an answer's body.
trait ReplyBody {
    fn json(&self) -> Value;
    fn text(&self) -> String;
    /// An error body as upstream's ch-remote reads it: a JSON array of strings.
    fn messages(&self) -> Vec<String>;
}

impl ReplyBody for Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }

    fn text(&self) -> String {
        self.body.clone()
    }

    fn messages(&self) -> Vec<String> {
        self.error_messages()
            .unwrap_or_else(|error| panic!("{error}"))
    }
}

/// One connection, read with `api_client`'s [`Connection`]; `checked` connections validate
/// each exchange against the spec.
struct Client {
    connection: Connection,
    checked: bool,
}

impl Client {
    /// A connection whose exchanges are not checked (for scripted control loops).
    fn connect(socket: &Path) -> Self {
        Client {
            connection: Connection::open(socket, Duration::from_secs(10)).unwrap(),
            checked: false,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.connection.send(bytes).unwrap();
    }

    fn request_bytes(method: &str, op: &str, body: Option<&str>) -> Vec<u8> {
        api_client::test_request_bytes(method, op, body, "")
    }

    /// Sends one request and reads its answer; validates both bodies against the spec when the
    /// connection is checked.
    fn call(&mut self, method: &str, op: &str, body: Option<&str>) -> Reply {
        self.send(&Self::request_bytes(method, op, body));
        let reply = self.read_reply();
        if self.checked {
            conformance::check_exchange(method, op, body, &reply);
        }
        reply
    }

    /// Reads one response; `None` when the server closed the connection instead.
    fn try_read_reply(&mut self) -> Option<Reply> {
        self.connection
            .read_answer()
            .unwrap_or_else(|error| panic!("reading an answer: {error}"))
    }

    fn read_reply(&mut self) -> Reply {
        self.try_read_reply()
            .expect("server closed the connection without an answer")
    }

    /// True when the server has closed its side (a read returns end of stream).
    fn closed_by_server(&mut self) -> bool {
        self.connection
            .closed_by_server()
            .expect("read from the API socket")
    }
}

#[test]
fn ping_answers_the_upstream_shape() {
    let server = TestServer::start();
    let reply = server.call("GET", "vmm.ping", None);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("Content-Type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(body["version"], "53.0.0");
    assert_eq!(body["pid"], i64::from(std::process::id()));
    assert_eq!(server.received(), vec!["VmmPing"]);
}

/// Every implemented route through the real control loop, with a real VM on KVM: what the VMM
/// answers (the states it refuses, with upstream's statuses and messages), each exchange
/// matching the spec. The NV endpoints on an NV VM are covered end to end in
/// integration-tests/tests/api.rs; here they meet a VMM without one.
#[test]
fn vm_lifecycle_through_every_implemented_route() {
    let Some(server) = TestServer::start_on_kvm("vm_lifecycle_through_every_implemented_route")
    else {
        return;
    };
    let dir = server.dir.path();
    let config = bootable_vm_config(dir);
    let mut client = server.connect();
    let error = |reply: Reply| (reply.status, reply.messages());
    let refusal = |status: u16, failure: &str, cause: &str| {
        (
            status,
            vec![
                "Error from API".to_owned(),
                failure.to_owned(),
                cause.to_owned(),
            ],
        )
    };
    // Not created yet: upstream's 404 and its three messages.
    assert_eq!(
        error(client.call("GET", "vm.info", None)),
        refusal(404, "The VM info is not available", "VM is not created")
    );
    assert_eq!(client.call("PUT", "vm.create", Some(&config)).status, 204);
    // A second create is refused by the VM's state (500, not the fake's old 400).
    assert_eq!(
        error(client.call("PUT", "vm.create", Some(&config))),
        refusal(500, "The VM could not be created", "VM is already created")
    );
    let info = client.call("GET", "vm.info", None).json();
    assert_eq!(info["state"], "Created");
    assert_eq!(info["config"]["memory"]["size"], 64 << 20);
    // Created, not booted: the power button finds no running VM.
    assert_eq!(
        error(client.call("PUT", "vm.power-button", None)),
        refusal(500, "Error triggering power button", "VM is not running")
    );
    assert_eq!(client.call("PUT", "vm.boot", None).status, 204);
    let info = client.call("GET", "vm.info", None).json();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["memory_actual_size"], 64 << 20);
    // Wrong state is upstream's 500, with its message.
    assert_eq!(
        error(client.call("PUT", "vm.resume", None)),
        refusal(
            500,
            "The VM could not resume",
            "Invalid transition: InvalidStateTransition(Running, Running)"
        )
    );
    assert_eq!(
        error(client.call("PUT", "vm.boot", None)),
        refusal(500, "The VM could not boot", "VM is already created")
    );
    // Running: the power button is pressed (the GED raises it), 204 as upstream.
    assert_eq!(client.call("PUT", "vm.power-button", None).status, 204);
    let counters = client.call("GET", "vm.counters", None).json();
    assert!(
        counters.as_object().is_some_and(|c| !c.is_empty()),
        "{counters}"
    );
    assert_eq!(client.call("PUT", "vm.reboot", None).status, 204);
    let snapshot_dir = dir.join("snapshot");
    std::fs::create_dir(&snapshot_dir).unwrap();
    let snapshot = json!({"destination_url": format!("file://{}", snapshot_dir.display())});
    assert_eq!(
        error(client.call("PUT", "vm.snapshot", Some(&snapshot.to_string()))),
        refusal(
            500,
            "The VM could not be snapshotted",
            "Trying to snapshot while VM is running"
        )
    );
    assert_eq!(client.call("PUT", "vm.pause", None).status, 204);
    assert_eq!(
        client.call("GET", "vm.info", None).json()["state"],
        "Paused"
    );
    assert_eq!(
        client
            .call("PUT", "vm.snapshot", Some(&snapshot.to_string()))
            .status,
        204
    );
    assert_eq!(client.call("PUT", "vm.resume", None).status, 204);
    // No VM in NV memory runs here.
    assert_eq!(client.call("GET", "vm.nv-status", None).status, 404);
    assert_eq!(client.call("PUT", "vm.nv-suspend", None).status, 404);
    assert_eq!(client.call("PUT", "vm.power-fail", None).status, 404);
    let every_10ms = json!({"interval_ms": 10}).to_string();
    assert_eq!(
        client
            .call("PUT", "vm.nv-checkpoint", Some(&every_10ms))
            .status,
        404
    );
    let too_long = json!({"interval_ms": 3_600_001}).to_string();
    assert_eq!(
        client
            .call("PUT", "vm.nv-checkpoint", Some(&too_long))
            .status,
        400
    );
    assert_eq!(
        client.call("PUT", "vm.nv-checkpoint", Some("{}")).status,
        400
    );
    let recover = json!({"region": dir.join("region"), "vm": "vm0"}).to_string();
    assert_eq!(
        client.call("PUT", "vm.nv-recover", Some(&recover)).status,
        409
    );
    let regions = format!("vmm.nv-regions?region={}", dir.join("region").display());
    assert_eq!(client.call("GET", &regions, None).status, 404);
    assert_eq!(client.call("PUT", "vm.shutdown", None).status, 204);
    assert_eq!(
        client.call("GET", "vm.info", None).json()["state"],
        "Created"
    );
    assert_eq!(client.call("PUT", "vm.delete", None).status, 204);
    // Restore: OnDemand with prefault contradicts itself and is refused (the fake accepted it).
    let restore = |mode: &str, prefault: bool| {
        json!({"source_url": format!("file://{}", snapshot_dir.display()),
               "prefault": prefault, "memory_restore_mode": mode, "resume": true})
        .to_string()
    };
    let refused = client.call("PUT", "vm.restore", Some(&restore("OnDemand", true)));
    assert!(refused.status >= 400, "{refused:?}");
    assert!(refused.text().contains("prefault"), "{refused:?}");
    assert_eq!(
        client
            .call("PUT", "vm.restore", Some(&restore("Copy", false)))
            .status,
        204
    );
    assert_eq!(
        client.call("GET", "vm.info", None).json()["state"],
        "Running"
    );
    assert_eq!(client.call("PUT", "vmm.shutdown", None).status, 204);

    let received = server.received();
    assert!(received[1].starts_with("VmCreate"), "{received:?}");
    assert!(received
        .iter()
        .any(|r| r.contains("OnDemand") && r.starts_with("VmRestore")));
    assert!(received
        .iter()
        .any(|r| r.starts_with("NvRecover") && r.contains("vm0")));
    assert_eq!(received.last().unwrap(), "VmmShutdown");
}

/// The config check of the first `vm.create` of a process asked KVM for its vCPU limit on the
/// API thread, whose seccomp filter forbids the KVM ioctls: the process died (SIGSYS) unless
/// its binary had asked first. Runs a `vm.create` in a fresh test process (this test again,
/// alone) so that no earlier test has asked.
#[test]
fn the_first_vm_create_of_a_process_passes_the_api_threads_filter() {
    if !crate::fresh_test_process::in_a_fresh_process(
        "api::tests::the_first_vm_create_of_a_process_passes_the_api_threads_filter",
        "NV_API_TEST_FRESH_PROCESS",
    ) {
        return;
    }
    let server = TestServer::start();
    let config = bootable_vm_config(server.dir.path());
    assert_eq!(server.call("PUT", "vm.create", Some(&config)).status, 204);
}

#[test]
fn every_route_answers_in_upstream_framing() {
    let server = TestServer::start();
    let mut client = server.connect();
    // `vmm.shutdown` ends the VMM: it goes last.
    let (last, routes): (Vec<&Route>, Vec<&Route>) =
        ROUTES.iter().partition(|route| route.op == "vmm.shutdown");
    for route in routes.into_iter().chain(last) {
        let reply = client.call(route.method.as_str(), route.op, Some("{}"));
        if reply.status >= 400 {
            let messages = reply.messages();
            assert!(!messages.is_empty(), "{}", route.op);
            assert_ne!(reply.status, 405, "{}", route.op);
        }
    }
    // Only the routes whose "{}" body the router refuses (400) stay away from the control loop.
    let refused_bodies = [
        "vm.snapshot",
        "vm.restore",
        "vm.nv-recover",
        "vm.create",
        "vmm.nv-regions",
        "vm.nv-swap-out",
        "vm.nv-swap-in",
        // `NvCheckpointConfig` requires its `interval_ms`.
        "vm.nv-checkpoint",
        // `VmRemoveDevice` requires its `id`.
        "vm.remove-device",
        // `FsConfig` requires its `tag` and `socket`.
        "vm.add-fs",
    ];
    assert_eq!(
        server.received().len(),
        ROUTES.len() - refused_bodies.len(),
        "{:?}",
        server.received()
    );
}

#[test]
fn unimplemented_routes_check_state_then_answer_501() {
    let Some(server) = TestServer::start_on_kvm("unimplemented_routes_check_state_then_answer_501")
    else {
        return;
    };
    let mut client = server.connect();
    // No VM: upstream's answers for the state come first.
    let resize = client.call("PUT", "vm.resize", Some("{}"));
    assert_eq!(resize.status, 404);
    assert_eq!(
        resize.messages(),
        [
            "Error from API",
            "The VM could not be resized",
            "VM is not created"
        ]
    );
    let nmi = client.call("PUT", "vm.nmi", None);
    assert_eq!(
        (nmi.status, nmi.messages()[2].as_str()),
        (500, "VM is not running")
    );
    // Receiving a migration needs an empty VMM.
    assert_eq!(
        client
            .call("PUT", "vm.receive-migration", Some("{}"))
            .status,
        501
    );
    client.call(
        "PUT",
        "vm.create",
        Some(&bootable_vm_config(server.dir.path())),
    );
    client.call("PUT", "vm.boot", None);
    let receive = client.call("PUT", "vm.receive-migration", Some("{}"));
    assert_eq!(
        (receive.status, receive.messages()[2].as_str()),
        (500, "VM is already created")
    );
    for route in ROUTES {
        let operation = route.operation;
        if !operation.is_unimplemented() {
            continue;
        }
        if operation == Operation::ReceiveMigration {
            continue;
        }
        let reply = client.call(route.method.as_str(), route.op, Some("{}"));
        assert_eq!(reply.status, 501, "{}", route.op);
        let messages = reply.messages();
        assert_eq!(messages[0], "Error from API");
        assert_eq!(messages[1], operation.failure());
        assert_eq!(messages.len(), 3, "{messages:?}");
    }
}

#[test]
fn wrong_method_is_400_bad_request() {
    let server = TestServer::start();
    let mut client = server.connect();
    for (method, op, allowed) in [
        ("PUT", "vmm.ping", "GET"),
        ("GET", "vm.boot", "PUT"),
        ("POST", "vm.create", "PUT"),
        ("DELETE", "vm.nv-status", "GET"),
        ("GET", "vm.resize", "PUT"),
    ] {
        let reply = client.call(method, op, None);
        assert_eq!(reply.status, 400, "{method} {op}");
        assert_eq!(reply.messages(), ["Bad Request"]);
        assert_eq!(reply.header("Allow"), Some(allowed));
    }
    assert!(server.received().is_empty());
}

#[test]
fn unknown_path_is_404_not_found() {
    let server = TestServer::start();
    let mut client = server.connect();
    for path in [
        "/api/v1/vm.explode",
        "/",
        "/api/v2/vmm.ping",
        "/api/v1/vmm.ping/x",
    ] {
        client.send(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes());
        let reply = client.read_reply();
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(reply.messages(), ["Not Found"]);
    }
    // Still serving on the same connection.
    assert_eq!(client.call("GET", "vmm.ping", None).status, 200);
}

#[test]
fn bad_json_is_400_with_the_parser_message() {
    let server = TestServer::start();
    let mut client = server.connect();
    let reply = client.call("PUT", "vm.create", Some("{not json"));
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.messages(),
        [
            "Failed to deserialize JSON",
            "key must be a string at line 1 column 2"
        ]
    );
    let reply = client.call(
        "PUT",
        "vm.create",
        Some(r#"{"cpus": {"boot_vcpus": "two"}}"#),
    );
    assert_eq!(reply.status, 400);
    assert_eq!(reply.messages()[0], "Failed to deserialize JSON");
    assert!(
        reply.messages()[1].contains("line 1"),
        "{:?}",
        reply.messages()
    );
    let reply = client.call("PUT", "vm.restore", None);
    assert_eq!(reply.status, 400);
    assert!(reply.messages()[1].contains("required"));
    let reply = client.call("GET", "vmm.nv-regions", None);
    assert_eq!(reply.status, 400);
    assert!(reply.messages()[1].contains("region=PATH"));
    assert!(server.received().is_empty());
}

/// `--restore` refused a `source_url` that is not `file:///absolute` while `vm.restore` only
/// refused an empty one and failed later, inside the control loop. One check serves both now.
#[test]
fn restore_with_a_source_url_that_is_not_file_absolute_is_400() {
    let server = TestServer::start();
    let mut client = server.connect();
    for url in ["", "/var/snap", "file://relative/snap", "http://host/snap"] {
        let body = json!({ "source_url": url }).to_string();
        let reply = client.call("PUT", "vm.restore", Some(&body));
        assert_eq!(reply.status, 400, "{url:?}");
        let messages = reply.messages();
        assert_eq!(messages[0], "Bad Request", "{url:?}");
        assert_eq!(
            messages[1],
            format!("vm.restore: source_url {url:?}: expected file:///absolute/directory"),
        );
    }
    assert!(server.received().is_empty());
    let body = json!({ "source_url": "file:///var/snap" }).to_string();
    client.call("PUT", "vm.restore", Some(&body));
    assert_eq!(server.received().len(), 1);
}

/// Issue 10: a NUL byte in a path reached a system call and came back as a 500.
#[test]
fn nul_byte_in_a_path_is_400() {
    let server = TestServer::start();
    let mut client = server.connect();
    let reply = client.call("GET", "vmm.nv-regions?region=%2Ftmp%2Fr%00x", None);
    assert_eq!(
        (reply.status, reply.messages()[0].as_str()),
        (400, "Bad Request")
    );
    for (op, body) in [
        ("vm.nv-recover", r#"{"region":"/tmp/r\u0000x","vm":"a"}"#),
        (
            "vm.snapshot",
            r#"{"destination_url":"file:///tmp/s\u0000"}"#,
        ),
        ("vm.restore", r#"{"source_url":"file:///tmp/s\u0000"}"#),
    ] {
        let reply = client.call("PUT", op, Some(body));
        assert_eq!(reply.status, 400, "{op}");
    }
    // A raw NUL in the request line is malformed HTTP.
    client.send(b"GET /api/v1/vm\0.info HTTP/1.1\r\n\r\n");
    assert_eq!(client.read_reply().status, 400);
    assert!(server.received().is_empty());
}

/// Issue 10: two different Content-Length headers made the server wait for a body that never
/// came, then answer 408 after the request timeout.
#[test]
fn conflicting_content_lengths_are_400_at_once() {
    let server = TestServer::start();
    let mut client = server.connect();
    let started = std::time::Instant::now();
    client.send(
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 200\r\n\r\n{}",
    );
    let reply = client.read_reply();
    assert_eq!(reply.status, 400);
    assert_eq!(reply.messages()[0], "Bad Request");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The same length twice is harmless.
    let mut client = server.connect();
    client.send(b"GET /api/v1/vmm.ping HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(client.read_reply().status, 200);
}

#[test]
fn status_line_has_no_reason_phrase() {
    let server = TestServer::start();
    for (request, line) in [
        (
            &b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
            "HTTP/1.1 200 ",
        ),
        (
            b"PUT /api/v1/vm.delete HTTP/1.1\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 204 ",
        ),
        (
            b"GET /api/v1/vm.info HTTP/1.1\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 404 ",
        ),
        (
            b"GET /api/v1/vm.boot HTTP/1.1\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 400 ",
        ),
    ] {
        let reply = server.answer_then_close(request);
        assert_eq!(reply.status_line, line, "{reply:?}");
    }
}

#[test]
fn malformed_http_gets_400_and_close() {
    let server = TestServer::start();
    let reply = server.answer_then_close(b"this is not http\r\n\r\n");
    assert_eq!(reply.status, 400);
    assert_eq!(reply.header("Connection"), Some("close"));
}

#[test]
fn keep_alive_and_pipelining() {
    let Some(server) = TestServer::start_on_kvm("keep_alive_and_pipelining") else {
        return;
    };
    let mut client = server.connect();
    for _ in 0..5 {
        assert_eq!(client.call("GET", "vmm.ping", None).status, 200);
    }
    // Three requests in one write: answered in order on the same connection.
    let mut batch = Client::request_bytes(
        "PUT",
        "vm.create",
        Some(&bootable_vm_config(server.dir.path())),
    );
    batch.extend(Client::request_bytes("PUT", "vm.boot", None));
    batch.extend(Client::request_bytes("GET", "vm.info", None));
    client.send(&batch);
    assert_eq!(client.read_reply().status, 204);
    assert_eq!(client.read_reply().status, 204);
    let info = client.read_reply();
    assert_eq!(info.json()["state"], "Running");
    // `Connection: close` is honoured.
    client.send(b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n");
    let reply = client.read_reply();
    assert_eq!(reply.header("Connection"), Some("close"));
    assert!(client.closed_by_server());
}

#[test]
fn http_1_0_closes_after_one_answer() {
    let server = TestServer::start();
    let reply = server.answer_then_close(b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n");
    assert_eq!(reply.status, 200);
}

#[test]
fn expect_100_continue_is_answered() {
    let server = TestServer::start();
    let mut client = server.connect();
    let body = bootable_vm_config(server.dir.path());
    client.send(
        format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    // The interim answer arrives before any body byte was sent.
    let interim = b"HTTP/1.1 100 \r\n\r\n";
    let mut received = vec![0u8; interim.len()];
    client
        .connection
        .stream()
        .read_exact(&mut received)
        .unwrap();
    assert_eq!(received, interim);
    client.send(body.as_bytes());
    assert_eq!(client.read_reply().status, 204);
}

#[test]
fn stalled_client_does_not_block_others_and_times_out() {
    let server = TestServer::start();
    let mut stalled = server.connect();
    stalled.send(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"cpus\"");
    let mut idle = server.connect();
    idle.send(b"GET /api/v1/vmm.pi");
    // Others are served while both connections hang.
    for _ in 0..3 {
        assert_eq!(server.call("GET", "vmm.ping", None).status, 200);
    }
    // After the request timeout (1.5 s here) the stalled clients get 408 and are closed.
    let reply = stalled.read_reply();
    assert_eq!(reply.status, 408);
    assert!(stalled.closed_by_server());
    assert_eq!(idle.read_reply().status, 408);
    assert!(server.received().iter().all(|r| r == "VmmPing"));
}

#[test]
fn idle_keep_alive_connection_is_closed_quietly() {
    let server = TestServer::start();
    let mut client = server.connect();
    assert_eq!(client.call("GET", "vmm.ping", None).status, 200);
    // Nothing sent after the answer: the server closes without writing anything.
    assert!(client.try_read_reply().is_none());
}

#[test]
fn big_body_is_refused_without_reading_it() {
    let server = TestServer::start();
    // Only the head is sent: the refusal must come from Content-Length alone.
    let reply = server
        .answer_then_close(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n");
    assert_eq!(reply.status, 413);
    assert!(reply.text().contains("10000000"));
}

#[test]
fn big_headers_are_refused() {
    let server = TestServer::start();
    let mut client = server.connect();
    let filler = "a".repeat(8000);
    client.send(format!("GET /api/v1/vmm.ping HTTP/1.1\r\nX-Filler: {filler}\r\n\r\n").as_bytes());
    assert_eq!(client.read_reply().status, 431);
    // A head that never ends is cut off by the same limit.
    let mut endless = server.connect();
    endless.send(format!("GET /api/v1/vmm.ping HTTP/1.1\r\nX-Filler: {filler}").as_bytes());
    assert_eq!(endless.read_reply().status, 431);
}

#[test]
fn chunked_bodies_are_refused_clearly() {
    let server = TestServer::start();
    let mut client = server.connect();
    client.send(b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    let reply = client.read_reply();
    assert_eq!(reply.status, 501);
    assert!(reply.text().contains("Content-Length"));
}

/// Issue 10: 16 idle or slow connections made every other client get 503 for about 10 s.
#[test]
fn idle_and_slow_clients_do_not_starve_the_api() {
    let server = TestServer::start();
    let mut hogs = Vec::new();
    for index in 0..24 {
        let mut hog = server.connect();
        match index % 3 {
            // Connected, sent nothing.
            0 => {}
            // A keep-alive connection idle after one answer.
            1 => assert_eq!(hog.call("GET", "vmm.ping", None).status, 200),
            // A slow sender, in the middle of its request head.
            _ => hog.send(b"GET /api/v1/vmm.pi"),
        }
        hogs.push(hog);
    }
    thread::sleep(Duration::from_millis(100));
    let started = std::time::Instant::now();
    for _ in 0..5 {
        let reply = server.call("GET", "vmm.ping", None);
        assert_eq!(reply.status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_new_connection_that_sends_nothing_is_closed_early() {
    let server = TestServer::start();
    let mut silent = server.connect();
    let started = std::time::Instant::now();
    assert!(silent.try_read_reply().is_none());
    // first_byte_timeout (1 s here), not the whole request timeout.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(1450),
        "{waited:?}"
    );
}

#[test]
fn only_busy_slots_make_a_new_client_wait_503() {
    // A control loop that holds every request until told to answer.
    let (release, released) = mpsc::channel::<()>();
    let limits = ServerLimits {
        max_connections: 2,
        ..test_limits()
    };
    let (_dir, socket) = server_with_loop(limits, move |from_api, wake| {
        let mut held = Vec::new();
        while held.len() < 2 {
            wake.read().unwrap();
            held.extend(from_api.try_iter());
        }
        released.recv().unwrap();
        for message in held {
            let _ = message.reply.send(Ok(None));
        }
        answer_each(|message| {
            let _ = message.reply.send(Ok(None));
        })(from_api, wake);
    });
    let mut busy: Vec<Client> = (0..2)
        .map(|_| {
            let mut client = Client::connect(&socket);
            client.send(&Client::request_bytes("PUT", "vm.boot", None));
            client
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let reply = Client::connect(&socket).read_reply();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.messages()[0], "Service Unavailable");
    release.send(()).unwrap();
    for client in &mut busy {
        assert_eq!(client.read_reply().status, 204);
    }
    assert_eq!(
        Client::connect(&socket).call("PUT", "vm.boot", None).status,
        204
    );
}

#[test]
fn control_loop_gone_is_503_and_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let (to_vmm, from_api) = mpsc::channel::<ApiMessage>();
    drop(from_api);
    start_http_server(
        ApiSocketConfig::Path(socket.to_str().unwrap().to_owned()),
        to_vmm,
        EventFd::new(0).unwrap(),
    )
    .unwrap();
    let mut client = Client::connect(&socket);
    for _ in 0..2 {
        let reply = client.call("GET", "vmm.ping", None);
        assert_eq!(reply.status, 503);
        assert_eq!(
            reply.messages(),
            ["Error from API", "the VMM is shutting down"]
        );
    }
}

#[test]
fn dropped_reply_is_500() {
    // Answer nothing: drop each message, as a control loop dying mid-request would.
    let (_dir, socket) = server_with_loop(test_limits(), answer_each(drop));
    let reply = Client::connect(&socket).call("PUT", "vm.boot", None);
    assert_eq!(reply.status, 500);
    assert!(reply.messages()[1].contains("without answering"));
}

#[test]
fn socket_is_owner_only() {
    let server = TestServer::start();
    let mode = std::fs::metadata(&server.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The private bind directory is gone.
    let leftovers: Vec<_> = std::fs::read_dir(server.socket.parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    let mut leftovers: Vec<_> = leftovers
        .iter()
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    leftovers.sort();
    // The lock file stays: it decides who owns the path (see socket.rs).
    assert_eq!(leftovers, ["api.sock", "api.sock.lock"]);
}

#[test]
fn stale_socket_is_replaced_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let path = ApiSocketConfig::Path(socket.to_str().unwrap().to_owned());
    // A socket file nobody listens on: what a killed VMM leaves behind.
    drop(UnixListener::bind(&socket).unwrap());
    serve_real(path.clone()).unwrap();
    assert_eq!(ping(&socket), 200);

    let error = refused_socket(path);
    assert!(
        matches!(error, ApiServerError::SocketInUse { .. }),
        "{error}"
    );
    // The first server still answers.
    assert_eq!(ping(&socket), 200);
}

#[test]
fn regular_file_at_socket_path_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("precious");
    std::fs::write(&file, b"data").unwrap();
    let error = refused_socket(ApiSocketConfig::Path(file.to_str().unwrap().to_owned()));
    assert!(
        matches!(error, ApiServerError::NotASocket { .. }),
        "{error}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
}

#[test]
fn inherited_listening_fd_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("inherited.sock");
    let fd = UnixListener::bind(&socket).unwrap().into_raw_fd();
    serve_real(ApiSocketConfig::Fd(fd)).unwrap();
    assert_eq!(ping(&socket), 200);
}

#[test]
fn inherited_fd_that_is_not_a_listening_socket_is_refused() {
    let file = tempfile::tempfile().unwrap();
    let (connected, _peer) = UnixStream::pair().unwrap();
    for fd in [
        std::os::unix::io::AsRawFd::as_raw_fd(&file),
        std::os::unix::io::AsRawFd::as_raw_fd(&connected),
        -1,
        1_000_000,
    ] {
        let error = refused_socket(ApiSocketConfig::Fd(fd));
        assert!(
            matches!(error, ApiServerError::InheritedFd { .. }),
            "{fd}: {error}"
        );
    }
}

#[test]
fn error_with_a_success_status_is_answered_as_500() {
    let (_dir, socket) = server_with_loop(
        test_limits(),
        answer_each(|message| {
            let _ = message.reply.send(Err(ApiError::new(200, "confused")));
        }),
    );
    let reply = Client::connect(&socket).call("PUT", "vm.boot", None);
    assert_eq!(reply.status, 500);
    assert_eq!(reply.messages(), ["Error from API", "confused"]);
}

#[test]
fn shutdown_answer_is_written_and_queued_requests_refused_before_exit() {
    let (finished, finish_result) = mpsc::channel();
    let (_dir, socket) = server_with_loop(test_limits(), move |from_api, wake| {
        wake.read().unwrap();
        let message = from_api.try_recv().unwrap();
        assert!(matches!(message.request, ApiRequest::VmmShutdown));
        message.reply.send(Ok(None)).unwrap();
        // Let a second request queue up behind the shutdown, then leave as the VMM would.
        wake.read().unwrap();
        let all_written = finish_pending_requests(&from_api, Duration::from_secs(10));
        finished.send(all_written).unwrap();
    });
    assert_eq!(
        Client::connect(&socket)
            .call("PUT", "vmm.shutdown", None)
            .status,
        204
    );
    let late = Client::connect(&socket).call("GET", "vmm.ping", None);
    assert_eq!(late.status, 503);
    assert_eq!(
        late.messages(),
        ["Error from API", "the VMM is shutting down"]
    );
    assert!(finish_result.recv_timeout(Duration::from_secs(10)).unwrap());
}

/// Issue 10: two VMMs started on one path both ran; the second replaced the first's socket.
#[test]
fn servers_racing_for_one_path_leave_exactly_one_serving() {
    for _ in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let path = ApiSocketConfig::Path(socket.to_str().unwrap().to_owned());
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let starts: Vec<_> = (0..2)
            .map(|_| {
                let (path, barrier) = (path.clone(), Arc::clone(&barrier));
                thread::spawn(move || {
                    barrier.wait();
                    serve_real(path).map(drop)
                })
            })
            .collect();
        let results: Vec<_> = starts.into_iter().map(|t| t.join().unwrap()).collect();
        let started = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(started, 1, "{results:?}");
        assert!(results
            .iter()
            .any(|r| matches!(r, Err(ApiServerError::SocketInUse { .. }))));
        assert_eq!(ping(&socket), 200);
    }
}

/// Issue 10: a path longer than a socket address holds was "served" where nobody could connect.
#[test]
fn socket_path_over_107_bytes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("a".repeat(120));
    let error = refused_socket(ApiSocketConfig::Path(long.to_str().unwrap().to_owned()));
    assert!(
        matches!(error, ApiServerError::PathTooLong { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("107"), "{error}");
    assert!(!long.exists());
}

/// `vm.info`'s `device_tree` nodes of a virtio device on PCI in upstream's wire form (facts
/// pinned here: upstream v53 serialises its `DeviceNode` as `id`, `resources`, `children`,
/// `pci_bdf`; a virtio-pci device is two nodes, the function `_virtio-pci-<id>` holding the
/// BARs and the `pci_bdf` with the device `<id>` as its one child, and the device itself with
/// no resources and a null `pci_bdf`; a PCI BDF is the string `ssss:bb:dd.f` in lower-case hex;
/// each BAR the `Resource::PciBar` variant with `index`, `base`, `size`, `type_` (`Io`,
/// `Mmio32`, `Mmio64`) and a boolean `prefetchable`), next to a legacy device's node, and the
/// exact bytes of the virtio-pci pair.
#[test]
fn device_tree_lists_pci_bars_and_the_bdf_in_upstreams_form() {
    use devices::pci::{Bar, BarKind, PciBdf};
    let bars = vec![
        Bar {
            index: 0,
            kind: BarKind::Memory64 {
                prefetchable: false,
            },
            size: 0x8_0000,
            address: 0x1_0000_0000,
        },
        Bar {
            index: 2,
            kind: BarKind::Memory32 { prefetchable: true },
            size: 0x1000,
            address: 0xc000_0000,
        },
        Bar {
            index: 3,
            kind: BarKind::Io,
            size: 0x20,
            address: 0x1000,
        },
    ];
    let devices = [
        crate::device_manager::DeviceResources {
            id: "_disk0".into(),
            pio: None,
            mmio: None,
            irq: None,
            pci: Some((PciBdf::new(0x1f), bars)),
            virtio_pci: true,
        },
        crate::device_manager::DeviceResources {
            id: "__serial".into(),
            pio: Some((0x3f8, 8)),
            mmio: None,
            irq: Some(4),
            pci: None,
            virtio_pci: false,
        },
    ];
    let tree = serde_json::to_value(VmInfoResponse::device_tree(&devices)).unwrap();
    assert_eq!(
        tree,
        json!({
            "_virtio-pci-_disk0": {
                "id": "_virtio-pci-_disk0",
                "resources": [
                    {"PciBar": {"index": 0, "base": 4294967296_u64, "size": 524288,
                                "type_": "Mmio64", "prefetchable": false}},
                    {"PciBar": {"index": 2, "base": 3221225472_u64, "size": 4096,
                                "type_": "Mmio32", "prefetchable": true}},
                    {"PciBar": {"index": 3, "base": 4096, "size": 32,
                                "type_": "Io", "prefetchable": false}}
                ],
                "children": ["_disk0"],
                "pci_bdf": "0000:00:1f.0"
            },
            "_disk0": {
                "id": "_disk0",
                "resources": [],
                "children": [],
                "pci_bdf": null
            },
            "__serial": {
                "id": "__serial",
                "resources": [{"PioAddressRange": {"base": 1016, "size": 8}}, {"LegacyIrq": 4}],
                "children": [],
                "pci_bdf": null
            }
        })
    );
    // And it reads back (upstream's clients deserialise the same form).
    let back: BTreeMap<String, DeviceNode> = serde_json::from_value(tree).unwrap();
    assert_eq!(back["_virtio-pci-_disk0"].resources.len(), 3);
    // The bytes of the pair, in the order the map serialises them.
    let pair: BTreeMap<&str, &DeviceNode> = back
        .iter()
        .filter(|(id, _)| id.ends_with("_disk0"))
        .map(|(id, node)| (id.as_str(), node))
        .collect();
    let mut bar_only = pair.clone();
    let function = DeviceNode {
        resources: vec![back["_virtio-pci-_disk0"].resources[0].clone()],
        ..back["_virtio-pci-_disk0"].clone()
    };
    bar_only.insert("_virtio-pci-_disk0", &function);
    assert_eq!(
        serde_json::to_string(&bar_only).unwrap(),
        concat!(
            r#"{"_disk0":{"id":"_disk0","resources":[],"children":[],"pci_bdf":null},"#,
            r#""_virtio-pci-_disk0":{"id":"_virtio-pci-_disk0","resources":[{"PciBar":"#,
            r#"{"index":0,"base":4294967296,"size":524288,"type_":"Mmio64","#,
            r#""prefetchable":false}}],"children":["_disk0"],"pci_bdf":"0000:00:1f.0"}}"#
        )
    );
}

/// The (device, inode) of an open descriptor: two descriptors of one file share it.
fn file_identity(fd: std::os::unix::io::RawFd) -> (u64, u64) {
    let path = format!("/proc/self/fd/{fd}");
    let metadata = std::fs::metadata(path).unwrap();
    use std::os::unix::fs::MetadataExt;
    (metadata.dev(), metadata.ino())
}

/// As upstream's `ch-remote add-net fd=` sends them, descriptors ride with the request
/// (SCM_RIGHTS): `vm.add-net` gets them as its taps, the `fds` numbers of the body give way; any
/// other request gets none.
#[test]
fn descriptors_sent_with_add_net_reach_the_control_loop() {
    use std::os::unix::io::AsRawFd;
    let (seen_tx, seen) = mpsc::channel::<(String, Vec<(u64, u64)>, Option<Vec<i32>>)>();
    let seen_tx = Mutex::new(seen_tx);
    let (_dir, socket) = server_with_loop(
        test_limits(),
        answer_each(move |message| {
            let entry = match &message.request {
                ApiRequest::VmAddNet(net, files) => (
                    "add-net".to_owned(),
                    files.iter().map(|f| file_identity(f.as_raw_fd())).collect(),
                    net.fds.clone(),
                ),
                other => (other.operation().path().to_owned(), Vec::new(), None),
            };
            let _ = seen_tx.lock().unwrap().send(entry);
            let _ = message.reply.send(Ok(None));
        }),
    );
    let file = tempfile::tempfile().unwrap();
    let sent = file_identity(file.as_raw_fd());
    let mut stream = ::api_client::connect(socket.to_str().unwrap()).unwrap();
    for (op, body) in [
        ("vm.add-net", Some(r#"{"id":"net1","fds":[99]}"#)),
        ("vm.pause", None),
    ] {
        let call = ::api_client::ApiCall {
            method: "PUT",
            op: op.to_owned(),
            body: body.map(str::to_owned),
            fds: vec![file.as_raw_fd()],
        };
        assert_eq!(::api_client::call(&mut stream, &call).unwrap(), None);
    }
    let (op, files, body_fds) = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(op, "add-net");
    assert_eq!(
        files,
        vec![sent],
        "the descriptor that came is the one sent"
    );
    assert_eq!(body_fds, None, "the body's numbers give way");
    let (op, files, _) = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(op, "vm.pause");
    assert!(files.is_empty());
}
