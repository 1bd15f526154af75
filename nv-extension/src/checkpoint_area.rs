//! A VM's checkpoint area: two epoch-record copies and an undo log of guest pages.
//!
//! Layout (byte by byte in `docs/checkpoints.md`), from the area's start:
//! - page 0: epoch record copy 0 at byte 0, copy 1 at byte 64, the rest zero;
//! - the undo-entry headers, 64 bytes each, `capacity` of them, padded to whole pages;
//! - the undo data: `capacity` pages of 4 KiB, entry `i`'s page at `data_start + i * 4096`.
//!
//! An epoch is committed when its record is durable; the record names the state slot sequence
//! holding the epoch's volatile state. An undo entry holds the content a guest page had when
//! the epoch began; it counts only if its header (epoch, page, data checksum, header checksum)
//! checks out, and only for the epoch its header names, so the log never needs clearing: a new
//! epoch's entries overwrite the old ones, which no longer match.

use crate::error::{Error, HostError, Result};
use crate::fault_injection::{self, FaultPoint};
use crate::identity::Uuid;
use crate::le_bytes::{le_record, trailing_crc_holds, trailing_crc_of};
use crate::le_bytes::{FromBytes, FromZeros, IntoBytes, U32, U64};
use crate::persistence::{read_vec, Persistence};
use crate::vm_table::Extent;

/// Guest page size the undo log works in.
pub const PAGE_SIZE: u64 = 4096;
pub const EPOCH_MAGIC: [u8; 8] = *b"NVEPOCH\0";
pub const UNDO_MAGIC: [u8; 8] = *b"NVUNDO\0\0";
/// Version of both record kinds; a record of another version is not believed.
pub const CHECKPOINT_FORMAT: u32 = 1;
pub const EPOCH_RECORD_LEN: usize = 64;
pub const UNDO_HEADER_LEN: usize = 64;
/// `kind` of an undo entry holding a guest memory page.
pub const UNDO_KIND_GUEST_PAGE: u32 = 1;
/// `kind` of an undo entry holding old bytes of a disk: the low 16 bits are 2, the high 16 bits
/// the disk's index (its position in the VM's stored configuration); `target` is the byte offset
/// on that disk, `data_len` the bytes held (512 to 4096, a multiple of 512).
pub const UNDO_KIND_DISK_BLOCK: u32 = 2;
/// Disk bytes are logged in blocks of this size (aligned on the disk), once per epoch each.
pub const DISK_UNDO_BLOCK: u64 = 4096;
/// The unit of disk offsets and lengths in the log (a disk's sector).
pub const DISK_UNDO_SECTOR: u64 = 512;

/// The test-only fault points of checkpoints and of recovery from one (`NV_FAULT_AFTER_PHASE`).
pub const CHECKPOINT_FAULT_POINTS: [&str; 5] = [
    // An undo entry's page data is durable, its header not yet written.
    "ckpt-undo-data",
    // The epoch's state slot is durable, the epoch record not yet written.
    "ckpt-epoch-state",
    // The epoch record is durable (committed); guest memory not yet write-protected.
    "ckpt-epoch-commit",
    // Recovery has applied half of the epoch's undo entries.
    "ckpt-recover-apply",
    // Recovery has applied the whole undo log; the VM table does not say "recovered" yet.
    "ckpt-recover-record",
];

le_record! {
    /// An epoch record copy, as stored (docs/checkpoints.md).
    struct EpochRecord(EPOCH_RECORD_LEN) {
        0 => magic: [u8; 8],
        /// State-slot sequence of the epoch's volatile state (also the epoch's number).
        8 => seq: U64,
        /// `since_seq` of the run that committed it: an epoch binds to its run.
        16 => run_since_seq: U64,
        24 => format: U32,
        /// Undo-log capacity of the area when it was committed.
        28 => capacity: U32,
        32 => vm_uuid: [u8; 16],
        48 => reserved: [u8; 12],
        /// CRC32C of the bytes before it.
        60 => crc: U32,
    }
}

