//! What every virtio transport does the same way, whatever registers the driver reaches it
//! through: feature negotiation, the device status state machine, queue configuration, queue
//! notifications, activation on the owner's thread, reset, pause/resume and the queues' saved
//! state. `MmioTransport` and `VirtioPciDevice` decode their own register layouts and call
//! into one [`TransportCore`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{error, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    status, ActivationContext, GuestWriteGateSlot, IoThreadStartHook, VirtioDevice,
    VirtioInterrupt, VirtioInterruptTarget,
};
use crate::{Error, Result};

/// Saved state of one virtqueue: its configuration and the ring positions the device reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// Next available-ring entry the device will pop.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    pub event_idx: bool,
}

crate::state_mirror::mirror_state!(
    QueueSnapshot {} <=> QueueState {
        max_size <=> max_size,
        size <=> size,
        ready <=> ready,
        desc_table <=> desc_table,
        avail_ring <=> avail_ring,
        used_ring <=> used_ring,
        next_avail <=> next_avail,
        next_used <=> next_used,
        event_idx <=> event_idx_enabled,
    }
);

/// The transport-independent registers and queues, as each transport's saved state carries
/// them (virtio-pci nests it, virtio-mmio keeps its flat version-1 fields).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    /// Activated, or about to be: a restore activates it.
    pub activated: bool,
    pub queues: Vec<QueueSnapshot>,
}

/// A ring address the driver writes: the whole of it or one 32-bit half.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RingAddress {
    Descriptors,
    Driver,
    Device,
}

/// A queue configuration write the driver makes for the selected queue.
#[derive(Clone, Copy, Debug)]
pub(crate) enum QueueWrite {
    Size(u32),
    Ready(bool),
    AddressLow(RingAddress, u32),
    AddressHigh(RingAddress, u32),
}

/// A virtio device with its queues, features and status, behind any transport.
pub(crate) struct TransportCore {
    /// Names the transport in log lines ("virtio-mmio", "virtio-pci").
    name: &'static str,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Arc<Mutex<Queue>>>,
    queue_evts: Vec<EventFd>,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    acked_features: u64,
    pub queue_select: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// The driver set DRIVER_OK (or a restore rebuilt a running device) and the device waits
    /// for its owner to call [`TransportCore::activate_pending`].
    activation_pending: bool,
    /// Written when an activation becomes pending, so the owner's event loop wakes up.
    activation_evt: Option<EventFd>,
    /// Passed to the device at activation: what each of its I/O threads runs first.
    io_thread_start: Option<IoThreadStartHook>,
    /// Passed to the device at activation: asked before it writes guest memory.
    guest_writes: GuestWriteGateSlot,
    paused: bool,
    /// Set by `restore`: the interrupt the guest may not have taken before the power failure is
    /// raised again on the first resume.
    retrigger_on_resume: bool,
}

