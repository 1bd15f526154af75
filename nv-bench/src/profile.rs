//! Sizes, durations and repetitions of a run: the full run (`all`, by hand, under 20 minutes
//! on a 2-core machine) and the reduced one (`--quick`, in the test suite).

use std::time::Duration;

/// One run's parameters.
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: &'static str,
    /// A/B: guest RAM sizes whose memory the guest has touched before the save.
    pub ram_sizes: Vec<u64>,
    /// A/B: power-fail + recovery cycles per size and region kind.
    pub power_fail_cycles: usize,
    /// B: copy snapshot + restore cycles per size.
    pub copy_restore_cycles: usize,
    /// C: key counts.
    pub service_keys: Vec<u64>,
    /// C: load before the power failure (the log grows by ~3 bytes an operation meanwhile).
    pub service_load: Duration,
    /// C: failures per method and key count (interleaved across methods).
    pub service_repetitions: usize,
    /// C: the pre-failure level is the mean rate over this much time before the failure.
    pub level_window: Duration,
    /// C: how long the curve is followed after service is back.
    pub service_tail: Duration,
    /// D: key counts.
    pub overhead_keys: Vec<u64>,
    /// D: repetitions per backing (interleaved, so drift hits both alike).
    pub overhead_repetitions: usize,
    /// D: time after `serving` before the measured window.
    pub overhead_warmup: Duration,
    /// D: the measured window.
    pub overhead_window: Duration,
    /// G: power failures of the 16-VM region with the guests running (each VM recovers in place
    /// between two), then one with them paused. 0: G is not run (the quick run: see
    /// `measure::region_power_fail`).
    pub region_cycles: usize,
    /// A-floor: interleaved repetitions of the floor and of an NV recovery + power-fail exit.
    pub floor_repetitions: usize,
    /// B at any size (issue 15): RAM sizes of the sparse-region recoveries.
    pub flat_ram_sizes: Vec<u64>,
    /// B at any size: power failures and recoveries per size. More than A/B's: one slow
    /// recovery in three (a kernel allocation stall) moved the median of three.
    pub flat_cycles: usize,
    /// First touch on huge vs 4 KiB pages: repetitions per backing and size (0: not run).
    pub first_touch_repetitions: usize,
    /// First touch: kvstore table sizes, ascending; the first is the boot without the table
    /// that each larger one's time is taken over.
    pub first_touch_tables: Vec<u64>,
    /// D with spread: key count and repetitions per backing (0: not run).
    pub full_speed_keys: u64,
    pub full_speed_repetitions: usize,
    /// Checkpoints: key counts (the D key counts unless `--checkpoint-keys` names others).
    pub checkpoint_keys: Vec<u64>,
    /// Checkpoints: `checkpoint_ms` of each variant, in order; 0 is off, the baseline.
    pub checkpoint_intervals_ms: Vec<u64>,
    /// Checkpoints: run nv-track's tracking floor after the VMs (not when
    /// `--checkpoint-ms` picks intervals: a short comparison of the pause).
    pub checkpoint_tracking_floor: bool,
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

impl Profile {
    /// The sizes issue 6 names: 256 MiB / 1 GiB / 4 GiB of touched RAM, 1M and 4M keys.
    pub fn full() -> Self {
        Self {
            name: "all",
            ram_sizes: vec![256 * MIB, GIB, 4 * GIB],
            power_fail_cycles: 3,
            copy_restore_cycles: 3,
            service_keys: vec![1_000_000, 4_000_000],
            service_load: Duration::from_secs(12),
            service_repetitions: 3,
            level_window: Duration::from_secs(3),
            service_tail: Duration::from_secs(2),
            overhead_keys: vec![1_000_000, 4_000_000],
            overhead_repetitions: 3,
            overhead_warmup: Duration::from_secs(1),
            overhead_window: Duration::from_secs(6),
            region_cycles: 3,
            floor_repetitions: 15,
            flat_ram_sizes: vec![256 * MIB, GIB, 4 * GIB, 16 * GIB, 64 * GIB],
            flat_cycles: 5,
            first_touch_repetitions: 3,
            first_touch_tables: vec![2 * MIB, 256 * MIB, GIB],
            full_speed_keys: 1_000_000,
            full_speed_repetitions: 7,
            checkpoint_keys: vec![1_000_000, 4_000_000],
            checkpoint_intervals_ms: DEFAULT_CHECKPOINT_INTERVALS_MS.to_vec(),
            checkpoint_tracking_floor: true,
        }
    }

