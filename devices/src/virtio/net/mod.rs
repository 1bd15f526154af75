//! virtio-net on a TAP interface.
//!
//! Queues: a receive and a transmit queue per queue pair (2i, 2i+1), plus a control queue when
//! there is more than one pair (multiqueue needs `VIRTIO_NET_F_CTRL_VQ`). One I/O thread serves
//! them all, woken by the queue notifies and, edge-triggered, by the tap's descriptors.
//!
//! Packets are never copied by the VMM: a transmitted chain is handed to the tap with one
//! `writev` over its guest buffers (the 12-byte virtio-net header first, which the tap
//! understands because it was opened with `IFF_VNET_HDR`), and a received packet is read with one
//! `readv` straight into the guest's receive buffers. The checksum and segmentation offloads the
//! guest negotiated therefore pass through the header untouched; `TUNSETOFFLOAD` tells the host
//! stack which of them the guest accepts on receive.
//!
//! Pausing (power-fail save, snapshot) happens between packets: a transmitted packet is written
//! whole or not at all, and receive buffers popped for a packet that was not read are given back
//! to the ring, so nothing is popped-but-unused in the saved queue state.
//!
//! While NV checkpoints are on, transmitted frames go through the VM's [`OutputHold`] instead
//! (copied out of the ring, written to the tap once their epoch committed; see `output_hold`).

pub(crate) mod control;
mod output_hold;
mod tap;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::{error, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

pub use self::output_hold::{HoldTotals, OutputHold, Released, HOLD_LIMIT_BYTES};
pub use self::tap::{Tap, TapError, NEW_TAP_TEMPLATE, VNET_HDR_LEN};
use super::guest_write_gate::GuestWrites;
use super::io_thread::QueueWorker;
use super::queue_service::{service_thread_lifecycle, ServiceThread};
use super::{ActivationContext, BeforeWrite, GuestWriteGateSlot, VirtioDevice, VirtioInterrupt};
use crate::{Error, Result};

/// Upstream's default queue size and the largest we accept.
pub const NET_QUEUE_SIZE: u16 = 256;
/// Size of `struct virtio_net_config` up to `mtu`: mac, status, max_virtqueue_pairs, mtu.
const CONFIG_SPACE_LEN: usize = 12;
/// Largest Ethernet frame (with a VLAN tag) the guest may get without segmentation offloads.
const ETH_OVERHEAD: usize = 14 + 4;
/// Largest frame a TSO/GSO packet from the host can be.
const GSO_MAX_FRAME: usize = 65_535 + ETH_OVERHEAD;
/// `readv`/`writev` take at most this many buffers (IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// What the guest sees of a virtio-net device, and the tap behind it.
pub struct NetParams {
    pub mac: [u8; 6],
    /// Queue pairs (1 unless multiqueue).
    pub queue_pairs: usize,
    pub queue_size: u16,
    /// Offered with `VIRTIO_NET_F_MTU` when set.
    pub mtu: Option<u16>,
    /// Offer checksum offload (`CSUM`, `GUEST_CSUM`); upstream's `offload_csum`.
    pub offload_csum: bool,
    /// Offer TCP segmentation offload both ways (needs `offload_csum`); upstream's `offload_tso`.
    pub offload_tso: bool,
}

/// Per-device counters for `vm.counters`, as upstream names them.
#[derive(Default)]
struct NetCounters {
    rx_bytes: AtomicU64,
    rx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_frames: AtomicU64,
    tx_dropped: AtomicU64,
}

/// A virtio-net device on a tap.
pub struct Net {
    tap: Arc<Tap>,
    params: NetParams,
    queue_sizes: Vec<u16>,
    config_space: [u8; CONFIG_SPACE_LEN],
    counters: Arc<NetCounters>,
    io_thread: ServiceThread,
    /// The VM's output-commit gate, when the VMM gave one (see [`Net::with_output_hold`]).
    output_hold: Option<Arc<OutputHold>>,
}

impl Net {
    /// A device on `tap`, which must have one descriptor per queue pair. The tap is shared so
    /// a restore can rebuild the device on the same descriptors.
    pub fn new(tap: Arc<Tap>, params: NetParams) -> Result<Self> {
        if params.queue_pairs == 0 || tap.queue_pairs() != params.queue_pairs {
            return Err(Error::NetQueuePairs {
                asked: params.queue_pairs,
                tap: tap.queue_pairs(),
            });
        }
        let mut queue_sizes = vec![params.queue_size; params.queue_pairs * 2];
        if params.queue_pairs > 1 {
            queue_sizes.push(params.queue_size);
        }
        let config_space = net_config_space(params.mac, params.queue_pairs, params.mtu);
        Ok(Self {
            tap,
            params,
            queue_sizes,
            config_space,
            counters: Arc::default(),
            io_thread: ServiceThread::default(),
            output_hold: None,
        })
    }

