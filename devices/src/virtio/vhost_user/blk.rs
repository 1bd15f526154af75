//! The vhost-user-blk front-end: a virtio-blk device (type 2) whose request queues a backend
//! process serves (our `nv-vhost-user-blk`, qemu-storage-daemon, SPDK).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{connect, vhost_error, Session, VHOST_USER_CONNECT_TIMEOUT};
use crate::virtio::io_thread::{IoThread, QueueWorker};
use crate::virtio::transport::lock_queue;
use crate::virtio::{read_config_space, ActivationContext, VirtioDevice, VirtioInterrupt};
use crate::{Error, Result};

/// Largest queue the front-end sets up (the split ring's limit).
pub const VHOST_USER_BLK_MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes of `struct virtio_blk_config` asked of the backend: every field up to the write-zeroes
/// ones, the size all backends answer.
const CONFIG_SPACE_LEN: usize = 60;
/// Offset of `num_queues` in `struct virtio_blk_config`.
const CONFIG_NUM_QUEUES_AT: usize = 34;

/// Feature bits the transport can pass through from the backend to the driver: the block
/// device's own bits (0..=23), indirect descriptors, event index and VERSION_1. Packed rings,
/// platform access and notification data are not: the transport has split rings only.
const PASSABLE_FEATURES: u64 = ((1 << 24) - 1) | (1 << 28) | (1 << 29) | (1 << 32);

/// The session with the backend, shared by the devices built for one disk (a restore builds a
/// new device on the same session); `None` after the backend was lost, until a reconnect.
type SharedSession = Arc<Mutex<Option<Session>>>;

/// A disk's connection to its vhost-user-blk backend and what the backend told of the device
/// (features, configuration space). Each [`VhostUserBlkLink::device`] is a device on it: the
/// one the VM boots with, and the one a restore rebuilds the transport around.
#[derive(Clone)]
pub struct VhostUserBlkLink {
    socket: PathBuf,
    session: SharedSession,
    queue_sizes: Vec<u16>,
    features: u64,
    config_space: Vec<u8>,
}

/// A vhost-user-blk device: activation sends the memory table and starts the rings.
pub struct VhostUserBlk {
    link: VhostUserBlkLink,
    active: Option<Active>,
}

