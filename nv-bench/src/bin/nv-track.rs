//! `nv-track`: the floor of guest write tracking on this host, per page and per epoch, for the
//! continuous NV checkpoints (issue 16; docs/checkpoints.md section 7).
//!
//! A minimal KVM guest (one vCPU started directly at ring 3 in 64-bit mode, where this nested
//! host runs guest code natively) loops: increment one word in each of `N` distinct 4 KiB pages
//! (adjacent, or `stride` pages apart), read one word of each of `R` other pages, then write to an unbacked guest-physical address
//! (an MMIO exit: the end of one epoch). Between epochs the host re-arms write tracking the way
//! a checkpoint would, in one of these modes:
//!
//! - `none`: no tracking (the baseline);
//! - `uffd-wp`: guest RAM is a shared memfd mapping registered with userfaultfd write-protect
//!   mode; each epoch write-protects the whole data area with one `UFFDIO_WRITEPROTECT`, and a
//!   handler thread serves each first write as the VMM's tracker does: copy the page's old
//!   4 KiB out, lift the protection of that page (which wakes the vCPU);
//! - `uffd-wp-block64`: as `uffd-wp`, but each fault copies and lifts the faulting page's
//!   aligned 64-page block, as the VMM logs a block per fault (`BLOCK_PAGES`);
//! - `dirty-log`: the memory slot has `KVM_MEM_LOG_DIRTY_PAGES`; each epoch `KVM_GET_DIRTY_LOG`
//!   (which also write-protects the dirty pages again inside KVM);
//! - `dirty-log-manual`: as `dirty-log` with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled:
//!   `KVM_GET_DIRTY_LOG` only reads, `KVM_CLEAR_DIRTY_LOG` of the pages found re-protects them
//!   (only if this KVM offers the capability).
//!
//! Each mode gets a fresh VM and memory, a few untimed warm-up epochs, then `epochs` timed
//! ones. It prints, per mode and `(N, R)`: the median guest time per epoch (KVM_RUN to the
//! MMIO exit), the median re-arm time (host side, with the vCPU stopped: part of a checkpoint's
//! pause), what the mode saw per epoch (write faults for the uffd modes, dirty pages for the
//! dirty log: a check that it tracks), and the per-page cost
//! against `none`; then for `pages_per_epoch` the throughput bound each mode implies at a
//! 10 ms interval: `10 ms / (10 ms + extra guest time + re-arm)`.
//!
//! The sweep ends with the sparse shape: one written page in each 64-page block of 32 MiB,
//! the pattern of a guest writing at random (kvstore), for which that bound does not hold:
//! each written page costs a block's fault.
//!
//! `nv-track [pages_per_epoch] [epochs]` (defaults 1100, kvstore's pages per 10 ms epoch, and 20);
//! `nv-track pages epochs <mode> <writes> <reads> [stride]` runs one mode and shape alone (for
//! tracing: `perf stat -e 'kvm:*' -e 'kvmmmu:*' nv-track 1100 100 uffd-wp 0 1100`).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_segment, kvm_userspace_memory_region, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

#[path = "../monotonic.rs"]
mod monotonic;

use monotonic::monotonic_ns;

const PAGE: usize = 4096;
const GDT: usize = 0x1000;
const TSS: usize = 0x2000;
const PML4: usize = 0x3000;
const CODE: usize = 0x10000;
/// The most pages a row writes, or only reads, per epoch (arguments above are clamped to it).
const MAX_PAGES: usize = 8192;
/// The pages written per epoch start here, the pages only read right after the largest sweep of
/// written pages.
const WRITE_BASE: usize = 16 << 20;
const READ_BASE: usize = WRITE_BASE + MAX_PAGES * PAGE;
/// Guest RAM: one slot at guest-physical 0, up to the end of the largest sweep of read pages
/// (a sweep past it reads unbacked memory, which exits as MMIO and ends the run).
const RAM: usize = READ_BASE + MAX_PAGES * PAGE;
// The full run once asked for 4,097 pages per epoch (kvstore's count at 10 ms with 4M keys) when
// RAM ended 16 MiB after READ_BASE: the sweep of read pages ran past it and the run ended on an
// MMIO read. The layout is checked when this builds.
const _: () = {
    assert!(CODE < WRITE_BASE);
    assert!(WRITE_BASE + MAX_PAGES * PAGE <= READ_BASE);
    assert!(READ_BASE + MAX_PAGES * PAGE <= RAM);
    // The identity page tables map the first GiB; the exit address is unbacked but mapped.
    assert!(RAM <= 1 << 30);
    assert!(EXIT_ADDRESS as usize >= RAM && EXIT_ADDRESS < 1 << 30);
};
/// An unbacked guest-physical address inside the guest's page tables: a write exits (MMIO).
const EXIT_ADDRESS: u64 = 0x3000_0000;
const WARM_UP_EPOCHS: usize = 3;
/// The sparse shape: one written page in each 64-page block of 32 MiB.
const SPARSE_STRIDE: usize = 64;
const SPARSE_WRITES: usize = MAX_PAGES / SPARSE_STRIDE;