    /// Sends transmitted frames through `hold` whenever it is armed (NV checkpoints on).
    pub fn with_output_hold(mut self, hold: Arc<OutputHold>) -> Self {
        self.output_hold = Some(hold);
        self
    }

    /// The tap's interface name (the kernel's choice for a new tap).
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }
}

/// `struct virtio_net_config` up to `mtu`: the MAC, the link up, the queue pairs, the MTU (0
/// when none is offered). Shared with the vhost-user-net front-end.
pub(crate) fn net_config_space(
    mac: [u8; 6],
    queue_pairs: usize,
    mtu: Option<u16>,
) -> [u8; CONFIG_SPACE_LEN] {
    let mut config_space = [0u8; CONFIG_SPACE_LEN];
    config_space[..6].copy_from_slice(&mac);
    config_space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    config_space[8..10].copy_from_slice(&(queue_pairs as u16).to_le_bytes());
    config_space[10..12].copy_from_slice(&mtu.unwrap_or(0).to_le_bytes());
    config_space
}

/// The `TUN_F_*` offloads the host may use on packets to the guest, from the features it acked.
pub fn tap_offloads(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn available_features(&self) -> u64 {
        let bits = |bits: &[u32]| bits.iter().fold(0u64, |f, bit| f | (1u64 << bit));
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | bits(&[
                VIRTIO_NET_F_MAC,
                VIRTIO_NET_F_STATUS,
                VIRTIO_NET_F_MRG_RXBUF,
            ]);
        if self.params.offload_csum {
            features |= bits(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM]);
            if self.params.offload_tso {
                features |= bits(&[
                    VIRTIO_NET_F_GUEST_TSO4,
                    VIRTIO_NET_F_GUEST_TSO6,
                    VIRTIO_NET_F_GUEST_ECN,
                    VIRTIO_NET_F_HOST_TSO4,
                    VIRTIO_NET_F_HOST_TSO6,
                    VIRTIO_NET_F_HOST_ECN,
                ]);
            }
        }
        if self.params.mtu.is_some() {
            features |= 1u64 << VIRTIO_NET_F_MTU;
        }
        if self.params.queue_pairs > 1 {
            features |= (1u64 << VIRTIO_NET_F_MQ) | (1u64 << VIRTIO_NET_F_CTRL_VQ);
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR's legacy path, not offered.
        warn!(
            "virtio-net: ignoring {}-byte write to read-only config at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<()> {
        let mut fds: Vec<RawFd> = self.tap.queue_fds().collect();
        // A release after a full hold wakes the worker to transmit again.
        fds.extend(self.output_hold.as_ref().map(|hold| hold.wake_fd()));
        self.io_thread.activate("virtio-net-io", ctx, &fds, |ctx| {
            for (index, queue) in ctx.queues.iter().enumerate() {
                let q = queue.lock().map_err(|_| Error::QueueLockPoisoned)?;
                // The driver may leave the queues of pairs it does not use unset.
                if q.ready() && !q.is_valid(&ctx.mem) {
                    return Err(Error::QueueNotUsable(index));
                }
            }
            self.tap
                .set_offload(tap_offloads(ctx.acked_features))
                .map_err(Error::Tap)?;
            let pairs = self
                .tap
                .queue_fds()
                .enumerate()
                .map(|(i, fd)| QueuePair {
                    index: i,
                    rx: ctx.queues[2 * i].clone(),
                    tx: ctx.queues[2 * i + 1].clone(),
                    rx_index: (2 * i) as u16,
                    tx_index: (2 * i + 1) as u16,
                    fd,
                })
                .collect();
            let ctrl = (self.params.queue_pairs > 1)
                .then(|| ctx.queues[2 * self.params.queue_pairs].clone());
            let worker = NetWorker {
                mem: ctx.mem.clone(),
                pairs,
                ctrl,
                ctrl_index: (2 * self.params.queue_pairs) as u16,
                interrupt: ctx.interrupt.clone(),
                tap: self.tap.clone(),
                output_hold: self.output_hold.clone(),
                guest_writes: ctx.guest_writes.clone(),
                packets: TapPackets::with_counters(
                    ctx.acked_features,
                    self.params.mtu,
                    self.counters.clone(),
                ),
            };
            Ok(worker)
        })
    }

    service_thread_lifecycle!(io_thread);

    fn flush_backend(&mut self) -> Result<()> {
        // A network keeps nothing to make durable: a packet written to the tap is gone.
        Ok(())
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        let c = &self.counters;
        BTreeMap::from([
            ("rx_bytes", c.rx_bytes.load(Ordering::Relaxed)),
            ("rx_frames", c.rx_frames.load(Ordering::Relaxed)),
            ("tx_bytes", c.tx_bytes.load(Ordering::Relaxed)),
            ("tx_frames", c.tx_frames.load(Ordering::Relaxed)),
            ("tx_dropped", c.tx_dropped.load(Ordering::Relaxed)),
        ])
    }
}

struct QueuePair {
    /// The pair's position: its tap descriptor is the tap's `index`th.
    index: usize,
    rx: Arc<Mutex<Queue>>,
    tx: Arc<Mutex<Queue>>,
    rx_index: u16,
    tx_index: u16,
    fd: RawFd,
}

struct NetWorker {
    mem: GuestMemoryMmap,
    pairs: Vec<QueuePair>,
    ctrl: Option<Arc<Mutex<Queue>>>,
    ctrl_index: u16,
    interrupt: Arc<VirtioInterrupt>,
    /// Keeps the tap's descriptors open as long as the thread uses them.
    tap: Arc<Tap>,
    output_hold: Option<Arc<OutputHold>>,
    /// Asked before the worker writes guest memory (see [`GuestWriteGate`]).
    guest_writes: GuestWriteGateSlot,
    packets: TapPackets,
}

/// Moves packets between a tap and a queue pair, one packet per call, without copying them:
/// the in-process device's worker and the `nv-vhost-user-net` backend both use it.
pub struct TapPackets {
    counters: Arc<NetCounters>,
    /// Receive buffer space a packet may need (header included).
    rx_needed: usize,
    mergeable: bool,
}

/// Guest buffers as `iovec`s for one `readv`/`writev`. The pointers stay valid as long as the
/// worker's `GuestMemoryMmap` clone keeps the mappings alive.
struct IoVecs {
    iovecs: Vec<libc::iovec>,
    len: usize,
}

impl IoVecs {
    fn new() -> Self {
        Self {
            iovecs: Vec::new(),
            len: 0,
        }
    }

    /// Keeps the first `limit` bytes of the buffers.
    fn truncate(&mut self, limit: usize) {
        let mut kept = 0usize;
        let mut count = 0usize;
        for iovec in &mut self.iovecs {
            if kept >= limit {
                break;
            }
            iovec.iov_len = iovec.iov_len.min(limit - kept);
            kept += iovec.iov_len;
            count += 1;
        }
        self.iovecs.truncate(count);
        self.len = kept;
    }

    /// Adds the guest range `addr..addr+len` (it may span memory regions).
    fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        access: Permissions,
    ) -> std::result::Result<(), vm_memory::GuestMemoryError> {
        for slice in mem.get_slices(addr, len, access)? {
            let slice = slice?;
            if self.iovecs.len() == MAX_IOVECS {
                return Ok(());
            }
            self.iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            self.len += slice.len();
        }
        Ok(())
    }
}

