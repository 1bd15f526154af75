//! Platform devices of the layout (issue 13): where the ACPI tables, the PCI windows, the ACPI
//! Generic Event Device and the interrupt controllers sit. Re-exported by [`crate::layout`].

use vm_memory::GuestAddress;

use super::{
    ram_regions, GIB, HIGH_RAM_START, KIB, MIB, MMIO_DEVICES_START, MMIO_HOLE_START,
    RAM_64BIT_START,
};

/// ACPI tables (see [`crate::acpi`]): the RSDP at the start, where the BIOS area scan finds
/// it too, the other tables after it, all inside the e820-reserved legacy hole.
pub const ACPI_TABLES_START: GuestAddress = GuestAddress(0xE_0000);
pub const ACPI_TABLES_MAX_SIZE: u64 = HIGH_RAM_START.0 - ACPI_TABLES_START.0;
/// PCI segment 0: 32-bit BAR window (below the virtio-mmio devices), the ECAM window for
/// bus 0 (1 MiB: 32 devices x 8 functions x 4 KiB; the 256 MiB after it are kept for more
/// buses or segments, as upstream), and the legacy configuration ports 0xCF8..=0xCFF.
pub const PCI_MMIO32_START: GuestAddress = MMIO_HOLE_START;
pub const PCI_MMIO32_SIZE: u64 = MMIO_DEVICES_START.0 - MMIO_HOLE_START.0;
pub const PCI_ECAM_START: GuestAddress = GuestAddress(0xE800_0000);
pub const PCI_ECAM_SIZE: u64 = MIB;
pub const PCI_ECAM_RESERVED_SIZE: u64 = 256 * MIB;
pub const PCI_CONFIG_PORT: u16 = 0xCF8;
pub const PCI_CONFIG_PORT_COUNT: u16 = 8;
/// Ports the VMM gives to I/O BARs: above the ISA range and every fixed port of the platform,
/// inside the host bridge's `WordIO 0x0D00-0xFFFF`.
pub const PCI_IO_START: u16 = 0x1000;
pub const PCI_IO_SIZE: u32 = 0x1_0000 - PCI_IO_START as u32;
/// GSIs 0..=23 are the IOAPIC's pins (0..=15 also the PICs'); MSI routes take the GSIs from
/// here up to KVM's route limit.
pub const MSI_GSI_START: u32 = 24;
/// Size of the 64-bit BAR window that starts after the highest RAM ([`pci_mmio64_window`]).
pub const PCI_MMIO64_SIZE: u64 = 64 * GIB;
/// ACPI Generic Event Device (power button): one 4 KiB page and its IOAPIC pin (3, the
/// unused COM2 line: pins 5..=23 belong to the virtio-mmio devices).
pub const GED_MMIO_START: GuestAddress = GuestAddress(0xF800_0000);
pub const GED_MMIO_SIZE: u64 = 4 * KIB;
pub const GED_GSI: u32 = 3;
/// ACPI PCI hotplug controller (the DSDT's `\_SB_.PHPR`): its register block in the page
/// after the GED's (upstream allocates it from its device area; the registers are upstream's).
pub const PCI_HOTPLUG_MMIO_START: GuestAddress = GuestAddress(0xF800_1000);
pub const PCI_HOTPLUG_MMIO_SIZE: u64 = 4 * KIB;
/// ACPI shutdown/reset device (upstream's port): sleep control, sleep status and reset
/// register in one byte port. Writing [`ACPI_RESET_VALUE`] resets; writing SLP_EN with
/// SLP_TYP [`ACPI_S5_SLEEP_TYPE`] powers off.
pub const ACPI_SHUTDOWN_PORT: u16 = 0x600;
pub const ACPI_RESET_VALUE: u8 = 1;
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// Interrupt controllers at their architectural addresses.
pub const IOAPIC_START: GuestAddress = GuestAddress(0xFEC0_0000);
pub const LAPIC_START: GuestAddress = GuestAddress(0xFEE0_0000);

/// The 64-bit PCI BAR window for a guest with `total_ram` bytes: [`PCI_MMIO64_SIZE`] bytes
/// from the first GiB boundary after the highest RAM address (never below 4 GiB).
pub fn pci_mmio64_window(total_ram: u64) -> (GuestAddress, u64) {
    let ram_end = ram_regions(total_ram)
        .last()
        .map_or(0, |&(start, len)| start.0.saturating_add(len));
    let start = ram_end
        .max(RAM_64BIT_START.0)
        .div_ceil(GIB)
        .saturating_mul(GIB);
    (GuestAddress(start), PCI_MMIO64_SIZE)
}
