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
//! thread installs its own kind first thing. Only the control loop (and its workers) start
//! threads that install a filter: vCPUs start none (devices are activated on the control loop).
//!
//! `ioctl` is allowed by request number (argument 1), per kind: a vCPU may only run
//! (`KVM_RUN`, and `KVM_GET_REGS` to name the failing instruction), the control loop the KVM,
//! terminal and userfaultfd requests it makes; the other kinds make none but the page-fault
//! server's `UFFDIO_*`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Once};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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
    /// The virtio-console and virtio-rng request threads: read queue notifications and the
    /// entropy source, write the console output, raise interrupts; no positioned I/O, no sync.
    StreamIo,
    /// The `--event-monitor` writer.
    EventMonitor,
    /// The virtio-net thread: reads queue notifications, moves packets between the guest's
    /// buffers and the tap (`readv`/`writev`), raises interrupts.
    NetIo,
    /// Serves the guest RAM page faults of an `OnDemand` restore (userfaultfd).
    PageFault,
    /// Serves the write-protect faults of NV checkpoints: records a page's old content in the
    /// region's undo log, persists it, lifts the page's protection (userfaultfd).
    WriteFault,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::HttpApi,
        ThreadKind::BlockIo,
        ThreadKind::StreamIo,
        ThreadKind::EventMonitor,
        ThreadKind::PageFault,
        ThreadKind::NetIo,
        ThreadKind::WriteFault,
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
    // Shared guest RAM without a file (`shared=on`) is a memfd, built again on vm.restore.
    libc::SYS_memfd_create,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_msync,
    // NV regions: the cross-process metadata lock of nv-extension (saves, claims, recovery).
    libc::SYS_flock,
    libc::SYS_mkdirat,
    // std's create_dir_all (vm.snapshot's destination directory) calls mkdir, not mkdirat.
    libc::SYS_mkdir,
    libc::SYS_unlinkat,
    // Swap files: std's remove_file calls unlink (a failed swap-out's partial file, a swapped-in
    // file); hard_link (linkat) names a finished swap file where renameat2 cannot.
    libc::SYS_unlink,
    libc::SYS_linkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_dup,
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
    // `--net` without a tap name: the new tap's address, MTU and flags are set through an
    // AF_INET socket's SIOCSIF* requests.
    libc::SYS_socket,
    // vhost-user disks: connect to the backend's socket, bound its replies (SO_RCVTIMEO), and
    // send its requests with their descriptors (memory regions, kick and call eventfds).
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    // vhost-user `vhost_mode=server`: the VMM listens on the socket and accepts its backend.
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    // After a committed save: the helper that takes the KVM VM's teardown out of the exit
    // (`detached_teardown`) closes what it inherited and waits for the VMM's end (a pipe)...
    libc::SYS_pipe2,
    libc::SYS_close_range,
    // ... and learns the VMM's end (its whole thread group, KVM's worker included) from a pidfd.
    libc::SYS_pidfd_open,
    // SIGPWR: the control loop and the kicked vCPU threads run the save at SCHED_FIFO
    // (`power_fail_priority`).
    libc::SYS_sched_setscheduler,
];

/// A vCPU runs KVM_RUN (`ioctl`, see `VCPU_IOCTLS`) and serves exits in place with what `COMMON`
/// has: the serial port writes its output file or terminal, an i8042 reset, a virtio queue notify
/// or a DRIVER_OK write an eventfd, interrupts are irqfd writes, and the pause kick is a signal
/// whose handler only stores a byte. It opens nothing, does no disk I/O and starts no thread: a
/// DRIVER_OK write only asks the control loop to activate the device.
const VCPU: &[i64] = &[];

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
    // NV checkpoints: a disk's old bytes are made durable in the region's undo log before a
    // write (msync on a plain-file region).
    libc::SYS_msync,
    libc::SYS_fallocate,
    libc::SYS_fstat,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    // A multiqueue vhost-user-net device's call relay serves the control queue and sends the
    // backend SET_VRING_ENABLE for the pairs the driver asked for (a request and its reply).
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
];

