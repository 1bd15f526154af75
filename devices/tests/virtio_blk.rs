//! virtio-blk requests through real descriptor chains, checked on the file and the used ring.

mod common;

use common::*;
use std::os::unix::fs::FileExt;

const SECTORS: u64 = 2048;

fn running(image: &tempfile::NamedTempFile, readonly: bool) -> TestDriver {
    let driver = TestDriver::new(guest_memory(), open_block(image.path(), readonly));
    let mut features = VERSION_1 | BLK_F_FLUSH;
    if readonly {
        features |= BLK_F_RO;
    }
    driver.initialise(features);
    driver
}

#[test]
fn write_flush_read_round_trip() {
    let image = blank_image(SECTORS);
    let mut driver = running(&image, false);
    let payload = pattern(3, 1024);

    let write = driver.post_block_request(VIRTIO_BLK_T_OUT, 3, 1024, Some(&payload));
    let flush = driver.post_block_request(VIRTIO_BLK_T_FLUSH, 0, 0, None);
    driver.notify();
    driver.wait_used(2);
    assert_eq!(driver.status_byte(&write), VIRTIO_BLK_S_OK);
    assert_eq!(driver.status_byte(&flush), VIRTIO_BLK_S_OK);
    assert_eq!(driver.used_elem(0), (u32::from(write.head), 1));
    assert_eq!(driver.used_elem(1), (u32::from(flush.head), 1));

    assert_eq!(
        image_bytes(&image, 3 * 512, 1024),
        payload,
        "data on the file at sector 3"
    );

    let read = driver.post_block_request(VIRTIO_BLK_T_IN, 3, 1024, None);
    // This notify takes the ioeventfd path: the VMM's KVM registration signals the same fd.
    driver.transport.lock().unwrap().queue_evts()[0]
        .write(1)
        .unwrap();
    driver.wait_used(3);
    assert_eq!(driver.status_byte(&read), VIRTIO_BLK_S_OK);
    assert_eq!(driver.used_elem(2), (u32::from(read.head), 1024 + 1));
    assert_eq!(driver.read_guest(read.data_addr, 1024), payload);

    // Used-buffer interrupt: status bit 0, acknowledged by the driver.
    assert!(driver.irq.eventfd().read().unwrap() >= 1);
    assert_eq!(driver.read32(REG_INTERRUPT_STATUS) & 1, 1);
    driver.write32(REG_INTERRUPT_ACK, 1);
    assert_eq!(driver.read32(REG_INTERRUPT_STATUS), 0);

    let counters = driver.transport.lock().unwrap().counters();
    assert_eq!(counters["write_ops"], 1);
    assert_eq!(counters["write_bytes"], 1024);
    assert_eq!(counters["read_ops"], 1);
    assert_eq!(counters["read_bytes"], 1024);
}

#[test]
fn multi_descriptor_data_and_the_last_sector() {
    let image = blank_image(SECTORS);
    let mut driver = running(&image, false);
    let first = pattern(7, 512);
    let second = pattern(8, 1024);
    let a = driver.alloc(512);
    let b = driver.alloc(1024);
    driver.write_guest(a, &first);
    driver.write_guest(b, &second);
    let write = driver.post_request_chain(
        VIRTIO_BLK_T_OUT,
        SECTORS - 3,
        &[(a, 512, false), (b, 1024, false)],
    );
    driver.notify();
    driver.wait_used(1);
    assert_eq!(driver.status_byte(&write), VIRTIO_BLK_S_OK);
    let on_disk = image_bytes(&image, (SECTORS - 3) * 512, 1536);
    assert_eq!(&on_disk[..512], &first[..]);
    assert_eq!(&on_disk[512..], &second[..]);
}

#[test]
fn get_id_returns_a_stable_twenty_byte_id() {
    let image = blank_image(SECTORS);
    let mut driver = running(&image, false);
    let first = driver.post_block_request(VIRTIO_BLK_T_GET_ID, 0, 20, None);
    let second = driver.post_block_request(VIRTIO_BLK_T_GET_ID, 0, 20, None);
    driver.notify();
    driver.wait_used(2);
    assert_eq!(driver.status_byte(&first), VIRTIO_BLK_S_OK);
    assert_eq!(driver.used_elem(0).1, 21);
    let id = driver.read_guest(first.data_addr, 20);
    assert!(id[0] != 0, "non-empty ID");
    assert_eq!(id, driver.read_guest(second.data_addr, 20));
}

