//! Lazy guest RAM for `memory_restore_mode: OnDemand`: the restored VM's anonymous RAM is
//! registered with a userfaultfd and stays empty; the first touch of a page (by a vCPU through
//! KVM, or by the VMM itself) blocks in the kernel until a fault-serving thread fills it from
//! `memory-ranges` with `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE` for a page of zeros). The restore
//! itself then reads nothing: the VM runs before its memory is back, paying per page later.
//!
//! Faults are served a block of `BLOCK_PAGES` at a time (the block around the faulting page),
//! which costs one wake-up for the neighbours a guest usually touches next.
//!
//! The server thread lives as long as the registered memory: it asks for unmap events
//! (`UFFD_FEATURE_EVENT_UNMAP`) and ends when every registered range is unmapped, i.e. when the
//! VM's memory is dropped. It never closes the userfaultfd while memory is still registered:
//! that would turn every later first touch into a silent zero page.
//!
//! The same userfaultfd speaks write-protect mode for NV checkpoints ([`WriteTracker`]): guest
//! RAM (a shared mapping of the region) is registered with `UFFDIO_REGISTER_MODE_WP`; at each
//! epoch all of it is write-protected with `UFFDIO_WRITEPROTECT`, and the first write to a page
//! (by a vCPU through KVM, whose MMU notifier drops its writable mapping, or by a device thread)
//! blocks until the tracker's thread handed the page's old content to a [`FirstWriteSink`] (the
//! undo log) and lifted the protection of that page.
//!
//! The ioctl interface is `linux/userfaultfd.h`; the libc crate does not carry it, so the few
//! structs and request numbers are spelled out here.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use crate::config::SeccompMode;
use crate::seccomp_filters::{apply_filter_for_mode, ThreadKind};

