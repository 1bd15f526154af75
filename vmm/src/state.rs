//! Everything volatile about a VM, as versioned serde structs, and the one entry point pair that
//! reads it out of KVM and the devices (`Vm::save_state`) and writes it back (`Vm::restore_state`).
//!
//! Guest RAM is not part of the state: it lives in its backing (an NV region or a shared file)
//! and a restore happens over the same memory.
//!
//! Restore order, and why:
//! 1. VM level: PIC master, PIC slave, IOAPIC, then PIT2 (the PIT drives IRQ 0 of the restored
//!    PIC/IOAPIC).
//! 2. Per vCPU (CPUID was set when the vCPU was created):
//!    sregs (CR0/CR4/EFER/APIC base: the mode everything else is interpreted in; setting the APIC
//!    base may reset the LAPIC, so it must precede the LAPIC) -> regs -> FPU -> XCRS (XCR0
//!    decides which xsave components are live) -> XSAVE -> debug regs -> LAPIC -> MSRs (after the
//!    LAPIC: KVM drops a TSC-deadline write unless the LAPIC timer is already in TSC-deadline
//!    mode) -> vCPU events (pending exceptions, NMI and interrupt shadow refer to the restored
//!    LAPIC and registers) -> mp_state last (events carry a latched INIT that must not be
//!    overwritten by a later mp_state change).
//! 3. Devices.
//! 4. KVM clock last, right before the vCPUs run again, so kvmclock continues from the saved
//!    value instead of jumping by the time spent restoring.
//!
//! Time: kvmclock is restored with `KVM_SET_CLOCK` and the saved value, flags cleared, so the
//! guest sees no time pass while it was saved (as after a pause). The guest TSC is saved and
//! written back with the MSRs, but hosts like this one ignore writes to MSR_IA32_TSC and lack TSC
//! scaling: there the guest TSC jumps to the host's current value. Guests must time with kvmclock
//! (or tolerate a TSC jump), which is what Linux does under KVM.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use crate::device_manager::DevicesState;
use crate::vcpu::Vcpu;
use crate::vm::{Vm, VmRunState};
use crate::Error;

/// Version of `VmState` written by this build. A state of another version is refused on restore.
pub const VM_STATE_VERSION: u32 = 1;

/// The FPU / SSE state of `KVM_GET_FPU`, in a serde-friendly shape (kvm-bindings offers no serde
/// for `kvm_fpu`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(fpu: &kvm_fpu) -> Self {
        FpuState {
            fpr: fpu.fpr,
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftwx: fpu.ftwx,
            last_opcode: fpu.last_opcode,
            last_ip: fpu.last_ip,
            last_dp: fpu.last_dp,
            xmm: fpu.xmm,
            mxcsr: fpu.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(state: &FpuState) -> Self {
        kvm_fpu {
            fpr: state.fpr,
            fcw: state.fcw,
            fsw: state.fsw,
            ftwx: state.ftwx,
            last_opcode: state.last_opcode,
            last_ip: state.last_ip,
            last_dp: state.last_dp,
            xmm: state.xmm,
            mxcsr: state.mxcsr,
            ..Default::default()
        }
    }
}

/// One MSR value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// Everything volatile about one vCPU. Optional parts are `None` when the host's KVM lacks the
/// capability they need.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// The xsave area in 32-bit words (KVM_CAP_XSAVE): the legacy 4 KiB, more where
    /// KVM_CAP_XSAVE2 reports a larger area.
    pub xsave: Option<Vec<u32>>,
    /// KVM_CAP_XCRS.
    pub xcrs: Option<kvm_xcrs>,
    /// KVM_CAP_DEBUGREGS.
    pub debug_regs: Option<kvm_debugregs>,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<MsrValue>,
    /// KVM_CAP_VCPU_EVENTS.
    pub vcpu_events: Option<kvm_vcpu_events>,
    pub mp_state: kvm_mp_state,
}

/// The in-kernel interrupt controllers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

/// Everything volatile about a VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub vcpus: Vec<VcpuState>,
    pub irqchip: IrqchipState,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub devices: DevicesState,
}