/// virtio-console and virtio-rng: wait for queue notifications, `read` them and the entropy
/// source; the console output is a plain `write`, which every thread has.
const STREAM_IO: &[i64] = &[
    libc::SYS_read,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    // NV checkpoints: the guest pages a request writes are made durable in the region's undo
    // log before it writes them (msync or fdatasync on a plain-file region).
    libc::SYS_msync,
    libc::SYS_fdatasync,
];

/// Network packets: wait for queue notifications and the tap, move packets (`writev` is common).
const NET_IO: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    // NV checkpoints: as STREAM_IO.
    libc::SYS_msync,
    libc::SYS_fdatasync,
];

/// The tap requests of the control loop: attach (`TUNSETIFF`), check a handed-over descriptor
/// (`TUNGETIFF`), the virtio-net header size and offloads (also at a restore's activation), and
/// a new tap's address, netmask, MAC, MTU and flags.
const TAP_IOCTLS: [u64; 10] = [
    libc::TUNSETIFF,
    libc::TUNGETIFF,
    libc::TUNSETOFFLOAD,
    libc::TUNSETVNETHDRSZ,
    libc::SIOCSIFADDR,
    libc::SIOCSIFNETMASK,
    libc::SIOCSIFHWADDR,
    libc::SIOCSIFMTU,
    libc::SIOCGIFFLAGS,
    libc::SIOCSIFFLAGS,
];

/// The userfaultfd server of an `OnDemand` restore: wait for faults, read them, answer each with
/// `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` / `UFFDIO_WAKE` from a read-only mapping of `memory-ranges`.
const PAGE_FAULT: &[i64] = &[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll];

/// The checkpoint write-fault thread: wait for faults (or its stop EventFd), read them, persist
/// the old page into the region's undo log (stores to its mapping, `msync` or `fdatasync` for
/// a file region), then `UFFDIO_WRITEPROTECT` to lift the protection.
const WRITE_FAULT: &[i64] = &[
    libc::SYS_read,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_msync,
    libc::SYS_fdatasync,
];

/// The event writer only writes (COMMON has `write`) and flushes.
const EVENT_MONITOR: &[i64] = &[libc::SYS_fsync, libc::SYS_fdatasync];

/// ioctl request numbers, from the KVM API's numbers and argument types (linux/kvm.h, the types
/// of kvm-bindings) through vmm-sys-util's `_IO*` macros: kvm-ioctls keeps its own private.
#[allow(non_snake_case)]
mod kvm_requests {
    use kvm_bindings::*;
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    /// Defines each request's function and [`all`], the list of them.
    macro_rules! kvm_requests {
        ($($define:ident!($name:ident, $nr:literal $(, $arg:ty)?);)+) => {
            $($define!($name, KVMIO, $nr $(, $arg)?);)+

            /// Every KVM request the VMM makes (`/dev/kvm`, VM and vCPU).
            pub fn all() -> Vec<u64> {
                vec![$($name()),+]
            }
        };
    }

