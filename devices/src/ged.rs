//! ACPI Generic Event Device (`ACPI0013`): the register page the DSDT's `\_SB_.GED_` declares
//! (see `arch::acpi`) and its interrupt. The register is one byte at offset 0 of the page: the
//! events pending since the guest last read it, [`GED_POWER_BUTTON`] being the only one. The
//! guest's `_EVT` method reads it once per interrupt, so a read returns the pending events and
//! clears them (as upstream's device does); writes are ignored. Every other byte of the page
//! reads 0.
//!
//! The pending events are the device's state, saved with the rest: a power-button press the
//! guest has not read yet survives a power failure or a snapshot.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{BusDevice, InterruptLine, Result};

/// Register bit of a power-button press: bit 3, the one the DSDT's `_EVT` tests
/// (`arch::acpi::GED_POWER_BUTTON`; this crate takes no layout from `arch`, a test pins them equal).
pub const GED_POWER_BUTTON: u8 = 1 << 3;
/// Register bit of "PCI devices changed" (upstream's bit 2): `_EVT` runs `\_SB_.PHPR.PSCN`.
pub const GED_PCI_DEVICES_CHANGED: u8 = 1 << 2;

/// Version of [`GedState`] written by this build.
pub const GED_STATE_VERSION: u32 = 1;

/// Saved state of the GED: the events the guest has not read yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GedState {
    pub version: u32,
    pub pending: u8,
}

/// The GED on the MMIO bus at `arch::layout::GED_MMIO_START`; its line is GSI
/// `arch::layout::GED_GSI`.
pub struct GedDevice {
    pending: u8,
    interrupt: Arc<dyn InterruptLine>,
}

impl GedDevice {
    pub fn new(interrupt: Arc<dyn InterruptLine>) -> Self {
        Self {
            pending: 0,
            interrupt,
        }
    }

    /// A power-button press: sets [`GED_POWER_BUTTON`] and raises the interrupt, whose `_EVT`
    /// notifies `\_SB_.PWRB`.
    pub fn notify_power_button(&mut self) -> std::io::Result<()> {
        self.pending |= GED_POWER_BUTTON;
        self.interrupt.trigger()
    }

    /// A PCI device came or is to go (the hotplug controller's bits say which): sets
    /// [`GED_PCI_DEVICES_CHANGED`] and raises the interrupt.
    pub fn notify_pci_devices_changed(&mut self) -> std::io::Result<()> {
        self.pending |= GED_PCI_DEVICES_CHANGED;
        self.interrupt.trigger()
    }

    /// The events not read by the guest yet.
    pub fn pending(&self) -> u8 {
        self.pending
    }

    pub fn state(&self) -> GedState {
        GedState {
            version: GED_STATE_VERSION,
            pending: self.pending,
        }
    }

    /// Puts back saved pending events. The interrupt is raised again when events are pending:
    /// an edge the guest had not taken before the save is lost with the old VM's interrupt
    /// controller, and a second edge for one the guest did take finds the register empty and
    /// notifies nothing.
    pub fn restore(&mut self, state: &GedState) -> Result<()> {
        crate::error::check_state_version("GED", state.version, GED_STATE_VERSION)?;
        self.pending = state.pending;
        if self.pending != 0 {
            self.interrupt
                .trigger()
                .map_err(crate::Error::GedInterrupt)?;
        }
        Ok(())
    }
}

impl BusDevice for GedDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = std::mem::take(&mut self.pending);
            }
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventFdInterrupt;

    fn device() -> (GedDevice, Arc<EventFdInterrupt>) {
        let line = Arc::new(EventFdInterrupt::new().unwrap());
        (GedDevice::new(line.clone()), line)
    }

    fn read(ged: &mut GedDevice, offset: u64, width: usize) -> Vec<u8> {
        let mut data = vec![0xAA; width];
        ged.read(offset, &mut data);
        data
    }

    #[test]
    fn power_button_sets_bit_3_raises_the_line_and_a_read_clears_it() {
        let (mut ged, line) = device();
        assert_eq!(read(&mut ged, 0, 1), [0]);
        assert!(
            line.eventfd().read().is_err(),
            "no interrupt before a press"
        );
        ged.notify_power_button().unwrap();
        assert_eq!(line.eventfd().read().unwrap(), 1);
        assert_eq!(
            GED_POWER_BUTTON,
            arch::acpi::GED_POWER_BUTTON,
            "the bit the DSDT tests"
        );
        assert_eq!(read(&mut ged, 0, 1), [0x08]);
        assert_eq!(read(&mut ged, 0, 1), [0], "the read took the event");
    }

    #[test]
    fn pci_devices_changed_sets_bit_2_next_to_the_power_button() {
        let (mut ged, line) = device();
        ged.notify_pci_devices_changed().unwrap();
        ged.notify_power_button().unwrap();
        assert_eq!(line.eventfd().read().unwrap(), 2);
        assert_eq!(
            GED_PCI_DEVICES_CHANGED,
            arch::acpi::GED_PCI_DEVICES_CHANGED,
            "the bit the DSDT tests"
        );
        assert_eq!(read(&mut ged, 0, 1), [0x0C]);
    }

    #[test]
    fn wider_reads_carry_the_byte_low_and_other_offsets_read_zero() {
        let (mut ged, _line) = device();
        ged.notify_power_button().unwrap();
        assert_eq!(read(&mut ged, 4, 4), [0; 4]);
        assert_eq!(read(&mut ged, 1, 1), [0]);
        ged.write(0, &[0xFF]);
        assert_eq!(read(&mut ged, 0, 4), [0x08, 0, 0, 0]);
    }

    #[test]
    fn pending_press_survives_a_state_round_trip_and_is_raised_again() {
        let (mut ged, _line) = device();
        ged.notify_power_button().unwrap();
        let json = serde_json::to_string(&ged.state()).unwrap();
        let (mut restored, line) = device();
        restored
            .restore(&serde_json::from_str(&json).unwrap())
            .unwrap();
        assert_eq!(line.eventfd().read().unwrap(), 1, "interrupt raised again");
        assert_eq!(read(&mut restored, 0, 1), [GED_POWER_BUTTON]);

        let (mut quiet, line) = device();
        quiet.restore(&restored.state()).unwrap();
        assert!(
            line.eventfd().read().is_err(),
            "nothing pending, no interrupt"
        );
    }

    #[test]
    fn foreign_state_version_is_refused() {
        let (mut ged, _line) = device();
        let state = GedState {
            version: 2,
            pending: GED_POWER_BUTTON,
        };
        assert!(ged.restore(&state).is_err());
        assert_eq!(ged.pending(), 0);
    }
}