#[test]
fn bad_requests_get_an_error_status_and_the_device_keeps_serving() {
    let image = blank_image(SECTORS);
    let mut driver = running(&image, false);
    let mut expected = vec![
        // Past the end, straddling the end, and a sector number that overflows.
        (
            driver.post_block_request(VIRTIO_BLK_T_IN, SECTORS, 512, None),
            VIRTIO_BLK_S_IOERR,
        ),
        (
            driver.post_block_request(VIRTIO_BLK_T_OUT, SECTORS - 1, 1024, Some(&[1; 1024])),
            VIRTIO_BLK_S_IOERR,
        ),
        (
            driver.post_block_request(VIRTIO_BLK_T_IN, u64::MAX, 512, None),
            VIRTIO_BLK_S_IOERR,
        ),
        // Not a whole number of sectors.
        (
            driver.post_block_request(VIRTIO_BLK_T_IN, 0, 100, None),
            VIRTIO_BLK_S_IOERR,
        ),
        // Unknown request type.
        (
            driver.post_block_request(0x4242, 0, 0, None),
            VIRTIO_BLK_S_UNSUPP,
        ),
    ];
    // Wrong data direction: IN data marked device-readable.
    let data = driver.alloc(512);
    expected.push((
        driver.post_request_chain(VIRTIO_BLK_T_IN, 0, &[(data, 512, false)]),
        VIRTIO_BLK_S_IOERR,
    ));
    // Data buffer outside guest memory.
    expected.push((
        driver.post_request_chain(VIRTIO_BLK_T_IN, 0, &[(0xfff0_0000, 512, true)]),
        VIRTIO_BLK_S_IOERR,
    ));
    // Header too short.
    let header = driver.alloc(16);
    expected.push((
        driver.post_chain_with_status(&[(header, 8, false)], &[]),
        VIRTIO_BLK_S_IOERR,
    ));

    let used: Vec<(u16, u32)> = expected.iter().map(|(p, _)| (p.head, 1)).collect();
    driver.notify_and_expect_used(&used);
    for (i, (posted, status)) in expected.iter().enumerate() {
        assert_eq!(driver.status_byte(posted), *status, "request {i}");
    }
    assert_eq!(
        image_bytes(&image, (SECTORS - 1) * 512, 512),
        vec![0; 512],
        "the straddling write wrote nothing"
    );

    driver.assert_serves_a_read();
}

#[test]
fn chains_without_a_status_are_dropped_not_fatal() {
    let image = blank_image(SECTORS);
    let mut driver = running(&image, false);
    // Only a header: no status descriptor to report through.
    let header = driver.alloc(16);
    let lonely = driver.post_chain(&[(header, 16, false)]);
    // A status that is device-readable.
    let header = driver.alloc(16);
    let status = driver.alloc(1);
    let readonly_status = driver.post_chain(&[(header, 16, false), (status, 1, false)]);
    // A descriptor loop: 250 -> 251 -> 250 ... ; the chain is cut at the queue size.
    driver.write_descriptor(250, header, 16, VIRTQ_DESC_F_NEXT, 251);
    driver.write_descriptor(251, header, 16, VIRTQ_DESC_F_NEXT, 250);
    driver.post_head(250);
    // A next pointer beyond the table.
    driver.write_descriptor(252, header, 16, VIRTQ_DESC_F_NEXT, 4000);
    driver.post_head(252);
    driver.notify_and_expect_used(&[(lonely, 0), (readonly_status, 0), (250, 0), (252, 0)]);
    driver.assert_serves_a_read();
}

#[test]
fn avail_head_beyond_the_table_is_skipped() {
    let image = blank_image(SECTORS);
    let mut driver = running(&image, false);
    driver.post_head(QUEUE_SIZE + 5);
    let good = driver.post_block_request(VIRTIO_BLK_T_IN, 0, 512, None);
    driver.notify();
    // The bogus head cannot go on the used ring; the good request still completes.
    driver.wait_used(1);
    assert_eq!(driver.used_elem(0).0, u32::from(good.head));
    assert_eq!(driver.status_byte(&good), VIRTIO_BLK_S_OK);
}

