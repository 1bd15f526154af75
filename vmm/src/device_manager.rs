//! Builds the VM's devices from its config and wires them to KVM: COM1 on the port-I/O bus with an
//! irqfd on IRQ 4 (its output to a file, the terminal or a pty, its input from the pty), the i8042
//! reset line, the ACPI shutdown/reset port, the ACPI GED (power button) page with an irqfd on
//! GSI 3, the pvpanic port, PCI segment 0 (`pci_segment`: host bridge, 0xCF8/0xCFC, ECAM, BARs,
//! MSI-X on KVM GSI routes), and virtio-blk disks: on virtio-pci by default (a function on the
//! segment, MSI-X vectors through KVM, ioeventfd per queue notify address), or with
//! `transport=mmio` on virtio-mmio at the platform contract's addresses and GSIs (irqfd per GSI,
//! ioeventfd per queue notify). vCPU threads reach the devices
//! through the `IoHandler` this module implements. A vCPU never activates a device: the guest's
//! DRIVER_OK write leaves the activation pending and wakes the control loop
//! (`VmEvents::device_activation`), which calls `activate_pending`; device threads are started
//! there and confined with the `BlockIo` filter first thing (`device_thread_start_hook`).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

mod console_rng;
mod fs_backend_state;
mod hotplug;

pub use hotplug::{
    without_hotplugged, HotplugDeviceState, HotplugKind, HotplugState, PendingVhostUser,
    RestoreLayout, VacatedBar, VacatedSlot, VhostUserBackend, HOTPLUG_STATE_VERSION,
};

use devices::console_io::{Pty, SerialInput};
use devices::pci::PciBdf;
use devices::virtio::{
    kernel_cmdline_token, msix_vector_count, virtio_mmio_slot, Block, GuestWriteGateSlot,
    IoThreadStartHook, MmioTransport, MmioTransportState, Net, NetParams, OutputHold, Tap,
    VhostUserBlkLink, VhostUserFsLink, VhostUserNetLink, VhostUserNetParams, VirtioDevice,
    VirtioPciDevice, VirtioPciState, VirtioTransport, VIRTIO_MMIO_SIZE,
};
use devices::{
    AcpiShutdownDevice, Bus, EventFdInterrupt, GedDevice, GedState, I8042Device, PvPanicDevice,
    PvPanicEvent, SerialDevice, SerialState,
};
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{SeccompMode, VirtioTransportKind, VmConfig};
use crate::events::VmEvents;
use crate::pci_segment::{KvmMsiInterrupts, PciSegment, PciSegmentState};
use crate::seccomp_filters::{device_thread_start_hook, thread_start_hook, ThreadKind};
use crate::vcpu::IoHandler;
use crate::Error;

/// Where the guest's serial output goes. Shared by every incarnation of the UART (a restore
/// rebuilds the device from saved registers but keeps writing to the same output).
#[derive(Clone)]
struct SerialOutput(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .flush()
    }
}

/// COM1 and what it needs to be rebuilt from saved state.
struct Com1 {
    device: Arc<Mutex<SerialDevice>>,
    interrupt: Arc<EventFdInterrupt>,
    output: SerialOutput,
    /// With `--serial pty`: the input thread's wake-up when the guest empties the receive FIFO;
    /// a restored UART gets a clone.
    rx_space: Option<EventFd>,
    /// Declared before `pty`: the input thread stops before the terminal closes.
    _input: Option<SerialInput>,
    pty: Option<Pty>,
}

/// Offset of the QueueNotify register in a virtio-mmio window (virtio 1.x, 4.2.2).
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

/// One device and what it occupies in the guest's address spaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceResources {
    pub id: String,
    /// I/O port range: base, length.
    pub pio: Option<(u64, u64)>,
    /// MMIO range: base, length.
    pub mmio: Option<(u64, u64)>,
    /// Its interrupt line (GSI); `None` for a PCI device (MSI-X).
    pub irq: Option<u32>,
    /// Where a PCI device sits (`vm.info`'s `pci_bdf`) and its mapped BARs.
    pub pci: Option<(devices::pci::PciBdf, Vec<devices::pci::Bar>)>,
    /// A virtio device on a virtio-pci function: `vm.info` lists the function as its parent
    /// node `_virtio-pci-<id>` (holding `pci` and the BARs), as upstream does.
    pub virtio_pci: bool,
}

/// A PCI device: its BDF and BARs, no interrupt line (MSI-X).
impl From<crate::pci_segment::PciDeviceInfo> for DeviceResources {
    fn from(device: crate::pci_segment::PciDeviceInfo) -> Self {
        DeviceResources {
            id: device.id,
            pio: None,
            mmio: None,
            irq: None,
            pci: Some((device.bdf, device.bars)),
            virtio_pci: false,
        }
    }
}

/// Where a disk's virtio transport is and what it was wired with.
/// A virtio-pci function on segment 0: the function, its address and its MSI-X vectors.
type PciFunction = (Arc<Mutex<VirtioPciDevice>>, PciBdf, Arc<KvmMsiInterrupts>);

enum DiskTransport {
    /// A function on PCI segment 0 with its MSI-X vectors in KVM.
    Pci {
        device: Arc<Mutex<VirtioPciDevice>>,
        bdf: PciBdf,
        msi: Arc<KvmMsiInterrupts>,
    },
    /// A virtio-mmio slot: its register window's base and its GSI line.
    Mmio {
        transport: Arc<Mutex<MmioTransport>>,
        interrupt: Arc<EventFdInterrupt>,
        base: u64,
        gsi: u32,
    },
}

/// One virtio-blk disk.
struct VirtioBlockSlot {
    transport: DiskTransport,
    /// The disk's `id=`, or upstream's default `_disk<N>`: the key of its counters.
    id: String,
    /// What the disk was opened from, to open it again when restoring.
    path: PathBuf,
    readonly: bool,
    /// A vhost-user disk (`path` is then its socket): an inactive device on the session with the
    /// backend, what a restore rebuilds the transport around.
    vhost_user: Option<VhostUserBlkLink>,
    /// What an in-process disk asks before each write (NV checkpoints' disk undo); `None` for
    /// a vhost-user disk, whose writes the VMM never sees.
    write_hook: Option<devices::virtio::BlockWriteHookSlot>,
}

fn lock_or_recover<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl VirtioBlockSlot {
    /// Runs `step` on the disk's transport, whichever it is.
    fn with_transport<R>(&self, step: impl FnOnce(&mut dyn VirtioTransport) -> R) -> R {
        self.transport.with(step)
    }
}

impl DiskTransport {
    /// Runs `step` on the transport, whichever it is.
    fn with<R>(&self, step: impl FnOnce(&mut dyn VirtioTransport) -> R) -> R {
        match self {
            DiskTransport::Pci { device, .. } => step(&mut *lock_or_recover(device)),
            DiskTransport::Mmio { transport, .. } => step(&mut *lock_or_recover(transport)),
        }
    }

    /// The transport's saved state: (virtio-mmio, virtio-pci), one of them set.
    fn save(&self) -> devices::Result<(Option<MmioTransportState>, Option<VirtioPciState>)> {
        Ok(match self {
            DiskTransport::Pci { device, .. } => (None, Some(lock_or_recover(device).state()?)),
            DiskTransport::Mmio { transport, .. } => {
                (Some(lock_or_recover(transport).state()?), None)
            }
        })
    }
}

/// One virtio-net device and what is behind it.
struct VirtioNetSlot {
    transport: DiskTransport,
    /// `id=`, or upstream's default `_net<N>`.
    id: String,
    backend: NetBackend,
    config: crate::config::NetConfig,
}

