//! virtio-blk requests through real descriptor chains, checked on the file and the used ring.

mod common;

use common::*;
use std::os::unix::fs::FileExt;

const SECTORS: u64 = 2048;

fn disk() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(SECTORS * 512).unwrap();
    file
}

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
    let image = disk();
    let mut driver = running(&image, false);
    let payload = pattern(3, 1024);

    let write = driver.post_block_request(T_OUT, 3, 1024, Some(&payload));
    let flush = driver.post_block_request(T_FLUSH, 0, 0, None);
    driver.notify();
    driver.wait_used(2);
    assert_eq!(driver.status_byte(&write), S_OK);
    assert_eq!(driver.status_byte(&flush), S_OK);
    assert_eq!(driver.used_elem(0), (u32::from(write.head), 1));
    assert_eq!(driver.used_elem(1), (u32::from(flush.head), 1));

    let mut on_disk = vec![0u8; 1024];
    image
        .as_file()
        .read_exact_at(&mut on_disk, 3 * 512)
        .unwrap();
    assert_eq!(on_disk, payload, "data on the file at sector 3");

    let read = driver.post_block_request(T_IN, 3, 1024, None);
    // This notify takes the ioeventfd path: the VMM's KVM registration signals the same fd.
    driver.transport.lock().unwrap().queue_evts()[0]
        .write(1)
        .unwrap();
    driver.wait_used(3);
    assert_eq!(driver.status_byte(&read), S_OK);
    assert_eq!(driver.used_elem(2), (u32::from(read.head), 1024 + 1));
    assert_eq!(driver.read_guest(read.data_addr, 1024), payload);

    // Used-buffer interrupt: status bit 0, acknowledged by the driver.
    assert!(driver.irq.eventfd().read().unwrap() >= 1);
    assert_eq!(driver.read32(INTERRUPT_STATUS) & 1, 1);
    driver.write32(INTERRUPT_ACK, 1);
    assert_eq!(driver.read32(INTERRUPT_STATUS), 0);

    let counters = driver.transport.lock().unwrap().counters();
    assert_eq!(counters["write_ops"], 1);
    assert_eq!(counters["write_bytes"], 1024);
    assert_eq!(counters["read_ops"], 1);
    assert_eq!(counters["read_bytes"], 1024);
}

#[test]
fn multi_descriptor_data_and_the_last_sector() {
    let image = disk();
    let mut driver = running(&image, false);
    let first = pattern(7, 512);
    let second = pattern(8, 1024);
    let header = driver.alloc(16);
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&T_OUT.to_le_bytes());
    raw[8..].copy_from_slice(&(SECTORS - 3).to_le_bytes());
    driver
        .mem
        .write_slice(&raw, vm_memory::GuestAddress(header))
        .unwrap();
    let a = driver.alloc(512);
    let b = driver.alloc(1024);
    let status = driver.alloc(1);
    use vm_memory::Bytes;
    driver
        .mem
        .write_slice(&first, vm_memory::GuestAddress(a))
        .unwrap();
    driver
        .mem
        .write_slice(&second, vm_memory::GuestAddress(b))
        .unwrap();
    driver.post_chain(&[
        (header, 16, false),
        (a, 512, false),
        (b, 1024, false),
        (status, 1, true),
    ]);
    driver.notify();
    driver.wait_used(1);
    let status_byte: u8 = driver
        .mem
        .read_obj(vm_memory::GuestAddress(status))
        .unwrap();
    assert_eq!(status_byte, S_OK);
    let mut on_disk = vec![0u8; 1536];
    image
        .as_file()
        .read_exact_at(&mut on_disk, (SECTORS - 3) * 512)
        .unwrap();
    assert_eq!(&on_disk[..512], &first[..]);
    assert_eq!(&on_disk[512..], &second[..]);
}

#[test]
fn get_id_returns_a_stable_twenty_byte_id() {
    let image = disk();
    let mut driver = running(&image, false);
    let first = driver.post_block_request(T_GET_ID, 0, 20, None);
    let second = driver.post_block_request(T_GET_ID, 0, 20, None);
    driver.notify();
    driver.wait_used(2);
    assert_eq!(driver.status_byte(&first), S_OK);
    assert_eq!(driver.used_elem(0).1, 21);
    let id = driver.read_guest(first.data_addr, 20);
    assert!(id[0] != 0, "non-empty ID");
    assert_eq!(id, driver.read_guest(second.data_addr, 20));
}

