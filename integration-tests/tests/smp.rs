//! SMP end to end: the `smpcheck` guest's boot vCPU starts the other vCPUs as firmware and Linux
//! do on hardware (MADT, then INIT and STARTUP IPIs through its local APIC; the AP wakes in real
//! mode at the SIPI vector's page) and every vCPU counts in ring 3. The VMM programs only the
//! boot vCPU; the others sit in KVM's wait-for-SIPI state until the guest wakes them. Each
//! vCPU's MP state goes with its saved state, so after a power failure, in-place recovery and a
//! snapshot restore a started AP runs on and one not started yet still waits for its SIPI.
//!
//! This host allows at most 2 vCPUs per VM, so the tests use 2; the guest and the VMM take the
//! count from the MADT and `--cpus`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::api_client;
use integration_tests::harness::{
    assert_smp_counters_advance, guest_arguments, point_serial_to, scratch_dir, smp_counter_lines,
};
use integration_tests::process::VmmProcess;
use vmm::nv::EXIT_POWER_FAIL_SAVED;

const TIMEOUT: Duration = Duration::from_secs(30);
const VCPUS: usize = 2;

/// Spawns a VMM with its serial log in `dir/<label>.serial` and its API socket at
/// `dir/<label>.sock`, through which a wait that times out reports the vCPUs (see
/// `VmmProcess::hang_report`).
fn spawn(dir: &Path, label: &str, arguments: &[String]) -> VmmProcess {
    let socket = api_socket(dir, label);
    let mut arguments = arguments.to_vec();
    arguments.extend(["--api-socket".into(), format!("path={}", socket.display())]);
    VmmProcess::spawn_with_serial_file(dir, label, &arguments, &[])
        .with_timeout(TIMEOUT)
        .with_api_socket(socket)
}

fn api_socket(dir: &Path, label: &str) -> PathBuf {
    dir.join(format!("{label}.sock"))
}

/// Cold boot of smpcheck (`parameters`) with `VCPUS` vCPUs as `vm` of a new NV region.
fn boot_arguments(parameters: &str, region: &Path) -> Vec<String> {
    let mut arguments = guest_arguments("smpcheck", parameters, "32M");
    arguments.extend([
        "--cpus".into(),
        format!("boot={VCPUS}"),
        "--nv".into(),
        format!("region={},vm=smp,create=on", region.display()),
    ]);
    arguments
}

fn recover_arguments(region: &Path) -> Vec<String> {
    vec![
        "--nv".into(),
        format!("region={},vm=smp,recover=on", region.display()),
    ]
}

fn has_lines(count: usize) -> impl Fn(&str) -> bool {
    move |log| log.contains("FAIL") || smp_counter_lines(log).len() >= count
}

/// SIGPWR: the VM is saved in place and the VMM exits with "state saved, powered off".
fn power_fail(vmm: &mut VmmProcess) -> String {
    vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "power-fail exit");
    vmm.serial_log()
}

/// Progress lines awaited after a boot, a recovery or a restore.
const LINES_AFTER: usize = 4;

/// Asserts that `after` continues `before` without a new boot: no vCPU's counter ever goes
/// below its last value before or its value on the line above, and every one has grown by the
/// last of `LINES_AFTER` lines (`assert_smp_counters_advance`).
///
/// The first line after a restore may show an AP's counter exactly where it was saved: the
/// guest TSC cannot be restored here and jumps ahead, so the boot vCPU's 100 ms report is due
/// at once and is printed before the AP's thread has run. A restarted vCPU counts from 0 and
/// one that stopped never grows again: both still fail.
fn assert_all_continue(before: &str, after: &str) {
    assert!(
        !after.contains("smpcheck: boot"),
        "the guest booted again:\n{after}"
    );
    let last = smp_counter_lines(before)
        .pop()
        .expect("a progress line before");
    let lines = assert_smp_counters_advance(after, VCPUS, LINES_AFTER);
    for cpu in 0..VCPUS {
        assert!(
            lines[0][cpu] >= last[cpu],
            "vCPU {cpu} restarted: {} then {}:\n{after}",
            last[cpu],
            lines[0][cpu]
        );
    }
}

