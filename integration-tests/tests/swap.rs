//! Swapping persistent VMs out of their NV region to a file and back, end to end: the
//! `cloud-hypervisor` binary runs the counter guest on a region under /dev/shm, `vm.nv-swap-out`
//! (API and `ch-remote nv-persist swap-out`) moves it to a file while another VM of the region
//! keeps running, and `--nv ...,swap-in=FILE` or `vm.nv-swap-in` brings it back, the guest
//! continuing exactly where it was. Bad swap files and destinations are refused with the VM left
//! as it was, and a crash at every swap fault point (nv-extension's `SWAP_FAULT_POINTS`, built in
//! by the `fault-injection` feature the test binaries have) leaves the VM resident or swapped out
//! with a complete file: never neither. Real KVM; never skipped silently.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use integration_tests::api_client;
use integration_tests::binaries;
use integration_tests::harness::{
    counter_lines, guest_arguments, read_events, scratch_dir, wait_for_continuation,
};
use integration_tests::openapi;
use integration_tests::process::VmmProcess;
use nv_extension::{fault_injection, inspect_swap_file, OpenOptions, Region, SWAP_FAULT_POINTS};

/// Guest RAM of the quick runs.
const SMALL_RAM: &str = "32M";
const TIMEOUT: Duration = Duration::from_secs(30);

/// A VM of a region and where its serial logs and sockets go.
struct TestVm<'a> {
    dir: &'a Path,
    region: PathBuf,
    name: String,
    /// The last counter the guest printed before it last stopped: the next run continues above it.
    last_counter: Option<u64>,
    runs: usize,
}

/// How a run starts the VM.
enum Start<'a> {
    /// Cold boot (`create=on`) of the counter guest with `area_mb` MiB of memory kept changing,
    /// in `ram` of RAM.
    Boot { area_mb: u32, ram: &'a str },
    /// `--nv ...,recover=on`.
    Recover,
    /// `--nv ...,swap-in=FILE` (`keep=on` with `keep`).
    SwapIn { file: &'a Path, keep: bool },
}

impl<'a> TestVm<'a> {
    fn new(dir: &'a Path, region: &Path, name: &str) -> Self {
        TestVm {
            dir,
            region: region.to_path_buf(),
            name: name.to_string(),
            last_counter: None,
            runs: 0,
        }
    }

    fn nv(&self, extra: &str) -> String {
        format!("region={},vm={}{extra}", self.region.display(), self.name)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join(format!("{}-{}.sock", self.name, self.runs))
    }

    /// The arguments of a new run of this VM with an API socket (`self.socket()`), and its
    /// label (which counts the runs).
    fn arguments(&mut self, start: Start) -> (String, Vec<String>) {
        self.runs += 1;
        let mut arguments = match start {
            Start::Boot { area_mb, ram } => {
                let mut arguments = guest_arguments("counter", &format!("area_mb={area_mb}"), ram);
                arguments.extend(["--nv".into(), self.nv(",create=on")]);
                arguments
            }
            Start::Recover => vec!["--nv".into(), self.nv(",recover=on")],
            Start::SwapIn { file, keep } => vec![
                "--nv".into(),
                self.nv(&format!(
                    ",swap-in={}{}",
                    file.display(),
                    if keep { ",keep=on" } else { "" }
                )),
            ],
        };
        arguments.extend([
            "--api-socket".into(),
            format!("path={}", self.socket().display()),
        ]);
        (format!("{}-{}", self.name, self.runs), arguments)
    }

    /// Starts a VMM for this VM (`arguments`) with `env`.
    fn spawn(&mut self, start: Start, env: &[(&str, &str)]) -> VmmProcess {
        let (label, arguments) = self.arguments(start);
        VmmProcess::spawn_with_serial_file(self.dir, &label, &arguments, env).with_timeout(TIMEOUT)
    }

    /// `--nv ...,swap-in=FILE` that must be refused: exit 1 with `reason` on stderr.
    fn refused_swap_in(&mut self, file: &Path, reason: &str) {
        let mut refused = self.spawn(Start::SwapIn { file, keep: false }, &[]);
        let stderr = refused.expect_exit(1, "a refused swap-in");
        assert!(stderr.contains(reason), "{}: {stderr}", file.display());
    }

    /// Starts an empty VMM (no VM, an API socket: `self.socket()`) for a `vm.nv-swap-in`, once
    /// it serves.
    fn empty_vmm(&mut self) -> VmmProcess {
        self.runs += 1;
        let socket = self.socket();
        let label = format!("{}-{}", self.name, self.runs);
        let arguments = ["--api-socket".into(), format!("path={}", socket.display())];
        let mut vmm = VmmProcess::spawn(self.dir, &label, &arguments, &[]).with_timeout(TIMEOUT);
        vmm.wait_for_socket(&socket, TIMEOUT);
        vmm
    }

    /// Cold-boots the VM (`Start::Boot`) without extra environment and waits until it runs.
    fn boot(&mut self, area_mb: u32, ram: &str) -> VmmProcess {
        self.run(Start::Boot { area_mb, ram }, &[])
    }

    /// Starts the VM and waits until it runs: a first counter line above the last one before it
    /// stopped (no new boot), and the API socket serving.
    fn run(&mut self, start: Start, env: &[(&str, &str)]) -> VmmProcess {
        let mut vmm = self.spawn(start, env);
        self.wait_running(&mut vmm);
        vmm
    }

    /// Waits for `vmm` (started by `spawn`) to run this VM on from where it stopped.
    fn wait_running(&mut self, vmm: &mut VmmProcess) {
        let log = vmm.wait_serial("a counter line", |log| !counter_lines(log).is_empty());
        if let Some(before) = self.last_counter {
            assert!(
                !log.contains("counter: boot"),
                "{}: the guest booted again instead of continuing:\n{log}",
                self.name
            );
            let first = counter_lines(&log)[0].counter;
            assert!(
                first > before,
                "{}: the counter did not continue: {first} after {before}",
                self.name
            );
        }
        assert!(counter_lines(&log).iter().all(|line| line.ok), "{log}");
        vmm.wait_for_socket(&self.socket(), TIMEOUT);
    }

    /// Notes the last counter `vmm` printed (it has stopped, or is paused for good).
    fn stopped(&mut self, vmm: &VmmProcess) {
        if let Some(line) = counter_lines(&vmm.serial_log()).last() {
            self.last_counter = Some(line.counter);
        }
    }

    /// Where the region says the VM is; fails the test if it is neither resident with a
    /// committed save nor swapped out to a complete swap file.
    fn place(&self) -> Place {
        place_of(&self.region, &self.name)
    }
}

/// Where a stopped VM is.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    /// In its region with a committed save (`recover=on` resumes it).
    Resident,
    /// In this swap file, complete (its header names the VM and the seq the region recorded).
    SwappedOut(PathBuf),
}

