//! bzImage boot through the Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst): the
//! protected-mode kernel is copied to `code32_start`, and the zero page (`struct boot_params`)
//! carries the image's own setup header, amended by the loader, plus the e820 map.

use std::io::{Read, Seek, SeekFrom};
use std::mem::{offset_of, size_of};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE, LOADED_HIGH,
};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::initramfs::{load_initramfs, LoadedInitramfs};
use super::{check_cmdline, check_fits_in_ram, check_kernel_placement};
use super::{low_ram_end, write_cmdline};
use super::{BootEntry, BootProtocol, KernelImage};
use crate::e820::e820_map;
use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_RAM_START, ZERO_PAGE_START};
use crate::Error;

/// The setup header sits at the same offset in the image file as in the zero page.
const SETUP_HEADER_START: usize = offset_of!(boot_params, hdr);
/// The image must hold the header up to and including `init_size`, the last field read here
/// (later fields, of newer protocol versions, read as zero when the image lacks them).
const SETUP_HEADER_END: usize = SETUP_HEADER_START + offset_of!(setup_header, init_size) + 4;

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

pub(super) fn load<M, K>(image: KernelImage<'_, M, K>) -> Result<BootEntry, Error>
where
    M: GuestMemoryBackend,
    K: Read + Seek + ReadVolatile,
{
    let image_header = read_setup_header(image.header)?;
    let version = image_header.version;
    if version < MIN_PROTOCOL_VERSION {
        return Err(Error::BootProtocolTooOld { version });
    }
    if image_header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::No64BitEntry);
    }
    let protected_mode_size = check_image_complete(image.kernel, &image_header)?;
    check_fits_in_ram(image.mem, protected_mode_size)?;
    let kernel_cmdline_max = image_header.cmdline_size as usize;
    check_cmdline(image.cmdline, kernel_cmdline_max.min(CMDLINE_MAX_SIZE - 1))?;

    let loaded = BzImage::load(image.mem, None, image.kernel, Some(HIGH_RAM_START))
        .map_err(Error::LoadBzImage)?;
    // The kernel decompresses itself to its runtime address and needs `init_size` bytes there
    // before it reads the memory map; that range must be RAM and stay clear of the initramfs.
    let init_end = runtime_start(&image_header, loaded.kernel_load.0)
        .checked_add(u64::from(image_header.init_size))
        .ok_or(Error::KernelOutsideRam {
            start: loaded.kernel_load.0,
            end: u64::MAX,
        })?;
    let kernel_end = loaded.kernel_end.max(init_end);
    check_kernel_placement(image.mem, loaded.kernel_load, kernel_end)?;
    // The loader only returns `None` for ELF images.
    let mut setup_header = loaded.setup_header.ok_or(Error::NotAKernel)?;

    let initramfs = match image.initramfs {
        Some(file) => {
            // initrd_addr_max is the highest address the initramfs may occupy (inclusive).
            let limit = u64::from(image_header.initrd_addr_max) + 1;
            Some(load_initramfs(
                image.mem,
                file,
                kernel_end,
                limit.min(low_ram_end(image.mem)),
            )?)
        }
        None => None,
    };

    write_cmdline(image.mem, image.cmdline)?;

    setup_header.type_of_loader = LOADER_TYPE_UNDEFINED;
    setup_header.loadflags |= LOADED_HIGH;
    setup_header.vid_mode = VID_MODE_NORMAL;
    setup_header.cmd_line_ptr = CMDLINE_START.0 as u32;
    let mut params = boot_params {
        hdr: setup_header,
        acpi_rsdp_addr: image.acpi_rsdp,
        ..Default::default()
    };
    set_ramdisk(&mut params, initramfs);
    set_e820(&mut params, image.mem)?;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, ZERO_PAGE_START), image.mem)
        .map_err(Error::WriteBootParams)?;

    Ok(BootEntry {
        protocol: BootProtocol::LinuxBoot64,
        entry: GuestAddress(loaded.kernel_load.0 + STARTUP_64_OFFSET),
        boot_info: ZERO_PAGE_START,
    })
}

