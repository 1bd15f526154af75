//! PCI segment 0 on a real KVM VM: BAR allocation and mapping, both configuration mechanisms,
//! BAR moves (regions and ioeventfds), MSI-X through KVM GSI routes and irqfds into a vCPU's
//! local APIC (masking and pending bits included), and the state across a save into a new VM.

use std::time::{Duration, Instant};

use devices::pci::{
    MsixConfig, MsixDelivery, MsixState, PciConfiguration, PciHeader, PciIoEventFd,
    MSIX_CONTROL_ENABLE,
};
use kvm_ioctls::{Kvm, VcpuFd};

use super::*;
use crate::api::tests::kvm_available;

const VENDOR: u16 = 0x1AF4;
const DEVICE: u16 = 0x10F0;
/// BAR 0: 64-bit, MSI-X table at 0, PBA at 0x800. BAR 2: 32-bit, one register, with an
/// ioeventfd on offset 0. BAR 4: I/O.
const MSIX_BAR: usize = 0;
const MSIX_BAR_SIZE: u64 = 0x1000;
const PBA_OFFSET: u64 = 0x800;
const REG_BAR: usize = 2;
const REG_BAR_SIZE: u64 = 0x100;
const IO_BAR: usize = 4;
const VECTORS: u16 = 2;
const RAM: u64 = 64 << 20;

/// A function with MSI-X, as virtio-pci has, and a register BAR with an ioeventfd.
struct TestFunction {
    config: PciConfiguration,
    msix: MsixConfig,
    register: u32,
    notify: EventFd,
    moves: Vec<BarRelocation>,
}

impl TestFunction {
    fn new(sink: Arc<dyn MsiInterruptSink>) -> Self {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VENDOR,
            device_id: DEVICE,
            revision_id: 0,
            class: 0xFF,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            interrupt_pin: 0,
        });
        let mem64 = BarKind::Memory64 {
            prefetchable: false,
        };
        config.add_bar(MSIX_BAR, mem64, MSIX_BAR_SIZE).unwrap();
        let mem32 = BarKind::Memory32 {
            prefetchable: false,
        };
        config.add_bar(REG_BAR, mem32, REG_BAR_SIZE).unwrap();
        config.add_bar(IO_BAR, BarKind::Io, 16).unwrap();
        let mut msix = MsixConfig::new(usize::from(VECTORS), sink).unwrap();
        msix.add_capability(&mut config, (MSIX_BAR, 0), (MSIX_BAR, PBA_OFFSET))
            .unwrap();
        Self {
            config,
            msix,
            register: 0,
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            moves: Vec::new(),
        }
    }
}

impl PciDevice for TestFunction {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarRelocation> {
        let relocation = self.config.write(offset, data);
        self.msix.config_written(&self.config, offset, data.len());
        relocation
    }
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            MSIX_BAR if offset >= PBA_OFFSET => self.msix.read_pba(offset - PBA_OFFSET, data),
            MSIX_BAR => self.msix.read_table(offset, data),
            _ => {
                let bytes = self.register.to_le_bytes();
                data.copy_from_slice(&bytes[..data.len()]);
            }
        }
    }
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            MSIX_BAR if offset < PBA_OFFSET => self.msix.write_table(offset, data),
            MSIX_BAR => {}
            _ => self.register = u32::from_le_bytes(data.try_into().unwrap_or([0; 4])),
        }
    }
    fn ioeventfds(&self) -> Vec<PciIoEventFd<'_>> {
        vec![PciIoEventFd {
            bar: REG_BAR,
            offset: 0,
            datamatch: Some(7),
            evt: &self.notify,
        }]
    }
    fn bar_moved(&mut self, relocation: &BarRelocation) {
        self.moves.push(*relocation);
    }
}