fn open_read_only(region: &Path) -> Region {
    let read_only = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    Region::open(region, &read_only).expect("opening the region")
}

/// The one word the region's listing shows for the VM (`running`, `swapped-out`, ...).
fn status_of(region: &Path, name: &str) -> &'static str {
    open_read_only(region).vm(name).unwrap().status()
}

fn place_of(region: &Path, name: &str) -> Place {
    let region = open_read_only(region);
    let summary = region
        .vm(name)
        .unwrap_or_else(|e| panic!("VM {name} LOST: {e}"));
    match &summary.swap {
        Some(record) => {
            let file = inspect_swap_file(&record.path).unwrap_or_else(|e| {
                panic!(
                    "VM {name} LOST: swapped out to {} which is not a swap file: {e}",
                    record.path.display()
                )
            });
            assert_eq!(file.vm_name, name);
            assert_eq!(file.file_size, record.file_size);
            assert_eq!(Some(file.seq), summary.last_save_seq);
            Place::SwappedOut(record.path.clone())
        }
        None => {
            region
                .inspect_recovery(name)
                .unwrap_or_else(|e| panic!("VM {name} LOST: resident without a save: {e}"));
            Place::Resident
        }
    }
}

/// One API request; `None` when the VMM closed the connection without an answer (it died).
/// Every answer must be one `docs/openapi.yaml` lists, with its bodies as it describes them.
fn api(socket: &Path, method: &str, op: &str, body: &str) -> Option<api_client::Answer> {
    let mut connection = ::api_client::Connection::open(socket, TIMEOUT)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
    connection
        .send(&api_client::request_bytes(method, op, body))
        .expect("sending the request");
    let answer = connection.read_answer().ok().flatten()?;
    let request_body = (!body.is_empty()).then_some(body);
    openapi::check_exchange(
        method,
        op,
        request_body,
        answer.status,
        answer.body.as_bytes(),
    )
    .unwrap_or_else(|error| panic!("{error}: {}", answer.body));
    if answer.status >= 400 {
        openapi::check_error_status(method, op, answer.status)
            .unwrap_or_else(|error| panic!("{error}: {}", answer.body));
    }
    Some(answer)
}

fn swap_out_body(file: &Path) -> String {
    serde_json::json!({ "destination_url": format!("file://{}", file.display()) }).to_string()
}

fn ch_remote(socket: &Path, arguments: &[&str]) -> Output {
    Command::new(binaries::ch_remote())
        .arg("--api-socket")
        .arg(socket)
        .args(arguments)
        .output()
        .expect("running ch-remote")
}

