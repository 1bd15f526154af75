//! virtio-net over a real tap, in a network namespace of the test thread's own
//! (`unshare(CLONE_NEWNET)`), so nothing of the host's network is touched: the guest side is
//! driven through the rings in guest memory, the host side through an AF_PACKET socket bound to
//! the tap.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::virtio::{InterruptCause, VirtioInterruptTarget};

const QUEUE_SIZE: u16 = 16;
/// (descriptor table, available ring, used ring) of the receive and transmit queues.
const RX_RINGS: (u64, u64, u64) = (0x1000, 0x2000, 0x3000);
const TX_RINGS: (u64, u64, u64) = (0x4000, 0x5000, 0x6000);
const RX_BUFFERS: u64 = 0x10000;
const TX_BUFFERS: u64 = 0x40000;
const RX_BUFFER_LEN: u32 = 2048;
/// A local experimental EtherType: nothing else in the namespace sends it.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

#[derive(Default)]
struct CountingTarget(AtomicUsize);

impl VirtioInterruptTarget for CountingTarget {
    fn trigger(&self, _cause: InterruptCause) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn retrigger(&self, _status: u32) -> io::Result<()> {
        Ok(())
    }
}

/// The guest driver's side of one queue.
struct DriverQueue {
    rings: (u64, u64, u64),
    avail_idx: u16,
    seen_used: u16,
}

impl DriverQueue {
    fn queue(&self, mem: &GuestMemoryMmap) -> Arc<Mutex<Queue>> {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(self.rings.0 as u32), Some(0));
        q.set_avail_ring_address(Some(self.rings.1 as u32), Some(0));
        q.set_used_ring_address(Some(self.rings.2 as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        Arc::new(Mutex::new(q))
    }

    /// Posts a one-descriptor chain (descriptor index = avail index modulo the size).
    fn post(&mut self, mem: &GuestMemoryMmap, addr: u64, len: u32, writable: bool) {
        let index = self.avail_idx % QUEUE_SIZE;
        let desc = self.rings.0 + 16 * u64::from(index);
        mem.write_obj(addr, GuestAddress(desc)).unwrap();
        mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
        mem.write_obj(if writable { 2u16 } else { 0 }, GuestAddress(desc + 12))
            .unwrap();
        mem.write_obj(index, GuestAddress(self.rings.1 + 4 + 2 * u64::from(index)))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.rings.1 + 2))
            .unwrap();
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.rings.2 + 2)).unwrap()
    }

    /// Waits for the next used entry: (descriptor id, length).
    fn next_used(&mut self, mem: &GuestMemoryMmap, within: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + within;
        while self.used_idx(mem) == self.seen_used {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let slot = self.rings.2 + 4 + 8 * u64::from(self.seen_used % QUEUE_SIZE);
        self.seen_used = self.seen_used.wrapping_add(1);
        Some((
            mem.read_obj(GuestAddress(slot)).unwrap(),
            mem.read_obj(GuestAddress(slot + 4)).unwrap(),
        ))
    }
}

/// An AF_PACKET socket on interface `name`: the host side of the tap.
fn packet_socket(name: &str) -> (OwnedFd, libc::sockaddr_ll) {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the result is checked and owned.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
    assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just opened.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert!(ifindex > 0, "no interface {name}");
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    // SAFETY: `addr` is a sockaddr_ll of the given size.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(bound, 0, "bind: {}", io::Error::last_os_error());
    (fd, addr)
}

