//! The vhost-user-blk front-end: a virtio-blk device (type 2) whose request queues a backend
//! process serves (our `nv-vhost-user-blk`, qemu-storage-daemon, SPDK).

use std::path::Path;

use log::warn;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::{
    vhost_error, vhost_user_device_methods, VhostUserConnection, VhostUserMode, VhostUserRings,
};
use crate::virtio::VirtioDevice;
use crate::{Error, Result};

/// Largest queue the front-end sets up (the split ring's limit).
pub const VHOST_USER_BLK_MAX_QUEUE_SIZE: u16 = super::MAX_QUEUE_SIZE;

/// Bytes of `struct virtio_blk_config` asked of the backend: every field up to the write-zeroes
/// ones, the size all backends answer.
const CONFIG_SPACE_LEN: usize = 60;
/// Offset of `num_queues` in `struct virtio_blk_config`.
const CONFIG_NUM_QUEUES_AT: usize = 34;

/// Feature bits the transport can pass through from the backend to the driver: the block
/// device's own bits (0..=23), indirect descriptors, event index and VERSION_1. Packed rings,
/// platform access and notification data are not: the transport has split rings only.
const PASSABLE_FEATURES: u64 = ((1 << 24) - 1) | (1 << 28) | (1 << 29) | (1 << 32);

/// A disk's connection to its vhost-user-blk backend and what the backend told of the device
/// (features, configuration space). Each [`VhostUserBlkLink::device`] is a device on it: the
/// one the VM boots with, and the one a restore rebuilds the transport around.
#[derive(Clone)]
pub struct VhostUserBlkLink {
    connection: VhostUserConnection,
    queue_sizes: Vec<u16>,
    features: u64,
    config_space: Vec<u8>,
}

/// A vhost-user-blk device: activation sends the memory table and starts the rings.
pub struct VhostUserBlk {
    link: VhostUserBlkLink,
    rings: VhostUserRings,
}

impl VhostUserBlkLink {
    /// Connects to the backend at `socket` (waiting up to [`VHOST_USER_CONNECT_TIMEOUT`] for it),
    /// checks it can serve `num_queues` queues and reads its configuration space.
    pub fn connect(socket: &Path, num_queues: usize, queue_size: u16) -> Result<Self> {
        let invalid = |what: String| Error::VhostUser {
            socket: socket.to_owned(),
            what,
            source: None,
        };
        if num_queues == 0 || num_queues > usize::from(u16::MAX) {
            return Err(invalid(format!("{num_queues} queues asked")));
        }
        if !queue_size.is_power_of_two() || queue_size > VHOST_USER_BLK_MAX_QUEUE_SIZE {
            return Err(invalid(format!(
                "queue size {queue_size} is not a power of two up to \
                 {VHOST_USER_BLK_MAX_QUEUE_SIZE}"
            )));
        }
        let connection = VhostUserConnection::open(socket, VhostUserMode::Client)?;
        let (features, config_space) = connection.with_session(|session| {
            session.check_queues(socket, num_queues, "the disk")?;
            let mut config_space = vec![0u8; CONFIG_SPACE_LEN];
            if session
                .protocol_features
                .contains(VhostUserProtocolFeatures::CONFIG)
            {
                let (_, payload) = session
                    .frontend
                    .get_config(
                        0,
                        CONFIG_SPACE_LEN as u32,
                        VhostUserConfigFlags::empty(),
                        &config_space,
                    )
                    .map_err(vhost_error(socket, "GET_CONFIG"))?;
                let n = payload.len().min(CONFIG_SPACE_LEN);
                config_space[..n].copy_from_slice(&payload[..n]);
            } else {
                warn!(
                    "vhost-user backend at {} has no configuration space (no CONFIG protocol \
                 feature): the guest sees a capacity of 0",
                    socket.display()
                );
            }
            let mut features = session.backend_features & PASSABLE_FEATURES;
            if num_queues == 1 {
                features &= !(1u64 << VIRTIO_BLK_F_MQ);
            }
            // The driver reads the queue count of this device, not of the backend.
            config_space[CONFIG_NUM_QUEUES_AT..CONFIG_NUM_QUEUES_AT + 2]
                .copy_from_slice(&(num_queues as u16).to_le_bytes());
            Ok((features, config_space))
        })?;
        Ok(Self {
            connection,
            queue_sizes: vec![queue_size; num_queues],
            features,
            config_space,
        })
    }

    /// A new, inactive device of this disk on the session with the backend.
    pub fn device(&self) -> VhostUserBlk {
        VhostUserBlk {
            link: self.clone(),
            rings: VhostUserRings::new(self.connection.clone(), "vhost-user-blk"),
        }
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        self.connection.socket()
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    vhost_user_device_methods!("vhost-user-blk");

    /// The backend makes writes durable: on the guest's FLUSH, and (ours) when a ring stops.
    fn flush_backend(&mut self) -> Result<()> {
        Ok(())
    }
}
