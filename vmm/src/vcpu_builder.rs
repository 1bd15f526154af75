//! A VM's vCPUs made on a helper thread (`vm-build`) while the building thread makes its
//! devices.
//!
//! The helper starts before the VM needs it and first does what needs no VM: it fetches the
//! host's supported CPUID (a system ioctl; on this nested host every `cpuid` the kernel runs
//! for it traps to the outer hypervisor, about 0.3 ms in all) and, if asked, compiles the vCPU
//! seccomp program. Once the VM's irqchip exists (a vCPU made before it would get no in-kernel
//! LAPIC), [`VcpuBuilder::create_vcpus`] lets it create the vCPUs with that CPUID and probe
//! which MSRs vCPU 0 can read (the list every later save reads), while the building thread
//! builds the devices; given a saved state's in-kernel part (a recovery), it then writes that
//! into them (`state::InKernelState`). [`VcpuBuilder::finish`] takes the result, or does in line
//! whatever the helper did not (no helper thread, or never asked to create the vCPUs).
//!
//! Nothing here runs a vCPU: the vCPU threads get their vCPUs from the building thread.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VmFd};

use crate::config::SeccompMode;
use crate::state::InKernelState;
use crate::vcpu::{supported_cpuid, VcpuManager};
use crate::vm::KvmCapabilities;
use crate::Error;

/// The vCPUs of a VM and the MSRs its saves read (see `state::supported_msr_indices`).
pub(crate) struct CreatedVcpus {
    pub(crate) vcpus: VcpuManager,
    pub(crate) msr_indices: Vec<u32>,
    /// How writing the saved in-kernel state into the new vCPUs went, if the helper was given
    /// one ([`VcpuBuilder::create_vcpus`]).
    pub(crate) restored: Option<Result<(), Error>>,
}

/// A saved state's in-kernel part, to write once the vCPUs exist.
pub(crate) struct RestoreRequest {
    pub(crate) state: InKernelState,
    pub(crate) capabilities: KvmCapabilities,
}

/// What the helper was asked to create: `count` vCPUs on `vm_fd`, then to write `restore`.
struct CreateRequest {
    vm_fd: Arc<VmFd>,
    count: u8,
    restore: Option<RestoreRequest>,
}

/// What the helper did: the CPUID, and the vCPUs if it was asked for them in time.
struct HelperOutcome {
    cpuid: Result<CpuId, Error>,
    vcpus: Option<Result<CreatedVcpus, Error>>,
}

/// The `vm-build` helper of one VM build. Dropped unfinished (the build failed), the helper
/// ends by itself.
pub(crate) struct VcpuBuilder {
    request: Option<Sender<CreateRequest>>,
    helper: Option<JoinHandle<HelperOutcome>>,
}

impl VcpuBuilder {
    /// Starts the helper: it compiles the vCPU seccomp program of `seccomp` (if no vCPU thread
    /// has yet: a process compiles each program once) so that vCPU threads started later only
    /// install it, fetches the supported CPUID, then waits for [`VcpuBuilder::create_vcpus`].
    pub(crate) fn start(seccomp: SeccompMode) -> VcpuBuilder {
        let (request, requested) = channel();
        let helper = std::thread::Builder::new()
            .name("vm-build".to_owned())
            .spawn(move || {
                // A failure is the vCPU thread's to report, when it installs the filter.
                let _ = crate::seccomp_filters::precompile_for_mode(
                    crate::seccomp_filters::ThreadKind::Vcpu,
                    seccomp,
                );
                build_vcpus(requested)
            })
            .ok();
        VcpuBuilder {
            request: Some(request),
            helper,
        }
    }

