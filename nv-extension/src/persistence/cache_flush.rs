//! CPU cache-line write-back for DAX mappings.
//!
//! With `MAP_SYNC` (or devdax) the filesystem metadata is already durable, so
//! a store is durable once its cache line reaches the persistence domain:
//! write each line back with the best instruction the CPU has, then `sfence`
//! so the write-backs are ordered before any later store.

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Cache line size assumed for write-back; every x86-64 CPU with these instructions uses 64.
pub const CACHE_LINE: usize = 64;

/// The write-back instruction in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushInstruction {
    /// Writes back without evicting (best: the line stays warm).
    Clwb,
    /// Writes back and evicts, weakly ordered (needs the sfence).
    Clflushopt,
    /// Writes back and evicts, serialised; slowest.
    Clflush,
}

/// The best instruction this CPU supports, detected once by CPUID.
pub fn detected() -> Option<FlushInstruction> {
    static DETECTED: OnceLock<Option<FlushInstruction>> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Option<FlushInstruction> {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let max_leaf = __cpuid(0).eax;
    if max_leaf >= 7 {
        // Leaf 7 exists (checked against the maximum leaf above).
        let ebx = __cpuid_count(7, 0).ebx;
        if ebx & (1 << 24) != 0 {
            return Some(FlushInstruction::Clwb);
        }
        if ebx & (1 << 23) != 0 {
            return Some(FlushInstruction::Clflushopt);
        }
    }
    let edx = __cpuid(1).edx;
    (edx & (1 << 19) != 0).then_some(FlushInstruction::Clflush)
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Option<FlushInstruction> {
    None
}

/// Writes back every cache line of `[start, start + len)` and fences.
///
/// # Safety
/// The range must be mapped in this process for the duration of the call
/// (the instructions fault on unmapped addresses; contents are not modified).
pub unsafe fn write_back(start: *const u8, len: usize) -> Result<()> {
    let instruction = detected()
        .ok_or_else(|| Error::Unsupported("CPU has no cache-line write-back instruction".into()))?;
    // SAFETY: forwarded from this function's contract.
    unsafe { write_back_with(instruction, start, len) };
    Ok(())
}

/// Like [`write_back`] with an explicit instruction (the CPU must support it).
///
/// # Safety
/// As for [`write_back`], and `instruction` must be supported by this CPU.
#[cfg(target_arch = "x86_64")]
pub unsafe fn write_back_with(instruction: FlushInstruction, start: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let first = start as usize & !(CACHE_LINE - 1);
    let end = start as usize + len;
    let mut line = first;
    while line < end {
        let p = line as *const u8;
        // SAFETY: `p` is inside a range the caller guarantees mapped; these
        // instructions only move the line between cache and memory.
        unsafe {
            match instruction {
                FlushInstruction::Clwb => {
                    std::arch::asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags))
                }
                FlushInstruction::Clflushopt => {
                    std::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags))
                }
                FlushInstruction::Clflush => std::arch::x86_64::_mm_clflush(p),
            }
        }
        line += CACHE_LINE;
    }
    // SAFETY: sfence has no memory operands; it orders the write-backs above.
    unsafe { std::arch::x86_64::_mm_sfence() };
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn write_back_with(_instruction: FlushInstruction, _start: *const u8, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_instruction_flushes_an_ordinary_mapping_without_changing_it() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let copy = data.clone();
        let best = detected().expect("x86-64 always has at least clflush");
        let all = [
            FlushInstruction::Clwb,
            FlushInstruction::Clflushopt,
            FlushInstruction::Clflush,
        ];
        // Instructions at or below the detected one in preference order are supported.
        let position = all.iter().position(|i| *i == best).unwrap();
        for instruction in &all[position..] {
            // SAFETY: `data` is a live allocation of 4096 bytes; unaligned start on purpose.
            unsafe { write_back_with(*instruction, data.as_ptr().add(3), data.len() - 3) };
        }
        // SAFETY: as above.
        unsafe { write_back(data.as_ptr(), data.len()) }.unwrap();
        assert_eq!(data, copy);
    }
}