/// The image's setup header, as linux-loader's `setup_header`: the bytes of `header` (the start
/// of the image) from offset 0x1F1 on.
fn read_setup_header(header: &[u8]) -> Result<setup_header, Error> {
    if header.len() < SETUP_HEADER_END {
        return Err(Error::KernelTruncated {
            size: header.len() as u64,
        });
    }
    let available = &header[SETUP_HEADER_START..];
    let mut parsed = setup_header::default();
    let len = available.len().min(size_of::<setup_header>());
    parsed.as_mut_slice()[..len].copy_from_slice(&available[..len]);
    Ok(parsed)
}

/// Where the decompressed kernel will run (boot.rst, `pref_address` and `init_size`): a
/// relocatable kernel moves to its load address rounded up to `kernel_alignment`, but never
/// below its preferred address; a fixed one runs at the preferred address.
fn runtime_start(header: &setup_header, load_address: u64) -> u64 {
    let preferred = header.pref_address;
    if header.relocatable_kernel == 0 {
        return if preferred == 0 {
            load_address
        } else {
            preferred
        };
    }
    let alignment = u64::from(header.kernel_alignment);
    let aligned = if alignment.is_power_of_two() {
        load_address.next_multiple_of(alignment)
    } else {
        load_address
    };
    aligned.max(preferred)
}

/// The protected-mode kernel follows the setup sectors and is `syssize` 16-byte paragraphs
/// long; an image that ends earlier is truncated (linux-loader would load the short rest).
/// Returns the size of what will be loaded: everything after the setup sectors.
fn check_image_complete<K: Seek>(kernel: &mut K, header: &setup_header) -> Result<u64, Error> {
    let image_size = kernel.seek(SeekFrom::End(0)).map_err(Error::ReadKernel)?;
    // setup_sects == 0 means 4, for compatibility with ancient images.
    let setup_sectors = match header.setup_sects {
        0 => 4,
        sectors => u64::from(sectors),
    };
    let setup_size = (setup_sectors + 1) * 512;
    let protected_mode_size = (u64::from(header.syssize) * 16).max(1);
    if image_size < setup_size + protected_mode_size {
        return Err(Error::KernelTruncated { size: image_size });
    }
    Ok(image_size - setup_size)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header(relocatable: u8, alignment: u32, preferred: u64) -> setup_header {
        setup_header {
            relocatable_kernel: relocatable,
            kernel_alignment: alignment,
            pref_address: preferred,
            ..Default::default()
        }
    }

    #[test]
    fn the_setup_header_is_read_at_0x1f1_up_to_init_size() {
        // Offsets of boot.rst: the header starts at 0x1F1, init_size is the u32 at 0x260.
        assert_eq!(SETUP_HEADER_START, 0x1F1);
        assert_eq!(SETUP_HEADER_END, 0x264);
        let mut image = vec![0u8; SETUP_HEADER_END];
        image[0x1F1] = 7;
        image[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
        image[0x260..0x264].copy_from_slice(&0x0123_4567u32.to_le_bytes());
        let parsed = read_setup_header(&image).unwrap();
        assert_eq!(
            (parsed.setup_sects, { parsed.version }, { parsed.init_size }),
            (7, 0x020F, 0x0123_4567)
        );
        assert!(matches!(
            read_setup_header(&image[..SETUP_HEADER_END - 1]),
            Err(Error::KernelTruncated { size }) if size == SETUP_HEADER_END as u64 - 1
        ));
    }

    #[test]
    fn runtime_address_follows_boot_rst() {
        const MIB: u64 = 1 << 20;
        // Relocatable: load address aligned up, but not below the preferred address.
        assert_eq!(runtime_start(&header(1, 0x20_0000, 0), MIB), 2 * MIB);
        assert_eq!(
            runtime_start(&header(1, 0x20_0000, 16 * MIB), MIB),
            16 * MIB
        );
        assert_eq!(
            runtime_start(&header(1, 0x20_0000, MIB), 33 * MIB),
            34 * MIB
        );
        // A nonsensical alignment is ignored rather than trusted.
        assert_eq!(runtime_start(&header(1, 3, 0), MIB + 1), MIB + 1);
        // Not relocatable: the preferred address, or the load address without one.
        assert_eq!(
            runtime_start(&header(0, 0x20_0000, 16 * MIB), MIB),
            16 * MIB
        );
        assert_eq!(runtime_start(&header(0, 0, 0), MIB), MIB);
    }
}
