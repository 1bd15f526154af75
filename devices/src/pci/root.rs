//! Bus 0 of segment 0 with its host bridge, and the two ways a guest reaches configuration
//! space: the legacy 0xCF8/0xCFC port pair and the ECAM (MMCONFIG) window.

use std::sync::{Arc, Mutex};

use log::warn;
use serde::{Deserialize, Serialize};

use super::{
    check_state_version, BarRelocation, PciBdf, PciConfiguration, PciConfigurationState, PciDevice,
    PciError, PciHeader, PciResult, PCI_CONFIG_SPACE_SIZE, PCI_EXTENDED_CONFIG_SPACE_SIZE,
};
use crate::BusDevice;

/// The host bridge's identity, as cloud-hypervisor presents it: Intel vendor ID with device ID
/// 0x0D57 (the ID firmware such as EDK2's CloudHv platform keys on), class 06/00 (host bridge).
pub const PCI_HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
pub const PCI_HOST_BRIDGE_DEVICE_ID: u16 = 0x0D57;
const CLASS_BRIDGE: u8 = 0x06;
const SUBCLASS_HOST_BRIDGE: u8 = 0x00;

/// Device numbers on one bus.
pub const PCI_DEVICES_PER_BUS: u8 = 32;

/// Version of [`PciBusState`].
pub const PCI_BUS_STATE_VERSION: u32 = 1;
/// Version of [`PciConfigIoState`].
pub const PCI_CONFIG_IO_STATE_VERSION: u32 = 1;

/// 00:00.0: no BARs, no capabilities; the guest can only toggle its command bits.
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl PciHostBridge {
    pub fn new() -> Self {
        Self {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: PCI_HOST_BRIDGE_VENDOR_ID,
                device_id: PCI_HOST_BRIDGE_DEVICE_ID,
                revision_id: 0,
                class: CLASS_BRIDGE,
                subclass: SUBCLASS_HOST_BRIDGE,
                prog_if: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
                interrupt_pin: 0,
            }),
        }
    }
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for PciHostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

/// Told when the guest moves a BAR, so the VMM can move the device's region on its MMIO or
/// port I/O bus (and its ioeventfds). Called with the bus lock held: do not reenter the bus.
pub trait BarRelocationHandler: Send {
    fn relocate(&mut self, bdf: PciBdf, relocation: &BarRelocation);
}

/// One function's saved configuration space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciFunctionState {
    pub device: u8,
    pub config: PciConfigurationState,
}

/// Configuration space of every function on bus 0 (device-specific state such as MSI-X is
/// saved by each device).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciBusState {
    pub version: u32,
    pub functions: Vec<PciFunctionState>,
}

type Slot = Option<Arc<Mutex<dyn PciDevice>>>;

/// Bus 0: a host bridge at device 0 and up to 31 devices, function 0 each.
pub struct PciBus {
    slots: Vec<Slot>,
    relocation_handler: Option<Box<dyn BarRelocationHandler>>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with only the host bridge at 00:00.0.
    pub fn new() -> Self {
        let mut slots: Vec<Slot> = (0..PCI_DEVICES_PER_BUS).map(|_| None).collect();
        slots[0] = Some(Arc::new(Mutex::new(PciHostBridge::new())));
        Self {
            slots,
            relocation_handler: None,
        }
    }