impl TransportCore {
    /// A device in its reset state; its interrupts go to `target`.
    pub fn new(
        name: &'static str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        target: Arc<dyn VirtioInterruptTarget>,
    ) -> Result<Self> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &max)| {
                Queue::new(max)
                    .map(|q| Arc::new(Mutex::new(q)))
                    .map_err(|source| Error::QueueState { index, source })
            })
            .collect::<Result<Vec<_>>>()?;
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            name,
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(target, 0)),
            queues,
            queue_evts,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            activation_pending: false,
            activation_evt: None,
            io_thread_start: None,
            guest_writes: GuestWriteGateSlot::default(),
            paused: false,
            retrigger_on_resume: false,
        })
    }

    /// Rebuilds a device from `state` over the same guest memory, paused, its activation pending
    /// if it was running. Refuses a state of another device type or queue count, and queues the
    /// device could not have (the device's own maximum size wins over the saved one).
    pub fn restore(
        name: &'static str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        target: Arc<dyn VirtioInterruptTarget>,
        state: &TransportState,
    ) -> Result<Self> {
        if state.device_type != device.device_type() {
            return Err(Error::DeviceTypeMismatch {
                found: state.device_type,
                expected: device.device_type(),
            });
        }
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(Error::QueueCountMismatch {
                found: state.queues.len(),
                expected: max_sizes.len(),
            });
        }
        let queues = state
            .queues
            .iter()
            .zip(max_sizes)
            .enumerate()
            .map(|(index, (snapshot, &max_size))| {
                let queue_state = QueueState {
                    max_size,
                    ..QueueState::from(snapshot)
                };
                Queue::try_from(queue_state)
                    .map(|q| Arc::new(Mutex::new(q)))
                    .map_err(|source| Error::QueueState { index, source })
            })
            .collect::<Result<Vec<_>>>()?;

        let mut core = Self::new(name, device, mem, target.clone())?;
        core.queues = queues;
        core.device_features_select = state.device_features_select;
        core.driver_features_select = state.driver_features_select;
        core.acked_features = state.acked_features;
        core.queue_select = state.queue_select;
        core.status = state.status;
        core.config_generation = state.config_generation;
        core.interrupt = Arc::new(VirtioInterrupt::new(target, state.interrupt_status));
        core.retrigger_on_resume = state.interrupt_status != 0;
        core.activation_pending = state.activated;
        core.paused = true;
        Ok(core)
    }

    /// The transport-independent state. Refused while an activated device is running, because
    /// its ring positions would be moving under the snapshot. A pending activation is saved as
    /// an activation: the device has touched no ring yet, and a restore activates it.
    pub fn state(&self) -> Result<TransportState> {
        if self.activated && !self.paused {
            return Err(Error::NotPaused);
        }
        let queues = self
            .queues
            .iter()
            .map(|q| lock_queue(q).map(|q| QueueSnapshot::from(&q.state())))
            .collect::<Result<Vec<_>>>()?;
        Ok(TransportState {
            device_type: self.device.device_type(),
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            status: self.status,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            activated: self.activated || self.activation_pending,
            queues,
        })
    }

    pub fn notify_activation_with(&mut self, evt: EventFd) {
        self.activation_evt = Some(evt);
    }

    pub fn confine_io_threads_with(&mut self, hook: IoThreadStartHook) {
        self.io_thread_start = Some(hook);
    }

    pub fn gate_guest_writes_with(&mut self, slot: GuestWriteGateSlot) {
        self.guest_writes = slot;
    }

    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn interrupt(&self) -> &VirtioInterrupt {
        &self.interrupt
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn pause(&mut self) -> Result<()> {
        if self.activated && !self.paused {
            self.device.pause()?;
        }
        self.paused = true;
        Ok(())
    }

    pub fn resume(&mut self) -> Result<()> {
        if self.activated {
            self.device.resume()?;
        }
        self.paused = false;
        if std::mem::take(&mut self.retrigger_on_resume) {
            if let Err(e) = self.interrupt.retrigger() {
                warn!("{}: cannot re-raise the pending interrupt: {e}", self.name);
            }
        }
        Ok(())
    }

    pub fn flush_backend(&mut self) -> Result<()> {
        self.device.flush_backend()
    }

    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.device.counters()
    }

    pub fn activation_pending(&self) -> bool {
        self.activation_pending
    }

    /// Activates the device if an activation is pending; returns whether it did. On failure the
    /// device is marked DEVICE_NEEDS_RESET and the driver is told through a configuration
    /// interrupt.
    pub fn activate_pending(&mut self) -> Result<bool> {
        if !std::mem::take(&mut self.activation_pending) {
            return Ok(false);
        }
        match self.activate(self.paused) {
            Ok(()) => Ok(true),
            Err(e) => {
                self.status |= status::DEVICE_NEEDS_RESET;
                if let Err(e) = self.interrupt.signal_config_change() {
                    warn!("{}: cannot raise the config interrupt: {e}", self.name);
                }
                Err(e)
            }
        }
    }

    fn activate(&mut self, start_paused: bool) -> Result<()> {
        let event_idx = self.acked_features
            & (1u64 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            != 0;
        for q in &self.queues {
            lock_queue(q)?.set_event_idx(event_idx);
        }
        let queue_evts = self
            .queue_evts
            .iter()
            .map(|e| e.try_clone().map_err(Error::EventFd))
            .collect::<Result<Vec<_>>>()?;
        self.device.activate(ActivationContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues: self.queues.clone(),
            queue_evts,
            acked_features: self.acked_features,
            start_paused,
            io_thread_start: self.io_thread_start.clone(),
            guest_writes: self.guest_writes.clone(),
        })?;
        self.activated = true;
        Ok(())
    }

    /// The device reset (status 0): the device stops, queues, features, selectors, status and
    /// interrupt status are cleared.
    pub fn reset(&mut self) {
        self.device.reset();
        for q in &self.queues {
            if let Ok(mut q) = q.lock() {
                q.reset();
            }
        }
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.status = 0;
        self.activated = false;
        self.activation_pending = false;
        self.interrupt.clear();
    }

    /// A driver write of the device status.
    pub fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            warn!(
                "{}: driver tried to clear status bits ({:#x} -> {value:#x}); ignored",
                self.name, self.status
            );
            return;
        }
        let mut value = value;
        let new_bits = value & !self.status;
        if new_bits & status::FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver reads the status back and gives up when FEATURES_OK did not stick.
            warn!(
                "{}: refusing features {:#x} (offered {:#x})",
                self.name,
                self.acked_features,
                self.device.available_features()
            );
            value &= !status::FEATURES_OK;
        }
        self.status = value;
        let ready_to_run = status::FEATURES_OK | status::DRIVER_OK;
        if new_bits & status::DRIVER_OK != 0
            && self.status & ready_to_run == ready_to_run
            && self.status & status::FAILED == 0
            && !self.activated
        {
            self.activation_pending = true;
            if let Some(evt) = &self.activation_evt {
                if let Err(e) = evt.write(1) {
                    error!("{}: cannot ask for the device's activation: {e}", self.name);
                }
            }
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.available_features();
        self.acked_features & !offered == 0
            && self.acked_features & (1u64 << VIRTIO_F_VERSION_1) != 0
    }

    /// The 32 bits of the offered features that `device_features_select` selects.
    pub fn device_features_word(&self) -> u32 {
        match self.device_features_select {
            0 => self.device.available_features() as u32,
            1 => (self.device.available_features() >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 bits of the accepted features that `driver_features_select` selects.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_select {
            0 => self.acked_features as u32,
            1 => (self.acked_features >> 32) as u32,
            _ => 0,
        }
    }

    /// A driver write of the 32 accepted-feature bits `driver_features_select` selects.
    pub fn write_driver_features_word(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            warn!("{}: feature write after FEATURES_OK ignored", self.name);
            return;
        }
        let shift = match self.driver_features_select {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.acked_features =
            (self.acked_features & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
    }

    /// The selected queue, `None` when `queue_select` names no queue.
    pub fn selected_queue(&self) -> Option<MutexGuard<'_, Queue>> {
        let q = self.queues.get(self.queue_select as usize)?;
        lock_queue(q).ok()
    }

    /// Whether the queues' configuration is frozen: the device runs on them (or is about to).
    pub fn queues_frozen(&self) -> bool {
        self.activated || self.activation_pending
    }

    /// A driver write to the selected queue's configuration; ignored (and logged) from
    /// DRIVER_OK on, because the rings belong to the running device until a reset.
    pub fn write_selected_queue(&mut self, write: QueueWrite) {
        if self.queues_frozen() {
            warn!(
                "{}: queue configuration {write:?} written after DRIVER_OK; ignored",
                self.name
            );
            return;
        }
        let name = self.name;
        let Some(mut q) = self.selected_queue() else {
            warn!("{name}: queue configuration {write:?} written for a missing queue");
            return;
        };
        match write {
            QueueWrite::Size(value) => match u16::try_from(value) {
                Ok(size) => {
                    if let Err(e) = q.try_set_size(size) {
                        warn!("{name}: queue size {value} refused: {e}");
                    }
                }
                Err(_) => warn!("{name}: queue size {value} refused"),
            },
            QueueWrite::Ready(ready) => q.set_ready(ready),
            QueueWrite::AddressLow(ring, value) => {
                set_ring_address(&mut q, ring, Some(value), None)
            }
            QueueWrite::AddressHigh(ring, value) => {
                set_ring_address(&mut q, ring, None, Some(value))
            }
        }
    }

    /// The guest notified queue `index` through the transport's registers (not an ioeventfd).
    pub fn notify_queue(&self, index: u32) {
        match self.queue_evts.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    error!("{}: cannot signal queue {index}: {e}", self.name);
                }
            }
            None => warn!("{}: notify for missing queue {index}", self.name),
        }
    }
}

