//! Seccomp filters, one per kind of VMM thread, all in this module so that the whole attack surface
//! reads in one place. Each thread installs its filter on itself right after it starts, with
//! `apply_filter(kind, action)`, where `action` is what the kernel does on a call outside the list:
//! `--seccomp true` (upstream's default) traps, `log` allows and logs, `false` installs nothing.
//!
//! The lists are what the thread's code calls through std and the rust-vmm crates on x86_64 Linux.
//! The control loop's, the vCPU's and the block I/O thread's were checked with `strace -f` on the
//! counter and blkcheck guests (boot, run, disk I/O with flushes, SIGTERM shutdown), and the counter
//! guest was run with the `Vmm` filter in trap mode. The API server's accept and connection threads
//! were checked with `strace -f` on the `api::tests` suite (the real server over a Unix socket).
//! The event writer runs in trap mode in its own unit tests, the page-fault server in the
//! `userfaultfd` tests. The API end-to-end tests (`integration-tests/tests/api.rs`) run every
//! thread in trap mode through boot, pause, snapshot, restore (Copy and OnDemand, from the
//! command line and over the API), reboot, NV power-fail, recovery and suspend. To find a missing
//! call: run with `--seccomp log` and read the audit log, or `strace -f`.
//!
//! Filters stack: a thread started by a filtered thread keeps its parent's filter and can only
//! narrow it. So the control loop installs `Vmm` once it has started the other threads, and each
//! thread installs its own kind first thing.

use std::collections::BTreeMap;
use std::sync::Once;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

use crate::config::SeccompMode;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter of the {kind:?} thread: {source}")]
    Build {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the seccomp filter of the {kind:?} thread: {source}")]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
}

/// The kinds of thread the VMM runs, each with its own allow list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The control loop: creates the VM, spawns the other threads, pauses, saves and restores.
    Vmm,
    /// One per vCPU: KVM_RUN and the port-I/O and MMIO exits it serves in place.
    Vcpu,
    /// The REST API server on the Unix socket.
    HttpApi,
    /// The virtio-blk request thread: reads queue notifications, does disk I/O, raises interrupts.
    BlockIo,
    /// The `--event-monitor` writer.
    EventMonitor,
    /// Serves the guest RAM page faults of an `OnDemand` restore (userfaultfd).
    PageFault,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::HttpApi,
        ThreadKind::BlockIo,
        ThreadKind::EventMonitor,
        ThreadKind::PageFault,
    ];
}

impl SeccompMode {
    /// The action on a call outside the allow list, or `None` for no filter at all.
    pub fn mismatch_action(self) -> Option<SeccompAction> {
        match self {
            SeccompMode::Enforce => Some(SeccompAction::Trap),
            SeccompMode::Log => Some(SeccompAction::Log),
            SeccompMode::Disabled => None,
        }
    }

    /// `--seccomp true|false|log`, as upstream spells it.
    pub fn from_cli(value: &str) -> Option<Self> {
        match value {
            "true" => Some(SeccompMode::Enforce),
            "false" => Some(SeccompMode::Disabled),
            "log" => Some(SeccompMode::Log),
            _ => None,
        }
    }
}

/// What every Rust thread needs: the allocator, locks and channels, signals std sets up, time,
/// logging to stderr or `--log-file`, and exiting.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // A panic that aborts raises SIGABRT on itself; the message must not be lost to a trap.
    libc::SYS_tgkill,
    libc::SYS_rseq,
];

/// The control loop does the heavy lifting: files, memory, KVM, threads, signals to vCPUs.
const VMM: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_msync,
    // NV regions: the cross-process metadata lock of nv-extension (saves, claims, recovery).
    libc::SYS_flock,
    libc::SYS_mkdirat,
    // std's create_dir_all (vm.snapshot's destination directory) calls mkdir, not mkdirat.
    libc::SYS_mkdir,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_dup,
    libc::SYS_ioctl,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_signalfd4,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_userfaultfd,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    // Threads started from the filtered control loop (vCPUs and I/O threads of a VM booted or
    // restored over the API, the userfaultfd server) install their own, narrower filter.
    libc::SYS_seccomp,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_kill,
    libc::SYS_sched_setaffinity,
    libc::SYS_uname,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_prlimit64,
];

