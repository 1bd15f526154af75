//! The region superblock: identity, geometry and the clean-shutdown marker.
//!
//! Two copies live at offsets 0 and 4096. An update writes the copy not
//! holding the current generation with generation + 1 and persists it; the
//! reader takes the valid copy with the highest generation, so a torn update
//! leaves the previous superblock in force.

use crate::error::{Error, Result};
use crate::identity::Uuid;
use crate::le_bytes::{get_array, get_u32, get_u64, put_u32, put_u64};

pub const MAGIC: [u8; 8] = *b"NVHVREGN";
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of a superblock copy that carry data (the rest of its 4 KiB is zero).
pub const ENCODED_LEN: usize = 128;
/// Distance between the two superblock copies and size of the superblock area.
pub const COPY_STRIDE: u64 = 4096;
pub const AREA_LEN: u64 = 2 * COPY_STRIDE;

// Field offsets inside a copy (see docs/nv-format.md).
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_ENCODED_LEN: usize = 12;
const OFF_GENERATION: usize = 16;
const OFF_UUID: usize = 24;
const OFF_REGION_SIZE: usize = 40;
const OFF_ALIGNMENT: usize = 48;
const OFF_TABLE_OFFSET: usize = 56;
const OFF_TABLE_COPY_LEN: usize = 64;
const OFF_DATA_START: usize = 72;
const OFF_SLOT_LEN: usize = 80;
const OFF_SHUTDOWN_MARKER: usize = 88;
const OFF_CRC: usize = 124;

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

impl Superblock {
    pub fn encode(&self) -> [u8; ENCODED_LEN] {
        let mut buf = [0u8; ENCODED_LEN];
        buf[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(&mut buf, OFF_VERSION, FORMAT_VERSION);
        put_u32(&mut buf, OFF_ENCODED_LEN, ENCODED_LEN as u32);
        put_u64(&mut buf, OFF_GENERATION, self.generation);
        buf[OFF_UUID..OFF_UUID + 16].copy_from_slice(&self.region_uuid.0);
        put_u64(&mut buf, OFF_REGION_SIZE, self.region_size);
        put_u64(&mut buf, OFF_ALIGNMENT, self.extent_alignment);
        put_u64(&mut buf, OFF_TABLE_OFFSET, self.table_offset);
        put_u64(&mut buf, OFF_TABLE_COPY_LEN, self.table_copy_len);
        put_u64(&mut buf, OFF_DATA_START, self.data_start);
        put_u64(&mut buf, OFF_SLOT_LEN, self.state_slot_len);
        let marker = match self.shutdown_marker {
            ShutdownMarker::Clean => 0,
            ShutdownMarker::VmsRunning => 1,
        };
        put_u32(&mut buf, OFF_SHUTDOWN_MARKER, marker);
        let crc = crc32c::crc32c(&buf[..OFF_CRC]);
        put_u32(&mut buf, OFF_CRC, crc);
        buf
    }

    /// Decodes one copy; `Ok(None)` if the copy carries no magic at all.
    pub fn decode(buf: &[u8; ENCODED_LEN]) -> Result<Option<Superblock>> {
        if buf[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
            return Ok(None);
        }
        let version = get_u32(buf, OFF_VERSION);
        let stored_crc = get_u32(buf, OFF_CRC);
        let crc_ok = crc32c::crc32c(&buf[..OFF_CRC]) == stored_crc;
        if version != FORMAT_VERSION {
            // Only believe the version if the copy is intact; a bit flip is corruption.
            return Err(if crc_ok {
                Error::UnsupportedFormatVersion {
                    found: version,
                    supported: FORMAT_VERSION,
                }
            } else {
                Error::CorruptSuperblock("checksum mismatch".into())
            });
        }
        if !crc_ok {
            return Err(Error::CorruptSuperblock("checksum mismatch".into()));
        }
        if get_u32(buf, OFF_ENCODED_LEN) != ENCODED_LEN as u32 {
            return Err(Error::CorruptSuperblock("wrong header length".into()));
        }
        let shutdown_marker = match get_u32(buf, OFF_SHUTDOWN_MARKER) {
            0 => ShutdownMarker::Clean,
            1 => ShutdownMarker::VmsRunning,
            other => return Err(Error::CorruptSuperblock(format!("shutdown marker {other}"))),
        };
        let sb = Superblock {
            generation: get_u64(buf, OFF_GENERATION),
            region_uuid: Uuid(get_array(buf, OFF_UUID)),
            region_size: get_u64(buf, OFF_REGION_SIZE),
            extent_alignment: get_u64(buf, OFF_ALIGNMENT),
            table_offset: get_u64(buf, OFF_TABLE_OFFSET),
            table_copy_len: get_u64(buf, OFF_TABLE_COPY_LEN),
            data_start: get_u64(buf, OFF_DATA_START),
            state_slot_len: get_u64(buf, OFF_SLOT_LEN),
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
        assert_eq!(get_u32(&buf, 8), 1);
        assert_eq!(get_u64(&buf, 40), 64 << 20);
        assert_eq!(Superblock::decode(&buf).unwrap(), Some(sb));
    }

    #[test]
    fn future_version_and_bit_flip_are_told_apart() {
        let mut buf = sample().encode();
        put_u32(&mut buf, OFF_VERSION, 2);
        let crc = crc32c::crc32c(&buf[..OFF_CRC]);
        put_u32(&mut buf, OFF_CRC, crc);
        assert!(matches!(
            Superblock::decode(&buf),
            Err(Error::UnsupportedFormatVersion { found: 2, .. })
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
