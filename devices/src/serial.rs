//! COM1: a 16550A UART on the rust-vmm `vm-superio` model, with versioned serde state.

use std::io::{self, Write};
use std::sync::Arc;

use log::warn;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState as SuperioSerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, Error, InterruptLine, Result};

/// I/O port base of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of I/O ports a 16550 decodes.
pub const COM1_LEN: u64 = 8;
/// Legacy IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// Version of [`SerialState`] written by this build.
pub const SERIAL_STATE_VERSION: u32 = 1;

/// Adapts our interrupt line to the trigger type `vm-superio` expects.
struct SerialInterrupt(Arc<dyn InterruptLine>);

impl Trigger for SerialInterrupt {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// What the UART tells us besides interrupts: that the guest emptied the receive FIFO, so the
/// input thread (see `console_io::SerialInput`) may queue more host input.
struct RxSpaceNotifier(Option<EventFd>);

impl SerialEvents for RxSpaceNotifier {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(evt) = &self.0 {
            if let Err(e) = evt.write(1) {
                warn!("serial: cannot wake the input thread: {e}");
            }
        }
    }
}

/// Saved registers of the UART: every field `vm-superio` exposes in its own state type, plus
/// receive bytes not yet read by the guest. A transmitted byte is written out (and flushed)
/// before the guest's `out` instruction completes, so there is no TX backlog to save.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub version: u32,
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub rx_fifo: Vec<u8>,
}

crate::state_mirror::mirror_state!(
    SerialState { version: SERIAL_STATE_VERSION } <=> SuperioSerialState {
        baud_divisor_low <=> baud_divisor_low,
        baud_divisor_high <=> baud_divisor_high,
        interrupt_enable <=> interrupt_enable,
        interrupt_identification <=> interrupt_identification,
        line_control <=> line_control,
        line_status <=> line_status,
        modem_control <=> modem_control,
        modem_status <=> modem_status,
        scratch <=> scratch,
        rx_fifo <=> in_buffer,
    }
);