/// Outcome of one pass over a queue.
#[derive(Default)]
struct Pass {
    used: bool,
}

impl NetWorker {
    fn lock<'a>(&self, queue: &'a Mutex<Queue>) -> Option<std::sync::MutexGuard<'a, Queue>> {
        match queue.lock() {
            Ok(q) => Some(q),
            Err(_) => {
                error!("virtio-net: queue lock poisoned; stopping service");
                None
            }
        }
    }

    /// Asks the guest-write gate about every used ring of the device: a pass writes them
    /// (completions, notification suppression) and nothing else but receive buffers and
    /// control acks, which are asked about per request. False: serve nothing in this pass
    /// (the gate asked for a pause; the resume serves again).
    fn used_rings_writable(&self) -> bool {
        if !self.guest_writes.is_installed() {
            return true;
        }
        let mut writes = GuestWrites::default();
        let queues = self
            .pairs
            .iter()
            .flat_map(|pair| [&pair.rx, &pair.tx])
            .chain(self.ctrl.as_ref());
        for queue in queues {
            if let Ok(queue) = queue.lock() {
                writes.add_used_ring(&self.mem, &queue);
            }
        }
        self.guest_writes.ask(&writes) == BeforeWrite::Proceed
    }

    fn notify(&self, queue: &Mutex<Queue>, index: u16) {
        let notify = match queue.lock() {
            Ok(mut q) => q.needs_notification(&self.mem).unwrap_or(true),
            Err(_) => true,
        };
        if notify {
            if let Err(e) = self.interrupt.signal_used_queue(index) {
                error!("virtio-net: cannot raise the interrupt: {e}");
            }
        }
    }

    /// Sends every posted transmit chain, each whole with one `writev`; or, while the output
    /// hold is armed, holds each until its epoch commits, as long as the hold has room.
    fn transmit(&self, pair: &QueuePair, pause_requested: &AtomicBool) -> Pass {
        let mut pass = Pass::default();
        while !pause_requested.load(Ordering::SeqCst) {
            let Some(mut queue) = self.lock(&pair.tx) else {
                break;
            };
            if !queue.ready() {
                break;
            }
            let sent = match self.output_hold.as_ref().filter(|hold| hold.is_armed()) {
                None => self.packets.transmit_one(&mut queue, &self.mem, pair.fd),
                // Full: leave the chains in the ring until a release wakes us.
                Some(hold) => {
                    hold.has_room()
                        && self
                            .packets
                            .hold_one(&mut queue, &self.mem, hold, self.held_for(pair))
                }
            };
            if !sent {
                break;
            }
            pass.used = true;
        }
        if pass.used {
            self.notify(&pair.tx, pair.tx_index);
        }
        pass
    }

    /// Reads packets from the tap into the guest's receive buffers until the tap is empty, the
    /// guest has no room for one more packet, or a pause is asked for.
    fn receive(&self, pair: &QueuePair, pause_requested: &AtomicBool) -> Pass {
        let mut pass = Pass::default();
        while !pause_requested.load(Ordering::SeqCst) {
            let Some(mut queue) = self.lock(&pair.rx) else {
                break;
            };
            if !queue.ready()
                || !self.packets.receive_gated(
                    &mut queue,
                    &self.mem,
                    pair.fd,
                    Some(&self.guest_writes),
                )
            {
                break;
            }
            pass.used = true;
        }
        if pass.used {
            self.notify(&pair.rx, pair.rx_index);
        }
        pass
    }

    fn held_for<'a>(&'a self, pair: &QueuePair) -> HeldTap<'a> {
        HeldTap {
            tap: &self.tap,
            index: pair.index,
            fd: pair.fd,
        }
    }

    /// Answers control-queue commands (see `control`): a `VQ_PAIRS_SET` within the device's
    /// pairs is acknowledged; every pair is served regardless (the tap spreads flows over all).
    fn control(&self, pause_requested: &AtomicBool) {
        let Some(ctrl) = &self.ctrl else {
            return;
        };
        let max_pairs = self.pairs.len() as u16;
        let used = {
            let Some(mut queue) = self.lock(ctrl) else {
                return;
            };
            control::serve(
                &mut queue,
                &self.mem,
                pause_requested,
                |ack: &Descriptor| {
                    let mut writes = GuestWrites::default();
                    writes.add(&self.mem, ack.addr(), 1);
                    self.guest_writes.ask(&writes) == BeforeWrite::Proceed
                },
                |command| {
                    matches!(command, control::ControlCommand::VqPairsSet(n)
                        if control::pairs_valid(n, max_pairs))
                },
            )
        };
        if used {
            self.notify(ctrl, self.ctrl_index);
        }
    }
}