fn set_ring_address(q: &mut Queue, ring: RingAddress, low: Option<u32>, high: Option<u32>) {
    match ring {
        RingAddress::Descriptors => q.set_desc_table_address(low, high),
        RingAddress::Driver => q.set_avail_ring_address(low, high),
        RingAddress::Device => q.set_used_ring_address(low, high),
    }
}

/// The 64-bit address of `ring` of `q` (what a transport with readable ring registers shows).
pub(crate) fn ring_address(q: &Queue, ring: RingAddress) -> u64 {
    match ring {
        RingAddress::Descriptors => q.desc_table(),
        RingAddress::Driver => q.avail_ring(),
        RingAddress::Device => q.used_ring(),
    }
}

pub(crate) fn lock_queue(q: &Mutex<Queue>) -> Result<MutexGuard<'_, Queue>> {
    q.lock().map_err(|_| Error::QueueLockPoisoned)
}

/// What the VMM does with a virtio device whatever its transport: activation on its own thread,
/// the I/O threads' start hook, the notify eventfds, and the pause/flush/resume around a save.
pub trait VirtioTransport: Send {
    /// Makes the transport write `evt` whenever an activation becomes pending. Activation never
    /// runs on the thread that wrote DRIVER_OK (a vCPU): the owner of `evt` calls
    /// [`VirtioTransport::activate_pending`] from its own thread.
    fn notify_activation_with(&mut self, evt: EventFd);
    /// Gives the device `hook` at activation, to run first in each I/O thread it starts.
    fn confine_io_threads_with(&mut self, hook: IoThreadStartHook);
    /// Gives the device `slot` at activation: the gate it asks before it writes guest memory.
    fn gate_guest_writes_with(&mut self, slot: GuestWriteGateSlot);
    /// Queue-notify eventfds, one per queue, in queue order (the VMM registers them as
    /// ioeventfds; a notify through the bus signals the same eventfd).
    fn queue_evts(&self) -> &[EventFd];
    /// Stops serving requests; returns once none is popped but uncompleted.
    fn pause(&mut self) -> Result<()>;
    /// Serves requests again, first those posted while paused (or before the power failure).
    fn resume(&mut self) -> Result<()>;
    /// Makes completed writes durable on the device's backend (fdatasync for block).
    fn flush_backend(&mut self) -> Result<()>;
    /// The device's I/O counters.
    fn counters(&self) -> BTreeMap<&'static str, u64>;
    /// Whether the device waits for [`VirtioTransport::activate_pending`].
    fn activation_pending(&self) -> bool;
    /// Activates the device if an activation is pending; returns whether it did. The device
    /// starts paused when the transport is (a pause or a restore came first). A kick the guest
    /// gave between DRIVER_OK and now is not lost: it is counted in the queue's eventfd, and the
    /// device serves what is posted when it starts. On failure the device is marked
    /// DEVICE_NEEDS_RESET and the driver is told through a configuration interrupt.
    fn activate_pending(&mut self) -> Result<bool>;
}