/// What an activation set up.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Arc<Mutex<Queue>>>,
    /// Queue-notify eventfds (the ioeventfds at the notify addresses), handed over as kicks.
    kicks: Vec<EventFd>,
    /// One per queue, handed over as calls; the relay thread turns them into interrupts.
    calls: Vec<EventFd>,
    relay: IoThread,
    acked_features: u64,
    /// The session in use has not had SET_FEATURES and SET_MEM_TABLE yet (a new connection).
    needs_setup: bool,
    /// Which queues the backend runs now.
    running: Vec<bool>,
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
        let mut session = connect(socket, VHOST_USER_CONNECT_TIMEOUT)?;
        if session
            .protocol_features
            .contains(VhostUserProtocolFeatures::MQ)
        {
            let backend_queues = session
                .frontend
                .get_queue_num()
                .map_err(vhost_error(socket, "GET_QUEUE_NUM"))?;
            if backend_queues < num_queues as u64 {
                return Err(invalid(format!(
                    "serves {backend_queues} queues, the disk asks for {num_queues}"
                )));
            }
        } else if num_queues > 1 {
            return Err(invalid(format!(
                "does not offer several queues, the disk asks for {num_queues}"
            )));
        }
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
        Ok(Self {
            socket: socket.to_owned(),
            session: Arc::new(Mutex::new(Some(session))),
            queue_sizes: vec![queue_size; num_queues],
            features,
            config_space,
        })
    }

    /// A new, inactive device of this disk on the session with the backend.
    pub fn device(&self) -> VhostUserBlk {
        VhostUserBlk {
            link: self.clone(),
            active: None,
        }
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl VhostUserBlk {
    /// Makes sure the session is open and set up for the activation: reconnects (bounded) after
    /// the backend was lost, then SET_FEATURES and SET_MEM_TABLE on a new session.
    fn ready_session(&mut self) -> Result<()> {
        let socket = self.link.socket.clone();
        let session = self.link.session.clone();
        let mut guard = session.lock().unwrap_or_else(|e| e.into_inner());
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        if guard.is_none() {
            info!("vhost-user backend at {}: reconnecting", socket.display());
            *guard = Some(connect(&socket, VHOST_USER_CONNECT_TIMEOUT)?);
            active.needs_setup = true;
        }
        let Some(session) = guard.as_mut() else {
            return Ok(());
        };
        if active.needs_setup {
            if let Err(e) = set_up(&socket, session, active) {
                *guard = None;
                return Err(e);
            }
            active.needs_setup = false;
        }
        Ok(())
    }

    /// Starts every ready queue from the position in its `Queue`, then kicks it once: what the
    /// guest posted before (or across a power failure) is served.
    fn start_rings(&mut self) -> Result<()> {
        self.ready_session()?;
        let socket = self.link.socket.clone();
        let session = self.link.session.clone();
        let mut guard = session.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(active), Some(session)) = (self.active.as_mut(), guard.as_mut()) else {
            return Ok(());
        };
        let result = start_rings(&socket, session, active);
        if result.is_err() {
            *guard = None;
            active.needs_setup = true;
        }
        result
    }

    /// Stops the running rings with GET_VRING_BASE and records where they stand in the queues:
    /// the next available entry the backend answers, the used index from the used ring (every
    /// request it took is there once the ring is stopped). A backend that cannot answer (gone)
    /// leaves the used index as the next available entry: the requests it had taken but not
    /// completed are served again after the reconnect (block requests may be repeated).
    fn stop_rings(&mut self) {
        let socket = self.link.socket.clone();
        let session = self.link.session.clone();
        let mut guard = session.lock().unwrap_or_else(|e| e.into_inner());
        let Some(active) = self.active.as_mut() else {
            return;
        };
        for (index, queue) in active.queues.iter().enumerate() {
            if !std::mem::take(&mut active.running[index]) {
                continue;
            }
            let Ok(mut queue) = lock_queue(queue) else {
                error!(
                    "vhost-user-blk {}: queue {index} lock poisoned",
                    socket.display()
                );
                continue;
            };
            let used = match queue.used_idx(&active.mem, Ordering::Acquire) {
                Ok(used) => used.0,
                Err(e) => {
                    error!(
                        "vhost-user-blk {}: cannot read queue {index}'s used index: {e}",
                        socket.display()
                    );
                    queue.next_used()
                }
            };
            let base = match guard.as_mut() {
                Some(session) => match session.frontend.get_vring_base(index) {
                    Ok(base) => Some(base as u16),
                    Err(e) => {
                        error!(
                            "vhost-user backend at {}: GET_VRING_BASE of queue {index} failed \
                             ({e}); the backend is taken as lost and requests it had not \
                             completed will be served again after it is back",
                            socket.display()
                        );
                        *guard = None;
                        None
                    }
                },
                None => None,
            };
            // A backend may answer GET_VRING_BASE with requests still in flight (it counts them
            // taken): wait, bounded, until each is in the used ring, one used entry per request.
            let used = match base {
                Some(base) => wait_for_used(&queue, &active.mem, base, used),
                None => queue
                    .used_idx(&active.mem, Ordering::Acquire)
                    .map_or(used, |u| u.0),
            };
            let base = match base {
                Some(base) if base != used => {
                    error!(
                        "vhost-user backend at {}: queue {index} stopped at {base} with requests                          {used}..{base} not completed after {}s; they will be served again",
                        socket.display(),
                        IN_FLIGHT_TIMEOUT.as_secs()
                    );
                    used
                }
                Some(base) => base,
                None => used,
            };
            queue.set_next_avail(base);
            queue.set_next_used(used);
        }
        if guard.is_none() {
            active.needs_setup = true;
        }
    }
}

/// How long a stopped ring's requests in flight may take to reach the used ring.
const IN_FLIGHT_TIMEOUT: Duration = Duration::from_secs(5);

