//! The VM table: every VM of the region, its extents, run record, owner and config.
//!
//! The table is small and rewritten whole on every change, into the copy not
//! holding the current generation: body first, persisted, then the header
//! (generation + 1, body length and checksum), persisted. A reader takes the
//! valid copy with the highest generation, so create, delete, config updates,
//! claims and run records are each atomic.

use std::fmt;

use crate::error::{Error, Result};
use crate::identity::{OwnerRecord, Uuid};
use crate::le_bytes::{le_record, trailing_crc_holds, trailing_crc_of};
use crate::le_bytes::{FromBytes, IntoBytes, U16, U32, U64};
use crate::swap::SwapRecord;

pub const MAGIC: [u8; 8] = *b"NVVMTABL";
pub const HEADER_LEN: usize = 64;
pub const ENTRY_FIXED_LEN: usize = 192;
pub const MAX_NAME_LEN: usize = 64;
/// The swap part that follows the config of a swapped-out entry (then the path, padded).
pub const SWAP_PART_LEN: usize = 16;
/// Longest swap-file path an entry holds.
pub const MAX_SWAP_PATH_LEN: usize = 4096;
/// `record_kind` of a swapped-out VM: its save `record_seq` is in a swap file, not the region.
const SWAPPED_OUT_KIND: u32 = 4;

le_record! {
    /// The header of a table copy, as stored (see docs/nv-format.md).
    struct Header(HEADER_LEN) {
        0 => magic: [u8; 8],
        8 => generation: U64,
        16 => body_len: U64,
        24 => entry_count: U32,
        28 => body_crc: U32,
        32 => reserved: [u8; 28],
        /// CRC32C of the bytes before it.
        60 => crc: U32,
    }
}

le_record! {
    /// The fixed part of an entry, as stored; the config (padded to 8 bytes) follows it.
    struct EntryFixed(ENTRY_FIXED_LEN) {
        0 => name_len: U16,
        2 => reserved: [u8; 2],
        4 => config_len: U32,
        8 => name: [u8; MAX_NAME_LEN],
        72 => uuid: [u8; 16],
        88 => memory_offset: U64,
        96 => memory_len: U64,
        104 => state_offset: U64,
        112 => state_len: U64,
        120 => record_kind: U32,
        124 => record_detail: U32,
        128 => record_seq: U64,
        136 => owner_boot_id: [u8; 16],
        152 => owner_pid: U32,
        /// Length of the checkpoint area in 4 KiB pages; 0: none (every older entry).
        156 => checkpoint_pages: U32,
        160 => owner_start_time: U64,
        168 => owner_nonce: U64,
        176 => memory_size: U64,
        /// Region offset of the checkpoint area (docs/checkpoints.md); 0 when it has none.
        184 => checkpoint_offset: U64,
    }
}

le_record! {
    /// The swap part of a swapped-out entry, after its padded config; the file's path (padded
    /// to 8 bytes) follows it.
    struct SwapPart(SWAP_PART_LEN) {
        0 => file_size: U64,
        8 => checksum: U32,
        12 => path_len: U32,
    }
}

/// A byte range of the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// What ended a VM's last run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownKind {
    /// Saved inside the host's power-failure warning window.
    PowerFail,
    /// Saved on purpose for host maintenance (suspend in place, resume after reboot).
    PlannedSuspend,
    /// Died without a save; recovered from the last committed checkpoint epoch (its undo log
    /// applied to guest memory, see `docs/checkpoints.md`).
    Checkpoint,
}

impl ShutdownKind {
    pub(crate) fn code(self) -> u32 {
        match self {
            ShutdownKind::PowerFail => 1,
            ShutdownKind::PlannedSuspend => 2,
            ShutdownKind::Checkpoint => 3,
        }
    }
    pub(crate) fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(ShutdownKind::PowerFail),
            2 => Some(ShutdownKind::PlannedSuspend),
            3 => Some(ShutdownKind::Checkpoint),
            _ => None,
        }
    }
}

impl fmt::Display for ShutdownKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShutdownKind::PowerFail => "power-fail",
            ShutdownKind::PlannedSuspend => "planned-suspend",
            ShutdownKind::Checkpoint => "checkpoint",
        })
    }
}

/// Why a VM stopped without a save (the `record_detail` of a powered-off record). Regions
/// written before the causes existed hold 0 there, which reads as a clean power-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// The guest powered off, or the operator stopped the VM (`vm.shutdown`, `vmm.shutdown`).
    PowerOff,
    /// The guest asked for a reset (i8042, system event RESET); the VMM ended instead of
    /// rebooting over persistent RAM.
    GuestReset,
    /// The guest triple-faulted (a crash that resets the CPU); the VMM ended.
    TripleFault,
}

