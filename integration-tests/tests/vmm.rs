//! End-to-end tests of the VMM library on real KVM with the freestanding test guests: boot over
//! file-backed and anonymous memory, virtio-blk, and the save/restore round trip across two VM
//! instances over the same memory file.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use integration_tests::api_client;
use integration_tests::harness::{
    assert_counter_advances, counter_lines, guest_cmdline, read_log, test_guest, wait_for_log,
};
use vmm::config::{
    ConsoleConfig, ConsoleOutputMode, CpusConfig, DiskConfig, MemoryConfig, MemoryZoneConfig,
    PayloadConfig, SeccompMode, VirtioTransportKind, VmConfig,
};
use vmm::events::VmEvents;
use vmm::memory::guest_memory_from_config;
use vmm::{Vm, VmRunState, VmState};

/// Guest RAM of every test VM: small, so first-touch costs stay low on this host.
const GUEST_RAM: u64 = 64 << 20;
/// Generous bound for a guest to print its first lines (boot is ring-0 emulated here).
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

fn config(kernel: &Path, cmdline: &str, memory: MemoryConfig, serial_log: &Path) -> VmConfig {
    VmConfig {
        cpus: CpusConfig::default(),
        memory,
        payload: PayloadConfig {
            kernel: Some(kernel.display().to_string()),
            cmdline: Some(guest_cmdline(cmdline)),
            ..Default::default()
        },
        disks: None,
        serial: ConsoleConfig {
            mode: ConsoleOutputMode::File,
            file: Some(serial_log.display().to_string()),
            ..Default::default()
        },
        console: ConsoleConfig {
            mode: ConsoleOutputMode::Off,
            ..Default::default()
        },
        pvpanic: false,
        nv: None,
        ..Default::default()
    }
}

fn file_memory(path: &Path) -> MemoryConfig {
    // As upstream, a zone file must exist; it is grown to the zone size (content kept).
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("creating the RAM file");
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
    Vm::new(
        config,
        memory,
        Arc::new(VmEvents::new().unwrap()),
        SeccompMode::Enforce,
    )
    .expect("create VM")
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
    let config = config(&test_guest("counter"), "", memory(dir.path()), &log);
    let mut vm = create_vm(&config);
    vm.boot().expect("boot");
    let text = wait_for_counter_lines(&log, 3);
    vm.shutdown();
    assert!(text.starts_with("counter: boot"), "{text}");
    assert_counter_advances(&text, 3);
}

#[test]
fn counter_guest_runs_on_a_shared_file() {
    integration_tests::require_kvm!();
    counter_runs_on(|dir| file_memory(&dir.join("ram")));
}

#[test]
fn counter_guest_runs_on_anonymous_memory() {
    integration_tests::require_kvm!();
    counter_runs_on(|_| anonymous_memory());
}

/// Runs `config` through `vmm::run` (the binary's entry point) until the VM ends; returns the
/// exit code and the serial log.
fn run_to_end(config: VmConfig, log: &Path) -> (i32, String) {
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
        .unwrap_or_else(|_| panic!("the VMM did not end:\n{text}"))
        .unwrap_or_else(|e| panic!("vmm::run failed: {e}\n{text}"));
    (code, text)
}

#[test]
fn blkcheck_guest_writes_a_virtio_blk_disk_the_host_can_verify() {
    integration_tests::require_kvm!();
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
        &test_guest("blkcheck"),
        &format!("blocks={BLOCKS} rounds={ROUNDS} exit=reset"),
        anonymous_memory(),
        &log,
    );
    config.disks = Some(vec![DiskConfig {
        path: Some(disk.display().to_string()),
        // The opt-in transport; the other disk tests use virtio-pci, the default.
        transport: Some(VirtioTransportKind::Mmio),
        ..Default::default()
    }]);
    let (code, text) = run_to_end(config, &log);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("blkcheck: done ok"), "{text}");
    assert!(text.contains("transport=virtio-mmio"), "{text}");

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
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let config = config(
        &test_guest("counter"),
        "stop_after=2",
        anonymous_memory(),
        &log,
    );
    let (code, text) = run_to_end(config, &log);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("counter: done"), "{text}");
    assert_counter_advances(&text, 2);
}

#[test]
fn save_and_restore_across_two_vm_instances_continues_the_guest() {
    integration_tests::require_kvm!();
    counter_survives_save_and_restore(1);
}

