//! Real-time priority for the power-fail save: once the host says its power is failing, the
//! save is the most important work on it.
//!
//! The save must first stop every vCPU: it kicks each vCPU thread and waits until all are
//! parked. A vCPU thread that a busy host has preempted sees its kick only when the scheduler
//! runs it again, which with many busy threads per core (16 VMs of one region spinning on 2
//! cores) is several time slices later: the pause then dominates the save. So on `SIGPWR` the
//! control loop runs at `SCHED_FIFO` [`CONTROL_PRIORITY`], and each vCPU thread, once its kick
//! is sent (never before: a guest spinning at real-time priority would keep the other VMMs'
//! control loops off the core), at [`VCPU_PRIORITY`]: it runs at once, leaves `KVM_RUN` on the
//! pending kick and parks. Nothing runs at that priority for longer than that: the save follows
//! and the process exits; a save that fails gives every thread its normal policy back.
//!
//! Without `CAP_SYS_NICE` (or an `RLIMIT_RTPRIO` that allows it) the requests fail with `EPERM`
//! and the save runs as before.

use std::os::unix::thread::JoinHandleExt;
use std::thread::JoinHandle;

/// The control loop's priority during a power-fail save.
pub const CONTROL_PRIORITY: libc::c_int = 2;
/// A kicked vCPU thread's priority: below the control loops of every VMM saving at the same
/// time, so that none of them waits for a vCPU.
pub const VCPU_PRIORITY: libc::c_int = 1;

/// Sets `thread`'s policy: `SCHED_FIFO` at `priority`, or `SCHED_OTHER` for `None`. Returns
/// the error number on failure. The helper that takes the VM's teardown inherits the control
/// loop's policy and drops it itself once it has closed its descriptors (`detached_teardown`).
fn set_policy(thread: libc::pthread_t, priority: Option<libc::c_int>) -> Result<(), i32> {
    let (policy, priority) = match priority {
        Some(priority) => (libc::SCHED_FIFO, priority),
        None => (libc::SCHED_OTHER, 0),
    };
    let parameters = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `thread` is a live thread of this process (the caller's own, or one whose
    // JoinHandle the caller holds); `parameters` is valid for the call.
    match unsafe { libc::pthread_setschedparam(thread, policy, &parameters) } {
        0 => Ok(()),
        errno => Err(errno),
    }
}

/// Raises the calling thread (the control loop) for a power-fail save. Returns whether it was
/// raised (so [`lower_control_loop`] is due if the save fails).
pub fn raise_control_loop() -> bool {
    // SAFETY: pthread_self has no preconditions.
    match set_policy(unsafe { libc::pthread_self() }, Some(CONTROL_PRIORITY)) {
        Ok(()) => true,
        Err(errno) => {
            log::debug!(
                "power-fail save at normal priority (SCHED_FIFO refused: {})",
                std::io::Error::from_raw_os_error(errno)
            );
            false
        }
    }
}

/// Gives the calling thread its normal policy back.
pub fn lower_control_loop() {
    // SAFETY: pthread_self has no preconditions.
    if let Err(errno) = set_policy(unsafe { libc::pthread_self() }, None) {
        log::warn!(
            "the control loop stays at real-time priority: {}",
            std::io::Error::from_raw_os_error(errno)
        );
    }
}

/// Raises (`true`) or lowers (`false`) the vCPU threads of `threads`.
pub fn set_vcpu_threads(threads: &[JoinHandle<()>], raised: bool) {
    for thread in threads {
        if thread.is_finished() {
            continue;
        }
        let priority = raised.then_some(VCPU_PRIORITY);
        if let Err(errno) = set_policy(thread.as_pthread_t(), priority) {
            log::debug!(
                "{:?}: scheduling policy unchanged: {}",
                thread.thread().name(),
                std::io::Error::from_raw_os_error(errno)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_of(thread: libc::pthread_t) -> (libc::c_int, libc::c_int) {
        let mut policy = 0;
        let mut parameters = libc::sched_param { sched_priority: 0 };
        // SAFETY: a live thread of this process; out-parameters valid.
        assert_eq!(
            unsafe { libc::pthread_getschedparam(thread, &mut policy, &mut parameters) },
            0
        );
        (policy, parameters.sched_priority)
    }

    #[test]
    fn raised_threads_run_fifo_and_get_their_normal_policy_back() {
        let (stop, parked) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            let _ = parked.recv();
        });
        let threads = [worker];
        let raised = std::thread::spawn(move || {
            if !raise_control_loop() {
                return None;
            }
            // SAFETY: pthread_self has no preconditions.
            let during = policy_of(unsafe { libc::pthread_self() });
            lower_control_loop();
            // SAFETY: as above.
            Some((during, policy_of(unsafe { libc::pthread_self() })))
        })
        .join()
        .unwrap();
        let Some((during, after)) = raised else {
            // Not permitted here (no CAP_SYS_NICE): nothing may have changed.
            set_vcpu_threads(&threads, true);
            assert_eq!(policy_of(threads[0].as_pthread_t()).0, libc::SCHED_OTHER);
            let _ = stop.send(());
            return;
        };
        assert_eq!(during, (libc::SCHED_FIFO, CONTROL_PRIORITY));
        assert_eq!(after, (libc::SCHED_OTHER, 0));
        set_vcpu_threads(&threads, true);
        assert_eq!(
            policy_of(threads[0].as_pthread_t()),
            (libc::SCHED_FIFO, VCPU_PRIORITY)
        );
        set_vcpu_threads(&threads, false);
        assert_eq!(policy_of(threads[0].as_pthread_t()), (libc::SCHED_OTHER, 0));
        let _ = stop.send(());
        let [worker] = threads;
        worker.join().unwrap();
    }
}