impl StopCause {
    fn code(self) -> u32 {
        match self {
            StopCause::PowerOff => 0,
            StopCause::GuestReset => 1,
            StopCause::TripleFault => 2,
        }
    }
    fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(StopCause::PowerOff),
            1 => Some(StopCause::GuestReset),
            2 => Some(StopCause::TripleFault),
            _ => None,
        }
    }
}

impl fmt::Display for StopCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopCause::PowerOff => "power-off",
            StopCause::GuestReset => "guest reset",
            StopCause::TripleFault => "guest triple fault",
        })
    }
}

/// How a run started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    ColdBoot,
    Resume,
}

impl RunKind {
    fn code(self) -> u32 {
        match self {
            RunKind::ColdBoot => 1,
            RunKind::Resume => 2,
        }
    }
    fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(RunKind::ColdBoot),
            2 => Some(RunKind::Resume),
            _ => None,
        }
    }
}

/// The per-VM running/saved record that makes a torn save unresumable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunRecord {
    /// Never run.
    Created,
    /// Guest code may be changing its memory; the last completed save had `since_seq` (0: none).
    Running { since_seq: u64, kind: RunKind },
    /// A complete save with sequence `seq` matches the memory as it is.
    Saved { seq: u64, kind: ShutdownKind },
    /// Stopped without a save (guest power-off, operator stop, guest reset); next start is a
    /// cold boot. `cause` says which.
    PoweredOff { after_seq: u64, cause: StopCause },
}

impl RunRecord {
    /// Highest save sequence this record knows of.
    pub fn last_seq(&self) -> u64 {
        match *self {
            RunRecord::Created => 0,
            RunRecord::Running { since_seq, .. } => since_seq,
            RunRecord::Saved { seq, .. } => seq,
            RunRecord::PoweredOff { after_seq, .. } => after_seq,
        }
    }

    fn encode(&self) -> (u32, u32, u64) {
        match *self {
            RunRecord::Created => (0, 0, 0),
            RunRecord::Running { since_seq, kind } => (1, kind.code(), since_seq),
            RunRecord::Saved { seq, kind } => (2, kind.code(), seq),
            RunRecord::PoweredOff { after_seq, cause } => (3, cause.code(), after_seq),
        }
    }

    fn decode(kind: u32, detail: u32, seq: u64) -> Option<Self> {
        Some(match kind {
            0 => RunRecord::Created,
            1 => RunRecord::Running {
                since_seq: seq,
                kind: RunKind::from_code(detail)?,
            },
            2 => RunRecord::Saved {
                seq,
                kind: ShutdownKind::from_code(detail)?,
            },
            3 => RunRecord::PoweredOff {
                after_seq: seq,
                cause: StopCause::from_code(detail)?,
            },
            _ => return None,
        })
    }
}

impl fmt::Display for RunRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunRecord::Created => write!(f, "created"),
            RunRecord::Running { since_seq, .. } => write!(f, "running since seq {since_seq}"),
            RunRecord::Saved { seq, kind } => write!(f, "saved at seq {seq} ({kind})"),
            RunRecord::PoweredOff {
                cause: StopCause::PowerOff,
                ..
            } => write!(f, "powered off"),
            RunRecord::PoweredOff { cause, .. } => write!(f, "powered off ({cause})"),
        }
    }
}

/// One VM of the region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmEntry {
    pub name: String,
    pub uuid: Uuid,
    /// Guest RAM size as requested; `memory.len` is that rounded up to the extent alignment.
    pub memory_size: u64,
    pub memory: Extent,
    /// Both state slots, each `state.len / 2` bytes.
    pub state: Extent,
    /// Epoch records and undo log of continuous checkpoints (`checkpoint_area`); `len` 0: none.
    /// A multiple of 4 KiB below 16 TiB.
    pub checkpoint: Extent,
    pub record: RunRecord,
    pub owner: OwnerRecord,
    pub config: Vec<u8>,
    /// Set while the VM is swapped out: its memory and state are in this file (its `record`
    /// is then the save the file holds, and its extents are free, or reserved by a swap-in
    /// under way, which keeps the file until it commits).
    pub swap: Option<SwapRecord>,
}

