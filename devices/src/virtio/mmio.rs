//! The virtio-mmio transport, version 2 (virtio 1.x, "Virtio Over MMIO"), as a bus device: its
//! register layout decoded onto the shared [`TransportCore`].

use std::io;
use std::sync::Arc;

use log::warn;
use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::mmio_registers::*;
use super::transport::{
    virtio_transport_over_core, QueueWrite, RingAddress, TransportCore, TransportState,
};
use super::{InterruptCause, VirtioDevice, VirtioInterruptTarget};
use crate::{BusDevice, InterruptLine, Result};

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
const NAME: &str = "virtio-mmio";

/// Saved state of the transport and its queues. Taken while the device is paused, so no request
/// is in flight: every request the device popped is on the used ring (in guest memory) and
/// `next_avail == next_used` for a block queue. The transport's fields sit beside `version` in
/// the JSON (flattened), as they did before the transports shared them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub version: u32,
    #[serde(flatten)]
    pub transport: TransportState,
}

/// virtio-mmio has one interrupt line for every cause; the driver reads InterruptStatus.
struct SingleLine(Arc<dyn InterruptLine>);

impl VirtioInterruptTarget for SingleLine {
    fn trigger(&self, _cause: InterruptCause) -> io::Result<()> {
        self.0.trigger()
    }
    fn retrigger(&self, _status: u32) -> io::Result<()> {
        self.0.trigger()
    }
}

/// A virtio device behind the virtio-mmio register window. The VMM drives it through
/// [`crate::virtio::VirtioTransport`]; the queue-notify eventfd `i` is registered as an ioeventfd at
/// `base + 0x50` matching the 32-bit value `i`.
pub struct MmioTransport {
    core: TransportCore,
}

virtio_transport_over_core!(MmioTransport);

impl MmioTransport {
    /// A device in its reset state. `interrupt` is the device's GSI line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn InterruptLine>,
    ) -> Result<Self> {
        Ok(Self {
            core: TransportCore::new(NAME, device, mem, Arc::new(SingleLine(interrupt)))?,
        })
    }

    /// Rebuilds a device from `state` over the same guest memory, paused. A device that was
    /// running (or was about to be activated) comes back with its activation pending: the caller
    /// finishes wiring (irqfd, ioeventfd, [`crate::virtio::VirtioTransport::confine_io_threads_with`]), calls
    /// [`crate::virtio::VirtioTransport::activate_pending`], and then [`crate::virtio::VirtioTransport::resume`], which serves
    /// every request the guest posted meanwhile.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn InterruptLine>,
        state: &MmioTransportState,
    ) -> Result<Self> {
        crate::error::check_state_version(NAME, state.version, MMIO_STATE_VERSION)?;
        Ok(Self {
            core: TransportCore::restore(
                NAME,
                device,
                mem,
                Arc::new(SingleLine(interrupt)),
                &state.transport,
            )?,
        })
    }

    /// Saves transport and queue state. Refused while an activated device is running, because
    /// its ring positions would be moving under the snapshot. A pending activation is saved as
    /// an activation: the device has touched no ring yet, and a restore activates it.
    pub fn state(&self) -> Result<MmioTransportState> {
        Ok(MmioTransportState {
            version: MMIO_STATE_VERSION,
            transport: self.core.state()?,
        })
    }

    fn read_register(&self, offset: u64) -> u32 {
        let core = &self.core;
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => core.device().device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => core.device_features_word(),
            REG_QUEUE_NUM_MAX => core.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => core.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => core.interrupt().status(),
            REG_STATUS => core.status(),
            // No shared memory regions: their length reads as all ones ("does not exist").
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => core.config_generation(),
            _ => {
                warn!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let core = &mut self.core;
        let queue_write = match offset {
            REG_DEVICE_FEATURES_SEL => {
                core.device_features_select = value;
                return;
            }
            REG_DRIVER_FEATURES_SEL => {
                core.driver_features_select = value;
                return;
            }
            REG_DRIVER_FEATURES => {
                core.write_driver_features_word(value);
                return;
            }
            REG_QUEUE_SEL => {
                core.queue_select = value;
                return;
            }
            REG_QUEUE_NOTIFY => {
                core.notify_queue(value);
                return;
            }
            REG_INTERRUPT_ACK => {
                core.interrupt().acknowledge(value);
                return;
            }
            REG_STATUS => {
                core.set_status(value);
                return;
            }
            REG_QUEUE_NUM => QueueWrite::Size(value),
            REG_QUEUE_READY => QueueWrite::Ready(value == 1),
            REG_QUEUE_DESC_LOW => QueueWrite::AddressLow(RingAddress::Descriptors, value),
            REG_QUEUE_DESC_HIGH => QueueWrite::AddressHigh(RingAddress::Descriptors, value),
            REG_QUEUE_DRIVER_LOW => QueueWrite::AddressLow(RingAddress::Driver, value),
            REG_QUEUE_DRIVER_HIGH => QueueWrite::AddressHigh(RingAddress::Driver, value),
            REG_QUEUE_DEVICE_LOW => QueueWrite::AddressLow(RingAddress::Device, value),
            REG_QUEUE_DEVICE_HIGH => QueueWrite::AddressHigh(RingAddress::Device, value),
            _ => {
                warn!("virtio-mmio: write to read-only or unknown register {offset:#x}");
                return;
            }
        };
        core.write_selected_queue(queue_write);
    }
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
            self.core.device().read_config(offset - CONFIG_SPACE, data);
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
            self.core
                .device_mut()
                .write_config(offset - CONFIG_SPACE, data);
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
    use crate::virtio::{status, ActivationContext, VirtioTransport};
    use crate::EventFdInterrupt;
    use std::sync::Mutex;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

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
        assert!(
            state.transport.activated,
            "a restore must activate the device"
        );
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

    /// The JSON a build before the shared transport core wrote (flat fields) still loads, and
    /// is written the same way.
    #[test]
    fn the_state_json_keeps_its_flat_version_1_shape() {
        let flat = r#"{"version":1,"device_type":2,"device_features_select":1,
            "driver_features_select":1,"acked_features":4294967296,"queue_select":0,
            "status":15,"interrupt_status":1,"config_generation":0,"activated":true,
            "queues":[{"max_size":256,"size":64,"ready":true,"desc_table":4096,
            "avail_ring":8192,"used_ring":12288,"next_avail":7,"next_used":7,
            "event_idx":false}]}"#;
        let state: MmioTransportState = serde_json::from_str(flat).unwrap();
        assert_eq!(state.version, 1);
        assert_eq!(state.transport.acked_features, 1 << 32);
        assert_eq!(state.transport.queues[0].next_avail, 7);
        let written: serde_json::Value = serde_json::to_value(&state).unwrap();
        let expected: serde_json::Value = serde_json::from_str(flat).unwrap();
        assert_eq!(written, expected);
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
