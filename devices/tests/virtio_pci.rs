//! virtio-blk over the virtio-pci transport, driven as Linux's virtio_pci_modern driver does:
//! find the function through the 0xCF8/0xCFC ports, size and place its BAR, walk the capability
//! list to the virtio structures and MSI-X, negotiate, set up the queue with its MSI-X vector,
//! notify at the notify address, and see the used ring and the MSI-X message. Then reset, the
//! PCI-configuration-access capability, and a power cycle in the middle of use.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};

use arch::layout::{PCI_CONFIG_PORT, PCI_CONFIG_PORT_COUNT};
use common::*;
use devices::pci::{
    MsiInterruptSink, PciBdf, PciBus, PciBusState, PciConfigIo, PciDevice, MSIX_CAPABILITY_ID,
    MSIX_CONTROL_ENABLE, MSIX_ENTRY_SIZE, MSIX_VECTOR_MASKED,
};
use devices::virtio::pci::layout::common_cfg::{self, *};
use devices::virtio::pci::layout::*;
use devices::virtio::{status, VirtioPciDevice, VirtioPciState, VIRTIO_PCI_STATE_VERSION};
use devices::{Bus, BusDevice, Error};

/// Where the test's "firmware" puts BAR 0: in the 64-bit window, above 4 GiB.
const BAR_BASE: u64 = 0x40_0000_0000;
const CONFIG_VECTOR: u16 = 0;
const QUEUE_VECTOR: u16 = 1;
const SECTORS: u64 = 4096;

/// What left through MSI-X: each vector's last route and how often it was sent.
#[derive(Default)]
struct MsiLog {
    routes: Mutex<BTreeMap<u16, (u64, u32)>>,
    sent: Mutex<BTreeMap<u16, usize>>,
}

impl MsiLog {
    fn sent(&self, vector: u16) -> usize {
        self.sent.lock().unwrap().get(&vector).copied().unwrap_or(0)
    }
}

impl MsiInterruptSink for MsiLog {
    fn route(&self, vector: u16, address: u64, data: u32) -> io::Result<()> {
        self.routes.lock().unwrap().insert(vector, (address, data));
        Ok(())
    }
    fn trigger(&self, vector: u16) -> io::Result<()> {
        *self.sent.lock().unwrap().entry(vector).or_default() += 1;
        Ok(())
    }
}

/// The message the driver programs for `vector` (LAPIC address, a distinct vector number).
fn message(vector: u16) -> (u64, u32) {
    (0xfee0_0000, 0x40 + u32::from(vector))
}

/// Where the capabilities said each structure is (offsets in BAR 0, as the driver found them).
#[derive(Debug, Default)]
struct Found {
    /// cfg_type -> (capability offset in config space, bar, offset, length)
    virtio: BTreeMap<u8, (u16, u8, u32, u32)>,
    notify_multiplier: u32,
    msix_cap: u16,
    msix_table: (u8, u32),
    msix_pba: (u8, u32),
    msix_vectors: u16,
}

/// BAR 0 on the MMIO bus, as the VMM maps it: offsets from the BAR's base.
struct Bar0(Arc<Mutex<VirtioPciDevice>>);

impl BusDevice for Bar0 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.lock().unwrap().read_bar(0, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.lock().unwrap().write_bar(0, offset, data);
    }
}

/// A virtio-pci driver on a platform wired as the VMM wires it: config ports on the port I/O
/// bus, BAR 0 on the MMIO bus where the driver puts it.
struct PciDriver {
    rings: Rings,
    pio: Bus,
    mmio: Bus,
    pci: Arc<Mutex<PciBus>>,
    device: Arc<Mutex<VirtioPciDevice>>,
    msi: Arc<MsiLog>,
    bdf: PciBdf,
    found: Found,
}

impl std::ops::Deref for PciDriver {
    type Target = Rings;
    fn deref(&self) -> &Rings {
        &self.rings
    }
}

impl std::ops::DerefMut for PciDriver {
    fn deref_mut(&mut self) -> &mut Rings {
        &mut self.rings
    }
}

