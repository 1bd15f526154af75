//! The API server driven over a real Unix socket with raw HTTP, against a fake control loop that
//! answers `ApiMessage`s with a small VM state machine. Every JSON body sent or received in an
//! accepted exchange is validated against `docs/openapi.yaml` (see [`conformance`]).

mod conformance;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::IntoRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use super::*;

/// A test server on a temporary socket plus the fake control loop behind it.
struct TestServer {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    /// Names of the requests the fake control loop received, in order.
    received: Arc<Mutex<Vec<String>>>,
}

fn test_limits() -> ServerLimits {
    ServerLimits {
        max_header_bytes: 4096,
        max_body_bytes: 64 << 10,
        request_timeout: Duration::from_millis(1500),
        write_timeout: Duration::from_secs(5),
        reply_timeout: Duration::from_secs(10),
        max_connections: 8,
        seccomp: crate::config::SeccompMode::Enforce,
    }
}

impl TestServer {
    fn start() -> Self {
        Self::start_with(test_limits())
    }

    fn start_with(limits: ServerLimits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let (to_vmm, from_api) = mpsc::channel();
        let wake = EventFd::new(0).unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        spawn_fake_vmm(from_api, wake.try_clone().unwrap(), Arc::clone(&received));
        start_http_server_with_limits(
            ApiSocketConfig::Path(socket.to_str().unwrap().to_owned()),
            to_vmm,
            wake,
            limits,
        )
        .unwrap();
        TestServer {
            _dir: dir,
            socket,
            received,
        }
    }

    fn connect(&self) -> Client {
        Client::connect(&self.socket)
    }

    /// One request on a fresh connection, validated against the spec.
    fn call(&self, method: &str, op: &str, body: Option<&str>) -> Reply {
        self.connect().call(method, op, body)
    }

    fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

/// The fake control loop: sleeps on the eventfd like the real one sleeps in epoll, so a server
/// that forgot to wake it makes the test hang and fail on its timeout.
fn spawn_fake_vmm(
    from_api: Receiver<ApiMessage>,
    wake: EventFd,
    received: Arc<Mutex<Vec<String>>>,
) {
    thread::spawn(move || {
        let mut vm = FakeVm::default();
        while wake.read().is_ok() {
            while let Ok(message) = from_api.try_recv() {
                let name = format!("{:?}", message.request);
                received.lock().unwrap().push(name);
                let answer = vm.answer(message.request);
                let _ = message.reply.send(answer);
            }
        }
    });
}

#[derive(Default)]
struct FakeVm {
    state: Option<VmState>,
    config: Option<VmConfig>,
}

impl FakeVm {
    fn require(&self, wanted: &[VmState]) -> Result<VmState, ApiError> {
        let state = self
            .state
            .ok_or_else(|| ApiError::not_found("VM is not created"))?;
        if wanted.contains(&state) {
            Ok(state)
        } else {
            Err(ApiError::wrong_state(format!("VM is {state:?}")))
        }
    }

