//! The process logger: one line per record, to stderr or to `--log-file`, in upstream's shape
//! (`cloud-hypervisor: <time>: <thread> LEVEL:file:line -- message`) with a UTC wall-clock time,
//! so that lines can be matched with the host's other logs after a power failure.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

pub struct Logger {
    /// A `Mutex` so that lines from concurrent threads never interleave.
    output: Mutex<Box<dyn Write + Send>>,
    level: LevelFilter,
}

/// `-v` counts as upstream's: none shows warnings and errors, then info, debug, trace.
pub fn level_for_verbosity(count: u8) -> LevelFilter {
    match count {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

impl Logger {
    /// Installs the process logger. `log_file`: already opened by the caller, which reports its
    /// own error naming `--log-file`.
    pub fn install(log_file: Option<File>, level: LevelFilter) -> Result<(), log::SetLoggerError> {
        let output: Box<dyn Write + Send> = match log_file {
            Some(file) => Box::new(file),
            None => Box::new(std::io::stderr()),
        };
        log::set_boxed_logger(Box::new(Logger {
            output: Mutex::new(output),
            level,
        }))?;
        log::set_max_level(level);
        Ok(())
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let thread = std::thread::current();
        let line = format!(
            "cloud-hypervisor: {}: <{}> {}:{}:{} -- {}\n",
            utc_timestamp(SystemTime::now()),
            thread.name().unwrap_or("?"),
            record.level(),
            record.file().unwrap_or("?"),
            record.line().unwrap_or(0),
            record.args()
        );
        // A poisoned lock only means another thread panicked mid-line; keep logging.
        let mut output = self
            .output
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        // Nowhere to report a failing log write; the VM must not stop for it.
        let _ = output.write_all(line.as_bytes());
    }

    fn flush(&self) {
        let mut output = self
            .output
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let _ = output.flush();
    }
}

/// `YYYY-MM-DDTHH:MM:SS.uuuuuuZ`, computed here to avoid a date crate for one format.
fn utc_timestamp(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (year, month, day) = civil_date(seconds / 86_400);
    let second_of_day = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        since_epoch.subsec_micros()
    )
}

/// Gregorian (year, month, day) of a day count since 1970-01-01, by whole 400-year eras (146097
/// days each) counted from 0000-03-01, so that the leap day falls at the end of a year.
fn civil_date(days_since_epoch: u64) -> (u64, u64, u64) {
    const DAYS_PER_ERA: u64 = 146_097;
    // 1970-01-01 is day 719468 counted from 0000-03-01.
    let days = days_since_epoch + 719_468;
    let era = days / DAYS_PER_ERA;
    let day_of_era = days % DAYS_PER_ERA;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_utc_dates() {
        let at = |seconds: u64, micros: u64| {
            utc_timestamp(UNIX_EPOCH + Duration::from_secs(seconds) + Duration::from_micros(micros))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29 (a leap day in a century leap year) 12:34:56.
        assert_eq!(at(951_827_696, 7), "2000-02-29T12:34:56.000007Z");
        // 2026-11-25 01:02:03.
        assert_eq!(at(1_795_568_523, 999_999), "2026-11-25T01:02:03.999999Z");
        // 2100-03-01: 2100 is not a leap year.
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
    }

    #[test]
    fn verbosity_levels() {
        assert_eq!(level_for_verbosity(0), LevelFilter::Warn);
        assert_eq!(level_for_verbosity(1), LevelFilter::Info);
        assert_eq!(level_for_verbosity(2), LevelFilter::Debug);
        assert_eq!(level_for_verbosity(9), LevelFilter::Trace);
    }
}
