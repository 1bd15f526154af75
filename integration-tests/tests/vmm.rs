//! End-to-end tests of the VMM library on real KVM with the freestanding test guests: boot over
//! file-backed and anonymous memory, virtio-blk, and the save/restore round trip across two VM
//! instances over the same memory file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::harness::{
    assert_counter_advances, counter_lines, kvm_available, read_log, wait_for_log,
};
use vmm::config::{
    ConsoleConfig, ConsoleOutputMode, CpusConfig, DiskConfig, MemoryConfig, MemoryZoneConfig,
    PayloadConfig, VmConfig,
};
use vmm::events::VmEvents;
use vmm::memory::guest_memory_from_config;
use vmm::{Vm, VmRunState, VmState};

/// Guest RAM of every test VM: small, so first-touch costs stay low on this host.
const GUEST_RAM: u64 = 64 << 20;
/// Generous bound for a guest to print its first lines (boot is ring-0 emulated here).
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

fn guest(name: &str) -> PathBuf {
    integration_tests::guests::guest_image(name)
        .unwrap_or_else(|e| panic!("building the {name} test guest: {e}"))
}

fn config(kernel: &Path, cmdline: &str, memory: MemoryConfig, serial_log: &Path) -> VmConfig {
    VmConfig {
        cpus: CpusConfig::default(),
        memory,
        payload: PayloadConfig {
            kernel: Some(kernel.display().to_string()),
            cmdline: Some(cmdline.to_string()),
            ..Default::default()
        },
        disks: None,
        serial: ConsoleConfig {
            mode: ConsoleOutputMode::File,
            file: Some(serial_log.display().to_string()),
            socket: None,
        },
        console: ConsoleConfig {
            mode: ConsoleOutputMode::Off,
            ..Default::default()
        },
        nv: None,
    }
}