impl PciDriver {
    fn on(rings: Rings, device: VirtioPciDevice, msi: Arc<MsiLog>) -> Self {
        let device = Arc::new(Mutex::new(device));
        let mut bus = PciBus::new();
        bus.add_device(device.clone()).unwrap();
        let pci = Arc::new(Mutex::new(bus));
        let pio = Bus::new();
        pio.insert(
            u64::from(PCI_CONFIG_PORT),
            u64::from(PCI_CONFIG_PORT_COUNT),
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
        )
        .unwrap();
        Self {
            rings,
            pio,
            mmio: Bus::new(),
            pci,
            device,
            msi,
            bdf: PciBdf::new(0),
            found: Found::default(),
        }
    }

    fn new(image: &tempfile::NamedTempFile) -> Self {
        let mem = guest_memory();
        let msi = Arc::new(MsiLog::default());
        let device =
            VirtioPciDevice::new(open_block(image.path(), false), mem.clone(), msi.clone())
                .unwrap();
        Self::on(Rings::new(mem, (0, 0), 0x10000), device, msi)
    }

    fn config_address(&self, device: u8, offset: u16) {
        let address = 0x8000_0000 | u32::from(device) << 11 | u32::from(offset & 0xfc);
        self.pio
            .write(u64::from(PCI_CONFIG_PORT), &address.to_le_bytes())
            .unwrap();
    }

    fn cfg_read_at(&self, device: u8, offset: u16, len: usize) -> u32 {
        self.config_address(device, offset);
        let mut data = [0u8; 4];
        self.pio
            .read(
                u64::from(PCI_CONFIG_PORT) + 4 + u64::from(offset % 4),
                &mut data[..len],
            )
            .unwrap();
        u32::from_le_bytes(data)
    }

    fn cfg_read(&self, offset: u16, len: usize) -> u32 {
        self.cfg_read_at(self.bdf.device, offset, len)
    }

    fn cfg_write(&self, offset: u16, len: usize, value: u32) {
        self.config_address(self.bdf.device, offset);
        self.pio
            .write(
                u64::from(PCI_CONFIG_PORT) + 4 + u64::from(offset % 4),
                &value.to_le_bytes()[..len],
            )
            .unwrap();
    }

    /// Scans bus 0 for a virtio-blk function and returns its device number.
    fn enumerate(&mut self) {
        let found: Vec<u8> = (0..32)
            .filter(|&d| {
                self.cfg_read_at(d, 0, 4) == u32::from(VIRTIO_PCI_VENDOR_ID) | 0x1042 << 16
            })
            .collect();
        assert_eq!(found.len(), 1, "exactly one virtio-blk function");
        self.bdf = PciBdf::new(found[0]);
    }

    /// Sizes BAR 0 (64-bit), places it at `BAR_BASE` and turns on memory decoding and bus
    /// mastering; the VMM maps it on its MMIO bus there (what the relocation handler does).
    fn place_bar(&mut self) {
        let low = self.cfg_read(0x10, 4);
        assert_eq!(low & 0x7, 0x4, "BAR 0 is a 64-bit memory BAR");
        self.cfg_write(0x10, 4, u32::MAX);
        self.cfg_write(0x14, 4, u32::MAX);
        let mask =
            u64::from(self.cfg_read(0x10, 4) & !0xf) | u64::from(self.cfg_read(0x14, 4)) << 32;
        assert_eq!(!mask + 1, VIRTIO_PCI_BAR_SIZE, "BAR 0 size");
        self.cfg_write(0x10, 4, BAR_BASE as u32);
        self.cfg_write(0x14, 4, (BAR_BASE >> 32) as u32);
        self.cfg_write(0x04, 2, 0x6); // memory space, bus master
        assert_eq!(self.device.lock().unwrap().bar_address(), BAR_BASE);
        self.mmio
            .insert(
                BAR_BASE,
                VIRTIO_PCI_BAR_SIZE,
                Arc::new(Mutex::new(Bar0(self.device.clone()))),
            )
            .unwrap();
    }