/// What a virtio-net device's packets go through; shared with the device, so a restore
/// rebuilds the device on the same tap descriptors or the same backend session.
enum NetBackend {
    Tap(Arc<Tap>),
    /// `vhost_user=true`: a backend process serves the queues.
    VhostUser(VhostUserNetLink),
}

/// One virtio-fs device: its virtio-pci function and the connection to its virtiofsd.
struct VirtioFsSlot {
    transport: DiskTransport,
    /// `id=`, or upstream's default `_fs<N>`.
    id: String,
    tag: String,
    link: VhostUserFsLink,
}

/// Version of [`FsState`]: 2 added the backend's device state (version 1 is still read).
pub const FS_STATE_VERSION: u32 = 2;

/// Saved state of one virtio-fs device: its virtio-pci function (queues, ring positions the
/// backend answered to GET_VRING_BASE, negotiated features) and, when virtiofsd offers the
/// DEVICE_STATE protocol feature, its FUSE state (node ids, open files, INIT options) as it
/// wrote it with the rings stopped, for the virtiofsd a restore connects to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    pub version: u32,
    pub id: String,
    /// The tag, to catch a restore onto another file system.
    pub tag: String,
    pub pci: VirtioPciState,
    /// virtiofsd's FUSE state (absent when the backend does not offer DEVICE_STATE or was lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_state: Option<fs_backend_state::BackendState>,
    /// Why the backend's state is absent although the backend offers it (it could not be read
    /// in time, or it was too large): a restore says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_state_missing: Option<String>,
}

/// Version of [`NetState`].
pub const NET_STATE_VERSION: u32 = 1;

/// Saved state of one virtio-net device: its transport (queues, negotiated features, status).
/// The tap is not saved: a recovery opens it again (by name, or `--net fd=` given anew).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub version: u32,
    pub id: String,
    /// The guest's MAC, to catch a restore onto another device.
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<MmioTransportState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci: Option<VirtioPciState>,
    /// A multiqueue vhost-user-net device: the queue pairs the driver asked for with its last
    /// `VQ_PAIRS_SET` (their rings are switched on again before they start after a restore).
    /// The control queue's position is in `pci`, the data rings' bases too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user_queue_pairs: Option<u16>,
}

/// Saved state of one virtio-blk disk: its virtio-mmio transport or its virtio-pci function
/// (whose configuration space is in the PCI segment's state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The disk image, to catch a restore with the disks in another order.
    pub path: PathBuf,
    /// A virtio-mmio disk (states saved before virtio-pci existed have only this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<MmioTransportState>,
    /// A virtio-pci disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci: Option<VirtioPciState>,
}

/// Saved state of every device, versioned with the rest of `VmState`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// `None` when the VM has no serial port (`--serial off`).
    pub serial: Option<SerialState>,
    /// One per disk, in `--disk` order.
    pub disks: Vec<BlockState>,
    /// One per `--net`, in order (absent in states saved before virtio-net existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetState>,
    /// One per `--fs`, in order (absent in states saved before virtio-fs existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsState>,
    /// The ACPI GED's pending events (`None` in a state saved before the GED existed).
    #[serde(default)]
    pub ged: Option<GedState>,
    /// PCI segment 0: configuration spaces, BARs, the CONFIG_ADDRESS latch, MSI routes
    /// (`None` in a state saved before the PCI bus existed).
    #[serde(default)]
    pub pci: Option<PciSegmentState>,
    /// The virtio-console function (`None` with `--console off`, or saved before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<VirtioPciState>,
    /// The virtio-rng function (`None` in a state saved before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<VirtioPciState>,
    /// The PCI hotplug controller and the hotplugged devices (`None` in a state saved before
    /// hotplug existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug: Option<HotplugState>,
}

impl DevicesState {
    /// The ids of the hotplugged devices this state carries: a restore builds the VM without
    /// them (`without_hotplugged`) and puts them back from the state.
    pub fn hotplugged_ids(&self) -> Vec<String> {
        self.hotplug
            .as_ref()
            .map(HotplugState::ids)
            .unwrap_or_default()
    }

    /// What a restore of this state builds from the config and what it leaves to the state.
    pub fn restore_layout(&self) -> RestoreLayout {
        RestoreLayout {
            hotplugged: self.hotplugged_ids(),
            vacated: self
                .hotplug
                .as_ref()
                .map(|hotplug| hotplug.vacated.clone())
                .unwrap_or_default(),
        }
    }
}

pub struct DeviceManager {
    pio_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    /// PCI segment 0 (host bridge; devices go on it with `PciSegment::add_device`).
    pci: PciSegment,
    com1: Option<Com1>,
    /// virtio-console and virtio-rng, and the console's pty.
    console_rng: console_rng::ConsoleRng,
    disks: Vec<VirtioBlockSlot>,
    nets: Vec<VirtioNetSlot>,
    filesystems: Vec<VirtioFsSlot>,
    /// The ACPI Generic Event Device (power button), interrupt on `GED_GSI`.
    ged: Arc<Mutex<GedDevice>>,
    /// Kept for re-registering ioeventfds when a restore rebuilds a transport.
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    /// `virtio_mmio.device=` tokens for the kernel command line, one per virtio-mmio device.
    cmdline_tokens: Vec<String>,
    /// Each transport writes a clone when its device wants activation.
    activation_evt: EventFd,
    /// What every device thread runs first (its seccomp filter).
    thread_start: IoThreadStartHook,
    /// What the console's and rng's threads run first (the `StreamIo` filter).
    stream_thread_start: IoThreadStartHook,
    /// What a virtio-net thread runs first (the `NetIo` filter).
    net_thread_start: IoThreadStartHook,
    /// The ACPI PCI hotplug controller and the hotplugged devices.
    hotplug: hotplug::Hotplug,
    /// The output-commit gate of every in-process virtio-net device (armed by NV checkpoints).
    net_output_hold: Arc<OutputHold>,
    /// What every virtio device asks before a request writes guest memory (NV checkpoints
    /// install the undo log there).
    guest_write_gate: GuestWriteGateSlot,
}

