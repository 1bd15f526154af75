//! virtio-fs end to end on KVM: the fscheck guest drives a `--fs tag=,socket=` device served
//! by virtiofsd as a FUSE client (INIT, LOOKUP, OPEN, READ of a file the test put in the shared
//! directory, CREATE and WRITE of a file the test then reads on the host), through a pause,
//! snapshot and resume of its VM, and across a power failure of an NV VM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::api_client;
use integration_tests::harness::{guest_arguments, scratch_dir};
use integration_tests::process::{Stdout, VmmProcess};
use vmm::nv::EXIT_POWER_FAIL_SAVED;
use vmm::vmm::EXIT_GUEST_RESET;

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

fn fscheck_arguments(lines: u64, pace_us: u64, memory: &str) -> Vec<String> {
    guest_arguments(
        "fscheck",
        &format!("expect={INPUT} lines={lines} report=10 pace_us={pace_us} exit=reset"),
        memory,
    )
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
    let log = vmm.wait_serial("fscheck to finish", |log| {
        log.contains("fscheck: done") || log.contains("FAIL")
    });
    assert!(
        log.contains("fscheck: done ok"),
        "{log}\n{}",
        vmm.stderr_tail(30)
    );
    log
}

/// A VM on `--memory shared=on` (a memfd): the guest reads the file the test put there (the
/// backend's content reached guest RAM), writes 100 lines the host then finds, and reads them
/// back. A pause, a snapshot and a resume in the middle stop the rings with GET_VRING_BASE and
/// start them again on the same virtiofsd: the guest's FUSE session goes on.
#[test]
fn a_guest_reads_and_writes_the_shared_directory_across_pause_snapshot_resume() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let mut fs = SharedDir::new(dir.path());
    fs.start();
    let api = dir.path().join("api.sock");
    let snapshot = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot).expect("snapshot directory");
    let mut arguments = fscheck_arguments(100, 20_000, "32M,shared=on");
    arguments.extend(["--fs".to_string(), fs.option()]);
    arguments.extend([
        "--api-socket".to_string(),
        format!("path={}", api.display()),
    ]);
    let mut vmm = VmmProcess::spawn_with_serial_file(dir.path(), "boot", &arguments, &[])
        .with_timeout(TIMEOUT);
    vmm.wait_for_socket(&api, TIMEOUT);
    wait_written(&mut vmm, 20);
    let call = |method: &str, op: &str, body: &str| {
        let (status, answer) = api_client::request(&api, method, op, body, TIMEOUT);
        assert!(status == 204 || status == 200, "{op}: {status} {answer}");
        answer
    };
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