/// The guest, assembled from:
/// ```text
/// top:  mov %rdi,%rax; mov %rsi,%r9; test %r9,%r9; jz reads
/// w:    incq (%rax); add %r8,%rax; dec %r9; jnz w
/// reads: mov %rdx,%rax; mov %rcx,%r9; test %r9,%r9; jz done
/// r:    add (%rax),%r10; add $4096,%rax; dec %r9; jnz r
/// done: movl %eax,0x30000000; jmp top
/// ```
/// (`%r8` is the stride between written pages, in bytes.)
const GUEST_CODE: [u8; 56] = [
    0x48, 0x89, 0xf8, 0x49, 0x89, 0xf1, 0x4d, 0x85, 0xc9, 0x74, 0x0b, 0x48, 0xff, 0x00, 0x4c, 0x01,
    0xc0, 0x49, 0xff, 0xc9, 0x75, 0xf5, 0x48, 0x89, 0xd0, 0x49, 0x89, 0xc9, 0x4d, 0x85, 0xc9, 0x74,
    0x0e, 0x4c, 0x03, 0x10, 0x48, 0x05, 0x00, 0x10, 0x00, 0x00, 0x49, 0xff, 0xc9, 0x75, 0xf2, 0x89,
    0x04, 0x25, 0x00, 0x00, 0x00, 0x30, 0xeb, 0xc8,
];

// linux/userfaultfd.h, the few pieces used here.
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const fn uffd_request(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const UFFDIO_API: u64 = uffd_request(0x3F, 24);
const UFFDIO_REGISTER: u64 = uffd_request(0x00, 32);
const UFFDIO_WRITEPROTECT: u64 = uffd_request(0x06, 24);
/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: u64 = (3 << 30) | (24 << 16) | (0xAE << 8) | 0xc0;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioWriteprotect {
    start: u64,
    len: u64,
    mode: u64,
}
#[repr(C)]
struct UffdMsg {
    event: u8,
    reserved: [u8; 7],
    flags: u64,
    address: u64,
    rest: u64,
}
#[repr(C)]
struct KvmClearDirtyLog {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    bitmap: u64,
}

fn fail(what: &str, error: impl std::fmt::Display) -> ! {
    eprintln!("nv-track: {what}: {error}");
    std::process::exit(1)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    None,
    UffdWp,
    UffdWpBlock,
    DirtyLog,
    DirtyLogManual,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::UffdWp => "uffd-wp",
            Mode::UffdWpBlock => "uffd-wp-block64",
            Mode::DirtyLog => "dirty-log",
            Mode::DirtyLogManual => "dirty-log-manual",
        }
    }
}

/// Guest RAM: a shared memfd mapping (as the VMM maps an NV region on tmpfs).
struct Ram {
    host: *mut u8,
    _file: File,
}

