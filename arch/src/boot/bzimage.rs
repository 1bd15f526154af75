//! bzImage boot through the Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst): the
//! protected-mode kernel is copied to `code32_start`, and the zero page (`struct boot_params`)
//! carries the image's own setup header, amended by the loader, plus the e820 map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, E820_MAX_ENTRIES_ZEROPAGE, LOADED_HIGH,
};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::initramfs::{load_initramfs, LoadedInitramfs};
use super::{check_cmdline, check_kernel_placement, le_u16, le_u32, low_ram_end, write_cmdline};
use super::{BootEntry, BootProtocol};
use crate::e820::e820_map;
use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_RAM_START, ZERO_PAGE_START};
use crate::{write_guest, Error};

// Setup header fields, as offsets into the image file (and into the zero page).
const SETUP_SECTS: usize = 0x1F1;
const SETUP_SYSSIZE: usize = 0x1F4;
const SETUP_VERSION: usize = 0x206;
const SETUP_INITRD_ADDR_MAX: usize = 0x22C;
const SETUP_XLOADFLAGS: usize = 0x236;
const SETUP_CMDLINE_SIZE: usize = 0x238;
const SETUP_INIT_SIZE: usize = 0x260;
const SETUP_HEADER_END: usize = 0x264;

/// Protocol 2.12 introduced `xloadflags`, which is how a kernel says it has a 64-bit entry.
const MIN_PROTOCOL_VERSION: u16 = 0x020C;
/// xloadflags bit 0: the kernel has the legacy 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry (`startup_64`) from the protected-mode kernel's load address.
pub const STARTUP_64_OFFSET: u64 = 0x200;
/// `type_of_loader` value for a boot loader without an assigned ID.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xFF;
/// `vid_mode` value asking for the normal text mode, i.e. no mode switch.
const VID_MODE_NORMAL: u16 = 0xFFFF;

pub(super) fn load<M, K>(
    mem: &M,
    kernel: &mut K,
    header: &[u8],
    cmdline: &str,
    initramfs: Option<&mut File>,
) -> Result<BootEntry, Error>
where
    M: GuestMemoryBackend,
    K: Read + Seek + ReadVolatile,
{
    if header.len() < SETUP_HEADER_END {
        return Err(Error::KernelTruncated {
            size: header.len() as u64,
        });
    }
    let version = le_u16(header, SETUP_VERSION);
    if version < MIN_PROTOCOL_VERSION {
        return Err(Error::BootProtocolTooOld { version });
    }
    if le_u16(header, SETUP_XLOADFLAGS) & XLF_KERNEL_64 == 0 {
        return Err(Error::No64BitEntry);
    }
    check_image_complete(kernel, header)?;
    let kernel_cmdline_max = le_u32(header, SETUP_CMDLINE_SIZE) as usize;
    check_cmdline(cmdline, kernel_cmdline_max.min(CMDLINE_MAX_SIZE - 1))?;

    let loaded =
        BzImage::load(mem, None, kernel, Some(HIGH_RAM_START)).map_err(Error::LoadBzImage)?;
    // The kernel decompresses in place and needs `init_size` bytes from its load address
    // (protocol 2.10+, which 2.12 implies); that whole range must be RAM and stay clear of the
    // initramfs.
    let init_end = loaded.kernel_load.0 + u64::from(le_u32(header, SETUP_INIT_SIZE));
    let kernel_end = loaded.kernel_end.max(init_end);
    check_kernel_placement(mem, loaded.kernel_load, kernel_end)?;
    // The loader only returns `None` for ELF images.
    let mut setup_header = loaded.setup_header.ok_or(Error::NotAKernel)?;

    let initramfs = match initramfs {
        Some(file) => {
            // initrd_addr_max is the highest address the initramfs may occupy (inclusive).
            let limit = u64::from(le_u32(header, SETUP_INITRD_ADDR_MAX)) + 1;
            Some(load_initramfs(
                mem,
                file,
                kernel_end,
                limit.min(low_ram_end(mem)),
            )?)
        }
        None => None,
    };

    write_cmdline(mem, cmdline)?;

    setup_header.type_of_loader = LOADER_TYPE_UNDEFINED;
    setup_header.loadflags |= LOADED_HIGH;
    setup_header.vid_mode = VID_MODE_NORMAL;
    setup_header.cmd_line_ptr = CMDLINE_START.0 as u32;
    let mut params = boot_params {
        hdr: setup_header,
        ..Default::default()
    };
    set_ramdisk(&mut params, initramfs);
    set_e820(&mut params, mem)?;
    write_guest(mem, ZERO_PAGE_START, params.as_slice(), "zero page")?;

    Ok(BootEntry {
        protocol: BootProtocol::LinuxBoot64,
        entry: GuestAddress(loaded.kernel_load.0 + STARTUP_64_OFFSET),
        boot_info: ZERO_PAGE_START,
    })
}

/// The protected-mode kernel follows the setup sectors and is `syssize` 16-byte paragraphs
/// long; an image that ends earlier is truncated (linux-loader would load the short rest).
fn check_image_complete<K: Seek>(kernel: &mut K, header: &[u8]) -> Result<(), Error> {
    let image_size = kernel.seek(SeekFrom::End(0)).map_err(Error::ReadKernel)?;
    // setup_sects == 0 means 4, for compatibility with ancient images.
    let setup_sectors = match header[SETUP_SECTS] {
        0 => 4,
        sectors => u64::from(sectors),
    };
    let setup_size = (setup_sectors + 1) * 512;
    let protected_mode_size = (u64::from(le_u32(header, SETUP_SYSSIZE)) * 16).max(1);
    if image_size < setup_size + protected_mode_size {
        return Err(Error::KernelTruncated { size: image_size });
    }
    Ok(())
}

/// Records the initramfs, or clears the fields copied from the image when there is none.
fn set_ramdisk(params: &mut boot_params, initramfs: Option<LoadedInitramfs>) {
    let (addr, size) = initramfs.map_or((0, 0), |initramfs| (initramfs.addr.0, initramfs.size));
    params.hdr.ramdisk_image = addr as u32;
    params.hdr.ramdisk_size = size as u32;
    params.ext_ramdisk_image = (addr >> 32) as u32;
    params.ext_ramdisk_size = (size >> 32) as u32;
}

fn set_e820<M: GuestMemoryBackend>(params: &mut boot_params, mem: &M) -> Result<(), Error> {
    let map = e820_map(mem);
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(Error::TooManyMemoryMapEntries {
            entries: map.len(),
            max: E820_MAX_ENTRIES_ZEROPAGE,
        });
    }
    let mut table = params.e820_table;
    for (slot, entry) in table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_table = table;
    params.e820_entries = map.len() as u8;
    Ok(())
}