    /// Follows the capability list from 0x34 as `virtio_pci_find_capability` does.
    fn walk_capabilities(&mut self) {
        assert_ne!(
            self.cfg_read(0x06, 2) & 0x10,
            0,
            "status says: capability list"
        );
        let mut at = self.cfg_read(0x34, 1) as u16;
        let mut seen = BTreeSet::new();
        while at != 0 {
            assert!(seen.insert(at), "capability list loops at {at:#x}");
            let id = self.cfg_read(at, 1) as u8;
            if id == PCI_CAP_ID_VENDOR {
                let cfg_type = self.cfg_read(at + 3, 1) as u8;
                let bar = self.cfg_read(at + 4, 1) as u8;
                let offset = self.cfg_read(at + 8, 4);
                let length = self.cfg_read(at + 12, 4);
                if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG {
                    self.found.notify_multiplier = self.cfg_read(at + 16, 4);
                }
                self.found
                    .virtio
                    .insert(cfg_type, (at, bar, offset, length));
            } else if id == MSIX_CAPABILITY_ID {
                self.found.msix_cap = at;
                self.found.msix_vectors = (self.cfg_read(at + 2, 2) & 0x7ff) as u16 + 1;
                let table = self.cfg_read(at + 4, 4);
                let pba = self.cfg_read(at + 8, 4);
                self.found.msix_table = ((table & 7) as u8, table & !7);
                self.found.msix_pba = ((pba & 7) as u8, pba & !7);
            }
            at = self.cfg_read(at + 1, 1) as u16;
        }
    }

    /// Offset in BAR 0 of the structure of `cfg_type`, checking the capability names BAR 0.
    fn structure(&self, cfg_type: u8) -> u64 {
        let &(_, bar, offset, _) = self
            .found
            .virtio
            .get(&cfg_type)
            .unwrap_or_else(|| panic!("no capability of cfg_type {cfg_type}"));
        assert_eq!(bar, 0);
        u64::from(offset)
    }

    fn bar_read(&self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.mmio.read(BAR_BASE + offset, &mut data[..len]).unwrap();
        u64::from_le_bytes(data)
    }

    fn bar_write(&self, offset: u64, len: usize, value: u64) {
        self.mmio
            .write(BAR_BASE + offset, &value.to_le_bytes()[..len])
            .unwrap();
    }

    fn common_read(&self, field: u64, len: usize) -> u64 {
        self.bar_read(self.structure(VIRTIO_PCI_CAP_COMMON_CFG) + field, len)
    }

    /// A common-configuration write; a status write is followed by the activation, as the VMM's
    /// control loop does when the transport's activation eventfd wakes it.
    fn common_write(&self, field: u64, len: usize, value: u64) {
        self.bar_write(
            self.structure(VIRTIO_PCI_CAP_COMMON_CFG) + field,
            len,
            value,
        );
        if field == DEVICE_STATUS {
            use devices::virtio::VirtioTransport;
            let _ = self.device.lock().unwrap().activate_pending();
        }
    }

    fn status(&self) -> u32 {
        self.common_read(DEVICE_STATUS, 1) as u32
    }

    /// Programs every MSI-X vector's message, unmasks it and enables MSI-X.
    fn enable_msix(&self) {
        let (bar, table) = self.found.msix_table;
        assert_eq!(bar, 0);
        for v in 0..self.found.msix_vectors {
            let entry = u64::from(table) + u64::from(v) * MSIX_ENTRY_SIZE;
            let (address, data) = message(v);
            self.bar_write(entry, 4, address & 0xffff_ffff);
            self.bar_write(entry + 4, 4, address >> 32);
            self.bar_write(entry + 8, 4, u64::from(data));
            self.bar_write(entry + 12, 4, 0);
        }
        let control = self.cfg_read(self.found.msix_cap + 2, 2);
        self.cfg_write(
            self.found.msix_cap + 2,
            2,
            control | u32::from(MSIX_CONTROL_ENABLE),
        );
    }

    fn set_vector_mask(&self, vector: u16, masked: bool) {
        let entry = u64::from(self.found.msix_table.1) + u64::from(vector) * MSIX_ENTRY_SIZE;
        self.bar_write(
            entry + 12,
            4,
            u64::from(masked) * u64::from(MSIX_VECTOR_MASKED),
        );
    }

