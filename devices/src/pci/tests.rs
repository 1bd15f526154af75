//! PCI bus, configuration mechanisms, BARs, capabilities, MSI-X and state.

use std::io;
use std::sync::{Arc, Mutex};

use arch::layout::{PCI_CONFIG_PORT, PCI_CONFIG_PORT_COUNT, PCI_ECAM_SIZE, PCI_ECAM_START};
use proptest::prelude::*;

use super::*;
use crate::Bus;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SinkEvent {
    Route(u16, u64, u32),
    Trigger(u16),
}

#[derive(Default)]
struct RecordingSink(Mutex<Vec<SinkEvent>>);

impl RecordingSink {
    fn take(&self) -> Vec<SinkEvent> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl MsiInterruptSink for RecordingSink {
    fn route(&self, vector: u16, address: u64, data: u32) -> io::Result<()> {
        self.0
            .lock()
            .unwrap()
            .push(SinkEvent::Route(vector, address, data));
        Ok(())
    }
    fn trigger(&self, vector: u16) -> io::Result<()> {
        self.0.lock().unwrap().push(SinkEvent::Trigger(vector));
        Ok(())
    }
}

const TEST_VENDOR: u16 = 0x1AF4;
const TEST_DEVICE: u16 = 0x1042;
const TEST_VECTORS: usize = 3;
const MSIX_BAR: usize = 2;
const MSIX_BAR_SIZE: u64 = 0x4000;
const PBA_OFFSET: u64 = 0x2000;
const VENDOR_CAP_ID: u8 = 0x09;

/// A function with an I/O BAR, a 32-bit and a 64-bit memory BAR, a vendor capability with some
/// writable bytes and MSI-X in the 64-bit BAR, as virtio-pci will have.
struct TestDevice {
    config: PciConfiguration,
    msix: MsixConfig,
}

impl TestDevice {
    fn new(sink: Arc<dyn MsiInterruptSink>) -> Self {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: TEST_VENDOR,
            device_id: TEST_DEVICE,
            revision_id: 1,
            class: 0x01,
            subclass: 0x00,
            prog_if: 0,
            subsystem_vendor_id: TEST_VENDOR,
            subsystem_id: 0x0040,
            interrupt_pin: 1,
        });
        config.add_bar(0, BarKind::Io, 32).unwrap();
        config
            .add_bar(
                1,
                BarKind::Memory32 {
                    prefetchable: false,
                },
                0x1000,
            )
            .unwrap();
        config
            .add_bar(
                MSIX_BAR,
                BarKind::Memory64 { prefetchable: true },
                MSIX_BAR_SIZE,
            )
            .unwrap();
        config
            .add_capability(VENDOR_CAP_ID, &[14, 0xAA, 0xBB, 0xCC], &[0, 0xFF, 0x0F])
            .unwrap();
        let mut msix = MsixConfig::new(TEST_VECTORS, sink).unwrap();
        msix.add_capability(&mut config, (MSIX_BAR, 0), (MSIX_BAR, PBA_OFFSET))
            .unwrap();
        Self { config, msix }
    }

    fn bar_read(&self, offset: u64, data: &mut [u8]) {
        if offset >= PBA_OFFSET {
            self.msix.read_pba(offset - PBA_OFFSET, data);
        } else {
            self.msix.read_table(offset, data);
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        if offset < PBA_OFFSET {
            self.msix.write_table(offset, data);
        }
    }
}

impl PciDevice for TestDevice {
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
}

#[derive(Default)]
struct RecordingRelocations(Arc<Mutex<Vec<(PciBdf, BarRelocation)>>>);

impl BarRelocationHandler for RecordingRelocations {
    fn relocate(&mut self, bdf: PciBdf, relocation: &BarRelocation) {
        self.0.lock().unwrap().push((bdf, *relocation));
    }
}

/// The PCI pieces wired onto a port I/O and an MMIO bus at the layout's addresses, exactly as
/// the VMM will.
struct Platform {
    pci: Arc<Mutex<PciBus>>,
    cf8: Arc<Mutex<PciConfigIo>>,
    pio: Bus,
    mmio: Bus,
    device: Arc<Mutex<TestDevice>>,
    sink: Arc<RecordingSink>,
    relocations: Arc<Mutex<Vec<(PciBdf, BarRelocation)>>>,
}

const DEV: PciBdf = PciBdf::new(1);

impl Platform {
    fn new() -> Self {
        let sink = Arc::new(RecordingSink::default());
        let device = Arc::new(Mutex::new(TestDevice::new(sink.clone())));
        let mut bus = PciBus::new();
        assert_eq!(bus.add_device(device.clone()).unwrap(), DEV);
        let relocations = RecordingRelocations::default();
        let recorded = relocations.0.clone();
        bus.set_relocation_handler(Box::new(relocations));
        let pci = Arc::new(Mutex::new(bus));
        let cf8 = Arc::new(Mutex::new(PciConfigIo::new(pci.clone())));
        let pio = Bus::new();
        pio.insert(
            u64::from(PCI_CONFIG_PORT),
            u64::from(PCI_CONFIG_PORT_COUNT),
            cf8.clone(),
        )
        .unwrap();
        let mmio = Bus::new();
        mmio.insert(
            PCI_ECAM_START.0,
            PCI_ECAM_SIZE,
            Arc::new(Mutex::new(PciConfigMmio::new(pci.clone()))),
        )
        .unwrap();
        sink.take();
        Self {
            pci,
            cf8,
            pio,
            mmio,
            device,
            sink,
            relocations: recorded,
        }
    }

    fn select(&self, bdf: PciBdf, offset: u16) {
        let address = 0x8000_0000
            | u32::from(bdf.bus) << 16
            | u32::from(bdf.device) << 11
            | u32::from(bdf.function) << 8
            | u32::from(offset & 0xFC);
        self.pio
            .write(u64::from(PCI_CONFIG_PORT), &address.to_le_bytes())
            .unwrap();
    }

    fn data_port(offset: u16) -> u64 {
        u64::from(PCI_CONFIG_PORT) + 4 + u64::from(offset % 4)
    }

    fn cf8_read(&self, bdf: PciBdf, offset: u16, len: usize) -> u32 {
        self.select(bdf, offset);
        let mut data = vec![0u8; len];
        self.pio.read(Self::data_port(offset), &mut data).unwrap();
        le(&data)
    }

