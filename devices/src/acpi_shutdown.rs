//! The ACPI shutdown/reset device: one byte I/O port that the FADT of a hardware-reduced ACPI
//! platform names as its reset register and as its sleep control and status registers (the VMM
//! places it; cloud-hypervisor uses port 0x600).
//!
//! - Writing [`ACPI_RESET_VALUE`] (the FADT's reset value) asks for a reset.
//! - Writing SLP_EN with SLP_TYP 5 (the DSDT's `\_S5`), [`ACPI_POWER_OFF_VALUE`], asks for
//!   power off. Sleep states other than S5 and every other value are ignored, among them the
//!   WAK_STS bit a guest writes to the sleep status register to clear it.
//!
//! Reads return 0: no wake status, nothing pending.

use log::warn;
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Ports decoded: one.
pub const ACPI_SHUTDOWN_LEN: u64 = 1;
/// The FADT's `RESET_VALUE`.
pub const ACPI_RESET_VALUE: u8 = 1;
/// `SLP_TYP` field of the sleep control register (ACPI 6.5, 4.8.3.7): bits 2-4.
const SLEEP_TYPE_SHIFT: u8 = 2;
/// `SLP_EN`: bit 5.
const SLEEP_ENABLE: u8 = 1 << 5;
/// The sleep type of S5 (soft off), as the DSDT's `\_S5` package announces it.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// What a guest writes to the sleep control register to enter S5: `0x34`.
pub const ACPI_POWER_OFF_VALUE: u8 = (ACPI_S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE;

/// Signals a guest's ACPI reset and power-off requests through the VMM's eventfds.
pub struct AcpiShutdownDevice {
    reset_evt: EventFd,
    shutdown_evt: EventFd,
}

impl AcpiShutdownDevice {
    /// `reset_evt` and `shutdown_evt` are written once per request; the VMM polls them, as it
    /// does for the i8042 reset line and a vCPU's shutdown exit.
    pub fn new(reset_evt: EventFd, shutdown_evt: EventFd) -> Self {
        Self {
            reset_evt,
            shutdown_evt,
        }
    }
}

impl BusDevice for AcpiShutdownDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        let (evt, what) = match data {
            [ACPI_RESET_VALUE] => (&self.reset_evt, "reset"),
            [ACPI_POWER_OFF_VALUE] => (&self.shutdown_evt, "power off"),
            _ => return,
        };
        if let Err(e) = evt.write(1) {
            warn!("ACPI shutdown device: cannot signal the guest's {what}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    struct Fixture {
        dev: AcpiShutdownDevice,
        reset: EventFd,
        shutdown: EventFd,
    }

    fn fixture() -> Fixture {
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let shutdown = EventFd::new(EFD_NONBLOCK).unwrap();
        Fixture {
            dev: AcpiShutdownDevice::new(reset.try_clone().unwrap(), shutdown.try_clone().unwrap()),
            reset,
            shutdown,
        }
    }

    #[test]
    fn the_values_are_the_ones_the_acpi_tables_announce() {
        // The FADT and DSDT are built in `arch` from these constants.
        assert_eq!(ACPI_RESET_VALUE, arch::layout::ACPI_RESET_VALUE);
        assert_eq!(ACPI_S5_SLEEP_TYPE, arch::layout::ACPI_S5_SLEEP_TYPE);
        assert_eq!(ACPI_POWER_OFF_VALUE, 0x34);
    }

    #[test]
    fn the_reset_value_resets_and_s5_with_sleep_enable_powers_off() {
        for (value, resets) in [(1u8, true), (0x34, false)] {
            let mut f = fixture();
            f.dev.write(0, &[value]);
            let (signalled, quiet) = if resets {
                (&f.reset, &f.shutdown)
            } else {
                (&f.shutdown, &f.reset)
            };
            assert_eq!(signalled.read().unwrap(), 1, "{value:#x}: signalled once");
            assert!(
                quiet.read().is_err(),
                "{value:#x}: the other request stays quiet"
            );
        }
    }

    #[test]
    fn other_writes_are_ignored_and_reads_are_zero() {
        let mut f = fixture();
        // S5 without SLP_EN, SLP_EN with S3, WAK_STS (clearing the status), 0, wide and
        // misplaced accesses.
        for data in [&[0x14u8][..], &[0x2C], &[0x80], &[0], &[0x34, 0], &[1, 0]] {
            f.dev.write(0, data);
        }
        f.dev.write(1, &[0x34]);
        assert!(f.reset.read().is_err(), "no reset");
        assert!(f.shutdown.read().is_err(), "no power off");
        let mut byte = [0xFF];
        f.dev.read(0, &mut byte);
        assert_eq!(byte, [0]);
    }
}