/// The application processor stays in wait-for-SIPI (the guests use only the boot vCPU); its
/// mp_state and LAPIC must come back as they were, and the boot vCPU continue.
#[test]
fn save_and_restore_with_two_vcpus_continues_the_guest() {
    integration_tests::require_kvm!();
    counter_survives_save_and_restore(2);
}

fn counter_survives_save_and_restore(vcpus: u8) {
    let with_vcpus = |mut config: VmConfig| {
        config.cpus = CpusConfig {
            boot_vcpus: vcpus,
            max_vcpus: vcpus,
            ..Default::default()
        };
        config
    };
    let dir = tempfile::tempdir().unwrap();
    let ram = dir.path().join("ram");
    let first_log = dir.path().join("first.log");
    let second_log = dir.path().join("second.log");
    let kernel = test_guest("counter");

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
    // Only a cold boot writes the ACPI tables: a restore keeps guest memory as it is.
    let marker = b"not the ACPI tables";
    vm_memory::Bytes::write_slice(vm.memory(), marker, vm_memory::GuestAddress(0xE_0000))
        .expect("marker");
    vm.restore_state(&state).expect("restore state");
    vm.resume().expect("resume");
    let text = wait_for_counter_lines(&second_log, 3);
    assert_eq!(
        guest_bytes(&vm, 0xE_0000, marker.len()),
        marker,
        "the restore rewrote the ACPI area"
    );
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
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut vm = create_vm(&config(
        &test_guest("counter"),
        "",
        anonymous_memory(),
        &log,
    ));
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
    integration_tests::require_kvm!();
    const BLOCKS: u64 = 256;
    // About 25 ms per round here: enough that the save lands mid-run even on a loaded host.
    const ROUNDS: u64 = 16;
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
            &test_guest("blkcheck"),
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
        assert_eq!(vm.memory_actual_size(), GUEST_RAM);
        vm.boot().expect("boot");
        // No control loop here: the test activates the disk when the driver asks, as it would.
        let (text, started) = wait_for_log(&first_log, BOOT_TIMEOUT, |text| {
            vm.activate_pending_devices();
            text.contains("completed seq=") || guest_gave_up(text)
        });
        assert!(started && !guest_gave_up(&text), "{text}");
        vm.pause().expect("pause");
        let counters = vm.counters();
        let disk = counters.get("_disk0").expect("counters of _disk0");
        assert!(
            disk["write_ops"] > 0 && disk["write_bytes"] > 0,
            "the guest has written: {counters:?}"
        );
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
    assert!(first.contains("transport=virtio-pci"), "{first}");
    assert!(state.devices.disks[0].pci.is_some(), "saved as virtio-pci");

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
    integration_tests::require_kvm!();
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

/// A minimal PVH kernel: one loadable segment at 1 MiB holding `code` (entered in 32-bit protected
/// mode, paging off) and the Xen PVH entry note pointing at it.
fn tiny_pvh_kernel(path: &Path, code: &[u8]) {
    const ENTRY: u64 = 0x10_0000;
    const CODE_OFFSET: u64 = 0x1000;
    const EHDR_SIZE: u16 = 64;
    const PHDR_SIZE: u16 = 56;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let mut note = Vec::new();
    for word in [4u32, 4, XEN_ELFNOTE_PHYS32_ENTRY] {
        note.extend_from_slice(&word.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(ENTRY as u32).to_le_bytes());
    let note_offset = u64::from(EHDR_SIZE + 2 * PHDR_SIZE);

    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // 64-bit, little-endian
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&ENTRY.to_le_bytes());
    elf.extend_from_slice(&u64::from(EHDR_SIZE).to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [EHDR_SIZE, PHDR_SIZE, 2, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    let mut program_header = |kind: u32, flags: u32, offset: u64, address: u64, size: u64| {
        elf.extend_from_slice(&kind.to_le_bytes());
        elf.extend_from_slice(&flags.to_le_bytes());
        for value in [offset, address, address, size, size, 0x1000] {
            elf.extend_from_slice(&value.to_le_bytes());
        }
    };
    program_header(1, 5, CODE_OFFSET, ENTRY, code.len() as u64); // PT_LOAD, R+X
    program_header(4, 4, note_offset, 0, note.len() as u64); // PT_NOTE
    elf.extend_from_slice(&note);
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(code);
    std::fs::write(path, elf).unwrap();
}

/// Ring-0 code is emulated on this host and its emulator lacks AES-NI: `aesenc` at the entry
/// point is a KVM internal error (emulation failure). The VMM must report it with its suberror,
/// stop the VM and end with exit code 1 rather than hang.
#[test]
fn a_kvm_internal_error_stops_the_vm_with_exit_code_one() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("aesenc");
    // aesenc %xmm1, %xmm0 ; jmp .
    tiny_pvh_kernel(&kernel, &[0x66, 0x0f, 0x38, 0xdc, 0xc1, 0xeb, 0xfe]);
    let log = dir.path().join("serial.log");
    let config = config(&kernel, "", anonymous_memory(), &log);

    let events = Arc::new(VmEvents::new().unwrap());
    let memory = guest_memory_from_config(&config.memory).unwrap();
    let mut vm = Vm::new(&config, memory, events.clone(), SeccompMode::Enforce).unwrap();
    vm.boot().unwrap();
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    let failures = loop {
        let failures = events.take_failures();
        if !failures.is_empty() || std::time::Instant::now() > deadline {
            break failures;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    vm.shutdown();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].reason.contains("internal error, suberror 1")
            && failures[0].reason.contains("rip 0x100000"),
        "{failures:?}"
    );

    let (code, _) = run_to_end(config, &log);
    assert_eq!(code, 1);
}

/// `ud2` with no IDT is a triple fault: real hardware resets, and so does the guest here, which
/// ends the VMM with the guest-reset code (a crash is not a clean end).
#[test]
fn a_triple_fault_is_a_guest_reset() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("ud2");
    tiny_pvh_kernel(&kernel, &[0x0f, 0x0b]);
    let log = dir.path().join("serial.log");
    let (code, _) = run_to_end(config(&kernel, "", anonymous_memory(), &log), &log);
    assert_eq!(code, vmm::vmm::EXIT_GUEST_RESET);
}

/// A state from another format version, or for another vCPU count, is refused with a message
/// rather than half applied.
#[test]
fn a_mismatched_state_is_refused() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let kernel = test_guest("counter");
    let one_vcpu = config(&kernel, "", anonymous_memory(), &log);
    let mut vm = create_vm(&one_vcpu);
    vm.boot().expect("boot");
    wait_for_counter_lines(&log, 1);
    assert!(
        vm.save_state().is_err(),
        "a running VM's state is not one instant and must be refused"
    );
    vm.pause().expect("pause");
    let state = vm.save_state().expect("save state");
    vm.shutdown();

    let mut future = state.clone();
    future.version += 1;
    let mut vm = create_vm(&one_vcpu);
    let error = vm.restore_state(&future).unwrap_err().to_string();
    assert!(error.contains("version"), "{error}");

    let mut two_vcpus = one_vcpu.clone();
    two_vcpus.cpus = CpusConfig {
        boot_vcpus: 2,
        max_vcpus: 2,
        ..Default::default()
    };
    let mut vm = create_vm(&two_vcpus);
    let error = vm.restore_state(&state).unwrap_err().to_string();
    assert!(error.contains("1 vCPUs"), "{error}");
    assert!(vm.resume().is_err(), "a VM that took no state must not run");
}

