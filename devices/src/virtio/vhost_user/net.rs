//! The vhost-user-net front-end: a virtio-net device (type 1) whose receive and transmit queues
//! a backend process serves (our `nv-vhost-user-net`, OVS-DPDK, DPDK's vhost PMD).
//!
//! The configuration space is the VMM's, as upstream: the MAC the VM was given (`mac=`), the
//! link up, the MTU when one is set. The backend's offloads and ring features are passed to the
//! driver; MAC and STATUS are the front-end's own and never sent to the backend.

use std::path::Path;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::{vhost_user_device_methods, VhostUserConnection, VhostUserMode, VhostUserRings};
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

/// A network device's connection to its vhost-user-net backend and what the driver is offered.
/// Each [`VhostUserNetLink::device`] is a device on it (at boot, and at each restore).
#[derive(Clone)]
pub struct VhostUserNetLink {
    connection: VhostUserConnection,
    queue_sizes: Vec<u16>,
    features: u64,
    config_space: Vec<u8>,
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
        if params.num_queues != 2 {
            return Err(invalid(format!(
                "num_queues={}: a vhost-user net device has one queue pair here (several \
                 need a control queue the VMM would serve)",
                params.num_queues
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
        Ok(Self {
            connection,
            queue_sizes: vec![params.queue_size; params.num_queues],
            features,
            config_space: net_config_space(params.mac, pairs, params.mtu).to_vec(),
        })
    }

    /// A new, inactive device on the session with the backend.
    pub fn device(&self) -> VhostUserNet {
        VhostUserNet {
            link: self.clone(),
            rings: VhostUserRings::new(self.connection.clone(), "vhost-user-net"),
        }
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        self.connection.socket()
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
