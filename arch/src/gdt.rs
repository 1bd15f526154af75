//! The boot GDT: encoding of segment descriptors, and the `kvm_segment` values that must match
//! them (KVM takes the hidden segment state from `kvm_sregs`, the guest reads the table from
//! memory, so both are derived from the same descriptor).

use kvm_bindings::{kvm_dtable, kvm_segment};
use vm_memory::GuestMemoryBackend;

use crate::layout::{BOOT_GDT_START, BOOT_IDT_START};
use crate::{write_guest, Error};

/// Selectors of the boot GDT. 0x10/0x18 are `__BOOT_CS`/`__BOOT_DS` of the Linux 64-bit boot
/// protocol; PVH leaves the values unspecified, so it uses the same ones.
pub const CODE_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;

/// Entries: null, unused, code, data, TSS (16 bytes in long mode, so two slots).
pub const GDT_ENTRIES: usize = 6;
/// Size of the boot IDT: one zeroed 16-byte gate. Any exception before the kernel loads its own
/// IDT then escalates to a triple fault, which KVM reports as a shutdown exit.
pub const IDT_SIZE: usize = 16;

// Access byte: present, DPL 0, code/data ("S"), and the type nibble.
const ACCESS_CODE_EXEC_READ: u16 = 0x9B;
const ACCESS_DATA_READ_WRITE: u16 = 0x93;
// Access byte of a present system descriptor of type 0xB: busy 32-bit (or 64-bit) TSS.
const ACCESS_TSS_BUSY: u16 = 0x8B;
// Flag nibble (bits 12..15 here, bits 52..55 of the descriptor): G, D/B, L, AVL.
const FLAG_GRANULARITY_4K: u16 = 0x8000;
const FLAG_DEFAULT_32BIT: u16 = 0x4000;
const FLAG_LONG_MODE: u16 = 0x2000;

/// Limit that, with 4 KiB granularity, spans the whole 4 GiB.
const FLAT_LIMIT: u32 = 0xF_FFFF;
/// A TSS needs 104 bytes (limit 0x67), as the PVH ABI asks for.
const TSS_LIMIT: u32 = 0x67;

/// Which code segment the boot GDT carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeMode {
    /// 32-bit protected mode (PVH entry).
    Protected32,
    /// 64-bit long mode (Linux 64-bit boot protocol).
    Long64,
}

/// Encodes a segment descriptor. `flags_access` holds the access byte in bits 0..7 and the flag
/// nibble in bits 12..15, the layout in which both sit in the upper dword of the descriptor.
pub const fn descriptor(flags_access: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xFF00_0000) << 32)
        | (((flags_access as u64) & 0xF0FF) << 40)
        | ((limit & 0xF_0000) << 32)
        | ((base & 0x00FF_FFFF) << 16)
        | (limit & 0xFFFF)
}

/// The boot GDT for `mode`.
pub fn boot_gdt(mode: CodeMode) -> [u64; GDT_ENTRIES] {
    let code_flags = match mode {
        CodeMode::Protected32 => FLAG_GRANULARITY_4K | FLAG_DEFAULT_32BIT,
        CodeMode::Long64 => FLAG_GRANULARITY_4K | FLAG_LONG_MODE,
    };
    [
        0,
        0,
        descriptor(code_flags | ACCESS_CODE_EXEC_READ, 0, FLAT_LIMIT),
        descriptor(
            FLAG_GRANULARITY_4K | FLAG_DEFAULT_32BIT | ACCESS_DATA_READ_WRITE,
            0,
            FLAT_LIMIT,
        ),
        descriptor(ACCESS_TSS_BUSY, 0, TSS_LIMIT),
        // Upper half of the long-mode TSS descriptor: base bits 32..63, all zero.
        0,
    ]
}