    kvm_requests! {
        // /dev/kvm
        ioctl_io_nr!(KVM_GET_API_VERSION, 0x00);
        ioctl_io_nr!(KVM_CREATE_VM, 0x01);
        ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, 0x02, kvm_msr_list);
        ioctl_io_nr!(KVM_CHECK_EXTENSION, 0x03);
        ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, 0x04);
        ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, 0x05, kvm_cpuid2);
        // VM
        ioctl_io_nr!(KVM_CREATE_VCPU, 0x41);
        ioctl_iow_nr!(KVM_SET_USER_MEMORY_REGION, 0x46, kvm_userspace_memory_region);
        ioctl_io_nr!(KVM_SET_TSS_ADDR, 0x47);
        ioctl_iow_nr!(KVM_SET_IDENTITY_MAP_ADDR, 0x48, u64);
        ioctl_io_nr!(KVM_CREATE_IRQCHIP, 0x60);
        ioctl_iowr_nr!(KVM_GET_IRQCHIP, 0x62, kvm_irqchip);
        ioctl_iow_nr!(KVM_SET_GSI_ROUTING, 0x6a, kvm_irq_routing);
        ioctl_ior_nr!(KVM_SET_IRQCHIP, 0x63, kvm_irqchip);
        ioctl_iow_nr!(KVM_IRQFD, 0x76, kvm_irqfd);
        ioctl_iow_nr!(KVM_CREATE_PIT2, 0x77, kvm_pit_config);
        ioctl_iow_nr!(KVM_IOEVENTFD, 0x79, kvm_ioeventfd);
        ioctl_iow_nr!(KVM_SET_CLOCK, 0x7b, kvm_clock_data);
        ioctl_ior_nr!(KVM_GET_CLOCK, 0x7c, kvm_clock_data);
        ioctl_ior_nr!(KVM_GET_PIT2, 0x9f, kvm_pit_state2);
        ioctl_iow_nr!(KVM_SET_PIT2, 0xa0, kvm_pit_state2);
        // vCPU
        ioctl_io_nr!(KVM_RUN, 0x80);
        ioctl_ior_nr!(KVM_GET_REGS, 0x81, kvm_regs);
        ioctl_iow_nr!(KVM_SET_REGS, 0x82, kvm_regs);
        ioctl_ior_nr!(KVM_GET_SREGS, 0x83, kvm_sregs);
        ioctl_iow_nr!(KVM_SET_SREGS, 0x84, kvm_sregs);
        ioctl_iowr_nr!(KVM_GET_MSRS, 0x88, kvm_msrs);
        ioctl_iow_nr!(KVM_SET_MSRS, 0x89, kvm_msrs);
        ioctl_ior_nr!(KVM_GET_FPU, 0x8c, kvm_fpu);
        ioctl_iow_nr!(KVM_SET_FPU, 0x8d, kvm_fpu);
        ioctl_ior_nr!(KVM_GET_LAPIC, 0x8e, kvm_lapic_state);
        ioctl_iow_nr!(KVM_SET_LAPIC, 0x8f, kvm_lapic_state);
        ioctl_iow_nr!(KVM_SET_CPUID2, 0x90, kvm_cpuid2);
        ioctl_ior_nr!(KVM_GET_MP_STATE, 0x98, kvm_mp_state);
        ioctl_iow_nr!(KVM_SET_MP_STATE, 0x99, kvm_mp_state);
        ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, 0x9f, kvm_vcpu_events);
        ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, 0xa0, kvm_vcpu_events);
        ioctl_ior_nr!(KVM_GET_DEBUGREGS, 0xa1, kvm_debugregs);
        ioctl_iow_nr!(KVM_SET_DEBUGREGS, 0xa2, kvm_debugregs);
        ioctl_io_nr!(KVM_GET_TSC_KHZ, 0xa3);
        ioctl_ior_nr!(KVM_GET_XSAVE, 0xa4, kvm_xsave);
        ioctl_iow_nr!(KVM_SET_XSAVE, 0xa5, kvm_xsave);
        ioctl_ior_nr!(KVM_GET_XCRS, 0xa6, kvm_xcrs);
        ioctl_iow_nr!(KVM_SET_XCRS, 0xa7, kvm_xcrs);
        ioctl_io_nr!(KVM_KVMCLOCK_CTRL, 0xad);
        ioctl_ior_nr!(KVM_GET_XSAVE2, 0xcf, kvm_xsave);
    }
}

/// A vCPU runs, and reads its registers to name the instruction of an exit it cannot serve.
/// Serving a PCI access in place, it rewrites the GSI routing table (the guest programmed an
/// MSI-X vector) and moves ioeventfds (the guest moved a BAR).
fn vcpu_ioctls() -> Vec<u64> {
    vec![
        kvm_requests::KVM_RUN(),
        kvm_requests::KVM_GET_REGS(),
        kvm_requests::KVM_SET_GSI_ROUTING(),
        kvm_requests::KVM_IOEVENTFD(),
    ]
}

