//! `nv-vhost-user-net`: a vhost-user-net backend that bridges one queue pair to a tap.
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
}

/// Queue 0 receives (tap to guest), queue 1 transmits.
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
/// The epoll token of the tap (0..=NUM_QUEUES are the queues' and the exit event's).
const TAP_EVENT: u16 = NUM_QUEUES as u16 + 1;

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

struct NetBackend {
    tap: Tap,
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

    fn tap_fd(&self) -> RawFd {
        self.tap.queue_fds().next().unwrap_or(-1)
    }

    /// Moves packets for `vring` until there is nothing more to move (the tap is empty or the
    /// guest has no room, or nothing is posted to transmit), then signals the guest once.
    fn serve(&self, vring: &mut Vring, receive: bool) -> io::Result<()> {
        let atomic = self.mem.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mem = atomic.memory();
        let packets = self.packets();
        let fd = self.tap_fd();
        let mut used = false;
        loop {
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
        NUM_QUEUES
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
        let (queue, receive) = match device_event {
            RX_QUEUE | TAP_EVENT => (RX_QUEUE, true),
            TX_QUEUE => (TX_QUEUE, false),
            other => return Err(io::Error::other(format!("unexpected event {other}"))),
        };
        let mut state = vrings[usize::from(queue)].get_mut();
        self.serve(&mut state, receive)
    }
}

fn main() -> anyhow::Result<()> {
    init_logging("nv-vhost-user-net")?;
    let args = Args::parse();
    let tap = Tap::open(Some(&args.tap), 1)
        .with_context(|| format!("cannot open the tap {}", args.tap))?;
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
        "bridging tap {} on {} ({})",
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
        max_queue_size: args.queue_size,
        mtu: args.mtu,
        packets: Mutex::new(TapPackets::new(0, args.mtu)),
        mem: Mutex::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
    });
    let fd = backend.tap_fd();
    serve_sessions("nv-vhost-user-net", backend, &side, |daemon| {
        // Edge-triggered: a pass reads the tap until it is empty or the guest has no room, and
        // the guest's next receive kick brings the worker back.
        let handlers = daemon.get_epoll_handlers();
        let handler = handlers
            .first()
            .ok_or_else(|| io::Error::other("the daemon has no worker"))?;
        handler.register_listener(
            fd,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            u64::from(TAP_EVENT),
        )
    })
}
