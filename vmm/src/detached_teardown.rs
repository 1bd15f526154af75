//! Leaves the kernel's teardown of a KVM VM to a process of its own, so that a VMM exiting
//! after a committed power-fail save is gone at once.
//!
//! When the last reference to a KVM VM goes, the kernel destroys it in the thread that dropped
//! the reference: it frees the PIT (its worker thread, its I/O bus devices), shuts the irqfds
//! down, unregisters the MMU notifier, and tearing down the address space that holds guest RAM
//! does the same again. Each of those steps waits for an SRCU grace period or a kernel thread,
//! so on a busy host the exit of the process that held the VM takes 15-40 ms, all of it after
//! the state is safe in the region, and whoever waits for the VMM (a UPS hook, an operator's
//! planned suspend, the next recovery) waits that long for nothing.
//!
//! [`hand_off`] starts a small process that shares the VMM's address space (`CLONE_VM`) and
//! holds a copy of the VM's descriptor and nothing else: it closes every other descriptor it
//! inherited (stdout, taps, sockets, the region: none of them stays open a moment longer than
//! the VMM's own) before the VMM goes on. The helper then blocks until the VMM is gone and
//! exits, which drops the last references to the VM and to the address space: the kernel's
//! teardown runs there. The VMM's own exit only drops its references.
//!
//! "Gone" means every thread of the VMM's thread group, which the helper learns from a pidfd
//! of the VMM (readable once the whole group has exited). Not every thread of the group shares
//! the VMM's descriptor table: KVM's own worker (`kvm-nx-lpage-recovery`, started by a VM's
//! first `KVM_RUN`) does not, so the end of the descriptor table (the write end of a pipe only
//! the VMM holds) can come before the worker's exit. A helper that left then made the worker
//! the address space's last user: the VMM's process stayed until the worker had torn it down
//! (20 ms on a busy host). The pipe is the cue only where no pidfd can be had. The helper is nobody's child to wait for (no exit
//! signal to the VMM); once the VMM is gone it is reparented, and its new parent reaps it.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The helper runs only the few system calls below on its own stack: no allocation, no locks.
const HELPER_STACK_BYTES: usize = 64 * 1024;
/// How long the VMM waits for the helper to close its copies of the descriptors.
const READY_TIMEOUT: Duration = Duration::from_millis(200);

/// What the VMM hands the helper. Leaked: it must outlive the VMM's last use of it, and the
/// process is about to exit.
struct Handoff {
    /// Inclusive ranges of descriptor numbers the helper closes: all but the VM's, the read end
    /// of the pipe and the pidfd (see [`ranges_to_close`]).
    close: [(u32, u32); 4],
    close_count: usize,
    /// The read end of the pipe whose write end only the VMM holds.
    until_gone: RawFd,
    /// A pidfd of the VMM, readable once its whole thread group has exited; -1 if none.
    group_gone: RawFd,
    /// 1 once the helper has closed everything else; futex word.
    ready: AtomicU32,
}

/// The ranges to close so that exactly `keep` (ascending, distinct) stays open: inclusive
/// `(first, last)` pairs covering every other descriptor number, at most `keep.len() + 1`.
fn ranges_to_close(keep: &[RawFd]) -> Vec<(u32, u32)> {
    let mut ranges = Vec::with_capacity(keep.len() + 1);
    let mut next = 0u32;
    for &fd in keep {
        let fd = fd as u32;
        if fd > next {
            ranges.push((next, fd - 1));
        }
        next = fd + 1;
    }
    ranges.push((next, u32::MAX));
    ranges
}

