//! PCI segment 0 as cloud-hypervisor presents it on x86_64: bus 0 with a host bridge at
//! 00:00.0, configuration access through the legacy ports 0xCF8/0xCFC and an ECAM window, BARs
//! the guest sizes and moves, capability lists and MSI-X.
//!
//! Nothing here knows KVM: [`PciConfigIo`] and [`PciConfigMmio`] are [`crate::BusDevice`]s for
//! the port I/O and MMIO buses, BAR moves are reported through [`BarRelocationHandler`], and
//! MSI-X messages leave through an [`MsiInterruptSink`] the VMM backs with GSI routes and irqfds.
//! See `docs/platform.md`.

mod config;
mod msix;
mod root;

use std::fmt;

pub use config::{
    Bar, BarKind, BarRelocation, PciConfiguration, PciConfigurationState, PciHeader, BAR_COUNT,
    CAPABILITIES_START, COMMAND_BUS_MASTER, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE,
    PCI_CONFIG_SPACE_SIZE, PCI_CONFIG_STATE_VERSION, PCI_EXTENDED_CONFIG_SPACE_SIZE, REG_BAR0,
    REG_CAPABILITIES, REG_CLASS_REVISION, REG_COMMAND, REG_EXPANSION_ROM, REG_HEADER_TYPE,
    REG_INTERRUPT_LINE, REG_STATUS, REG_SUBSYSTEM, REG_VENDOR_ID, STATUS_CAPABILITIES_LIST,
};
pub use msix::{
    MsiInterruptSink, MsixConfig, MsixDelivery, MsixEntryState, MsixState, MSIX_CAPABILITY_ID,
    MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK, MSIX_ENTRY_SIZE, MSIX_MAX_VECTORS,
    MSIX_STATE_VERSION, MSIX_VECTOR_MASKED,
};
pub use root::{
    BarRelocationHandler, PciBus, PciBusState, PciConfigIo, PciConfigIoState, PciConfigMmio,
    PciFunctionState, PciHostBridge, PCI_BUS_STATE_VERSION, PCI_CONFIG_IO_STATE_VERSION,
    PCI_DEVICES_PER_BUS, PCI_HOST_BRIDGE_DEVICE_ID, PCI_HOST_BRIDGE_VENDOR_ID,
};

/// Errors of the PCI models. Guest accesses never produce one (they are answered as hardware
/// does); these come from how the VMM builds devices and from saved state.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("BAR {index} does not exist (a type-0 header has BARs 0-5; a 64-bit BAR takes two)")]
    BarIndex { index: usize },
    #[error("BAR register {index} is already used")]
    BarTaken { index: usize },
    #[error("BAR {index}: size {size:#x} is not a power of two in the range its kind allows")]
    BarSize { index: usize, size: u64 },
    #[error("capability {id:#x} of {len} bytes does not fit ({free} bytes left)")]
    CapabilitySpaceFull { id: u8, len: usize, free: usize },
    #[error("capability {id:#x}: {writable} writable-mask bytes for a body of {body}")]
    CapabilityMask {
        id: u8,
        writable: usize,
        body: usize,
    },
    #[error("PCI device number {0} is not on the bus (0-31)")]
    SlotInvalid(u8),
    #[error("PCI device number {0} is already taken")]
    SlotTaken(u8),
    #[error("PCI bus 0 has no free device number")]
    BusFull,
    #[error("MSI-X needs 1 to 2048 vectors, {0} asked")]
    MsixVectorCount(usize),
    #[error("MSI-X vector {vector} does not exist (the table has {count})")]
    MsixVectorOutOfRange { vector: u16, count: usize },
    #[error("MSI-X {what} at BAR {bar} offset {offset:#x} is misaligned or outside the BAR")]
    MsixPlacement {
        what: &'static str,
        bar: usize,
        offset: u64,
    },
    #[error("PCI state has version {found}, this build understands version {expected}")]
    StateVersion { found: u32, expected: u32 },
    #[error("PCI state does not match the device model: {0}")]
    StateMismatch(&'static str),
    #[error("the PCI function at device {0} panicked earlier and its lock is poisoned")]
    DeviceLockPoisoned(u8),
}

/// Shorthand for the PCI models.
pub type PciResult<T> = std::result::Result<T, PciError>;

/// Refuses saved state of a version this build does not understand.
fn check_state_version(found: u32, expected: u32) -> PciResult<()> {
    if found == expected {
        Ok(())
    } else {
        Err(PciError::StateVersion { found, expected })
    }
}

/// A bus/device/function address on segment 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciBdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciBdf {
    /// Device `device`, function 0, on bus 0.
    pub const fn new(device: u8) -> Self {
        Self {
            bus: 0,
            device,
            function: 0,
        }
    }
}

/// Formats as `vm.info` shows `pci_bdf`: `0000:00:01.0`.
impl fmt::Display for PciBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// A guest write the VMM turns into an eventfd signal instead of a vCPU exit (KVM ioeventfd):
/// a write of 4 bytes equal to `datamatch` (any write when `None`) at `offset` in BAR `bar`.
/// The VMM registers it at the BAR's address and moves it with the BAR.
pub struct PciIoEventFd<'a> {
    pub bar: usize,
    pub offset: u64,
    pub datamatch: Option<u32>,
    pub evt: &'a vmm_sys_util::eventfd::EventFd,
}

/// A function on the bus. The default methods serve the configuration space as it is; a device
/// with capabilities that act (MSI-X enable and mask) overrides `write_config` to apply them
/// after the write. A device with BARs serves their accesses in `read_bar`/`write_bar` (the VMM
/// maps each BAR on its MMIO or port bus where the guest put it).
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;

    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config().read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarRelocation> {
        self.config_mut().write(offset, data)
    }

    /// A guest read of `data.len()` bytes at `offset` from the start of BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0xFF);
    }

    /// A guest write at `offset` from the start of BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }

    /// The ioeventfds the VMM registers for this device (asked when the device is added and
    /// again when the VMM re-registers them, e.g. after a restore replaced the eventfds).
    fn ioeventfds(&self) -> Vec<PciIoEventFd<'_>> {
        Vec::new()
    }

    /// The guest moved a BAR; the VMM has already moved its region and ioeventfds.
    fn bar_moved(&mut self, relocation: &BarRelocation) {
        let _ = relocation;
    }
}

#[cfg(test)]
mod tests;
