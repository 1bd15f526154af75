//! The DSDT: the devices a guest finds through ACPI rather than by probing.
//!
//! - `\_SB_.PCI0`: PCI segment 0 host bridge (`PNP0A08`, compatible `PNP0A03`) whose `_CRS`
//!   hands the OS the bus range, the legacy configuration ports, the ECAM window, the 32- and
//!   64-bit BAR windows and the I/O port windows around the configuration ports.
//! - `\_SB_.COM1`: the 16550 at 0x3F8, IRQ 4.
//! - `\_SB_.PWRB`: the power button (`PNP0C0C`), notified by the GED.
//! - `\_SB_.GED_`: Generic Event Device (`ACPI0013`): an interrupt and a byte register; its
//!   `_EVT` reads the register and notifies the power button when [`GED_POWER_BUTTON`] is set.
//! - `\_S5_`: the sleep type the FADT's sleep control register takes for power off.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, And, Device, EISAName, Equal, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method, Name,
    Notify, OpRegion, OpRegionSpace, Package, Path, ResourceTemplate, Store, IO, ZERO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{aml_bytes, PlatformDescription, OEM_ID, OEM_REVISION};
use crate::layout;

/// Last PCI bus of segment 0: one bus, as upstream (the ECAM window covers exactly it).
pub(super) const PCI_LAST_BUS: u8 = 0;
/// GED register bit for a power button press (upstream's bit for it).
pub const GED_POWER_BUTTON: u8 = 1 << 3;
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
    aml_bytes(&Device::new(
        "_SB_.PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &ZERO),
            &Name::new("_SEG".into(), &ZERO),
            &Name::new("_UID".into(), &ZERO),
            &Name::new("_BBN".into(), &ZERO),
            &crs,
        ],
    ))
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
                ],
            ),
        ],
    ))
}
