//! The record of a VM's last completed save (kind, sequence, per-phase and total durations,
//! deadline), kept in the region so that whoever opens it later — the recovering VMM, a region
//! listing — can show how the save went after the process that saved has exited.
//!
//! The record is written into the tail of the state slot that holds the save, after the commit:
//! it is informational and outside the commit protocol. A slot's header and payload never
//! reach the tail when a record is written (it is skipped when the payload is that large), old
//! readers never read past `payload_len`, and a record is taken only when its checksum, VM UUID
//! and sequence match the VM's run record, so a torn, stale or foreign record is never shown.
//! Because it sits past the 64-byte header, it also outlives the header's invalidation when
//! the VM resumes: the recovered VM still shows how its last save went.

use std::time::Duration;

use crate::coordinator::{SavePhase, SaveReport};
use crate::error::Result;
use crate::le_bytes::{le_record, trailing_crc_holds, trailing_crc_of};
use crate::le_bytes::{FromBytes, U32, U64};
use crate::persistence::{read_vec, Persistence};
use crate::state_slots::{self, StateArea};
use crate::vm_table::ShutdownKind;

pub const MAGIC: [u8; 8] = *b"NVSAVRPT";
/// Bytes at the end of a slot that the record takes.
pub const RECORD_LEN: usize = 128;
/// Phase durations the record has room for (the coordinator has five phases).
const MAX_PHASES: usize = 6;

le_record! {
    /// The record at the tail of a slot, as stored (see docs/nv-format.md).
    struct Record(RECORD_LEN) {
        0 => magic: [u8; 8],
        8 => seq: U64,
        16 => vm_uuid: [u8; 16],
        32 => kind: U32,
        36 => flags: U32,
        40 => deadline_us: U64,
        48 => total_us: U64,
        56 => state_bytes: U64,
        64 => phase_count: U32,
        68 => reserved: [u8; 4],
        /// Durations by phase number, phase 1 first.
        72 => phase_us: [U64; MAX_PHASES],
        120 => reserved_tail: [u8; 4],
        /// CRC32C of the bytes before it.
        124 => crc: U32,
    }
}

const FLAG_DEADLINE_OVERRUN: u32 = 1;

// Every phase's duration has its place in the record.
const _: () = assert!(SavePhase::ALL.len() <= MAX_PHASES);

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn encode(area: &StateArea, report: &SaveReport) -> [u8; RECORD_LEN] {
    let flags = if report.deadline_overrun {
        FLAG_DEADLINE_OVERRUN
    } else {
        0
    };
    let mut record = Record {
        magic: MAGIC,
        seq: report.seq.into(),
        vm_uuid: area.vm_uuid.0,
        kind: report.kind.code().into(),
        flags: flags.into(),
        deadline_us: micros(report.deadline).into(),
        total_us: micros(report.total).into(),
        state_bytes: (report.state_bytes as u64).into(),
        phase_count: U32::ZERO,
        reserved: [0; 4],
        phase_us: [U64::ZERO; MAX_PHASES],
        reserved_tail: [0; 4],
        crc: U32::ZERO,
    };
    // Durations are stored by phase number (phase 1 first); a report names each phase once.
    let mut count = 0;
    for (phase, took) in &report.phases {
        let index = *phase as usize - 1;
        record.phase_us[index] = micros(*took).into();
        count = count.max(index + 1);
    }
    record.phase_count = (count as u32).into();
    record.crc = trailing_crc_of(&record).into();
    zerocopy::transmute!(record)
}

/// The report in `record` if it is a valid record of `area`'s VM for save `seq`.
fn decode(area: &StateArea, record: &[u8], seq: u64) -> Option<SaveReport> {
    let record = Record::ref_from_bytes(record).ok()?;
    if record.magic != MAGIC
        || !trailing_crc_holds(record)
        || record.vm_uuid != area.vm_uuid.0
        || record.seq.get() != seq
    {
        return None;
    }
    let kind = ShutdownKind::from_code(record.kind.get())?;
    let count = record.phase_count.get() as usize;
    if count > SavePhase::ALL.len() {
        return None;
    }
    let phases = SavePhase::ALL[..count]
        .iter()
        .enumerate()
        .map(|(index, phase)| (*phase, Duration::from_micros(record.phase_us[index].get())))
        .collect();
    Some(SaveReport {
        kind,
        seq,
        state_bytes: usize::try_from(record.state_bytes.get()).ok()?,
        phases,
        total: Duration::from_micros(record.total_us.get()),
        deadline: Duration::from_micros(record.deadline_us.get()),
        deadline_overrun: record.flags.get() & FLAG_DEADLINE_OVERRUN != 0,
        // Not recorded: a save into a file the path no longer names is not in this region.
        region_file_changed: None,
    })
}