impl DeviceManager {
    /// Creates every device `config` asks for and registers its interrupts with KVM. Device
    /// threads install the `BlockIo` filter of `seccomp`. `vacated`: the PCI slots devices
    /// given at boot left in earlier runs (a restore; see `hotplug`).
    pub fn new(
        vm_fd: &Arc<VmFd>,
        config: &VmConfig,
        vacated: &[VacatedSlot],
        events: &Arc<VmEvents>,
        memory: &GuestMemoryMmap,
        seccomp: SeccompMode,
    ) -> Result<DeviceManager, Error> {
        let pio_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());
        let ram_bytes = memory.iter().map(|region| region.len()).sum();
        let pci = PciSegment::new(vm_fd, &pio_bus, &mmio_bus, ram_bytes)?;
        // The PCI functions' ioeventfds go into KVM when the VM starts running (`Vm::boot`,
        // `Vm::resume`), after a restore has put every BAR and queue where it belongs.
        pci.defer_ioeventfds();
        let mut manager = DeviceManager {
            pio_bus,
            mmio_bus,
            pci,
            com1: None,
            console_rng: console_rng::ConsoleRng::default(),
            disks: Vec::new(),
            nets: Vec::new(),
            filesystems: Vec::new(),
            ged: new_ged(vm_fd)?,
            vm_fd: Arc::clone(vm_fd),
            memory: memory.clone(),
            cmdline_tokens: Vec::new(),
            activation_evt: clone_event_fd(&events.device_activation, "clone (device activation)")?,
            thread_start: device_thread_start_hook(seccomp),
            stream_thread_start: thread_start_hook(ThreadKind::StreamIo, seccomp),
            net_thread_start: thread_start_hook(ThreadKind::NetIo, seccomp),
            hotplug: hotplug::Hotplug::new(Arc::new(Mutex::new(
                devices::PciHotplugController::new(clone_event_fd(
                    &events.device_activation,
                    "clone (PCI hotplug eject)",
                )?),
            ))),
            net_output_hold: OutputHold::new().map_err(|source| Error::EventFd {
                operation: "create (net output hold)",
                source,
            })?,
            guest_write_gate: GuestWriteGateSlot::default(),
        };
        manager.set_vacated_slots(vacated);
        manager.add_serial(vm_fd, config)?;
        manager.add_i8042(events)?;
        manager.add_acpi_shutdown(events)?;
        manager.add_ged()?;
        manager.add_pci_hotplug()?;
        if config.pvpanic {
            manager.add_pvpanic()?;
        }
        // Upstream's order on the PCI bus: the console, the disks, then the rng.
        manager.add_virtio_console(&config.console)?;
        for disk in config.disks.iter().flatten() {
            manager.add_virtio_block(disk)?;
        }
        for net in config.net.iter().flatten() {
            manager.add_virtio_net(net)?;
        }
        manager.add_virtio_rng(&config.rng)?;
        // Upstream puts virtio-fs after the rng.
        for fs in config.fs.iter().flatten() {
            manager.add_virtio_fs(fs)?;
        }
        manager.finish_vacated_slots()?;
        Ok(manager)
    }

    /// The pty paths this VM's devices opened, written into `config` the way upstream reports
    /// them: in the `file` member of a `Pty` serial or console.
    pub fn record_pty_paths(&self, config: &mut VmConfig) {
        if let Some(pty) = self.com1.as_ref().and_then(|com1| com1.pty.as_ref()) {
            config.serial.file = Some(pty.path().display().to_string());
        }
        if let Some(pty) = &self.console_rng.console_pty {
            config.console.file = Some(pty.path().display().to_string());
        }
    }

    /// Puts the PCI hotplug controller on the MMIO bus where the DSDT's `\_SB_.PHPR` has it.
    fn add_pci_hotplug(&mut self) -> Result<(), Error> {
        let controller: Arc<Mutex<dyn devices::BusDevice>> = self.hotplug.controller().clone();
        self.mmio_bus
            .insert(
                arch::layout::PCI_HOTPLUG_MMIO_START.0,
                arch::layout::PCI_HOTPLUG_MMIO_SIZE,
                controller,
            )
            .map_err(|e| Error::device("PCI hotplug controller", e))
    }

    /// Puts the ACPI GED on the MMIO bus at `GED_MMIO_START` (where the DSDT declares it).
    fn add_ged(&mut self) -> Result<(), Error> {
        let ged: Arc<Mutex<dyn devices::BusDevice>> = self.ged.clone();
        self.mmio_bus
            .insert(
                arch::layout::GED_MMIO_START.0,
                arch::layout::GED_MMIO_SIZE,
                ged,
            )
            .map_err(|e| Error::device("GED", e))
    }

    /// `vm.power-button`: the GED raises the ACPI power button event.
    pub fn power_button(&self) -> Result<(), Error> {
        self.ged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .notify_power_button()
            .map_err(|e| Error::device("GED interrupt", e))
    }

    fn add_pvpanic(&mut self) -> Result<(), Error> {
        let device = PvPanicDevice::new(Box::new(|event: PvPanicEvent| {
            log::warn!("pvpanic: the guest reported a {} event", event.name());
            // Upstream's event: source "guest", event "panic", the kind in property "event".
            crate::event_monitor::emit("guest", "panic", &[("event", event.name())]);
        }));
        self.pio_bus
            .insert(
                devices::PVPANIC_PORT,
                devices::PVPANIC_LEN,
                Arc::new(Mutex::new(device)),
            )
            .map_err(|e| Error::device("pvpanic", e))?;
        log::info!("pvpanic on I/O port {:#x}", devices::PVPANIC_PORT);
        Ok(())
    }

    fn add_serial(&mut self, vm_fd: &VmFd, config: &VmConfig) -> Result<(), Error> {
        let Some((output, pty)) =
            console_rng::open_console_output("serial", &config.serial, |path, source| {
                Error::SerialOutput { path, source }
            })?
        else {
            return Ok(());
        };
        let interrupt =
            Arc::new(EventFdInterrupt::new().map_err(|e| Error::device("serial interrupt", e))?);
        vm_fd
            .register_irqfd(interrupt.eventfd(), devices::COM1_IRQ)
            .map_err(|source| Error::Kvm {
                operation: "KVM_IRQFD (serial)",
                source,
            })?;
        let output = SerialOutput(Arc::new(Mutex::new(output)));
        let serial_error = |e: devices::Error| Error::device("serial", e);
        let (device, rx_space) = match &pty {
            None => (
                SerialDevice::new(interrupt.clone(), Box::new(output.clone())),
                None,
            ),
            Some(_) => {
                let rx_space = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
                    operation: "create (serial input)",
                    source,
                })?;
                let device = SerialDevice::with_input(
                    interrupt.clone(),
                    Box::new(output.clone()),
                    clone_event_fd(&rx_space, SERIAL_INPUT_CLONE)?,
                );
                (device, Some(rx_space))
            }
        };
        let device = Arc::new(Mutex::new(device));
        self.pio_bus
            .insert(devices::COM1_BASE, devices::COM1_LEN, device.clone())
            .map_err(serial_error)?;
        let input = match (&pty, &rx_space) {
            (Some(pty), Some(rx_space)) => Some(
                SerialInput::start(
                    pty.main().map_err(serial_error)?,
                    device.clone(),
                    clone_event_fd(rx_space, SERIAL_INPUT_CLONE)?,
                    Some(self.thread_start.clone()),
                )
                .map_err(serial_error)?,
            ),
            _ => None,
        };
        self.com1 = Some(Com1 {
            device,
            interrupt,
            output,
            rx_space,
            _input: input,
            pty,
        });
        Ok(())
    }

    fn add_i8042(&mut self, events: &Arc<VmEvents>) -> Result<(), Error> {
        let reset = clone_event_fd(&events.reset, "clone (i8042 reset)")?;
        self.pio_bus
            .insert(
                devices::I8042_BASE,
                devices::I8042_LEN,
                Arc::new(Mutex::new(I8042Device::new(reset))),
            )
            .map_err(|e| Error::device("i8042", e))
    }

    /// The ACPI shutdown/reset port the FADT names: its requests take the same way as the i8042
    /// reset line's and a vCPU's shutdown exit.
    fn add_acpi_shutdown(&mut self, events: &Arc<VmEvents>) -> Result<(), Error> {
        let device = AcpiShutdownDevice::new(
            clone_event_fd(&events.reset, "clone (ACPI reset)")?,
            clone_event_fd(&events.shutdown, "clone (ACPI power off)")?,
        );
        self.pio_bus
            .insert(
                u64::from(arch::layout::ACPI_SHUTDOWN_PORT),
                devices::ACPI_SHUTDOWN_LEN,
                Arc::new(Mutex::new(device)),
            )
            .map_err(|e| Error::device("ACPI shutdown", e))
    }

    /// Puts a virtio-blk disk on its transport: by default a virtio-pci function on segment 0
    /// (MSI-X vectors on KVM GSIs, ioeventfds at its notify addresses, registered by the
    /// segment), with `transport=mmio` the next virtio-mmio slot.
    fn add_virtio_block(&mut self, disk: &crate::config::DiskConfig) -> Result<(), Error> {
        if disk.vhost_user {
            return self.add_vhost_user_block(disk);
        }
        let path = PathBuf::from(
            disk.path
                .as_deref()
                .ok_or_else(|| Error::Device("--disk without path=".to_string()))?,
        );
        let id = disk
            .id
            .clone()
            .unwrap_or_else(|| format!("_disk{}", self.disks.len()));
        let block = open_block(&path, disk.readonly)?;
        let write_hook = block.write_hook_slot();
        let transport = match disk.transport.unwrap_or_default() {
            VirtioTransportKind::Pci => self.add_pci_block(&id, &path, block)?,
            VirtioTransportKind::Mmio => {
                let thread_start = self.thread_start.clone();
                self.add_mmio_block(&path, Box::new(block), &thread_start)?
            }
        };
        log::info!(
            "disk {} on {}{}",
            path.display(),
            match &transport {
                DiskTransport::Pci { bdf, .. } => format!("virtio-pci at {bdf}"),
                DiskTransport::Mmio { base, gsi, .. } =>
                    format!("virtio-mmio at {base:#x}, GSI {gsi}"),
            },
            if disk.readonly { ", read-only" } else { "" }
        );
        self.disks.push(VirtioBlockSlot {
            transport,
            id,
            path,
            readonly: disk.readonly,
            vhost_user: None,
            write_hook: Some(write_hook),
        });
        Ok(())
    }

    /// A vhost-user-blk disk on a virtio-pci function: connected to its backend now (its
    /// configuration space comes from there), activated on this thread like any virtio device.
    fn add_vhost_user_block(&mut self, disk: &crate::config::DiskConfig) -> Result<(), Error> {
        let socket = PathBuf::from(
            disk.vhost_socket
                .as_deref()
                .ok_or_else(|| Error::Device("--disk vhost_user=on without socket=".into()))?,
        );
        let id = disk
            .id
            .clone()
            .unwrap_or_else(|| format!("_disk{}", self.disks.len()));
        let what = format!("vhost-user disk {}", socket.display());
        let link = connect_vhost_user_disk(disk)?;
        let (function, bdf, msi) =
            self.add_pci_virtio(&id, &what, Box::new(link.device()), &self.thread_start)?;
        log::info!("{what} on virtio-pci at {bdf}");
        self.disks.push(VirtioBlockSlot {
            transport: DiskTransport::Pci {
                device: function,
                bdf,
                msi,
            },
            id,
            path: socket,
            readonly: false,
            vhost_user: Some(link),
            write_hook: None,
        });
        Ok(())
    }

    fn add_pci_block(&self, id: &str, path: &Path, block: Block) -> Result<DiskTransport, Error> {
        let what = format!("disk {}", path.display());
        let (device, bdf, msi) =
            self.add_pci_virtio(id, &what, Box::new(block), &self.thread_start)?;
        Ok(DiskTransport::Pci { device, bdf, msi })
    }

    /// Puts `device` on a new virtio-pci function of segment 0; `what` names it in errors.
    /// Its I/O threads are confined by `thread_start` (the device kind's seccomp filter).
    /// Used by disks, nets, the console and the rng.
    fn add_pci_virtio(
        &self,
        id: &str,
        what: &str,
        device: Box<dyn VirtioDevice>,
        thread_start: &IoThreadStartHook,
    ) -> Result<PciFunction, Error> {
        self.fill_vacated_slots()?;
        let msi = self.pci.msi_interrupts(msix_vector_count(&*device))?;
        let mut device = VirtioPciDevice::new(device, self.memory.clone(), msi.clone())
            .map_err(|e| Error::device(what.to_owned(), e))?;
        self.wire_activation(&mut device, thread_start)?;
        let device = Arc::new(Mutex::new(device));
        let bdf = self.pci.add_device(id, device.clone())?;
        Ok((device, bdf, msi))
    }

    /// The next virtio-mmio slot: irqfd on the slot's GSI, ioeventfd on its QueueNotify
    /// register (so a notify wakes the disk's I/O thread without a vCPU exit).
    /// (Also used for virtio-net with `transport=mmio`; `path` then names the tap.)
    fn add_mmio_block(
        &mut self,
        path: &Path,
        block: Box<dyn VirtioDevice>,
        thread_start: &IoThreadStartHook,
    ) -> Result<DiskTransport, Error> {
        let index = self
            .disks
            .iter()
            .map(|d| &d.transport)
            .chain(self.nets.iter().map(|n| &n.transport))
            .filter(|t| matches!(t, DiskTransport::Mmio { .. }))
            .count();
        let index =
            u32::try_from(index).map_err(|_| Error::Device("too many disks".to_string()))?;
        let (base, gsi) = virtio_mmio_slot(index);
        // The slot must stay inside the platform's virtio-mmio window and GSI range.
        arch::layout::mmio_device_address(index)
            .map_err(|e| Error::device(format!("disk {}", path.display()), e))?;
        let interrupt = Arc::new(
            EventFdInterrupt::new()
                .map_err(|e| Error::device(format!("disk {} interrupt", path.display()), e))?,
        );
        self.vm_fd
            .register_irqfd(interrupt.eventfd(), gsi)
            .map_err(|source| Error::Kvm {
                operation: "KVM_IRQFD (virtio-blk)",
                source,
            })?;
        let mut transport = MmioTransport::new(block, self.memory.clone(), interrupt.clone())
            .map_err(|e| Error::device(format!("disk {}", path.display()), e))?;
        self.wire_activation(&mut transport, thread_start)?;
        register_queue_notifiers(&self.vm_fd, base, transport.queue_evts())?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(base, VIRTIO_MMIO_SIZE, transport.clone())
            .map_err(|e| Error::device(format!("disk {}", path.display()), e))?;
        self.cmdline_tokens.push(kernel_cmdline_token(index));
        Ok(DiskTransport::Mmio {
            transport,
            interrupt,
            base,
            gsi,
        })
    }

    /// A virtio-net device on its tap (opened here: see `open_tap`), on virtio-pci by default or
    /// on the next virtio-mmio slot with `transport=mmio`.
    fn add_virtio_net(&mut self, config: &crate::config::NetConfig) -> Result<(), Error> {
        // A `vm.create` body may leave the MAC out: pick one now, kept for restores.
        let mut config = config.clone();
        config.mac.get_or_insert_with(crate::config::random_mac);
        let config = &config;
        let id = config
            .id
            .clone()
            .unwrap_or_else(|| format!("_net{}", self.nets.len()));
        if config.vhost_user {
            let link = connect_vhost_user_net(config)?;
            let what = format!("vhost-user net {id} ({})", link.socket().display());
            let (device, bdf, msi) =
                self.add_pci_virtio(&id, &what, Box::new(link.device()), &self.thread_start)?;
            log::info!("{what} on virtio-pci at {bdf}");
            self.nets.push(VirtioNetSlot {
                transport: DiskTransport::Pci { device, bdf, msi },
                id,
                backend: NetBackend::VhostUser(link),
                config: config.clone(),
            });
            return Ok(());
        }
        let tap = Arc::new(open_tap(config)?);
        let what = format!("net {id} (tap {})", tap.name());
        let net = self.held_net(&tap, config)?;
        let transport = match config.transport.unwrap_or_default() {
            VirtioTransportKind::Pci => {
                let (device, bdf, msi) =
                    self.add_pci_virtio(&id, &what, Box::new(net), &self.net_thread_start)?;
                DiskTransport::Pci { device, bdf, msi }
            }
            VirtioTransportKind::Mmio => {
                let thread_start = self.net_thread_start.clone();
                self.add_mmio_block(Path::new(tap.name()), Box::new(net), &thread_start)?
            }
        };
        log::info!("{what} on {}", transport_description(&transport));
        self.nets.push(VirtioNetSlot {
            transport,
            id,
            backend: NetBackend::Tap(tap),
            config: config.clone(),
        });
        Ok(())
    }

    /// [`new_net`], its frames held by the VM's output-commit gate while NV checkpoints are on.
    fn held_net(&self, tap: &Arc<Tap>, config: &crate::config::NetConfig) -> Result<Net, Error> {
        Ok(new_net(tap, config)?.with_output_hold(Arc::clone(&self.net_output_hold)))
    }

    /// The slot every virtio device asks before it writes guest memory (NV checkpoints install
    /// the undo log there: `docs/checkpoints.md` section 9).
    pub fn guest_write_gate(&self) -> GuestWriteGateSlot {
        self.guest_write_gate.clone()
    }

    /// The gate NV checkpoints hold the in-process virtio-net devices' output with.
    pub fn net_output_hold(&self) -> Arc<OutputHold> {
        Arc::clone(&self.net_output_hold)
    }

    /// A virtio-fs device on a virtio-pci function, connected to its virtiofsd now (a backend
    /// that is not there is an error naming the socket).
    fn add_virtio_fs(&mut self, config: &crate::config::FsConfig) -> Result<(), Error> {
        let id = config
            .id
            .clone()
            .unwrap_or_else(|| format!("_fs{}", self.filesystems.len()));
        let link = connect_virtio_fs(&id, config)?;
        let what = format!("virtio-fs {id} tag {} ({})", config.tag, config.socket);
        let (device, bdf, msi) =
            self.add_pci_virtio(&id, &what, Box::new(link.device()), &self.thread_start)?;
        log::info!("{what} on virtio-pci at {bdf}");
        self.filesystems.push(VirtioFsSlot {
            transport: DiskTransport::Pci { device, bdf, msi },
            id,
            tag: config.tag.clone(),
            link,
        });
        Ok(())
    }

    /// Tells the control loop when `transport`'s device wants activation, and confines the
    /// threads the device starts with `thread_start` (its kind's seccomp filter).
    fn wire_activation(
        &self,
        transport: &mut dyn VirtioTransport,
        thread_start: &IoThreadStartHook,
    ) -> Result<(), Error> {
        let evt = clone_event_fd(&self.activation_evt, "clone (device activation)")?;
        transport.notify_activation_with(evt);
        transport.confine_io_threads_with(thread_start.clone());
        transport.gate_guest_writes_with(self.guest_write_gate.clone());
        Ok(())
    }

    /// Activates every device whose driver set DRIVER_OK since the last call (the control loop
    /// calls this when `VmEvents::device_activation` is readable). A device that fails to start
    /// is marked DEVICE_NEEDS_RESET for its driver; the VM goes on.
    pub fn activate_pending(&self) {
        for disk in self.live_disks() {
            match disk.with_transport(|t| t.activate_pending()) {
                Ok(true) => log::debug!("disk {}: activated", disk.path.display()),
                Ok(false) => {}
                Err(e) => log::error!("disk {}: activation failed: {e}", disk.path.display()),
            }
        }
        for slot in self.console_rng.slots() {
            match slot.with_transport(|t| t.activate_pending()) {
                Ok(true) => log::debug!("{}: activated", slot.id),
                Ok(false) => {}
                Err(e) => log::error!("{}: activation failed: {e}", slot.id),
            }
        }
        for net in self.live_nets() {
            match net.transport.with(|t| t.activate_pending()) {
                Ok(true) => log::debug!("net {}: activated", net.id),
                Ok(false) => {}
                Err(e) => log::error!("net {}: activation failed: {e}", net.id),
            }
        }
        for fs in &self.filesystems {
            match fs.transport.with(|t| t.activate_pending()) {
                Ok(true) => log::debug!("virtio-fs {}: activated", fs.id),
                Ok(false) => {}
                Err(e) => log::error!("virtio-fs {}: activation failed: {e}", fs.id),
            }
        }
        let _ = self.hotplug.for_each(|id, t| {
            match t.activate_pending() {
                Ok(true) => log::debug!("{id}: activated"),
                Ok(false) => {}
                Err(e) => log::error!("{id}: activation failed: {e}"),
            }
            Ok(())
        });
        self.process_ejects();
    }

    /// Runs `step` on every disk's transport in order; the first failure, named `doing`, stops.
    fn for_each_disk(
        &self,
        doing: &str,
        step: impl Fn(&mut dyn VirtioTransport) -> devices::Result<()>,
    ) -> Result<(), Error> {
        for disk in self.live_disks() {
            disk.with_transport(&step)
                .map_err(|e| Error::device(format!("{doing} disk {}", disk.path.display()), e))?;
        }
        for slot in self.console_rng.slots() {
            slot.with_transport(&step)
                .map_err(|e| Error::device(format!("{doing} {}", slot.id), e))?;
        }
        for net in self.live_nets() {
            net.transport
                .with(&step)
                .map_err(|e| Error::device(format!("{doing} net {}", net.id), e))?;
        }
        for fs in &self.filesystems {
            fs.transport
                .with(&step)
                .map_err(|e| Error::device(format!("{doing} virtio-fs {}", fs.id), e))?;
        }
        self.hotplug
            .for_each(|id, t| step(t).map_err(|e| Error::device(format!("{doing} {id}"), e)))
    }

    /// Stops the disks' I/O threads from taking new requests and waits for those in flight, so
    /// device state and guest memory are quiescent.
    pub fn pause(&self) -> Result<(), Error> {
        self.for_each_disk("pausing", |t| t.pause())
    }

    /// Serves disk requests again, including those the guest posted while paused.
    pub fn resume(&self) -> Result<(), Error> {
        self.for_each_disk("resuming", |t| t.resume())
    }

    /// Registers the PCI functions' queue-notify ioeventfds held back while the VM was built
    /// (until then a notify reaches its device as a BAR write). Idempotent.
    pub fn register_ioeventfds(&self) {
        self.pci.register_ioeventfds();
    }

    /// Each disk in the order of the VM's config (its index in an NV checkpoint's disk undo
    /// entries): its id, and the slot its device asks before each write, `None` for a disk
    /// whose writes the VMM does not see (vhost-user).
    pub fn disk_write_hooks(&self) -> Vec<(String, Option<devices::virtio::BlockWriteHookSlot>)> {
        // Live disks only: their positions are those of the config's disks, which a recovery
        // writes the undo entries back through (an ejected disk has left the config).
        self.live_disks()
            .map(|disk| (disk.id.clone(), disk.write_hook.clone()))
            .collect()
    }

    /// A disk `vm.remove-device` asked the guest to eject that it has not ejected yet: when
    /// it does, the disks after it move up one position.
    pub fn disk_removal_pending(&self) -> Option<String> {
        self.hotplug
            .removals_requested()
            .into_iter()
            .find(|id| self.has_live_disk(id))
    }

    /// Whether `id` names a disk the guest has not ejected.
    pub fn has_live_disk(&self, id: &str) -> bool {
        self.live_disks().any(|disk| disk.id == id)
    }

    /// Makes every completed disk write durable (fdatasync).
    pub fn flush_disks(&self) -> Result<(), Error> {
        self.for_each_disk("flushing", |t| t.flush_backend())
    }

    /// Per-device I/O counters (`vm.counters`): device id -> counter name -> value. Counters start
    /// from 0 in each VMM process (a restored disk counts anew).
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.live_disks()
            .map(|disk| {
                let counters = disk
                    .with_transport(|t| t.counters())
                    .into_iter()
                    .map(|(name, value)| (name.to_string(), value))
                    .collect();
                (disk.id.clone(), counters)
            })
            .chain(self.live_nets().map(|net| {
                let counters = net
                    .transport
                    .with(|t| t.counters())
                    .into_iter()
                    .map(|(name, value)| (name.to_string(), value))
                    .collect();
                (net.id.clone(), counters)
            }))
            .chain(self.hotplug.counters().into_iter().map(|(id, counters)| {
                let counters = counters
                    .into_iter()
                    .map(|(name, value)| (name.to_string(), value))
                    .collect();
                (id, counters)
            }))
            .collect()
    }

    /// The devices the guest sees and the resources each occupies (`vm.info`'s device tree):
    /// COM1 (when `--serial` is not off), each virtio-mmio disk and each PCI device (not the
    /// host bridge, virtio-pci disks included) with its BDF and BARs.
    pub fn device_resources(&self) -> Vec<DeviceResources> {
        let serial = self.com1.as_ref().map(|_| DeviceResources {
            id: "__serial".to_owned(),
            pio: Some((devices::COM1_BASE, devices::COM1_LEN)),
            mmio: None,
            irq: Some(devices::COM1_IRQ),
            pci: None,
            virtio_pci: false,
        });
        let disks = self.disks.iter().filter_map(|disk| match disk.transport {
            DiskTransport::Mmio { base, gsi, .. } => Some(DeviceResources {
                id: disk.id.clone(),
                pio: None,
                mmio: Some((base, VIRTIO_MMIO_SIZE)),
                irq: Some(gsi),
                pci: None,
                virtio_pci: false,
            }),
            DiskTransport::Pci { .. } => None,
        });
        let nets = self.nets.iter().filter_map(|net| match net.transport {
            DiskTransport::Mmio { base, gsi, .. } => Some(DeviceResources {
                id: net.id.clone(),
                pio: None,
                mmio: Some((base, VIRTIO_MMIO_SIZE)),
                irq: Some(gsi),
                pci: None,
                virtio_pci: false,
            }),
            DiskTransport::Pci { .. } => None,
        });
        // Every function on the segment is a virtio-pci transport.
        let pci = self.pci.devices().into_iter().map(|info| DeviceResources {
            virtio_pci: true,
            ..DeviceResources::from(info)
        });
        serial
            .into_iter()
            .chain(disks)
            .chain(nets)
            .chain(pci)
            .collect()
    }

    /// The `virtio_mmio.device=` tokens to append to the guest's kernel command line.
    pub fn cmdline_tokens(&self) -> &[String] {
        &self.cmdline_tokens
    }

    /// Stops the devices' own threads (virtio I/O) and makes completed disk writes durable.
    /// Idempotent.
    pub fn shutdown(&self) {
        if let Err(e) = self.pause().and_then(|()| self.flush_disks()) {
            log::warn!("device shutdown: {e}");
        }
    }

    /// Saves every device's state. The VM must be paused.
    pub fn save_state(&self) -> Result<DevicesState, Error> {
        let serial = match &self.com1 {
            None => None,
            Some(com1) => Some(
                com1.device
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .state()
                    .map_err(|e| Error::device_state("serial", e))?,
            ),
        };
        let disks = self
            .live_disks()
            .map(|disk| {
                let state_error =
                    |e| Error::device_state(format!("disk {}", disk.path.display()), e);
                let (transport, pci) = match &disk.transport {
                    DiskTransport::Pci { device, .. } => (
                        None,
                        Some(lock_or_recover(device).state().map_err(state_error)?),
                    ),
                    DiskTransport::Mmio { transport, .. } => (
                        Some(lock_or_recover(transport).state().map_err(state_error)?),
                        None,
                    ),
                };
                Ok(BlockState {
                    path: disk.path.clone(),
                    transport,
                    pci,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let nets = self
            .live_nets()
            .map(|net| {
                let (transport, pci) = net
                    .transport
                    .save()
                    .map_err(|e| Error::device_state(format!("net {}", net.id), e))?;
                let vhost_user_queue_pairs = match &net.backend {
                    NetBackend::VhostUser(link) => link.queue_pairs_in_use(),
                    NetBackend::Tap(_) => None,
                };
                Ok(NetState {
                    version: NET_STATE_VERSION,
                    id: net.id.clone(),
                    mac: net.config.mac.clone().unwrap_or_default(),
                    transport,
                    pci,
                    vhost_user_queue_pairs,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let fs = self
            .filesystems
            .iter()
            .map(|fs| {
                let (_, pci) = fs
                    .transport
                    .save()
                    .map_err(|e| Error::device_state(format!("virtio-fs {}", fs.id), e))?;
                let (backend_state, backend_state_missing) =
                    fs_backend_state::save(&fs.id, &fs.link);
                Ok(FsState {
                    version: FS_STATE_VERSION,
                    id: fs.id.clone(),
                    tag: fs.tag.clone(),
                    pci: pci.ok_or_else(|| {
                        Error::State(format!("virtio-fs {}: not on virtio-pci", fs.id))
                    })?,
                    backend_state,
                    backend_state_missing,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let ged = Some(
            self.ged
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .state(),
        );
        let pci = Some(self.pci.save_state()?);
        let console = self
            .console_rng
            .console
            .as_ref()
            .map(|slot| slot.state())
            .transpose()?;
        let rng = self
            .console_rng
            .rng
            .as_ref()
            .map(|slot| slot.state())
            .transpose()?;
        let hotplug = Some(self.save_hotplug()?);
        Ok(DevicesState {
            serial,
            disks,
            nets,
            fs,
            ged,
            pci,
            console,
            rng,
            hotplug,
        })
    }

    /// Puts every device back in the saved state. The VM must be paused.
    pub fn restore_state(&self, state: &DevicesState) -> Result<(), Error> {
        match (&self.com1, &state.serial) {
            (Some(com1), Some(saved)) => {
                let rx_space = com1
                    .rx_space
                    .as_ref()
                    .map(|evt| clone_event_fd(evt, SERIAL_INPUT_CLONE))
                    .transpose()?;
                let restored = SerialDevice::from_state(
                    saved,
                    com1.interrupt.clone(),
                    Box::new(com1.output.clone()),
                    rx_space,
                )
                .map_err(|e| Error::device_state("serial", e))?;
                *com1
                    .device
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = restored;
            }
            (None, None) => {}
            (Some(_), None) => {
                log::warn!("saved state has no serial port; the new serial port starts at reset")
            }
            (None, Some(_)) => log::warn!("saved serial state dropped: this VM has --serial off"),
        }
        if state.disks.len() != self.disks.len() {
            return Err(Error::State(format!(
                "state has {} disks, this VM has {}",
                state.disks.len(),
                self.disks.len()
            )));
        }
        for (disk, saved) in self.disks.iter().zip(&state.disks) {
            if saved.path != disk.path {
                log::warn!(
                    "disk state saved for {} restored onto {}",
                    saved.path.display(),
                    disk.path.display()
                );
            }
            self.restore_disk(disk, saved)?;
        }
        if state.nets.len() != self.nets.len() {
            return Err(Error::State(format!(
                "state has {} network devices, this VM has {}",
                state.nets.len(),
                self.nets.len()
            )));
        }
        for (net, saved) in self.nets.iter().zip(&state.nets) {
            self.restore_net(net, saved)?;
        }
        if state.fs.len() != self.filesystems.len() {
            return Err(Error::State(format!(
                "state has {} virtio-fs devices, this VM has {}",
                state.fs.len(),
                self.filesystems.len()
            )));
        }
        for (fs, saved) in self.filesystems.iter().zip(&state.fs) {
            self.restore_fs(fs, saved)?;
        }
        self.restore_console_rng(state.console.as_ref(), state.rng.as_ref())?;
        if let Some(saved) = &state.ged {
            self.ged
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .restore(saved)
                .map_err(|e| Error::device_state("GED", e))?;
        }
        if let Some(saved) = &state.hotplug {
            self.restore_hotplug(saved)?;
        }
        match &state.pci {
            Some(saved) => self.pci.restore_state(saved)?,
            None => log::warn!("saved state has no PCI bus; the PCI bus stays at reset"),
        }
        // The rebuilt virtio-pci functions have new queue-notify eventfds: register them where
        // the restored BARs put the notify addresses.
        let transports = self.disks.iter().map(|d| &d.transport);
        let transports = transports.chain(self.filesystems.iter().map(|f| &f.transport));
        for transport in transports.chain(self.nets.iter().map(|n| &n.transport)) {
            if let DiskTransport::Pci { bdf, .. } = transport {
                self.pci.refresh_ioeventfds(*bdf)?;
            }
        }
        self.refresh_console_rng_ioeventfds()?;
        self.refresh_hotplug_ioeventfds()
    }

    /// PCI segment 0: add devices with `PciSegment::add_device` (see `pci_segment`).
    pub fn pci(&self) -> &PciSegment {
        &self.pci
    }

    /// Rebuilds a disk's transport from saved state, on the same transport kind. The rebuilt
    /// transport has new queue-notify eventfds: a virtio-mmio disk's ioeventfds move over to
    /// them here, a virtio-pci disk's after the segment's restore (`restore_state`). The device
    /// stays paused until `resume`.
    fn restore_disk(&self, disk: &VirtioBlockSlot, saved: &BlockState) -> Result<(), Error> {
        let block: Box<dyn VirtioDevice> = match &disk.vhost_user {
            Some(link) => Box::new(link.device()),
            None => Box::new(
                open_block(&disk.path, disk.readonly)?
                    .with_write_hook(disk.write_hook.clone().unwrap_or_default()),
            ),
        };
        self.restore_transport(
            &format!("disk {}", disk.path.display()),
            &disk.transport,
            block,
            saved.transport.as_ref(),
            saved.pci.as_ref(),
            &self.thread_start,
        )
    }

    /// Rebuilds a virtio-fs device from saved state on the connection to its virtiofsd (which
    /// reconnects, bounded, when the device resumes).
    fn restore_fs(&self, fs: &VirtioFsSlot, saved: &FsState) -> Result<(), Error> {
        let what = format!("virtio-fs {}", fs.id);
        if !(1..=FS_STATE_VERSION).contains(&saved.version) {
            return Err(Error::State(format!(
                "{what}: state version {}, this build understands 1 to {FS_STATE_VERSION}",
                saved.version
            )));
        }
        if saved.tag != fs.tag {
            return Err(Error::State(format!(
                "{what}: state saved for tag {} restored onto tag {}",
                saved.tag, fs.tag
            )));
        }
        let device_state = fs_backend_state::restore(
            &what,
            fs.link.socket(),
            saved.backend_state.as_ref(),
            saved.backend_state_missing.as_deref(),
        )?;
        self.restore_transport(
            &what,
            &fs.transport,
            Box::new(fs.link.restored_device(device_state)),
            None,
            Some(&saved.pci),
            &self.thread_start,
        )
    }

    /// Rebuilds a virtio-net device from saved state on the tap this VMM opened (by name, or the
    /// `--net fd=` of this run). Its negotiated offloads go back to the tap when it activates.
    fn restore_net(&self, net: &VirtioNetSlot, saved: &NetState) -> Result<(), Error> {
        if saved.version != NET_STATE_VERSION {
            return Err(Error::State(format!(
                "net {}: state version {}, this build understands {NET_STATE_VERSION}",
                net.id, saved.version
            )));
        }
        if net
            .config
            .mac
            .as_deref()
            .is_some_and(|mac| mac != saved.mac)
        {
            log::warn!(
                "net {}: state saved with MAC {} restored onto MAC {}",
                net.id,
                saved.mac,
                net.config.mac.as_deref().unwrap_or_default()
            );
        }
        let device: Box<dyn VirtioDevice> = match &net.backend {
            NetBackend::Tap(tap) => Box::new(self.held_net(tap, &net.config)?),
            NetBackend::VhostUser(link) => {
                link.restore_queue_pairs(saved.vhost_user_queue_pairs)
                    .map_err(|e| Error::device(format!("net {}", net.id), e))?;
                Box::new(link.device())
            }
        };
        self.restore_transport(
            &format!("net {}", net.id),
            &net.transport,
            device,
            saved.transport.as_ref(),
            saved.pci.as_ref(),
            match &net.backend {
                NetBackend::Tap(_) => &self.net_thread_start,
                NetBackend::VhostUser(_) => &self.thread_start,
            },
        )
    }

    /// Rebuilds `transport` around `device` from its saved state (one of `mmio`, `pci`).
    fn restore_transport(
        &self,
        what: &str,
        transport: &DiskTransport,
        block: Box<dyn VirtioDevice>,
        mmio: Option<&MmioTransportState>,
        pci: Option<&VirtioPciState>,
        thread_start: &IoThreadStartHook,
    ) -> Result<(), Error> {
        let state_error = |e: devices::Error| Error::device_state(what.to_owned(), e);
        match (transport, mmio, pci) {
            (DiskTransport::Pci { device, msi, .. }, None, Some(saved)) => {
                self.restore_pci_function(what, device, msi, block, saved, thread_start)?
            }
            (
                DiskTransport::Mmio {
                    transport,
                    interrupt,
                    base,
                    ..
                },
                Some(saved),
                None,
            ) => {
                let mut restored =
                    MmioTransport::restore(block, self.memory.clone(), interrupt.clone(), saved)
                        .map_err(state_error)?;
                self.wire_activation(&mut restored, thread_start)?;
                restored.activate_pending().map_err(state_error)?;
                let mut transport = lock_or_recover(transport);
                unregister_queue_notifiers(&self.vm_fd, *base, transport.queue_evts());
                register_queue_notifiers(&self.vm_fd, *base, restored.queue_evts())?;
                *transport = restored;
            }
            _ => {
                return Err(Error::State(format!(
                    "{what}: saved on another virtio transport than this VM gives it"
                )))
            }
        }
        Ok(())
    }

    /// Rebuilds the virtio-pci function `device` around `block` from `saved`, paused (activated
    /// if it was running), its threads confined by `thread_start`. Used by disks, nets, the
    /// console and the rng.
    fn restore_pci_function(
        &self,
        what: &str,
        device: &Mutex<VirtioPciDevice>,
        msi: &Arc<KvmMsiInterrupts>,
        block: Box<dyn VirtioDevice>,
        saved: &VirtioPciState,
        thread_start: &IoThreadStartHook,
    ) -> Result<(), Error> {
        let state_error = |e: devices::Error| Error::device_state(what.to_owned(), e);
        let mut restored = VirtioPciDevice::restore(block, self.memory.clone(), msi.clone(), saved)
            .map_err(state_error)?;
        self.wire_activation(&mut restored, thread_start)?;
        // A device that was running starts here, paused, on this (VMM) thread.
        restored.activate_pending().map_err(state_error)?;
        // Dropping the old function stops its I/O thread. Its configuration space comes back
        // with the segment's state.
        *lock_or_recover(device) = restored;
        Ok(())
    }
}

/// The ACPI GED, its interrupt an irqfd on `GED_GSI` (the DSDT's).
fn new_ged(vm_fd: &VmFd) -> Result<Arc<Mutex<GedDevice>>, Error> {
    let interrupt = Arc::new(EventFdInterrupt::new().map_err(|e| Error::device("GED", e))?);
    vm_fd
        .register_irqfd(interrupt.eventfd(), arch::layout::GED_GSI)
        .map_err(|source| Error::Kvm {
            operation: "KVM_IRQFD (GED)",
            source,
        })?;
    Ok(Arc::new(Mutex::new(GedDevice::new(interrupt))))
}

const SERIAL_INPUT_CLONE: &str = "clone (serial input)";

/// A second handle on `evt`; `operation` names the clone in the error.
fn clone_event_fd(evt: &EventFd, operation: &'static str) -> Result<EventFd, Error> {
    evt.try_clone()
        .map_err(|source| Error::EventFd { operation, source })
}

/// The tap of a `--net`: the descriptors handed over (`fd=`), the tap named (`tap=`, created
/// when missing if this process may), or a new one from the kernel's `vmtap%d` with `ip=`,
/// `mask=` and `host_mac=` set on it and brought up, as upstream.
fn open_tap(config: &crate::config::NetConfig) -> Result<Tap, Error> {
    let pairs = config.num_queues / 2;
    let tap_error = |e| Error::Device(format!("--net: {e}"));
    let tap = match (&config.fds, &config.tap) {
        (Some(fds), _) => {
            let [fd] = fds.as_slice() else {
                return Err(Error::Device(format!(
                    "--net fd=: {} descriptors given; several handed-over queue descriptors \
                     are not supported, give one tap descriptor with num_queues=2",
                    fds.len()
                )));
            };
            Tap::from_fd(*fd).map_err(tap_error)?
        }
        (None, Some(name)) => Tap::open(Some(name), pairs).map_err(tap_error)?,
        (None, None) => {
            let tap = Tap::open(None, pairs).map_err(tap_error)?;
            let ip = config.ip.parse().map_err(|_| {
                Error::Device(format!("--net: ip={} is not an IPv4 address", config.ip))
            })?;
            let mask = config.mask.parse().map_err(|_| {
                Error::Device(format!(
                    "--net: mask={} is not an IPv4 netmask",
                    config.mask
                ))
            })?;
            tap.set_ipv4(ip, mask).map_err(tap_error)?;
            tap
        }
    };
    if let Some(host_mac) = config.host_mac.as_deref() {
        let mac = crate::config::parse_mac(host_mac)
            .ok_or_else(|| Error::Device(format!("--net: host_mac={host_mac} is not a MAC")))?;
        tap.set_mac(mac).map_err(tap_error)?;
    }
    if let Some(mtu) = config.mtu {
        tap.set_mtu(mtu).map_err(tap_error)?;
    }
    if config.fds.is_none() {
        tap.up().map_err(tap_error)?;
    }
    Ok(tap)
}

/// The session with the vhost-user-blk backend of `disk` (`vhost_user=on,socket=`).
fn connect_vhost_user_disk(disk: &crate::config::DiskConfig) -> Result<VhostUserBlkLink, Error> {
    let socket = disk
        .vhost_socket
        .as_deref()
        .ok_or_else(|| Error::Device("--disk vhost_user=on without socket=".into()))?;
    VhostUserBlkLink::connect(Path::new(socket), disk.num_queues, disk.queue_size)
        .map_err(|e| Error::device(format!("vhost-user disk {socket}"), e))
}

/// The session with the virtiofsd of the virtio-fs device `id` (`--fs tag=,socket=`).
fn connect_virtio_fs(id: &str, config: &crate::config::FsConfig) -> Result<VhostUserFsLink, Error> {
    VhostUserFsLink::connect(
        Path::new(&config.socket),
        &config.tag,
        config.num_queues,
        config.queue_size,
    )
    .map_err(|e| Error::device(format!("virtio-fs {id} ({})", config.socket), e))
}

/// The session with the vhost-user-net backend of `config` (`vhost_user=true,socket=`): the
/// VMM connects to it (`vhost_mode=client`) or listens for it (`server`).
fn connect_vhost_user_net(config: &crate::config::NetConfig) -> Result<VhostUserNetLink, Error> {
    let socket = config
        .vhost_socket
        .as_deref()
        .ok_or_else(|| Error::Device("--net vhost_user=true without socket=".into()))?;
    let mode = crate::config::vhost_user_mode(config.vhost_mode.as_deref()).ok_or_else(|| {
        Error::Device(format!(
            "--net vhost_mode={:?}: expected client or server",
            config.vhost_mode
        ))
    })?;
    let mac = config.mac.as_deref().unwrap_or_default();
    let params = VhostUserNetParams {
        mac: crate::config::parse_mac(mac)
            .ok_or_else(|| Error::Device(format!("--net: mac={mac} is not a MAC")))?,
        num_queues: config.num_queues,
        queue_size: config.queue_size,
        mtu: config.mtu,
        mode,
    };
    VhostUserNetLink::connect(Path::new(socket), &params)
        .map_err(|e| Error::device(format!("vhost-user net {socket}"), e))
}

/// The virtio-net device `config` describes, on `tap`.
fn new_net(tap: &Arc<Tap>, config: &crate::config::NetConfig) -> Result<Net, Error> {
    let mac = config.mac.as_deref().unwrap_or_default();
    let mac = crate::config::parse_mac(mac)
        .ok_or_else(|| Error::Device(format!("--net: mac={mac} is not a MAC")))?;
    let params = NetParams {
        mac,
        queue_pairs: tap.queue_pairs(),
        queue_size: config.queue_size,
        mtu: config.mtu,
        offload_csum: config.offload_csum,
        offload_tso: config.offload_tso,
    };
    Net::new(Arc::clone(tap), params).map_err(|e| Error::device(format!("net {}", tap.name()), e))
}

fn transport_description(transport: &DiskTransport) -> String {
    match transport {
        DiskTransport::Pci { bdf, .. } => format!("virtio-pci at {bdf}"),
        DiskTransport::Mmio { base, gsi, .. } => format!("virtio-mmio at {base:#x}, GSI {gsi}"),
    }
}

fn open_block(path: &Path, readonly: bool) -> Result<Block, Error> {
    Block::open(path, readonly).map_err(|e| Error::device(format!("disk {}", path.display()), e))
}

fn register_queue_notifiers(vm_fd: &VmFd, base: u64, queue_evts: &[EventFd]) -> Result<(), Error> {
    let address = IoEventAddress::Mmio(base + VIRTIO_MMIO_QUEUE_NOTIFY);
    for (queue, evt) in queue_evts.iter().enumerate() {
        vm_fd
            .register_ioevent(evt, &address, queue as u32)
            .map_err(|source| Error::Kvm {
                operation: "KVM_IOEVENTFD (virtio queue notify)",
                source,
            })?;
    }
    Ok(())
}

fn unregister_queue_notifiers(vm_fd: &VmFd, base: u64, queue_evts: &[EventFd]) {
    let address = IoEventAddress::Mmio(base + VIRTIO_MMIO_QUEUE_NOTIFY);
    for (queue, evt) in queue_evts.iter().enumerate() {
        if let Err(e) = vm_fd.unregister_ioevent(evt, &address, queue as u32) {
            log::warn!("removing the ioeventfd of queue {queue} at {base:#x}: {e}");
        }
    }
}

impl IoHandler for DeviceManager {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.pio_bus.read(u64::from(port), data).is_err() {
            // No device: the bus floats high, as on real hardware.
            data.fill(0xff);
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if let Err(e) = self.pio_bus.write(u64::from(port), data) {
            log::trace!("port write {port:#x} ignored: {e}");
        }
    }

    fn mmio_read(&self, address: u64, data: &mut [u8]) {
        if self.mmio_bus.read(address, data).is_err() {
            data.fill(0xff);
        }
    }

    fn mmio_write(&self, address: u64, data: &[u8]) {
        if let Err(e) = self.mmio_bus.write(address, data) {
            log::debug!("MMIO write {address:#x} ignored: {e}");
        }
    }
}