/// Answering the guest's page faults (`UFFDIO_API` and `UFFDIO_REGISTER` come before).
const PAGE_FAULT_IOCTLS: &[u64] = &[
    crate::userfaultfd::UFFDIO_COPY,
    crate::userfaultfd::UFFDIO_ZEROPAGE,
    crate::userfaultfd::UFFDIO_WAKE,
];

/// Lifting a page's write protection once its old content is in the undo log.
const WRITE_FAULT_IOCTLS: &[u64] = &[crate::userfaultfd::UFFDIO_WRITEPROTECT];

/// The control loop and its workers: every KVM request of VM creation, boot, state save and
/// restore and pause (`KVM_KVMCLOCK_CTRL`); opening a pty (`grantpt`, `unlockpt`, `ptsname`)
/// and making it raw (`tcgetattr`, `tcsetattr`); setting up an `OnDemand` restore's
/// userfaultfd. Plus what the threads it starts under its filter need (vCPU, page fault).
fn vmm_ioctls() -> Vec<u64> {
    let terminal = [libc::TIOCGPTN, libc::TIOCSPTLCK, libc::TCGETS, libc::TCSETS];
    let userfaultfd = [
        crate::userfaultfd::UFFDIO_API,
        crate::userfaultfd::UFFDIO_REGISTER,
    ];
    // `all` holds the vCPU's requests too.
    kvm_requests::all()
        .into_iter()
        .chain(terminal)
        .chain(userfaultfd)
        .chain(PAGE_FAULT_IOCTLS.iter().copied())
        .chain(WRITE_FAULT_IOCTLS.iter().copied())
        .chain(TAP_IOCTLS)
        .collect()
}

/// The ioctl requests `kind` may make; none at all when empty (`ioctl` is then refused).
fn allowed_ioctls(kind: ThreadKind) -> Vec<u64> {
    match kind {
        ThreadKind::Vmm => vmm_ioctls(),
        ThreadKind::Vcpu => vcpu_ioctls(),
        ThreadKind::PageFault => PAGE_FAULT_IOCTLS.to_vec(),
        ThreadKind::WriteFault => WRITE_FAULT_IOCTLS.to_vec(),
        ThreadKind::HttpApi
        | ThreadKind::BlockIo
        | ThreadKind::StreamIo
        | ThreadKind::EventMonitor
        | ThreadKind::NetIo => Vec::new(),
    }
}

/// The system calls `kind` may make whatever their arguments (`ioctl` is never one of them).
fn allow_list(kind: ThreadKind) -> impl Iterator<Item = i64> {
    let specific: &[i64] = match kind {
        ThreadKind::Vmm => VMM,
        ThreadKind::Vcpu => VCPU,
        ThreadKind::HttpApi => HTTP_API,
        ThreadKind::BlockIo => BLOCK_IO,
        ThreadKind::StreamIo => STREAM_IO,
        ThreadKind::NetIo => NET_IO,
        ThreadKind::EventMonitor => EVENT_MONITOR,
        ThreadKind::PageFault => PAGE_FAULT,
        ThreadKind::WriteFault => WRITE_FAULT,
    };
    COMMON.iter().chain(specific).copied()
}

/// How many system calls `kind` may make (`ioctl` counted once), and how many ioctl requests.
pub fn filter_size(kind: ThreadKind) -> (usize, usize) {
    let ioctls = allowed_ioctls(kind).len();
    (allow_list(kind).count() + usize::from(ioctls > 0), ioctls)
}

