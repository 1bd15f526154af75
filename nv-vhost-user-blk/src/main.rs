//! `nv-vhost-user-blk`: a vhost-user-blk backend serving one raw image file on a Unix socket.
//!
//! The requests are served by the same code as NV-Hypervisor's in-process virtio-blk (`Block`):
//! reads, writes, FLUSH as an fdatasync, GET_ID. The backend listens on `--socket`, serves one
//! front-end at a time and, when that one goes (a VMM that stopped or lost power), listens again
//! for the next: a recovered VM reconnects to the same process. When the front-end stops a ring
//! (GET_VRING_BASE, what NV-Hypervisor sends before it saves a VM) every request taken is
//! already completed, and the image is fdatasync'ed so that a save never depends on a later
//! FLUSH.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use devices::virtio::{Block, VirtioDevice};
use log::info;
use nv_vhost_user_blk::{init_logging, new_exit_event, serve_sessions, SocketSide};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringMutex, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

#[derive(Parser, Debug)]
#[command(version, about = "A vhost-user-blk backend over a raw image file")]
struct Args {
    /// Unix socket to listen on (created; an old one at the path is replaced).
    #[arg(long)]
    socket: PathBuf,
    /// Raw image file to serve.
    #[arg(long)]
    file: PathBuf,
    /// Serve the image read-only (the guest sees VIRTIO_BLK_F_RO, writes fail).
    #[arg(long)]
    readonly: bool,
}

/// The queue's maximum size.
const QUEUE_SIZE: usize = 256;

struct BlkBackend {
    block: Mutex<Block>,
    mem: Mutex<GuestMemoryAtomic<GuestMemoryMmap>>,
}

impl BlkBackend {
    fn lock_block(&self) -> std::sync::MutexGuard<'_, Block> {
        self.block.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves every posted request of `vring`, holding the ring for the whole batch: a
    /// GET_VRING_BASE waits for the batch, so a stopped ring has no request taken and not done.
    fn serve(&self, vring: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>) -> io::Result<()> {
        let atomic = self.mem.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mem = atomic.memory();
        let block = self.lock_block();
        let mut completed = 0usize;
        while let Some(chain) = vring.get_queue_mut().pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let used_len = block.serve_chain(chain, &mem).map_or(0, |(_, len)| len);
            vring
                .add_used(head, used_len)
                .map_err(|e| io::Error::other(format!("cannot publish head {head}: {e}")))?;
            completed += 1;
        }
        if completed > 0 {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.lock_block().available_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, _enabled: bool) {
        // VIRTIO_RING_F_EVENT_IDX is not offered.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut data = vec![0u8; size as usize];
        self.lock_block().read_config(u64::from(offset), &mut data);
        data
    }

    /// A new pair for each session's worker thread: the daemon ends the thread through it when
    /// the front-end goes, so the next session starts clean.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_exit_event()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.lock().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    /// The ring stopped (GET_VRING_BASE): every request taken is completed; make them durable.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.lock_block()
            .flush_backend()
            .map_err(|e| io::Error::other(format!("queue {queue_index}: flush: {e}")))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringMutex],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("event for missing queue {device_event}")))?;
        let mut state = vring.get_mut();
        self.serve(&mut state)
    }
}

fn main() -> anyhow::Result<()> {
    init_logging("nv-vhost-user-blk")?;
    let args = Args::parse();
    let block = Block::open(&args.file, args.readonly)
        .with_context(|| format!("cannot open the image {}", args.file.display()))?;
    info!(
        "serving {} ({} sectors{}) on {}",
        args.file.display(),
        block.capacity_sectors(),
        if args.readonly { ", read-only" } else { "" },
        args.socket.display()
    );
    let backend = Arc::new(BlkBackend {
        block: Mutex::new(block),
        mem: Mutex::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
    });
    serve_sessions(
        "nv-vhost-user-blk",
        backend,
        &SocketSide::Listen(args.socket),
        |_| Ok(()),
    )
}