/// Implements [`VirtioTransport`] for a transport whose `core` field is its [`TransportCore`].
macro_rules! virtio_transport_over_core {
    ($transport:ty) => {
        impl $crate::virtio::VirtioTransport for $transport {
            fn notify_activation_with(&mut self, evt: vmm_sys_util::eventfd::EventFd) {
                self.core.notify_activation_with(evt);
            }
            fn confine_io_threads_with(&mut self, hook: $crate::virtio::IoThreadStartHook) {
                self.core.confine_io_threads_with(hook);
            }
            fn gate_guest_writes_with(&mut self, slot: $crate::virtio::GuestWriteGateSlot) {
                self.core.gate_guest_writes_with(slot);
            }
            fn queue_evts(&self) -> &[vmm_sys_util::eventfd::EventFd] {
                self.core.queue_evts()
            }
            fn pause(&mut self) -> $crate::Result<()> {
                self.core.pause()
            }
            fn resume(&mut self) -> $crate::Result<()> {
                self.core.resume()
            }
            fn flush_backend(&mut self) -> $crate::Result<()> {
                self.core.flush_backend()
            }
            fn counters(&self) -> std::collections::BTreeMap<&'static str, u64> {
                self.core.counters()
            }
            fn activation_pending(&self) -> bool {
                self.core.activation_pending()
            }
            fn activate_pending(&mut self) -> $crate::Result<bool> {
                self.core.activate_pending()
            }
        }
    };
}

pub(crate) use virtio_transport_over_core;
