//! `nv-vhost-user-net`: a vhost-user-net backend that bridges queue pairs to a tap.
//!
//! With `--num-queues 2N` (N > 1) the tap is opened with `IFF_MULTI_QUEUE` and N queue
//! descriptors, one per pair: pair i's receive ring takes what the kernel steers to the tap's
//! queue i (by flow hash), its transmit ring writes there. The control queue is the VMM's; a ring
//! the front-end has not enabled (SET_VRING_ENABLE, after the driver's `VQ_PAIRS_SET`) is not
//! served, and what the kernel steered to its tap queue waits there until it is.
//!
//! Packets move as in NV-Hypervisor's in-process virtio-net (`TapPackets`): a transmitted chain
//! goes to the tap with one `writev` over the guest's buffers (the 12-byte virtio-net header
//! first, the tap has `IFF_VNET_HDR`), a received packet comes with one `readv` straight into
//! the guest's receive buffers (several with mergeable buffers). The checksum and segmentation
//! offloads the driver acked are set on the tap (`TUNSETOFFLOAD`).
//!
//! The backend serves one front-end at a time and waits for the next when it goes: it listens
//! on `--socket` (the VMM's `vhost_mode=client`, the default) or, with `--client`, connects to
//! the VMM's socket and keeps retrying (the VMM's `vhost_mode=server`). The tap stays open
//! across sessions: packets that arrive while no VMM runs wait in the tap's queue.

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use clap::Parser;
use devices::virtio::{tap_offloads, Tap, TapPackets};
use log::{info, warn};
use nv_vhost_user_blk::{init_logging, new_exit_event, serve_sessions, SocketSide};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringMutex, VringState, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

#[derive(Parser, Debug)]
#[command(version, about = "A vhost-user-net backend bridging a tap")]
struct Args {
    /// The vhost-user socket: listened on (created; an old one is replaced), or with
    /// `--client` connected to.
    #[arg(long)]
    socket: PathBuf,
    /// The tap to bridge (attached to when it exists, created otherwise; opened with
    /// IFF_VNET_HDR).
    #[arg(long)]
    tap: String,
    /// Connect to the VMM's socket instead of listening (the VMM runs `vhost_mode=server`).
    #[arg(long)]
    client: bool,
    /// Largest queue size the front-end may set up.
    #[arg(long, default_value_t = 256)]
    queue_size: usize,
    /// The MTU of the link, for the receive buffer space a packet needs without TSO.
    #[arg(long)]
    mtu: Option<u16>,
    /// Data queues served (the VMM's `num_queues`): 2 per receive/transmit pair, each pair on
    /// its own queue of the tap (`IFF_MULTI_QUEUE` when more than one).
    #[arg(long, default_value_t = 2)]
    num_queues: usize,
}

/// Most queue pairs served: the front-end's limit.
const MAX_QUEUE_PAIRS: usize = 64;

/// The features offered: virtio 1, mergeable receive buffers, checksum and TCP segmentation
/// offloads both ways (the tap does them), and the vhost-user protocol features.
const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_ECN);

/// Queue 2i receives for pair i (tap to guest), queue 2i+1 transmits. Epoll tokens: the
/// queues' are their indices, then the exit event's (`num_queues`), then the tap queues'
/// (`num_queues + 1 + i`).
struct NetBackend {
    tap: Tap,
    num_queues: usize,
    max_queue_size: usize,
    mtu: Option<u16>,
    /// How packets move for the features the driver acked.
    packets: Mutex<TapPackets>,
    mem: Mutex<GuestMemoryAtomic<GuestMemoryMmap>>,
}

type Vring = VringState<GuestMemoryAtomic<GuestMemoryMmap>>;

impl NetBackend {
    fn packets(&self) -> MutexGuard<'_, TapPackets> {
        self.packets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tap_fd(&self, pair: usize) -> RawFd {
        self.tap.queue_fds().nth(pair).unwrap_or(-1)
    }