    fn answer(&mut self, request: ApiRequest) -> ApiResponse {
        use VmState::*;
        let body = match request {
            ApiRequest::VmmPing => Some(serde_json::to_value(VmmPingResponse {
                build_version: "test".into(),
                version: "v53.0".into(),
                pid: i64::from(std::process::id()),
                features: vec!["nv".into()],
            })),
            ApiRequest::VmmShutdown => None,
            ApiRequest::VmCreate(config) => {
                if self.state.is_some() {
                    return Err(ApiError::bad_request("VM is already created"));
                }
                self.config = Some(*config);
                self.state = Some(Created);
                None
            }
            ApiRequest::VmBoot => {
                self.require(&[Created])?;
                self.state = Some(Running);
                None
            }
            ApiRequest::VmDelete => {
                self.state = None;
                self.config = None;
                None
            }
            ApiRequest::VmInfo => {
                let state = self.require(&[Created, Running, Paused, Shutdown])?;
                let config = self.config.clone().unwrap_or_default();
                Some(serde_json::to_value(VmInfoResponse {
                    memory_actual_size: Some(config.memory.total_size()),
                    device_tree: None,
                    config,
                    state,
                }))
            }
            ApiRequest::VmCounters => {
                self.require(&[Created, Running, Paused, Shutdown])?;
                let mut counters = VmCounters::new();
                counters.insert(
                    "_disk0".into(),
                    [("read_bytes".to_owned(), 4096), ("write_ops".to_owned(), 3)].into(),
                );
                Some(serde_json::to_value(counters))
            }
            ApiRequest::VmPause => {
                self.require(&[Running])?;
                self.state = Some(Paused);
                None
            }
            ApiRequest::VmResume => {
                self.require(&[Paused])?;
                self.state = Some(Running);
                None
            }
            ApiRequest::VmShutdown => {
                self.require(&[Running, Paused])?;
                self.state = Some(Shutdown);
                None
            }
            ApiRequest::VmReboot | ApiRequest::VmPowerButton => {
                self.require(&[Running])?;
                None
            }
            ApiRequest::VmSnapshot(_) => {
                self.require(&[Paused])?;
                None
            }
            ApiRequest::VmRestore(config) => {
                if self.state.is_some() {
                    return Err(ApiError::not_found("a VM is already created"));
                }
                self.config = Some(VmConfig::default());
                self.state = Some(if config.resume { Running } else { Paused });
                None
            }
            ApiRequest::NvStatus => {
                self.require(&[Running, Paused])?;
                Some(serde_json::to_value(fake_nv_status()))
            }
            ApiRequest::NvPowerFail | ApiRequest::NvSuspend => {
                self.require(&[Running, Paused])?;
                self.state = Some(Shutdown);
                None
            }
            ApiRequest::NvRecover(_) => {
                if self.state.is_some() {
                    return Err(ApiError::not_found("a VM is already created"));
                }
                self.config = Some(VmConfig::default());
                self.state = Some(Running);
                None
            }
            ApiRequest::NvRegions(query) => Some(serde_json::to_value(NvRegionListing {
                region: query.region,
                persistence_mode: NvPersistenceMode::Msync,
                size: 1 << 30,
                vms: vec![NvRegionVm {
                    name: "vm0".into(),
                    uuid: "5f0c6a4e-9d1b-4c55-8f0e-2b8f6d7e1a11".into(),
                    memory_size: 64 << 20,
                    shutdown_kind: NvShutdownKind::PowerFail,
                    last_save_sequence: Some(7),
                    resumable: true,
                    last_save: fake_nv_status().last_save,
                }],
            })),
        };
        body.transpose()
            .map_err(|error| ApiError::internal(error.to_string()))
    }
}

fn fake_nv_status() -> NvStatus {
    NvStatus {
        region: "/dev/shm/region".into(),
        persistence_mode: NvPersistenceMode::Msync,
        vm: "vm0".into(),
        last_save_sequence: Some(3),
        shutdown_kind: NvShutdownKind::Running,
        deadline_ms: 50,
        last_save: Some(NvLastSave {
            sequence: 3,
            kind: NvShutdownKind::PowerFail,
            total_us: 1800,
            deadline_us: Some(50_000),
            deadline_overrun: false,
            phases: vec![
                NvPhaseTiming {
                    phase: "pause".into(),
                    duration_us: 700,
                },
                NvPhaseTiming {
                    phase: "commit".into(),
                    duration_us: 1100,
                },
            ],
        }),
    }
}

/// An HTTP answer as the client saw it.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw HTTP/1.1 client on one connection.
struct Client {
    stream: UnixStream,
    buffer: Vec<u8>,
}

impl Client {
    fn connect(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            stream,
            buffer: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn request_bytes(method: &str, op: &str, body: Option<&str>) -> Vec<u8> {
        let body = body.unwrap_or("");
        format!(
            "{method} /api/v1/{op} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// Sends one request and reads its answer; validates both bodies against the spec when the
    /// request was accepted.
    fn call(&mut self, method: &str, op: &str, body: Option<&str>) -> Reply {
        self.send(&Self::request_bytes(method, op, body));
        let reply = self.read_reply();
        conformance::check_exchange(method, op, body, &reply);
        reply
    }

    /// Reads one response; `None` when the server closed the connection instead.
    fn try_read_reply(&mut self) -> Option<Reply> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = response.parse(&self.buffer).unwrap() {
                let status = response.code.unwrap();
                let headers: Vec<(String, String)> = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                if status == 100 {
                    self.buffer.drain(..head);
                    continue;
                }
                let length: usize = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.parse().unwrap())
                    .unwrap_or(0);
                while self.buffer.len() < head + length {
                    if !self.fill() {
                        panic!("connection closed inside a response body");
                    }
                }
                let body = self.buffer[head..head + length].to_vec();
                self.buffer.drain(..head + length);
                return Some(Reply {
                    status,
                    headers,
                    body,
                });
            }
            if !self.fill() {
                return None;
            }
        }
    }

