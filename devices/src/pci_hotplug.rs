//! ACPI PCI hotplug controller: the register block behind the DSDT's `\_SB_.PHPR` (see
//! `arch::acpi`), as upstream cloud-hypervisor presents it. Four 32-bit registers:
//!
//! | offset | name | read | write |
//! |---|---|---|---|
//! | 0x0 | `PCIU` | slots that came up since the last read (bit n = device n), cleared by the read | ignored |
//! | 0x4 | `PCID` | slots asked to go down since the last read, cleared by the read | ignored |
//! | 0x8 | `B0EJ` | 0 | bit n set: the guest ejected device n (its `_EJ0` ran) |
//! | 0xC | `PSEG` | the selected PCI segment | selects the segment the other three registers mean |
//!
//! The VMM sets a slot's up or down bit and raises the GED's "PCI devices changed" event; the
//! guest's `_EVT` runs `\_SB_.PHPR.PSCN`, which reads `PCIU`/`PCID` and notifies the slots'
//! `Sxxx` devices (bus check / eject request). An eject is not carried out on the vCPU thread
//! that wrote `B0EJ`: the slots are recorded and the VMM is woken through an eventfd to take
//! them ([`PciHotplugController::take_ejected`]) on its own thread.
//!
//! The pending bits are the device's state: an event the guest has not read survives a power
//! failure or a snapshot.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Register offsets (upstream's).
pub const PCIU_OFFSET: u64 = 0x0;
pub const PCID_OFFSET: u64 = 0x4;
pub const B0EJ_OFFSET: u64 = 0x8;
pub const PSEG_OFFSET: u64 = 0xC;
/// Bytes the four registers take (the `PCST` operation region of the DSDT).
pub const PCI_HOTPLUG_REGISTERS_LEN: u64 = 0x10;
/// PCI device numbers on a bus (one bit each in the bitmaps).
pub const PCI_HOTPLUG_SLOTS: u8 = 32;

/// Version of [`PciHotplugState`] written by this build.
pub const PCI_HOTPLUG_STATE_VERSION: u32 = 1;

/// Saved state of the controller (segment 0 only: this VMM has one segment).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciHotplugState {
    pub version: u32,
    /// Slots come up that the guest has not read from `PCIU` yet.
    pub up: u32,
    /// Slots asked to go down that the guest has not read from `PCID` yet.
    pub down: u32,
    /// Slots the guest ejected that the VMM has not taken yet.
    pub ejected: u32,
    /// The segment `PSEG` selects.
    pub segment: u32,
}

/// The controller on the MMIO bus at `arch::layout::PCI_HOTPLUG_MMIO_START`.
pub struct PciHotplugController {
    up: u32,
    down: u32,
    ejected: u32,
    segment: u32,
    /// Written when the guest ejects a slot; the VMM then calls `take_ejected`.
    eject_evt: EventFd,
}

impl PciHotplugController {
    pub fn new(eject_evt: EventFd) -> Self {
        Self {
            up: 0,
            down: 0,
            ejected: 0,
            segment: 0,
            eject_evt,
        }
    }

    /// Device `slot` of segment 0 came up (a new function to find).
    pub fn slot_up(&mut self, slot: u8) {
        self.up |= slot_bit(slot);
    }

    /// Device `slot` of segment 0 is asked to go down (the guest ejects it when it is done).
    pub fn slot_down(&mut self, slot: u8) {
        self.down |= slot_bit(slot);
    }

    /// The slots the guest ejected since the last call (bit n = device n).
    pub fn take_ejected(&mut self) -> u32 {
        std::mem::take(&mut self.ejected)
    }

    pub fn state(&self) -> PciHotplugState {
        PciHotplugState {
            version: PCI_HOTPLUG_STATE_VERSION,
            up: self.up,
            down: self.down,
            ejected: self.ejected,
            segment: self.segment,
        }
    }

    /// Puts back saved pending bits. Ejects the VMM had not taken yet wake it again.
    pub fn restore(&mut self, state: &PciHotplugState) -> crate::Result<()> {
        crate::error::check_state_version("PCI hotplug", state.version, PCI_HOTPLUG_STATE_VERSION)?;
        self.up = state.up;
        self.down = state.down;
        self.ejected = state.ejected;
        self.segment = state.segment;
        if self.ejected != 0 {
            self.wake_vmm();
        }
        Ok(())
    }

    fn wake_vmm(&self) {
        if let Err(e) = self.eject_evt.write(1) {
            log::error!("PCI hotplug: cannot wake the VMM for an eject: {e}");
        }
    }
}