impl Ram {
    fn new() -> Ram {
        // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new fd.
        let fd = unsafe { libc::memfd_create(c"nv-track".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            fail("memfd_create", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(RAM as u64)
            .unwrap_or_else(|e| fail("sizing guest RAM", e));
        // SAFETY: a new shared mapping of the whole memfd; nothing else refers to that range.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if host == libc::MAP_FAILED {
            fail("mapping guest RAM", std::io::Error::last_os_error());
        }
        let ram = Ram {
            host: host.cast(),
            _file: file,
        };
        // Every page exists before the guest runs (first allocation is no part of tracking).
        for page in (0..RAM).step_by(PAGE) {
            ram.write_u64(page, 0);
        }
        ram.lay_out_guest();
        ram
    }

    fn write_u64(&self, offset: usize, value: u64) {
        assert!(offset + 8 <= RAM);
        // SAFETY: `offset + 8` is inside the live mapping of RAM bytes.
        unsafe { self.host.add(offset).cast::<u64>().write_unaligned(value) }
    }

    /// GDT, TSS, identity page tables (2 MiB pages, user-accessible, the first GiB) and code.
    fn lay_out_guest(&self) {
        let gdt: [u64; 7] = [
            0,
            0x00af_9a00_0000_ffff,
            0x00cf_9200_0000_ffff,
            0x00cf_f200_0000_ffff,
            0x00af_fa00_0000_ffff,
            0x67 | ((TSS as u64) << 16) | (0x89 << 40),
            0,
        ];
        for (i, entry) in gdt.iter().enumerate() {
            self.write_u64(GDT + i * 8, *entry);
        }
        self.write_u64(PML4, (PML4 + PAGE) as u64 | 7);
        self.write_u64(PML4 + PAGE, (PML4 + 2 * PAGE) as u64 | 7);
        for i in 0..512u64 {
            self.write_u64(PML4 + 2 * PAGE + i as usize * 8, (i << 21) | 0x87);
        }
        for (i, byte) in GUEST_CODE.iter().enumerate() {
            // SAFETY: CODE + i is inside the live mapping.
            unsafe { self.host.add(CODE + i).write(*byte) };
        }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: `host` is the mapping of RAM bytes made in `new`; the VM using it is gone.
        unsafe { libc::munmap(self.host.cast(), RAM) };
    }
}

fn segment(selector: u16, type_: u8, dpl: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn start_at_ring3(vcpu: &VcpuFd, writes: usize, reads: usize, stride: usize) {
    let mut sregs = vcpu
        .get_sregs()
        .unwrap_or_else(|e| fail("KVM_GET_SREGS", e));
    sregs.cr0 = 0x8005_0033;
    sregs.cr3 = PML4 as u64;
    sregs.cr4 = 0x20;
    sregs.efer = 0x500;
    sregs.cs = segment(0x23, 11, 3, true);
    let data = segment(0x1b, 3, 3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.ss = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.tr = kvm_segment {
        base: TSS as u64,
        limit: 0x67,
        selector: 0x28,
        type_: 11,
        present: 1,
        s: 0,
        ..segment(0x28, 11, 0, false)
    };
    sregs.gdt.base = GDT as u64;
    sregs.gdt.limit = 7 * 8 - 1;
    vcpu.set_sregs(&sregs)
        .unwrap_or_else(|e| fail("KVM_SET_SREGS", e));
    let mut regs = vcpu.get_regs().unwrap_or_else(|e| fail("KVM_GET_REGS", e));
    regs.rip = CODE as u64;
    regs.rflags = 2;
    regs.rdi = WRITE_BASE as u64;
    regs.rsi = writes as u64;
    regs.rdx = READ_BASE as u64;
    regs.rcx = reads as u64;
    regs.r8 = (stride * PAGE) as u64;
    vcpu.set_regs(&regs)
        .unwrap_or_else(|e| fail("KVM_SET_REGS", e));
}

/// Runs the guest to the end of its epoch; returns ns spent in KVM_RUN.
fn run_epoch(vcpu: &mut VcpuFd) -> u128 {
    let started = monotonic_ns();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::MmioWrite(address, _)) if address == EXIT_ADDRESS => break,
            Ok(VcpuExit::Intr) => continue,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Ok(other) => fail("guest exit", format!("{other:?}")),
            Err(e) => fail("KVM_RUN", e),
        }
    }
    monotonic_ns() - started
}

fn uffd_ioctl<T>(uffd: &OwnedFd, request: u64, argument: &mut T) -> std::io::Result<()> {
    // SAFETY: `uffd` is an open userfaultfd and `argument` the repr(C) struct `request` names.
    let result = unsafe { libc::ioctl(uffd.as_raw_fd(), request as _, argument as *mut T) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn write_protect(uffd: &OwnedFd, start: u64, len: u64, protect: bool) {
    let mut wp = UffdioWriteprotect {
        start,
        len,
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    uffd_ioctl(uffd, UFFDIO_WRITEPROTECT, &mut wp)
        .unwrap_or_else(|e| fail("UFFDIO_WRITEPROTECT", e));
}

/// A userfaultfd in write-protect mode over all of guest RAM and the thread serving it.
fn start_uffd(ram: &Ram, faults: Arc<AtomicU64>, block_pages: usize) -> Arc<OwnedFd> {
    // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        fail("userfaultfd", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    let uffd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        ioctls: 0,
    };
    uffd_ioctl(&uffd, UFFDIO_API, &mut api).unwrap_or_else(|e| fail("UFFDIO_API", e));
    let mut register = UffdioRegister {
        start: ram.host as u64,
        len: RAM as u64,
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    uffd_ioctl(&uffd, UFFDIO_REGISTER, &mut register)
        .unwrap_or_else(|e| fail("UFFDIO_REGISTER", e));
    let server = Arc::clone(&uffd);
    // The thread blocks in read(2) once the mode is over; the process exit ends it.
    std::thread::spawn(move || {
        let block = block_pages * PAGE;
        let mut undo = vec![0u8; block];
        loop {
            let mut message = UffdMsg {
                event: 0,
                reserved: [0; 7],
                flags: 0,
                address: 0,
                rest: 0,
            };
            // SAFETY: reads one 32-byte uffd_msg into `message`, which lives across the call.
            let read = unsafe {
                libc::read(
                    server.as_raw_fd(),
                    (&mut message as *mut UffdMsg).cast(),
                    size_of::<UffdMsg>(),
                )
            };
            if read != size_of::<UffdMsg>() as isize || message.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let start = message.address & !(block as u64 - 1);
            // SAFETY: `start` is an aligned block of the registered, still mapped guest RAM
            // (RAM is a multiple of the block): copy its old content out, as the VMM's tracker
            // copies it into the undo log.
            unsafe { std::ptr::copy_nonoverlapping(start as *const u8, undo.as_mut_ptr(), block) };
            write_protect(&server, start, block as u64, false);
            faults.fetch_add(1, Ordering::Relaxed);
        }
    });
    uffd
}

fn dirty_pages(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|word| u64::from(word.count_ones())).sum()
}

/// Copies every page set in `bitmap` (one bit per page of guest RAM) into `staging`.
fn copy_dirty(ram: &Ram, bitmap: &[u64], staging: &mut [u8]) {
    for (word_index, word) in bitmap.iter().enumerate() {
        let mut bits = *word;
        while bits != 0 {
            let page = word_index * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let offset = page * PAGE;
            // SAFETY: `offset + PAGE <= RAM` (the bitmap has one bit per page of the slot),
            // inside both the live guest mapping and `staging`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    ram.host.add(offset),
                    staging.as_mut_ptr().add(offset),
                    PAGE,
                )
            };
        }
    }
    // The copy is the measured work: keep the optimiser from dropping writes nobody reads.
    std::hint::black_box(staging);
}

fn clear_dirty_log(vm: &VmFd, bitmap: &mut [u64]) {
    let mut clear = KvmClearDirtyLog {
        slot: 0,
        num_pages: (RAM / PAGE) as u32,
        first_page: 0,
        bitmap: bitmap.as_mut_ptr() as u64,
    };
    // SAFETY: `clear` is a kvm_clear_dirty_log naming slot 0 and a bitmap of one bit per page
    // of the slot, which lives across the call.
    let result = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG as _, &mut clear) };
    if result != 0 {
        fail("KVM_CLEAR_DIRTY_LOG", std::io::Error::last_os_error());
    }
}