    fn read_reply(&mut self) -> Reply {
        self.try_read_reply()
            .expect("server closed the connection without an answer")
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let count = self
            .stream
            .read(&mut chunk)
            .expect("read from the API socket");
        self.buffer.extend_from_slice(&chunk[..count]);
        count > 0
    }

    /// True when the server has closed its side (a read returns end of stream).
    fn closed_by_server(&mut self) -> bool {
        self.buffer.clear();
        !self.fill()
    }
}

fn vm_config_json() -> String {
    json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 0, "shared": true,
                   "zones": [{"id": "mem0", "size": 67108864, "file": "/dev/shm/mem0", "shared": true}]},
        "payload": {"kernel": "/guests/counter.elf", "cmdline": "console=ttyS0"},
        "disks": [{"path": "/tmp/disk.img", "readonly": false}],
        "serial": {"mode": "File", "file": "/tmp/serial.log"},
        "console": {"mode": "Off"}
    })
    .to_string()
}

#[test]
fn ping_answers_the_upstream_shape() {
    let server = TestServer::start();
    let reply = server.call("GET", "vmm.ping", None);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("Content-Type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(body["version"], "v53.0");
    assert_eq!(body["pid"], i64::from(std::process::id()));
    assert_eq!(server.received(), vec!["VmmPing"]);
}

#[test]
fn vm_lifecycle_through_every_implemented_route() {
    let server = TestServer::start();
    let mut client = server.connect();
    // Not created yet: the fake's 404 text reaches the client.
    let reply = client.call("GET", "vm.info", None);
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (404, "VM is not created")
    );
    assert_eq!(
        client
            .call("PUT", "vm.create", Some(&vm_config_json()))
            .status,
        204
    );
    let info = client.call("GET", "vm.info", None);
    assert_eq!(info.status, 200);
    assert_eq!(info.json()["state"], "Created");
    assert_eq!(
        info.json()["config"]["payload"]["kernel"],
        "/guests/counter.elf"
    );
    assert_eq!(info.json()["memory_actual_size"], 64 << 20);
    assert_eq!(client.call("PUT", "vm.boot", None).status, 204);
    // Wrong state is the control loop's 405, with its message.
    let resume = client.call("PUT", "vm.resume", None);
    assert_eq!(
        (resume.status, resume.text().as_str()),
        (405, "VM is Running")
    );
    assert_eq!(client.call("PUT", "vm.reboot", None).status, 204);
    assert_eq!(client.call("PUT", "vm.power-button", None).status, 204);
    let counters = client.call("GET", "vm.counters", None);
    assert_eq!(counters.json()["_disk0"]["write_ops"], 3);
    assert_eq!(client.call("PUT", "vm.pause", None).status, 204);
    let snapshot = json!({"destination_url": "file:///tmp/snap"}).to_string();
    assert_eq!(
        client.call("PUT", "vm.snapshot", Some(&snapshot)).status,
        204
    );
    assert_eq!(client.call("PUT", "vm.resume", None).status, 204);
    let status = client.call("GET", "vm.nv-status", None);
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["persistence_mode"], "msync");
    assert_eq!(status.json()["last_save"]["phases"][1]["phase"], "commit");
    assert_eq!(client.call("PUT", "vm.shutdown", None).status, 204);
    assert_eq!(client.call("PUT", "vm.delete", None).status, 204);
    let restore = json!({"source_url": "file:///tmp/snap", "prefault": true,
                         "memory_restore_mode": "OnDemand", "resume": true})
    .to_string();
    assert_eq!(client.call("PUT", "vm.restore", Some(&restore)).status, 204);
    assert_eq!(client.call("PUT", "vm.nv-suspend", None).status, 204);
    assert_eq!(client.call("PUT", "vm.delete", None).status, 204);
    let recover = json!({"region": "/dev/shm/region", "vm": "vm0"}).to_string();
    assert_eq!(
        client.call("PUT", "vm.nv-recover", Some(&recover)).status,
        204
    );
    assert_eq!(client.call("PUT", "vm.power-fail", None).status, 204);
    let regions = client.call("GET", "vmm.nv-regions?region=%2Fdev%2Fshm%2Fregion", None);
    assert_eq!(regions.status, 200);
    assert_eq!(regions.json()["region"], "/dev/shm/region");
    assert_eq!(regions.json()["vms"][0]["resumable"], true);
    assert_eq!(client.call("PUT", "vmm.shutdown", None).status, 204);

    let received = server.received();
    assert!(received[1].starts_with("VmCreate"), "{received:?}");
    assert!(received
        .iter()
        .any(|r| r.contains("OnDemand") && r.starts_with("VmRestore")));
    assert!(received
        .iter()
        .any(|r| r.starts_with("NvRecover") && r.contains("vm0")));
    assert!(received
        .iter()
        .any(|r| r.starts_with("NvRegions") && r.contains("/dev/shm/region")));
    assert_eq!(received.last().unwrap(), "VmmShutdown");
    assert_eq!(received.len(), 21);
}

