//! Device hotplug as upstream cloud-hypervisor does it on x86_64 (ACPI PCI hotplug), end to end on
//! KVM with the `hpcheck` test guest, which polls the GED and the hotplug controller's registers
//! from ring 3 as the DSDT's methods read them: `ch-remote add-disk` makes a slot come up, the
//! guest finds the virtio-blk function at the BDF the API answered and drives it over virtio-pci;
//! `ch-remote remove-device` makes the slot go down and the guest ejects it (`B0EJ`, as `_EJ0`
//! does), after which the VMM drops it. A hotplugged disk is in the config and the saved state:
//! it is back at its BDF with its queues after an NV power failure and in-place recovery and after
//! `vm.snapshot` / `--restore`; a removed disk stays removed. Bad requests get upstream's
//! statuses, every answer checked against `docs/openapi.yaml`.
//!
//! The binary is built on first use (`integration_tests::binaries`); `CLOUD_HYPERVISOR_BIN=/path`
//! tests that binary instead.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::api_client;
use integration_tests::harness::{guest_arguments, point_serial_to, run_ch_remote, scratch_dir};
use integration_tests::netkv_client::{KvClient, LoadConfig, LoadThread};
use integration_tests::netns::{
    inheritable_tap, netkv_guest_arguments, Netns, KV_GUEST, KV_GUEST_MAC, KV_TAP,
};
use integration_tests::process::{Stdout, VmmProcess};
use vmm::nv::EXIT_POWER_FAIL_SAVED;

/// Generous bound for a guest line or a VMM exit (boot is ring-0 emulated here).
const TIMEOUT: Duration = Duration::from_secs(60);
/// Sector the guest writes when it brings the disk up, with byte i = 0x5a * 31 + i.
const PROBE_SECTOR: u64 = 1;
const PROBE_SEQ: u64 = 0x5a;
/// upstream's virtio-blk PCI id as one configuration dword (device 0x1042, vendor 0x1af4).
const VIRTIO_BLK_ID: &str = "id=0x0000000010421af4";
/// virtio-net's (device 0x1041).
const VIRTIO_NET_ID: &str = "id=0x0000000010411af4";

fn spawn(dir: &Path, label: &str, arguments: &[String]) -> VmmProcess {
    VmmProcess::spawn_with_serial_file(dir, label, arguments, &[]).with_timeout(TIMEOUT)
}

/// An hpcheck guest behind `socket`, polling for hotplug events.
fn hpcheck_arguments(socket: &Path) -> Vec<String> {
    let mut arguments = guest_arguments("hpcheck", "", "32M");
    arguments.extend(["--api-socket".into(), format!("path={}", socket.display())]);
    arguments
}

/// An hpcheck guest behind `socket` as NV VM `hp` of a new region at `region`, booted and
/// polling for hotplug events.
fn boot_nv_hpcheck(dir: &Path, socket: &Path, region: &Path) -> VmmProcess {
    let mut arguments = hpcheck_arguments(socket);
    arguments.extend([
        "--nv".into(),
        format!("region={},vm=hp,create=on", region.display()),
    ]);
    let mut vmm = spawn(dir, "boot", &arguments);
    wait_ready(&mut vmm, socket);
    vmm
}

fn wait_ready(vmm: &mut VmmProcess, socket: &Path) {
    vmm.wait_for_socket(socket, TIMEOUT);
    vmm.wait_serial("the guest polling for hotplug events", |log| {
        log.contains("hpcheck: ready")
    });
}

/// A 1 MiB disk image of zeros.
fn disk_image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}

/// One API exchange, checked against `docs/openapi.yaml`.
fn api(socket: &Path, method: &str, op: &str, body: &str) -> (u16, String) {
    let (status, answer) = api_client::request(socket, method, op, body, TIMEOUT);
    let request_body = (!body.is_empty()).then_some(body);
    if let Err(error) =
        ::api_client::openapi::check_exchange(method, op, request_body, status, answer.as_bytes())
    {
        panic!("{method} {op} {body}: {error}");
    }
    (status, answer)
}

