//! The double-buffered state area of a VM: two slots, each a header and a payload.
//!
//! A save writes the payload into the slot that does not hold the newest
//! valid state, persists it, then writes that slot's header (sequence,
//! length, payload checksum, header checksum, owning VM's UUID) and persists
//! it. Until the header is durable the other slot still holds the previous
//! state untouched, so a save cut at any point leaves at least that one.

use crate::error::{Error, Result};
use crate::fault_injection::{self, FaultPoint};
use crate::identity::Uuid;
use crate::le_bytes::{le_record, trailing_crc_holds, trailing_crc_of};
use crate::le_bytes::{FromZeros, IntoBytes, U32, U64};
use crate::persistence::{read_vec, Persistence};
use crate::vm_table::Extent;

pub const MAGIC: [u8; 8] = *b"NVSTSLOT";
pub const HEADER_LEN: usize = 64;
pub const SLOT_FORMAT: u32 = 1;

le_record! {
    /// The header at the start of a slot, as stored (see docs/nv-format.md).
    struct SlotHeader(HEADER_LEN) {
        0 => magic: [u8; 8],
        8 => seq: U64,
        16 => payload_len: U64,
        24 => payload_crc: U32,
        28 => format: U32,
        32 => vm_uuid: [u8; 16],
        48 => reserved: [u8; 12],
        /// CRC32C of the bytes before it.
        60 => crc: U32,
    }
}

/// A slot whose header and payload both check out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidSlot {
    pub index: usize,
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// What one slot holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotCondition {
    /// No slot header: never written, or invalidated on purpose (`invalidate`).
    Empty,
    /// A header of another VM (a deleted VM's leftover).
    Foreign,
    /// A header that fails a check: `seq` when the header itself checks out (the payload does
    /// not), `None` when the header is damaged too.
    Damaged {
        seq: Option<u64>,
        what: &'static str,
    },
    Valid(ValidSlot),
}

/// Where a VM's two slots are.
#[derive(Clone, Copy, Debug)]
pub struct StateArea {
    pub vm_uuid: Uuid,
    pub area: Extent,
}

impl StateArea {
    pub fn slot_len(&self) -> u64 {
        self.area.len / 2
    }

    pub fn payload_capacity(&self) -> u64 {
        self.slot_len().saturating_sub(HEADER_LEN as u64)
    }

    pub(crate) fn slot_offset(&self, index: usize) -> u64 {
        self.area.offset + index as u64 * self.slot_len()
    }

    /// Reads slot `index`; `None` if it is empty, torn, corrupt or another VM's.
    pub fn read_slot(&self, store: &dyn Persistence, index: usize) -> Result<Option<ValidSlot>> {
        Ok(match self.inspect_slot(store, index)? {
            SlotCondition::Valid(slot) => Some(slot),
            _ => None,
        })
    }

    /// What slot `index` holds, telling an empty or foreign slot from a damaged one.
    pub fn inspect_slot(&self, store: &dyn Persistence, index: usize) -> Result<SlotCondition> {
        let offset = self.slot_offset(index);
        let mut header = SlotHeader::new_zeroed();
        store.read(offset, header.as_mut_bytes())?;
        if header.magic != MAGIC {
            return Ok(SlotCondition::Empty);
        }
        if !trailing_crc_holds(&header) {
            return Ok(SlotCondition::Damaged {
                seq: None,
                what: "header checksum mismatch",
            });
        }
        if header.vm_uuid != self.vm_uuid.0 {
            return Ok(SlotCondition::Foreign);
        }
        let seq = header.seq.get();
        if header.format.get() != SLOT_FORMAT {
            return Ok(SlotCondition::Damaged {
                seq: Some(seq),
                what: "unknown slot format",
            });
        }
        let len = header.payload_len.get();
        if len > self.payload_capacity() {
            return Ok(SlotCondition::Damaged {
                seq: Some(seq),
                what: "payload length beyond the slot",
            });
        }
        let payload = read_vec(store, offset + HEADER_LEN as u64, len as usize)?;
        if crc32c::crc32c(&payload) != header.payload_crc.get() {
            return Ok(SlotCondition::Damaged {
                seq: Some(seq),
                what: "payload checksum mismatch",
            });
        }
        Ok(SlotCondition::Valid(ValidSlot {
            index,
            seq,
            payload,
        }))
    }

