//! Where the time of an NV in-place recovery goes, phase by phase, from the `exec` of the VMM
//! to the guest running again. `-v` logs the breakdown and `vm.nv-status` reports it
//! (`recovery`), so an operator sees which step a slow recovery spent its time in.
//!
//! The process's own start (fork/exec, the dynamic loader, the Rust runtime) happens before
//! any code of ours runs: the binary calls [`note_main_entered`] first thing in `main`, which
//! reads the scheduler's account of the thread so far (`/proc/thread-self/schedstat`: time on a
//! CPU plus time waiting for one since the task was created, i.e. since the fork that became
//! this process). Time the task slept is not in it; before `main` nothing sleeps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// When `main` began, and how long the process had existed by then.
#[derive(Clone, Copy, Debug)]
struct MainEntered {
    at: Instant,
    since_fork: Option<Duration>,
}

static MAIN_ENTERED: OnceLock<MainEntered> = OnceLock::new();
/// Set once the control loop serves: a VM started after that (over the API) did not start
/// with the process, so its phases leave the process start out.
static SERVING: AtomicBool = AtomicBool::new(false);

/// Records that `main` runs now. Call it first thing in `main`; later calls are ignored.
pub fn note_main_entered() {
    let _ = MAIN_ENTERED.set(MainEntered {
        at: Instant::now(),
        since_fork: thread_age_from_schedstat(),
    });
}

/// Records that the VMM serves requests: VMs started from now on are not part of its start.
pub fn note_serving() {
    SERVING.store(true, Ordering::Relaxed);
}

/// The calling thread's run time plus run-queue wait time, from `/proc/thread-self/schedstat`
/// ("<on-cpu ns> <waiting ns> <timeslices>").
fn thread_age_from_schedstat() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    parse_schedstat(&text)
}

fn parse_schedstat(text: &str) -> Option<Duration> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    let running = fields.next()??;
    let waiting = fields.next()??;
    Some(Duration::from_nanos(running.saturating_add(waiting)))
}

/// Consecutive named phases: each [`PhaseClock::mark`] closes the phase that ran since the
/// previous mark.
#[derive(Clone, Debug)]
pub struct PhaseClock {
    /// The process's age when the first phase began, if the clock starts with the process.
    process_age: Option<Duration>,
    last: Instant,
    phases: Vec<(&'static str, Duration)>,
}

impl PhaseClock {
    /// A clock from now on: a VM started after the process was up.
    pub fn new() -> PhaseClock {
        PhaseClock {
            process_age: None,
            last: Instant::now(),
            phases: Vec::new(),
        }
    }

    /// A clock for a VM the process starts as it comes up: its first phases are the process
    /// start (`process-start`, fork/exec to `main`) and `vmm-init` (`main` to now: the command
    /// line, the logger, the event monitor, signal handlers). Outside that (the control loop
    /// serves already, or `main` did not note its start) it is [`PhaseClock::new`].
    pub fn since_process_start() -> PhaseClock {
        let Some(main) = MAIN_ENTERED.get().copied() else {
            return PhaseClock::new();
        };
        if SERVING.load(Ordering::Relaxed) {
            return PhaseClock::new();
        }
        let mut clock = PhaseClock {
            process_age: main.since_fork,
            last: main.at,
            phases: Vec::new(),
        };
        if let Some(before_main) = main.since_fork {
            clock.phases.push(("process-start", before_main));
        }
        clock.mark("vmm-init");
        clock
    }

    /// Closes the phase `name` that ran since the previous mark.
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.phases
            .push((name, now.saturating_duration_since(self.last)));
        self.last = now;
    }

    /// When the last phase ended.
    pub fn last_mark(&self) -> Instant {
        self.last
    }

    pub fn phases(&self) -> &[(&'static str, Duration)] {
        &self.phases
    }

    /// The sum of the phases: from the `exec` (if the clock started with the process) or from
    /// the clock's start, to the last mark.
    pub fn total(&self) -> Duration {
        self.phases.iter().map(|(_, took)| *took).sum()
    }

    /// Whether the first phase is the process's own start, i.e. [`PhaseClock::total`] runs from
    /// the fork/exec.
    pub fn from_process_start(&self) -> bool {
        self.process_age.is_some()
    }

    /// `process-start 812 us, vmm-init 301 us, ...`
    pub fn describe(&self) -> String {
        self.phases
            .iter()
            .map(|(name, took)| format!("{name} {} us", took.as_micros()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Default for PhaseClock {
    fn default() -> Self {
        PhaseClock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_is_run_plus_wait_time() {
        assert_eq!(
            parse_schedstat("1500000 250000 7\n"),
            Some(Duration::from_nanos(1_750_000))
        );
        assert_eq!(parse_schedstat("garbage"), None);
        assert_eq!(parse_schedstat(""), None);
        // The file exists and parses here. Its run time is not asserted above zero: a test
        // thread just started on a loaded host may not have been charged any yet (seen once).
        assert!(thread_age_from_schedstat().is_some());
    }

    #[test]
    fn marks_close_consecutive_phases_that_sum_to_the_total() {
        let mut clock = PhaseClock::new();
        std::thread::sleep(Duration::from_millis(2));
        clock.mark("first");
        clock.mark("second");
        let names: Vec<&str> = clock.phases().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["first", "second"]);
        assert!(clock.phases()[0].1 >= Duration::from_millis(2));
        assert_eq!(clock.total(), clock.phases()[0].1 + clock.phases()[1].1);
        assert!(!clock.from_process_start());
        assert!(
            clock.describe().starts_with("first "),
            "{}",
            clock.describe()
        );
    }
}
