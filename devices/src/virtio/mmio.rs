//! The virtio-mmio transport, version 2 (virtio 1.x, "Virtio Over MMIO"), as a bus device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{error, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio_registers::*;
use super::{status, ActivationContext, IoThreadStartHook, VirtioDevice, VirtioInterrupt};
use crate::{BusDevice, Error, InterruptLine, Result};

/// Guest-physical address of virtio-mmio device 0; device i is at `VIRTIO_MMIO_BASE + i * SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each device's MMIO window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of device 0; device i uses `VIRTIO_MMIO_FIRST_GSI + i`.
pub const VIRTIO_MMIO_FIRST_GSI: u32 = 5;
/// Version of [`MmioTransportState`] written by this build.
pub const MMIO_STATE_VERSION: u32 = 1;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5648_564e; // "NVHV"

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

/// Saved state of the transport and its queues. Taken while the device is paused, so no request
/// is in flight: every request the device popped is on the used ring (in guest memory) and
/// `next_avail == next_used` for a block queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub version: u32,
    pub device_type: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub activated: bool,
    pub queues: Vec<QueueSnapshot>,
}

/// A virtio device behind the virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Arc<Mutex<Queue>>>,
    queue_evts: Vec<EventFd>,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// The driver set DRIVER_OK (or a restore rebuilt a running device) and the device waits
    /// for its owner to call [`MmioTransport::activate_pending`].
    activation_pending: bool,
    /// Written when an activation becomes pending, so the owner's event loop wakes up.
    activation_evt: Option<EventFd>,
    /// Passed to the device at activation: what each of its I/O threads runs first.
    io_thread_start: Option<IoThreadStartHook>,
    paused: bool,
    /// Set by `restore`: the interrupt edge the guest may not have taken before the power failure
    /// is raised again on the first resume.
    retrigger_on_resume: bool,
}