impl TapPackets {
    /// For a driver that acked `acked_features`, on a link of `mtu` (1500 when unset).
    pub fn new(acked_features: u64, mtu: Option<u16>) -> Self {
        Self::with_counters(acked_features, mtu, Arc::default())
    }

    fn with_counters(acked_features: u64, mtu: Option<u16>, counters: Arc<NetCounters>) -> Self {
        let acked = |bit: u32| acked_features & (1u64 << bit) != 0;
        let rx_frame = if acked(VIRTIO_NET_F_GUEST_TSO4) || acked(VIRTIO_NET_F_GUEST_TSO6) {
            GSO_MAX_FRAME
        } else {
            usize::from(mtu.unwrap_or(1500)) + ETH_OVERHEAD
        };
        TapPackets {
            counters,
            rx_needed: VNET_HDR_LEN + rx_frame,
            mergeable: acked(VIRTIO_NET_F_MRG_RXBUF),
        }
    }

    /// Sends the next posted transmit chain to the tap `fd`, whole with one `writev` (or drops
    /// it, as a congested network would). False when no chain is posted.
    pub fn transmit_one(&self, queue: &mut Queue, mem: &GuestMemoryMmap, fd: RawFd) -> bool {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let mut iovecs = IoVecs::new();
        let mut ok = true;
        for desc in chain {
            if desc.is_write_only() {
                continue;
            }
            if let Err(e) = iovecs.push(mem, desc.addr(), desc.len() as usize, Permissions::Read) {
                warn!("virtio-net: transmit buffer outside guest memory: {e}");
                ok = false;
                break;
            }
        }
        if ok && iovecs.len > VNET_HDR_LEN {
            // SAFETY: every iovec points into guest memory mapped for the worker's lifetime,
            // with the length `get_slices` checked; the tap only reads them.
            let written = unsafe {
                libc::writev(
                    fd,
                    iovecs.iovecs.as_ptr(),
                    iovecs.iovecs.len() as libc::c_int,
                )
            };
            if written < 0 {
                // As a congested network would: the packet is dropped, whole.
                let e = io::Error::last_os_error();
                log::debug!("virtio-net: tap write failed, packet dropped: {e}");
                self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.counters.tx_bytes.fetch_add(
                    (written as u64).saturating_sub(VNET_HDR_LEN as u64),
                    Ordering::Relaxed,
                );
            }
        } else {
            self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            error!("virtio-net: cannot publish used entry for head {head}: {e}");
        }
        true
    }

