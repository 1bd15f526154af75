//! The virtio 1.x PCI transport ("Virtio Over PCI Bus", modern, non-transitional) as a
//! [`PciDevice`]: one 64-bit memory BAR holds the common configuration, the ISR, the device
//! configuration, the queue notification addresses and the MSI-X table and pending bits, each
//! announced by a vendor capability. Registers are decoded onto the shared [`TransportCore`],
//! interrupts leave as MSI-X vectors through an [`MsiInterruptSink`]. See `docs/devices.md`.

pub mod layout;

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::warn;
use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use self::layout::*;
use super::transport::{
    ring_address, virtio_transport_over_core, QueueWrite, RingAddress, TransportCore,
    TransportState,
};
use super::{interrupt_status, InterruptCause, VirtioDevice, VirtioInterruptTarget};
use crate::pci::{
    BarKind, BarRelocation, MsiInterruptSink, MsixConfig, MsixState, PciConfiguration, PciDevice,
    PciHeader, PciIoEventFd,
};
use crate::{Error, Result};

/// Version of [`VirtioPciState`] written by this build.
pub const VIRTIO_PCI_STATE_VERSION: u32 = 1;

const NAME: &str = "virtio-pci";

/// Saved state of a virtio-pci function besides its configuration space (which the bus saves
/// with every function, `PciBusState`): the transport's registers and queues, the MSI-X vector
/// the driver assigned to configuration changes and to each queue, and the MSI-X table with its
/// pending bits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub version: u32,
    pub transport: TransportState,
    pub msix_config_vector: u16,
    pub queue_msix_vectors: Vec<u16>,
    pub msix: MsixState,
}

/// The MSI-X vectors the driver assigned: shared between the transport (the driver writes them)
/// and the interrupt target (the device's I/O thread reads them).
struct Vectors {
    config: AtomicU16,
    queues: Vec<AtomicU16>,
}

impl Vectors {
    fn new(queues: usize) -> Self {
        Self {
            config: AtomicU16::new(NO_VECTOR),
            queues: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
        }
    }

    fn queue(&self, index: usize) -> u16 {
        self.queues
            .get(index)
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }

    fn reset(&self) {
        self.config.store(NO_VECTOR, Ordering::SeqCst);
        for v in &self.queues {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
    }
}

/// Sends a virtio interrupt as the MSI-X vector assigned to its cause; NO_VECTOR sends nothing
/// (the driver polls or reads the ISR).
struct MsixTarget {
    msix: Arc<Mutex<MsixConfig>>,
    vectors: Arc<Vectors>,
}

impl MsixTarget {
    fn send(&self, vector: u16) -> io::Result<()> {
        if vector == NO_VECTOR {
            return Ok(());
        }
        let mut msix = self
            .msix
            .lock()
            .map_err(|_| io::Error::other("MSI-X lock poisoned"))?;
        msix.trigger(vector).map(drop).map_err(io::Error::other)
    }
}

impl VirtioInterruptTarget for MsixTarget {
    fn trigger(&self, cause: InterruptCause) -> io::Result<()> {
        let vector = match cause {
            InterruptCause::UsedBuffer { queue } => self.vectors.queue(usize::from(queue)),
            InterruptCause::ConfigChange => self.vectors.config.load(Ordering::SeqCst),
        };
        self.send(vector)
    }