#[test]
fn readonly_disk_refuses_writes_and_serves_reads() {
    let image = blank_image(SECTORS);
    image.as_file().write_all_at(&[0x5a; 512], 512).unwrap();
    let mut driver = running(&image, true);
    let write = driver.post_block_request(VIRTIO_BLK_T_OUT, 1, 512, Some(&[0xee; 512]));
    let read = driver.post_block_request(VIRTIO_BLK_T_IN, 1, 512, None);
    driver.notify();
    driver.wait_used(2);
    assert_eq!(driver.status_byte(&write), VIRTIO_BLK_S_IOERR);
    assert_eq!(driver.status_byte(&read), VIRTIO_BLK_S_OK);
    assert_eq!(driver.read_guest(read.data_addr, 512), vec![0x5a; 512]);
    assert_eq!(image_bytes(&image, 512, 512), vec![0x5a; 512]);
    assert_eq!(driver.transport.lock().unwrap().counters()["write_ops"], 0);
}

/// Guest memory of two regions meeting at `split`: a buffer across `split` is two host mappings.
fn two_regions(split: u64, size: u64) -> vm_memory::GuestMemoryMmap {
    use vm_memory::GuestAddress;
    vm_memory::GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), split as usize),
        (GuestAddress(split), (size - split) as usize),
    ])
    .unwrap()
}

#[test]
fn buffers_spanning_two_guest_regions_and_several_descriptors() {
    const SPLIT: u64 = 0x20_0000;
    let image = blank_image(SECTORS);
    let mut driver = TestDriver::new(
        two_regions(SPLIT, MEM_SIZE as u64),
        open_block(image.path(), false),
    );
    driver.initialise(VERSION_1 | BLK_F_FLUSH);
    let payload = pattern(11, 0x1600);
    // Written from a buffer across the split and one in the second region.
    driver.write_guest(SPLIT - 0x800, &payload[..0x1000]);
    driver.write_guest(0x30_0000, &payload[0x1000..]);
    let write = driver.post_request_chain(
        VIRTIO_BLK_T_OUT,
        40,
        &[(SPLIT - 0x800, 0x1000, false), (0x30_0000, 0x600, false)],
    );
    driver.notify();
    driver.wait_used(1);
    assert_eq!(driver.status_byte(&write), VIRTIO_BLK_S_OK);
    assert_eq!(
        image_bytes(&image, 40 * 512, payload.len()),
        payload,
        "both halves of the split buffer reached the file"
    );

    driver.write_guest(SPLIT - 0x800, &[0; 0x1000]);
    // Read back into three buffers cut differently: one in the first region, one across the
    // split, one in the second region.
    let parts: [(u64, u32); 3] = [
        (0x18_0000, 0x200),
        (SPLIT - 0x100, 0x400),
        (0x38_0000, 0x1000),
    ];
    let read = driver.post_request_chain(
        VIRTIO_BLK_T_IN,
        40,
        &parts.map(|(addr, len)| (addr, len, true)),
    );
    driver.notify();
    driver.wait_used(2);
    assert_eq!(driver.status_byte(&read), VIRTIO_BLK_S_OK);
    assert_eq!(driver.used_elem(1), (u32::from(read.head), 0x1600 + 1));
    let mut in_guest = Vec::new();
    for (addr, len) in parts {
        in_guest.extend(driver.read_guest(addr, len as usize));
    }
    assert_eq!(
        in_guest, payload,
        "the read filled each buffer in chain order"
    );
    assert_eq!(
        driver.read_guest(SPLIT + 0x300, 0x500),
        vec![0; 0x500],
        "nothing written past the buffer across the split"
    );
}

