//! virtio-rng and virtio-console driven as a guest driver does (over virtio-mmio, the transport
//! core is the one virtio-pci uses): queue setup, requests, used ring, interrupt, and the
//! power-fail path (pause, save, a new device from the state, resume) continuing without a reset.

mod common;

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use devices::virtio::{
    status, Console, ConsoleOutput, MmioTransportState, Rng, CONSOLE_TRANSMIT_QUEUE,
    RNG_MAX_BYTES_PER_REQUEST,
};
use devices::Error;

/// What a guest's entropy source gives: a file of known bytes, so the test can check the device
/// copied the source's bytes in order, request after request.
fn entropy_file(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
    let bytes = pattern(7, len);
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&bytes).unwrap();
    (file, bytes)
}

fn rng_driver(source: &std::path::Path) -> TestDriver {
    let driver = TestDriver::new(guest_memory(), Box::new(Rng::open(source).unwrap()));
    assert_eq!(driver.read32(REG_DEVICE_ID), 4, "virtio-rng device id");
    assert_eq!(
        driver.initialise(VERSION_1) & status::DRIVER_OK,
        status::DRIVER_OK
    );
    driver
}

/// Posts one request of device-writable buffers of `lens` bytes; returns (head, addresses).
fn post_entropy_request(driver: &mut TestDriver, lens: &[u32]) -> (u16, Vec<u64>) {
    let buffers: Vec<Buffer> = lens
        .iter()
        .map(|&len| (driver.alloc(u64::from(len)), len, true))
        .collect();
    let head = driver.post_chain(&buffers);
    (head, buffers.iter().map(|b| b.0).collect())
}

fn save(driver: &TestDriver) -> MmioTransportState {
    let mut transport = driver.transport.lock().unwrap();
    transport.pause().unwrap();
    transport.flush_backend().unwrap();
    let state = transport.state().unwrap();
    serde_json::from_slice(&serde_json::to_vec(&state).unwrap()).unwrap()
}

fn power_cycle(
    driver: TestDriver,
    device: Box<dyn devices::virtio::VirtioDevice>,
    state: &MmioTransportState,
) -> TestDriver {
    let mem = driver.mem.clone();
    let (next_desc, avail_idx) = (driver.next_desc(), driver.avail_idx());
    drop(driver);
    let driver = TestDriver::restored(mem, device, state, next_desc, avail_idx);
    driver.transport.lock().unwrap().resume().unwrap();
    driver
}

#[test]
fn rng_fills_a_request_from_the_source_in_order_and_interrupts() {
    let (source, bytes) = entropy_file(4096);
    let mut driver = rng_driver(source.path());
    let (head, addrs) = post_entropy_request(&mut driver, &[16, 48]);
    driver.notify_and_expect_used(&[(head, 64)]);
    assert_eq!(driver.read_guest(addrs[0], 16), bytes[..16]);
    assert_eq!(driver.read_guest(addrs[1], 48), bytes[16..64]);
    assert!(driver.irq.eventfd().read().unwrap() >= 1, "no interrupt");
    assert_eq!(
        driver.read32(REG_INTERRUPT_STATUS) & 1,
        1,
        "used-buffer interrupt status"
    );
    // The next request continues in the source.
    let (head, addrs) = post_entropy_request(&mut driver, &[32]);
    driver.notify_and_expect_used(&[(head, 32)]);
    assert_eq!(driver.read_guest(addrs[0], 32), bytes[64..96]);
}

#[test]
fn rng_request_is_capped_and_a_short_source_gives_a_short_fill() {
    let (source, bytes) = entropy_file(RNG_MAX_BYTES_PER_REQUEST + 100);
    let mut driver = rng_driver(source.path());
    let (head, addrs) = post_entropy_request(&mut driver, &[1 << 20]);
    driver.notify_and_expect_used(&[(head, RNG_MAX_BYTES_PER_REQUEST as u32)]);
    assert_eq!(
        driver.read_guest(addrs[0], RNG_MAX_BYTES_PER_REQUEST),
        bytes[..RNG_MAX_BYTES_PER_REQUEST]
    );
    // 100 bytes left in the source.
    let (head, _) = post_entropy_request(&mut driver, &[4096]);
    driver.notify_and_expect_used(&[(head, 100)]);
}

#[test]
fn rng_source_that_cannot_be_read_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    for path in [missing.as_path(), dir.path()] {
        match Rng::open(path) {
            Err(Error::RngSource { path: named, .. }) => assert_eq!(named, path),
            Err(other) => panic!("{}: unexpected error {other}", path.display()),
            Ok(_) => panic!("{}: accepted", path.display()),
        }
    }
}