/// Polls the used index of `queue` until it reaches `base` or [`IN_FLIGHT_TIMEOUT`] passed;
/// returns the last one read (`fallback` when it cannot be read).
fn wait_for_used(queue: &Queue, mem: &GuestMemoryMmap, base: u16, fallback: u16) -> u16 {
    let deadline = Instant::now() + IN_FLIGHT_TIMEOUT;
    loop {
        let used = queue
            .used_idx(mem, Ordering::Acquire)
            .map_or(fallback, |u| u.0);
        if used == base || Instant::now() >= deadline {
            return used;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// SET_FEATURES (the driver's plus the protocol-features bit) and SET_MEM_TABLE from the guest
/// RAM's regions, each a file descriptor and an offset into it.
fn set_up(socket: &Path, session: &mut Session, active: &Active) -> Result<()> {
    let protocol_bit = session.backend_features
        & vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    session
        .frontend
        .set_features(active.acked_features | protocol_bit)
        .map_err(vhost_error(socket, "SET_FEATURES"))?;
    let regions = active
        .mem
        .iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|e| Error::VhostUser {
                socket: socket.to_owned(),
                what: format!(
                    "guest RAM at {:#x} has no file descriptor to share: vhost-user needs RAM the \
                     backend can map (an NV VM, or a shared file-backed memory zone)",
                    region.start_addr().0
                ),
                source: Some(e),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    session
        .frontend
        .set_mem_table(&regions)
        .map_err(vhost_error(socket, "SET_MEM_TABLE"))?;
    Ok(())
}

fn start_rings(socket: &Path, session: &mut Session, active: &mut Active) -> Result<()> {
    let host_address = |mem: &GuestMemoryMmap, gpa: u64, what: &str| {
        mem.get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|e| Error::VhostUser {
                socket: socket.to_owned(),
                what: format!("the {what} at guest {gpa:#x} is outside guest RAM: {e}"),
                source: None,
            })
    };
    for (index, queue) in active.queues.iter().enumerate() {
        let (config, base) = {
            let queue = lock_queue(queue)?;
            if !queue.ready() || active.running[index] {
                continue;
            }
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host_address(&active.mem, queue.desc_table(), "descriptor table")?,
                used_ring_addr: host_address(&active.mem, queue.used_ring(), "used ring")?,
                avail_ring_addr: host_address(&active.mem, queue.avail_ring(), "available ring")?,
                log_addr: None,
            };
            (config, queue.next_avail())
        };
        let frontend = &mut session.frontend;
        frontend
            .set_vring_num(index, config.queue_size)
            .map_err(vhost_error(socket, "SET_VRING_NUM"))?;
        frontend
            .set_vring_addr(index, &config)
            .map_err(vhost_error(socket, "SET_VRING_ADDR"))?;
        frontend
            .set_vring_base(index, base)
            .map_err(vhost_error(socket, "SET_VRING_BASE"))?;
        frontend
            .set_vring_call(index, &active.calls[index])
            .map_err(vhost_error(socket, "SET_VRING_CALL"))?;
        frontend
            .set_vring_kick(index, &active.kicks[index])
            .map_err(vhost_error(socket, "SET_VRING_KICK"))?;
        if session.rings_need_enable() {
            session
                .frontend
                .set_vring_enable(index, true)
                .map_err(vhost_error(socket, "SET_VRING_ENABLE"))?;
        }
        active.running[index] = true;
        // A kick the guest gave while the ring was stopped (or before a power failure) is not
        // in this eventfd: kick once, an empty ring costs the backend one look.
        if let Err(e) = active.kicks[index].write(1) {
            warn!(
                "vhost-user-blk {}: cannot kick queue {index}: {e}",
                socket.display()
            );
        }
    }
    Ok(())
}

/// Turns the backend's call eventfds into the queues' interrupts (MSI-X vectors the driver
/// assigned). Which call fired is not told apart: every queue is signalled, and a driver finds
/// nothing new on a queue whose call did not fire.
struct CallRelay {
    interrupt: Arc<VirtioInterrupt>,
    queues: u16,
}

impl QueueWorker for CallRelay {
    fn process_queues(&mut self, _pause_requested: &AtomicBool) {
        for queue in 0..self.queues {
            if let Err(e) = self.interrupt.signal_used_queue(queue) {
                error!("vhost-user-blk: cannot raise queue {queue}'s interrupt: {e}");
            }
        }
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
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
        warn!(
            "vhost-user-blk {}: ignoring {}-byte configuration write at {offset:#x}",
            self.link.socket.display(),
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<()> {
        if self.active.is_some() {
            return Err(Error::AlreadyActivated);
        }
        let calls = (0..ctx.queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd))
            .collect::<Result<Vec<_>>>()?;
        let relay_evts = calls
            .iter()
            .map(|e| e.try_clone().map_err(Error::EventFd))
            .collect::<Result<Vec<_>>>()?;
        let relay = IoThread::spawn_watching(
            "vhost-user-blk-call",
            CallRelay {
                interrupt: ctx.interrupt.clone(),
                queues: ctx.queues.len() as u16,
            },
            relay_evts,
            &[],
            ctx.start_paused,
            ctx.io_thread_start.clone(),
        )?;
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            running: vec![false; ctx.queues.len()],
            queues: ctx.queues,
            kicks: ctx.queue_evts,
            calls,
            relay,
            acked_features: ctx.acked_features,
            needs_setup: true,
        });
        let result = if ctx.start_paused {
            self.ready_session()
        } else {
            self.start_rings()
        };
        if result.is_err() {
            self.active = None;
        }
        result
    }

    fn reset(&mut self) {
        self.stop_rings();
        self.active = None;
    }

    fn pause(&mut self) -> Result<()> {
        self.stop_rings();
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        active.relay.pause()?;
        // A call the relay had not read yet becomes the interrupt here; the transport's saved
        // interrupt status raises it again after a restore.
        for (queue, call) in active.calls.iter().enumerate() {
            if call.read().is_ok() {
                if let Err(e) = active.interrupt.signal_used_queue(queue as u16) {
                    error!("vhost-user-blk: cannot raise queue {queue}'s interrupt: {e}");
                }
            }
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<()> {
        if self.active.is_none() {
            return Ok(());
        }
        self.start_rings()?;
        if let Some(active) = self.active.as_mut() {
            active.relay.resume()?;
        }
        Ok(())
    }

    /// The backend makes writes durable: on the guest's FLUSH, and (ours) when a ring stops.
    fn flush_backend(&mut self) -> Result<()> {
        Ok(())
    }
}
