//! The region superblock: identity, geometry and the clean-shutdown marker.
//!
//! Two copies live at offsets 0 and 4096. An update writes the copy not
//! holding the current generation with generation + 1 and persists it; the
//! reader takes the valid copy with the highest generation, so a torn update
//! leaves the previous superblock in force.

use crate::error::{Error, Result};
use crate::identity::Uuid;
use crate::le_bytes::{le_record, trailing_crc_holds, trailing_crc_of};
use crate::le_bytes::{U32, U64};

pub const MAGIC: [u8; 8] = *b"NVHVREGN";
/// The version of a region with no VM swapped out: what every older build reads.
pub const FORMAT_VERSION: u32 = 1;
/// The version while a VM of the region is swapped out (its table entry has a swap record,
/// which an older build cannot read): such a build refuses the region with a version error
/// instead of calling its table corrupt. Set before the first swapped-out entry is written,
/// lowered again once none is left.
pub const FORMAT_VERSION_SWAPPED: u32 = 2;
/// The version while a VM of the region has a checkpoint area (its table entry names a third
/// extent, which an older build would not see and could hand out again): set before the first
/// such entry is written, lowered once none is left. A build that reads it reads version 2 too.
pub const FORMAT_VERSION_CHECKPOINTS: u32 = 3;
/// Bytes of a superblock copy that carry data (the rest of its 4 KiB is zero).
pub const ENCODED_LEN: usize = 128;
/// Distance between the two superblock copies and size of the superblock area.
pub const COPY_STRIDE: u64 = 4096;
pub const AREA_LEN: u64 = 2 * COPY_STRIDE;

le_record! {
    /// A superblock copy as stored (see docs/nv-format.md).
    struct Encoded(ENCODED_LEN) {
        0 => magic: [u8; 8],
        8 => version: U32,
        12 => encoded_len: U32,
        16 => generation: U64,
        24 => region_uuid: [u8; 16],
        40 => region_size: U64,
        48 => extent_alignment: U64,
        56 => table_offset: U64,
        64 => table_copy_len: U64,
        72 => data_start: U64,
        80 => state_slot_len: U64,
        88 => shutdown_marker: U32,
        92 => reserved: [u8; 32],
        /// CRC32C of the bytes before it.
        124 => crc: U32,
    }
}

/// Whether any VM of the region may be running (and so may die without a save).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMarker {
    /// No VM was running at the last update: everything in the region is at rest.
    Clean,
    /// At least one VM was marked running; if the host died, check each VM's record.
    VmsRunning,
}

/// Decoded superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// [`FORMAT_VERSION`], [`FORMAT_VERSION_SWAPPED`] or [`FORMAT_VERSION_CHECKPOINTS`].
    pub format_version: u32,
    pub generation: u64,
    pub region_uuid: Uuid,
    /// Bytes of the backing store that belong to the region.
    pub region_size: u64,
    /// Alignment (and granularity) of every allocated extent.
    pub extent_alignment: u64,
    /// Offset of VM-table copy A; copy B follows it.
    pub table_offset: u64,
    pub table_copy_len: u64,
    /// First byte the allocator may hand out.
    pub data_start: u64,
    /// Size of one state slot for VMs created in this region.
    pub state_slot_len: u64,
    pub shutdown_marker: ShutdownMarker,
}

/// The lowest version whose readers understand every entry of `table`.
pub(crate) fn required_version(table: &crate::vm_table::VmTable) -> u32 {
    // The swap part is what made version 2; version 3 readers read both.
    if table.entries.iter().any(|e| e.checkpoint.len > 0) {
        FORMAT_VERSION_CHECKPOINTS
    } else if table.entries.iter().any(|e| e.swap.is_some()) {
        FORMAT_VERSION_SWAPPED
    } else {
        FORMAT_VERSION
    }
}

