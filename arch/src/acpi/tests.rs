use super::*;

fn platform(vcpus: u32) -> PlatformDescription {
    PlatformDescription::new(vcpus, 512 << 20)
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b))
}

#[test]
fn every_table_has_its_signature_length_and_a_zero_checksum() {
    let tables = AcpiTables::build(&platform(2)).unwrap();
    let names: Vec<&[u8; 4]> = tables.tables().iter().map(|t| &t.signature).collect();
    assert_eq!(
        names,
        [b"RSDP", b"DSDT", b"FACP", b"APIC", b"MCFG", b"XSDT"]
    );
    for placement in &tables.tables()[1..] {
        let table = tables.table(&placement.signature).unwrap();
        assert_eq!(&table[0..4], &placement.signature);
        assert_eq!(u32_at(table, 4) as usize, table.len(), "{:?}", placement);
        assert_eq!(byte_sum(table), 0, "checksum of {:?}", placement);
        assert_eq!(&table[10..16], b"CLOUDH");
        assert_eq!(placement.addr.0 % 8, 0);
    }
    // The revisions and OEM table IDs upstream uses.
    for (signature, revision, table_id) in [
        (b"DSDT", 6, b"CHDSDT  "),
        (b"FACP", 6, b"CHFACP  "),
        (b"APIC", 5, b"CHMADT  "),
        (b"MCFG", 1, b"CHMCFG  "),
        (b"XSDT", 1, b"CHXSDT  "),
    ] {
        let table = tables.table(signature).unwrap();
        assert_eq!(table[8], revision);
        assert_eq!(&table[16..24], table_id);
    }
}

