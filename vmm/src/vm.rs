//! One KVM virtual machine: its fd, memory slots, in-kernel interrupt controllers, vCPUs and
//! devices, and the transitions between created, running, paused and shut down.
//!
//! A `Vm` is built with its vCPU threads already spawned and parked. From there it either boots
//! (`boot`: load the kernel, program the boot vCPU, resume) or takes a saved state
//! (`restore_state` in state.rs, then `resume`), which is how a VM continues over memory that
//! outlived the previous VMM process.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::{SeccompMode, VmConfig};
use crate::device_manager::{DeviceManager, RestoreLayout};
use crate::event_monitor::{emit_vm, VmEvent};
use crate::events::VmEvents;
use crate::kvm_vm::{EarlyKvmVm, KvmVm, RegisteredKvmVm};
use crate::startup_phases::PhaseClock;
use crate::state::{InKernelRestoredAhead, InKernelState, VmState};
use crate::vcpu::{VcpuManager, VcpuThreads};
use crate::vcpu_builder::{CreatedVcpus, RestoreRequest, VcpuBuilder};
use crate::Error;

/// Addresses KVM needs for its real-mode emulation helpers on Intel hosts: three pages of TSS and
/// one identity-map page. They sit in the 32-bit device hole, below the virtio-mmio window's end
/// and clear of every device the platform contract places there.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The VM's lifecycle state, with upstream's names (`vm.info` reports them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRunState {
    Created,
    Running,
    Paused,
    Shutdown,
}

impl VmRunState {
    pub fn name(self) -> &'static str {
        match self {
            VmRunState::Created => "Created",
            VmRunState::Running => "Running",
            VmRunState::Paused => "Paused",
            VmRunState::Shutdown => "Shutdown",
        }
    }
}

/// Optional KVM features, asked for once per VM; state save/restore uses a part only when its
/// capability is present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmCapabilities {
    pub xsave: bool,
    /// Bytes of the vCPU xsave area (KVM_CAP_XSAVE2; the legacy 4 KiB when the host does not
    /// report more). Larger areas (AMX hosts) go through KVM_GET/SET_XSAVE2-sized buffers.
    pub xsave_size: usize,
    pub xcrs: bool,
    pub vcpu_events: bool,
    pub debug_regs: bool,
    pub adjust_clock: bool,
    /// Recorded for the docs and logs only: we never save nested state (this host reports 0).
    pub nested_state: bool,
}

impl KvmCapabilities {
    pub(crate) fn probe(kvm: &Kvm, vm_fd: &VmFd) -> KvmCapabilities {
        let legacy_xsave_size = std::mem::size_of::<kvm_bindings::kvm_xsave>();
        KvmCapabilities {
            xsave: kvm.check_extension(Cap::Xsave),
            xsave_size: usize::try_from(vm_fd.check_extension_int(Cap::Xsave2))
                .unwrap_or(0)
                .max(legacy_xsave_size),
            xcrs: kvm.check_extension(Cap::Xcrs),
            vcpu_events: kvm.check_extension(Cap::VcpuEvents),
            debug_regs: kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_DEBUGREGS)) > 0,
            adjust_clock: kvm.check_extension(Cap::AdjustClock),
            nested_state: kvm.check_extension_int(Cap::NestedState) > 0,
        }
    }
}

pub struct Vm {
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) vcpus: VcpuManager,
    pub(crate) devices: Arc<DeviceManager>,
    pub(crate) capabilities: KvmCapabilities,
    /// The MSRs saved and restored per vCPU: KVM's save list, minus those GET_MSRS refuses here.
    pub(crate) msr_indices: Vec<u32>,
    pub(crate) config: VmConfig,
    pub(crate) run_state: VmRunState,
    /// What the build wrote ahead of a recovery's saved state, for `restore_state`.
    pub(crate) in_kernel_restored_ahead: Option<InKernelRestoredAhead>,
    /// Last field: dropped after the vCPUs and the VM fd, so no guest access outlives the mapping.
    pub(crate) memory: GuestMemoryMmap,
}