const PAGE_SIZE: usize = 4096;
/// Pages filled per fault: the faulting page's aligned block of 64 KiB.
const BLOCK_PAGES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("userfaultfd(2) failed: {0} (needs a kernel with CONFIG_USERFAULTFD, a container seccomp profile that allows the call, and for a VMM without CAP_SYS_PTRACE /proc/sys/vm/unprivileged_userfaultfd=1; memory_restore_mode=Copy needs none of these)")]
    Create(#[source] std::io::Error),
    #[error("UFFDIO_API failed: {0}")]
    Api(#[source] std::io::Error),
    #[error("the host userfaultfd lacks {0}")]
    MissingFeature(&'static str),
    #[error("UFFDIO_REGISTER of {length:#x} bytes at {address:#x} failed: {source}")]
    Register {
        address: usize,
        length: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("lazy range {index} ({length:#x} bytes at source offset {offset:#x}) is not page aligned or lies outside the {source_length:#x}-byte source")]
    BadRange {
        index: usize,
        offset: usize,
        length: usize,
        source_length: usize,
    },
    #[error("mapping the page source ({length:#x} bytes) failed: {source}")]
    MapSource {
        length: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the page-fault thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("page-fault thread: {0}")]
    Seccomp(String),
    #[error("UFFDIO_WRITEPROTECT of {length:#x} bytes at {address:#x} failed: {source}")]
    WriteProtect {
        address: usize,
        length: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the write tracker's stop EventFd: {0}")]
    StopEvent(#[source] std::io::Error),
    #[error("cloning the write tracker's attention EventFd: {0}")]
    Attention(#[source] std::io::Error),
}

/// One range of guest RAM to fill lazily: `length` bytes at host address `host_address`, whose
/// content is at `source_offset` in the page source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LazyRange {
    pub host_address: usize,
    pub length: usize,
    pub source_offset: usize,
}

/// What the server did, reported when it ends (all registered memory unmapped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeReport {
    pub faults: u64,
    pub pages_copied: u64,
    pub pages_zeroed: u64,
}

// linux/userfaultfd.h
const UFFD_API: u64 = 0xAA;
const UFFDIO_TYPE: u64 = 0xAA;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1;
const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_UNMAP: u8 = 0x16;
const NR_REGISTER: u64 = 0x00;
const NR_WAKE: u64 = 0x02;
const NR_COPY: u64 = 0x03;
const NR_ZEROPAGE: u64 = 0x04;
const NR_WRITEPROTECT: u64 = 0x06;
const NR_API: u64 = 0x3F;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg`: the event byte, padding, then a 24-byte union. For a page fault the union
/// holds (flags, address, thread id); for an unmap (start, end).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

/// `_IOWR(UFFDIO, nr, T)` / `_IOR(UFFDIO, nr, T)` of `asm-generic/ioctl.h`.
const fn ioctl_request(direction: u64, nr: u64, size: usize) -> u64 {
    (direction << 30) | ((size as u64) << 16) | (UFFDIO_TYPE << 8) | nr
}
const READ_WRITE: u64 = 3;
const READ: u64 = 2;
pub(crate) const UFFDIO_API: u64 = ioctl_request(READ_WRITE, NR_API, size_of::<UffdioApi>());
pub(crate) const UFFDIO_REGISTER: u64 =
    ioctl_request(READ_WRITE, NR_REGISTER, size_of::<UffdioRegister>());
pub(crate) const UFFDIO_WAKE: u64 = ioctl_request(READ, NR_WAKE, size_of::<UffdioRange>());
pub(crate) const UFFDIO_COPY: u64 = ioctl_request(READ_WRITE, NR_COPY, size_of::<UffdioCopy>());
pub(crate) const UFFDIO_ZEROPAGE: u64 =
    ioctl_request(READ_WRITE, NR_ZEROPAGE, size_of::<UffdioZeropage>());
pub(crate) const UFFDIO_WRITEPROTECT: u64 =
    ioctl_request(READ_WRITE, NR_WRITEPROTECT, size_of::<UffdioWriteprotect>());

/// Issues one userfaultfd ioctl whose argument is `argument`.
fn uffd_ioctl<T>(uffd: &OwnedFd, request: u64, argument: &mut T) -> std::io::Result<()> {
    // SAFETY: `uffd` is an open userfaultfd and `argument` is the live, properly laid out
    // (`repr(C)`) struct that `request` names; the kernel reads and writes only that struct.
    let result = unsafe { libc::ioctl(uffd.as_raw_fd(), request as _, argument as *mut T) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A read-only private mapping of the page source (`memory-ranges`): the server copies from it
/// without a system call per page.
struct SourceMapping {
    address: *const u8,
    length: usize,
}

// SAFETY: the mapping is read-only and owned by this value; reading it from another thread is
// fine.
unsafe impl Send for SourceMapping {}

impl SourceMapping {
    fn new(file: &File, length: usize) -> Result<Self, UffdError> {
        if length == 0 {
            return Ok(SourceMapping {
                address: std::ptr::null(),
                length,
            });
        }
        // SAFETY: a fresh read-only private mapping of an open file; the kernel picks the
        // address, and nothing else refers to it until this value owns it.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(UffdError::MapSource {
                length,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(SourceMapping {
            address: address.cast(),
            length,
        })
    }

    /// The page at `offset` (page aligned, inside the mapping: checked when ranges are accepted).
    fn page(&self, offset: usize) -> &[u8] {
        debug_assert!(offset + PAGE_SIZE <= self.length);
        // SAFETY: `offset + PAGE_SIZE <= length` holds for every offset the server computes
        // (ranges are checked against the source length in `start`), and the mapping lives as
        // long as `self`.
        unsafe { std::slice::from_raw_parts(self.address.add(offset), PAGE_SIZE) }
    }
}

impl Drop for SourceMapping {
    fn drop(&mut self) {
        if self.length > 0 {
            // SAFETY: unmapping exactly the mapping this value created and still owns.
            unsafe { libc::munmap(self.address as *mut libc::c_void, self.length) };
        }
    }
}

/// Registers `ranges` (anonymous, private or shared, page-aligned guest RAM that nothing has
/// touched yet) with a new userfaultfd and starts the thread that fills them from `source` on
/// first touch. Returns the thread's handle; dropping it detaches the thread, which ends by
/// itself once every range is unmapped.
pub fn start(
    ranges: Vec<LazyRange>,
    source: &File,
    seccomp: SeccompMode,
) -> Result<JoinHandle<ServeReport>, UffdError> {
    let source_length = source
        .metadata()
        .map_err(|e| UffdError::MapSource {
            length: 0,
            source: e,
        })?
        .len() as usize;
    for (index, range) in ranges.iter().enumerate() {
        let aligned = range.host_address % PAGE_SIZE == 0
            && range.length % PAGE_SIZE == 0
            && range.source_offset % PAGE_SIZE == 0;
        let inside = range
            .source_offset
            .checked_add(range.length)
            .is_some_and(|end| end <= source_length);
        if !aligned || !inside {
            return Err(UffdError::BadRange {
                index,
                offset: range.source_offset,
                length: range.length,
                source_length,
            });
        }
    }
    let source = SourceMapping::new(source, source_length)?;
    let (uffd, features) = open_userfaultfd(UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_MISSING_SHMEM)?;
    if features & UFFD_FEATURE_EVENT_UNMAP == 0 {
        return Err(UffdError::MissingFeature("UFFD_FEATURE_EVENT_UNMAP"));
    }
    let mut zeropage_everywhere = true;
    for range in &ranges {
        let ioctls = register_range(
            &uffd,
            range.host_address,
            range.length,
            UFFDIO_REGISTER_MODE_MISSING,
        )?;
        if ioctls & (1 << NR_COPY) == 0 || ioctls & (1 << NR_WAKE) == 0 {
            return Err(UffdError::MissingFeature("UFFDIO_COPY on guest RAM"));
        }
        zeropage_everywhere &= ioctls & (1 << NR_ZEROPAGE) != 0;
    }
    let server = FaultServer {
        served: ranges
            .iter()
            .map(|range| vec![false; range.length / PAGE_SIZE])
            .collect(),
        mapped: ranges
            .iter()
            .map(|range| (range.host_address, range.host_address + range.length))
            .collect(),
        ranges,
        source,
        uffd,
        use_zeropage: zeropage_everywhere,
        report: ServeReport::default(),
    };
    let (confined_tx, confined) = mpsc::channel();
    let handle = thread::Builder::new()
        .name("uffd-server".into())
        .spawn(move || {
            let filter = apply_filter_for_mode(ThreadKind::PageFault, seccomp);
            let confined = filter.is_ok();
            // The starter waits for this message.
            let _ = confined_tx.send(filter.map_err(|e| e.to_string()));
            if confined {
                server.run()
            } else {
                // Without its filter the thread must not serve; it must not close the
                // userfaultfd either while the memory is registered (see the module doc): the
                // restore fails and drops the memory, which is what ends the registration.
                server.wait_for_unmap()
            }
        })
        .map_err(UffdError::Spawn)?;
    match confined.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(reason)) => Err(UffdError::Seccomp(reason)),
        Err(_) => Err(UffdError::Seccomp(
            "the thread ended before installing its filter".to_string(),
        )),
    }
}

/// A new userfaultfd after the API handshake asking for `features`; returns it and the
/// features the kernel granted.
fn open_userfaultfd(features: u64) -> Result<(OwnedFd, u64), UffdError> {
    let uffd = create_userfaultfd()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    uffd_ioctl(&uffd, UFFDIO_API, &mut api).map_err(UffdError::Api)?;
    Ok((uffd, api.features))
}

/// Registers `length` bytes at `address` in `mode`; returns the ioctls the range allows.
fn register_range(
    uffd: &OwnedFd,
    address: usize,
    length: usize,
    mode: u64,
) -> Result<u64, UffdError> {
    let mut register = UffdioRegister {
        range: UffdioRange {
            start: address as u64,
            len: length as u64,
        },
        mode,
        ioctls: 0,
    };
    uffd_ioctl(uffd, UFFDIO_REGISTER, &mut register).map_err(|source| UffdError::Register {
        address,
        length,
        source,
    })?;
    Ok(register.ioctls)
}

fn create_userfaultfd() -> Result<OwnedFd, UffdError> {
    // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(UffdError::Create(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

struct FaultServer {
    ranges: Vec<LazyRange>,
    /// Per range, per page: already filled (a page is filled at most once; the kernel refuses a
    /// second fill with EEXIST anyway).
    served: Vec<Vec<bool>>,
    /// Registered address intervals not yet unmapped; the server ends when none is left.
    mapped: Vec<(usize, usize)>,
    source: SourceMapping,
    uffd: OwnedFd,
    use_zeropage: bool,
    report: ServeReport,
}

impl FaultServer {
    fn run(mut self) -> ServeReport {
        let mut messages = [UffdMsg::default(); 16];
        while !self.mapped.is_empty() {
            let count = match self.read_messages(&mut messages) {
                Ok(count) => count,
                Err(error) => {
                    // Hanging the guest is better than corrupting it: keep the registration.
                    log::error!("userfaultfd: reading events failed: {error}; retrying");
                    thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            };
            for message in &messages[..count] {
                match message.event {
                    UFFD_EVENT_PAGEFAULT => self.serve_fault(message.arg[1] as usize),
                    UFFD_EVENT_UNMAP => {
                        self.forget_unmapped(message.arg[0] as usize, message.arg[1] as usize)
                    }
                    other => log::warn!("userfaultfd: unexpected event {other:#x}"),
                }
            }
        }
        log::info!(
            "OnDemand restore: memory released after {} faults ({} pages copied, {} zero pages)",
            self.report.faults,
            self.report.pages_copied,
            self.report.pages_zeroed
        );
        self.report
    }

    /// Serves no fault; only waits for the memory to go away (see `start`).
    fn wait_for_unmap(mut self) -> ServeReport {
        let mut messages = [UffdMsg::default(); 16];
        while !self.mapped.is_empty() {
            if let Ok(count) = self.read_messages(&mut messages) {
                for message in &messages[..count] {
                    if message.event == UFFD_EVENT_UNMAP {
                        self.forget_unmapped(message.arg[0] as usize, message.arg[1] as usize);
                    }
                }
            }
        }
        self.report
    }

    /// Waits for and reads the next batch of events.
    fn read_messages(&self, messages: &mut [UffdMsg]) -> std::io::Result<usize> {
        let mut poll = libc::pollfd {
            fd: self.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd, count 1, no timeout.
            let ready = unsafe { libc::poll(&mut poll, 1, -1) };
            if ready >= 0 {
                break;
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
        // SAFETY: reading into a buffer of `messages.len()` plain-data `uffd_msg` structs that
        // we own; the kernel writes whole messages only.
        let read = unsafe {
            libc::read(
                self.uffd.as_raw_fd(),
                messages.as_mut_ptr().cast(),
                std::mem::size_of_val(messages),
            )
        };
        if read < 0 {
            let error = std::io::Error::last_os_error();
            return match error.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(0),
                _ => Err(error),
            };
        }
        Ok(read as usize / size_of::<UffdMsg>())
    }

    fn forget_unmapped(&mut self, start: usize, end: usize) {
        let mut left = Vec::with_capacity(self.mapped.len());
        for &(from, to) in &self.mapped {
            if end <= from || to <= start {
                left.push((from, to));
                continue;
            }
            if from < start {
                left.push((from, start));
            }
            if end < to {
                left.push((end, to));
            }
        }
        self.mapped = left;
    }

    /// Fills the block around `address` (every page of it not filled yet), then wakes whoever
    /// waits on it.
    fn serve_fault(&mut self, address: usize) {
        self.report.faults += 1;
        let Some(index) = self.ranges.iter().position(|range| {
            address >= range.host_address && address < range.host_address + range.length
        }) else {
            log::error!("userfaultfd: fault at {address:#x} outside every restored range");
            return;
        };
        let range = self.ranges[index];
        let pages = range.length / PAGE_SIZE;
        let faulting_page = (address - range.host_address) / PAGE_SIZE;
        let first = faulting_page - faulting_page % BLOCK_PAGES;
        let last = (first + BLOCK_PAGES).min(pages);
        for page in first..last {
            if self.served[index][page] {
                continue;
            }
            let destination = range.host_address + page * PAGE_SIZE;
            let source = self.source.page(range.source_offset + page * PAGE_SIZE);
            let zero = self.use_zeropage && source.iter().all(|&byte| byte == 0);
            let filled = if zero {
                self.zero_page(destination)
            } else {
                self.copy_page(destination, source.as_ptr())
            };
            match filled {
                Ok(()) => {
                    if zero {
                        self.report.pages_zeroed += 1;
                    } else {
                        self.report.pages_copied += 1;
                    }
                    self.served[index][page] = true;
                }
                // Present already: filled through another fault message of the same page.
                Err(error) if error.raw_os_error() == Some(libc::EEXIST) => {
                    self.served[index][page] = true;
                }
                // The range is being unmapped: its unmap event follows.
                Err(error) if error.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(error) => {
                    log::error!("userfaultfd: filling the page at {destination:#x}: {error}")
                }
            }
        }
        let mut wake = UffdioRange {
            start: (range.host_address + first * PAGE_SIZE) as u64,
            len: ((last - first) * PAGE_SIZE) as u64,
        };
        if let Err(error) = uffd_ioctl(&self.uffd, UFFDIO_WAKE, &mut wake) {
            log::error!("userfaultfd: waking the faulting threads: {error}");
        }
    }

    fn copy_page(&self, destination: usize, source: *const u8) -> std::io::Result<()> {
        let mut copy = UffdioCopy {
            dst: destination as u64,
            src: source as u64,
            len: PAGE_SIZE as u64,
            mode: UFFDIO_COPY_MODE_DONTWAKE,
            copy: 0,
        };
        uffd_ioctl(&self.uffd, UFFDIO_COPY, &mut copy)
    }

    fn zero_page(&self, destination: usize) -> std::io::Result<()> {
        let mut zero = UffdioZeropage {
            range: UffdioRange {
                start: destination as u64,
                len: PAGE_SIZE as u64,
            },
            mode: UFFDIO_ZEROPAGE_MODE_DONTWAKE,
            zeropage: 0,
        };
        uffd_ioctl(&self.uffd, UFFDIO_ZEROPAGE, &mut zero)
    }
}

/// What to do with a page after [`FirstWriteSink::record`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirstWrite {
    /// The page's old content is durable (or nothing needs it): lift the protection.
    Lift,
    /// The faulting page and its neighbours in these (offset, length) runs of the same range
    /// are durable: lift their protection (the faulting page must be in one of them).
    LiftRuns(Vec<(usize, usize)>),
    /// The page cannot be recorded now: keep its writer blocked and ask the control loop for
    /// attention (`full`: an early checkpoint makes room; otherwise checkpoints must stop). The
    /// page is recorded again by [`WriteTracker::retry_held`] or released by dropping the
    /// tracker.
    Hold { full: bool, reason: String },
}

/// Records the content of each page written for the first time in an epoch, before the write
/// happens: the undo log. `Lift` must mean the old content is durable, because the write
/// proceeds as soon as the protection is lifted.
pub trait FirstWriteSink: Send {
    /// The page at byte `offset` of tracked range `range_index` is about to be written; its
    /// content is still the epoch's.
    fn record(&mut self, range_index: usize, offset: usize) -> FirstWrite;

    /// A device thread is about to write these pages, (range index, page offset), none of
    /// them writable in the epoch: record all of them, or none (see
    /// [`WriteTracker::prepare_device_write`]).
    fn record_for_device(&mut self, pages: &[(usize, usize)]) -> DeviceWrite;
}

/// What [`WriteTracker::prepare_device_write`] found (and a sink's answer for a device's pages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceWrite {
    /// Every page is recorded: the device may write them (the first write to a page still
    /// faults, and the fault thread lifts it without waiting for room).
    Ready,
    /// Not in this epoch: the log has no room for all of the pages, and none was recorded.
    /// Attention was raised: an early checkpoint follows, and the device asks again after it.
    Full,
    /// Never: the pages are more than an empty log holds.
    TooLarge(String),
    /// Recording failed: attention was raised and checkpoints stop, which lifts every
    /// protection and needs no device to quiesce (a write waits in its fault until then).
    Failed(String),
}

/// One range of guest RAM to track: `length` bytes at host address `host_address` (page
/// aligned, a shared mapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackedRange {
    pub host_address: usize,
    pub length: usize,
}

/// The state the fault thread and the epoch switch share, under one lock: a page is recorded
/// and unprotected wholly inside one epoch, never across a switch (recorded in epoch N,
/// unprotected after epoch N+1 protected everything again would leave it unrecorded in N+1).
struct TrackerShared<S> {
    sink: S,
    /// Faulting pages whose writers wait (host addresses): the sink said `Hold`.
    held: Vec<usize>,
    /// Set when a `Hold` was not for a full log: checkpoints must stop.
    failed: Option<String>,
    /// Pages lifted since the tracker started.
    lifted: u64,
    /// Write faults served since the tracker started.
    faults: u64,
    /// Time spent in the sink and in lifting protections since the tracker started.
    recording: std::time::Duration,
    lifting: std::time::Duration,
    /// Host ranges (address, length) lifted since memory was last protected: the only ones
    /// the next epoch must protect again.
    lifted_ranges: Vec<(usize, usize)>,
    /// All tracked memory was protected once: from then on, protecting the lifted ranges
    /// again protects everything.
    protected: bool,
    /// Per range, one bit per page: lifted since memory was last protected (writable without
    /// a fault in this epoch).
    writable: Vec<Vec<u64>>,
}

impl<S> TrackerShared<S> {
    fn is_writable(&self, range_index: usize, page: usize) -> bool {
        self.writable[range_index][page / 64] & (1 << (page % 64)) != 0
    }

    /// Marks pages `first..first + count` of range `range_index` writable (or not).
    fn mark_writable(&mut self, range_index: usize, first: usize, count: usize, writable: bool) {
        let bits = &mut self.writable[range_index];
        for page in first..first + count {
            if page / 64 >= bits.len() {
                break;
            }
            if writable {
                bits[page / 64] |= 1 << (page % 64);
            } else {
                bits[page / 64] &= !(1 << (page % 64));
            }
        }
    }

    /// Forgets which pages are writable in `(address, length)` of host memory.
    fn forget_writable(&mut self, ranges: &[TrackedRange], address: usize, length: usize) {
        for (index, range) in ranges.iter().enumerate() {
            let start = address.max(range.host_address);
            let end = (address + length).min(range.host_address + range.length);
            if start < end {
                let first = (start - range.host_address) / PAGE_SIZE;
                let count = (end - start).div_ceil(PAGE_SIZE);
                self.mark_writable(index, first, count, false);
            }
        }
    }
}

/// What the fault thread has done since the tracker started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteTrackerStats {
    /// Write faults served (a page held and retried counts each time).
    pub faults: u64,
    /// Pages whose protection was lifted (a block logged on one fault counts every page).
    pub lifted_pages: u64,
    /// Time in the sink (the undo log: copy and persist).
    pub recording: std::time::Duration,
    /// Time in `UFFDIO_WRITEPROTECT` lifting protections (which also wakes the writer).
    pub lifting: std::time::Duration,
}

/// Write-protect tracking of guest RAM through one userfaultfd and one fault thread (see the
/// module doc). Dropping it lifts every protection, wakes every waiting writer, stops the
/// thread and closes the userfaultfd.
pub struct WriteTracker<S: FirstWriteSink + 'static> {
    uffd: std::sync::Arc<OwnedFd>,
    ranges: Vec<TrackedRange>,
    /// The device threads' door to the same state.
    devices: std::sync::Arc<DeviceWrites<S>>,
    shared: std::sync::Arc<std::sync::Mutex<TrackerShared<S>>>,
    stop: vmm_sys_util::eventfd::EventFd,
    thread: Option<JoinHandle<()>>,
}

/// The tracker's lock, held across an epoch switch: no page is recorded or lifted meanwhile.
pub struct EpochLock<'a, S: FirstWriteSink + 'static> {
    tracker: &'a WriteTracker<S>,
    guard: std::sync::MutexGuard<'a, TrackerShared<S>>,
}

impl<S: FirstWriteSink + 'static> EpochLock<'_, S> {
    /// Write-protects all tracked memory: every page's next write faults.
    pub fn protect_all(&mut self) -> Result<(), UffdError> {
        for range in &self.tracker.ranges {
            set_write_protection(&self.tracker.uffd, range.host_address, range.length, true)?;
        }
        self.guard.lifted_ranges.clear();
        for bits in &mut self.guard.writable {
            bits.fill(0);
        }
        self.guard.protected = true;
        Ok(())
    }

    /// Write-protects again what was lifted since memory was last protected (adjacent ranges
    /// merged, and ranges at most `gap_pages` apart: a measurement's choice, 0 otherwise), or
    /// all tracked memory if it never was: afterwards every page's next write
    /// faults, as after [`EpochLock::protect_all`]. Pages that stayed protected are not
    /// touched, so KVM keeps their mappings (on a shadow-paging host every protection change
    /// drops them, and the guest's next read of such a page faults in the kernel again).
    /// Returns the bytes protected.
    pub fn protect_lifted(&mut self, gap_pages: usize) -> Result<usize, UffdError> {
        if !self.guard.protected {
            self.protect_all()?;
            return Ok(self.tracker.ranges.iter().map(|range| range.length).sum());
        }
        let lifted = std::mem::take(&mut self.guard.lifted_ranges);
        let merged = range_merge::merge_ranges(lifted, gap_pages * PAGE_SIZE);
        let mut protected = 0;
        for (index, &(address, length)) in merged.iter().enumerate() {
            if let Err(error) = set_write_protection(&self.tracker.uffd, address, length, true) {
                // What is not protected yet must be tried again.
                self.guard.lifted_ranges.extend_from_slice(&merged[index..]);
                return Err(error);
            }
            self.guard
                .forget_writable(&self.tracker.ranges, address, length);
            protected += length;
        }
        Ok(protected)
    }
}

impl<S: FirstWriteSink + 'static> WriteTracker<S> {
    /// Registers `ranges` for write-protect faults (nothing is protected yet) and starts the
    /// fault thread under the `WriteFault` seccomp filter. `attention` is written when a page is
    /// held (see [`FirstWrite::Hold`]).
    pub fn start(
        ranges: Vec<TrackedRange>,
        sink: S,
        attention: vmm_sys_util::eventfd::EventFd,
        seccomp: SeccompMode,
    ) -> Result<Self, UffdError> {
        for (index, range) in ranges.iter().enumerate() {
            if range.host_address % PAGE_SIZE != 0 || range.length % PAGE_SIZE != 0 {
                return Err(UffdError::BadRange {
                    index,
                    offset: range.host_address,
                    length: range.length,
                    source_length: 0,
                });
            }
        }
        let wanted = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        let (uffd, features) = open_userfaultfd(wanted)?;
        if features & wanted != wanted {
            return Err(UffdError::MissingFeature(
                "write-protect on shared memory (UFFD_FEATURE_WP_HUGETLBFS_SHMEM)",
            ));
        }
        for range in &ranges {
            let ioctls = register_range(
                &uffd,
                range.host_address,
                range.length,
                UFFDIO_REGISTER_MODE_WP,
            )?;
            if ioctls & (1 << NR_WRITEPROTECT) == 0 {
                return Err(UffdError::MissingFeature(
                    "UFFDIO_WRITEPROTECT on guest RAM",
                ));
            }
        }
        let uffd = std::sync::Arc::new(uffd);
        let shared = std::sync::Arc::new(std::sync::Mutex::new(TrackerShared {
            sink,
            held: Vec::new(),
            failed: None,
            lifted: 0,
            faults: 0,
            recording: std::time::Duration::ZERO,
            lifting: std::time::Duration::ZERO,
            lifted_ranges: Vec::new(),
            protected: false,
            writable: ranges
                .iter()
                .map(|range| vec![0; (range.length / PAGE_SIZE).div_ceil(64)])
                .collect(),
        }));
        let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .map_err(UffdError::StopEvent)?;
        let device_attention = attention.try_clone().map_err(UffdError::Attention)?;
        let server = WriteFaultServer {
            uffd: std::sync::Arc::clone(&uffd),
            ranges: ranges.clone(),
            shared: std::sync::Arc::clone(&shared),
            stop: stop.try_clone().map_err(UffdError::StopEvent)?,
            attention,
        };
        let (confined_tx, confined) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("uffd-wp".into())
            .spawn(move || {
                let filter = apply_filter_for_mode(ThreadKind::WriteFault, seccomp);
                let confined = filter.is_ok();
                let _ = confined_tx.send(filter.map_err(|e| e.to_string()));
                if confined {
                    server.run();
                }
            })
            .map_err(UffdError::Spawn)?;
        let tracker = WriteTracker {
            uffd,
            devices: std::sync::Arc::new(DeviceWrites {
                ranges: ranges.clone(),
                shared: std::sync::Arc::clone(&shared),
                attention: device_attention,
            }),
            ranges,
            shared,
            stop,
            thread: Some(thread),
        };
        match confined.recv() {
            Ok(Ok(())) => Ok(tracker),
            Ok(Err(reason)) => Err(UffdError::Seccomp(reason)),
            Err(_) => Err(UffdError::Seccomp(
                "the thread ended before installing its filter".to_string(),
            )),
        }
    }

    /// Takes the tracker's lock for an epoch switch (the fault thread waits meanwhile).
    pub fn lock_epoch(&self) -> EpochLock<'_, S> {
        EpochLock {
            tracker: self,
            guard: self.lock(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TrackerShared<S>> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the held pages again (after an early checkpoint made room) and lifts those the
    /// sink accepts now. Returns how many are still held.
    pub fn retry_held(&self) -> usize {
        let mut shared = self.lock();
        let held = std::mem::take(&mut shared.held);
        for address in held {
            serve_page(&self.uffd, &self.ranges, &mut shared, address);
        }
        shared.held.len()
    }

    /// See [`DeviceWrites::prepare`].
    pub fn prepare_device_write(&self, ranges: &[(usize, usize)]) -> DeviceWrite {
        self.devices.prepare(ranges)
    }

    /// The door device threads record their writes through (see [`DeviceWrites::prepare`]);
    /// it outlives the tracker harmlessly (its records then find no epoch).
    pub fn device_writes(&self) -> std::sync::Arc<DeviceWrites<S>> {
        std::sync::Arc::clone(&self.devices)
    }

    /// Why checkpoints must stop, if a page could not be recorded for another reason than a
    /// full log.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Pages recorded and lifted since the tracker started.
    pub fn lifted_pages(&self) -> u64 {
        self.lock().lifted
    }

    /// Faults served, pages lifted and where the fault thread's time went, since the start.
    pub fn stats(&self) -> WriteTrackerStats {
        let shared = self.lock();
        WriteTrackerStats {
            faults: shared.faults,
            lifted_pages: shared.lifted,
            recording: shared.recording,
            lifting: shared.lifting,
        }
    }
}

impl<S: FirstWriteSink + 'static> Drop for WriteTracker<S> {
    fn drop(&mut self) {
        // Lift every protection first (which wakes held writers too): a writer blocked on a
        // page must not wait for a thread that is about to end.
        for range in &self.ranges {
            let _ = set_write_protection(&self.uffd, range.host_address, range.length, false);
        }
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What device threads share of a [`WriteTracker`]: they record the pages a request will write
/// before writing any (see [`DeviceWrites::prepare`]).
pub struct DeviceWrites<S> {
    ranges: Vec<TrackedRange>,
    shared: std::sync::Arc<std::sync::Mutex<TrackerShared<S>>>,
    /// Written when a device's pages do not fit the epoch's log, as the fault thread's copy is
    /// for a held page.
    attention: vmm_sys_util::eventfd::EventFd,
}

impl<S: FirstWriteSink> DeviceWrites<S> {
    /// A device thread is about to write `ranges` (host address, length; pieces outside the
    /// tracked memory are ignored), at a request boundary, before it writes any of them. Every
    /// page of them not lifted in the epoch is recorded now, all or none. Its protection stays
    /// (a device thread may not change it: its seccomp filter has no `ioctl`): the device's
    /// first write to it faults, and the fault thread lifts a recorded page at once, whatever
    /// room the log has. So a device thread never waits in a write fault for room in the log
    /// in the middle of a request, where a checkpoint could not quiesce it
    /// (`docs/checkpoints.md` section 9). `Full` holds nothing: the device gives the request
    /// back and waits for its next resume, at a quiescent point.
    pub fn prepare(&self, ranges: &[(usize, usize)]) -> DeviceWrite {
        let mut shared = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut pages: Vec<(usize, usize)> = Vec::new();
        for &(address, length) in ranges {
            for (index, range) in self.ranges.iter().enumerate() {
                let start = address.max(range.host_address);
                let end = address
                    .saturating_add(length)
                    .min(range.host_address + range.length);
                if start >= end {
                    continue;
                }
                let first = (start - range.host_address) / PAGE_SIZE;
                let last = (end - 1 - range.host_address) / PAGE_SIZE;
                pages.extend(
                    (first..=last)
                        .filter(|&page| !shared.is_writable(index, page))
                        .map(|page| (index, page * PAGE_SIZE)),
                );
            }
        }
        pages.sort_unstable();
        pages.dedup();
        if pages.is_empty() || !shared.protected {
            return DeviceWrite::Ready;
        }
        let at = std::time::Instant::now();
        let answer = shared.sink.record_for_device(&pages);
        shared.recording += at.elapsed();
        match answer {
            DeviceWrite::Ready => {}
            DeviceWrite::Full => {
                let _ = self.attention.write(1);
                return DeviceWrite::Full;
            }
            DeviceWrite::Failed(reason) => {
                if shared.failed.is_none() {
                    shared.failed = Some(reason.clone());
                }
                let _ = self.attention.write(1);
                return DeviceWrite::Failed(reason);
            }
            too_large @ DeviceWrite::TooLarge(_) => return too_large,
        }
        DeviceWrite::Ready
    }
}

/// Protects (or unprotects, waking whoever waits on it) `length` bytes at `address`.
fn set_write_protection(
    uffd: &OwnedFd,
    address: usize,
    length: usize,
    protect: bool,
) -> Result<(), UffdError> {
    let mut request = UffdioWriteprotect {
        range: UffdioRange {
            start: address as u64,
            len: length as u64,
        },
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    uffd_ioctl(uffd, UFFDIO_WRITEPROTECT, &mut request).map_err(|source| UffdError::WriteProtect {
        address,
        length,
        source,
    })
}

/// Records the page at `address` and lifts its protection (waking its writers), or holds it.
/// Returns false when the page is held.
fn serve_page<S: FirstWriteSink>(
    uffd: &OwnedFd,
    ranges: &[TrackedRange],
    shared: &mut TrackerShared<S>,
    address: usize,
) -> bool {
    let Some((index, range)) = ranges.iter().enumerate().find(|(_, range)| {
        address >= range.host_address && address < range.host_address + range.length
    }) else {
        log::error!("write tracker: fault at {address:#x} outside every tracked range");
        return true;
    };
    shared.faults += 1;
    let at = std::time::Instant::now();
    let answer = shared.sink.record(index, address - range.host_address);
    shared.recording += at.elapsed();
    let runs = match answer {
        FirstWrite::Lift => vec![(address, PAGE_SIZE)],
        FirstWrite::LiftRuns(runs) => runs
            .into_iter()
            .map(|(offset, length)| (range.host_address + offset, length))
            .collect(),
        FirstWrite::Hold { full, reason } => {
            if !full && shared.failed.is_none() {
                shared.failed = Some(reason);
            }
            if !shared.held.contains(&address) {
                shared.held.push(address);
            }
            return false;
        }
    };
    let at = std::time::Instant::now();
    for (start, length) in runs {
        // Noted before it is lifted: the next epoch protects it again even if lifting fails
        // half-way.
        shared.lifted_ranges.push((start, length));
        shared.lifted += (length / PAGE_SIZE) as u64;
        let first = start.saturating_sub(range.host_address) / PAGE_SIZE;
        shared.mark_writable(index, first, length / PAGE_SIZE, true);
        if let Err(error) = set_write_protection(uffd, start, length, false) {
            log::error!("write tracker: {error}");
        }
    }
    shared.lifting += at.elapsed();
    true
}

struct WriteFaultServer<S> {
    uffd: std::sync::Arc<OwnedFd>,
    ranges: Vec<TrackedRange>,
    shared: std::sync::Arc<std::sync::Mutex<TrackerShared<S>>>,
    stop: vmm_sys_util::eventfd::EventFd,
    attention: vmm_sys_util::eventfd::EventFd,
}

impl<S: FirstWriteSink> WriteFaultServer<S> {
    fn run(self) {
        let mut messages = [UffdMsg::default(); 16];
        loop {
            let mut polled = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds, count 2, no timeout.
            let ready = unsafe { libc::poll(polled.as_mut_ptr(), 2, -1) };
            if ready < 0 {
                continue;
            }
            if polled[1].revents != 0 {
                return;
            }
            // SAFETY: reading whole plain-data `uffd_msg` structs into a buffer we own.
            let read = unsafe {
                libc::read(
                    self.uffd.as_raw_fd(),
                    messages.as_mut_ptr().cast(),
                    std::mem::size_of_val(&messages),
                )
            };
            if read <= 0 {
                continue;
            }
            let mut shared = self
                .shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut held = false;
            for message in &messages[..read as usize / size_of::<UffdMsg>()] {
                if message.event == UFFD_EVENT_PAGEFAULT
                    && message.arg[0] & UFFD_PAGEFAULT_FLAG_WP != 0
                {
                    let address = message.arg[1] as usize & !(PAGE_SIZE - 1);
                    held |= !serve_page(&self.uffd, &self.ranges, &mut shared, address);
                }
            }
            drop(shared);
            if held {
                let _ = self.attention.write(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // Values from linux/userfaultfd.h as compiled for x86_64.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(size_of::<UffdMsg>(), 32);
    }

    /// Anonymous memory the test owns, unmapped on drop.
    struct Anonymous {
        address: *mut u8,
        length: usize,
    }

    impl Anonymous {
        fn new(length: usize) -> Self {
            // SAFETY: a fresh private anonymous mapping; the kernel picks the address.
            let address = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    length,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(address, libc::MAP_FAILED);
            Anonymous {
                address: address.cast(),
                length,
            }
        }
    }

    impl Drop for Anonymous {
        fn drop(&mut self) {
            // SAFETY: unmapping the mapping this value created.
            unsafe { libc::munmap(self.address.cast(), self.length) };
        }
    }

    /// A source with a distinct byte pattern per page, every third page zero.
    fn source_file(pages: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let mut bytes = vec![0u8; pages * PAGE_SIZE];
        for page in 0..pages {
            if page % 3 != 0 {
                for (i, byte) in bytes[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]
                    .iter_mut()
                    .enumerate()
                {
                    *byte = (page * 7 + i) as u8 | 1;
                }
            }
        }
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&bytes).unwrap();
        (file, bytes)
    }

    /// Registered memory reads back the source on first touch (copied and zero pages), a second
    /// range starts at its own source offset, and the server ends once the memory is unmapped.
    #[test]
    fn first_touch_fills_pages_from_the_source_and_unmap_ends_the_server() {
        let (file, bytes) = source_file(64);
        let first = Anonymous::new(40 * PAGE_SIZE);
        let second = Anonymous::new(24 * PAGE_SIZE);
        let ranges = vec![
            LazyRange {
                host_address: first.address as usize,
                length: first.length,
                source_offset: 0,
            },
            LazyRange {
                host_address: second.address as usize,
                length: second.length,
                source_offset: 40 * PAGE_SIZE,
            },
        ];
        let server = start(ranges, file.as_file(), SeccompMode::Enforce).unwrap();
        // SAFETY: reading memory we mapped; each first touch blocks until the server fills it.
        let first_bytes = unsafe { std::slice::from_raw_parts(first.address, first.length) };
        // SAFETY: as above.
        let second_bytes = unsafe { std::slice::from_raw_parts(second.address, second.length) };
        // Touch out of order so blocks are served on demand, not front to back.
        assert_eq!(
            &second_bytes[5 * PAGE_SIZE..6 * PAGE_SIZE],
            &bytes[45 * PAGE_SIZE..46 * PAGE_SIZE]
        );
        assert_eq!(first_bytes, &bytes[..40 * PAGE_SIZE]);
        assert_eq!(second_bytes, &bytes[40 * PAGE_SIZE..]);
        drop(first);
        drop(second);
        let report = server.join().unwrap();
        assert_eq!(report.pages_copied + report.pages_zeroed, 64, "{report:?}");
        assert_eq!(report.pages_zeroed, 22, "{report:?}");
        assert!(report.faults <= 5, "blocks of 16 pages: {report:?}");
    }

    #[test]
    fn ranges_outside_the_source_are_refused() {
        let (file, _) = source_file(4);
        let memory = Anonymous::new(8 * PAGE_SIZE);
        let error = start(
            vec![LazyRange {
                host_address: memory.address as usize,
                length: memory.length,
                source_offset: 0,
            }],
            file.as_file(),
            SeccompMode::Enforce,
        )
        .unwrap_err();
        assert!(matches!(error, UffdError::BadRange { .. }), "{error}");
    }

    /// A shared mapping of a file on tmpfs (`/dev/shm`), as guest RAM in an NV region is.
    struct SharedTmpfs {
        _file: tempfile::NamedTempFile,
        address: *mut u8,
        length: usize,
    }

    impl SharedTmpfs {
        fn new(pages: usize) -> Self {
            let file = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
            let length = pages * PAGE_SIZE;
            file.as_file().set_len(length as u64).unwrap();
            // SAFETY: a fresh shared mapping of a file we own; the kernel picks the address.
            let address = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    length,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_file().as_raw_fd(),
                    0,
                )
            };
            assert_ne!(address, libc::MAP_FAILED);
            SharedTmpfs {
                _file: file,
                address: address.cast(),
                length,
            }
        }

        fn write(&self, page: usize, value: u8) {
            // SAFETY: inside the mapping; a protected page blocks here until it is lifted.
            unsafe { std::ptr::write_volatile(self.address.add(page * PAGE_SIZE + 7), value) };
        }

        fn read(&self, page: usize) -> u8 {
            // SAFETY: inside the mapping.
            unsafe { std::ptr::read_volatile(self.address.add(page * PAGE_SIZE + 7)) }
        }
    }

    impl Drop for SharedTmpfs {
        fn drop(&mut self) {
            // SAFETY: unmapping the mapping this value created.
            unsafe { libc::munmap(self.address.cast(), self.length) };
        }
    }

    /// Records each page's byte 7 as the sink sees it; holds the first `hold` records. With
    /// `block` > 1 it records the faulting page's whole aligned block of `block` pages and
    /// lifts it in one run.
    struct RecordingSink {
        base: usize,
        records: Records,
        hold: usize,
        block: usize,
        /// Pages devices may still record in this epoch, and at most in one.
        device_room: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        device_capacity: usize,
        /// Pages devices recorded in this epoch: a fault on one is lifted without a record.
        device_logged: DeviceLogged,
    }

    type DeviceLogged = std::sync::Arc<std::sync::Mutex<std::collections::HashSet<usize>>>;

    impl RecordingSink {
        fn note(&self, offset: usize) {
            // SAFETY: the page is inside the tracked mapping, which outlives the tracker.
            let old = unsafe { std::ptr::read_volatile((self.base + offset + 7) as *const u8) };
            self.records.lock().unwrap().push((offset / PAGE_SIZE, old));
        }
    }

    impl FirstWriteSink for RecordingSink {
        fn record(&mut self, range_index: usize, offset: usize) -> FirstWrite {
            assert_eq!(range_index, 0);
            if self.device_logged.lock().unwrap().contains(&offset) {
                return FirstWrite::Lift;
            }
            if self.hold > 0 {
                self.hold -= 1;
                return FirstWrite::Hold {
                    full: true,
                    reason: "full".into(),
                };
            }
            let block_bytes = self.block * PAGE_SIZE;
            let start = if self.block > 1 {
                offset - offset % block_bytes
            } else {
                offset
            };
            for page in (start..start + block_bytes.max(PAGE_SIZE)).step_by(PAGE_SIZE) {
                self.note(page);
            }
            if self.block > 1 {
                FirstWrite::LiftRuns(vec![(start, block_bytes)])
            } else {
                FirstWrite::Lift
            }
        }

        fn record_for_device(&mut self, pages: &[(usize, usize)]) -> DeviceWrite {
            use std::sync::atomic::Ordering;
            if pages.len() > self.device_capacity {
                return DeviceWrite::TooLarge(format!("{} pages", pages.len()));
            }
            let room = self.device_room.load(Ordering::SeqCst);
            if pages.len() > room {
                return DeviceWrite::Full;
            }
            self.device_room.store(room - pages.len(), Ordering::SeqCst);
            for &(range_index, offset) in pages {
                assert_eq!(range_index, 0);
                if self.device_logged.lock().unwrap().insert(offset) {
                    self.note(offset);
                }
            }
            DeviceWrite::Ready
        }
    }

    /// (page, byte 7 before the write) of every recorded page, in order.
    type Records = std::sync::Arc<std::sync::Mutex<Vec<(usize, u8)>>>;

    fn tracker_over(
        memory: &SharedTmpfs,
        hold: usize,
    ) -> (
        WriteTracker<RecordingSink>,
        Records,
        vmm_sys_util::eventfd::EventFd,
    ) {
        tracker_with_block(memory, hold, 1)
    }

    fn tracker_with_block(
        memory: &SharedTmpfs,
        hold: usize,
        block: usize,
    ) -> (
        WriteTracker<RecordingSink>,
        Records,
        vmm_sys_util::eventfd::EventFd,
    ) {
        let records = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let attention = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let tracker = WriteTracker::start(
            vec![TrackedRange {
                host_address: memory.address as usize,
                length: memory.length,
            }],
            RecordingSink {
                base: memory.address as usize,
                records: std::sync::Arc::clone(&records),
                hold,
                block,
                device_room: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX)),
                device_capacity: usize::MAX,
                device_logged: Default::default(),
            },
            attention.try_clone().unwrap(),
            SeccompMode::Enforce,
        )
        .unwrap();
        (tracker, records, attention)
    }

    /// Protects again what the epoch lifted; returns how many pages that was.
    fn protect_lifted_pages(tracker: &WriteTracker<RecordingSink>) -> usize {
        tracker.lock_epoch().protect_lifted(0).unwrap() / PAGE_SIZE
    }

    /// 8 shared pages, byte 7 of page `i` holding `i + 10`.
    fn numbered_memory() -> SharedTmpfs {
        let memory = SharedTmpfs::new(8);
        for page in 0..8 {
            memory.write(page, page as u8 + 10);
        }
        memory
    }

    /// The first write to a page per epoch reaches the sink while the page still holds the
    /// epoch's content, once; protecting again starts a new epoch.
    #[test]
    fn the_first_write_per_epoch_is_recorded_with_the_old_content() {
        let memory = numbered_memory();
        let (tracker, records, _) = tracker_over(&memory, 0);
        memory.write(1, 99); // not protected yet: not recorded
        tracker.lock_epoch().protect_all().unwrap();
        memory.write(3, 1);
        memory.write(3, 2);
        memory.write(5, 1);
        assert_eq!(*records.lock().unwrap(), [(3, 13), (5, 15)]);
        tracker.lock_epoch().protect_all().unwrap();
        memory.write(3, 3);
        memory.write(1, 4);
        assert_eq!(
            *records.lock().unwrap(),
            [(3, 13), (5, 15), (3, 2), (1, 99)]
        );
        assert_eq!(tracker.lifted_pages(), 4);
        assert_eq!((memory.read(3), memory.read(1)), (3, 4));
    }

    /// Protecting again touches only what the epoch lifted (all of memory the first time),
    /// and afterwards every page's next write is recorded again: the lifted page because it is
    /// protected again, the others because they never stopped being protected.
    #[test]
    fn protecting_the_lifted_pages_again_makes_every_page_fault_again() {
        let memory = numbered_memory();
        let (tracker, records, _) = tracker_over(&memory, 0);
        assert_eq!(protect_lifted_pages(&tracker), 8);
        memory.write(3, 1);
        memory.write(4, 2);
        assert_eq!(protect_lifted_pages(&tracker), 2);
        memory.write(3, 5);
        memory.write(6, 6);
        memory.write(4, 7);
        assert_eq!(
            *records.lock().unwrap(),
            [(3, 13), (4, 14), (3, 1), (6, 16), (4, 2)]
        );
        assert_eq!(protect_lifted_pages(&tracker), 3);
        assert_eq!(protect_lifted_pages(&tracker), 0);
        let stats = tracker.stats();
        assert_eq!((stats.faults, stats.lifted_pages), (5, 5));
    }

    /// A block lifted on one fault lets the writes to its other pages through without a fault
    /// in that epoch, and is protected again as a whole at the next one.
    #[test]
    fn a_block_lifted_on_one_fault_is_protected_again_at_the_next_epoch() {
        let memory = numbered_memory();
        let (tracker, records, _) = tracker_with_block(&memory, 0, 4);
        assert_eq!(protect_lifted_pages(&tracker), 8);
        memory.write(5, 1);
        memory.write(6, 2);
        memory.write(4, 3);
        assert_eq!(
            *records.lock().unwrap(),
            [(4, 14), (5, 15), (6, 16), (7, 17)]
        );
        assert_eq!(protect_lifted_pages(&tracker), 4);
        memory.write(7, 4);
        memory.write(1, 5);
        assert_eq!(
            records.lock().unwrap()[4..],
            [
                (4, 3),
                (5, 1),
                (6, 2),
                (7, 17),
                (0, 10),
                (1, 11),
                (2, 12),
                (3, 13)
            ]
        );
        let stats = tracker.stats();
        assert_eq!((stats.faults, stats.lifted_pages), (3, 12));
    }

    /// A held page keeps its writer blocked and raises attention; `retry_held` records it
    /// and lets the write through.
    #[test]
    fn a_held_page_blocks_its_writer_until_it_is_recorded() {
        let memory = SharedTmpfs::new(4);
        memory.write(2, 42);
        let (tracker, records, attention) = tracker_over(&memory, 1);
        tracker.lock_epoch().protect_all().unwrap();
        let address = memory.address as usize;
        let writer = std::thread::spawn(move || {
            // SAFETY: inside the mapping, which outlives this thread (joined below).
            unsafe { std::ptr::write_volatile((address + 2 * PAGE_SIZE + 7) as *mut u8, 7) };
        });
        let mut poll = libc::pollfd {
            fd: attention.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, 5 s at most.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 5000) }, 1);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!writer.is_finished(), "the write went through unrecorded");
        assert!(records.lock().unwrap().is_empty());
        assert_eq!(tracker.retry_held(), 0);
        writer.join().unwrap();
        assert_eq!(*records.lock().unwrap(), [(2, 42)]);
        assert_eq!(memory.read(2), 7);
        assert!(tracker.failure().is_none());
    }

    /// A device that prepares its write first records its pages all at once, before writing
    /// any; its writes then go through (each page's first write faults, and the fault thread
    /// lifts a recorded page without recording it again); a page lifted in the epoch is not
    /// asked about again.
    #[test]
    fn a_device_write_prepared_first_is_recorded_once_before_it_writes() {
        let memory = numbered_memory();
        let device_logged = DeviceLogged::default();
        let (tracker, records) = device_tracker(&memory, usize::MAX, 8, &device_logged);
        let base = memory.address as usize;
        // Before anything is protected nothing needs recording.
        assert_eq!(
            tracker.prepare_device_write(&[(base, PAGE_SIZE)]),
            DeviceWrite::Ready
        );
        assert!(records.lock().unwrap().is_empty());
        tracker.lock_epoch().protect_all().unwrap();
        memory.write(2, 1); // a vCPU's write: recorded through its fault
                            // Pages 1..=3 (2 is lifted already), and a piece outside the tracked memory.
        let request = [
            (base + PAGE_SIZE + 100, 2 * PAGE_SIZE),
            (base + 8 * PAGE_SIZE, 64),
        ];
        assert_eq!(tracker.prepare_device_write(&request), DeviceWrite::Ready);
        assert_eq!(*records.lock().unwrap(), [(2, 12), (1, 11), (3, 13)]);
        for page in 1..=3 {
            memory.write(page, 50 + page as u8);
        }
        assert_eq!(
            records.lock().unwrap().len(),
            3,
            "a page was recorded twice"
        );
        assert_eq!((memory.read(1), memory.read(3)), (51, 53));
        // The next epoch: protected again, recorded again with their new content.
        device_logged.lock().unwrap().clear();
        assert_eq!(protect_lifted_pages(&tracker), 3);
        assert_eq!(tracker.prepare_device_write(&request), DeviceWrite::Ready);
        assert_eq!(records.lock().unwrap()[3..], [(1, 51), (2, 52), (3, 53)]);
    }

    /// A tracker whose sink lets devices record `room` pages, `capacity` in one epoch.
    fn device_tracker(
        memory: &SharedTmpfs,
        room: usize,
        capacity: usize,
        device_logged: &DeviceLogged,
    ) -> (WriteTracker<RecordingSink>, Records) {
        let records: Records = Default::default();
        let base = memory.address as usize;
        let tracker = WriteTracker::start(
            vec![TrackedRange {
                host_address: base,
                length: memory.length,
            }],
            RecordingSink {
                base,
                records: std::sync::Arc::clone(&records),
                hold: 0,
                block: 1,
                device_room: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(room)),
                device_capacity: capacity,
                device_logged: std::sync::Arc::clone(device_logged),
            },
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            SeccompMode::Enforce,
        )
        .unwrap();
        (tracker, records)
    }

    /// A device's pages that do not fit the epoch's log are not recorded, nothing is held (the
    /// device thread is not blocked), attention asks for the early checkpoint, and after it the
    /// same request goes through; a request larger than an empty log is refused for good.
    /// Without the preparation the device thread would write into the protected pages and wait
    /// in the fault (as `a_held_page_blocks_its_writer_until_it_is_recorded` shows), where a
    /// checkpoint could not quiesce it.
    #[test]
    fn a_device_write_that_does_not_fit_waits_for_the_next_epoch_without_blocking() {
        use std::sync::atomic::Ordering;
        let memory = numbered_memory();
        let base = memory.address as usize;
        let device_logged = DeviceLogged::default();
        let (tracker, records) = device_tracker(&memory, 2, 4, &device_logged);
        let room = std::sync::Arc::clone(&tracker.lock().sink.device_room);
        let attention = tracker.devices.attention.try_clone().unwrap();
        tracker.lock_epoch().protect_all().unwrap();
        let request = [(base + 4 * PAGE_SIZE, 3 * PAGE_SIZE)];
        assert_eq!(tracker.prepare_device_write(&request), DeviceWrite::Full);
        assert!(records.lock().unwrap().is_empty());
        assert_eq!(attention.read().unwrap(), 1);
        assert!(tracker.failure().is_none());
        // The early checkpoint: a new epoch with an empty log.
        room.store(4, Ordering::SeqCst);
        assert_eq!(protect_lifted_pages(&tracker), 0);
        assert_eq!(tracker.prepare_device_write(&request), DeviceWrite::Ready);
        assert_eq!(*records.lock().unwrap(), [(4, 14), (5, 15), (6, 16)]);
        for page in 4..7 {
            memory.write(page, 1);
        }
        assert_eq!(records.lock().unwrap().len(), 3);
        assert!(matches!(
            tracker.prepare_device_write(&[(base, 8 * PAGE_SIZE)]),
            DeviceWrite::TooLarge(_)
        ));
    }
}