#[test]
fn every_route_answers_and_unimplemented_ones_say_501() {
    let server = TestServer::start();
    let mut client = server.connect();
    for route in ROUTES {
        let reply = client.call(route.method.as_str(), route.op, Some("{}"));
        match route.action {
            RouteAction::NotImplemented => {
                assert_eq!(reply.status, 501, "{}", route.op);
                assert!(reply.text().contains("not implemented"), "{}", route.op);
            }
            // Not a 404/405 of the router: either handled or a body/state error with a message.
            _ => {
                assert!(![404, 405].contains(&reply.status) || !reply.body.is_empty());
                assert!(
                    reply.status < 500 && reply.status != 501,
                    "{}: {}",
                    route.op,
                    reply.status
                );
            }
        }
    }
    // The unimplemented routes never reached the control loop.
    let received = server.received();
    let implemented = ROUTES
        .iter()
        .filter(|route| route.action != RouteAction::NotImplemented)
        .count();
    // Routes whose "{}" body is refused by the router (400) do not reach it either.
    let refused_bodies = [
        "vm.snapshot",
        "vm.restore",
        "vm.nv-recover",
        "vm.create",
        "vmm.nv-regions",
    ];
    assert_eq!(
        received.len(),
        implemented - refused_bodies.len(),
        "{received:?}"
    );
}

#[test]
fn wrong_method_is_405_with_allow() {
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
        assert_eq!(reply.status, 405, "{method} {op}");
        assert_eq!(reply.header("Allow"), Some(allowed));
        assert!(reply.text().contains(op));
    }
    assert!(server.received().is_empty());
}

#[test]
fn unknown_path_is_404() {
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
        assert!(reply.text().contains(path));
    }
    // Still serving on the same connection.
    assert_eq!(client.call("GET", "vmm.ping", None).status, 200);
}