/// The COM1 device as seen on the port I/O bus.
pub struct SerialDevice {
    uart: Serial<SerialInterrupt, RxSpaceNotifier, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART in its power-on state writing guest output to `out` (a file, stdout, `io::sink()`).
    pub fn new(interrupt: Arc<dyn InterruptLine>, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::with_events(SerialInterrupt(interrupt), RxSpaceNotifier(None), out),
        }
    }

    /// Like `new`, for a UART that also receives host input: `rx_space` is written each time the
    /// guest empties the receive FIFO.
    pub fn with_input(
        interrupt: Arc<dyn InterruptLine>,
        out: Box<dyn Write + Send>,
        rx_space: EventFd,
    ) -> Self {
        Self {
            uart: Serial::with_events(
                SerialInterrupt(interrupt),
                RxSpaceNotifier(Some(rx_space)),
                out,
            ),
        }
    }

    /// Rebuilds a UART from saved registers. Raises the interrupt again if the saved registers
    /// say one is pending, since the edge the guest may not have seen is lost across the gap.
    /// `rx_space` as for [`SerialDevice::with_input`], `None` for a UART without input.
    pub fn from_state(
        state: &SerialState,
        interrupt: Arc<dyn InterruptLine>,
        out: Box<dyn Write + Send>,
        rx_space: Option<EventFd>,
    ) -> Result<Self> {
        crate::error::check_state_version("serial", state.version, SERIAL_STATE_VERSION)?;
        let uart = Serial::from_state(
            &SuperioSerialState::from(state),
            SerialInterrupt(interrupt),
            RxSpaceNotifier(rx_space),
            out,
        )
        .map_err(|e| Error::SerialState(format!("{e:?}")))?;
        Ok(Self { uart })
    }

    /// Saves the registers, flushing the output first so everything the guest wrote before the
    /// save is on the output when the state is committed.
    pub fn state(&mut self) -> Result<SerialState> {
        self.uart.writer_mut().flush().map_err(Error::SerialFlush)?;
        Ok((&self.uart.state()).into())
    }

    /// How many more bytes the receive FIFO takes.
    pub fn rx_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input (e.g. from a tty) for the guest to read; returns how many bytes fit in
    /// the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> Result<usize> {
        self.uart
            .enqueue_raw_bytes(input)
            .map_err(|e| Error::SerialState(format!("cannot queue input: {e:?}")))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers only; wider or out-of-range reads float high, as on
        // an unpopulated ISA port.
        match (u8::try_from(offset), data.len()) {
            (Ok(register), 1) if offset < COM1_LEN => data[0] = self.uart.read(register),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(register), [value]) = (u8::try_from(offset), data) {
            if offset < COM1_LEN {
                if let Err(e) = self.uart.write(register, *value) {
                    // Output that cannot be written is lost, like a disconnected line; the guest
                    // must not be stalled by it.
                    warn!("serial: write to register {register} failed: {e:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventFdInterrupt;
    use std::sync::Mutex;

    /// An output shared with the test so the bytes the guest sent can be inspected.
    #[derive(Clone, Default)]
    struct SharedOutput(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedOutput {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const LSR: u64 = 5;
    const SCRATCH: u64 = 7;

    fn read(dev: &mut SerialDevice, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    fn new_serial() -> (SerialDevice, Arc<EventFdInterrupt>, SharedOutput) {
        let line = Arc::new(EventFdInterrupt::new().unwrap());
        let out = SharedOutput::default();
        let dev = SerialDevice::new(line.clone(), Box::new(out.clone()));
        (dev, line, out)
    }

    #[test]
    fn guest_output_reaches_the_writer_and_raises_thre() {
        let (mut dev, line, out) = new_serial();
        // Transmitter empty and holding register empty right after reset.
        assert_eq!(read(&mut dev, LSR) & 0x60, 0x60);
        assert!(
            line.eventfd().read().is_err(),
            "no interrupt before IER is set"
        );
        dev.write(IER, &[0x02]); // enable THR-empty interrupt
        assert_eq!(
            line.eventfd().read().unwrap(),
            1,
            "THR already empty: raised at once"
        );
        for b in b"hi\n" {
            // The driver's interrupt handler reads IIR (THR empty), which acknowledges it;
            // the next byte then raises it again.
            assert_eq!(read(&mut dev, IIR) & 0x0f, 0x02);
            assert_eq!(read(&mut dev, IIR) & 0x0f, 0x01, "acknowledged by the read");
            dev.write(DATA, &[*b]);
            assert_eq!(line.eventfd().read().unwrap(), 1);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn divisor_latch_and_scratch_are_registers() {
        let (mut dev, _line, _out) = new_serial();
        dev.write(LCR, &[0x80]); // DLAB on
        dev.write(DATA, &[0x01]);
        dev.write(IER, &[0x00]);
        assert_eq!(read(&mut dev, DATA), 0x01);
        dev.write(LCR, &[0x03]); // 8N1, DLAB off
        dev.write(SCRATCH, &[0x5a]);
        assert_eq!(read(&mut dev, SCRATCH), 0x5a);
        assert_eq!(read(&mut dev, LCR), 0x03);
    }

    #[test]
    fn odd_widths_and_offsets_do_not_panic() {
        let (mut dev, _line, out) = new_serial();
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(0, &[1, 2]);
        dev.write(u64::MAX, &[1]);
        let mut b = [0u8];
        dev.read(9, &mut b);
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn state_round_trips_through_serde_and_a_new_device() {
        let (mut dev, _line, _out) = new_serial();
        dev.write(LCR, &[0x80]);
        dev.write(DATA, &[0x0c]);
        dev.write(IER, &[0x00]);
        dev.write(LCR, &[0x1b]);
        dev.write(SCRATCH, &[0x42]);
        dev.write(4, &[0x0b]); // MCR
        dev.enqueue_input(b"ab").unwrap();
        let state = dev.state().unwrap();
        assert_eq!(state.rx_fifo, b"ab");
        assert_eq!(state.scratch, 0x42);

        let json = serde_json::to_string(&state).unwrap();
        let back: SerialState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);

        let line = Arc::new(EventFdInterrupt::new().unwrap());
        let mut restored =
            SerialDevice::from_state(&back, line, Box::new(SharedOutput::default()), None).unwrap();
        assert_eq!(restored.state().unwrap(), state);
        assert_eq!(read(&mut restored, SCRATCH), 0x42);
        assert_eq!(read(&mut restored, LCR), 0x1b);
        assert_eq!(read(&mut restored, DATA), b'a');
        assert_eq!(read(&mut restored, DATA), b'b');
    }

    #[test]
    fn foreign_state_versions_and_oversized_fifos_are_refused() {
        let (mut dev, _line, _out) = new_serial();
        let mut state = dev.state().unwrap();
        state.version = 99;
        let line: Arc<dyn InterruptLine> = Arc::new(EventFdInterrupt::new().unwrap());
        assert!(matches!(
            SerialDevice::from_state(&state, line.clone(), Box::new(io::sink()), None),
            Err(Error::StateVersion { found: 99, .. })
        ));
        state.version = SERIAL_STATE_VERSION;
        state.rx_fifo = vec![0; 4096];
        assert!(matches!(
            SerialDevice::from_state(&state, line, Box::new(io::sink()), None),
            Err(Error::SerialState(_))
        ));
    }
}
