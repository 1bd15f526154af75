//! The KVM side of a VM before its irqchip, devices and vCPUs: `/dev/kvm` opened and checked,
//! `KVM_CREATE_VM`, guest RAM registered as memory slots.
//!
//! An NV recovery builds this on a thread of its own ([`EarlyKvmVm`]), started first thing in
//! `main`: that thread opens the region and maps the VM's RAM from its directory
//! (`recovery_ahead`), creates the VM and registers the RAM (mostly a wait for a KVM SRCU grace
//! period) while the command line is parsed, the VMM sets itself up and the building thread
//! claims the VM and parses the stored config and the saved state. Nothing here can run the
//! guest: the vCPUs are created (by the `vm-build` helper this thread starts right after the
//! VM, `vcpu_builder.rs`) only when the building thread asks for them, after the claim, and
//! registering a slot reads no guest memory.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::{SeccompMode, VmConfig};
use crate::vcpu_builder::VcpuBuilder;
use crate::Error;

fn kvm_error(operation: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { operation, source }
}

/// A created KVM VM.
pub(crate) struct KvmVm {
    pub(crate) kvm: Kvm,
    pub(crate) vm_fd: Arc<VmFd>,
}

impl KvmVm {
    /// Opens `/dev/kvm`, checks what the VMM relies on and creates the VM.
    pub(crate) fn create() -> Result<KvmVm, Error> {
        let kvm = Kvm::new().map_err(Error::KvmOpen)?;
        let api_version = kvm.get_api_version();
        if api_version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(Error::KvmApiVersion(api_version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::KvmCapabilityMissing(name));
            }
        }
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_error("KVM_CREATE_VM"))?);
        Ok(KvmVm { kvm, vm_fd })
    }

    /// Gives KVM one memory slot per guest RAM mapping.
    ///
    /// # Safety
    /// `memory`'s mappings must outlive every vCPU of this VM that could access them: the
    /// caller keeps `memory` (or a clone of it, which shares the mappings) until the vCPUs are
    /// stopped and the VM fd is closed.
    pub(crate) unsafe fn register_memory(&self, memory: &GuestMemoryMmap) -> Result<(), Error> {
        let max_slots = self.kvm.get_nr_memslots();
        if memory.num_regions() > max_slots {
            return Err(Error::MemoryLayout(format!(
                "{} RAM mappings exceed KVM's {max_slots} memory slots",
                memory.num_regions()
            )));
        }
        for (slot, region) in memory.iter().enumerate() {
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the slot covers exactly one live mapping of `memory`, which the caller
            // keeps alive for as long as the VM's vCPUs (this function's contract).
            unsafe { self.vm_fd.set_user_memory_region(slot_region) }
                .map_err(kvm_error("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }
}

/// A [`KvmVm`] with the guest RAM registered, and how long its two steps took on their thread.
pub(crate) struct RegisteredKvmVm {
    /// First field: the VM fd is closed before the mappings go (tuple and struct fields drop
    /// in order), on every path, also when the building thread gave up on it.
    pub(crate) vm: KvmVm,
    /// The mappings the slots point at (a clone of the guest memory: it shares them).
    pub(crate) memory: GuestMemoryMmap,
    /// The helper that makes the vCPUs, started right after the VM.
    pub(crate) vcpu_builder: VcpuBuilder,
    pub(crate) created_in: Duration,
    pub(crate) registered_in: Duration,
}

/// A [`KvmVm`] being created on a thread of its own, which registers the guest RAM once
/// [`EarlyKvmVm::register`] hands it over. Dropped unfinished (the recovery failed before it
/// needed the VM), the thread ends by itself and the VM is destroyed.
pub struct EarlyKvmVm {
    memory: Sender<GuestMemoryMmap>,
    /// The thread's result, sent as soon as it has one: the building thread goes on without
    /// waiting for the thread to exit (a join waited for its exit and the wake-up after it).
    built: Receiver<Result<RegisteredKvmVm, Error>>,
}

impl std::fmt::Debug for EarlyKvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EarlyKvmVm").finish_non_exhaustive()
    }
}

impl EarlyKvmVm {
    /// Starts creating the VM now.
    pub fn start(seccomp: SeccompMode) -> Result<EarlyKvmVm, Error> {
        Self::start_after(seccomp, || None)
    }

    /// Starts the VM's thread now; it runs `first` before it creates the VM. The guest RAM
    /// `first` returns, if any, is registered as if handed over by [`EarlyKvmVm::register`]
    /// (which is then not needed); without it the thread waits for that hand-over. `first`
    /// must not run the guest or read its memory (this thread runs before the claim).
    pub(crate) fn start_after(
        seccomp: SeccompMode,
        first: impl FnOnce() -> Option<GuestMemoryMmap> + Send + 'static,
    ) -> Result<EarlyKvmVm, Error> {
        let (memory, handed_over) = channel::<GuestMemoryMmap>();
        let (done, built) = channel::<Result<RegisteredKvmVm, Error>>();
        std::thread::Builder::new()
            .name("vm-create".to_owned())
            .spawn(move || {
                // The receiver is gone only if the recovery gave up: the VM goes with this.
                let _ = done.send(Self::create_and_register(seccomp, first, handed_over));
            })
            .map_err(|source| Error::ThreadSpawn {
                thread: "vm-create".to_owned(),
                source,
            })?;
        Ok(EarlyKvmVm { memory, built })
    }

    /// The `vm-create` thread's work: `first`, the VM, its memory registered, the helper that
    /// makes the vCPUs started.
    fn create_and_register(
        seccomp: SeccompMode,
        first: impl FnOnce() -> Option<GuestMemoryMmap>,
        handed_over: Receiver<GuestMemoryMmap>,
    ) -> Result<RegisteredKvmVm, Error> {
        let given_first = first();
        let began = Instant::now();
        let vm = KvmVm::create()?;
        // The helper that makes the vCPUs starts now: its CPUID fetch (about 0.3 ms of CPU
        // here) runs while this thread registers the RAM and the building thread claims the
        // VM and parses its state, instead of after the registration, where it held up the
        // building thread (`docs/performance.md`, floor4b). The region was opened before the
        // VM (`first`), so the helper no longer competes with that.
        let vcpu_builder = VcpuBuilder::start(seccomp);
        let created_in = began.elapsed();
        // No memory: the building thread gave up (its error is the one reported).
        let memory = match given_first {
            Some(memory) => memory,
            None => handed_over
                .recv()
                .map_err(|_| Error::MemoryLayout("no guest memory was handed over".into()))?,
        };
        let registering = Instant::now();
        // SAFETY: `memory` travels with the VM in `RegisteredKvmVm` (and is dropped
        // after it); the `Vm` built from it keeps its own clone as its last field.
        unsafe { vm.register_memory(&memory)? };
        let registered_in = registering.elapsed();
        Ok(RegisteredKvmVm {
            vm,
            memory,
            vcpu_builder,
            created_in,
            registered_in,
        })
    }

    /// Starts creating the VM now if `config` is an NV in-place recovery (`recover=on`), so the
    /// VM is made while the VMM sets itself up; `None` for anything else, or if the thread
    /// cannot start (the recovery then starts one itself, and reports the error if that fails).
    pub fn start_for(config: &VmConfig, seccomp: SeccompMode) -> Option<EarlyKvmVm> {
        let nv = config.nv.as_ref()?;
        if !nv.recover || nv.swap_in.is_some() {
            return None;
        }
        EarlyKvmVm::start(seccomp).ok()
    }

    /// Hands the guest RAM to the thread, which registers it once the VM exists.
    pub fn register(&self, memory: &GuestMemoryMmap) {
        // A send fails only if the thread ended already (failed to create the VM): `finish`
        // reports that.
        let _ = self.memory.send(memory.clone());
    }

    /// Waits for the VM with its memory registered.
    pub(crate) fn finish(self) -> Result<RegisteredKvmVm, Error> {
        drop(self.memory);
        // No result: the thread ended without sending one, i.e. it panicked.
        self.built.recv().map_err(|_| Error::ThreadSpawn {
            thread: "vm-create".to_owned(),
            source: std::io::Error::other("the thread panicked"),
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    #[test]
    fn the_early_vm_registers_the_very_mappings_it_was_given() {
        let memory = memory();
        let early = EarlyKvmVm::start(SeccompMode::Disabled).unwrap();
        early.register(&memory);
        let registered = early.finish().unwrap();
        let given: Vec<_> = memory
            .iter()
            .map(|r| (r.start_addr(), r.as_ptr(), r.len()))
            .collect();
        let kept: Vec<_> = registered
            .memory
            .iter()
            .map(|r| (r.start_addr(), r.as_ptr(), r.len()))
            .collect();
        assert_eq!(given, kept);
        // The slot is in: KVM refuses a second slot 0 over a different range of the same
        // guest addresses (EEXIST for an overlap), which it would accept on an empty VM.
        let overlapping = kvm_userspace_memory_region {
            slot: 1,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            userspace_addr: memory.iter().next().unwrap().as_ptr() as u64,
        };
        // SAFETY: refused by KVM (overlap); even if accepted it points into `memory`, alive
        // until after the VM fd is closed at the end of this test.
        let refused = unsafe { registered.vm.vm_fd.set_user_memory_region(overlapping) };
        assert_eq!(refused.unwrap_err().errno(), libc::EEXIST);
        // And the helper that makes the vCPUs came along.
        let created = registered
            .vcpu_builder
            .finish(&registered.vm.kvm, &registered.vm.vm_fd, 1)
            .unwrap();
        assert_eq!(created.vcpus.count(), 1);
    }

    #[test]
    fn memory_its_first_step_returns_is_registered_without_a_hand_over() {
        let memory = memory();
        let mapped = memory.clone();
        let early = EarlyKvmVm::start_after(SeccompMode::Disabled, move || Some(mapped)).unwrap();
        let registered = early.finish().unwrap();
        let start = registered.memory.iter().next().unwrap().as_ptr();
        assert_eq!(start, memory.iter().next().unwrap().as_ptr());
        let overlapping = kvm_userspace_memory_region {
            slot: 1,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            userspace_addr: start as u64,
        };
        // SAFETY: refused by KVM (overlap with the registered slot); even if accepted it points
        // into `memory`, alive until after the VM fd is closed at the end of this test.
        let refused = unsafe { registered.vm.vm_fd.set_user_memory_region(overlapping) };
        assert_eq!(refused.unwrap_err().errno(), libc::EEXIST);
    }

    #[test]
    fn a_thread_that_panicked_is_reported_not_waited_for() {
        let early =
            EarlyKvmVm::start_after(SeccompMode::Disabled, || panic!("the first step failed"))
                .unwrap();
        let Err(error) = early.finish() else {
            panic!("a VM whose thread panicked was reported as built");
        };
        assert!(error.to_string().contains("vm-create"), "{error}");
    }

    #[test]
    fn an_early_vm_given_no_memory_ends_with_an_error_not_a_hang() {
        let early = EarlyKvmVm::start(SeccompMode::Disabled).unwrap();
        let Err(error) = early.finish() else {
            panic!("a VM without memory was reported as built");
        };
        assert!(error.to_string().contains("no guest memory"), "{error}");
    }
}
