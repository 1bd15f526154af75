//! virtio-fs end to end on KVM: the fscheck guest drives a `--fs tag=,socket=` device served
//! by virtiofsd as a FUSE client (INIT, LOOKUP, OPEN, READ of a file the test put in the shared
//! directory, CREATE and WRITE of a file the test then reads on the host), through a pause,
//! snapshot and resume of its VM, and across a power failure of an NV VM and a snapshot
//! restored into a new VMM, each on a new virtiofsd that gets the old one's FUSE state.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::api_client;
use integration_tests::harness::{guest_arguments, scratch_dir};
use integration_tests::process::{Stdout, VmmProcess};
use vmm::nv::EXIT_POWER_FAIL_SAVED;

const VIRTIOFSD: &str = "virtiofsd";
const TIMEOUT: Duration = Duration::from_secs(60);
const INPUT: &str = "nv-hypervisor-virtio-fs-input-0042";
/// fscheck's fixed-width output line.
const LINE_LEN: usize = 22;

/// A shared directory and the virtiofsd serving it.
struct SharedDir {
    dir: PathBuf,
    shared: PathBuf,
    socket: PathBuf,
    process: Option<VmmProcess>,
    starts: usize,
}

impl SharedDir {
    fn new(dir: &Path) -> Self {
        let found = Command::new(VIRTIOFSD)
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success());
        assert!(
            found,
            "{VIRTIOFSD} is missing: ci/install-deps.sh installs it (cargo install virtiofsd)"
        );
        let shared = dir.join("shared");
        std::fs::create_dir(&shared).expect("shared directory");
        std::fs::write(shared.join("input.txt"), INPUT).expect("input file");
        SharedDir {
            dir: dir.to_owned(),
            shared,
            socket: dir.join("fs.sock"),
            process: None,
            starts: 0,
        }
    }

    /// Starts virtiofsd and waits for its socket.
    fn start(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let arguments = [
            "--socket-path".to_string(),
            self.socket.display().to_string(),
            "--shared-dir".to_string(),
            self.shared.display().to_string(),
            "--sandbox".to_string(),
            "none".to_string(),
            "--cache".to_string(),
            "never".to_string(),
        ];
        let log = self.dir.join(format!("virtiofsd{}.log", self.starts));
        self.starts += 1;
        let mut process =
            VmmProcess::start(Path::new(VIRTIOFSD), &arguments, &[], &log, Stdout::Log)
                .unwrap_or_else(|e| panic!("starting {VIRTIOFSD}: {e}"));
        let deadline = Instant::now() + TIMEOUT;
        while !self.socket.exists() {
            if let Some(status) = process.try_wait() {
                panic!("{VIRTIOFSD} ended ({status}):\n{}", process.stderr_log());
            }
            assert!(Instant::now() < deadline, "no socket from {VIRTIOFSD}");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.process = Some(process);
    }

    fn option(&self) -> String {
        format!("tag=shared,socket={}", self.socket.display())
    }

    /// The lines fscheck wrote into output.txt, checked: `n` whole lines, each the expected one.
    fn assert_output_lines(&self, n: usize) {
        let text = std::fs::read_to_string(self.shared.join("output.txt")).expect("output.txt");
        assert_eq!(text.len(), n * LINE_LEN, "{text}");
        for (index, line) in text.lines().enumerate() {
            assert_eq!(line, format!("fscheck line {:08}", index + 1));
        }
    }
}

/// How the fscheck guest gets its virtio-fs device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plug {
    /// `--fs` on the command line.
    Cold,
    /// Booted without one (`hotplug=1`); `vm.add-fs` (device `hotfs`) once fscheck waits for
    /// the hotplug.
    Hot,
}