/// A VM with an in-kernel irqchip and vCPU 0 (its local APIC software-enabled, so fixed MSIs
/// land in its IRR), the two buses and segment 0 with a `TestFunction` at 00:01.0.
struct Platform {
    vm_fd: Arc<VmFd>,
    vcpu: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    segment: PciSegment,
    function: Arc<Mutex<TestFunction>>,
    msi: Arc<KvmMsiInterrupts>,
}

const APIC_SPURIOUS: usize = 0xF0;
const APIC_SOFTWARE_ENABLE: u8 = 1;
const APIC_IRR: usize = 0x200;

impl Platform {
    fn new() -> Self {
        let kvm = Kvm::new().unwrap();
        let vm_fd = Arc::new(kvm.create_vm().unwrap());
        vm_fd.create_irq_chip().unwrap();
        let vcpu = vm_fd.create_vcpu(0).unwrap();
        let mut lapic = vcpu.get_lapic().unwrap();
        // SVR bit 8 (byte 1, bit 0): APIC software enabled.
        lapic.regs[APIC_SPURIOUS + 1] |= APIC_SOFTWARE_ENABLE as i8;
        vcpu.set_lapic(&lapic).unwrap();
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let segment = PciSegment::new(&vm_fd, &pio, &mmio, RAM).unwrap();
        let msi = segment.msi_interrupts(VECTORS).unwrap();
        let function = Arc::new(Mutex::new(TestFunction::new(msi.clone())));
        let bdf = segment.add_device("test0", function.clone()).unwrap();
        assert_eq!(bdf, PciBdf::new(1));
        Self {
            vm_fd,
            vcpu,
            pio,
            mmio,
            segment,
            function,
            msi,
        }
    }

    fn ecam(device: u8, register: u16) -> u64 {
        arch::layout::PCI_ECAM_START.0 + (u64::from(device) << 15) + u64::from(register)
    }

    fn ecam_read(&self, device: u8, register: u16) -> u32 {
        let mut data = [0u8; 4];
        self.mmio
            .read(Self::ecam(device, register), &mut data)
            .unwrap();
        u32::from_le_bytes(data)
    }

    fn ecam_write(&self, device: u8, register: u16, value: u32) {
        self.mmio
            .write(Self::ecam(device, register), &value.to_le_bytes())
            .unwrap();
    }

    fn port_read(&self, device: u8, register: u16) -> u32 {
        let address = 1 << 31 | u32::from(device) << 11 | u32::from(register & 0xFC);
        let port = u64::from(arch::layout::PCI_CONFIG_PORT);
        self.pio.write(port, &address.to_le_bytes()).unwrap();
        let mut data = [0u8; 4];
        self.pio.read(port + 4, &mut data).unwrap();
        u32::from_le_bytes(data)
    }

    fn mmio_read(&self, address: u64) -> Result<u32, devices::Error> {
        let mut data = [0u8; 4];
        self.mmio.read(address, &mut data)?;
        Ok(u32::from_le_bytes(data))
    }

    fn mmio_write(&self, address: u64, value: u32) {
        self.mmio.write(address, &value.to_le_bytes()).unwrap();
    }

    fn bar(&self, index: usize) -> Bar {
        self.function.lock().unwrap().config.bar(index).unwrap()
    }

    fn irr(&self, vector: u8) -> bool {
        let lapic = self.vcpu.get_lapic().unwrap();
        let register = APIC_IRR + usize::from(vector / 32) * 0x10;
        let word = u32::from_le_bytes([0, 1, 2, 3].map(|i| lapic.regs[register + i] as u8));
        word & (1 << (vector % 32)) != 0
    }