    /// Small enough for the test suite: one small size, short windows, single repetitions.
    pub fn quick() -> Self {
        Self {
            name: "quick",
            ram_sizes: vec![128 * MIB],
            power_fail_cycles: 2,
            copy_restore_cycles: 1,
            service_keys: vec![100_000],
            service_load: Duration::from_secs(2),
            service_repetitions: 1,
            level_window: Duration::from_secs(1),
            service_tail: Duration::from_millis(500),
            overhead_keys: vec![100_000],
            overhead_repetitions: 1,
            overhead_warmup: Duration::from_millis(300),
            overhead_window: Duration::from_secs(1),
            region_cycles: 0,
            floor_repetitions: 3,
            flat_ram_sizes: vec![128 * MIB, 16 * GIB],
            flat_cycles: 2,
            // One repetition of first touch and of D with spread: every line of issue 15's
            // section is printed (and checked by the quick test), at sizes that take seconds.
            first_touch_repetitions: 1,
            first_touch_tables: vec![2 * MIB, 32 * MIB],
            full_speed_keys: 100_000,
            full_speed_repetitions: 1,
            checkpoint_keys: vec![100_000],
            checkpoint_intervals_ms: DEFAULT_CHECKPOINT_INTERVALS_MS.to_vec(),
            checkpoint_tracking_floor: true,
        }
    }

    /// `--checkpoint-keys` and `--checkpoint-ms`: only these key counts and intervals (each
    /// list left empty keeps the profile's). Naming intervals skips the tracking floor.
    pub fn select_checkpoints(&mut self, keys: &[u64], intervals_ms: &[u64]) {
        if !keys.is_empty() {
            self.checkpoint_keys = keys.to_vec();
        }
        if !intervals_ms.is_empty() {
            self.checkpoint_intervals_ms = intervals_ms.to_vec();
            self.checkpoint_tracking_floor = false;
        }
    }
}

/// `checkpoint_ms` of the checkpoint section's variants; 0 is off, the baseline.
const DEFAULT_CHECKPOINT_INTERVALS_MS: [u64; 4] = [0, 100, 10, 1];

/// `256 MiB`, `4 GiB`.
pub fn size_label(bytes: u64) -> String {
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

/// `1M`, `100k`, `4M` keys.
pub fn keys_label(keys: u64) -> String {
    if keys >= 1_000_000 && keys.is_multiple_of(1_000_000) {
        format!("{}M", keys / 1_000_000)
    } else if keys >= 1_000 && keys.is_multiple_of(1_000) {
        format!("{}k", keys / 1_000)
    } else {
        keys.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(size_label(256 * MIB), "256 MiB");
        assert_eq!(size_label(4 * GIB), "4 GiB");
        assert_eq!(keys_label(4_000_000), "4M");
        assert_eq!(keys_label(100_000), "100k");
        assert_eq!(keys_label(1234), "1234");
    }

    /// Issue 15 names B at 256 MiB up to 64 GiB and first touch of 256 MiB and 1 GiB; the quick
    /// run prints each of the section's lines at smaller sizes (the quick test checks them), so
    /// none of its parts may be switched off there.
    #[test]
    fn the_runs_measure_every_part_of_issue_15() {
        let full = Profile::full();
        assert_eq!(full.flat_ram_sizes.first(), Some(&(256 * MIB)));
        assert_eq!(full.flat_ram_sizes.last(), Some(&(64 * GIB)));
        assert_eq!(full.first_touch_tables, [2 * MIB, 256 * MIB, GIB]);
        for profile in [full, Profile::quick()] {
            assert!(profile.flat_ram_sizes.len() >= 2, "{profile:?}");
            assert!(profile.flat_cycles > 0, "{profile:?}");
            assert!(profile.floor_repetitions > 0, "{profile:?}");
            assert!(profile.first_touch_repetitions > 0, "{profile:?}");
            assert!(profile.first_touch_tables.len() >= 2, "{profile:?}");
            assert!(profile.first_touch_tables.is_sorted(), "{profile:?}");
            assert!(profile.full_speed_repetitions > 0, "{profile:?}");
        }
    }

    #[test]
    fn checkpoint_selection_narrows_the_section_and_skips_the_floor_only_for_intervals() {
        let mut profile = Profile::full();
        profile.select_checkpoints(&[], &[]);
        assert_eq!(profile.checkpoint_keys, [1_000_000, 4_000_000]);
        assert_eq!(profile.checkpoint_intervals_ms, [0, 100, 10, 1]);
        assert!(profile.checkpoint_tracking_floor);
        profile.select_checkpoints(&[1_000_000], &[]);
        assert_eq!(profile.checkpoint_keys, [1_000_000]);
        assert!(profile.checkpoint_tracking_floor);
        profile.select_checkpoints(&[], &[10]);
        assert_eq!(profile.checkpoint_intervals_ms, [10]);
        assert!(!profile.checkpoint_tracking_floor);
    }
}