/// One HTTP/1.1 request over the API socket (`Connection: close`); returns status and body.
fn api_call(socket: &Path, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
    api_client::request(socket, method, endpoint, body.unwrap_or(""), BOOT_TIMEOUT)
}

/// The control loop's side of the REST API: an empty VMM takes a VM over `vm.create`, boots,
/// reports, pauses and resumes it, refuses operations in the wrong state, and ends on
/// `vmm.shutdown` with exit code 0.
#[test]
fn the_api_drives_a_vm_through_its_lifecycle() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let log = dir.path().join("serial.log");
    let launch = vmm::config::VmmLaunch {
        api_socket: Some(vmm::config::ApiSocketConfig::Path(
            socket.display().to_string(),
        )),
        // Enforce: the vCPU threads of a VM booted over the API start from the filtered
        // control loop thread and install their own filter under it.
        seccomp: SeccompMode::Enforce,
        ..Default::default()
    };
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || sender.send(vmm::run(launch)));
    let (_, up) = wait_for_log(&socket, BOOT_TIMEOUT, |_| socket.exists());
    assert!(up, "the API socket did not appear");

    let (status, body) = api_call(&socket, "GET", "vmm.ping", None);
    assert_eq!(status, 200, "{body}");
    let ping: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ping["pid"], u64::from(std::process::id()));

    assert_eq!(api_call(&socket, "GET", "vm.info", None).0, 404);
    assert_eq!(api_call(&socket, "PUT", "vm.boot", None).0, 404);

    let config = config(&test_guest("counter"), "", anonymous_memory(), &log);
    let config_json = serde_json::to_string(&config).unwrap();
    let (status, body) = api_call(&socket, "PUT", "vm.create", Some(&config_json));
    assert_eq!(status, 204, "{body}");
    let (status, body) = api_call(&socket, "GET", "vm.info", None);
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Created", "{body}");
    assert_eq!(api_call(&socket, "PUT", "vm.pause", None).0, 500);

    let (status, body) = api_call(&socket, "PUT", "vm.boot", None);
    assert_eq!(status, 204, "{body}");
    wait_for_counter_lines(&log, 2);
    let (_, body) = api_call(&socket, "GET", "vm.info", None);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Running", "{body}");
    assert_eq!(info["memory_actual_size"], GUEST_RAM, "{body}");

    assert_eq!(api_call(&socket, "PUT", "vm.pause", None).0, 204);
    let (_, body) = api_call(&socket, "GET", "vm.info", None);
    assert!(body.contains("\"Paused\""), "{body}");
    let (status, body) = api_call(&socket, "PUT", "vm.pause", None);
    assert_eq!(status, 500, "pausing twice: {body}");
    let lines_when_paused = counter_lines(&read_log(&log)).len();
    assert_eq!(api_call(&socket, "PUT", "vm.resume", None).0, 204);
    wait_for_counter_lines(&log, lines_when_paused + 1);

    let (status, body) = api_call(&socket, "GET", "vm.counters", None);
    assert_eq!((status, body.trim()), (200, "{}"), "no disks, no counters");

    assert_counter_advances(&read_log(&log), lines_when_paused + 1);

    // vm.shutdown keeps the config; vm.boot starts the guest afresh (a new serial log).
    assert_eq!(api_call(&socket, "PUT", "vm.shutdown", None).0, 204);
    let (_, body) = api_call(&socket, "GET", "vm.info", None);
    assert!(body.contains("\"Created\""), "{body}");
    assert_eq!(api_call(&socket, "PUT", "vm.resume", None).0, 500);
    assert_eq!(api_call(&socket, "PUT", "vm.boot", None).0, 204);
    let text = wait_for_counter_lines(&log, 1);
    assert!(text.starts_with("counter: boot"), "{text}");
    assert_eq!(api_call(&socket, "PUT", "vm.reboot", None).0, 204);
    wait_for_counter_lines(&log, 1);
    assert_eq!(api_call(&socket, "PUT", "vm.delete", None).0, 204);
    assert_eq!(api_call(&socket, "GET", "vm.info", None).0, 404);

    assert_eq!(api_call(&socket, "PUT", "vmm.shutdown", None).0, 204);
    let code = receiver
        .recv_timeout(BOOT_TIMEOUT)
        .expect("the VMM did not end after vmm.shutdown")
        .expect("run");
    assert_eq!(code, 0);
}

