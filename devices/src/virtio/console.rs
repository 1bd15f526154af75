//! virtio-console, single port without multiport: the guest's writes on the transmit queue go to
//! the VMM's console output (a terminal, a file, a pty, or nowhere); the receive queue is set up
//! by the driver and left waiting (no host input is fed to it).

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use log::warn;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::io_thread::QueueWorker;
use super::queue_service::{service_thread_lifecycle, usable_queue, ServedQueue, ServiceThread};
use super::{ActivationContext, GuestWriteGateSlot, VirtioDevice, VirtioInterrupt};
use crate::{Error, Result};

/// Maximum size of each queue (upstream's).
pub const CONSOLE_QUEUE_SIZE: u16 = 256;
/// Index of port 0's receive queue (host to guest).
pub const CONSOLE_RECEIVE_QUEUE: u16 = 0;
/// Index of port 0's transmit queue (guest to host).
pub const CONSOLE_TRANSMIT_QUEUE: u16 = 1;
/// `struct virtio_console_config`: cols, rows, max_nr_ports, emerg_wr. Without the SIZE and
/// MULTIPORT features the driver reads none of it meaningfully; it reads as zeros.
const CONFIG_SPACE_LEN: u64 = 12;

/// Where the console's output goes. Shared by every incarnation of the device: a restore rebuilds
/// the device and keeps writing to the same output.
pub type ConsoleOutput = Arc<Mutex<Box<dyn Write + Send>>>;

/// A virtio-console device.
pub struct Console {
    output: ConsoleOutput,
    thread: ServiceThread,
}

impl Console {
    pub fn new(output: ConsoleOutput) -> Self {
        Self {
            output,
            thread: ServiceThread::default(),
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[CONSOLE_QUEUE_SIZE, CONSOLE_QUEUE_SIZE]
    }

    fn available_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE_LEN {
            warn!("virtio-console: config read at {offset:#x} beyond its end");
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr needs VIRTIO_CONSOLE_F_EMERG_WRITE, which is not offered.
        warn!(
            "virtio-console: ignoring {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<()> {
        let output = self.output.clone();
        self.thread.activate("virtio-console", ctx, &[], |ctx| {
            Ok(ConsoleWorker {
                transmit: usable_queue(ctx, usize::from(CONSOLE_TRANSMIT_QUEUE))?,
                mem: ctx.mem.clone(),
                interrupt: ctx.interrupt.clone(),
                guest_writes: ctx.guest_writes.clone(),
                output,
            })
        })
    }

    service_thread_lifecycle!(thread);

    /// Pushes written output out of any user-space buffer. The device writes each chain before
    /// publishing it, so after a pause everything the driver saw completed is in the output.
    fn flush_backend(&mut self) -> Result<()> {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush()
            .map_err(Error::ConsoleFlush)
    }
}

struct ConsoleWorker {
    mem: GuestMemoryMmap,
    transmit: Arc<Mutex<Queue>>,
    interrupt: Arc<VirtioInterrupt>,
    guest_writes: GuestWriteGateSlot,
    output: ConsoleOutput,
}

impl QueueWorker for ConsoleWorker {
    fn process_queues(&mut self, pause_requested: &AtomicBool) {
        let served = ServedQueue {
            name: "virtio-console",
            mem: &self.mem,
            queue: &self.transmit,
            index: CONSOLE_TRANSMIT_QUEUE,
            interrupt: &self.interrupt,
            guest_writes: &self.guest_writes,
            max_write: 0,
        };
        let output = &self.output;
        served.serve(pause_requested, |chain| {
            transmit(chain, &self.mem, output);
            // Nothing is written into a transmit buffer.
            0
        });
    }
}

/// Writes the chain's device-readable buffers to `output`, in order.
fn transmit(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    output: &ConsoleOutput,
) {
    let mut output = output.lock().unwrap_or_else(|p| p.into_inner());
    let mut bytes = Vec::new();
    for desc in chain.readable() {
        bytes.resize(desc.len() as usize, 0);
        if let Err(e) = mem.read_slice(&mut bytes, desc.addr()) {
            warn!("virtio-console: buffer outside guest memory: {e}");
            return;
        }
        if let Err(e) = output.write_all(&bytes) {
            warn!("virtio-console: output failed: {e}");
            return;
        }
    }
}