fn last_written(log: &str) -> u64 {
    log.lines()
        .filter_map(|line| line.strip_prefix("fscheck: wrote n="))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

fn wait_written(vmm: &mut VmmProcess, n: u64) {
    vmm.wait_serial("fscheck progress", |log| {
        last_written(log) >= n || log.contains("FAIL")
    });
}

fn finishes_ok(vmm: &mut VmmProcess) -> String {
    vmm.wait_guest_done_ok("fscheck")
}

/// fscheck writing `lines` lines on `memory` with `--api-socket` and the `extra` arguments,
/// its device plugged as `plug` says and served by a started virtiofsd, past its `written`th
/// line: the shared directory, the API socket and the VMM.
fn start_fscheck(
    dir: &Path,
    plug: Plug,
    lines: u64,
    memory: &str,
    extra: &[String],
    written: u64,
) -> (SharedDir, PathBuf, VmmProcess) {
    let mut fs = SharedDir::new(dir);
    fs.start();
    let api = dir.join("api.sock");
    let hotplug = if plug == Plug::Hot { " hotplug=1" } else { "" };
    let mut arguments = guest_arguments(
        "fscheck",
        &format!("expect={INPUT} lines={lines} report=10 pace_us=20000{hotplug} exit=reset"),
        memory,
    );
    if plug == Plug::Cold {
        arguments.extend(["--fs".to_string(), fs.option()]);
    }
    arguments.extend([
        "--api-socket".to_string(),
        format!("path={}", api.display()),
    ]);
    arguments.extend_from_slice(extra);
    let mut vmm =
        VmmProcess::spawn_with_serial_file(dir, "boot", &arguments, &[]).with_timeout(TIMEOUT);
    vmm.wait_for_socket(&api, TIMEOUT);
    if plug == Plug::Hot {
        vmm.wait_serial("fscheck waiting for the hotplug", |log| {
            log.contains("fscheck: waiting for a hotplug") || log.contains("FAIL")
        });
        add_fs(&api, &fs);
    }
    wait_written(&mut vmm, written);
    (fs, api, vmm)
}

/// fscheck writing 100 lines on `--memory shared=on` (a memfd), started as [`start_fscheck`]
/// says, past its 20th line: the shared directory, the API socket, an empty snapshot directory
/// and the VMM.
fn fscheck_with_api(dir: &Path, plug: Plug) -> (SharedDir, PathBuf, PathBuf, VmmProcess) {
    let (fs, api, vmm) = start_fscheck(dir, plug, 100, "32M,shared=on", &[], 20);
    let snapshot = dir.join("snapshot");
    std::fs::create_dir(&snapshot).expect("snapshot directory");
    (fs, api, snapshot, vmm)
}

/// Recovers the NV VM `vm` of `region` in place on a newly started virtiofsd: `--fs` again for
/// a device given at boot (`plug`), none for a hotplugged one (it comes back from the saved
/// config and state). The guest goes on past `written` with no second FUSE_INIT (its WRITEs and READ
/// back on the file handle the first virtiofsd gave it) and finishes; the new virtiofsd got the
/// saved state. Returns the recovery's stderr.
fn recover_on_a_new_virtiofsd(
    dir: &Path,
    region: &Path,
    vm: &str,
    plug: Plug,
    fs: &mut SharedDir,
    written: u64,
) -> String {
    fs.start();
    let mut recover = vec![
        "--nv".to_string(),
        format!("region={},vm={vm},recover=on", region.display()),
    ];
    if plug == Plug::Cold {
        recover.extend(["--fs".to_string(), fs.option()]);
    }
    let mut vmm =
        VmmProcess::spawn_with_serial_file(dir, "recovered", &recover, &[]).with_timeout(TIMEOUT);
    let after = finishes_ok(&mut vmm);
    assert!(
        !after.contains("fscheck: init"),
        "the guest started again:\n{after}"
    );
    assert!(last_written(&after) > written, "{written}, then:\n{after}");
    let recovered = vmm.stderr_log();
    assert!(recovered.contains("device state loaded"), "{recovered}");
    vmm.kill();
    recovered
}

/// Pauses the VM, snapshots it into `snapshot`, kills the VMM and waits for its virtiofsd to
/// end (it serves one front-end); the last line the guest had written.
fn snapshot_and_stop(api: &Path, snapshot: &Path, vmm: &mut VmmProcess, fs: &mut SharedDir) -> u64 {
    api_call(api, "PUT", "vm.pause", "");
    let destination = format!("{{\"destination_url\":\"file://{}\"}}", snapshot.display());
    api_call(api, "PUT", "vm.snapshot", &destination);
    let state = std::fs::read_to_string(snapshot.join("state.json")).expect("state.json");
    assert!(state.contains("\"backend_state\":{"), "{state}");
    let paused = last_written(&vmm.serial_log());
    vmm.kill();
    let mut old = fs.process.take().expect("virtiofsd");
    old.wait_exit_within(Duration::from_secs(10))
        .expect("virtiofsd outlived its front-end");
    paused
}

/// Restores `snapshot` into a new VMM on a new virtiofsd: the guest's FUSE session goes on past
/// `paused` with no second FUSE_INIT, the backend got its state, and the guest finishes its 100
/// lines (its reset ends the VMM with 0: not an NV VM).
fn restore_on_a_new_virtiofsd(dir: &Path, snapshot: &Path, fs: &mut SharedDir, paused: u64) {
    fs.start();
    let mut restored = VmmProcess::spawn_restore(dir, "restored", snapshot).with_timeout(TIMEOUT);
    let after = finishes_ok(&mut restored);
    assert!(!after.contains("fscheck: init"), "{after}");
    assert!(last_written(&after) > paused, "{paused}, then:\n{after}");
    assert!(
        restored.stderr_log().contains("device state loaded"),
        "{}",
        restored.stderr_log()
    );
    assert_eq!(restored.wait_exit().code(), Some(0));
    fs.assert_output_lines(100);
}

/// One API request that must succeed (200 or 204); its answer.
fn api_call(api: &Path, method: &str, op: &str, body: &str) -> String {
    let (status, answer) = api_client::request(api, method, op, body, TIMEOUT);
    assert!(status == 204 || status == 200, "{op}: {status} {answer}");
    answer
}

/// A VM on `--memory shared=on` (a memfd): the guest reads the file the test put there (the
/// backend's content reached guest RAM), writes 100 lines the host then finds, and reads them
/// back. A pause, a snapshot and a resume in the middle stop the rings with GET_VRING_BASE and
/// start them again on the same virtiofsd: the guest's FUSE session goes on.
#[test]
fn a_guest_reads_and_writes_the_shared_directory_across_pause_snapshot_resume() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let (fs, api, snapshot, mut vmm) = fscheck_with_api(dir.path(), Plug::Cold);
    let call = |method: &str, op: &str, body: &str| api_call(&api, method, op, body);
    let info = call("GET", "vm.info", "");
    assert!(info.contains("\"tag\":\"shared\""), "{info}");
    call("PUT", "vm.pause", "");
    let paused = last_written(&vmm.serial_log());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        last_written(&vmm.serial_log()),
        paused,
        "progress while paused"
    );
    let destination = format!("{{\"destination_url\":\"file://{}\"}}", snapshot.display());
    call("PUT", "vm.snapshot", &destination);
    let state = std::fs::read_to_string(snapshot.join("state.json")).expect("state.json");
    assert!(
        state.contains("\"fs\":[{"),
        "no virtio-fs state saved: {state}"
    );
    call("PUT", "vm.resume", "");
    let log = finishes_ok(&mut vmm);
    assert!(
        log.contains(&format!("fscheck: read {} bytes", INPUT.len())),
        "{log}"
    );
    assert_eq!(log.matches("fscheck: init").count(), 1, "{log}");
    // Not an NV VM: its reset ends the VMM with 0.
    assert_eq!(vmm.wait_exit().code(), Some(0));
    fs.assert_output_lines(100);
    assert_eq!(fs.starts, 1);
}

