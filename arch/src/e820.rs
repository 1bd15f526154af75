//! The BIOS-style e820 memory map, built from the guest memory's regions. Both boot protocols
//! hand the same map to the kernel: PVH as `hvm_memmap_table_entry`s, the Linux boot protocol
//! in the zero page's `e820_table`.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{HIGH_RAM_START, LEGACY_HOLE_START};

/// Memory types shared by e820 and the PVH memory map (the values are identical in both ABIs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

/// One e820 range: `size` bytes from guest-physical `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

impl E820Entry {
    fn end(&self) -> u64 {
        self.addr + self.size
    }
}

/// Builds the map: every guest RAM region is `Ram`, except that the legacy hole
/// [0xA0000, 0x100000) is cut out and reported `Reserved` (Linux expects BIOS/VGA space there and
/// would otherwise hand it out as normal memory). Adjacent ranges of one type are merged, so
/// memory split into several regions still shows up as one range. Sorted by address.
pub fn e820_map<M: GuestMemoryBackend>(mem: &M) -> Vec<E820Entry> {
    let mut regions: Vec<(u64, u64)> = mem
        .iter()
        .map(|region| (region.start_addr().0, region.len()))
        .filter(|&(_, len)| len > 0)
        .collect();
    regions.sort_unstable();

    let hole_start = LEGACY_HOLE_START.0;
    let hole_end = HIGH_RAM_START.0;
    let mut entries = Vec::new();
    let mut touches_low_memory = false;
    for (start, len) in regions {
        let end = start.saturating_add(len);
        if start < hole_end {
            touches_low_memory = true;
        }
        // The part of the region below the hole, and the part above it.
        let pieces = [(start, end.min(hole_start)), (start.max(hole_end), end)];
        for (piece_start, piece_end) in pieces {
            if piece_start < piece_end {
                entries.push(E820Entry {
                    addr: piece_start,
                    size: piece_end - piece_start,
                    kind: E820Type::Ram,
                });
            }
        }
    }
    if touches_low_memory {
        entries.push(E820Entry {
            addr: hole_start,
            size: hole_end - hole_start,
            kind: E820Type::Reserved,
        });
    }
    entries.sort_unstable_by_key(|entry| entry.addr);
    merge_adjacent(entries)
}

fn merge_adjacent(entries: Vec<E820Entry>) -> Vec<E820Entry> {
    let mut merged: Vec<E820Entry> = Vec::with_capacity(entries.len());
    for entry in entries {
        match merged.last_mut() {
            Some(last) if last.kind == entry.kind && last.end() == entry.addr => {
                last.size += entry.size;
            }
            _ => merged.push(entry),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ram_regions;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry {
            addr,
            size,
            kind: E820Type::Ram,
        }
    }

    fn legacy_hole() -> E820Entry {
        E820Entry {
            addr: 0xA_0000,
            size: 0x6_0000,
            kind: E820Type::Reserved,
        }
    }

    fn memory(ranges: &[(u64, u64)]) -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> = ranges
            .iter()
            .map(|&(start, len)| (GuestAddress(start), len as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn low_ram_is_split_around_the_legacy_hole() {
        let map = e820_map(&memory(&[(0, 64 * MIB)]));
        assert_eq!(
            map,
            vec![ram(0, 0xA_0000), legacy_hole(), ram(MIB, 63 * MIB)]
        );
    }

    #[test]
    fn ram_above_the_device_hole_is_its_own_range() {
        // Mapping 4 GiB of anonymous memory only reserves address space; nothing is touched.
        let regions: Vec<(u64, u64)> = ram_regions(3 * GIB + 512 * MIB)
            .into_iter()
            .map(|(start, len)| (start.0, len))
            .collect();
        let map = e820_map(&memory(&regions));
        assert_eq!(
            map,
            vec![
                ram(0, 0xA_0000),
                legacy_hole(),
                ram(MIB, 3 * GIB - MIB),
                ram(4 * GIB, 512 * MIB),
            ]
        );
    }

    #[test]
    fn adjacent_regions_merge_and_memory_above_1m_has_no_hole_entry() {
        let map = e820_map(&memory(&[(0, 2 * MIB), (2 * MIB, 2 * MIB)]));
        assert_eq!(
            map,
            vec![ram(0, 0xA_0000), legacy_hole(), ram(MIB, 3 * MIB)]
        );

        let map = e820_map(&memory(&[(16 * MIB, MIB)]));
        assert_eq!(map, vec![ram(16 * MIB, MIB)]);
    }
}
