//! Persistence backends: how bytes written to a region become durable.
//!
//! The region code only reads, writes and asks for a range to be persisted;
//! which mechanism does the persisting (msync, cache-line write-back, or
//! nothing for an in-memory test store) is chosen at run time by the backend.

pub mod cache_flush;
pub mod devdax;
pub mod file_mmap;
mod mapping;
pub mod memory;

use std::fmt;
use std::fs::File;

use crate::error::Result;

/// How a region makes its stores durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PersistenceMode {
    /// A plain file mapped `MAP_SHARED`; durability by `msync(MS_SYNC)`.
    PlainFile,
    /// A file on a DAX filesystem mapped `MAP_SYNC`; durability by cache-line write-back + `sfence`.
    DaxFile,
    /// A device-DAX character device (`/dev/daxX.Y`); cache-line write-back + `sfence`.
    DevDax,
    /// Process memory only (tests): nothing survives the process.
    Volatile,
}

impl PersistenceMode {
    /// Whether guest memory is persisted by CPU cache write-back rather than msync.
    pub fn is_dax(self) -> bool {
        matches!(self, PersistenceMode::DaxFile | PersistenceMode::DevDax)
    }
}

impl fmt::Display for PersistenceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PersistenceMode::PlainFile => "plain-file (msync)",
            PersistenceMode::DaxFile => "dax-file (MAP_SYNC, cache write-back)",
            PersistenceMode::DevDax => "devdax (cache write-back)",
            PersistenceMode::Volatile => "volatile (test only)",
        })
    }
}

/// A byte-addressable store under a region.
///
/// `write` makes bytes visible; only `persist` makes them durable. Between the
/// two, a power failure may drop or tear any store (in 8-byte units) in any
/// order; the commit protocol is written against exactly that model.
pub trait Persistence: Send {
    fn mode(&self) -> PersistenceMode;
    /// Current size of the store in bytes.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes every store to `[offset, offset + len)` durable and ordered before later stores.
    fn persist(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Makes every store to each of `ranges` ((offset, length), ascending, disjoint) durable,
    /// as `persist` of each would. A backend may persist more than asked when that is cheaper.
    fn persist_ranges(&mut self, ranges: &[(u64, u64)]) -> Result<()> {
        persist_each(self, ranges)
    }
    /// Allocates backing storage for an extent so that first touches of it
    /// (through any mapping) cannot fail for lack of space; a no-op where the
    /// medium is fully backed already.
    fn reserve(&mut self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// Gives the bytes of a freed extent back (reads as zero afterwards where
    /// supported); a no-op where the medium cannot.
    fn discard(&mut self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// Grows the store to `new_len` bytes (durably), or refuses.
    fn grow(&mut self, new_len: u64) -> Result<()>;
    /// Maps more of the store if another process has grown it.
    fn refresh(&mut self) -> Result<()> {
        Ok(())
    }
    /// The underlying file, if any (guest memory is mapped by the VMM from it).
    fn file(&self) -> Option<&File> {
        None
    }
    /// Takes the cross-process metadata lock (blocking).
    fn lock_metadata(&self) -> Result<()> {
        Ok(())
    }
    fn unlock_metadata(&self) {}
}

/// Reads `len` bytes at `offset` into a new vector.
pub(crate) fn read_vec(store: &dyn Persistence, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    store.read(offset, &mut buf)?;
    Ok(buf)
}

/// `persist` of each of `ranges`: what [`Persistence::persist_ranges`] does where a backend
/// has nothing cheaper.
pub(crate) fn persist_each<P: Persistence + ?Sized>(
    backend: &mut P,
    ranges: &[(u64, u64)],
) -> Result<()> {
    for &(offset, len) in ranges {
        backend.persist(offset, len)?;
    }
    Ok(())
}