/// Power failure of an NV VM amid the guest's writes, with the guest holding `files` more open
/// files. virtiofsd serves one front-end connection and ends when it closes, so the power
/// failure (which ends the VMM) ends it too. The save read its FUSE state (SET_DEVICE_STATE_FD
/// with the rings stopped) into the NV state; a new virtiofsd on the same directory is started,
/// the VM recovers in place (no reset, no second FUSE_INIT) and the recovery gives the new
/// virtiofsd that state before the rings start: the guest's WRITEs on the handle it got from
/// FUSE_CREATE before the failure go on, its READ back through that handle returns every line,
/// and the host's file is whole. Returns the save's and the recovery's log lines about the
/// device state, and the save's line (for the cost the state fetch adds).
fn power_fail_and_recover_on_a_new_virtiofsd(files: u64) -> (String, String) {
    let dir = scratch_dir();
    let region = dir.path().join("region");
    let mut fs = SharedDir::new(dir.path());
    fs.start();
    let mut arguments = guest_arguments(
        "fscheck",
        &format!("expect={INPUT} lines=300 report=10 pace_us=20000 files={files} exit=reset"),
        "32M",
    );
    arguments.extend([
        "--nv".to_string(),
        format!("region={},vm=fs,create=on", region.display()),
        "-v".to_string(),
    ]);
    arguments.extend(["--fs".to_string(), fs.option()]);
    let mut vmm = VmmProcess::spawn_with_serial_file(dir.path(), "boot", &arguments, &[])
        .with_timeout(TIMEOUT);
    wait_written(&mut vmm, 30);
    let saved = vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "power-fail exit");
    assert!(saved.contains("power-fail save committed"), "{saved}");
    assert!(saved.contains("device state saved"), "{saved}");
    let before = vmm.serial_log();
    assert!(!before.contains("FAIL"), "{before}");
    if files > 0 {
        assert!(
            before.contains(&format!("fscheck: opened {files} files")),
            "{before}"
        );
    }
    let written = last_written(&before);
    assert!(written < 300, "the guest finished before the power failure");

    // The front-end's connection closed with the VMM: virtiofsd ends.
    let mut old = fs.process.take().expect("virtiofsd");
    let status = old
        .wait_exit_within(Duration::from_secs(10))
        .expect("virtiofsd outlived its front-end");
    assert!(status.success(), "{status}");
    assert!(
        old.stderr_log()
            .contains("Client disconnected, shutting down"),
        "{}",
        old.stderr_log()
    );

    let recovered =
        recover_on_a_new_virtiofsd(dir.path(), &region, "fs", Plug::Cold, &mut fs, written);
    fs.assert_output_lines(300);
    assert_eq!(fs.starts, 2);
    let state_lines = |log: &str| {
        log.lines()
            .filter(|line| line.contains("device state") || line.contains("save committed"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    (state_lines(&saved), state_lines(&recovered))
}

#[test]
fn a_power_failure_carries_virtiofsd_state_to_a_new_virtiofsd_and_the_guest_goes_on() {
    integration_tests::require_kvm!();
    let (saved, recovered) = power_fail_and_recover_on_a_new_virtiofsd(0);
    eprintln!("small tree:\n{saved}\n{recovered}");
}

/// The same with 1000 more files the guest created and holds open: the state carries their
/// inodes and handles (its size and the time to fetch it are printed: the cost the fetch adds
/// to the power-fail save, see `docs/devices.md`).
#[test]
fn a_power_failure_carries_a_thousand_open_files_to_a_new_virtiofsd() {
    integration_tests::require_kvm!();
    let (saved, recovered) = power_fail_and_recover_on_a_new_virtiofsd(1000);
    eprintln!("1000 open files:\n{saved}\n{recovered}");
}

/// `vm.snapshot` restored into a new VMM (`--restore`) on a new virtiofsd: the snapshot has
/// virtiofsd's FUSE state, the restore gives it to the new process, and the guest's FUSE session
/// goes on (its next WRITE on its old handle, the READ back), with no second FUSE_INIT.
#[test]
fn a_snapshot_restores_the_fuse_session_into_a_new_vmm_and_virtiofsd() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let (mut fs, api, snapshot, mut vmm) = fscheck_with_api(dir.path(), Plug::Cold);
    let paused = snapshot_and_stop(&api, &snapshot, &mut vmm, &mut fs);

    // A state the new virtiofsd refuses (well formed, checksums right, not virtiofsd's): the
    // restore fails naming the socket, and the snapshot stays restorable.
    fs.start();
    let intact = std::fs::read(snapshot.join("state.json")).expect("state.json");
    reseal_backend_state(&snapshot, b"not what virtiofsd wrote");
    let mut refused = VmmProcess::spawn(
        dir.path(),
        "refused",
        &[
            "--restore".to_string(),
            format!("source_url=file://{},resume=true", snapshot.display()),
        ],
        &[],
    )
    .with_timeout(TIMEOUT);
    assert_eq!(refused.wait_exit().code(), Some(1));
    let refusal = refused.stderr_log();
    assert!(
        refusal.contains("refused the saved device state")
            && refusal.contains(&fs.socket.display().to_string()),
        "{refusal}"
    );
    std::fs::write(snapshot.join("state.json"), intact).expect("state.json");
    let mut old = fs.process.take().expect("virtiofsd");
    old.wait_exit_within(Duration::from_secs(10))
        .expect("virtiofsd outlived its front-end");

    restore_on_a_new_virtiofsd(dir.path(), &snapshot, &mut fs, paused);
    assert_eq!(fs.starts, 3);
}

/// Puts `bytes` as the virtio-fs device's backend state into the snapshot's `state.json`, with
/// its length, CRC-32C and base64 right and the file's checksum recomputed.
fn reseal_backend_state(snapshot: &Path, bytes: &[u8]) {
    let path = snapshot.join("state.json");
    let mut envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("state.json")).expect("JSON");
    let mut content = envelope["content"].take();
    let state = &mut content["vm"]["devices"]["fs"][0]["backend_state"];
    assert!(state.is_object(), "no backend state in {content}");
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    // Whole groups of three bytes only: no padding to write.
    assert_eq!(bytes.len() % 3, 0);
    let base64: String = bytes
        .chunks(3)
        .flat_map(|c| {
            let n = u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]);
            (0..4).map(move |i| ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char)
        })
        .collect();
    *state = serde_json::json!({
        "len": bytes.len(),
        "crc32c": crc32c::crc32c(bytes),
        "base64": base64,
    });
    let content = content.to_string();
    let text = format!(
        r#"{{"format":{},"version":{},"crc32c":{},"content":{content}}}"#,
        envelope["format"],
        envelope["version"],
        crc32c::crc32c(content.as_bytes())
    );
    std::fs::write(&path, text).expect("state.json");
}