    /// The valid slot with the highest sequence.
    pub fn newest(&self, store: &dyn Persistence) -> Result<Option<ValidSlot>> {
        let a = self.read_slot(store, 0)?;
        let b = self.read_slot(store, 1)?;
        Ok(match (a, b) {
            (Some(a), Some(b)) => Some(if b.seq > a.seq { b } else { a }),
            (a, b) => a.or(b),
        })
    }

    /// Destroys slot `index`'s header so its state can never be taken again.
    pub fn invalidate(&self, store: &mut dyn Persistence, index: usize) -> Result<()> {
        let offset = self.slot_offset(index);
        store.write(offset, &[0u8; HEADER_LEN])?;
        store.persist(offset, HEADER_LEN as u64)
    }

    /// Commits `payload` as sequence `seq` into the slot not holding `newest`.
    pub fn write(
        &self,
        store: &mut dyn Persistence,
        newest: Option<&ValidSlot>,
        seq: u64,
        payload: &[u8],
    ) -> Result<()> {
        if payload.len() as u64 > self.payload_capacity() {
            return Err(Error::StateTooLarge {
                len: payload.len() as u64,
                capacity: self.payload_capacity(),
            });
        }
        let index = newest.map_or(0, |slot| 1 - slot.index);
        let offset = self.slot_offset(index);
        // The old header of this slot may survive next to a half-written new
        // payload: its payload checksum then fails (or the bytes are the old
        // state, which is what it describes), and the run record never points
        // at an older sequence, so no stale slot can be resumed.
        store.write(offset + HEADER_LEN as u64, payload)?;
        store.persist(offset + HEADER_LEN as u64, payload.len() as u64)?;
        fault_injection::reached(FaultPoint::CommitPayload);

        let mut header = SlotHeader {
            magic: MAGIC,
            seq: seq.into(),
            payload_len: (payload.len() as u64).into(),
            payload_crc: crc32c::crc32c(payload).into(),
            format: SLOT_FORMAT.into(),
            vm_uuid: self.vm_uuid.0,
            reserved: [0; 12],
            crc: U32::ZERO,
        };
        header.crc = trailing_crc_of(&header).into();
        store.write(offset, header.as_bytes())?;
        store.persist(offset, HEADER_LEN as u64)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::memory::MemoryBackend;

    fn area() -> (MemoryBackend, StateArea) {
        let store = MemoryBackend::new(vec![0; 3 * 4096]);
        let area = StateArea {
            vm_uuid: Uuid([5; 16]),
            area: Extent {
                offset: 4096,
                len: 8192,
            },
        };
        (store, area)
    }

    #[test]
    fn saves_alternate_slots_and_newest_wins() {
        let (mut store, area) = area();
        assert_eq!(area.newest(&store).unwrap(), None);
        area.write(&mut store, None, 1, b"first").unwrap();
        let newest = area.newest(&store).unwrap().unwrap();
        assert_eq!(
            (newest.index, newest.seq, newest.payload.as_slice()),
            (0, 1, &b"first"[..])
        );
        area.write(&mut store, Some(&newest), 2, b"second").unwrap();
        let newest = area.newest(&store).unwrap().unwrap();
        assert_eq!((newest.index, newest.seq), (1, 2));
        area.write(&mut store, Some(&newest), 3, b"third").unwrap();
        let newest = area.newest(&store).unwrap().unwrap();
        assert_eq!(
            (newest.index, newest.seq, newest.payload.as_slice()),
            (0, 3, &b"third"[..])
        );
        assert_eq!(
            area.read_slot(&store, 1).unwrap().unwrap().payload,
            b"second"
        );
    }

    #[test]
    fn damaged_payload_or_foreign_uuid_invalidates_a_slot() {
        let (mut store, area) = area();
        area.write(&mut store, None, 1, b"payload").unwrap();
        store.bytes[4096 + HEADER_LEN + 2] ^= 0x40;
        assert_eq!(area.read_slot(&store, 0).unwrap(), None);
        store.bytes[4096 + HEADER_LEN + 2] ^= 0x40;
        assert!(area.read_slot(&store, 0).unwrap().is_some());
        let other_vm = StateArea {
            vm_uuid: Uuid([6; 16]),
            ..area
        };
        assert_eq!(other_vm.read_slot(&store, 0).unwrap(), None);
    }

    #[test]
    fn oversized_state_is_refused() {
        let (mut store, area) = area();
        let big = vec![1u8; 4096];
        assert!(matches!(
            area.write(&mut store, None, 1, &big),
            Err(Error::StateTooLarge {
                len: 4096,
                capacity: 4032
            })
        ));
    }
}