/// Receives frames on `fd` until one with [`ETHERTYPE`] arrives (the kernel sends its own IPv6
/// neighbour discovery on a new interface), or `within` passes.
fn receive_ours(fd: &OwnedFd, within: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 4096];
    while Instant::now() < deadline {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n > 14 && buf[12..14] == ETHERTYPE {
            return Some(buf[..n as usize].to_vec());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn frame(src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ETHERTYPE);
    frame.extend_from_slice(payload);
    frame
}

/// A device on a new tap `name` (brought up) with one queue pair, MAC `mac`, and the checksum
/// and TSO offloads if `offload`.
fn net_on_tap(name: &str, mac: [u8; 6], offload: bool) -> Net {
    let tap = Arc::new(Tap::open(Some(name), 1).unwrap());
    tap.up().unwrap();
    Net::new(
        tap,
        NetParams {
            mac,
            queue_pairs: 1,
            queue_size: QUEUE_SIZE,
            mtu: None,
            offload_csum: offload,
            offload_tso: offload,
        },
    )
    .unwrap()
}

/// The guest driver's side of an activated device: its two queues and their notifiers
/// (`notify[0]` receive, `notify[1]` transmit).
struct Driver {
    rx: DriverQueue,
    tx: DriverQueue,
    notify: Vec<EventFd>,
}

/// Activates `net` on the rings at [`RX_RINGS`] and [`TX_RINGS`] with the `acked` features,
/// its interrupts counted by `target`.
fn activate(
    net: &mut Net,
    mem: &GuestMemoryMmap,
    acked: u64,
    target: Arc<CountingTarget>,
) -> Driver {
    let driver_queue = |rings| DriverQueue {
        rings,
        avail_idx: 0,
        seen_used: 0,
    };
    let (rx, tx) = (driver_queue(RX_RINGS), driver_queue(TX_RINGS));
    let notify: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    net.activate(ActivationContext {
        mem: mem.clone(),
        interrupt: Arc::new(VirtioInterrupt::new(target, 0)),
        queues: vec![rx.queue(mem), tx.queue(mem)],
        queue_evts: notify.iter().map(|e| e.try_clone().unwrap()).collect(),
        acked_features: acked,
        start_paused: false,
        io_thread_start: None,
        guest_writes: Default::default(),
    })
    .unwrap();
    Driver { rx, tx, notify }
}

/// Transmits `frame` behind a zeroed virtio-net header at `at`: posts it and notifies.
fn transmit(mem: &GuestMemoryMmap, driver: &mut Driver, at: u64, frame: &[u8]) {
    mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(at))
        .unwrap();
    mem.write_slice(frame, GuestAddress(at + VNET_HDR_LEN as u64))
        .unwrap();
    driver
        .tx
        .post(mem, at, (VNET_HDR_LEN + frame.len()) as u32, false);
    driver.notify[1].write(1).unwrap();
}

/// Everything runs on one thread that moved into a network namespace of its own.
fn in_own_netns(test: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) failed ({}): the virtio-net tests need root (CAP_NET_ADMIN) \
             and /dev/net/tun",
            io::Error::last_os_error()
        );
        test();
    })
    .join()
    .expect("the net test thread failed");
}

