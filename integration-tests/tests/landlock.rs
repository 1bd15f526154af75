//! `--landlock` end to end: a `cloud-hypervisor` process running the counter guest on an NV region
//! under Landlock cannot write a snapshot into a directory its rules do not name (while one its
//! `--landlock-rules` name works), cannot read a file outside its rules over the API, and an NV
//! power-fail save and the recovery in a new, also restricted, process still work. Real KVM.

use std::path::Path;
use std::time::Duration;

use integration_tests::api_client;
use integration_tests::harness::{counter_lines, guest_cmdline, scratch_dir};
use integration_tests::process::VmmProcess;
use vmm::nv::EXIT_POWER_FAIL_SAVED;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Spawns a VMM with its serial log and stderr captured to files in `dir`.
fn spawn(dir: &Path, label: &str, arguments: &[String]) -> VmmProcess {
    VmmProcess::spawn_with_serial_file(dir, label, arguments, &[]).with_timeout(TIMEOUT)
}

fn wait_counter_lines(vmm: &mut VmmProcess, lines: usize) -> String {
    vmm.wait_serial(&format!("{lines} counter lines"), |log| {
        counter_lines(log).len() >= lines
    })
}

fn api(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    api_client::request(socket, method, path, body, TIMEOUT)
}

/// `vm.snapshot` into `destination`, a directory it creates first.
fn snapshot_into(socket: &Path, destination: &Path) -> (u16, String) {
    std::fs::create_dir(destination).unwrap();
    let body = format!(
        r#"{{"destination_url":"file://{}"}}"#,
        destination.display()
    );
    api(socket, "PUT", "vm.snapshot", &body)
}

/// The directories the rules allow and do not allow, made in `dir`.
fn allowed_and_forbidden(dir: &Path) -> [std::path::PathBuf; 2] {
    ["allowed", "forbidden"].map(|name| {
        let path = dir.join(name);
        std::fs::create_dir(&path).unwrap();
        path
    })
}

/// Boots the counter guest as VM `vm` of `region` under `--landlock` with one rule, `allowed`
/// read-write, and an API socket; returns once it runs (two counter lines, the socket up).
fn boot_landlocked(
    dir: &Path,
    label: &str,
    region: &Path,
    vm: &str,
    socket: &Path,
    allowed: &Path,
) -> VmmProcess {
    let kernel = integration_tests::guests::guest_image("counter").expect("counter guest");
    let mut boot = spawn(
        dir,
        label,
        &[
            "--kernel".into(),
            kernel.display().to_string(),
            "--cmdline".into(),
            guest_cmdline("area_mb=1"),
            "--memory".into(),
            "size=32M".into(),
            "--nv".into(),
            format!("region={},vm={vm},create=on", region.display()),
            "--api-socket".into(),
            format!("path={}", socket.display()),
            "--landlock".into(),
            "--landlock-rules".into(),
            format!("path={},access=rw", allowed.display()),
        ],
    );
    wait_counter_lines(&mut boot, 2);
    boot.wait_for_socket(socket, TIMEOUT);
    boot
}