    /// Waits up to a second for `vector` to show in vCPU 0's IRR (an irqfd may inject from a
    /// kernel worker).
    fn wait_irr(&self, vector: u8) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            if self.irr(vector) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Programs MSI-X vector `vector` through the table in BAR 0: fixed delivery of
    /// `guest_vector` to APIC ID 0, masked or not; and enables MSI-X.
    fn program_vector(&self, vector: u16, guest_vector: u8, masked: bool) {
        let entry = self.bar(MSIX_BAR).address + u64::from(vector) * 16;
        self.mmio_write(entry, 0xFEE0_0000);
        self.mmio_write(entry + 4, 0);
        self.mmio_write(entry + 8, u32::from(guest_vector));
        self.mmio_write(entry + 12, u32::from(masked));
        let capability = u16::from(
            self.function
                .lock()
                .unwrap()
                .config
                .read_u16(devices::pci::REG_CAPABILITIES) as u8,
        );
        let control = (self.ecam_read(1, capability) >> 16) as u16 | MSIX_CONTROL_ENABLE;
        self.mmio
            .write(Self::ecam(1, capability + 2), &control.to_le_bytes())
            .unwrap();
    }

    fn trigger(&self, vector: u16) -> MsixDelivery {
        self.function.lock().unwrap().msix.trigger(vector).unwrap()
    }

    fn pending_bits(&self) -> u32 {
        self.mmio_read(self.bar(MSIX_BAR).address + PBA_OFFSET)
            .unwrap()
    }
}

/// Whether an ioeventfd with `datamatch` (4 bytes) is registered at MMIO `address`: KVM refuses
/// a second one on the same address, length and datamatch with EEXIST.
fn ioeventfd_registered(vm_fd: &VmFd, address: u64, datamatch: u32) -> bool {
    let probe = EventFd::new(EFD_NONBLOCK).unwrap();
    let at = IoEventAddress::Mmio(address);
    match vm_fd.register_ioevent(&probe, &at, datamatch) {
        Ok(()) => {
            vm_fd.unregister_ioevent(&probe, &at, datamatch).unwrap();
            false
        }
        Err(e) if e.errno() == libc::EEXIST => true,
        Err(e) => panic!("probing the ioeventfd at {address:#x}: {e}"),
    }
}

#[test]
fn the_routing_table_starts_with_kvms_default_irqchip_routes() {
    let routes = default_irqchip_routes();
    assert_eq!(routes.len(), 24 + 16);
    for gsi in 0..24u32 {
        let entries: Vec<_> = routes.iter().filter(|e| e.gsi == gsi).collect();
        assert_eq!(entries.len(), if gsi < 16 { 2 } else { 1 }, "GSI {gsi}");
        for entry in entries {
            assert_eq!(entry.type_, KVM_IRQ_ROUTING_IRQCHIP);
            // SAFETY: irqchip entries carry the irqchip member of the union.
            let (chip, pin) = unsafe { (entry.u.irqchip.irqchip, entry.u.irqchip.pin) };
            match chip {
                KVM_IRQCHIP_IOAPIC => assert_eq!(pin, gsi),
                KVM_IRQCHIP_PIC_MASTER => assert!(gsi < 8 && pin == gsi),
                KVM_IRQCHIP_PIC_SLAVE => assert!((8..16).contains(&gsi) && pin == gsi - 8),
                other => panic!("GSI {gsi}: chip {other}"),
            }
        }
    }
    assert_eq!(arch::layout::MSI_GSI_START, 24);
}

