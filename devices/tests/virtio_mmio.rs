//! The virtio-mmio transport driven through its registers the way a virtio 1.x driver does.

mod common;

use common::*;
use devices::virtio::status;
use std::io::Write;

fn disk(sectors: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(sectors * 512).unwrap();
    file
}

#[test]
fn identification_registers_and_config_space() {
    let image = disk(2048);
    let driver = TestDriver::new(guest_memory(), open_block(image.path(), false));
    assert_eq!(driver.read32(REG_MAGIC), 0x7472_6976);
    assert_eq!(driver.read32(REG_VERSION), 2);
    assert_eq!(driver.read32(REG_DEVICE_ID), 2, "virtio-blk");
    assert_eq!(driver.config_u64(0), 2048, "capacity in 512-byte sectors");
    assert_eq!(driver.read32(REG_CONFIG_GENERATION), 0);
    let features = driver.device_features();
    assert_eq!(features, VERSION_1 | BLK_F_FLUSH);
}

#[test]
fn readonly_disk_offers_ro() {
    let image = disk(8);
    let driver = TestDriver::new(guest_memory(), open_block(image.path(), true));
    assert_eq!(driver.device_features(), VERSION_1 | BLK_F_FLUSH | BLK_F_RO);
}

#[test]
fn init_sequence_reaches_driver_ok() {
    let image = disk(64);
    let driver = TestDriver::new(guest_memory(), open_block(image.path(), false));
    let final_status = driver.initialise(VERSION_1 | BLK_F_FLUSH);
    assert_eq!(
        final_status,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
    );
    // Queue registers are frozen once the device runs.
    driver.write32(REG_QUEUE_READY, 0);
    assert_eq!(driver.read32(REG_QUEUE_READY), 1);
}

#[test]
fn features_without_version_1_or_not_offered_are_refused() {
    let image = disk(64);
    let driver = TestDriver::new(guest_memory(), open_block(image.path(), false));
    for features in [BLK_F_FLUSH, VERSION_1 | (1 << 28), VERSION_1 | BLK_F_RO] {
        driver.write32(REG_STATUS, 0);
        driver.write32(REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        driver.write_driver_features(features);
        driver.write32(
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            driver.read32(REG_STATUS) & status::FEATURES_OK,
            0,
            "features {features:#x} must not be accepted"
        );
    }
}

#[test]
fn driver_ok_with_an_unusable_queue_asks_for_reset() {
    let image = disk(64);
    let driver = TestDriver::new(guest_memory(), open_block(image.path(), false));
    driver.write32(REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
    driver.write_driver_features(VERSION_1);
    let with_features = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    driver.write32(REG_STATUS, with_features);
    // No queue set up: DRIVER_OK cannot start the device.
    driver.write32(REG_STATUS, with_features | status::DRIVER_OK);
    assert_ne!(driver.read32(REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(
        driver.read32(REG_INTERRUPT_STATUS) & 2,
        2,
        "config-change interrupt"
    );
    assert_eq!(driver.irq.eventfd().read().unwrap(), 1);
    // A reset and a correct sequence recover.
    assert_eq!(
        driver.initialise(VERSION_1),
        with_features | status::DRIVER_OK
    );
}

#[test]
fn reset_stops_the_device_and_it_can_be_initialised_again() {
    let image = disk(64);
    let mut driver = TestDriver::new(guest_memory(), open_block(image.path(), false));
    driver.initialise(VERSION_1 | BLK_F_FLUSH);
    let posted = driver.post_block_request(VIRTIO_BLK_T_OUT, 0, 512, Some(&[0xab; 512]));
    driver.notify();
    driver.wait_used(1);
    assert_eq!(driver.status_byte(&posted), VIRTIO_BLK_S_OK);

    driver.write32(REG_STATUS, 0);
    assert_eq!(driver.read32(REG_STATUS), 0);
    assert_eq!(driver.read32(REG_INTERRUPT_STATUS), 0);
    driver.write32(REG_QUEUE_SEL, 0);
    assert_eq!(
        driver.read32(REG_QUEUE_READY),
        0,
        "queue forgotten by the reset"
    );

    // Same transport, fresh rings, as a driver sets up after a reset.
    driver.forget_rings();
    driver.initialise(VERSION_1);
    let posted = driver.post_block_request(VIRTIO_BLK_T_IN, 0, 512, None);
    driver.notify();
    driver.wait_used(1);
    assert_eq!(driver.read_guest(posted.data_addr, 512), vec![0xab; 512]);
}

#[test]
fn odd_register_accesses_do_not_panic() {
    let mut image = disk(64);
    image.write_all(b"x").unwrap();
    let driver = TestDriver::new(guest_memory(), open_block(image.path(), false));
    let mut two = [0u8; 2];
    driver.bus.read(0xd000_0000, &mut two).unwrap();
    assert_eq!(two, [0, 0], "16-bit register reads are not defined");
    driver.bus.write(0xd000_0070, &[1]).unwrap();
    assert_eq!(driver.read32(REG_STATUS), 0, "8-bit status write ignored");
    driver.bus.write(0xd000_0072, &1u32.to_le_bytes()).unwrap();
    driver.write32(0x0f8, 7); // unknown register
    driver.write32(REG_QUEUE_SEL, 9); // a queue that does not exist
    assert_eq!(driver.read32(REG_QUEUE_NUM_MAX), 0);
    driver.write32(REG_QUEUE_NUM, 16);
    driver.write32(REG_QUEUE_NOTIFY, 9);
    let mut config = [0u8; 8];
    driver.bus.read(0xd000_0ff8, &mut config).unwrap();
    assert_eq!(config, [0; 8], "beyond the config space reads as zero");
    driver.bus.write(0xd000_0100, &[1, 2, 3, 4]).unwrap();
    assert_eq!(driver.config_u64(0), 64, "capacity is read-only");
}