struct Sample {
    guest_us: f64,
    rearm_us: f64,
    seen: f64,
    /// Copying the pages the dirty log found to a staging area (a redo design's work in the
    /// pause), median per epoch.
    copy_us: f64,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One mode and shape: `writes` pages written `stride` pages apart, `reads` pages read.
fn measure(
    kvm: &Kvm,
    mode: Mode,
    (writes, reads, stride): (usize, usize, usize),
    epochs: usize,
) -> Sample {
    let ram = Ram::new();
    let vm = kvm.create_vm().unwrap_or_else(|e| fail("KVM_CREATE_VM", e));
    if mode == Mode::DirtyLogManual {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = 1;
        vm.enable_cap(&cap)
            .unwrap_or_else(|e| fail("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", e));
    }
    let flags = match mode {
        Mode::DirtyLog | Mode::DirtyLogManual => KVM_MEM_LOG_DIRTY_PAGES,
        _ => 0,
    };
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags,
        guest_phys_addr: 0,
        memory_size: RAM as u64,
        userspace_addr: ram.host as u64,
    };
    // SAFETY: the slot covers exactly `ram`'s mapping, which outlives the VM (dropped first).
    unsafe { vm.set_user_memory_region(slot) }
        .unwrap_or_else(|e| fail("KVM_SET_USER_MEMORY_REGION", e));
    let mut vcpu = vm
        .create_vcpu(0)
        .unwrap_or_else(|e| fail("KVM_CREATE_VCPU", e));
    start_at_ring3(&vcpu, writes, reads, stride);
    let faults = Arc::new(AtomicU64::new(0));
    let uffd = match mode {
        Mode::UffdWp => Some(start_uffd(&ram, Arc::clone(&faults), 1)),
        Mode::UffdWpBlock => Some(start_uffd(&ram, Arc::clone(&faults), 64)),
        _ => None,
    };
    let data_start = ram.host as u64 + WRITE_BASE as u64;
    let data_len = (RAM - WRITE_BASE) as u64;