#[test]
fn bars_come_from_the_platform_windows_and_both_mechanisms_see_the_same_bus() {
    if !kvm_available("bars_come_from_the_platform_windows") {
        return;
    }
    let platform = Platform::new();
    let (mmio64, _) = arch::layout::pci_mmio64_window(RAM);
    assert_eq!(platform.bar(MSIX_BAR).address, mmio64.0);
    assert_eq!(
        platform.bar(REG_BAR).address,
        arch::layout::PCI_MMIO32_START.0
    );
    assert_eq!(
        platform.bar(IO_BAR).address,
        u64::from(arch::layout::PCI_IO_START)
    );
    // Host bridge and the function, the same through the ports and ECAM; nothing elsewhere.
    assert_eq!(platform.port_read(0, 0), 0x0D57_8086);
    for device in 0..32u8 {
        for register in (0..256u16).step_by(4) {
            assert_eq!(
                platform.port_read(device, register),
                platform.ecam_read(device, register),
                "{device:02x} register {register:#x}"
            );
        }
    }
    assert_eq!(
        platform.ecam_read(1, 0),
        u32::from(DEVICE) << 16 | u32::from(VENDOR)
    );
    assert_eq!(platform.ecam_read(2, 0), u32::MAX);
    assert_eq!(
        platform.segment.functions(),
        [PciBdf::new(0), PciBdf::new(1)]
    );
    // The BARs answer on their buses: the register BAR, and every MSI-X vector reads masked.
    platform.mmio_write(platform.bar(REG_BAR).address, 0x1234);
    assert_eq!(
        platform.mmio_read(platform.bar(REG_BAR).address).unwrap(),
        0x1234
    );
    assert_eq!(
        platform
            .mmio_read(platform.bar(MSIX_BAR).address + 12)
            .unwrap(),
        1
    );
    let mut data = [0u8; 4];
    platform
        .pio
        .read(u64::from(arch::layout::PCI_IO_START), &mut data)
        .unwrap();
    assert!(ioeventfd_registered(
        &platform.vm_fd,
        platform.bar(REG_BAR).address,
        7
    ));
    let devices = platform.segment.devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].id, "test0");
    assert_eq!(devices[0].bdf.to_string(), "0000:00:01.0");
    assert_eq!(devices[0].bars.len(), 3);
}

#[test]
fn a_moved_bar_answers_only_at_its_new_address_and_takes_its_ioeventfd_along() {
    if !kvm_available("a_moved_bar_answers_only_at_its_new_address") {
        return;
    }
    let platform = Platform::new();
    let old = platform.bar(REG_BAR).address;
    let new = old + 0x10_0000;
    let register = devices::pci::REG_BAR0 + 4 * REG_BAR as u16;
    // Sizing first, as a guest does: no move.
    platform.ecam_write(1, register, u32::MAX);
    assert_eq!(platform.ecam_read(1, register), !(REG_BAR_SIZE as u32 - 1));
    platform.ecam_write(1, register, old as u32);
    assert!(platform.function.lock().unwrap().moves.is_empty());
    platform.mmio_write(old, 5);
    // The move.
    platform.ecam_write(1, register, new as u32);
    assert!(matches!(
        platform.mmio_read(old),
        Err(devices::Error::NoDeviceAt(_))
    ));
    assert_eq!(platform.mmio_read(new).unwrap(), 5);
    assert!(ioeventfd_registered(&platform.vm_fd, new, 7));
    assert!(!ioeventfd_registered(&platform.vm_fd, old, 7));
    let moves = platform.function.lock().unwrap().moves.clone();
    assert_eq!(moves.len(), 1);
    assert_eq!((moves[0].old_address, moves[0].new_address), (old, new));
    let info = platform.segment.devices();
    assert!(info[0]
        .bars
        .iter()
        .any(|bar| bar.index == REG_BAR && bar.address == new));

    // A move onto another device's range is not mapped (it would not decode) and does not
    // disturb that device; moving on maps it again.
    let msix = platform.bar(MSIX_BAR).address;
    let mem64_register = devices::pci::REG_BAR0 + 4 * MSIX_BAR as u16;
    platform.ecam_write(1, register, arch::layout::PCI_ECAM_START.0 as u32);
    assert!(platform.mmio_read(new).is_err());
    assert_eq!(platform.ecam_read(0, 0), 0x0D57_8086, "ECAM disturbed");
    platform.ecam_write(1, register, new as u32);
    assert_eq!(platform.mmio_read(new).unwrap(), 5);
    // A 64-bit BAR moved by halves: the table answers at the final address.
    let target = 0x2_0000_0000u64;
    platform.ecam_write(1, mem64_register, target as u32 | 0x4);
    platform.ecam_write(1, mem64_register + 4, (target >> 32) as u32);
    assert!(platform.mmio_read(msix).is_err());
    assert_eq!(platform.mmio_read(target + 12).unwrap(), 1);
}

