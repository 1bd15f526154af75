//! Identity-mapping page tables for entering a kernel in 64-bit long mode. The Linux 64-bit boot
//! protocol needs the kernel, the zero page and the command line identity mapped; we map the
//! whole first 4 GiB with 2 MiB pages, so an initramfs near the top of low RAM is covered too.

use vm_memory::GuestMemoryBackend;

use crate::layout::{PDPT_START, PD_START, PML4_START};
use crate::{write_guest, Error};

/// Number of GiB identity mapped; one page directory per GiB.
pub const IDENTITY_MAPPED_GIB: u64 = 4;

const PAGE_SIZE: u64 = 0x1000;
const ENTRIES_PER_TABLE: u64 = 512;
const LARGE_PAGE_SIZE: u64 = 2 << 20;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_PAGE_SIZE: u64 = 1 << 7;

/// Writes PML4, PDPT and page directories at their fixed places and returns the CR3 value.
pub fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<u64, Error> {
    let mut pml4 = vec![0u64; ENTRIES_PER_TABLE as usize];
    pml4[0] = PDPT_START.0 | PTE_PRESENT | PTE_WRITABLE;

    let mut pdpt = vec![0u64; ENTRIES_PER_TABLE as usize];
    for (gib, entry) in pdpt
        .iter_mut()
        .take(IDENTITY_MAPPED_GIB as usize)
        .enumerate()
    {
        *entry = (PD_START.0 + gib as u64 * PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE;
    }

    // All page directories are contiguous, so one flat array of 2 MiB mappings covers them.
    let page_directories: Vec<u64> = (0..IDENTITY_MAPPED_GIB * ENTRIES_PER_TABLE)
        .map(|index| (index * LARGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE)
        .collect();

    write_guest(mem, PML4_START, &to_bytes(&pml4), "PML4")?;
    write_guest(
        mem,
        PDPT_START,
        &to_bytes(&pdpt),
        "page directory pointer table",
    )?;
    write_guest(
        mem,
        PD_START,
        &to_bytes(&page_directories),
        "page directories",
    )?;
    Ok(PML4_START.0)
}

fn to_bytes(entries: &[u64]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|entry| entry.to_le_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn tables_identity_map_4g_with_2m_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // Dirty the area first, so stale entries would show.
        mem.write_slice(&[0xAA; 0x7000], GuestAddress(0x9000))
            .unwrap();
        let cr3 = write_identity_page_tables(&mem).unwrap();
        assert_eq!(cr3, 0x9000);

        assert_eq!(read_u64(&mem, 0x9000), 0xA003);
        assert_eq!(read_u64(&mem, 0x9008), 0);
        assert_eq!(read_u64(&mem, 0xA000), 0xB003);
        assert_eq!(read_u64(&mem, 0xA018), 0xE003);
        assert_eq!(read_u64(&mem, 0xA020), 0);
        assert_eq!(read_u64(&mem, 0xB000), 0x83);
        assert_eq!(read_u64(&mem, 0xB008), 0x20_0083);
        // Last 2 MiB page below 4 GiB, in the fourth page directory.
        assert_eq!(read_u64(&mem, 0xEFF8), 0xFFE0_0083);
    }

    #[test]
    fn too_little_memory_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xC000)]).unwrap();
        assert!(matches!(
            write_identity_page_tables(&mem),
            Err(Error::WriteGuestMemory {
                what: "page directories",
                ..
            })
        ));
    }
}