fn kvm_error(operation: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { operation, source }
}

impl Vm {
    /// Creates the VM over `memory` with the devices and vCPUs `config` describes. The vCPU
    /// threads are spawned and parked (each under the vCPU seccomp filter of `seccomp`): next call
    /// `boot`, or `restore_state` then `resume`.
    pub fn new(
        config: &VmConfig,
        memory: GuestMemoryMmap,
        events: Arc<VmEvents>,
        seccomp: SeccompMode,
    ) -> Result<Vm, Error> {
        Self::new_restoring(config, &RestoreLayout::default(), memory, events, seccomp)
    }

    /// As [`Vm::new`] for a restore whose saved state carries the hotplugged devices
    /// `layout.hotplugged` (ids in `config`): they are not built from the config, `restore_state`
    /// puts them back where they were; the VM's config still lists them. The devices given at
    /// boot are built around the slots `layout.vacated` (removed ones) as when saved.
    pub fn new_restoring(
        config: &VmConfig,
        layout: &RestoreLayout,
        memory: GuestMemoryMmap,
        events: Arc<VmEvents>,
        seccomp: SeccompMode,
    ) -> Result<Vm, Error> {
        Self::new_timed(
            config,
            layout,
            memory,
            events,
            seccomp,
            &mut PhaseClock::new(),
        )
    }

    /// [`Vm::new_restoring`], closing one phase of `phases` per step (a recovery's breakdown).
    pub fn new_timed(
        config: &VmConfig,
        layout: &RestoreLayout,
        memory: GuestMemoryMmap,
        events: Arc<VmEvents>,
        seccomp: SeccompMode,
        phases: &mut PhaseClock,
    ) -> Result<Vm, Error> {
        let vcpu_builder = VcpuBuilder::start(seccomp);
        let kvm_vm = KvmVm::create()?;
        // Guest RAM first, on the VM nothing else has changed yet: measured here, the memory
        // slot's KVM SRCU grace period took about 0.5 ms on a fresh VM and about 8 ms right after
        // the irqchip's and PIT's bus registrations (`docs/recovery.md`).
        phases.mark("kvm-vm");
        // SAFETY: `memory` becomes the `Vm`'s last field, dropped after its vCPUs and VM fd.
        unsafe { kvm_vm.register_memory(&memory)? };
        phases.mark("memory-registration");
        Self::build_on(
            kvm_vm,
            vcpu_builder,
            None,
            config,
            layout,
            None,
            memory,
            events,
            seccomp,
            phases,
        )
    }

    /// As [`Vm::new_timed`] on a VM created, and given its RAM, by an [`EarlyKvmVm`] while the
    /// caller did other work; the phase `kvm-vm-memory` is the wait for it, if any.
    ///
    /// `restoring`: the saved state the caller will give [`Vm::restore_state`] next. Its
    /// interrupt controllers and vCPUs are then written as soon as the vCPUs exist, on the
    /// helper that created them, while this thread builds the devices (`state::InKernelState`);
    /// `restore_state` writes the rest and reports any error met there.
    #[allow(clippy::too_many_arguments)]
    pub fn new_on_early(
        early: EarlyKvmVm,
        config: &VmConfig,
        layout: &RestoreLayout,
        restoring: Option<&VmState>,
        events: Arc<VmEvents>,
        seccomp: SeccompMode,
        phases: &mut PhaseClock,
    ) -> Result<Vm, Error> {
        // The vCPU threads start now, while this thread would only wait for the `vm-create`
        // thread's memory registration (mostly the kernel's): their start and seccomp install
        // overlap it, and they take their vCPUs once those exist.
        let vcpu_threads =
            VcpuThreads::spawn(config.cpus.boot_vcpus, Arc::clone(&events), seccomp)?;
        let registered = early.finish()?;
        phases.mark("kvm-vm-memory");
        log::debug!(
            "KVM VM created in {} us and its RAM registered in {} us on the vm-create thread",
            registered.created_in.as_micros(),
            registered.registered_in.as_micros()
        );
        let RegisteredKvmVm {
            vm,
            memory,
            vcpu_builder,
            ..
        } = registered;
        Self::build_on(
            vm,
            vcpu_builder,
            Some(vcpu_threads),
            config,
            layout,
            restoring,
            memory,
            events,
            seccomp,
            phases,
        )
    }