/// Asserts that the guest reported every AP started (vCPU i has APIC ID i).
fn assert_aps_started(log: &str) {
    for cpu in 1..VCPUS {
        assert!(
            log.contains(&format!("smpcheck: cpu {cpu} apic={cpu} started after ")),
            "AP {cpu} was not started:\n{log}"
        );
    }
}

fn api(socket: &Path, method: &str, op: &str, body: &str) {
    let (status, answer) = api_client::request(socket, method, op, body, TIMEOUT);
    assert!(
        status == 204 || status == 200,
        "{method} {op}: {status} {answer}"
    );
}

#[test]
fn the_boot_vcpu_starts_the_other_with_init_sipi_and_both_count_on_after_power_failure_and_snapshot(
) {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let region = dir.path().join("region");

    let mut vmm = spawn(dir.path(), "boot", &boot_arguments("", &region));
    let log = vmm.wait_serial("smpcheck lines", has_lines(LINES_AFTER));
    assert!(
        log.contains(&format!("smpcheck: madt cpus={VCPUS} bsp_apic=0\n")),
        "the MADT does not list one LAPIC per vCPU:\n{log}"
    );
    assert_aps_started(&log);
    assert_smp_counters_advance(&log, VCPUS, LINES_AFTER);
    let before = power_fail(&mut vmm);

    // In place: the started AP is saved runnable and runs on.
    let mut vmm = spawn(dir.path(), "recover", &recover_arguments(&region));
    let after = vmm.wait_serial("smpcheck lines after recovery", has_lines(LINES_AFTER));
    assert_all_continue(&before, &after);

    // Snapshot of the recovered VM, restored by a new VMM: both vCPUs run on again.
    let socket = api_socket(dir.path(), "recover");
    vmm.wait_for_socket(&socket, TIMEOUT);
    let snapshot = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot).unwrap();
    api(&socket, "PUT", "vm.pause", "");
    let url = format!("file://{}", snapshot.display());
    api(
        &socket,
        "PUT",
        "vm.snapshot",
        &serde_json::json!({ "destination_url": url }).to_string(),
    );
    let before = vmm.serial_log();
    api(&socket, "PUT", "vmm.shutdown", "");
    assert_eq!(vmm.wait_exit_code(), 0, "{}", vmm.stderr_log());

    let restored_log = dir.path().join("restored.serial");
    point_serial_to(&snapshot, &restored_log);
    let socket = dir.path().join("restored.sock");
    let mut vmm = VmmProcess::spawn(
        dir.path(),
        "restored",
        &["--api-socket".into(), format!("path={}", socket.display())],
        &[],
    )
    .with_timeout(TIMEOUT)
    .with_serial(restored_log)
    .with_api_socket(socket.clone());
    vmm.wait_for_socket(&socket, TIMEOUT);
    api(
        &socket,
        "PUT",
        "vm.restore",
        &serde_json::json!({ "source_url": url, "resume": true }).to_string(),
    );
    let after = vmm.wait_serial("smpcheck lines after the restore", has_lines(LINES_AFTER));
    assert_all_continue(&before, &after);
    api(&socket, "PUT", "vmm.shutdown", "");
    assert_eq!(vmm.wait_exit_code(), 0, "{}", vmm.stderr_log());
}

#[test]
fn an_ap_not_yet_started_at_a_power_failure_waits_and_starts_after_recovery() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let region = dir.path().join("region");

    // The guest prints 50 waiting lines (about 5 s) before it sends INIT/SIPI.
    let mut vmm = spawn(
        dir.path(),
        "boot",
        &boot_arguments("start_delay=50", &region),
    );
    vmm.wait_serial("the guest waiting", |log| {
        log.contains("FAIL") || log.contains("smpcheck waiting 2\n")
    });
    let before = power_fail(&mut vmm);
    assert!(
        !before.contains("started") && !before.contains("FAIL"),
        "the AP started before the power failure:\n{before}"
    );

    let mut vmm = spawn(dir.path(), "recover", &recover_arguments(&region));
    let after = vmm.wait_serial("smpcheck lines after recovery", has_lines(LINES_AFTER));
    assert!(
        !after.contains("smpcheck: boot") && after.starts_with("smpcheck waiting"),
        "the guest did not continue its wait:\n{after}"
    );
    assert_aps_started(&after);
    assert_smp_counters_advance(&after, VCPUS, LINES_AFTER);
    power_fail(&mut vmm);
}