/// `ch-remote --api-socket socket <arguments>`: must succeed; its stdout.
fn ch_remote(socket: &Path, arguments: &[&str]) -> String {
    let output = run_ch_remote(socket, arguments);
    assert!(
        output.status.success(),
        "ch-remote {arguments:?}: {output:?}"
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `ch-remote add-disk path=<image>,id=<id>`: the device number of the BDF it answered.
fn add_disk(socket: &Path, image: &Path, id: &str) -> u8 {
    let answer = ch_remote(
        socket,
        &["add-disk", &format!("path={},id={id}", image.display())],
    );
    let info: serde_json::Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(info["id"], id, "{answer}");
    let bdf = info["bdf"].as_str().unwrap();
    assert!(bdf.starts_with("0000:00:") && bdf.ends_with(".0"), "{bdf}");
    u8::from_str_radix(&bdf[8..10], 16).unwrap()
}

/// `vm.info`: (the ids of `config.disks`, the device tree's (device id, pci_bdf) pairs: the
/// `pci_bdf` of a virtio device is on its parent node, the function `_virtio-pci-<id>`).
fn disks_in_info(socket: &Path) -> (Vec<String>, Vec<(String, String)>) {
    let (status, body) = api(socket, "GET", "vm.info", "");
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    let config_ids = info["config"]["disks"]
        .as_array()
        .map(|disks| {
            disks
                .iter()
                .filter_map(|disk| disk["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let tree = info["device_tree"]
        .as_object()
        .map(|tree| {
            tree.values()
                .filter_map(|node| {
                    Some((
                        node["children"][0].as_str()?.to_owned(),
                        node["pci_bdf"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    (config_ids, tree)
}

fn assert_disk_listed(socket: &Path, id: &str, device: u8) {
    let (config, tree) = disks_in_info(socket);
    assert!(config.iter().any(|c| c == id), "{config:?}");
    let bdf = format!("0000:00:{device:02x}.0");
    assert!(
        tree.iter().any(|(tid, tbdf)| tid == id && *tbdf == bdf),
        "{id} not at {bdf}: {tree:?}"
    );
}

fn assert_disk_gone(socket: &Path, id: &str) {
    let (config, tree) = disks_in_info(socket);
    assert!(!config.iter().any(|c| c == id), "{config:?}");
    assert!(!tree.iter().any(|(tid, _)| tid == id), "{tree:?}");
}

/// The numbers of the guest's `hpcheck: round=R ok` lines.
fn rounds(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|line| {
            line.strip_prefix("hpcheck: round=")?
                .strip_suffix(" ok")?
                .parse()
                .ok()
        })
        .collect()
}

/// Waits until the guest found the new disk at `device` and did `count` rounds of I/O on it.
fn wait_disk_in_use(vmm: &mut VmmProcess, device: u8, count: usize) -> String {
    let log = vmm.wait_serial("rounds of I/O on the hotplugged disk", |log| {
        rounds(log).len() >= count || log.contains("FAIL")
    });
    assert!(!log.contains("FAIL"), "{log}");
    assert!(
        log.contains(&format!("hpcheck: disk at device={device} {VIRTIO_BLK_ID}")),
        "{log}"
    );
    assert!(
        log.contains(&format!("hpcheck: disk io ok device={device}")),
        "{log}"
    );
    log
}

/// The guest wrote its probe sector through the hotplugged function: the host reads it.
fn assert_probe_sector_written(image: &Path) {
    let bytes = std::fs::read(image).unwrap();
    let sector = &bytes[(PROBE_SECTOR * 512) as usize..][..512];
    let expected: Vec<u8> = (0..512u64).map(|i| (PROBE_SEQ * 31 + i) as u8).collect();
    assert_eq!(sector, expected.as_slice(), "probe sector");
}

/// Asks the guest to give the disk up and waits until it ejected it and the VMM dropped it.
fn remove_and_wait_ejected(vmm: &mut VmmProcess, socket: &Path, id: &str, device: u8) {
    assert_eq!(ch_remote(socket, &["remove-device", id]), "");
    let log = vmm.wait_serial("the guest ejecting the disk", |log| {
        log.contains(&format!("hpcheck: device={device} gone")) || log.contains("FAIL")
    });
    assert!(!log.contains("FAIL"), "{log}");
    assert!(
        log.contains(&format!("hpcheck: eject device={device}")),
        "{log}"
    );
    vmm.wait_stderr("the VMM taking the eject", |stderr| {
        stderr.contains(&format!(
            "{id} at 0000:00:{device:02x}.0 ejected by the guest"
        ))
    });
    assert_disk_gone(socket, id);
}

/// Recovers NV VM `vm` of `region` in place behind `recovered.sock` and waits for two rounds of
/// I/O numbered after `last` (the guest went on, it did not boot again). Returns the socket,
/// the recovering arguments and the VMM.
fn recover_with_rounds(
    dir: &Path,
    region: &Path,
    vm: &str,
    last: u64,
) -> (PathBuf, [String; 4], VmmProcess) {
    let recover_socket = dir.join("recovered.sock");
    let recover = [
        "--nv".into(),
        format!("region={},vm={vm},recover=on", region.display()),
        "--api-socket".into(),
        format!("path={}", recover_socket.display()),
    ];
    let mut recovered = spawn(dir, "recovered", &recover);
    recovered.wait_for_socket(&recover_socket, TIMEOUT);
    let log = recovered.wait_serial("rounds after the recovery", |log| {
        rounds(log).len() >= 2 || log.contains("FAIL")
    });
    assert!(
        !log.contains("FAIL") && !log.contains("hpcheck: boot"),
        "{log}"
    );
    assert!(
        rounds(&log)[0] > last,
        "rounds restarted after {last}:\n{log}"
    );
    (recover_socket, recover, recovered)
}

#[test]
fn a_hotplugged_disk_is_found_driven_and_ejected_by_the_guest() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let socket = dir.path().join("api.sock");
    let image = disk_image(dir.path(), "hot.raw");
    let mut vmm = spawn(dir.path(), "hotplug", &hpcheck_arguments(&socket));
    wait_ready(&mut vmm, &socket);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !vmm.serial_log().contains("hpcheck: event"),
        "an event before any hotplug"
    );

    let device = add_disk(&socket, &image, "hot0");
    wait_disk_in_use(&mut vmm, device, 3);
    assert_probe_sector_written(&image);
    assert_disk_listed(&socket, "hot0", device);
    let (status, counters) = api(&socket, "GET", "vm.counters", "");
    assert_eq!(status, 200);
    let counters: serde_json::Value = serde_json::from_str(&counters).unwrap();
    assert!(
        counters["hot0"]["write_ops"].as_u64().unwrap_or(0) >= 1,
        "{counters}"
    );

    remove_and_wait_ejected(&mut vmm, &socket, "hot0", device);
    // The slot is free again: the next disk goes there, with the guest's driver... a new one.
    let log = vmm.serial_log();
    let after = rounds(&log).len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rounds(&vmm.serial_log()).len(),
        after,
        "I/O after the eject"
    );
    vmm.kill();
}

#[test]
fn a_hotplugged_disk_survives_a_power_failure_and_a_removed_one_stays_removed() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let socket = dir.path().join("api.sock");
    let region = dir.path().join("region");
    let image = disk_image(dir.path(), "hot.raw");
    let mut vmm = boot_nv_hpcheck(dir.path(), &socket, &region);
    let device = add_disk(&socket, &image, "hot0");
    wait_disk_in_use(&mut vmm, device, 2);
    vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "power fail");
    let last = *rounds(&vmm.serial_log()).last().unwrap();

    let (recover_socket, recover, mut recovered) =
        recover_with_rounds(dir.path(), &region, "hp", last);
    assert_disk_listed(&recover_socket, "hot0", device);

    remove_and_wait_ejected(&mut recovered, &recover_socket, "hot0", device);
    recovered.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "second power fail");

    let mut again = spawn(dir.path(), "again", &recover);
    again.wait_for_socket(&recover_socket, TIMEOUT);
    assert_disk_gone(&recover_socket, "hot0");
    again.kill();
}

/// The device number `vm.info`'s device tree gives device `id`.
fn device_of(socket: &Path, id: &str) -> u8 {
    let (_, tree) = disks_in_info(socket);
    let (_, bdf) = tree
        .iter()
        .find(|(tid, _)| tid == id)
        .unwrap_or_else(|| panic!("{id} not in the device tree: {tree:?}"));
    u8::from_str_radix(&bdf[8..10], 16).unwrap()
}

/// Rounds of I/O done after the guest brought the disk at `device` up (its latest bring-up).
fn rounds_on(log: &str, device: u8) -> Vec<u64> {
    let marker = format!("hpcheck: disk io ok device={device}\n");
    log.rfind(&marker)
        .map(|at| rounds(&log[at..]))
        .unwrap_or_default()
}

/// As upstream, a disk given on the command line can be removed too: the guest ejects it, it
/// leaves the config, the device tree and the counters, and the stored config of the NV VM. The
/// disk after it keeps its slot through two power failures (the recoveries build the VM from a
/// config without the removed disk), and a disk hotplugged later takes the slot it left.
#[test]
fn a_disk_given_at_boot_is_ejected_and_stays_removed_across_power_failures() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let socket = dir.path().join("api.sock");
    let region = dir.path().join("region");
    let first = disk_image(dir.path(), "boot0.raw");
    let second = disk_image(dir.path(), "boot1.raw");
    let mut arguments = hpcheck_arguments(&socket);
    arguments.extend([
        "--disk".into(),
        format!("path={},id=boot0", first.display()),
        "--disk".into(),
        format!("path={},id=boot1", second.display()),
        "--nv".into(),
        format!("region={},vm=cold,create=on", region.display()),
    ]);
    let mut vmm = spawn(dir.path(), "boot", &arguments);
    wait_ready(&mut vmm, &socket);
    let removed = device_of(&socket, "boot0");
    let kept = device_of(&socket, "boot1");
    assert!(removed < kept, "boot0 at {removed}, boot1 at {kept}");
    wait_disk_in_use(&mut vmm, removed, 2);
    assert_probe_sector_written(&first);

    remove_and_wait_ejected(&mut vmm, &socket, "boot0", removed);
    // The guest goes on with the other disk given at boot.
    let log = vmm.wait_serial("rounds on the second disk", |log| {
        rounds_on(log, kept).len() >= 2 || log.contains("FAIL")
    });
    assert!(!log.contains("FAIL"), "{log}");
    assert_disk_listed(&socket, "boot1", kept);
    assert_probe_sector_written(&second);
    let (status, counters) = api(&socket, "GET", "vm.counters", "");
    assert_eq!(status, 200);
    let counters: serde_json::Value = serde_json::from_str(&counters).unwrap();
    assert!(counters.get("boot0").is_none(), "{counters}");
    assert!(counters.get("boot1").is_some(), "{counters}");
    // Gone: a second removal does not know it.
    let (status, answer) = api(&socket, "PUT", "vm.remove-device", "{\"id\":\"boot0\"}");
    assert_eq!(status, 404, "{answer}");
    vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "power fail");
    let last = *rounds(&vmm.serial_log()).last().unwrap();

    let (recover_socket, recover, mut recovered) =
        recover_with_rounds(dir.path(), &region, "cold", last);
    assert_disk_gone(&recover_socket, "boot0");
    assert_disk_listed(&recover_socket, "boot1", kept);
    // The slot boot0 left is free for a hotplugged disk.
    let hot = disk_image(dir.path(), "hot.raw");
    assert_eq!(add_disk(&recover_socket, &hot, "hot0"), removed);
    assert_disk_listed(&recover_socket, "hot0", removed);
    recovered.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "second power fail");
    let last = *rounds(&recovered.serial_log()).last().unwrap();

    let mut again = spawn(dir.path(), "again", &recover);
    again.wait_for_socket(&recover_socket, TIMEOUT);
    let log = again.wait_serial("rounds after the second recovery", |log| {
        rounds(log).len() >= 2 || log.contains("FAIL")
    });
    assert!(!log.contains("FAIL") && rounds(&log)[0] > last, "{log}");
    assert_disk_gone(&recover_socket, "boot0");
    assert_disk_listed(&recover_socket, "boot1", kept);
    assert_disk_listed(&recover_socket, "hot0", removed);
    again.kill();
}

/// `vm.info`'s `config.net`: (id, tap) of each network device.
fn nets_in_info(socket: &Path) -> Vec<(String, String)> {
    let (status, body) = api(socket, "GET", "vm.info", "");
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    info["config"]["net"]
        .as_array()
        .map(|nets| {
            nets.iter()
                .map(|net| {
                    (
                        net["id"].as_str().unwrap_or_default().to_owned(),
                        net["tap"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `ch-remote add-net fd=N` hands the tap over as upstream's does (SCM_RIGHTS with the request):
/// in a network namespace of its own, a persistent tap's descriptor becomes a hotplugged
/// virtio-net function the guest sees come up; a descriptor that is no tap is refused (exit 1,
/// nothing added, the descriptor closed); after a power failure the recovery opens the tap
/// again by its name and the function is back at its address; the guest then ejects it.
#[test]
fn a_tap_handed_over_by_descriptor_is_hotplugged_and_recovered_by_name() {
    integration_tests::require_kvm!();
    const TAP: &str = "nvhp0";
    let netns = Netns::new("hotplug");
    netns
        .ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"])
        .unwrap();
    netns.ip(&["link", "set", TAP, "up"]).unwrap();
    let dir = scratch_dir();
    let dir_path = dir.path().to_path_buf();
    let socket = dir.path().join("api.sock");
    let region = dir.path().join("region");
    let mut arguments = hpcheck_arguments(&socket);
    arguments.extend([
        "--nv".into(),
        format!("region={},vm=tapfd,create=on", region.display()),
    ]);
    let (mut vmm, answer) = {
        let (dir_path, socket) = (dir_path.clone(), socket.clone());
        netns.run(move || {
            let mut vmm = spawn(&dir_path, "boot", &arguments);
            wait_ready(&mut vmm, &socket);
            // Not a tap: refused, the API says why.
            let null = std::fs::File::open("/dev/null").unwrap();
            let null_fd = inheritable(&null);
            let refused = run_ch_remote(&socket, &["add-net", &format!("fd={null_fd}")]);
            assert_eq!(refused.status.code(), Some(1), "{refused:?}");
            let stderr = String::from_utf8_lossy(&refused.stderr);
            assert!(
                stderr.contains("The network device could not be added to the VM"),
                "{stderr}"
            );
            let tap = inheritable_tap(TAP);
            let answer = ch_remote(
                &socket,
                &["add-net", &format!("fd={},id=hotnet0", tap.as_raw_fd())],
            );
            // The VMM holds its own copy.
            drop(tap);
            (vmm, answer)
        })
    };
    let info: serde_json::Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(info["id"], "hotnet0", "{answer}");
    let bdf = info["bdf"].as_str().unwrap().to_owned();
    let device = u8::from_str_radix(&bdf[8..10], 16).unwrap();
    // `wait_serial` sees whole lines only, so the line matched is all there.
    let log = vmm.wait_serial("the guest seeing the network function", |log| {
        log.contains(&format!("hpcheck: function at device={device} "))
    });
    assert!(log.contains(VIRTIO_NET_ID), "{log}");
    assert_eq!(nets_in_info(&socket), [("hotnet0".into(), TAP.into())]);
    vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "power fail");

    let recover_socket = dir.path().join("recovered.sock");
    let recover = vec![
        "--nv".into(),
        format!("region={},vm=tapfd,recover=on", region.display()),
        "--api-socket".into(),
        format!("path={}", recover_socket.display()),
    ];
    let mut recovered = {
        let (dir_path, recover_socket) = (dir_path.clone(), recover_socket.clone());
        netns.run(move || {
            let mut vmm = spawn(&dir_path, "recovered", &recover);
            vmm.wait_for_socket(&recover_socket, TIMEOUT);
            vmm
        })
    };
    assert_eq!(
        nets_in_info(&recover_socket),
        [("hotnet0".into(), TAP.into())]
    );
    let (_, tree) = disks_in_info(&recover_socket);
    assert!(tree.contains(&("hotnet0".into(), bdf.clone())), "{tree:?}");
    assert_eq!(
        ch_remote(&recover_socket, &["remove-device", "hotnet0"]),
        ""
    );
    recovered.wait_serial("the guest ejecting the network function", |log| {
        log.contains(&format!("hpcheck: device={device} gone"))
    });
    recovered.wait_stderr("the VMM taking the eject", |stderr| {
        stderr.contains(&format!("hotnet0 at {bdf} ejected by the guest"))
    });
    assert!(nets_in_info(&recover_socket).is_empty());
    recovered.kill();
}

/// The netkv database, booted without a network device (`hotplug=1`), serves on a virtio-net
/// device hotplugged with `ch-remote add-net fd=` (a persistent tap in the test's network
/// namespace, its descriptor handed over with the request): a client's PUTs and GETs go over it,
/// across a power failure whose recovery opens the tap again by name and one whose recovery is
/// handed a new descriptor of it (`--net fd=`); every acknowledged PUT reads back, the guest never
/// rebooted; then the guest ejects the device.
#[test]
fn a_hotplugged_nic_serves_the_database_across_power_failures() {
    integration_tests::require_kvm!();
    const KV_WAIT: Duration = Duration::from_secs(30);
    let netns = Netns::new("hpkv");
    netns.add_kv_tap().unwrap_or_else(|e| panic!("{e}"));
    let dir = scratch_dir();
    let dir_path = dir.path().to_path_buf();
    let socket = dir.path().join("api.sock");
    let region = dir.path().join("region");
    let mut arguments = netkv_guest_arguments("hotplug=1");
    arguments.extend([
        "--api-socket".into(),
        format!("path={}", socket.display()),
        "--nv".into(),
        format!("region={},vm=hpkv,create=on", region.display()),
    ]);
    let (mut vmm, client, answer) = {
        let (dir_path, socket) = (dir_path.clone(), socket.clone());
        netns.run(move || {
            let mut vmm = spawn(&dir_path, "boot", &arguments);
            vmm.wait_for_socket(&socket, TIMEOUT);
            vmm.wait_serial("netkv waiting for its network device", |log| {
                log.contains("netkv: waiting")
            });
            let tap = inheritable_tap(KV_TAP);
            let answer = ch_remote(
                &socket,
                &[
                    "add-net",
                    &format!("fd={},mac={KV_GUEST_MAC},id=kvnet", tap.as_raw_fd()),
                ],
            );
            drop(tap);
            let log = vmm.wait_serial("netkv ready", |log| {
                log.contains("netkv: ready") || log.contains("FAIL")
            });
            assert!(!log.contains("FAIL"), "{log}");
            let client =
                KvClient::new(KV_GUEST, LoadConfig::default()).unwrap_or_else(|e| panic!("{e}"));
            (vmm, client, answer)
        })
    };
    let info: serde_json::Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(info["id"], "kvnet", "{answer}");
    let bdf = info["bdf"].as_str().unwrap().to_owned();
    assert_eq!(nets_in_info(&socket), [("kvnet".into(), KV_TAP.into())]);
    let load = LoadThread::start(client);
    assert!(load.wait_answers(500, KV_WAIT), "no answers over the NIC");
    let mut serial_logs = Vec::new();
    let recover_socket = dir.path().join("recovered.sock");
    for (round, handover) in [(1, false), (2, true)] {
        serial_logs.push(vmm.serial_log());
        vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "power fail");
        let (dir_path, region, socket) = (dir_path.clone(), region.clone(), recover_socket.clone());
        vmm = netns.run(move || {
            let mut arguments = vec![
                "--nv".into(),
                format!("region={},vm=hpkv,recover=on", region.display()),
                "--api-socket".into(),
                format!("path={}", socket.display()),
            ];
            let tap = handover.then(|| inheritable_tap(KV_TAP));
            if let Some(tap) = &tap {
                arguments.extend(["--net".into(), format!("fd={}", tap.as_raw_fd())]);
            }
            let mut vmm = spawn(&dir_path, &format!("recovered-{round}"), &arguments);
            vmm.wait_for_socket(&socket, TIMEOUT);
            vmm
        });
        assert!(
            load.wait_answers(500, KV_WAIT),
            "no answers after recovery {round}"
        );
        let (_, tree) = disks_in_info(&recover_socket);
        assert!(tree.contains(&("kvnet".into(), bdf.clone())), "{tree:?}");
    }
    serial_logs.push(vmm.serial_log());
    let mut client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    let keys = client
        .read_back_all(KV_WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let ledger = &client.ledger;
    assert_eq!(ledger.violations, Vec::new(), "the client saw violations");
    assert_eq!(ledger.boot_ids.len(), 1, "boot ids {:?}", ledger.boot_ids);
    assert!(ledger.puts_acked > 0 && keys > 0);
    let boots: usize = serial_logs
        .iter()
        .map(|log| log.matches("netkv: boot").count())
        .sum();
    assert_eq!(boots, 1, "{serial_logs:?}");

    assert_eq!(ch_remote(&recover_socket, &["remove-device", "kvnet"]), "");
    vmm.wait_serial("netkv ejecting its device", |log| {
        log.contains("netkv: device gone")
    });
    vmm.wait_stderr("the VMM taking the eject", |stderr| {
        stderr.contains(&format!("kvnet at {bdf} ejected by the guest"))
    });
    assert!(nets_in_info(&recover_socket).is_empty());
    vmm.kill();
}

/// A descriptor of `file` that children inherit (no close-on-exec).
fn inheritable(file: &std::fs::File) -> i32 {
    let fd = file.as_raw_fd();
    // SAFETY: F_SETFD on an open descriptor owned by `file` only clears close-on-exec.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    fd
}

/// A disk added while the VM is paused is pending for the guest (the GED and controller bits are
/// saved): after `vm.snapshot` and `--restore` into a new VMM the guest finds and drives it.
#[test]
fn a_disk_hotplugged_into_a_paused_vm_survives_snapshot_and_restore() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let socket = dir.path().join("api.sock");
    let image = disk_image(dir.path(), "hot.raw");
    let mut first = spawn(dir.path(), "first", &hpcheck_arguments(&socket));
    wait_ready(&mut first, &socket);
    assert_eq!(api(&socket, "PUT", "vm.pause", "").0, 204);
    let device = add_disk(&socket, &image, "hot0");
    let snapshot_dir = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot_dir).unwrap();
    let snapshot = format!("file://{}", snapshot_dir.display());
    let body = format!("{{\"destination_url\":\"{snapshot}\"}}");
    assert_eq!(api(&socket, "PUT", "vm.snapshot", &body).0, 204);
    first.kill();
    assert!(!first.serial_log().contains("hpcheck: event"));

    let log = dir.path().join("restored.serial");
    point_serial_to(&snapshot_dir, &log);
    let restored_socket = dir.path().join("restored.sock");
    let arguments = [
        "--restore".into(),
        format!("source_url={snapshot},resume=true"),
        "--api-socket".into(),
        format!("path={}", restored_socket.display()),
    ];
    let mut restored = VmmProcess::spawn(dir.path(), "restored", &arguments, &[])
        .with_timeout(TIMEOUT)
        .with_serial(log);
    let text = wait_disk_in_use(&mut restored, device, 2);
    assert!(!text.contains("hpcheck: boot"), "booted again:\n{text}");
    restored.wait_for_socket(&restored_socket, TIMEOUT);
    assert_disk_listed(&restored_socket, "hot0", device);
    assert_probe_sector_written(&image);
    restored.kill();
}

#[test]
fn bad_hotplug_requests_get_upstreams_statuses() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let image = disk_image(dir.path(), "hot.raw");
    let disk = |id: &str| format!("{{\"path\":\"{}\",\"id\":\"{id}\"}}", image.display());

    // No VM: 404 "VM is not created".
    let empty_socket = dir.path().join("empty.sock");
    let mut empty = spawn(
        dir.path(),
        "empty",
        &[
            "--api-socket".into(),
            format!("path={}", empty_socket.display()),
        ],
    );
    empty.wait_for_socket(&empty_socket, TIMEOUT);
    for (op, body) in [
        ("vm.add-disk", disk("d0")),
        ("vm.add-net", "{\"tap\":\"nvtest0\"}".to_owned()),
        ("vm.remove-device", "{\"id\":\"d0\"}".to_owned()),
    ] {
        let (status, answer) = api(&empty_socket, "PUT", op, &body);
        assert_eq!(status, 404, "{op}: {answer}");
        assert!(answer.contains("VM is not created"), "{op}: {answer}");
    }
    empty.kill();

    let socket = dir.path().join("api.sock");
    let mut vmm = spawn(dir.path(), "vm", &hpcheck_arguments(&socket));
    wait_ready(&mut vmm, &socket);
    let missing = dir.path().join("missing.raw");
    let cases = [
        // Not JSON of the shape.
        ("vm.add-disk", "{\"path\": 5}".to_owned(), 400),
        ("vm.remove-device", "{}".to_owned(), 400),
        // The config with it does not validate (pci_device_id is refused by this VMM).
        (
            "vm.add-disk",
            format!("{{\"path\":\"{}\",\"pci_device_id\":3}}", image.display()),
            400,
        ),
        // The disk cannot be opened.
        (
            "vm.add-disk",
            format!("{{\"path\":\"{}\"}}", missing.display()),
            500,
        ),
        // Unknown id.
        ("vm.remove-device", "{\"id\":\"nope\"}".to_owned(), 404),
        // Descriptor numbers of the client's process.
        ("vm.add-net", "{\"fds\":[3]}".to_owned(), 400),
    ];
    for (op, body, expected) in &cases {
        let (status, answer) = api(&socket, "PUT", op, body);
        assert_eq!(status, *expected, "{op} {body}: {answer}");
    }
    assert!(!missing.exists(), "the missing disk was created");
    let (status, answer) = api(&socket, "PUT", "vm.add-disk", &disk("d0"));
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = api(&socket, "PUT", "vm.add-disk", &disk("d0"));
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains("Identifier d0 is not unique"), "{answer}");
    // Without an id: upstream's default name, the first free `_disk<N>`.
    let second = disk_image(dir.path(), "second.raw");
    let unnamed = format!("{{\"path\":\"{}\"}}", second.display());
    let (status, answer) = api(&socket, "PUT", "vm.add-disk", &unnamed);
    assert_eq!(status, 200, "{answer}");
    let info: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(info["id"], "_disk0", "{answer}");
    // ch-remote reports the API error and exits 1.
    let output = run_ch_remote(&socket, &["remove-device", "nope"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Unknown device id"),
        "{output:?}"
    );
    vmm.kill();
}

/// Issue 17's hotplug: `ch-remote add-disk vhost_user=on,socket=` puts a vhost-user-blk disk
/// served by our `nv-vhost-user-blk` into a running NV VM; the guest finds and drives it (its
/// probe sector reaches the backend's image), the disk is in the config with its socket, and
/// after a power failure with the backend restarted the recovered VM has it back at its BDF and
/// goes on driving it.
#[test]
fn a_hotplugged_vhost_user_disk_is_driven_and_survives_a_power_failure() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let socket = dir.path().join("api.sock");
    let region = dir.path().join("region");
    let image = disk_image(dir.path(), "hot.raw");
    let blk_socket = dir.path().join("blk.sock");
    let start_backend = |label: &str| {
        let binary = integration_tests::binaries::nv_vhost_user_blk();
        let arguments = [
            "--socket".to_string(),
            blk_socket.display().to_string(),
            "--file".to_string(),
            image.display().to_string(),
        ];
        let log = dir.path().join(format!("backend-{label}.log"));
        let mut backend = VmmProcess::start(&binary, &arguments, &[], &log, Stdout::Log)
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        backend.wait_for_socket_file(&blk_socket, TIMEOUT);
        backend
    };
    let mut backend = start_backend("0");
    let mut vmm = boot_nv_hpcheck(dir.path(), &socket, &region);
    // No backend at the socket: 500 naming it after the bounded wait, nothing plugged.
    let absent = dir.path().join("absent.sock");
    let body = format!(
        "{{\"vhost_user\":true,\"vhost_socket\":\"{}\",\"id\":\"gone0\"}}",
        absent.display()
    );
    let (status, answer) = api(&socket, "PUT", "vm.add-disk", &body);
    assert_eq!(status, 500, "{answer}");
    assert!(
        answer.contains(&absent.display().to_string()),
        "the socket is not named: {answer}"
    );
    assert_disk_gone(&socket, "gone0");
    let answer = ch_remote(
        &socket,
        &[
            "add-disk",
            &format!("vhost_user=on,socket={},id=vhot0", blk_socket.display()),
        ],
    );
    let info: serde_json::Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(info["id"], "vhot0", "{answer}");
    let bdf = info["bdf"].as_str().unwrap();
    let device = u8::from_str_radix(&bdf[8..10], 16).unwrap();
    wait_disk_in_use(&mut vmm, device, 2);
    assert_probe_sector_written(&image);
    assert_disk_listed(&socket, "vhot0", device);
    let (_, body) = api(&socket, "GET", "vm.info", "");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    let disk = info["config"]["disks"]
        .as_array()
        .and_then(|disks| disks.iter().find(|disk| disk["id"] == "vhot0"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(disk["vhost_user"], true, "{disk}");
    assert_eq!(
        disk["vhost_socket"],
        blk_socket.display().to_string(),
        "{disk}"
    );

    vmm.signal_and_expect_exit(libc::SIGPWR, EXIT_POWER_FAIL_SAVED, "power fail");
    let last = *rounds(&vmm.serial_log()).last().unwrap();
    backend.kill();
    let mut backend = start_backend("1");
    let recover_socket = dir.path().join("recovered.sock");
    let recover = [
        "--nv".into(),
        format!("region={},vm=hp,recover=on", region.display()),
        "--api-socket".into(),
        format!("path={}", recover_socket.display()),
    ];
    let mut recovered = spawn(dir.path(), "recovered", &recover);
    recovered.wait_for_socket(&recover_socket, TIMEOUT);
    let log = recovered.wait_serial("rounds after the recovery", |log| {
        rounds(log).len() >= 2 || log.contains("FAIL")
    });
    assert!(
        !log.contains("FAIL") && !log.contains("hpcheck: boot"),
        "{log}\n{}",
        recovered.stderr_tail(20)
    );
    assert!(
        rounds(&log)[0] > last,
        "rounds restarted after {last}:\n{log}"
    );
    assert_disk_listed(&recover_socket, "vhot0", device);
    recovered.kill();
    backend.kill();
}

/// How long a power-fail save may take when it arrives during a vhost-user hotplug's wait for
/// its backend: far below that wait's 10 s (a 32 MiB counter VM saves in well under a second).
const SAVE_DURING_CONNECT_BOUND: Duration = Duration::from_secs(2);

/// Starts `PUT <endpoint> <body>` on a thread (it is answered only when the hotplug ends);
/// joins to its status and body.
fn start_request(
    socket: &Path,
    endpoint: &'static str,
    body: String,
) -> std::thread::JoinHandle<(u16, String)> {
    let socket = socket.to_owned();
    std::thread::spawn(move || api_client::request(&socket, "PUT", endpoint, &body, TIMEOUT))
}

/// Waits for 3 counter lines continuing after `before`, with no new boot.
fn wait_counter_continues(vmm: &mut VmmProcess, before: u64) {
    let log = vmm.wait_serial("3 counter lines after the recovery", |log| {
        integration_tests::harness::counter_lines(log).len() >= 3 || log.contains("FAIL")
    });
    assert!(!log.contains("counter: boot"), "booted again:\n{log}");
    let after = integration_tests::harness::assert_counter_advances(&log, 3);
    assert!(
        after[0].counter > before,
        "the counter restarted: {} after {before}",
        after[0].counter
    );
}

/// The VMM ends saved (exit 75) within `SAVE_DURING_CONNECT_BOUND` of `since`, when `trigger`
/// came, and the add in flight (`adding`) is answered 503. Returns the guest's last counter.
fn assert_saved_at_once(
    vmm: &mut VmmProcess,
    since: std::time::Instant,
    adding: std::thread::JoinHandle<(u16, String)>,
    trigger: &str,
) -> u64 {
    vmm.expect_exit(
        EXIT_POWER_FAIL_SAVED,
        &format!("{trigger} during the vhost-user wait"),
    );
    let took = since.elapsed();
    assert!(
        took < SAVE_DURING_CONNECT_BOUND,
        "{trigger}: the save waited {took:?} behind the hotplug's wait for its backend"
    );
    let (status, answer) = adding.join().unwrap();
    assert_eq!(status, 503, "{answer}");
    last_counter(vmm)
}

fn last_counter(vmm: &VmmProcess) -> u64 {
    integration_tests::harness::counter_lines(&vmm.serial_log())
        .last()
        .map_or(0, |line| line.counter)
}

/// Issue 17: a hotplugged vhost-user device waits up to 10 s for its backend. That wait runs
/// off the control loop, so a power failure arriving meanwhile is saved at once: SIGPWR during
/// an add-disk towards a socket no backend serves, then `vm.power-fail` during an add-net in
/// server mode that no backend connects to. Each save ends the VMM within
/// `SAVE_DURING_CONNECT_BOUND`, the add is answered 503 (abandoned, nothing plugged), and the
/// VM is recovered in place without the device. (Before, the control loop sat in the wait and
/// the save came after it, 10 s later.)
#[test]
fn a_power_failure_during_a_vhost_user_hotplug_wait_is_saved_at_once() {
    integration_tests::require_kvm!();
    let dir = scratch_dir();
    let region = dir.path().join("region");
    let socket = dir.path().join("api.sock");
    let mut arguments = guest_arguments("counter", "", "32M");
    arguments.extend([
        "--api-socket".into(),
        format!("path={}", socket.display()),
        "--nv".into(),
        format!("region={},vm=hw,create=on", region.display()),
    ]);
    let mut vmm = spawn(dir.path(), "boot", &arguments);
    vmm.wait_for_socket(&socket, TIMEOUT);
    vmm.wait_serial("a counter line", |log| {
        !integration_tests::harness::counter_lines(log).is_empty()
    });

    // SIGPWR while vm.add-disk waits for a backend at a socket nobody serves.
    let absent = dir.path().join("absent.sock");
    let adding = start_request(
        &socket,
        "vm.add-disk",
        format!(
            "{{\"vhost_user\":true,\"vhost_socket\":\"{}\",\"id\":\"late0\"}}",
            absent.display()
        ),
    );
    vmm.wait_stderr("the wait for the vhost-user backend", |log| {
        log.contains("not there yet")
    });
    let signalled = std::time::Instant::now();
    vmm.signal(libc::SIGPWR);
    let before = assert_saved_at_once(&mut vmm, signalled, adding, "SIGPWR");

    let recover_socket = dir.path().join("recovered.sock");
    let recover = |label: &str| {
        let arguments = [
            "--nv".into(),
            format!("region={},vm=hw,recover=on", region.display()),
            "--api-socket".into(),
            format!("path={}", recover_socket.display()),
        ];
        let mut vmm = spawn(dir.path(), label, &arguments);
        vmm.wait_for_socket(&recover_socket, TIMEOUT);
        vmm
    };
    let mut recovered = recover("recovered");
    wait_counter_continues(&mut recovered, before);
    assert_disk_gone(&recover_socket, "late0");

    // vm.power-fail while vm.add-net listens for a backend that never connects.
    let listening = dir.path().join("listen.sock");
    let adding = start_request(
        &recover_socket,
        "vm.add-net",
        format!(
            "{{\"vhost_user\":true,\"vhost_socket\":\"{}\",\"vhost_mode\":\"Server\",\
             \"id\":\"late1\"}}",
            listening.display()
        ),
    );
    recovered.wait_stderr("the wait for the vhost-user backend", |log| {
        log.contains("waiting up to")
    });
    let asked = std::time::Instant::now();
    let (status, answer) =
        api_client::request(&recover_socket, "PUT", "vm.power-fail", "", TIMEOUT);
    assert_eq!(status, 204, "{answer}");
    let before = assert_saved_at_once(&mut recovered, asked, adding, "vm.power-fail");

    let mut again = recover("recovered-again");
    wait_counter_continues(&mut again, before);
    let (status, body) = api(&recover_socket, "GET", "vm.info", "");
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        info["config"]["net"]
            .as_array()
            .is_none_or(|nets| nets.is_empty()),
        "{body}"
    );

    // SIGPWR while vm.add-fs waits for a virtiofsd at a socket nobody serves.
    let adding = start_request(
        &recover_socket,
        "vm.add-fs",
        format!(
            "{{\"tag\":\"late\",\"socket\":\"{}\",\"num_queues\":1,\"queue_size\":1024,\
             \"id\":\"late2\"}}",
            absent.display()
        ),
    );
    again.wait_stderr("the wait for virtiofsd", |log| {
        log.contains("not there yet")
    });
    let signalled = std::time::Instant::now();
    again.signal(libc::SIGPWR);
    let before = assert_saved_at_once(&mut again, signalled, adding, "SIGPWR (vm.add-fs)");

    let mut third = recover("recovered-third");
    wait_counter_continues(&mut third, before);
    let (status, body) = api(&recover_socket, "GET", "vm.info", "");
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        info["config"]["fs"]
            .as_array()
            .is_none_or(|fs| fs.is_empty()),
        "{body}"
    );
    third.kill();
}