    fn pending(&self, vector: u16) -> bool {
        let pba = self.bar_read(u64::from(self.found.msix_pba.1), 8);
        pba & (1 << vector) != 0
    }

    /// Everything `vp_modern_probe` and `virtio_dev_probe` do up to FEATURES_OK; returns
    /// whether FEATURES_OK stuck.
    fn negotiate(&self, features: u64) -> bool {
        self.common_write(DEVICE_STATUS, 1, 0);
        while self.status() != 0 {}
        self.common_write(DEVICE_STATUS, 1, u64::from(status::ACKNOWLEDGE));
        self.common_write(
            DEVICE_STATUS,
            1,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        let mut offered = 0;
        for select in 0..2 {
            self.common_write(DEVICE_FEATURE_SELECT, 4, select);
            offered |= self.common_read(DEVICE_FEATURE, 4) << (32 * select);
        }
        assert_eq!(offered & (VERSION_1 | BLK_F_FLUSH), VERSION_1 | BLK_F_FLUSH);
        for select in 0..2 {
            self.common_write(DRIVER_FEATURE_SELECT, 4, select);
            self.common_write(DRIVER_FEATURE, 4, (features >> (32 * select)) & 0xffff_ffff);
        }
        let with_features = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.common_write(DEVICE_STATUS, 1, u64::from(with_features));
        self.status() == with_features
    }

    /// Queue 0 with its MSI-X vector, as `vp_modern_find_vqs` sets it up, then DRIVER_OK.
    fn setup_queue_and_start(&self) {
        self.common_write(MSIX_CONFIG, 2, u64::from(CONFIG_VECTOR));
        assert_eq!(self.common_read(MSIX_CONFIG, 2), u64::from(CONFIG_VECTOR));
        assert_eq!(self.common_read(NUM_QUEUES, 2), 1);
        self.common_write(QUEUE_SELECT, 2, 0);
        assert_eq!(self.common_read(QUEUE_ENABLE, 2), 0);
        assert_eq!(
            self.common_read(common_cfg::QUEUE_SIZE, 2),
            u64::from(common::QUEUE_SIZE)
        );
        self.common_write(common_cfg::QUEUE_SIZE, 2, u64::from(common::QUEUE_SIZE));
        self.common_write(QUEUE_MSIX_VECTOR, 2, u64::from(QUEUE_VECTOR));
        assert_eq!(
            self.common_read(QUEUE_MSIX_VECTOR, 2),
            u64::from(QUEUE_VECTOR)
        );
        for (lo, address) in [
            (QUEUE_DESC_LO, DESC_TABLE),
            (QUEUE_DRIVER_LO, AVAIL_RING),
            (QUEUE_DEVICE_LO, USED_RING),
        ] {
            self.common_write(lo, 4, address & 0xffff_ffff);
            self.common_write(lo + 4, 4, address >> 32);
            assert_eq!(self.common_read(lo, 8), address);
        }
        self.common_write(QUEUE_ENABLE, 2, 1);
        assert_eq!(self.common_read(QUEUE_ENABLE, 2), 1);
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.common_write(DEVICE_STATUS, 1, u64::from(all));
        assert_eq!(self.status(), all, "the device runs");
    }

    /// Probe to DRIVER_OK: enumerate, BAR, capabilities, MSI-X, features, queue.
    fn probe(&mut self) {
        self.enumerate();
        self.place_bar();
        self.walk_capabilities();
        self.enable_msix();
        assert!(self.negotiate(VERSION_1 | BLK_F_FLUSH), "features refused");
        self.setup_queue_and_start();
    }

    /// The guest's notify of queue 0: a 16-bit write of the queue index at its notify address
    /// (a trapped MMIO write when no ioeventfd is registered).
    fn notify(&self) {
        let off = self.common_read(QUEUE_NOTIFY_OFF, 2);
        let at = self.structure(VIRTIO_PCI_CAP_NOTIFY_CFG)
            + off * u64::from(self.found.notify_multiplier);
        self.bar_write(at, 2, 0);
    }

    fn write_sectors(&mut self, first: u64, count: u64) -> Vec<Posted> {
        (first..first + count)
            .map(|n| {
                let payload = pattern(n, 4096);
                self.post_block_request(VIRTIO_BLK_T_OUT, n * 8, 4096, Some(&payload))
            })
            .collect()
    }
}

#[test]
fn a_linux_style_driver_finds_the_device_and_does_io_with_msix() {
    let image = blank_image(SECTORS);
    let mut driver = PciDriver::new(&image);
    driver.probe();
    assert_eq!(
        driver.bdf,
        PciBdf::new(1),
        "first device after the host bridge"
    );
    // Identity: modern virtio-blk, revision 1, mass storage, subsystem virtio.
    assert_eq!(driver.cfg_read(0x08, 4) >> 8, 0x01_80_00);
    assert_eq!(driver.cfg_read(0x08, 1), 1);
    assert_eq!(driver.cfg_read(0x2c, 4), 0x1042 << 16 | 0x1af4);
    // Every structure is announced, in BAR 0, where the layout puts it.
    let found = &driver.found;
    assert_eq!(
        found.virtio.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    for (cfg_type, offset, length) in [
        (
            VIRTIO_PCI_CAP_COMMON_CFG,
            COMMON_CFG_OFFSET,
            COMMON_CFG_SIZE,
        ),
        (VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_SIZE),
        (VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE),
        (
            VIRTIO_PCI_CAP_DEVICE_CFG,
            DEVICE_CFG_OFFSET,
            DEVICE_CFG_SIZE,
        ),
    ] {
        let (_, bar, o, l) = found.virtio[&cfg_type];
        assert_eq!((bar, u64::from(o), u64::from(l)), (0, offset, length));
    }
    assert_eq!(found.notify_multiplier, NOTIFY_OFF_MULTIPLIER);
    assert_eq!(found.msix_vectors, 2, "one per queue plus config");
    assert_eq!(found.msix_table, (0, MSIX_TABLE_OFFSET as u32));
    assert_eq!(found.msix_pba, (0, MSIX_PBA_OFFSET as u32));
    // Device configuration: capacity.
    let capacity = driver.bar_read(driver.structure(VIRTIO_PCI_CAP_DEVICE_CFG), 8);
    assert_eq!(capacity, SECTORS);
    // MSI-X routes are what the driver programmed.
    assert_eq!(
        *driver.msi.routes.lock().unwrap(),
        BTreeMap::from([(0, message(0)), (1, message(1))])
    );

    let writes = driver.write_sectors(0, 4);
    let flush = driver.post_block_request(VIRTIO_BLK_T_FLUSH, 0, 0, None);
    let first = driver.used_idx();
    driver.notify();
    let mut expected: Vec<(u16, u32)> = writes.iter().map(|p| (p.head, 1)).collect();
    expected.push((flush.head, 1));
    driver.expect_used_since(first, &expected);
    for (n, posted) in writes.iter().enumerate() {
        assert_eq!(driver.status_byte(posted), VIRTIO_BLK_S_OK);
        assert_eq!(
            image_bytes(&image, n as u64 * 4096, 4096),
            pattern(n as u64, 4096)
        );
    }
    assert!(driver.msi.sent(QUEUE_VECTOR) >= 1, "the queue's vector");
    assert_eq!(driver.msi.sent(CONFIG_VECTOR), 0, "no config change");
    // The ISR says "queue" once and is clear after the read.
    let isr = driver.structure(VIRTIO_PCI_CAP_ISR_CFG);
    assert_eq!(driver.bar_read(isr, 1), 1);
    assert_eq!(driver.bar_read(isr, 1), 0);

    // Read it back through the device.
    let read = driver.post_block_request(VIRTIO_BLK_T_IN, 8, 4096, None);
    let first = driver.used_idx();
    driver.notify();
    driver.expect_used_since(first, &[(read.head, 4097)]);
    assert_eq!(driver.read_guest(read.data_addr, 4096), pattern(1, 4096));
}

#[test]
fn features_without_version_1_are_refused() {
    let image = blank_image(SECTORS);
    let mut driver = PciDriver::new(&image);
    driver.enumerate();
    driver.place_bar();
    driver.walk_capabilities();
    assert!(
        !driver.negotiate(BLK_F_FLUSH),
        "legacy feature set accepted"
    );
    assert!(
        !driver.negotiate(VERSION_1 | 1 << 40),
        "a feature never offered accepted"
    );
    assert!(driver.negotiate(VERSION_1));
}

#[test]
fn vectors_the_table_lacks_read_back_no_vector_and_send_nothing() {
    let image = blank_image(SECTORS);
    let mut driver = PciDriver::new(&image);
    driver.probe();
    // After DRIVER_OK the driver may still change vectors (Linux does not, but nothing forbids).
    driver.common_write(QUEUE_SELECT, 2, 0);
    driver.common_write(QUEUE_MSIX_VECTOR, 2, 7);
    assert_eq!(
        driver.common_read(QUEUE_MSIX_VECTOR, 2),
        u64::from(NO_VECTOR)
    );
    driver.common_write(MSIX_CONFIG, 2, 2);
    assert_eq!(driver.common_read(MSIX_CONFIG, 2), u64::from(NO_VECTOR));
    let sent = driver.msi.sent(QUEUE_VECTOR);
    let write = driver.write_sectors(0, 1);
    let first = driver.used_idx();
    driver.notify();
    driver.expect_used_since(first, &[(write[0].head, 1)]);
    assert_eq!(
        driver.msi.sent(QUEUE_VECTOR),
        sent,
        "NO_VECTOR sent a message"
    );
    // The ISR still tells a polling driver.
    assert_eq!(driver.bar_read(ISR_OFFSET, 1), 1);
}

#[test]
fn a_masked_queue_vector_is_pending_and_sent_on_unmask() {
    let image = blank_image(SECTORS);
    let mut driver = PciDriver::new(&image);
    driver.probe();
    driver.set_vector_mask(QUEUE_VECTOR, true);
    let sent = driver.msi.sent(QUEUE_VECTOR);
    let write = driver.write_sectors(0, 1);
    let first = driver.used_idx();
    driver.notify();
    driver.expect_used_since(first, &[(write[0].head, 1)]);
    assert!(driver.pending(QUEUE_VECTOR), "pending bit");
    assert_eq!(driver.msi.sent(QUEUE_VECTOR), sent);
    driver.set_vector_mask(QUEUE_VECTOR, false);
    assert!(!driver.pending(QUEUE_VECTOR));
    assert_eq!(
        driver.msi.sent(QUEUE_VECTOR),
        sent + 1,
        "sent once on unmask"
    );
}

#[test]
fn a_reset_clears_status_queues_and_vectors_and_the_device_starts_over() {
    let image = blank_image(SECTORS);
    let mut driver = PciDriver::new(&image);
    driver.probe();
    driver.assert_serves_a_read_pci();
    driver.common_write(DEVICE_STATUS, 1, 0);
    assert_eq!(driver.status(), 0);
    driver.common_write(QUEUE_SELECT, 2, 0);
    assert_eq!(driver.common_read(QUEUE_ENABLE, 2), 0);
    assert_eq!(
        driver.common_read(QUEUE_MSIX_VECTOR, 2),
        u64::from(NO_VECTOR)
    );
    assert_eq!(driver.common_read(MSIX_CONFIG, 2), u64::from(NO_VECTOR));
    assert_eq!(driver.common_read(QUEUE_DESC_LO, 8), 0);
    for select in 0..2 {
        driver.common_write(DRIVER_FEATURE_SELECT, 4, select);
        assert_eq!(driver.common_read(DRIVER_FEATURE, 4), 0);
    }
    driver.forget_rings();
    assert!(driver.negotiate(VERSION_1 | BLK_F_FLUSH));
    driver.setup_queue_and_start();
    driver.assert_serves_a_read_pci();
}

#[test]
fn the_pci_configuration_access_capability_reaches_bar_0() {
    let image = blank_image(SECTORS);
    let mut driver = PciDriver::new(&image);
    driver.enumerate();
    driver.walk_capabilities();
    // Works before the BAR is placed: that is what the capability is for.
    let (cap, ..) = driver.found.virtio[&VIRTIO_PCI_CAP_PCI_CFG];
    let window = |bar: u32, offset: u64, length: u32| {
        driver.cfg_write(cap + 4, 1, bar);
        driver.cfg_write(cap + 8, 4, offset as u32);
        driver.cfg_write(cap + 12, 4, length);
    };
    window(0, COMMON_CFG_OFFSET + NUM_QUEUES, 2);
    assert_eq!(driver.cfg_read(cap + 16, 2), 1);
    window(0, DEVICE_CFG_OFFSET, 4);
    assert_eq!(driver.cfg_read(cap + 16, 4), SECTORS as u32);
    window(0, COMMON_CFG_OFFSET + DEVICE_STATUS, 1);
    driver.cfg_write(cap + 16, 1, status::ACKNOWLEDGE);
    assert_eq!(driver.cfg_read(cap + 16, 1), status::ACKNOWLEDGE);
    // Another BAR or a length of 3 reaches nothing: the window reads what was written.
    window(1, COMMON_CFG_OFFSET + NUM_QUEUES, 2);
    driver.cfg_write(cap + 16, 4, 0xabcd_0000);
    assert_eq!(driver.cfg_read(cap + 16, 4), 0xabcd_0000);
    window(0, COMMON_CFG_OFFSET + NUM_QUEUES, 3);
    assert_eq!(driver.cfg_read(cap + 16, 4), 0xabcd_0000);
}

#[test]
fn notify_addresses_follow_bar_0() {
    let image = blank_image(SECTORS);
    let mut driver = PciDriver::new(&image);
    assert_eq!(driver.device.lock().unwrap().notify_address(0), None);
    driver.enumerate();
    driver.place_bar();
    let device = driver.device.lock().unwrap();
    assert_eq!(device.notify_address(0), Some(BAR_BASE + NOTIFY_OFFSET));
    assert_eq!(device.notify_address(1), None, "virtio-blk has one queue");
    assert_eq!(notify_offset(3), NOTIFY_OFFSET + 12);
    // What the VMM registers: queue 0's eventfd at its notify offset in BAR 0, any write.
    let ioevents = device.ioeventfds();
    assert_eq!(ioevents.len(), 1);
    assert_eq!(
        (ioevents[0].bar, ioevents[0].offset, ioevents[0].datamatch),
        (0, NOTIFY_OFFSET, None)
    );
}

impl PciDriver {
    /// A one-sector read completes with OK (after a reset, a restore).
    fn assert_serves_a_read_pci(&mut self) {
        let read = self.post_block_request(VIRTIO_BLK_T_IN, 0, 512, None);
        let first = self.used_idx();
        self.notify();
        self.expect_used_since(first, &[(read.head, 513)]);
        assert_eq!(self.status_byte(&read), VIRTIO_BLK_S_OK);
    }

    /// What the power-fail save does with the function: pause, flush, the device's and the
    /// bus's state, through serde.
    fn save(&self) -> (VirtioPciState, PciBusState) {
        use devices::virtio::VirtioTransport;
        let mut device = self.device.lock().unwrap();
        device.pause().unwrap();
        device.flush_backend().unwrap();
        let state = device.state().unwrap();
        drop(device);
        let bus = self.pci.lock().unwrap().state().unwrap();
        let json = serde_json::to_vec(&(state, bus)).unwrap();
        serde_json::from_slice(&json).unwrap()
    }

    /// Power failure after the save: the VMM is gone, guest memory and the disk survive. A new
    /// function is built from the state, its bus restored, BAR 0 mapped where it decodes, then
    /// activated and resumed; the driver continues with what it keeps in its RAM.
    fn power_cycle(
        self,
        image: &tempfile::NamedTempFile,
        saved: &(VirtioPciState, PciBusState),
    ) -> Self {
        use devices::virtio::VirtioTransport;
        let PciDriver {
            rings, bdf, found, ..
        } = self;
        let msi = Arc::new(MsiLog::default());
        let device = VirtioPciDevice::restore(
            open_block(image.path(), false),
            rings.mem.clone(),
            msi.clone(),
            &saved.0,
        )
        .unwrap();
        let mut driver = PciDriver::on(rings, device, msi);
        driver.pci.lock().unwrap().restore(&saved.1).unwrap();
        driver.bdf = bdf;
        driver.found = found;
        let address = driver.device.lock().unwrap().bar_address();
        assert_eq!(address, BAR_BASE, "BAR 0 decodes where the guest put it");
        driver
            .mmio
            .insert(
                address,
                VIRTIO_PCI_BAR_SIZE,
                Arc::new(Mutex::new(Bar0(driver.device.clone()))),
            )
            .unwrap();
        let mut device = driver.device.lock().unwrap();
        assert!(
            device.activate_pending().unwrap(),
            "a running device is activated"
        );
        device.resume().unwrap();
        drop(device);
        driver
    }
}

#[test]
fn a_power_cycle_in_the_middle_of_use_loses_no_request_and_no_interrupt() {
    let image = blank_image(SECTORS);
    let mut driver = PciDriver::new(&image);
    driver.probe();
    let mut posted = driver.write_sectors(0, 24);
    driver.notify();
    // The save lands while the device works through the batch; more requests are posted while
    // it is paused and their notify goes nowhere.
    let saved = driver.save();
    posted.extend(driver.write_sectors(24, 8));
    assert_eq!(saved.0.version, VIRTIO_PCI_STATE_VERSION);
    assert_eq!(saved.0.queue_msix_vectors, vec![QUEUE_VECTOR]);
    assert_eq!(saved.0.msix_config_vector, CONFIG_VECTOR);
    assert!(saved.0.msix.enabled);
    let done_before = driver.used_idx();

    let driver = driver.power_cycle(&image, &saved);
    // Routes are announced again to the new sink before anything is sent.
    assert_eq!(
        *driver.msi.routes.lock().unwrap(),
        BTreeMap::from([(0, message(0)), (1, message(1))])
    );
    driver.wait_used(32);
    let heads: BTreeSet<u32> = (0..32).map(|i| driver.used_elem(i).0).collect();
    assert_eq!(
        heads,
        posted.iter().map(|p| u32::from(p.head)).collect(),
        "every request once"
    );
    for (n, p) in posted.iter().enumerate() {
        assert_eq!(driver.status_byte(p), VIRTIO_BLK_S_OK);
        assert_eq!(
            image_bytes(&image, n as u64 * 4096, 4096),
            pattern(n as u64, 4096),
            "sector block {n} (done before the save: {done_before})"
        );
    }
    assert!(
        driver.msi.sent(QUEUE_VECTOR) >= 1,
        "the queue's vector after restore"
    );
    // Registers the driver set survive: status, vectors, the queue.
    assert_eq!(
        driver.status(),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
    );
    assert_eq!(
        driver.common_read(QUEUE_MSIX_VECTOR, 2),
        u64::from(QUEUE_VECTOR)
    );
    assert_eq!(driver.common_read(QUEUE_DESC_LO, 8), DESC_TABLE);
    let mut driver = driver;
    driver.assert_serves_a_read_pci();
}

#[test]
fn state_is_refused_while_running_and_foreign_states_are_refused() {
    let image = blank_image(SECTORS);
    let mut driver = PciDriver::new(&image);
    driver.probe();
    assert!(matches!(
        driver.device.lock().unwrap().state(),
        Err(Error::NotPaused)
    ));
    let (state, _) = driver.save();
    let restore = |state: &VirtioPciState| {
        VirtioPciDevice::restore(
            open_block(image.path(), false),
            driver.mem.clone(),
            Arc::new(MsiLog::default()),
            state,
        )
        .map(drop)
    };
    restore(&state).unwrap();
    let mut newer = state.clone();
    newer.version += 1;
    assert!(matches!(restore(&newer), Err(Error::StateVersion { .. })));
    let mut vectors = state.clone();
    vectors.queue_msix_vectors.push(3);
    assert!(matches!(
        restore(&vectors),
        Err(Error::QueueCountMismatch { .. })
    ));
    let mut table = state.clone();
    table.msix.entries.pop();
    assert!(matches!(restore(&table), Err(Error::Pci(_))));
}
