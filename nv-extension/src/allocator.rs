//! Extent allocation for guest memory and state areas.
//!
//! The allocator keeps no state of its own: the VM table is the only record
//! of what is in use, so an allocation becomes real exactly when the table
//! update that names it commits, and a crash can never leak or double-book an
//! extent.

use crate::vm_table::{Extent, VmTable};

/// Rounds `value` up to a multiple of `align` (a power of two); `None` on overflow.
pub fn align_up(value: u64, align: u64) -> Option<u64> {
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// Extents in use, sorted by offset.
fn used_extents(table: &VmTable) -> Vec<Extent> {
    let mut used: Vec<Extent> = table
        .entries
        .iter()
        .flat_map(|e| [e.memory, e.state, e.checkpoint])
        .filter(|x| x.len > 0)
        .collect();
    used.sort_by_key(|x| x.offset);
    used
}

/// Free gaps of `[data_start, region_size)` at `align` granularity.
fn free_extents(table: &VmTable, data_start: u64, region_size: u64, align: u64) -> Vec<Extent> {
    let mut free = Vec::new();
    let mut cursor = data_start;
    for used in used_extents(table) {
        if used.offset > cursor {
            free.push(Extent {
                offset: cursor,
                len: used.offset - cursor,
            });
        }
        cursor = cursor.max(align_up(used.end(), align).unwrap_or(u64::MAX));
    }
    if region_size > cursor {
        free.push(Extent {
            offset: cursor,
            len: region_size - cursor,
        });
    }
    free
}

/// First-fit placement of extents of the given lengths (each a multiple of `align`).
///
/// Returns the offsets and the region size needed to hold them: equal to
/// `region_size` if they fit, larger if the region has to grow at its end.
pub fn place(
    table: &VmTable,
    data_start: u64,
    region_size: u64,
    align: u64,
    lengths: &[u64],
) -> Option<(Vec<u64>, u64)> {
    let mut free = free_extents(table, data_start, region_size, align);
    let mut tail = free
        .last()
        .filter(|x| x.end() == region_size)
        .map_or(region_size.max(data_start), |x| x.offset);
    let mut offsets = Vec::with_capacity(lengths.len());
    let mut needed = region_size;
    for &len in lengths {
        if let Some(gap) = free.iter_mut().find(|x| x.len >= len) {
            offsets.push(gap.offset);
            if gap.end() == region_size && gap.offset == tail {
                tail += len;
            }
            gap.offset += len;
            gap.len -= len;
        } else {
            // Grow: place after everything, including extents placed in this call.
            let start = tail;
            offsets.push(start);
            tail = start.checked_add(len)?;
            needed = needed.max(tail);
            free.retain(|x| x.end() != region_size);
        }
    }
    Some((offsets, needed))
}

/// How much of a region is free, inside its current size.
///
/// Guest RAM is one extent (the VMM maps it with one `mmap`), so a VM fits only if the largest
/// free extent holds its RAM: `free_bytes` can exceed a request that still does not fit once VMs
/// of mixed sizes have come and gone. A region that can grow (a plain file) grows at its end
/// instead of failing; these numbers do not count that.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreeSpace {
    /// Sum of every free extent.
    pub free_bytes: u64,
    /// The largest single free extent.
    pub largest_free_extent: u64,
}

/// Free space of `[data_start, region_size)` at `align` granularity.
pub fn free_space(table: &VmTable, data_start: u64, region_size: u64, align: u64) -> FreeSpace {
    let free = free_extents(table, data_start, region_size, align);
    FreeSpace {
        free_bytes: free.iter().map(|x| x.len).sum(),
        largest_free_extent: free.iter().map(|x| x.len).max().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{OwnerRecord, Uuid};
    use crate::vm_table::{RunRecord, VmEntry};

    const A: u64 = 4096;

    fn vm(name: &str, memory: (u64, u64), state: (u64, u64)) -> VmEntry {
        VmEntry {
            name: name.into(),
            uuid: Uuid::default(),
            memory_size: memory.1,
            memory: Extent {
                offset: memory.0,
                len: memory.1,
            },
            state: Extent {
                offset: state.0,
                len: state.1,
            },
            checkpoint: Extent { offset: 0, len: 0 },
            record: RunRecord::Created,
            owner: OwnerRecord::default(),
            config: vec![],
            swap: None,
        }
    }

    #[test]
    fn fills_gaps_first_then_grows_at_the_end() {
        let table = VmTable {
            generation: 1,
            entries: vec![vm("a", (A, A), (4 * A, A))],
        };
        // Free: [2A, 4A) and [5A, 8A).
        let (offsets, size) = place(&table, A, 8 * A, A, &[2 * A, A]).unwrap();
        assert_eq!(offsets, vec![2 * A, 5 * A]);
        assert_eq!(size, 8 * A);
        let (offsets, size) = place(&table, A, 8 * A, A, &[4 * A, A]).unwrap();
        assert_eq!(
            offsets,
            vec![5 * A, 2 * A],
            "4A does not fit the tail gap of 3A"
        );
        assert_eq!(size, 9 * A);
        assert_eq!(
            free_space(&table, A, 8 * A, A),
            FreeSpace {
                free_bytes: 5 * A,
                largest_free_extent: 3 * A
            }
        );
    }

    #[test]
    fn empty_region_grows_from_data_start() {
        let table = VmTable::default();
        let (offsets, size) = place(&table, 2 * A, 2 * A, A, &[3 * A, A]).unwrap();
        assert_eq!(offsets, vec![2 * A, 5 * A]);
        assert_eq!(size, 6 * A);
    }

    #[test]
    fn placements_never_overlap_used_extents() {
        let table = VmTable {
            generation: 1,
            entries: vec![
                vm("a", (2 * A, 3 * A), (7 * A, A)),
                vm("b", (10 * A, A), (12 * A, 2 * A)),
            ],
        };
        for len in 1..6 {
            let (offsets, size) = place(&table, A, 16 * A, A, &[len * A, A]).unwrap();
            let mut all: Vec<(u64, u64)> = table
                .entries
                .iter()
                .flat_map(|e| {
                    [
                        (e.memory.offset, e.memory.end()),
                        (e.state.offset, e.state.end()),
                    ]
                })
                .collect();
            all.push((offsets[0], offsets[0] + len * A));
            all.push((offsets[1], offsets[1] + A));
            all.sort();
            for pair in all.windows(2) {
                assert!(pair[0].1 <= pair[1].0, "overlap {pair:?} for len {len}");
            }
            assert!(all.last().unwrap().1 <= size);
        }
    }
}