    fn cf8_write(&self, bdf: PciBdf, offset: u16, len: usize, value: u32) {
        self.select(bdf, offset);
        self.pio
            .write(Self::data_port(offset), &value.to_le_bytes()[..len])
            .unwrap();
    }

    fn ecam_address(bdf: PciBdf, offset: u16) -> u64 {
        PCI_ECAM_START.0
            | u64::from(bdf.bus) << 20
            | u64::from(bdf.device) << 15
            | u64::from(bdf.function) << 12
            | u64::from(offset)
    }

    fn ecam_read(&self, bdf: PciBdf, offset: u16, len: usize) -> u32 {
        let mut data = vec![0u8; len];
        self.mmio
            .read(Self::ecam_address(bdf, offset), &mut data)
            .unwrap();
        le(&data)
    }

    fn ecam_write(&self, bdf: PciBdf, offset: u16, len: usize, value: u32) {
        self.mmio
            .write(Self::ecam_address(bdf, offset), &value.to_le_bytes()[..len])
            .unwrap();
    }

    fn bar_write_u32(&self, offset: u64, value: u32) {
        self.device
            .lock()
            .unwrap()
            .bar_write(offset, &value.to_le_bytes());
    }

    fn bar_read_u32(&self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.device.lock().unwrap().bar_read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// Programs the BARs as firmware would: I/O at 0xC040, the 32-bit BAR at 0xC010_0000, the
    /// 64-bit BAR at 0x10_8000_0000 (low half first).
    fn assign_bars(&self) {
        self.ecam_write(DEV, REG_BAR0, 4, 0xC040);
        self.ecam_write(DEV, REG_BAR0 + 4, 4, 0xC010_0000);
        self.ecam_write(DEV, REG_BAR0 + 8, 4, 0x8000_0000);
        self.ecam_write(DEV, REG_BAR0 + 12, 4, 0x10);
    }

    /// Where the test device's BARs decode, in BAR order.
    fn bar_addresses(&self) -> Vec<u64> {
        let device = self.device.lock().unwrap();
        device.config.bars().map(|b| b.address).collect()
    }

    fn msix_control_offset(&self) -> u16 {
        capability_offsets(self, DEV)
            .into_iter()
            .find(|&(id, _)| id == MSIX_CAPABILITY_ID)
            .unwrap()
            .1
            + 2
    }
}

fn le(data: &[u8]) -> u32 {
    data.iter()
        .rev()
        .fold(0u32, |acc, &b| (acc << 8) | u32::from(b))
}

/// Walks the capability list as a guest driver does: (id, offset) pairs.
fn capability_offsets(p: &Platform, bdf: PciBdf) -> Vec<(u8, u16)> {
    let mut caps = Vec::new();
    if p.ecam_read(bdf, REG_STATUS, 2) as u16 & STATUS_CAPABILITIES_LIST == 0 {
        return caps;
    }
    let mut next = p.ecam_read(bdf, REG_CAPABILITIES, 1) as u16;
    while next != 0 && caps.len() < 48 {
        caps.push((p.ecam_read(bdf, next, 1) as u8, next));
        next = p.ecam_read(bdf, next + 1, 1) as u16;
    }
    caps
}

#[test]
fn host_bridge_is_at_00_00_0_with_upstreams_ids() {
    let p = Platform::new();
    let host = PciBdf::new(0);
    for read in [Platform::cf8_read, Platform::ecam_read] {
        assert_eq!(read(&p, host, REG_VENDOR_ID, 2), 0x8086);
        assert_eq!(read(&p, host, REG_VENDOR_ID + 2, 2), 0x0D57);
        // Class 06 (bridge), subclass 00 (host bridge), prog-if 0, revision 0.
        assert_eq!(read(&p, host, REG_CLASS_REVISION, 4), 0x0600_0000);
        assert_eq!(read(&p, host, REG_HEADER_TYPE, 1), 0);
        assert_eq!(read(&p, host, REG_BAR0, 4), 0, "no BARs");
    }
    assert_eq!(host.to_string(), "0000:00:00.0");
    assert_eq!(DEV.to_string(), "0000:00:01.0");
}

#[test]
fn both_mechanisms_read_the_same_registers() {
    let p = Platform::new();
    // Make some registers non-default first, so the comparison covers written state too.
    p.ecam_write(DEV, REG_COMMAND, 2, 0x0007);
    p.cf8_write(DEV, REG_BAR0 + 4, 4, 0xC000_0000);
    p.cf8_write(DEV, REG_INTERRUPT_LINE, 1, 0x0B);
    let mut compared = 0;
    for device in 0..PCI_DEVICES_PER_BUS {
        for function in [0u8, 1, 7] {
            let bdf = PciBdf {
                bus: 0,
                device,
                function,
            };
            for offset in 0..PCI_CONFIG_SPACE_SIZE {
                for len in [1usize, 2, 4] {
                    if !(offset as usize).is_multiple_of(len) {
                        continue;
                    }
                    let legacy = p.cf8_read(bdf, offset, len);
                    let ecam = p.ecam_read(bdf, offset, len);
                    assert_eq!(legacy, ecam, "{bdf} offset {offset:#x} width {len}");
                    let present = function == 0 && device <= 1;
                    if !present {
                        let all_ones = if len == 4 {
                            u32::MAX
                        } else {
                            (1 << (len * 8)) - 1
                        };
                        assert_eq!(legacy, all_ones, "absent {bdf} reads all-ones");
                    }
                    compared += 1;
                }
            }
        }
    }
    assert_eq!(compared, 32 * 3 * (256 + 128 + 64));
    // Writes through one mechanism are seen through the other.
    assert_eq!(p.cf8_read(DEV, REG_COMMAND, 2), 0x0007);
    assert_eq!(p.ecam_read(DEV, REG_BAR0 + 4, 4), 0xC000_0000);
    assert_eq!(p.ecam_read(DEV, REG_INTERRUPT_LINE, 1), 0x0B);
}

#[test]
fn legacy_port_semantics() {
    let p = Platform::new();
    let data = u64::from(PCI_CONFIG_PORT) + 4;
    // CONFIG_ADDRESS reads back with reserved bits 30:24 and 1:0 cleared.
    p.pio
        .write(u64::from(PCI_CONFIG_PORT), &0xFF00_0803u32.to_le_bytes())
        .unwrap();
    let mut dword = [0u8; 4];
    p.pio.read(u64::from(PCI_CONFIG_PORT), &mut dword).unwrap();
    assert_eq!(u32::from_le_bytes(dword), 0x8000_0800);
    // Byte accesses to 0xCF8..0xCFB are not CONFIG_ADDRESS.
    p.pio.write(u64::from(PCI_CONFIG_PORT), &[0]).unwrap();
    p.pio.read(u64::from(PCI_CONFIG_PORT), &mut dword).unwrap();
    assert_eq!(u32::from_le_bytes(dword), 0x8000_0800);
    let mut byte = [0u8];
    p.pio
        .read(u64::from(PCI_CONFIG_PORT) + 1, &mut byte)
        .unwrap();
    assert_eq!(byte[0], 0xFF);

    // Byte and word accesses at each data port offset pick the right bytes of the register.
    p.select(DEV, 0);
    for (k, expected) in TEST_VENDOR
        .to_le_bytes()
        .into_iter()
        .chain(TEST_DEVICE.to_le_bytes())
        .enumerate()
    {
        p.pio.read(data + k as u64, &mut byte).unwrap();
        assert_eq!(byte[0], expected, "byte {k}");
    }
    let mut word = [0u8; 2];
    p.pio.read(data + 2, &mut word).unwrap();
    assert_eq!(u16::from_le_bytes(word), TEST_DEVICE);
    // A word at 0xCFF would cross the register: all-ones.
    p.pio.read(data + 3, &mut word).unwrap();
    assert_eq!(word, [0xFF, 0xFF]);

    // With the enable bit clear nothing is selected: reads all-ones, writes dropped.
    p.pio
        .write(u64::from(PCI_CONFIG_PORT), &0x0000_0804u32.to_le_bytes())
        .unwrap();
    p.pio.read(data, &mut dword).unwrap();
    assert_eq!(u32::from_le_bytes(dword), u32::MAX);
    p.pio.write(data, &0x7u32.to_le_bytes()).unwrap();
    assert_eq!(p.ecam_read(DEV, REG_COMMAND, 2), 0);

    // Another bus is empty.
    let bus1 = PciBdf {
        bus: 1,
        device: 0,
        function: 0,
    };
    assert_eq!(p.cf8_read(bus1, 0, 4), u32::MAX);
}

#[test]
fn ecam_answers_odd_accesses_as_hardware_does() {
    let p = Platform::new();
    // Unaligned and 8-byte accesses read all-ones and writes are dropped.
    for (offset, len) in [(1u16, 2usize), (2, 4), (3, 4), (0, 8), (0, 3)] {
        let mut data = vec![0u8; len];
        p.mmio
            .read(Platform::ecam_address(DEV, offset), &mut data)
            .unwrap();
        assert!(data.iter().all(|&b| b == 0xFF), "{offset} x {len}");
    }
    p.mmio
        .write(Platform::ecam_address(DEV, REG_COMMAND + 1), &[7, 0])
        .unwrap();
    assert_eq!(p.ecam_read(DEV, REG_COMMAND, 4) & 0xFFFF, 0);
    // The extended space of a present function reads zero (no extended capabilities) and
    // ignores writes; an absent one reads all-ones there too.
    p.ecam_write(DEV, 0x100, 4, 0x1234_5678);
    assert_eq!(p.ecam_read(DEV, 0x100, 4), 0);
    assert_eq!(p.ecam_read(DEV, 0xFFC, 4), 0);
    assert_eq!(p.ecam_read(PciBdf::new(5), 0x100, 4), u32::MAX);
}

#[test]
fn bars_report_their_size_to_an_all_ones_write() {
    let p = Platform::new();
    let sized = |offset: u16| {
        p.cf8_write(DEV, offset, 4, u32::MAX);
        p.cf8_read(DEV, offset, 4)
    };
    assert_eq!(sized(REG_BAR0), 0xFFFF_FFE1, "32-byte I/O BAR");
    assert_eq!(sized(REG_BAR0 + 4), 0xFFFF_F000, "4 KiB memory BAR");
    assert_eq!(
        sized(REG_BAR0 + 8),
        0xFFFF_C00C,
        "16 KiB 64-bit prefetchable, low half"
    );
    assert_eq!(sized(REG_BAR0 + 12), u32::MAX, "64-bit BAR, high half");
    assert_eq!(sized(REG_BAR0 + 16), 0, "no BAR 4");
    assert_eq!(sized(REG_BAR0 + 20), 0, "no BAR 5");
    assert_eq!(sized(REG_EXPANSION_ROM), 0, "no expansion ROM");
    // The size as a driver computes it from the read-back.
    let mem32 = sized(REG_BAR0 + 4) & !0xF;
    assert_eq!(!mem32 + 1, 0x1000);
    let mem64 = (u64::from(sized(REG_BAR0 + 12)) << 32) | u64::from(sized(REG_BAR0 + 8) & !0xF);
    assert_eq!(!mem64 + 1, MSIX_BAR_SIZE);
}

#[test]
fn the_guest_relocates_bars_and_the_vmm_is_told() {
    let p = Platform::new();
    p.assign_bars();
    // Rewriting the same address is no move.
    p.ecam_write(DEV, REG_BAR0 + 4, 4, 0xC010_0000);
    // Low address bits below the size are not writable: 0xC010_0123 stays 0xC010_0000.
    p.ecam_write(DEV, REG_BAR0 + 4, 4, 0xC010_0123);
    let moves: Vec<_> = p
        .relocations
        .lock()
        .unwrap()
        .iter()
        .map(|&(bdf, r)| (bdf, r.index, r.old_address, r.new_address))
        .collect();
    assert_eq!(
        moves,
        vec![
            (DEV, 0, 0, 0xC040),
            (DEV, 1, 0, 0xC010_0000),
            (DEV, 2, 0, 0x8000_0000),
            (DEV, 2, 0x8000_0000, 0x10_8000_0000),
        ]
    );
    let device = p.device.lock().unwrap();
    let bars: Vec<_> = device.config.bars().map(|b| (b.index, b.address)).collect();
    assert_eq!(
        bars,
        vec![(0, 0xC040), (1, 0xC010_0000), (2, 0x10_8000_0000)]
    );
    assert_eq!(
        device.config.bar(2).unwrap().kind,
        BarKind::Memory64 { prefetchable: true }
    );
    assert!(device.config.bar(3).is_none(), "upper half is not a BAR");
}

#[test]
fn sizing_an_assigned_bar_is_not_a_move() {
    let p = Platform::new();
    p.assign_bars();
    p.relocations.lock().unwrap().clear();
    // Linux's order: each register all-ones, read, old value back; 64-bit low then high.
    for offset in [REG_BAR0 + 4, REG_BAR0 + 8, REG_BAR0 + 12] {
        let old = p.ecam_read(DEV, offset, 4);
        p.ecam_write(DEV, offset, 4, u32::MAX);
        assert_ne!(p.ecam_read(DEV, offset, 4), old, "reads the size mask");
        assert_eq!(
            p.bar_addresses(),
            vec![0xC040, 0xC010_0000, 0x10_8000_0000],
            "still decodes where it was"
        );
        p.ecam_write(DEV, offset, 4, old);
    }
    // Both halves of the 64-bit BAR probed at once, then restored.
    p.ecam_write(DEV, REG_BAR0 + 8, 4, u32::MAX);
    p.ecam_write(DEV, REG_BAR0 + 12, 4, u32::MAX);
    p.ecam_write(DEV, REG_BAR0 + 8, 4, 0x8000_0000);
    p.ecam_write(DEV, REG_BAR0 + 12, 4, 0x10);
    assert!(p.relocations.lock().unwrap().is_empty());
    // Sizing then programming a new address is one move, from the old place.
    p.ecam_write(DEV, REG_BAR0 + 4, 4, u32::MAX);
    p.ecam_write(DEV, REG_BAR0 + 4, 4, 0xC020_0000);
    let moves = p.relocations.lock().unwrap().clone();
    assert_eq!(moves.len(), 1);
    assert_eq!(
        (moves[0].1.old_address, moves[0].1.new_address),
        (0xC010_0000, 0xC020_0000)
    );
    // A byte write of 0xFF is an address, not a probe.
    p.ecam_write(DEV, REG_BAR0 + 7, 1, 0xFF);
    assert_eq!(
        p.device.lock().unwrap().config.bar(1).unwrap().address,
        0xFF20_0000
    );
}

#[test]
fn read_only_bits_ignore_writes_and_status_errors_clear_on_one() {
    let p = Platform::new();
    let before: Vec<u32> = (0..64).map(|i| p.ecam_read(DEV, i * 4, 4)).collect();
    for offset in [
        REG_VENDOR_ID,
        REG_CLASS_REVISION,
        REG_SUBSYSTEM,
        REG_CAPABILITIES,
    ] {
        p.cf8_write(DEV, offset, 4, u32::MAX);
        p.cf8_write(DEV, offset, 4, 0);
    }
    p.cf8_write(DEV, REG_HEADER_TYPE, 1, 0xFF);
    p.cf8_write(DEV, REG_INTERRUPT_LINE + 1, 1, 0xFF);
    for offset in [
        REG_VENDOR_ID,
        REG_CLASS_REVISION,
        REG_SUBSYSTEM,
        REG_CAPABILITIES,
        REG_HEADER_TYPE & !3,
    ] {
        assert_eq!(
            p.ecam_read(DEV, offset, 4),
            before[usize::from(offset / 4)],
            "{offset:#x}"
        );
    }
    assert_eq!(p.ecam_read(DEV, REG_INTERRUPT_LINE + 1, 1), 1, "INTA#");
    // Command: only the defined bits stick.
    p.cf8_write(DEV, REG_COMMAND, 2, 0xFFFF);
    assert_eq!(p.cf8_read(DEV, REG_COMMAND, 2), 0x0547);
    // Status: capability bit is read-only, error bits clear when written with one.
    let status = STATUS_CAPABILITIES_LIST | 0x8000 | 0x2000;
    p.device
        .lock()
        .unwrap()
        .config
        .set_register_u16(REG_STATUS, status);
    p.cf8_write(DEV, REG_STATUS, 2, 0);
    assert_eq!(p.cf8_read(DEV, REG_STATUS, 2) as u16, status);
    p.cf8_write(
        DEV,
        REG_STATUS,
        2,
        0x8000 | u32::from(STATUS_CAPABILITIES_LIST),
    );
    assert_eq!(
        p.cf8_read(DEV, REG_STATUS, 2) as u16,
        STATUS_CAPABILITIES_LIST | 0x2000
    );
    // A dword write of command+status sets command bits and clears the written error bit.
    p.cf8_write(DEV, REG_COMMAND, 4, 0x2000_0002);
    assert_eq!(
        p.cf8_read(DEV, REG_COMMAND, 4),
        u32::from(STATUS_CAPABILITIES_LIST) << 16 | 0x0002
    );
}

#[test]
fn capability_list_is_walkable_and_only_declared_bits_are_writable() {
    let p = Platform::new();
    let caps = capability_offsets(&p, DEV);
    assert_eq!(
        caps,
        vec![
            (VENDOR_CAP_ID, CAPABILITIES_START),
            (MSIX_CAPABILITY_ID, 0x48)
        ]
    );
    assert_eq!(capability_offsets(&p, PciBdf::new(0)), vec![]);
    // Vendor capability body: [len, 0xAA, 0xBB, 0xCC]; byte 1 fully writable, byte 2 low
    // nibble, byte 0 and 3 read-only.
    let body = CAPABILITIES_START + 2;
    p.ecam_write(DEV, CAPABILITIES_START, 4, 0xFFFF_FFFF);
    assert_eq!(p.ecam_read(DEV, CAPABILITIES_START, 4), 0xFF0E_4809);
    p.ecam_write(DEV, body + 1, 1, 0x56);
    p.ecam_write(DEV, body + 2, 2, 0x1234);
    assert_eq!(p.ecam_read(DEV, body, 1), 14);
    assert_eq!(p.ecam_read(DEV, body + 1, 1), 0x56);
    assert_eq!(p.ecam_read(DEV, body + 2, 1), 0xB4);
    assert_eq!(p.ecam_read(DEV, body + 3, 1), 0xCC);

    // MSI-X capability: table size N-1, table at BAR 2 offset 0, PBA at BAR 2 offset 0x2000.
    assert_eq!(
        p.ecam_read(DEV, 0x4A, 2),
        TEST_VECTORS as u32 - 1,
        "message control"
    );
    assert_eq!(p.ecam_read(DEV, 0x4C, 4), MSIX_BAR as u32);
    assert_eq!(
        p.ecam_read(DEV, 0x50, 4),
        PBA_OFFSET as u32 | MSIX_BAR as u32
    );
    // Table size bits are read-only.
    p.ecam_write(DEV, 0x4A, 2, 0x07FF);
    assert_eq!(p.ecam_read(DEV, 0x4A, 2), TEST_VECTORS as u32 - 1);
}

#[test]
fn device_numbers_are_assigned_from_one_and_checked() {
    let sink: Arc<dyn MsiInterruptSink> = Arc::new(RecordingSink::default());
    let mut bus = PciBus::new();
    let device =
        || -> Arc<Mutex<dyn PciDevice>> { Arc::new(Mutex::new(TestDevice::new(sink.clone()))) };
    assert_eq!(bus.add_device(device()).unwrap(), PciBdf::new(1));
    assert_eq!(bus.add_device_at(5, device()).unwrap(), PciBdf::new(5));
    assert_eq!(bus.add_device(device()).unwrap(), PciBdf::new(2));
    let listed: Vec<String> = bus.functions().map(|bdf| bdf.to_string()).collect();
    assert_eq!(
        listed,
        [
            "0000:00:00.0",
            "0000:00:01.0",
            "0000:00:02.0",
            "0000:00:05.0"
        ]
    );
    assert!(matches!(
        bus.add_device_at(5, device()),
        Err(PciError::SlotTaken(5))
    ));
    assert!(matches!(
        bus.add_device_at(0, device()),
        Err(PciError::SlotTaken(0))
    ));
    assert!(matches!(
        bus.add_device_at(32, device()),
        Err(PciError::SlotInvalid(32))
    ));
    for _ in 0..28 {
        bus.add_device(device()).unwrap();
    }
    assert!(matches!(bus.add_device(device()), Err(PciError::BusFull)));
}

/// Asserts that declaring the BAR is refused with an error whose `Debug` form starts with
/// `expected`.
fn refuse_bar(c: &mut PciConfiguration, index: usize, kind: BarKind, size: u64, expected: &str) {
    match c.add_bar(index, kind, size) {
        Err(error) if format!("{error:?}").starts_with(expected) => {}
        other => {
            panic!("add_bar({index}, {kind:?}, {size:#x}): expected {expected}.., got {other:?}")
        }
    }
}

#[test]
fn bar_and_capability_declarations_are_checked() {
    let header = PciHeader {
        vendor_id: 1,
        device_id: 2,
        revision_id: 0,
        class: 0,
        subclass: 0,
        prog_if: 0,
        subsystem_vendor_id: 0,
        subsystem_id: 0,
        interrupt_pin: 0,
    };
    let mut c = PciConfiguration::new(&header);
    let mem64 = BarKind::Memory64 {
        prefetchable: false,
    };
    let mem32 = BarKind::Memory32 {
        prefetchable: false,
    };
    refuse_bar(&mut c, 5, mem64, 0x1000, "BarIndex { index: 5 }");
    refuse_bar(&mut c, 6, mem32, 0x1000, "BarIndex { index: 6 }");
    c.add_bar(1, mem64, 0x1000).unwrap();
    refuse_bar(&mut c, 2, mem32, 0x1000, "BarTaken { index: 2 }");
    refuse_bar(&mut c, 0, mem64, 0x1000, "BarTaken { index: 0 }");
    // Sizes: not a power of two, below the 16 bytes of a memory BAR, above 256 for I/O.
    for (kind, size) in [(mem32, 0x1800), (mem32, 8), (BarKind::Io, 512)] {
        refuse_bar(&mut c, 0, kind, size, "BarSize {");
    }
    c.add_bar(0, BarKind::Io, 256).unwrap();
    assert!(matches!(
        c.add_capability(0x09, &[0; 2], &[0; 3]),
        Err(PciError::CapabilityMask { .. })
    ));
    // Capabilities fill the space after the header and then are refused.
    let mut added = 0;
    while c.add_capability(0x09, &[0; 30], &[]).is_ok() {
        added += 1;
    }
    assert_eq!(added, (256 - 0x40) / 32);
    assert!(matches!(
        c.add_capability(0x09, &[0; 30], &[]),
        Err(PciError::CapabilitySpaceFull { .. })
    ));
    // MSI-X placement must fit in a declared BAR.
    let sink: Arc<dyn MsiInterruptSink> = Arc::new(RecordingSink::default());
    let mut c = PciConfiguration::new(&header);
    c.add_bar(0, mem32, 0x1000).unwrap();
    let mut msix = MsixConfig::new(64, sink.clone()).unwrap();
    for (table, pba) in [
        ((0, 0xC08), (0, 0)),
        ((1, 0), (0, 0x800)),
        ((0, 4), (0, 0x800)),
    ] {
        assert!(matches!(
            msix.add_capability(&mut c, table, pba),
            Err(PciError::MsixPlacement { .. })
        ));
    }
    msix.add_capability(&mut c, (0, 0), (0, 0x800)).unwrap();
    assert!(matches!(
        MsixConfig::new(0, sink.clone()),
        Err(PciError::MsixVectorCount(0))
    ));
    assert!(matches!(
        MsixConfig::new(2049, sink),
        Err(PciError::MsixVectorCount(2049))
    ));
}

/// Programs vector `v` through the BAR as a driver does.
fn program_vector(p: &Platform, v: u64, address: u64, data: u32) {
    p.bar_write_u32(v * MSIX_ENTRY_SIZE, address as u32);
    p.bar_write_u32(v * MSIX_ENTRY_SIZE + 4, (address >> 32) as u32);
    p.bar_write_u32(v * MSIX_ENTRY_SIZE + 8, data);
}

fn set_vector_mask(p: &Platform, v: u64, masked: bool) {
    p.bar_write_u32(v * MSIX_ENTRY_SIZE + 12, u32::from(masked));
}

fn set_msix_control(p: &Platform, control: u16) {
    p.ecam_write(DEV, p.msix_control_offset(), 2, u32::from(control));
}

fn trigger(p: &Platform, v: u16) -> MsixDelivery {
    p.device.lock().unwrap().msix.trigger(v).unwrap()
}

#[test]
fn msix_table_writes_update_routes() {
    let p = Platform::new();
    // Reset state: every vector masked, address and data zero.
    for v in 0..TEST_VECTORS as u64 {
        assert_eq!(p.bar_read_u32(v * MSIX_ENTRY_SIZE + 12), MSIX_VECTOR_MASKED);
        assert_eq!(p.bar_read_u32(v * MSIX_ENTRY_SIZE + 8), 0);
    }
    program_vector(&p, 1, 0xFEE0_1000, 0x4041);
    assert_eq!(
        p.sink.take(),
        vec![
            SinkEvent::Route(1, 0xFEE0_1000, 0),
            SinkEvent::Route(1, 0xFEE0_1000, 0x4041),
        ],
        "the high address half is unchanged (0), so it routes nothing"
    );
    // A qword write of the address, then data: read back through both widths.
    p.device
        .lock()
        .unwrap()
        .bar_write(2 * MSIX_ENTRY_SIZE, &0x1_FEE0_2000u64.to_le_bytes());
    let mut qword = [0u8; 8];
    p.device
        .lock()
        .unwrap()
        .bar_read(2 * MSIX_ENTRY_SIZE, &mut qword);
    assert_eq!(u64::from_le_bytes(qword), 0x1_FEE0_2000);
    assert_eq!(p.sink.take(), vec![SinkEvent::Route(2, 0x1_FEE0_2000, 0)]);
    // Rewriting the same values routes nothing; byte writes and reads are not table accesses.
    program_vector(&p, 1, 0xFEE0_1000, 0x4041);
    p.device.lock().unwrap().bar_write(8, &[1]);
    let mut byte = [0u8];
    p.device.lock().unwrap().bar_read(8, &mut byte);
    assert_eq!(byte[0], 0xFF);
    assert_eq!(p.sink.take(), vec![]);
    // Reserved vector-control bits read zero.
    p.bar_write_u32(12, 0xFFFF_FFFE);
    assert_eq!(p.bar_read_u32(12), 0);
    // Beyond the table: all-ones, writes ignored.
    assert_eq!(
        p.bar_read_u32(TEST_VECTORS as u64 * MSIX_ENTRY_SIZE),
        u32::MAX
    );
}

#[test]
fn masked_vectors_pend_and_fire_on_unmask() {
    let p = Platform::new();
    program_vector(&p, 0, 0xFEE0_0000, 0x30);
    program_vector(&p, 2, 0xFEE0_0000, 0x32);
    p.sink.take();
    // MSI-X disabled: nothing goes out, nothing pends.
    assert_eq!(trigger(&p, 0), MsixDelivery::Disabled);
    assert_eq!(p.bar_read_u32(PBA_OFFSET), 0);

    set_msix_control(&p, MSIX_CONTROL_ENABLE);
    assert!(p.device.lock().unwrap().msix.enabled());
    // Vectors are still masked (reset state): they pend, visible in the PBA.
    assert_eq!(trigger(&p, 0), MsixDelivery::Pending);
    assert_eq!(trigger(&p, 2), MsixDelivery::Pending);
    assert_eq!(trigger(&p, 2), MsixDelivery::Pending);
    assert_eq!(p.bar_read_u32(PBA_OFFSET), 0b101);
    assert_eq!(p.sink.take(), vec![]);
    // The PBA is read-only.
    p.device.lock().unwrap().bar_write(PBA_OFFSET, &[0; 8]);
    assert_eq!(p.bar_read_u32(PBA_OFFSET), 0b101);

    // Unmasking vector 2 delivers it once and clears its bit; vector 0 stays pending.
    set_vector_mask(&p, 2, false);
    assert_eq!(p.sink.take(), vec![SinkEvent::Trigger(2)]);
    assert_eq!(p.bar_read_u32(PBA_OFFSET), 0b001);
    // Unmasked now: delivered straight away.
    assert_eq!(trigger(&p, 2), MsixDelivery::Delivered);
    assert_eq!(p.sink.take(), vec![SinkEvent::Trigger(2)]);
    // Masking again makes it pend again.
    set_vector_mask(&p, 2, true);
    assert_eq!(trigger(&p, 2), MsixDelivery::Pending);
    assert_eq!(p.bar_read_u32(PBA_OFFSET), 0b101);
    // A vector that does not exist is the device's error, not a panic.
    assert!(matches!(
        p.device.lock().unwrap().msix.trigger(3),
        Err(PciError::MsixVectorOutOfRange {
            vector: 3,
            count: 3
        })
    ));
}

#[test]
fn function_mask_holds_every_vector() {
    let p = Platform::new();
    program_vector(&p, 0, 0xFEE0_0000, 0x30);
    program_vector(&p, 1, 0xFEE0_0000, 0x31);
    set_vector_mask(&p, 0, false);
    set_vector_mask(&p, 1, false);
    set_msix_control(&p, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
    p.sink.take();
    assert!(p.device.lock().unwrap().msix.function_masked());
    assert_eq!(trigger(&p, 0), MsixDelivery::Pending);
    assert_eq!(trigger(&p, 1), MsixDelivery::Pending);
    // Vector-level unmask does not override the function mask.
    set_vector_mask(&p, 1, false);
    assert_eq!(p.sink.take(), vec![]);
    // Clearing the function mask with a byte write to the upper control byte delivers both.
    let control = p.msix_control_offset();
    p.cf8_write(DEV, control + 1, 1, u32::from(MSIX_CONTROL_ENABLE >> 8));
    assert_eq!(
        p.sink.take(),
        vec![SinkEvent::Trigger(0), SinkEvent::Trigger(1)]
    );
    assert_eq!(p.bar_read_u32(PBA_OFFSET), 0);
    // Disabling MSI-X keeps vectors from firing.
    set_msix_control(&p, 0);
    assert_eq!(trigger(&p, 0), MsixDelivery::Disabled);
    assert_eq!(p.sink.take(), vec![]);
}

#[test]
fn state_round_trips_and_the_restored_platform_continues() {
    let p = Platform::new();
    p.assign_bars();
    p.ecam_write(DEV, REG_COMMAND, 2, 0x0006);
    p.ecam_write(DEV, REG_INTERRUPT_LINE, 1, 0x0A);
    p.ecam_write(DEV, CAPABILITIES_START + 3, 1, 0x77);
    p.ecam_write(PciBdf::new(0), REG_COMMAND, 2, 0x0002);
    program_vector(&p, 0, 0xFEE0_0000, 0x30);
    program_vector(&p, 1, 0xFEE0_1000, 0x31);
    set_vector_mask(&p, 0, false);
    set_msix_control(&p, MSIX_CONTROL_ENABLE);
    assert_eq!(trigger(&p, 1), MsixDelivery::Pending);
    // The guest had selected a register on 0xCF8 and not yet read 0xCFC.
    p.select(DEV, REG_BAR0 + 4);
    p.sink.take();

    let saved = serde_json::to_string(&(
        p.pci.lock().unwrap().state().unwrap(),
        p.cf8.lock().unwrap().state(),
        p.device.lock().unwrap().msix.state(),
    ))
    .unwrap();
    let registers: Vec<u32> = (0..64).map(|i| p.ecam_read(DEV, i * 4, 4)).collect();
    let (bus_state, cf8_state, msix_state): (PciBusState, PciConfigIoState, MsixState) =
        serde_json::from_str(&saved).unwrap();

    let q = Platform::new();
    q.pci.lock().unwrap().restore(&bus_state).unwrap();
    q.cf8.lock().unwrap().restore(&cf8_state).unwrap();
    q.device.lock().unwrap().msix.restore(&msix_state).unwrap();
    // Every vector's route is announced again, since KVM's routes died with the old VMM.
    assert_eq!(
        q.sink.take(),
        vec![
            SinkEvent::Route(0, 0xFEE0_0000, 0x30),
            SinkEvent::Route(1, 0xFEE0_1000, 0x31),
            SinkEvent::Route(2, 0, 0),
        ]
    );
    // The pending CONFIG_DATA read completes against the register selected before the save.
    let mut dword = [0u8; 4];
    q.pio
        .read(u64::from(PCI_CONFIG_PORT) + 4, &mut dword)
        .unwrap();
    assert_eq!(u32::from_le_bytes(dword), 0xC010_0000);
    let restored: Vec<u32> = (0..64).map(|i| q.ecam_read(DEV, i * 4, 4)).collect();
    assert_eq!(restored, registers);
    assert_eq!(q.cf8_read(PciBdf::new(0), REG_COMMAND, 2), 0x0002);
    assert_eq!(q.bar_addresses(), vec![0xC040, 0xC010_0000, 0x10_8000_0000]);
    // MSI-X continues: vector 1 still pending, delivered on unmask; vector 0 delivers directly.
    assert_eq!(q.bar_read_u32(PBA_OFFSET), 0b010);
    set_vector_mask(&q, 1, false);
    assert_eq!(trigger(&q, 0), MsixDelivery::Delivered);
    assert_eq!(
        q.sink.take(),
        vec![SinkEvent::Trigger(1), SinkEvent::Trigger(0)]
    );
    // The restored MSI-X still follows its capability: a function mask written now holds.
    set_msix_control(&q, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
    assert_eq!(trigger(&q, 0), MsixDelivery::Pending);
    // The restore does not report BAR moves: the VMM maps from `bars()` once.
    assert!(q.relocations.lock().unwrap().is_empty());
}

#[test]
fn foreign_or_mismatched_state_is_refused() {
    let p = Platform::new();
    let good = p.pci.lock().unwrap().state().unwrap();

    let mut wrong = good.clone();
    wrong.version = 99;
    assert!(matches!(
        p.pci.lock().unwrap().restore(&wrong),
        Err(PciError::StateVersion { found: 99, .. })
    ));
    let mut wrong = good.clone();
    wrong.functions[1].device = 2;
    assert!(matches!(
        p.pci.lock().unwrap().restore(&wrong),
        Err(PciError::StateMismatch(_))
    ));
    // The host bridge's state does not fit the test device.
    let mut wrong = good.clone();
    wrong.functions[1].config = wrong.functions[0].config.clone();
    assert!(matches!(
        p.pci.lock().unwrap().restore(&wrong),
        Err(PciError::StateMismatch(_))
    ));
    let mut wrong = good.clone();
    wrong.functions[1].config.registers.pop();
    assert!(matches!(
        p.pci.lock().unwrap().restore(&wrong),
        Err(PciError::StateMismatch(_))
    ));
    // Read-only bits in a state are not taken: a state claiming a different capability
    // pointer restores with the model's.
    let mut odd = good.clone();
    odd.functions[1].config.registers[usize::from(REG_CAPABILITIES / 4)] = 0x80;
    p.pci.lock().unwrap().restore(&odd).unwrap();
    assert_eq!(p.ecam_read(DEV, REG_CAPABILITIES, 1), 0x40);

    let mut device = p.device.lock().unwrap();
    let good = device.msix.state();
    let mut msix = good.clone();
    msix.version = 2;
    assert!(matches!(
        device.msix.restore(&msix),
        Err(PciError::StateVersion { found: 2, .. })
    ));
    let mut msix = good.clone();
    msix.pending.push(0);
    assert!(matches!(
        device.msix.restore(&msix),
        Err(PciError::StateMismatch(_))
    ));
    let mut msix = good.clone();
    msix.entries.pop();
    assert!(matches!(
        device.msix.restore(&msix),
        Err(PciError::StateMismatch(_))
    ));
    // Pending bits of vectors that do not exist are dropped.
    let mut msix = good;
    msix.pending[0] = u64::MAX;
    device.msix.restore(&msix).unwrap();
    assert_eq!(device.msix.state().pending, vec![(1 << TEST_VECTORS) - 1]);
    drop(device);
    let mut cf8 = p.cf8.lock().unwrap().state();
    cf8.version = 0;
    assert!(p.cf8.lock().unwrap().restore(&cf8).is_err());
}

/// One guest configuration access.
#[derive(Clone, Debug)]
struct Access {
    ecam: bool,
    device: u8,
    function: u8,
    offset: u16,
    len: usize,
    value: u32,
}

fn access() -> impl Strategy<Value = Access> {
    (
        any::<bool>(),
        prop_oneof![Just(0u8), Just(1u8), 0u8..32],
        prop_oneof![Just(0u8), 0u8..8],
        prop_oneof![0u16..0x40, 0u16..0x100, 0u16..0x1000],
        prop_oneof![Just(1usize), Just(2), Just(4), 0usize..9],
        any::<u32>(),
    )
        .prop_map(|(ecam, device, function, offset, len, value)| Access {
            ecam,
            device,
            function,
            offset,
            len,
            value,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever a guest writes to configuration space, through either mechanism: no panic,
    /// identity and layout stay, both mechanisms keep agreeing, and MSI-X follows its control
    /// register.
    #[test]
    fn random_config_writes_keep_the_invariants(accesses in prop::collection::vec(access(), 1..64)) {
        let p = Platform::new();
        let identity = |p: &Platform| -> Vec<u32> {
            [0u16, 1]
                .iter()
                .flat_map(|&d| {
                    [REG_VENDOR_ID, REG_CLASS_REVISION, REG_SUBSYSTEM]
                        .map(|r| p.ecam_read(PciBdf::new(d as u8), r, 4))
                })
                .collect()
        };
        let before = identity(&p);
        let caps = capability_offsets(&p, DEV);
        for a in &accesses {
            let bdf = PciBdf { bus: 0, device: a.device, function: a.function };
            let data = &a.value.to_le_bytes().repeat(2)[..a.len];
            if a.ecam {
                p.mmio.write(Platform::ecam_address(bdf, a.offset), data).unwrap();
            } else {
                p.select(bdf, a.offset);
                let port = u64::from(PCI_CONFIG_PORT) + 4 + u64::from(a.offset % 4);
                let _ = p.pio.write(port, data);
            }
            let mut out = vec![0u8; a.len];
            let _ = p.mmio.read(Platform::ecam_address(bdf, a.offset), &mut out);
        }
        prop_assert_eq!(identity(&p), before);
        prop_assert_eq!(capability_offsets(&p, DEV), caps);
        prop_assert_eq!(p.ecam_read(DEV, REG_HEADER_TYPE, 1), 0);
        prop_assert_eq!(p.ecam_read(DEV, REG_COMMAND, 2) & !0x0547, 0);
        // BAR type bits fixed, address bits below the size zero.
        prop_assert_eq!(p.ecam_read(DEV, REG_BAR0, 4) & 0x1F, 0x1);
        prop_assert_eq!(p.ecam_read(DEV, REG_BAR0 + 4, 4) & 0xFFF, 0);
        prop_assert_eq!(p.ecam_read(DEV, REG_BAR0 + 8, 4) & 0x3FFF, 0xC);
        prop_assert_eq!(p.ecam_read(DEV, REG_BAR0 + 16, 4), 0);
        for bar in p.device.lock().unwrap().config.bars() {
            prop_assert_eq!(bar.address % bar.size, 0, "BAR {} misaligned", bar.index);
        }
        let control = p.ecam_read(DEV, p.msix_control_offset(), 2) as u16;
        prop_assert_eq!(control & 0x07FF, TEST_VECTORS as u16 - 1);
        let device = p.device.lock().unwrap();
        prop_assert_eq!(device.msix.enabled(), control & MSIX_CONTROL_ENABLE != 0);
        prop_assert_eq!(device.msix.function_masked(), control & MSIX_CONTROL_FUNCTION_MASK != 0);
        drop(device);
        for offset in (0..PCI_CONFIG_SPACE_SIZE).step_by(4) {
            prop_assert_eq!(p.cf8_read(DEV, offset, 4), p.ecam_read(DEV, offset, 4));
        }
    }
}

/// One thing that happens to an MSI-X model.
#[derive(Clone, Debug)]
enum MsixOp {
    TableWrite { offset: u64, len: usize, value: u64 },
    TableRead { offset: u64, len: usize },
    PbaRead { offset: u64, len: usize },
    Control(u16),
    Trigger(u16),
}

fn msix_op() -> impl Strategy<Value = MsixOp> {
    let offset = prop_oneof![
        0u64..(TEST_VECTORS as u64 * MSIX_ENTRY_SIZE + 8),
        any::<u64>()
    ];
    let len = prop_oneof![Just(4usize), Just(8), 0usize..9];
    prop_oneof![
        (offset.clone(), len.clone(), any::<u64>())
            .prop_map(|(offset, len, value)| MsixOp::TableWrite { offset, len, value }),
        (offset.clone(), len.clone()).prop_map(|(offset, len)| MsixOp::TableRead { offset, len }),
        (0u64..24, len).prop_map(|(offset, len)| MsixOp::PbaRead { offset, len }),
        any::<u16>().prop_map(MsixOp::Control),
        (0u16..(TEST_VECTORS as u16 + 2)).prop_map(MsixOp::Trigger),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random table, PBA and control traffic and raised vectors: no panic; a message goes out
    /// only for a vector that is enabled and unmasked, pending bits only for existing vectors,
    /// and no raised vector is lost: it is either sent or pending (while MSI-X is enabled).
    #[test]
    fn msix_never_sends_a_masked_vector(ops in prop::collection::vec(msix_op(), 1..96)) {
        let sink = Arc::new(RecordingSink::default());
        let mut msix = MsixConfig::new(TEST_VECTORS, sink.clone()).unwrap();
        // Raised while enabled and not yet sent, per vector.
        let mut owed = [false; TEST_VECTORS];
        for op in &ops {
            let mut outcome = None;
            match *op {
                MsixOp::TableWrite { offset, len, value } => {
                    msix.write_table(offset, &value.to_le_bytes().repeat(2)[..len]);
                }
                MsixOp::TableRead { offset, len } => msix.read_table(offset, &mut vec![0; len]),
                MsixOp::PbaRead { offset, len } => {
                    let before = msix.state().pending;
                    msix.read_pba(offset, &mut vec![0; len]);
                    prop_assert_eq!(msix.state().pending, before);
                }
                MsixOp::Control(control) => msix.set_message_control(control),
                MsixOp::Trigger(v) => outcome = Some((v, msix.trigger(v))),
            }
            let state = msix.state();
            for event in sink.take() {
                if let SinkEvent::Trigger(v) = event {
                    let entry = state.entries[usize::from(v)];
                    prop_assert!(state.enabled && !state.function_masked);
                    prop_assert_eq!(entry.vector_control & MSIX_VECTOR_MASKED, 0);
                    owed[usize::from(v)] = false;
                }
            }
            if let Some((v, result)) = outcome {
                match result {
                    Ok(MsixDelivery::Pending) => owed[usize::from(v)] = true,
                    Ok(MsixDelivery::Delivered | MsixDelivery::Disabled) => {}
                    Err(_) => prop_assert!(usize::from(v) >= TEST_VECTORS),
                }
            }
            prop_assert_eq!(state.pending[0] >> TEST_VECTORS, 0);
            for (v, &is_owed) in owed.iter().enumerate() {
                prop_assert_eq!(msix.is_pending(v as u16), is_owed, "vector {}", v);
            }
        }
    }
}