#[test]
fn a_read_past_the_end_of_a_shrunk_image_is_an_error_not_stale_data() {
    let image = blank_image(SECTORS);
    let mut driver = running(&image, false);
    // Another process truncates the image under the running device: its last sector is gone.
    image.as_file().set_len((SECTORS - 1) * 512).unwrap();
    let short = driver.post_block_request(VIRTIO_BLK_T_IN, SECTORS - 2, 1024, None);
    let gone = driver.post_block_request(VIRTIO_BLK_T_IN, SECTORS - 1, 512, None);
    let before = driver.post_block_request(VIRTIO_BLK_T_IN, SECTORS - 2, 512, None);
    driver.notify();
    driver.wait_used(3);
    assert_eq!(
        driver.status_byte(&short),
        VIRTIO_BLK_S_IOERR,
        "short read at EOF"
    );
    assert_eq!(driver.used_elem(0), (u32::from(short.head), 1));
    assert_eq!(
        driver.status_byte(&gone),
        VIRTIO_BLK_S_IOERR,
        "read entirely past EOF"
    );
    assert_eq!(
        driver.status_byte(&before),
        VIRTIO_BLK_S_OK,
        "the sector before EOF still reads"
    );
    assert_eq!(driver.transport.lock().unwrap().counters()["read_ops"], 1);
    driver.assert_serves_a_read();
}

/// Not a benchmark gate: moves 1 GiB through reads into a buffer spanning two guest regions and
/// prints the rate, to compare the request path before and after a change on one machine.
#[test]
fn large_reads_across_regions_arrive_intact_and_report_a_rate() {
    const SPLIT: u64 = 0x60_0000;
    const BUFFER: u64 = 0x40_0000;
    const LEN: u32 = 4 << 20;
    // 32 chains of 4 descriptors fill half the ring; the device serves a batch on one notify.
    const BATCH: u16 = 32;
    const BATCHES: u16 = 8;
    let image = blank_image(SECTORS);
    let contents: Vec<u8> = (0..LEN as usize).map(|i| (i % 253) as u8).collect();
    image.as_file().set_len(u64::from(LEN)).unwrap();
    image.as_file().write_all_at(&contents, 0).unwrap();
    let mut driver = TestDriver::new(
        two_regions(SPLIT, 16 << 20),
        open_block(image.path(), false),
    );
    driver.initialise(VERSION_1 | BLK_F_FLUSH);
    // Two descriptors of 2 MiB each; the first region ends in the middle of the second one.
    let data = [
        (BUFFER, LEN / 2, true),
        (BUFFER + u64::from(LEN / 2), LEN / 2, true),
    ];
    let mut elapsed = std::time::Duration::ZERO;
    for batch in 1..=BATCHES {
        driver.write_guest(BUFFER, &[0; 512]);
        let reads: Vec<Posted> = (0..BATCH)
            .map(|_| driver.post_request_chain(VIRTIO_BLK_T_IN, 0, &data))
            .collect();
        let started = std::time::Instant::now();
        driver.notify();
        driver.wait_used(batch * BATCH);
        elapsed += started.elapsed();
        for read in &reads {
            assert_eq!(driver.status_byte(read), VIRTIO_BLK_S_OK);
        }
    }
    assert_eq!(driver.read_guest(BUFFER, LEN as usize), contents);
    let mib = f64::from(BATCHES * BATCH) * f64::from(LEN) / f64::from(1 << 20);
    eprintln!(
        "virtio-blk reads: {mib:.0} MiB in {:.3} s = {:.0} MiB/s (4 MiB requests, 2 descriptors, 2 regions)",
        elapsed.as_secs_f64(),
        mib / elapsed.as_secs_f64()
    );
}

/// A write hook that records what it was asked and the image's bytes it read, and answers
/// `Defer` while `defer` is set, then `answer`.
struct RecordingHook {
    asked: std::sync::Mutex<Vec<(u64, u64, Vec<u8>)>>,
    defer: std::sync::atomic::AtomicBool,
    answer: devices::virtio::BeforeWrite,
}

impl devices::virtio::BlockWriteHook for RecordingHook {
    fn before_write(
        &self,
        image: &devices::virtio::DiskImage<'_>,
        offset: u64,
        len: u64,
    ) -> devices::virtio::BeforeWrite {
        let mut old = vec![0u8; len as usize];
        image.read_at(offset, &mut old).unwrap();
        assert_eq!(image.len(), SECTORS * 512);
        self.asked.lock().unwrap().push((offset, len, old));
        if self.defer.load(std::sync::atomic::Ordering::SeqCst) {
            return devices::virtio::BeforeWrite::Defer;
        }
        self.answer.clone()
    }
}

