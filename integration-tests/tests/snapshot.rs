//! Snapshots and regions never yield a VM that silently runs on garbage, end to end with the
//! `cloud-hypervisor` binary:
//! - a snapshot of a VM in NV memory carries its RAM and restores as an ordinary VM that
//!   continues;
//! - `vm.snapshot` refuses a running VM and a missing destination before creating anything,
//!   writes owner-only files, never through a symlink and never over an existing file;
//! - `vm.restore` refuses a `state.json` that is malformed, tampered with or unchecksummed, and
//!   resumes nothing;
//! - a region file deleted under a running VM: the save says so and exits with its own code;
//! - `vmm.nv-regions` opens a region read-only and refuses a FIFO or a directory at once.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::api_client;
use integration_tests::harness::{
    guest_arguments, last_counter_in, point_serial_to, read_log, scratch_dir,
    wait_for_continuation, wait_for_counter_lines,
};
use integration_tests::process::VmmProcess;
use serde_json::{json, Value};
use vmm::nv::{EXIT_POWER_FAIL_SAVED, EXIT_SAVED_INTO_DETACHED_REGION};

const TIMEOUT: Duration = Duration::from_secs(30);
const GUEST_RAM_MIB: u64 = 32;

/// A `cloud-hypervisor` process serving its API socket in `dir`; killed on drop.
struct Vmm {
    process: VmmProcess,
    socket: PathBuf,
}

impl Vmm {
    fn start(dir: &Path, name: &str, arguments: &[String]) -> Vmm {
        let socket = dir.join(format!("{name}.sock"));
        let mut all = vec![
            "--api-socket".to_string(),
            format!("path={}", socket.display()),
        ];
        all.extend_from_slice(arguments);
        let mut process = VmmProcess::spawn(dir, name, &all, &[]).with_timeout(TIMEOUT);
        process.wait_for_socket(&socket, TIMEOUT);
        Vmm { process, socket }
    }

    /// One request; the answer's body decoded (an error body's JSON strings joined by " / ").
    fn call(&self, method: &str, op: &str, body: &Value) -> (u16, String) {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let stderr = self.process.stderr_path().to_path_buf();
        let (status, answer) = std::panic::catch_unwind(|| {
            api_client::request(&self.socket, method, op, &body, TIMEOUT)
        })
        .unwrap_or_else(|_| panic!("{method} {op}: no answer; stderr:\n{}", read_log(&stderr)));
        let text = match serde_json::from_str::<Value>(&answer) {
            Ok(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map_or_else(|| item.to_string(), str::to_string)
                })
                .collect::<Vec<_>>()
                .join(" / "),
            Ok(Value::String(text)) => text,
            _ => answer,
        };
        (status, text)
    }

    fn ok(&self, method: &str, op: &str, body: &Value) {
        let (status, answer) = self.call(method, op, body);
        assert!(
            status == 204 || status == 200,
            "{method} {op}: {status} {answer}"
        );
    }

    fn shutdown(mut self) {
        self.ok("PUT", "vmm.shutdown", &Value::Null);
        assert_eq!(
            self.process.wait_exit_code(),
            0,
            "{}",
            self.process.stderr_log()
        );
    }
}

/// Command-line arguments booting the counter guest; in NV memory when `region` is given.
fn counter_arguments(serial: &Path, region: Option<&Path>) -> Vec<String> {
    let mut arguments = guest_arguments("counter", "", &format!("{GUEST_RAM_MIB}M"));
    arguments.extend([
        "--serial".into(),
        format!("file={}", serial.display()),
        "--console".into(),
        "off".into(),
    ]);
    if let Some(region) = region {
        arguments.push("--nv".into());
        arguments.push(format!("region={},vm=snap,create=on", region.display()));
    }
    arguments
}