impl Superblock {
    pub fn encode(&self) -> [u8; ENCODED_LEN] {
        let marker = match self.shutdown_marker {
            ShutdownMarker::Clean => 0,
            ShutdownMarker::VmsRunning => 1,
        };
        let mut encoded = Encoded {
            magic: MAGIC,
            version: self.format_version.into(),
            encoded_len: (ENCODED_LEN as u32).into(),
            generation: self.generation.into(),
            region_uuid: self.region_uuid.0,
            region_size: self.region_size.into(),
            extent_alignment: self.extent_alignment.into(),
            table_offset: self.table_offset.into(),
            table_copy_len: self.table_copy_len.into(),
            data_start: self.data_start.into(),
            state_slot_len: self.state_slot_len.into(),
            shutdown_marker: U32::new(marker),
            reserved: [0; 32],
            crc: U32::ZERO,
        };
        encoded.crc = trailing_crc_of(&encoded).into();
        zerocopy::transmute!(encoded)
    }

    /// Decodes one copy; `Ok(None)` if the copy carries no magic at all.
    pub fn decode(buf: &[u8; ENCODED_LEN]) -> Result<Option<Superblock>> {
        let encoded: &Encoded = zerocopy::transmute_ref!(buf);
        if encoded.magic != MAGIC {
            return Ok(None);
        }
        let version = encoded.version.get();
        let crc_ok = trailing_crc_holds(encoded);
        if !(FORMAT_VERSION..=FORMAT_VERSION_CHECKPOINTS).contains(&version) {
            // Only believe the version if the copy is intact; a bit flip is corruption.
            return Err(if crc_ok {
                Error::UnsupportedFormatVersion {
                    found: version,
                    supported: FORMAT_VERSION_CHECKPOINTS,
                }
            } else {
                Error::CorruptSuperblock("checksum mismatch".into())
            });
        }
        if !crc_ok {
            return Err(Error::CorruptSuperblock("checksum mismatch".into()));
        }
        if encoded.encoded_len.get() != ENCODED_LEN as u32 {
            return Err(Error::CorruptSuperblock("wrong header length".into()));
        }
        let shutdown_marker = match encoded.shutdown_marker.get() {
            0 => ShutdownMarker::Clean,
            1 => ShutdownMarker::VmsRunning,
            other => return Err(Error::CorruptSuperblock(format!("shutdown marker {other}"))),
        };
        let sb = Superblock {
            format_version: version,
            generation: encoded.generation.get(),
            region_uuid: Uuid(encoded.region_uuid),
            region_size: encoded.region_size.get(),
            extent_alignment: encoded.extent_alignment.get(),
            table_offset: encoded.table_offset.get(),
            table_copy_len: encoded.table_copy_len.get(),
            data_start: encoded.data_start.get(),
            state_slot_len: encoded.state_slot_len.get(),
            shutdown_marker,
        };
        sb.validate()?;
        Ok(Some(sb))
    }

    /// Geometry checks: a checksum only proves the copy is what was written.
    fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::CorruptSuperblock(what.to_string()));
        if !self.extent_alignment.is_power_of_two() || self.extent_alignment < 4096 {
            return bad("extent alignment is not a power of two >= 4096");
        }
        let table_end = self
            .table_copy_len
            .checked_mul(2)
            .and_then(|t| t.checked_add(self.table_offset));
        match table_end {
            Some(end) if self.table_offset >= AREA_LEN && end <= self.data_start => {}
            _ => return bad("VM table outside the metadata area"),
        }
        if self.table_copy_len < crate::vm_table::HEADER_LEN as u64 {
            return bad("VM table copy too small");
        }
        if !self.data_start.is_multiple_of(self.extent_alignment)
            || self.data_start > self.region_size
        {
            return bad("data area misplaced");
        }
        if self.state_slot_len < 2 * crate::state_slots::HEADER_LEN as u64
            || !self.state_slot_len.is_multiple_of(4096)
        {
            return bad("state slot size unusable");
        }
        Ok(())
    }

    /// Offset of copy `index` (0 or 1) of the superblock.
    pub fn copy_offset(index: usize) -> u64 {
        index as u64 * COPY_STRIDE
    }

    /// Which copy the next update goes to: the one not holding this generation.
    pub fn next_copy_index(&self) -> usize {
        ((self.generation + 1) % 2) as usize
    }
}