#[test]
fn msix_vectors_reach_the_local_apic_through_gsi_routes_and_irqfds_and_masking_holds_them() {
    if !kvm_available("msix_vectors_reach_the_local_apic") {
        return;
    }
    let platform = Platform::new();
    assert_eq!(platform.msi.gsi(0), Some(arch::layout::MSI_GSI_START));
    assert_eq!(platform.msi.gsi(1), Some(arch::layout::MSI_GSI_START + 1));
    // Disabled MSI-X drops the interrupt.
    assert_eq!(platform.trigger(0), MsixDelivery::Disabled);
    platform.program_vector(0, 0x45, false);
    platform.program_vector(1, 0x46, true);
    assert_eq!(platform.segment.routing().state().msi.len(), 2);
    assert!(!platform.irr(0x45));
    assert_eq!(platform.trigger(0), MsixDelivery::Delivered);
    assert!(platform.wait_irr(0x45), "vector 0 never reached the LAPIC");
    // Masked: nothing reaches the LAPIC, the pending bit is set.
    assert_eq!(platform.trigger(1), MsixDelivery::Pending);
    std::thread::sleep(Duration::from_millis(50));
    assert!(!platform.irr(0x46), "a masked vector fired");
    assert_eq!(platform.pending_bits(), 0b10);
    // Unmask through the table: the pending message goes out, the bit clears.
    let entry = platform.bar(MSIX_BAR).address + 16;
    platform.mmio_write(entry + 12, 0);
    assert!(
        platform.wait_irr(0x46),
        "the pending vector was not sent on unmask"
    );
    assert_eq!(platform.pending_bits(), 0);
    // A vector pointed away from the local APICs has no route: its irqfd fires nothing.
    platform.mmio_write(entry, 0x1000);
    assert_eq!(platform.segment.routing().state().msi.len(), 1);
}

#[test]
fn a_moved_bar_and_a_programmed_vector_survive_a_save_into_a_new_vm() {
    if !kvm_available("a_moved_bar_and_a_programmed_vector_survive") {
        return;
    }
    let first = Platform::new();
    let register = devices::pci::REG_BAR0 + 4 * REG_BAR as u16;
    let moved = first.bar(REG_BAR).address + 0x20_0000;
    first.ecam_write(1, register, moved as u32);
    first.mmio_write(moved, 9);
    first.program_vector(0, 0x51, false);
    first.program_vector(1, 0x52, true);
    assert_eq!(first.trigger(1), MsixDelivery::Pending);
    // CONFIG_ADDRESS latched mid-access.
    let latch = 1u32 << 31 | 1 << 11 | 0x10;
    first
        .pio
        .write(
            u64::from(arch::layout::PCI_CONFIG_PORT),
            &latch.to_le_bytes(),
        )
        .unwrap();
    let saved = serde_json::to_string(&first.segment.save_state().unwrap()).unwrap();
    let msix: MsixState = first.function.lock().unwrap().msix.state();
    let register_value = first.function.lock().unwrap().register;
    drop(first);

    // The new process: the same devices in the same order, then the state.
    let second = Platform::new();
    let state: PciSegmentState = serde_json::from_str(&saved).unwrap();
    {
        let mut function = second.function.lock().unwrap();
        function.msix.restore(&msix).unwrap();
        function.register = register_value;
    }
    second.segment.restore_state(&state).unwrap();
    assert_eq!(second.bar(REG_BAR).address, moved);
    assert_eq!(second.mmio_read(moved).unwrap(), 9);
    let allocated = arch::layout::PCI_MMIO32_START.0;
    assert!(
        second.mmio_read(allocated).is_err(),
        "still at the allocated address"
    );
    assert!(ioeventfd_registered(&second.vm_fd, moved, 7));
    assert!(!ioeventfd_registered(&second.vm_fd, allocated, 7));
    // The latch: the next CONFIG_DATA read is BAR 0 of 00:01.0.
    let mut data = [0u8; 4];
    second
        .pio
        .read(u64::from(arch::layout::PCI_CONFIG_PORT) + 4, &mut data)
        .unwrap();
    assert_eq!(
        u32::from_le_bytes(data) as u64 & !0xF,
        second.bar(MSIX_BAR).address & 0xFFFF_FFF0
    );
    // The programmed vector is routed in the new VM; the pending one is still pending.
    assert_eq!(second.segment.routing().state(), state.gsi_routing);
    assert_eq!(second.trigger(0), MsixDelivery::Delivered);
    assert!(
        second.wait_irr(0x51),
        "the restored vector does not reach the LAPIC"
    );
    assert_eq!(second.pending_bits(), 0b10);
    second.mmio_write(second.bar(MSIX_BAR).address + 16 + 12, 0);
    assert!(second.wait_irr(0x52));
}