fn snapshot_body(dir: &Path) -> Value {
    json!({ "destination_url": format!("file://{}", dir.display()) })
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The restored VM writes its serial output to a log of its own.
#[test]
fn a_snapshot_of_an_nv_vm_carries_its_ram_and_restores_as_an_ordinary_vm_that_continues() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let region = dir.path().join("region");
    let first_log = dir.path().join("first.log");
    let second_log = dir.path().join("second.log");
    let snapshot = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot).unwrap();

    let first = Vmm::start(
        dir.path(),
        "first",
        &counter_arguments(&first_log, Some(&region)),
    );
    wait_for_counter_lines(&first_log, 2, TIMEOUT);
    first.ok("PUT", "vm.pause", &Value::Null);
    first.ok("PUT", "vm.snapshot", &snapshot_body(&snapshot));
    let before = last_counter_in(&first_log);
    first.shutdown();

    assert_eq!(
        std::fs::metadata(snapshot.join("memory-ranges"))
            .unwrap()
            .len(),
        GUEST_RAM_MIB << 20,
        "the NV VM's RAM is copied whole"
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(snapshot.join("config.json")).unwrap())
            .unwrap();
    assert!(
        config.get("nv").is_none_or(Value::is_null),
        "the snapshot restores as an ordinary VM: {config}"
    );
    point_serial_to(&snapshot, &second_log);

    let second = Vmm::start(dir.path(), "second", &[]);
    second.ok(
        "PUT",
        "vm.restore",
        &json!({ "source_url": format!("file://{}", snapshot.display()), "resume": true }),
    );
    wait_for_continuation(&second_log, before, TIMEOUT);
    second.shutdown();
}