/// Copy-based snapshot (upstream's layout) and restore into a second VM instance: anonymous RAM
/// is copied to `memory-ranges`, RAM in a shared file is not (the restore maps the file again).
fn counter_survives_snapshot_and_restore(memory: MemoryConfig, copied_bytes: u64) {
    let dir = tempfile::tempdir().unwrap();
    let snapshot_dir = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot_dir).unwrap();
    let url = format!("file://{}", snapshot_dir.display());
    let first_log = dir.path().join("first.log");
    let second_log = dir.path().join("second.log");
    let kernel = test_guest("counter");

    let mut first = config(&kernel, "", memory, &first_log);
    let mut vm = create_vm(&first);
    vm.boot().expect("boot");
    wait_for_counter_lines(&first_log, 2);
    assert!(
        vmm::snapshot::save(&vm, &url).is_err(),
        "a running VM must not be snapshotted"
    );
    vm.pause().expect("pause");
    vmm::snapshot::save(&vm, &url).expect("snapshot");
    vm.shutdown();
    drop(vm);
    let last_before = counter_lines(&read_log(&first_log))
        .last()
        .expect("lines before the snapshot")
        .counter;
    let copied = std::fs::metadata(snapshot_dir.join("memory-ranges"))
        .unwrap()
        .len();
    assert_eq!(copied, copied_bytes);
    assert!(snapshot_dir.join("config.json").exists());

    // The restored VM writes its serial output to a new log: point the stored config there.
    first.serial.file = Some(second_log.display().to_string());
    std::fs::write(
        snapshot_dir.join("config.json"),
        serde_json::to_string(&first).unwrap(),
    )
    .unwrap();
    let restore = vmm::config::RestoreConfig {
        source_url: url,
        resume: true,
        ..Default::default()
    };
    let mut vm = vmm::snapshot::restore(
        &restore,
        Arc::new(VmEvents::new().unwrap()),
        SeccompMode::Enforce,
    )
    .expect("restore");
    assert_eq!(vm.run_state(), VmRunState::Running);
    let text = wait_for_counter_lines(&second_log, 2);
    vm.shutdown();
    assert!(!text.contains("counter: boot"), "{text}");
    let after = assert_counter_advances(&text, 2);
    assert!(after[0].counter > last_before, "{text}");
}