    /// Puts `device` at the lowest free device number (upstream hands them out the same way,
    /// from 1 up) and returns its address.
    pub fn add_device(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> PciResult<PciBdf> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::BusFull)?;
        self.add_device_at(slot as u8, device)
    }

    /// Puts `device` at device number `slot` (1..=31).
    pub fn add_device_at(
        &mut self,
        slot: u8,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> PciResult<PciBdf> {
        let entry = self
            .slots
            .get_mut(usize::from(slot))
            .ok_or(PciError::SlotInvalid(slot))?;
        if entry.is_some() {
            return Err(PciError::SlotTaken(slot));
        }
        *entry = Some(device);
        Ok(PciBdf::new(slot))
    }

    /// Takes the device at device number `slot` (1..=31) off the bus: a hot unplug. The host
    /// bridge cannot be removed; an empty slot is [`PciError::SlotInvalid`].
    pub fn remove_device(&mut self, slot: u8) -> PciResult<Arc<Mutex<dyn PciDevice>>> {
        if slot == 0 {
            return Err(PciError::SlotInvalid(slot));
        }
        self.slots
            .get_mut(usize::from(slot))
            .and_then(Option::take)
            .ok_or(PciError::SlotInvalid(slot))
    }

    /// The function at `bdf`, if present.
    pub fn device(&self, bdf: PciBdf) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bdf.bus != 0 || bdf.function != 0 {
            return None;
        }
        self.slots.get(usize::from(bdf.device))?.as_ref()
    }

    /// Addresses of every function on the bus, host bridge first (what `vm.info` lists as
    /// `pci_bdf`).
    pub fn functions(&self) -> impl Iterator<Item = PciBdf> + '_ {
        (0..PCI_DEVICES_PER_BUS)
            .filter(|&slot| self.slots[usize::from(slot)].is_some())
            .map(PciBdf::new)
    }

    /// Installs the handler told about BAR moves.
    pub fn set_relocation_handler(&mut self, handler: Box<dyn BarRelocationHandler>) {
        self.relocation_handler = Some(handler);
    }

    /// A configuration read; an absent function reads all-ones (a master abort), which is how
    /// the guest learns nobody is there.
    pub fn read_config(&self, bdf: PciBdf, offset: u16, data: &mut [u8]) {
        data.fill(0xFF);
        let Some(device) = self.device(bdf) else {
            return;
        };
        match device.lock() {
            Ok(mut device) => device.read_config(offset, data),
            Err(_) => warn!("pci: {bdf} lock poisoned, read answered with all-ones"),
        }
    }

    /// A configuration write; dropped for an absent function.
    pub fn write_config(&mut self, bdf: PciBdf, offset: u16, data: &[u8]) {
        let Some(device) = self.device(bdf) else {
            return;
        };
        let relocation = match device.lock() {
            Ok(mut device) => device.write_config(offset, data),
            Err(_) => {
                warn!("pci: {bdf} lock poisoned, write dropped");
                return;
            }
        };
        if let (Some(relocation), Some(handler)) = (relocation, self.relocation_handler.as_mut()) {
            handler.relocate(bdf, &relocation);
        }
    }

    /// Configuration space of every function.
    pub fn state(&self) -> PciResult<PciBusState> {
        let mut functions = Vec::new();
        for (slot, device) in self.slots.iter().enumerate() {
            if let Some(device) = device {
                let device = device
                    .lock()
                    .map_err(|_| PciError::DeviceLockPoisoned(slot as u8))?;
                functions.push(PciFunctionState {
                    device: slot as u8,
                    config: device.config().state(),
                });
            }
        }
        Ok(PciBusState {
            version: PCI_BUS_STATE_VERSION,
            functions,
        })
    }

    /// Loads saved configuration spaces into a bus populated with the same devices at the same
    /// numbers. BAR moves are not reported: the caller maps every BAR from the restored
    /// [`PciConfiguration::bars`] once.
    pub fn restore(&mut self, state: &PciBusState) -> PciResult<()> {
        check_state_version(state.version, PCI_BUS_STATE_VERSION)?;
        let occupied: Vec<u8> = self.functions().map(|bdf| bdf.device).collect();
        let saved: Vec<u8> = state.functions.iter().map(|f| f.device).collect();
        if occupied != saved {
            return Err(PciError::StateMismatch("devices on the bus"));
        }
        for function in &state.functions {
            let slot = function.device;
            if let Some(device) = &self.slots[usize::from(slot)] {
                device
                    .lock()
                    .map_err(|_| PciError::DeviceLockPoisoned(slot))?
                    .config_mut()
                    .restore(&function.config)?;
            }
        }
        Ok(())
    }
}

fn lock_bus(bus: &Mutex<PciBus>) -> Option<std::sync::MutexGuard<'_, PciBus>> {
    bus.lock()
        .map_err(|_| warn!("pci: bus lock poisoned, configuration access dropped"))
        .ok()
}

/// CONFIG_ADDRESS: enable, bus 23:16, device 15:11, function 10:8, register 7:2.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Bits of CONFIG_ADDRESS that hold something (bits 30:24 reserved, 1:0 read as zero).
const CONFIG_ADDRESS_MASK: u32 = CONFIG_ADDRESS_ENABLE | 0x00FF_FFFC;
/// Offset of CONFIG_DATA in the 8-port range at 0xCF8.
const CONFIG_DATA_OFFSET: u64 = 4;