le_record! {
    /// An undo-entry header, as stored (docs/checkpoints.md).
    struct UndoHeader(UNDO_HEADER_LEN) {
        0 => magic: [u8; 8],
        /// The epoch (state sequence) whose start the page content belongs to.
        8 => epoch: U64,
        /// Byte offset of the page in guest memory.
        16 => target: U64,
        /// This entry's own index: a header read at another index is not believed.
        24 => index: U32,
        28 => kind: U32,
        32 => vm_uuid: [u8; 16],
        48 => data_len: U32,
        52 => data_crc: U32,
        56 => format: U32,
        /// CRC32C of the bytes before it.
        60 => crc: U32,
    }
}

/// A committed epoch, as its record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Epoch {
    /// Which record copy holds it.
    pub copy: usize,
    /// The state slot sequence of the epoch (its number).
    pub seq: u64,
    /// The `since_seq` of the run it belongs to.
    pub run_since_seq: u64,
}

/// Where a VM's checkpoint area is and how many undo entries it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointArea {
    pub vm_uuid: Uuid,
    pub extent: Extent,
    pub capacity: u64,
}

/// Pages of undo headers for `capacity` entries.
fn header_pages(capacity: u64) -> u64 {
    (capacity * UNDO_HEADER_LEN as u64).div_ceil(PAGE_SIZE)
}

/// Bytes of an area holding `capacity` undo pages (before extent alignment).
pub fn area_len_for(capacity: u64) -> Option<u64> {
    let pages = 1u64
        .checked_add(header_pages(capacity))?
        .checked_add(capacity)?;
    pages.checked_mul(PAGE_SIZE)
}

/// The most undo entries an area of `len` bytes holds.
pub fn capacity_of(len: u64) -> u64 {
    let pages = len / PAGE_SIZE;
    if pages < 3 {
        return 0;
    }
    // 64 entries take 65 pages (one of headers); start from that ratio and step down.
    let mut capacity = (pages - 1) * 64 / 65;
    while capacity > 0 && 1 + header_pages(capacity) + capacity > pages {
        capacity -= 1;
    }
    capacity.min(u64::from(u32::MAX))
}

impl CheckpointArea {
    pub fn new(vm_uuid: Uuid, extent: Extent) -> Self {
        CheckpointArea {
            vm_uuid,
            extent,
            capacity: capacity_of(extent.len),
        }
    }

    fn copy_offset(&self, copy: usize) -> u64 {
        self.extent.offset + (copy * EPOCH_RECORD_LEN) as u64
    }

    fn header_offset(&self, index: u64) -> u64 {
        self.extent.offset + PAGE_SIZE + index * UNDO_HEADER_LEN as u64
    }

    fn data_offset(&self, index: u64) -> u64 {
        self.extent.offset + (1 + header_pages(self.capacity) + index) * PAGE_SIZE
    }

    fn read_copy(&self, store: &dyn Persistence, copy: usize) -> Result<Option<Epoch>> {
        let mut record = EpochRecord::new_zeroed();
        store.read(self.copy_offset(copy), record.as_mut_bytes())?;
        let valid = record.magic == EPOCH_MAGIC
            && trailing_crc_holds(&record)
            && record.format.get() == CHECKPOINT_FORMAT
            && record.vm_uuid == self.vm_uuid.0
            && u64::from(record.capacity.get()) == self.capacity
            && record.seq.get() > 0;
        Ok(valid.then(|| Epoch {
            copy,
            seq: record.seq.get(),
            run_since_seq: record.run_since_seq.get(),
        }))
    }

    /// The valid epoch record with the highest sequence, if any.
    pub fn newest_epoch(&self, store: &dyn Persistence) -> Result<Option<Epoch>> {
        let a = self.read_copy(store, 0)?;
        let b = self.read_copy(store, 1)?;
        Ok(match (a, b) {
            (Some(a), Some(b)) => Some(if b.seq > a.seq { b } else { a }),
            (a, b) => a.or(b),
        })
    }

