//! A VM's vCPUs made on a helper thread (`vm-build`) while the building thread makes its
//! devices.
//!
//! The helper starts before the VM needs it and first does what needs no VM: it fetches the
//! host's supported CPUID (a system ioctl; on this nested host every `cpuid` the kernel runs
//! for it traps to the outer hypervisor, about 0.3 ms in all) and, if asked, compiles the vCPU
//! seccomp program. Once the VM's irqchip exists (a vCPU made before it would get no in-kernel
//! LAPIC), [`VcpuBuilder::create_vcpus`] lets it create the vCPUs with that CPUID and probe
//! which MSRs vCPU 0 can read (the list every later save reads), while the building thread
//! builds the devices. [`VcpuBuilder::finish`] takes the result, or does in line whatever the
//! helper did not (no helper thread, or never asked to create the vCPUs).
//!
//! Nothing here runs a vCPU: the vCPU threads get their vCPUs from the building thread.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VmFd};

use crate::config::SeccompMode;
use crate::vcpu::{supported_cpuid, VcpuManager};
use crate::Error;

/// The vCPUs of a VM and the MSRs its saves read (see `state::supported_msr_indices`).
pub(crate) struct CreatedVcpus {
    pub(crate) vcpus: VcpuManager,
    pub(crate) msr_indices: Vec<u32>,
}

/// What the helper was asked to create: `count` vCPUs on `vm_fd`.
struct CreateRequest {
    vm_fd: Arc<VmFd>,
    count: u8,
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

    /// Lets the helper create `count` vCPUs on `vm_fd`, whose irqchip exists now.
    pub(crate) fn create_vcpus(&mut self, vm_fd: &Arc<VmFd>, count: u8) {
        if let Some(request) = self.request.take() {
            // A send fails only if the helper ended (it failed to fetch the CPUID): `finish`
            // then creates the vCPUs in line.
            let _ = request.send(CreateRequest {
                vm_fd: Arc::clone(vm_fd),
                count,
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
        (Ok(cpuid), Ok(request)) => Some(create_vcpus(&kvm, &request.vm_fd, request.count, cpuid)),
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
    Ok(CreatedVcpus { vcpus, msr_indices })
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
        builder.create_vcpus(&vm_fd, 2);
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
        builder.create_vcpus(&vm_fd, 0);
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