#[test]
fn landlock_confines_the_vmm_and_nv_power_fail_and_recovery_still_work() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    // The directory the rules allow, and one they do not.
    let [allowed, forbidden] = allowed_and_forbidden(dir.path());
    let secret = forbidden.join("secret");
    std::fs::write(&secret, b"not a region").unwrap();
    let region = dir.path().join("region");
    let socket = dir.path().join("api.sock");
    let mut boot = boot_landlocked(dir.path(), "boot", &region, "ll", &socket, &allowed);
    assert!(
        boot.stderr_log().contains("--landlock:") && boot.stderr_log().contains("rules enforced"),
        "{}",
        boot.stderr_log()
    );

    // Outside the rules: nothing can be created in the snapshot's directory, a file cannot be
    // read.
    assert_eq!(api(&socket, "PUT", "vm.pause", "").0, 204);
    let outside = forbidden.join("snap");
    let (status, body) = snapshot_into(&socket, &outside);
    assert!(status >= 400, "snapshot outside the rules: {status} {body}");
    assert!(body.contains("Permission denied"), "{body}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "the VMM created files in {}",
        outside.display()
    );
    let (status, body) = api(
        &socket,
        "GET",
        &format!("vmm.nv-regions?region={}", secret.display()),
        "",
    );
    assert!(status >= 400, "{status} {body}");
    assert!(body.contains("Permission denied"), "{body}");

    // Inside the --landlock-rules directory the same snapshot works.
    let inside = allowed.join("snap");
    let (status, body) = snapshot_into(&socket, &inside);
    assert_eq!(status, 204, "{body}");
    assert!(inside.join("state.json").is_file());
    assert_eq!(api(&socket, "PUT", "vm.resume", "").0, 204);
    wait_counter_lines(&mut boot, 3);

    // Power failure under Landlock: the save commits in place.
    boot.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "SIGPWR under Landlock");
    let last_before = counter_lines(&boot.serial_log())
        .last()
        .map(|line| line.counter)
        .unwrap();

    // Recovery in a new process, also under Landlock: the guest continues in place.
    let mut recover = spawn(
        dir.path(),
        "recover",
        &[
            "--nv".into(),
            format!("region={},vm=ll,recover=on", region.display()),
            "--landlock".into(),
        ],
    );
    let after = wait_counter_lines(&mut recover, 2);
    assert!(!after.contains("counter: boot"), "booted again:\n{after}");
    let first_after = counter_lines(&after).first().unwrap().counter;
    assert!(
        first_after > last_before,
        "{last_before} before, {first_after} after"
    );
    assert!(recover.stderr_log().contains("rules enforced"));
    recover.signal(libc::SIGTERM);
    assert_eq!(
        recover.wait_exit().code(),
        Some(0),
        "{}",
        recover.stderr_log()
    );
}

/// `vm.nv-swap-out` under `--landlock`: a destination its rules do not cover is refused with
/// the file system's "Permission denied" and nothing is left there; the VM stays resident and
/// keeps running. A destination inside its `--landlock-rules` works, and the VM swaps back in
/// (`--nv ...,swap-in=`, restricted too) and continues where it was.
#[test]
fn landlock_refuses_a_swap_out_outside_its_rules_and_the_vm_runs_on() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let [allowed, forbidden] = allowed_and_forbidden(dir.path());
    let region = dir.path().join("region");
    let socket = dir.path().join("api.sock");
    let mut boot = boot_landlocked(dir.path(), "swap-boot", &region, "sw", &socket, &allowed);
    let swap_out = |file: &Path| {
        let body = format!(r#"{{"destination_url":"file://{}"}}"#, file.display());
        api(&socket, "PUT", "vm.nv-swap-out", &body)
    };

    let outside = forbidden.join("sw.nvswap");
    let (status, body) = swap_out(&outside);
    assert!(status >= 400, "swap-out outside the rules: {status} {body}");
    assert!(body.contains("Permission denied"), "{body}");
    assert_eq!(
        std::fs::read_dir(&forbidden).unwrap().count(),
        0,
        "the VMM left files in {}",
        forbidden.display()
    );
    // Resident and running on: the counter advances, and the status says so.
    let lines = counter_lines(&boot.serial_log()).len();
    wait_counter_lines(&mut boot, lines + 2);
    let (status, body) = api(&socket, "GET", "vm.nv-status", "");
    assert_eq!(status, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(status.get("swap").is_none(), "{status}");

    let inside = allowed.join("sw.nvswap");
    let (status, body) = swap_out(&inside);
    assert_eq!(status, 204, "{body}");
    assert_eq!(boot.wait_exit().code(), Some(0), "{}", boot.stderr_log());
    assert!(inside.is_file());
    let last_before = counter_lines(&boot.serial_log())
        .last()
        .map(|line| line.counter)
        .unwrap();

    let mut back = spawn(
        dir.path(),
        "swap-in",
        &[
            "--nv".into(),
            format!(
                "region={},vm=sw,swap-in={}",
                region.display(),
                inside.display()
            ),
            "--landlock".into(),
            "--landlock-rules".into(),
            format!("path={},access=rw", allowed.display()),
        ],
    );
    let after = wait_counter_lines(&mut back, 2);
    assert!(!after.contains("counter: boot"), "booted again:\n{after}");
    let first_after = counter_lines(&after).first().unwrap().counter;
    assert!(
        first_after > last_before,
        "{last_before} before, {first_after} after"
    );
    assert!(!inside.exists(), "the swap file stays after the swap-in");
    back.signal(libc::SIGTERM);
    assert_eq!(back.wait_exit().code(), Some(0), "{}", back.stderr_log());
}