#[test]
fn bad_json_is_400_with_the_parser_message() {
    let server = TestServer::start();
    let mut client = server.connect();
    let reply = client.call("PUT", "vm.create", Some("{\"cpus\": "));
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("invalid JSON"), "{}", reply.text());
    let reply = client.call(
        "PUT",
        "vm.create",
        Some(r#"{"cpus": {"boot_vcpus": "two"}}"#),
    );
    assert_eq!(reply.status, 400);
    let reply = client.call("PUT", "vm.restore", None);
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("required"));
    let reply = client.call("GET", "vmm.nv-regions", None);
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("region=PATH"));
    assert!(server.received().is_empty());
}

#[test]
fn malformed_http_gets_400_and_close() {
    let server = TestServer::start();
    let mut client = server.connect();
    client.send(b"this is not http\r\n\r\n");
    let reply = client.read_reply();
    assert_eq!(reply.status, 400);
    assert_eq!(reply.header("Connection"), Some("close"));
    assert!(client.closed_by_server());
}

#[test]
fn keep_alive_and_pipelining() {
    let server = TestServer::start();
    let mut client = server.connect();
    for _ in 0..5 {
        assert_eq!(client.call("GET", "vmm.ping", None).status, 200);
    }
    // Three requests in one write: answered in order on the same connection.
    let mut batch = Client::request_bytes("PUT", "vm.create", Some(&vm_config_json()));
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
    let mut client = server.connect();
    client.send(b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n");
    assert_eq!(client.read_reply().status, 200);
    assert!(client.closed_by_server());
}

#[test]
fn expect_100_continue_is_answered() {
    let server = TestServer::start();
    let mut client = server.connect();
    let body = vm_config_json();
    client.send(
        format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    // The interim answer arrives before any body byte was sent.
    while !client.buffer.ends_with(b"\r\n\r\n") {
        assert!(client.fill());
    }
    assert!(client.buffer.starts_with(b"HTTP/1.1 100 Continue"));
    client.buffer.clear();
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
    let mut client = server.connect();
    // Only the head is sent: the refusal must come from Content-Length alone.
    client.send(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n");
    let reply = client.read_reply();
    assert_eq!(reply.status, 413);
    assert!(reply.text().contains("10000000"));
    assert!(client.closed_by_server());
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

#[test]
fn too_many_connections_get_503() {
    let limits = ServerLimits {
        max_connections: 2,
        ..test_limits()
    };
    let server = TestServer::start_with(limits);
    let first = server.connect();
    let second = server.connect();
    // Let the accept thread take both before the third arrives.
    thread::sleep(Duration::from_millis(200));
    let mut third = server.connect();
    let reply = third.read_reply();
    assert_eq!(reply.status, 503);
    drop((first, second));
    // The slots come back when their threads see the hang-up; allow a loaded machine time.
    let served = (0..100).any(|_| {
        thread::sleep(Duration::from_millis(50));
        server.call("GET", "vmm.ping", None).status == 200
    });
    assert!(served, "connection slots were not given back");
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
        assert!(reply.text().contains("not running"));
    }
}

#[test]
fn dropped_reply_is_500() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let (to_vmm, from_api) = mpsc::channel::<ApiMessage>();
    let wake = EventFd::new(0).unwrap();
    let fake_wake = wake.try_clone().unwrap();
    thread::spawn(move || {
        while fake_wake.read().is_ok() {
            // Answer nothing: drop each message, as a control loop dying mid-request would.
            while let Ok(message) = from_api.try_recv() {
                drop(message);
            }
        }
    });
    start_http_server(
        ApiSocketConfig::Path(socket.to_str().unwrap().to_owned()),
        to_vmm,
        wake,
    )
    .unwrap();
    let reply = Client::connect(&socket).call("PUT", "vm.boot", None);
    assert_eq!(reply.status, 500);
    assert!(reply.text().contains("without answering"));
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
    assert_eq!(leftovers, vec![std::ffi::OsString::from("api.sock")]);
}

#[test]
fn stale_socket_is_replaced_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let path = ApiSocketConfig::Path(socket.to_str().unwrap().to_owned());
    // A socket file nobody listens on: what a killed VMM leaves behind.
    drop(UnixListener::bind(&socket).unwrap());
    let (to_vmm, from_api) = mpsc::channel();
    let wake = EventFd::new(0).unwrap();
    spawn_fake_vmm(from_api, wake.try_clone().unwrap(), Default::default());
    start_http_server(path.clone(), to_vmm, wake).unwrap();
    assert_eq!(
        Client::connect(&socket)
            .call("GET", "vmm.ping", None)
            .status,
        200
    );

    let (to_vmm, _from_api) = mpsc::channel();
    let error = start_http_server(path, to_vmm, EventFd::new(0).unwrap()).unwrap_err();
    assert!(
        matches!(error, ApiServerError::SocketInUse { .. }),
        "{error}"
    );
    // The first server still answers.
    assert_eq!(
        Client::connect(&socket)
            .call("GET", "vmm.ping", None)
            .status,
        200
    );
}

#[test]
fn regular_file_at_socket_path_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("precious");
    std::fs::write(&file, b"data").unwrap();
    let (to_vmm, _from_api) = mpsc::channel();
    let error = start_http_server(
        ApiSocketConfig::Path(file.to_str().unwrap().to_owned()),
        to_vmm,
        EventFd::new(0).unwrap(),
    )
    .unwrap_err();
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
    let (to_vmm, from_api) = mpsc::channel();
    let wake = EventFd::new(0).unwrap();
    spawn_fake_vmm(from_api, wake.try_clone().unwrap(), Default::default());
    start_http_server(ApiSocketConfig::Fd(fd), to_vmm, wake).unwrap();
    assert_eq!(
        Client::connect(&socket)
            .call("GET", "vmm.ping", None)
            .status,
        200
    );
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
        let (to_vmm, _from_api) = mpsc::channel();
        let error = start_http_server(ApiSocketConfig::Fd(fd), to_vmm, EventFd::new(0).unwrap())
            .unwrap_err();
        assert!(
            matches!(error, ApiServerError::InheritedFd { .. }),
            "{fd}: {error}"
        );
    }
}

