//! vhost-user-blk disks across power failures, end to end on KVM: the blkcheck guest writes,
//! flushes and verifies sequence-numbered blocks on a `--disk vhost_user=on,socket=` served by
//! our `nv-vhost-user-blk` or by qemu-storage-daemon; the VM gets SIGPWR amid I/O, the backend is
//! restarted, and a new VMM recovers the VM in place: the disk holds every request the guest saw
//! completed, and the guest goes on writing where it stood.

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::guests::verify_blkcheck_disk;
use integration_tests::harness::{guest_arguments, scratch_dir};
use integration_tests::process::{Stdout, VmmProcess};
use integration_tests::{api_client, binaries};
use vmm::nv::EXIT_POWER_FAIL_SAVED;
use vmm::vmm::EXIT_GUEST_RESET;

const BLOCKS: u64 = 256;
const ROUNDS: u64 = 200;
const TIMEOUT: Duration = Duration::from_secs(60);
const QEMU_STORAGE_DAEMON: &str = "qemu-storage-daemon";

/// Which backend serves the disk.
#[derive(Clone, Copy)]
enum Backend {
    Ours,
    QemuStorageDaemon,
}

/// One disk image, its socket and the backend process serving it.
struct Disk {
    dir: PathBuf,
    image: PathBuf,
    socket: PathBuf,
    kind: Backend,
    process: Option<VmmProcess>,
    starts: usize,
}

impl Disk {
    fn new(dir: &Path, kind: Backend) -> Self {
        let image = dir.join("disk.img");
        File::create(&image)
            .and_then(|file| file.set_len(BLOCKS * 4096))
            .expect("disk image");
        Disk {
            dir: dir.to_owned(),
            image,
            socket: dir.join("blk.sock"),
            kind,
            process: None,
            starts: 0,
        }
    }

    /// Starts the backend and waits for its socket.
    fn start(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let (binary, arguments) = match self.kind {
            Backend::Ours => (
                binaries::nv_vhost_user_blk(),
                vec![
                    "--socket".to_string(),
                    self.socket.display().to_string(),
                    "--file".to_string(),
                    self.image.display().to_string(),
                ],
            ),
            Backend::QemuStorageDaemon => (
                PathBuf::from(QEMU_STORAGE_DAEMON),
                vec![
                    "--blockdev".to_string(),
                    format!(
                        "driver=file,node-name=file0,filename={}",
                        self.image.display()
                    ),
                    "--export".to_string(),
                    format!(
                        "type=vhost-user-blk,id=export0,node-name=file0,writable=on,\
                         addr.type=unix,addr.path={}",
                        self.socket.display()
                    ),
                ],
            ),
        };
        let log = self.dir.join(format!("backend{}.log", self.starts));
        self.starts += 1;
        let mut process = VmmProcess::start(&binary, &arguments, &[], &log, Stdout::Log)
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        process.wait_for_socket_file(&self.socket, TIMEOUT);
        self.process = Some(process);
    }

    /// SIGKILLs the backend: whatever it had not written back is lost with it.
    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    fn option(&self) -> String {
        format!("vhost_user=on,socket={}", self.socket.display())
    }
}

fn nv(region: &Path, extra: &str) -> [String; 2] {
    [
        "--nv".to_string(),
        format!("region={},vm=vu{extra}", region.display()),
    ]
}

/// Boots blkcheck on a new NV VM with `disk`.
fn boot(dir: &Path, region: &Path, disk: &Disk) -> VmmProcess {
    let mut arguments = guest_arguments(
        "blkcheck",
        &format!("blocks={BLOCKS} rounds={ROUNDS} exit=reset"),
        "32M",
    );
    arguments.extend(nv(region, ",create=on"));
    arguments.extend(["--disk".to_string(), disk.option()]);
    VmmProcess::spawn_with_serial_file(dir, "boot", &arguments, &[]).with_timeout(TIMEOUT)
}

fn recover(dir: &Path, label: &str, region: &Path, disk: &Disk) -> VmmProcess {
    let mut arguments = nv(region, ",recover=on").to_vec();
    arguments.extend(["--disk".to_string(), disk.option()]);
    VmmProcess::spawn_with_serial_file(dir, label, &arguments, &[]).with_timeout(TIMEOUT)
}

/// The `completed seq=` numbers blkcheck printed, in order.
fn completed_seqs(log: &str) -> impl Iterator<Item = u64> + '_ {
    log.lines()
        .filter_map(|line| line.strip_prefix("blkcheck: completed seq="))
        .filter_map(|seq| seq.trim().parse().ok())
}

/// Highest `completed seq=` blkcheck printed.
fn last_completed_seq(log: &str) -> u64 {
    completed_seqs(log).max().unwrap_or(0)
}

