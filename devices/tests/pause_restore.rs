//! The power-fail path: pause with requests posted, save, rebuild a new device from the state over
//! the same guest memory and disk, resume, and every request completes exactly once.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use devices::virtio::{MmioTransportState, MMIO_STATE_VERSION};
use devices::Error;

const SECTORS: u64 = 4096;
/// 8 KiB per write so the I/O thread is still busy when the pause lands.
const WRITE_LEN: u32 = 8192;
const SECTORS_PER_WRITE: u64 = WRITE_LEN as u64 / 512;

fn running(image: &tempfile::NamedTempFile) -> TestDriver {
    let driver = TestDriver::new(guest_memory(), open_block(image.path(), false));
    driver.initialise(VERSION_1 | BLK_F_FLUSH);
    driver
}

fn post_write(driver: &mut TestDriver, n: u64) -> Posted {
    let payload = pattern(n, WRITE_LEN as usize);
    driver.post_block_request(
        VIRTIO_BLK_T_OUT,
        n * SECTORS_PER_WRITE,
        WRITE_LEN,
        Some(&payload),
    )
}

/// Power failure after `state` was saved: the VMM and its device are gone, guest memory (NV) and
/// the disk file survive. Recovery builds a new device from `state` over them; the guest driver
/// continues with the bookkeeping it keeps in its RAM.
fn power_cycle(
    driver: TestDriver,
    image: &tempfile::NamedTempFile,
    state: &MmioTransportState,
) -> TestDriver {
    let mem = driver.mem.clone();
    let (next_desc, avail_idx) = (driver.next_desc(), driver.avail_idx());
    drop(driver);
    TestDriver::restored(
        mem,
        open_block(image.path(), false),
        state,
        next_desc,
        avail_idx,
    )
}

/// What the power-fail save does with the device: pause, flush, state, through serde.
fn save(driver: &TestDriver) -> MmioTransportState {
    let mut transport = driver.transport.lock().unwrap();
    transport.pause().unwrap();
    transport.flush_backend().unwrap();
    let state = transport.state().unwrap();
    let json = serde_json::to_vec(&state).unwrap();
    serde_json::from_slice(&json).unwrap()
}

#[test]
fn requests_posted_around_a_pause_complete_exactly_once_after_restore() {
    let image = blank_image(SECTORS);
    let mut driver = running(&image);
    let mut posted = Vec::new();
    for n in 0..32 {
        posted.push(post_write(&mut driver, n));
    }
    driver.notify();
    // Pause while the I/O thread is working through the batch.
    let state = save(&driver);
    let queue = state.transport.queues[0];
    assert_eq!(
        queue.next_avail, queue.next_used,
        "no request popped but uncompleted at the save"
    );
    assert_eq!(
        driver.used_idx(),
        queue.next_used,
        "every popped request is on the used ring in guest memory"
    );
    let done_before = queue.next_used;
    eprintln!("pause landed after {done_before} of 32 requests");
    // The guest keeps posting until its vCPUs stop; these notifies die with the old VMM.
    for n in 32..48 {
        posted.push(post_write(&mut driver, n));
    }
    driver.notify();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        driver.used_idx(),
        done_before,
        "nothing served while paused"
    );

    let driver = power_cycle(driver, &image, &state);
    assert_eq!(
        driver.used_idx(),
        done_before,
        "dropping the paused device completed nothing"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        driver.used_idx(),
        done_before,
        "restored device waits for resume"
    );
    driver.transport.lock().unwrap().resume().unwrap();
    // No notify after the restore: the device must find the posted requests by itself.
    driver.wait_used(48);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(driver.used_idx(), 48, "no request completed twice");

    let heads: BTreeSet<u32> = (0..48).map(|i| driver.used_elem(i).0).collect();
    let expected: BTreeSet<u32> = posted.iter().map(|p| u32::from(p.head)).collect();
    assert_eq!(heads, expected, "each posted request on the used ring once");
    for (n, p) in posted.iter().enumerate() {
        assert_eq!(driver.status_byte(p), VIRTIO_BLK_S_OK, "request {n}");
        assert_eq!(
            image_bytes(&image, n as u64 * u64::from(WRITE_LEN), WRITE_LEN as usize),
            pattern(n as u64, WRITE_LEN as usize),
            "data of request {n}"
        );
    }
    assert!(
        driver.irq.eventfd().read().unwrap() >= 1,
        "guest interrupted"
    );
    assert_eq!(
        driver.transport.lock().unwrap().counters()["write_ops"],
        u64::from(48 - done_before),
        "the new device served exactly the rest"
    );
}