    let (mut guest, mut rearm, mut seen, mut copy) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut staging = vec![0u8; RAM];
    for epoch in 0..WARM_UP_EPOCHS + epochs {
        // The checkpoint's share: re-arm tracking with the vCPU stopped.
        let rearm_started = monotonic_ns();
        let mut copy_ns = 0;
        let pages = match mode {
            Mode::None => 0,
            Mode::UffdWp | Mode::UffdWpBlock => {
                write_protect(uffd.as_ref().unwrap(), data_start, data_len, true);
                faults.swap(0, Ordering::Relaxed)
            }
            Mode::DirtyLog => {
                let bitmap = vm
                    .get_dirty_log(0, RAM)
                    .unwrap_or_else(|e| fail("KVM_GET_DIRTY_LOG", e));
                let copy_started = monotonic_ns();
                copy_dirty(&ram, &bitmap, &mut staging);
                copy_ns = monotonic_ns() - copy_started;
                dirty_pages(&bitmap)
            }
            Mode::DirtyLogManual => {
                let mut bitmap = vm
                    .get_dirty_log(0, RAM)
                    .unwrap_or_else(|e| fail("KVM_GET_DIRTY_LOG", e));
                let pages = dirty_pages(&bitmap);
                clear_dirty_log(&vm, &mut bitmap);
                let copy_started = monotonic_ns();
                copy_dirty(&ram, &bitmap, &mut staging);
                copy_ns = monotonic_ns() - copy_started;
                pages
            }
        };
        let rearm_ns = monotonic_ns() - rearm_started - copy_ns;
        let guest_ns = run_epoch(&mut vcpu);
        // Pages seen are those of the previous epoch: keep them once a timed epoch ran.
        if epoch > WARM_UP_EPOCHS {
            seen.push(pages as f64);
        }
        if epoch >= WARM_UP_EPOCHS {
            guest.push(guest_ns as f64 / 1e3);
            rearm.push(rearm_ns as f64 / 1e3);
            copy.push(copy_ns as f64 / 1e3);
        }
    }
    drop(vcpu);
    drop(vm);
    Sample {
        guest_us: median(&mut guest),
        rearm_us: median(&mut rearm),
        seen: if seen.is_empty() {
            0.0
        } else {
            median(&mut seen)
        },
        copy_us: median(&mut copy),
    }
}

