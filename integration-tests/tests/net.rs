//! virtio-net end to end with the `cloud-hypervisor` binary on real KVM, inside a network
//! namespace the test creates (`ip netns add`, removed when the test ends, whatever happens):
//! the VMM runs in it (spawned from a thread that entered it), so the taps and addresses it
//! makes exist only there. Never skipped: a machine that cannot create a namespace or a tap
//! fails these tests loudly.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::harness::{
    assert_counter_advances, assert_early_checkpoints_never_failed, counter_lines, guest_arguments,
    guest_cmdline, scratch_dir, test_guest,
};
use integration_tests::netkv_client::TapStream;
use integration_tests::netkv_client::{KvClient, LoadConfig, LoadThread};
use integration_tests::netns::{
    inheritable_tap, netkv_guest_arguments, Netns, BASELINE_HOST, BASELINE_SENDER,
    BASELINE_SENDER_MAC, BASELINE_TAP, BASELINE_TAP_MAC, KV_GUEST, KV_GUEST_MAC, KV_TAP,
};
use integration_tests::process::{Stdout, VmmProcess};
use vmm::nv::EXIT_POWER_FAIL_SAVED;

const TIMEOUT: Duration = Duration::from_secs(30);

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
    assert!(
        !stderr.contains("seccomp: forbidden system call"),
        "seccomp trap:\n{stderr}"
    );
    vmm.serial_log()
}

/// The test's last power-fail save (SIGPWR, exit 75), with no seccomp trap in the VMM's life.
fn last_save(vmm: &mut VmmProcess) {
    let stderr = vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "last save");
    assert!(
        !stderr.contains("seccomp: forbidden system call"),
        "seccomp trap:\n{stderr}"
    );
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
    last_save(&mut vmm);
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

/// The netkv guest on `KV_TAP`.
fn netkv_tap_arguments() -> Vec<String> {
    let mut arguments = netkv_guest_arguments("");
    arguments.push("--net".into());
    arguments.push(format!("tap={KV_TAP},mac={KV_GUEST_MAC},num_queues=2"));
    arguments
}

/// The netkv guest on `KV_TAP`, with the NV region created (`create=on`).
fn netkv_boot_arguments(region: &Path) -> Vec<String> {
    let mut arguments = netkv_tap_arguments();
    arguments.push("--nv".into());
    arguments.push(format!("region={},vm=netvm,create=on", region.display()));
    arguments
}

const KV_WAIT: Duration = Duration::from_secs(30);

