//! Programs vCPUs for a cold boot: the boot vCPU gets the entry registers of the kernel's boot
//! protocol (values from `arch::regs`); every vCPU gets its LAPIC local interrupt pins wired the
//! way firmware leaves them. Application processors are left in KVM's wait-for-SIPI state.
//!
//! SMP start-up is the hardware's: vCPU 0 is KVM's boot processor (the default boot CPU id) and
//! every other vCPU is created in `KVM_MP_STATE_UNINITIALIZED`, so its first KVM_RUN waits inside
//! KVM (the thread blocks there, and a kick still interrupts it) until the guest's INIT and
//! STARTUP IPIs reach its in-kernel LAPIC; KVM then starts it in real mode at CS:IP =
//! `vector << 8`:0, as the guest's trampoline expects. The VMM never writes an AP's registers:
//! programming one here would start it before the guest asked. Its MP state is saved and
//! restored with the rest of its state (state.rs), so it keeps waiting or running across a save.

use kvm_bindings::{kvm_lapic_state, Msrs};
use vm_memory::GuestMemoryMmap;

use crate::vcpu::Vcpu;
use crate::Error;

/// LAPIC register offsets of the local vector table entries for LINT0 and LINT1.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
/// Delivery mode field of an LVT entry (bits 8..=10) and the two modes firmware programs.
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_EXTINT: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x400;

fn vcpu_error(vcpu: u8, operation: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::VcpuKvm {
        vcpu,
        operation,
        source,
    }
}

/// LINT0 delivers the legacy PIC's interrupts (ExtINT), LINT1 the NMI line, as the BIOS/firmware
/// sets them and as Linux and our guests expect on the virtual-wire configuration.
pub fn wire_local_interrupt_pins(vcpu: &Vcpu) -> Result<(), Error> {
    let mut lapic = vcpu
        .fd
        .get_lapic()
        .map_err(vcpu_error(vcpu.id, "KVM_GET_LAPIC"))?;
    set_lvt_delivery_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_lvt_delivery_mode(&mut lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.fd
        .set_lapic(&lapic)
        .map_err(vcpu_error(vcpu.id, "KVM_SET_LAPIC"))
}

fn set_lvt_delivery_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    let value = (u32::from_le_bytes(bytes) & !APIC_DELIVERY_MODE_MASK) | mode;
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as _;
    }
}

/// Sets the boot vCPU's registers, segment state, FPU and MSRs for `entry`.
pub fn program_boot_vcpu(
    vcpu: &Vcpu,
    memory: &GuestMemoryMmap,
    entry: &arch::BootEntry,
) -> Result<(), Error> {
    let id = vcpu.id;
    let mut sregs = vcpu
        .fd
        .get_sregs()
        .map_err(vcpu_error(id, "KVM_GET_SREGS"))?;
    arch::regs::setup_sregs(entry, memory, &mut sregs).map_err(Error::BootRegisters)?;
    vcpu.fd
        .set_sregs(&sregs)
        .map_err(vcpu_error(id, "KVM_SET_SREGS"))?;
    vcpu.fd
        .set_regs(&arch::regs::setup_regs(entry))
        .map_err(vcpu_error(id, "KVM_SET_REGS"))?;
    vcpu.fd
        .set_fpu(&arch::regs::setup_fpu())
        .map_err(vcpu_error(id, "KVM_SET_FPU"))?;
    let entries = arch::regs::initial_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(Error::BootMsrList)?;
    let written = vcpu
        .fd
        .set_msrs(&msrs)
        .map_err(vcpu_error(id, "KVM_SET_MSRS"))?;
    if written != entries.len() {
        return Err(Error::BootMsrRefused(entries[written].index));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_delivery_mode_keeps_the_other_bits() {
        let mut lapic = kvm_lapic_state::default();
        // Vector 0x31, masked (bit 16), delivery mode fixed.
        lapic.regs[APIC_LVT_LINT0] = 0x31;
        lapic.regs[APIC_LVT_LINT0 + 2] = 0x01;
        set_lvt_delivery_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        assert_eq!(lapic.regs[APIC_LVT_LINT0] as u8, 0x31);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 1] as u8, 0x07);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 2] as u8, 0x01);
    }
}