    /// Commits epoch `seq` of the run since `run_since_seq`: writes the record copy that does
    /// not hold the newest valid epoch and makes it durable. Until then the other copy (the
    /// previous epoch) stands; a torn write fails its checksum.
    pub fn commit_epoch(
        &self,
        store: &mut dyn Persistence,
        seq: u64,
        run_since_seq: u64,
    ) -> Result<()> {
        let copy = self.newest_epoch(store)?.map_or(0, |e| 1 - e.copy);
        let mut record = EpochRecord {
            magic: EPOCH_MAGIC,
            seq: seq.into(),
            run_since_seq: run_since_seq.into(),
            format: CHECKPOINT_FORMAT.into(),
            capacity: (self.capacity as u32).into(),
            vm_uuid: self.vm_uuid.0,
            reserved: [0; 12],
            crc: U32::ZERO,
        };
        record.crc = trailing_crc_of(&record).into();
        let offset = self.copy_offset(copy);
        store.write(offset, record.as_bytes())?;
        store.persist(offset, EPOCH_RECORD_LEN as u64)
    }

    /// Destroys both epoch records durably: no epoch of this area can be recovered any more.
    pub fn disarm(&self, store: &mut dyn Persistence) -> Result<()> {
        let zero = [0u8; 2 * EPOCH_RECORD_LEN];
        store.write(self.extent.offset, &zero)?;
        store.persist(self.extent.offset, zero.len() as u64)
    }

    /// Writes undo entry `index` of epoch `epoch`: page `target` of guest memory held `data`.
    /// Data first and durable, then the header that vouches for it, durable, before returning:
    /// only then may the page change.
    pub fn write_entry(
        &self,
        store: &mut dyn Persistence,
        index: u64,
        epoch: u64,
        target: u64,
        data: &[u8],
    ) -> Result<()> {
        self.write_entries(store, index, epoch, &[target], data)
    }

    /// Writes undo entries `first_index ..` of epoch `epoch`, one per page of `targets`, whose
    /// content is the matching 4 KiB of `data`: all data durable (one persist), then all the
    /// headers that vouch for it durable (one persist), before returning. A crash in between
    /// leaves entries whose header fails its checksum or names another epoch: skipped, and
    /// their pages were never released to the guest.
    pub fn write_entries(
        &self,
        store: &mut dyn Persistence,
        first_index: u64,
        epoch: u64,
        targets: &[u64],
        data: &[u8],
    ) -> Result<()> {
        let count = targets.len() as u64;
        debug_assert!(
            first_index + count <= self.capacity && data.len() as u64 == count * PAGE_SIZE
        );
        let data_offset = self.data_offset(first_index);
        store.write(data_offset, data)?;
        store.persist(data_offset, count * PAGE_SIZE)?;
        fault_injection::reached(FaultPoint::Checkpoint("ckpt-undo-data"));
        let mut headers = Vec::with_capacity(targets.len() * UNDO_HEADER_LEN);
        for ((index, &target), page) in (first_index..)
            .zip(targets)
            .zip(data.chunks_exact(PAGE_SIZE as usize))
        {
            let header = self.sealed_header(index, epoch, target, UNDO_KIND_GUEST_PAGE, page);
            headers.extend_from_slice(header.as_bytes());
        }
        let header_offset = self.header_offset(first_index);
        store.write(header_offset, &headers)?;
        store.persist(header_offset, headers.len() as u64)
    }

    /// The header of entry `index`, checksummed, for `kind`, vouching for `data`.
    fn sealed_header(
        &self,
        index: u64,
        epoch: u64,
        target: u64,
        kind: u32,
        data: &[u8],
    ) -> UndoHeader {
        let mut header = UndoHeader {
            magic: UNDO_MAGIC,
            epoch: epoch.into(),
            target: target.into(),
            index: (index as u32).into(),
            kind: kind.into(),
            vm_uuid: self.vm_uuid.0,
            data_len: (data.len() as u32).into(),
            data_crc: crc32c::crc32c(data).into(),
            format: CHECKPOINT_FORMAT.into(),
            crc: U32::ZERO,
        };
        header.crc = trailing_crc_of(&header).into();
        header
    }