/// After the load (the guest still running): every answer checked clean, every acknowledged
/// PUT read back, one boot.
fn assert_every_acknowledged_put_kept(mut client: KvClient, serial_logs: &[String]) {
    let keys = client
        .read_back_all(KV_WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let ledger = &client.ledger;
    assert_eq!(ledger.violations, Vec::new(), "the client saw violations");
    assert_eq!(ledger.boot_ids.len(), 1, "boot ids {:?}", ledger.boot_ids);
    assert!(ledger.puts_acked > 0 && ledger.gets_checked > 0);
    assert!(keys > 0, "no key to read back");
    let boots: usize = serial_logs
        .iter()
        .map(|log| log.matches("netkv: boot").count())
        .sum();
    assert_eq!(boots, 1, "the guest booted {boots} times:\n{serial_logs:?}");
    eprintln!(
        "netkv: {} PUTs acknowledged, {} GETs checked, {keys} keys read back, {} retries",
        ledger.puts_acked, ledger.gets_checked, ledger.retries
    );
}

/// The probe's key, outside the load's keys (1..=512).
const PROBE_KEY: u64 = 1 << 40;

/// The PUT the probe sent while no VMM ran was acknowledged after the recovery (or restore),
/// as the `round`th version of its key, and reads back. This shows the outage was crossed; the
/// load itself may or may not have had a request in flight then (that depends on scheduling).
fn assert_probe_answered(probe: &mut KvClient, round: u64, what: &str) {
    probe.drain(KV_WAIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        probe.unanswered(),
        0,
        "{what}: the probe PUT was never answered"
    );
    assert_eq!(probe.ledger.acked.get(&PROBE_KEY), Some(&round), "{what}");
    probe
        .read_back_all(KV_WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(probe.ledger.violations, Vec::new(), "{what}");
}

fn netkv_ready(log: &str) -> bool {
    log.contains("netkv: ready") || log.contains("netkv: FAIL")
}

/// Waits until the netkv guest in `vmm` is ready; fails the test on its FAIL line.
fn wait_netkv_ready(vmm: &mut VmmProcess) {
    let log = vmm.wait_serial("netkv ready", netkv_ready);
    assert!(!log.contains("FAIL"), "{log}");
}

/// A client of the netkv guest with the default load (to be made in the namespace).
fn kv_client() -> KvClient {
    KvClient::new(KV_GUEST, LoadConfig::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// Where the power-failure and SIGKILL rounds start: netkv booted and ready
/// (`netkv_boot_arguments`, with `checkpoint_ms=` if given) on the tap of a new namespace
/// `label`, on the NV region `region` of a new scratch directory. Returns the namespace, the
/// directory, the VMM and two clients (the load's and the probe's).
fn start_netkv(
    label: &str,
    checkpoint_ms: Option<u64>,
) -> (Netns, tempfile::TempDir, VmmProcess, KvClient, KvClient) {
    let netns = Netns::new(label);
    netns.add_kv_tap().unwrap_or_else(|e| panic!("{e}"));
    let dir = scratch_dir();
    let dir_path = dir.path().to_path_buf();
    let (vmm, client, probe) = netns.run(move || {
        let mut arguments = netkv_boot_arguments(&dir_path.join("region"));
        if let (Some(interval), Some(nv)) = (checkpoint_ms, arguments.last_mut()) {
            nv.push_str(&format!(",checkpoint_ms={interval}"));
        }
        let mut vmm = spawn(&dir_path, "boot", &arguments);
        wait_netkv_ready(&mut vmm);
        (vmm, kv_client(), kv_client())
    });
    (netns, dir, vmm, client, probe)
}

/// Boots netkv on the namespace's tap, puts the client's load on it, power-fails and recovers
/// it in place `rounds` times (the tap reopened by name, or with `handover` a descriptor the
/// test opened handed over with `--net fd=`), then checks the client's ledger.
fn netkv_power_fail_rounds(label: &str, rounds: u64, handover: bool) {
    let started = Instant::now();
    let (netns, dir, mut vmm, client, mut probe) = start_netkv(label, None);
    let dir_path = dir.path().to_path_buf();
    let region = dir_path.join("region");
    eprintln!("{:?} netkv ready", started.elapsed());
    let load = LoadThread::start(client);
    let wait = |load: &LoadThread, what: &str| {
        assert!(
            load.wait_answers(2000, KV_WAIT),
            "{what}: no 2000 answers within {KV_WAIT:?}"
        )
    };
    wait(&load, "answers before the first power failure");
    let mut serial_logs = Vec::new();
    for round in 1..=rounds {
        eprintln!("{:?} power failure {round}", started.elapsed());
        serial_logs.push(power_fail(&mut vmm));
        // No VMM runs now: this PUT can only be answered by the recovered VM.
        probe.send_put(PROBE_KEY);
        let (dir_path, region) = (dir_path.clone(), region.clone());
        vmm = netns.run(move || {
            let label = format!("recover-{round}");
            if !handover {
                return spawn_recovery(&dir_path, &region, &label, Vec::new());
            }
            let tap = inheritable_tap(KV_TAP);
            let net = vec!["--net".into(), format!("fd={}", tap.as_raw_fd())];
            spawn_recovery(&dir_path, &region, &label, net)
            // The test's copy of the descriptor closes here; the VMM holds its own.
        });
        wait(&load, &format!("answers after recovery {round}"));
        assert_probe_answered(&mut probe, round, &format!("power failure {round}"));
        eprintln!("{:?} answering after recovery {round}", started.elapsed());
    }
    serial_logs.push(vmm.serial_log());
    let client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    assert_every_acknowledged_put_kept(client, &serial_logs);
    last_save(&mut vmm);
}

/// Issue 14's proof: the netkv database VM power-fails under a client's load three times in a
/// row and is recovered in place (its tap reopened by name) each time; the client resumes,
/// every PUT it saw acknowledged is still there (read back at the end), no GET ever returned a
/// version older than an acknowledged PUT, and the guest never booted again.
#[test]
fn netkv_keeps_every_acknowledged_put_across_three_power_failures() {
    integration_tests::require_kvm!();
    netkv_power_fail_rounds("kv", 3, false);
}

/// The same proof when an orchestrator hands the recovering VMM the tap as a descriptor
/// (`--net fd=N` on the recovery command line replaces the stored `tap=`), twice.
#[test]
fn netkv_keeps_every_acknowledged_put_with_the_tap_handed_over_on_recovery() {
    integration_tests::require_kvm!();
    netkv_power_fail_rounds("kvfd", 2, true);
}

/// Issue 16's network proof: netkv with checkpoints every 10 ms under the client's load, its
/// VMM killed without warning (SIGKILL, no save) `rounds` times at random instants and
/// recovered with `recover=on`, which rolls the guest back to its last committed epoch. Output
/// commit holds every answer until the epoch that produced it committed, so no acknowledged PUT
/// is ever taken back: every answer stays consistent with the acknowledgements before it, every
/// acknowledged key reads back with its value at the end, the probe PUT sent while no VMM ran is
/// answered after each recovery, and the guest never boots again. (Without the hold, an answer
/// leaves before its epoch commits and the rollback loses its PUT: the client reports it.)
#[test]
fn netkv_keeps_every_acknowledged_put_across_sigkills_with_checkpoints_on() {
    integration_tests::require_kvm!();
    let rounds = 4;
    let started = Instant::now();
    let (netns, dir, mut vmm, client, mut probe) = start_netkv("kvkill", Some(10));
    let dir_path = dir.path().to_path_buf();
    let region = dir_path.join("region");
    let load = LoadThread::start(client);
    let wait = |load: &LoadThread, what: &str| {
        assert!(
            load.wait_answers(1000, KV_WAIT),
            "{what}: no 1000 answers within {KV_WAIT:?}"
        )
    };
    wait(&load, "answers before the first kill");
    let mut serial_logs = Vec::new();
    let mut seed = u64::from(std::process::id()) | 1;
    let api_socket = dir_path.join("api.sock");
    for round in 1..=rounds {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(seed % 100));
        eprintln!("{:?} SIGKILL {round}", started.elapsed());
        vmm.signal(libc::SIGKILL);
        let status = vmm.wait_exit();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "round {round}: the VMM ended before the kill ({status})\n{}",
            vmm.stderr_log()
        );
        serial_logs.push(vmm.serial_log());
        // No VMM runs now: this PUT can only be answered by the recovered VM.
        probe.send_put(PROBE_KEY);
        let (dir_path, region) = (dir_path.clone(), region.clone());
        let api = vec!["--api-socket".into(), api_socket.display().to_string()];
        let _ = std::fs::remove_file(&api_socket);
        vmm =
            netns.run(move || spawn_recovery(&dir_path, &region, &format!("recover-{round}"), api));
        wait(&load, &format!("answers after recovery {round}"));
        assert_probe_answered(&mut probe, round, &format!("SIGKILL {round}"));
        let stderr = vmm.stderr_log();
        assert!(
            stderr.contains("checkpoint state"),
            "round {round}: not recovered from a checkpoint:\n{stderr}"
        );
    }
    let client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    // What holding answers until their epoch commits costs a client: one PUT at a time.
    let held = put_round_trips(&mut probe, 40);
    let (status, body) = integration_tests::api_client::request(
        &api_socket,
        "PUT",
        "vm.nv-checkpoint",
        r#"{"interval_ms":0}"#,
        KV_WAIT,
    );
    assert_eq!(status, 204, "{body}");
    let direct = put_round_trips(&mut probe, 40);
    eprintln!(
        "PUT round trip, median (max): {:.2} ms ({:.2} ms) with checkpoint_ms=10 and output \
         commit, {:.2} ms ({:.2} ms) with checkpoints off",
        held.0, held.1, direct.0, direct.1
    );
    serial_logs.push(vmm.serial_log());
    assert_every_acknowledged_put_kept(client, &serial_logs);
    last_save(&mut vmm);
    eprintln!("{:?} done", started.elapsed());
}

/// Issue 16's second edge: a device thread blocked on a write fault when the undo log is full.
/// The test build's `NV_UNDO_LIMIT_PAGES=8` gives every epoch a log of 8 entries, so under the
/// client's load the netkv guest's vCPU and the virtio-net thread (writing receive buffers)
/// keep running into a full log, and early checkpoints follow one another. A device thread
/// logs a request's pages before it writes any and, when they do not fit, waits for the next
/// epoch between requests, where a checkpoint can quiesce it. No checkpoint may fail (a device
/// pause would time out after 10 s), the load goes on, and the guest answers consistently.
#[test]
fn netkv_under_load_with_a_tiny_undo_log_checkpoints_early_without_a_device_deadlock() {
    integration_tests::require_kvm!();
    let netns = Netns::new("kvtiny");
    netns.add_kv_tap().unwrap_or_else(|e| panic!("{e}"));
    let dir = scratch_dir();
    let dir_path = dir.path().to_path_buf();
    let region = dir_path.join("region");
    let api_socket = dir_path.join("api.sock");
    let socket = api_socket.clone();
    let (mut vmm, client) = netns.run(move || {
        let mut arguments = netkv_boot_arguments(&region);
        arguments.extend(["--api-socket".into(), socket.display().to_string()]);
        let mut vmm = VmmProcess::spawn_with_serial_file(
            &dir_path,
            "boot",
            &arguments,
            &[("NV_UNDO_LIMIT_PAGES", "8")],
        )
        .with_timeout(TIMEOUT)
        .with_api_socket(socket);
        wait_netkv_ready(&mut vmm);
        (vmm, kv_client())
    });
    let load = LoadThread::start(client);
    assert!(
        load.wait_answers(500, KV_WAIT),
        "no answers before checkpoints"
    );
    // Checkpoints on under load (the guest's boot, emulated ring-0 code, would crawl through
    // hundreds of eight-page epochs).
    let (status, body) = integration_tests::api_client::request(
        &api_socket,
        "PUT",
        "vm.nv-checkpoint",
        r#"{"interval_ms":1000}"#,
        KV_WAIT,
    );
    assert_eq!(status, 204, "{body}");
    wait_answers_or_explain(&load, 2000, &vmm, &api_socket);
    let client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    let early = assert_early_checkpoints_never_failed(&vmm);
    assert_every_acknowledged_put_kept(client, &[vmm.serial_log()]);
    eprintln!("{early} early checkpoints");
    vmm.kill();
}

/// Waits for `more` answers of `load` within `KV_WAIT`. A timeout fails with what tells a
/// stall from a slow host: how many answers came and how long ago the last one did, the early
/// checkpoints so far, `vm.nv-status`, and what the VMM's threads and vCPUs were doing
/// ([`VmmProcess::hang_report`]). (At a load of 12 on this host 2000 answers took 1.3 to 5.3 s,
/// 2500 to 3800 early checkpoints, no gap between two of them above 0.1 s.)
fn wait_answers_or_explain(load: &LoadThread, more: u64, vmm: &VmmProcess, api_socket: &Path) {
    let started = Instant::now();
    let first = load.answers();
    let (mut seen, mut last_answer) = (first, started);
    while seen < first + more {
        std::thread::sleep(Duration::from_millis(5));
        let answers = load.answers();
        if answers > seen {
            (seen, last_answer) = (answers, Instant::now());
        }
        if started.elapsed() < KV_WAIT {
            continue;
        }
        let early = vmm.stderr_log().matches("checkpointing early").count();
        let status = integration_tests::api_client::try_exchange(
            api_socket,
            &integration_tests::api_client::request_bytes("GET", "vm.nv-status", ""),
            Duration::from_secs(5),
        )
        .map_or_else(|e| e.to_string(), |answer| answer.body);
        panic!(
            "{} of {more} answers within {KV_WAIT:?}, the last one {:?} ago; {early} early \
             checkpoints\nvm.nv-status: {status}\n{}\n{}",
            seen - first,
            last_answer.elapsed(),
            vmm.stderr_tail(20),
            vmm.hang_report()
        );
    }
}

/// The median and the longest of `count` PUT round trips of `client`, one at a time, in ms.
fn put_round_trips(client: &mut KvClient, count: usize) -> (f64, f64) {
    let mut times: Vec<f64> = (0..count)
        .map(|_| {
            let sent = Instant::now();
            client.send_put(PROBE_KEY);
            client.drain(KV_WAIT).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(client.unanswered(), 0, "a PUT was never answered");
            sent.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[count / 2], times[count - 1])
}

/// netkv under a burst larger than its transmit ring (64): a pass that answers more requests
/// than the ring holds must tell the device about the frames already posted before it waits
/// for room (it once waited for a device it had not notified, and failed "transmit queue
/// stuck" 30 s later).
#[test]
fn netkv_answers_bursts_larger_than_its_transmit_ring() {
    integration_tests::require_kvm!();
    let netns = Netns::new("kvburst");
    netns.add_kv_tap().unwrap_or_else(|e| panic!("{e}"));
    let dir = scratch_dir();
    let dir_path = dir.path().to_path_buf();
    let (mut vmm, client) = netns.run(move || {
        let region = dir_path.join("region");
        let mut vmm = spawn(&dir_path, "boot", &netkv_boot_arguments(&region));
        wait_netkv_ready(&mut vmm);
        let config = LoadConfig {
            rate: 100_000,
            window: 240,
            ..LoadConfig::default()
        };
        let client = KvClient::new(KV_GUEST, config).unwrap_or_else(|e| panic!("{e}"));
        (vmm, client)
    });
    let load = LoadThread::start(client);
    let answered = load.wait_answers(20_000, KV_WAIT);
    let client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    let log = vmm.serial_log();
    assert!(answered, "20000 answers not reached:\n{log}");
    assert!(!log.contains("FAIL"), "{log}");
    assert_every_acknowledged_put_kept(client, &[log]);
    vmm.kill();
}

/// nv-bench's throughput pair, checked for what it delivers: netkv streams datagrams to the
/// host through virtio-net (every one arrives, whole, at the size asked for), and frames
/// written into a second tap by the host alone (the baseline) reach a socket the same way.
#[test]
fn netkv_streams_to_the_host_and_the_tap_baseline_delivers_the_same_datagrams() {
    integration_tests::require_kvm!();
    let netns = Netns::new("kvstream");
    netns.add_kv_tap().unwrap_or_else(|e| panic!("{e}"));
    netns.add_baseline_tap().unwrap_or_else(|e| panic!("{e}"));
    let dir = scratch_dir();
    let dir_path = dir.path().to_path_buf();
    let (mut vmm, guest, baseline) = netns.run(move || {
        let region = dir_path.join("region");
        let mut vmm = spawn(&dir_path, "boot", &netkv_boot_arguments(&region));
        wait_netkv_ready(&mut vmm);
        let mut client = kv_client();
        let guest = client
            .stream_from_guest(20_000, 1000)
            .unwrap_or_else(|e| panic!("{e}"));
        let stream = TapStream {
            tap_mac: BASELINE_TAP_MAC,
            sender_mac: BASELINE_SENDER_MAC,
            sender: BASELINE_SENDER,
            receiver: BASELINE_HOST,
        };
        let baseline = stream
            .run(inheritable_tap(BASELINE_TAP), 20_000, 1000)
            .unwrap_or_else(|e| panic!("{e}"));
        (vmm, guest, baseline)
    });
    eprintln!("guest {guest:?}, baseline {baseline:?}");
    assert_eq!(guest.received, 20_000, "{guest:?}\n{}", vmm.serial_log());
    assert_eq!(baseline.sent, 20_000, "{baseline:?}");
    assert_eq!(baseline.received, 20_000, "{baseline:?}");
    assert!(guest.packets_per_s() > 0.0 && baseline.packets_per_s() > 0.0);
    vmm.kill();
}

/// Issue 14.2 for `vm.snapshot` / `vm.restore`: netkv under the client's load is paused and
/// snapshotted, its VMM killed, and a new VMM restores it on the same tap (reopened by the name
/// in the snapshot's config); the client resumes, every acknowledged PUT is still there and the
/// guest did not boot again.
#[test]
fn netkv_keeps_every_acknowledged_put_across_snapshot_and_restore() {
    integration_tests::require_kvm!();
    let netns = Netns::new("kvsnap");
    netns.add_kv_tap().unwrap_or_else(|e| panic!("{e}"));
    let dir = scratch_dir();
    let dir_path = dir.path().to_path_buf();
    let socket = dir_path.join("api.sock");
    let snapshot = dir_path.join("snapshot");
    std::fs::create_dir(&snapshot).unwrap();

    let (mut vmm, client, mut probe) = {
        let (dir_path, socket) = (dir_path.clone(), socket.clone());
        netns.run(move || {
            let mut arguments = netkv_tap_arguments();
            arguments.extend(["--api-socket".into(), format!("path={}", socket.display())]);
            let mut vmm = spawn(&dir_path, "boot", &arguments);
            wait_netkv_ready(&mut vmm);
            (vmm, kv_client(), kv_client())
        })
    };
    let load = LoadThread::start(client);
    assert!(
        load.wait_answers(2000, KV_WAIT),
        "no answers before the snapshot"
    );
    let api = |endpoint: &str, body: &str| {
        let (status, answer) =
            integration_tests::api_client::request(&socket, "PUT", endpoint, body, TIMEOUT);
        assert!(
            (200..300).contains(&status),
            "{endpoint}: {status} {answer}"
        );
    };
    api("vm.pause", "");
    let body = format!(r#"{{"destination_url":"file://{}"}}"#, snapshot.display());
    api("vm.snapshot", &body);
    let serial = dir_path.join("boot.serial");
    let before = vmm.serial_log();
    vmm.kill();
    probe.send_put(PROBE_KEY);

    let mut vmm = {
        let (dir_path, snapshot, serial) = (dir_path.clone(), snapshot.clone(), serial.clone());
        netns.run(move || {
            let restore = format!("source_url=file://{},resume=true", snapshot.display());
            VmmProcess::spawn(&dir_path, "restore", &["--restore".into(), restore], &[])
                .with_serial(serial)
                .with_timeout(TIMEOUT)
        })
    };
    assert!(
        load.wait_answers(2000, KV_WAIT),
        "no answers after the restore:\n{}",
        vmm.stderr_tail(20)
    );
    assert_probe_answered(&mut probe, 1, "the snapshot and restore");
    let client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    let after = vmm.serial_log().replace(&before, "");
    assert_every_acknowledged_put_kept(client, &[before, after]);
    vmm.kill();
}

/// Issue 17 for networks: our `nv-vhost-user-net` bridging the namespace's tap, started in the
/// namespace; with `connect` it connects to the VMM's socket (`vhost_mode=server`) instead of
/// listening (then nothing is waited for here).
fn start_vhost_user_net(dir: &Path, socket: &Path, connect: bool, label: &str) -> VmmProcess {
    start_vhost_user_net_with(dir, socket, connect, label, &[])
}

/// [`start_vhost_user_net`] with `extra` arguments for the backend.
fn start_vhost_user_net_with(
    dir: &Path,
    socket: &Path,
    connect: bool,
    label: &str,
    extra: &[&str],
) -> VmmProcess {
    let mut arguments = vec![
        "--socket".to_string(),
        socket.display().to_string(),
        "--tap".to_string(),
        KV_TAP.to_string(),
    ];
    arguments.extend(extra.iter().map(|a| a.to_string()));
    if connect {
        arguments.push("--client".into());
    } else {
        let _ = std::fs::remove_file(socket);
    }
    let binary = integration_tests::binaries::nv_vhost_user_net();
    let log = dir.join(format!("backend-{label}.log"));
    let mut process = VmmProcess::start(&binary, &arguments, &[], &log, Stdout::Log)
        .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
    if !connect {
        process.wait_for_socket_file(socket, TIMEOUT);
    }
    process
}

/// The netkv guest on a vhost-user-net device whose backend is at `socket`.
fn netkv_vhost_user_arguments(region: &Path, socket: &Path, mode: &str) -> Vec<String> {
    let mut arguments = netkv_guest_arguments("");
    arguments.push("--net".into());
    arguments.push(format!(
        "vhost_user=true,socket={},vhost_mode={mode},mac={KV_GUEST_MAC}",
        socket.display()
    ));
    arguments.push("--nv".into());
    arguments.push(format!("region={},vm=netvm,create=on", region.display()));
    arguments
}

/// The netkv VM on vhost-user-net under a client's load, in a new namespace: the VMM, the
/// backend, the load and the probe.
struct VhostUserNetkv {
    netns: Netns,
    dir: tempfile::TempDir,
    region: std::path::PathBuf,
    socket: std::path::PathBuf,
    vmm: VmmProcess,
    backend: VmmProcess,
    load: LoadThread,
    probe: KvClient,
    serial_logs: Vec<String>,
}

impl VhostUserNetkv {
    /// Boots it (`server`: the VMM listens and the backend connects) and waits for 2000
    /// answers.
    fn start(label: &str, server: bool) -> Self {
        let netns = Netns::new(label);
        netns.add_kv_tap().unwrap_or_else(|e| panic!("{e}"));
        let dir = scratch_dir();
        let region = dir.path().join("region");
        let socket = dir.path().join("net.sock");
        let (dir_path, region_path, socket_path) =
            (dir.path().to_path_buf(), region.clone(), socket.clone());
        let (vmm, backend, client, probe) = netns.run(move || {
            let mode = if server { "server" } else { "client" };
            let arguments = netkv_vhost_user_arguments(&region_path, &socket_path, mode);
            let (mut vmm, backend) = if server {
                // The VMM creates the socket and waits for the backend.
                let vmm = spawn(&dir_path, "boot", &arguments);
                let backend = start_vhost_user_net(&dir_path, &socket_path, true, "0");
                (vmm, backend)
            } else {
                let backend = start_vhost_user_net(&dir_path, &socket_path, false, "0");
                (spawn(&dir_path, "boot", &arguments), backend)
            };
            wait_netkv_ready(&mut vmm);
            (vmm, backend, kv_client(), kv_client())
        });
        let load = LoadThread::start(client);
        let netkv = VhostUserNetkv {
            netns,
            dir,
            region,
            socket,
            vmm,
            backend,
            load,
            probe,
            serial_logs: Vec::new(),
        };
        netkv.wait_answers("before the first power failure");
        netkv
    }

    fn wait_answers(&self, what: &str) {
        assert!(
            self.load.wait_answers(2000, KV_WAIT),
            "{what}: no 2000 answers within {KV_WAIT:?}:\n{}",
            self.vmm.stderr_tail(20)
        );
    }

    /// Power-fails the VM under load and sends the probe PUT while no VMM runs.
    fn power_fail(&mut self) {
        let log = power_fail(&mut self.vmm);
        self.serial_logs.push(log);
        self.probe.send_put(PROBE_KEY);
    }

    /// Starts a recovery in place from the stored config (which names the socket).
    fn spawn_recovery(&self, label: &str) -> VmmProcess {
        let (dir_path, region) = (self.dir.path().to_path_buf(), self.region.clone());
        let label = label.to_owned();
        self.netns
            .run(move || spawn_recovery(&dir_path, &region, &label, Vec::new()))
    }

    /// Restarts the backend (a new process that knows nothing of the rings).
    fn restart_backend(&mut self, label: &str, connect: bool) {
        self.backend.kill();
        let (dir_path, socket) = (self.dir.path().to_path_buf(), self.socket.clone());
        let label = label.to_owned();
        self.backend = self
            .netns
            .run(move || start_vhost_user_net(&dir_path, &socket, connect, &label));
    }

    /// The recovered VM answers the load and the probe (the `round`th PUT of its key).
    fn recovered(&mut self, vmm: VmmProcess, round: u64) {
        self.vmm = vmm;
        self.wait_answers(&format!("after recovery {round}"));
        assert_probe_answered(&mut self.probe, round, &format!("power failure {round}"));
    }

    /// Every acknowledged PUT kept, one boot, no seccomp trap, no backend panic.
    fn finish(mut self) {
        self.serial_logs.push(self.vmm.serial_log());
        let client = self.load.stop().unwrap_or_else(|e| panic!("{e}"));
        assert_every_acknowledged_put_kept(client, &self.serial_logs);
        let stderr =
            self.vmm
                .signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "last save");
        assert!(
            !stderr.contains("seccomp: forbidden system call"),
            "seccomp trap:\n{stderr}"
        );
        let backend_log = self.backend.stderr_log();
        assert!(!backend_log.contains("panicked"), "{backend_log}");
        self.backend.kill();
    }
}

/// Issue 17's proof for networks: netkv on `--net vhost_user=true` (the VMM connects to our
/// `nv-vhost-user-net`) is power-failed under a client's load and recovered in place twice:
/// once with the backend restarted (the recovery sends it the memory table and the saved ring
/// positions), once with the backend gone at recovery (a clear error naming the socket, exit
/// 1, the VM not run) and then back. Every acknowledged PUT is kept, the probe PUT sent while
/// no VMM ran is answered each time, the guest never boots again.
#[test]
fn netkv_over_vhost_user_net_survives_power_failures_and_a_backend_restart() {
    integration_tests::require_kvm!();
    let mut netkv = VhostUserNetkv::start("vu", false);
    let socket = netkv.socket.display().to_string();

    netkv.power_fail();
    netkv.restart_backend("1", false);
    let vmm = netkv.spawn_recovery("recover-1");
    netkv.recovered(vmm, 1);

    netkv.power_fail();
    netkv.backend.kill();
    let _ = std::fs::remove_file(&netkv.socket);
    let started = Instant::now();
    let mut absent = netkv.spawn_recovery("absent");
    let stderr = absent.expect_exit(1, "recovery without its backend");
    assert!(
        stderr.contains(&socket) && stderr.contains("cannot connect"),
        "no error naming the socket:\n{stderr}"
    );
    assert!(started.elapsed() < KV_WAIT, "the retry is not bounded");
    assert!(!stderr.contains("panicked"), "{stderr}");
    netkv.restart_backend("2", false);
    let vmm = netkv.spawn_recovery("recover-2");
    netkv.recovered(vmm, 2);
    netkv.finish();
}

/// `vhost_mode=server`: the VMM creates the socket and the backend connects to it. After a
/// power failure the recovering VMM listens again and the same backend process, which saw its
/// front-end go and kept retrying, connects; the guest continues with nothing lost.
#[test]
fn netkv_over_vhost_user_net_in_server_mode_recovers_with_the_backend_reconnecting() {
    integration_tests::require_kvm!();
    let mut netkv = VhostUserNetkv::start("vusrv", true);
    netkv.power_fail();
    let vmm = netkv.spawn_recovery("recover-1");
    netkv.recovered(vmm, 1);
    let backend_log = netkv.backend.stderr_log();
    assert!(
        backend_log.matches("connected to").count() >= 2,
        "the backend did not reconnect:\n{backend_log}"
    );
    netkv.finish();
}

/// `vm.info`'s `pci_bdf` of device `id` (on its parent node, the function `_virtio-pci-<id>`,
/// as upstream lists it), and its entry in `config.net`.
fn net_in_info(api: &Path, id: &str) -> (Option<String>, Option<serde_json::Value>) {
    let (status, body) = integration_tests::api_client::request(api, "GET", "vm.info", "", TIMEOUT);
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    let function = &info["device_tree"][format!("_virtio-pci-{id}")];
    assert_eq!(function["children"][0], id, "{function}");
    let bdf = function["pci_bdf"].as_str().map(str::to_owned);
    let config = info["config"]["net"]
        .as_array()
        .and_then(|nets| nets.iter().find(|net| net["id"] == id).cloned());
    (bdf, config)
}

/// The counter guest as NV VM `netvm` of `region`, with its API at `api`, once it counts.
fn boot_counter_with_api(dir: &Path, region: &Path, api: &Path) -> VmmProcess {
    let kernel = test_guest("counter");
    let arguments = vec![
        "--kernel".into(),
        kernel.display().to_string(),
        "--cmdline".into(),
        guest_cmdline(""),
        "--memory".into(),
        "size=32M".into(),
        "--api-socket".into(),
        format!("path={}", api.display()),
        "--nv".into(),
        format!("region={},vm=netvm,create=on", region.display()),
    ];
    let mut vmm = spawn(dir, "boot", &arguments);
    vmm.wait_for_socket(api, TIMEOUT);
    vmm.wait_serial("a counter line", has_counter_line);
    vmm
}

/// Issue 17's hotplug for networks: `ch-remote add-net vhost_user=true,socket=` on a running NV
/// VM connects to `nv-vhost-user-net` and plugs the function; the net device is in the config
/// with its socket and comes back at its BDF after a power failure, the recovering VMM
/// reconnecting to the same backend process.
#[test]
fn a_hotplugged_vhost_user_net_device_is_back_after_a_power_failure() {
    integration_tests::require_kvm!();
    let netns = Netns::new("vuhp");
    netns.add_kv_tap().unwrap_or_else(|e| panic!("{e}"));
    let dir = scratch_dir();
    let (dir_path, region) = (dir.path().to_path_buf(), dir.path().join("region"));
    let socket = dir_path.join("net.sock");
    let api = dir_path.join("api.sock");
    let mut backend = {
        let (dir_path, socket) = (dir_path.clone(), socket.clone());
        netns.run(move || start_vhost_user_net(&dir_path, &socket, false, "0"))
    };
    let mut vmm = boot_counter_with_api(&dir_path, &region, &api);
    let output = integration_tests::harness::run_ch_remote(
        &api,
        &[
            "add-net",
            &format!(
                "vhost_user=true,socket={},mac={KV_GUEST_MAC},id=vnet0",
                socket.display()
            ),
        ],
    );
    assert!(output.status.success(), "add-net: {output:?}");
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["id"], "vnet0", "{answer}");
    let bdf = answer["bdf"].as_str().unwrap().to_owned();
    let (listed, config) = net_in_info(&api, "vnet0");
    assert_eq!(listed.as_deref(), Some(bdf.as_str()));
    let config = config.expect("vnet0 in config.net");
    assert_eq!(config["vhost_user"], true, "{config}");
    assert_eq!(
        config["vhost_socket"],
        socket.display().to_string(),
        "{config}"
    );
    let log = power_fail(&mut vmm);

    let recover_api = dir_path.join("recovered.sock");
    let recover = vec![
        "--api-socket".into(),
        format!("path={}", recover_api.display()),
    ];
    let mut vmm = spawn_recovery(&dir_path, &region, "recovered", recover);
    vmm.wait_for_socket(&recover_api, TIMEOUT);
    wait_continues(&mut vmm, &log);
    let (listed, _) = net_in_info(&recover_api, "vnet0");
    assert_eq!(listed.as_deref(), Some(bdf.as_str()), "not back at {bdf}");
    let backend_log = backend.stderr_log();
    assert!(
        backend_log.contains("waiting for the next"),
        "the backend did not see the first VMM go:\n{backend_log}"
    );
    vmm.kill();
    backend.kill();
}

/// `vm.add-net` in `vhost_mode=server` on a running VM: the VMM listens (on the worker thread
/// that waits for backends, under the VMM's seccomp filter) until `nv-vhost-user-net --client`
/// connects, then plugs the function. The listen socket is made non-blocking with `fcntl`:
/// before, std's FIONBIO ioctl was not in the filter and the VMM was killed (SIGSYS).
#[test]
fn a_vhost_user_net_device_is_hotplugged_in_server_mode() {
    integration_tests::require_kvm!();
    let netns = Netns::new("vuhs");
    netns.add_kv_tap().unwrap_or_else(|e| panic!("{e}"));
    let dir = scratch_dir();
    let (dir_path, region) = (dir.path().to_path_buf(), dir.path().join("region"));
    let socket = dir_path.join("net.sock");
    let api = dir_path.join("api.sock");
    let mut vmm = boot_counter_with_api(&dir_path, &region, &api);
    let adding = {
        let api = api.clone();
        let body = format!(
            "{{\"vhost_user\":true,\"vhost_socket\":\"{}\",\"vhost_mode\":\"Server\",\
             \"mac\":\"{KV_GUEST_MAC}\",\"id\":\"vsrv0\"}}",
            socket.display()
        );
        std::thread::spawn(move || {
            integration_tests::api_client::request(&api, "PUT", "vm.add-net", &body, TIMEOUT)
        })
    };
    vmm.wait_stderr("the VMM listening for the backend", |log| {
        log.contains("waiting up to")
    });
    let mut backend = {
        let (dir_path, socket) = (dir_path.clone(), socket.clone());
        netns.run(move || start_vhost_user_net(&dir_path, &socket, true, "0"))
    };
    let (status, answer) = adding.join().unwrap();
    assert_eq!(status, 200, "{answer}\n{}", vmm.stderr_tail(20));
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let bdf = answer["bdf"].as_str().unwrap().to_owned();
    let (listed, config) = net_in_info(&api, "vsrv0");
    assert_eq!(listed.as_deref(), Some(bdf.as_str()));
    let config = config.expect("vsrv0 in config.net");
    assert_eq!(config["vhost_mode"], "Server", "{config}");
    assert!(vmm.try_wait().is_none(), "{}", vmm.stderr_tail(20));
    vmm.kill();
    backend.kill();
}

/// The requests each pair of a multiqueue netkv served, from its last report line
/// (`pair_served=a,b`); `None` before one is there.
fn pair_served(log: &str) -> Option<Vec<u64>> {
    let line = log.lines().rev().find(|l| l.contains("pair_served="))?;
    let list = line
        .split("pair_served=")
        .nth(1)?
        .split_whitespace()
        .next()?;
    list.split(',').map(|n| n.parse().ok()).collect()
}

/// Clients on distinct UDP ports (distinct flows, which the kernel spreads over the tap's
/// queues by hash) each PUT their key once more; every PUT is answered.
fn put_from_many_flows(clients: &mut [KvClient], what: &str) {
    for (i, client) in clients.iter_mut().enumerate() {
        client.send_put(MQ_KEY_BASE + i as u64);
    }
    for (i, client) in clients.iter_mut().enumerate() {
        client
            .drain(KV_WAIT)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            client.unanswered(),
            0,
            "{what}: client {i}'s PUT unanswered"
        );
        assert_eq!(client.ledger.violations, Vec::new(), "{what}: client {i}");
    }
}

/// Keys of the multiqueue test's clients (one each).
const MQ_KEY_BASE: u64 = 0x6d71_0000;
/// Flows the multiqueue test sends from: all of them land on one of two tap queues with a
/// probability of 2^-15.
const MQ_FLOWS: usize = 16;

/// The netkv guest with two queue pairs (`pairs=2 report_ms=200` and `parameters`) on
/// `memory`, with the NV region or API socket `extra` names and, unless it is plugged later, a
/// 4-queue vhost-user-net device whose backend is at `socket`.
fn netkv_two_pairs_arguments(
    parameters: &str,
    memory: &str,
    socket: Option<&Path>,
    extra: [String; 2],
) -> Vec<String> {
    let mut arguments = guest_arguments(
        "netkv",
        &format!(
            "ip={} port={} pairs=2 report_ms=200 {parameters}",
            KV_GUEST.ip(),
            KV_GUEST.port()
        ),
        memory,
    );
    if let Some(socket) = socket {
        arguments.push("--net".into());
        arguments.push(format!(
            "vhost_user=true,socket={},num_queues=4,mac={KV_GUEST_MAC}",
            socket.display()
        ));
    }
    arguments.extend(extra);
    arguments
}

/// Our `nv-vhost-user-net` with 4 queues (two pairs), listening at `socket`.
fn start_two_pair_backend(dir: &Path, socket: &Path, label: &str) -> VmmProcess {
    start_vhost_user_net_with(dir, socket, false, label, &["--num-queues", "4"])
}

/// Waits until netkv in `vmm` is ready with its two pairs acknowledged by the control queue.
fn wait_two_pairs_acknowledged(vmm: &mut VmmProcess) {
    let log = vmm.wait_serial("netkv ready", netkv_ready);
    assert!(!log.contains("FAIL"), "{log}");
    assert!(log.contains("netkv: pairs=2 acknowledged"), "{log}");
}

/// The `MQ_FLOWS` clients (to be made in the namespace).
fn flow_clients() -> Vec<KvClient> {
    (0..MQ_FLOWS).map(|_| kv_client()).collect()
}

/// Where the two-pair tests start: a new namespace `label` with a multi-queue tap, a scratch
/// directory and in it the paths of the backend's and the API's sockets.
fn two_pair_scratch(label: &str) -> (Netns, tempfile::TempDir, PathBuf, PathBuf) {
    let netns = Netns::new(label);
    netns
        .add_kv_tap_multi_queue()
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = scratch_dir();
    let socket = dir.path().join("net.sock");
    let api = dir.path().join("api.sock");
    (netns, dir, socket, api)
}

/// Waits until both pairs served requests; the serial log then.
fn wait_both_pairs_serving(vmm: &mut VmmProcess) -> String {
    vmm.wait_serial("both pairs serving", |log| {
        pair_served(log).is_some_and(|served| served.len() == 2 && served.iter().all(|&n| n > 0))
    })
}

/// Waits until both pairs served more than `before` (the counts of an earlier run of the
/// guest); the serial log then.
fn wait_both_pairs_serving_again(vmm: &mut VmmProcess, before: &[u64]) -> String {
    vmm.wait_serial("both pairs serving again", |log| {
        pair_served(log).is_some_and(|served| {
            served.len() == 2 && served.iter().zip(before).all(|(now, was)| now > was)
        })
    })
}

/// Multiqueue vhost-user-net (issue 17): `num_queues=4` with our `nv-vhost-user-net` on a
/// multi-queue tap. netkv with pairs=2 negotiates MQ and CTRL_VQ, sends VQ_PAIRS_SET 2 on the
/// control queue the VMM serves (acknowledged) and answers requests from 16 flows, which the
/// kernel spreads over both tap queues: both pairs serve some. Then SIGPWR, the backend is
/// restarted (a new process, a new session), the VM recovered in place: the saved pair count
/// switches both pairs' rings on again from the saved bases, and the same flows are answered
/// on both pairs again, without the guest booting again or resetting the device.
#[test]
fn multiqueue_vhost_user_net_serves_both_pairs_across_a_power_failure_and_a_backend_restart() {
    integration_tests::require_kvm!();
    let (netns, dir, socket, _api) = two_pair_scratch("vumq");
    let region = dir.path().join("region");
    let (dir_path, region_path, socket_path) =
        (dir.path().to_path_buf(), region.clone(), socket.clone());
    let (mut vmm, mut backend, mut clients) = netns.run(move || {
        let backend = start_two_pair_backend(&dir_path, &socket_path, "0");
        let nv = [
            "--nv".into(),
            format!("region={},vm=netvm,create=on", region_path.display()),
        ];
        let arguments = netkv_two_pairs_arguments("", "64M", Some(&socket_path), nv);
        let mut vmm = spawn(&dir_path, "boot", &arguments);
        wait_two_pairs_acknowledged(&mut vmm);
        let clients = flow_clients();
        (vmm, backend, clients)
    });
    put_from_many_flows(&mut clients, "before the power failure");
    let before = wait_both_pairs_serving(&mut vmm);
    let served_before = pair_served(&before).unwrap();
    let stderr = vmm.stderr_log();
    assert!(
        stderr.contains("the driver uses 2 of 2 queue pairs"),
        "{stderr}"
    );

    let before = power_fail(&mut vmm);
    let served_before = pair_served(&before).unwrap_or(served_before);
    backend.kill();
    let (dir_path, region_path, socket_path) =
        (dir.path().to_path_buf(), region.clone(), socket.clone());
    let (mut vmm, mut backend) = netns.run(move || {
        let backend = start_two_pair_backend(&dir_path, &socket_path, "1");
        (
            spawn_recovery(&dir_path, &region_path, "recover", Vec::new()),
            backend,
        )
    });
    put_from_many_flows(&mut clients, "after the recovery");
    let after = wait_both_pairs_serving_again(&mut vmm, &served_before);
    assert!(
        !after.contains("netkv: boot") && !after.contains("netkv: ready"),
        "the guest booted again instead of continuing:\n{after}"
    );
    assert!(!after.contains("FAIL"), "{after}");
    let stderr = vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "last save");
    assert!(
        !stderr.contains("seccomp: forbidden system call"),
        "seccomp trap:\n{stderr}"
    );
    let backend_log = backend.stderr_log();
    assert!(!backend_log.contains("panicked"), "{backend_log}");
    backend.kill();
}