/// `ch-remote nv-persist list --region` (no socket) shows VM "a" swapped out to `file`, and "b"
/// running without a swap file.
fn listing_names_the_swap_file(region: &Path, file: &Path) {
    let output = Command::new(binaries::ch_remote())
        .args(["nv-persist", "list", "--region"])
        .arg(region)
        .output()
        .expect("running ch-remote");
    assert!(output.status.success(), "{}", text(&output));
    let listing: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("the listing is JSON");
    let vm = |name: &str| {
        listing["vms"]
            .as_array()
            .and_then(|vms| vms.iter().find(|vm| vm["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no VM {name} in {listing}"))
    };
    let a = vm("a");
    assert_eq!(a["state"], "swapped-out", "{a}");
    assert_eq!(a["swap_file"]["path"], file.display().to_string(), "{a}");
    let size = std::fs::metadata(file).expect("the swap file").len();
    assert_eq!(a["swap_file"]["file_size"], size, "{a}");
    let b = vm("b");
    assert_eq!(b["state"], "running", "{b}");
    assert!(b.get("swap_file").is_none(), "{b}");
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `vm.nv-swap-out` to `file` through `ch-remote nv-persist swap-out --path`: answered 204, then
/// the VMM exits 0 and the VM is swapped out to `file`.
fn swap_out_with_ch_remote(vm: &mut TestVm, vmm: &mut VmmProcess, file: &Path) {
    let output = ch_remote(
        &vm.socket(),
        &[
            "nv-persist",
            "swap-out",
            "--path",
            &file.display().to_string(),
        ],
    );
    assert!(output.status.success(), "{}", text(&output));
    let stderr = vmm.expect_exit(0, "exit after the swap-out");
    assert!(stderr.contains("swapped out to"), "{stderr}");
    vm.stopped(vmm);
    assert_eq!(vm.place(), Place::SwappedOut(file.to_path_buf()));
}

/// `vm.nv-swap-out` to `file` over the API: answered 204, then the VMM exits 0.
fn swap_out_with_api(vm: &mut TestVm, vmm: &mut VmmProcess, file: &Path) {
    let answer = api(&vm.socket(), "PUT", "vm.nv-swap-out", &swap_out_body(file))
        .expect("an answer to vm.nv-swap-out");
    assert_eq!(answer.status, 204, "{}", answer.body);
    vmm.expect_exit(0, "exit after the swap-out");
    vm.stopped(vmm);
    assert_eq!(vm.place(), Place::SwappedOut(file.to_path_buf()));
}

/// Ends a run cleanly with a planned suspend (SIGTERM, exit 0).
fn suspend(vm: &mut TestVm, vmm: &mut VmmProcess) {
    vmm.signal_and_expect_exit(libc::SIGTERM, 0, "SIGTERM");
    vm.stopped(vmm);
    assert_eq!(vm.place(), Place::Resident);
}

/// Asserts the counter of `vmm` (running) advances: `lines` more lines after `log_so_far`.
fn keeps_running(vmm: &mut VmmProcess, lines: usize) {
    let before = counter_lines(&vmm.serial_log()).len();
    vmm.wait_serial("the counter advancing", |log| {
        counter_lines(log).len() >= before + lines
    });
}

#[test]
fn swap_out_while_another_vm_runs_then_swap_in_continues_exactly() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let region = dir.path().join("region");
    let events = dir.path().join("events.json");
    let mut a = TestVm::new(dir.path(), &region, "a");
    let mut b = TestVm::new(dir.path(), &region, "b");
    let mut vmm_b = b.boot(1, SMALL_RAM);
    let mut vmm_a = a.spawn(
        Start::Boot {
            area_mb: 2,
            ram: SMALL_RAM,
        },
        &[],
    );
    a.wait_running(&mut vmm_a);

    // ch-remote swap-out of "a" while "b" runs on in the same region.
    let file = dir.path().join("a.nvswap");
    swap_out_with_ch_remote(&mut a, &mut vmm_a, &file);
    keeps_running(&mut vmm_b, 2);
    assert_eq!(status_of(&region, "a"), "swapped-out");
    listing_names_the_swap_file(&region, &file);

    // Back with --nv swap-in=FILE, with an event monitor: the file goes once it is resident.
    let (label, mut arguments) = a.arguments(Start::SwapIn {
        file: &file,
        keep: false,
    });
    arguments.extend([
        "--event-monitor".into(),
        format!("path={}", events.display()),
    ]);
    let mut vmm_a = VmmProcess::spawn_with_serial_file(dir.path(), &label, &arguments, &[])
        .with_timeout(TIMEOUT);
    a.wait_running(&mut vmm_a);
    assert!(!file.exists(), "the swap file stays after the swap-in");
    let swap_events: Vec<String> = read_events(&events)
        .iter()
        .filter(|event| event["source"] == "nv")
        .filter_map(|event| event["event"].as_str().map(str::to_string))
        .filter(|name| name.starts_with("swap-"))
        .collect();
    assert_eq!(
        swap_events.first().map(String::as_str),
        Some("swap-in-started"),
        "{swap_events:?}"
    );
    assert!(
        swap_events.contains(&"swap-progress".to_string()),
        "{swap_events:?}"
    );
    assert_eq!(
        swap_events.last().map(String::as_str),
        Some("swap-in-committed"),
        "{swap_events:?}"
    );
    // vm.nv-status of the swapped-in VM: no swap in progress any more.
    let status = api(&a.socket(), "GET", "vm.nv-status", "").unwrap();
    assert_eq!(status.status, 200);
    let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(status["shutdown_kind"], "SwappedOut", "{status}");
    assert!(status.get("swap").is_none(), "{status}");

    // Out over the API, back with vm.nv-swap-in (ch-remote, --keep) into an empty VMM.
    swap_out_with_api(&mut a, &mut vmm_a, &file);
    keeps_running(&mut vmm_b, 2);
    let mut empty = a.empty_vmm();
    let empty_socket = a.socket();
    let output = ch_remote(
        &empty_socket,
        &[
            "nv-persist",
            "swap-in",
            "--path",
            &file.display().to_string(),
            "--keep",
        ],
    );
    assert!(output.status.success(), "{}", text(&output));
    // Its serial port is the stored config's: the first run's file, written afresh.
    let serial = dir.path().join("a-1.serial");
    wait_for_continuation(&serial, a.last_counter.unwrap(), TIMEOUT);
    assert!(file.exists(), "--keep removed the swap file");
    assert_eq!(status_of(&region, "a"), "running");

    // The kept file names a VM that is resident again: refused, nothing changes.
    let refused = ch_remote(
        &empty_socket,
        &[
            "nv-persist",
            "swap-in",
            "--path",
            &file.display().to_string(),
        ],
    );
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    keeps_running(&mut vmm_b, 1);
    empty.signal_and_expect_exit(libc::SIGTERM, 0, "SIGTERM");
    suspend(&mut b, &mut vmm_b);
}

/// A swap-out shows its progress while it runs: `vm.nv-status` answers with bytes done below
/// the total, and the event monitor gets `swap-progress` events that climb to the total between
/// `swap-out-started` and `swap-out-committed`. The test build reads `NV_SWAP_OUT_PAUSE_MS`
/// (feature `fault-injection` only): the swap-out waits 150 ms after each 2 MiB chunk, 16
/// chunks of a 32 MiB VM, so the progress is seen without a race against the disk.
#[test]
fn a_swap_out_shows_its_progress_in_the_status_and_as_events() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let region = dir.path().join("region");
    let events = dir.path().join("events.json");
    let mut vm = TestVm::new(dir.path(), &region, "p");
    let (label, mut arguments) = vm.arguments(Start::Boot {
        area_mb: 2,
        ram: SMALL_RAM,
    });
    arguments.extend([
        "--event-monitor".into(),
        format!("path={}", events.display()),
    ]);
    let env = [(fault_injection::SWAP_OUT_PAUSE_VAR, "150")];
    let mut vmm = VmmProcess::spawn_with_serial_file(dir.path(), &label, &arguments, &env)
        .with_timeout(TIMEOUT);
    vm.wait_running(&mut vmm);
    let file = dir.path().join("p.nvswap");
    let socket = vm.socket();
    let swap_out = std::thread::spawn({
        let (socket, body) = (socket.clone(), swap_out_body(&file));
        move || api(&socket, "PUT", "vm.nv-swap-out", &body).map(|answer| answer.status)
    });
    let total = 32u64 << 20;
    let deadline = Instant::now() + TIMEOUT;
    let done = loop {
        let answer = api(&socket, "GET", "vm.nv-status", "")
            .expect("vm.nv-status answers while the swap-out runs");
        assert_eq!(answer.status, 200, "{}", answer.body);
        let status: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        if let Some(swap) = status.get("swap") {
            assert_eq!(swap["direction"], "out", "{status}");
            assert_eq!(swap["total_bytes"], total, "{status}");
            let done = swap["done_bytes"].as_u64().unwrap();
            if done > 0 && done < total {
                break done;
            }
        }
        assert!(Instant::now() < deadline, "no progress seen: {status}");
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("vm.nv-status during the swap-out: {done} of {total} bytes");
    assert_eq!(swap_out.join().unwrap(), Some(204));
    vmm.expect_exit(0, "exit after the swap-out");
    vm.stopped(&vmm);
    assert_eq!(vm.place(), Place::SwappedOut(file.clone()));

    let swap_events: Vec<serde_json::Value> = read_events(&events)
        .into_iter()
        .filter(|event| event["source"] == "nv")
        .filter(|event| {
            event["event"]
                .as_str()
                .is_some_and(|e| e.starts_with("swap-"))
        })
        .collect();
    let names: Vec<&str> = swap_events
        .iter()
        .filter_map(|event| event["event"].as_str())
        .collect();
    assert_eq!(names.first(), Some(&"swap-out-started"), "{names:?}");
    assert_eq!(names.last(), Some(&"swap-out-committed"), "{names:?}");
    let progress: Vec<(u64, u64)> = swap_events
        .iter()
        .filter(|event| event["event"] == "swap-progress")
        .map(|event| {
            let number = |key: &str| event["properties"][key].as_str().unwrap().parse().unwrap();
            (number("done_bytes"), number("total_bytes"))
        })
        .collect();
    assert!(
        progress.iter().filter(|(d, t)| *d > 0 && d < t).count() >= 2,
        "{progress:?}"
    );
    assert!(
        progress.windows(2).all(|w| w[0].0 <= w[1].0),
        "{progress:?}"
    );
    assert!(progress.iter().all(|(_, t)| *t == total), "{progress:?}");
    assert_eq!(progress.last(), Some(&(total, total)), "{progress:?}");

    // Back in, with no pause: the guest continues.
    let mut vmm = vm.run(
        Start::SwapIn {
            file: &file,
            keep: false,
        },
        &[],
    );
    suspend(&mut vm, &mut vmm);
}

/// A VM with much more RAM than it touches writes a small file: never-touched and all-zero
/// pages are not written. 512 MiB of RAM, 4 MiB kept changing (plus the guest's own pages).
#[test]
fn a_swap_file_is_proportional_to_the_memory_the_guest_touched() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let region = dir.path().join("region");
    let mut vm = TestVm::new(dir.path(), &region, "sparse");
    let mut vmm = vm.boot(4, "512M");
    let file = dir.path().join("sparse.nvswap");
    swap_out_with_api(&mut vm, &mut vmm, &file);
    let size = std::fs::metadata(&file).unwrap().len();
    println!(
        "swap file of a 512 MiB VM that touched about 4 MiB: {size} bytes ({:.1} MiB)",
        size as f64 / f64::from(1 << 20)
    );
    assert!(
        size >= 4 << 20,
        "the touched memory is missing: {size} bytes"
    );
    assert!(size < 8 << 20, "the file is not sparse: {size} bytes");
    // Back over the API (vm.nv-swap-in into an empty VMM): the file goes once it is resident.
    let mut vmm = vm.empty_vmm();
    let socket = vm.socket();
    let body = serde_json::json!({ "source_url": format!("file://{}", file.display()) });
    let answer = api(&socket, "PUT", "vm.nv-swap-in", &body.to_string()).unwrap();
    assert_eq!(answer.status, 204, "{}", answer.body);
    wait_for_continuation(
        &dir.path().join("sparse-1.serial"),
        vm.last_counter.unwrap(),
        TIMEOUT,
    );
    assert!(!file.exists(), "the swap file stays after the swap-in");
    vmm.signal_and_expect_exit(libc::SIGTERM, 0, "SIGTERM");
    assert_eq!(vm.place(), Place::Resident);
}

