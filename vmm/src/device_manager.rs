//! Builds the VM's devices from its config and wires them to KVM: COM1 on the port-I/O bus with an
//! irqfd on IRQ 4, the i8042 reset line, and virtio-blk disks on virtio-mmio at the platform
//! contract's addresses and GSIs (irqfd per GSI, ioeventfd per queue notify). vCPU threads reach
//! the devices through the `IoHandler` this module implements.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::virtio::{
    kernel_cmdline_token, virtio_mmio_slot, Block, MmioTransport, MmioTransportState,
    VIRTIO_MMIO_SIZE,
};
use devices::{Bus, EventFdInterrupt, I8042Device, SerialDevice, SerialState};
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ConsoleOutputMode, VmConfig};
use crate::events::VmEvents;
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
    /// Its interrupt line (GSI).
    pub irq: u32,
}

/// One virtio-blk disk on its virtio-mmio slot.
struct VirtioBlockSlot {
    transport: Arc<Mutex<MmioTransport>>,
    interrupt: Arc<EventFdInterrupt>,
    /// The disk's `id=`, or upstream's default `_disk<N>`: the key of its counters.
    id: String,
    /// What the disk was opened from, to open it again when restoring.
    path: PathBuf,
    readonly: bool,
    /// Guest-physical base of the slot's register window.
    base: u64,
}

impl VirtioBlockSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, MmioTransport> {
        self.transport
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Saved state of one virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The disk image, to catch a restore with the disks in another order.
    pub path: PathBuf,
    pub transport: MmioTransportState,
}

/// Saved state of every device, versioned with the rest of `VmState`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// `None` when the VM has no serial port (`--serial off`).
    pub serial: Option<SerialState>,
    /// One per disk, in `--disk` order.
    pub disks: Vec<BlockState>,
}

pub struct DeviceManager {
    pio_bus: Bus,
    mmio_bus: Bus,
    com1: Option<Com1>,
    disks: Vec<VirtioBlockSlot>,
    /// Kept for re-registering ioeventfds when a restore rebuilds a transport.
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    /// `virtio_mmio.device=` tokens for the kernel command line, one per virtio-mmio device.
    cmdline_tokens: Vec<String>,
}

impl DeviceManager {
    /// Creates every device `config` asks for and registers its interrupts with KVM.
    pub fn new(
        vm_fd: &Arc<VmFd>,
        config: &VmConfig,
        events: &Arc<VmEvents>,
        memory: &GuestMemoryMmap,
    ) -> Result<DeviceManager, Error> {
        let mut manager = DeviceManager {
            pio_bus: Bus::new(),
            mmio_bus: Bus::new(),
            com1: None,
            disks: Vec::new(),
            vm_fd: Arc::clone(vm_fd),
            memory: memory.clone(),
            cmdline_tokens: Vec::new(),
        };
        manager.add_serial(vm_fd, config)?;
        manager.add_i8042(events)?;
        for disk in config.disks.iter().flatten() {
            manager.add_virtio_block(disk)?;
        }
        if config.console.mode != ConsoleOutputMode::Off
            && config.console.mode != ConsoleOutputMode::Null
        {
            // Upstream's --console is a virtio-console; we offer none. Its default is tty, so this
            // is only worth a debug line.
            log::debug!(
                "--console {:?}: no virtio-console device in this VMM; use --serial",
                config.console.mode
            );
        }
        Ok(manager)
    }

