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
//! An NV recovery writes steps 1 and 2 (`InKernelState`) ahead, on the helper thread that
//! creates the vCPUs, right after it created them and while the building thread still builds
//! the devices; `restore_state` then writes steps 3 and 4 and reports any error of 1 and 2.
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
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::device_manager::DevicesState;
use crate::vcpu::{Vcpu, VcpuManager};
use crate::vm::{KvmCapabilities, Vm, VmRunState};
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
    #[serde(deserialize_with = "exact_bytes::exact")]
    pub regs: kvm_regs,
    #[serde(deserialize_with = "exact_bytes::exact")]
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// The xsave area in 32-bit words (KVM_CAP_XSAVE): the legacy 4 KiB, more where
    /// KVM_CAP_XSAVE2 reports a larger area.
    pub xsave: Option<Vec<u32>>,
    /// KVM_CAP_XCRS.
    #[serde(deserialize_with = "exact_bytes::exact_option")]
    pub xcrs: Option<kvm_xcrs>,
    /// KVM_CAP_DEBUGREGS.
    #[serde(deserialize_with = "exact_bytes::exact_option")]
    pub debug_regs: Option<kvm_debugregs>,
    #[serde(deserialize_with = "exact_bytes::exact")]
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<MsrValue>,
    /// KVM_CAP_VCPU_EVENTS.
    #[serde(deserialize_with = "exact_bytes::exact_option")]
    pub vcpu_events: Option<kvm_vcpu_events>,
    #[serde(deserialize_with = "exact_bytes::exact")]
    pub mp_state: kvm_mp_state,
}

/// The in-kernel interrupt controllers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IrqchipState {
    #[serde(deserialize_with = "exact_bytes::exact")]
    pub pic_master: kvm_irqchip,
    #[serde(deserialize_with = "exact_bytes::exact")]
    pub pic_slave: kvm_irqchip,
    #[serde(deserialize_with = "exact_bytes::exact")]
    pub ioapic: kvm_irqchip,
}

/// Everything volatile about a VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub vcpus: Vec<VcpuState>,
    pub irqchip: IrqchipState,
    #[serde(deserialize_with = "exact_bytes::exact")]
    pub pit: kvm_pit_state2,
    #[serde(deserialize_with = "exact_bytes::exact")]
    pub clock: kvm_clock_data,
    pub devices: DevicesState,
}

/// Strict reading of the kvm-bindings structs. Their own serde impl takes a string or a byte
/// array of any length and zero-pads or truncates it to the struct: a state with `"regs": "x"`
/// or ten bytes of registers would load. Here a struct must be an array of exactly its size in
/// bytes, each 0..=255; the bytes then go through the kvm-bindings impl unchanged.
mod exact_bytes {
    use serde::de::{DeserializeOwned, Error as _};
    use serde::{Deserialize, Deserializer};

    pub(super) fn exact<'de, D, T>(deserializer: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: DeserializeOwned,
    {
        let bytes = Vec::<u8>::deserialize(deserializer)?;
        let expected = std::mem::size_of::<T>();
        if bytes.len() != expected {
            return Err(D::Error::custom(format!(
                "an array of {} bytes where {expected} are expected",
                bytes.len()
            )));
        }
        T::deserialize(serde::de::value::BytesDeserializer::<D::Error>::new(&bytes))
    }