/// `vm.add-fs` as upstream on a running VM: 200 with the new function's `PciDeviceInfo`
/// (upstream's default id `_fs0`), the backend connected, the config listing it; the same id
/// again is 409; on a VM whose RAM the backend cannot map it is 400.
#[test]
fn vm_add_fs_hotplugs_a_virtio_fs_device() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let mut fs = SharedDir::new(dir.path());
    fs.start();
    let api = dir.path().join("api.sock");
    let mut arguments = guest_arguments("counter", "", "32M,shared=on");
    arguments.extend([
        "--api-socket".to_string(),
        format!("path={}", api.display()),
    ]);
    let mut vmm = VmmProcess::spawn_with_serial_file(dir.path(), "boot", &arguments, &[])
        .with_timeout(TIMEOUT);
    vmm.wait_for_socket(&api, TIMEOUT);
    let body = format!(
        "{{\"tag\":\"shared\",\"socket\":\"{}\"}}",
        fs.socket.display()
    );
    let (status, answer) = api_client::request(&api, "PUT", "vm.add-fs", &body, TIMEOUT);
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"id\":\"_fs0\""), "{answer}");
    assert!(answer.contains("\"bdf\":\"0000:00:"), "{answer}");
    let (_, info) = api_client::request(&api, "GET", "vm.info", "", TIMEOUT);
    assert!(info.contains("\"tag\":\"shared\""), "{info}");
    let log = dir.path().join("virtiofsd0.log");
    let deadline = Instant::now() + TIMEOUT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("Client connected")
    {
        assert!(Instant::now() < deadline, "virtiofsd saw no front-end");
        std::thread::sleep(Duration::from_millis(50));
    }
    let again = r#"{"tag":"other","socket":"/nonexistent.sock","id":"_fs0"}"#;
    let (status, answer) = api_client::request(&api, "PUT", "vm.add-fs", again, TIMEOUT);
    assert_eq!(status, 409, "{answer}");
    vmm.kill();

    // Private RAM: refused before any connection.
    let mut arguments = guest_arguments("counter", "", "32M");
    arguments.extend([
        "--api-socket".to_string(),
        format!("path={}", api.display()),
    ]);
    let _ = std::fs::remove_file(&api);
    let mut vmm = VmmProcess::spawn_with_serial_file(dir.path(), "private", &arguments, &[])
        .with_timeout(TIMEOUT);
    vmm.wait_for_socket(&api, TIMEOUT);
    let (status, answer) = api_client::request(&api, "PUT", "vm.add-fs", &body, TIMEOUT);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("shared=on"), "{answer}");
    vmm.kill();
}