/// Waits until blkcheck completed `seq` (or failed).
fn wait_for_progress(vmm: &mut VmmProcess, seq: u64) {
    vmm.wait_serial("blkcheck progress", |log| {
        last_completed_seq(log) >= seq || log.contains("FAIL")
    });
}

/// A new NV VM of `dir` running blkcheck on a disk `kind` serves, well into its run.
fn running_vm(dir: &Path, kind: Backend) -> (PathBuf, Disk, VmmProcess) {
    let region = dir.join("region");
    let mut disk = Disk::new(dir, kind);
    disk.start();
    let mut vmm = boot(dir, &region, &disk);
    wait_for_progress(&mut vmm, 10 * BLOCKS);
    (region, disk, vmm)
}

/// Power-fails the VM amid its I/O and checks the disk holds every request the guest saw
/// completed. Returns the serial log and that count.
fn power_fail_amid_io(vmm: &mut VmmProcess, disk: &Disk) -> (String, u64) {
    let stderr = vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "power-fail exit");
    assert!(stderr.contains("power-fail save committed"), "{stderr}");
    let before = vmm.serial_log();
    assert!(!before.contains("FAIL"), "{before}");
    let completed = last_completed_seq(&before);
    assert!(
        completed < ROUNDS * BLOCKS,
        "the guest finished before the power failure"
    );
    verify_blkcheck_disk(&disk.image, BLOCKS, completed).unwrap_or_else(|e| {
        panic!("disk after the power failure (completed seq={completed}): {e}\n{stderr}")
    });
    (before, completed)
}

/// Waits for blkcheck to finish and checks it verified every block; returns the serial log.
fn finishes_ok(vmm: &mut VmmProcess) -> String {
    vmm.wait_guest_done_ok("blkcheck")
}

/// Waits for the recovered blkcheck to finish and checks it continued (no new boot, the first
/// sequence number after the last one before) and the whole disk is written. An NV VM ends with
/// `EXIT_GUEST_RESET`, an ordinary one (a restored snapshot) with 0.
fn finishes_in_place(vmm: &mut VmmProcess, disk: &Disk, completed: u64) {
    finishes_in_place_exiting(vmm, disk, completed, EXIT_GUEST_RESET);
}

fn finishes_in_place_exiting(vmm: &mut VmmProcess, disk: &Disk, completed: u64, exit: i32) {
    let after = finishes_ok(vmm);
    assert!(
        !after.contains("blkcheck: disk"),
        "the guest restarted:\n{after}"
    );
    let first_after = completed_seqs(&after)
        .next()
        .expect("a completed line after recovery");
    assert!(first_after > completed, "{first_after} after {completed}");
    assert_eq!(vmm.wait_exit().code(), Some(exit));
    verify_blkcheck_disk(&disk.image, BLOCKS, ROUNDS * BLOCKS)
        .unwrap_or_else(|e| panic!("disk after the recovered run: {e}"));
}

/// The whole proof with `kind` serving the disk: boot, power failure amid I/O, backend
/// restarted, recovery in place, the guest finishes.
fn survives_a_power_failure(kind: Backend) {
    let dir = scratch_dir();
    let (region, mut disk, mut vmm) = running_vm(dir.path(), kind);
    let (before, completed) = power_fail_amid_io(&mut vmm, &disk);
    assert!(before.contains("transport=virtio-pci"), "{before}");
    // The backend is restarted: a new process knows nothing of the rings.
    disk.kill();
    disk.start();
    let mut vmm = recover(dir.path(), "recovered", &region, &disk);
    finishes_in_place(&mut vmm, &disk, completed);
}

#[test]
fn nv_vhost_user_blk_disk_survives_a_power_failure_and_a_backend_restart() {
    integration_tests::require_kvm!();
    survives_a_power_failure(Backend::Ours);
}

#[test]
fn qemu_storage_daemon_disk_survives_a_power_failure_and_a_backend_restart() {
    integration_tests::require_kvm!();
    let found = Command::new(QEMU_STORAGE_DAEMON)
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        found,
        "{QEMU_STORAGE_DAEMON} is missing: ci/install-deps.sh installs it (Debian qemu-utils)"
    );
    survives_a_power_failure(Backend::QemuStorageDaemon);
}