fn hooked(image: &tempfile::NamedTempFile, hook: std::sync::Arc<RecordingHook>) -> TestDriver {
    let block = open_block(image.path(), false);
    block.write_hook_slot().install(Some(hook));
    let driver = TestDriver::new(guest_memory(), block);
    driver.initialise(VERSION_1 | BLK_F_FLUSH);
    driver
}

#[test]
fn the_write_hook_sees_the_old_bytes_before_each_write_and_can_defer_it() {
    let image = blank_image(SECTORS);
    image.as_file().write_all_at(&pattern(1, 4096), 0).unwrap();
    let hook = std::sync::Arc::new(RecordingHook {
        asked: Default::default(),
        defer: true.into(),
        answer: devices::virtio::BeforeWrite::Proceed,
    });
    let mut driver = hooked(&image, hook.clone());
    let payload = pattern(2, 1024);
    // Deferred: nothing written, nothing completed, and the device serves nothing after it.
    let write = driver.post_block_request(VIRTIO_BLK_T_OUT, 3, 1024, Some(&payload));
    let read = driver.post_block_request(VIRTIO_BLK_T_IN, 0, 512, None);
    driver.notify();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(driver.used_idx(), 0);
    assert_eq!(
        image_bytes(&image, 3 * 512, 1024),
        pattern(1, 4096)[1536..2560]
    );
    let deferred = hook.asked.lock().unwrap().len();
    assert!(deferred >= 1);
    // Served again, in order, after the next pause and resume (a checkpoint's).
    hook.defer.store(false, std::sync::atomic::Ordering::SeqCst);
    driver.transport.lock().unwrap().pause().unwrap();
    driver.transport.lock().unwrap().resume().unwrap();
    driver.wait_used(2);
    assert_eq!(driver.used_elem(0), (u32::from(write.head), 1));
    assert_eq!(driver.used_elem(1), (u32::from(read.head), 513));
    assert_eq!(driver.status_byte(&write), VIRTIO_BLK_S_OK);
    assert_eq!(image_bytes(&image, 3 * 512, 1024), payload);
    // Asked again for the same write (each wake-up while deferred, then once more), each time
    // before it: the old bytes every time; reads never ask.
    let asked = hook.asked.lock().unwrap().clone();
    let old = pattern(1, 4096)[1536..2560].to_vec();
    assert_eq!(asked.len(), deferred + 1);
    assert!(asked.iter().all(|a| *a == (1536, 1024, old.clone())));
}

#[test]
fn a_write_the_hook_refuses_fails_and_leaves_the_image() {
    let image = blank_image(SECTORS);
    let hook = std::sync::Arc::new(RecordingHook {
        asked: Default::default(),
        defer: false.into(),
        answer: devices::virtio::BeforeWrite::Fail("no".into()),
    });
    let mut driver = hooked(&image, hook.clone());
    let write = driver.post_block_request(VIRTIO_BLK_T_OUT, 8, 512, Some(&pattern(5, 512)));
    driver.notify();
    driver.wait_used(1);
    assert_eq!(driver.status_byte(&write), VIRTIO_BLK_S_IOERR);
    assert_eq!(image_bytes(&image, 8 * 512, 512), vec![0; 512]);
    assert_eq!(hook.asked.lock().unwrap().len(), 1);
}

/// A guest-write gate that records the ranges it was asked about (host address, length) and
/// answers `Defer` while `defer` is set; with `refuse_over`, `Fail` for requests writing more
/// bytes than that.
struct RecordingGate {
    asked: std::sync::Mutex<Vec<Vec<(usize, usize)>>>,
    defer: std::sync::atomic::AtomicBool,
    refuse_over: usize,
}

impl devices::virtio::GuestWriteGate for RecordingGate {
    fn before_guest_writes(&self, ranges: &[(usize, usize)]) -> devices::virtio::BeforeWrite {
        self.asked.lock().unwrap().push(ranges.to_vec());
        if self.defer.load(std::sync::atomic::Ordering::SeqCst) {
            return devices::virtio::BeforeWrite::Defer;
        }
        let bytes: usize = ranges.iter().map(|(_, len)| len).sum();
        if bytes > self.refuse_over {
            return devices::virtio::BeforeWrite::Fail("too large".into());
        }
        devices::virtio::BeforeWrite::Proceed
    }
}

