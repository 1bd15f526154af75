//! A minimal virtio-mmio driver for the tests: it talks to the transport only through the bus and
//! builds split-ring descriptor chains in a `GuestMemoryMmap`, the way a guest driver does.

#![allow(dead_code)] // each test binary uses a different subset

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The transport's register map: the driver addresses registers by the device's own offsets.
pub use devices::virtio::mmio_registers::*;
/// How the VMM drives a transport (activation, pause, resume, counters).
pub use devices::virtio::VirtioTransport;
use devices::virtio::{
    status, Block, MmioTransport, MmioTransportState, VirtioDevice, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE,
};
use devices::{Bus, EventFdInterrupt, InterruptLine};
/// Request types and status codes by the definitions the device uses.
#[allow(unused_imports)] // each test binary uses a different subset
pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 4 << 20;
pub const QUEUE_SIZE: u16 = 256;
pub const DESC_TABLE: u64 = 0x1000;
pub const AVAIL_RING: u64 = 0x2000;
pub const USED_RING: u64 = 0x3000;
const BUFFERS: u64 = 0x10000;
/// Buffers of a driver continuing after a restore, clear of those posted before it.
const BUFFERS_AFTER_RESTORE: u64 = 0x20_0000;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

pub const VERSION_1: u64 = 1 << 32;
pub const BLK_F_RO: u64 = 1 << 5;
pub const BLK_F_FLUSH: u64 = 1 << 9;

/// One descriptor of a chain being built: (guest address, length, device-writable).
pub type Buffer = (u64, u32, bool);

/// A posted request: its head descriptor and where its status byte and data live.
#[derive(Clone, Debug)]
pub struct Posted {
    pub head: u16,
    pub status_addr: u64,
    pub data_addr: u64,
}

/// The driver's side of the split ring and its buffers in guest memory, whatever the transport.
pub struct Rings {
    pub mem: GuestMemoryMmap,
    next_desc: u16,
    avail_idx: u16,
    next_buffer: u64,
}

/// A virtio-mmio driver: the rings plus the register window on a bus.
pub struct TestDriver {
    rings: Rings,
    pub bus: Bus,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub irq: Arc<EventFdInterrupt>,
}

impl std::ops::Deref for TestDriver {
    type Target = Rings;
    fn deref(&self) -> &Rings {
        &self.rings
    }
}

impl std::ops::DerefMut for TestDriver {
    fn deref_mut(&mut self) -> &mut Rings {
        &mut self.rings
    }
}

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A zero-filled raw disk image of `sectors` sectors.
pub fn blank_image(sectors: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(sectors * 512).unwrap();
    file
}

/// `len` bytes of `image` at byte `offset`, read through the file, not through the device.
pub fn image_bytes(image: &tempfile::NamedTempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    image.as_file().read_exact_at(&mut bytes, offset).unwrap();
    bytes
}

pub fn open_block(path: &Path, readonly: bool) -> Box<Block> {
    Box::new(Block::open(path, readonly).unwrap())
}

impl TestDriver {
    /// A driver for a fresh transport over `block` (or any other device).
    pub fn new(mem: GuestMemoryMmap, block: Box<dyn VirtioDevice>) -> Self {
        let irq = Arc::new(EventFdInterrupt::new().unwrap());
        let line: Arc<dyn InterruptLine> = irq.clone();
        let transport = MmioTransport::new(block, mem.clone(), line).unwrap();
        Self::around(mem, transport, irq, (0, 0), BUFFERS)
    }

    /// A driver continuing on a transport rebuilt from `state` (the guest's ring positions are in
    /// guest memory; the driver's own bookkeeping is passed in as a guest would keep it in RAM).
    pub fn restored(
        mem: GuestMemoryMmap,
        block: Box<dyn VirtioDevice>,
        state: &MmioTransportState,
        next_desc: u16,
        avail_idx: u16,
    ) -> Self {
        let irq = Arc::new(EventFdInterrupt::new().unwrap());
        let line: Arc<dyn InterruptLine> = irq.clone();
        let mut transport = MmioTransport::restore(block, mem.clone(), line, state).unwrap();
        transport.activate_pending().unwrap();
        Self::around(
            mem,
            transport,
            irq,
            (next_desc, avail_idx),
            BUFFERS_AFTER_RESTORE,
        )
    }

    fn around(
        mem: GuestMemoryMmap,
        transport: MmioTransport,
        irq: Arc<EventFdInterrupt>,
        (next_desc, avail_idx): (u16, u16),
        buffers: u64,
    ) -> Self {
        let transport = Arc::new(Mutex::new(transport));
        let bus = Bus::new();
        bus.insert(VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, transport.clone())
            .unwrap();
        Self {
            rings: Rings::new(mem, (next_desc, avail_idx), buffers),
            bus,
            transport,
            irq,
        }
    }