impl MmioTransport {
    /// A device in its reset state. `interrupt` is the device's GSI line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn InterruptLine>,
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
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(interrupt, 0)),
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
            paused: false,
            retrigger_on_resume: false,
        })
    }

    /// Makes the transport write `evt` whenever an activation becomes pending. Activation never
    /// runs on the thread that wrote DRIVER_OK (a vCPU): the owner of `evt` calls
    /// [`MmioTransport::activate_pending`] from its own thread.
    pub fn notify_activation_with(&mut self, evt: EventFd) {
        self.activation_evt = Some(evt);
    }

    /// Gives the device `hook` at activation, to run first in each I/O thread it starts.
    pub fn confine_io_threads_with(&mut self, hook: IoThreadStartHook) {
        self.io_thread_start = Some(hook);
    }

    /// Rebuilds a device from `state` over the same guest memory, paused. A device that was
    /// running (or was about to be activated) comes back with its activation pending: the caller
    /// finishes wiring (irqfd, ioeventfd, [`MmioTransport::confine_io_threads_with`]), calls
    /// [`MmioTransport::activate_pending`], and then [`MmioTransport::resume`], which serves
    /// every request the guest posted meanwhile.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn InterruptLine>,
        state: &MmioTransportState,
    ) -> Result<Self> {
        crate::error::check_state_version("virtio-mmio", state.version, MMIO_STATE_VERSION)?;
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
                // The device's own limit wins over the saved one, so a state cannot grow a queue.
                let queue_state = QueueState {
                    max_size,
                    ..QueueState::from(snapshot)
                };
                Queue::try_from(queue_state)
                    .map(|q| Arc::new(Mutex::new(q)))
                    .map_err(|source| Error::QueueState { index, source })
            })
            .collect::<Result<Vec<_>>>()?;

        let mut transport = Self::new(device, mem, interrupt)?;
        transport.queues = queues;
        transport.device_features_select = state.device_features_select;
        transport.driver_features_select = state.driver_features_select;
        transport.acked_features = state.acked_features;
        transport.queue_select = state.queue_select;
        transport.status = state.status;
        transport.config_generation = state.config_generation;
        transport.interrupt = Arc::new(VirtioInterrupt::new(
            transport.interrupt.line.clone(),
            state.interrupt_status,
        ));
        transport.retrigger_on_resume = state.interrupt_status != 0;
        transport.activation_pending = state.activated;
        transport.paused = true;
        Ok(transport)
    }

    /// Queue-notify eventfds, one per queue, in queue order. The VMM registers entry `i` as an
    /// ioeventfd at `base + 0x50` matching the 32-bit value `i`; a notify through the bus signals
    /// the same eventfd.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Stops serving requests; returns once none is popped but uncompleted.
    pub fn pause(&mut self) -> Result<()> {
        if self.activated && !self.paused {
            self.device.pause()?;
        }
        self.paused = true;
        Ok(())
    }

    /// Serves requests again, first those posted while paused (or before the power failure).
    pub fn resume(&mut self) -> Result<()> {
        if self.activated {
            self.device.resume()?;
        }
        self.paused = false;
        if std::mem::take(&mut self.retrigger_on_resume) {
            if let Err(e) = self.interrupt.retrigger() {
                warn!("virtio-mmio: cannot re-raise the pending interrupt: {e}");
            }
        }
        Ok(())
    }

    /// Makes completed writes durable on the device's backend (fdatasync for block).
    pub fn flush_backend(&mut self) -> Result<()> {
        self.device.flush_backend()
    }

    /// The device's I/O counters.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.device.counters()
    }

    /// Saves transport and queue state. Refused while an activated device is running, because
    /// its ring positions would be moving under the snapshot. A pending activation is saved as
    /// an activation: the device has touched no ring yet, and a restore activates it.
    pub fn state(&self) -> Result<MmioTransportState> {
        if self.activated && !self.paused {
            return Err(Error::NotPaused);
        }
        let queues = self
            .queues
            .iter()
            .map(|q| lock_queue(q).map(|q| QueueSnapshot::from(&q.state())))
            .collect::<Result<Vec<_>>>()?;
        Ok(MmioTransportState {
            version: MMIO_STATE_VERSION,
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

    /// Whether the device waits for [`MmioTransport::activate_pending`].
    pub fn activation_pending(&self) -> bool {
        self.activation_pending
    }

    /// Activates the device if an activation is pending; returns whether it did. The device
    /// starts paused when the transport is (a pause or a restore came first). A kick the guest
    /// gave between DRIVER_OK and now is not lost: it is counted in the queue's eventfd, and the
    /// device serves what is posted when it starts. On failure the device is marked
    /// DEVICE_NEEDS_RESET and the driver is told through a configuration interrupt.
    pub fn activate_pending(&mut self) -> Result<bool> {
        if !std::mem::take(&mut self.activation_pending) {
            return Ok(false);
        }
        match self.activate(self.paused) {
            Ok(()) => Ok(true),
            Err(e) => {
                self.status |= status::DEVICE_NEEDS_RESET;
                if let Err(e) = self.interrupt.signal_config_change() {
                    warn!("virtio-mmio: cannot raise the config interrupt: {e}");
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
        })?;
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
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

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            warn!(
                "virtio-mmio: driver tried to clear status bits ({:#x} -> {value:#x}); ignored",
                self.status
            );
            return;
        }
        let mut value = value;
        let new_bits = value & !self.status;
        if new_bits & status::FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver reads the status back and gives up when FEATURES_OK did not stick.
            warn!(
                "virtio-mmio: refusing features {:#x} (offered {:#x})",
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
                    error!("virtio-mmio: cannot ask for the device's activation: {e}");
                }
            }
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.available_features();
        self.acked_features & !offered == 0
            && self.acked_features & (1u64 << VIRTIO_F_VERSION_1) != 0
    }

    fn selected_queue(&self) -> Option<MutexGuard<'_, Queue>> {
        let q = self.queues.get(self.queue_select as usize)?;
        lock_queue(q).ok()
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.available_features() as u32,
                1 => (self.device.available_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: their length reads as all ones ("does not exist").
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                warn!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 {
                    warn!("virtio-mmio: feature write after FEATURES_OK ignored");
                    return;
                }
                let shift = match self.driver_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.acked_features = (self.acked_features & !(0xffff_ffffu64 << shift))
                    | (u64::from(value) << shift);
            }
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NOTIFY => match self.queue_evts.get(value as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        error!("virtio-mmio: cannot signal queue {value}: {e}");
                    }
                }
                None => warn!("virtio-mmio: notify for missing queue {value}"),
            },
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => self.set_status(value),
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            _ => warn!("virtio-mmio: write to read-only or unknown register {offset:#x}"),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if self.activated || self.activation_pending {
            // The rings belong to the running device now; changing them needs a reset first.
            warn!("virtio-mmio: queue register {offset:#x} written after DRIVER_OK; ignored");
            return;
        }
        let Some(mut q) = self.selected_queue() else {
            warn!("virtio-mmio: queue register {offset:#x} written for missing queue");
            return;
        };
        match offset {
            REG_QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => {
                    if let Err(e) = q.try_set_size(size) {
                        warn!("virtio-mmio: queue size {value} refused: {e}");
                    }
                }
                Err(_) => warn!("virtio-mmio: queue size {value} refused"),
            },
            REG_QUEUE_READY => q.set_ready(value == 1),
            REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
            REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
            REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
            REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }
}

fn lock_queue(q: &Mutex<Queue>) -> Result<MutexGuard<'_, Queue>> {
    q.lock().map_err(|_| Error::QueueLockPoisoned)
}

/// Guest-physical base and GSI of virtio-mmio slot `index`, per the platform layout.
pub fn virtio_mmio_slot(index: u32) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE,
        VIRTIO_MMIO_FIRST_GSI + index,
    )
}