#[test]
fn rng_requests_keep_completing_across_a_power_cycle() {
    let (source, bytes) = entropy_file(4096);
    let mut driver = rng_driver(source.path());
    let (head, _) = post_entropy_request(&mut driver, &[64]);
    driver.notify_and_expect_used(&[(head, 64)]);
    let state = save(&driver);
    // Posted after the pause: served by the restored device, not lost, not served twice.
    let (posted, _) = post_entropy_request(&mut driver, &[8]);
    driver.notify();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(driver.used_idx(), 1, "served while paused");
    assert_eq!(state.transport.queues[0].next_avail, 1);
    // A new VMM opens the source again (here from its start).
    let mut driver = power_cycle(driver, Box::new(Rng::open(source.path()).unwrap()), &state);
    driver.notify();
    driver.expect_used_since(1, &[(posted, 8)]);
    let (head, addrs) = post_entropy_request(&mut driver, &[16]);
    driver.notify_and_expect_used(&[(head, 16)]);
    assert_eq!(driver.read_guest(addrs[0], 16), bytes[8..24]);
    assert_eq!(driver.used_idx(), 3);
}

/// Bytes written to the console output, shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
    fn output(&self) -> ConsoleOutput {
        Arc::new(Mutex::new(Box::new(self.clone())))
    }
}

fn console_driver(output: ConsoleOutput) -> TestDriver {
    let driver = TestDriver::new(guest_memory(), Box::new(Console::new(output)));
    assert_eq!(driver.read32(REG_DEVICE_ID), 3, "virtio-console device id");
    // The driver sets up the transmit queue only; the receive queue stays unused.
    let status = driver.initialise_with_queue(VERSION_1, u32::from(CONSOLE_TRANSMIT_QUEUE));
    assert_eq!(status & status::DRIVER_OK, status::DRIVER_OK);
    assert_eq!(status & status::DEVICE_NEEDS_RESET, 0);
    driver
}

/// Posts `text` as one transmit chain of up to two readable descriptors.
fn post_text(driver: &mut TestDriver, text: &str) -> u16 {
    let (first, second) = text.as_bytes().split_at(text.len() / 2);
    let buffers: Vec<Buffer> = [first, second]
        .iter()
        .filter(|part| !part.is_empty())
        .map(|part| {
            let addr = driver.alloc(part.len() as u64);
            driver.write_guest(addr, part);
            (addr, part.len() as u32, false)
        })
        .collect();
    driver.post_chain(&buffers)
}

#[test]
fn console_writes_a_transmitted_line_and_interrupts() {
    let captured = Captured::default();
    let mut driver = console_driver(captured.output());
    let head = post_text(&mut driver, "hello, console\n");
    let first = driver.used_idx();
    driver.notify_queue(u32::from(CONSOLE_TRANSMIT_QUEUE));
    driver.expect_used_since(first, &[(head, 0)]);
    assert_eq!(captured.text(), "hello, console\n");
    assert!(driver.irq.eventfd().read().unwrap() >= 1, "no interrupt");
    assert_eq!(driver.read32(REG_CONFIG_GENERATION), 0);
}

#[test]
fn console_lines_are_written_once_across_a_power_cycle() {
    let captured = Captured::default();
    let mut driver = console_driver(captured.output());
    for n in 0..3 {
        post_text(&mut driver, &format!("line {n}\n"));
    }
    driver.notify_queue(u32::from(CONSOLE_TRANSMIT_QUEUE));
    driver.wait_used(3);
    let state = save(&driver);
    // Posted while paused: the restored device writes them, once.
    for n in 3..5 {
        post_text(&mut driver, &format!("line {n}\n"));
    }
    driver.notify_queue(u32::from(CONSOLE_TRANSMIT_QUEUE));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(captured.text().lines().count(), 3, "written while paused");
    let mut driver = power_cycle(driver, Box::new(Console::new(captured.output())), &state);
    driver.notify_queue(u32::from(CONSOLE_TRANSMIT_QUEUE));
    driver.wait_used(5);
    post_text(&mut driver, "line 5\n");
    driver.notify_queue(u32::from(CONSOLE_TRANSMIT_QUEUE));
    driver.wait_used(6);
    let expected: String = (0..6).map(|n| format!("line {n}\n")).collect();
    assert_eq!(captured.text(), expected);
}