    /// As [`TapPackets::transmit_one`], but the chain is copied into `hold` (written to the tap
    /// by its release once its epoch committed) and completed at once. False when no chain is
    /// posted.
    fn hold_one(
        &self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        hold: &OutputHold,
        target: HeldTap<'_>,
    ) -> bool {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let mut bytes = Vec::new();
        let mut ok = true;
        for desc in chain.filter(|desc| !desc.is_write_only()) {
            let start = bytes.len();
            bytes.resize(start + desc.len() as usize, 0);
            if let Err(e) = mem.read_slice(&mut bytes[start..], desc.addr()) {
                warn!("virtio-net: transmit buffer outside guest memory: {e}");
                ok = false;
                break;
            }
        }
        if ok && bytes.len() > VNET_HDR_LEN {
            let len = bytes.len();
            if let Err(bytes) = hold.hold(target.tap, target.index, bytes) {
                // Disarmed since the check: nothing holds output any more, send it now.
                // SAFETY: `bytes` is a live buffer of that length; the tap only reads it.
                let written = unsafe { libc::write(target.fd, bytes.as_ptr().cast(), len) };
                if written < 0 {
                    self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
            self.counters
                .tx_bytes
                .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        } else {
            self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            error!("virtio-net: cannot publish used entry for head {head}: {e}");
        }
        true
    }

    /// Reads the next packet from the tap `fd` straight into receive buffers (several with
    /// mergeable buffers). False when the tap is empty or the guest has no room for it: the
    /// buffers popped are given back.
    pub fn receive_one(&self, queue: &mut Queue, mem: &GuestMemoryMmap, fd: RawFd) -> bool {
        self.receive_gated(queue, mem, fd, None)
    }

    /// As [`TapPackets::receive_one`], asking `gate` about the buffers the packet may fill
    /// (and the used ring) before reading it: not now, and the buffers are given back and the
    /// packet stays in the tap.
    fn receive_gated(
        &self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        fd: RawFd,
        gate: Option<&GuestWriteGateSlot>,
    ) -> bool {
        let start = queue.next_avail();
        // Each popped chain: head, its first writable buffer (for num_buffers), capacity.
        let mut chains: Vec<(u16, GuestAddress, usize)> = Vec::new();
        let mut iovecs = IoVecs::new();
        let mut bad_chain = false;
        while iovecs.len < self.rx_needed && (self.mergeable || chains.is_empty()) {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            match chain_buffers(mem, chain, &mut iovecs) {
                Some(entry) => chains.push(entry),
                None => {
                    bad_chain = true;
                    break;
                }
            }
        }
        let enough = iovecs.len >= self.rx_needed || (!self.mergeable && !chains.is_empty());
        if bad_chain || !enough || chains.first().is_some_and(|c| c.2 < VNET_HDR_LEN) {
            // Give the buffers back; the guest's next notify brings us here again.
            queue.set_next_avail(start);
            if bad_chain {
                error!("virtio-net: receive chain outside guest memory; receive stopped");
            }
            return false;
        }
        // No packet is longer than `rx_needed`: the read fills no more than that.
        iovecs.truncate(self.rx_needed);
        if let Some(gate) = gate.filter(|gate| gate.is_installed()) {
            let mut writes = GuestWrites::default();
            writes.add_used_ring(mem, queue);
            for iovec in &iovecs.iovecs {
                writes.add_host(iovec.iov_base as usize, iovec.iov_len);
            }
            match gate.ask(&writes) {
                BeforeWrite::Proceed => {}
                answer => {
                    // Not now (or, for a receive, never possible: a packet's buffers are far
                    // fewer pages than a log holds): the packet waits in the tap.
                    if let BeforeWrite::Fail(reason) = answer {
                        error!("virtio-net: receive buffers refused: {reason}");
                    }
                    queue.set_next_avail(start);
                    return false;
                }
            }
        }
        // SAFETY: every iovec points into guest memory mapped for the worker's lifetime,
        // with the length `get_slices` checked; the buffers are device-writable.
        let read = unsafe {
            libc::readv(
                fd,
                iovecs.iovecs.as_ptr(),
                iovecs.iovecs.len() as libc::c_int,
            )
        };
        if read <= 0 {
            queue.set_next_avail(start);
            if read < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    warn!("virtio-net: tap read failed: {e}");
                }
            }
            return false;
        }
        let mut left = read as usize;
        let mut used = 0u16;
        for &(head, _, capacity) in &chains {
            let len = left.min(capacity);
            if let Err(e) = queue.add_used(mem, head, len as u32) {
                error!("virtio-net: cannot publish used entry for head {head}: {e}");
            }
            used += 1;
            left -= len;
            if left == 0 {
                break;
            }
        }
        // num_buffers, the last field of the header at the start of the first buffer.
        let first = chains[0].1;
        if let Err(e) = mem.write_obj(used.to_le(), first.unchecked_add(VNET_HDR_LEN as u64 - 2)) {
            warn!("virtio-net: cannot write num_buffers: {e}");
        }
        queue.set_next_avail(start.wrapping_add(used));
        self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.counters.rx_bytes.fetch_add(
            (read as u64).saturating_sub(VNET_HDR_LEN as u64),
            Ordering::Relaxed,
        );
        true
    }
}

