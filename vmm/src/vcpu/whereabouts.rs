//! Where each vCPU thread is, for the error of a pause that timed out: the step of its loop it
//! last reached and, from `/proc`, what the host does with it. A thread that has not reached
//! its park point and is in state `R` was runnable all along and waited for a CPU (an
//! overloaded host); one in `S` or `D` sleeps in the kernel where its wait channel and stack
//! say. Everything read from `/proc` is best effort: the error names what it could not read.

use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

/// The steps of a vCPU thread's life, in order (see `vcpu_thread`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Step {
    /// Spawned; the thread has not run yet.
    NotStarted = 0,
    /// Installing its seccomp filter, before its first look at the run request.
    InstallingSeccomp = 1,
    /// Past its filter's installation (done or failed), waiting to be handed its vCPU.
    WaitingForVcpu = 2,
    /// At its park point: parked, or about to read the run request and park.
    AtParkPoint = 3,
    /// In KVM_RUN or serving one of its exits; a kick gets it to its park point.
    Running = 4,
    /// Its loop ended: stopped, or parked for good after an exit it cannot run past.
    Ended = 5,
}

impl Step {
    fn from_u8(value: u8) -> Step {
        match value {
            1 => Step::InstallingSeccomp,
            2 => Step::WaitingForVcpu,
            3 => Step::AtParkPoint,
            4 => Step::Running,
            5 => Step::Ended,
            _ => Step::NotStarted,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Step::NotStarted => "had not run yet",
            Step::InstallingSeccomp => "was installing its seccomp filter",
            Step::WaitingForVcpu => "was waiting to be handed its vCPU",
            Step::AtParkPoint => "was at its park point",
            Step::Running => "was in KVM_RUN or serving an exit",
            Step::Ended => "had ended its run loop",
        }
    }
}

/// One vCPU thread's step and kernel thread id, written by the thread, read by whoever waits
/// for it to park.
#[derive(Debug, Default)]
pub(super) struct Whereabouts {
    /// The thread's kernel id (0 until it runs).
    tid: AtomicI32,
    step: AtomicU8,
}

impl Whereabouts {
    /// Called first thing on the vCPU thread.
    pub(super) fn started(&self) {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        self.tid.store(tid, Ordering::Relaxed);
        self.reached(Step::InstallingSeccomp);
    }

    pub(super) fn reached(&self, step: Step) {
        self.step.store(step as u8, Ordering::Relaxed);
    }

    /// The step the thread last reached.
    #[cfg(test)]
    pub(super) fn step(&self) -> Step {
        Step::from_u8(self.step.load(Ordering::Relaxed))
    }

    /// The thread's kernel id, once it ran.
    #[cfg(test)]
    pub(super) fn tid(&self) -> Option<i32> {
        Some(self.tid.load(Ordering::Relaxed)).filter(|tid| *tid != 0)
    }

    /// "vCPU `id` <step>, thread <tid> in state <s> ...": one clause for a pause's error.
    pub(super) fn describe(&self, id: u8) -> String {
        let step = Step::from_u8(self.step.load(Ordering::Relaxed));
        let tid = self.tid.load(Ordering::Relaxed);
        if tid == 0 {
            return format!(
                "vCPU {id} {} (its thread was never scheduled)",
                step.describe()
            );
        }
        format!(
            "vCPU {id} {}, thread {tid} {}",
            step.describe(),
            host_view(tid)
        )
    }
}

/// What `/proc` says of thread `tid` of this process: its state, CPU time and where it waits.
fn host_view(tid: i32) -> String {
    let task = format!("/proc/self/task/{tid}");
    let stat = match std::fs::read_to_string(format!("{task}/stat")) {
        Ok(stat) => stat,
        Err(e) => return format!("(its state is unreadable: {e})"),
    };
    let Some(sched) = SchedView::parse(&stat) else {
        return format!("(its state is unparsable: {stat:?})");
    };
    let wchan = std::fs::read_to_string(format!("{task}/wchan")).unwrap_or_default();
    let wchan = match wchan.trim() {
        "" | "0" => String::new(),
        symbol => format!(", waiting in {symbol}"),
    };
    // Root only; the innermost frames say where in the kernel it is.
    let stack = std::fs::read_to_string(format!("{task}/stack"))
        .ok()
        .map(|stack| {
            let frames: Vec<&str> = stack
                .lines()
                .filter_map(|frame| frame.split_whitespace().nth(1))
                .take(4)
                .collect();
            if frames.is_empty() {
                String::new()
            } else {
                format!(", kernel stack {}", frames.join(" < "))
            }
        })
        .unwrap_or_default();
    format!(
        "in state {} ({}), {} ticks of CPU{wchan}{stack}",
        sched.state,
        state_meaning(sched.state),
        sched.ticks
    )
}

/// The fields of `/proc/<pid>/task/<tid>/stat` a stuck pause is explained with.
#[derive(Debug, PartialEq, Eq)]
struct SchedView {
    state: char,
    /// User plus system CPU time, in clock ticks.
    ticks: u64,
}

impl SchedView {
    /// Fields after the command name (which may hold spaces and parentheses: the last `)` ends
    /// it): state first, then utime and stime as the 12th and 13th.
    fn parse(stat: &str) -> Option<SchedView> {
        let (_, after_name) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let state = fields.first()?.chars().next()?;
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some(SchedView {
            state,
            ticks: utime + stime,
        })
    }
}

fn state_meaning(state: char) -> &'static str {
    match state {
        'R' => "runnable: on a CPU or waiting for one",
        'S' => "sleeping in the kernel",
        'D' => "in an uninterruptible wait",
        'T' | 't' => "stopped",
        'Z' | 'X' => "exited",
        _ => "unknown state",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stat_fields_are_read_after_the_command_name() {
        let stat = "4242 (vcpu0 (x) y) R 1 4242 4242 0 -1 4194368 12 0 0 0 7 5 0 0 20 0 3 0 99";
        assert_eq!(
            SchedView::parse(stat),
            Some(SchedView {
                state: 'R',
                ticks: 12
            })
        );
        assert_eq!(SchedView::parse("4242 (vcpu0) R 1"), None);
    }

    #[test]
    fn a_thread_is_described_by_its_step_and_its_host_state() {
        let whereabouts = Whereabouts::default();
        assert_eq!(
            whereabouts.describe(1),
            "vCPU 1 had not run yet (its thread was never scheduled)"
        );
        whereabouts.started();
        whereabouts.reached(Step::Running);
        let described = whereabouts.describe(1);
        // This very thread: running, so in state R.
        assert!(
            described.starts_with("vCPU 1 was in KVM_RUN or serving an exit, thread "),
            "{described}"
        );
        assert!(
            described.contains("in state R (runnable: on a CPU or waiting for one)"),
            "{described}"
        );
    }
}