#[test]
fn rsdp_sits_at_the_base_and_points_at_the_xsdt() {
    let tables = AcpiTables::build(&platform(1)).unwrap();
    assert_eq!(tables.rsdp_addr(), layout::ACPI_TABLES_START);
    let rsdp = tables.table(b"RSDP").unwrap();
    assert_eq!(rsdp.len(), 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(byte_sum(&rsdp[0..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(byte_sum(rsdp), 0, "extended checksum");
    assert_eq!(rsdp[15], 2, "revision 2: XSDT present");
    assert_eq!(u32_at(rsdp, 20), 36);
    assert_eq!(u64_at(rsdp, 24), tables.address_of(b"XSDT").unwrap().0);
    // The blob starts with the RSDP.
    assert_eq!(&tables.bytes()[0..8], b"RSD PTR ");
}

#[test]
fn xsdt_points_at_fadt_madt_mcfg_and_fadt_at_the_dsdt() {
    let tables = AcpiTables::build(&platform(2)).unwrap();
    let addr_of = |signature: &[u8; 4]| tables.address_of(signature).unwrap().0;
    let xsdt = tables.table(b"XSDT").unwrap();
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(xsdt, o))
        .collect();
    assert_eq!(
        entries,
        [addr_of(b"FACP"), addr_of(b"APIC"), addr_of(b"MCFG")]
    );
    // Each pointer lands on the table it names, inside the blob.
    for entry in entries {
        let offset = (entry - tables.base().0) as usize;
        let signature = &tables.bytes()[offset..offset + 4];
        assert!([&b"FACP"[..], b"APIC", b"MCFG"].contains(&signature));
    }
    let fadt = tables.table(b"FACP").unwrap();
    assert_eq!(fadt.len(), 276);
    assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT pointer unused");
    assert_eq!(u64_at(fadt, 140), addr_of(b"DSDT"), "X_DSDT");
}

#[test]
fn fadt_is_hardware_reduced_with_the_shutdown_port() {
    let tables = AcpiTables::build(&platform(1)).unwrap();
    let fadt = tables.table(b"FACP").unwrap();
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // RESET_REG, SLEEP_CONTROL_REG, SLEEP_STATUS_REG: system I/O, 8 bits, byte access.
    for offset in [116, 244, 256] {
        assert_eq!(fadt[offset], 1, "I/O space at {offset}");
        assert_eq!(fadt[offset + 1], 8);
        assert_eq!(fadt[offset + 3], 1);
        assert_eq!(u64_at(fadt, offset + 4), 0x600);
    }
    assert_eq!(fadt[128], layout::ACPI_RESET_VALUE);
    assert_eq!(&fadt[268..276], b"CLOUDHYP");
    // No fixed-hardware blocks in a hardware-reduced FADT.
    assert_eq!(u32_at(fadt, 56), 0, "PM1a_EVT_BLK");
    assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 0, "SCI_INT");
}

/// The MADT's entries as (type, bytes), after its 44-byte header.
fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
    let mut entries = Vec::new();
    let mut offset = 44;
    while offset < madt.len() {
        let len = madt[offset + 1] as usize;
        entries.push((madt[offset], &madt[offset..offset + len]));
        offset += len;
    }
    assert_eq!(offset, madt.len(), "entries end exactly at the table's end");
    entries
}

#[test]
fn madt_has_one_enabled_local_apic_per_vcpu_and_the_ioapic() {
    for vcpus in [1, 2, 3, 8, MAX_VCPUS] {
        let tables = AcpiTables::build(&platform(vcpus)).unwrap();
        let madt = tables.table(b"APIC").unwrap();
        assert_eq!(u32_at(madt, 36), 0xFEE0_0000);
        let entries = madt_entries(madt);
        let lapics: Vec<&[u8]> = entries
            .iter()
            .filter(|(kind, _)| *kind == 0)
            .map(|&(_, e)| e)
            .collect();
        assert_eq!(lapics.len(), vcpus as usize);
        for (cpu, lapic) in lapics.iter().enumerate() {
            assert_eq!(lapic.len(), 8);
            assert_eq!(lapic[2] as usize, cpu, "processor UID");
            assert_eq!(lapic[3] as usize, cpu, "APIC ID");
            assert_eq!(u32_at(lapic, 4), 1, "enabled");
        }
        let ioapics: Vec<&[u8]> = entries
            .iter()
            .filter(|(kind, _)| *kind == 1)
            .map(|&(_, e)| e)
            .collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(u32_at(ioapics[0], 4), layout::IOAPIC_START.0 as u32);
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");
        assert_eq!(entries.len(), vcpus as usize + 1);
    }
}

#[test]
fn mcfg_maps_the_ecam_window_for_bus_zero() {
    let tables = AcpiTables::build(&platform(1)).unwrap();
    let mcfg = tables.table(b"MCFG").unwrap();
    // Header, 8 reserved bytes, then one 16-byte allocation.
    assert_eq!(mcfg.len(), 36 + 8 + 16);
    assert_eq!(u64_at(mcfg, 44), layout::PCI_ECAM_START.0);
    assert_eq!(u16::from_le_bytes([mcfg[52], mcfg[53]]), 0, "segment");
    assert_eq!((mcfg[54], mcfg[55]), (0, 0), "buses 0..=0");
    // One bus of ECAM is exactly the window the layout reserves.
    let buses = u64::from(mcfg[55] - mcfg[54]) + 1;
    assert_eq!(buses << 20, layout::PCI_ECAM_SIZE);
}

#[test]
fn dsdt_names_the_devices_and_the_windows() {
    let description = platform(1);
    let tables = AcpiTables::build(&description).unwrap();
    let dsdt = tables.table(b"DSDT").unwrap();
    let contains = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
    for name in [
        &b"PCI0"[..],
        b"COM1",
        b"PWRB",
        b"GED_",
        b"_S5_",
        b"_CRS",
        b"_EVT",
    ] {
        assert!(contains(name), "{}", String::from_utf8_lossy(name));
    }
    assert!(contains(b"ACPI0013\0"));
    // EISA IDs: PNP0A08, PNP0A03, PNP0501, PNP0C0C compressed.
    for eisa in [0x080A_D041u32, 0x030A_D041, 0x0105_D041, 0x0C0C_D041] {
        assert!(contains(&eisa.to_le_bytes()), "{eisa:#x}");
    }
    // The 64-bit window's min (QWord address space descriptor) is in the _CRS.
    assert!(contains(&description.mmio64.0 .0.to_le_bytes()));
    assert!(contains(&(layout::PCI_ECAM_START.0 as u32).to_le_bytes()));
}

#[test]
fn bad_vcpu_counts_are_errors() {
    assert!(matches!(
        AcpiTables::build(&platform(0)),
        Err(AcpiError::NoVcpus)
    ));
    assert!(matches!(
        AcpiTables::build(&platform(MAX_VCPUS + 1)),
        Err(AcpiError::TooManyVcpus {
            vcpus: 255,
            max: 254
        })
    ));
}

#[test]
fn tables_fit_the_reserved_area_and_land_in_guest_memory() {
    use vm_memory::{Bytes, GuestMemoryMmap};
    let tables = AcpiTables::build(&platform(MAX_VCPUS)).unwrap();
    let end = tables.base().0 + tables.bytes().len() as u64;
    assert!(end <= layout::HIGH_RAM_START.0);
    assert!(
        tables.base().0 >= layout::LEGACY_HOLE_START.0,
        "inside the e820 hole"
    );

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    tables.write_to(&mem).unwrap();
    let mut rsdp = [0u8; 8];
    mem.read_slice(&mut rsdp, tables.rsdp_addr()).unwrap();
    assert_eq!(&rsdp, b"RSD PTR ");

    let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
    assert!(matches!(
        tables.write_to(&small),
        Err(AcpiError::WriteGuestMemory { addr: 0xE_0000, .. })
    ));
}

#[test]
fn mmio64_window_starts_after_ram_on_a_gib_boundary() {
    use crate::layout::pci_mmio64_window;
    assert_eq!(pci_mmio64_window(512 << 20).0, GuestAddress(4 << 30));
    assert_eq!(pci_mmio64_window(3 << 30).0, GuestAddress(4 << 30));
    // 3 GiB + 1 byte of RAM ends just past 4 GiB: next boundary is 5 GiB.
    assert_eq!(pci_mmio64_window((3 << 30) + 1).0, GuestAddress(5 << 30));
    assert_eq!(pci_mmio64_window(8 << 30).0, GuestAddress(9 << 30));
    assert_eq!(pci_mmio64_window(1).1, layout::PCI_MMIO64_SIZE);
}

#[test]
fn fixed_windows_do_not_overlap_each_other_or_ram() {
    let windows = [
        (layout::PCI_MMIO32_START.0, layout::PCI_MMIO32_SIZE),
        (
            layout::MMIO_DEVICES_START.0,
            u64::from(layout::MAX_MMIO_DEVICES) * layout::MMIO_DEVICE_SIZE,
        ),
        (layout::PCI_ECAM_START.0, layout::PCI_ECAM_RESERVED_SIZE),
        (layout::GED_MMIO_START.0, layout::GED_MMIO_SIZE),
        (
            layout::PCI_HOTPLUG_MMIO_START.0,
            layout::PCI_HOTPLUG_MMIO_SIZE,
        ),
        (layout::IOAPIC_START.0, 0x1000),
        (layout::LAPIC_START.0, 0x1000),
        // KVM's identity map and TSS pages, which the VMM puts at 0xfffb_c000.
        (0xFFFB_C000, 0x4000),
    ];
    for (i, &(a, a_len)) in windows.iter().enumerate() {
        assert!(a >= layout::MMIO_HOLE_START.0);
        assert!(a + a_len <= layout::MMIO_HOLE_START.0 + layout::MMIO_HOLE_SIZE);
        for &(b, b_len) in &windows[i + 1..] {
            assert!(a + a_len <= b || b + b_len <= a, "{a:#x} overlaps {b:#x}");
        }
    }
}