/// The files of `dir` whose names contain `part`, sorted.
fn files_with(dir: &Path, part: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.contains(part))
        .collect();
    names.sort();
    names
}

/// `cloud-hypervisor` run as `sh -c 'trap "" XFSZ; exec ...'`: SIGXFSZ ignored (kept across
/// exec), so a write past RLIMIT_FSIZE fails with EFBIG as one on a full file system fails
/// with ENOSPC, instead of killing the VMM.
fn spawn_ignoring_sigxfsz(vm: &mut TestVm, start: Start) -> VmmProcess {
    let (label, vmm_arguments) = vm.arguments(start);
    let serial = vm.dir.join(format!("{label}.serial"));
    let mut arguments = vec![
        "-c".to_string(),
        "trap '' XFSZ; exec \"$0\" \"$@\"".to_string(),
        binaries::cloud_hypervisor().display().to_string(),
    ];
    arguments.extend(vmm_arguments);
    arguments.extend(integration_tests::harness::serial_file_arguments(&serial));
    arguments.push("-v".into());
    let mut vmm = VmmProcess::start(
        Path::new("/bin/sh"),
        &arguments,
        &[],
        &vm.dir.join(format!("{label}.stderr")),
        integration_tests::process::Stdout::Null,
    )
    .expect("spawning the VMM under sh")
    .with_serial(serial)
    .with_timeout(TIMEOUT);
    vm.wait_running(&mut vmm);
    vmm
}

