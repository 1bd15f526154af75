//! Initial register state of the boot vCPU for each boot protocol.
//!
//! PVH (Xen direct boot ABI): 32-bit protected mode, paging off, flat CS/DS/ES/FS/GS/SS, a
//! busy TSS in TR, EBX = `hvm_start_info`.
//! LinuxBoot64 (boot.rst, "64-bit Boot Protocol"): long mode with identity paging,
//! CS = `__BOOT_CS` 64-bit, data = `__BOOT_DS`, RSI = zero page, interrupts off.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs};
use vm_memory::GuestMemoryBackend;

use crate::boot::{BootEntry, BootProtocol};
use crate::gdt::{
    boot_gdt, kvm_segment_from_descriptor, write_boot_tables, CodeMode, CODE_SELECTOR,
    DATA_SELECTOR, TSS_SELECTOR,
};
use crate::layout::BOOT_STACK_POINTER;
use crate::paging::write_identity_page_tables;
use crate::Error;

/// RFLAGS bit 1 is reserved and always reads as 1; IF, TF and VM stay clear as both ABIs ask.
pub const BOOT_RFLAGS: u64 = 0x2;

pub const CR0_PE: u64 = 1 << 0;
/// Extension type: hard-wired to 1 on every CPU since the i486; set so the value matches what
/// the guest reads back.
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

/// x87 control word after FNINIT: all exceptions masked, 64-bit precision, round to nearest.
pub const FPU_CONTROL_WORD: u16 = 0x37F;
/// MXCSR after reset: all SIMD exceptions masked.
pub const MXCSR_DEFAULT: u32 = 0x1F80;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1A0;
const MSR_STAR: u32 = 0xC000_0081;
const MSR_LSTAR: u32 = 0xC000_0082;
const MSR_CSTAR: u32 = 0xC000_0083;
const MSR_SYSCALL_MASK: u32 = 0xC000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xC000_0102;
/// IA32_MISC_ENABLE bit 0: fast string operations, which firmware normally turns on.
const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;

/// General-purpose registers at the kernel entry.
pub fn setup_regs(entry: &BootEntry) -> kvm_regs {
    let mut regs = kvm_regs {
        rip: entry.entry.0,
        rflags: BOOT_RFLAGS,
        ..Default::default()
    };
    match entry.protocol {
        BootProtocol::Pvh => regs.rbx = entry.boot_info.0,
        BootProtocol::LinuxBoot64 => {
            regs.rsi = entry.boot_info.0;
            // The protocol needs no stack, but a sane one makes an early fault debuggable.
            regs.rsp = BOOT_STACK_POINTER.0;
            regs.rbp = BOOT_STACK_POINTER.0;
        }
    }
    regs
}

