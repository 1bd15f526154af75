//! One PCI function's configuration space: a type-0 header with per-bit write masks, BARs the
//! guest sizes and moves, and a capability list the device builds.

use serde::{Deserialize, Serialize};

use super::{check_state_version, PciError, PciResult};

/// Version of [`PciConfigurationState`].
pub const PCI_CONFIG_STATE_VERSION: u32 = 1;

/// Bytes of the conventional configuration space (the legacy ports reach only these).
pub const PCI_CONFIG_SPACE_SIZE: u16 = 256;
/// Bytes one function occupies in the ECAM window (PCI Express extended space).
pub const PCI_EXTENDED_CONFIG_SPACE_SIZE: u16 = 4096;

const DWORDS: usize = PCI_CONFIG_SPACE_SIZE as usize / 4;

pub const REG_VENDOR_ID: u16 = 0x00;
pub const REG_COMMAND: u16 = 0x04;
pub const REG_STATUS: u16 = 0x06;
pub const REG_CLASS_REVISION: u16 = 0x08;
pub const REG_HEADER_TYPE: u16 = 0x0E;
pub const REG_BAR0: u16 = 0x10;
pub const REG_SUBSYSTEM: u16 = 0x2C;
pub const REG_EXPANSION_ROM: u16 = 0x30;
pub const REG_CAPABILITIES: u16 = 0x34;
pub const REG_INTERRUPT_LINE: u16 = 0x3C;
/// First byte the capability list may use (after the type-0 header).
pub const CAPABILITIES_START: u16 = 0x40;

/// Command register bits.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command bits the guest can change: I/O, memory, bus master, parity error response, SERR#,
/// INTx disable. The rest are hard-wired to zero for a virtual function.
const COMMAND_WRITABLE: u32 = 0x0547;
/// Status bit: the capability pointer at 0x34 is valid.
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Status error bits (master data parity error, signalled/received target abort, received
/// master abort, signalled system error, detected parity error): write 1 to clear.
const STATUS_WRITE_ONE_TO_CLEAR: u32 = 0xF900;

/// Number of BAR registers in a type-0 header.
pub const BAR_COUNT: usize = 6;
const BAR_IO_SPACE: u32 = 0x1;
const BAR_MEM_64BIT: u32 = 0x4;
const BAR_MEM_PREFETCHABLE: u32 = 0x8;
const BAR_IO_MAX_SIZE: u64 = 256;

/// Identity of a function: the read-only registers of its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// INTx pin (0 = none, 1..=4 = INTA#..INTD#).
    pub interrupt_pin: u8,
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    /// Port I/O, at most 256 bytes.
    Io,
    /// Memory below 4 GiB.
    Memory32 { prefetchable: bool },
    /// Memory anywhere; takes this BAR register and the next.
    Memory64 { prefetchable: bool },
}

/// A BAR the device declared and where the guest put it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub index: usize,
    pub kind: BarKind,
    pub size: u64,
    /// Guest-assigned base the device decodes at: 0 until the guest programs it, and unchanged
    /// while the guest sizes the BAR (its registers then read the size mask).
    pub address: u64,
}

/// The guest moved a BAR: the VMM moves the device's region on its bus from `old_address` to
/// `new_address`. Sizing (all-ones written, then the old value back) is not a move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRelocation {
    pub index: usize,
    pub kind: BarKind,
    pub size: u64,
    pub old_address: u64,
    pub new_address: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct BarLayout {
    kind: BarKind,
    size: u64,
}

/// Configuration space of one function.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    regs: [u32; DWORDS],
    writable: [u32; DWORDS],
    write_one_to_clear: [u32; DWORDS],
    /// Indexed by BAR register; the upper half of a 64-bit BAR is `None`.
    bars: [Option<BarLayout>; BAR_COUNT],
    /// Where each BAR decodes (indexed by the BAR's first register): the last address the
    /// guest programmed that was not a sizing probe.
    decoded: [u64; BAR_COUNT],
    /// Per BAR register: the guest wrote all-ones to it (sizing) and has not written an
    /// address since.
    probing: [bool; BAR_COUNT],
    /// Offset of the last capability added (its next pointer is the one to patch).
    last_capability: Option<u16>,
    /// Next free byte for a capability.
    capability_end: u16,
}

