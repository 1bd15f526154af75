//! Emulated devices of NV-Hypervisor: a 16550 serial port (with its output files and
//! pseudo-terminals in `console_io`), the i8042 reset line, the ACPI shutdown/reset port, the ACPI
//! Generic Event Device (power button), the ISA pvpanic port, and virtio-blk over a virtio-mmio
//! (version 2) transport; the PCI bus 0 model with MSI-X (`pci`) that virtio-pci will sit on.
//!
//! The crate knows nothing of KVM. The VMM routes vCPU exits into a [`Bus`], wires each
//! [`InterruptLine`] to an irqfd, and registers the virtio queue-notify eventfds as ioeventfds.
//! Every device exposes versioned serde state so a power-fail save can capture it and an in-place
//! recovery can rebuild it (see `docs/devices.md`).

mod acpi_shutdown;
mod bus;
pub mod console_io;
mod error;
mod ged;
mod i8042;
mod interrupt;
pub mod pci;
mod pci_hotplug;
mod pvpanic;
mod serial;
mod state_mirror;
pub mod virtio;

pub use acpi_shutdown::{
    AcpiShutdownDevice, ACPI_POWER_OFF_VALUE, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE,
    ACPI_SHUTDOWN_LEN,
};
pub use bus::{Bus, BusDevice};
pub use error::{Error, Result};
pub use ged::{GedDevice, GedState, GED_PCI_DEVICES_CHANGED, GED_POWER_BUTTON, GED_STATE_VERSION};
pub use i8042::{I8042Device, I8042_BASE, I8042_LEN};
pub use interrupt::{EventFdInterrupt, InterruptLine};
pub use pci_hotplug::{
    PciHotplugController, PciHotplugState, B0EJ_OFFSET, PCID_OFFSET, PCIU_OFFSET,
    PCI_HOTPLUG_REGISTERS_LEN, PCI_HOTPLUG_SLOTS, PCI_HOTPLUG_STATE_VERSION, PSEG_OFFSET,
};
pub use pvpanic::{
    PvPanicDevice, PvPanicEvent, PvPanicHandler, PVPANIC_CRASH_LOADED, PVPANIC_LEN,
    PVPANIC_PANICKED, PVPANIC_PORT, PVPANIC_SUPPORTED_EVENTS,
};
pub use serial::{SerialDevice, SerialState, COM1_BASE, COM1_IRQ, COM1_LEN, SERIAL_STATE_VERSION};