/// A vCPU runs KVM_RUN and serves exits in place: the serial port writes its output file or
/// terminal, virtio notifications go out through eventfds, and the pause kick is a signal. When the
/// guest driver sets DRIVER_OK, the vCPU's MMIO write activates the virtio device, which creates
/// its eventfds and epoll and starts the block I/O thread right there (seen with strace): that
/// thread inherits this filter, so a vCPU's allow list is this one plus `BLOCK_IO` (see
/// `allow_list`).
const VCPU: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    // The block I/O thread installs its own filter first thing (`confine_device_io_threads`).
    libc::SYS_seccomp,
];

/// The API server: accept connections, read requests (with socket timeouts), write answers, hand
/// requests to the control loop through a channel and an eventfd. Binding the socket happens
/// before the filter. The accept thread starts one thread per connection, which inherits this
/// filter, hence the thread-start calls.
const HTTP_API: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    libc::SYS_accept4,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_unlinkat,
];

/// Disk requests: wait for queue notifications, move data, flush, raise interrupts.
const BLOCK_IO: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_fstat,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
];

/// The userfaultfd server of an `OnDemand` restore: wait for faults, read them, answer each with
/// `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` / `UFFDIO_WAKE` from a read-only mapping of `memory-ranges`.
const PAGE_FAULT: &[i64] = &[
    libc::SYS_read,
    libc::SYS_ioctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// The event writer only writes (COMMON has `write`) and flushes.
const EVENT_MONITOR: &[i64] = &[libc::SYS_fsync, libc::SYS_fdatasync];

fn allow_list(kind: ThreadKind) -> impl Iterator<Item = i64> {
    let specific: &[&[i64]] = match kind {
        ThreadKind::Vmm => &[VMM],
        // A vCPU starts block I/O threads, which run under its filter until they install theirs.
        ThreadKind::Vcpu => &[VCPU, BLOCK_IO],
        ThreadKind::HttpApi => &[HTTP_API],
        ThreadKind::BlockIo => &[BLOCK_IO],
        ThreadKind::EventMonitor => &[EVENT_MONITOR],
        ThreadKind::PageFault => &[PAGE_FAULT],
    };
    COMMON
        .iter()
        .chain(specific.iter().flat_map(|list| list.iter()))
        .copied()
}

/// Compiles the filter of `kind` to BPF.
pub fn build_filter(
    kind: ThreadKind,
    mismatch_action: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    // An empty rule list means "allowed whatever the arguments".
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        allow_list(kind).map(|syscall| (syscall, vec![])).collect();
    let filter = SeccompFilter::new(
        rules,
        mismatch_action,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| SeccompError::Build { kind, source })?;
    BpfProgram::try_from(filter).map_err(|source| SeccompError::Build { kind, source })
}

/// Installs the filter of `kind` on the calling thread (filters are per thread and inherited by
/// threads it spawns). With `SeccompAction::Trap` a forbidden call ends the process with a message
/// naming the system call.
pub fn apply_filter(kind: ThreadKind, mismatch_action: SeccompAction) -> Result<(), SeccompError> {
    if mismatch_action == SeccompAction::Trap {
        install_sigsys_reporter();
    }
    let program = build_filter(kind, mismatch_action)?;
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install { kind, source })
}

/// `apply_filter` for a `--seccomp` mode; `Disabled` installs nothing.
pub fn apply_filter_for_mode(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    match mode.mismatch_action() {
        Some(action) => apply_filter(kind, action),
        None => Ok(()),
    }
}

/// Makes every virtio device I/O thread started from now on install the `BlockIo` filter of
/// `mode` first thing (the devices crate runs the hook; it knows nothing of seccomp). Until then
/// such a thread only has the filter it inherited from its starter, a vCPU or the control loop.
pub fn confine_device_io_threads(mode: SeccompMode) {
    let hook: devices::virtio::IoThreadStartHook = Box::new(move || {
        apply_filter_for_mode(ThreadKind::BlockIo, mode).map_err(|error| error.to_string())
    });
    devices::virtio::set_io_thread_start_hook(Some(hook));
}

