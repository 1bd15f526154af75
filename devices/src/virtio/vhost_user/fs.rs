//! The virtio-fs front-end: a file-system device (type 26) whose queues a backend process
//! serves (virtiofsd): one high-priority queue, then the request queues.
//!
//! The configuration space is the VMM's, as upstream: the tag the guest mounts by and the
//! number of request queues. FUSE itself (node ids, open file handles) is the backend's state.
//! When the backend offers the DEVICE_STATE protocol feature (virtiofsd does), the VMM reads
//! that state with the rings stopped ([`VhostUserFsLink::save_device_state`]) into the device's
//! saved state, and a restored device gives it to the backend it reconnects to before the rings
//! start ([`VhostUserFsLink::restored_device`]): the guest's FUSE session survives a new
//! virtiofsd process (see `docs/devices.md`).

use std::path::Path;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::{VhostUserConnection, VhostUserMode, VhostUserRings};
use crate::virtio::{read_config_space, ActivationContext, VirtioDevice};
use crate::{Error, Result};

/// Bytes of the tag in `struct virtio_fs_config` (UTF-8, NUL-padded, not NUL-terminated when
/// it fills them all).
pub const VIRTIO_FS_TAG_LEN: usize = 36;

/// Most request queues a virtio-fs device may have here.
pub const VIRTIO_FS_MAX_REQUEST_QUEUES: usize = 64;

/// The backend's feature bits the driver may use: indirect descriptors, event index and
/// VERSION_1. Not the notification queue (VIRTIO_FS_F_NOTIFICATION): the VMM sets up the
/// high-priority and request queues only.
const PASSABLE_FEATURES: u64 =
    (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_F_VERSION_1);

/// `struct virtio_fs_config`: the tag, then `num_request_queues` (le32).
fn fs_config_space(tag: &str, request_queues: u32) -> [u8; VIRTIO_FS_TAG_LEN + 4] {
    let mut config = [0u8; VIRTIO_FS_TAG_LEN + 4];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config[VIRTIO_FS_TAG_LEN..].copy_from_slice(&request_queues.to_le_bytes());
    config
}

/// A file system's connection to its virtiofsd and what the driver is offered. Each
/// [`VhostUserFsLink::device`] is a device on it (at boot, and at each restore).
#[derive(Clone)]
pub struct VhostUserFsLink {
    connection: VhostUserConnection,
    queue_sizes: Vec<u16>,
    features: u64,
    config_space: Vec<u8>,
}

/// A virtio-fs device: activation sends the memory table and starts the rings.
pub struct VhostUserFs {
    link: VhostUserFsLink,
    rings: VhostUserRings,
}

impl VhostUserFsLink {
    /// Connects to the backend at `socket` (waiting up to
    /// [`super::VHOST_USER_CONNECT_TIMEOUT`]) and checks it serves the high-priority queue
    /// plus `request_queues` request queues of `queue_size` entries and speaks virtio 1.
    pub fn connect(
        socket: &Path,
        tag: &str,
        request_queues: usize,
        queue_size: u16,
    ) -> Result<Self> {
        let invalid = |what: String| Error::VhostUser {
            socket: socket.to_owned(),
            what,
            source: None,
        };
        if tag.is_empty() || tag.len() > VIRTIO_FS_TAG_LEN {
            return Err(invalid(format!(
                "tag {tag:?} is not 1 to {VIRTIO_FS_TAG_LEN} bytes"
            )));
        }
        if request_queues == 0 || request_queues > VIRTIO_FS_MAX_REQUEST_QUEUES {
            return Err(invalid(format!(
                "{request_queues} request queues asked (1 to {VIRTIO_FS_MAX_REQUEST_QUEUES})"
            )));
        }
        if !queue_size.is_power_of_two() || queue_size > super::MAX_QUEUE_SIZE {
            return Err(invalid(format!(
                "queue size {queue_size} is not a power of two up to {}",
                super::MAX_QUEUE_SIZE
            )));
        }
        let queues = 1 + request_queues;
        let connection =
            VhostUserConnection::open_with_device_state(socket, VhostUserMode::Client)?;
        let backend_features = connection.with_session(|session| {
            session.check_queues(socket, queues, "the file system")?;
            Ok(session.backend_features)
        })?;
        if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(invalid(
                "does not offer VIRTIO_F_VERSION_1 (legacy virtio is not supported)".to_owned(),
            ));
        }
        Ok(Self {
            connection,
            queue_sizes: vec![queue_size; queues],
            features: backend_features & PASSABLE_FEATURES,
            config_space: fs_config_space(tag, request_queues as u32).to_vec(),
        })
    }

    /// A new, inactive device on the session with the backend.
    pub fn device(&self) -> VhostUserFs {
        VhostUserFs {
            link: self.clone(),
            rings: VhostUserRings::new(self.connection.clone(), "vhost-user-fs"),
        }
    }

    /// A device rebuilt from a saved state: `device_state`, when the save had it, goes to the
    /// backend when the device sets up its session, before the rings start.
    pub fn restored_device(&self, device_state: Option<Vec<u8>>) -> VhostUserFs {
        let mut device = self.device();
        if let Some(state) = device_state {
            device.rings.load_device_state_on_setup(state);
        }
        device
    }

    /// The backend's FUSE state (its inodes, open handles and INIT options), read through
    /// SET_DEVICE_STATE_FD. The device must be paused (its rings stopped). `None` when the
    /// backend was lost or does not offer DEVICE_STATE.
    pub fn save_device_state(&self) -> Result<Option<Vec<u8>>> {
        self.connection.save_device_state()
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        self.connection.socket()
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.link.queue_sizes
    }

    fn available_features(&self) -> u64 {
        self.link.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.link.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::warn!(
            "vhost-user-fs {}: ignoring {}-byte write to read-only config at {offset:#x}",
            self.link.socket().display(),
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<()> {
        self.rings.activate(ctx)
    }

    fn reset(&mut self) {
        self.rings.reset();
    }

    fn pause(&mut self) -> Result<()> {
        self.rings.pause()
    }

    fn resume(&mut self) -> Result<()> {
        self.rings.resume()
    }

    /// virtiofsd writes to the host's files itself; FUSE_FSYNC is the guest's to send.
    fn flush_backend(&mut self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of `struct virtio_fs_config` (virtio 1.2, 5.11.4): 36 tag bytes NUL-padded,
    /// then num_request_queues little-endian.
    #[test]
    fn config_space_is_the_tag_then_the_request_queue_count() {
        let config = fs_config_space("myfs", 3);
        assert_eq!(config.len(), 40);
        assert_eq!(&config[..4], b"myfs");
        assert!(config[4..36].iter().all(|&b| b == 0));
        assert_eq!(&config[36..], &[3, 0, 0, 0]);
        let full = "t".repeat(VIRTIO_FS_TAG_LEN);
        assert_eq!(&fs_config_space(&full, 1)[..36], full.as_bytes());
        assert_eq!(VIRTIO_ID_FS, 26);
    }

    #[test]
    fn bad_tags_and_queue_counts_are_refused_before_connecting() {
        let socket = Path::new("/nonexistent/fs.sock");
        let long = "t".repeat(VIRTIO_FS_TAG_LEN + 1);
        for (tag, queues, size) in [
            ("", 1, 1024),
            (long.as_str(), 1, 1024),
            ("t", 0, 1024),
            ("t", 1, 1000),
        ] {
            let error = VhostUserFsLink::connect(socket, tag, queues, size)
                .err()
                .expect("refused");
            assert!(
                error.to_string().contains("/nonexistent/fs.sock"),
                "{error}"
            );
        }
    }
}
