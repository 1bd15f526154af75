//! Parsing and serving one virtio-blk request (virtio 1.x, "Block Device").
//!
//! A request is a descriptor chain: a 16-byte driver-readable header (type, reserved, sector),
//! data buffers, and a 1-byte device-writable status. Everything in it is guest-controlled, so
//! each field is checked before use; a fault is answered with a status, never a panic.

use std::io;

use log::warn;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Bytes, GuestMemory, GuestMemoryMmap, Permissions, ReadVolatile, VolatileMemoryError,
    WriteVolatile,
};

use super::counters::BlockCounters;
use super::disk::RawDisk;
use super::write_hook::{BeforeWrite, BlockWriteHook};
use super::SECTOR_SIZE;
use crate::virtio::guest_write_gate::GuestWrites;

const HEADER_LEN: u32 = 16;

/// Why a request failed; logged, then answered with IOERR.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("header descriptor missing, too short or device-writable")]
    BadHeader,
    #[error("data descriptor has the wrong direction for the request type")]
    DataDirection,
    #[error("data length {0} is not a multiple of the sector size")]
    UnalignedLength(u64),
    #[error("sectors {sector}..+{sectors} are beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    BadBuffer { addr: u64, len: u32 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("disk flush failed: {0}")]
    Flush(#[source] io::Error),
    #[error("moving data between the disk and guest memory failed: {0}")]
    Transfer(#[from] VolatileMemoryError),
    #[error("guest memory access failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("the write was refused before it started: {0}")]
    WriteRefused(String),
}

/// The outcome to put on the used ring.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    /// Status written; `used_len` bytes (data plus the status byte) were written to the guest.
    Done { status: u8, used_len: u32 },
    /// No usable status descriptor: nothing can be reported, the chain is returned with length 0.
    Dropped,
    /// The write hook deferred the request: nothing was done or written to the guest; the
    /// chain must go back on the queue.
    Deferred,
}

/// Adds what serving `chain` may write into guest memory to `writes`: every device-writable
/// buffer (read data, the id, the status byte); with `status_only` only its last descriptor's
/// first byte, the status a refused request writes.
pub(crate) fn guest_writes_of(
    chain: &DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    status_only: bool,
    writes: &mut GuestWrites,
) {
    let descriptors: Vec<Descriptor> = chain.clone().collect();
    if status_only {
        if let Some(status) = descriptors.last().filter(|d| d.is_write_only()) {
            writes.add(mem, status.addr(), 1);
        }
        return;
    }
    for d in descriptors.iter().filter(|d| d.is_write_only()) {
        writes.add(mem, d.addr(), d.len() as usize);
    }
}

/// Answers the request in `chain` with IOERR without serving it: nothing but its status byte is
/// written. For a request whose guest writes the gate refused for good.
pub(crate) fn refuse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    reason: &str,
) -> Completion {
    let head = chain.head_index();
    let descriptors: Vec<Descriptor> = chain.collect();
    let Some(status_desc) = usable_status(&descriptors, mem) else {
        warn!("virtio-blk: chain at head {head} has no usable status descriptor; dropped");
        return Completion::Dropped;
    };
    warn!("virtio-blk: request at head {head} refused: {reason}");
    complete(mem, status_desc, head, VIRTIO_BLK_S_IOERR, 0)
}

/// Writes `status` into the chain's status descriptor; the request is done with `data_len`
/// bytes written into guest buffers before it.
fn complete(
    mem: &GuestMemoryMmap,
    status_desc: &Descriptor,
    head: u16,
    status: u32,
    data_len: u32,
) -> Completion {
    let status = status as u8;
    if let Err(e) = mem.write_obj(status, status_desc.addr()) {
        // Checked when the chain was read; only a concurrent memory hot-unplug could get here.
        warn!("virtio-blk: cannot write status of head {head}: {e}");
        return Completion::Dropped;
    }
    Completion::Done {
        status,
        used_len: data_len + 1,
    }
}

/// The chain's status descriptor: its last, device-writable, at least one byte, in memory.
fn usable_status<'a>(
    descriptors: &'a [Descriptor],
    mem: &GuestMemoryMmap,
) -> Option<&'a Descriptor> {
    descriptors.last().filter(|d| {
        descriptors.len() >= 2
            && d.is_write_only()
            && d.len() >= 1
            && mem.check_range(d.addr(), 1, Permissions::Write)
    })
}

