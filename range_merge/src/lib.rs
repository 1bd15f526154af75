//! (start, length) ranges, in any order and overlapping, made ascending and disjoint: the runs
//! that one call each can cover. `nv-extension` persists an epoch's pages in such runs
//! (`Persistence::persist_ranges`), the VMM write-protects again what a checkpoint's epoch
//! lifted (`userfaultfd`); neither crate knows the other's use, so the merge lives here.

use std::ops::{Add, Sub};

/// `ranges` ((start, length), any order, overlaps and repeats allowed) as ascending, disjoint
/// ranges covering the same addresses; ranges that overlap, touch or lie at most `gap` apart
/// become one (which then also covers the gap between them).
pub fn merge_ranges<T>(mut ranges: Vec<(T, T)>, gap: T) -> Vec<(T, T)>
where
    T: Copy + Ord + Add<Output = T> + Sub<Output = T>,
{
    ranges.sort_unstable();
    let mut merged: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, length) in ranges {
        match merged.last_mut() {
            Some((first, covered)) if *first + *covered + gap >= start => {
                *covered = (*covered).max(start + length - *first);
            }
            _ => merged.push((start, length)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_touching_and_contained_ranges_become_one() {
        let ranges: Vec<(u64, u64)> = vec![(40, 10), (10, 5), (15, 5), (12, 2), (45, 20), (100, 1)];
        assert_eq!(
            merge_ranges(ranges, 0),
            [(10, 10), (40, 25), (100, 1)],
            "10..15 touches 15..20 and holds 12..14; 40..50 overlaps 45..65"
        );
    }

    #[test]
    fn ranges_at_most_the_gap_apart_become_one() {
        let ranges: Vec<(usize, usize)> = vec![(20, 4), (0, 4), (10, 4)];
        assert_eq!(merge_ranges(ranges.clone(), 5), [(0, 4), (10, 4), (20, 4)]);
        assert_eq!(merge_ranges(ranges.clone(), 6), [(0, 24)]);
        assert_eq!(merge_ranges(ranges, 0), [(0, 4), (10, 4), (20, 4)]);
    }

    #[test]
    fn nothing_and_one_range_stay_as_they_are() {
        assert!(merge_ranges(Vec::<(u64, u64)>::new(), 7).is_empty());
        assert_eq!(merge_ranges(vec![(3u64, 9u64)], 0), [(3, 9)]);
        assert_eq!(merge_ranges(vec![(3u64, 9u64), (3, 9)], 0), [(3, 9)]);
    }
}