/// Compiles the filter of `kind` to BPF.
pub fn build_filter(
    kind: ThreadKind,
    mismatch_action: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let build_error = |source| SeccompError::Build { kind, source };
    // An empty rule list means "allowed whatever the arguments".
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allow_list(kind).map(|syscall| (syscall, vec![])).collect();
    // One rule per request: the request number (argument 1) is an unsigned int to the kernel.
    let ioctl_rules = allowed_ioctls(kind)
        .into_iter()
        .map(|request| {
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                .and_then(|condition| SeccompRule::new(vec![condition]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(build_error)?;
    if !ioctl_rules.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl_rules);
    }
    let filter = SeccompFilter::new(
        rules,
        mismatch_action,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build_error)?;
    BpfProgram::try_from(filter).map_err(build_error)
}

/// Installs the filter of `kind` on the calling thread (filters are per thread and inherited by
/// threads it spawns). With `SeccompAction::Trap` a forbidden call ends the process with a message
/// naming the system call.
pub fn apply_filter(kind: ThreadKind, mismatch_action: SeccompAction) -> Result<(), SeccompError> {
    if mismatch_action == SeccompAction::Trap {
        install_sigsys_reporter();
    }
    let program = compiled_filter(kind, mismatch_action)?;
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install { kind, source })
}

/// The programs compiled so far in this process, by thread kind and mismatch action: each is
/// compiled once, and the vCPU's ahead of time, off the path to the guest's first instruction
/// ([`precompile_for_mode`]).
type CompiledFilters = Vec<(ThreadKind, SeccompAction, Arc<BpfProgram>)>;
static COMPILED: Mutex<CompiledFilters> = Mutex::new(Vec::new());

/// The filter of `kind` compiled to BPF: the one compiled before in this process, or
/// [`build_filter`]'s now (kept for the next thread of that kind).
fn compiled_filter(
    kind: ThreadKind,
    mismatch_action: SeccompAction,
) -> Result<Arc<BpfProgram>, SeccompError> {
    let lock = || {
        COMPILED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    if let Some((_, _, program)) = lock()
        .iter()
        .find(|(k, action, _)| *k == kind && *action == mismatch_action)
    {
        return Ok(Arc::clone(program));
    }
    // Compiled outside the lock: a thread installing another kind's filter does not wait.
    let program = Arc::new(build_filter(kind, mismatch_action.clone())?);
    let mut compiled = lock();
    if let Some((_, _, first)) = compiled
        .iter()
        .find(|(k, action, _)| *k == kind && *action == mismatch_action)
    {
        return Ok(Arc::clone(first));
    }
    compiled.push((kind, mismatch_action, Arc::clone(&program)));
    Ok(program)
}

/// Compiles the filter of `kind` for `mode` now, so that the thread that installs it later only
/// installs it (the VM build does this for the vCPU filter while it creates the VM).
pub fn precompile_for_mode(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    match mode.mismatch_action() {
        Some(action) => compiled_filter(kind, action).map(drop),
        None => Ok(()),
    }
}

/// `apply_filter` for a `--seccomp` mode; `Disabled` installs nothing.
pub fn apply_filter_for_mode(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    match mode.mismatch_action() {
        Some(action) => apply_filter(kind, action),
        None => Ok(()),
    }
}

/// What a device thread (virtio I/O, serial input) runs first: it installs the `BlockIo` filter
/// of `mode`. The device manager gives it to each device it builds; the devices crate runs it and
/// knows nothing of seccomp. The thread is started by the control loop (or a restore worker),
/// whose `Vmm` filter it inherits until then.
pub fn device_thread_start_hook(mode: SeccompMode) -> devices::virtio::IoThreadStartHook {
    thread_start_hook(ThreadKind::BlockIo, mode)
}

/// What a device thread of `kind` runs first: it installs the filter of `kind` in `mode`.
pub fn thread_start_hook(
    kind: ThreadKind,
    mode: SeccompMode,
) -> devices::virtio::IoThreadStartHook {
    std::sync::Arc::new(move || {
        apply_filter_for_mode(kind, mode).map_err(|error| error.to_string())
    })
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
    fn a_filter_compiled_ahead_is_the_one_compiled_on_the_spot_and_is_reused() {
        for kind in ThreadKind::ALL {
            for (mode, action) in [
                (SeccompMode::Enforce, SeccompAction::Trap),
                (SeccompMode::Log, SeccompAction::Log),
            ] {
                precompile_for_mode(kind, mode).unwrap();
                let ahead = compiled_filter(kind, action.clone()).unwrap();
                assert_eq!(
                    *ahead,
                    build_filter(kind, action.clone()).unwrap(),
                    "{kind:?}"
                );
                // The next thread of that kind gets the same program, not a new compile.
                assert!(Arc::ptr_eq(&ahead, &compiled_filter(kind, action).unwrap()));
            }
        }
        // `--seccomp false` compiles nothing and never fails.
        precompile_for_mode(ThreadKind::Vcpu, SeccompMode::Disabled).unwrap();
    }

    #[test]
    fn lists_have_no_duplicates_within_a_kind() {
        for kind in ThreadKind::ALL {
            let mut calls: Vec<i64> = allow_list(kind).collect();
            let total = calls.len();
            calls.sort_unstable();
            calls.dedup();
            assert_eq!(calls.len(), total, "{kind:?} lists a call twice");
            assert!(
                !calls.contains(&libc::SYS_ioctl),
                "{kind:?} allows every ioctl"
            );
            let mut requests = allowed_ioctls(kind);
            let total = requests.len();
            requests.sort_unstable();
            requests.dedup();
            assert_eq!(requests.len(), total, "{kind:?} lists an ioctl twice");
        }
    }

    /// The numbers the macros compute are the kernel's (linux/kvm.h on x86_64).
    #[test]
    fn kvm_request_numbers_match_the_kernel_header() {
        assert_eq!(kvm_requests::KVM_RUN(), 0xae80);
        assert_eq!(kvm_requests::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(kvm_requests::KVM_CREATE_VM(), 0xae01);
        assert_eq!(kvm_requests::KVM_IRQFD(), 0x4020_ae76);
        assert_eq!(kvm_requests::KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(kvm_requests::KVM_GET_XSAVE2(), 0x9000_aecf);
        assert_eq!(kvm_requests::KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
        assert_eq!(kvm_requests::KVM_IOEVENTFD(), 0x4040_ae79);
        assert_eq!(kvm_requests::KVM_GET_MP_STATE(), 0x8004_ae98);
        assert_eq!(kvm_requests::KVM_SET_MP_STATE(), 0x4004_ae99);
    }

    /// Each vCPU's MP state is read and written by the control loop (state save, power-fail
    /// save, restore, recovery), never by a vCPU thread: the guest's INIT/SIPI is handled inside
    /// KVM_RUN by the in-kernel LAPIC.
    #[test]
    fn the_control_loop_reads_and_writes_mp_state_and_vcpus_do_not() {
        let control = allowed_ioctls(ThreadKind::Vmm);
        let vcpu = allowed_ioctls(ThreadKind::Vcpu);
        for request in [
            kvm_requests::KVM_GET_MP_STATE(),
            kvm_requests::KVM_SET_MP_STATE(),
        ] {
            assert!(control.contains(&request), "{request:#x}");
            assert!(!vcpu.contains(&request), "{request:#x}");
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
            ThreadKind::StreamIo,
            ThreadKind::EventMonitor,
            ThreadKind::PageFault,
            ThreadKind::NetIo,
            ThreadKind::WriteFault,
        ] {
            for call in allow_list(kind) {
                assert!(
                    vmm.contains(&call),
                    "{kind:?} needs syscall {call}, Vmm lacks it"
                );
            }
            let vmm_ioctls = allowed_ioctls(ThreadKind::Vmm);
            for request in allowed_ioctls(kind) {
                assert!(
                    vmm_ioctls.contains(&request),
                    "{kind:?} needs ioctl {request:#x}, Vmm lacks it"
                );
            }
        }
    }

    /// The vCPU list is the common one plus four ioctl requests; the sizes of every kind are
    /// the ones `docs/security.md` states.
    #[test]
    fn a_vcpu_may_only_run_and_the_documented_sizes_hold() {
        assert!(allow_list(ThreadKind::Vcpu).eq(COMMON.iter().copied()));
        assert_eq!(
            allowed_ioctls(ThreadKind::Vcpu),
            [
                kvm_requests::KVM_RUN(),
                kvm_requests::KVM_GET_REGS(),
                kvm_requests::KVM_SET_GSI_ROUTING(),
                kvm_requests::KVM_IOEVENTFD(),
            ]
        );
        let sizes: Vec<(usize, usize)> = ThreadKind::ALL.into_iter().map(filter_size).collect();
        // Vmm, Vcpu, HttpApi, BlockIo, StreamIo, EventMonitor, PageFault, NetIo, WriteFault.
        assert_eq!(
            sizes,
            [
                (91, 66),
                (27, 4),
                (50, 0),
                (43, 0),
                (32, 0),
                (28, 0),
                (30, 3),
                (33, 0),
                (32, 1)
            ]
        );
    }

    /// A thread installs its own filter under the one it inherited, so the starter's list needs
    /// seccomp(2): the control loop starts vCPU, device and page-fault threads. A vCPU starts
    /// none (devices are activated on the control loop), so it may not.
    #[test]
    fn only_the_control_loop_may_install_filters() {
        for kind in ThreadKind::ALL {
            assert_eq!(
                allow_list(kind).any(|call| call == libc::SYS_seccomp),
                kind == ThreadKind::Vmm,
                "{kind:?}"
            );
        }
    }

    /// The real stacking, under Errno instead of Trap so the test survives a refusal: a thread
    /// under the control loop's filter starts a vCPU thread and a block I/O thread, each of which
    /// installs its own filter.
    #[test]
    fn filters_stack_from_the_control_loop_to_vcpu_and_block_io_threads() {
        let install = |kind| {
            let program = build_filter(kind, SeccompAction::Errno(1)).unwrap();
            seccompiler::apply_filter(&program).map_err(|e| format!("{kind:?}: {e}"))
        };
        let outcome = std::thread::spawn(move || {
            install(ThreadKind::Vmm)?;
            for kind in [ThreadKind::Vcpu, ThreadKind::BlockIo] {
                std::thread::spawn(move || install(kind))
                    .join()
                    .map_err(|_| format!("{kind:?} thread panicked"))??;
            }
            Ok::<(), String>(())
        })
        .join()
        .unwrap();
        assert_eq!(outcome, Ok(()));
    }

    /// Runs `calls` on a fresh thread under `kind`'s filter (Errno(EPERM) for a refusal, so the
    /// test survives it) and returns what it returns.
    fn errnos_under(kind: ThreadKind, calls: fn() -> Vec<i32>) -> Vec<i32> {
        std::thread::spawn(move || {
            let program = build_filter(kind, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
            seccompiler::apply_filter(&program).unwrap();
            calls()
        })
        .join()
        .unwrap()
    }

    /// The errno of a call that returned `result` (0 for success), read right after it.
    fn errno_of(result: libc::c_long) -> i32 {
        if result < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    /// A vCPU thread does no disk I/O and only the ioctls of running: a `pwrite64`, a
    /// `fallocate`, a KVM request of the control loop and a terminal request are refused; KVM_RUN
    /// passes the filter (and fails with ENOTTY on a file that is no vCPU).
    #[test]
    fn a_vcpu_thread_is_denied_block_io_and_foreign_ioctls() {
        let errnos = errnos_under(ThreadKind::Vcpu, || {
            let fd = libc::STDERR_FILENO;
            let byte = [0u8; 1];
            // SAFETY: plain system calls on a descriptor the process has, with a live buffer;
            // each is either refused by the filter or fails harmlessly.
            unsafe {
                vec![
                    errno_of(libc::pwrite64(fd, byte.as_ptr().cast(), 0, 1 << 40) as _),
                    errno_of(libc::fallocate(fd, 0, 0, 1).into()),
                    errno_of(libc::ioctl(fd, kvm_requests::KVM_CREATE_VM() as _, 0).into()),
                    errno_of(libc::ioctl(fd, libc::TCGETS as _, 0).into()),
                    errno_of(libc::ioctl(fd, kvm_requests::KVM_RUN() as _, 0).into()),
                ]
            }
        });
        assert_eq!(
            &errnos[..4],
            &[libc::EPERM; 4],
            "pwrite64, fallocate, KVM_CREATE_VM, TCGETS"
        );
        assert_eq!(errnos[4], libc::ENOTTY, "KVM_RUN was filtered out");
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