/// Without a handler SIGSYS kills the process silently (or with a bare "Bad system call"); the
/// operator then has no idea which call to add. This handler names it, then exits.
fn install_sigsys_reporter() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; we then set the
        // handler and SA_SIGINFO. sigaction only reads the struct we pass.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = report_sigsys as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
                log::warn!(
                    "seccomp: cannot install the SIGSYS reporter: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

/// Offset of `si_syscall` in x86_64 `siginfo_t` (three ints, padding, then `_sigsys`'s
/// `_call_addr` pointer); the libc crate has no accessor for it.
const SIGINFO_SYSCALL_OFFSET: usize = 24;

/// Runs in signal context: only async-signal-safe calls (write, _exit), no allocation.
extern "C" fn report_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; for SIGSYS raised
    // by seccomp the i32 at this offset is the system call number.
    let syscall = unsafe {
        info.cast::<u8>()
            .add(SIGINFO_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let mut message = *b"cloud-hypervisor: seccomp: forbidden system call           \n";
    let prefix_len = b"cloud-hypervisor: seccomp: forbidden system call ".len();
    write_decimal(&mut message[prefix_len..prefix_len + 10], syscall);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer lives on this stack frame.
    unsafe {
        libc::write(libc::STDERR_FILENO, message.as_ptr().cast(), message.len());
        libc::_exit(1);
    }
}

/// Writes `value` left-aligned in `out` (space padded) without allocating.
fn write_decimal(out: &mut [u8], value: i32) {
    let mut digits = [0u8; 11];
    let mut count = 0;
    let mut remaining = value.unsigned_abs();
    loop {
        digits[count] = b'0' + (remaining % 10) as u8;
        count += 1;
        remaining /= 10;
        if remaining == 0 || count == digits.len() {
            break;
        }
    }
    let mut position = 0;
    if value < 0 && position < out.len() {
        out[position] = b'-';
        position += 1;
    }
    for digit in digits[..count].iter().rev() {
        if position == out.len() {
            break;
        }
        out[position] = *digit;
        position += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds_for_every_action() {
        for kind in ThreadKind::ALL {
            for action in [SeccompAction::Trap, SeccompAction::Log] {
                let program = build_filter(kind, action).unwrap();
                assert!(!program.is_empty(), "{kind:?}");
            }
        }
    }

    #[test]
    fn lists_have_no_duplicates_within_a_kind() {
        for kind in ThreadKind::ALL {
            let mut calls: Vec<i64> = allow_list(kind).collect();
            let total = calls.len();
            calls.sort_unstable();
            calls.dedup();
            assert_eq!(calls.len(), total, "{kind:?} lists a call twice");
        }
    }

    /// vCPU, block I/O and event threads may be started (again, e.g. on restore) by the control
    /// loop after it installed its own filter; stacked filters only narrow, so each of their calls
    /// must be allowed to the control loop too.
    #[test]
    fn threads_the_control_loop_starts_stay_within_its_list() {
        let vmm: Vec<i64> = allow_list(ThreadKind::Vmm).collect();
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::BlockIo,
            ThreadKind::EventMonitor,
            ThreadKind::PageFault,
        ] {
            for call in allow_list(kind) {
                assert!(
                    vmm.contains(&call),
                    "{kind:?} needs syscall {call}, Vmm lacks it"
                );
            }
        }
    }

    /// The block I/O thread is started by a vCPU (device activation on DRIVER_OK).
    #[test]
    fn block_io_stays_within_the_vcpu_list() {
        let vcpu: Vec<i64> = allow_list(ThreadKind::Vcpu).collect();
        for call in allow_list(ThreadKind::BlockIo) {
            assert!(
                vcpu.contains(&call),
                "BlockIo needs syscall {call}, Vcpu lacks it"
            );
        }
    }

    /// A thread installs its own filter under the one it inherited, so every starter's list
    /// needs seccomp(2): the control loop starts vCPU, I/O and page-fault threads, a vCPU starts
    /// the block I/O thread, the API accept thread starts connection threads (which inherit and
    /// install nothing).
    #[test]
    fn starters_may_install_their_threads_filters() {
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu] {
            assert!(
                allow_list(kind).any(|call| call == libc::SYS_seccomp),
                "{kind:?} lacks seccomp(2)"
            );
        }
    }

    /// The real stacking, under Errno instead of Trap so the test survives a refusal: a thread
    /// under the control loop's filter starts a thread that installs the vCPU filter, which in
    /// turn starts one that installs the block I/O filter.
    #[test]
    fn filters_stack_from_the_control_loop_down_to_the_block_io_thread() {
        let install = |kind| {
            let program = build_filter(kind, SeccompAction::Errno(1)).unwrap();
            seccompiler::apply_filter(&program).map_err(|e| format!("{kind:?}: {e}"))
        };
        let outcome = std::thread::spawn(move || {
            install(ThreadKind::Vmm)?;
            std::thread::spawn(move || {
                install(ThreadKind::Vcpu)?;
                std::thread::spawn(move || install(ThreadKind::BlockIo))
                    .join()
                    .map_err(|_| "block I/O thread panicked".to_string())?
            })
            .join()
            .map_err(|_| "vCPU thread panicked".to_string())?
        })
        .join()
        .unwrap();
        assert_eq!(outcome, Ok(()));
    }

    #[test]
    fn modes() {
        assert_eq!(SeccompMode::from_cli("true"), Some(SeccompMode::Enforce));
        assert_eq!(SeccompMode::from_cli("false"), Some(SeccompMode::Disabled));
        assert_eq!(SeccompMode::from_cli("log"), Some(SeccompMode::Log));
        assert_eq!(SeccompMode::from_cli("on"), None);
        assert_eq!(
            SeccompMode::Enforce.mismatch_action(),
            Some(SeccompAction::Trap)
        );
        assert_eq!(SeccompMode::Disabled.mismatch_action(), None);
    }

    /// Installs a real filter on a thread of its own (filters never come off) and checks that an
    /// allowed call still works and a call outside the list is refused. `Errno` stands in for
    /// `Trap` here so that the test process survives the refused call.
    #[test]
    fn installed_filter_refuses_calls_outside_the_list() {
        std::thread::spawn(|| {
            let program = build_filter(ThreadKind::EventMonitor, SeccompAction::Errno(1)).unwrap();
            seccompiler::apply_filter(&program).unwrap();
            // SAFETY: getpid has no arguments and cannot fail.
            assert!(unsafe { libc::getpid() } > 0);
            // SAFETY: socket() with plain arguments; the result is only compared.
            let socket = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            assert_eq!(socket, -1);
            assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(1));
        })
        .join()
        .unwrap();
    }

    /// The trap path end to end, in a forked child so that the test process survives: the
    /// forbidden call must end the child with exit code 1 and a stderr line naming the call.
    #[test]
    fn trap_mode_names_the_forbidden_call_and_exits() {
        // Built before fork: the child of a multi-threaded process must not allocate.
        let program = build_filter(ThreadKind::EventMonitor, SeccompAction::Trap).unwrap();
        let mut pipe_fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array we own.
        assert_eq!(unsafe { libc::pipe(pipe_fds.as_mut_ptr()) }, 0);
        let [read_end, write_end] = pipe_fds;
        // SAFETY: the child only makes async-signal-safe calls (dup2, sigaction, prctl, seccomp,
        // socket, write, _exit) before it exits.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            // SAFETY: plain descriptor and process calls in the forked child, see above.
            unsafe {
                libc::dup2(write_end, libc::STDERR_FILENO);
                install_sigsys_reporter();
                if seccompiler::apply_filter(&program).is_err() {
                    libc::_exit(3);
                }
                libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copy of the write end so that reading sees end of file.
        unsafe { libc::close(write_end) };
        let mut status = 0;
        // SAFETY: waiting for the child we just forked.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        // SAFETY: `read_end` is ours; the File closes it.
        let mut stderr =
            unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(read_end) };
        let mut message = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut message).unwrap();
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 1, "{message}");
        assert!(
            message.contains(&format!("forbidden system call {}", libc::SYS_socket)),
            "{message}"
        );
    }

    #[test]
    fn decimal_formatting() {
        let mut buffer = [b' '; 10];
        write_decimal(&mut buffer, 231);
        assert_eq!(&buffer, b"231       ");
        write_decimal(&mut buffer, -5);
        assert_eq!(&buffer[..2], b"-5");
        write_decimal(&mut buffer, i32::MIN);
        assert_eq!(&buffer, b"-214748364");
    }
}
