//! Does this host deliver external interrupts into a guest that runs in ring 3?
//!
//! The answer decides how the PCI test guest takes its MSI-X interrupts (issue 13), and this
//! host's KVM is unusual (nested, paravirtual: guest ring 0 is emulated, ring 3 runs natively,
//! software `int $n` does not work). The `intcheck` guest enables its local APIC, installs two
//! ring-0 handlers that count (vector 0x40 for the host, 0x41 for the LAPIC timer, 0x42 the
//! host's stop request) and spins in ring 3 with IF=1, printing its counters.
//!
//! The test is its own minimal VMM on kvm-ioctls (`integration_tests::minimal_vm`, as `kvm_boot.rs`): it needs the VM
//! fd to inject, which the VMM binary does not expose. It injects MSIs the two ways a PCI device
//! model would, through an irqfd bound to a GSI routed as MSI (what MSI-X uses) and with
//! KVM_SIGNAL_MSI, and separately lets the guest's LAPIC timer run. It asserts what this host
//! was measured to do, so a host that changes behaviour is noticed.
//!
//! Without /dev/kvm the test fails unless NV_SKIP_KVM=1 is set (project rule: never skip
//! silently).

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use integration_tests::guests::guest_image;
use integration_tests::minimal_vm::MinimalVm;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use arch::layout::{I8042_COMMAND_PORT, I8042_RESET_COMMAND, LAPIC_START, SERIAL_PORT_BASE};

const RAM_SIZE: usize = 64 << 20;
/// Where KVM keeps its TSS pages (the VMM's choice too).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The guest's vector for host-injected interrupts and its stop request, and the MSI address
/// that carries a vector to APIC 0 (fixed delivery, edge, physical destination 0).
const EXTERNAL_VECTOR: u32 = 0x40;
const STOP_VECTOR: u32 = EXTERNAL_VECTOR + 2;
const MSI_ADDRESS: u32 = LAPIC_START.0 as u32;
/// A GSI past the IOAPIC's 24 pins, routed as MSI, as a PCI device's MSI-X vector would be.
const MSI_GSI: u32 = 24;
/// Interrupts injected each way. The test sends the next only when the guest has counted
/// the previous: two edge interrupts of one vector that meet in the IRR count once, which
/// happens whenever the vCPU thread waits for a core.
const INJECTIONS: u64 = 40;
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Why the vCPU thread stops when the guest ends itself.
const GUEST_RESET: &str = "reset by the guest";
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the vCPU thread saw: the serial output and, once it stopped, why.
#[derive(Default)]
struct Console {
    output: Vec<u8>,
    stopped: Option<String>,
}

/// One running intcheck guest.
struct Guest {
    vm: MinimalVm,
    console: Arc<Mutex<Console>>,
}

impl Guest {
    fn boot(kvm: &Kvm, parameters: &str) -> Guest {
        let vm = MinimalVm::new(kvm, RAM_SIZE, |vm| {
            vm.set_tss_address(KVM_TSS_ADDRESS).unwrap();
            // Before the vCPU, so it gets an in-kernel local APIC.
            vm.create_irq_chip().unwrap();
        });

        let vcpu = vm.vm.create_vcpu(0).unwrap();
        let tsc_khz = vcpu.get_tsc_khz().unwrap();
        let cmdline = format!("tsc_khz={tsc_khz} {parameters}");
        let image = guest_image("intcheck").unwrap();
        let entry = arch::load_kernel(
            &vm.mem,
            &mut File::open(image).unwrap(),
            &cmdline,
            None,
            None,
        )
        .unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        vm.program_boot_vcpu(&vcpu, &entry);

        let console = Arc::new(Mutex::new(Console::default()));
        let vcpu_console = console.clone();
        // Detached: a guest that stops in `hlt` (its fault handler) blocks KVM_RUN for good,
        // and the test then fails on its timeout with the output so far.
        thread::spawn(move || run_vcpu(vcpu, &vcpu_console));
        Guest { vm, console }
    }