/// Saved registers of a function. The masks and the BAR layout come from the device model, not
/// from the state, so a restored function has exactly the writable bits its model defines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigurationState {
    pub version: u32,
    /// The 64 dwords of the conventional space.
    pub registers: Vec<u32>,
    /// BAR layout as declared by the device, checked against the model on restore.
    bars: Vec<Option<BarLayout>>,
    /// Where each BAR decodes and which BAR registers are being sized.
    pub bar_decoded: Vec<u64>,
    pub bar_probing: Vec<bool>,
}

/// Splits a config access into (dword index, bit shift, value mask); `None` for widths other
/// than 1, 2 or 4 and for accesses that cross a dword boundary, which hardware does not issue.
fn dword_access(offset: u16, len: usize) -> Option<(usize, u32, u32)> {
    if !matches!(len, 1 | 2 | 4) || usize::from(offset % 4) + len > 4 {
        return None;
    }
    let shift = u32::from(offset % 4) * 8;
    let mask = if len == 4 {
        u32::MAX
    } else {
        ((1u32 << (len * 8)) - 1) << shift
    };
    Some((usize::from(offset / 4), shift, mask))
}

fn le_value(data: &[u8]) -> u32 {
    data.iter()
        .rev()
        .fold(0u32, |acc, &b| (acc << 8) | u32::from(b))
}

