//! The [`NvHost`] the coordinator saves a [`Vm`] through. Pausing goes through `Vm`'s one pause
//! path ([`Vm::pause_vcpus`], [`Vm::pause_devices`]), timed by the coordinator as two phases;
//! undoing a failed save is [`Vm::resume`], called by the coordinator (its undo rule).

use nv_extension::{HostError, NvHost};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, VolatileSlice};

use crate::vm::{Vm, VmRunState};

/// How the save may reach the VM.
pub(super) enum VmHost<'a> {
    /// This thread may change the VM: a running one is paused by the save (and resumed if the
    /// save fails); one paused by `vm.pause` stays as it is, its vCPUs and disks quiet already.
    Exclusive { vm: &'a mut Vm, was_running: bool },
    /// The VM is paused and another thread reads it too (a `vm.snapshot` worker): every phase
    /// only reads it, so the power-fail save never waits for that thread.
    Shared(&'a Vm),
}

impl<'a> VmHost<'a> {
    pub(super) fn exclusive(vm: &'a mut Vm) -> VmHost<'a> {
        let was_running = vm.run_state == VmRunState::Running;
        VmHost::Exclusive { vm, was_running }
    }

    fn vm(&self) -> &Vm {
        match self {
            VmHost::Exclusive { vm, .. } => vm,
            VmHost::Shared(vm) => vm,
        }
    }

    /// The VM, if the save paused it (so it must undo that).
    fn paused_by_the_save(&mut self) -> Option<&mut Vm> {
        match self {
            VmHost::Exclusive {
                vm,
                was_running: true,
            } => Some(vm),
            _ => None,
        }
    }
}

impl VmHost<'_> {
    /// [`NvHost::pause_vcpus`] for a checkpoint ([`Vm::pause_vcpus_briefly`]).
    pub(super) fn pause_vcpus_briefly(&mut self) -> Result<(), HostError> {
        if let Some(vm) = self.paused_by_the_save() {
            vm.pause_vcpus_briefly()?;
        }
        Ok(())
    }
}

impl NvHost for VmHost<'_> {
    fn pause_vcpus(&mut self) -> Result<(), HostError> {
        if let Some(vm) = self.paused_by_the_save() {
            vm.pause_vcpus()?;
        }
        Ok(())
    }

    fn quiesce_devices(&mut self) -> Result<(), HostError> {
        if let Some(vm) = self.paused_by_the_save() {
            vm.pause_devices()?;
        }
        // Paused before the save or just now: the disks took no request since and finished
        // those they had; make what they wrote durable.
        self.vm().flush_disks()?;
        Ok(())
    }

    fn guest_memory_ranges(&self) -> Vec<VolatileSlice<'_>> {
        self.vm()
            .memory
            .iter()
            .filter_map(|region| region.as_volatile_slice().ok())
            .collect()
    }

    fn save_state(&mut self) -> Result<Vec<u8>, HostError> {
        let state = self.vm().save_state()?;
        Ok(serde_json::to_vec(&state)?)
    }

    fn resume(&mut self) -> Result<(), HostError> {
        match self.paused_by_the_save() {
            // Parked vCPUs make the VM `Paused` even if its disks failed to pause.
            Some(vm) if vm.run_state == VmRunState::Paused => Ok(vm.resume()?),
            _ => Ok(()),
        }
    }
}
