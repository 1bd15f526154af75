//! Throughput from the kvstore guest's host-stamped progress lines
//! (`kv ops=<total> tsc=<guest tsc> keys=<N>`), and the "back to service" criterion.
//!
//! Rates come from consecutive lines of one VMM process only: the op count restarts at 0
//! after a cold boot, and the interval across a failure is not throughput.

use std::time::{Duration, Instant};

use crate::serial::TimedLine;

/// One progress line: total operations at a host instant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OpsSample {
    pub at: Instant,
    pub ops: u64,
}

/// Throughput over the interval that ends at `at`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RatePoint {
    pub at: Instant,
    pub ops_per_sec: f64,
}

/// Parses `kv ops=<n> tsc=<t> keys=<N>`; other lines give `None`.
pub fn parse_ops(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("kv ops=")?;
    let digits = rest.split_whitespace().next()?;
    digits.parse().ok()
}

/// The progress samples among `lines`, in order.
pub fn ops_samples(lines: &[TimedLine]) -> Vec<OpsSample> {
    lines
        .iter()
        .filter_map(|line| parse_ops(&line.text).map(|ops| OpsSample { at: line.at, ops }))
        .collect()
}

/// Rates between consecutive samples. An interval whose count went backwards (a reboot in
/// the same stream) or that has no duration is skipped.
pub fn rates(samples: &[OpsSample]) -> Vec<RatePoint> {
    samples
        .windows(2)
        .filter_map(|pair| {
            let seconds = pair[1].at.checked_duration_since(pair[0].at)?.as_secs_f64();
            let ops = pair[1].ops.checked_sub(pair[0].ops)?;
            (seconds > 0.0).then(|| RatePoint {
                at: pair[1].at,
                ops_per_sec: ops as f64 / seconds,
            })
        })
        .collect()
}

/// Mean throughput from the first to the last sample in `samples` (ops over host time).
pub fn mean_rate(samples: &[OpsSample]) -> Option<f64> {
    let first = samples.first()?;
    let last = samples.last()?;
    let seconds = last.at.checked_duration_since(first.at)?.as_secs_f64();
    let ops = last.ops.checked_sub(first.ops)?;
    (seconds > 0.0).then(|| ops as f64 / seconds)
}

/// The samples taken at or after `from`.
pub fn samples_since(samples: &[OpsSample], from: Instant) -> Vec<OpsSample> {
    samples.iter().copied().filter(|s| s.at >= from).collect()
}

/// The samples of the last `window` before the newest one, and at least the last two: a host
/// that starved the guest's thread for longer than the window still yields one interval to
/// measure the level over instead of none.
pub fn level_samples(samples: &[OpsSample], window: Duration) -> Vec<OpsSample> {
    let Some(last) = samples.last() else {
        return Vec::new();
    };
    let in_window = samples_since(samples, last.at - window);
    if in_window.len() >= 2 {
        in_window
    } else {
        samples[samples.len().saturating_sub(2)..].to_vec()
    }
}

/// How long after `start` the first interval ran at >= `fraction` of `level`: the end of that
/// interval, since only then has the host seen the service back at that rate.
pub fn time_to_service(
    rates: &[RatePoint],
    start: Instant,
    level: f64,
    fraction: f64,
) -> Option<Duration> {
    rates
        .iter()
        .find(|point| point.at >= start && point.ops_per_sec >= fraction * level)
        .map(|point| point.at.duration_since(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(base: Instant, ms: u64, text: &str) -> TimedLine {
        TimedLine {
            at: base + Duration::from_millis(ms),
            text: text.to_string(),
        }
    }

    #[test]
    fn the_level_is_the_last_window_or_at_least_the_last_interval() {
        let base = Instant::now();
        let at = |ms: u64, ops: u64| OpsSample {
            at: base + Duration::from_millis(ms),
            ops,
        };
        let steady = [at(0, 0), at(100, 10), at(200, 20), at(300, 30)];
        assert_eq!(
            level_samples(&steady, Duration::from_millis(150)),
            steady[2..].to_vec()
        );
        // Lines further apart than the window (a starved guest thread): the last interval.
        let sparse = [at(0, 0), at(1500, 150), at(3000, 300)];
        assert_eq!(
            level_samples(&sparse, Duration::from_secs(1)),
            sparse[1..].to_vec()
        );
        assert_eq!(level_samples(&sparse[..1], Duration::from_secs(1)).len(), 1);
        assert!(level_samples(&[], Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn parses_progress_lines_only() {
        assert_eq!(
            parse_ops("kv ops=1500000 tsc=123 keys=1000"),
            Some(1_500_000)
        );
        assert_eq!(parse_ops("kvstore: serving"), None);
        assert_eq!(parse_ops("kv ops=12x tsc=1"), None);
        assert_eq!(parse_ops("counter=5 sum=1 ok"), None);
    }

    #[test]
    fn rates_come_from_host_stamps_and_skip_a_reboot() {
        let base = Instant::now();
        let lines = [
            line(base, 0, "kv ops=0 tsc=1 keys=10"),
            line(base, 100, "kv ops=1000 tsc=999999 keys=10"),
            line(base, 300, "kv ops=3000 tsc=5 keys=10"),
            line(base, 400, "kv ops=100 tsc=5 keys=10"),
            line(base, 500, "kv ops=600 tsc=5 keys=10"),
        ];
        let samples = ops_samples(&lines);
        let rates = rates(&samples);
        let values: Vec<f64> = rates.iter().map(|r| r.ops_per_sec.round()).collect();
        assert_eq!(values, [10_000.0, 10_000.0, 5_000.0]);
        assert_eq!(mean_rate(&samples[..3]).map(f64::round), Some(10_000.0));
    }

    #[test]
    fn service_is_back_at_the_end_of_the_first_interval_at_the_level() {
        let base = Instant::now();
        let point = |ms: u64, rate: f64| RatePoint {
            at: base + Duration::from_millis(ms),
            ops_per_sec: rate,
        };
        let rates = [
            point(50, 100.0),
            point(200, 50.0),
            point(300, 89.0),
            point(400, 91.0),
        ];
        let start = base + Duration::from_millis(100);
        assert_eq!(
            time_to_service(&rates, start, 100.0, 0.9),
            Some(Duration::from_millis(300))
        );
        assert_eq!(time_to_service(&rates, start, 200.0, 0.9), None);
    }
}