impl PciConfiguration {
    /// A function with `header`'s identity, no BARs and no capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut regs = [0u32; DWORDS];
        let mut writable = [0u32; DWORDS];
        let mut write_one_to_clear = [0u32; DWORDS];
        regs[0] = u32::from(header.vendor_id) | (u32::from(header.device_id) << 16);
        writable[1] = COMMAND_WRITABLE;
        write_one_to_clear[1] = STATUS_WRITE_ONE_TO_CLEAR << 16;
        regs[2] = u32::from(header.revision_id)
            | (u32::from(header.prog_if) << 8)
            | (u32::from(header.subclass) << 16)
            | (u32::from(header.class) << 24);
        // Cache line size and latency timer are plain read/write; header type 0, single function.
        writable[3] = 0x0000_FFFF;
        regs[usize::from(REG_SUBSYSTEM / 4)] =
            u32::from(header.subsystem_vendor_id) | (u32::from(header.subsystem_id) << 16);
        regs[usize::from(REG_INTERRUPT_LINE / 4)] = u32::from(header.interrupt_pin) << 8;
        writable[usize::from(REG_INTERRUPT_LINE / 4)] = 0xFF;
        Self {
            regs,
            writable,
            write_one_to_clear,
            bars: [None; BAR_COUNT],
            decoded: [0; BAR_COUNT],
            probing: [false; BAR_COUNT],
            last_capability: None,
            capability_end: CAPABILITIES_START,
        }
    }

    /// Declares BAR `index` of `kind` and `size` bytes (a power of two; memory at least 16
    /// bytes, I/O 4 to 256). A 64-bit BAR also takes register `index + 1`.
    pub fn add_bar(&mut self, index: usize, kind: BarKind, size: u64) -> PciResult<()> {
        let registers = if matches!(kind, BarKind::Memory64 { .. }) {
            2
        } else {
            1
        };
        if index + registers > BAR_COUNT {
            return Err(PciError::BarIndex { index });
        }
        if (index..index + registers).any(|i| self.bar_register_taken(i)) {
            return Err(PciError::BarTaken { index });
        }
        let (min, max) = match kind {
            BarKind::Io => (4, BAR_IO_MAX_SIZE),
            BarKind::Memory32 { .. } => (16, 1 << 31),
            BarKind::Memory64 { .. } => (16, 1 << 63),
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciError::BarSize { index, size });
        }
        let address_mask = !(size - 1);
        let reg = usize::from(REG_BAR0 / 4) + index;
        match kind {
            BarKind::Io => {
                self.regs[reg] = BAR_IO_SPACE;
                self.writable[reg] = address_mask as u32 & !0x3;
            }
            BarKind::Memory32 { prefetchable } => {
                self.regs[reg] = if prefetchable {
                    BAR_MEM_PREFETCHABLE
                } else {
                    0
                };
                self.writable[reg] = address_mask as u32 & !0xF;
            }
            BarKind::Memory64 { prefetchable } => {
                self.regs[reg] = BAR_MEM_64BIT
                    | if prefetchable {
                        BAR_MEM_PREFETCHABLE
                    } else {
                        0
                    };
                self.writable[reg] = address_mask as u32 & !0xF;
                self.regs[reg + 1] = 0;
                self.writable[reg + 1] = (address_mask >> 32) as u32;
            }
        }
        self.bars[index] = Some(BarLayout { kind, size });
        Ok(())
    }

    fn bar_register_taken(&self, register: usize) -> bool {
        self.bars[register].is_some()
            || (register > 0
                && matches!(
                    self.bars[register - 1],
                    Some(BarLayout {
                        kind: BarKind::Memory64 { .. },
                        ..
                    })
                ))
    }

    /// BAR `index` (the register a BAR starts at), if the device declared one there.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        let layout = (*self.bars.get(index)?)?;
        Some(Bar {
            index,
            kind: layout.kind,
            size: layout.size,
            address: self.decoded[index],
        })
    }

    /// The address BAR `index`'s registers hold now (the size mask while it is being sized).
    fn register_address(&self, index: usize, layout: BarLayout) -> u64 {
        let reg = usize::from(REG_BAR0 / 4) + index;
        match layout.kind {
            BarKind::Io => u64::from(self.regs[reg] & !0x3),
            BarKind::Memory32 { .. } => u64::from(self.regs[reg] & !0xF),
            BarKind::Memory64 { .. } => {
                u64::from(self.regs[reg] & !0xF) | (u64::from(self.regs[reg + 1]) << 32)
            }
        }
    }

    /// Every declared BAR.
    pub fn bars(&self) -> impl Iterator<Item = Bar> + '_ {
        (0..BAR_COUNT).filter_map(|i| self.bar(i))
    }

    /// Appends a capability with `id` and `body` (the bytes after the ID and next pointer) to
    /// the list; `writable` gives the guest-writable bits of each body byte (shorter = the
    /// rest read-only). Returns the capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> PciResult<u16> {
        let offset = self.capability_end;
        let len = 2 + body.len();
        if writable.len() > body.len() {
            return Err(PciError::CapabilityMask {
                id,
                writable: writable.len(),
                body: body.len(),
            });
        }
        if usize::from(offset) + len > DWORDS * 4 {
            return Err(PciError::CapabilitySpaceFull {
                id,
                len,
                free: DWORDS * 4 - usize::from(offset),
            });
        }
        self.set_byte(offset, id);
        self.set_byte(offset + 1, 0);
        for (i, &b) in body.iter().enumerate() {
            let at = offset + 2 + i as u16;
            self.set_byte(at, b);
            let mask = writable.get(i).copied().unwrap_or(0);
            let (dword, shift) = (usize::from(at / 4), u32::from(at % 4) * 8);
            self.writable[dword] =
                (self.writable[dword] & !(0xFF << shift)) | (u32::from(mask) << shift);
        }
        match self.last_capability {
            Some(previous) => self.set_byte(previous + 1, offset as u8),
            None => {
                self.set_byte(REG_CAPABILITIES, offset as u8);
                let status = self.read_u16(REG_STATUS) | STATUS_CAPABILITIES_LIST;
                self.set_u16(REG_STATUS, status);
            }
        }
        self.last_capability = Some(offset);
        self.capability_end = (offset + len as u16).next_multiple_of(4);
        Ok(offset)
    }

    fn set_byte(&mut self, offset: u16, value: u8) {
        let (dword, shift) = (usize::from(offset / 4), u32::from(offset % 4) * 8);
        self.regs[dword] = (self.regs[dword] & !(0xFF << shift)) | (u32::from(value) << shift);
    }

    fn set_u16(&mut self, offset: u16, value: u16) {
        self.set_byte(offset, value as u8);
        self.set_byte(offset + 1, (value >> 8) as u8);
    }

    /// Device-side update of a register (e.g. a status bit), ignoring the guest write masks.
    pub fn set_register_u16(&mut self, offset: u16, value: u16) {
        if offset < PCI_CONFIG_SPACE_SIZE - 1 {
            self.set_u16(offset, value);
        }
    }

    /// The dword at `offset & !3` (0 outside the conventional space).
    pub fn read_u32(&self, offset: u16) -> u32 {
        self.regs.get(usize::from(offset / 4)).copied().unwrap_or(0)
    }

    /// The 16-bit register at an even `offset`.
    pub fn read_u16(&self, offset: u16) -> u16 {
        (self.read_u32(offset) >> (u32::from(offset % 4) * 8)) as u16
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(REG_COMMAND)
    }

    /// A guest read of `data.len()` bytes at `offset`. The extended space (0x100..0x1000) reads
    /// as zero: no extended capabilities. Widths other than 1/2/4 and accesses crossing a dword
    /// read as all-ones, as a bus with nobody answering does.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        let Some((dword, shift, _)) = dword_access(offset, data.len()) else {
            data.fill(0xFF);
            return;
        };
        if offset >= PCI_EXTENDED_CONFIG_SPACE_SIZE {
            data.fill(0xFF);
            return;
        }
        let value = self.regs.get(dword).copied().unwrap_or(0) >> shift;
        for (i, b) in data.iter_mut().enumerate() {
            *b = (value >> (i * 8)) as u8;
        }
    }

    /// A guest write: only the writable bits change, write-one-to-clear bits clear where the
    /// guest writes ones; anything else is ignored. Returns the BAR move it caused, if any.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Option<BarRelocation> {
        let (dword, shift, mask) = dword_access(offset, data.len())?;
        if dword >= DWORDS {
            return None;
        }
        let value = le_value(data) << shift;
        let writable = self.writable[dword] & mask;
        let clear = self.write_one_to_clear[dword] & mask & value;
        self.regs[dword] = ((self.regs[dword] & !writable) | (value & writable)) & !clear;
        let index = self.bar_of_register(dword)?;
        let register = dword - usize::from(REG_BAR0 / 4);
        // Sizing is a dword of all-ones (what every OS writes); a byte of 0xFF is an address.
        self.probing[register] = mask == u32::MAX && value == u32::MAX;
        self.bar_moved(index)
    }

    /// Records and returns a move of BAR `index` once no register of it is being sized.
    fn bar_moved(&mut self, index: usize) -> Option<BarRelocation> {
        let layout = self.bars[index]?;
        let registers = if matches!(layout.kind, BarKind::Memory64 { .. }) {
            2
        } else {
            1
        };
        if self.probing[index..index + registers].iter().any(|&p| p) {
            return None;
        }
        let new_address = self.register_address(index, layout);
        let old_address = std::mem::replace(&mut self.decoded[index], new_address);
        (old_address != new_address).then_some(BarRelocation {
            index,
            kind: layout.kind,
            size: layout.size,
            old_address,
            new_address,
        })
    }

    /// The BAR whose register(s) include dword `dword`.
    fn bar_of_register(&self, dword: usize) -> Option<usize> {
        let register = dword.checked_sub(usize::from(REG_BAR0 / 4))?;
        if register >= BAR_COUNT {
            return None;
        }
        if self.bars[register].is_some() {
            return Some(register);
        }
        (register > 0 && self.bar_register_taken(register)).then(|| register - 1)
    }

    /// The registers to save.
    pub fn state(&self) -> PciConfigurationState {
        PciConfigurationState {
            version: PCI_CONFIG_STATE_VERSION,
            registers: self.regs.to_vec(),
            bars: self.bars.to_vec(),
            bar_decoded: self.decoded.to_vec(),
            bar_probing: self.probing.to_vec(),
        }
    }

    /// Loads saved registers into this function, built by the same device model. Refuses a
    /// state of another version, size, identity (vendor, device, class) or BAR layout.
    /// Read-only bits keep the model's values; the guest-writable and write-one-to-clear bits
    /// come from the state.
    pub fn restore(&mut self, state: &PciConfigurationState) -> PciResult<()> {
        check_state_version(state.version, PCI_CONFIG_STATE_VERSION)?;
        if state.registers.len() != DWORDS
            || state.bar_decoded.len() != BAR_COUNT
            || state.bar_probing.len() != BAR_COUNT
        {
            return Err(PciError::StateMismatch("register or BAR count"));
        }
        if state.registers[0] != self.regs[0] || state.registers[2] != self.regs[2] {
            return Err(PciError::StateMismatch("vendor, device or class"));
        }
        if state.bars != self.bars {
            return Err(PciError::StateMismatch("BAR layout"));
        }
        for (i, &saved) in state.registers.iter().enumerate() {
            let from_state = self.writable[i] | self.write_one_to_clear[i];
            self.regs[i] = (self.regs[i] & !from_state) | (saved & from_state);
        }
        self.decoded.copy_from_slice(&state.bar_decoded);
        self.probing.copy_from_slice(&state.bar_probing);
        Ok(())
    }
}