/// What the two superblock copies say.
pub fn select(copies: [Result<Option<Superblock>>; 2]) -> Result<Option<Superblock>> {
    let mut best: Option<Superblock> = None;
    let mut first_error = None;
    for copy in copies {
        match copy {
            Ok(Some(sb)) => {
                if best.as_ref().is_none_or(|b| sb.generation > b.generation) {
                    best = Some(sb);
                }
            }
            Ok(None) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match (best, first_error) {
        (Some(sb), _) => Ok(Some(sb)),
        (None, Some(e)) => Err(e),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            format_version: FORMAT_VERSION,
            generation: 7,
            region_uuid: Uuid([9; 16]),
            region_size: 64 << 20,
            extent_alignment: 2 << 20,
            table_offset: AREA_LEN,
            table_copy_len: 64 << 10,
            data_start: 2 << 20,
            state_slot_len: 1 << 20,
            shutdown_marker: ShutdownMarker::VmsRunning,
        }
    }

    #[test]
    fn round_trips_and_places_fields_at_documented_offsets() {
        let sb = sample();
        let buf = sb.encode();
        assert_eq!(&buf[0..8], b"NVHVREGN");
        assert_eq!(&buf[8..12], &1u32.to_le_bytes());
        assert_eq!(&buf[40..48], &(64u64 << 20).to_le_bytes());
        assert_eq!(&buf[124..128], &crc32c::crc32c(&buf[..124]).to_le_bytes());
        assert_eq!(Superblock::decode(&buf).unwrap(), Some(sb));
    }

    #[test]
    fn future_version_and_bit_flip_are_told_apart() {
        let mut buf = sample().encode();
        buf[8..12].copy_from_slice(&4u32.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..124]);
        buf[124..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Superblock::decode(&buf),
            Err(Error::UnsupportedFormatVersion {
                found: 4,
                supported: 3
            })
        ));
        let mut flipped = sample().encode();
        flipped[45] ^= 1;
        assert!(matches!(
            Superblock::decode(&flipped),
            Err(Error::CorruptSuperblock(_))
        ));
        assert!(matches!(Superblock::decode(&[0; ENCODED_LEN]), Ok(None)));
    }

    #[test]
    fn version_2_marks_a_region_with_a_swapped_out_vm_and_reads_back() {
        let sb = Superblock {
            format_version: FORMAT_VERSION_SWAPPED,
            ..sample()
        };
        let buf = sb.encode();
        assert_eq!(&buf[8..12], &2u32.to_le_bytes());
        assert_eq!(Superblock::decode(&buf).unwrap(), Some(sb));
    }

    #[test]
    fn version_3_marks_a_region_with_a_checkpoint_area_and_reads_back() {
        let sb = Superblock {
            format_version: FORMAT_VERSION_CHECKPOINTS,
            ..sample()
        };
        let buf = sb.encode();
        assert_eq!(&buf[8..12], &3u32.to_le_bytes());
        assert_eq!(Superblock::decode(&buf).unwrap(), Some(sb));
    }

    #[test]
    fn select_prefers_the_newest_valid_copy() {
        let old = sample();
        let new = Superblock {
            generation: 8,
            ..sample()
        };
        let chosen = select([Ok(Some(old.clone())), Ok(Some(new.clone()))]).unwrap();
        assert_eq!(chosen, Some(new));
        let torn = select([
            Ok(Some(old.clone())),
            Err(Error::CorruptSuperblock("x".into())),
        ])
        .unwrap();
        assert_eq!(torn, Some(old));
        assert!(select([Ok(None), Err(Error::CorruptSuperblock("x".into()))]).is_err());
        assert_eq!(select([Ok(None), Ok(None)]).unwrap(), None);
    }
}
