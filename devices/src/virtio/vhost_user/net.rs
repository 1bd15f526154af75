//! The vhost-user-net front-end: a virtio-net device (type 1) whose receive and transmit queues
//! a backend process serves (our `nv-vhost-user-net`, OVS-DPDK, DPDK's vhost PMD).
//!
//! The configuration space is the VMM's, as upstream: the MAC the VM was given (`mac=`), the
//! link up, the queue pairs, the MTU when one is set. The backend's offloads and ring features
//! are passed to the driver; MAC, STATUS, MQ and CTRL_VQ are the front-end's own and never sent
//! to the backend.
//!
//! Multiqueue (`num_queues=2N`, N > 1), as upstream: the driver is offered `VIRTIO_NET_F_MQ`
//! with `max_virtqueue_pairs` N and `VIRTIO_NET_F_CTRL_VQ`; the control queue (queue 2N) is the
//! VMM's ([`MultiQueue`], served by the shared `virtio::net::control`), the backend gets the
//! 2N data queues. The driver starts on one pair; its `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` turns
//! the rings of the pairs it asked for on (SET_VRING_ENABLE) and the others off. The pair count
//! is saved with the device and set again on a restore before its rings start.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;

use log::info;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::frontend::OwnQueue;
use super::{vhost_user_device_methods, VhostUserConnection, VhostUserMode, VhostUserRings};
use crate::virtio::net::control::{self, ControlCommand};
use crate::virtio::net::net_config_space;
use crate::virtio::VirtioDevice;
use crate::{Error, Result};

/// What the guest sees of a vhost-user-net device and how the backend is reached.
#[derive(Clone, Debug)]
pub struct VhostUserNetParams {
    pub mac: [u8; 6],
    /// Receive plus transmit queues (upstream's `num_queues`, 2 for one pair).
    pub num_queues: usize,
    pub queue_size: u16,
    /// Offered with `VIRTIO_NET_F_MTU` when set.
    pub mtu: Option<u16>,
    pub mode: VhostUserMode,
}

/// The backend's feature bits the driver may use: checksum and segmentation offloads, mergeable
/// receive buffers, indirect descriptors, event index and VERSION_1. Not the control queue
/// (the backend would have to serve it) nor anything that needs it.
const PASSABLE_FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_GUEST_UFO)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_ECN)
    | (1 << VIRTIO_NET_F_HOST_UFO)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_F_VERSION_1);

/// Most queue pairs of a vhost-user-net device (`num_queues` up to twice this): a tap has at
/// most 256 queues, and each pair costs the backend two rings and the function two MSI-X
/// vectors.
pub const VHOST_USER_NET_MAX_QUEUE_PAIRS: usize = 64;

/// A network device's connection to its vhost-user-net backend and what the driver is offered.
/// Each [`VhostUserNetLink::device`] is a device on it (at boot, and at each restore).
#[derive(Clone)]
pub struct VhostUserNetLink {
    connection: VhostUserConnection,
    queue_sizes: Vec<u16>,
    features: u64,
    config_space: Vec<u8>,
    /// With several pairs: the control queue's state, shared by every device on the link.
    multi_queue: Option<Arc<MultiQueue>>,
}

/// The control queue of a multiqueue device and the pairs the driver asked for: served on the
/// front-end's call relay thread; the pair count outlives a device (it is saved with the VM and
/// set again before a restored device's rings start).
pub struct MultiQueue {
    max_pairs: u16,
    /// Pairs in use (1 after a reset, as virtio says, until `VQ_PAIRS_SET`).
    pairs: AtomicU16,
    socket: std::path::PathBuf,
}

impl MultiQueue {
    fn new(max_pairs: u16, socket: &Path) -> Self {
        MultiQueue {
            max_pairs,
            pairs: AtomicU16::new(1),
            socket: socket.to_owned(),
        }
    }
}