/// Multiqueue vhost-user-net hotplugged: netkv (`hotplug=1 pairs=2`) boots without a network
/// device; `ch-remote add-net vhost_user=true,socket=,num_queues=4` plugs one served by
/// `nv-vhost-user-net --num-queues 4`; the guest's `VQ_PAIRS_SET 2` is acknowledged by the
/// control queue the VMM serves and 16 flows are answered on both pairs.
#[test]
fn a_hotplugged_multiqueue_vhost_user_net_device_serves_both_pairs() {
    integration_tests::require_kvm!();
    let (netns, dir, socket, api) = two_pair_scratch("vumqhp");
    let (dir_path, region) = (dir.path().to_path_buf(), dir.path().join("region"));
    let (mut vmm, mut backend, mut clients) = {
        let (dir_path, socket, api) = (dir_path.clone(), socket.clone(), api.clone());
        netns.run(move || {
            let backend = start_two_pair_backend(&dir_path, &socket, "0");
            let mut arguments = netkv_two_pairs_arguments(
                "hotplug=1",
                "64M",
                None,
                ["--api-socket".into(), format!("path={}", api.display())],
            );
            arguments.push("--nv".into());
            arguments.push(format!("region={},vm=netvm,create=on", region.display()));
            let mut vmm = spawn(&dir_path, "boot", &arguments);
            vmm.wait_for_socket(&api, TIMEOUT);
            vmm.wait_serial("netkv waiting for a hotplug", |log| {
                log.contains("waiting for a hotplugged network device")
            });
            (vmm, backend, flow_clients())
        })
    };
    let output = integration_tests::harness::run_ch_remote(
        &api,
        &[
            "add-net",
            &format!(
                "vhost_user=true,socket={},num_queues=4,mac={KV_GUEST_MAC},id=vnet0",
                socket.display()
            ),
        ],
    );
    assert!(output.status.success(), "add-net: {output:?}");
    wait_two_pairs_acknowledged(&mut vmm);
    let (_, config) = net_in_info(&api, "vnet0");
    let config = config.expect("vnet0 in config.net");
    assert_eq!(config["num_queues"], 4, "{config}");
    put_from_many_flows(&mut clients, "on the hotplugged device");
    wait_both_pairs_serving(&mut vmm);
    vmm.kill();
    backend.kill();
}