    /// The header at `index` if it is an intact header of `epoch` of this VM's area (any kind).
    fn header_of_epoch<'h>(
        &self,
        bytes: &'h [u8],
        index: usize,
        epoch: u64,
    ) -> Option<&'h UndoHeader> {
        let header = UndoHeader::ref_from_bytes(bytes).ok()?;
        let ours = header.magic == UNDO_MAGIC
            && trailing_crc_holds(header)
            && header.epoch.get() == epoch
            && header.vm_uuid == self.vm_uuid.0
            && header.index.get() as usize == index;
        ours.then_some(header)
    }

    /// The intact headers of `epoch` of this VM's area (any kind), with their indices.
    fn epoch_headers(
        &self,
        store: &dyn Persistence,
        epoch: u64,
    ) -> Result<Vec<(usize, UndoHeader)>> {
        let headers = read_vec(
            store,
            self.header_offset(0),
            (self.capacity * UNDO_HEADER_LEN as u64) as usize,
        )?;
        Ok(headers
            .chunks_exact(UNDO_HEADER_LEN)
            .enumerate()
            .filter(|(index, bytes)| self.header_of_epoch(bytes, *index, epoch).is_some())
            .filter_map(|(index, bytes)| Some((index, UndoHeader::read_from_bytes(bytes).ok()?)))
            .collect())
    }

    /// The entries of epoch `epoch` whose header and data check out, as (index, guest offset),
    /// in index order. Entries of other epochs, torn entries and empty slots are skipped: a torn
    /// entry's page was never released to the guest, so it still holds the epoch's content.
    pub fn entries_of(
        &self,
        store: &dyn Persistence,
        epoch: u64,
        memory_size: u64,
        vm: &str,
    ) -> Result<Vec<(u64, u64)>> {
        let mut entries = Vec::new();
        for (index, header) in self.epoch_headers(store, epoch)? {
            let header = &header;
            if header.kind.get() & 0xffff == UNDO_KIND_DISK_BLOCK {
                // Disk bytes: `disk_entries_of` and `apply_disk`.
                continue;
            }
            let target = header.target.get();
            if header.format.get() != CHECKPOINT_FORMAT
                || header.kind.get() != UNDO_KIND_GUEST_PAGE
                || u64::from(header.data_len.get()) != PAGE_SIZE
                || !target.is_multiple_of(PAGE_SIZE)
                || target >= memory_size
            {
                // A checksummed header of this very epoch that makes no sense: not a tear.
                return Err(Error::DamagedCheckpoint {
                    vm: vm.to_string(),
                    detail: format!(
                        "undo entry {index} of epoch {epoch} is malformed (page {target:#x})"
                    ),
                });
            }
            if self.intact_page(store, index, header)?.is_some() {
                entries.push((index as u64, target));
            }
        }
        Ok(entries)
    }

    /// Epoch `epoch`'s content of the guest page at `page` if its undo log holds it: the data
    /// of the page's first intact entry (the one [`CheckpointArea::apply`] writes last). Only
    /// the page's own entries are read past their header.
    pub fn logged_page(
        &self,
        store: &dyn Persistence,
        epoch: u64,
        page: u64,
    ) -> Result<Option<Vec<u8>>> {
        for (index, header) in self.epoch_headers(store, epoch)? {
            if header.kind.get() != UNDO_KIND_GUEST_PAGE
                || header.target.get() != page
                || u64::from(header.data_len.get()) != PAGE_SIZE
            {
                continue;
            }
            if let Some(data) = self.intact_page(store, index, &header)? {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }

    /// The page of data of entry `index` (whose header is `header`), if it is intact: a torn
    /// entry's data does not match its header's checksum.
    fn intact_page(
        &self,
        store: &dyn Persistence,
        index: usize,
        header: &UndoHeader,
    ) -> Result<Option<Vec<u8>>> {
        let data = read_vec(store, self.data_offset(index as u64), PAGE_SIZE as usize)?;
        Ok((crc32c::crc32c(&data) == header.data_crc.get()).then_some(data))
    }

    /// Puts back into guest memory (`memory`, `memory_size` bytes) every page the undo log of
    /// `epoch` holds, each durable before the next. Idempotent: the log is only read, so a
    /// crash part-way leaves it for the next recovery to apply again, whole. Returns the count.
    pub fn apply(
        &self,
        store: &mut dyn Persistence,
        epoch: u64,
        memory: Extent,
        memory_size: u64,
        vm: &str,
    ) -> Result<u64> {
        let entries = self.entries_of(store, epoch, memory_size, vm)?;
        let half = entries.len() / 2;
        // Newest first, so that a page logged twice in one epoch ends with its oldest content.
        for (done, (index, target)) in entries.iter().rev().enumerate() {
            if done == half && half > 0 {
                fault_injection::reached(FaultPoint::Checkpoint("ckpt-recover-apply"));
            }
            let data = read_vec(store, self.data_offset(*index), PAGE_SIZE as usize)?;
            store.write(memory.offset + target, &data)?;
            store.persist(memory.offset + target, PAGE_SIZE)?;
        }
        Ok(entries.len() as u64)
    }
}

/// Old bytes of a disk, as one undo entry holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskUndoBlock {
    /// The disk's index: its position in the VM's stored configuration.
    pub disk: u16,
    /// Byte offset on the disk (a multiple of [`DISK_UNDO_SECTOR`]).
    pub offset: u64,
    /// The content at the epoch's start: 512 to 4096 bytes, a multiple of 512.
    pub data: Vec<u8>,
}