/// Caps the size of files `pid` writes (RLIMIT_FSIZE).
fn limit_file_size(pid: i32, bytes: u64) {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `limit` is a valid rlimit; a null old-limit pointer is allowed.
    let result = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(result, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Every bad input is refused with a clear error and changes nothing: an existing destination
/// (never overwritten, nothing paused), a destination on a full file system (the VM stays
/// resident and runs on), truncated, bit-flipped, foreign and future-version swap files, a swap
/// file of another region's VM, and a swap-in of a VM that is resident already. Through the
/// API and ch-remote, and through `--nv swap-in=`.
#[test]
fn bad_swap_inputs_are_refused_and_change_nothing() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let region = dir.path().join("region");
    let mut vm = TestVm::new(dir.path(), &region, "x");
    let mut vmm = vm.boot(2, SMALL_RAM);

    // An existing destination: refused before anything is paused, the file untouched.
    let existing = dir.path().join("existing.nvswap");
    std::fs::write(&existing, b"an operator's file").unwrap();
    let answer = api(
        &vm.socket(),
        "PUT",
        "vm.nv-swap-out",
        &swap_out_body(&existing),
    )
    .unwrap();
    assert_eq!(answer.status, 409, "{}", answer.body);
    assert!(answer.body.contains("exists already"), "{}", answer.body);
    assert_eq!(std::fs::read(&existing).unwrap(), b"an operator's file");
    let output = ch_remote(
        &vm.socket(),
        &[
            "nv-persist",
            "swap-out",
            "--path",
            &existing.display().to_string(),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("exists already"),
        "{}",
        text(&output)
    );
    keeps_running(&mut vmm, 2);
    let status = api(&vm.socket(), "GET", "vm.nv-status", "").unwrap();
    assert_eq!(status.status, 200, "{}", status.body);
    suspend(&mut vm, &mut vmm);

    // A full file system: the swap file cannot be completed; the VM is resumed and resident.
    let mut vmm = spawn_ignoring_sigxfsz(&mut vm, Start::Recover);
    limit_file_size(vmm.pid(), 1 << 20);
    let full = dir.path().join("full.nvswap");
    let answer = api(&vm.socket(), "PUT", "vm.nv-swap-out", &swap_out_body(&full)).unwrap();
    assert_eq!(answer.status, 500, "{}", answer.body);
    assert!(answer.body.contains("File too large"), "{}", answer.body);
    assert!(!full.exists());
    assert_eq!(files_with(dir.path(), ".partial"), Vec::<String>::new());
    keeps_running(&mut vmm, 2);
    limit_file_size(vmm.pid(), libc::RLIM_INFINITY);
    // The same VMM swaps out once there is room.
    let good = dir.path().join("good.nvswap");
    swap_out_with_api(&mut vm, &mut vmm, &good);
    let good_bytes = std::fs::read(&good).unwrap();

    // Damaged and foreign swap files, and the good one into another region.
    let mut bad_files: Vec<(PathBuf, &str)> = Vec::new();
    let mut write_bad = |name: &str, bytes: &[u8], reason: &'static str| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        bad_files.push((path, reason));
    };
    write_bad(
        "truncated.nvswap",
        &good_bytes[..good_bytes.len() / 2],
        "truncated",
    );
    let mut flipped = good_bytes.clone();
    flipped[good_bytes.len() / 2] ^= 0x10;
    write_bad("flipped.nvswap", &flipped, "checksum mismatch");
    write_bad(
        "foreign.nvswap",
        b"#!/bin/sh\necho not a swap file\n",
        "not a swap file",
    );
    // Version 2 with an intact header (its CRC32C at byte 124 covers bytes 0..124).
    let mut future = good_bytes.clone();
    future[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32c::crc32c(&future[..124]);
    future[124..128].copy_from_slice(&crc.to_le_bytes());
    write_bad("future.nvswap", &future, "version 2 is not supported");
    for (file, reason) in &bad_files {
        vm.refused_swap_in(file, reason);
        assert_eq!(vm.place(), Place::SwappedOut(good.clone()));
    }
    // Another region with a VM of the same name: the file is not its VM's.
    let other_region = dir.path().join("other-region");
    let mut other = TestVm::new(dir.path(), &other_region, "x");
    let mut other_vmm = other.boot(1, SMALL_RAM);
    suspend(&mut other, &mut other_vmm);
    other.refused_swap_in(&good, "another region");
    assert_eq!(other.place(), Place::Resident);

    // The same refusals over the API leave the empty VMM empty: it then takes the good file.
    let mut empty = vm.empty_vmm();
    let socket = vm.socket();
    for (file, reason) in &bad_files {
        let body = serde_json::json!({ "source_url": format!("file://{}", file.display()) });
        let answer = api(&socket, "PUT", "vm.nv-swap-in", &body.to_string()).unwrap();
        assert_eq!(answer.status, 400, "{}: {}", file.display(), answer.body);
        assert!(answer.body.contains(reason), "{}", answer.body);
    }
    let body = serde_json::json!({
        "source_url": format!("file://{}", good.display()),
        "region": other_region.display().to_string(),
    });
    let answer = api(&socket, "PUT", "vm.nv-swap-in", &body.to_string()).unwrap();
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(answer.body.contains("another region"), "{}", answer.body);
    assert_eq!(api(&socket, "GET", "vm.info", "").unwrap().status, 404);
    assert_eq!(std::fs::read(&good).unwrap(), good_bytes);
    assert_eq!(vm.place(), Place::SwappedOut(good.clone()));
    let body = serde_json::json!({
        "source_url": format!("file://{}", good.display()),
        "keep": true,
    });
    let answer = api(&socket, "PUT", "vm.nv-swap-in", &body.to_string()).unwrap();
    assert_eq!(answer.status, 204, "{}", answer.body);
    // The stored config's serial file (the first run's), written afresh.
    wait_for_continuation(
        &dir.path().join("x-1.serial"),
        vm.last_counter.unwrap(),
        TIMEOUT,
    );
    assert!(good.exists(), "keep: the file stays");

    // Resident already: the kept file is refused, over the command line too.
    vm.refused_swap_in(&good, "resident in the NV region already");
    empty.signal_and_expect_exit(libc::SIGTERM, 0, "SIGTERM");
    assert_eq!(vm.place(), Place::Resident);
}

/// Fault runs per chain; two chains (two VMs of one region) run side by side.
const FAULT_RUNS_PER_CHAIN: usize = 100;

/// What the fault runs of one chain saw.
#[derive(Debug, Default)]
struct FaultTally {
    runs: usize,
    /// After the crash: resident, swapped out, or both (resident with a leftover file).
    resident: usize,
    swapped_out: usize,
    both: usize,
    /// Partial files (`DEST.partial-*`) a crash left behind.
    partial_files: usize,
    /// Runs whose fault point was not reached (the operation completed).
    completed: usize,
}

/// Expects `vmm` to die at its fault point (SIGABRT); a run that completes is counted.
fn died_at_fault(vmm: &mut VmmProcess, point: &str) -> bool {
    let status = vmm.wait_exit();
    match status.signal() {
        Some(libc::SIGABRT) => {
            let stderr = vmm.stderr_log();
            assert!(
                stderr.contains("injecting a power failure") && stderr.contains(point),
                "fault point {point}: SIGABRT but not the injected crash:\n{stderr}"
            );
            true
        }
        _ => {
            assert!(
                status.success(),
                "fault point {point}: neither the injected crash nor success: {status:?}\n{}",
                vmm.stderr_tail(20)
            );
            false
        }
    }
}

/// One chain: the VM `name` goes through `runs` crashes, at the swap fault points in turn
/// (starting at `offset`). Each run starts a VMM with `NV_FAULT_AFTER_PHASE=<point>`: for a
/// swap-out point it resumes the VM (recover or swap-in, checking the counter continues) and
/// swaps it out; for a swap-in point it swaps the VM in (after a clean swap-out if it was
/// resident). After each crash the VM must be resident with a committed save or swapped out with
/// a complete file; the next run brings it back and checks that the guest continued.
fn fault_chain(dir: &Path, region: &Path, name: &str, offset: usize, runs: usize) -> FaultTally {
    let mut vm = TestVm::new(dir, region, name);
    let mut tally = FaultTally::default();
    let mut vmm = vm.boot(1, "8M");
    suspend(&mut vm, &mut vmm);
    let mut place = Place::Resident;
    let mut leftover: Option<PathBuf> = None;
    for run in 0..runs {
        let point = SWAP_FAULT_POINTS[(offset + run) % SWAP_FAULT_POINTS.len()];
        let env = [(fault_injection::ENV_VAR, point)];
        let file = dir.join(format!("{name}-{run}.nvswap"));
        let resume = |vm: &mut TestVm, place: &Place, env: &[(&str, &str)]| match place {
            Place::Resident => vm.run(Start::Recover, env),
            Place::SwappedOut(file) => vm.run(Start::SwapIn { file, keep: false }, env),
        };
        let crashed = if point.starts_with("swap-out-") {
            let mut vmm = resume(&mut vm, &place, &env);
            vm.stopped(&vmm);
            let answer = api(&vm.socket(), "PUT", "vm.nv-swap-out", &swap_out_body(&file));
            let crashed = died_at_fault(&mut vmm, point);
            if !crashed {
                assert_eq!(answer.map(|a| a.status), Some(204), "{point}");
            }
            vm.stopped(&vmm);
            crashed
        } else {
            let source = match &place {
                Place::SwappedOut(source) => source.clone(),
                Place::Resident => {
                    // A clean swap-out first (the swap-in point is not on its path).
                    let mut vmm = vm.run(Start::Recover, &env);
                    swap_out_with_api(&mut vm, &mut vmm, &file);
                    file.clone()
                }
            };
            let mut vmm = vm.spawn(
                Start::SwapIn {
                    file: &source,
                    keep: false,
                },
                &env,
            );
            let crashed = died_at_fault(&mut vmm, point);
            vm.stopped(&vmm);
            crashed
        };
        tally.runs += 1;
        if !crashed {
            tally.completed += 1;
        }
        place = vm.place();
        let partial = files_with(dir, &format!("{name}-{run}.nvswap.partial"));
        tally.partial_files += partial.len();
        for name in partial {
            std::fs::remove_file(dir.join(name)).unwrap();
        }
        match &place {
            Place::Resident => {
                // A swap-in that committed before it could remove its file leaves both.
                let stale = std::fs::read_dir(dir)
                    .unwrap()
                    .filter_map(|entry| entry.ok().map(|e| e.path()))
                    .find(|path| {
                        path.extension().is_some_and(|e| e == "nvswap")
                            && path
                                .file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(|n| n.starts_with(&format!("{name}-")))
                    });
                match stale {
                    Some(stale) => {
                        tally.both += 1;
                        leftover = Some(stale);
                    }
                    None => tally.resident += 1,
                }
            }
            Place::SwappedOut(_) => tally.swapped_out += 1,
        }
        // A leftover file of a VM resident again is refused, then deleted (the operator's job).
        if let (Place::Resident, Some(stale)) = (&place, leftover.take()) {
            vm.refused_swap_in(&stale, "resident in the NV region already");
            std::fs::remove_file(&stale).unwrap();
        }
    }
    // The last crash's survivor continues too.
    let mut vmm = match &place {
        Place::Resident => vm.run(Start::Recover, &[]),
        Place::SwappedOut(file) => vm.run(Start::SwapIn { file, keep: false }, &[]),
    };
    keeps_running(&mut vmm, 1);
    suspend(&mut vm, &mut vmm);
    tally
}

/// A crash at every swap fault point, over and over, never loses the VM: after each one it is
/// resident with a committed save or swapped out with a complete swap file, and the next run
/// brings it back with the guest continuing exactly. Two VMs of one region go through their
/// chains at the same time (2 x 100 runs).
#[test]
fn a_crash_at_any_swap_fault_point_never_loses_the_vm() {
    integration_tests::require_kvm!();
    assert!(SWAP_FAULT_POINTS.len() >= 8, "{SWAP_FAULT_POINTS:?}");
    let dir = scratch_dir();
    let region = dir.path().join("region");
    // The region exists before the chains share it.
    let mut first = TestVm::new(dir.path(), &region, "first");
    let mut vmm = first.boot(1, "8M");
    suspend(&mut first, &mut vmm);
    let started = Instant::now();
    let tallies: Vec<FaultTally> = std::thread::scope(|scope| {
        let chains: Vec<_> = [("f0", 0), ("f1", SWAP_FAULT_POINTS.len() / 2)]
            .into_iter()
            .map(|(name, offset)| {
                let (dir, region) = (dir.path(), &region);
                scope.spawn(move || fault_chain(dir, region, name, offset, FAULT_RUNS_PER_CHAIN))
            })
            .collect();
        chains
            .into_iter()
            .map(|chain| chain.join().unwrap())
            .collect()
    });
    let total = |field: fn(&FaultTally) -> usize| tallies.iter().map(field).sum::<usize>();
    println!(
        "swap fault runs: {} in {:.1} s over {} points; after the crash: {} resident, {} swapped \
         out, {} both (a leftover file, refused and deleted); {} partial files left; {} runs \
         completed without reaching their point; 0 VMs lost",
        total(|t| t.runs),
        started.elapsed().as_secs_f64(),
        SWAP_FAULT_POINTS.len(),
        total(|t| t.resident),
        total(|t| t.swapped_out),
        total(|t| t.both),
        total(|t| t.partial_files),
        total(|t| t.completed),
    );
    assert!(total(|t| t.runs) >= 200);
    assert_eq!(
        total(|t| t.completed),
        0,
        "every fault point must be reached"
    );
    assert!(total(|t| t.resident) > 0 && total(|t| t.swapped_out) > 0);
}

/// `vm.nv-status`'s `checkpoint` member of the VMM serving `socket` (null when checkpoints are
/// off).
fn checkpoint_status(socket: &Path) -> serde_json::Value {
    let status = api(socket, "GET", "vm.nv-status", "").expect("an answer to vm.nv-status");
    assert_eq!(status.status, 200, "{}", status.body);
    let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    status["checkpoint"].clone()
}

/// Waits until the VMM serving `socket` has committed epochs past `after` (checkpoints run).
fn epochs_advance(socket: &Path, after: u64) -> u64 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let checkpoint = checkpoint_status(socket);
        assert_eq!(checkpoint["interval_ms"], 10, "{checkpoint}");
        let epochs = checkpoint["epochs"].as_u64().unwrap_or(0);
        if epochs > after {
            // Each committed checkpoint ran the whole walk: every phase has a median, in order.
            let phases: Vec<&str> = checkpoint["recent_phase_median_us"]
                .as_array()
                .map(|phases| phases.iter().filter_map(|p| p["phase"].as_str()).collect())
                .unwrap_or_default();
            assert_eq!(
                phases,
                [
                    "pause-vcpus",
                    "quiesce-devices",
                    "persist-memory",
                    "save-state",
                    "commit",
                    "write-protect",
                    "resume"
                ],
                "{checkpoint}"
            );
            return epochs;
        }
        assert!(
            Instant::now() < deadline,
            "no epoch committed: {checkpoint}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 16's swap edge: a VM whose stored config has `checkpoint_ms=10` is swapped out and in
/// (`ch-remote nv-persist swap-out`, `--nv ...,swap-in=FILE`). After the swap-in its
/// checkpoints run again (the interval comes from the stored config; epochs commit), and a
/// SIGKILL after the swap-in is recovered by `recover=on` from an epoch: resumed, not refused,
/// the guest continuing with its checksums intact.
#[test]
fn a_checkpointed_vm_swapped_out_and_in_checkpoints_again_and_survives_a_sigkill() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let region = dir.path().join("region");
    let mut a = TestVm::new(dir.path(), &region, "a");
    a.runs += 1;
    let mut arguments = guest_arguments("counter", "area_mb=2", SMALL_RAM);
    arguments.extend([
        "--nv".into(),
        a.nv(",create=on,checkpoint_ms=10"),
        "--api-socket".into(),
        format!("path={}", a.socket().display()),
    ]);
    let mut vmm = VmmProcess::spawn_with_serial_file(dir.path(), "a-1", &arguments, &[])
        .with_timeout(TIMEOUT);
    a.wait_running(&mut vmm);
    epochs_advance(&a.socket(), 2);

    let file = dir.path().join("a.nvswap");
    swap_out_with_ch_remote(&mut a, &mut vmm, &file);
    // A rollback may land before the last line printed, never before the swap-out.
    let swapped_at = a.last_counter;
    let mut vmm = a.run(
        Start::SwapIn {
            file: &file,
            keep: false,
        },
        &[],
    );
    epochs_advance(&a.socket(), 2);
    keeps_running(&mut vmm, 2);

    vmm.signal(libc::SIGKILL);
    let status = vmm.wait_exit();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    a.last_counter = swapped_at;
    assert_eq!(status_of(&region, "a"), "checkpointed");
    let mut vmm = a.run(Start::Recover, &[]);
    let stderr = vmm.stderr_log();
    assert!(
        stderr.contains("resuming checkpoint state"),
        "not recovered from an epoch:\n{stderr}"
    );
    keeps_running(&mut vmm, 2);
    epochs_advance(&a.socket(), 2);
    suspend(&mut a, &mut vmm);
}
