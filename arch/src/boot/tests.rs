//! Byte-level tests of both boot protocols on synthetic kernel images built here.
//!
//! Offsets are the ones documented in the Xen PVH ABI (hvm_start_info, start_info.h) and in
//! Linux's Documentation/arch/x86/boot.rst and zero-page.rst; they are spelled out as numbers
//! on purpose so the tests do not share constants with the code under test.

use std::io::{Cursor, Seek, Write};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::layout::ram_regions;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

type Memory = GuestMemoryMmap<()>;

fn memory(total: u64) -> Memory {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(total)
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    Memory::from_ranges(&ranges).unwrap()
}

fn read_bytes(mem: &Memory, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn u8_at(mem: &Memory, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn u16_at(mem: &Memory, addr: u64) -> u16 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn u32_at(mem: &Memory, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn u64_at(mem: &Memory, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn put(image: &mut [u8], offset: usize, bytes: &[u8]) {
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

fn file_with(bytes: &[u8]) -> File {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(bytes).unwrap();
    file.rewind().unwrap();
    file
}

/// What the synthetic ELF contains.
struct ElfSpec {
    class: u8,
    entry: u64,
    load_paddr: u64,
    load_memsz: u64,
    pvh_entry: Option<u32>,
}

const ELF_SEGMENT_OFFSET: usize = 0x1000;
const ELF_SEGMENT_FILESZ: usize = 0x200;

impl Default for ElfSpec {
    fn default() -> Self {
        ElfSpec {
            class: 2,
            entry: 0x10_0000,
            load_paddr: 0x10_0000,
            load_memsz: 0x3000,
            pvh_entry: Some(0x10_0010),
        }
    }
}

/// ELF64 x86_64 executable: one PT_LOAD segment of `ELF_SEGMENT_FILESZ` bytes of pattern, and
/// a PT_NOTE segment holding a Xen PHYS32_ENTRY note when `pvh_entry` is set (otherwise an
/// unrelated note, so the loader has a note segment to search and must not find the entry).
fn elf_image(spec: &ElfSpec) -> Vec<u8> {
    let mut image = vec![0u8; ELF_SEGMENT_OFFSET + ELF_SEGMENT_FILESZ];
    put(&mut image, 0, b"\x7fELF");
    image[4] = spec.class;
    image[5] = 1; // little endian
    image[6] = 1; // EV_CURRENT
    put(&mut image, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut image, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut image, 20, &1u32.to_le_bytes());
    put(&mut image, 24, &spec.entry.to_le_bytes());
    put(&mut image, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut image, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut image, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut image, 56, &2u16.to_le_bytes()); // e_phnum

    let load = 64;
    put(&mut image, load, &1u32.to_le_bytes()); // PT_LOAD
    put(&mut image, load + 4, &7u32.to_le_bytes()); // RWX
    put(
        &mut image,
        load + 8,
        &(ELF_SEGMENT_OFFSET as u64).to_le_bytes(),
    );
    put(&mut image, load + 16, &spec.load_paddr.to_le_bytes()); // p_vaddr
    put(&mut image, load + 24, &spec.load_paddr.to_le_bytes()); // p_paddr
    put(
        &mut image,
        load + 32,
        &(ELF_SEGMENT_FILESZ as u64).to_le_bytes(),
    );
    put(&mut image, load + 40, &spec.load_memsz.to_le_bytes());

    let note_offset = 64 + 2 * 56;
    let note = 64 + 56;
    put(&mut image, note, &4u32.to_le_bytes()); // PT_NOTE
    put(&mut image, note + 8, &(note_offset as u64).to_le_bytes());
    put(&mut image, note + 32, &20u64.to_le_bytes());
    put(&mut image, note + 40, &20u64.to_le_bytes());
    // Elf64_Nhdr: namesz, descsz, type; then "Xen\0" and the 32-bit entry.
    put(&mut image, note_offset, &4u32.to_le_bytes());
    put(&mut image, note_offset + 4, &4u32.to_le_bytes());
    let (note_type, desc) = match spec.pvh_entry {
        Some(entry) => (18u32, entry),
        None => (1u32, 0x1234_5678),
    };
    put(&mut image, note_offset + 8, &note_type.to_le_bytes());
    put(&mut image, note_offset + 12, b"Xen\0");
    put(&mut image, note_offset + 16, &desc.to_le_bytes());

    put(
        &mut image,
        ELF_SEGMENT_OFFSET,
        &pattern(ELF_SEGMENT_FILESZ, 0x5A),
    );
    image
}

/// What the synthetic bzImage's setup header says.
struct BzSpec {
    version: u16,
    loadflags: u8,
    xloadflags: u16,
    cmdline_size: u32,
    initrd_addr_max: u32,
}

impl Default for BzSpec {
    fn default() -> Self {
        BzSpec {
            version: 0x020F,
            loadflags: 0x01,
            xloadflags: 0x0001,
            cmdline_size: 2047,
            initrd_addr_max: 0x7FFF_FFFF,
        }
    }
}

const BZ_SETUP_SECTS: u8 = 4;
const BZ_SETUP_SIZE: usize = (BZ_SETUP_SECTS as usize + 1) * 512;
const BZ_PAYLOAD_SIZE: usize = 0x3000;
const BZ_INIT_SIZE: u32 = 0x80_0000;
/// Where the kernel runs after decompression (the usual CONFIG_PHYSICAL_START, 16 MiB).
const BZ_PREF_ADDRESS: u64 = 0x100_0000;

/// A bzImage: boot sector + 4 setup sectors with a setup header, then the "protected-mode
/// kernel" (a pattern).
fn bzimage(spec: &BzSpec) -> Vec<u8> {
    let mut image = vec![0u8; BZ_SETUP_SIZE + BZ_PAYLOAD_SIZE];
    image[0x1F1] = BZ_SETUP_SECTS;
    put(
        &mut image,
        0x1F4,
        &(BZ_PAYLOAD_SIZE as u32 / 16).to_le_bytes(),
    ); // syssize
    put(&mut image, 0x1FE, &0xAA55u16.to_le_bytes());
    put(&mut image, 0x200, &[0xEB, 0x66]); // jump over the header
    put(&mut image, 0x202, b"HdrS");
    put(&mut image, 0x206, &spec.version.to_le_bytes());
    image[0x211] = spec.loadflags;
    put(&mut image, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(&mut image, 0x218, &0xDEAD_0000u32.to_le_bytes()); // stale ramdisk_image
    put(&mut image, 0x22C, &spec.initrd_addr_max.to_le_bytes());
    put(&mut image, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    image[0x234] = 1; // relocatable_kernel
    put(&mut image, 0x236, &spec.xloadflags.to_le_bytes());
    put(&mut image, 0x238, &spec.cmdline_size.to_le_bytes());
    put(&mut image, 0x258, &BZ_PREF_ADDRESS.to_le_bytes());
    put(&mut image, 0x260, &BZ_INIT_SIZE.to_le_bytes());
    put(&mut image, BZ_SETUP_SIZE, &pattern(BZ_PAYLOAD_SIZE, 0xC3));
    image
}

fn load(mem: &Memory, image: &[u8], cmdline: &str) -> Result<BootEntry, Error> {
    load_kernel(mem, &mut Cursor::new(image.to_vec()), cmdline, None, None)
}

/// Loads `image` with an empty command line and the RSDP at `rsdp`.
fn load_with_rsdp(mem: &Memory, image: &[u8], rsdp: u64) -> Result<BootEntry, Error> {
    load_kernel(
        mem,
        &mut Cursor::new(image.to_vec()),
        "",
        None,
        Some(GuestAddress(rsdp)),
    )
}

/// Loads `image` with an empty command line and `initrd` as the initramfs.
fn load_with_initramfs(mem: &Memory, image: &[u8], initrd: &[u8]) -> Result<BootEntry, Error> {
    let mut initrd_file = file_with(initrd);
    load_kernel(
        mem,
        &mut Cursor::new(image.to_vec()),
        "",
        Some(&mut initrd_file),
        None,
    )
}

/// Asserts one e820 / PVH memmap entry's fields.
fn assert_memmap_entry(mem: &Memory, at: u64, addr: u64, size: u64, kind: u32) {
    assert_eq!(u64_at(mem, at), addr, "entry at {at:#x}: address");
    assert_eq!(u64_at(mem, at + 8), size, "entry at {at:#x}: size");
    assert_eq!(u32_at(mem, at + 16), kind, "entry at {at:#x}: type");
}

// ---------------------------------------------------------------- PVH

#[test]
fn pvh_elf_is_loaded_and_start_info_written() {
    let mem = memory(64 * MIB);
    // Stale bytes where the segment's zero-filled tail goes, as on NV memory after a crash.
    mem.write_slice(&[0xAA; 0x3000], GuestAddress(0x10_0000))
        .unwrap();
    let cmdline = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5";

    let entry = load(&mem, &elf_image(&ElfSpec::default()), cmdline).unwrap();
    assert_eq!(
        entry,
        BootEntry {
            protocol: BootProtocol::Pvh,
            entry: GuestAddress(0x10_0010),
            boot_info: GuestAddress(0x6000),
        }
    );

    // Segment contents at p_paddr, then zeros up to p_memsz.
    assert_eq!(
        read_bytes(&mem, 0x10_0000, ELF_SEGMENT_FILESZ),
        pattern(ELF_SEGMENT_FILESZ, 0x5A)
    );
    assert!(read_bytes(&mem, 0x10_0200, 0x2E00).iter().all(|&b| b == 0));
    assert_eq!(u8_at(&mem, 0x10_3000), 0, "nothing past p_memsz written");

    // hvm_start_info at 0x6000.
    let si = 0x6000;
    assert_eq!(u32_at(&mem, si), 0x336E_C578, "magic");
    assert_eq!(u32_at(&mem, si + 4), 1, "version");
    assert_eq!(u32_at(&mem, si + 8), 0, "flags");
    assert_eq!(u32_at(&mem, si + 12), 0, "nr_modules");
    assert_eq!(u64_at(&mem, si + 16), 0, "modlist_paddr");
    assert_eq!(u64_at(&mem, si + 24), 0x2_0000, "cmdline_paddr");
    assert_eq!(u64_at(&mem, si + 32), 0, "rsdp_paddr");
    assert_eq!(u64_at(&mem, si + 40), 0x7000, "memmap_paddr");
    assert_eq!(u32_at(&mem, si + 48), 3, "memmap_entries");
    assert_eq!(u32_at(&mem, si + 52), 0, "reserved");

    // hvm_memmap_table_entry: 24 bytes each, types 1 = RAM, 2 = reserved.
    assert_memmap_entry(&mem, 0x7000, 0, 0xA_0000, 1);
    assert_memmap_entry(&mem, 0x7018, 0xA_0000, 0x6_0000, 2);
    assert_memmap_entry(&mem, 0x7030, MIB, 63 * MIB, 1);
    assert_eq!(u32_at(&mem, 0x7014), 0, "entry reserved field");

    let mut expected = cmdline.as_bytes().to_vec();
    expected.push(0);
    assert_eq!(read_bytes(&mem, 0x2_0000, expected.len()), expected);
}

#[test]
fn pvh_initramfs_goes_high_and_is_module_zero() {
    // More than 3 GiB: the memory map gets the range above 4 GiB, the initramfs stays below
    // the device hole.
    let mem = memory(3 * GIB + 64 * MIB);
    let initrd = pattern(0x1801, 0x11);

    let entry = load_with_initramfs(&mem, &elf_image(&ElfSpec::default()), &initrd).unwrap();
    assert_eq!(entry.protocol, BootProtocol::Pvh);

    // Highest page-aligned start with the whole file below 3 GiB.
    let expected_addr = 3 * GIB - 0x2000;
    assert_eq!(read_bytes(&mem, expected_addr, initrd.len()), initrd);

    let si = 0x6000;
    assert_eq!(u32_at(&mem, si + 12), 1, "nr_modules");
    assert_eq!(u64_at(&mem, si + 16), 0x6040, "modlist_paddr");
    // hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
    assert_eq!(u64_at(&mem, 0x6040), expected_addr);
    assert_eq!(u64_at(&mem, 0x6048), initrd.len() as u64);
    assert_eq!(u64_at(&mem, 0x6050), 0);
    assert_eq!(u64_at(&mem, 0x6058), 0);

    assert_eq!(u32_at(&mem, si + 48), 4, "memmap_entries");
    assert_memmap_entry(&mem, 0x7030, MIB, 3 * GIB - MIB, 1);
    assert_memmap_entry(&mem, 0x7048, 4 * GIB, 64 * MIB, 1);
    // An empty command line is still a valid, NUL-terminated string.
    assert_eq!(u8_at(&mem, 0x2_0000), 0);
}

#[test]
fn elf_without_pvh_note_is_refused() {
    let mem = memory(64 * MIB);
    let spec = ElfSpec {
        pvh_entry: None,
        ..Default::default()
    };
    assert!(matches!(
        load(&mem, &elf_image(&spec), ""),
        Err(Error::NoPvhEntry)
    ));
}

#[test]
fn elf32_is_refused() {
    let mem = memory(64 * MIB);
    let spec = ElfSpec {
        class: 1,
        ..Default::default()
    };
    assert!(matches!(
        load(&mem, &elf_image(&spec), ""),
        Err(Error::UnsupportedElf)
    ));
}

#[test]
fn truncated_elf_is_refused() {
    let mem = memory(64 * MIB);
    let image = elf_image(&ElfSpec::default());
    // Inside the ELF header.
    assert!(matches!(
        load(&mem, &image[..40], ""),
        Err(Error::KernelTruncated { size: 40 })
    ));
    // Program headers present, segment contents cut short.
    assert!(matches!(
        load(&mem, &image[..ELF_SEGMENT_OFFSET + 0x100], ""),
        Err(Error::KernelTruncated { .. })
    ));
}

#[test]
fn elf_segments_outside_ram_or_over_boot_structures_are_refused() {
    let mem = memory(64 * MIB);
    for (paddr, memsz) in [
        (0x8000, 0x1000),
        (64 * MIB - 0x1000, 0x2000),
        (u64::MAX - 0x100, 0x200),
    ] {
        let spec = ElfSpec {
            entry: paddr.max(MIB),
            load_paddr: paddr,
            load_memsz: memsz,
            ..Default::default()
        };
        let result = load(&mem, &elf_image(&spec), "");
        assert!(
            matches!(
                result,
                Err(Error::KernelOutsideRam { .. }) | Err(Error::UnsupportedElf)
            ),
            "segment at {paddr:#x}: {result:?}"
        );
    }
    // The boot area must not have been touched by a refused image.
    assert_eq!(u32_at(&mem, 0x8000), 0);
}

#[test]
fn pvh_entry_outside_ram_is_refused() {
    let mem = memory(64 * MIB);
    let spec = ElfSpec {
        pvh_entry: Some(0xF000_0000),
        ..Default::default()
    };
    assert!(matches!(
        load(&mem, &elf_image(&spec), ""),
        Err(Error::KernelOutsideRam {
            start: 0xF000_0000,
            ..
        })
    ));
}

// ---------------------------------------------------------------- bzImage

#[test]
fn bzimage_is_loaded_and_zero_page_written() {
    let mem = memory(64 * MIB);
    let cmdline = "console=ttyS0 root=/dev/vda";
    let image = bzimage(&BzSpec::default());

    let entry = load(&mem, &image, cmdline).unwrap();
    assert_eq!(
        entry,
        BootEntry {
            protocol: BootProtocol::LinuxBoot64,
            entry: GuestAddress(0x10_0200),
            boot_info: GuestAddress(0x8000),
        }
    );
    // The protected-mode kernel (everything after the setup sectors) at code32_start.
    assert_eq!(
        read_bytes(&mem, 0x10_0000, BZ_PAYLOAD_SIZE),
        pattern(BZ_PAYLOAD_SIZE, 0xC3)
    );

    let zp = 0x8000;
    // Setup header copied from the image.
    assert_eq!(u8_at(&mem, zp + 0x1F1), BZ_SETUP_SECTS, "setup_sects");
    assert_eq!(u16_at(&mem, zp + 0x1FE), 0xAA55, "boot_flag");
    assert_eq!(read_bytes(&mem, zp + 0x202, 4), b"HdrS", "header");
    assert_eq!(u16_at(&mem, zp + 0x206), 0x020F, "version");
    assert_eq!(u32_at(&mem, zp + 0x214), 0x10_0000, "code32_start");
    assert_eq!(u32_at(&mem, zp + 0x22C), 0x7FFF_FFFF, "initrd_addr_max");
    assert_eq!(u16_at(&mem, zp + 0x236), 1, "xloadflags");
    assert_eq!(u32_at(&mem, zp + 0x238), 2047, "cmdline_size");
    assert_eq!(u32_at(&mem, zp + 0x260), BZ_INIT_SIZE, "init_size");
    // Fields the loader writes.
    assert_eq!(u16_at(&mem, zp + 0x1FA), 0xFFFF, "vid_mode");
    assert_eq!(u8_at(&mem, zp + 0x210), 0xFF, "type_of_loader");
    assert_eq!(
        u8_at(&mem, zp + 0x211) & 0x01,
        0x01,
        "loadflags LOADED_HIGH"
    );
    assert_eq!(u32_at(&mem, zp + 0x218), 0, "ramdisk_image");
    assert_eq!(u32_at(&mem, zp + 0x21C), 0, "ramdisk_size");
    assert_eq!(u32_at(&mem, zp + 0x228), 0x2_0000, "cmd_line_ptr");
    assert_eq!(u32_at(&mem, zp + 0x0C0), 0, "ext_ramdisk_image");
    assert_eq!(u32_at(&mem, zp + 0x0C4), 0, "ext_ramdisk_size");
    assert_eq!(u32_at(&mem, zp + 0x0C8), 0, "ext_cmd_line_ptr");
    assert_eq!(u64_at(&mem, zp + 0x070), 0, "acpi_rsdp_addr: no ACPI");
    // e820: count at 0x1e8, 20-byte entries from 0x2d0.
    assert_eq!(u8_at(&mem, zp + 0x1E8), 3, "e820_entries");
    assert_memmap_entry(&mem, zp + 0x2D0, 0, 0xA_0000, 1);
    assert_memmap_entry(&mem, zp + 0x2D0 + 20, 0xA_0000, 0x6_0000, 2);
    assert_memmap_entry(&mem, zp + 0x2D0 + 40, MIB, 63 * MIB, 1);
    assert_eq!(u64_at(&mem, zp + 0x2D0 + 60), 0, "no fourth entry");

    let mut expected = cmdline.as_bytes().to_vec();
    expected.push(0);
    assert_eq!(read_bytes(&mem, 0x2_0000, expected.len()), expected);
}

#[test]
fn the_rsdp_address_goes_into_both_protocols_fields() {
    // Stale bytes in the boot structures, as NV memory holds after the previous run.
    let stale = |mem: &Memory| {
        mem.write_slice(&[0xAA; 0x3000], GuestAddress(0x6000))
            .unwrap()
    };

    // PVH: hvm_start_info.rsdp_paddr is the u64 at offset 32.
    let mem = memory(64 * MIB);
    stale(&mem);
    let entry = load_with_rsdp(&mem, &elf_image(&ElfSpec::default()), 0xE_0000).unwrap();
    assert_eq!(entry.boot_info, GuestAddress(0x6000));
    assert_eq!(u64_at(&mem, 0x6000 + 32), 0xE_0000, "rsdp_paddr");
    assert_eq!(
        u64_at(&mem, 0x6000 + 24),
        0x2_0000,
        "cmdline_paddr unchanged"
    );
    assert_eq!(u64_at(&mem, 0x6000 + 40), 0x7000, "memmap_paddr unchanged");

    // Linux boot protocol: boot_params.acpi_rsdp_addr is the u64 at 0x070 of the zero page.
    let mem = memory(64 * MIB);
    stale(&mem);
    let entry = load_with_rsdp(&mem, &bzimage(&BzSpec::default()), 0xE_0040).unwrap();
    assert_eq!(entry.boot_info, GuestAddress(0x8000));
    assert_eq!(u64_at(&mem, 0x8000 + 0x070), 0xE_0040, "acpi_rsdp_addr");
    assert_eq!(u8_at(&mem, 0x8000 + 0x078), 0, "the field ends at 0x077");
    assert_eq!(
        u32_at(&mem, 0x8000 + 0x228),
        0x2_0000,
        "cmd_line_ptr unchanged"
    );

    // Without ACPI both fields are 0 even over stale memory.
    let mem = memory(64 * MIB);
    stale(&mem);
    load(&mem, &elf_image(&ElfSpec::default()), "").unwrap();
    assert_eq!(u64_at(&mem, 0x6000 + 32), 0, "rsdp_paddr without ACPI");
    let mem = memory(64 * MIB);
    stale(&mem);
    load(&mem, &bzimage(&BzSpec::default()), "").unwrap();
    assert_eq!(
        u64_at(&mem, 0x8000 + 0x070),
        0,
        "acpi_rsdp_addr without ACPI"
    );
}

#[test]
fn bzimage_initramfs_respects_initrd_addr_max() {
    let mem = memory(3 * GIB + 64 * MIB);
    let spec = BzSpec {
        initrd_addr_max: 0x1FF_FFFF, // 32 MiB - 1
        ..Default::default()
    };
    let initrd = pattern(0x5000, 0x77);
    load_with_initramfs(&mem, &bzimage(&spec), &initrd).unwrap();

    let expected_addr = 32 * MIB - 0x5000;
    assert_eq!(
        u32_at(&mem, 0x8000 + 0x218),
        expected_addr as u32,
        "ramdisk_image"
    );
    assert_eq!(u32_at(&mem, 0x8000 + 0x21C), 0x5000, "ramdisk_size");
    assert_eq!(read_bytes(&mem, expected_addr, initrd.len()), initrd);
    // The RAM above 4 GiB appears in the zero page's e820 table too.
    assert_eq!(u8_at(&mem, 0x8000 + 0x1E8), 4);
    assert_memmap_entry(&mem, 0x8000 + 0x2D0 + 60, 4 * GIB, 64 * MIB, 1);
}

#[test]
fn bzimage_header_problems_are_typed_errors() {
    let mem = memory(64 * MIB);
    let old = BzSpec {
        version: 0x0206,
        ..Default::default()
    };
    assert!(matches!(
        load(&mem, &bzimage(&old), ""),
        Err(Error::BootProtocolTooOld { version: 0x0206 })
    ));
    let no_64bit = BzSpec {
        xloadflags: 0,
        ..Default::default()
    };
    assert!(matches!(
        load(&mem, &bzimage(&no_64bit), ""),
        Err(Error::No64BitEntry)
    ));
    let not_high = BzSpec {
        loadflags: 0,
        ..Default::default()
    };
    assert!(matches!(
        load(&mem, &bzimage(&not_high), ""),
        Err(Error::LoadBzImage(_))
    ));
    // The file ends inside the setup sectors, at their end, or inside the protected-mode part.
    let image = bzimage(&BzSpec::default());
    for cut in [BZ_SETUP_SIZE - 1, BZ_SETUP_SIZE, image.len() - 1] {
        assert!(
            matches!(load(&mem, &image[..cut], ""), Err(Error::KernelTruncated { size }) if size == cut as u64),
            "cut at {cut:#x}"
        );
    }
    // Cut inside the setup header itself.
    assert!(matches!(
        load(&mem, &image[..0x220], ""),
        Err(Error::KernelTruncated { size: 0x220 })
    ));
}

#[test]
fn bzimage_cmdline_is_limited_by_the_kernels_cmdline_size() {
    let mem = memory(64 * MIB);
    let spec = BzSpec {
        cmdline_size: 255,
        ..Default::default()
    };
    let image = bzimage(&spec);
    assert!(load(&mem, &image, &"a".repeat(255)).is_ok());
    assert!(matches!(
        load(&mem, &image, &"a".repeat(256)),
        Err(Error::CmdlineTooLong { len: 256, max: 255 })
    ));
}

#[test]
fn bzimage_whose_init_size_exceeds_ram_is_refused() {
    // Loaded at 1 MiB, the kernel runs from pref_address (16 MiB) and needs init_size = 8 MiB
    // there, up to 24 MiB.
    let mem = memory(20 * MIB);
    let result = load(&mem, &bzimage(&BzSpec::default()), "");
    assert!(
        matches!(
            result,
            Err(Error::KernelOutsideRam {
                start: 0x10_0000,
                end: 0x180_0000
            })
        ),
        "{result:?}"
    );
    assert!(load(&memory(24 * MIB), &bzimage(&BzSpec::default()), "").is_ok());
}

#[test]
fn bzimage_initramfs_stays_above_the_decompressed_kernel() {
    // 26 MiB of RAM: the kernel needs [16 MiB, 24 MiB); 3 MiB of initramfs must not go there.
    let mem = memory(26 * MIB);
    let result = load_with_initramfs(
        &mem,
        &bzimage(&BzSpec::default()),
        &vec![0u8; 3 * MIB as usize],
    );
    assert!(
        matches!(
            result,
            Err(Error::InitramfsTooLarge {
                kernel_end: 0x180_0000,
                ..
            })
        ),
        "{result:?}"
    );
    load_with_initramfs(
        &mem,
        &bzimage(&BzSpec::default()),
        &vec![0u8; 2 * MIB as usize],
    )
    .unwrap();
    assert_eq!(u32_at(&mem, 0x8000 + 0x218), 24 * MIB as u32);
}

// ---------------------------------------------------------------- common input errors

#[test]
fn not_a_kernel_is_refused() {
    let mem = memory(64 * MIB);
    assert!(matches!(load(&mem, &[], ""), Err(Error::NotAKernel)));
    assert!(matches!(
        load(&mem, &pattern(4096, 1), ""),
        Err(Error::NotAKernel)
    ));
}

#[test]
fn kernel_larger_than_ram_is_refused() {
    let mem = memory(2 * MIB);
    // ELF: what counts is the memory the segments need.
    let spec = ElfSpec {
        load_memsz: 3 * MIB,
        ..Default::default()
    };
    assert!(matches!(
        load(&mem, &elf_image(&spec), ""),
        Err(Error::KernelLargerThanRam {
            needed: 0x30_0000,
            ram: 0x20_0000
        })
    ));
    // bzImage: everything after the setup sectors is loaded.
    let mut image = bzimage(&BzSpec::default());
    image.resize(BZ_SETUP_SIZE + 3 * MIB as usize, 0);
    assert!(matches!(
        load(&mem, &image, ""),
        Err(Error::KernelLargerThanRam {
            needed: 0x30_0000,
            ..
        })
    ));
}

#[test]
fn elf_file_larger_than_ram_loads_if_its_segments_fit() {
    // Like a vmlinux with debug info: the file is bigger than RAM, the loaded part is not.
    let mem = memory(2 * MIB);
    let mut image = elf_image(&ElfSpec::default());
    image.resize(3 * MIB as usize, 0xEE);
    assert_eq!(load(&mem, &image, "").unwrap().protocol, BootProtocol::Pvh);
}

#[test]
fn bad_cmdlines_are_refused() {
    let mem = memory(64 * MIB);
    let image = elf_image(&ElfSpec::default());
    assert!(matches!(
        load(&mem, &image, &"x".repeat(64 * 1024)),
        Err(Error::CmdlineTooLong {
            len: 65536,
            max: 65535
        })
    ));
    assert!(load(&mem, &image, &"x".repeat(65535)).is_ok());
    assert!(matches!(
        load(&mem, &image, "root=/dev/vda\0init=/bin/sh"),
        Err(Error::CmdlineHasNul)
    ));
}

#[test]
fn ram_without_the_first_megabyte_is_refused() {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 512 * 1024)]).unwrap();
    assert!(matches!(
        load(&mem, &elf_image(&ElfSpec::default()), ""),
        Err(Error::RamTooSmall { needed: 0x10_0000 })
    ));
    let mem = Memory::from_ranges(&[(GuestAddress(MIB), 64 * MIB as usize)]).unwrap();
    assert!(matches!(
        load(&mem, &elf_image(&ElfSpec::default()), ""),
        Err(Error::RamTooSmall { .. })
    ));
}

#[test]
fn initramfs_that_does_not_fit_is_refused() {
    let mem = memory(4 * MIB);
    // 3 MiB of initramfs cannot fit between the kernel end (1 MiB + 12 KiB) and 4 MiB.
    let result = load_with_initramfs(
        &mem,
        &elf_image(&ElfSpec::default()),
        &vec![0u8; 3 * MIB as usize],
    );
    assert!(
        matches!(
            result,
            Err(Error::InitramfsTooLarge {
                size: 0x30_0000,
                kernel_end: 0x10_3000,
                limit: 0x40_0000
            })
        ),
        "{result:?}"
    );
}

// ---------------------------------------------------------------- robustness

mod corrupted_images {
    use super::*;
    use proptest::prelude::*;

    /// Overwrites bytes of `image` within its first `window` bytes (the headers, where the
    /// loader's decisions are made) and loads the result: any outcome but a panic is fine, and
    /// a success must still describe an entry inside RAM.
    fn load_corrupted(image: &[u8], window: usize, edits: &[(usize, u8)]) -> Result<(), String> {
        let mut image = image.to_vec();
        for &(position, value) in edits {
            let position = position % window.min(image.len());
            image[position] = value;
        }
        let mem = memory(32 * MIB);
        if let Ok(entry) = load(&mem, &image, "console=ttyS0") {
            if entry.entry.0 < MIB || entry.entry.0 >= 32 * MIB {
                return Err(format!("entry {:#x} outside RAM", entry.entry.0));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn corrupted_elf_never_panics(
            edits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..16)
        ) {
            // Headers, program headers and the note all sit in the first 256 bytes.
            let image = elf_image(&ElfSpec::default());
            prop_assert_eq!(load_corrupted(&image, 256, &edits), Ok(()));
        }

        #[test]
        fn corrupted_bzimage_never_panics(
            edits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..16)
        ) {
            // Offsets 0x1F1..0x280 hold the setup header.
            let image = bzimage(&BzSpec::default());
            let shifted: Vec<(usize, u8)> =
                edits.iter().map(|&(position, value)| (0x1F1 + position % 0x8F, value)).collect();
            prop_assert_eq!(load_corrupted(&image, 0x280, &shifted), Ok(()));
        }

        #[test]
        fn truncated_images_never_panic(cut in 0usize..0x1200, bz in any::<bool>()) {
            let image = if bz { bzimage(&BzSpec::default()) } else { elf_image(&ElfSpec::default()) };
            let mem = memory(32 * MIB);
            let result = load(&mem, &image[..cut.min(image.len())], "");
            prop_assert!(result.is_err() || cut >= image.len());
        }
    }
}