/// Edits `sregs` (as read from the vCPU, so APIC base and the like are kept) for the boot
/// protocol, and writes the boot GDT, IDT and, for LinuxBoot64, the identity page tables into
/// guest memory.
pub fn setup_sregs<M: GuestMemoryBackend>(
    entry: &BootEntry,
    mem: &M,
    sregs: &mut kvm_sregs,
) -> Result<(), Error> {
    let mode = match entry.protocol {
        BootProtocol::Pvh => CodeMode::Protected32,
        BootProtocol::LinuxBoot64 => CodeMode::Long64,
    };
    let gdt = boot_gdt(mode);
    let (gdtr, idtr) = write_boot_tables(mem, &gdt)?;
    sregs.gdt = gdtr;
    sregs.idt = idtr;

    let index = |selector: u16| usize::from(selector >> 3);
    sregs.cs = kvm_segment_from_descriptor(gdt[index(CODE_SELECTOR)], CODE_SELECTOR);
    let data = kvm_segment_from_descriptor(gdt[index(DATA_SELECTOR)], DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment_from_descriptor(gdt[index(TSS_SELECTOR)], TSS_SELECTOR);

    match entry.protocol {
        BootProtocol::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::LinuxBoot64 => {
            sregs.cr3 = write_identity_page_tables(mem)?;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(())
}

/// FPU state at entry: what FNINIT and a reset leave.
pub fn setup_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

/// MSRs a boot vCPU starts with: the syscall/sysenter MSRs cleared (no stale values from a
/// previous run on the same vCPU file descriptor) and fast strings enabled as firmware would.
pub fn initial_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_segment;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn entry(protocol: BootProtocol) -> BootEntry {
        let boot_info = match protocol {
            BootProtocol::Pvh => 0x6000,
            BootProtocol::LinuxBoot64 => 0x8000,
        };
        BootEntry {
            protocol,
            entry: GuestAddress(0x10_0200),
            boot_info: GuestAddress(boot_info),
        }
    }

    /// sregs as a freshly created vCPU reports them: real mode, caches disabled.
    fn reset_sregs() -> kvm_sregs {
        kvm_sregs {
            cr0: 0x6000_0010,
            apic_base: 0xFEE0_0900,
            ..Default::default()
        }
    }

    fn gdt_entry(mem: &GuestMemoryMmap, index: u64) -> u64 {
        mem.read_obj(GuestAddress(0x500 + index * 8)).unwrap()
    }

    fn assert_flat_data(segment: &kvm_segment) {
        assert_eq!(segment.selector, 0x18);
        assert_eq!((segment.base, segment.limit), (0, 0xFFFF_FFFF));
        assert_eq!((segment.type_, segment.s, segment.present), (0x3, 1, 1));
        assert_eq!((segment.db, segment.g, segment.dpl), (1, 1, 0));
    }

    /// Whole register files: a register the protocol does not name must be zero.
    #[test]
    fn pvh_general_registers() {
        let expected = kvm_regs {
            rip: 0x10_0200,
            rbx: 0x6000, // EBX = hvm_start_info
            rflags: 0x2,
            ..Default::default()
        };
        assert_eq!(setup_regs(&entry(BootProtocol::Pvh)), expected);
    }

    #[test]
    fn linux64_general_registers() {
        // RSI = zero page, and a stack at BOOT_STACK_POINTER. The protocol wants EBP, EDI and
        // EBX zero at the 32-bit entry; RDI and RBX stay zero here too.
        let expected = kvm_regs {
            rip: 0x10_0200,
            rsi: 0x8000,
            rsp: 0x5FF0,
            rbp: 0x5FF0,
            rflags: 0x2,
            ..Default::default()
        };
        assert_eq!(setup_regs(&entry(BootProtocol::LinuxBoot64)), expected);
    }

    #[test]
    fn pvh_segments_and_control_registers() {
        let mem = memory();
        let mut sregs = reset_sregs();
        setup_sregs(&entry(BootProtocol::Pvh), &mem, &mut sregs).unwrap();

        assert_eq!(sregs.cs.selector, 0x10);
        assert_eq!((sregs.cs.base, sregs.cs.limit), (0, 0xFFFF_FFFF));
        assert_eq!((sregs.cs.type_, sregs.cs.s, sregs.cs.present), (0xB, 1, 1));
        assert_eq!((sregs.cs.db, sregs.cs.l, sregs.cs.g), (1, 0, 1));
        for segment in [&sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss] {
            assert_flat_data(segment);
        }
        assert_eq!(sregs.tr.selector, 0x20);
        assert_eq!(
            (sregs.tr.base, sregs.tr.limit, sregs.tr.type_),
            (0, 0x67, 0xB)
        );
        assert_eq!(sregs.tr.s, 0);

        assert_eq!(
            sregs.cr0, 0x11,
            "PE and ET only: paging and caches-off cleared"
        );
        assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0, 0, 0));
        assert_eq!(sregs.apic_base, 0xFEE0_0900, "unrelated state kept");

        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 47));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (0x540, 15));
        assert_eq!(gdt_entry(&mem, 0), 0);
        assert_eq!(gdt_entry(&mem, 2), 0x00CF_9B00_0000_FFFF);
        assert_eq!(gdt_entry(&mem, 3), 0x00CF_9300_0000_FFFF);
        assert_eq!(gdt_entry(&mem, 4), 0x0000_8B00_0000_0067);
        // No paging for PVH: the page table area stays untouched.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x9000)).unwrap(), 0);
    }

    #[test]
    fn linux64_long_mode_with_identity_paging() {
        let mem = memory();
        let mut sregs = reset_sregs();
        setup_sregs(&entry(BootProtocol::LinuxBoot64), &mem, &mut sregs).unwrap();

        assert_eq!(sregs.cs.selector, 0x10, "__BOOT_CS");
        assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.type_), (1, 0, 0xB));
        for segment in [&sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss] {
            assert_flat_data(segment);
        }
        assert_eq!(sregs.cr0, 0x8000_0011, "PG | ET | PE");
        assert_eq!(sregs.cr4, 0x20, "PAE");
        assert_eq!(sregs.efer, 0x500, "LME | LMA");
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!(gdt_entry(&mem, 2), 0x00AF_9B00_0000_FFFF);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x9000)).unwrap(), 0xA003);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0xB000)).unwrap(), 0x83);
    }

    #[test]
    fn sregs_need_the_boot_area_in_ram() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 1 << 20)]).unwrap();
        let mut sregs = reset_sregs();
        assert!(matches!(
            setup_sregs(&entry(BootProtocol::Pvh), &mem, &mut sregs),
            Err(Error::WriteGuestMemory {
                what: "boot GDT",
                ..
            })
        ));
    }

    #[test]
    fn fpu_and_msrs() {
        let fpu = setup_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr, fpu.fsw), (0x37F, 0x1F80, 0));
        let msrs = initial_msrs();
        assert_eq!(msrs.len(), 9);
        let misc = msrs.iter().find(|msr| msr.index == 0x1A0).unwrap();
        assert_eq!(misc.data, 1);
        assert!(msrs
            .iter()
            .filter(|msr| msr.index != 0x1A0)
            .all(|msr| msr.data == 0));
    }
}
