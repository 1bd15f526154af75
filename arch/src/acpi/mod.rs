//! ACPI tables as cloud-hypervisor presents them on x86_64, built as bytes with the rust-vmm
//! `acpi_tables` crate: RSDP, XSDT, FADT (hardware-reduced), DSDT, MADT and MCFG.
//!
//! [`AcpiTables::build`] lays the whole set out for one guest-physical base address
//! ([`layout::ACPI_TABLES_START`]): the RSDP first, then DSDT, FADT, MADT, MCFG and XSDT, each
//! 8-byte aligned, every pointer already absolute. [`AcpiTables::write_to`] copies the blob into
//! guest memory. Nothing here issues ioctls; the devices the tables describe (PCI host bridge,
//! GED, shutdown port) are the VMM's job.
//!
//! OEM ID, OEM table IDs, table revisions and the device names in the DSDT are the ones
//! upstream cloud-hypervisor v53 uses, so a guest's view (and tooling that matches on them)
//! stays the same.

mod dsdt;

pub use dsdt::{GED_PCI_DEVICES_CHANGED, GED_POWER_BUTTON, PCI_HOTPLUG_REGISTERS_LEN};
#[cfg(test)]
mod tests;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout;

/// OEM ID in every table header and in the RSDP.
pub const OEM_ID: [u8; 6] = *b"CLOUDH";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;
/// Hypervisor vendor identity in the FADT.
pub const HYPERVISOR_VENDOR: [u8; 8] = *b"CLOUDHYP";
/// Local APIC IDs are one byte in the MADT entries we write (x2APIC entries are not needed
/// for the vCPU counts KVM allows here), and 0xFF is the broadcast ID.
pub const MAX_VCPUS: u32 = 254;

/// What can go wrong while building or placing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the MADT needs at least one vCPU")]
    NoVcpus,
    #[error("{vcpus} vCPUs do not fit in the MADT's one-byte APIC IDs (at most {max})")]
    TooManyVcpus { vcpus: u32, max: u32 },
    #[error("the ACPI tables need {size} bytes, the area at {start:#x} holds {max}")]
    TablesTooLarge { size: u64, start: u64, max: u64 },
    #[error("cannot write the ACPI tables to guest memory at {addr:#x}: {source}")]
    WriteGuestMemory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The guest-visible platform the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformDescription {
    /// vCPUs present at boot; vCPU `i` has APIC ID and ACPI processor UID `i`.
    pub vcpus: u32,
    /// The 64-bit PCI BAR window, `(start, size)`; see [`layout::pci_mmio64_window`].
    pub mmio64: (GuestAddress, u64),
}

impl PlatformDescription {
    /// The layout of [`crate::layout`] for a guest with `vcpus` vCPUs and `total_ram` bytes.
    pub fn new(vcpus: u32, total_ram: u64) -> Self {
        PlatformDescription {
            vcpus,
            mmio64: layout::pci_mmio64_window(total_ram),
        }
    }
}

/// Where one table sits inside the blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TablePlacement {
    pub signature: [u8; 4],
    pub addr: GuestAddress,
    pub len: usize,
}

/// The complete table set, laid out for guest-physical address `base`.
#[derive(Clone, Debug)]
pub struct AcpiTables {
    base: GuestAddress,
    bytes: Vec<u8>,
    tables: Vec<TablePlacement>,
}

impl AcpiTables {
    /// Builds every table for `platform`, placed at [`layout::ACPI_TABLES_START`].
    pub fn build(platform: &PlatformDescription) -> Result<Self, AcpiError> {
        Self::build_at(platform, layout::ACPI_TABLES_START)
    }

    /// Builds every table for `platform`, placed at `base` (16-byte aligned, as the RSDP
    /// must be).
    pub fn build_at(platform: &PlatformDescription, base: GuestAddress) -> Result<Self, AcpiError> {
        if platform.vcpus == 0 {
            return Err(AcpiError::NoVcpus);
        }
        if platform.vcpus > MAX_VCPUS {
            return Err(AcpiError::TooManyVcpus {
                vcpus: platform.vcpus,
                max: MAX_VCPUS,
            });
        }
        debug_assert_eq!(base.0 % 16, 0, "the RSDP must be 16-byte aligned");
        let mut blob = Blob::new(base);
        // The RSDP points at the XSDT, which comes last: reserve its bytes now.
        let rsdp_offset = blob.reserve(Rsdp::len());
        let dsdt = blob.push(*b"DSDT", &dsdt::build(platform));
        let fadt = blob.push(*b"FACP", &aml_bytes(&fadt(dsdt)));
        let madt = blob.push(*b"APIC", madt(platform.vcpus).as_slice());
        let mcfg = blob.push(*b"MCFG", &aml_bytes(&mcfg()));
        let mut xsdt = XSDT::new(OEM_ID, *b"CHXSDT  ", OEM_REVISION);
        for table in [fadt, madt, mcfg] {
            xsdt.add_entry(table.0);
        }
        let xsdt = blob.push(*b"XSDT", &aml_bytes(&xsdt));
        blob.fill(rsdp_offset, &aml_bytes(&Rsdp::new(OEM_ID, xsdt.0)));
        blob.placements.insert(
            0,
            TablePlacement {
                signature: *b"RSDP",
                addr: base,
                len: Rsdp::len(),
            },
        );

        let size = blob.bytes.len() as u64;
        if size > layout::ACPI_TABLES_MAX_SIZE {
            return Err(AcpiError::TablesTooLarge {
                size,
                start: base.0,
                max: layout::ACPI_TABLES_MAX_SIZE,
            });
        }
        Ok(AcpiTables {
            base,
            bytes: blob.bytes,
            tables: blob.placements,
        })
    }