    /// Lets the helper create `count` vCPUs on `vm_fd`, whose irqchip exists now, and then
    /// write `restore` (a saved state's interrupt controllers and vCPUs, validated for `count`
    /// vCPUs) into them. [`VcpuBuilder::finish`] reports how that went in
    /// [`CreatedVcpus::restored`]; if the helper cannot (it failed to fetch the CPUID), nothing
    /// is written ahead and `restored` is `None`.
    pub(crate) fn create_vcpus(
        &mut self,
        vm_fd: &Arc<VmFd>,
        count: u8,
        restore: Option<RestoreRequest>,
    ) {
        if let Some(request) = self.request.take() {
            // A send fails only if the helper ended (it failed to fetch the CPUID): `finish`
            // then creates the vCPUs in line.
            let _ = request.send(CreateRequest {
                vm_fd: Arc::clone(vm_fd),
                count,
                restore,
            });
        }
    }

    /// The `count` vCPUs of `vm_fd`: the helper's, or created here (with the helper's CPUID if
    /// it has one, else with one fetched through `kvm` now). An error of the helper's creation
    /// is the one an in-line creation would have given.
    pub(crate) fn finish(
        mut self,
        kvm: &Kvm,
        vm_fd: &VmFd,
        count: u8,
    ) -> Result<CreatedVcpus, Error> {
        // Not asked for the vCPUs: without the sender its wait ends.
        drop(self.request.take());
        let outcome = self.helper.take().and_then(|helper| helper.join().ok());
        match outcome {
            Some(HelperOutcome {
                vcpus: Some(created),
                ..
            }) => created,
            Some(HelperOutcome {
                cpuid: Ok(cpuid), ..
            }) => create_vcpus(kvm, vm_fd, count, &cpuid),
            _ => create_vcpus(kvm, vm_fd, count, &supported_cpuid(kvm)?),
        }
    }
}

/// The helper's work: the CPUID, then the vCPUs once asked (through its own `/dev/kvm` fd:
/// the CPUID and the MSR list are the host's, the same through any fd).
fn build_vcpus(requested: Receiver<CreateRequest>) -> HelperOutcome {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(source) => {
            return HelperOutcome {
                cpuid: Err(Error::KvmOpen(source)),
                vcpus: None,
            }
        }
    };
    let cpuid = supported_cpuid(&kvm);
    let vcpus = match (&cpuid, requested.recv()) {
        (Ok(cpuid), Ok(request)) => Some(
            create_vcpus(&kvm, &request.vm_fd, request.count, cpuid).map(|mut created| {
                created.restored = request.restore.map(|restore| {
                    restore
                        .state
                        .restore(&request.vm_fd, &created.vcpus, restore.capabilities)
                });
                created
            }),
        ),
        _ => None,
    };
    HelperOutcome { cpuid, vcpus }
}