    /// Every vector behind a set status bit is sent once more: a message the guest already
    /// took makes its driver find nothing new on the ring, one it had not is not lost.
    fn retrigger(&self, status: u32) -> io::Result<()> {
        let mut vectors = Vec::new();
        if status & interrupt_status::USED_BUFFER != 0 {
            vectors.extend(self.vectors.queues.iter().map(|v| v.load(Ordering::SeqCst)));
        }
        if status & interrupt_status::CONFIG_CHANGE != 0 {
            vectors.push(self.vectors.config.load(Ordering::SeqCst));
        }
        vectors.sort_unstable();
        vectors.dedup();
        vectors.into_iter().try_for_each(|v| self.send(v))
    }
}

/// A virtio device on the PCI bus. The VMM puts it on the bus as a [`PciDevice`], maps BAR 0 on
/// its MMIO bus where the guest puts it (accesses reach `PciDevice::read_bar`/`write_bar`),
/// registers its `PciDevice::ioeventfds` (queue `i`'s eventfd at [`notify_offset`]`(i)` in BAR 0,
/// moved with the BAR), gives it an [`MsiInterruptSink`] of [`msix_vector_count`] vectors, and
/// drives it through [`crate::virtio::VirtioTransport`].
pub struct VirtioPciDevice {
    core: TransportCore,
    config: PciConfiguration,
    msix: Arc<Mutex<MsixConfig>>,
    vectors: Arc<Vectors>,
    /// Offset of the PCI-configuration-access capability (`VIRTIO_PCI_CAP_PCI_CFG`).
    pci_cfg_capability: u16,
}

virtio_transport_over_core!(VirtioPciDevice);

/// A `virtio_pci_cap` body (what follows the capability ID and next pointer): `cap_len`,
/// `cfg_type`, `bar`, `id`, two bytes of padding, `offset`, `length`, then `extra` (the notify
/// multiplier or the PCI-configuration-access data window).
fn capability_body(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut body = vec![
        (VIRTIO_PCI_CAP_LEN + extra.len()) as u8,
        cfg_type,
        VIRTIO_PCI_BAR as u8,
        0,
        0,
        0,
    ];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

/// PCI class and subclass upstream gives each virtio device type: block is mass storage/other,
/// net an Ethernet controller, anything else "other"/0xff.
fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        1 => (0x02, 0x00),
        2 => (0x01, 0x80),
        _ => (0xff, 0xff),
    }
}

/// MSI-X vectors a virtio-pci function for `device` has: one per queue and one for
/// configuration changes.
pub fn msix_vector_count(device: &dyn VirtioDevice) -> u16 {
    device.queue_max_sizes().len() as u16 + 1
}

