//! Address-range routing of guest accesses (port I/O or MMIO) to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::{Error, Result};

/// A device that answers guest reads and writes inside its bus range.
///
/// `offset` is relative to the base the device was inserted at. `data.len()` is the access width
/// chosen by the guest instruction (1, 2, 4 or 8 bytes); a device ignores widths it does not
/// support rather than panicking, because the width is guest-controlled.
pub trait BusDevice: Send {
    /// Fills `data` with the value the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct BusRange {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each owned by one device.
///
/// The VMM keeps one `Bus` for port I/O and one for MMIO, shared by all vCPU threads behind an
/// `Arc`. Ranges can be added and removed while vCPUs run (a PCI BAR the guest moves): routing
/// holds the range map only to find the device, never while the device runs, so a device may
/// move ranges from inside an access.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, BusRange>>,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`. Refuses an empty or wrapping range and any overlap
    /// with a range already present.
    pub fn insert(&self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<()> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::BusRangeInvalid { base, len })?;
        let mut ranges = self.ranges.write().map_err(|_| Error::BusLockPoisoned)?;
        // Only the nearest range starting below `end` can overlap, since ranges never overlap
        // each other.
        if let Some((&existing_base, existing)) = ranges.range(..end).next_back() {
            if existing_base + existing.len > base {
                return Err(Error::BusOverlap {
                    base,
                    len,
                    existing_base,
                    existing_len: existing.len,
                });
            }
        }
        ranges.insert(base, BusRange { len, device });
        Ok(())
    }

    /// Takes the range starting at `base` off the bus; returns its length, `None` if no range
    /// starts there.
    pub fn remove(&self, base: u64) -> Result<Option<u64>> {
        let mut ranges = self.ranges.write().map_err(|_| Error::BusLockPoisoned)?;
        Ok(ranges.remove(&base).map(|range| range.len))
    }

    /// The device owning `addr` and the base of its range (a clone of the handle: the map is
    /// not held while the device runs).
    fn resolve(&self, addr: u64) -> Result<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let ranges = self.ranges.read().map_err(|_| Error::BusLockPoisoned)?;
        let (base, range) = ranges
            .range(..=addr)
            .next_back()
            .ok_or(Error::NoDeviceAt(addr))?;
        let offset = addr - base;
        if offset >= range.len {
            return Err(Error::NoDeviceAt(addr));
        }
        Ok((*base, Arc::clone(&range.device)))
    }

    /// Runs `access` on the device owning `addr`, with the offset of `addr` in its range.
    fn route(&self, addr: u64, access: impl FnOnce(&mut dyn BusDevice, u64)) -> Result<()> {
        let (base, device) = self.resolve(addr)?;
        let mut device = device.lock().map_err(|_| Error::DeviceLockPoisoned(base))?;
        access(&mut *device, addr - base);
        Ok(())
    }

    /// Routes a guest read at `addr` to the device owning it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<()> {
        self.route(addr, |device, offset| device.read(offset, data))
    }

    /// Routes a guest write at `addr` to the device owning it.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.route(addr, |device, offset| device.write(offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access so the tests can check which device got it and at what offset.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
        read_value: u8,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.read_value.wrapping_add(offset as u8));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn recorder(read_value: u8) -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder {
            read_value,
            ..Default::default()
        }))
    }

    #[test]
    fn routes_to_the_owner_with_the_offset() {
        let bus = Bus::new();
        let a = recorder(0x10);
        let b = recorder(0x80);
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x1000, 0x1000, b.clone()).unwrap();

        bus.write(0x3fb, &[7]).unwrap();
        bus.write(0x1ffc, &[1, 2, 3, 4]).unwrap();
        assert_eq!(a.lock().unwrap().last_write, Some((3, vec![7])));
        assert_eq!(
            b.lock().unwrap().last_write,
            Some((0xffc, vec![1, 2, 3, 4]))
        );

        let mut byte = [0u8];
        bus.read(0x3f9, &mut byte).unwrap();
        assert_eq!(byte[0], 0x11);
        bus.read(0x1002, &mut byte).unwrap();
        assert_eq!(byte[0], 0x82);
    }

    #[test]
    fn unowned_addresses_are_errors() {
        let bus = Bus::new();
        bus.insert(0x100, 0x10, recorder(0)).unwrap();
        let mut byte = [0u8];
        assert!(matches!(
            bus.read(0xff, &mut byte),
            Err(Error::NoDeviceAt(0xff))
        ));
        assert!(matches!(
            bus.write(0x110, &[0]),
            Err(Error::NoDeviceAt(0x110))
        ));
        assert!(bus.write(0x10f, &[0]).is_ok());
    }

    #[test]
    fn a_removed_range_is_free_again_and_a_device_can_move_ranges_from_an_access() {
        /// Moves itself from 0x100 to 0x200 when written, from inside the bus access.
        struct Mover(Arc<Bus>, Option<Arc<Mutex<dyn BusDevice>>>);
        impl BusDevice for Mover {
            fn read(&mut self, _: u64, data: &mut [u8]) {
                data.fill(0x5a);
            }
            fn write(&mut self, _: u64, _: &[u8]) {
                assert_eq!(self.0.remove(0x100).unwrap(), Some(0x10));
                self.0.insert(0x200, 0x10, self.1.take().unwrap()).unwrap();
            }
        }
        let bus = Arc::new(Bus::new());
        let mover = Arc::new(Mutex::new(Mover(bus.clone(), None)));
        mover.lock().unwrap().1 = Some(mover.clone());
        bus.insert(0x100, 0x10, mover.clone()).unwrap();
        bus.write(0x104, &[1]).unwrap();
        let mut byte = [0u8];
        assert!(matches!(
            bus.read(0x104, &mut byte),
            Err(Error::NoDeviceAt(0x104))
        ));
        bus.read(0x20f, &mut byte).unwrap();
        assert_eq!(byte[0], 0x5a);
        assert_eq!(bus.remove(0x100).unwrap(), None);
        bus.insert(0x100, 0x10, recorder(0)).unwrap();
        // Break the cycle so the test does not leak.
        mover.lock().unwrap().1 = None;
        assert_eq!(bus.remove(0x200).unwrap(), Some(0x10));
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let bus = Bus::new();
        bus.insert(0x100, 0x10, recorder(0)).unwrap();
        for (base, len) in [(0x100, 1), (0xf8, 0x10), (0x10f, 4), (0x80, 0x200)] {
            assert!(
                matches!(
                    bus.insert(base, len, recorder(0)),
                    Err(Error::BusOverlap { .. })
                ),
                "{base:#x}+{len:#x} must be refused"
            );
        }
        assert!(matches!(
            bus.insert(0x200, 0, recorder(0)),
            Err(Error::BusRangeInvalid { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, recorder(0)),
            Err(Error::BusRangeInvalid { .. })
        ));
        // Touching ranges on either side are fine.
        bus.insert(0xf0, 0x10, recorder(0)).unwrap();
        bus.insert(0x110, 0x10, recorder(0)).unwrap();
    }
}
