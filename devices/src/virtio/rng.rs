//! virtio-rng: the driver posts device-writable buffers, the device fills them from an entropy
//! source on the host (upstream's default `/dev/urandom`).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use log::warn;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::io_thread::QueueWorker;
use super::queue_service::{service_thread_lifecycle, usable_queue, ServedQueue, ServiceThread};
use super::{ActivationContext, GuestWriteGateSlot, VirtioDevice, VirtioInterrupt};
use crate::{Error, Result};

/// Maximum size of the request queue (upstream's).
pub const RNG_QUEUE_SIZE: u16 = 256;
/// At most this many bytes per request: a guest posting a huge buffer gets a short fill (the
/// used length tells it how much) instead of making the VMM allocate its size.
pub const RNG_MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// A virtio-rng device reading from an open entropy source.
pub struct Rng {
    source: Arc<Mutex<File>>,
    path: PathBuf,
    thread: ServiceThread,
}

impl Rng {
    /// Opens `path` for reading; a path that cannot be opened, or a directory, is refused now
    /// rather than when the guest first asks for entropy.
    pub fn open(path: &Path) -> Result<Self> {
        let refuse = |source| Error::RngSource {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(refuse)?;
        if file.metadata().map_err(refuse)?.is_dir() {
            return Err(refuse(std::io::Error::from_raw_os_error(libc::EISDIR)));
        }
        Ok(Self {
            source: Arc::new(Mutex::new(file)),
            path: path.to_owned(),
            thread: ServiceThread::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn available_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(
            "virtio-rng: ignoring {}-byte write to its (empty) config at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<()> {
        let source = self.source.clone();
        self.thread.activate("virtio-rng", ctx, &[], |ctx| {
            Ok(RngWorker {
                queue: usable_queue(ctx, 0)?,
                mem: ctx.mem.clone(),
                interrupt: ctx.interrupt.clone(),
                guest_writes: ctx.guest_writes.clone(),
                source,
            })
        })
    }

    service_thread_lifecycle!(thread);

    fn flush_backend(&mut self) -> Result<()> {
        Ok(())
    }
}

struct RngWorker {
    mem: GuestMemoryMmap,
    queue: Arc<Mutex<Queue>>,
    interrupt: Arc<VirtioInterrupt>,
    guest_writes: GuestWriteGateSlot,
    source: Arc<Mutex<File>>,
}

impl QueueWorker for RngWorker {
    fn process_queues(&mut self, pause_requested: &AtomicBool) {
        let served = ServedQueue {
            name: "virtio-rng",
            mem: &self.mem,
            queue: &self.queue,
            index: 0,
            interrupt: &self.interrupt,
            guest_writes: &self.guest_writes,
            max_write: RNG_MAX_BYTES_PER_REQUEST,
        };
        let source = &self.source;
        served.serve(pause_requested, |chain| fill(chain, &self.mem, source));
    }
}

/// Fills the chain's device-writable buffers from `source`; returns the bytes written. Readable
/// buffers are skipped; a failing source ends the fill short.
fn fill(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    source: &Mutex<File>,
) -> u32 {
    let mut source = source.lock().unwrap_or_else(|p| p.into_inner());
    let mut written = 0usize;
    let mut bytes = Vec::new();
    for desc in chain.writable() {
        let want = (desc.len() as usize).min(RNG_MAX_BYTES_PER_REQUEST - written);
        if want == 0 {
            break;
        }
        bytes.resize(want, 0);
        let got = match source.read(&mut bytes) {
            Ok(got) => got,
            Err(e) => {
                warn!("virtio-rng: reading the entropy source failed: {e}");
                break;
            }
        };
        if let Err(e) = mem.write_slice(&bytes[..got], desc.addr()) {
            warn!("virtio-rng: buffer outside guest memory: {e}");
            break;
        }
        written += got;
        if got < want {
            break;
        }
    }
    written as u32
}
