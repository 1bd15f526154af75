//! The `cloud-hypervisor` command line as an operator meets it: exit codes (2 for usage errors, 1
//! for bad values and failures to start, as upstream), one clear stderr line naming the option,
//! never a panic.
//!
//! The binary is built on first use (`integration_tests::binaries`); `CLOUD_HYPERVISOR_BIN=/path`
//! tests that binary instead.
//!
//! The last tests boot the counter test guest on KVM through the command line, with the default
//! `--seccomp true`, so every filter the VMM installs is exercised on a running guest.

use std::path::Path;
use std::process::Child;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration_tests::api_client;
use integration_tests::binaries;
use integration_tests::harness::{
    assert_counter_advances, counter_lines, event_names, guest_cmdline, read_events, wait_for_log,
};
use integration_tests::process::VmmProcess;

/// Nothing here should take long; a hang is a failure, not a stuck CI job.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Boot is emulated ring-0 code here: a generous bound for the guest's first lines.
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(arguments: &[&str]) -> Run {
    let mut child = Command::new(binaries::cloud_hypervisor())
        .args(arguments)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning cloud-hypervisor");
    let started = Instant::now();
    while child
        .try_wait()
        .expect("waiting for cloud-hypervisor")
        .is_none()
    {
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            panic!("cloud-hypervisor {arguments:?} still running after {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("collecting output");
    let run = Run {
        code: status
            .code()
            .unwrap_or_else(|| panic!("cloud-hypervisor {arguments:?} killed: {status}")),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    assert!(
        !run.stderr.contains("panicked"),
        "cloud-hypervisor {arguments:?} panicked:\n{}",
        run.stderr
    );
    run
}

/// A failure to start: exit 1 and exactly one stderr line that contains every `needle`.
fn assert_start_failure(arguments: &[&str], needles: &[&str]) {
    let run = run(arguments);
    assert_eq!(run.code, 1, "{arguments:?}: stderr:\n{}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{arguments:?}: stderr:\n{}", run.stderr);
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "{arguments:?}: {needle:?} missing from {:?}",
            lines[0]
        );
    }
}

/// `assert_start_failure` of `prefix` followed by each case's arguments, with its needles.
fn assert_start_failures(prefix: &[&str], cases: &[(&[&str], &[&str])]) {
    for (arguments, needles) in cases {
        let mut command_line = prefix.to_vec();
        command_line.extend_from_slice(arguments);
        assert_start_failure(&command_line, needles);
    }
}

fn existing_file(dir: &tempfile::TempDir, name: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, b"").unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn unknown_option_is_a_usage_error() {
    let run = run(&["--frobnicate", "on"]);
    assert_eq!(run.code, 2, "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("--frobnicate"), "{}", run.stderr);
    assert!(run.stdout.is_empty());
}

#[test]
fn missing_value_and_bad_choice_are_usage_errors() {
    assert_eq!(run(&["--kernel"]).code, 2);
    let seccomp = run(&["--seccomp", "maybe"]);
    assert_eq!(seccomp.code, 2);
    assert!(seccomp.stderr.contains("maybe"), "{}", seccomp.stderr);
}

#[test]
fn bad_size_names_the_option_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = existing_file(&dir, "kernel");
    assert_start_failures(
        &["--kernel", &kernel],
        &[
            (&["--memory", "size=12Q"], &["--memory", "12Q", "size"]),
            (
                &[
                    "--memory",
                    "size=0",
                    "--memory-zone",
                    "id=mem0,size=1.5G,file=/tmp/x,shared=on",
                ],
                &["--memory-zone", "1.5G"],
            ),
        ],
    );
}

#[test]
fn missing_kernel_file_fails_to_start() {
    assert_start_failure(
        &["--kernel", "/nonexistent/vmlinux", "--memory", "size=64M"],
        &["--kernel", "/nonexistent/vmlinux", "No such file"],
    );
}

#[test]
fn bad_keys_and_values_name_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = existing_file(&dir, "kernel");
    assert_start_failures(
        &["--kernel", &kernel],
        &[
            (&["--cpus", "boot=0"], &["--cpus", "boot"]),
            (&["--disk", "path=/a.img,colour=red"], &["--disk", "colour"]),
            (
                &["--memory-zone", "id=mem0,size=64M"],
                &["--memory-zone", "size=0"],
            ),
            (&["--serial", "loud"], &["--serial", "loud"]),
            (&["--nv", "region=/r"], &["--nv", "vm="]),
            (
                &["--log-file", "/nonexistent/dir/log"],
                &["--log-file", "/nonexistent/dir/log"],
            ),
        ],
    );
    assert_start_failure(
        &["--event-monitor", "/tmp/events", "--kernel", &kernel],
        &["--event-monitor"],
    );
}