/// The helper process's whole life. It shares the VMM's memory but runs on its own stack, with
/// every signal blocked, and calls only `close_range`, `futex`, `sched_setscheduler`, `poll`,
/// `read` (and `exit` when it returns): nothing that allocates or takes a lock another thread
/// might hold.
extern "C" fn helper_main(argument: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `argument` is the leaked `Handoff` that `hand_off` passed to clone(2); it is never
    // freed.
    let handoff = unsafe { &*(argument as *const Handoff) };
    for &(first, last) in &handoff.close[..handoff.close_count] {
        // SAFETY: closes descriptors of this process's own table (a copy of the VMM's).
        unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    }
    handoff.ready.store(1, Ordering::Release);
    // SAFETY: wakes the VMM thread waiting on the futex word, which lives as long as the process.
    unsafe { libc::syscall(libc::SYS_futex, handoff.ready.as_ptr(), libc::FUTEX_WAKE, 1) };
    // Started from a power-fail save's control loop it runs at real-time priority
    // (`power_fail_priority`), so the VMM did not wait for it; the teardown itself need not.
    let normal = libc::sched_param { sched_priority: 0 };
    // SAFETY: changes this process's own policy; `normal` is valid for the call.
    unsafe { libc::syscall(libc::SYS_sched_setscheduler, 0, libc::SCHED_OTHER, &normal) };
    if handoff.group_gone >= 0 {
        let mut group = libc::pollfd {
            fd: handoff.group_gone,
            events: libc::POLLIN,
            revents: 0,
        };
        // Every signal is blocked: the wait ends when the group has exited (or the pidfd
        // fails, and the pipe below decides).
        // SAFETY: polls one valid pollfd on this helper's stack.
        if unsafe { libc::syscall(libc::SYS_poll, &raw mut group, 1, -1) } > 0 {
            return 0;
        }
    }
    let mut byte = 0u8;
    // Returns 0 (end of file) when the VMM's last thread has dropped the write end.
    // SAFETY: reads at most one byte into a local.
    while unsafe { libc::read(handoff.until_gone, (&raw mut byte).cast(), 1) } > 0 {}
    0
}

/// Hands the kernel's teardown of the VM whose descriptor is `vm_fd` to a helper process (see
/// the module's documentation). Call it when nothing of the VM is needed any more and the
/// process exits next. Returns the helper's pid, or `None` if it could not be started: the
/// teardown then happens in this process's exit, as without it.
pub fn hand_off(vm_fd: RawFd) -> Option<libc::pid_t> {
    // SAFETY: pidfd_open of this process; returns a new descriptor or -1.
    let own_pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    let group_gone = RawFd::try_from(own_pidfd).ok().filter(|fd| *fd >= 0);
    if group_gone.is_none() {
        log::debug!(
            "VM teardown helper waits for the descriptor table only: pidfd_open: {}",
            std::io::Error::last_os_error()
        );
    }
    let started = start_helper(vm_fd, group_gone);
    if let Some(pidfd) = group_gone {
        // The helper has its own copy.
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(pidfd) };
    }
    let (pid, write_end) = started?;
    // The write end stays open until this process is gone: its closing is the helper's cue.
    let _ = write_end;
    log::debug!("the kernel's teardown of the VM is left to process {pid}");
    Some(pid)
}