#[test]
fn pause_and_resume_in_place_serve_what_was_posted_meanwhile() {
    let image = blank_image(SECTORS);
    let mut driver = running(&image);
    driver.transport.lock().unwrap().pause().unwrap();
    let p = post_write(&mut driver, 1);
    driver.notify();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(driver.used_idx(), 0);
    driver.transport.lock().unwrap().resume().unwrap();
    driver.wait_used(1);
    assert_eq!(driver.status_byte(&p), VIRTIO_BLK_S_OK);
}

#[test]
fn state_is_refused_while_the_device_runs() {
    let image = blank_image(SECTORS);
    let driver = running(&image);
    assert!(matches!(
        driver.transport.lock().unwrap().state(),
        Err(Error::NotPaused)
    ));
}

#[test]
fn a_pending_interrupt_is_raised_again_after_restore() {
    let image = blank_image(SECTORS);
    let mut driver = running(&image);
    let p = post_write(&mut driver, 0);
    driver.notify();
    driver.wait_used(1);
    assert_eq!(driver.status_byte(&p), VIRTIO_BLK_S_OK);
    // The guest has not handled the interrupt yet when the power fails.
    let state = save(&driver);
    assert_eq!(state.transport.interrupt_status & 1, 1);
    let driver = power_cycle(driver, &image, &state);
    assert!(driver.irq.eventfd().read().is_err(), "not before resume");
    driver.transport.lock().unwrap().resume().unwrap();
    assert_eq!(driver.irq.eventfd().read().unwrap(), 1);
    assert_eq!(driver.read32(REG_INTERRUPT_STATUS), 1);
    driver.write32(REG_INTERRUPT_ACK, 1);
    assert_eq!(driver.read32(REG_INTERRUPT_STATUS), 0);
}

#[test]
fn a_device_saved_before_driver_ok_is_restored_mid_initialisation() {
    let image = blank_image(SECTORS);
    let driver = TestDriver::new(guest_memory(), open_block(image.path(), false));
    driver.write32(REG_STATUS, 1 | 2);
    driver.write_driver_features(VERSION_1);
    driver.write32(REG_STATUS, 1 | 2 | 8);
    driver.setup_queue();
    let state = save(&driver);
    assert!(!state.transport.activated);
    let mut driver = power_cycle(driver, &image, &state);
    driver.transport.lock().unwrap().resume().unwrap();
    assert_eq!(driver.read32(REG_QUEUE_READY), 1);
    driver.write32(REG_STATUS, 1 | 2 | 8 | 4);
    assert_eq!(driver.read32(REG_STATUS), 1 | 2 | 8 | 4);
    driver.assert_serves_a_read();
}

#[test]
fn foreign_or_inconsistent_states_are_refused() {
    let image = blank_image(SECTORS);
    let driver = running(&image);
    let good = save(&driver);
    let mem = driver.mem.clone();
    drop(driver);
    let line = || -> std::sync::Arc<dyn devices::InterruptLine> {
        std::sync::Arc::new(devices::EventFdInterrupt::new().unwrap())
    };
    let restore = |state: &MmioTransportState| {
        devices::virtio::MmioTransport::restore(
            open_block(image.path(), false),
            mem.clone(),
            line(),
            state,
        )
        .and_then(|mut transport| transport.activate_pending())
        .err()
    };

    let mut state = good.clone();
    state.version = MMIO_STATE_VERSION + 1;
    assert!(matches!(restore(&state), Some(Error::StateVersion { .. })));
    let mut state = good.clone();
    state.transport.device_type = 1;
    assert!(matches!(
        restore(&state),
        Some(Error::DeviceTypeMismatch { .. })
    ));
    let mut state = good.clone();
    state.transport.queues.push(state.transport.queues[0]);
    assert!(matches!(
        restore(&state),
        Some(Error::QueueCountMismatch { .. })
    ));
    let mut state = good.clone();
    state.transport.queues[0].size = 512; // beyond the device's maximum
    assert!(matches!(
        restore(&state),
        Some(Error::QueueState { index: 0, .. })
    ));
    let mut state = good.clone();
    state.transport.queues[0].used_ring = 0x3001; // misaligned ring
    assert!(matches!(
        restore(&state),
        Some(Error::QueueState { index: 0, .. })
    ));
    let mut state = good.clone();
    state.transport.queues[0].avail_ring = 0x7fff_0000; // outside guest memory
    assert!(matches!(restore(&state), Some(Error::QueueNotUsable(0))));
    assert!(restore(&good).is_none(), "the unmodified state restores");
}
