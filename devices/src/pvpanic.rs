//! pvpanic: the guest tells the host it panicked. This is the ISA form (one I/O port, 0x505, as
//! QEMU's `pvpanic` device and Linux's `pvpanic` driver with `ioport=0x505` know it). Upstream
//! cloud-hypervisor offers the PCI form (a 1-byte BAR with the same register); it comes here with
//! the PCI platform.
//!
//! Reading the port returns the events the device understands; writing an event reports it. The
//! device has no state worth saving: the supported-events bitmap is a constant.

use std::time::{Duration, Instant};

use log::{debug, warn};

use crate::BusDevice;

/// A guest may write the port in a loop (each write is one cheap exit); the same event is passed
/// on at most once per this interval, so the log and the event monitor cannot be flooded.
pub const PVPANIC_REPEAT_INTERVAL: Duration = Duration::from_secs(1);

/// The I/O port of the ISA pvpanic device.
pub const PVPANIC_PORT: u64 = 0x505;
/// It decodes one port.
pub const PVPANIC_LEN: u64 = 1;
/// Event bit 0: the guest panicked and the host should handle it.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit 1: the guest panicked and loads a crash kernel itself; the host only records it.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
/// What a read of the port answers: every event this device acts on.
pub const PVPANIC_SUPPORTED_EVENTS: u8 = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;

/// One event a guest wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvPanicEvent {
    Panicked = 0,
    CrashLoaded = 1,
}

impl PvPanicEvent {
    /// Upstream's name for the event (the `event` property of its `guest`/`panic` monitor event).
    pub fn name(self) -> &'static str {
        match self {
            PvPanicEvent::Panicked => "panic",
            PvPanicEvent::CrashLoaded => "crash_loaded",
        }
    }

    /// The event a written byte reports. Bits the device does not know are ignored (as the
    /// interface says); PANICKED wins over CRASH_LOADED, since it is the one that needs the host.
    pub fn from_byte(value: u8) -> Option<PvPanicEvent> {
        if value & PVPANIC_PANICKED != 0 {
            Some(PvPanicEvent::Panicked)
        } else if value & PVPANIC_CRASH_LOADED != 0 {
            Some(PvPanicEvent::CrashLoaded)
        } else {
            None
        }
    }
}

/// Called on the vCPU thread that wrote the event; it must not block.
pub type PvPanicHandler = Box<dyn Fn(PvPanicEvent) + Send>;

/// The device on the port-I/O bus.
pub struct PvPanicDevice {
    on_event: PvPanicHandler,
    /// When each event (PANICKED, CRASH_LOADED) was last passed on, and how many repeats were
    /// held back since.
    last: [Option<Instant>; 2],
    held_back: [u64; 2],
}

impl PvPanicDevice {
    /// `on_event` is told each event the guest writes (the VMM logs it and emits it on the event
    /// monitor).
    pub fn new(on_event: PvPanicHandler) -> Self {
        Self {
            on_event,
            last: [None; 2],
            held_back: [0; 2],
        }
    }

    fn report(&mut self, event: PvPanicEvent, now: Instant) {
        let slot = event as usize;
        if let Some(last) = self.last[slot] {
            if now.saturating_duration_since(last) < PVPANIC_REPEAT_INTERVAL {
                self.held_back[slot] += 1;
                return;
            }
        }
        if self.held_back[slot] > 0 {
            warn!(
                "pvpanic: {} repeats of the {} event were not reported (at most one per {:?})",
                self.held_back[slot],
                event.name(),
                PVPANIC_REPEAT_INTERVAL
            );
            self.held_back[slot] = 0;
        }
        self.last[slot] = Some(now);
        (self.on_event)(event);
    }
}

impl BusDevice for PvPanicDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The register is one byte wide; anything else floats high, as an unpopulated port.
        match (offset, data) {
            (0, [value]) => *value = PVPANIC_SUPPORTED_EVENTS,
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, [value]) = (offset, data) else {
            debug!(
                "pvpanic: ignored a {}-byte write at offset {offset}",
                data.len()
            );
            return;
        };
        match PvPanicEvent::from_byte(*value) {
            Some(event) => self.report(event, Instant::now()),
            None => debug!("pvpanic: ignored event byte {value:#04x} (no known bit)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn device() -> (PvPanicDevice, Arc<Mutex<Vec<PvPanicEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let dev = PvPanicDevice::new(Box::new(move |event| sink.lock().unwrap().push(event)));
        (dev, seen)
    }

    #[test]
    fn read_returns_the_supported_events() {
        let (mut dev, _) = device();
        let mut value = [0u8];
        dev.read(0, &mut value);
        assert_eq!(value[0], 0b11);
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }

    #[test]
    fn written_events_reach_the_handler_with_upstream_names() {
        let (mut dev, seen) = device();
        dev.write(0, &[PVPANIC_PANICKED]);
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        assert_eq!(
            *seen.lock().unwrap(),
            [PvPanicEvent::Panicked, PvPanicEvent::CrashLoaded]
        );
        // PANICKED wins; unknown bits are ignored.
        assert_eq!(
            PvPanicEvent::from_byte(PVPANIC_PANICKED | PVPANIC_CRASH_LOADED | 0x80),
            Some(PvPanicEvent::Panicked)
        );
        assert_eq!(
            PvPanicEvent::from_byte(PVPANIC_CRASH_LOADED | 0x04),
            Some(PvPanicEvent::CrashLoaded)
        );
        assert_eq!(PvPanicEvent::Panicked.name(), "panic");
        assert_eq!(PvPanicEvent::CrashLoaded.name(), "crash_loaded");
    }

    #[test]
    fn a_guest_writing_in_a_loop_cannot_flood_the_host() {
        let (mut dev, seen) = device();
        let start = Instant::now();
        for i in 0..10_000u64 {
            dev.report(
                PvPanicEvent::Panicked,
                start + Duration::from_micros(i * 50),
            );
        }
        // 0.5 s of writes: one event. Another kind is not held back by the first.
        dev.report(
            PvPanicEvent::CrashLoaded,
            start + Duration::from_millis(600),
        );
        dev.report(PvPanicEvent::Panicked, start + Duration::from_millis(1600));
        assert_eq!(
            *seen.lock().unwrap(),
            [
                PvPanicEvent::Panicked,
                PvPanicEvent::CrashLoaded,
                PvPanicEvent::Panicked
            ]
        );
    }

    #[test]
    fn unknown_bits_and_odd_accesses_report_nothing() {
        let (mut dev, seen) = device();
        dev.write(0, &[0]);
        dev.write(0, &[0x04]);
        dev.write(0, &[PVPANIC_PANICKED, 0]);
        dev.write(1, &[PVPANIC_PANICKED]);
        assert!(seen.lock().unwrap().is_empty());
    }
}
