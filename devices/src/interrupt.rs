//! Interrupt lines from devices to the guest.

use std::io;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Error, Result};

/// An edge-triggered interrupt line into the guest.
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

/// An interrupt line backed by an eventfd; the VMM registers [`EventFdInterrupt::eventfd`] with
/// KVM as an irqfd for the device's GSI, so a trigger reaches the guest without a VMM round trip.
pub struct EventFdInterrupt {
    evt: EventFd,
}

impl EventFdInterrupt {
    /// Creates a line with a fresh non-blocking eventfd.
    pub fn new() -> Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
        })
    }

    /// The eventfd to register as an irqfd (or to poll in tests).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl InterruptLine for EventFdInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_counts_on_the_eventfd() {
        let line = EventFdInterrupt::new().unwrap();
        assert!(line.eventfd().read().is_err(), "nothing pending yet");
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(line.eventfd().read().unwrap(), 2);
    }
}
