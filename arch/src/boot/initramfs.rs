//! Placement of the initramfs: as high as possible below the protocol's limit, page aligned,
//! above the kernel, the way boot loaders traditionally do it (the kernel decompresses and
//! grows upwards from its load address, so the top of RAM is the spot least in its way).

use std::fs::File;
use std::io::{Seek, SeekFrom};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::Error;

const PAGE_SIZE: u64 = 0x1000;

/// Where the initramfs ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LoadedInitramfs {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Loads `file` so that it ends at or below `limit` (exclusive) and starts at or above the
/// page-aligned `kernel_end`.
pub(super) fn load_initramfs<M: GuestMemoryBackend>(
    mem: &M,
    file: &mut File,
    kernel_end: u64,
    limit: u64,
) -> Result<LoadedInitramfs, Error> {
    let size = file.seek(SeekFrom::End(0)).map_err(Error::ReadInitramfs)?;
    file.rewind().map_err(Error::ReadInitramfs)?;
    let too_large = || Error::InitramfsTooLarge {
        size,
        kernel_end,
        limit,
    };
    let lowest = kernel_end
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or_else(too_large)?;
    let start = limit
        .checked_sub(size)
        .map(|start| start / PAGE_SIZE * PAGE_SIZE)
        .filter(|&start| start >= lowest)
        .ok_or_else(too_large)?;
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(start), file, len)
        .map_err(|source| match source {
            vm_memory::GuestMemoryError::IOError(io) => Error::ReadInitramfs(io),
            other => Error::WriteGuestMemory {
                what: "initramfs",
                addr: start,
                source: other,
            },
        })?;
    Ok(LoadedInitramfs {
        addr: GuestAddress(start),
        size,
    })
}