    fn add_serial(&mut self, vm_fd: &VmFd, config: &VmConfig) -> Result<(), Error> {
        let output: Box<dyn Write + Send> = match config.serial.mode {
            ConsoleOutputMode::Off => return Ok(()),
            ConsoleOutputMode::Null => Box::new(io::sink()),
            ConsoleOutputMode::Tty => Box::new(io::stdout()),
            ConsoleOutputMode::File => {
                let path =
                    config.serial.file.as_ref().ok_or_else(|| {
                        Error::Device("--serial file= without a path".to_string())
                    })?;
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .map_err(|source| Error::SerialOutput {
                        path: PathBuf::from(path),
                        source,
                    })?;
                Box::new(file)
            }
            mode @ (ConsoleOutputMode::Pty | ConsoleOutputMode::Socket) => {
                return Err(Error::Device(format!(
                    "--serial {mode:?} is not supported (use off, null, tty or file=)"
                )))
            }
        };
        let interrupt = Arc::new(
            EventFdInterrupt::new().map_err(|e| Error::Device(format!("serial interrupt: {e}")))?,
        );
        vm_fd
            .register_irqfd(interrupt.eventfd(), devices::COM1_IRQ)
            .map_err(|source| Error::Kvm {
                operation: "KVM_IRQFD (serial)",
                source,
            })?;
        let output = SerialOutput(Arc::new(Mutex::new(output)));
        let device = Arc::new(Mutex::new(SerialDevice::new(
            interrupt.clone(),
            Box::new(output.clone()),
        )));
        self.pio_bus
            .insert(devices::COM1_BASE, devices::COM1_LEN, device.clone())
            .map_err(|e| Error::Device(format!("serial: {e}")))?;
        self.com1 = Some(Com1 {
            device,
            interrupt,
            output,
        });
        Ok(())
    }

    fn add_i8042(&mut self, events: &Arc<VmEvents>) -> Result<(), Error> {
        let reset = events.reset.try_clone().map_err(|source| Error::EventFd {
            operation: "clone (i8042 reset)",
            source,
        })?;
        self.pio_bus
            .insert(
                devices::I8042_BASE,
                devices::I8042_LEN,
                Arc::new(Mutex::new(I8042Device::new(reset))),
            )
            .map_err(|e| Error::Device(format!("i8042: {e}")))
    }

    /// Puts a virtio-blk disk on the next virtio-mmio slot: irqfd on the slot's GSI, ioeventfd on
    /// its QueueNotify register (so a notify wakes the disk's I/O thread without a vCPU exit).
    fn add_virtio_block(&mut self, disk: &crate::config::DiskConfig) -> Result<(), Error> {
        let path = PathBuf::from(
            disk.path
                .as_deref()
                .ok_or_else(|| Error::Device("--disk without path=".to_string()))?,
        );
        let index = u32::try_from(self.disks.len())
            .map_err(|_| Error::Device("too many disks".to_string()))?;
        let (base, gsi) = virtio_mmio_slot(index);
        // The slot must stay inside the platform's virtio-mmio window and GSI range.
        arch::layout::mmio_device_address(index)
            .map_err(|e| Error::Device(format!("disk {}: {e}", path.display())))?;
        let interrupt = Arc::new(
            EventFdInterrupt::new()
                .map_err(|e| Error::Device(format!("disk {} interrupt: {e}", path.display())))?,
        );
        self.vm_fd
            .register_irqfd(interrupt.eventfd(), gsi)
            .map_err(|source| Error::Kvm {
                operation: "KVM_IRQFD (virtio-blk)",
                source,
            })?;
        let block = open_block(&path, disk.readonly)?;
        let transport = MmioTransport::new(Box::new(block), self.memory.clone(), interrupt.clone())
            .map_err(|e| Error::Device(format!("disk {}: {e}", path.display())))?;
        register_queue_notifiers(&self.vm_fd, base, transport.queue_evts())?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(base, VIRTIO_MMIO_SIZE, transport.clone())
            .map_err(|e| Error::Device(format!("disk {}: {e}", path.display())))?;
        self.cmdline_tokens.push(kernel_cmdline_token(index));
        log::info!(
            "disk {} on virtio-mmio at {base:#x}, GSI {gsi}{}",
            path.display(),
            if disk.readonly { ", read-only" } else { "" }
        );
        self.disks.push(VirtioBlockSlot {
            transport,
            interrupt,
            id: disk.id.clone().unwrap_or_else(|| format!("_disk{index}")),
            path,
            readonly: disk.readonly,
            base,
        });
        Ok(())
    }

    /// Stops the disks' I/O threads from taking new requests and waits for those in flight, so
    /// device state and guest memory are quiescent.
    pub fn pause(&self) -> Result<(), Error> {
        for disk in &self.disks {
            disk.lock()
                .pause()
                .map_err(|e| Error::Device(format!("pausing disk {}: {e}", disk.path.display())))?;
        }
        Ok(())
    }