/// Creates the vCPUs with `cpuid` and probes vCPU 0's readable MSRs.
fn create_vcpus(kvm: &Kvm, vm_fd: &VmFd, count: u8, cpuid: &CpuId) -> Result<CreatedVcpus, Error> {
    let vcpus = VcpuManager::new(kvm, vm_fd, count, cpuid)?;
    let msr_indices = {
        let vcpu = vcpus.lock_vcpu(0);
        crate::state::supported_msr_indices(kvm, &vcpu)?
    };
    Ok(CreatedVcpus {
        vcpus,
        msr_indices,
        restored: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_with_irqchip(kvm: &Kvm) -> Arc<VmFd> {
        let vm_fd = Arc::new(kvm.create_vm().unwrap());
        vm_fd.create_irq_chip().unwrap();
        vm_fd
    }

    #[test]
    fn the_helper_creates_what_an_in_line_creation_creates() {
        let kvm = Kvm::new().unwrap();
        let vm_fd = vm_with_irqchip(&kvm);
        let mut builder = VcpuBuilder::start(SeccompMode::Disabled);
        builder.create_vcpus(&vm_fd, 2, None);
        let helped = builder.finish(&kvm, &vm_fd, 2).unwrap();
        assert_eq!(helped.vcpus.count(), 2);

        let other_vm = vm_with_irqchip(&kvm);
        let in_line = create_vcpus(&kvm, &other_vm, 2, &supported_cpuid(&kvm).unwrap()).unwrap();
        assert_eq!(helped.msr_indices, in_line.msr_indices);
        for index in 0..2 {
            let (helped, in_line) = (
                helped.vcpus.lock_vcpu(index),
                in_line.vcpus.lock_vcpu(index),
            );
            assert_eq!(helped.id, in_line.id);
            let cpuid = |vcpu: &crate::vcpu::Vcpu| {
                vcpu.fd
                    .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .unwrap()
                    .as_slice()
                    .iter()
                    .map(|e| (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx))
                    .collect::<Vec<_>>()
            };
            assert_eq!(cpuid(&helped), cpuid(&in_line), "vCPU {index}'s CPUID");
        }
    }

    /// A VM as the build has it when it asks for the vCPUs: irqchip and PIT created.
    fn vm_with_irqchip_and_pit(kvm: &Kvm) -> Arc<VmFd> {
        let vm_fd = vm_with_irqchip(kvm);
        vm_fd
            .create_pit2(kvm_bindings::kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .unwrap();
        vm_fd
    }

    /// A restorable state whose two vCPUs and PIT differ from a fresh VM's.
    fn distinct_state() -> crate::state::VmState {
        let mut state = crate::state::tests::sample_state(2);
        for (index, vcpu) in state.vcpus.iter_mut().enumerate() {
            vcpu.regs.rip += 0x100 * index as u64;
            vcpu.regs.rax = 0x1234_5678 + index as u64;
            vcpu.regs.rsp = 0x8000 + index as u64;
        }
        state.pit.channels[0].count = 0x1234;
        state.pit.channels[0].mode = 2;
        state
    }

    /// What a test reads back of a VM's in-kernel state: per vCPU its registers, special
    /// registers and mp_state, then the three interrupt controllers and the PIT's channel 0.
    fn read_back(vm_fd: &VmFd, vcpus: &VcpuManager) -> Vec<String> {
        let mut seen: Vec<String> = (0..vcpus.count())
            .map(|index| {
                let vcpu = vcpus.lock_vcpu(index);
                let sregs = vcpu.fd.get_sregs().unwrap();
                format!(
                    "{:?} cr0 {:#x} cr4 {:#x} efer {:#x} apic {:#x} {:?}",
                    vcpu.fd.get_regs().unwrap(),
                    sregs.cr0,
                    sregs.cr4,
                    sregs.efer,
                    sregs.apic_base,
                    vcpu.fd.get_mp_state().unwrap()
                )
            })
            .collect();
        for chip_id in [
            kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
            kvm_bindings::KVM_IRQCHIP_PIC_SLAVE,
            kvm_bindings::KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm_fd.get_irqchip(&mut chip).unwrap();
            // SAFETY: `chip.chip` is a union of plain integer arrays; its bytes are all defined.
            let mut bytes = unsafe { chip.chip.dummy };
            // The restored PIT runs: it may raise IRQ0 between the restore and this read in one
            // VM and not the other. The request bits of that line (the master PIC's `last_irr`
            // and `irr`, bytes 0 and 1; the IOAPIC's `irr`, bytes 16..20, pins 0 and 2) are
            // left out; everything else must match.
            match chip_id {
                kvm_bindings::KVM_IRQCHIP_PIC_MASTER => {
                    bytes[0] &= !1;
                    bytes[1] &= !1;
                }
                kvm_bindings::KVM_IRQCHIP_IOAPIC => bytes[16] &= !0b101,
                _ => {}
            }
            seen.push(format!("chip {chip_id}: {bytes:?}"));
        }
        let pit = vm_fd.get_pit2().unwrap();
        seen.push(format!(
            "pit count {:#x} mode {}",
            pit.channels[0].count, pit.channels[0].mode
        ));
        seen
    }

    /// Two vCPUs the helper created on a new VM with irqchip and PIT, and wrote `state` into.
    fn restored_by_the_helper(
        kvm: &Kvm,
        state: &crate::state::VmState,
    ) -> (Arc<VmFd>, KvmCapabilities, CreatedVcpus) {
        let vm = vm_with_irqchip_and_pit(kvm);
        let capabilities = KvmCapabilities::probe(kvm, &vm);
        let mut builder = VcpuBuilder::start(SeccompMode::Disabled);
        builder.create_vcpus(
            &vm,
            2,
            Some(RestoreRequest {
                state: InKernelState::of(state),
                capabilities,
            }),
        );
        let created = builder.finish(kvm, &vm, 2).unwrap();
        (vm, capabilities, created)
    }

    #[test]
    fn the_helper_writes_a_saved_state_into_its_vcpus_as_an_in_line_restore_does() {
        let kvm = Kvm::new().unwrap();
        let state = distinct_state();
        let (helped_vm, capabilities, helped) = restored_by_the_helper(&kvm, &state);
        helped
            .restored
            .expect("the helper wrote the state")
            .unwrap();

        let in_line_vm = vm_with_irqchip_and_pit(&kvm);
        let in_line = create_vcpus(&kvm, &in_line_vm, 2, &supported_cpuid(&kvm).unwrap()).unwrap();
        InKernelState::of(&state)
            .restore(&in_line_vm, &in_line.vcpus, capabilities)
            .unwrap();

        let helped = read_back(&helped_vm, &helped.vcpus);
        assert_eq!(helped, read_back(&in_line_vm, &in_line.vcpus));
        // And it is the state, not what a fresh VM has.
        let fresh_vm = vm_with_irqchip_and_pit(&kvm);
        let fresh = create_vcpus(&kvm, &fresh_vm, 2, &supported_cpuid(&kvm).unwrap()).unwrap();
        assert_ne!(helped, read_back(&fresh_vm, &fresh.vcpus));
        assert!(helped[1].contains("rip: 4198656"), "{}", helped[1]);
        let pit = helped.last().unwrap();
        assert!(pit.contains("count 0x1234"), "{pit}");
    }

    #[test]
    fn a_state_kvm_refuses_on_the_helper_gives_the_in_line_error() {
        let kvm = Kvm::new().unwrap();
        let mut state = distinct_state();
        // Valid as far as `VmState::validate` looks; KVM refuses to write the MSR.
        state.vcpus[1].msrs.push(crate::state::MsrValue {
            index: 0xdead_beef,
            data: 0,
        });
        let (_helped_vm, capabilities, helped) = restored_by_the_helper(&kvm, &state);
        let helped = helped.restored.unwrap().unwrap_err().to_string();

        let in_line_vm = vm_with_irqchip_and_pit(&kvm);
        let in_line = create_vcpus(&kvm, &in_line_vm, 2, &supported_cpuid(&kvm).unwrap()).unwrap();
        let in_line = InKernelState::of(&state)
            .restore(&in_line_vm, &in_line.vcpus, capabilities)
            .unwrap_err()
            .to_string();
        assert_eq!(helped, in_line);
        assert!(helped.contains("0xdeadbeef"), "{helped}");
    }

    #[test]
    fn a_builder_never_asked_creates_the_vcpus_in_line() {
        let kvm = Kvm::new().unwrap();
        let vm_fd = vm_with_irqchip(&kvm);
        let builder = VcpuBuilder::start(SeccompMode::Disabled);
        let created = builder.finish(&kvm, &vm_fd, 1).unwrap();
        assert_eq!(created.vcpus.count(), 1);
        assert!(!created.msr_indices.is_empty());
    }

    #[test]
    fn the_helpers_creation_error_is_the_in_line_one() {
        let kvm = Kvm::new().unwrap();
        let vm_fd = vm_with_irqchip(&kvm);
        let in_line = create_vcpus(&kvm, &vm_fd, 0, &supported_cpuid(&kvm).unwrap())
            .err()
            .unwrap()
            .to_string();
        let mut builder = VcpuBuilder::start(SeccompMode::Disabled);
        builder.create_vcpus(&vm_fd, 0, None);
        let helped = builder.finish(&kvm, &vm_fd, 0).err().unwrap().to_string();
        assert_eq!(helped, in_line);
    }

    #[test]
    fn a_helper_never_asked_for_vcpus_ends_once_its_builder_lets_go() {
        let (request, requested) = channel::<CreateRequest>();
        drop(request);
        let outcome = build_vcpus(requested);
        assert!(outcome.cpuid.is_ok());
        assert!(outcome.vcpus.is_none());
    }
}