#[test]
fn version_names_us_and_upstream() {
    let run = run(&["--version"]);
    assert_eq!(run.code, 0);
    let expected = concat!("cloud-hypervisor v", env!("CARGO_PKG_VERSION"));
    assert!(run.stdout.starts_with(expected), "{}", run.stdout);
    assert!(run.stdout.contains("NV-Hypervisor"), "{}", run.stdout);
    assert!(
        run.stdout.contains("cloud-hypervisor v53"),
        "{}",
        run.stdout
    );
}

#[test]
fn help_lists_the_options() {
    let run = run(&["--help"]);
    assert_eq!(run.code, 0);
    for option in [
        "--kernel",
        "--cmdline",
        "--cpus",
        "--memory ",
        "--memory-zone",
        "--disk",
        "--serial",
        "--console",
        "--api-socket",
        "--event-monitor",
        "--restore",
        "--nv",
        "--log-file",
        "-v",
        "--seccomp",
        "--version",
    ] {
        assert!(
            run.stdout.contains(option),
            "{option} missing:\n{}",
            run.stdout
        );
    }
}

/// The monitor opens before the VMM starts and is flushed on the way out, even when the VM cannot
/// start (an empty file is no kernel): `vmm starting` then `vmm shutdown`, upstream's shape.
#[test]
fn event_monitor_records_start_and_shutdown_even_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = existing_file(&dir, "empty-kernel");
    let events = dir.path().join("events");
    let monitor = format!("path={}", events.display());
    let run = run(&[
        "--kernel",
        &kernel,
        "--memory",
        "size=16M",
        "--console",
        "off",
        "--event-monitor",
        &monitor,
    ]);
    assert_eq!(run.code, 1, "an empty kernel must not boot: {}", run.stderr);
    let parsed = read_events(&events);
    let first = &parsed[0];
    assert_eq!(
        (first["source"].as_str(), first["event"].as_str()),
        (Some("vmm"), Some("starting"))
    );
    assert!(first["timestamp"]["nanos"].is_u64());
    let last = parsed.last().unwrap();
    assert_eq!(
        (last["source"].as_str(), last["event"].as_str()),
        (Some("vmm"), Some("shutdown"))
    );
}

/// Starts the binary with piped stdout/stderr, for a VM that runs until told to stop.
fn spawn(arguments: &[&str]) -> Child {
    Command::new(binaries::cloud_hypervisor())
        .args(arguments)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning cloud-hypervisor")
}