impl VirtioPciDevice {
    /// A function in its reset state for `device`; MSI-X messages go to `sink`. It has one
    /// MSI-X vector per queue plus one for configuration changes.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        sink: Arc<dyn MsiInterruptSink>,
    ) -> Result<Self> {
        Self::build(device, mem, sink, None)
    }

    /// Rebuilds the function of `state` over the same guest memory, paused, its activation
    /// pending if it was running; MSI-X routes are announced to `sink` again. The caller restores
    /// its configuration space (`PciBus::restore`), wires the notifications and then activates
    /// and resumes it as after [`VirtioPciDevice::new`].
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        sink: Arc<dyn MsiInterruptSink>,
        state: &VirtioPciState,
    ) -> Result<Self> {
        crate::error::check_state_version(NAME, state.version, VIRTIO_PCI_STATE_VERSION)?;
        Self::build(device, mem, sink, Some(state))
    }

    fn build(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        sink: Arc<dyn MsiInterruptSink>,
        state: Option<&VirtioPciState>,
    ) -> Result<Self> {
        let device_type = device.device_type();
        let queues = device.queue_max_sizes().len();
        let device_id = u16::try_from(device_type)
            .ok()
            .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))
            .ok_or(Error::DeviceTypeMismatch {
                found: device_type,
                expected: 0,
            })?;
        let (class, subclass) = class_of(device_type);
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id,
            // Non-transitional devices have revision 1 or higher.
            revision_id: 1,
            class,
            subclass,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: device_id,
            interrupt_pin: 0,
        });
        config.add_bar(
            VIRTIO_PCI_BAR,
            BarKind::Memory64 {
                prefetchable: false,
            },
            VIRTIO_PCI_BAR_SIZE,
        )?;
        for (cfg_type, offset, length, extra) in [
            (
                VIRTIO_PCI_CAP_COMMON_CFG,
                COMMON_CFG_OFFSET,
                COMMON_CFG_SIZE,
                &[][..],
            ),
            (VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE, &[][..]),
            (
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_SIZE,
                &[][..],
            ),
            (
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                NOTIFY_SIZE,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes()[..],
            ),
        ] {
            config.add_capability(
                PCI_CAP_ID_VENDOR,
                &capability_body(cfg_type, offset, length, extra),
                &[],
            )?;
        }
        // bar, offset, length and the data window are the driver's to write.
        let mut writable = vec![0u8; 18];
        writable[2] = 0xff;
        writable[6..18].fill(0xff);
        let pci_cfg_capability = config.add_capability(
            PCI_CAP_ID_VENDOR,
            &capability_body(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, &[0; 4]),
            &writable,
        )?;
        let mut msix = MsixConfig::new(usize::from(msix_vector_count(device.as_ref())), sink)?;
        msix.add_capability(
            &mut config,
            (VIRTIO_PCI_BAR, MSIX_TABLE_OFFSET),
            (VIRTIO_PCI_BAR, MSIX_PBA_OFFSET),
        )?;
        let vectors = Arc::new(Vectors::new(queues));
        let msix = Arc::new(Mutex::new(msix));
        let target = Arc::new(MsixTarget {
            msix: msix.clone(),
            vectors: vectors.clone(),
        });
        let core = match state {
            None => TransportCore::new(NAME, device, mem, target)?,
            Some(state) => {
                if state.queue_msix_vectors.len() != queues {
                    return Err(Error::QueueCountMismatch {
                        found: state.queue_msix_vectors.len(),
                        expected: queues,
                    });
                }
                msix.lock()
                    .map_err(|_| Error::QueueLockPoisoned)?
                    .restore(&state.msix)?;
                vectors
                    .config
                    .store(state.msix_config_vector, Ordering::SeqCst);
                for (v, &saved) in vectors.queues.iter().zip(&state.queue_msix_vectors) {
                    v.store(saved, Ordering::SeqCst);
                }
                TransportCore::restore(NAME, device, mem, target, &state.transport)?
            }
        };
        Ok(Self {
            core,
            config,
            msix,
            vectors,
            pci_cfg_capability,
        })
    }

    /// Saves the transport, vectors and MSI-X table. Refused while an activated device is
    /// running (pause it first).
    pub fn state(&self) -> Result<VirtioPciState> {
        Ok(VirtioPciState {
            version: VIRTIO_PCI_STATE_VERSION,
            transport: self.core.state()?,
            msix_config_vector: self.vectors.config.load(Ordering::SeqCst),
            queue_msix_vectors: self
                .vectors
                .queues
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
            msix: self.lock_msix().state(),
        })
    }

    /// Where BAR 0 decodes now (0 until the guest assigns it).
    pub fn bar_address(&self) -> u64 {
        self.config.bar(VIRTIO_PCI_BAR).map_or(0, |bar| bar.address)
    }

    /// The guest-physical address a write to which notifies queue `queue`, with BAR 0 where it
    /// decodes now; `None` while BAR 0 is unassigned or for a queue the device does not have.
    pub fn notify_address(&self, queue: usize) -> Option<u64> {
        let base = self.bar_address();
        (base != 0 && queue < self.core.num_queues()).then(|| base + notify_offset(queue))
    }

    /// Whether a configuration write at `offset` of `len` bytes touched the data window of the
    /// PCI-configuration-access capability.
    fn in_pci_cfg_window(&self, offset: u16, len: usize) -> bool {
        let start = self.pci_cfg_capability + PCI_CFG_DATA_AT;
        offset >= start && usize::from(offset - start) + len <= 4
    }

    /// The BAR access the PCI-configuration-access capability's `bar`, `offset` and `length`
    /// describe, if it is a valid one (BAR 0, 1/2/4 bytes, aligned, inside the BAR).
    fn pci_cfg_target(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_capability;
        let bar = self.config.read_u32(cap + 4) & 0xff;
        let offset = u64::from(self.config.read_u32(cap + 8));
        let length = self.config.read_u32(cap + 12) as usize;
        (bar == VIRTIO_PCI_BAR as u32
            && matches!(length, 1 | 2 | 4)
            && offset.is_multiple_of(length as u64)
            && offset + length as u64 <= VIRTIO_PCI_BAR_SIZE)
            .then_some((offset, length))
    }

    fn lock_msix(&self) -> MutexGuard<'_, MsixConfig> {
        // A thread that panicked holding the table left it as consistent as any guest write.
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let core = &self.core;
        let selected = core.queue_select as usize;
        let queue = core.selected_queue();
        let value: u64 = match (offset, data.len()) {
            (common_cfg::DEVICE_FEATURE_SELECT, 4) => u64::from(core.device_features_select),
            (common_cfg::DEVICE_FEATURE, 4) => u64::from(core.device_features_word()),
            (common_cfg::DRIVER_FEATURE_SELECT, 4) => u64::from(core.driver_features_select),
            (common_cfg::DRIVER_FEATURE, 4) => u64::from(core.driver_features_word()),
            (common_cfg::MSIX_CONFIG, 2) => u64::from(self.vectors.config.load(Ordering::SeqCst)),
            (common_cfg::NUM_QUEUES, 2) => core.num_queues() as u64,
            (common_cfg::DEVICE_STATUS, 1) => u64::from(core.status() as u8),
            (common_cfg::CONFIG_GENERATION, 1) => u64::from(core.config_generation() as u8),
            (common_cfg::QUEUE_SELECT, 2) => u64::from(core.queue_select as u16),
            (common_cfg::QUEUE_SIZE, 2) => queue.map_or(0, |q| u64::from(q.size())),
            (common_cfg::QUEUE_MSIX_VECTOR, 2) => u64::from(self.vectors.queue(selected)),
            (common_cfg::QUEUE_ENABLE, 2) => queue.map_or(0, |q| u64::from(q.ready())),
            (common_cfg::QUEUE_NOTIFY_OFF, 2) => queue.map_or(0, |_| selected as u64),
            (common_cfg::QUEUE_DESC_LO..common_cfg::QUEUE_END, 4 | 8) => {
                let (ring, high) = ring_field(offset);
                let address = queue.map_or(0, |q| ring_address(&q, ring));
                if high {
                    address >> 32
                } else {
                    address
                }
            }
            _ => {
                warn!(
                    "virtio-pci: {}-byte read of common configuration at {offset:#x} ignored",
                    data.len()
                );
                0
            }
        };
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let core = &mut self.core;
        let queue_write = match (offset, data.len()) {
            (common_cfg::DEVICE_FEATURE_SELECT, 4) => {
                core.device_features_select = value as u32;
                return;
            }
            (common_cfg::DRIVER_FEATURE_SELECT, 4) => {
                core.driver_features_select = value as u32;
                return;
            }
            (common_cfg::DRIVER_FEATURE, 4) => {
                core.write_driver_features_word(value as u32);
                return;
            }
            (common_cfg::MSIX_CONFIG, 2) => {
                let vector = self.mappable_vector(value as u16);
                self.vectors.config.store(vector, Ordering::SeqCst);
                return;
            }
            (common_cfg::DEVICE_STATUS, 1) => {
                core.set_status(value as u32);
                if value == 0 {
                    self.vectors.reset();
                }
                return;
            }
            (common_cfg::QUEUE_SELECT, 2) => {
                core.queue_select = value as u32;
                return;
            }
            (common_cfg::QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.mappable_vector(value as u16);
                if let Some(slot) = self.vectors.queues.get(self.core.queue_select as usize) {
                    slot.store(vector, Ordering::SeqCst);
                }
                return;
            }
            (common_cfg::QUEUE_SIZE, 2) => QueueWrite::Size(value as u32),
            (common_cfg::QUEUE_ENABLE, 2) => {
                if value != 1 {
                    // The driver must not write 0 to disable a queue; a reset does that.
                    warn!("virtio-pci: queue_enable written with {value}; ignored");
                    return;
                }
                QueueWrite::Ready(true)
            }
            (common_cfg::QUEUE_DESC_LO..common_cfg::QUEUE_END, 4) => {
                let (ring, high) = ring_field(offset);
                if high {
                    QueueWrite::AddressHigh(ring, value as u32)
                } else {
                    QueueWrite::AddressLow(ring, value as u32)
                }
            }
            (common_cfg::QUEUE_DESC_LO..common_cfg::QUEUE_END, 8) if offset.is_multiple_of(8) => {
                let (ring, _) = ring_field(offset);
                core.write_selected_queue(QueueWrite::AddressLow(ring, value as u32));
                QueueWrite::AddressHigh(ring, (value >> 32) as u32)
            }
            _ => {
                warn!(
                    "virtio-pci: {}-byte write of common configuration at {offset:#x} ignored",
                    data.len()
                );
                return;
            }
        };
        self.core.write_selected_queue(queue_write);
    }

    /// `vector` if the MSI-X table has it, else NO_VECTOR: the driver reads the register back
    /// to learn whether the device could map it.
    fn mappable_vector(&self, vector: u16) -> u16 {
        if vector != NO_VECTOR && usize::from(vector) < self.lock_msix().vectors() {
            vector
        } else {
            NO_VECTOR
        }
    }

    /// A guest read of BAR 0 at `offset` from its base.
    fn read_bar0(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.is_empty() || data.len() > 8 {
            return;
        }
        let end = offset.saturating_add(data.len() as u64);
        if end <= COMMON_CFG_OFFSET + COMMON_CFG_SIZE {
            self.read_common(offset - COMMON_CFG_OFFSET, data);
        } else if offset == ISR_OFFSET {
            // Reading the ISR acknowledges it.
            data[0] = self.core.interrupt().take_status() as u8;
        } else if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&offset)
            && end <= DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE
        {
            self.core
                .device()
                .read_config(offset - DEVICE_CFG_OFFSET, data);
        } else if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + MSIX_TABLE_SIZE).contains(&offset) {
            self.lock_msix()
                .read_table(offset - MSIX_TABLE_OFFSET, data);
        } else if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + MSIX_PBA_SIZE).contains(&offset) {
            self.lock_msix().read_pba(offset - MSIX_PBA_OFFSET, data);
        }
    }

    /// A guest write of BAR 0 at `offset` from its base.
    fn write_bar0(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() || data.len() > 8 {
            return;
        }
        let end = offset.saturating_add(data.len() as u64);
        if end <= COMMON_CFG_OFFSET + COMMON_CFG_SIZE {
            self.write_common(offset - COMMON_CFG_OFFSET, data);
        } else if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&offset)
            && end <= DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE
        {
            self.core
                .device_mut()
                .write_config(offset - DEVICE_CFG_OFFSET, data);
        } else if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_SIZE).contains(&offset) {
            // Reached only without an ioeventfd at this address: the queue is the address.
            let queue = (offset - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
            self.core.notify_queue(queue as u32);
        } else if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + MSIX_TABLE_SIZE).contains(&offset) {
            self.lock_msix()
                .write_table(offset - MSIX_TABLE_OFFSET, data);
        } else if offset != ISR_OFFSET && !(MSIX_PBA_OFFSET..).contains(&offset) {
            warn!(
                "virtio-pci: {}-byte write at BAR offset {offset:#x} ignored",
                data.len()
            );
        }
    }
}