/// Decodes `descriptor` into the hidden segment state KVM loads along with `selector`.
pub fn kvm_segment_from_descriptor(descriptor: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((descriptor >> n) & 1) as u8;
    let base = ((descriptor >> 16) & 0xFF_FFFF) | ((descriptor >> 32) & 0xFF00_0000);
    let raw_limit = ((descriptor & 0xFFFF) | ((descriptor >> 32) & 0xF_0000)) as u32;
    let granularity = bit(55);
    let limit = if granularity == 1 {
        (raw_limit << 12) | 0xFFF
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((descriptor >> 40) & 0xF) as u8,
        present,
        dpl: ((descriptor >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: granularity,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes `gdt` and the empty boot IDT into guest memory and returns the GDTR and IDTR values.
pub fn write_boot_tables<M: GuestMemoryBackend>(
    mem: &M,
    gdt: &[u64; GDT_ENTRIES],
) -> Result<(kvm_dtable, kvm_dtable), Error> {
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|entry| entry.to_le_bytes()).collect();
    write_guest(mem, BOOT_GDT_START, &gdt_bytes, "boot GDT")?;
    write_guest(mem, BOOT_IDT_START, &[0u8; IDT_SIZE], "boot IDT")?;
    let gdtr = kvm_dtable {
        base: BOOT_GDT_START.0,
        limit: (gdt_bytes.len() - 1) as u16,
        ..Default::default()
    };
    let idtr = kvm_dtable {
        base: BOOT_IDT_START.0,
        limit: (IDT_SIZE - 1) as u16,
        ..Default::default()
    };
    Ok((gdtr, idtr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_architectural_encoding() {
        let pvh = boot_gdt(CodeMode::Protected32);
        assert_eq!(pvh[0], 0);
        assert_eq!(pvh[2], 0x00CF_9B00_0000_FFFF); // flat 32-bit code, exec/read
        assert_eq!(pvh[3], 0x00CF_9300_0000_FFFF); // flat data, read/write
        assert_eq!(pvh[4], 0x0000_8B00_0000_0067); // busy TSS, limit 0x67
        let long = boot_gdt(CodeMode::Long64);
        assert_eq!(long[2], 0x00AF_9B00_0000_FFFF); // 64-bit code: L=1, D=0
        assert_eq!(long[3], pvh[3]);
        assert_eq!(long[5], 0);
        // Base and limit land in their split fields.
        assert_eq!(
            descriptor(0x0093, 0x1234_5678, 0xA_BCDE),
            0x120A_9334_5678_BCDE
        );
    }

    #[test]
    fn kvm_segments_decode_what_the_descriptors_say() {
        let pvh = boot_gdt(CodeMode::Protected32);
        let cs = kvm_segment_from_descriptor(pvh[2], CODE_SELECTOR);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xFFFF_FFFF, 0x10));
        assert_eq!((cs.type_, cs.present, cs.dpl, cs.s), (0xB, 1, 0, 1));
        assert_eq!((cs.db, cs.l, cs.g, cs.unusable), (1, 0, 1, 0));

        let ds = kvm_segment_from_descriptor(pvh[3], DATA_SELECTOR);
        assert_eq!((ds.type_, ds.db, ds.s, ds.limit), (0x3, 1, 1, 0xFFFF_FFFF));

        let tr = kvm_segment_from_descriptor(pvh[4], TSS_SELECTOR);
        assert_eq!(
            (tr.type_, tr.s, tr.g, tr.limit, tr.base),
            (0xB, 0, 0, 0x67, 0)
        );

        let cs64 = kvm_segment_from_descriptor(boot_gdt(CodeMode::Long64)[2], CODE_SELECTOR);
        assert_eq!((cs64.l, cs64.db), (1, 0));

        let odd = kvm_segment_from_descriptor(0x120A_9334_5678_BCDE, 0x8);
        assert_eq!((odd.base, odd.limit, odd.g), (0x1234_5678, 0xA_BCDE, 0));
        assert_eq!(kvm_segment_from_descriptor(0, 0).unusable, 1);
    }
}