/// The kernel command-line token announcing slot `index` to Linux, e.g.
/// `virtio_mmio.device=4K@0xd0000000:5`.
pub fn kernel_cmdline_token(index: u32) -> String {
    let (base, gsi) = virtio_mmio_slot(index);
    format!(
        "virtio_mmio.device={}K@{base:#x}:{gsi}",
        VIRTIO_MMIO_SIZE / 1024
    )
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // The register block only defines aligned 32-bit accesses.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            warn!(
                "virtio-mmio: {}-byte read at {offset:#x} is not an aligned 32-bit access",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn!(
                "virtio-mmio: {}-byte write at {offset:#x} is not a 32-bit access",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            warn!("virtio-mmio: unaligned write at {offset:#x}");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventFdInterrupt;
    use vm_memory::GuestAddress;

    /// What the fake device saw of its activations.
    #[derive(Default)]
    struct Seen {
        activations: Vec<(std::thread::ThreadId, bool)>,
        /// The count in queue 0's notify eventfd when the device was activated.
        kicks_at_activation: Option<u64>,
    }

    struct FakeDevice(Arc<Mutex<Seen>>);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn available_features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, ctx: ActivationContext) -> Result<()> {
            let mut seen = self.0.lock().unwrap();
            seen.activations
                .push((std::thread::current().id(), ctx.start_paused));
            seen.kicks_at_activation = ctx.queue_evts[0].read().ok();
            Ok(())
        }
        fn reset(&mut self) {}
        fn pause(&mut self) -> Result<()> {
            Ok(())
        }
        fn resume(&mut self) -> Result<()> {
            Ok(())
        }
        fn flush_backend(&mut self) -> Result<()> {
            Ok(())
        }
    }

    /// A transport over the fake device with an activation eventfd, driven up to FEATURES_OK.
    fn configured() -> (MmioTransport, EventFd, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let line: Arc<dyn InterruptLine> = Arc::new(EventFdInterrupt::new().unwrap());
        let mut transport =
            MmioTransport::new(Box::new(FakeDevice(seen.clone())), mem, line).unwrap();
        let activation = EventFd::new(EFD_NONBLOCK).unwrap();
        transport.notify_activation_with(activation.try_clone().unwrap());
        transport.write(REG_DRIVER_FEATURES_SEL, &1u32.to_le_bytes());
        transport.write(REG_DRIVER_FEATURES, &1u32.to_le_bytes());
        transport.write(
            REG_STATUS,
            &(status::ACKNOWLEDGE | status::DRIVER).to_le_bytes(),
        );
        let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        transport.write(REG_STATUS, &features_ok.to_le_bytes());
        (transport, activation, seen)
    }

    fn write_driver_ok(transport: &mut MmioTransport) {
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        transport.write(REG_STATUS, &all.to_le_bytes());
    }

    #[test]
    fn driver_ok_asks_the_owner_and_a_kick_before_activation_is_kept() {
        let (mut transport, activation, seen) = configured();
        write_driver_ok(&mut transport);
        assert!(
            seen.lock().unwrap().activations.is_empty(),
            "activated on the writer"
        );
        assert_eq!(activation.read().unwrap(), 1, "the owner is woken");
        assert!(transport.activation_pending());
        // The guest kicks the queue right after DRIVER_OK, before its owner activated it.
        transport.write(REG_QUEUE_NOTIFY, &0u32.to_le_bytes());

        let owner = std::thread::spawn(move || {
            let activated = transport.activate_pending().unwrap();
            (activated, transport.activate_pending().unwrap(), transport)
        });
        let owner_id = owner.thread().id();
        let (activated, again, transport) = owner.join().unwrap();
        assert!(activated && !again, "activated exactly once");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.activations, vec![(owner_id, false)]);
        assert_eq!(seen.kicks_at_activation, Some(1), "the early kick was lost");
        assert!(transport.state().is_err(), "running, not paused");
    }

    #[test]
    fn a_pending_activation_survives_a_pause_and_a_save() {
        let (mut transport, _activation, seen) = configured();
        write_driver_ok(&mut transport);
        transport.pause().unwrap();
        let state = transport.state().unwrap();
        assert!(state.activated, "a restore must activate the device");
        // Activated while paused: the device starts quiescent.
        assert!(transport.activate_pending().unwrap());
        assert!(seen.lock().unwrap().activations[0].1, "not started paused");
        assert_eq!(transport.state().unwrap(), state);
    }

    #[test]
    fn a_reset_before_activation_cancels_it() {
        let (mut transport, _activation, seen) = configured();
        write_driver_ok(&mut transport);
        transport.write(REG_STATUS, &0u32.to_le_bytes());
        assert!(!transport.activate_pending().unwrap());
        assert!(seen.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn slots_follow_the_platform_layout() {
        assert_eq!(virtio_mmio_slot(0), (0xd000_0000, 5));
        assert_eq!(virtio_mmio_slot(3), (0xd000_3000, 8));
        assert_eq!(
            kernel_cmdline_token(0),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            kernel_cmdline_token(1),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }
}