/// Serves the request in `chain` against `disk`.
pub(crate) fn serve(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    disk: &RawDisk,
    counters: &BlockCounters,
    hook: Option<&dyn BlockWriteHook>,
) -> Completion {
    let head = chain.head_index();
    // A chain cannot be longer than the queue (the iterator's TTL), so this is bounded.
    let descriptors: Vec<Descriptor> = chain.collect();
    let Some(status_desc) = usable_status(&descriptors, mem) else {
        warn!("virtio-blk: chain at head {head} has no usable status descriptor; dropped");
        return Completion::Dropped;
    };
    let body = &descriptors[..descriptors.len() - 1];
    let (status, data_len) = match execute(body, mem, disk, counters, hook) {
        Ok(Outcome::Served(written)) => (VIRTIO_BLK_S_OK, written),
        Ok(Outcome::Deferred) => return Completion::Deferred,
        Ok(Outcome::Unsupported(kind)) => {
            warn!("virtio-blk: unsupported request type {kind}");
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
        Err(e) => {
            warn!("virtio-blk: request at head {head} failed: {e}");
            (VIRTIO_BLK_S_IOERR, 0)
        }
    };
    complete(mem, status_desc, head, status, data_len)
}

enum Outcome {
    /// Served; this many bytes were written into guest buffers.
    Served(u32),
    Unsupported(u32),
    /// The write hook said not now; nothing was done.
    Deferred,
}

fn execute(
    body: &[Descriptor],
    mem: &GuestMemoryMmap,
    disk: &RawDisk,
    counters: &BlockCounters,
    hook: Option<&dyn BlockWriteHook>,
) -> Result<Outcome, RequestError> {
    let (header, data) = body.split_first().ok_or(RequestError::BadHeader)?;
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(RequestError::BadHeader);
    }
    let mut raw_header = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw_header, header.addr())?;
    let kind = u32::from_le_bytes([raw_header[0], raw_header[1], raw_header[2], raw_header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&raw_header[8..]);
    let sector = u64::from_le_bytes(sector_bytes);

    for d in data {
        let access = if d.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            return Err(RequestError::BadBuffer {
                addr: d.addr().0,
                len: d.len(),
            });
        }
    }
    let data_len: u64 = data.iter().map(|d| u64::from(d.len())).sum();

    match kind {
        VIRTIO_BLK_T_IN => {
            check_transfer(data, true, sector, data_len, disk)?;
            // Straight from the file into each guest mapping the buffers cover (a buffer may
            // span guest memory regions); a short read (the image shrank) is an error.
            let mut disk_at = disk.at(sector * SECTOR_SIZE);
            for d in data {
                for slice in mem.get_slices(d.addr(), d.len() as usize, Permissions::Write)? {
                    disk_at.read_exact_volatile(&mut slice?)?;
                }
            }
            counters.record_read(data_len);
            // data_len fits in u32: the queue's iterator stops a chain at 4 GiB.
            Ok(Outcome::Served(data_len as u32))
        }
        VIRTIO_BLK_T_OUT => {
            if disk.readonly() {
                return Err(RequestError::ReadOnly);
            }
            check_transfer(data, false, sector, data_len, disk)?;
            if let Some(hook) = hook {
                match hook.before_write(&disk.image(), sector * SECTOR_SIZE, data_len) {
                    BeforeWrite::Proceed => {}
                    BeforeWrite::Defer => return Ok(Outcome::Deferred),
                    BeforeWrite::Fail(reason) => return Err(RequestError::WriteRefused(reason)),
                }
            }
            let mut disk_at = disk.at(sector * SECTOR_SIZE);
            for d in data {
                for slice in mem.get_slices(d.addr(), d.len() as usize, Permissions::Read)? {
                    disk_at.write_all_volatile(&slice?)?;
                }
            }
            counters.record_write(data_len);
            Ok(Outcome::Served(0))
        }
        VIRTIO_BLK_T_FLUSH => {
            disk.flush().map_err(RequestError::Flush)?;
            Ok(Outcome::Served(0))
        }
        VIRTIO_BLK_T_GET_ID => {
            if data.iter().any(|d| !d.is_write_only()) {
                return Err(RequestError::DataDirection);
            }
            let mut remaining: &[u8] = disk.id();
            let mut written = 0u32;
            for d in data {
                let n = remaining.len().min(d.len() as usize);
                mem.write_slice(&remaining[..n], d.addr())?;
                remaining = &remaining[n..];
                written += n as u32;
            }
            Ok(Outcome::Served(written))
        }
        other => Ok(Outcome::Unsupported(other)),
    }
}

/// Direction, alignment and range checks common to reads and writes.
fn check_transfer(
    data: &[Descriptor],
    device_writes: bool,
    sector: u64,
    data_len: u64,
    disk: &RawDisk,
) -> Result<(), RequestError> {
    if data.iter().any(|d| d.is_write_only() != device_writes) {
        return Err(RequestError::DataDirection);
    }
    if !data_len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(data_len));
    }
    let sectors = data_len / SECTOR_SIZE;
    let capacity = disk.capacity_sectors();
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}