#[test]
fn a_state_for_other_devices_is_refused() {
    if !kvm_available("a_state_for_other_devices_is_refused") {
        return;
    }
    let platform = Platform::new();
    let mut state = platform.segment.save_state().unwrap();
    state.gsi_routing.allocated += 1;
    assert!(platform.segment.restore_state(&state).is_err());
    let mut state = platform.segment.save_state().unwrap();
    state.version = 99;
    assert!(platform.segment.restore_state(&state).is_err());
    let mut state = platform.segment.save_state().unwrap();
    state.gsi_routing.msi.push(MsiRoute {
        gsi: 3,
        address: 0xFEE0_0000,
        data: 0x30,
    });
    assert!(platform.segment.restore_state(&state).is_err());
    // The device is still mapped where it was after the refusals.
    assert!(platform.mmio_read(platform.bar(REG_BAR).address).is_ok());
}

#[test]
fn bar_windows_allocate_naturally_aligned_and_refuse_when_full() {
    let mut window = AddressWindow::new(0x1000, 0x3000);
    assert_eq!(window.allocate(0x100), Some(0x1000));
    assert_eq!(window.allocate(0x2000), Some(0x2000));
    assert_eq!(window.allocate(0x1000), None);
    assert_eq!(window.allocate(0x10), None);
    let mut window = AddressWindow::new(0x1000, 0x3000);
    assert_eq!(window.allocate(0x4000), None, "larger than the window");
    assert_eq!(window.allocate(0x1000), Some(0x1000));
}

/// `vm.info` shows a PCI device with its `pci_bdf` as upstream prints it and its BARs where they
/// are mapped; no interrupt line.
#[test]
fn vm_info_lists_a_pci_device_with_its_bdf_and_bars() {
    if !kvm_available("vm_info_lists_a_pci_device_with_its_bdf_and_bars") {
        return;
    }
    let platform = Platform::new();
    let resources: Vec<crate::device_manager::DeviceResources> = platform
        .segment
        .devices()
        .into_iter()
        .map(Into::into)
        .collect();
    let tree = crate::api::VmInfoResponse::device_tree(&resources);
    let (mmio64, _) = arch::layout::pci_mmio64_window(RAM);
    assert_eq!(
        serde_json::to_value(&tree["test0"]).unwrap(),
        serde_json::json!({
            "id": "test0",
            "resources": [
                {"PciBar": {"index": MSIX_BAR, "base": mmio64.0, "size": MSIX_BAR_SIZE,
                            "type_": "Mmio64", "prefetchable": false}},
                {"PciBar": {"index": REG_BAR, "base": arch::layout::PCI_MMIO32_START.0,
                            "size": REG_BAR_SIZE, "type_": "Mmio32", "prefetchable": false}},
                {"PciBar": {"index": IO_BAR, "base": arch::layout::PCI_IO_START, "size": 16,
                            "type_": "Io", "prefetchable": false}}
            ],
            "children": [],
            "pci_bdf": "0000:00:01.0"
        })
    );
}

