//! A store in process memory, for tests and for replaying crash images.

use super::{Persistence, PersistenceMode};
use crate::error::{Error, Result};

/// A growable byte vector with no durability at all.
#[derive(Clone, Debug, Default)]
pub struct MemoryBackend {
    pub bytes: Vec<u8>,
}

impl MemoryBackend {
    pub fn new(bytes: Vec<u8>) -> Self {
        MemoryBackend { bytes }
    }

    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| out_of_bounds(offset, len))?;
        let end = start
            .checked_add(len)
            .ok_or_else(|| out_of_bounds(offset, len))?;
        if end > self.bytes.len() {
            return Err(out_of_bounds(offset, len));
        }
        Ok(start..end)
    }
}

fn out_of_bounds(offset: u64, len: usize) -> Error {
    Error::io(
        format!("access of {len} bytes at {offset:#x}"),
        std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
    )
}

impl Persistence for MemoryBackend {
    fn mode(&self) -> PersistenceMode {
        PersistenceMode::Volatile
    }
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let range = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.bytes[range]);
        Ok(())
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let range = self.range(offset, data.len())?;
        self.bytes[range].copy_from_slice(data);
        Ok(())
    }
    fn persist(&mut self, offset: u64, len: u64) -> Result<()> {
        self.range(offset, len as usize).map(|_| ())
    }
    fn grow(&mut self, new_len: u64) -> Result<()> {
        let new_len = usize::try_from(new_len).map_err(|_| Error::CannotGrow("size too large"))?;
        if new_len > self.bytes.len() {
            // An absurd size from a damaged image must fail, not abort the process.
            self.bytes
                .try_reserve_exact(new_len - self.bytes.len())
                .map_err(|_| Error::CannotGrow("out of memory"))?;
            self.bytes.resize(new_len, 0);
        }
        Ok(())
    }
}