#[test]
fn packets_cross_a_real_tap_both_ways_and_a_pause_holds_receive() {
    in_own_netns(|| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mac = [0x02, 0, 0, 0, 0, 0x10];
        let mut net = net_on_tap("nvtest0", mac, true);
        let mut config = [0u8; 8];
        net.read_config(0, &mut config);
        assert_eq!(config[..6], mac);
        assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
        let features = net.available_features();
        for bit in [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
        ] {
            assert!(features & (1 << bit) != 0, "feature {bit} not offered");
        }
        assert_eq!(features & (1 << VIRTIO_NET_F_MQ), 0, "MQ with one pair");

        let target = Arc::new(CountingTarget::default());
        let acked = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_CSUM);
        let mut driver = activate(&mut net, &mem, acked, target.clone());
        let (packet, mut to) = packet_socket("nvtest0");

        // Guest -> host: header and frame leave in one piece.
        let sent = frame(mac, b"guest to host");
        transmit(&mem, &mut driver, TX_BUFFERS, &sent);
        assert_eq!(
            driver.tx.next_used(&mem, Duration::from_secs(5)),
            Some((0, 0))
        );
        assert_eq!(
            receive_ours(&packet, Duration::from_secs(5)).as_deref(),
            Some(&sent[..])
        );
        assert!(target.0.load(Ordering::SeqCst) >= 1, "no interrupt");

        // Host -> guest, held while paused and delivered after resume.
        let Driver { mut rx, notify, .. } = driver;
        for i in 0..QUEUE_SIZE {
            rx.post(&mem, RX_BUFFERS + u64::from(i) * 4096, RX_BUFFER_LEN, true);
        }
        net.pause().unwrap();
        let received = frame([0x02, 0, 0, 0, 0, 0x20], b"host to guest");
        to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: `received` is readable and `to` a sockaddr_ll.
        let n = unsafe {
            libc::sendto(
                packet.as_raw_fd(),
                received.as_ptr().cast(),
                received.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(n, received.len() as isize, "{}", io::Error::last_os_error());
        notify[0].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(rx.used_idx(&mem), 0, "a paused device received");
        net.resume().unwrap();
        let mut found = false;
        while let Some((id, len)) = rx.next_used(&mem, Duration::from_secs(5)) {
            let buffer = RX_BUFFERS + u64::from(id) * 4096;
            let mut got = vec![0u8; len as usize];
            mem.read_slice(&mut got, GuestAddress(buffer)).unwrap();
            let num_buffers = u16::from_le_bytes([got[10], got[11]]);
            assert_eq!(num_buffers, 1, "one buffer per packet here");
            if got[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == ETHERTYPE {
                assert_eq!(&got[VNET_HDR_LEN..], &received[..]);
                found = true;
                break;
            }
        }
        assert!(found, "the host's frame never reached the guest");
        net.reset();
    });
}

#[test]
fn a_missing_tap_is_created_and_a_tun_descriptor_is_refused() {
    in_own_netns(|| {
        let tap = Tap::open(None, 1).unwrap();
        assert!(tap.name().starts_with("vmtap"), "{}", tap.name());
        tap.set_ipv4(
            "192.168.249.1".parse().unwrap(),
            "255.255.255.0".parse().unwrap(),
        )
        .unwrap();
        tap.up().unwrap();
        // Two queue pairs attach as a multi-queue tap.
        let mq = Tap::open(Some("nvmq0"), 2).unwrap();
        assert_eq!(mq.queue_pairs(), 2);
        // A tun (layer 3) descriptor is not a tap.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut req = tap::tests_support::ifreq("nvtun0", (libc::IFF_TUN | libc::IFF_NO_PI) as u16);
        // SAFETY: TUNSETIFF reads and writes a struct ifreq.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        assert_eq!(rc, 0);
        let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        let error = Tap::from_fd(fd).unwrap_err();
        assert!(matches!(error, TapError::WrongTapFlags { .. }), "{error}");
    });
}

/// Output commit: with the hold armed a transmitted frame is completed to the guest at once but
/// reaches the tap only when its sealed epoch is released; a full hold stops consuming the
/// ring (the frame stays posted) and asks for a checkpoint; a release wakes the worker;
/// disarming sends what is held and the data path goes direct again.
#[test]
fn an_armed_output_hold_sends_frames_only_after_their_epoch_is_released() {
    in_own_netns(|| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mac = [0x02, 0, 0, 0, 0, 0x11];
        // Room for one frame: the second finds the hold full.
        let hold = OutputHold::with_limit(1).unwrap();
        let mut net = net_on_tap("nvhold0", mac, false).with_output_hold(hold.clone());
        let acked = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC);
        let mut driver = activate(&mut net, &mem, acked, Arc::default());
        let (packet, _) = packet_socket("nvhold0");
        let full = EventFd::new(EFD_NONBLOCK).unwrap();
        hold.arm(full.try_clone().unwrap());
        let mut slot = 0u64;
        let mut send = |driver: &mut Driver, payload: &[u8]| {
            let sent = frame(mac, payload);
            transmit(&mem, driver, TX_BUFFERS + slot * 4096, &sent);
            slot += 1;
            sent
        };
        let quiet = Duration::from_millis(300);

        let first = send(&mut driver, b"epoch 1");
        assert!(
            driver.tx.next_used(&mem, Duration::from_secs(5)).is_some(),
            "not completed at once"
        );
        assert_eq!(
            receive_ours(&packet, quiet),
            None,
            "sent before its epoch committed"
        );
        assert_eq!(hold.held_frames(), 1);

        // Full: the next frame stays in the ring, and a checkpoint is asked for.
        let second = send(&mut driver, b"epoch 2");
        assert_eq!(
            driver.tx.next_used(&mem, quiet),
            None,
            "a full hold consumed the ring"
        );
        assert!(full.read().is_ok(), "a full hold asked for no checkpoint");

        // The epoch commits: the first frame goes out; the wake-up takes the second, held.
        let sealed = hold.seal();
        assert_eq!(hold.release(sealed).frames, 1);
        assert_eq!(
            receive_ours(&packet, Duration::from_secs(5)).as_deref(),
            Some(&first[..])
        );
        assert!(
            driver.tx.next_used(&mem, Duration::from_secs(5)).is_some(),
            "the release did not wake the worker"
        );
        assert_eq!(
            receive_ours(&packet, quiet),
            None,
            "the next epoch's frame went out"
        );
        assert_eq!(hold.held_frames(), 1);

        // Checkpoints off: what is held goes, and new frames go straight to the tap.
        assert_eq!(hold.disarm_and_release().frames, 1);
        assert_eq!(
            receive_ours(&packet, Duration::from_secs(5)).as_deref(),
            Some(&second[..])
        );
        let third = send(&mut driver, b"direct");
        assert!(driver.tx.next_used(&mem, Duration::from_secs(5)).is_some());
        assert_eq!(
            receive_ours(&packet, Duration::from_secs(5)).as_deref(),
            Some(&third[..])
        );
        let totals = hold.totals();
        assert_eq!((totals.held, totals.released, totals.tap_errors), (2, 2, 0));
        assert!(totals.full >= 1);
        net.reset();
    });
}
