//! The process logger: one line per record, to stderr or to `--log-file`, in upstream's shape
//! (`cloud-hypervisor: <time>: <thread> LEVEL:file:line -- message`) with a UTC wall-clock time,
//! so that lines can be matched with the host's other logs after a power failure.

use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Where the lines go.
enum Output {
    /// Until the command line has said where and how much to log: every line, with its level,
    /// kept in order (threads started before the parse, e.g. the recovery's `vm-create`, log
    /// too).
    Buffered(Vec<(Level, String)>),
    /// stderr or `--log-file`, lines up to `level`.
    Writing {
        output: Box<dyn Write + Send>,
        level: LevelFilter,
    },
}

pub struct Logger {
    /// A `Mutex` so that lines from concurrent threads never interleave.
    output: Mutex<Output>,
}

/// The process logger ([`install_buffering`], then [`configure`]).
static LOGGER: Logger = Logger::buffering();

/// `-v` counts as upstream's: none shows warnings and errors, then info, debug, trace.
pub fn level_for_verbosity(count: u8) -> LevelFilter {
    match count {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Installs the process logger, keeping every line until [`configure`]. Call it first thing in
/// `main`, before any thread starts.
pub fn install_buffering() -> Result<(), log::SetLoggerError> {
    log::set_logger(&LOGGER)?;
    log::set_max_level(LevelFilter::Trace);
    Ok(())
}

/// Sends the lines to `log_file` (already opened by the caller, which reports its own error
/// naming `--log-file`) or stderr from now on, up to `level`; the lines kept until now are
/// written first, those up to `level`.
pub fn configure(log_file: Option<File>, level: LevelFilter) {
    let output: Box<dyn Write + Send> = match log_file {
        Some(file) => Box::new(file),
        None => Box::new(std::io::stderr()),
    };
    LOGGER.write_to(output, level);
    log::set_max_level(level);
}

impl Logger {
    const fn buffering() -> Logger {
        Logger {
            output: Mutex::new(Output::Buffered(Vec::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Output> {
        // A poisoned lock only means another thread panicked mid-line; keep logging.
        self.output
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Ends the buffering: the kept lines up to `level` go to `output`, then every new one.
    fn write_to(&self, mut output: Box<dyn Write + Send>, level: LevelFilter) {
        let mut current = self.lock();
        if let Output::Buffered(lines) = &*current {
            for (line_level, line) in lines {
                if *line_level <= level {
                    let _ = output.write_all(line.as_bytes());
                }
            }
        }
        *current = Output::Writing { output, level };
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        match &*self.lock() {
            Output::Buffered(_) => true,
            Output::Writing { level, .. } => metadata.level() <= *level,
        }
    }

    fn log(&self, record: &Record) {
        // The level is checked under the lock below, with the line's output: `log::max_level`
        // (what the macros check first) is that level once configured.
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
        match &mut *self.lock() {
            Output::Buffered(lines) => lines.push((record.level(), line)),
            // Nowhere to report a failing log write; the VM must not stop for it.
            Output::Writing { output, level } if record.level() <= *level => {
                let _ = output.write_all(line.as_bytes());
            }
            Output::Writing { .. } => {}
        }
    }

    fn flush(&self) {
        if let Output::Writing { output, .. } = &mut *self.lock() {
            let _ = output.flush();
        }
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

    /// A `Write` whose bytes the test can read.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn messages(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(|line| line.rsplit(" -- ").next().unwrap().to_owned())
                .collect()
        }
    }

    fn log(logger: &Logger, level: Level, message: &str) {
        logger.log(
            &Record::builder()
                .level(level)
                .args(format_args!("{message}"))
                .build(),
        );
    }

    #[test]
    fn lines_logged_before_the_configuration_are_kept_up_to_its_level_and_in_order() {
        let logger = Logger::buffering();
        log(&logger, Level::Info, "starting");
        log(&logger, Level::Debug, "opened the region ahead");
        log(&logger, Level::Warn, "something ahead");
        let captured = Captured::default();
        logger.write_to(Box::new(captured.clone()), LevelFilter::Info);
        log(&logger, Level::Debug, "not shown at info");
        log(&logger, Level::Info, "after");
        assert_eq!(
            captured.messages(),
            ["starting", "something ahead", "after"]
        );

        let logger = Logger::buffering();
        log(&logger, Level::Trace, "kept for -vvv");
        let captured = Captured::default();
        logger.write_to(Box::new(captured.clone()), LevelFilter::Trace);
        assert_eq!(captured.messages(), ["kept for -vvv"]);
    }

    #[test]
    fn verbosity_levels() {
        assert_eq!(level_for_verbosity(0), LevelFilter::Warn);
        assert_eq!(level_for_verbosity(1), LevelFilter::Info);
        assert_eq!(level_for_verbosity(2), LevelFilter::Debug);
        assert_eq!(level_for_verbosity(9), LevelFilter::Trace);
    }
}