    /// Waits until the output contains `text` or the vCPU stopped; false on timeout.
    fn wait_for(&self, text: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            {
                let console = self.console.lock().unwrap();
                if String::from_utf8_lossy(&console.output).contains(text) {
                    return true;
                }
                if console.stopped.is_some() {
                    return false;
                }
            }
            thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Waits until the guest reset the VM; false on timeout or any other stop.
    fn wait_for_reset(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(why) = &self.console.lock().unwrap().stopped {
                return why == GUEST_RESET;
            }
            thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn transcript(&self) -> String {
        let console = self.console.lock().unwrap();
        format!(
            "{}\n[vCPU: {}]",
            String::from_utf8_lossy(&console.output),
            console.stopped.as_deref().unwrap_or("still running")
        )
    }

    /// Waits until the guest reports it has taken `count` host interrupts.
    fn expect_delivery(&self, count: u64, how: &str) {
        assert!(
            self.wait_for(&format!("intcheck got {count}\n"), DELIVERY_TIMEOUT),
            "interrupt {count} ({how}) was not delivered:\n{}",
            self.transcript()
        );
    }

    /// Sends an MSI with `vector` to APIC 0 and checks KVM delivered it.
    fn signal(&self, vector: u32) {
        let msi = kvm_msi {
            address_lo: MSI_ADDRESS,
            data: vector,
            ..Default::default()
        };
        // The number of vCPUs it reached; 0 means the guest's APIC refused it.
        assert_eq!(self.vm.vm.signal_msi(msi).unwrap(), 1, "KVM_SIGNAL_MSI");
    }

    /// Boots to `intcheck: ready`, runs `drive`, asks the guest to stop and returns its final
    /// counters.
    fn run(kvm: &Kvm, parameters: &str, drive: impl FnOnce(&Guest)) -> Counters {
        let guest = Guest::boot(kvm, parameters);
        assert!(
            guest.wait_for("intcheck: ready", BOOT_TIMEOUT),
            "intcheck did not reach ring 3:\n{}",
            guest.transcript()
        );
        drive(&guest);
        guest.signal(STOP_VECTOR);
        // The guest prints its final counters, then resets.
        assert!(
            guest.wait_for_reset(BOOT_TIMEOUT),
            "intcheck did not stop:\n{}",
            guest.transcript()
        );
        let transcript = guest.transcript();
        let counters = transcript
            .lines()
            .rev()
            .find_map(Counters::parse)
            .unwrap_or_else(|| panic!("no final counters:\n{transcript}"));
        eprintln!("{parameters}: {counters:?}");
        counters
    }
}

fn run_vcpu(mut vcpu: VcpuFd, console: &Mutex<Console>) {
    let stopped = loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(SERIAL_PORT_BASE, data)) => {
                console.lock().unwrap().output.extend_from_slice(data)
            }
            Ok(VcpuExit::IoOut(I8042_COMMAND_PORT, [I8042_RESET_COMMAND])) => {
                break GUEST_RESET.to_owned()
            }
            Ok(VcpuExit::IoOut(..)) => {}
            Ok(VcpuExit::IoIn(_, data)) => data.fill(0xFF),
            Ok(VcpuExit::InternalError) => break "KVM internal error".to_owned(),
            Ok(other) => break format!("unexpected exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => break format!("KVM_RUN failed: {e}"),
        }
    };
    console.lock().unwrap().stopped = Some(stopped);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    external: u64,
    timer: u64,
    from_user: u64,
    from_kernel: u64,
}

impl Counters {
    /// `intcheck final external=<n> timer=<n> from_user=<n> from_kernel=<n>`
    fn parse(line: &str) -> Option<Counters> {
        let rest = line.strip_prefix("intcheck final external=")?;
        let mut values = rest
            .split(' ')
            .map(|field| field.rsplit('=').next().and_then(|v| v.parse::<u64>().ok()));
        Some(Counters {
            external: values.next()??,
            timer: values.next()??,
            from_user: values.next()??,
            from_kernel: values.next()??,
        })
    }
}

fn route_gsi_as_msi(vm: &VmFd, gsi: u32, vector: u32) {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi.address_lo = MSI_ADDRESS;
    entry.u.msi.data = vector;
    vm.set_gsi_routing(&KvmIrqRouting::from_entries(&[entry]).unwrap())
        .unwrap();
}

#[test]
fn msis_from_the_host_reach_a_ring3_guest() {
    integration_tests::require_kvm!();
    let kvm = Kvm::new().unwrap();
    let counters = Guest::run(&kvm, "", |guest| {
        route_gsi_as_msi(&guest.vm.vm, MSI_GSI, EXTERNAL_VECTOR);
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        guest.vm.vm.register_irqfd(&irqfd, MSI_GSI).unwrap();
        for round in 0..INJECTIONS {
            irqfd.write(1).unwrap();
            guest.expect_delivery(2 * round + 1, "irqfd");
            guest.signal(EXTERNAL_VECTOR);
            guest.expect_delivery(2 * round + 2, "KVM_SIGNAL_MSI");
        }
    });
    // Measured on this host: every interrupt arrives, each taken by the ring-0 handler
    // while the guest ran in ring 3 (the stop request is the one extra).
    assert_eq!(counters.external, 2 * INJECTIONS, "{counters:?}");
    assert_eq!(counters.timer, 0);
    assert_eq!(counters.from_user, 2 * INJECTIONS + 1, "{counters:?}");
    assert_eq!(counters.from_kernel, 0, "{counters:?}");
}

#[test]
fn the_lapic_timer_interrupts_a_ring3_guest() {
    integration_tests::require_kvm!();
    let kvm = Kvm::new().unwrap();
    // A 1 ms period at the 1 GHz APIC bus clock KVM emulates, for 300 ms.
    let counters = Guest::run(&kvm, "timer=1000000", |_| {
        thread::sleep(Duration::from_millis(300))
    });
    assert_eq!(counters.external, 0);
    assert!(counters.timer > 0, "{counters:?}");
    assert_eq!(counters.from_user, counters.timer + 1, "{counters:?}");
    assert_eq!(counters.from_kernel, 0, "{counters:?}");
}