/// Sends SIGTERM and collects the exit code and stderr; kills after `RUN_TIMEOUT`.
fn terminate(mut child: Child) -> (i32, String) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: signalling the child we spawned and have not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let started = Instant::now();
    while child.try_wait().expect("waiting").is_none() {
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            panic!("cloud-hypervisor ignored SIGTERM for {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("collecting output");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let code = output
        .status
        .code()
        .unwrap_or_else(|| panic!("cloud-hypervisor killed: {}\n{stderr}", output.status));
    (code, stderr)
}

/// Boots the counter guest from the command line with `memory_arguments`, waits for it to
/// report progress, stops it with SIGTERM and checks the serial log and the event stream.
fn counter_guest_runs_with(memory_arguments: &[&str], dir: &tempfile::TempDir) {
    let kernel = integration_tests::guests::guest_image("counter")
        .unwrap_or_else(|e| panic!("building the counter guest: {e}"));
    let serial_log = dir.path().join("serial.log");
    let events = dir.path().join("events");
    let serial = format!("file={}", serial_log.display());
    let monitor = format!("path={}", events.display());
    let cmdline = guest_cmdline("");
    let mut arguments = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--serial",
        &serial,
        "--console",
        "off",
        "--event-monitor",
        &monitor,
    ];
    arguments.extend_from_slice(memory_arguments);
    let child = spawn(&arguments);
    let (text, progressed) = wait_for_log(&serial_log, BOOT_TIMEOUT, |text| {
        counter_lines(text).len() >= 3 || text.contains("FAIL")
    });
    let (code, stderr) = terminate(child);
    assert!(
        progressed,
        "no counter progress; serial:\n{text}\nstderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("seccomp: forbidden system call"),
        "seccomp trap:\n{stderr}"
    );
    assert_eq!(code, 0, "SIGTERM is a clean stop; stderr:\n{stderr}");
    assert_counter_advances(&text, 3);

    let names = event_names(&events);
    assert_eq!(
        names.first().map(String::as_str),
        Some("vmm:starting"),
        "{names:?}"
    );
    assert_eq!(
        names.last().map(String::as_str),
        Some("vmm:shutdown"),
        "{names:?}"
    );
}

/// Issue 3's first "done when": the counter guest on a shared file, from the command line.
#[test]
fn counter_guest_runs_from_the_command_line_on_a_shared_file() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    // As upstream, the zone file must exist (it is grown to the zone size).
    std::fs::File::create(dir.path().join("ram")).unwrap();
    let zone = format!(
        "id=mem0,size=64M,file={},shared=on",
        dir.path().join("ram").display()
    );
    counter_guest_runs_with(&["--memory", "size=0", "--memory-zone", &zone], &dir);
    let ram = std::fs::metadata(dir.path().join("ram")).unwrap();
    assert_eq!(
        ram.len(),
        64 << 20,
        "the RAM file is grown to the zone size"
    );
}

/// The same on anonymous memory.
#[test]
fn counter_guest_runs_from_the_command_line_on_anonymous_memory() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    counter_guest_runs_with(&["--memory", "size=64M"], &dir);
}

/// Issue 9.6: upstream's command-line exit codes.
#[test]
fn no_arguments_print_usage_and_exit_2() {
    let run = run(&[]);
    assert_eq!(run.code, 2, "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("Usage"), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}

/// Issue 9.6: `--memory-zone file=F` with F missing fails (exit 1) and does not create F.
#[test]
fn a_missing_memory_zone_file_is_refused_and_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = existing_file(&dir, "kernel");
    let missing = dir.path().join("no-such-ram");
    let zone = format!("id=mem0,size=64M,file={},shared=on", missing.display());
    assert_start_failure(
        &[
            "--kernel",
            &kernel,
            "--memory",
            "size=0",
            "--memory-zone",
            &zone,
            "--console",
            "off",
        ],
        &["no-such-ram"],
    );
    assert!(!missing.exists(), "the zone file was created");
}

/// Issue 10 item 9 and 9.6: duplicate keys, empty values, values this VMM cannot honour and
/// options it has no device for are refused with exit 1 and a line naming the key or option.
#[test]
fn unusable_values_name_the_key_or_option() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = existing_file(&dir, "kernel");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--memory", "size=1G,size=2G"],
            &["--memory", "\"size\"", "more than once"],
        ),
        (&["--memory", "size="], &["--memory", "\"size\""]),
        (&["--memory", "size=64M,hugepages=on"], &["hugepages"]),
        (
            &[
                "--memory",
                "size=64M,hugepages=on",
                "--nv",
                "region=/tmp/r,vm=a,create=on",
            ],
            &["hugepages"],
        ),
        (
            &[
                "--memory",
                "size=64M",
                "--nv",
                "region=/tmp/r,vm=a,create=on,region_size=3M",
            ],
            &["region_size", "64 MiB", "(68 MiB)"],
        ),
        (&["--cpus", "boot=255"], &["--cpus", "boot=255", "limit of"]),
        (
            &["--cpus", "boot=1,max=2"],
            &["--cpus", "max=2", "cpus.max"],
        ),
        (
            &["--disk", "path=/a.img,queue_size=1024"],
            &["queue_size", "disks[0].queue_size"],
        ),
        (
            &["--disk", "path=/a.img,serial=S1"],
            &["serial", "disks[0].serial"],
        ),
        (
            &["--net", "tap=tap0,mac=00:11:22:33:44"],
            &["--net", "invalid mac \"00:11:22:33:44\""],
        ),
        (
            &["--net", "tap=tap0,num_queues=3"],
            &["--net", "num_queues=3"],
        ),
        (
            &["--rng", "src=/dev/urandom,iommu=on"],
            &["--rng", "rng.iommu"],
        ),
        (
            &["--platform", "num_pci_segments=2"],
            &["--platform", "num_pci_segments"],
        ),
        // Device options are refused by the rule (and message) that refuses their vm.create
        // members.
        (
            &["--pmem", "file=/p"],
            &["--pmem file=/p", "VmConfig member \"pmem\""],
        ),
        // virtio-fs on private RAM: its backend could not map it (upstream's rule).
        (
            &["--fs", "tag=t,socket=/s"],
            &[
                "--fs",
                "virtio-fs needs guest RAM its backend can map",
                "shared=on",
            ],
        ),
        (
            &["--watchdog"],
            &["--watchdog", "VmConfig member \"watchdog\""],
        ),
    ];
    assert_start_failures(&["--kernel", &kernel, "--console", "off"], cases);
}

