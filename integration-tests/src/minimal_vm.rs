//! The pieces of a minimal VMM on kvm-ioctls that the tests which need the VM or vCPU fd share
//! (`tests/kvm_boot.rs`, `tests/interrupts.rs`): guest RAM registered with a new
//! VM, and the boot vCPU programmed from a loaded kernel's entry with `arch::regs`.

use arch::BootEntry;
use kvm_bindings::{kvm_userspace_memory_region, Msrs};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// A VM with `ram` bytes of guest RAM at address 0. `vm` is declared before `mem` so that it is
/// dropped first: KVM must not keep a mapping to memory that is already unmapped.
pub struct MinimalVm {
    pub vm: VmFd,
    pub mem: GuestMemoryMmap<()>,
}

impl MinimalVm {
    /// Creates the VM, lets `prepare` set it up before any memory or vCPU exists (TSS address,
    /// irqchip), and registers the RAM with it.
    pub fn new(kvm: &Kvm, ram: usize, prepare: impl FnOnce(&VmFd)) -> MinimalVm {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram)]).unwrap();
        let vm = kvm.create_vm().unwrap();
        prepare(&vm);
        for (slot, region) in mem.iter().enumerate() {
            let host = mem.get_host_address(region.start_addr()).unwrap();
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: `host` is the start of `mem`'s mapping of this region, valid for
            // `region.len()` bytes, and `mem` outlives `vm` (the MinimalVm drops `vm` first).
            unsafe { vm.set_user_memory_region(region).unwrap() };
        }
        MinimalVm { vm, mem }
    }

    /// Programs `vcpu` to start at `entry` as the boot protocol says: segment and control
    /// registers, general registers, FPU and the boot MSRs (all of which KVM must accept).
    pub fn program_boot_vcpu(&self, vcpu: &VcpuFd, entry: &BootEntry) {
        let mut sregs = vcpu.get_sregs().unwrap();
        arch::regs::setup_sregs(entry, &self.mem, &mut sregs).unwrap();
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&arch::regs::setup_regs(entry)).unwrap();
        vcpu.set_fpu(&arch::regs::setup_fpu()).unwrap();
        let msrs = arch::regs::initial_msrs();
        let written = vcpu.set_msrs(&Msrs::from_entries(&msrs).unwrap()).unwrap();
        assert_eq!(written, msrs.len(), "KVM refused a boot MSR");
    }
}