/// Multiqueue vhost-user-net across `vm.snapshot` and `--restore` into a new VMM and a new
/// backend process: the restored device switches both pairs on from the saved pair count and
/// ring bases, and the same 16 flows are answered on both pairs again without a device reset.
#[test]
fn multiqueue_vhost_user_net_serves_both_pairs_after_snapshot_and_restore() {
    integration_tests::require_kvm!();
    let (netns, dir, socket, api) = two_pair_scratch("vumqsn");
    let dir_path = dir.path().to_path_buf();
    let snapshot = dir_path.join("snapshot");
    std::fs::create_dir(&snapshot).unwrap();
    let (mut vmm, mut backend, mut clients) = {
        let (dir_path, socket, api) = (dir_path.clone(), socket.clone(), api.clone());
        netns.run(move || {
            let backend = start_two_pair_backend(&dir_path, &socket, "0");
            let arguments = netkv_two_pairs_arguments(
                "",
                "64M,shared=on",
                Some(&socket),
                ["--api-socket".into(), format!("path={}", api.display())],
            );
            let mut vmm = spawn(&dir_path, "boot", &arguments);
            wait_two_pairs_acknowledged(&mut vmm);
            let clients = flow_clients();
            (vmm, backend, clients)
        })
    };
    put_from_many_flows(&mut clients, "before the snapshot");
    wait_both_pairs_serving(&mut vmm);
    let request = |endpoint: &str, body: &str| {
        let (status, answer) =
            integration_tests::api_client::request(&api, "PUT", endpoint, body, TIMEOUT);
        assert!(
            (200..300).contains(&status),
            "{endpoint}: {status} {answer}"
        );
    };
    request("vm.pause", "");
    let body = format!(r#"{{"destination_url":"file://{}"}}"#, snapshot.display());
    request("vm.snapshot", &body);
    let served_before = pair_served(&vmm.serial_log()).unwrap();
    vmm.kill();
    backend.kill();

    let serial = dir_path.join("boot.serial");
    let (mut vmm, mut backend) = {
        let (dir_path, socket, snapshot, serial) = (
            dir_path.clone(),
            socket.clone(),
            snapshot.clone(),
            serial.clone(),
        );
        netns.run(move || {
            let backend = start_two_pair_backend(&dir_path, &socket, "1");
            let restore = format!("source_url=file://{},resume=true", snapshot.display());
            let vmm = VmmProcess::spawn(&dir_path, "restore", &["--restore".into(), restore], &[])
                .with_serial(serial)
                .with_timeout(TIMEOUT);
            (vmm, backend)
        })
    };
    put_from_many_flows(&mut clients, "after the restore");
    let after = wait_both_pairs_serving_again(&mut vmm, &served_before);
    // The restored guest continued: it did not boot again (its counters went on from the
    // snapshot's) and no failure.
    assert!(
        !after.contains("netkv: boot id="),
        "the guest booted again:\n{after}"
    );
    assert!(!after.contains("FAIL"), "{after}");
    vmm.kill();
    backend.kill();
}