/// Issue 14 item 3: an entropy source that cannot be read and a console file that cannot be
/// created stop the VMM at start-up with exit 1 and one line naming the option and the path.
#[test]
fn unreadable_rng_source_and_uncreatable_console_file_are_named() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let kernel = integration_tests::guests::guest_image("counter")
        .unwrap_or_else(|e| panic!("building the counter guest: {e}"));
    let kernel = kernel.to_str().unwrap();
    let missing = dir.path().join("no-such-source");
    let missing = missing.to_str().unwrap();
    let unwritable = dir.path().join("no-such-dir/console.log");
    let console = format!("file={}", unwritable.display());
    let rng = format!("src={missing}");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--console", "off", "--rng", &rng],
            &["--rng", missing, "No such file"],
        ),
        (
            &["--rng", &format!("src={}", dir.path().display())],
            &["--rng", "Is a directory"],
        ),
        (
            &["--console", &console],
            &["--console", "console.log", "No such file"],
        ),
    ];
    assert_start_failures(&["--kernel", kernel, "--memory", "size=32M"], cases);
}

/// What upstream's scripts pass at upstream's defaults is accepted: such a command line gets as
/// far as loading the (empty, so unbootable) kernel, not a refusal of the option.
#[test]
fn upstream_defaults_on_the_command_line_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = existing_file(&dir, "kernel");
    let image = existing_file(&dir, "disk.img");
    let disk = format!("path={image},num_queues=1,queue_size=128,sparse=on,image_type=raw");
    let run = run(&[
        "--kernel",
        &kernel,
        "--console",
        "off",
        "--cpus",
        "boot=1,max=1,kvm_hyperv=off,max_phys_bits=46,nested=on,core_scheduling=vm",
        "--memory",
        "size=64M,thp=on,mergeable=off,hotplug_method=acpi",
        "--disk",
        &disk,
        "--rng",
        "src=/dev/urandom",
        "--platform",
        "num_pci_segments=1",
        "--debug-console",
        "off",
        "--net",
        "",
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("kernel"),
        "expected to fail on the empty kernel only:\n{}",
        run.stderr
    );
    let thp_off = run_with_memory(&kernel, "size=64M,thp=off");
    assert!(thp_off.stderr.contains("kernel"), "{}", thp_off.stderr);
}

fn run_with_memory(kernel: &str, memory: &str) -> Run {
    run(&["--kernel", kernel, "--console", "off", "--memory", memory])
}

/// A `cloud-hypervisor --api-socket` process, killed on drop.
struct ApiVmm {
    process: VmmProcess,
    socket: std::path::PathBuf,
}