/// KVM_SET_GSI_ROUTING replaces the whole table: after MSI routes went in, a legacy GSI (COM1's
/// 4) still reaches the IOAPIC pin it always did.
#[test]
fn legacy_gsis_still_reach_their_ioapic_pins_after_msi_routes_are_written() {
    if !kvm_available("legacy_gsis_still_reach_their_ioapic_pins") {
        return;
    }
    let platform = Platform::new();
    platform.program_vector(0, 0x45, false);
    assert_eq!(platform.segment.routing().state().msi.len(), 1);
    let mut ioapic = kvm_bindings::kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    platform.vm_fd.get_irqchip(&mut ioapic).unwrap();
    // Pin 4: vector 0x34, fixed, physical, edge, unmasked, APIC ID 0.
    // SAFETY: the IOAPIC chip's state is the `ioapic` member of the union; every bit pattern of
    // a redirection entry is a value.
    unsafe { ioapic.chip.ioapic.redirtbl[4].bits = 0x34 };
    platform.vm_fd.set_irqchip(&ioapic).unwrap();
    let com1 = EventFd::new(EFD_NONBLOCK).unwrap();
    platform.vm_fd.register_irqfd(&com1, 4).unwrap();
    com1.write(1).unwrap();
    assert!(platform.wait_irr(0x34), "GSI 4 lost its IOAPIC route");
}

/// Nothing of the segment keeps the buses alive once the VM's device manager lets go: a VM
/// that ends (or reboots) drops its devices, their files and threads.
#[test]
fn dropping_the_segment_and_the_buses_frees_them() {
    if !kvm_available("dropping_the_segment_and_the_buses_frees_them") {
        return;
    }
    let platform = Platform::new();
    let register = devices::pci::REG_BAR0 + 4 * REG_BAR as u16;
    platform.ecam_write(1, register, platform.bar(REG_BAR).address as u32 + 0x1000);
    let (pio, mmio) = (
        Arc::downgrade(&platform.pio),
        Arc::downgrade(&platform.mmio),
    );
    let function = Arc::downgrade(&platform.function);
    drop(platform);
    assert!(pio.upgrade().is_none(), "the port bus leaked");
    assert!(mmio.upgrade().is_none(), "the MMIO bus leaked");
    assert!(function.upgrade().is_none(), "the device leaked");
}

#[test]
fn deferred_ioeventfds_go_into_kvm_when_registered_at_the_bar_where_it_is_then() {
    if !kvm_available("deferred_ioeventfds_go_into_kvm_when_registered") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm_fd = Arc::new(kvm.create_vm().unwrap());
    vm_fd.create_irq_chip().unwrap();
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let segment = PciSegment::new(&vm_fd, &pio, &mmio, RAM).unwrap();
    // A VM being built: its functions' ioeventfds wait until it runs.
    segment.defer_ioeventfds();
    let msi = segment.msi_interrupts(VECTORS).unwrap();
    let function = Arc::new(Mutex::new(TestFunction::new(msi)));
    segment.add_device("test0", function).unwrap();
    let bar = |segment: &PciSegment| {
        segment.devices()[0]
            .bars
            .iter()
            .find(|bar| bar.index == REG_BAR)
            .copied()
            .expect("the register BAR is mapped")
    };
    let address = bar(&segment).address;
    assert!(!ioeventfd_registered(&vm_fd, address, 7));
    // The refresh a restore does changes nothing in KVM either.
    segment.refresh_ioeventfds(PciBdf::new(1)).unwrap();
    assert!(!ioeventfd_registered(&vm_fd, address, 7));
    segment.register_ioeventfds();
    assert!(ioeventfd_registered(&vm_fd, address, 7));
    // Idempotent, and from now on a refresh registers at once.
    segment.register_ioeventfds();
    segment.refresh_ioeventfds(PciBdf::new(1)).unwrap();
    assert!(ioeventfd_registered(&vm_fd, bar(&segment).address, 7));
}
