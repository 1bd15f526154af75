//! The guest-physical address map shared by the VMM, the devices and the boot code.
//!
//! Everything here is part of the platform contract: the test guests and the device models rely
//! on these exact numbers, so change them only together with their users.
//!
//! ```text
//! 0x0000_0000  +-------------------------------+
//!              | real-mode IVT / BDA (unused)  |
//! 0x0000_0500  | boot GDT, boot IDT            |
//! 0x0000_5ff0  | boot stack top (grows down)   |
//! 0x0000_6000  | PVH hvm_start_info + modlist  |
//! 0x0000_7000  | PVH memory map                |
//! 0x0000_8000  | Linux zero page (boot_params) |
//! 0x0000_9000  | PML4, PDPT, 4 page directories|
//! 0x0002_0000  | kernel command line (64 KiB)  |
//! 0x000A_0000  +-------------------------------+ legacy VGA/ROM hole, e820 reserved
//! 0x000E_0000  | ACPI tables, RSDP first       |
//! 0x0010_0000  +-------------------------------+ kernel, then RAM (initramfs at the top)
//! 0xC000_0000  +-------------------------------+ 32-bit device hole
//!              | PCI 32-bit MMIO BAR window    |
//! 0xD000_0000  | virtio-mmio device 0, 1, ...  |
//! 0xE800_0000  | PCI ECAM (MMCONFIG), bus 0    |
//! 0xF800_0000  | ACPI GED (power button)       |
//! 0xFEC0_0000  | IOAPIC                        |
//! 0xFEE0_0000  | local APICs                   |
//! 0x1_0000_0000+-------------------------------+ RAM beyond 3 GiB continues here
//!              | PCI 64-bit MMIO BAR window after RAM ([`pci_mmio64_window`])
//! ```

use vm_memory::GuestAddress;

use crate::Error;

/// One KiB, MiB and GiB, for readable sizes below.
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// End of the RAM that sits below the 32-bit device hole.
pub const RAM_32BIT_END: GuestAddress = GuestAddress(3 * GIB);
/// Start of the 32-bit device hole (same address as [`RAM_32BIT_END`]).
pub const MMIO_HOLE_START: GuestAddress = RAM_32BIT_END;
/// Size of the 32-bit device hole: everything from 3 GiB up to 4 GiB.
pub const MMIO_HOLE_SIZE: u64 = GIB;
/// Where RAM beyond the first 3 GiB continues.
pub const RAM_64BIT_START: GuestAddress = GuestAddress(4 * GIB);

/// Start of the legacy hole (VGA memory, option ROMs, BIOS) that e820 reports as reserved.
pub const LEGACY_HOLE_START: GuestAddress = GuestAddress(0xA_0000);
/// End (exclusive) of the legacy hole; the kernel is loaded from here on.
pub const HIGH_RAM_START: GuestAddress = GuestAddress(MIB);

/// First virtio-mmio device window.
pub const MMIO_DEVICES_START: GuestAddress = GuestAddress(0xD000_0000);
/// Size of each virtio-mmio device window.
pub const MMIO_DEVICE_SIZE: u64 = 4 * KIB;
/// GSI of virtio-mmio device 0; device `i` uses `FIRST_DEVICE_GSI + i`.
pub const FIRST_DEVICE_GSI: u32 = 5;
/// The IOAPIC has 24 pins, so GSIs 5..=23 give at most 19 virtio-mmio devices.
pub const MAX_MMIO_DEVICES: u32 = 24 - FIRST_DEVICE_GSI;

/// COM1 16550 UART: first I/O port, number of ports and IRQ.
pub const SERIAL_PORT_BASE: u16 = 0x3F8;
pub const SERIAL_PORT_COUNT: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data and command/status ports; writing [`I8042_RESET_COMMAND`] to the command port
/// is the guest's reset request.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const I8042_RESET_COMMAND: u8 = 0xFE;

/// Boot GDT (6 descriptors, see [`crate::gdt`]) and the empty boot IDT right after it.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x540);
/// Initial stack pointer for the 64-bit Linux entry; the area below it up to 0x1000 is unused.
pub const BOOT_STACK_POINTER: GuestAddress = GuestAddress(0x5FF0);
/// PVH `hvm_start_info` (56 bytes) and its module list (one 32-byte entry, the initramfs).
pub const PVH_START_INFO: GuestAddress = GuestAddress(0x6000);
pub const PVH_MODLIST: GuestAddress = GuestAddress(0x6040);
/// PVH memory map: up to 4 KiB of 24-byte `hvm_memmap_table_entry`.
pub const PVH_MEMMAP: GuestAddress = GuestAddress(0x7000);
pub const PVH_MEMMAP_MAX_ENTRIES: usize = (4 * KIB / 24) as usize;
/// Linux `struct boot_params`, the "zero page".
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x8000);
/// Identity-mapping page tables for the 64-bit entry: PML4, PDPT, then one page directory per
/// GiB mapped.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPT_START: GuestAddress = GuestAddress(0xA000);
pub const PD_START: GuestAddress = GuestAddress(0xB000);
/// Kernel command line and its maximum size including the terminating NUL.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x2_0000);
pub const CMDLINE_MAX_SIZE: usize = 64 * KIB as usize;