fn record_offset(area: &StateArea, index: usize) -> u64 {
    area.slot_offset(index) + area.slot_len() - RECORD_LEN as u64
}

/// Whether a record fits behind a payload of `payload_len` bytes in one of `area`'s slots.
pub fn fits(area: &StateArea, payload_len: u64) -> bool {
    state_slots::HEADER_LEN as u64 + payload_len + RECORD_LEN as u64 <= area.slot_len()
}

/// Writes and persists the record of `report` into the tail of slot `index`, which holds the
/// committed save `report.seq` with a payload of `payload_len` bytes. Returns `false` (writing
/// nothing) when the payload leaves no room for it.
pub fn write(
    store: &mut dyn Persistence,
    area: &StateArea,
    index: usize,
    payload_len: u64,
    report: &SaveReport,
) -> Result<bool> {
    if !fits(area, payload_len) {
        return Ok(false);
    }
    let offset = record_offset(area, index);
    store.write(offset, &encode(area, report))?;
    store.persist(offset, RECORD_LEN as u64)?;
    Ok(true)
}

/// The report of save `seq` from either slot of `area`, if one was recorded and is intact.
pub fn read(store: &dyn Persistence, area: &StateArea, seq: u64) -> Result<Option<SaveReport>> {
    if seq == 0 || area.slot_len() < (state_slots::HEADER_LEN + RECORD_LEN) as u64 {
        return Ok(None);
    }
    for index in 0..2 {
        let record = read_vec(store, record_offset(area, index), RECORD_LEN)?;
        if let Some(report) = decode(area, &record, seq) {
            return Ok(Some(report));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Uuid;
    use crate::persistence::memory::MemoryBackend;
    use crate::vm_table::Extent;

    fn area(uuid: u8) -> StateArea {
        StateArea {
            vm_uuid: Uuid([uuid; 16]),
            area: Extent {
                offset: 4096,
                len: 8192,
            },
        }
    }

    fn report(seq: u64) -> SaveReport {
        SaveReport {
            kind: ShutdownKind::PlannedSuspend,
            seq,
            state_bytes: 1234,
            phases: SavePhase::ALL
                .iter()
                .enumerate()
                .map(|(i, phase)| (*phase, Duration::from_micros(10 * (i as u64 + 1))))
                .collect(),
            total: Duration::from_micros(170),
            deadline: Duration::from_millis(50),
            deadline_overrun: true,
            region_file_changed: None,
        }
    }

    #[test]
    fn a_record_round_trips_and_survives_the_header_invalidation() {
        let mut store = MemoryBackend::new(vec![0; 3 * 4096]);
        let area = area(7);
        area.write(&mut store, None, 3, b"state").unwrap();
        assert!(write(&mut store, &area, 0, 5, &report(3)).unwrap());
        assert_eq!(read(&store, &area, 3).unwrap(), Some(report(3)));
        area.invalidate(&mut store, 0).unwrap();
        assert_eq!(read(&store, &area, 3).unwrap(), Some(report(3)));
        // Another save's sequence, another VM, or damage: no report.
        assert_eq!(read(&store, &area, 4).unwrap(), None);
        assert_eq!(read(&store, &self::area(8), 3).unwrap(), None);
        let at = record_offset(&area, 0) as usize + std::mem::offset_of!(Record, total_us);
        store.bytes[at] ^= 1;
        assert_eq!(read(&store, &area, 3).unwrap(), None);
    }

    #[test]
    fn a_payload_reaching_the_tail_gets_no_record() {
        let mut store = MemoryBackend::new(vec![0; 3 * 4096]);
        let area = area(7);
        let capacity = area.payload_capacity();
        assert!(fits(&area, capacity - RECORD_LEN as u64));
        assert!(!fits(&area, capacity - RECORD_LEN as u64 + 1));
        assert!(!write(&mut store, &area, 1, capacity, &report(2)).unwrap());
        assert_eq!(read(&store, &area, 2).unwrap(), None);
    }
}
