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

/// Raises every other thread of this process to real-time priority ([`VCPU_PRIORITY`]), for an
/// exit that follows a committed save. Call it from the (raised) control loop just before the
/// process exits.
///
/// A process is gone only when every member of its thread group has run its exit, and each
/// needs a turn on a core for that. That includes a thread the VMM did not start: KVM adds a
/// worker of its own to the process at a VM's first `KVM_RUN` (`kvm-nx-lpage-recovery`, a
/// thread of the group at normal priority). On a busy host it waited up to 26 ms for a core
/// after the VMM's own threads had exited, and the process with it. Raised, it runs at once.
/// Nothing runs at this priority for long: the process exits next. Returns how many threads
/// were raised.
pub fn raise_other_threads_for_exit() -> usize {
    // SAFETY: gettid has no preconditions.
    let caller = unsafe { libc::gettid() };
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let parameters = libc::sched_param {
        sched_priority: VCPU_PRIORITY,
    };
    let mut raised = 0;
    for tid in tasks
        .filter_map(|task| task.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|tid| *tid != caller)
    {
        // The kicked vCPU threads are at this priority already. SAFETY: a thread id of this
        // process (it may have exited since: the call then fails with ESRCH); `parameters` is
        // valid for the call.
        if unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &parameters) } == 0 {
            raised += 1;
        } else {
            log::debug!(
                "thread {tid} exits at its own priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    raised
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

    fn policy_of_task(tid: &str) -> libc::c_int {
        let tid: libc::pid_t = tid.parse().unwrap();
        // SAFETY: a thread id read from /proc/self/task.
        unsafe { libc::sched_getscheduler(tid) }
    }

    /// The threads of this process: (tid, name).
    fn tasks() -> Vec<(String, String)> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| {
                let task = task.ok()?;
                let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
                Some((task.file_name().into_string().ok()?, name.trim().to_owned()))
            })
            .collect()
    }

    /// KVM's own worker in the process (started by a VM's first `KVM_RUN`) stayed at normal
    /// priority when the VMM exited after a committed save, and the process lived until it got
    /// a core. Runs in a fresh test process (this test again, alone): raising every other
    /// thread of the test harness's process would raise other tests' threads.
    #[test]
    fn at_the_exit_every_other_thread_runs_at_real_time_priority_kvms_worker_too() {
        if !crate::fresh_test_process::in_a_fresh_process(
            "power_fail_priority::tests::at_the_exit_every_other_thread_runs_at_real_time_priority_kvms_worker_too",
            "NV_PRIORITY_TEST_FRESH_PROCESS",
        ) {
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        // Without memory or registers the run fails at once; KVM has started its worker.
        let _ = vcpu.run();
        let (stop, parked) = std::sync::mpsc::channel::<()>();
        let waiting = std::thread::spawn(move || {
            let _ = parked.recv();
        });
        let before = tasks();
        assert!(
            before.iter().any(|(_, name)| name.starts_with("kvm-")),
            "no KVM worker in the process: {before:?}"
        );
        let permitted = raise_control_loop();
        let raised = raise_other_threads_for_exit();
        // SAFETY: gettid has no preconditions.
        let caller = unsafe { libc::gettid() }.to_string();
        for (tid, name) in tasks().iter().filter(|(tid, _)| *tid != caller) {
            let expected = if permitted {
                libc::SCHED_FIFO
            } else {
                libc::SCHED_OTHER
            };
            assert_eq!(policy_of_task(tid), expected, "{name} ({tid})");
        }
        if permitted {
            // The harness's main thread, the waiting thread and KVM's worker at least.
            assert!(raised >= 3, "{raised}");
        }
        let _ = stop.send(());
        waiting.join().unwrap();
    }
}