/// Lowest guest RAM size we can boot: the boot structures and the kernel start at 1 MiB.
pub const MIN_RAM_SIZE: u64 = HIGH_RAM_START.0;

// The platform issue 13 adds: ACPI tables, PCI windows, GED, interrupt controllers.
mod platform;
pub use platform::*;

/// Splits `total_bytes` of guest RAM around the 32-bit device hole: up to 3 GiB from address 0,
/// the rest from 4 GiB. Returns `(start, length)` pairs, in address order; empty for 0 bytes.
pub fn ram_regions(total_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = total_bytes.min(RAM_32BIT_END.0);
    let high = total_bytes - low;
    let mut regions = Vec::with_capacity(2);
    if low > 0 {
        regions.push((GuestAddress(0), low));
    }
    if high > 0 {
        regions.push((RAM_64BIT_START, high));
    }
    regions
}

/// Guest-physical base address of virtio-mmio device `index`.
pub fn mmio_device_address(index: u32) -> Result<GuestAddress, Error> {
    check_mmio_index(index)?;
    Ok(GuestAddress(
        MMIO_DEVICES_START.0 + u64::from(index) * MMIO_DEVICE_SIZE,
    ))
}

/// GSI (IOAPIC pin) of virtio-mmio device `index`.
pub fn mmio_device_gsi(index: u32) -> Result<u32, Error> {
    check_mmio_index(index)?;
    Ok(FIRST_DEVICE_GSI + index)
}

/// The kernel command-line token that announces virtio-mmio device `index` to Linux,
/// e.g. `virtio_mmio.device=4K@0xd0000000:5`.
pub fn virtio_mmio_cmdline(index: u32) -> Result<String, Error> {
    let address = mmio_device_address(index)?;
    let gsi = mmio_device_gsi(index)?;
    Ok(format!(
        "virtio_mmio.device={}K@{:#x}:{}",
        MMIO_DEVICE_SIZE / KIB,
        address.0,
        gsi
    ))
}

fn check_mmio_index(index: u32) -> Result<(), Error> {
    if index >= MAX_MMIO_DEVICES {
        return Err(Error::MmioDeviceIndex {
            index,
            max: MAX_MMIO_DEVICES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_below_the_hole_is_one_region() {
        assert_eq!(ram_regions(64 * MIB), vec![(GuestAddress(0), 64 * MIB)]);
        assert_eq!(ram_regions(3 * GIB), vec![(GuestAddress(0), 3 * GIB)]);
        assert!(ram_regions(0).is_empty());
    }

    #[test]
    fn ram_above_3g_continues_at_4g() {
        assert_eq!(
            ram_regions(3 * GIB + 1),
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), 1)]
        );
        assert_eq!(
            ram_regions(8 * GIB),
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), 5 * GIB)]
        );
        // Sizes near u64::MAX must not overflow.
        let huge = ram_regions(u64::MAX);
        assert_eq!(huge[1].1, u64::MAX - 3 * GIB);
    }

    #[test]
    fn virtio_mmio_tokens_follow_the_contract() {
        assert_eq!(
            virtio_mmio_cmdline(0).unwrap(),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            virtio_mmio_cmdline(2).unwrap(),
            "virtio_mmio.device=4K@0xd0002000:7"
        );
        assert_eq!(mmio_device_gsi(18).unwrap(), 23);
        assert!(matches!(
            virtio_mmio_cmdline(19),
            Err(Error::MmioDeviceIndex { index: 19, max: 19 })
        ));
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START.0, 6 * 8),
            (BOOT_IDT_START.0, 8),
            (PVH_START_INFO.0, 56),
            (PVH_MODLIST.0, 32),
            (PVH_MEMMAP.0, PVH_MEMMAP_MAX_ENTRIES as u64 * 24),
            (ZERO_PAGE_START.0, 4 * KIB),
            (PML4_START.0, 4 * KIB),
            (PDPT_START.0, 4 * KIB),
            (PD_START.0, 4 * 4 * KIB),
            (CMDLINE_START.0, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, &(a_start, a_len)) in areas.iter().enumerate() {
            assert!(a_start + a_len <= LEGACY_HOLE_START.0);
            assert!(a_start >= BOOT_STACK_POINTER.0 || a_start + a_len <= 0x1000);
            for &(b_start, b_len) in &areas[i + 1..] {
                assert!(
                    a_start + a_len <= b_start || b_start + b_len <= a_start,
                    "{a_start:#x} overlaps {b_start:#x}"
                );
            }
        }
    }
}
