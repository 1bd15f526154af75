//! The i8042 keyboard controller, reduced to what a guest needs: its CPU reset line.

use log::warn;
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// First I/O port decoded (the data port, 0x60); the command/status port is 0x64.
pub const I8042_BASE: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_LEN: u64 = 5;

const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// Reads return 0: the status register then says "output buffer empty, input buffer empty", so
/// a guest polling it never waits and finds no keyboard. A write of 0xFE to port 0x64 (the
/// guest's reset request) is reported through the reset eventfd.
pub struct I8042Device {
    reset_evt: EventFd,
}

impl I8042Device {
    /// `reset_evt` is written once per reset request; the VMM polls it and stops or reboots the VM.
    pub fn new(reset_evt: EventFd) -> Self {
        Self { reset_evt }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data == [CMD_RESET_CPU] {
            if let Err(e) = self.reset_evt.write(1) {
                warn!("i8042: cannot signal the reset request: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn device() -> (I8042Device, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (I8042Device::new(evt.try_clone().unwrap()), evt)
    }

    #[test]
    fn reset_command_signals_the_eventfd() {
        let (mut dev, evt) = device();
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn other_writes_do_not_reset_and_reads_are_idle() {
        let (mut dev, evt) = device();
        dev.write(0, &[CMD_RESET_CPU]); // data port, not the command port
        dev.write(COMMAND_OFFSET, &[0xaa]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
        assert!(evt.read().is_err(), "no reset was requested");
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0], 0);
    }
}