/// KVM's MSR save list, minus the MSRs this host's GET_MSRS refuses. GET_MSRS stops at the first
/// MSR it cannot read and returns how many it read, so the refused one is dropped and the rest is
/// asked again.
pub(crate) fn supported_msr_indices(kvm: &Kvm, vcpu: &Vcpu) -> Result<Vec<u32>, Error> {
    let list = kvm.get_msr_index_list().map_err(|source| Error::Kvm {
        operation: "KVM_GET_MSR_INDEX_LIST",
        source,
    })?;
    let mut candidates: Vec<u32> = list.as_slice().to_vec();
    let mut supported = Vec::with_capacity(candidates.len());
    while !candidates.is_empty() {
        let read = read_msrs(vcpu, &candidates)?;
        supported.extend(read.iter().map(|msr| msr.index));
        // `read.len()` entries succeeded; the next one failed: skip it and continue after it.
        let skip = (read.len() + 1).min(candidates.len());
        if read.len() < candidates.len() {
            log::debug!(
                "MSR {:#x} is not readable here: not saved",
                candidates[read.len()]
            );
        }
        candidates.drain(..skip);
    }
    Ok(supported)
}

/// Reads `indices` with one GET_MSRS; returns the prefix KVM could read.
fn read_msrs(vcpu: &Vcpu, indices: &[u32]) -> Result<Vec<MsrValue>, Error> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| {
        Error::State(format!(
            "{} MSRs do not fit a KVM MSR list: {e:?}",
            indices.len()
        ))
    })?;
    let read = vcpu
        .fd
        .get_msrs(&mut msrs)
        .map_err(vcpu_error(vcpu.id, "KVM_GET_MSRS"))?;
    Ok(msrs.as_slice()[..read]
        .iter()
        .map(|entry| MsrValue {
            index: entry.index,
            data: entry.data,
        })
        .collect())
}

/// 32-bit words of the legacy `kvm_xsave` area.
const LEGACY_XSAVE_WORDS: usize = 1024;

/// The vCPU's xsave area as 32-bit words: the legacy 4 KiB, or the larger area KVM_CAP_XSAVE2
/// reported (the words past 4 KiB follow the legacy region).
fn save_xsave(vcpu: &Vcpu, xsave_size: usize) -> Result<Vec<u32>, Error> {
    let words = xsave_size.div_ceil(4);
    if words <= LEGACY_XSAVE_WORDS {
        let area = vcpu
            .fd
            .get_xsave()
            .map_err(vcpu_error(vcpu.id, "KVM_GET_XSAVE"))?;
        return Ok(area.region.to_vec());
    }
    let mut area = Xsave::new(words - LEGACY_XSAVE_WORDS)
        .map_err(|e| Error::State(format!("xsave buffer of {xsave_size} bytes: {e:?}")))?;
    // SAFETY: `area` holds the legacy region plus enough trailing words for the KVM_CAP_XSAVE2
    // size, which is fixed because the VMM never enables dynamic xstate features.
    unsafe { vcpu.fd.get_xsave2(&mut area) }.map_err(vcpu_error(vcpu.id, "KVM_GET_XSAVE2"))?;
    let mut saved = area.as_fam_struct_ref().xsave.region.to_vec();
    saved.extend_from_slice(area.as_slice());
    Ok(saved)
}