impl VmEntry {
    pub fn encoded_len(&self) -> usize {
        ENTRY_FIXED_LEN
            + padded(self.config.len())
            + self.swap.as_ref().map_or(0, |swap| {
                SWAP_PART_LEN + padded(swap.path.as_os_str().len())
            })
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let (mut kind, detail, seq) = self.record.encode();
        if self.swap.is_some() {
            kind = SWAPPED_OUT_KIND;
        }
        let mut fixed = EntryFixed {
            name_len: (self.name.len() as u16).into(),
            reserved: [0; 2],
            config_len: (self.config.len() as u32).into(),
            name: [0; MAX_NAME_LEN],
            uuid: self.uuid.0,
            memory_offset: self.memory.offset.into(),
            memory_len: self.memory.len.into(),
            state_offset: self.state.offset.into(),
            state_len: self.state.len.into(),
            record_kind: kind.into(),
            record_detail: detail.into(),
            record_seq: seq.into(),
            owner_boot_id: self.owner.boot_id,
            owner_pid: self.owner.pid.into(),
            checkpoint_pages: ((self.checkpoint.len / 4096) as u32).into(),
            owner_start_time: self.owner.start_time.into(),
            owner_nonce: self.owner.nonce.into(),
            memory_size: self.memory_size.into(),
            checkpoint_offset: self.checkpoint.offset.into(),
        };
        fixed.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        let end = out.len() + self.encoded_len();
        out.extend_from_slice(fixed.as_bytes());
        out.extend_from_slice(&self.config);
        if let Some(swap) = &self.swap {
            use std::os::unix::ffi::OsStrExt;
            out.resize(out.len() + padded(self.config.len()) - self.config.len(), 0);
            let path = swap.path.as_os_str().as_bytes();
            let part = SwapPart {
                file_size: swap.file_size.into(),
                checksum: swap.checksum.into(),
                path_len: (path.len() as u32).into(),
            };
            out.extend_from_slice(part.as_bytes());
            out.extend_from_slice(path);
        }
        out.resize(end, 0);
    }

    /// Decodes the entry at the start of `buf`; returns it and its encoded length.
    fn decode(buf: &[u8]) -> Result<(VmEntry, usize)> {
        let bad = |what: &str| Error::CorruptVmTable(what.to_string());
        let (fixed, _) = EntryFixed::ref_from_prefix(buf).map_err(|_| bad("entry truncated"))?;
        let name_len = fixed.name_len.get() as usize;
        let config_len = fixed.config_len.get() as usize;
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(bad("entry name length out of range"));
        }
        let mut total = ENTRY_FIXED_LEN
            .checked_add(padded(config_len))
            .filter(|t| *t <= buf.len())
            .ok_or_else(|| bad("entry config runs past the table"))?;
        let mut record_kind = fixed.record_kind.get();
        let mut swap = None;
        if record_kind == SWAPPED_OUT_KIND {
            use std::os::unix::ffi::OsStrExt;
            let (part, _) = SwapPart::ref_from_prefix(&buf[total..])
                .map_err(|_| bad("entry swap record truncated"))?;
            let path_len = part.path_len.get() as usize;
            if path_len == 0 || path_len > MAX_SWAP_PATH_LEN {
                return Err(bad("entry swap path length out of range"));
            }
            let path_at = total + SWAP_PART_LEN;
            let end = path_at
                .checked_add(padded(path_len))
                .filter(|end| *end <= buf.len())
                .ok_or_else(|| bad("entry swap path runs past the table"))?;
            swap = Some(SwapRecord {
                path: std::ffi::OsStr::from_bytes(&buf[path_at..path_at + path_len]).into(),
                file_size: part.file_size.get(),
                checksum: part.checksum.get(),
            });
            total = end;
            // The file holds the save the record names (detail: its shutdown kind).
            record_kind = 2;
        }
        let name = std::str::from_utf8(&fixed.name[..name_len])
            .map_err(|_| bad("entry name is not UTF-8"))?
            .to_string();
        let record = RunRecord::decode(
            record_kind,
            fixed.record_detail.get(),
            fixed.record_seq.get(),
        )
        .ok_or_else(|| bad("unknown run record"))?;
        let entry = VmEntry {
            name,
            uuid: Uuid(fixed.uuid),
            memory_size: fixed.memory_size.get(),
            memory: Extent {
                offset: fixed.memory_offset.get(),
                len: fixed.memory_len.get(),
            },
            state: Extent {
                offset: fixed.state_offset.get(),
                len: fixed.state_len.get(),
            },
            checkpoint: Extent {
                offset: fixed.checkpoint_offset.get(),
                len: u64::from(fixed.checkpoint_pages.get()) * 4096,
            },
            record,
            owner: OwnerRecord {
                boot_id: fixed.owner_boot_id,
                pid: fixed.owner_pid.get(),
                start_time: fixed.owner_start_time.get(),
                nonce: fixed.owner_nonce.get(),
            },
            config: buf[ENTRY_FIXED_LEN..ENTRY_FIXED_LEN + config_len].to_vec(),
            swap,
        };
        Ok((entry, total))
    }
}

fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

/// Checks a VM name: 1..=64 bytes of `[A-Za-z0-9._-]`, not starting with '.' or '-'.
pub fn validate_name(name: &str) -> Result<()> {
    let invalid = |reason| {
        Err(Error::InvalidVmName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return invalid("must be 1 to 64 bytes long");
    }
    if name.starts_with(['.', '-']) {
        return invalid("must not start with '.' or '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return invalid("may only contain letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// A decoded table copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmTable {
    pub generation: u64,
    pub entries: Vec<VmEntry>,
}

impl VmTable {
    pub fn find(&self, name: &str) -> Option<&VmEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    pub fn find_mut(&mut self, name: &str) -> Option<&mut VmEntry> {
        self.entries.iter_mut().find(|e| e.name == name)
    }

    /// The body (all entries, back to back).
    pub fn encode_body(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.entries.iter().map(VmEntry::encoded_len).sum());
        for entry in &self.entries {
            entry.encode_into(&mut body);
        }
        body
    }

    /// The header for a body, carrying this table's generation.
    pub fn encode_header(&self, body: &[u8]) -> [u8; HEADER_LEN] {
        let mut header = Header {
            magic: MAGIC,
            generation: self.generation.into(),
            body_len: (body.len() as u64).into(),
            entry_count: (self.entries.len() as u32).into(),
            body_crc: crc32c::crc32c(body).into(),
            reserved: [0; 28],
            crc: U32::ZERO,
        };
        header.crc = trailing_crc_of(&header).into();
        zerocopy::transmute!(header)
    }

    /// Validates a copy's header; returns (generation, body length, entry count, body crc).
    pub fn decode_header(
        header: &[u8; HEADER_LEN],
        copy_len: u64,
    ) -> Result<(u64, usize, usize, u32)> {
        let bad = |what: &str| Error::CorruptVmTable(what.to_string());
        let header: &Header = zerocopy::transmute_ref!(header);
        if header.magic != MAGIC {
            return Err(bad("no table magic"));
        }
        if !trailing_crc_holds(header) {
            return Err(bad("header checksum mismatch"));
        }
        let body_len = header.body_len.get();
        if body_len > copy_len.saturating_sub(HEADER_LEN as u64) {
            return Err(bad("body longer than the table copy"));
        }
        Ok((
            header.generation.get(),
            body_len as usize,
            header.entry_count.get() as usize,
            header.body_crc.get(),
        ))
    }

    /// Decodes a body whose checksum was already verified.
    pub fn decode_body(generation: u64, body: &[u8], entry_count: usize) -> Result<VmTable> {
        let mut entries = Vec::new();
        let mut at = 0;
        while at < body.len() {
            let (entry, len) = VmEntry::decode(&body[at..])?;
            if entries.iter().any(|e: &VmEntry| e.name == entry.name) {
                return Err(Error::CorruptVmTable(format!(
                    "duplicate VM name {:?}",
                    entry.name
                )));
            }
            entries.push(entry);
            at += len;
        }
        if entries.len() != entry_count {
            return Err(Error::CorruptVmTable("entry count mismatch".into()));
        }
        Ok(VmTable {
            generation,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use super::*;

    fn entry(name: &str, config: &[u8]) -> VmEntry {
        VmEntry {
            name: name.into(),
            uuid: Uuid([3; 16]),
            memory_size: 1 << 21,
            memory: Extent {
                offset: 1 << 21,
                len: 1 << 21,
            },
            state: Extent {
                offset: 2 << 21,
                len: 8192,
            },
            checkpoint: Extent { offset: 0, len: 0 },
            record: RunRecord::Saved {
                seq: 5,
                kind: ShutdownKind::PlannedSuspend,
            },
            owner: OwnerRecord {
                boot_id: [1; 16],
                pid: 42,
                start_time: 99,
                nonce: 7,
            },
            config: config.to_vec(),
            swap: None,
        }
    }

    #[test]
    fn table_round_trips_through_header_and_body() {
        let table = VmTable {
            generation: 3,
            entries: vec![entry("a", b"{\"x\":1}"), entry("vm-2", b"")],
        };
        let body = table.encode_body();
        assert_eq!(body.len(), 2 * ENTRY_FIXED_LEN + 8);
        let header = table.encode_header(&body);
        let (generation, len, count, crc) = VmTable::decode_header(&header, 4096).unwrap();
        assert_eq!((generation, len, count), (3, body.len(), 2));
        assert_eq!(crc, crc32c::crc32c(&body));
        assert_eq!(
            VmTable::decode_body(generation, &body, count).unwrap(),
            table
        );
    }

    #[test]
    fn a_swapped_out_entry_keeps_its_swap_record_at_documented_offsets() {
        let mut swapped = entry("s", b"abc");
        swapped.memory = Extent { offset: 0, len: 0 };
        swapped.state = Extent { offset: 0, len: 0 };
        swapped.owner = OwnerRecord::default();
        swapped.swap = Some(SwapRecord {
            path: "/swap/s.swap".into(),
            file_size: 0x1234_5678_9abc,
            checksum: 0xdead_beef,
        });
        let table = VmTable {
            generation: 2,
            entries: vec![swapped, entry("resident", b"")],
        };
        let body = table.encode_body();
        assert_eq!(
            body.len(),
            ENTRY_FIXED_LEN + 8 + SWAP_PART_LEN + 16 + ENTRY_FIXED_LEN
        );
        // Record kind 4 "swapped out", detail 2 (the save's kind: planned suspend), its seq.
        assert_eq!(&body[120..124], &4u32.to_le_bytes());
        assert_eq!(&body[124..128], &2u32.to_le_bytes());
        assert_eq!(&body[128..136], &5u64.to_le_bytes());
        let part = ENTRY_FIXED_LEN + 8;
        assert_eq!(&body[part..part + 8], &0x1234_5678_9abcu64.to_le_bytes());
        assert_eq!(&body[part + 8..part + 12], &0xdead_beefu32.to_le_bytes());
        assert_eq!(&body[part + 12..part + 16], &12u32.to_le_bytes());
        assert_eq!(&body[part + 16..part + 28], b"/swap/s.swap");
        assert_eq!(&body[part + 28..part + 32], &[0; 4]);
        assert_eq!(VmTable::decode_body(2, &body, 2).unwrap(), table);
        for (at, value) in [(part + 12, 0u32), (part + 12, 4097), (part + 12, 64)] {
            let mut bad = body.clone();
            bad[at..at + 4].copy_from_slice(&value.to_le_bytes());
            assert!(
                VmTable::decode_body(2, &bad, 2).is_err(),
                "path length {value}"
            );
        }
        let mut unknown_kind = body.clone();
        unknown_kind[124..128].copy_from_slice(&7u32.to_le_bytes());
        assert!(VmTable::decode_body(2, &unknown_kind, 2).is_err());
    }

    #[test]
    fn corrupt_headers_and_bodies_are_rejected() {
        let table = VmTable {
            generation: 1,
            entries: vec![entry("a", b"cfg")],
        };
        let body = table.encode_body();
        let mut header = table.encode_header(&body);
        assert!(
            VmTable::decode_header(&header, 64).is_err(),
            "body cannot fit"
        );
        header[9] ^= 1;
        assert!(VmTable::decode_header(&header, 4096).is_err());
        let mut bad_record = body.clone();
        let record_kind = offset_of!(EntryFixed, record_kind);
        bad_record[record_kind..record_kind + 4].copy_from_slice(&9u32.to_le_bytes());
        assert!(VmTable::decode_body(1, &bad_record, 1).is_err());
        let mut long_config = body;
        let config_len = offset_of!(EntryFixed, config_len);
        long_config[config_len..config_len + 4].copy_from_slice(&(1u32 << 30).to_le_bytes());
        assert!(VmTable::decode_body(1, &long_config, 1).is_err());
    }

    #[test]
    fn a_stop_cause_is_kept_and_old_powered_off_records_read_as_a_clean_power_off() {
        for cause in [
            StopCause::PowerOff,
            StopCause::GuestReset,
            StopCause::TripleFault,
        ] {
            let record = RunRecord::PoweredOff {
                after_seq: 4,
                cause,
            };
            let (kind, detail, seq) = record.encode();
            assert_eq!(RunRecord::decode(kind, detail, seq), Some(record));
        }
        // What every writer before the causes stored for a powered-off VM: detail 0.
        assert_eq!(
            RunRecord::decode(3, 0, 7),
            Some(RunRecord::PoweredOff {
                after_seq: 7,
                cause: StopCause::PowerOff
            })
        );
        assert_eq!(RunRecord::decode(3, 9, 7), None, "an unknown cause");
        let reset = RunRecord::PoweredOff {
            after_seq: 1,
            cause: StopCause::GuestReset,
        };
        assert_eq!(reset.to_string(), "powered off (guest reset)");
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("vm-1.test_a").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
