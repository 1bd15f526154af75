//! The DSDT: the devices a guest finds through ACPI rather than by probing.
//!
//! - `\_SB_.PCI0`: PCI segment 0 host bridge (`PNP0A08`, compatible `PNP0A03`) whose `_CRS`
//!   hands the OS the bus range, the legacy configuration ports, the ECAM window, the 32- and
//!   64-bit BAR windows and the I/O port windows around the configuration ports.
//! - `\_SB_.COM1`: the 16550 at 0x3F8, IRQ 4.
//! - `\_SB_.PWRB`: the power button (`PNP0C0C`), notified by the GED.
//! - `\_SB_.GED_`: Generic Event Device (`ACPI0013`): an interrupt and a byte register; its
//!   `_EVT` reads the register and notifies the power button when [`GED_POWER_BUTTON`] is set.
//! - `\_SB_.PHPR`: the ACPI PCI hotplug controller (upstream's): four DWord registers
//!   (`PCIU`, `PCID`, `B0EJ`, `PSEG`), `PCEJ` (eject a slot) and `PSCN` (scan: notify the slots
//!   that came up or go down); `\_SB_.PCI0` has a `Sxxx` device per slot (`_SUN`, `_ADR`,
//!   `_EJ0`), `DVNT` and `PCNT`. The GED's `_EVT` runs `PSCN` on [`GED_PCI_DEVICES_CHANGED`].
//! - `\_S5_`: the sleep type the FADT's sleep control register takes for power off.

use acpi_tables::aml::{
    Acquire, AddressSpace, AddressSpaceCacheable, And, Arg, Device, EISAName, Equal, Field,
    FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local,
    Memory32Fixed, Method, MethodCall, Mutex, Name, Notify, OpRegion, OpRegionSpace, Package, Path,
    Release, ResourceTemplate, Return, ShiftLeft, Store, IO, ONE, ZERO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{aml_bytes, PlatformDescription, OEM_ID, OEM_REVISION};
use crate::layout;

/// Last PCI bus of segment 0: one bus, as upstream (the ECAM window covers exactly it).
pub(super) const PCI_LAST_BUS: u8 = 0;
/// GED register bit for a power button press (upstream's bit for it).
pub const GED_POWER_BUTTON: u8 = 1 << 3;
/// GED register bit for "PCI devices changed" (upstream's bit 2): `_EVT` runs `\_SB_.PHPR.PSCN`.
pub const GED_PCI_DEVICES_CHANGED: u8 = 1 << 2;
/// Bytes of the hotplug controller's registers (`PCIU`, `PCID`, `B0EJ`, `PSEG`, a DWord each).
pub const PCI_HOTPLUG_REGISTERS_LEN: u64 = 0x10;
/// Device numbers on bus 0, each with a `Sxxx` slot device under `\_SB_.PCI0`.
const PCI_SLOTS: u32 = 32;
/// Notify values of a slot: bus check (a device came) and eject request (as upstream).
const NOTIFY_BUS_CHECK: u8 = 1;
const NOTIFY_EJECT_REQUEST: u8 = 3;
/// Notify value "device-specific: button pressed" for a power button device.
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;
/// The I/O port range the host bridge forwards to devices: all of it except the
/// configuration ports 0xCF8..=0xCFF (and the rest of their 0xD00 page, as upstream).
const IO_WINDOW_BELOW_CONFIG: (u16, u16) = (0x0000, 0x0CF7);
const IO_WINDOW_ABOVE_CONFIG: (u16, u16) = (0x0D00, 0xFFFF);

/// The whole DSDT (header and AML), revision 6 as upstream.
pub(super) fn build(platform: &PlatformDescription) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"CHDSDT  ", OEM_REVISION);
    let mut aml = Vec::new();
    aml.extend(pci_host_bridge(platform));
    aml.extend(serial_port());
    aml.extend(power_button());
    aml.extend(generic_event_device());
    aml.extend(pci_hotplug_controller());
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&layout::ACPI_S5_SLEEP_TYPE]),
    )
    .to_aml_bytes(&mut aml);
    dsdt.append_slice(&aml);
    dsdt.as_slice().to_vec()
}

/// Inclusive last address of `len` bytes from `start`, for the ACPI min/max pairs.
fn last_address(start: u64, len: u64) -> u64 {
    start + len - 1
}