impl ApiVmm {
    fn start(dir: &Path) -> ApiVmm {
        let socket = dir.join("api.sock");
        let arguments = [
            "--api-socket".to_string(),
            format!("path={}", socket.display()),
        ];
        let mut process = VmmProcess::spawn(dir, "api", &arguments, &[]);
        process.wait_for_socket(&socket, BOOT_TIMEOUT);
        ApiVmm { process, socket }
    }

    /// One request on a connection of its own; a failure to get an answer says what became of
    /// the VMM (ended, and how, or still running: its threads) and what it logged.
    fn request(&mut self, method: &str, endpoint: &str, body: &str) -> (u16, String) {
        let request = api_client::request_bytes(method, endpoint, body);
        match api_client::try_exchange(&self.socket, &request, BOOT_TIMEOUT) {
            Ok(answer) => (answer.status, answer.body),
            Err(error) => {
                let vmm = match self.process.try_wait() {
                    Some(status) => format!("the VMM ended: {status}"),
                    None => format!("the VMM still runs:\n{}", self.process.hang_report()),
                };
                panic!(
                    "{method} {endpoint}: {error}\n{vmm}\nits stderr:\n{}",
                    self.process.stderr_log()
                );
            }
        }
    }
}

/// Upstream v53's `vm.info` config with every member at upstream's default, as upstream prints
/// it for a VM with one disk (its snapshot `config.json` is the same document).
fn upstream_full_config(kernel: &str, disk: &str, serial: &str) -> serde_json::Value {
    serde_json::json!({
        "cpus": {
            "boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false, "max_phys_bits": 46,
            "features": {"amx": false}, "nested": true, "core_scheduling": "Vm",
            "profile": "Host"
        },
        "memory": {
            "size": 67108864, "mergeable": false, "hotplug_method": "Acpi", "shared": false,
            "hugepages": false, "prefault": false, "reserve": false, "thp": true
        },
        "payload": {"kernel": kernel, "cmdline": guest_cmdline("")},
        "disks": [{
            "path": disk, "readonly": false, "direct": false, "iommu": false,
            "num_queues": 1, "queue_size": 128, "vhost_user": false, "id": "_disk0",
            "pci_segment": 0, "backing_files": false, "sparse": true, "image_type": "Raw",
            "lock_granularity": "ByteRange"
        }],
        "rng": {"src": "/dev/urandom", "iommu": false},
        "serial": {"file": serial, "mode": "File", "iommu": false},
        "console": {"mode": "Off", "iommu": false},
        "debug_console": {"mode": "Off", "iobase": 233},
        "iommu": false,
        "pvpanic": false,
        "watchdog": false,
        "platform": {
            "num_pci_segments": 1, "iommu_address_width_bits": 64, "iommufd": false,
            "vfio_p2p_dma": true
        },
        "landlock_enable": false
    })
}