/// Where a disk entry of the log is: (entry index, disk, byte offset, length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskUndoEntry {
    pub index: u64,
    pub disk: u16,
    pub offset: u64,
    pub len: u64,
}

/// What recovery writes old disk bytes through: the VMM's disk images, by index. The
/// checkpoint code never opens a disk itself.
pub trait DiskUndoTarget {
    /// Writes `data` at byte `offset` of disk `disk` (the write need not be durable yet).
    fn write_disk(
        &mut self,
        disk: u16,
        offset: u64,
        data: &[u8],
    ) -> std::result::Result<(), HostError>;
    /// Makes the writes to disk `disk` durable (fdatasync).
    fn sync_disk(&mut self, disk: u16) -> std::result::Result<(), HostError>;
}

/// No disk access: recovery refuses an epoch that logged disk bytes instead of rolling back
/// memory alone.
pub struct NoDisks;

impl DiskUndoTarget for NoDisks {
    fn write_disk(&mut self, disk: u16, _: u64, _: &[u8]) -> std::result::Result<(), HostError> {
        Err(
            format!("the epoch logged writes to disk {disk}, and recovery was given no disks")
                .into(),
        )
    }
    fn sync_disk(&mut self, disk: u16) -> std::result::Result<(), HostError> {
        self.write_disk(disk, 0, &[])
    }
}

impl CheckpointArea {
    /// Writes `blocks` as undo entries `first..` of epoch `epoch`: all their data, durable, then
    /// all their headers, durable, before returning (entries are adjacent, so each is one
    /// persist): only then may the disk be written.
    pub fn write_disk_entries(
        &self,
        store: &mut dyn Persistence,
        first: u64,
        epoch: u64,
        blocks: &[DiskUndoBlock],
    ) -> Result<()> {
        let count = blocks.len() as u64;
        if count == 0 {
            return Ok(());
        }
        debug_assert!(first + count <= self.capacity);
        for (i, block) in blocks.iter().enumerate() {
            store.write(self.data_offset(first + i as u64), &block.data)?;
        }
        store.persist(self.data_offset(first), count * PAGE_SIZE)?;
        fault_injection::reached(FaultPoint::Checkpoint("ckpt-undo-data"));
        let mut headers = Vec::with_capacity(blocks.len() * UNDO_HEADER_LEN);
        for (i, block) in blocks.iter().enumerate() {
            let kind = UNDO_KIND_DISK_BLOCK | (u32::from(block.disk) << 16);
            let header =
                self.sealed_header(first + i as u64, epoch, block.offset, kind, &block.data);
            headers.extend_from_slice(header.as_bytes());
        }
        store.write(self.header_offset(first), &headers)?;
        store.persist(self.header_offset(first), headers.len() as u64)
    }