/// The backend dies right before the save: GET_VRING_BASE finds it gone, the save still commits
/// (the rings' positions come from the used rings, the requests it had taken are served again),
/// a recovery while it is still gone fails naming the socket and leaves the VM recoverable, and
/// once it is back the VM recovers in place and finishes.
#[test]
fn a_backend_lost_at_the_save_and_absent_at_recovery_loses_nothing() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let (region, mut disk, mut vmm) = running_vm(dir.path(), Backend::Ours);
    disk.kill();
    let stderr = vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "power-fail exit");
    assert!(stderr.contains("power-fail save committed"), "{stderr}");
    let socket = disk.socket.display().to_string();
    assert!(
        stderr.contains(&format!("vhost-user backend at {socket}")),
        "the lost backend is not named:\n{stderr}"
    );
    let before = vmm.serial_log();
    assert!(!before.contains("FAIL"), "{before}");
    let completed = last_completed_seq(&before);
    verify_blkcheck_disk(&disk.image, BLOCKS, completed)
        .unwrap_or_else(|e| panic!("disk after the power failure: {e}"));

    let _ = std::fs::remove_file(&disk.socket);
    let started = Instant::now();
    let mut absent = recover(dir.path(), "absent", &region, &disk);
    let stderr = absent.expect_exit(1, "recovery without its backend");
    assert!(
        stderr.contains(&socket) && stderr.contains("cannot connect"),
        "no error naming the socket:\n{stderr}"
    );
    assert!(started.elapsed() < TIMEOUT, "the retry is not bounded");
    assert!(
        absent.serial_log().is_empty(),
        "a VM without its disk must not run"
    );

    disk.start();
    let mut vmm = recover(dir.path(), "recovered", &region, &disk);
    finishes_in_place(&mut vmm, &disk, completed);
}

/// A socket whose peer does not speak vhost-user (it hangs up) is refused at start, by name.
#[test]
fn a_socket_that_is_not_vhost_user_is_refused_by_name() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let region = dir.path().join("region");
    let mut disk = Disk::new(dir.path(), Backend::Ours);
    let listener = UnixListener::bind(&disk.socket).expect("bind");
    let hang_up = std::thread::spawn(move || {
        // Every connection is accepted and closed without a word.
        for stream in listener.incoming().take(1) {
            drop(stream);
        }
    });
    let mut vmm = boot(dir.path(), &region, &disk);
    let stderr = vmm.expect_exit(1, "a VM on a socket that is not vhost-user");
    let socket = disk.socket.display().to_string();
    assert!(
        stderr.contains(&format!("vhost-user backend at {socket}")),
        "no error naming the socket:\n{stderr}"
    );
    assert!(vmm.serial_log().is_empty());
    hang_up.join().expect("listener thread");
    // And with a real backend on that path, the same VM boots and serves.
    disk.start();
    let mut vmm = boot(dir.path(), &region, &disk);
    wait_for_progress(&mut vmm, BLOCKS);
    assert!(!vmm.serial_log().contains("FAIL"));
}

/// A new NV VM of `dir` running blkcheck on a disk our backend serves, with an API socket;
/// returns an empty snapshot directory, the API socket, the disk and the VMM.
fn running_vm_with_api(dir: &Path) -> (PathBuf, PathBuf, Disk, VmmProcess) {
    let region = dir.join("region");
    let snapshot = dir.join("snapshot");
    std::fs::create_dir(&snapshot).expect("snapshot directory");
    let api = dir.join("api.sock");
    let mut disk = Disk::new(dir, Backend::Ours);
    disk.start();
    let mut arguments = guest_arguments(
        "blkcheck",
        &format!("blocks={BLOCKS} rounds={ROUNDS} exit=reset"),
        "32M",
    );
    arguments.extend(nv(&region, ",create=on"));
    arguments.extend(["--disk".to_string(), disk.option()]);
    arguments.extend([
        "--api-socket".to_string(),
        format!("path={}", api.display()),
    ]);
    let mut vmm =
        VmmProcess::spawn_with_serial_file(dir, "boot", &arguments, &[]).with_timeout(TIMEOUT);
    vmm.wait_for_socket(&api, TIMEOUT);
    (snapshot, api, disk, vmm)
}

/// `vm.pause` stops the backend's rings (GET_VRING_BASE), `vm.snapshot` saves their positions
/// with the rest of the state, `vm.resume` starts them again from there on the same session:
/// the guest goes on without a reset, nothing is served twice or lost.
#[test]
fn pause_snapshot_and_resume_stop_and_restart_the_backend_rings() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let (snapshot, api, disk, mut vmm) = running_vm_with_api(dir.path());
    for pause in 0..3 {
        wait_for_progress(&mut vmm, 5 * BLOCKS * (pause + 1));
        let call = |method: &str, op: &str, body: &str| {
            let (status, answer) = api_client::request(&api, method, op, body, TIMEOUT);
            assert!(status == 204 || status == 200, "{op}: {status} {answer}");
        };
        call("PUT", "vm.pause", "");
        let paused = last_completed_seq(&vmm.serial_log());
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            last_completed_seq(&vmm.serial_log()),
            paused,
            "the guest made progress while paused"
        );
        // Every request the guest saw completed is on the disk while the VM is paused.
        verify_blkcheck_disk(&disk.image, BLOCKS, paused)
            .unwrap_or_else(|e| panic!("disk while paused: {e}"));
        if pause == 0 {
            let destination = format!("{{\"destination_url\":\"file://{}\"}}", snapshot.display());
            call("PUT", "vm.snapshot", &destination);
            let state = std::fs::read_to_string(snapshot.join("state.json")).expect("state.json");
            assert!(state.contains("next_avail"), "no ring positions saved");
        }
        call("PUT", "vm.resume", "");
    }
    let log = finishes_ok(&mut vmm);
    assert_eq!(
        log.matches("blkcheck: disk").count(),
        1,
        "the guest restarted:\n{log}"
    );
    assert_eq!(vmm.wait_exit().code(), Some(EXIT_GUEST_RESET));
    verify_blkcheck_disk(&disk.image, BLOCKS, ROUNDS * BLOCKS)
        .unwrap_or_else(|e| panic!("disk after the run: {e}"));
}