/// Which ring address and which half a common-configuration offset from `queue_desc` on names.
fn ring_field(offset: u64) -> (RingAddress, bool) {
    let ring = match (offset - common_cfg::QUEUE_DESC_LO) / 8 {
        0 => RingAddress::Descriptors,
        1 => RingAddress::Driver,
        _ => RingAddress::Device,
    };
    (ring, offset % 8 == 4)
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
        if !self.in_pci_cfg_window(offset, data.len()) {
            return;
        }
        if let Some((bar_offset, length)) = self.pci_cfg_target() {
            let mut window = [0u8; 4];
            self.read_bar0(bar_offset, &mut window[..length]);
            let at = usize::from(offset - self.pci_cfg_capability - PCI_CFG_DATA_AT);
            let len = data.len();
            data.copy_from_slice(&window[at..at + len]);
        }
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarRelocation> {
        let relocation = self.config.write(offset, data);
        self.lock_msix()
            .config_written(&self.config, offset, data.len());
        if self.in_pci_cfg_window(offset, data.len()) {
            if let Some((bar_offset, length)) = self.pci_cfg_target() {
                let window = self
                    .config
                    .read_u32(self.pci_cfg_capability + PCI_CFG_DATA_AT)
                    .to_le_bytes();
                self.write_bar0(bar_offset, &window[..length]);
            }
        }
        relocation
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == VIRTIO_PCI_BAR {
            self.read_bar0(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == VIRTIO_PCI_BAR {
            self.write_bar0(offset, data);
        }
    }

    /// Queue `i`'s notify address, any write (the queue is the address, so no data match).
    fn ioeventfds(&self) -> Vec<PciIoEventFd<'_>> {
        self.core
            .queue_evts()
            .iter()
            .enumerate()
            .map(|(queue, evt)| PciIoEventFd {
                bar: VIRTIO_PCI_BAR,
                offset: notify_offset(queue),
                datamatch: None,
                evt,
            })
            .collect()
    }
}