#[test]
fn snapshot_and_restore_of_anonymous_memory_copies_it() {
    integration_tests::require_kvm!();
    counter_survives_snapshot_and_restore(anonymous_memory(), GUEST_RAM);
}

#[test]
fn snapshot_and_restore_of_shared_file_memory_copies_nothing() {
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    counter_survives_snapshot_and_restore(file_memory(&dir.path().join("ram")), 0);
}

/// Sum of `bytes` modulo 256: 0 for a table with a right checksum.
fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte))
}

fn guest_bytes(vm: &Vm, address: u64, len: usize) -> Vec<u8> {
    use vm_memory::Bytes;
    let mut bytes = vec![0u8; len];
    vm.memory()
        .read_slice(&mut bytes, vm_memory::GuestAddress(address))
        .unwrap_or_else(|e| panic!("reading {len} bytes at {address:#x}: {e}"));
    bytes
}

fn u32_in(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn u64_in(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// A table's whole bytes from its header's length, checked: signature and zero checksum.
fn guest_table(vm: &Vm, address: u64, signature: &[u8; 4]) -> Vec<u8> {
    let header = guest_bytes(vm, address, 36);
    assert_eq!(&header[0..4], signature, "table at {address:#x}");
    let table = guest_bytes(vm, address, u32_in(&header, 4) as usize);
    assert_eq!(byte_sum(&table), 0, "{:?} checksum", signature);
    table
}

/// A cold boot writes the ACPI tables for the VM's vCPUs and hands the RSDP to the guest: the
/// guest (PVH) finds it in `hvm_start_info.rsdp_paddr`, and from there the XSDT leads to a MADT
/// with one enabled local APIC per vCPU. Read back from guest memory after the guest runs.
#[test]
fn a_cold_boot_gives_the_guest_acpi_tables_for_its_vcpus() {
    integration_tests::require_kvm!();
    const VCPUS: u8 = 2;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut config = config(&test_guest("counter"), "", anonymous_memory(), &log);
    config.cpus = CpusConfig {
        boot_vcpus: VCPUS,
        max_vcpus: VCPUS,
        ..Default::default()
    };
    let mut vm = create_vm(&config);
    vm.boot().expect("boot");
    wait_for_counter_lines(&log, 1);
    vm.pause().expect("pause");

    // hvm_start_info at 0x6000 (docs/boot.md): rsdp_paddr is the u64 at offset 32.
    let start_info = guest_bytes(&vm, 0x6000, 56);
    assert_eq!(u32_in(&start_info, 0), 0x336E_C578, "start_info magic");
    let rsdp_address = u64_in(&start_info, 32);
    assert_eq!(
        rsdp_address, 0xE_0000,
        "the RSDP sits at the base of the ACPI area"
    );

    let rsdp = guest_bytes(&vm, rsdp_address, 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(byte_sum(&rsdp[0..20]), 0, "RSDP checksum");
    assert_eq!(byte_sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "RSDP revision");

    let xsdt = guest_table(&vm, u64_in(&rsdp, 24), b"XSDT");
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|at| u64_in(&xsdt, at))
        .collect();
    let mut signatures = Vec::new();
    for &address in &entries {
        signatures.push(guest_bytes(&vm, address, 4));
    }
    let madt_address = entries[signatures
        .iter()
        .position(|signature| signature == b"APIC")
        .unwrap_or_else(|| panic!("no MADT in the XSDT: {signatures:?}"))];
    let madt = guest_table(&vm, madt_address, b"APIC");
    assert_eq!(u32_in(&madt, 36), 0xFEE0_0000, "local APIC address");
    // Interrupt controller structures from offset 44: type, length, body.
    let mut apic_ids = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        let (kind, len) = (madt[at], usize::from(madt[at + 1]));
        assert!(len >= 2, "MADT entry at {at} has length {len}");
        if kind == 0 {
            assert_eq!(u32_in(&madt, at + 4) & 1, 1, "local APIC enabled");
            apic_ids.push(madt[at + 3]);
        }
        at += len;
    }
    assert_eq!(
        apic_ids,
        (0..VCPUS).collect::<Vec<u8>>(),
        "one LAPIC per vCPU"
    );

    let fadt_address = entries[signatures
        .iter()
        .position(|signature| signature == b"FACP")
        .expect("no FADT in the XSDT")];
    guest_table(&vm, fadt_address, b"FACP");
    vm.shutdown();
}

/// Each vCPU's MP state goes with its saved state, in all three states an AP passes through on
/// its way up: waiting for INIT (KVM's `UNINITIALIZED`), INIT taken and waiting for the STARTUP
/// IPI (`INIT_RECEIVED`), running (`RUNNABLE`). A VM restored from each state keeps the AP where
/// it was, and the guest's next step (INIT, SIPI) still takes it up; a running AP runs on.
#[test]
fn each_vcpus_mp_state_is_saved_and_restored() {
    use integration_tests::harness::{assert_smp_counters_advance, smp_counter_lines};
    integration_tests::require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let ram = dir.path().join("ram");
    let kernel = test_guest("smpcheck");
    // 30 waiting lines (about 3 s) before the INIT, 3 s from the INIT to the SIPI: time to pause
    // the VM in each state.
    let cmdline = "start_delay=30 init_sipi_ms=3000";
    let log = |run: usize| dir.path().join(format!("run{run}.log"));
    let new_vm = |run: usize| {
        let mut config = config(&kernel, cmdline, file_memory(&ram), &log(run));
        config.cpus = CpusConfig {
            boot_vcpus: 2,
            max_vcpus: 2,
            ..Default::default()
        };
        create_vm(&config)
    };
    let mp_states = |state: &VmState| -> Vec<u32> {
        state
            .vcpus
            .iter()
            .map(|vcpu| vcpu.mp_state.mp_state)
            .collect()
    };
    // Runs VM `run` (booted, or restored from `state`) until its log satisfies `done`, then
    // pauses it and returns its state and log.
    let run_until = |run: usize, state: Option<&VmState>, done: &dyn Fn(&str) -> bool| {
        let mut vm = new_vm(run);
        match state {
            None => vm.boot().expect("boot"),
            Some(state) => {
                vm.restore_state(state).expect("restore");
                assert_eq!(
                    mp_states(&vm.save_state().unwrap()),
                    mp_states(state),
                    "the restored VM is not in the saved MP states"
                );
                vm.resume().expect("resume");
            }
        }
        let (text, _) = wait_for_log(&log(run), BOOT_TIMEOUT, |text| {
            done(text) || guest_gave_up(text)
        });
        assert!(done(&text), "run {run}:\n{text}");
        vm.pause().expect("pause");
        let saved = vm.save_state().expect("save");
        vm.shutdown();
        (saved, read_log(&log(run)))
    };
    let runnable = kvm_bindings::KVM_MP_STATE_RUNNABLE;

    let (waiting, text) = run_until(0, None, &|text| text.contains("smpcheck waiting 1\n"));
    assert!(!text.contains("INIT sent"), "{text}");
    assert_eq!(
        mp_states(&waiting),
        [runnable, kvm_bindings::KVM_MP_STATE_UNINITIALIZED]
    );

    let (init_received, text) = run_until(1, Some(&waiting), &|text| {
        text.contains("INIT sent to cpu 1\n")
    });
    assert!(
        !text.contains("smpcheck: boot") && !text.contains("started"),
        "{text}"
    );
    assert_eq!(
        mp_states(&init_received),
        [runnable, kvm_bindings::KVM_MP_STATE_INIT_RECEIVED]
    );

    let (running, text) = run_until(2, Some(&init_received), &|text| {
        smp_counter_lines(text).len() >= 2
    });
    assert!(
        text.contains("smpcheck: cpu 1 apic=1 started after "),
        "{text}"
    );
    assert_smp_counters_advance(&text, 2, 2);
    assert_eq!(mp_states(&running), [runnable, runnable]);
    let before = smp_counter_lines(&text).pop().unwrap();

    let (_, text) = run_until(3, Some(&running), &|text| {
        smp_counter_lines(text).len() >= 2
    });
    let after = assert_smp_counters_advance(&text, 2, 2);
    // The first line may show the AP where it was saved (see smp.rs, assert_all_continue).
    assert!(
        after[0][1] >= before[1] && !text.contains("smpcheck: boot"),
        "the AP did not run on: {} before, {} after:\n{text}",
        before[1],
        after[0][1]
    );
}

/// Bit `vector` of a local APIC vector register (IRR at 0x200, ISR at 0x100: eight 32-bit
/// registers, 16 bytes apart) in a saved `kvm_lapic_state`.
fn lapic_vector_bit(lapic: &kvm_bindings::kvm_lapic_state, register: usize, vector: u8) -> bool {
    let at = register + 0x10 * usize::from(vector / 32) + usize::from(vector % 32) / 8;
    lapic.regs[at] as u8 & (1 << (vector % 8)) != 0
}

/// An interrupt that waits in an AP's local APIC (IRR) when the VM is saved, as an MSI raised
/// while the devices drain does, is taken by the AP after the state is restored into a new VM:
/// the saved LAPIC is written back whole and nothing restored later overwrites it. pcimsix's
/// configuration-change vector 0x50 (its ring-0 handler counts and EOIs it; the disk never
/// sends it) is put into vCPU 1's saved IRR.
#[test]
fn an_interrupt_pending_in_an_aps_lapic_at_the_save_is_taken_after_restore() {
    integration_tests::require_kvm!();
    const VECTOR: u8 = 0x50;
    const IRR: usize = 0x200;
    const ISR: usize = 0x100;
    let dir = tempfile::tempdir().unwrap();
    let ram = dir.path().join("ram");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * 4096)
        .unwrap();
    let log = |run: usize| dir.path().join(format!("run{run}.log"));
    let new_vm = |run: usize| {
        let mut config = config(
            &test_guest("pcimsix"),
            "blocks=64 rounds=1000",
            file_memory(&ram),
            &log(run),
        );
        config.cpus = CpusConfig {
            boot_vcpus: 2,
            max_vcpus: 2,
            ..Default::default()
        };
        config.disks = Some(vec![DiskConfig {
            path: Some(disk.display().to_string()),
            ..Default::default()
        }]);
        create_vm(&config)
    };
    // Runs `vm` until its log has `lines` more pcimsix irq lines, then pauses and saves it.
    let run_and_save = |vm: &mut Vm, run: usize, lines: usize| {
        let (text, done) = wait_for_log(&log(run), BOOT_TIMEOUT, |text| {
            vm.activate_pending_devices();
            text.matches("pcimsix irq ").count() >= lines || guest_gave_up(text)
        });
        assert!(done && !guest_gave_up(&text), "run {run}:\n{text}");
        vm.pause().expect("pause");
        vm.save_state().expect("save")
    };

    let mut vm = new_vm(0);
    vm.boot().expect("boot");
    let mut state = run_and_save(&mut vm, 0, 2);
    vm.shutdown();
    let lapic = &mut state.vcpus[1].lapic;
    assert!(!lapic_vector_bit(lapic, IRR, VECTOR) && !lapic_vector_bit(lapic, ISR, VECTOR));
    lapic.regs[IRR + 0x10 * usize::from(VECTOR / 32) + usize::from(VECTOR % 32) / 8] |=
        (1u8 << (VECTOR % 8)) as std::os::raw::c_char;

    let mut vm = new_vm(1);
    vm.restore_state(&state).expect("restore");
    vm.resume().expect("resume");
    let after = run_and_save(&mut vm, 1, 3);
    vm.shutdown();
    let lapic = &after.vcpus[1].lapic;
    assert!(
        !lapic_vector_bit(lapic, IRR, VECTOR) && !lapic_vector_bit(lapic, ISR, VECTOR),
        "vector {VECTOR:#x} is still pending or in service on vCPU 1:\n{}",
        read_log(&log(1))
    );
    let text = read_log(&log(1));
    assert!(!text.contains("pcimsix: boot"), "booted again:\n{text}");
}