    /// The disk entries of epoch `epoch` whose header and data check out, in index order. Torn
    /// entries are skipped: the disk write they were to allow never started.
    pub fn disk_entries_of(
        &self,
        store: &dyn Persistence,
        epoch: u64,
        vm: &str,
    ) -> Result<Vec<DiskUndoEntry>> {
        let mut entries = Vec::new();
        for (index, header) in self.epoch_headers(store, epoch)? {
            let header = &header;
            let kind = header.kind.get();
            if kind & 0xffff != UNDO_KIND_DISK_BLOCK {
                continue;
            }
            let (offset, len) = (header.target.get(), u64::from(header.data_len.get()));
            if header.format.get() != CHECKPOINT_FORMAT
                || !offset.is_multiple_of(DISK_UNDO_SECTOR)
                || !len.is_multiple_of(DISK_UNDO_SECTOR)
                || !(DISK_UNDO_SECTOR..=DISK_UNDO_BLOCK).contains(&len)
            {
                return Err(Error::DamagedCheckpoint {
                    vm: vm.to_string(),
                    detail: format!(
                        "undo entry {index} of epoch {epoch} is a malformed disk entry \
                         ({len} bytes at {offset:#x})"
                    ),
                });
            }
            let data = read_vec(store, self.data_offset(index as u64), len as usize)?;
            if crc32c::crc32c(&data) == header.data_crc.get() {
                entries.push(DiskUndoEntry {
                    index: index as u64,
                    disk: (kind >> 16) as u16,
                    offset,
                    len,
                });
            }
        }
        Ok(entries)
    }