#[test]
fn snapshot_refusals_create_nothing_and_files_are_new_owner_only_and_never_followed() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let log = dir.path().join("serial.log");
    let vmm = Vmm::start(dir.path(), "vmm", &counter_arguments(&log, None));
    wait_for_counter_lines(&log, 1, TIMEOUT);

    // Running: refused before anything is created, whatever the destination.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let missing = dir.path().join("missing");
    for destination in [&empty, &missing] {
        let (status, body) = vmm.call("PUT", "vm.snapshot", &snapshot_body(destination));
        assert_ne!(status, 204, "{body}");
        assert!(
            body.contains("Trying to snapshot while VM is running"),
            "{body}"
        );
    }
    assert!(entries(&empty).is_empty(), "{:?}", entries(&empty));
    assert!(!missing.exists(), "the destination was created");

    vmm.ok("PUT", "vm.pause", &Value::Null);
    // Paused, destination missing: upstream's message, nothing created.
    let (status, body) = vmm.call("PUT", "vm.snapshot", &snapshot_body(&missing));
    assert_eq!(status, 500, "{body}");
    let expected = format!("Destination is not a directory: \"{}\"", missing.display());
    assert!(body.contains(&expected), "{body} lacks {expected}");
    assert!(!missing.exists(), "the destination was created");

    // A symlink planted as config.json: refused, its target untouched, nothing left behind.
    let trap = dir.path().join("trap");
    std::fs::create_dir(&trap).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, trap.join("config.json")).unwrap();
    let (status, body) = vmm.call("PUT", "vm.snapshot", &snapshot_body(&trap));
    assert_ne!(status, 204, "{body}");
    assert!(body.contains("config.json"), "{body}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(entries(&trap), vec!["config.json"], "partial files left");

    // A good snapshot: three new files, owner-only.
    vmm.ok("PUT", "vm.snapshot", &snapshot_body(&empty));
    assert_eq!(
        entries(&empty),
        vec!["config.json", "memory-ranges", "state.json"]
    );
    let state_before = std::fs::read(empty.join("state.json")).unwrap();
    for name in entries(&empty) {
        let mode = std::fs::metadata(empty.join(&name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}: {mode:o}");
    }
    // Never over an existing snapshot: refused, the first one intact.
    let (status, body) = vmm.call("PUT", "vm.snapshot", &snapshot_body(&empty));
    assert_ne!(status, 204, "{body}");
    assert_eq!(
        std::fs::read(empty.join("state.json")).unwrap(),
        state_before
    );
    vmm.ok("PUT", "vm.resume", &Value::Null);
    vmm.shutdown();
}

/// CRC-32C (Castagnoli), bit by bit: the test's own, to re-seal a tampered `state.json`.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Copies snapshot `source` to `dir/name` and rewrites its `state.json` with `change` applied to
/// the content, checksum recomputed (`seal`) or left as it was.
fn variant(
    source: &Path,
    dir: &Path,
    name: &str,
    seal: bool,
    change: impl FnOnce(&mut Value),
) -> PathBuf {
    let target = dir.join(name);
    std::fs::create_dir(&target).unwrap();
    for file in ["config.json", "memory-ranges", "state.json"] {
        std::fs::copy(source.join(file), target.join(file)).unwrap();
    }
    let mut envelope: Value =
        serde_json::from_str(&std::fs::read_to_string(target.join("state.json")).unwrap()).unwrap();
    let mut content = envelope["content"].take();
    change(&mut content);
    let content = content.to_string();
    let crc = if seal {
        crc32c(content.as_bytes())
    } else {
        envelope["crc32c"].as_u64().unwrap() as u32
    };
    let text = format!(
        r#"{{"format":{},"version":{},"crc32c":{crc},"content":{content}}}"#,
        envelope["format"], envelope["version"]
    );
    std::fs::write(target.join("state.json"), text).unwrap();
    target
}

#[test]
fn a_malformed_or_unchecksummed_state_is_refused_and_nothing_resumes() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let log = dir.path().join("serial.log");
    let snapshot = dir.path().join("good");
    std::fs::create_dir(&snapshot).unwrap();
    let vmm = Vmm::start(dir.path(), "first", &counter_arguments(&log, None));
    wait_for_counter_lines(&log, 2, TIMEOUT);
    vmm.ok("PUT", "vm.pause", &Value::Null);
    vmm.ok("PUT", "vm.snapshot", &snapshot_body(&snapshot));
    vmm.shutdown();
    let restored_log = dir.path().join("restored.log");
    point_serial_to(&snapshot, &restored_log);

    // The stored checksum covers the content exactly as written.
    let envelope: Value =
        serde_json::from_str(&std::fs::read_to_string(snapshot.join("state.json")).unwrap())
            .unwrap();
    assert_eq!(envelope["version"], 1);
    assert!(envelope["crc32c"].is_u64(), "{}", envelope["crc32c"]);

    let regs = |value: Value| move |content: &mut Value| content["vm"]["vcpus"][0]["regs"] = value;
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            variant(&snapshot, dir.path(), "regs-string", true, regs(json!("x"))),
            "invalid type: string",
        ),
        (
            variant(
                &snapshot,
                dir.path(),
                "regs-short",
                true,
                regs(json!(vec![1; 10])),
            ),
            "10 bytes",
        ),
        (
            variant(&snapshot, dir.path(), "regs-ff", true, |content| {
                let len = content["vm"]["vcpus"][0]["regs"].as_array().unwrap().len();
                content["vm"]["vcpus"][0]["regs"] = json!(vec![0xff; len]);
            }),
            "invalid VM state",
        ),
        (
            variant(&snapshot, dir.path(), "sregs-ff", true, |content| {
                let len = content["vm"]["vcpus"][0]["sregs"].as_array().unwrap().len();
                content["vm"]["vcpus"][0]["sregs"] = json!(vec![0xff; len]);
            }),
            "invalid VM state",
        ),
        (
            variant(&snapshot, dir.path(), "two-vcpus", true, |content| {
                let vcpu = content["vm"]["vcpus"][0].clone();
                content["vm"]["vcpus"].as_array_mut().unwrap().push(vcpu);
            }),
            "vCPUs",
        ),
        (
            variant(&snapshot, dir.path(), "short-ranges", true, |content| {
                content["memory_ranges"][0]["length"] = json!(4096);
            }),
            "memory-ranges",
        ),
        (
            variant(&snapshot, dir.path(), "tampered", false, |content| {
                content["vm"]["vcpus"][0]["regs"][0] = json!(7);
            }),
            "checksum mismatch",
        ),
    ];
    let unsealed = dir.path().join("unsealed");
    std::fs::create_dir(&unsealed).unwrap();
    for file in ["config.json", "memory-ranges"] {
        std::fs::copy(snapshot.join(file), unsealed.join(file)).unwrap();
    }
    std::fs::write(unsealed.join("state.json"), envelope["content"].to_string()).unwrap();
    let mut cases = cases;
    cases.push((unsealed, "no checksum"));

    let target = Vmm::start(dir.path(), "target", &[]);
    for (source, expected) in &cases {
        let body = json!({ "source_url": format!("file://{}", source.display()), "resume": true });
        let (status, answer) = target.call("PUT", "vm.restore", &body);
        assert_eq!(status, 400, "{}: {answer}", source.display());
        assert!(
            answer.contains(expected),
            "{}: {answer} lacks {expected:?}",
            source.display()
        );
        // Nothing was created, nothing runs.
        let (status, answer) = target.call("GET", "vm.info", &Value::Null);
        assert_eq!(status, 404, "{answer}");
    }
    assert!(!restored_log.exists(), "a refused restore ran the guest");
    // The untouched snapshot restores into the same VMM: the refusals were about the files.
    target.ok(
        "PUT",
        "vm.restore",
        &json!({ "source_url": format!("file://{}", snapshot.display()), "resume": true }),
    );
    let text = wait_for_counter_lines(&restored_log, 2, TIMEOUT);
    assert!(!text.contains("counter: boot"), "{text}");
    target.shutdown();
}