    pub fn read32(&self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.bus.read(VIRTIO_MMIO_BASE + offset, &mut data).unwrap();
        u32::from_le_bytes(data)
    }

    /// Writes a register as the guest does. A status write that leaves an activation pending
    /// is followed by the activation, as the VMM's control loop does when the transport's
    /// activation eventfd wakes it (an activation failure shows in the status register).
    pub fn write32(&self, offset: u64, value: u32) {
        self.bus
            .write(VIRTIO_MMIO_BASE + offset, &value.to_le_bytes())
            .unwrap();
        if offset == REG_STATUS {
            let _ = self.transport.lock().unwrap().activate_pending();
        }
    }

    pub fn config_u64(&self, offset: u64) -> u64 {
        let mut data = [0u8; 8];
        self.bus
            .read(VIRTIO_MMIO_BASE + CONFIG_SPACE + offset, &mut data)
            .unwrap();
        u64::from_le_bytes(data)
    }

    pub fn device_features(&self) -> u64 {
        self.write32(REG_DEVICE_FEATURES_SEL, 0);
        let low = self.read32(REG_DEVICE_FEATURES);
        self.write32(REG_DEVICE_FEATURES_SEL, 1);
        let high = self.read32(REG_DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    pub fn write_driver_features(&self, features: u64) {
        self.write32(REG_DRIVER_FEATURES_SEL, 0);
        self.write32(REG_DRIVER_FEATURES, features as u32);
        self.write32(REG_DRIVER_FEATURES_SEL, 1);
        self.write32(REG_DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// The virtio 1.x driver initialisation sequence ("Device Initialization"), up to and
    /// including DRIVER_OK. Returns the final status register.
    pub fn initialise(&self, features: u64) -> u32 {
        self.initialise_with_queue(features, 0)
    }

    /// `initialise` with the test's ring layout given to queue `queue` (the others left unset).
    pub fn initialise_with_queue(&self, features: u64, queue: u32) -> u32 {
        self.write32(REG_STATUS, 0);
        self.write32(REG_STATUS, status::ACKNOWLEDGE);
        self.write32(REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write_driver_features(features);
        let with_features = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write32(REG_STATUS, with_features);
        assert_eq!(self.read32(REG_STATUS), with_features, "features refused");
        self.setup_queue_at(queue);
        self.write32(REG_STATUS, with_features | status::DRIVER_OK);
        self.read32(REG_STATUS)
    }

    pub fn setup_queue(&self) {
        self.setup_queue_at(0);
    }

    pub fn setup_queue_at(&self, queue: u32) {
        self.write32(REG_QUEUE_SEL, queue);
        assert_eq!(self.read32(REG_QUEUE_READY), 0);
        assert_eq!(self.read32(REG_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
        self.write32(REG_QUEUE_NUM, u32::from(QUEUE_SIZE));
        self.write32(REG_QUEUE_DESC_LOW, DESC_TABLE as u32);
        self.write32(REG_QUEUE_DESC_HIGH, 0);
        self.write32(REG_QUEUE_DRIVER_LOW, AVAIL_RING as u32);
        self.write32(REG_QUEUE_DRIVER_HIGH, 0);
        self.write32(REG_QUEUE_DEVICE_LOW, USED_RING as u32);
        self.write32(REG_QUEUE_DEVICE_HIGH, 0);
        self.write32(REG_QUEUE_READY, 1);
        assert_eq!(self.read32(REG_QUEUE_READY), 1);
    }

    /// The guest's notify, through the MMIO register (as a trapped MMIO write would arrive).
    pub fn notify(&self) {
        self.notify_queue(0);
    }

    pub fn notify_queue(&self, queue: u32) {
        self.write32(REG_QUEUE_NOTIFY, queue);
    }

    /// Notifies, waits for as many new used entries as `expected` has, and checks they are
    /// `expected` in order: (head, used length).
    pub fn notify_and_expect_used(&self, expected: &[(u16, u32)]) {
        let first = self.used_idx();
        self.notify();
        self.expect_used_since(first, expected);
    }

    /// Posts a one-sector read, notifies, and asserts it completes with OK: the device serves
    /// (after a fault, a restore, a reset).
    pub fn assert_serves_a_read(&mut self) {
        let used = self.used_idx().wrapping_add(1);
        let read = self.post_block_request(VIRTIO_BLK_T_IN, 0, 512, None);
        self.notify();
        self.wait_used(used);
        assert_eq!(
            self.status_byte(&read),
            VIRTIO_BLK_S_OK,
            "a plain read after the rest"
        );
    }
}

impl Rings {
    /// Rings at the test layout; the driver's indices start at `(next_desc, avail_idx)` and its
    /// buffers at `buffers`.
    pub fn new(mem: GuestMemoryMmap, (next_desc, avail_idx): (u16, u16), buffers: u64) -> Self {
        Self {
            mem,
            next_desc,
            avail_idx,
            next_buffer: buffers,
        }
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += len.div_ceil(0x1000) * 0x1000;
        assert!(
            self.next_buffer < MEM_SIZE as u64,
            "test ran out of buffer space"
        );
        addr
    }

    /// Writes a chain of `buffers` into the descriptor table and puts its head on the avail
    /// ring, without notifying. Returns the head index.
    pub fn post_chain(&mut self, buffers: &[Buffer]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = (self.next_desc + i as u16) % QUEUE_SIZE;
            let last = i + 1 == buffers.len();
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let next = if last { 0 } else { (index + 1) % QUEUE_SIZE };
            self.write_descriptor(index, addr, len, flags, next);
        }
        self.next_desc = (self.next_desc + buffers.len() as u16) % QUEUE_SIZE;
        self.post_head(head);
        head
    }

    pub fn write_descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = GuestAddress(DESC_TABLE + u64::from(index) * 16);
        let descriptor = Descriptor::new(addr, len, flags, next);
        self.mem.write_obj(descriptor, base).unwrap();
    }

    /// Puts `head` on the avail ring and publishes the new avail index.
    pub fn post_head(&mut self, head: u16) {
        let slot = AVAIL_RING + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2;
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    /// What a driver does after a device reset before reusing its ring memory: zero it and start
    /// its indices over.
    pub fn forget_rings(&mut self) {
        let zeros = vec![0u8; (USED_RING + 0x1000 - DESC_TABLE) as usize];
        self.mem
            .write_slice(&zeros, GuestAddress(DESC_TABLE))
            .unwrap();
        self.next_desc = 0;
        self.avail_idx = 0;
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    pub fn next_desc(&self) -> u16 {
        self.next_desc
    }

    /// Posts a block request: header, data of `data_len` bytes (filled from `payload` for OUT),
    /// status byte.
    pub fn post_block_request(
        &mut self,
        kind: u32,
        sector: u64,
        data_len: u32,
        payload: Option<&[u8]>,
    ) -> Posted {
        if data_len == 0 {
            return self.post_request_chain(kind, sector, &[]);
        }
        let data = self.alloc(u64::from(data_len));
        if let Some(bytes) = payload {
            self.write_guest(data, bytes);
        }
        self.post_request_chain(kind, sector, &[(data, data_len, kind != VIRTIO_BLK_T_OUT)])
    }

    /// Posts a block request whose data descriptors are `data` as given (any address, length and
    /// direction): a fresh header of `kind` and `sector`, then `data`, then a fresh status byte
    /// (0xff until the device answers). `data_addr` is the first data buffer's, 0 if none.
    pub fn post_request_chain(&mut self, kind: u32, sector: u64, data: &[Buffer]) -> Posted {
        let header = self.alloc(16);
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.write_guest(header, &raw);
        self.post_chain_with_status(&[(header, 16, false)], data)
    }

    /// Posts `head` then `data` then a fresh device-writable status byte (0xff until answered).
    pub fn post_chain_with_status(&mut self, head: &[Buffer], data: &[Buffer]) -> Posted {
        let status_addr = self.alloc(1);
        self.write_guest(status_addr, &[0xff]);
        let mut buffers = head.to_vec();
        buffers.extend_from_slice(data);
        buffers.push((status_addr, 1, true));
        let head = self.post_chain(&buffers);
        Posted {
            head,
            status_addr,
            data_addr: data.first().map_or(0, |d| d.0),
        }
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap())
    }

    /// Used-ring element `i` (modulo the ring size): (descriptor head id, length written).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let addr = USED_RING + 4 + u64::from(i % QUEUE_SIZE) * 8;
        let id: u32 = self.mem.read_obj(GuestAddress(addr)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(addr + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// Waits until the device has published `count` used entries in total.
    pub fn wait_used(&self, count: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx() != count {
            assert!(
                Instant::now() < deadline,
                "device published {} used entries, expected {count}",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The request's status byte, widened to the type of the `VIRTIO_BLK_S_*` codes.
    pub fn status_byte(&self, posted: &Posted) -> u32 {
        let byte: u8 = self.mem.read_obj(GuestAddress(posted.status_addr)).unwrap();
        u32::from(byte)
    }

    pub fn write_guest(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    pub fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Waits for as many used entries after `first` as `expected` has, and checks they are
    /// `expected` in order: (head, used length).
    pub fn expect_used_since(&self, first: u16, expected: &[(u16, u32)]) {
        self.wait_used(first.wrapping_add(expected.len() as u16));
        for (i, &(head, len)) in expected.iter().enumerate() {
            let at = first.wrapping_add(i as u16);
            assert_eq!(
                self.used_elem(at),
                (u32::from(head), len),
                "used entry {at}"
            );
        }
    }
}

/// A recognisable sector payload: every byte depends on the sector number and position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(131).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect()
}