fn restore_xsave(vcpu: &Vcpu, xsave_size: usize, words: &[u32]) -> Result<(), Error> {
    let id = vcpu.id;
    let host_words = xsave_size.div_ceil(4);
    if words.len() < LEGACY_XSAVE_WORDS || words.len() > host_words.max(LEGACY_XSAVE_WORDS) {
        return Err(Error::State(format!(
            "vCPU {id}: xsave area of {} words does not fit this host's {host_words}",
            words.len()
        )));
    }
    let (legacy, extended) = words.split_at(LEGACY_XSAVE_WORDS);
    if host_words <= LEGACY_XSAVE_WORDS {
        let mut area = kvm_xsave::default();
        area.region.copy_from_slice(legacy);
        // SAFETY: `area` is a complete legacy `kvm_xsave` and the host's xsave size is at most
        // its 4 KiB, so KVM_SET_XSAVE reads nothing past it.
        return unsafe { vcpu.fd.set_xsave(&area) }.map_err(vcpu_error(id, "KVM_SET_XSAVE"));
    }
    let mut area = Xsave::new(host_words - LEGACY_XSAVE_WORDS)
        .map_err(|e| Error::State(format!("xsave buffer of {xsave_size} bytes: {e:?}")))?;
    // SAFETY: the FAM struct is only written through its own accessors, within its length.
    unsafe { area.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(legacy);
    area.as_mut_slice()[..extended.len()].copy_from_slice(extended);
    // SAFETY: `area` is sized for the host's KVM_CAP_XSAVE2 size, all KVM_SET_XSAVE reads.
    unsafe { vcpu.fd.set_xsave2(&area) }.map_err(vcpu_error(id, "KVM_SET_XSAVE2"))
}

fn vcpu_error(vcpu: u8, operation: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::VcpuKvm {
        vcpu,
        operation,
        source,
    }
}

fn vm_error(operation: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { operation, source }
}

impl Vm {
    /// Reads every volatile part of the VM. The VM must be paused (every vCPU outside KVM_RUN
    /// with its I/O completed), so the state is one consistent instant.
    pub fn save_state(&self) -> Result<VmState, Error> {
        if self.run_state != VmRunState::Paused {
            return Err(Error::InvalidVmState(self.run_state.name()));
        }
        let vcpus = (0..self.vcpus.count())
            .map(|index| self.save_vcpu(index))
            .collect::<Result<Vec<_>, _>>()?;
        let irqchip = IrqchipState {
            pic_master: self.get_irqchip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: self.get_irqchip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: self.get_irqchip(KVM_IRQCHIP_IOAPIC)?,
        };
        let pit = self.vm_fd.get_pit2().map_err(vm_error("KVM_GET_PIT2"))?;
        let clock = self.vm_fd.get_clock().map_err(vm_error("KVM_GET_CLOCK"))?;
        let devices = self.devices.save_state()?;
        Ok(VmState {
            version: VM_STATE_VERSION,
            vcpus,
            irqchip,
            pit,
            clock,
            devices,
        })
    }

    /// Writes `state` back, in the order documented at the top of this module. The VM must be
    /// freshly created (not booted) or paused; `resume` runs it afterwards.
    pub fn restore_state(&mut self, state: &VmState) -> Result<(), Error> {
        if self.run_state != VmRunState::Paused && self.run_state != VmRunState::Created {
            return Err(Error::InvalidVmState(self.run_state.name()));
        }
        if state.version != VM_STATE_VERSION {
            return Err(Error::State(format!(
                "state version {} is not supported (this build reads version {VM_STATE_VERSION})",
                state.version
            )));
        }
        if state.vcpus.len() != self.vcpus.count() {
            return Err(Error::State(format!(
                "state has {} vCPUs, this VM has {}",
                state.vcpus.len(),
                self.vcpus.count()
            )));
        }
        self.vm_fd
            .set_irqchip(&state.irqchip.pic_master)
            .map_err(vm_error("KVM_SET_IRQCHIP (PIC master)"))?;
        self.vm_fd
            .set_irqchip(&state.irqchip.pic_slave)
            .map_err(vm_error("KVM_SET_IRQCHIP (PIC slave)"))?;
        self.vm_fd
            .set_irqchip(&state.irqchip.ioapic)
            .map_err(vm_error("KVM_SET_IRQCHIP (IOAPIC)"))?;
        self.vm_fd
            .set_pit2(&state.pit)
            .map_err(vm_error("KVM_SET_PIT2"))?;
        for (index, vcpu_state) in state.vcpus.iter().enumerate() {
            self.restore_vcpu(index, vcpu_state)?;
        }
        self.devices.restore_state(&state.devices)?;
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            // No REALTIME/HOST_TSC flags: continue from the saved value, as after a pause.
            flags: 0,
            ..Default::default()
        };
        self.vm_fd
            .set_clock(&clock)
            .map_err(vm_error("KVM_SET_CLOCK"))?;
        // From now on the VM is "paused" at the restored instant.
        self.run_state = VmRunState::Paused;
        Ok(())
    }

    fn get_irqchip(&self, chip_id: u32) -> Result<kvm_irqchip, Error> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.vm_fd
            .get_irqchip(&mut chip)
            .map_err(vm_error("KVM_GET_IRQCHIP"))?;
        Ok(chip)
    }

    fn save_vcpu(&self, index: usize) -> Result<VcpuState, Error> {
        let vcpu = self.vcpus.lock_vcpu(index);
        let id = vcpu.id;
        let fd = &vcpu.fd;
        let caps = self.capabilities;
        let xsave = if caps.xsave {
            Some(save_xsave(&vcpu, caps.xsave_size)?)
        } else {
            None
        };
        let msrs = read_msrs(&vcpu, &self.msr_indices)?;
        if msrs.len() != self.msr_indices.len() {
            return Err(Error::State(format!(
                "vCPU {id}: GET_MSRS read {} of {} MSRs",
                msrs.len(),
                self.msr_indices.len()
            )));
        }
        Ok(VcpuState {
            id,
            regs: fd.get_regs().map_err(vcpu_error(id, "KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(vcpu_error(id, "KVM_GET_SREGS"))?,
            fpu: (&fd.get_fpu().map_err(vcpu_error(id, "KVM_GET_FPU"))?).into(),
            xsave,
            xcrs: caps
                .xcrs
                .then(|| fd.get_xcrs().map_err(vcpu_error(id, "KVM_GET_XCRS")))
                .transpose()?,
            debug_regs: caps
                .debug_regs
                .then(|| {
                    fd.get_debug_regs()
                        .map_err(vcpu_error(id, "KVM_GET_DEBUGREGS"))
                })
                .transpose()?,
            lapic: fd.get_lapic().map_err(vcpu_error(id, "KVM_GET_LAPIC"))?,
            msrs,
            vcpu_events: caps
                .vcpu_events
                .then(|| {
                    fd.get_vcpu_events()
                        .map_err(vcpu_error(id, "KVM_GET_VCPU_EVENTS"))
                })
                .transpose()?,
            mp_state: fd
                .get_mp_state()
                .map_err(vcpu_error(id, "KVM_GET_MP_STATE"))?,
        })
    }

    fn restore_vcpu(&self, index: usize, state: &VcpuState) -> Result<(), Error> {
        let vcpu = self.vcpus.lock_vcpu(index);
        let id = vcpu.id;
        if state.id != id {
            return Err(Error::State(format!(
                "state of vCPU {} offered to vCPU {id}",
                state.id
            )));
        }
        let fd = &vcpu.fd;
        let caps = self.capabilities;
        let missing = |part: &str, cap: &str| {
            Error::State(format!(
                "vCPU {id}: the state has {part} but this host lacks {cap}"
            ))
        };
        fd.set_sregs(&state.sregs)
            .map_err(vcpu_error(id, "KVM_SET_SREGS"))?;
        fd.set_regs(&state.regs)
            .map_err(vcpu_error(id, "KVM_SET_REGS"))?;
        fd.set_fpu(&(&state.fpu).into())
            .map_err(vcpu_error(id, "KVM_SET_FPU"))?;
        if let Some(xcrs) = &state.xcrs {
            if !caps.xcrs {
                return Err(missing("XCRs", "KVM_CAP_XCRS"));
            }
            fd.set_xcrs(xcrs).map_err(vcpu_error(id, "KVM_SET_XCRS"))?;
        }
        if let Some(words) = &state.xsave {
            if !caps.xsave {
                return Err(missing("an xsave area", "KVM_CAP_XSAVE"));
            }
            restore_xsave(&vcpu, caps.xsave_size, words)?;
        }
        if let Some(debug_regs) = &state.debug_regs {
            if caps.debug_regs {
                fd.set_debug_regs(debug_regs)
                    .map_err(vcpu_error(id, "KVM_SET_DEBUGREGS"))?;
            } else {
                log::warn!("vCPU {id}: debug registers not restored (no KVM_CAP_DEBUGREGS)");
            }
        }
        fd.set_lapic(&state.lapic)
            .map_err(vcpu_error(id, "KVM_SET_LAPIC"))?;
        let entries: Vec<kvm_msr_entry> = state
            .msrs
            .iter()
            .map(|msr| kvm_msr_entry {
                index: msr.index,
                data: msr.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::State(format!("vCPU {id}: MSR list: {e:?}")))?;
        let written = fd.set_msrs(&msrs).map_err(vcpu_error(id, "KVM_SET_MSRS"))?;
        if written != entries.len() {
            return Err(Error::State(format!(
                "vCPU {id}: KVM refused MSR {:#x} ({written} of {} written)",
                entries[written].index,
                entries.len()
            )));
        }
        if let Some(events) = &state.vcpu_events {
            if !caps.vcpu_events {
                return Err(missing("vCPU events", "KVM_CAP_VCPU_EVENTS"));
            }
            fd.set_vcpu_events(events)
                .map_err(vcpu_error(id, "KVM_SET_VCPU_EVENTS"))?;
        }
        fd.set_mp_state(state.mp_state)
            .map_err(vcpu_error(id, "KVM_SET_MP_STATE"))?;
        Ok(())
    }
}