#[test]
fn error_with_a_success_status_is_answered_as_500() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let (to_vmm, from_api) = mpsc::channel::<ApiMessage>();
    let wake = EventFd::new(0).unwrap();
    let fake_wake = wake.try_clone().unwrap();
    thread::spawn(move || {
        while fake_wake.read().is_ok() {
            while let Ok(message) = from_api.try_recv() {
                let _ = message.reply.send(Err(ApiError::new(200, "confused")));
            }
        }
    });
    start_http_server(
        ApiSocketConfig::Path(socket.to_str().unwrap().to_owned()),
        to_vmm,
        wake,
    )
    .unwrap();
    let reply = Client::connect(&socket).call("PUT", "vm.boot", None);
    assert_eq!((reply.status, reply.text().as_str()), (500, "confused"));
}

#[test]
fn shutdown_answer_is_written_and_queued_requests_refused_before_exit() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let (to_vmm, from_api) = mpsc::channel::<ApiMessage>();
    let wake = EventFd::new(0).unwrap();
    let fake_wake = wake.try_clone().unwrap();
    let (finished, finish_result) = mpsc::channel();
    thread::spawn(move || {
        fake_wake.read().unwrap();
        let message = from_api.try_recv().unwrap();
        assert!(matches!(message.request, ApiRequest::VmmShutdown));
        message.reply.send(Ok(None)).unwrap();
        // Let a second request queue up behind the shutdown, then leave as the VMM would.
        fake_wake.read().unwrap();
        let all_written = finish_pending_requests(&from_api, Duration::from_secs(10));
        finished.send(all_written).unwrap();
    });
    start_http_server(
        ApiSocketConfig::Path(socket.to_str().unwrap().to_owned()),
        to_vmm,
        wake,
    )
    .unwrap();
    assert_eq!(
        Client::connect(&socket)
            .call("PUT", "vmm.shutdown", None)
            .status,
        204
    );
    let late = Client::connect(&socket).call("GET", "vmm.ping", None);
    assert_eq!(
        (late.status, late.text().as_str()),
        (503, "the VMM is shutting down")
    );
    assert!(finish_result.recv_timeout(Duration::from_secs(10)).unwrap());
}
