//! Virtio devices (virtio 1.x, split virtqueues) over two transports: virtio-pci (the default,
//! as upstream) and virtio-mmio. Both decode their registers into one `TransportCore`.

mod block;
mod console;
mod guest_write_gate;
mod io_thread;
mod mmio;
pub mod mmio_registers;
mod net;
pub mod pci;
mod queue_service;
mod rng;
mod transport;
mod vhost_user;

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::Result;

pub use block::{
    BeforeWrite, Block, BlockWriteHook, BlockWriteHookSlot, DiskImage, BLOCK_QUEUE_SIZE,
    SECTOR_SIZE,
};
pub use console::{
    Console, ConsoleOutput, CONSOLE_QUEUE_SIZE, CONSOLE_RECEIVE_QUEUE, CONSOLE_TRANSMIT_QUEUE,
};
pub use guest_write_gate::{GuestWriteGate, GuestWriteGateSlot};
pub use io_thread::IoThreadStartHook;
pub use mmio::{
    kernel_cmdline_token, virtio_mmio_slot, MmioTransport, MmioTransportState, MMIO_STATE_VERSION,
    VIRTIO_MMIO_BASE, VIRTIO_MMIO_FIRST_GSI, VIRTIO_MMIO_SIZE,
};
pub use net::{
    tap_offloads, Net, NetParams, Tap, TapError, TapPackets, NET_QUEUE_SIZE, NEW_TAP_TEMPLATE,
    VNET_HDR_LEN,
};
pub use net::{HoldTotals, OutputHold, Released, HOLD_LIMIT_BYTES};
pub use pci::{msix_vector_count, VirtioPciDevice, VirtioPciState, VIRTIO_PCI_STATE_VERSION};
pub use rng::{Rng, RNG_MAX_BYTES_PER_REQUEST, RNG_QUEUE_SIZE};
pub use transport::{QueueSnapshot, TransportState, VirtioTransport};
pub use vhost_user::{
    VhostUserBlk, VhostUserBlkLink, VhostUserConnection, VhostUserMode, VhostUserNet,
    VhostUserNetLink, VhostUserNetParams, VHOST_USER_BLK_MAX_QUEUE_SIZE,
    VHOST_USER_CONNECT_TIMEOUT, VHOST_USER_NET_MAX_QUEUE_PAIRS,
};
pub use vhost_user::{
    VhostUserFs, VhostUserFsLink, VIRTIO_FS_MAX_REQUEST_QUEUES, VIRTIO_FS_TAG_LEN,
};

/// Device status bits (virtio 1.x, "Device Status Field").
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits of the virtio-mmio `InterruptStatus` register and the virtio-pci ISR.
pub mod interrupt_status {
    pub const USED_BUFFER: u32 = 1;
    pub const CONFIG_CHANGE: u32 = 2;
}

/// Why a virtio device interrupts its driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptCause {
    /// Queue `queue` has new used buffers.
    UsedBuffer { queue: u16 },
    /// The configuration space (or the device status) changed.
    ConfigChange,
}

/// Where a transport sends its device's interrupts: virtio-mmio raises its one line whatever
/// the cause, virtio-pci sends the MSI-X vector the driver assigned to the queue or to
/// configuration changes.
pub trait VirtioInterruptTarget: Send + Sync {
    fn trigger(&self, cause: InterruptCause) -> io::Result<()>;
    /// Raises again, after a restore, what the guest may not have taken before the save
    /// (`status` is the saved interrupt status).
    fn retrigger(&self, status: u32) -> io::Result<()>;
}

/// The device's half of the transport's interrupt: the status the driver reads and acknowledges
/// (virtio-mmio's InterruptStatus, virtio-pci's ISR), and the target that raises the interrupt.
/// Shared between the transport (vCPU thread) and the device's I/O thread.
pub struct VirtioInterrupt {
    status: AtomicU32,
    target: Arc<dyn VirtioInterruptTarget>,
}

impl VirtioInterrupt {
    pub(crate) fn new(target: Arc<dyn VirtioInterruptTarget>, status: u32) -> Self {
        Self {
            status: AtomicU32::new(status),
            target,
        }
    }

    /// Tells the driver that used buffers were added to queue `queue`.
    pub fn signal_used_queue(&self, queue: u16) -> io::Result<()> {
        self.signal(
            interrupt_status::USED_BUFFER,
            InterruptCause::UsedBuffer { queue },
        )
    }

    /// Tells the driver that the configuration space (or the device status) changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(
            interrupt_status::CONFIG_CHANGE,
            InterruptCause::ConfigChange,
        )
    }

    fn signal(&self, bits: u32, cause: InterruptCause) -> io::Result<()> {
        // Set the status before raising the interrupt so the driver's handler sees why.
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.target.trigger(cause)
    }

    pub(crate) fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub(crate) fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Returns the status and clears it (virtio-pci's ISR is read-to-clear).
    pub(crate) fn take_status(&self) -> u32 {
        self.status.swap(0, Ordering::SeqCst)
    }

    pub(crate) fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    pub(crate) fn retrigger(&self) -> io::Result<()> {
        self.target.retrigger(self.status())
    }
}

/// What a device gets when it is activated: after the driver set DRIVER_OK, or when a saved,
/// running device is rebuilt. The transport's owner activates it on its own thread
/// ([`VirtioTransport::activate_pending`]), never the vCPU that wrote the status.
pub struct ActivationContext {
    /// Guest memory the rings and buffers live in.
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<VirtioInterrupt>,
    /// The device's queues, shared with the transport, which reads their state on save.
    pub queues: Vec<Arc<Mutex<Queue>>>,
    /// One notify eventfd per queue; the guest's `QueueNotify` writes land here (through an
    /// ioeventfd or through the bus).
    pub queue_evts: Vec<EventFd>,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Rebuilt from saved state, or activated while the VM is paused: start quiescent and wait
    /// for `resume()`.
    pub start_paused: bool,
    /// Run first thing by every thread the device starts (the VMM's seccomp filter for it).
    pub io_thread_start: Option<IoThreadStartHook>,
    /// Asked before each request that writes guest memory (see [`GuestWriteGate`]).
    pub guest_writes: GuestWriteGateSlot,
}

/// Reads `data.len()` bytes of a device's configuration space `space` at `offset`; bytes
/// beyond its end read as 0. Shared by the devices' `read_config`.
pub(crate) fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < space.len() {
        let n = data.len().min(space.len() - start);
        data[..n].copy_from_slice(&space[start..start + n]);
    }
}

/// A virtio device behind a transport.
///
/// Lifecycle: configured by the driver through the transport, `activate`d after DRIVER_OK, then
/// `pause`d/`resume`d around a save, `reset` when the driver writes 0 to the status.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 for block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn available_features(&self) -> u64;
    /// Reads device configuration space at `offset`; bytes beyond its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; read-only fields ignore the write.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues.
    fn activate(&mut self, ctx: ActivationContext) -> Result<()>;
    /// Stops serving and forgets the activation; the device can be activated again.
    fn reset(&mut self);
    /// Returns once no request is popped but uncompleted and no new one will be popped.
    fn pause(&mut self) -> Result<()>;
    /// Serves again, including requests posted while paused.
    fn resume(&mut self) -> Result<()>;
    /// Makes completed writes durable on the backend.
    fn flush_backend(&mut self) -> Result<()>;
    /// Per-device counters for `vm.counters`.
    fn counters(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::new()
    }
}
