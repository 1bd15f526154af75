//! PVH boot of an ELF kernel (Xen "x86/HVM direct boot ABI", which Linux implements in
//! arch/x86/platform/pvh): load the ELF segments, then write `hvm_start_info` version 1 with
//! the command line, the memory map and, if given, the initramfs as module 0.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::{elf::PvhBootCapability, Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::initramfs::{load_initramfs, LoadedInitramfs};
use super::{check_fits_in_ram, check_kernel_placement, low_ram_end, write_cmdline};
use super::{le_u16, le_u32, le_u64};
use super::{BootEntry, BootProtocol};
use crate::e820::{e820_map, E820Entry};
use crate::layout::{
    CMDLINE_START, HIGH_RAM_START, PVH_MEMMAP, PVH_MEMMAP_MAX_ENTRIES, PVH_MODLIST, PVH_START_INFO,
};
use crate::{write_guest, Error};

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const START_INFO_MAGIC: u32 = 0x336E_C578;
/// Version 1 adds the memory map fields.
pub const START_INFO_VERSION: u32 = 1;

// Byte offsets in `struct hvm_start_info` (56 bytes, all little endian).
const SI_MAGIC: usize = 0;
const SI_VERSION: usize = 4;
const SI_NR_MODULES: usize = 12;
const SI_MODLIST_PADDR: usize = 16;
const SI_CMDLINE_PADDR: usize = 24;
const SI_MEMMAP_PADDR: usize = 40;
const SI_MEMMAP_ENTRIES: usize = 48;
const START_INFO_SIZE: usize = 56;
/// `struct hvm_modlist_entry`: paddr, size, cmdline_paddr, reserved (u64 each).
const MODLIST_ENTRY_SIZE: usize = 32;
/// `struct hvm_memmap_table_entry`: addr u64, size u64, type u32, reserved u32.
const MEMMAP_ENTRY_SIZE: usize = 24;