fn main() {
    let arguments: Vec<String> = std::env::args().collect();
    let number = |index: usize, default: usize| -> usize {
        arguments
            .get(index)
            .map(|text| text.parse().unwrap_or_else(|e| fail("arguments", e)))
            .unwrap_or(default)
    };
    let kvstore_pages = number(1, 1100).clamp(1, MAX_PAGES);
    let epochs = number(2, 20).max(1);
    let kvm = Kvm::new().unwrap_or_else(|e| fail("opening /dev/kvm", e));
    if let Some(name) = arguments.get(3) {
        // One mode and shape alone, e.g. under `perf stat -e 'kvm:*'`.
        let mode = [
            Mode::None,
            Mode::UffdWp,
            Mode::UffdWpBlock,
            Mode::DirtyLog,
            Mode::DirtyLogManual,
        ]
        .into_iter()
        .find(|mode| mode.name() == name)
        .unwrap_or_else(|| fail("mode", name));
        let stride = number(6, 1).clamp(1, MAX_PAGES);
        let (writes, reads) = (
            number(4, kvstore_pages).min(MAX_PAGES / stride),
            number(5, 0).min(MAX_PAGES),
        );
        let sample = measure(&kvm, mode, (writes, reads, stride), epochs);
        println!(
            "{} writes={writes} reads={reads} stride={stride}: guest {:.1} us, rearm {:.1} us, \
             copy {:.1} us, seen {:.0} per epoch",
            mode.name(),
            sample.guest_us,
            sample.rearm_us,
            sample.copy_us,
            sample.seen
        );
        return;
    }
    let manual = kvm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    let mut modes = vec![Mode::None, Mode::UffdWp, Mode::UffdWpBlock, Mode::DirtyLog];
    if manual & 1 != 0 {
        modes.push(Mode::DirtyLogManual);
    }
    println!(
        "nv-track: {epochs} timed epochs per row (medians), guest at ring 3, RAM a shared memfd; \
         KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = {manual:#x}"
    );
    println!(
        "{:<17} {:>6} {:>6} {:>6} {:>12} {:>10} {:>9} {:>8} {:>11} {:>9}",
        "mode",
        "writes",
        "stride",
        "reads",
        "guest us",
        "rearm us",
        "copy us",
        "seen",
        "us/written",
        "us/read"
    );
    // (writes, reads, stride): a sweep of adjacent written pages, then reads only, to see
    // whether re-arming makes pages that are only read expensive too (the zap hypothesis),
    // then one written page in each 64-page block of 32 MiB: kvstore's pattern (random
    // 16-byte slots of a table of that size), where every write in an epoch's first part
    // lands in a block not lifted yet.
    let mut shapes: Vec<(usize, usize, usize)> = [64, 256, kvstore_pages, 4096]
        .into_iter()
        .map(|n| (n, 0, 1))
        .collect();
    shapes.push((0, kvstore_pages, 1));
    shapes.push((SPARSE_WRITES, 0, SPARSE_STRIDE));
    let mut at_kvstore = Vec::new();
    let mut sparse = Vec::new();
    for &(writes, reads, stride) in &shapes {
        let mut baseline = None;
        for &mode in &modes {
            let sample = measure(&kvm, mode, (writes, reads, stride), epochs);
            let base = *baseline.get_or_insert(sample.guest_us);
            let extra = (sample.guest_us - base).max(0.0);
            let per = |n: usize| {
                if n == 0 {
                    "-".to_string()
                } else {
                    format!("{:.2}", extra / n as f64)
                }
            };
            println!(
                "{:<17} {:>6} {:>6} {:>6} {:>12.1} {:>10.1} {:>9.1} {:>8.0} {:>11} {:>9}",
                mode.name(),
                writes,
                stride,
                reads,
                sample.guest_us,
                sample.rearm_us,
                sample.copy_us,
                sample.seen,
                if reads == 0 { per(writes) } else { "-".into() },
                if writes == 0 { per(reads) } else { "-".into() },
            );
            if writes == kvstore_pages && reads == 0 && stride == 1 {
                at_kvstore.push((mode, extra, sample.rearm_us, sample.copy_us));
            }
            if stride == SPARSE_STRIDE {
                sparse.push((mode, extra / writes as f64));
            }
        }
    }
    let interval_us = 10_000.0;
    for (mode, extra, rearm, copy) in at_kvstore {
        // A redo design (dirty log) copies the dirty pages in the pause too: counted.
        let ratio = interval_us / (interval_us + extra + rearm + copy);
        // Pages per 10 ms epoch this mode could track and keep 0.9x.
        let per_page = extra / kvstore_pages as f64;
        let budget = interval_us / 0.9 - interval_us - rearm - copy;
        let pages_at_goal = if per_page > 0.0 {
            format!("{:.0}", (budget / per_page).max(0.0))
        } else {
            "any".into()
        };
        println!(
            "bound at 10 ms for {kvstore_pages} pages/epoch: {:<17} ratio vs none = {ratio:.3}x \
             (extra {extra:.0} us in the guest + {rearm:.0} us re-arm + {copy:.0} us copying the \
             dirty pages per epoch); pages/epoch that keep 0.9x: {pages_at_goal}",
            mode.name()
        );
    }
    // The bound above assumes adjacent pages and an epoch that stretches by the extra time.
    // A guest writing at random pays a whole block's fault for each written page until most
    // blocks are lifted, within a fixed interval: what one such write costs.
    for (mode, per_write) in sparse {
        println!(
            "one written page per 64-page block ({SPARSE_WRITES} blocks, kvstore's pattern): \
             {:<17} {per_write:.1} us per written page; writes per 10 ms epoch at that cost: {}",
            mode.name(),
            if per_write > 0.0 {
                format!("{:.0}", interval_us / per_write)
            } else {
                "any".into()
            }
        );
    }
}