#[test]
fn bad_requests_get_an_error_status_and_the_device_keeps_serving() {
    let image = disk();
    let mut driver = running(&image, false);
    let mut expected = vec![
        // Past the end, straddling the end, and a sector number that overflows.
        (driver.post_block_request(T_IN, SECTORS, 512, None), S_IOERR),
        (
            driver.post_block_request(T_OUT, SECTORS - 1, 1024, Some(&[1; 1024])),
            S_IOERR,
        ),
        (
            driver.post_block_request(T_IN, u64::MAX, 512, None),
            S_IOERR,
        ),
        // Not a whole number of sectors.
        (driver.post_block_request(T_IN, 0, 100, None), S_IOERR),
        // Unknown request type.
        (driver.post_block_request(0x4242, 0, 0, None), S_UNSUPP),
    ];
    // Wrong data direction: IN data marked device-readable.
    let header = driver.alloc(16);
    let data = driver.alloc(512);
    let status = driver.alloc(1);
    let head = driver.post_chain(&[(header, 16, false), (data, 512, false), (status, 1, true)]);
    let wrong_direction = Posted {
        head,
        status_addr: status,
        data_addr: data,
    };
    expected.push((wrong_direction, S_IOERR));
    // Data buffer outside guest memory.
    let header = driver.alloc(16);
    let status = driver.alloc(1);
    let head = driver.post_chain(&[
        (header, 16, false),
        (0xfff0_0000, 512, true),
        (status, 1, true),
    ]);
    expected.push((
        Posted {
            head,
            status_addr: status,
            data_addr: 0,
        },
        S_IOERR,
    ));
    // Header too short.
    let header = driver.alloc(16);
    let status = driver.alloc(1);
    let head = driver.post_chain(&[(header, 8, false), (status, 1, true)]);
    expected.push((
        Posted {
            head,
            status_addr: status,
            data_addr: 0,
        },
        S_IOERR,
    ));

    let count = expected.len() as u16;
    driver.notify();
    driver.wait_used(count);
    for (i, (posted, status)) in expected.iter().enumerate() {
        assert_eq!(driver.status_byte(posted), *status, "request {i}");
        assert_eq!(
            driver.used_elem(i as u16),
            (u32::from(posted.head), 1),
            "request {i}"
        );
    }
    let mut untouched = vec![0u8; 512];
    image
        .as_file()
        .read_exact_at(&mut untouched, (SECTORS - 1) * 512)
        .unwrap();
    assert_eq!(
        untouched,
        vec![0; 512],
        "the straddling write wrote nothing"
    );

    let good = driver.post_block_request(T_OUT, 1, 512, Some(&[9; 512]));
    driver.notify();
    driver.wait_used(count + 1);
    assert_eq!(driver.status_byte(&good), S_OK);
}

#[test]
fn chains_without_a_status_are_dropped_not_fatal() {
    let image = disk();
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
    driver.notify();
    driver.wait_used(4);
    for (i, head) in [lonely, readonly_status, 250, 252].into_iter().enumerate() {
        assert_eq!(
            driver.used_elem(i as u16),
            (u32::from(head), 0),
            "chain {i}"
        );
    }
    let good = driver.post_block_request(T_IN, 0, 512, None);
    driver.notify();
    driver.wait_used(5);
    assert_eq!(driver.status_byte(&good), S_OK);
}

#[test]
fn avail_head_beyond_the_table_is_skipped() {
    let image = disk();
    let mut driver = running(&image, false);
    driver.post_head(QUEUE_SIZE + 5);
    let good = driver.post_block_request(T_IN, 0, 512, None);
    driver.notify();
    // The bogus head cannot go on the used ring; the good request still completes.
    driver.wait_used(1);
    assert_eq!(driver.used_elem(0).0, u32::from(good.head));
    assert_eq!(driver.status_byte(&good), S_OK);
}

#[test]
fn readonly_disk_refuses_writes_and_serves_reads() {
    let image = disk();
    image.as_file().write_all_at(&[0x5a; 512], 512).unwrap();
    let mut driver = running(&image, true);
    let write = driver.post_block_request(T_OUT, 1, 512, Some(&[0xee; 512]));
    let read = driver.post_block_request(T_IN, 1, 512, None);
    driver.notify();
    driver.wait_used(2);
    assert_eq!(driver.status_byte(&write), S_IOERR);
    assert_eq!(driver.status_byte(&read), S_OK);
    assert_eq!(driver.read_guest(read.data_addr, 512), vec![0x5a; 512]);
    let mut on_disk = vec![0u8; 512];
    image.as_file().read_exact_at(&mut on_disk, 512).unwrap();
    assert_eq!(on_disk, vec![0x5a; 512]);
    assert_eq!(driver.transport.lock().unwrap().counters()["write_ops"], 0);
}