fn slot_bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0)
}

impl BusDevice for PciHotplugController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            PCIU_OFFSET => std::mem::take(&mut self.up),
            PCID_OFFSET => std::mem::take(&mut self.down),
            PSEG_OFFSET => self.segment,
            // B0EJ reads 0: an eject is taken as it is written.
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        for (dst, src) in bytes.iter_mut().zip(data) {
            *dst = *src;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            B0EJ_OFFSET if value != 0 => {
                // Only segment 0 exists: an eject on another segment names no device.
                if self.segment == 0 {
                    self.ejected |= value;
                    self.wake_vmm();
                } else {
                    log::warn!(
                        "PCI hotplug: eject {value:#x} on segment {} ignored",
                        self.segment
                    );
                }
            }
            PSEG_OFFSET => self.segment = value,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn controller() -> (PciHotplugController, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (PciHotplugController::new(evt.try_clone().unwrap()), evt)
    }

    fn read32(c: &mut PciHotplugController, offset: u64) -> u32 {
        let mut data = [0xAAu8; 4];
        c.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn up_and_down_bits_are_read_once() {
        let (mut c, _evt) = controller();
        assert_eq!(read32(&mut c, PCIU_OFFSET), 0);
        c.slot_up(3);
        c.slot_up(31);
        c.slot_down(2);
        assert_eq!(read32(&mut c, PCIU_OFFSET), (1 << 3) | (1 << 31));
        assert_eq!(read32(&mut c, PCIU_OFFSET), 0, "the read took them");
        assert_eq!(read32(&mut c, PCID_OFFSET), 1 << 2);
        assert_eq!(read32(&mut c, PCID_OFFSET), 0);
        c.slot_up(40);
        assert_eq!(read32(&mut c, PCIU_OFFSET), 0, "no such slot");
    }

    #[test]
    fn eject_write_wakes_the_vmm_and_is_taken_once() {
        let (mut c, evt) = controller();
        assert!(evt.read().is_err(), "nothing before an eject");
        c.write(B0EJ_OFFSET, &(1u32 << 4).to_le_bytes());
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(read32(&mut c, B0EJ_OFFSET), 0, "B0EJ reads 0");
        assert_eq!(c.take_ejected(), 1 << 4);
        assert_eq!(c.take_ejected(), 0);
        c.write(B0EJ_OFFSET, &[0, 0, 0, 0]);
        assert!(evt.read().is_err(), "an empty eject wakes nothing");
    }

    #[test]
    fn segment_select_reads_back_and_other_segments_eject_nothing() {
        let (mut c, evt) = controller();
        c.write(PSEG_OFFSET, &1u32.to_le_bytes());
        assert_eq!(read32(&mut c, PSEG_OFFSET), 1);
        c.write(B0EJ_OFFSET, &1u32.to_le_bytes());
        assert!(evt.read().is_err());
        assert_eq!(c.take_ejected(), 0);
        c.write(PSEG_OFFSET, &0u32.to_le_bytes());
        let mut byte = [0xAAu8; 1];
        c.slot_up(0);
        c.read(PCIU_OFFSET, &mut byte);
        assert_eq!(byte, [1], "a byte read carries the low byte");
    }

    #[test]
    fn pending_bits_survive_a_state_round_trip() {
        let (mut c, _evt) = controller();
        c.slot_up(5);
        c.slot_down(6);
        c.write(B0EJ_OFFSET, &(1u32 << 7).to_le_bytes());
        let json = serde_json::to_string(&c.state()).unwrap();
        let (mut restored, evt) = controller();
        restored
            .restore(&serde_json::from_str(&json).unwrap())
            .unwrap();
        assert_eq!(
            evt.read().unwrap(),
            1,
            "the untaken eject wakes the VMM again"
        );
        assert_eq!(read32(&mut restored, PCIU_OFFSET), 1 << 5);
        assert_eq!(read32(&mut restored, PCID_OFFSET), 1 << 6);
        assert_eq!(restored.take_ejected(), 1 << 7);
        let mut foreign = c.state();
        foreign.version = 99;
        assert!(restored.restore(&foreign).is_err());
    }

    #[test]
    fn offsets_match_the_dsdt_field_layout() {
        assert_eq!(
            PCI_HOTPLUG_REGISTERS_LEN,
            arch::acpi::PCI_HOTPLUG_REGISTERS_LEN
        );
    }
}