    #[derive(Deserialize)]
    #[serde(bound(deserialize = "T: DeserializeOwned"))]
    struct Exact<T>(#[serde(deserialize_with = "exact")] T);

    pub(super) fn exact_option<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: DeserializeOwned,
    {
        Ok(Option::<Exact<T>>::deserialize(deserializer)?.map(|exact| exact.0))
    }
}

// Architectural bits the validation below checks (Intel SDM vol. 3, 2.5 and 2.2.1).
const CR0_PE: u64 = 1;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// SCE, LME, LMA, NXE, SVME, LMSLE, FFXSR, TCE, MCOMMIT, INTWB, UAIE, AIBRSE.
const EFER_DEFINED: u64 = 1
    | 1 << 8
    | 1 << 10
    | 1 << 11
    | 1 << 12
    | 1 << 13
    | 1 << 14
    | 1 << 15
    | 1 << 17
    | 1 << 18
    | 1 << 20
    | 1 << 21;
/// RFLAGS bit 1 reads as one; bits 3, 5, 15 and 22..63 are reserved (zero).
const RFLAGS_FIXED_ONE: u64 = 1 << 1;
const RFLAGS_RESERVED: u64 = 1 << 3 | 1 << 5 | 1 << 15 | !((1 << 22) - 1);
/// IA32_APIC_BASE: bits 0..7 and 9 reserved, the base below bit 52.
const APIC_BASE_RESERVED: u64 = 0xff | 1 << 9 | !((1 << 52) - 1);
/// KVM_MP_STATE_RUNNABLE ..= KVM_MP_STATE_SIPI_RECEIVED: the x86 states.
const MP_STATE_MAX_X86: u32 = 4;
/// The largest xsave area accepted: 16 times the legacy 4 KiB (AMX needs about 11 KiB).
const MAX_XSAVE_WORDS: usize = 16 * LEGACY_XSAVE_WORDS;

fn is_canonical(address: u64) -> bool {
    let top = (address as i64) >> 47;
    top == 0 || top == -1
}

impl VmState {
    /// Checks that the state can be what a VM of `vcpus` vCPUs was in, before any of it
    /// reaches KVM: version, vCPU count and ids, interrupt controller ids, and the register
    /// values the CPU would fault on or misread (reserved bits, inconsistent paging modes, a
    /// non-canonical RIP). Byte lengths are checked when the state is read (see `exact_bytes`).
    pub fn validate(&self, vcpus: usize) -> Result<(), Error> {
        let invalid = |reason: String| Err(Error::InvalidState(reason));
        if self.version != VM_STATE_VERSION {
            return invalid(format!(
                "state version {} is not supported (this build reads version {VM_STATE_VERSION})",
                self.version
            ));
        }
        if self.vcpus.len() != vcpus {
            return invalid(format!(
                "the state has {} vCPUs, the VM has {vcpus}",
                self.vcpus.len()
            ));
        }
        let chips = [
            (
                "PIC master",
                &self.irqchip.pic_master,
                KVM_IRQCHIP_PIC_MASTER,
            ),
            ("PIC slave", &self.irqchip.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            ("IOAPIC", &self.irqchip.ioapic, KVM_IRQCHIP_IOAPIC),
        ];
        for (name, chip, id) in chips {
            if chip.chip_id != id {
                return invalid(format!(
                    "the {name} state carries chip id {} instead of {id}",
                    chip.chip_id
                ));
            }
        }
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            if usize::from(vcpu.id) != index {
                return invalid(format!("vCPU {index} of the state has id {}", vcpu.id));
            }
            vcpu.validate()
                .map_err(|reason| Error::InvalidState(format!("vCPU {index}: {reason}")))?;
        }
        Ok(())
    }
}

impl VcpuState {
    fn validate(&self) -> Result<(), String> {
        let sregs = &self.sregs;
        let (cr0, cr4, efer) = (sregs.cr0, sregs.cr4, sregs.efer);
        if cr0 >> 32 != 0 || (cr0 & CR0_PG != 0 && cr0 & CR0_PE == 0) {
            return Err(format!(
                "CR0 {cr0:#x} is not a valid control register value"
            ));
        }
        if cr0 & CR0_NW != 0 && cr0 & CR0_CD == 0 {
            return Err(format!("CR0 {cr0:#x} sets NW without CD"));
        }
        if cr4 >> 32 != 0 {
            return Err(format!("CR4 {cr4:#x} sets reserved bits"));
        }
        if efer & !EFER_DEFINED != 0 {
            return Err(format!("EFER {efer:#x} sets reserved bits"));
        }
        let long_mode = efer & EFER_LMA != 0;
        let paging = cr0 & CR0_PG != 0;
        if long_mode != (efer & EFER_LME != 0 && paging) || (long_mode && cr4 & CR4_PAE == 0) {
            return Err(format!(
                "inconsistent paging mode: CR0 {cr0:#x}, CR4 {cr4:#x}, EFER {efer:#x}"
            ));
        }
        let code_64 = long_mode && sregs.cs.l != 0;
        if code_64 && sregs.cs.db != 0 {
            return Err("CS has both L and D/B set".to_string());
        }
        if sregs.apic_base & APIC_BASE_RESERVED != 0 {
            return Err(format!(
                "APIC base {:#x} sets reserved bits",
                sregs.apic_base
            ));
        }
        let regs = &self.regs;
        if regs.rflags & RFLAGS_FIXED_ONE == 0 || regs.rflags & RFLAGS_RESERVED != 0 {
            return Err(format!(
                "RFLAGS {:#x} is not a valid flags value",
                regs.rflags
            ));
        }
        let rip_ok = if code_64 {
            is_canonical(regs.rip)
        } else {
            regs.rip >> 32 == 0
        };
        if !rip_ok {
            return Err(format!(
                "RIP {:#x} is not an address in the vCPU's mode",
                regs.rip
            ));
        }
        if self.fpu.mxcsr >> 16 != 0 {
            return Err(format!("MXCSR {:#x} sets reserved bits", self.fpu.mxcsr));
        }
        if let Some(words) = &self.xsave {
            if !(LEGACY_XSAVE_WORDS..=MAX_XSAVE_WORDS).contains(&words.len()) {
                return Err(format!(
                    "an xsave area of {} words (from {LEGACY_XSAVE_WORDS} to {MAX_XSAVE_WORDS})",
                    words.len()
                ));
            }
        }
        if self.mp_state.mp_state > MP_STATE_MAX_X86 {
            return Err(format!(
                "MP state {} is not an x86 state",
                self.mp_state.mp_state
            ));
        }
        let mut indices: Vec<u32> = self.msrs.iter().map(|msr| msr.index).collect();
        indices.sort_unstable();
        if let Some(pair) = indices.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(format!("MSR {:#x} is listed twice", pair[0]));
        }
        Ok(())
    }
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
    let mut msrs = Msrs::from_entries(&entries).map_err(|source| Error::StateBuffer {
        what: format!("{} MSRs do not fit a KVM MSR list", indices.len()),
        source,
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
    let mut area = Xsave::new(words - LEGACY_XSAVE_WORDS).map_err(|source| Error::StateBuffer {
        what: format!("xsave buffer of {xsave_size} bytes"),
        source,
    })?;
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
    let mut area =
        Xsave::new(host_words - LEGACY_XSAVE_WORDS).map_err(|source| Error::StateBuffer {
            what: format!("xsave buffer of {xsave_size} bytes"),
            source,
        })?;
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
    ///
    /// A recovery's build may have written the in-kernel part of this very `state` ahead (see
    /// [`InKernelState`]): that part is then not written again, and an error met there is
    /// returned here, where it always was.
    pub fn restore_state(&mut self, state: &VmState) -> Result<(), Error> {
        if self.run_state != VmRunState::Paused && self.run_state != VmRunState::Created {
            return Err(Error::InvalidVmState(self.run_state.name()));
        }
        // Everything checkable is checked before the first KVM call: a refused state leaves
        // nothing half restored.
        state.validate(self.vcpus.count())?;
        match self.in_kernel_restored_ahead.take() {
            Some(ahead) if ahead.is_of(state) => ahead.outcome?,
            _ => InKernelState::of(state).restore(&self.vm_fd, &self.vcpus, self.capabilities)?,
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
        let vcpu = self.vcpus.lock_vcpu_unchanged(index);
        let id = vcpu.id;
        let fd = &vcpu.fd;
        let caps = self.capabilities;
        // Parked after a KVM_RUN: KVM copied these out at that exit (KVM_CAP_SYNC_REGS).
        let (regs, sregs) = match vcpu.copied_registers() {
            Some(copied) => copied,
            None => (
                fd.get_regs().map_err(vcpu_error(id, "KVM_GET_REGS"))?,
                fd.get_sregs().map_err(vcpu_error(id, "KVM_GET_SREGS"))?,
            ),
        };
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
            regs,
            sregs,
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
}

/// The part of a [`VmState`] that lives in KVM's interrupt controllers and vCPUs (steps 1 and 2
/// of the restore order at the top of this module): what [`Vm::restore_state`] writes before
/// the devices and the clock.
///
/// A recovery's build writes it on the `vm-build` helper right after that helper created the
/// vCPUs, while the building thread still builds the devices (`vcpu_builder.rs`), instead of
/// after the devices on the building thread. The ioctls and their order are the same, and the
/// vCPUs exist when the interrupt controllers are written, as in line; nothing runs a vCPU
/// until `resume`.
#[derive(Clone, Debug)]
pub(crate) struct InKernelState {
    irqchip: IrqchipState,
    pit: kvm_pit_state2,
    vcpus: Vec<VcpuState>,
}

impl InKernelState {
    pub(crate) fn of(state: &VmState) -> InKernelState {
        InKernelState {
            irqchip: state.irqchip.clone(),
            pit: state.pit,
            vcpus: state.vcpus.clone(),
        }
    }

    /// Writes the interrupt controllers, the PIT, then each vCPU, into a VM whose vCPUs
    /// `vcpus` all exist. The state must have been validated for as many vCPUs
    /// ([`VmState::validate`]).
    pub(crate) fn restore(
        &self,
        vm_fd: &VmFd,
        vcpus: &VcpuManager,
        capabilities: KvmCapabilities,
    ) -> Result<(), Error> {
        vm_fd
            .set_irqchip(&self.irqchip.pic_master)
            .map_err(vm_error("KVM_SET_IRQCHIP (PIC master)"))?;
        vm_fd
            .set_irqchip(&self.irqchip.pic_slave)
            .map_err(vm_error("KVM_SET_IRQCHIP (PIC slave)"))?;
        vm_fd
            .set_irqchip(&self.irqchip.ioapic)
            .map_err(vm_error("KVM_SET_IRQCHIP (IOAPIC)"))?;
        vm_fd
            .set_pit2(&self.pit)
            .map_err(vm_error("KVM_SET_PIT2"))?;
        for (index, vcpu_state) in self.vcpus.iter().enumerate() {
            restore_vcpu(vcpus, capabilities, index, vcpu_state)?;
        }
        Ok(())
    }
}

/// What a build wrote of [`InKernelState`] ahead, for [`Vm::restore_state`] to take over.
#[derive(Debug)]
pub(crate) struct InKernelRestoredAhead {
    /// The address of the [`VmState`] it was taken from: `restore_state` takes it over only
    /// for that very state (any other is written in full).
    of: usize,
    /// How writing it ended: an error is `restore_state`'s, reported there.
    pub(crate) outcome: Result<(), Error>,
}

impl InKernelRestoredAhead {
    pub(crate) fn new(of: &VmState, outcome: Result<(), Error>) -> InKernelRestoredAhead {
        InKernelRestoredAhead {
            of: std::ptr::from_ref(of) as usize,
            outcome,
        }
    }

    fn is_of(&self, state: &VmState) -> bool {
        self.of == std::ptr::from_ref(state) as usize
    }
}

/// Writes one vCPU's state, in the order documented at the top of this module.
fn restore_vcpu(
    vcpus: &VcpuManager,
    caps: KvmCapabilities,
    index: usize,
    state: &VcpuState,
) -> Result<(), Error> {
    let vcpu = vcpus.lock_vcpu(index);
    let id = vcpu.id;
    if state.id != id {
        return Err(Error::State(format!(
            "state of vCPU {} offered to vCPU {id}",
            state.id
        )));
    }
    let fd = &vcpu.fd;
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
    let msrs = Msrs::from_entries(&entries).map_err(|source| Error::StateBuffer {
        what: format!("vCPU {id}: MSR list"),
        source,
    })?;
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A state a VM of `vcpus` vCPUs could be in: 64-bit mode, ring 3, valid values throughout.
    pub(crate) fn sample_state(vcpus: u8) -> VmState {
        let vcpu = |id: u8| {
            let mut sregs = kvm_sregs {
                cr0: CR0_PE | CR0_PG | 1 << 4,
                cr4: CR4_PAE,
                efer: EFER_LME | EFER_LMA,
                apic_base: 0xfee0_0000 | 1 << 11 | u64::from(id == 0) << 8,
                ..Default::default()
            };
            sregs.cs.l = 1;
            VcpuState {
                id,
                regs: kvm_regs {
                    rflags: 0x202,
                    rip: 0x40_1000,
                    ..Default::default()
                },
                sregs,
                fpu: FpuState::from(&kvm_fpu {
                    mxcsr: 0x1f80,
                    ..Default::default()
                }),
                xsave: Some(vec![0; LEGACY_XSAVE_WORDS]),
                xcrs: Some(kvm_xcrs::default()),
                debug_regs: None,
                lapic: kvm_lapic_state::default(),
                msrs: vec![MsrValue {
                    index: 0x10,
                    data: 1,
                }],
                vcpu_events: Some(kvm_vcpu_events::default()),
                mp_state: kvm_mp_state::default(),
            }
        };
        let chip = |chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        VmState {
            version: VM_STATE_VERSION,
            vcpus: (0..vcpus).map(vcpu).collect(),
            irqchip: IrqchipState {
                pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
                pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
                ioapic: chip(KVM_IRQCHIP_IOAPIC),
            },
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data::default(),
            devices: DevicesState {
                serial: None,
                disks: Vec::new(),
                nets: Vec::new(),
                fs: Vec::new(),
                ged: None,
                pci: None,
                console: None,
                rng: None,
                hotplug: None,
            },
        }
    }

    fn refusal(state: &VmState) -> String {
        match state.validate(state.vcpus.len()) {
            Err(e @ Error::InvalidState(_)) => e.to_string(),
            other => panic!("not refused as invalid: {other:?}"),
        }
    }

    #[test]
    fn a_sane_state_round_trips_through_json_and_validates() {
        let state = sample_state(2);
        state.validate(2).unwrap();
        let text = serde_json::to_string(&state).unwrap();
        let back: VmState = serde_json::from_str(&text).unwrap();
        back.validate(2).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
        let error = state.validate(1).unwrap_err();
        assert!(error.to_string().contains("2 vCPUs"), "{error}");
        assert_eq!(error.kind(), crate::ErrorKind::InvalidRequest);
    }

    #[test]
    fn kvm_structs_must_be_arrays_of_exactly_their_size() {
        let mut value = serde_json::to_value(sample_state(1)).unwrap();
        let regs_len = value["vcpus"][0]["regs"].as_array().unwrap().len();
        assert_eq!(regs_len, std::mem::size_of::<kvm_regs>());
        for bad in [
            serde_json::json!("not registers"),
            serde_json::json!([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
            serde_json::json!(vec![0; regs_len + 1]),
            serde_json::json!(vec![256; regs_len]),
        ] {
            value["vcpus"][0]["regs"] = bad.clone();
            let parsed = serde_json::from_value::<VmState>(value.clone());
            assert!(parsed.is_err(), "{bad} accepted as registers");
        }
        value["vcpus"][0]["regs"] = serde_json::json!(vec![0; regs_len]);
        value["vcpus"][0]["xcrs"] = serde_json::json!([1, 2]);
        assert!(serde_json::from_value::<VmState>(value.clone()).is_err());
        value["vcpus"][0]["xcrs"] = serde_json::Value::Null;
        let parsed: VmState = serde_json::from_value(value).unwrap();
        assert!(parsed.vcpus[0].xcrs.is_none());
    }

    /// The MP state is part of every vCPU's state from version 1 on: whether an AP still waits
    /// for the guest's INIT/SIPI depends on it, so a state without it is refused by name rather
    /// than restored with every AP waiting (or running).
    #[test]
    fn a_vcpu_state_without_its_mp_state_is_refused_by_name() {
        let mut value = serde_json::to_value(sample_state(2)).unwrap();
        value["vcpus"][1]
            .as_object_mut()
            .unwrap()
            .remove("mp_state")
            .unwrap();
        let error = serde_json::from_value::<VmState>(value).unwrap_err();
        assert!(error.to_string().contains("mp_state"), "{error}");
    }

    #[test]
    fn the_mp_state_of_each_vcpu_round_trips() {
        let mut state = sample_state(2);
        state.vcpus[1].mp_state.mp_state = kvm_bindings::KVM_MP_STATE_UNINITIALIZED;
        let text = serde_json::to_string(&state).unwrap();
        let back: VmState = serde_json::from_str(&text).unwrap();
        back.validate(2).unwrap();
        let states: Vec<u32> = back.vcpus.iter().map(|v| v.mp_state.mp_state).collect();
        assert_eq!(
            states,
            [
                kvm_bindings::KVM_MP_STATE_RUNNABLE,
                kvm_bindings::KVM_MP_STATE_UNINITIALIZED
            ]
        );
    }

    #[test]
    fn garbage_register_values_are_refused_before_kvm_sees_them() {
        let base = sample_state(1);
        type Mutation = Box<dyn Fn(&mut VmState)>;
        let mutations: Vec<(&str, Mutation)> = vec![
            (
                "RFLAGS",
                Box::new(|s| {
                    s.vcpus[0].regs = {
                        let mut regs = kvm_regs::default();
                        // SAFETY: kvm_regs is plain integers; every bit pattern is a value.
                        unsafe { std::ptr::write_bytes(&mut regs, 0xff, 1) };
                        regs
                    }
                }),
            ),
            ("CR0", Box::new(|s| s.vcpus[0].sregs.cr0 = CR0_PG)),
            ("CR0", Box::new(|s| s.vcpus[0].sregs.cr0 |= 1 << 40)),
            ("CR4", Box::new(|s| s.vcpus[0].sregs.cr4 |= 1 << 33)),
            ("EFER", Box::new(|s| s.vcpus[0].sregs.efer |= 1 << 40)),
            ("paging mode", Box::new(|s| s.vcpus[0].sregs.cr4 = 0)),
            (
                "paging mode",
                Box::new(|s| s.vcpus[0].sregs.efer = EFER_LME),
            ),
            ("L and D/B", Box::new(|s| s.vcpus[0].sregs.cs.db = 1)),
            ("APIC base", Box::new(|s| s.vcpus[0].sregs.apic_base |= 1)),
            ("RFLAGS", Box::new(|s| s.vcpus[0].regs.rflags = 0)),
            ("RIP", Box::new(|s| s.vcpus[0].regs.rip = 0x8000_0000_0000)),
            ("MXCSR", Box::new(|s| s.vcpus[0].fpu.mxcsr = 0xffff_ffff)),
            ("xsave", Box::new(|s| s.vcpus[0].xsave = Some(vec![0; 10]))),
            ("MP state", Box::new(|s| s.vcpus[0].mp_state.mp_state = 77)),
            (
                "listed twice",
                Box::new(|s| {
                    let msr = s.vcpus[0].msrs[0];
                    s.vcpus[0].msrs.push(msr);
                }),
            ),
            ("has id", Box::new(|s| s.vcpus[0].id = 3)),
            ("chip id", Box::new(|s| s.irqchip.ioapic.chip_id = 0)),
            ("version", Box::new(|s| s.version = 9)),
        ];
        for (expected, mutate) in mutations {
            let mut state = base.clone();
            mutate(&mut state);
            let text = refusal(&state);
            assert!(text.contains(expected), "{expected}: {text}");
        }
        // 32-bit protected mode without paging: RIP below 4 GiB, no long-mode rules.
        let mut flat = base.clone();
        flat.vcpus[0].sregs.cr0 = CR0_PE;
        flat.vcpus[0].sregs.efer = 0;
        flat.vcpus[0].sregs.cs.l = 0;
        flat.validate(1).unwrap();
        flat.vcpus[0].regs.rip = 1 << 32;
        assert!(refusal(&flat).contains("RIP"));
    }
}