/// The saved CONFIG_ADDRESS latch: a guest stopped between its `out` to 0xCF8 and its access to
/// 0xCFC continues with the same register after a restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigIoState {
    pub version: u32,
    pub config_address: u32,
}

/// The legacy configuration mechanism on ports 0xCF8..=0xCFF (insert at
/// `arch::layout::PCI_CONFIG_PORT`, `PCI_CONFIG_PORT_COUNT` ports).
pub struct PciConfigIo {
    bus: Arc<Mutex<PciBus>>,
    config_address: u32,
}

impl PciConfigIo {
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Self {
            bus,
            config_address: 0,
        }
    }

    /// The function and register CONFIG_DATA at `data_offset` (0..=3) currently selects.
    fn target(&self, data_offset: u64) -> Option<(PciBdf, u16)> {
        if self.config_address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let bdf = PciBdf {
            bus: (self.config_address >> 16) as u8,
            device: ((self.config_address >> 11) & 0x1F) as u8,
            function: ((self.config_address >> 8) & 0x7) as u8,
        };
        Some((
            bdf,
            (self.config_address & 0xFC) as u16 + data_offset as u16,
        ))
    }

    pub fn state(&self) -> PciConfigIoState {
        PciConfigIoState {
            version: PCI_CONFIG_IO_STATE_VERSION,
            config_address: self.config_address,
        }
    }

    pub fn restore(&mut self, state: &PciConfigIoState) -> PciResult<()> {
        check_state_version(state.version, PCI_CONFIG_IO_STATE_VERSION)?;
        self.config_address = state.config_address & CONFIG_ADDRESS_MASK;
        Ok(())
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.config_address.to_le_bytes());
        } else if offset >= CONFIG_DATA_OFFSET {
            // Only CONFIG_ADDRESS as a dword is the address register; byte and word accesses
            // to 0xCF8..=0xCFB are other (ISA) registers on real chipsets, absent here.
            let within = offset - CONFIG_DATA_OFFSET;
            if within + data.len() as u64 > 4 {
                return;
            }
            if let (Some((bdf, register)), Some(bus)) = (self.target(within), lock_bus(&self.bus)) {
                bus.read_config(bdf, register, data);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.config_address = value & CONFIG_ADDRESS_MASK;
        } else if offset >= CONFIG_DATA_OFFSET {
            let within = offset - CONFIG_DATA_OFFSET;
            if within + data.len() as u64 > 4 {
                return;
            }
            if let (Some((bdf, register)), Some(mut bus)) =
                (self.target(within), lock_bus(&self.bus))
            {
                bus.write_config(bdf, register, data);
            }
        }
    }
}

/// Bytes of ECAM per bus: 32 devices x 8 functions x 4 KiB.
const ECAM_BUS_SIZE: u64 = 1 << 20;

/// The ECAM (MMCONFIG) window: function `(bus, device, function)`'s 4 KiB at
/// `bus << 20 | device << 15 | function << 12` (insert at `arch::layout::PCI_ECAM_START` with
/// `PCI_ECAM_SIZE`).
pub struct PciConfigMmio {
    bus: Arc<Mutex<PciBus>>,
}

impl PciConfigMmio {
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Self { bus }
    }

    /// The function and register at `offset`; `None` for accesses that are not naturally
    /// aligned 1/2/4-byte ones (ECAM takes no wider or split accesses) or beyond bus 255.
    fn target(offset: u64, len: usize) -> Option<(PciBdf, u16)> {
        if !matches!(len, 1 | 2 | 4)
            || !offset.is_multiple_of(len as u64)
            || offset >= 256 * ECAM_BUS_SIZE
        {
            return None;
        }
        let bdf = PciBdf {
            bus: (offset >> 20) as u8,
            device: ((offset >> 15) & 0x1F) as u8,
            function: ((offset >> 12) & 0x7) as u8,
        };
        Some((
            bdf,
            (offset % u64::from(PCI_EXTENDED_CONFIG_SPACE_SIZE)) as u16,
        ))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
        if let (Some((bdf, register)), Some(bus)) =
            (Self::target(offset, data.len()), lock_bus(&self.bus))
        {
            bus.read_config(bdf, register, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some((bdf, register)), Some(mut bus)) =
            (Self::target(offset, data.len()), lock_bus(&self.bus))
        {
            // The extended space is read-only zero; keep writes to the conventional space.
            if register < PCI_CONFIG_SPACE_SIZE {
                bus.write_config(bdf, register, data);
            }
        }
    }
}