fn pci_host_bridge(platform: &PlatformDescription) -> Vec<u8> {
    let mmio32_start = layout::PCI_MMIO32_START.0 as u32;
    let mmio32_last = last_address(layout::PCI_MMIO32_START.0, layout::PCI_MMIO32_SIZE) as u32;
    let (mmio64_start, mmio64_size) = platform.mmio64;
    let crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![
            &AddressSpace::new_bus_number(0u16, u16::from(PCI_LAST_BUS)),
            &IO::new(
                layout::PCI_CONFIG_PORT,
                layout::PCI_CONFIG_PORT,
                1,
                layout::PCI_CONFIG_PORT_COUNT as u8,
            ),
            &Memory32Fixed::new(
                true,
                layout::PCI_ECAM_START.0 as u32,
                layout::PCI_ECAM_SIZE as u32,
            ),
            &AddressSpace::new_memory(
                AddressSpaceCacheable::NotCacheable,
                true,
                mmio32_start,
                mmio32_last,
                None,
            ),
            &AddressSpace::new_memory(
                AddressSpaceCacheable::NotCacheable,
                true,
                mmio64_start.0,
                last_address(mmio64_start.0, mmio64_size),
                None,
            ),
            &AddressSpace::new_io(IO_WINDOW_BELOW_CONFIG.0, IO_WINDOW_BELOW_CONFIG.1, None),
            &AddressSpace::new_io(IO_WINDOW_ABOVE_CONFIG.0, IO_WINDOW_ABOVE_CONFIG.1, None),
        ]),
    );
    let slots: Vec<PciSlot> = (0..PCI_SLOTS).map(PciSlot).collect();
    let device_notify = DeviceNotify;
    let pcnt = SegmentNotify;
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let adr = Name::new("_ADR".into(), &ZERO);
    let seg = Name::new("_SEG".into(), &ZERO);
    let uid = Name::new("_UID".into(), &ZERO);
    let bbn = Name::new("_BBN".into(), &ZERO);
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs];
    children.extend(slots.iter().map(|slot| slot as &dyn Aml));
    children.push(&device_notify);
    children.push(&pcnt);
    aml_bytes(&Device::new("_SB_.PCI0".into(), children))
}

fn serial_port() -> Vec<u8> {
    let crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![
            &Interrupt::new(true, true, false, false, layout::SERIAL_IRQ),
            &IO::new(
                layout::SERIAL_PORT_BASE,
                layout::SERIAL_PORT_BASE,
                1,
                layout::SERIAL_PORT_COUNT as u8,
            ),
        ]),
    );
    aml_bytes(&Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &ZERO),
            &Name::new("_DDN".into(), &"COM1"),
            &crs,
        ],
    ))
}

fn power_button() -> Vec<u8> {
    aml_bytes(&Device::new(
        "_SB_.PWRB".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
            &Name::new("_UID".into(), &ZERO),
        ],
    ))
}

fn generic_event_device() -> Vec<u8> {
    let crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![
            &Memory32Fixed::new(
                true,
                layout::GED_MMIO_START.0 as u32,
                layout::GED_MMIO_SIZE as u32,
            ),
            &Interrupt::new(true, true, false, false, layout::GED_GSI),
        ]),
    );
    let register_start = layout::GED_MMIO_START.0;
    let register_len = 1u64;
    let event = Local(0);
    let register = Path::new("GDAT");
    let pressed = Local(1);
    let power_button_bit = GED_POWER_BUTTON;
    let is_power_button = And::new(&pressed, &event, &power_button_bit);
    let power_button = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&power_button, &NOTIFY_BUTTON_PRESSED);
    let pressed_test = Equal::new(&pressed, &power_button_bit);
    let changed = Local(2);
    let pci_bit = GED_PCI_DEVICES_CHANGED;
    let is_pci_change = And::new(&changed, &event, &pci_bit);
    let pci_test = Equal::new(&changed, &pci_bit);
    let scan = MethodCall::new("\\_SB_.PHPR.PSCN".into(), vec![]);
    aml_bytes(&Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &ZERO),
            &crs,
            &OpRegion::new(
                "GDST".into(),
                OpRegionSpace::SystemMemory,
                &register_start,
                &register_len,
            ),
            &Field::new(
                "GDST".into(),
                FieldAccessType::Byte,
                FieldLockRule::NoLock,
                FieldUpdateRule::WriteAsZeroes,
                vec![FieldEntry::Named(*b"GDAT", 8)],
            ),
            &Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &Store::new(&event, &register),
                    &is_power_button,
                    &If::new(&pressed_test, vec![&notify]),
                    &is_pci_change,
                    &If::new(&pci_test, vec![&scan]),
                ],
            ),
        ],
    ))
}

/// `Sxxx`: the hotplug slot of device number `.0` on bus 0 (upstream's names: `S` and three
/// decimal digits). `_EJ0` asks the controller to eject it.
struct PciSlot(u32);

