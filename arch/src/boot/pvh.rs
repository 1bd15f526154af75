//! PVH boot of an ELF kernel (Xen "x86/HVM direct boot ABI", which Linux implements in
//! arch/x86/platform/pvh): load the ELF segments, then write `hvm_start_info` version 1 with
//! the command line, the memory map and, if given, the initramfs as module 0.

use std::io::{Read, Seek, SeekFrom};
use std::mem::size_of;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::elf::{
    Elf64_Ehdr, Elf64_Phdr, EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, EM_X86_64, PT_LOAD,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{elf::PvhBootCapability, Elf, KernelLoader};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::initramfs::{load_initramfs, LoadedInitramfs};
use super::{check_fits_in_ram, check_kernel_placement, low_ram_end, write_cmdline};
use super::{BootEntry, BootProtocol, KernelImage};
use crate::e820::{e820_map, E820Entry};
use crate::layout::{
    CMDLINE_START, HIGH_RAM_START, PVH_MEMMAP, PVH_MEMMAP_MAX_ENTRIES, PVH_MODLIST, PVH_START_INFO,
};
use crate::{write_guest, Error};

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const START_INFO_MAGIC: u32 = 0x336E_C578;
/// Version 1 adds the memory map fields.
pub const START_INFO_VERSION: u32 = 1;

pub(super) fn load<M, K>(image: KernelImage<'_, M, K>) -> Result<BootEntry, Error>
where
    M: GuestMemoryBackend,
    K: Read + Seek + ReadVolatile,
{
    let segments = read_load_segments(image.kernel, image.header)?;
    // Only the loaded segments count: a vmlinux with debug info is far larger than its image.
    let loaded_size = segments
        .iter()
        .fold(0u64, |total, segment| total.saturating_add(segment.memsz));
    check_fits_in_ram(image.mem, loaded_size)?;
    for segment in &segments {
        check_kernel_placement(image.mem, segment.paddr, segment.paddr.0 + segment.memsz)?;
    }

    let loaded =
        Elf::load(image.mem, None, image.kernel, Some(HIGH_RAM_START)).map_err(Error::LoadElf)?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => entry,
        PvhBootCapability::PvhEntryNotPresent | PvhBootCapability::PvhEntryIgnored => {
            return Err(Error::NoPvhEntry)
        }
    };
    check_kernel_placement(image.mem, entry, entry.0 + 1)?;
    // The loader copies only the file-backed part of each segment. On NV memory a cold boot
    // reuses RAM that still holds the previous run, so the zero-filled tail (.bss) is cleared
    // here rather than trusting the memory to be fresh.
    for segment in &segments {
        zero_segment_tail(image.mem, segment)?;
    }

    let kernel_end = segments
        .iter()
        .map(|segment| segment.paddr.0 + segment.memsz)
        .max()
        .unwrap_or(loaded.kernel_end);
    let initramfs = match image.initramfs {
        Some(file) => Some(load_initramfs(
            image.mem,
            file,
            kernel_end,
            low_ram_end(image.mem),
        )?),
        None => None,
    };

    write_cmdline(image.mem, image.cmdline)?;
    write_start_info(image.mem, &e820_map(image.mem), initramfs, image.acpi_rsdp)?;
    Ok(BootEntry {
        protocol: BootProtocol::Pvh,
        entry,
        boot_info: PVH_START_INFO,
    })
}

/// A PT_LOAD segment: `filesz` bytes from the file, zero-filled up to `memsz`.
struct LoadSegment {
    paddr: GuestAddress,
    filesz: u64,
    memsz: u64,
}

/// Validates the ELF header and reads the loadable segments' placement, so that a kernel which
/// would overwrite the boot structures or run past RAM is refused before anything is copied.
fn read_load_segments<K: Read + Seek>(
    kernel: &mut K,
    header: &[u8],
) -> Result<Vec<LoadSegment>, Error> {
    let image_size = kernel.seek(SeekFrom::End(0)).map_err(Error::ReadKernel)?;
    let mut ehdr = Elf64_Ehdr::default();
    let ehdr_bytes = header
        .get(..size_of::<Elf64_Ehdr>())
        .ok_or(Error::KernelTruncated { size: image_size })?;
    ehdr.as_mut_slice().copy_from_slice(ehdr_bytes);
    if ehdr.e_ident[EI_CLASS] != ELFCLASS64
        || ehdr.e_ident[EI_DATA] != ELFDATA2LSB
        || ehdr.e_machine != EM_X86_64
        || usize::from(ehdr.e_phentsize) != size_of::<Elf64_Phdr>()
    {
        return Err(Error::UnsupportedElf);
    }
    let mut table = vec![Elf64_Phdr::default(); usize::from(ehdr.e_phnum)];
    let table_end = ehdr
        .e_phoff
        .checked_add((table.len() * size_of::<Elf64_Phdr>()) as u64);
    if table_end.is_none_or(|end| end > image_size) {
        return Err(Error::KernelTruncated { size: image_size });
    }
    kernel
        .seek(SeekFrom::Start(ehdr.e_phoff))
        .map_err(Error::ReadKernel)?;
    for phdr in &mut table {
        kernel
            .read_exact(phdr.as_mut_slice())
            .map_err(Error::ReadKernel)?;
    }

    let mut segments = Vec::new();
    for phdr in table.iter().filter(|phdr| phdr.p_type == PT_LOAD) {
        let (offset, paddr) = (phdr.p_offset, phdr.p_paddr);
        let (filesz, memsz) = (phdr.p_filesz, phdr.p_memsz);
        if offset
            .checked_add(filesz)
            .is_none_or(|end| end > image_size)
        {
            return Err(Error::KernelTruncated { size: image_size });
        }
        let end = paddr.checked_add(memsz.max(filesz));
        if filesz > memsz || end.is_none() {
            return Err(Error::UnsupportedElf);
        }
        // The loader skips segments without file contents; their memory is still ours to zero.
        if memsz > 0 {
            segments.push(LoadSegment {
                paddr: GuestAddress(paddr),
                filesz,
                memsz,
            });
        }
    }
    kernel.rewind().map_err(Error::ReadKernel)?;
    Ok(segments)
}

fn zero_segment_tail<M: GuestMemoryBackend>(mem: &M, segment: &LoadSegment) -> Result<(), Error> {
    const CHUNK: usize = 64 * 1024;
    let zeros = [0u8; CHUNK];
    let mut addr = segment.paddr.0 + segment.filesz;
    let end = segment.paddr.0 + segment.memsz;
    while addr < end {
        let len = (end - addr).min(CHUNK as u64) as usize;
        write_guest(mem, GuestAddress(addr), &zeros[..len], "kernel .bss")?;
        addr += len as u64;
    }
    Ok(())
}

/// Writes the memory map, the module list and `hvm_start_info` itself, all as linux-loader's
/// `start_info` structs through its PVH boot configurator.
fn write_start_info<M: GuestMemoryBackend>(
    mem: &M,
    memory_map: &[E820Entry],
    initramfs: Option<LoadedInitramfs>,
    rsdp_paddr: u64,
) -> Result<(), Error> {
    if memory_map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(Error::TooManyMemoryMapEntries {
            entries: memory_map.len(),
            max: PVH_MEMMAP_MAX_ENTRIES,
        });
    }
    let memmap: Vec<hvm_memmap_table_entry> = memory_map
        .iter()
        .map(|entry| hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initramfs
        .iter()
        .map(|initramfs| hvm_modlist_entry {
            paddr: initramfs.addr.0,
            size: initramfs.size,
            ..Default::default()
        })
        .collect();
    let start_info = hvm_start_info {
        magic: START_INFO_MAGIC,
        version: START_INFO_VERSION,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { PVH_MODLIST.0 },
        cmdline_paddr: CMDLINE_START.0,
        memmap_paddr: PVH_MEMMAP.0,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, PVH_START_INFO);
    params.set_sections(&memmap, PVH_MEMMAP);
    if !modules.is_empty() {
        params.set_modules(&modules, PVH_MODLIST);
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(Error::WriteBootParams)
}
