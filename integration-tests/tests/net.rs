//! virtio-net end to end with the `cloud-hypervisor` binary on real KVM, inside a network
//! namespace the test creates (`ip netns add`, removed when the test ends, whatever happens):
//! the VMM runs in it (spawned from a thread that entered it), so the taps and addresses it
//! makes exist only there. Never skipped: a machine that cannot create a namespace or a tap
//! fails these tests loudly.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::harness::{
    assert_counter_advances, counter_lines, guest_cmdline, scratch_dir, test_guest,
};
use integration_tests::process::VmmProcess;
use vmm::nv::EXIT_POWER_FAIL_SAVED;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A network namespace of this test: created on `new`, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(label: &str) -> Self {
        let name = format!("nvnet-{label}-{}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("running ip netns add (iproute2 is needed for the virtio-net tests)");
        assert!(
            status.success(),
            "ip netns add {name} failed: the virtio-net tests need root and network namespaces"
        );
        Netns { name }
    }

    /// Runs `body` on a thread that entered the namespace: what it spawns lives there.
    fn run<T: Send + 'static>(&self, body: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on an open namespace file; it changes this thread only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            body()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// `ip -n NS link show NAME`'s output, or `None` when there is no such link.
    fn link(&self, name: &str) -> Option<String> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "link", "show", name])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Opens tap `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) in the calling thread's namespace as a
/// descriptor children inherit (no close-on-exec), as an orchestrator hands one over.
fn inheritable_tap(name: &str) -> OwnedFd {
    let path = CString::new("/dev/net/tun").unwrap();
    // SAFETY: open(2) of a NUL-terminated path; the result is checked and owned.
    let fd: RawFd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR) };
    assert!(fd >= 0, "/dev/net/tun: {}", std::io::Error::last_os_error());
    // SAFETY: just opened, owned here.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a 40-byte struct ifreq.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETIFF as _, req.as_mut_ptr()) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    owned
}

fn spawn(dir: &Path, label: &str, arguments: &[String]) -> VmmProcess {
    VmmProcess::spawn_with_serial_file(dir, label, arguments, &[]).with_timeout(TIMEOUT)
}

/// Boot arguments for the counter guest with one `--net` device.
fn boot_arguments(kernel: &Path, net: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        kernel.display().to_string(),
        "--cmdline".into(),
        guest_cmdline(""),
        "--memory".into(),
        "size=32M".into(),
        "--net".into(),
        net.into(),
    ]
}

/// Starts recovering `netvm` from `region` in place, `extra` arguments first.
fn spawn_recovery(dir: &Path, region: &Path, label: &str, extra: Vec<String>) -> VmmProcess {
    let mut arguments = extra;
    arguments.push("--nv".into());
    arguments.push(format!("region={},vm=netvm,recover=on", region.display()));
    spawn(dir, label, &arguments)
}

/// Waits for a counter line after recovery that continues from the serial log `before`.
fn wait_continues(vmm: &mut VmmProcess, before: &str) {
    let after = vmm.wait_serial("a counter line after recovery", has_counter_line);
    assert_continues(before, &after);
}

fn has_counter_line(log: &str) -> bool {
    !counter_lines(log).is_empty()
}

fn power_fail(vmm: &mut VmmProcess) -> String {
    let stderr = vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "power-fail exit");
    assert!(
        stderr.contains("power-fail save committed"),
        "no save report:\n{stderr}"
    );
    assert!(!stderr.contains("seccomp"), "seccomp trap:\n{stderr}");
    vmm.serial_log()
}

/// The recovered guest continued (no boot line, counter past the last one before).
fn assert_continues(before: &str, after: &str) {
    assert!(
        !after.contains("counter: boot"),
        "the guest booted again instead of continuing:\n{after}"
    );
    let last_before = counter_lines(before).last().map(|l| l.counter);
    let first_after = counter_lines(after).first().map(|l| l.counter).unwrap();
    if let Some(last_before) = last_before {
        assert!(
            first_after > last_before,
            "{last_before} then {first_after}"
        );
    }
    assert_counter_advances(after, 1);
}

/// Issue 14.1/14.2: a VM with a virtio-net device on a named tap (created in the namespace,
/// brought up) is saved at a power failure and recovered in place twice: once reopening the tap
/// by name, once on a tap descriptor handed over on the recovery command line.
#[test]
fn a_net_vm_survives_power_failures_reopening_its_tap_by_name_and_by_fd() {
    integration_tests::require_kvm!();
    let netns = Netns::new("pf");
    let dir = scratch_dir();
    let dir_path = dir.path().to_path_buf();
    let region = dir_path.join("region");
    let kernel = test_guest("counter");
    let netns_link = |name: &str| netns.link(name);

    let before = {
        let (dir_path, region, kernel) = (dir_path.clone(), region.clone(), kernel.clone());
        netns.run(move || {
            let mut arguments =
                boot_arguments(&kernel, "tap=nvtap0,mac=02:00:00:00:00:10,num_queues=2");
            arguments.push("--nv".into());
            arguments.push(format!("region={},vm=netvm,create=on", region.display()));
            let mut vmm = spawn(&dir_path, "boot", &arguments);
            vmm.wait_serial("a counter line", has_counter_line);
            vmm
        })
    };
    let mut vmm = before;
    let link = netns_link("nvtap0").expect("the VMM created tap nvtap0 in the namespace");
    assert!(link.contains("UP"), "tap not up: {link}");
    let log = power_fail(&mut vmm);

    // Recovery by name: the stored config names the tap.
    let mut vmm = {
        let (dir_path, region) = (dir_path.clone(), region.clone());
        let log = log.clone();
        netns.run(move || {
            let mut vmm = spawn_recovery(&dir_path, &region, "recover-name", Vec::new());
            wait_continues(&mut vmm, &log);
            vmm
        })
    };
    let log = power_fail(&mut vmm);

    // Recovery on a handed-over descriptor of another tap, which replaces the stored name.
    let mut vmm = {
        let (dir_path, region) = (dir_path.clone(), region.clone());
        netns.run(move || {
            let tap = inheritable_tap("nvtap1");
            let net = vec!["--net".into(), format!("fd={}", tap.as_raw_fd())];
            // The VMM holds its own copy: the guest must go on after the test's is closed.
            let mut vmm = spawn_recovery(&dir_path, &region, "recover-fd", net);
            drop(tap);
            wait_continues(&mut vmm, &log);
            vmm
        })
    };
    assert!(
        netns_link("nvtap1").is_some(),
        "the handed-over tap is gone while the VMM runs on it"
    );
    let stderr = vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "last save");
    assert!(!stderr.contains("seccomp"), "seccomp trap:\n{stderr}");
}

/// Issue 14's bad input: exit 1 (upstream's code for a value it cannot use), one clear line,
/// no panic, for a bad MAC, an odd queue count, `fd=` that is not a tap, and a named tap that
/// does not exist when the VMM may not create it (CAP_NET_ADMIN dropped with setpriv).
#[test]
fn bad_net_input_is_refused_with_exit_1_and_a_clear_line() {
    integration_tests::require_kvm!();
    let netns = Netns::new("bad");
    let dir = scratch_dir();
    let dir_path = dir.path().to_path_buf();
    let kernel = test_guest("counter");
    netns.run(move || {
        let base = |net: &str| boot_arguments(&kernel, net);
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "bad-mac",
                "tap=nvtap0,mac=02:00:00:00:10",
                &["--net", "invalid mac"],
            ),
            (
                "odd-queues",
                "tap=nvtap0,num_queues=3",
                &["--net", "num_queues=3"],
            ),
            (
                "fd-not-a-tap",
                "fd=0",
                &["--net", "descriptor 0 is not a tap"],
            ),
        ];
        for (label, net, needles) in cases {
            let mut vmm = spawn(&dir_path, label, &base(net));
            let stderr = vmm.expect_exit(1, label);
            assert!(!stderr.contains("panicked"), "{label}: {stderr}");
            for needle in *needles {
                assert!(
                    stderr.contains(needle),
                    "{label}: no {needle:?} in:\n{stderr}"
                );
            }
        }
        // Without CAP_NET_ADMIN a missing tap cannot be created.
        let binary = integration_tests::binaries::cloud_hypervisor();
        let mut arguments = vec![
            "--bounding-set=-net_admin".to_string(),
            "--inh-caps=-net_admin".to_string(),
            "--".to_string(),
            binary.display().to_string(),
        ];
        arguments.extend(base("tap=nvmissing0"));
        let out = Command::new("setpriv")
            .args(&arguments)
            .output()
            .expect("setpriv (util-linux) is needed for this test");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains("cannot attach to tap \"nvmissing0\""),
            "stderr:\n{stderr}"
        );
    });
}