impl OwnQueue for MultiQueue {
    fn serve(
        &self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        pause_requested: &AtomicBool,
        switch: &mut dyn FnMut(usize, bool),
    ) -> bool {
        // vhost-user devices are refused while checkpoints are on: no guest-write gate.
        control::serve(
            queue,
            mem,
            pause_requested,
            |_| true,
            |command| match command {
                ControlCommand::VqPairsSet(pairs)
                    if control::pairs_valid(pairs, self.max_pairs) =>
                {
                    self.pairs.store(pairs, Ordering::SeqCst);
                    info!(
                        "vhost-user-net {}: the driver uses {pairs} of {} queue pairs",
                        self.socket.display(),
                        self.max_pairs
                    );
                    for ring in 0..2 * usize::from(self.max_pairs) {
                        switch(ring, ring / 2 < usize::from(pairs));
                    }
                    true
                }
                ControlCommand::VqPairsSet(pairs) => {
                    log::warn!(
                        "vhost-user-net {}: VQ_PAIRS_SET {pairs} refused (1 to {})",
                        self.socket.display(),
                        self.max_pairs
                    );
                    false
                }
                ControlCommand::Unsupported { .. } | ControlCommand::Malformed => false,
            },
        )
    }

    fn ring_enabled(&self, index: usize) -> bool {
        index / 2 < usize::from(self.pairs.load(Ordering::SeqCst))
    }

    fn reset(&self) {
        self.pairs.store(1, Ordering::SeqCst);
    }
}

/// A vhost-user-net device: activation sends the memory table and starts the rings.
pub struct VhostUserNet {
    link: VhostUserNetLink,
    rings: VhostUserRings,
}

impl VhostUserNetLink {
    /// Connects to the backend at `socket` (as `params.mode` says, waiting up to
    /// [`super::VHOST_USER_CONNECT_TIMEOUT`]), checks it serves the queues and that it speaks
    /// virtio 1 (VERSION_1; the transport is modern only).
    pub fn connect(socket: &Path, params: &VhostUserNetParams) -> Result<Self> {
        let invalid = |what: String| Error::VhostUser {
            socket: socket.to_owned(),
            what,
            source: None,
        };
        if params.num_queues < 2
            || !params.num_queues.is_multiple_of(2)
            || params.num_queues > 2 * VHOST_USER_NET_MAX_QUEUE_PAIRS
        {
            return Err(invalid(format!(
                "num_queues={} is not valid: an even number from 2 to {} (receive/transmit \
                 pairs) is needed",
                params.num_queues,
                2 * VHOST_USER_NET_MAX_QUEUE_PAIRS
            )));
        }
        if !params.queue_size.is_power_of_two() || params.queue_size > super::MAX_QUEUE_SIZE {
            return Err(invalid(format!(
                "queue size {} is not a power of two up to {}",
                params.queue_size,
                super::MAX_QUEUE_SIZE
            )));
        }
        let connection = VhostUserConnection::open(socket, params.mode)?;
        let backend_features = connection.with_session(|session| {
            session.check_queues(socket, params.num_queues, "the net device")?;
            Ok(session.backend_features)
        })?;
        if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(invalid(
                "does not offer VIRTIO_F_VERSION_1 (legacy virtio is not supported)".to_owned(),
            ));
        }
        let mut features = (backend_features & PASSABLE_FEATURES)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS);
        if params.mtu.is_some() {
            features |= 1 << VIRTIO_NET_F_MTU;
        }
        let pairs = params.num_queues / 2;
        let mut queue_sizes = vec![params.queue_size; params.num_queues];
        let multi_queue = (pairs > 1).then(|| {
            features |= (1 << VIRTIO_NET_F_MQ) | (1 << VIRTIO_NET_F_CTRL_VQ);
            // The control queue, the VMM's.
            queue_sizes.push(params.queue_size);
            Arc::new(MultiQueue::new(pairs as u16, socket))
        });
        Ok(Self {
            connection,
            queue_sizes,
            features,
            config_space: net_config_space(params.mac, pairs, params.mtu).to_vec(),
            multi_queue,
        })
    }

    /// The queue pairs the driver uses (what its last `VQ_PAIRS_SET` asked; 1 after a reset),
    /// for the saved state; `None` for a device of one pair.
    pub fn queue_pairs_in_use(&self) -> Option<u16> {
        self.multi_queue
            .as_ref()
            .map(|mq| mq.pairs.load(Ordering::SeqCst))
    }

    /// Sets the pairs in use from a saved state before a restored device starts its rings.
    /// A count this device cannot have (saved for another `num_queues`) is an error.
    pub fn restore_queue_pairs(&self, pairs: Option<u16>) -> Result<()> {
        restore_pairs(self.multi_queue.as_deref(), pairs).map_err(|what| Error::VhostUser {
            socket: self.socket().to_owned(),
            what,
            source: None,
        })
    }

    /// A new, inactive device on the session with the backend.
    pub fn device(&self) -> VhostUserNet {
        let rings = VhostUserRings::new(self.connection.clone(), "vhost-user-net");
        let rings = match &self.multi_queue {
            Some(mq) => rings.with_own_queue(mq.clone()),
            None => rings,
        };
        VhostUserNet {
            link: self.clone(),
            rings,
        }
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        self.connection.socket()
    }
}