/// Issue 9 items 2 and 3: upstream's full config is accepted by `vm.create` (nothing refused,
/// nothing dropped) and `vm.info` prints it back member for member; once booted, `vm.info` adds
/// the RAM and the device tree of the devices the VM really has.
#[test]
fn upstream_full_config_round_trips_through_vm_create_and_vm_info() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let kernel = integration_tests::guests::guest_image("counter")
        .unwrap_or_else(|e| panic!("building the counter guest: {e}"));
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let serial = dir.path().join("serial.log");
    let config = upstream_full_config(
        kernel.to_str().unwrap(),
        disk.to_str().unwrap(),
        serial.to_str().unwrap(),
    );
    let mut vmm = ApiVmm::start(dir.path());
    let (status, body) = vmm.request("PUT", "vm.create", &config.to_string());
    assert_eq!(status, 204, "vm.create refused upstream's config: {body}");
    let (status, body) = vmm.request("GET", "vm.info", "");
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Created");
    assert_eq!(
        info["config"].clone(),
        config.clone(),
        "vm.info does not print upstream's config back"
    );
    assert!(
        info.get("device_tree").is_none(),
        "no devices before boot: {info}"
    );

    let (status, body) = vmm.request("PUT", "vm.boot", "");
    assert_eq!(status, 204, "{body}");
    let (status, body) = vmm.request("GET", "vm.info", "");
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["memory_actual_size"], 67108864);
    let tree = info["device_tree"].as_object().expect("device_tree");
    let mut ids: Vec<&String> = tree.keys().collect();
    ids.sort();
    // Upstream always has an entropy device; the console is off here. Both PCI functions
    // follow upstream's order: the disks, then the rng. Each virtio device on PCI is two nodes,
    // as upstream lists them: its virtio-pci function `_virtio-pci-<id>` (BARs, `pci_bdf`) with
    // the device as its one child.
    assert_eq!(
        ids,
        [
            "__rng",
            "__serial",
            "_disk0",
            "_virtio-pci-__rng",
            "_virtio-pci-_disk0"
        ],
        "{info}"
    );
    assert_eq!(
        tree["__serial"],
        serde_json::json!({
            "id": "__serial",
            "resources": [{"PioAddressRange": {"base": 0x3f8, "size": 8}}, {"LegacyIrq": 4}],
            "children": [],
            "pci_bdf": null
        })
    );
    // The disk is a virtio-pci function (the default transport): the first device after the
    // host bridge, its BAR 0 (512 KiB) at the start of the 64-bit window above 64 MiB of RAM
    // (4 GiB), MSI-X instead of a legacy IRQ.
    assert_eq!(
        tree["_virtio-pci-_disk0"],
        serde_json::json!({
            "id": "_virtio-pci-_disk0",
            "resources": [
                {"PciBar": {"index": 0, "base": 0x1_0000_0000_u64, "size": 0x8_0000,
                            "type_": "Mmio64", "prefetchable": false}}
            ],
            "children": ["_disk0"],
            "pci_bdf": "0000:00:01.0"
        })
    );
    // virtio-rng, present as upstream has it, is the next function, its BAR 0 right after the
    // disk's.
    assert_eq!(
        tree["_virtio-pci-__rng"],
        serde_json::json!({
            "id": "_virtio-pci-__rng",
            "resources": [
                {"PciBar": {"index": 0, "base": 0x1_0008_0000_u64, "size": 0x8_0000,
                            "type_": "Mmio64", "prefetchable": false}}
            ],
            "children": ["__rng"],
            "pci_bdf": "0000:00:02.0"
        })
    );
    for device in ["_disk0", "__rng"] {
        assert_eq!(
            tree[device],
            serde_json::json!({"id": device, "resources": [], "children": [], "pci_bdf": null})
        );
    }
}

/// `vm.create` ignores members it does not know (upstream does; they are logged) and refuses,
/// naming it, an upstream member set to a value this VMM cannot honour.
#[test]
fn vm_create_ignores_unknown_members_and_names_unsupported_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = ApiVmm::start(dir.path());
    let (status, body) = vmm.request(
        "PUT",
        "vm.create",
        r#"{"payload":{"kernel":"/k"},"memory":{"size":67108864},"pmem":[{"file":"/p"}]}"#,
    );
    assert_eq!(status, 400, "{body}");
    let messages: Vec<String> = serde_json::from_str(&body).expect("an array of strings");
    assert!(
        messages.iter().any(|message| message.contains("\"pmem\"")),
        "{body}"
    );
    // virtio-net is a device now: a net member is judged as `--net` is (an odd queue count).
    let (status, body) = vmm.request(
        "PUT",
        "vm.create",
        r#"{"payload":{"kernel":"/k"},"memory":{"size":67108864},"net":[{"tap":"tap0","num_queues":3}]}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("num_queues=3"), "{body}");
    let (status, body) = vmm.request(
        "PUT",
        "vm.create",
        r#"{"payload":{"kernel":"/k"},"memory":{"size":4096}}"#,
    );
    assert_eq!(
        status, 400,
        "vm.create must refuse what vm.boot would: {body}"
    );
    let (status, body) = vmm.request(
        "PUT",
        "vm.create",
        r#"{"payload":{"kernel":"/k"},"memory":{"size":67108864,"colour":"red"},"future":1}"#,
    );
    assert_eq!(status, 204, "unknown members are ignored: {body}");
}