fn gated(image: &tempfile::NamedTempFile, gate: std::sync::Arc<RecordingGate>) -> TestDriver {
    let driver = TestDriver::new(guest_memory(), open_block(image.path(), false));
    let slot = devices::virtio::GuestWriteGateSlot::default();
    slot.install(Some(gate));
    driver
        .transport
        .lock()
        .unwrap()
        .gate_guest_writes_with(slot);
    driver.initialise(VERSION_1 | BLK_F_FLUSH);
    driver
}

/// The host address of guest address `addr` in the driver's memory.
fn host(driver: &TestDriver, addr: u64) -> usize {
    use vm_memory::GuestMemoryBackend;
    driver
        .mem
        .get_host_address(vm_memory::GuestAddress(addr))
        .unwrap() as usize
}

/// A read asks the guest-write gate first, with its data buffer and status byte (and the used
/// ring); deferred, it writes nothing and completes nothing until the next pause and resume,
/// where it is served in full.
#[test]
fn a_read_asks_the_guest_write_gate_first_and_waits_for_the_resume_when_deferred() {
    let image = blank_image(SECTORS);
    image.as_file().write_all_at(&pattern(3, 8192), 0).unwrap();
    let gate = std::sync::Arc::new(RecordingGate {
        asked: Default::default(),
        defer: true.into(),
        refuse_over: usize::MAX,
    });
    let mut driver = gated(&image, gate.clone());
    let read = driver.post_block_request(VIRTIO_BLK_T_IN, 0, 8192, None);
    let before = driver.read_guest(read.data_addr, 8192);
    driver.notify();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(driver.used_idx(), 0);
    assert_eq!(driver.read_guest(read.data_addr, 8192), before);
    assert_eq!(driver.status_byte(&read), 0xff);
    let asked = gate.asked.lock().unwrap().clone();
    assert!(!asked.is_empty());
    assert!(
        asked[0].contains(&(host(&driver, read.data_addr), 8192)),
        "{asked:?}"
    );
    assert!(
        asked[0].contains(&(host(&driver, read.status_addr), 1)),
        "{asked:?}"
    );
    gate.defer.store(false, std::sync::atomic::Ordering::SeqCst);
    driver.transport.lock().unwrap().pause().unwrap();
    driver.transport.lock().unwrap().resume().unwrap();
    driver.wait_used(1);
    assert_eq!(driver.used_elem(0), (u32::from(read.head), 8193));
    assert_eq!(driver.status_byte(&read), VIRTIO_BLK_S_OK);
    assert_eq!(driver.read_guest(read.data_addr, 8192), pattern(3, 8192));
}

/// A read whose guest writes the gate refuses for good fails with IOERR, writing only its
/// status (asked about again alone): its buffer is untouched, and the device serves on.
#[test]
fn a_read_the_guest_write_gate_refuses_fails_without_touching_its_buffer() {
    let image = blank_image(SECTORS);
    image.as_file().write_all_at(&pattern(4, 8192), 0).unwrap();
    let gate = std::sync::Arc::new(RecordingGate {
        asked: Default::default(),
        defer: false.into(),
        refuse_over: 8192,
    });
    let mut driver = gated(&image, gate.clone());
    let big = driver.post_block_request(VIRTIO_BLK_T_IN, 0, 8192, None);
    let small = driver.post_block_request(VIRTIO_BLK_T_IN, 0, 512, None);
    let before = driver.read_guest(big.data_addr, 8192);
    driver.notify();
    driver.wait_used(2);
    assert_eq!(driver.status_byte(&big), VIRTIO_BLK_S_IOERR);
    assert_eq!(driver.used_elem(0), (u32::from(big.head), 1));
    assert_eq!(driver.read_guest(big.data_addr, 8192), before);
    assert_eq!(driver.status_byte(&small), VIRTIO_BLK_S_OK);
    assert_eq!(driver.read_guest(small.data_addr, 512), pattern(4, 512));
    let asked = gate.asked.lock().unwrap().clone();
    assert!(
        !asked[1].contains(&(host(&driver, big.data_addr), 8192)),
        "{asked:?}"
    );
    assert!(
        asked[1].contains(&(host(&driver, big.status_addr), 1)),
        "{asked:?}"
    );
}
