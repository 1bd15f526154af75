//! Notifications from vCPU and device threads to the control loop. Each kind has its own EventFd
//! so the control loop's epoll tells them apart without a shared queue; vCPU failures also leave
//! their reason here because an EventFd carries only a count.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Error;

/// Why the VM stopped running on its own (not because the VMM asked it to).
#[derive(Debug)]
pub struct VmEvents {
    /// The guest asked to power off (ACPI-less guests: a KVM system event of type SHUTDOWN).
    pub shutdown: EventFd,
    /// The guest asked to reset (i8042 0xFE, triple fault, KVM system event RESET).
    pub reset: EventFd,
    /// A vCPU hit an exit it cannot continue from; see `take_failures`.
    pub vcpu_failed: EventFd,
    /// A virtio device's driver set DRIVER_OK: the control loop activates the device
    /// (`DeviceManager::activate_pending`), so no vCPU ever starts a device thread.
    pub device_activation: EventFd,
    failures: Mutex<Vec<VcpuFailure>>,
    /// Set with `reset` when the reset was a triple fault (a guest crash), not a request.
    triple_fault: AtomicBool,
}

/// One vCPU's reason to stop the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuFailure {
    pub vcpu: u8,
    pub reason: String,
}

fn new_event_fd() -> Result<EventFd, Error> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
        operation: "create",
        source,
    })
}

impl VmEvents {
    pub fn new() -> Result<VmEvents, Error> {
        Ok(VmEvents {
            shutdown: new_event_fd()?,
            reset: new_event_fd()?,
            vcpu_failed: new_event_fd()?,
            device_activation: new_event_fd()?,
            failures: Mutex::new(Vec::new()),
            triple_fault: AtomicBool::new(false),
        })
    }

    pub fn signal_shutdown(&self) {
        if let Err(e) = self.shutdown.write(1) {
            log::error!("cannot signal the guest's shutdown to the control loop: {e}");
        }
    }

    pub fn signal_reset(&self) {
        if let Err(e) = self.reset.write(1) {
            log::error!("cannot signal the guest's reset to the control loop: {e}");
        }
    }

    /// The guest triple-faulted: a reset the guest did not ask for (it crashed).
    pub fn signal_triple_fault(&self) {
        self.triple_fault.store(true, Ordering::SeqCst);
        self.signal_reset();
    }

    /// Whether a reset signalled since the last call was a triple fault.
    pub fn take_triple_fault(&self) -> bool {
        self.triple_fault.swap(false, Ordering::SeqCst)
    }

    pub fn signal_vcpu_failure(&self, vcpu: u8, reason: String) {
        log::error!("vCPU {vcpu}: {reason}");
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(VcpuFailure { vcpu, reason });
        if let Err(e) = self.vcpu_failed.write(1) {
            log::error!("cannot signal the vCPU failure to the control loop: {e}");
        }
    }

    /// The failures reported since the last call, oldest first.
    pub fn take_failures(&self) -> Vec<VcpuFailure> {
        std::mem::take(
            &mut *self
                .failures
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }
}