/// Starts the helper keeping `vm_fd`; returns its pid and the write end of the pipe. The helper
/// ends when `group_gone` (a pidfd) becomes readable, or without one when the write end closes.
fn start_helper(vm_fd: RawFd, group_gone: Option<RawFd>) -> Option<(libc::pid_t, RawFd)> {
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `pipe`.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        log::debug!(
            "VM teardown stays in the exit: pipe2: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    let [until_gone, write_end] = pipe;
    let mut keep: Vec<RawFd> = [vm_fd, until_gone].into_iter().chain(group_gone).collect();
    keep.sort_unstable();
    let ranges = ranges_to_close(&keep);
    let mut close = [(0u32, 0u32); 4];
    close[..ranges.len()].copy_from_slice(&ranges);
    let handoff: &'static Handoff = Box::leak(Box::new(Handoff {
        close,
        close_count: ranges.len(),
        until_gone,
        group_gone: group_gone.unwrap_or(-1),
        ready: AtomicU32::new(0),
    }));
    let stack: &'static mut [u8] = Vec::leak(vec![0u8; HELPER_STACK_BYTES]);
    // The stack grows down from its end, 16-byte aligned as the ABI wants.
    let top = (stack.as_mut_ptr() as usize + HELPER_STACK_BYTES) & !0xf;

    // Every signal blocked in the helper (it inherits this thread's mask): a signal meant for
    // the VMM must not run the VMM's handlers on the helper's stack.
    // SAFETY: plain sigset_t manipulation on locals.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `all` is a valid sigset_t.
    unsafe { libc::sigfillset(&mut all) };
    // SAFETY: valid sigsets; changes only this thread's mask, restored below.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous) };
    // SAFETY: the helper runs `helper_main` on the leaked stack above, shares this address space
    // (CLONE_VM) and so sees the leaked `handoff`; it gets its own copy of the descriptor table
    // and sends no signal when it exits (exit signal 0).
    let pid = unsafe {
        libc::clone(
            helper_main,
            top as *mut libc::c_void,
            libc::CLONE_VM,
            handoff as *const Handoff as *mut libc::c_void,
        )
    };
    let clone_error = std::io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    if pid < 0 {
        log::debug!("VM teardown stays in the exit: clone: {clone_error}");
        // SAFETY: our own descriptors, closed once.
        unsafe {
            libc::close(until_gone);
            libc::close(write_end);
        }
        return None;
    }
    // The helper closes its copies first, so that nothing the VMM had open (a tap, a socket, its
    // stdout) stays open after the VMM is gone.
    let deadline = Instant::now() + READY_TIMEOUT;
    while handoff.ready.load(Ordering::Acquire) == 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            log::warn!("the VM teardown helper (pid {pid}) did not start in time");
            break;
        }
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: left.subsec_nanos().into(),
        };
        // SAFETY: waits on the leaked futex word while it is 0, at most `timeout`.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                handoff.ready.as_ptr(),
                libc::FUTEX_WAIT,
                0,
                &timeout,
            )
        };
    }
    // The read end is the helper's.
    // SAFETY: our copy of the read end, closed once.
    unsafe { libc::close(until_gone) };
    Some((pid, write_end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_but_the_kept_descriptors_is_closed() {
        assert_eq!(
            ranges_to_close(&[5, 9]),
            vec![(0, 4), (6, 8), (10, u32::MAX)]
        );
        assert_eq!(ranges_to_close(&[0, 1]), vec![(2, u32::MAX)]);
        assert_eq!(ranges_to_close(&[3, 4]), vec![(0, 2), (5, u32::MAX)]);
    }

    fn descriptors_of(pid: libc::pid_t) -> Vec<(RawFd, String)> {
        let mut found: Vec<(RawFd, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                let fd = entry.file_name().to_string_lossy().parse().unwrap();
                let target = std::fs::read_link(entry.path()).unwrap();
                (fd, target.to_string_lossy().into_owned())
            })
            .collect();
        found.sort();
        found
    }

    #[test]
    fn the_helper_keeps_only_the_vm_and_lives_until_the_write_end_closes() {
        use std::os::fd::AsRawFd;
        // Stand-ins: an eventfd for the VM's descriptor, a file this process also has open.
        let vm = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let other = std::fs::File::open("/proc/self/status").unwrap();
        let (pid, write_end) = start_helper(vm.as_raw_fd(), None).expect("helper started");
        assert_ne!(pid, std::process::id() as libc::pid_t);
        let kept = descriptors_of(pid);
        let ours = descriptors_of(std::process::id() as libc::pid_t);
        let vm_target = ours
            .iter()
            .find(|(fd, _)| *fd == vm.as_raw_fd())
            .unwrap()
            .1
            .clone();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(kept.contains(&(vm.as_raw_fd(), vm_target)), "{kept:?}");
        assert!(kept.iter().any(|(_, target)| target.starts_with("pipe:")));
        assert!(
            !kept.iter().any(|(fd, _)| *fd == other.as_raw_fd()),
            "{kept:?}"
        );
        // Still there: it waits for the write end.
        let mut status = 0;
        // SAFETY: waitpid on the helper we started; WNOHANG, __WALL (it sends no exit signal).
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
        assert_eq!(reaped, 0);
        // SAFETY: our write end, closed once.
        unsafe { libc::close(write_end) };
        // SAFETY: as above, blocking.
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        assert_eq!(reaped, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    /// The helper waited only for the VMM's descriptor table, which KVM's own worker thread
    /// (a member of the VMM's thread group) does not share: it left while that thread still
    /// lived, and the thread then tore the address space down in the VMM's exit. A child
    /// process stands in for the VMM's thread group here.
    #[test]
    fn the_helper_waits_for_the_whole_thread_group_not_only_the_descriptor_table() {
        use std::os::fd::AsRawFd;
        let vm = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let mut group = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        // SAFETY: pidfd_open of our own child, not yet waited for.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, group.id(), 0) } as RawFd;
        assert!(pidfd >= 0, "{}", std::io::Error::last_os_error());
        let (pid, write_end) = start_helper(vm.as_raw_fd(), Some(pidfd)).expect("helper started");
        assert_eq!(descriptors_of(pid).len(), 3);
        // The descriptor table is gone, a thread of the group is not.
        // SAFETY: our write end, closed once.
        unsafe { libc::close(write_end) };
        std::thread::sleep(Duration::from_millis(200));
        let mut status = 0;
        // SAFETY: waitpid on the helper we started; WNOHANG, __WALL (it sends no exit signal).
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
        assert_eq!(reaped, 0, "the helper left before the VMM's thread group");
        group.kill().unwrap();
        group.wait().unwrap();
        // SAFETY: as above, blocking.
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        assert_eq!(reaped, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        // SAFETY: our pidfd, closed once.
        unsafe { libc::close(pidfd) };
    }
}