/// Sets `multi_queue`'s pairs in use from a saved state's `pairs`, or says why they do not fit.
fn restore_pairs(
    multi_queue: Option<&MultiQueue>,
    pairs: Option<u16>,
) -> std::result::Result<(), String> {
    match (multi_queue, pairs) {
        (None, None | Some(1)) => Ok(()),
        (Some(mq), Some(pairs)) if control::pairs_valid(pairs, mq.max_pairs) => {
            mq.pairs.store(pairs, Ordering::SeqCst);
            Ok(())
        }
        (Some(mq), None) => Err(format!(
            "the saved state has no queue-pair count, this device has {} pairs (num_queues \
             differs from the saved VM's)",
            mq.max_pairs
        )),
        (mq, Some(pairs)) => Err(format!(
            "the saved state uses {pairs} queue pairs, this device has {} (num_queues differs \
             from the saved VM's)",
            mq.map_or(1, |mq| mq.max_pairs)
        )),
    }
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    vhost_user_device_methods!("vhost-user-net");

    /// A network keeps nothing to make durable.
    fn flush_backend(&mut self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const SOCKET: &str = "/run/test/net.sock";

    fn params(num_queues: usize) -> VhostUserNetParams {
        VhostUserNetParams {
            mac: [2, 0, 0, 0, 0, 0x10],
            num_queues,
            queue_size: 256,
            mtu: None,
            mode: VhostUserMode::Client,
        }
    }

    #[test]
    fn config_space_has_the_mac_link_up_and_the_queue_pairs() {
        let space = net_config_space([2, 0, 0, 0, 0, 0x10], 4, Some(9000));
        assert_eq!(
            space,
            [2, 0, 0, 0, 0, 0x10, 1, 0, 4, 0, 0x28, 0x23],
            "mac, status LINK_UP, max_virtqueue_pairs 4, mtu 9000"
        );
    }

    #[test]
    fn odd_zero_and_too_many_queues_are_refused_before_connecting() {
        // The socket does not exist: an error about the socket would mean it tried.
        for num_queues in [0, 1, 3, 2 * VHOST_USER_NET_MAX_QUEUE_PAIRS + 2] {
            let error = VhostUserNetLink::connect(Path::new(SOCKET), &params(num_queues))
                .err()
                .unwrap()
                .to_string();
            assert!(
                error.contains(&format!("num_queues={num_queues} is not valid")),
                "{error}"
            );
        }
    }

    /// A control queue of 8 entries at 0x1000 with one VQ_PAIRS_SET `pairs` posted: header,
    /// data and ack in three descriptors. Returns the ack's address.
    fn post_pairs_set(mem: &GuestMemoryMmap, queue: &mut Queue, nth: u16, pairs: u16) -> u64 {
        let base = 0x8000 + 0x100 * u64::from(nth);
        mem.write_slice(
            &[
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
            ],
            GuestAddress(base),
        )
        .unwrap();
        mem.write_obj(pairs, GuestAddress(base + 0x10)).unwrap();
        let first = 3 * nth;
        for (i, (addr, len, flags)) in
            [(base, 2u32, 1u16), (base + 0x10, 2, 1), (base + 0x20, 1, 2)]
                .into_iter()
                .enumerate()
        {
            let desc = 0x1000 + 16 * u64::from(first + i as u16);
            mem.write_obj(addr, GuestAddress(desc)).unwrap();
            mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(desc + 12)).unwrap();
            mem.write_obj(first + i as u16 + 1, GuestAddress(desc + 14))
                .unwrap();
        }
        mem.write_obj(first, GuestAddress(0x2000 + 4 + 2 * u64::from(nth)))
            .unwrap();
        mem.write_obj(nth + 1, GuestAddress(0x2002)).unwrap();
        if !queue.ready() {
            queue.set_size(8);
            queue.set_desc_table_address(Some(0x1000), Some(0));
            queue.set_avail_ring_address(Some(0x2000), Some(0));
            queue.set_used_ring_address(Some(0x3000), Some(0));
            queue.set_ready(true);
        }
        base + 0x20
    }

    #[test]
    fn vq_pairs_set_switches_the_backend_rings_and_a_reset_goes_back_to_one_pair() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut queue = Queue::new(8).unwrap();
        let mq = MultiQueue::new(3, Path::new(SOCKET));
        // After a reset only the first pair runs.
        assert!(mq.ring_enabled(0) && mq.ring_enabled(1));
        assert!(!mq.ring_enabled(2) && !mq.ring_enabled(5));

        let ack = post_pairs_set(&mem, &mut queue, 0, 2);
        let mut switched = Vec::new();
        let not_paused = AtomicBool::new(false);
        assert!(
            mq.serve(&mut queue, &mem, &not_paused, &mut |ring, on| switched
                .push((ring, on)))
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(ack)).unwrap(),
            VIRTIO_NET_OK as u8
        );
        assert_eq!(
            switched,
            [
                (0, true),
                (1, true),
                (2, true),
                (3, true),
                (4, false),
                (5, false)
            ]
        );
        assert!(mq.ring_enabled(3) && !mq.ring_enabled(4));

        // More pairs than the device has: refused, nothing switched, the count kept.
        let ack = post_pairs_set(&mem, &mut queue, 1, 4);
        switched.clear();
        assert!(
            mq.serve(&mut queue, &mem, &not_paused, &mut |ring, on| switched
                .push((ring, on)))
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(ack)).unwrap(),
            VIRTIO_NET_ERR as u8
        );
        assert!(switched.is_empty());
        assert_eq!(mq.pairs.load(Ordering::SeqCst), 2);

        mq.reset();
        assert!(!mq.ring_enabled(2));
    }

    #[test]
    fn a_saved_pair_count_is_restored_only_onto_a_device_it_fits() {
        let mq = MultiQueue::new(2, Path::new(SOCKET));
        restore_pairs(Some(&mq), Some(2)).unwrap();
        assert!(mq.ring_enabled(3));
        let error = restore_pairs(Some(&mq), Some(3)).unwrap_err();
        assert!(
            error.contains("uses 3 queue pairs, this device has 2"),
            "{error}"
        );
        assert!(restore_pairs(Some(&mq), None).is_err());
        assert!(restore_pairs(None, Some(2)).is_err());
        restore_pairs(None, None).unwrap();
        restore_pairs(None, Some(1)).unwrap();
    }
}