    /// The rest of a VM on a KVM VM whose RAM `memory` is registered: irqchip and PIT, devices,
    /// vCPUs and their threads (`vcpu_threads` if they were started ahead, else started here and
    /// parked), and the in-kernel part of `restoring` written ahead (see [`Vm::new_on_early`]).
    #[allow(clippy::too_many_arguments)]
    fn build_on(
        kvm_vm: KvmVm,
        mut vcpu_builder: VcpuBuilder,
        vcpu_threads: Option<VcpuThreads>,
        config: &VmConfig,
        layout: &RestoreLayout,
        restoring: Option<&VmState>,
        memory: GuestMemoryMmap,
        events: Arc<VmEvents>,
        seccomp: SeccompMode,
        phases: &mut PhaseClock,
    ) -> Result<Vm, Error> {
        let KvmVm { kvm, vm_fd } = kvm_vm;
        let capabilities = KvmCapabilities::probe(&kvm, &vm_fd);
        log::debug!("KVM capabilities: {capabilities:?}");
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_error("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_error("KVM_SET_IDENTITY_MAP_ADDR"))?;
        // The irqchip must exist before any vCPU so each vCPU gets an in-kernel LAPIC.
        vm_fd
            .create_irq_chip()
            .map_err(kvm_error("KVM_CREATE_IRQCHIP"))?;
        let pit_config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd
            .create_pit2(pit_config)
            .map_err(kvm_error("KVM_CREATE_PIT2"))?;
        phases.mark("irqchip-pit");
        // The vCPUs need the irqchip (for their in-kernel LAPIC) and nothing of the devices: the
        // helper makes them while this thread builds the devices, and then writes the saved
        // interrupt controllers and vCPUs into them, in `restore_state`'s order. Only a state
        // that `restore_state` will accept: any other is refused there, with nothing written.
        let vcpu_count = config.cpus.boot_vcpus;
        let restoring = restoring.filter(|state| state.validate(usize::from(vcpu_count)).is_ok());
        let restore = restoring.map(|state| RestoreRequest {
            state: InKernelState::of(state),
            capabilities,
        });
        vcpu_builder.create_vcpus(&vm_fd, vcpu_count, restore);

        let cold_plugged = crate::device_manager::without_hotplugged(config, &layout.hotplugged);
        let devices = Arc::new(DeviceManager::new(
            &vm_fd,
            &cold_plugged,
            &layout.vacated,
            &events,
            &memory,
            seccomp,
        )?);
        devices.set_hotplugged_net_backings(config, &layout.hotplugged);
        // `vm.info` shows the ptys the devices opened, as upstream does.
        let mut config = config.clone();
        devices.record_pty_paths(&mut config);
        phases.mark("device-setup");
        let CreatedVcpus {
            mut vcpus,
            msr_indices,
            restored,
        } = vcpu_builder.finish(&kvm, &vm_fd, vcpu_count)?;
        let in_kernel_restored_ahead = restoring
            .zip(restored)
            .map(|(state, outcome)| InKernelRestoredAhead::new(state, outcome));
        phases.mark("vcpu-creation");
        match vcpu_threads {
            Some(threads) => vcpus.start_on(threads, devices.clone())?,
            None => vcpus.start_paused(devices.clone(), events.clone(), seccomp)?,
        }
        phases.mark("vcpu-threads-seccomp");

        Ok(Vm {
            vm_fd,
            memory,
            vcpus,
            devices,
            capabilities,
            msr_indices,
            config,
            run_state: VmRunState::Created,
            in_kernel_restored_ahead,
        })
    }

    pub fn run_state(&self) -> VmRunState {
        self.run_state
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Bytes of guest RAM actually mapped (`vm.info`'s `memory_actual_size`).
    pub fn memory_actual_size(&self) -> u64 {
        self.memory.iter().map(|region| region.len()).sum()
    }

    /// The devices the guest sees, with their resources (`vm.info`'s `device_tree`).
    pub fn device_resources(&self) -> Vec<crate::device_manager::DeviceResources> {
        self.devices.device_resources()
    }

    /// `vm.add-disk` on a running or paused VM: the disk hotplugged on a free PCI slot and
    /// announced to the guest; the VM's config lists it. Returns its id and address.
    pub fn add_disk(
        &mut self,
        disk: &crate::config::DiskConfig,
    ) -> Result<(crate::config::DiskConfig, devices::pci::PciBdf), Error> {
        let (disk, bdf) = self.devices.hotplug_disk(disk)?;
        self.config
            .disks
            .get_or_insert_with(Vec::new)
            .push(disk.clone());
        Ok((disk, bdf))
    }

    /// `vm.add-net`, as [`Vm::add_disk`].
    pub fn add_net(
        &mut self,
        net: &crate::config::NetConfig,
    ) -> Result<(crate::config::NetConfig, devices::pci::PciBdf), Error> {
        let (net, bdf) = self.devices.hotplug_net(net)?;
        self.config
            .net
            .get_or_insert_with(Vec::new)
            .push(net.clone());
        Ok((net, bdf))
    }

    /// The first step of a vhost-user `vm.add-disk` or `vm.add-net` (see
    /// `DeviceManager::prepare_vhost_user`): the device named, to connect off the control loop.
    pub fn prepare_vhost_user(
        &self,
        kind: &crate::device_manager::HotplugKind,
    ) -> Result<crate::device_manager::PendingVhostUser, Error> {
        self.devices.prepare_vhost_user(kind)
    }

    /// The last step: the device on its connected backend plugged, and in the VM's config.
    pub fn add_vhost_user(
        &mut self,
        pending: crate::device_manager::PendingVhostUser,
        backend: crate::device_manager::VhostUserBackend,
    ) -> Result<(crate::device_manager::HotplugKind, devices::pci::PciBdf), Error> {
        let (kind, bdf) = self.devices.plug_vhost_user(pending, backend)?;
        match &kind {
            crate::device_manager::HotplugKind::Disk(disk) => self
                .config
                .disks
                .get_or_insert_with(Vec::new)
                .push(disk.clone()),
            crate::device_manager::HotplugKind::Net(net) => self
                .config
                .net
                .get_or_insert_with(Vec::new)
                .push(net.clone()),
            crate::device_manager::HotplugKind::Fs(fs) => {
                self.config.fs.get_or_insert_with(Vec::new).push(fs.clone())
            }
        }
        Ok((kind, bdf))
    }

    /// `vm.add-fs`, as [`Vm::add_disk`].
    pub fn add_fs(
        &mut self,
        fs: &crate::config::FsConfig,
    ) -> Result<(crate::config::FsConfig, devices::pci::PciBdf), Error> {
        let (fs, bdf) = self.devices.hotplug_fs(fs)?;
        self.config.fs.get_or_insert_with(Vec::new).push(fs.clone());
        Ok((fs, bdf))
    }

    /// `vm.remove-device`: asks the guest to eject device `id`; it goes when the guest has.
    pub fn remove_device(&self, id: &str) -> Result<(), Error> {
        self.devices.unplug(id)
    }

    /// The devices the guest ejected since the last call, dropped from the VM's config now.
    pub fn take_ejected_devices(&mut self) -> Vec<String> {
        let ejected = self.devices.take_ejected_devices();
        if !ejected.is_empty() {
            remove_devices_from_config(&mut self.config, &ejected);
        }
        ejected
    }

    /// `vm.power-button`: an ACPI power button press through the GED.
    pub fn power_button(&self) -> Result<(), Error> {
        self.devices.power_button()
    }

    /// Per-device I/O counters (`vm.counters`): device id -> counter name -> value.
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.devices.counters()
    }

    pub fn capabilities(&self) -> KvmCapabilities {
        self.capabilities
    }

    /// Loads the kernel with the command line (plus the virtio-mmio announcements), programs the
    /// boot vCPU and starts running. The other vCPUs wait for the guest's INIT/SIPI.
    pub fn boot(&mut self) -> Result<(), Error> {
        self.expect_state(VmRunState::Created)?;
        emit_vm(VmEvent::Booting);
        let kernel_path = self
            .config
            .payload
            .kernel
            .as_deref()
            .ok_or(Error::NoKernel)?;
        let mut kernel = File::open(kernel_path).map_err(|source| Error::KernelOpen {
            path: PathBuf::from(kernel_path),
            source,
        })?;
        let mut initramfs = match self.config.payload.initramfs.as_deref() {
            Some(path) => Some(File::open(path).map_err(|source| Error::InitramfsOpen {
                path: PathBuf::from(path),
                source,
            })?),
            None => None,
        };
        let cmdline = self.kernel_cmdline();
        let rsdp = self.write_acpi_tables()?;
        let entry = arch::load_kernel(
            &self.memory,
            &mut kernel,
            &cmdline,
            initramfs.as_mut(),
            Some(rsdp),
        )
        .map_err(|source| Error::KernelLoad {
            path: PathBuf::from(kernel_path),
            source,
        })?;
        log::info!(
            "kernel {kernel_path} loaded: {:?} entry at {:#x}",
            entry.protocol,
            entry.entry.0
        );
        for index in 0..self.vcpus.count() {
            crate::boot_cpu::wire_local_interrupt_pins(&self.vcpus.lock_vcpu(index))?;
        }
        crate::boot_cpu::program_boot_vcpu(&self.vcpus.lock_vcpu(0), &self.memory, &entry)?;
        self.devices.register_ioeventfds();
        self.vcpus.resume();
        self.run_state = VmRunState::Running;
        emit_vm(VmEvent::Booted);
        Ok(())
    }

    /// Writes the ACPI tables for this VM's vCPUs and RAM (cold boot only: a restored or
    /// recovered guest keeps the tables its memory holds) and returns the RSDP's address.
    fn write_acpi_tables(&self) -> Result<GuestAddress, Error> {
        let vcpus = u32::try_from(self.vcpus.count()).unwrap_or(u32::MAX);
        let platform = arch::acpi::PlatformDescription::new(vcpus, self.memory_actual_size());
        let tables = arch::acpi::AcpiTables::build(&platform).map_err(Error::AcpiTables)?;
        tables.write_to(&self.memory).map_err(Error::AcpiTables)?;
        Ok(tables.rsdp_addr())
    }

    /// The command line the guest gets: the configured one, then one `virtio_mmio.device=` token
    /// per virtio-mmio device (as Linux expects them without ACPI or a device tree).
    pub fn kernel_cmdline(&self) -> String {
        let mut cmdline = self.config.payload.cmdline.clone().unwrap_or_default();
        for token in self.devices.cmdline_tokens() {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(token);
        }
        cmdline
    }

    /// Refuses an operation that `state` alone allows (upstream's invalid transition).
    pub(crate) fn expect_state(&self, state: VmRunState) -> Result<(), Error> {
        if self.run_state != state {
            return Err(Error::InvalidVmState(self.run_state.name()));
        }
        Ok(())
    }

    /// Stops every vCPU outside KVM_RUN, then waits for the disks to finish the requests their
    /// I/O threads took. The one pause path: `vm.pause`, snapshots and the NV save (which times
    /// the two halves as separate phases) all go through [`Vm::pause_vcpus`] and
    /// [`Vm::pause_devices`].
    pub fn pause(&mut self) -> Result<(), Error> {
        self.pause_vcpus()?;
        self.pause_devices()
    }

    /// The first half of [`Vm::pause`]: parks every vCPU and tells a kvmclock guest it was
    /// stopped (KVM_KVMCLOCK_CTRL, so its watchdogs do not fire on resume). A few ioctls per
    /// vCPU and non-blocking events: fit for a power-fail deadline.
    pub fn pause_vcpus(&mut self) -> Result<(), Error> {
        self.park_vcpus()?;
        self.vcpus.notify_guest_clock_paused();
        Ok(())
    }

    /// [`Vm::pause_vcpus`] for an NV checkpoint's pause, well under a millisecond: the guest is
    /// not told that its clock stopped (KVMCLOCK_CTRL, one vCPU ioctl each, about 15 us on this
    /// host, most of it the `vcpu_load` every vCPU ioctl pays). That notice keeps a guest's
    /// soft-lockup and RCU-stall watchdogs quiet after a long stop; they count in seconds.
    pub fn pause_vcpus_briefly(&mut self) -> Result<(), Error> {
        self.park_vcpus()
    }

    fn park_vcpus(&mut self) -> Result<(), Error> {
        self.expect_state(VmRunState::Running)?;
        emit_vm(VmEvent::Pausing);
        self.vcpus.pause()?;
        // The vCPUs are parked from here on: even if a disk fails to pause, `resume` must be able
        // to start them again.
        self.run_state = VmRunState::Paused;
        Ok(())
    }

    /// The second half of [`Vm::pause`], after the vCPUs (so no new request is posted while the
    /// disks drain theirs): waits for every request the disks' I/O threads have popped, so none
    /// is half done when the state is read.
    pub fn pause_devices(&mut self) -> Result<(), Error> {
        self.expect_state(VmRunState::Paused)?;
        self.devices.pause()?;
        emit_vm(VmEvent::Paused);
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), Error> {
        self.resume_timed(&mut PhaseClock::new())
    }

    /// [`Vm::resume`], closing the phase `resume` of `phases` when the guest runs (before the
    /// held-back ioeventfds are registered).
    pub fn resume_timed(&mut self, phases: &mut PhaseClock) -> Result<(), Error> {
        // A freshly built VM that took a saved state is `Paused` (see `restore_state`); a
        // `Created` one has no registers worth running and must `boot`.
        self.expect_state(VmRunState::Paused)?;
        emit_vm(VmEvent::Resuming);
        self.devices.resume()?;
        self.vcpus.resume();
        self.run_state = VmRunState::Running;
        emit_vm(VmEvent::Resumed);
        phases.mark("resume");
        // A VM built and restored in this process gets its PCI ioeventfds only now, with the
        // guest already running: every KVM_IOEVENTFD change waits for a KVM SRCU grace period,
        // and until then a queue notify reaches its device as a BAR write. After a plain pause
        // there is nothing left to register.
        self.devices.register_ioeventfds();
        Ok(())
    }

    /// Activates the virtio devices whose driver set DRIVER_OK since the last call. A vCPU only
    /// records the request and signals `VmEvents::device_activation`; whoever owns the VM calls
    /// this on its own thread when that EventFd is readable (the control loop does), so device
    /// threads are never started by a vCPU.
    pub fn activate_pending_devices(&self) {
        self.devices.activate_pending();
    }

    /// Makes every completed disk write durable (the power-fail path calls this while paused).
    pub fn flush_disks(&self) -> Result<(), Error> {
        self.devices.flush_disks()
    }

    /// Stops the vCPU threads for good. Guest memory stays mapped until the `Vm` is dropped.
    pub fn shutdown(&mut self) {
        self.vcpus.stop();
        self.devices.shutdown();
        self.run_state = VmRunState::Shutdown;
        emit_vm(VmEvent::Shutdown);
    }
}

/// Drops the disks and nets named `ids` from `config` (devices the guest ejected).
pub fn remove_devices_from_config(config: &mut VmConfig, ids: &[String]) {
    let keep = |id: &Option<String>| !id.as_ref().is_some_and(|id| ids.contains(id));
    if let Some(disks) = config.disks.as_mut() {
        disks.retain(|disk| keep(&disk.id));
    }
    if let Some(nets) = config.net.as_mut() {
        nets.retain(|net| keep(&net.id));
    }
    if let Some(fs) = config.fs.as_mut() {
        fs.retain(|fs| keep(&fs.id));
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.run_state != VmRunState::Shutdown {
            self.shutdown();
        }
    }
}