    /// Serves disk requests again, including those the guest posted while paused.
    pub fn resume(&self) -> Result<(), Error> {
        for disk in &self.disks {
            disk.lock().resume().map_err(|e| {
                Error::Device(format!("resuming disk {}: {e}", disk.path.display()))
            })?;
        }
        Ok(())
    }

    /// Makes every completed disk write durable (fdatasync).
    pub fn flush_disks(&self) -> Result<(), Error> {
        for disk in &self.disks {
            disk.lock().flush_backend().map_err(|e| {
                Error::Device(format!("flushing disk {}: {e}", disk.path.display()))
            })?;
        }
        Ok(())
    }

    /// Per-device I/O counters (`vm.counters`): device id -> counter name -> value. Counters start
    /// from 0 in each VMM process (a restored disk counts anew).
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.disks
            .iter()
            .map(|disk| {
                let counters = disk
                    .lock()
                    .counters()
                    .into_iter()
                    .map(|(name, value)| (name.to_string(), value))
                    .collect();
                (disk.id.clone(), counters)
            })
            .collect()
    }

    /// The devices the guest sees and the resources each occupies (`vm.info`'s device tree):
    /// COM1 (when `--serial` is not off) and each virtio-mmio disk.
    pub fn device_resources(&self) -> Vec<DeviceResources> {
        let serial = self.com1.as_ref().map(|_| DeviceResources {
            id: "__serial".to_owned(),
            pio: Some((devices::COM1_BASE, devices::COM1_LEN)),
            mmio: None,
            irq: devices::COM1_IRQ,
        });
        let disks = self.disks.iter().enumerate().map(|(index, disk)| {
            let (_, gsi) = virtio_mmio_slot(index as u32);
            DeviceResources {
                id: disk.id.clone(),
                pio: None,
                mmio: Some((disk.base, VIRTIO_MMIO_SIZE)),
                irq: gsi,
            }
        });
        serial.into_iter().chain(disks).collect()
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
                    .map_err(|e| Error::State(format!("serial: {e}")))?,
            ),
        };
        let disks = self
            .disks
            .iter()
            .map(|disk| {
                let transport = disk
                    .lock()
                    .state()
                    .map_err(|e| Error::State(format!("disk {}: {e}", disk.path.display())))?;
                Ok(BlockState {
                    path: disk.path.clone(),
                    transport,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(DevicesState { serial, disks })
    }

    /// Puts every device back in the saved state. The VM must be paused.
    pub fn restore_state(&self, state: &DevicesState) -> Result<(), Error> {
        match (&self.com1, &state.serial) {
            (Some(com1), Some(saved)) => {
                let restored = SerialDevice::from_state(
                    saved,
                    com1.interrupt.clone(),
                    Box::new(com1.output.clone()),
                )
                .map_err(|e| Error::State(format!("serial: {e}")))?;
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
            self.restore_disk(disk, &saved.transport)?;
        }
        Ok(())
    }

    /// Rebuilds a disk's transport from saved state. The rebuilt transport has new queue-notify
    /// eventfds, so the ioeventfds move over to them; it stays paused until `resume`.
    fn restore_disk(
        &self,
        disk: &VirtioBlockSlot,
        saved: &MmioTransportState,
    ) -> Result<(), Error> {
        let block = open_block(&disk.path, disk.readonly)?;
        let restored = MmioTransport::restore(
            Box::new(block),
            self.memory.clone(),
            disk.interrupt.clone(),
            saved,
        )
        .map_err(|e| Error::State(format!("disk {}: {e}", disk.path.display())))?;
        let mut transport = disk.lock();
        unregister_queue_notifiers(&self.vm_fd, disk.base, transport.queue_evts());
        register_queue_notifiers(&self.vm_fd, disk.base, restored.queue_evts())?;
        // Dropping the old transport stops its I/O thread.
        *transport = restored;
        Ok(())
    }
}

fn open_block(path: &Path, readonly: bool) -> Result<Block, Error> {
    Block::open(path, readonly).map_err(|e| Error::Device(format!("disk {}: {e}", path.display())))
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