impl Aml for PciSlot {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let sun = self.0;
        let adr = self.0 << 16;
        let (sun_path, seg_path) = (Path::new("_SUN"), Path::new("_SEG"));
        let eject = MethodCall::new("\\_SB_.PHPR.PCEJ".into(), vec![&sun_path, &seg_path]);
        Device::new(
            format!("S{:03}", self.0).as_str().into(),
            vec![
                &Name::new("_SUN".into(), &sun),
                &Name::new("_ADR".into(), &adr),
                &Method::new("_EJ0".into(), 1, true, vec![&eject]),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// `DVNT (bitmap, value)`: notifies `value` to every slot whose bit is set.
struct DeviceNotify;

impl Aml for DeviceNotify {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let bits: Vec<u32> = (0..PCI_SLOTS).map(|slot| 1u32 << slot).collect();
        let paths: Vec<Path> = (0..PCI_SLOTS)
            .map(|slot| Path::new(&format!("S{slot:03}")))
            .collect();
        let tests: Vec<And> = bits
            .iter()
            .map(|bit| And::new(&Local(0), &Arg(0), bit))
            .collect();
        let equals: Vec<Equal> = tests
            .iter()
            .zip(&bits)
            .map(|(test, bit)| Equal::new(test, bit))
            .collect();
        let notifies: Vec<Notify> = paths
            .iter()
            .map(|path| Notify::new(path, &Arg(1)))
            .collect();
        let ifs: Vec<If> = equals
            .iter()
            .zip(&notifies)
            .map(|(equal, notify)| If::new(equal, vec![notify]))
            .collect();
        Method::new(
            "DVNT".into(),
            2,
            false,
            ifs.iter().map(|i| i as &dyn Aml).collect(),
        )
        .to_aml_bytes(sink);
    }
}

/// `PCNT`: selects segment 0 in the controller and notifies its slots: bus check for those
/// that came up, eject request for those to go.
struct SegmentNotify;

impl Aml for SegmentNotify {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let up = Path::new("\\_SB_.PHPR.PCIU");
        let down = Path::new("\\_SB_.PHPR.PCID");
        Method::new(
            "PCNT".into(),
            0,
            true,
            vec![
                &Acquire::new("\\_SB_.PHPR.BLCK".into(), 0xFFFF),
                &Store::new(&Path::new("\\_SB_.PHPR.PSEG"), &ZERO),
                &MethodCall::new("DVNT".into(), vec![&up, &NOTIFY_BUS_CHECK]),
                &MethodCall::new("DVNT".into(), vec![&down, &NOTIFY_EJECT_REQUEST]),
                &Release::new("\\_SB_.PHPR.BLCK".into()),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// `\_SB_.PHPR`: the hotplug controller's registers and methods.
fn pci_hotplug_controller() -> Vec<u8> {
    let start = layout::PCI_HOTPLUG_MMIO_START.0;
    let crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![&Memory32Fixed::new(
            true,
            start as u32,
            layout::PCI_HOTPLUG_MMIO_SIZE as u32,
        )]),
    );
    let status_present_enabled_functioning = 0x0Bu8;
    let (b0ej, pseg) = (Path::new("B0EJ"), Path::new("PSEG"));
    let eject_bit = ShiftLeft::new(&b0ej, &ONE, &Arg(0));
    let (acquire, release) = (
        Acquire::new("BLCK".into(), 0xFFFF),
        Release::new("BLCK".into()),
    );
    let select_segment = Store::new(&pseg, &Arg(1));
    let done = Return::new(&ZERO);
    let scan_segment = MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let pcej = Method::new(
        "PCEJ".into(),
        2,
        true,
        vec![&acquire, &select_segment, &eject_bit, &release, &done],
    );
    let pscn = Method::new("PSCN".into(), 0, true, vec![&scan_segment]);
    aml_bytes(&Device::new(
        "_SB_.PHPR".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A06")),
            &Name::new("_STA".into(), &status_present_enabled_functioning),
            &Name::new("_UID".into(), &"PCI Hotplug Controller"),
            &Mutex::new("BLCK".into(), 0),
            &crs,
            &OpRegion::new(
                "PCST".into(),
                OpRegionSpace::SystemMemory,
                &start,
                &PCI_HOTPLUG_REGISTERS_LEN,
            ),
            &Field::new(
                "PCST".into(),
                FieldAccessType::DWord,
                FieldLockRule::NoLock,
                FieldUpdateRule::WriteAsZeroes,
                vec![
                    FieldEntry::Named(*b"PCIU", 32),
                    FieldEntry::Named(*b"PCID", 32),
                    FieldEntry::Named(*b"B0EJ", 32),
                    FieldEntry::Named(*b"PSEG", 32),
                ],
            ),
            &pcej,
            &pscn,
        ],
    ))
}