    /// The epoll token of pair `pair`'s tap queue.
    fn tap_event(&self, pair: usize) -> u16 {
        (self.num_queues + 1 + pair) as u16
    }

    /// Moves packets for `vring` (of pair `pair`) until there is nothing more to move (the tap
    /// queue is empty or the guest has no room, or nothing is posted to transmit), then signals
    /// the guest once. A ring the front-end did not enable is left alone.
    fn serve(&self, vring: &mut Vring, pair: usize, receive: bool) -> io::Result<()> {
        let atomic = self.mem.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mem = atomic.memory();
        let packets = self.packets();
        let fd = self.tap_fd(pair);
        let mut used = false;
        loop {
            if !vring.is_enabled() {
                break;
            }
            let queue = vring.get_queue_mut();
            if !queue.ready() {
                break;
            }
            let moved = if receive {
                packets.receive_one(queue, &mem, fd)
            } else {
                packets.transmit_one(queue, &mem, fd)
            };
            if !moved {
                break;
            }
            used = true;
        }
        if used {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        if let Err(e) = self.tap.set_offload(tap_offloads(features)) {
            warn!("cannot set the tap's offloads: {e}");
        }
        *self.packets() = TapPackets::new(features, self.mtu);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, _enabled: bool) {
        // VIRTIO_RING_F_EVENT_IDX is not offered.
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_exit_event()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.lock().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringMutex],
        _thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let event = usize::from(device_event);
        let queue = if event < self.num_queues {
            event
        } else if event > self.num_queues && event <= self.num_queues + self.num_queues / 2 {
            // Pair i's tap queue became readable: its receive ring.
            2 * (event - self.num_queues - 1)
        } else {
            return Err(io::Error::other(format!("unexpected event {device_event}")));
        };
        let mut state = vrings[queue].get_mut();
        self.serve(&mut state, queue / 2, queue % 2 == 0)
    }
}

fn main() -> anyhow::Result<()> {
    init_logging("nv-vhost-user-net")?;
    let args = Args::parse();
    if args.num_queues < 2
        || !args.num_queues.is_multiple_of(2)
        || args.num_queues > 2 * MAX_QUEUE_PAIRS
    {
        anyhow::bail!(
            "--num-queues {} is not an even number from 2 to {}",
            args.num_queues,
            2 * MAX_QUEUE_PAIRS
        );
    }
    let pairs = args.num_queues / 2;
    let tap = Tap::open(Some(&args.tap), pairs)
        .with_context(|| format!("cannot open the tap {} with {pairs} queue(s)", args.tap))?;
    if !args.queue_size.is_power_of_two() || args.queue_size > 32768 {
        anyhow::bail!(
            "--queue-size {} is not a power of two up to 32768",
            args.queue_size
        );
    }
    let side = if args.client {
        SocketSide::Connect(args.socket.clone())
    } else {
        SocketSide::Listen(args.socket.clone())
    };
    info!(
        "bridging tap {} ({pairs} queue pair(s)) on {} ({})",
        tap.name(),
        args.socket.display(),
        if args.client {
            "connecting to the VMM"
        } else {
            "listening"
        }
    );
    let backend = Arc::new(NetBackend {
        tap,
        num_queues: args.num_queues,
        max_queue_size: args.queue_size,
        mtu: args.mtu,
        packets: Mutex::new(TapPackets::new(0, args.mtu)),
        mem: Mutex::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
    });
    let taps: Vec<(RawFd, u16)> = (0..pairs)
        .map(|pair| (backend.tap_fd(pair), backend.tap_event(pair)))
        .collect();
    serve_sessions("nv-vhost-user-net", backend, &side, |daemon| {
        // Edge-triggered: a pass reads the tap until it is empty or the guest has no room, and
        // the guest's next receive kick brings the worker back.
        let handlers = daemon.get_epoll_handlers();
        let handler = handlers
            .first()
            .ok_or_else(|| io::Error::other("the daemon has no worker"))?;
        for &(fd, token) in &taps {
            handler.register_listener(
                fd,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                u64::from(token),
            )?;
        }
        Ok(())
    })
}
