//! What a device thread asks before it writes guest memory in a request: an optional gate,
//! shared by every virtio device of a VM and installed and removed from outside while they run
//! (the VMM's continuous checkpoints log the pages' old content there first,
//! `docs/checkpoints.md` section 9). The devices know nothing of what the gate does.
//!
//! The rule for a device: at a request boundary (where a pause may stop it), collect every
//! guest range the request will write (its device-writable buffers, its status byte, the used
//! ring), ask the gate once, and write only after `Proceed`. On `Defer` nothing was written:
//! the device gives the request back to its queue and serves nothing more until its next
//! resume. So a device thread never waits for guest memory in the middle of a request.

use std::sync::{Arc, RwLock};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::BeforeWrite;

/// Asked by a device thread before it writes guest memory (see the module doc).
pub trait GuestWriteGate: Send + Sync {
    /// The caller is about to write `ranges` (host addresses of guest memory and lengths),
    /// and nothing else, until its next request boundary. `Proceed`: write. `Defer`: write
    /// nothing; the gate has asked for the device to be paused and resumed, and the device
    /// asks again then. `Fail`: never (the request is larger than the gate can ever allow);
    /// the device fails the request without writing its data.
    fn before_guest_writes(&self, ranges: &[(usize, usize)]) -> BeforeWrite;
}

/// Where a VM's devices look for the gate; clones share it, so the owner of a clone installs or
/// removes the gate of running devices.
#[derive(Clone, Default)]
pub struct GuestWriteGateSlot(Arc<RwLock<Option<Arc<dyn GuestWriteGate>>>>);

impl GuestWriteGateSlot {
    /// Installs `gate` (`None` removes it); requests served from now on ask it.
    pub fn install(&self, gate: Option<Arc<dyn GuestWriteGate>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = gate;
    }

    /// Asks the installed gate about `writes`; `Proceed` when none is installed.
    pub(crate) fn ask(&self, writes: &GuestWrites) -> BeforeWrite {
        let gate = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        match gate {
            Some(gate) => gate.before_guest_writes(&writes.ranges),
            None => BeforeWrite::Proceed,
        }
    }

    /// Whether a gate is installed (a device then collects its writes).
    pub(crate) fn is_installed(&self) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl std::fmt::Debug for GuestWriteGateSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GuestWriteGateSlot {{ installed: {} }}",
            self.is_installed()
        )
    }
}

/// The guest ranges one request will write, as host ranges.
#[derive(Default)]
pub(crate) struct GuestWrites {
    ranges: Vec<(usize, usize)>,
}

impl GuestWrites {
    /// Adds `len` bytes at `addr`. A range not in guest memory is left out (the device's own
    /// check refuses it before writing).
    pub(crate) fn add(&mut self, mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) {
        if len == 0 {
            return;
        }
        let Ok(slices) = mem.get_slices(addr, len, Permissions::Write) else {
            return;
        };
        for slice in slices.flatten() {
            self.ranges
                .push((slice.ptr_guard_mut().as_ptr() as usize, slice.len()));
        }
    }

    /// Adds `len` bytes at host address `address` (inside guest memory).
    pub(crate) fn add_host(&mut self, address: usize, len: usize) {
        if len > 0 {
            self.ranges.push((address, len));
        }
    }

    /// Adds the used ring of `queue` (its flags, index, entries and `avail_event`): what
    /// publishing a completion or changing notifications writes.
    pub(crate) fn add_used_ring(&mut self, mem: &GuestMemoryMmap, queue: &Queue) {
        if !queue.ready() {
            return;
        }
        let len = 4 + 8 * usize::from(queue.size()) + 2;
        self.add(mem, GuestAddress(queue.used_ring()), len);
    }
}
