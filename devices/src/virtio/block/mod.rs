//! virtio-blk on a raw image file.

mod counters;
mod disk;
mod request;
mod write_hook;

pub use self::write_hook::{BeforeWrite, BlockWriteHook, BlockWriteHookSlot, DiskImage};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use log::{error, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use self::counters::BlockCounters;
use self::disk::RawDisk;
use self::request::Completion;
use super::guest_write_gate::GuestWrites;
use super::io_thread::QueueWorker;
use super::queue_service::{service_thread_lifecycle, usable_queue, ServiceThread};
use super::{ActivationContext, GuestWriteGateSlot, VirtioDevice, VirtioInterrupt};
use crate::{Error, Result};

/// virtio-blk's logical sector size; capacity and request sectors count in these units.
pub const SECTOR_SIZE: u64 = 512;
/// Maximum size of the single request queue.
pub const BLOCK_QUEUE_SIZE: u16 = 256;

/// Size of `struct virtio_blk_config` up to and including the fields a virtio 1.x driver may
/// read without negotiating further features; only `capacity` (offset 0) is meaningful here.
const CONFIG_SPACE_LEN: usize = 64;

/// A virtio-blk device. Requests are served by an I/O thread started at activation.
pub struct Block {
    disk: Arc<RawDisk>,
    config_space: [u8; CONFIG_SPACE_LEN],
    counters: Arc<BlockCounters>,
    io_thread: ServiceThread,
    write_hook: BlockWriteHookSlot,
}

impl Block {
    /// Opens the raw image at `path`. A `readonly` disk is opened read-only, offers
    /// VIRTIO_BLK_F_RO, and answers writes with IOERR.
    pub fn open(path: &Path, readonly: bool) -> Result<Self> {
        let disk = RawDisk::open(path, readonly)?;
        let mut config_space = [0u8; CONFIG_SPACE_LEN];
        config_space[..8].copy_from_slice(&disk.capacity_sectors().to_le_bytes());
        Ok(Self {
            disk: Arc::new(disk),
            config_space,
            counters: Arc::default(),
            io_thread: ServiceThread::default(),
            write_hook: BlockWriteHookSlot::default(),
        })
    }

    /// Asks the hook `slot` holds (now or later) before every write; see [`BlockWriteHook`].
    pub fn with_write_hook(mut self, slot: BlockWriteHookSlot) -> Self {
        self.write_hook = slot;
        self
    }

    /// The slot the device asks before every write (shared: install a hook through a clone).
    pub fn write_hook_slot(&self) -> BlockWriteHookSlot {
        self.write_hook.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors()
    }

    /// Serves one request chain as the I/O thread does: `(status, used_len)`, or `None` when the
    /// chain has no usable status descriptor and is dropped. For the fuzz targets (`fuzz/`).
    pub fn serve_chain(
        &self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Option<(u8, u32)> {
        let hook = self.write_hook.current();
        match request::serve(chain, mem, &self.disk, &self.counters, hook.as_deref()) {
            Completion::Done { status, used_len } => Some((status, used_len)),
            Completion::Dropped | Completion::Deferred => None,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[BLOCK_QUEUE_SIZE]
    }

    fn available_features(&self) -> u64 {
        let mut features = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_BLK_F_FLUSH);
        if self.disk.readonly() {
            features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing we offer makes a field writable (no WCE, no CONFIG_WCE).
        warn!(
            "virtio-blk: ignoring {}-byte write to read-only config at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<()> {
        let disk = self.disk.clone();
        let counters = self.counters.clone();
        let write_hook = self.write_hook.clone();
        self.io_thread.activate("virtio-blk-io", ctx, &[], |ctx| {
            Ok(BlockWorker {
                mem: ctx.mem.clone(),
                queue: usable_queue(ctx, 0)?,
                disk,
                interrupt: ctx.interrupt.clone(),
                counters,
                write_hook,
                guest_writes: ctx.guest_writes.clone(),
            })
        })
    }

    service_thread_lifecycle!(io_thread);

    fn flush_backend(&mut self) -> Result<()> {
        if self.disk.readonly() {
            return Ok(());
        }
        self.disk.flush().map_err(Error::DiskFlush)
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.counters.snapshot()
    }
}

/// The I/O thread's view of the device.
struct BlockWorker {
    mem: GuestMemoryMmap,
    queue: Arc<Mutex<Queue>>,
    disk: Arc<RawDisk>,
    interrupt: Arc<VirtioInterrupt>,
    counters: Arc<BlockCounters>,
    write_hook: BlockWriteHookSlot,
    guest_writes: GuestWriteGateSlot,
}

/// What the guest-write gate allows for the request just popped.
enum Gated {
    /// Serve it.
    Serve,
    /// Answer it with IOERR, writing only its status (the gate refused its data for good).
    Refuse(String),
    /// Give it back to the queue and serve nothing more until the next resume.
    GiveBack,
}

impl BlockWorker {
    /// Asks the guest-write gate (if installed) about everything serving `chain` writes into
    /// guest memory: its writable buffers, its status, the used ring. Called before anything
    /// of the request is written, at a request boundary.
    fn gate(&self, chain: &virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> Gated {
        if !self.guest_writes.is_installed() {
            return Gated::Serve;
        }
        let ask = |status_only: bool| {
            let mut writes = GuestWrites::default();
            if let Ok(queue) = self.queue.lock() {
                writes.add_used_ring(&self.mem, &queue);
            }
            request::guest_writes_of(chain, &self.mem, status_only, &mut writes);
            self.guest_writes.ask(&writes)
        };
        match ask(false) {
            BeforeWrite::Proceed => Gated::Serve,
            BeforeWrite::Defer => Gated::GiveBack,
            BeforeWrite::Fail(reason) => match ask(true) {
                BeforeWrite::Proceed => Gated::Refuse(reason),
                _ => Gated::GiveBack,
            },
        }
    }
}

impl QueueWorker for BlockWorker {
    fn process_queues(&mut self, pause_requested: &AtomicBool) {
        let mut completed = 0usize;
        while !pause_requested.load(std::sync::atomic::Ordering::SeqCst) {
            // The queue lock is held only to pop and to publish, never across disk I/O, so the
            // transport's register reads on the vCPU thread do not wait for the disk.
            let Ok(mut queue) = self.queue.lock() else {
                error!("virtio-blk: queue lock poisoned; stopping service");
                return;
            };
            let Some(chain) = queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            drop(queue);
            let head = chain.head_index();
            let completion = match self.gate(&chain) {
                Gated::Serve => {
                    let hook = self.write_hook.current();
                    request::serve(
                        chain,
                        &self.mem,
                        &self.disk,
                        &self.counters,
                        hook.as_deref(),
                    )
                }
                Gated::Refuse(reason) => request::refuse(chain, &self.mem, &reason),
                Gated::GiveBack => Completion::Deferred,
            };
            let Ok(mut queue) = self.queue.lock() else {
                error!("virtio-blk: queue lock poisoned; stopping service");
                return;
            };
            let used_len = match completion {
                Completion::Done { used_len, .. } => used_len,
                Completion::Dropped => 0,
                Completion::Deferred => {
                    // Nothing was written (the write hook or the guest-write gate said not
                    // now): the chain goes back on the queue (it was the last one popped) and
                    // is served again after the next resume.
                    let previous = queue.next_avail().wrapping_sub(1);
                    queue.set_next_avail(previous);
                    break;
                }
            };
            match queue.add_used(&self.mem, head, used_len) {
                Ok(()) => completed += 1,
                Err(e) => error!("virtio-blk: cannot publish used entry for head {head}: {e}"),
            }
        }
        if completed > 0 {
            let notify = match self.queue.lock() {
                Ok(mut queue) => queue.needs_notification(&self.mem).unwrap_or(true),
                Err(_) => true,
            };
            if notify {
                if let Err(e) = self.interrupt.signal_used_queue(0) {
                    error!("virtio-blk: cannot raise the interrupt: {e}");
                }
            }
        }
    }
}