// ELF64 header and program header fields we validate before loading.
const ELF_HEADER_SIZE: usize = 64;
const EI_CLASS: usize = 4;
const ELFCLASS64: u8 = 2;
const EI_DATA: usize = 5;
const ELFDATA2LSB: u8 = 1;
const E_MACHINE: usize = 18;
const EM_X86_64: u16 = 62;
const E_PHOFF: usize = 32;
const E_PHENTSIZE: usize = 54;
const E_PHNUM: usize = 56;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;

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
    let segments = read_load_segments(kernel, header)?;
    // Only the loaded segments count: a vmlinux with debug info is far larger than its image.
    let loaded_size = segments
        .iter()
        .fold(0u64, |total, segment| total.saturating_add(segment.memsz));
    check_fits_in_ram(mem, loaded_size)?;
    for segment in &segments {
        check_kernel_placement(mem, segment.paddr, segment.paddr.0 + segment.memsz)?;
    }

    let loaded = Elf::load(mem, None, kernel, Some(HIGH_RAM_START)).map_err(Error::LoadElf)?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => entry,
        PvhBootCapability::PvhEntryNotPresent | PvhBootCapability::PvhEntryIgnored => {
            return Err(Error::NoPvhEntry)
        }
    };
    check_kernel_placement(mem, entry, entry.0 + 1)?;
    // The loader copies only the file-backed part of each segment. On NV memory a cold boot
    // reuses RAM that still holds the previous run, so the zero-filled tail (.bss) is cleared
    // here rather than trusting the memory to be fresh.
    for segment in &segments {
        zero_segment_tail(mem, segment)?;
    }

    let kernel_end = segments
        .iter()
        .map(|segment| segment.paddr.0 + segment.memsz)
        .max()
        .unwrap_or(loaded.kernel_end);
    let initramfs = match initramfs {
        Some(file) => Some(load_initramfs(mem, file, kernel_end, low_ram_end(mem))?),
        None => None,
    };

    write_cmdline(mem, cmdline)?;
    write_start_info(mem, &e820_map(mem), initramfs)?;
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
    if header.len() < ELF_HEADER_SIZE {
        return Err(Error::KernelTruncated { size: image_size });
    }
    if header[EI_CLASS] != ELFCLASS64
        || header[EI_DATA] != ELFDATA2LSB
        || le_u16(header, E_MACHINE) != EM_X86_64
        || usize::from(le_u16(header, E_PHENTSIZE)) != PHDR_SIZE
    {
        return Err(Error::UnsupportedElf);
    }
    let phoff = le_u64(header, E_PHOFF);
    let phnum = usize::from(le_u16(header, E_PHNUM));
    let table_end = phoff.checked_add((phnum * PHDR_SIZE) as u64);
    if table_end.is_none_or(|end| end > image_size) {
        return Err(Error::KernelTruncated { size: image_size });
    }
    let mut table = vec![0u8; phnum * PHDR_SIZE];
    kernel
        .seek(SeekFrom::Start(phoff))
        .map_err(Error::ReadKernel)?;
    kernel.read_exact(&mut table).map_err(Error::ReadKernel)?;

    let mut segments = Vec::new();
    for phdr in table.chunks_exact(PHDR_SIZE) {
        if le_u32(phdr, 0) != PT_LOAD {
            continue;
        }
        let offset = le_u64(phdr, 8);
        let paddr = le_u64(phdr, 24);
        let filesz = le_u64(phdr, 32);
        let memsz = le_u64(phdr, 40);
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

/// Writes the memory map, the module list and `hvm_start_info` itself.
fn write_start_info<M: GuestMemoryBackend>(
    mem: &M,
    memory_map: &[E820Entry],
    initramfs: Option<LoadedInitramfs>,
) -> Result<(), Error> {
    if memory_map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(Error::TooManyMemoryMapEntries {
            entries: memory_map.len(),
            max: PVH_MEMMAP_MAX_ENTRIES,
        });
    }
    let mut memmap = Vec::with_capacity(memory_map.len() * MEMMAP_ENTRY_SIZE);
    for entry in memory_map {
        memmap.extend_from_slice(&entry.addr.to_le_bytes());
        memmap.extend_from_slice(&entry.size.to_le_bytes());
        memmap.extend_from_slice(&(entry.kind as u32).to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    write_guest(mem, PVH_MEMMAP, &memmap, "PVH memory map")?;

    let mut start_info = [0u8; START_INFO_SIZE];
    put(&mut start_info, SI_MAGIC, &START_INFO_MAGIC.to_le_bytes());
    put(
        &mut start_info,
        SI_VERSION,
        &START_INFO_VERSION.to_le_bytes(),
    );
    put(
        &mut start_info,
        SI_CMDLINE_PADDR,
        &CMDLINE_START.0.to_le_bytes(),
    );
    put(
        &mut start_info,
        SI_MEMMAP_PADDR,
        &PVH_MEMMAP.0.to_le_bytes(),
    );
    let entries = memory_map.len() as u32;
    put(&mut start_info, SI_MEMMAP_ENTRIES, &entries.to_le_bytes());

    if let Some(initramfs) = initramfs {
        let mut module = [0u8; MODLIST_ENTRY_SIZE];
        put(&mut module, 0, &initramfs.addr.0.to_le_bytes());
        put(&mut module, 8, &initramfs.size.to_le_bytes());
        write_guest(mem, PVH_MODLIST, &module, "PVH module list")?;
        put(&mut start_info, SI_NR_MODULES, &1u32.to_le_bytes());
        put(
            &mut start_info,
            SI_MODLIST_PADDR,
            &PVH_MODLIST.0.to_le_bytes(),
        );
    }
    write_guest(mem, PVH_START_INFO, &start_info, "PVH start info")
}

fn put(buf: &mut [u8], offset: usize, bytes: &[u8]) {
    buf[offset..offset + bytes.len()].copy_from_slice(bytes);
}