    /// Guest-physical address of the RSDP: what PVH `rsdp_paddr` and the Linux zero page's
    /// `acpi_rsdp_addr` carry.
    pub fn rsdp_addr(&self) -> GuestAddress {
        self.base
    }

    /// Guest-physical address of the first byte of [`Self::bytes`].
    pub fn base(&self) -> GuestAddress {
        self.base
    }

    /// The whole set, to be copied to [`Self::base`].
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Each table's signature, address and length, RSDP first (its "signature" is `RSDP`).
    pub fn tables(&self) -> &[TablePlacement] {
        &self.tables
    }

    /// Where the table with `signature` sits, if the set has one.
    pub fn placement(&self, signature: &[u8; 4]) -> Option<&TablePlacement> {
        self.tables
            .iter()
            .find(|table| &table.signature == signature)
    }

    /// Guest-physical address of the table with `signature`, if the set has one.
    pub fn address_of(&self, signature: &[u8; 4]) -> Option<GuestAddress> {
        self.placement(signature).map(|table| table.addr)
    }

    /// The bytes of the table with `signature`, if the set has one.
    pub fn table(&self, signature: &[u8; 4]) -> Option<&[u8]> {
        self.placement(signature).map(|table| {
            let offset = (table.addr.0 - self.base.0) as usize;
            &self.bytes[offset..offset + table.len]
        })
    }

    /// Copies the tables into guest memory at [`Self::base`].
    pub fn write_to<M: GuestMemoryBackend>(&self, mem: &M) -> Result<(), AcpiError> {
        mem.write_slice(&self.bytes, self.base)
            .map_err(|source| AcpiError::WriteGuestMemory {
                addr: self.base.0,
                source,
            })
    }
}

/// The blob being laid out: bytes plus where each table went.
struct Blob {
    base: GuestAddress,
    bytes: Vec<u8>,
    placements: Vec<TablePlacement>,
}

impl Blob {
    fn new(base: GuestAddress) -> Self {
        Blob {
            base,
            bytes: Vec::new(),
            placements: Vec::new(),
        }
    }

    /// Zero bytes for a structure written later; returns their offset.
    fn reserve(&mut self, len: usize) -> usize {
        let offset = self.bytes.len();
        self.bytes.resize(offset + len, 0);
        offset
    }

    fn fill(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    /// Appends `table` at the next 8-byte boundary and returns its guest address.
    fn push(&mut self, signature: [u8; 4], table: &[u8]) -> GuestAddress {
        let offset = self.bytes.len().next_multiple_of(8);
        self.bytes.resize(offset, 0);
        self.bytes.extend_from_slice(table);
        let addr = GuestAddress(self.base.0 + offset as u64);
        self.placements.push(TablePlacement {
            signature,
            addr,
            len: table.len(),
        });
        addr
    }
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// One byte-wide I/O port register, the shutdown device's width.
fn byte_port(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Hardware-reduced FADT: no PM1/GPE blocks, no SCI; power off and reset go through the
/// shutdown port (sleep control/status and reset registers), the DSDT is found by `X_DSDT`.
fn fadt(dsdt: GuestAddress) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"CHFACP  ", OEM_REVISION)
        .dsdt_64(dsdt.0)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.reset_reg = byte_port(layout::ACPI_SHUTDOWN_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = byte_port(layout::ACPI_SHUTDOWN_PORT);
    fadt.sleep_status_reg = byte_port(layout::ACPI_SHUTDOWN_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    fadt.finalize()
}

/// MADT: the local APIC address, one enabled Processor Local APIC per vCPU and the IOAPIC
/// with GSI base 0. Built on `Sdt` to carry upstream's revision (5).
fn madt(vcpus: u32) -> Sdt {
    const MADT_HEADER_LEN: u32 = 44;
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        5,
        OEM_ID,
        *b"CHMADT  ",
        OEM_REVISION,
    );
    madt.write_u32(36, layout::LAPIC_START.0 as u32);
    for cpu in 0..vcpus {
        // MAX_VCPUS keeps `cpu` within a byte.
        let id = cpu as u8;
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(
        0,
        layout::IOAPIC_START.0 as u32,
        0,
    )));
    madt
}

/// MCFG: one ECAM window, segment 0, the buses it covers.
fn mcfg() -> MCFG {
    let mut mcfg = MCFG::new(OEM_ID, *b"CHMCFG  ", OEM_REVISION);
    mcfg.add_ecam(layout::PCI_ECAM_START.0, 0, 0, dsdt::PCI_LAST_BUS);
    mcfg
}