/// Where a held frame goes: the tap, its queue pair, and that pair's descriptor.
struct HeldTap<'a> {
    tap: &'a Arc<Tap>,
    index: usize,
    fd: RawFd,
}

/// Adds a receive chain's writable buffers to `iovecs`: `(head, first buffer, capacity)`,
/// or `None` when a buffer is outside guest memory. The header must fit in the first buffer.
fn chain_buffers(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    iovecs: &mut IoVecs,
) -> Option<(u16, GuestAddress, usize)> {
    let head = chain.head_index();
    let before = iovecs.len;
    let mut first = None;
    let mut first_len = 0usize;
    for desc in chain.filter(|d| d.is_write_only()) {
        if first.is_none() {
            first = Some(desc.addr());
            first_len = desc.len() as usize;
        }
        if let Err(e) = iovecs.push(mem, desc.addr(), desc.len() as usize, Permissions::Write) {
            warn!("virtio-net: receive buffer outside guest memory: {e}");
            return None;
        }
    }
    let capacity = iovecs.len - before;
    // A first buffer shorter than the header is reported as too small for the caller.
    let capacity = if first_len < VNET_HDR_LEN {
        0
    } else {
        capacity
    };
    Some((head, first.unwrap_or(GuestAddress(0)), capacity))
}

impl QueueWorker for NetWorker {
    fn process_queues(&mut self, pause_requested: &AtomicBool) {
        if !self.used_rings_writable() {
            return;
        }
        self.control(pause_requested);
        for pair in &self.pairs {
            self.transmit(pair, pause_requested);
            self.receive(pair, pause_requested);
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod offload_tests {
    use super::*;

    #[test]
    fn offloads_follow_the_guest_features() {
        assert_eq!(tap_offloads(0), 0);
        let csum = 1u64 << VIRTIO_NET_F_GUEST_CSUM;
        let tso4 = 1u64 << VIRTIO_NET_F_GUEST_TSO4;
        let tso6 = 1u64 << VIRTIO_NET_F_GUEST_TSO6;
        assert_eq!(tap_offloads(csum), libc::TUN_F_CSUM);
        // Segmentation without checksum offload is not offered to the host stack.
        assert_eq!(tap_offloads(tso4 | tso6), 0);
        assert_eq!(
            tap_offloads(csum | tso4 | tso6),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }
}
