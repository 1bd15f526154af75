//! A shared mapping of a file or device, with bounds-checked byte access.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::error::{Error, Result};

/// `MAP_SHARED_VALIDATE` and `MAP_SYNC` (not exported by every libc version).
pub(crate) const MAP_SHARED_VALIDATE: libc::c_int = 0x03;
pub(crate) const MAP_SYNC: libc::c_int = 0x80000;

/// An `mmap` of `len` bytes of a file from offset 0.
pub(crate) struct SharedMapping {
    addr: *mut u8,
    len: usize,
    /// Mapped `PROT_WRITE`: a store into a read-only mapping would be a SIGSEGV, so `write`
    /// checks this first.
    writable: bool,
}

// SAFETY: the mapping is plain shared memory owned by this value; access goes
// through `&self`/`&mut self`, so Rust's aliasing rules serialise it in-process.
unsafe impl Send for SharedMapping {}

impl SharedMapping {
    /// Maps `len` bytes of `file` with the given flags, at an address aligned to `align`;
    /// read-only unless `writable` (then every `write` is refused).
    pub(crate) fn new(
        file: &File,
        len: usize,
        flags: libc::c_int,
        align: usize,
        writable: bool,
    ) -> std::io::Result<Self> {
        if len == 0 {
            return Ok(SharedMapping {
                addr: std::ptr::null_mut(),
                len: 0,
                writable,
            });
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let hint = if align > page_size() {
            reserve_aligned(len, align)?
        } else {
            std::ptr::null_mut()
        };
        let fixed = if hint.is_null() { 0 } else { libc::MAP_FIXED };
        // SAFETY: maps a file we hold open; with MAP_FIXED the target range is
        // our own fresh reservation, so nothing else is replaced.
        let addr = unsafe { libc::mmap(hint, len, prot, flags | fixed, file.as_raw_fd(), 0) };
        if addr == libc::MAP_FAILED {
            let err = std::io::Error::last_os_error();
            if !hint.is_null() {
                // SAFETY: releases the reservation made above, which nothing else uses.
                unsafe { libc::munmap(hint, len) };
            }
            return Err(err);
        }
        Ok(SharedMapping {
            addr: addr.cast(),
            len,
            writable,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize> {
        let start = usize::try_from(offset).ok();
        match start.and_then(|s| s.checked_add(len).map(|e| (s, e))) {
            Some((s, e)) if e <= self.len => Ok(s),
            _ => Err(Error::io(
                format!(
                    "access of {len} bytes at {offset:#x} beyond the mapped {} bytes",
                    self.len
                ),
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            )),
        }
    }

    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let start = self.check(offset, buf.len())?;
        // SAFETY: the range is inside the mapping (checked); other processes may
        // write it concurrently, which only makes the copied bytes stale, and
        // every reader validates checksums.
        unsafe { std::ptr::copy_nonoverlapping(self.addr.add(start), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::io(
                format!("writing {} bytes at {offset:#x}", data.len()),
                std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            ));
        }
        let start = self.check(offset, data.len())?;
        // SAFETY: the range is inside the mapping (checked) and writable.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.addr.add(start), data.len()) };
        Ok(())
    }

    /// Returns the page-aligned sub-range covering `[offset, offset + len)`, clipped to the mapping.
    pub(crate) fn page_span(&self, offset: u64, len: u64) -> Result<(*mut u8, usize)> {
        let start = self.check(offset, len as usize)?;
        let page = page_size();
        let aligned = start & !(page - 1);
        let end = start + len as usize;
        // SAFETY: `aligned` <= `start`, inside the mapping.
        Ok((unsafe { self.addr.add(aligned) }, end - aligned))
    }

    /// Cache-line write-back (`clwb`/`clflushopt`/`clflush` + `sfence`) of the pages covering
    /// the range: how a DAX mapping (file or device) makes stores durable.
    pub(crate) fn write_back(&self, offset: u64, len: u64) -> Result<()> {
        let (addr, span) = self.page_span(offset, len)?;
        // SAFETY: the span lies inside this live mapping (checked by page_span).
        unsafe { super::cache_flush::write_back(addr, span) }
    }

    /// `msync(MS_SYNC)` over the pages covering the range.
    pub(crate) fn msync(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (addr, span) = self.page_span(offset, len)?;
        // SAFETY: the span is page aligned and inside our mapping.
        if unsafe { libc::msync(addr.cast(), span, libc::MS_SYNC) } != 0 {
            return Err(Error::last_os(format!(
                "msync of {len} bytes at {offset:#x}"
            )));
        }
        Ok(())
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: unmaps exactly the mapping this value owns.
            unsafe { libc::munmap(self.addr.cast(), self.len) };
        }
    }
}

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

/// Reserves `len` bytes of address space at an `align`-aligned address.
fn reserve_aligned(len: usize, align: usize) -> std::io::Result<*mut libc::c_void> {
    let span = len + align;
    // SAFETY: an anonymous PROT_NONE reservation; no existing memory is touched.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = (base as usize + align - 1) & !(align - 1);
    let head = start - base as usize;
    let tail = span - head - len;
    // SAFETY: both trims are inside the reservation just made.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
    }
    Ok(start as *mut libc::c_void)
}

/// Advisory whole-file lock used to serialise metadata updates between processes.
pub(crate) fn flock(file: &File, operation: libc::c_int) -> Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::io("flock on the NV region", err));
        }
    }
}

/// Releases the metadata lock. Nothing can be done about a failure here (the lock also goes
/// with the descriptor), so it is logged against the region's path.
pub(crate) fn unlock_metadata(file: &File, path: &std::path::Path) {
    if let Err(err) = flock(file, libc::LOCK_UN) {
        log::warn!("{}: {err}", path.display());
    }
}