/// The test's `vm.add-fs` of the shared directory as device `hotfs`: 200, and its function on
/// bus 0.
fn add_fs(api: &Path, fs: &SharedDir) {
    let body = format!(
        "{{\"tag\":\"shared\",\"socket\":\"{}\",\"id\":\"hotfs\"}}",
        fs.socket.display()
    );
    let answer = api_call(api, "PUT", "vm.add-fs", &body);
    assert!(answer.contains("\"id\":\"hotfs\""), "{answer}");
}

/// A virtio-fs device hotplugged with `vm.add-fs` into an NV VM booted without `--fs` (the
/// fscheck guest waits for the ACPI PCI hotplug event, then drives it, holding the handle
/// FUSE_CREATE gave it) survives a power failure like a `--fs` one: the save reads virtiofsd's
/// FUSE state into the hotplugged device's saved state, a new virtiofsd is started, the
/// recovery (no `--fs`: the device comes back from the saved config and state) gives it that
/// state before the rings start, and the guest's WRITEs and READ on its old handle go on with
/// no second FUSE_INIT; the host's file is whole.
#[test]
fn a_hotplugged_fs_carries_virtiofsd_state_across_a_power_failure() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let region = dir.path().join("region");
    let nv = [
        "--nv".to_string(),
        format!("region={},vm=fshot,create=on", region.display()),
    ];
    let (mut fs, _api, mut vmm) = start_fscheck(dir.path(), Plug::Hot, 300, "32M", &nv, 30);
    let saved = vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "power-fail exit");
    assert!(saved.contains("power-fail save committed"), "{saved}");
    let before = vmm.serial_log();
    assert!(before.contains("fscheck: event up=0x"), "{before}");
    assert!(!before.contains("FAIL"), "{before}");
    let written = last_written(&before);
    assert!(written < 300, "the guest finished before the power failure");
    let mut old = fs.process.take().expect("virtiofsd");
    old.wait_exit_within(Duration::from_secs(10))
        .expect("virtiofsd outlived its front-end");

    assert!(saved.contains("device state saved"), "{saved}");
    recover_on_a_new_virtiofsd(dir.path(), &region, "fshot", Plug::Hot, &mut fs, written);
    fs.assert_output_lines(300);
    assert_eq!(fs.starts, 2);
}

/// `vm.snapshot` of a VM whose virtio-fs device was hotplugged (`vm.add-fs`, no `--fs`),
/// restored into a new VMM on a new virtiofsd: the snapshot has virtiofsd's FUSE state with the
/// hotplugged device, the restore puts the device back from it and gives the state to the new
/// process, and the guest's FUSE session goes on on its old handle with no second FUSE_INIT.
#[test]
fn a_snapshot_restores_the_fuse_session_of_a_hotplugged_fs() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let (mut fs, api, snapshot, mut vmm) = fscheck_with_api(dir.path(), Plug::Hot);
    let paused = snapshot_and_stop(&api, &snapshot, &mut vmm, &mut fs);
    restore_on_a_new_virtiofsd(dir.path(), &snapshot, &mut fs, paused);
    assert_eq!(fs.starts, 2);
}
