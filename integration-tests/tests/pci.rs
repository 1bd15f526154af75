//! PCI segment 0 as a guest sees it, end to end on KVM with the `pcicheck` test guest: bus 0
//! enumerated through the legacy ports 0xCF8/0xCFC and through the ECAM window agrees register
//! for register, the host bridge is at 00:00.0 with cloud-hypervisor's identity, and what the
//! guest wrote into configuration space is still there after a power failure and in-place
//! recovery and after a snapshot and restore into a new VMM.
//!
//! The binary is built on first use (`integration_tests::binaries`); `CLOUD_HYPERVISOR_BIN=/path`
//! tests that binary instead.

use std::path::Path;
use std::time::Duration;

use integration_tests::api_client;
use integration_tests::harness::{guest_arguments, point_serial_to, scratch_dir};
use integration_tests::process::VmmProcess;
use vmm::nv::EXIT_POWER_FAIL_SAVED;

/// Generous bound for a guest line or a VMM exit (boot is ring-0 emulated here).
const TIMEOUT: Duration = Duration::from_secs(60);
/// What pcicheck writes into the host bridge's cache line size register and must read back.
const MARK: &str = "0x5a";

fn spawn(dir: &Path, label: &str, arguments: &[String]) -> VmmProcess {
    VmmProcess::spawn_with_serial_file(dir, label, arguments, &[]).with_timeout(TIMEOUT)
}

/// Lines of the form `pcicheck: mark=0x.. line=N` in `log`: (value, N).
fn mark_lines(log: &str) -> Vec<(String, u64)> {
    log.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("pcicheck: mark=")?;
            let (value, number) = rest.split_once(" line=")?;
            Some((value.to_owned(), number.trim().parse().ok()?))
        })
        .collect()
}

/// Every mark line reads `MARK` and the numbers run on without a gap from `after`.
fn assert_marks_continue(log: &str, after: u64) {
    let marks = mark_lines(log);
    assert!(!marks.is_empty(), "no mark line:\n{log}");
    for (value, _) in &marks {
        assert_eq!(
            value, MARK,
            "the host bridge lost the guest's write:\n{log}"
        );
    }
    assert!(
        marks[0].1 > after,
        "mark lines restarted at {} after {after}:\n{log}",
        marks[0].1
    );
}

/// Waits for two mark lines after `event` (the guest went on, it did not boot again) and checks
/// they continue from line `last`.
fn wait_marks_continue(vmm: &mut VmmProcess, event: &str, last: u64) {
    let after = vmm.wait_serial(&format!("two mark lines after {event}"), |log| {
        mark_lines(log).len() >= 2
    });
    assert!(!after.contains("pcicheck: boot"), "booted again:\n{after}");
    assert_marks_continue(&after, last);
}

#[test]
fn pcicheck_enumerates_bus_0_alike_through_the_ports_and_ecam() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let arguments = guest_arguments("pcicheck", "exit=reset", "32M");
    let mut vmm = spawn(dir.path(), "pcicheck", &arguments);
    vmm.expect_exit(0, "pcicheck");
    let log = vmm.serial_log();
    assert!(!log.contains("FAIL"), "{log}");
    for expected in [
        "pcicheck: 00:00.0 id 8086:0d57 class 060000 header 0x00 extended 0x00000000",
        "pcicheck: host bridge found",
        // virtio-rng, present in every VM as upstream has it: a modern virtio-pci function
        // with one 64-bit BAR, five virtio vendor capabilities and MSI-X.
        "pcicheck: 00:01.0 id 1af4:1044",
        "pcicheck: 00:01.0 bar0 mem64 at 0x0000000100000000 size 0x00080000",
        "pcicheck: 00:01.0 capability 0x11 at",
        "pcicheck: bus 0 functions=2 failures=0",
        "pcicheck: ports and ECAM agree",
        "pcicheck: done",
    ] {
        assert!(log.contains(expected), "no {expected:?}:\n{log}");
    }
    // The host bridge has no BARs and no capabilities.
    assert!(!log.contains("00:00.0 bar"), "{log}");
    assert!(!log.contains("00:00.0 capability"), "{log}");
    assert_eq!(log.matches("00:01.0 capability 0x09").count(), 5, "{log}");
}

/// The host bridge's configuration space is in the power-fail save: the recovered guest reads
/// through 0xCFC what it wrote through ECAM before the power failure.
#[test]
fn pci_configuration_space_survives_a_power_failure() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let region = dir.path().join("region");
    let mut arguments = guest_arguments("pcicheck", &format!("mark={MARK}"), "32M");
    arguments.extend([
        "--nv".into(),
        format!("region={},vm=pci,create=on", region.display()),
    ]);
    let mut vmm = spawn(dir.path(), "boot", &arguments);
    let before = vmm.wait_serial("two mark lines", |log| mark_lines(log).len() >= 2);
    assert!(
        before.contains(&format!("pcicheck: mark written={MARK} read={MARK}")),
        "{before}"
    );
    let stderr = vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "power fail");
    assert!(stderr.contains("power-fail save committed"), "{stderr}");
    let last = mark_lines(&vmm.serial_log()).last().unwrap().1;

    let recover = [
        "--nv".into(),
        format!("region={},vm=pci,recover=on", region.display()),
    ];
    let mut recovered = spawn(dir.path(), "recovered", &recover);
    wait_marks_continue(&mut recovered, "recovery", last);
    recovered.kill();
}

/// The same through `vm.snapshot` and `--restore` into a new VMM.
#[test]
fn pci_configuration_space_survives_snapshot_and_restore() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let socket = dir.path().join("api.sock");
    let mut arguments = guest_arguments("pcicheck", &format!("mark={MARK}"), "32M");
    arguments.extend(["--api-socket".into(), format!("path={}", socket.display())]);
    let mut first = spawn(dir.path(), "first", &arguments);
    first.wait_serial("a mark line", |log| !mark_lines(log).is_empty());
    first.wait_for_socket(&socket, TIMEOUT);
    let snapshot_dir = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot_dir).unwrap();
    let snapshot = format!("file://{}", snapshot_dir.display());
    for (method, path, body) in [
        ("PUT", "vm.pause", String::new()),
        (
            "PUT",
            "vm.snapshot",
            format!("{{\"destination_url\":\"{snapshot}\"}}"),
        ),
    ] {
        let (status, answer) = api_client::request(&socket, method, path, &body, TIMEOUT);
        assert_eq!(status, 204, "{path}: {answer}");
    }
    let last = mark_lines(&first.serial_log()).last().unwrap().1;
    first.kill();

    let log = dir.path().join("restored.serial");
    point_serial_to(&snapshot_dir, &log);
    let arguments = [
        "--restore".into(),
        format!("source_url={snapshot},resume=true"),
    ];
    let mut restored = VmmProcess::spawn(dir.path(), "restored", &arguments, &[])
        .with_timeout(TIMEOUT)
        .with_serial(log);
    wait_marks_continue(&mut restored, "restore", last);
    restored.kill();
}