#[test]
fn a_save_into_a_deleted_region_file_exits_with_its_own_code_and_says_why() {
    integration_tests::require_kvm!();
    assert_ne!(EXIT_SAVED_INTO_DETACHED_REGION, EXIT_POWER_FAIL_SAVED);
    let dir = scratch_dir();
    let region = dir.path().join("region");
    let log = dir.path().join("serial.log");
    let mut vmm = Vmm::start(dir.path(), "vmm", &counter_arguments(&log, Some(&region)));
    wait_for_counter_lines(&log, 1, TIMEOUT);
    std::fs::remove_file(&region).unwrap();
    vmm.process.signal(libc::SIGPWR);
    let code = vmm.process.wait_exit_code();
    let stderr = vmm.process.stderr_log();
    assert_eq!(code, EXIT_SAVED_INTO_DETACHED_REGION, "{stderr}");
    assert!(
        stderr.contains("THE SAVE IS NOT WHERE RECOVERY LOOKS"),
        "{stderr}"
    );
    assert!(stderr.contains("deleted while in use"), "{stderr}");
}

/// Whether `path` was closed after being opened for writing while `action` ran (inotify).
fn opened_for_writing(path: &Path, action: impl FnOnce()) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: syscalls on a descriptor this function owns and closes; the buffer outlives
    // the read, and each event is copied out unaligned.
    unsafe {
        let fd = libc::inotify_init1(libc::IN_NONBLOCK);
        assert!(fd >= 0);
        assert!(libc::inotify_add_watch(fd, name.as_ptr(), libc::IN_CLOSE_WRITE) >= 0);
        action();
        let mut buffer = [0u8; 4096];
        let read = libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len());
        libc::close(fd);
        read > 0
    }
}

#[test]
fn nv_regions_opens_read_only_and_refuses_fifos_and_directories_at_once() {
    let dir = scratch_dir();
    let region_path = dir.path().join("region");
    {
        let options = nv_extension::OpenOptions {
            create_if_missing: true,
            ..Default::default()
        };
        let region = nv_extension::Region::open(&region_path, &options).unwrap();
        region.create_vm("listed", 2 << 20, b"{}").unwrap();
    }
    let vmm = Vmm::start(dir.path(), "vmm", &[]);
    let list = |path: &Path| {
        vmm.call(
            "GET",
            &format!("vmm.nv-regions?region={}", path.display()),
            &Value::Null,
        )
    };
    let mut listing = (0, String::new());
    let wrote = opened_for_writing(&region_path, || listing = list(&region_path));
    assert_eq!(listing.0, 200, "{}", listing.1);
    assert!(listing.1.contains("listed"), "{}", listing.1);
    assert!(!wrote, "vmm.nv-regions opened the region for writing");

    let fifo = dir.path().join("fifo");
    integration_tests::harness::make_fifo(&fifo).expect("mkfifo");
    let (status, body) = list(&fifo);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("is a FIFO"), "{body}");
    let (status, body) = list(dir.path());
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("is a directory"), "{body}");
    let missing = dir.path().join("missing");
    let (status, body) = list(&missing);
    assert_eq!(status, 404, "{body}");
    assert!(!missing.exists());
    vmm.shutdown();
}