    /// Writes every disk entry of `epoch` back through `disks`, newest first (a block logged
    /// twice ends with its oldest content), then syncs each disk written. Idempotent, as
    /// [`CheckpointArea::apply`]: the log is only read. Returns the count.
    pub fn apply_disk(
        &self,
        store: &dyn Persistence,
        epoch: u64,
        vm: &str,
        disks: &mut dyn DiskUndoTarget,
    ) -> Result<u64> {
        let entries = self.disk_entries_of(store, epoch, vm)?;
        let failed = |disk: u16, source: HostError| Error::DiskUndo {
            vm: vm.to_string(),
            disk,
            source,
        };
        let mut written = std::collections::BTreeSet::new();
        for entry in entries.iter().rev() {
            let data = read_vec(store, self.data_offset(entry.index), entry.len as usize)?;
            disks
                .write_disk(entry.disk, entry.offset, &data)
                .map_err(|e| failed(entry.disk, e))?;
            written.insert(entry.disk);
        }
        for disk in written {
            disks.sync_disk(disk).map_err(|e| failed(disk, e))?;
        }
        Ok(entries.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::memory::MemoryBackend;

    fn area(capacity_pages: u64) -> (MemoryBackend, CheckpointArea) {
        let len = area_len_for(capacity_pages).unwrap();
        let store = MemoryBackend::new(vec![0; (PAGE_SIZE + len) as usize]);
        let area = CheckpointArea::new(
            Uuid([9; 16]),
            Extent {
                offset: PAGE_SIZE,
                len,
            },
        );
        (store, area)
    }

    #[test]
    fn capacity_and_length_agree() {
        for capacity in [1, 2, 63, 64, 65, 1000, 4096] {
            let len = area_len_for(capacity).unwrap();
            assert_eq!(capacity_of(len), capacity, "capacity {capacity}");
            assert!(capacity_of(len - PAGE_SIZE) < capacity);
        }
        assert_eq!(capacity_of(2 * PAGE_SIZE), 0);
        // A 2 MiB extent: 512 pages, 1 of epoch records, 8 of headers, 503 of data.
        assert_eq!(capacity_of(2 << 20), 503);
    }

    #[test]
    fn epochs_alternate_copies_and_the_newest_wins_until_disarmed() {
        let (mut store, area) = area(4);
        assert_eq!(area.newest_epoch(&store).unwrap(), None);
        area.commit_epoch(&mut store, 3, 2).unwrap();
        let first = area.newest_epoch(&store).unwrap().unwrap();
        assert_eq!((first.copy, first.seq, first.run_since_seq), (0, 3, 2));
        area.commit_epoch(&mut store, 4, 2).unwrap();
        assert_eq!(area.newest_epoch(&store).unwrap().unwrap().copy, 1);
        // A torn third commit (into copy 0) leaves epoch 4.
        area.commit_epoch(&mut store, 5, 2).unwrap();
        store.bytes[(PAGE_SIZE + 9) as usize] ^= 1;
        assert_eq!(area.newest_epoch(&store).unwrap().unwrap().seq, 4);
        // Another VM's area at the same place believes none of it.
        let other = CheckpointArea {
            vm_uuid: Uuid([8; 16]),
            ..area
        };
        assert_eq!(other.newest_epoch(&store).unwrap(), None);
        area.disarm(&mut store).unwrap();
        assert_eq!(area.newest_epoch(&store).unwrap(), None);
    }

    #[test]
    fn apply_restores_only_checked_entries_of_the_epoch() {
        let (mut store, area) = area(8);
        let memory = Extent {
            offset: store.len(),
            len: 4 * PAGE_SIZE,
        };
        store.grow(store.len() + memory.len).unwrap();
        let page = |byte: u8| vec![byte; PAGE_SIZE as usize];
        area.write_entry(&mut store, 0, 7, 0, &page(1)).unwrap();
        area.write_entry(&mut store, 1, 6, PAGE_SIZE, &page(2))
            .unwrap(); // older epoch
        area.write_entry(&mut store, 2, 7, 2 * PAGE_SIZE, &page(3))
            .unwrap();
        area.write_entry(&mut store, 3, 7, 3 * PAGE_SIZE, &page(4))
            .unwrap();
        // Entry 3's data torn: skipped.
        let data3 = area.data_offset(3) as usize;
        store.bytes[data3 + 100] ^= 0xff;
        assert_eq!(
            area.entries_of(&store, 7, memory.len, "vm").unwrap(),
            [(0, 0), (2, 2 * PAGE_SIZE)]
        );
        assert_eq!(
            area.apply(&mut store, 7, memory, memory.len, "vm").unwrap(),
            2
        );
        let firsts = |store: &MemoryBackend| {
            (0..4)
                .map(|page| store.bytes[(memory.offset + page * PAGE_SIZE) as usize])
                .collect::<Vec<_>>()
        };
        assert_eq!(firsts(&store), [1, 0, 3, 0]);
        // Applying again changes nothing.
        assert_eq!(
            area.apply(&mut store, 7, memory, memory.len, "vm").unwrap(),
            2
        );
        assert_eq!(firsts(&store), [1, 0, 3, 0]);
    }

    #[test]
    fn a_checksummed_entry_outside_guest_memory_is_refused() {
        let (mut store, area) = area(2);
        area.write_entry(&mut store, 0, 1, 8 * PAGE_SIZE, &[0; 4096])
            .unwrap();
        assert!(area.entries_of(&store, 1, 4 * PAGE_SIZE, "vm").is_err());
        assert!(area
            .entries_of(&store, 2, 4 * PAGE_SIZE, "vm")
            .unwrap()
            .is_empty());
    }
}