fn file_memory(path: &Path) -> MemoryConfig {
    MemoryConfig {
        size: 0,
        zones: Some(vec![MemoryZoneConfig {
            id: "mem0".into(),
            size: GUEST_RAM,
            file: Some(path.display().to_string()),
            shared: true,
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn anonymous_memory() -> MemoryConfig {
    MemoryConfig {
        size: GUEST_RAM,
        ..Default::default()
    }
}

/// Creates a VM for `config` over freshly mapped memory, with its vCPU threads parked.
fn create_vm(config: &VmConfig) -> Vm {
    let memory = guest_memory_from_config(&config.memory).expect("guest memory");
    Vm::new(config, memory, Arc::new(VmEvents::new().unwrap())).expect("create VM")
}

/// The guests print these when they stop for good; waiting longer is pointless.
fn guest_gave_up(log: &str) -> bool {
    log.contains("FAIL") || log.contains("MISMATCH") || log.contains("FAULT")
}

fn wait_for_counter_lines(log: &Path, count: usize) -> String {
    let (text, done) = wait_for_log(log, BOOT_TIMEOUT, |text| {
        counter_lines(text).len() >= count || guest_gave_up(text)
    });
    assert!(done, "no {count} counter lines in time:\n{text}");
    text
}

fn counter_runs_on(memory: impl FnOnce(&Path) -> MemoryConfig) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let config = config(&guest("counter"), "", memory(dir.path()), &log);
    let mut vm = create_vm(&config);
    vm.boot().expect("boot");
    let text = wait_for_counter_lines(&log, 3);
    vm.shutdown();
    assert!(text.starts_with("counter: boot"), "{text}");
    assert_counter_advances(&text, 3);
}

#[test]
fn counter_guest_runs_on_a_shared_file() {
    if !kvm_available("counter_guest_runs_on_a_shared_file") {
        return;
    }
    counter_runs_on(|dir| file_memory(&dir.join("ram")));
}

#[test]
fn counter_guest_runs_on_anonymous_memory() {
    if !kvm_available("counter_guest_runs_on_anonymous_memory") {
        return;
    }
    counter_runs_on(|_| anonymous_memory());
}

/// Runs `config` through `vmm::run` (the binary's entry point) until the guest resets; returns
/// the exit code and the serial log.
fn run_until_reset(config: VmConfig, log: &Path) -> (i32, String) {
    let launch = vmm::config::VmmLaunch {
        vm: Some(config),
        ..Default::default()
    };
    // vmm::run returns only when the VM ends: bound it, so a guest that never resets fails the
    // test instead of hanging the suite.
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || sender.send(vmm::run(launch)));
    let result = receiver.recv_timeout(BOOT_TIMEOUT);
    let text = read_log(log);
    let code = result
        .unwrap_or_else(|_| panic!("the VMM did not end after the guest's reset:\n{text}"))
        .unwrap_or_else(|e| panic!("vmm::run failed: {e}\n{text}"));
    (code, text)
}

#[test]
fn blkcheck_guest_writes_a_virtio_blk_disk_the_host_can_verify() {
    if !kvm_available("blkcheck_guest_writes_a_virtio_blk_disk_the_host_can_verify") {
        return;
    }
    const BLOCKS: u64 = 64;
    const ROUNDS: u64 = 2;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(BLOCKS * 4096)
        .unwrap();
    let mut config = config(
        &guest("blkcheck"),
        &format!("blocks={BLOCKS} rounds={ROUNDS} exit=reset"),
        anonymous_memory(),
        &log,
    );
    config.disks = Some(vec![DiskConfig {
        path: Some(disk.display().to_string()),
        ..Default::default()
    }]);
    let (code, text) = run_until_reset(config, &log);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("blkcheck: done ok"), "{text}");

    // From the host: the guest's promise holds, and the disk holds exactly the last round.
    integration_tests::guests::verify_blkcheck_disk(&disk, BLOCKS, BLOCKS * ROUNDS)
        .unwrap_or_else(|e| panic!("disk verification: {e}"));
    let bytes = std::fs::read(&disk).unwrap();
    for index in 0..BLOCKS {
        let expected = integration_tests::guests::blkcheck_block(BLOCKS, ROUNDS - 1, index);
        let at = (index * 4096) as usize;
        assert!(
            bytes[at..at + 4096] == expected[..],
            "block {index} does not hold the last round's data"
        );
    }
}

#[test]
fn guest_reset_ends_the_vmm_with_exit_code_zero() {
    if !kvm_available("guest_reset_ends_the_vmm_with_exit_code_zero") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let config = config(&guest("counter"), "stop_after=2", anonymous_memory(), &log);
    let (code, text) = run_until_reset(config, &log);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("counter: done"), "{text}");
    assert_counter_advances(&text, 2);
}

#[test]
fn save_and_restore_across_two_vm_instances_continues_the_guest() {
    if !kvm_available("save_and_restore_across_two_vm_instances_continues_the_guest") {
        return;
    }
    counter_survives_save_and_restore(1);
}

/// The application processor stays in wait-for-SIPI (the guests use only the boot vCPU); its
/// mp_state and LAPIC must come back as they were, and the boot vCPU continue.
#[test]
fn save_and_restore_with_two_vcpus_continues_the_guest() {
    if !kvm_available("save_and_restore_with_two_vcpus_continues_the_guest") {
        return;
    }
    counter_survives_save_and_restore(2);
}

fn counter_survives_save_and_restore(vcpus: u8) {
    let with_vcpus = |mut config: VmConfig| {
        config.cpus = CpusConfig {
            boot_vcpus: vcpus,
            max_vcpus: vcpus,
        };
        config
    };
    let dir = tempfile::tempdir().unwrap();
    let ram = dir.path().join("ram");
    let first_log = dir.path().join("first.log");
    let second_log = dir.path().join("second.log");
    let kernel = guest("counter");

    // First VMM instance: boot, let the counter run, pause, save, tear down.
    let saved_json = {
        let mut vm = create_vm(&with_vcpus(config(
            &kernel,
            "",
            file_memory(&ram),
            &first_log,
        )));
        vm.boot().expect("boot");
        wait_for_counter_lines(&first_log, 3);
        vm.pause().expect("pause");
        assert_eq!(vm.run_state(), VmRunState::Paused);
        let state = vm.save_state().expect("save state");
        assert_eq!(state.vcpus.len(), usize::from(vcpus));
        vm.shutdown();
        // Through JSON, as the state will travel to NV or a snapshot directory.
        serde_json::to_string(&state).expect("serialize state")
    };
    let before = counter_lines(&read_log(&first_log));
    let last_before = before.last().expect("lines before the save").counter;

    // Second instance over the same memory file: restore and resume.
    let state: VmState = serde_json::from_str(&saved_json).expect("deserialize state");
    let mut vm = create_vm(&with_vcpus(config(
        &kernel,
        "",
        file_memory(&ram),
        &second_log,
    )));
    vm.restore_state(&state).expect("restore state");
    vm.resume().expect("resume");
    let text = wait_for_counter_lines(&second_log, 3);
    vm.shutdown();

    assert!(
        !text.contains("counter: boot"),
        "the guest booted again instead of continuing:\n{text}"
    );
    let after = assert_counter_advances(&text, 3);
    assert!(
        after[0].counter > last_before,
        "counter restarted: {} after the restore, {last_before} before:\n{text}",
        after[0].counter
    );
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    if !kvm_available("pause_stops_the_guest_and_resume_continues_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut vm = create_vm(&config(&guest("counter"), "", anonymous_memory(), &log));
    vm.boot().expect("boot");
    wait_for_counter_lines(&log, 2);
    vm.pause().expect("pause");
    let lines_when_paused = counter_lines(&read_log(&log)).len();
    // Several report periods (100 ms each): a running guest would print meanwhile.
    std::thread::sleep(Duration::from_millis(400));
    let lines_after_pause = counter_lines(&read_log(&log)).len();
    assert_eq!(
        lines_when_paused, lines_after_pause,
        "the guest printed while paused"
    );
    assert!(vm.pause().is_err(), "pausing a paused VM must be refused");
    vm.resume().expect("resume");
    let text = wait_for_counter_lines(&log, lines_when_paused + 2);
    vm.shutdown();
    assert_counter_advances(&text, lines_when_paused + 2);
}

/// A disk with requests in progress is paused (in-flight requests drained), saved, and rebuilt
/// in a second VM instance whose guest finishes its work and verifies every block.
#[test]
fn blkcheck_continues_after_save_and_restore() {
    if !kvm_available("blkcheck_continues_after_save_and_restore") {
        return;
    }
    const BLOCKS: u64 = 256;
    const ROUNDS: u64 = 6;
    let dir = tempfile::tempdir().unwrap();
    let ram = dir.path().join("ram");
    let disk = dir.path().join("disk.img");
    let first_log = dir.path().join("first.log");
    let second_log = dir.path().join("second.log");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(BLOCKS * 4096)
        .unwrap();
    let config_for = |log: &Path| {
        let mut config = config(
            &guest("blkcheck"),
            &format!("blocks={BLOCKS} rounds={ROUNDS}"),
            file_memory(&ram),
            log,
        );
        config.disks = Some(vec![DiskConfig {
            path: Some(disk.display().to_string()),
            ..Default::default()
        }]);
        config
    };

    let state = {
        let mut vm = create_vm(&config_for(&first_log));
        vm.boot().expect("boot");
        let (text, started) = wait_for_log(&first_log, BOOT_TIMEOUT, |text| {
            text.contains("completed seq=") || guest_gave_up(text)
        });
        assert!(started && !guest_gave_up(&text), "{text}");
        vm.pause().expect("pause");
        let state = vm.save_state().expect("save state");
        vm.shutdown();
        state
    };
    let first = read_log(&first_log);
    assert!(
        !first.contains("done ok"),
        "the guest finished before the save; the test needs more rounds:\n{first}"
    );
    assert_eq!(state.devices.disks.len(), 1);

    let mut vm = create_vm(&config_for(&second_log));
    vm.restore_state(&state).expect("restore state");
    vm.resume().expect("resume");
    let (text, done) = wait_for_log(&second_log, BOOT_TIMEOUT, |text| {
        text.contains("blkcheck: done ok") || guest_gave_up(text)
    });
    vm.shutdown();
    assert!(
        done && text.contains("blkcheck: done ok"),
        "{first}---\n{text}"
    );
    assert!(
        !text.contains("blkcheck: disk"),
        "the guest started over:\n{text}"
    );
    integration_tests::guests::verify_blkcheck_disk(&disk, BLOCKS, BLOCKS * ROUNDS)
        .unwrap_or_else(|e| panic!("disk verification: {e}"));
}

#[test]
fn a_missing_or_bogus_kernel_is_a_clear_error() {
    if !kvm_available("a_missing_or_bogus_kernel_is_a_clear_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let missing = dir.path().join("no-such-kernel");
    let mut vm = create_vm(&config(&missing, "", anonymous_memory(), &log));
    let error = vm.boot().unwrap_err().to_string();
    assert!(error.contains("no-such-kernel"), "{error}");

    let bogus = dir.path().join("bogus-kernel");
    std::fs::write(&bogus, vec![0x5a_u8; 4096]).unwrap();
    let mut vm = create_vm(&config(&bogus, "", anonymous_memory(), &log));
    let error = vm.boot().unwrap_err().to_string();
    assert!(
        error.contains("bogus-kernel") && error.contains("not a kernel"),
        "{error}"
    );
}