/// A planned suspend (SIGTERM on an NV VM) stops the rings like a power failure; the same
/// backend process, which only saw its front-end go, serves the recovered VM.
#[test]
fn a_planned_suspend_resumes_on_the_same_backend_process() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let (region, disk, mut vmm) = running_vm(dir.path(), Backend::Ours);
    let stderr = vmm.signal_and_expect_exit(libc::SIGTERM, 0, "planned suspend");
    assert!(
        stderr.contains("planned-suspend save committed"),
        "{stderr}"
    );
    let completed = last_completed_seq(&vmm.serial_log());
    verify_blkcheck_disk(&disk.image, BLOCKS, completed)
        .unwrap_or_else(|e| panic!("disk after the suspend: {e}"));
    let mut vmm = recover(dir.path(), "resumed", &region, &disk);
    finishes_in_place(&mut vmm, &disk, completed);
    assert_eq!(disk.starts, 1, "the backend was not restarted");
}

/// `vm.snapshot` of an NV VM with a vhost-user disk restored into a new VMM (`--restore`): the
/// restored VM is an ordinary one whose RAM is copied in, so it must be shared RAM with a file
/// descriptor (a memfd) for the backend's SET_MEM_TABLE; the same backend process, which saw the
/// first VMM go, serves the rings from the saved positions and the guest goes on without a reset.
#[test]
fn a_snapshot_restores_into_a_new_vmm_on_the_same_backend() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let (snapshot, api, disk, mut vmm) = running_vm_with_api(dir.path());
    wait_for_progress(&mut vmm, 5 * BLOCKS);
    let call = |method: &str, op: &str, body: &str| {
        let (status, answer) = api_client::request(&api, method, op, body, TIMEOUT);
        assert!(status == 204 || status == 200, "{op}: {status} {answer}");
    };
    call("PUT", "vm.pause", "");
    let destination = format!("{{\"destination_url\":\"file://{}\"}}", snapshot.display());
    call("PUT", "vm.snapshot", &destination);
    let paused = last_completed_seq(&vmm.serial_log());
    // The first VMM dies paused: nothing after the snapshot reaches the disk.
    vmm.kill();
    verify_blkcheck_disk(&disk.image, BLOCKS, paused)
        .unwrap_or_else(|e| panic!("disk at the snapshot: {e}"));

    let mut restored =
        VmmProcess::spawn_restore(dir.path(), "restored", &snapshot).with_timeout(TIMEOUT);
    // Not an NV VM any more: its reset ends the VMM with 0.
    finishes_in_place_exiting(&mut restored, &disk, paused, 0);
    assert_eq!(disk.starts, 1, "the backend was not restarted");
}

/// A VM that is not NV, on `--memory shared=on` without a file, serves a vhost-user disk: its
/// RAM is a memfd the backend maps (anonymous shared memory has no descriptor to send).
#[test]
fn shared_ram_without_a_file_serves_a_vhost_user_disk() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let mut disk = Disk::new(dir.path(), Backend::Ours);
    disk.start();
    let mut arguments = guest_arguments(
        "blkcheck",
        &format!("blocks={BLOCKS} rounds=20 exit=reset"),
        "32M,shared=on",
    );
    arguments.extend(["--disk".to_string(), disk.option()]);
    let mut vmm = VmmProcess::spawn_with_serial_file(dir.path(), "boot", &arguments, &[])
        .with_timeout(TIMEOUT);
    finishes_ok(&mut vmm);
    // Not an NV VM: its reset ends the VMM with 0.
    assert_eq!(vmm.wait_exit().code(), Some(0));
    verify_blkcheck_disk(&disk.image, BLOCKS, 20 * BLOCKS)
        .unwrap_or_else(|e| panic!("disk after the run: {e}"));
}
