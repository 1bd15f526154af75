//! The host side of the `netkv` guest's UDP key-value protocol (`guests/README.md`, "netkv"):
//! a load client that sends PUTs and GETs at a steady rate, retries what is not answered,
//! records every acknowledged PUT and checks every answer against what it knows, plus the final
//! read-back of every acknowledged key. The tests' power-fail proofs and nv-bench's outage
//! measurement drive it.
//!
//! What is checked (each failure is a [`Violation`], kept, never a panic):
//! - a PUT of version `v` is acknowledged only with a stored version `>= v` (versions only grow
//!   in the guest: a late duplicate never rolls a key back);
//! - a GET never returns a version older than the newest PUT acknowledged before the GET was
//!   sent, nor one the client never sent, and the value is the one sent with that version;
//! - every answer carries the same boot id: the guest never booted again.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `"NVKV"` as a little-endian u32, the first bytes of every request and reply.
pub const MAGIC: u32 = 0x564b_564e;
pub const OP_GET: u8 = 1;
pub const OP_PUT: u8 = 2;
/// Asks the guest for `key` datagrams of `version` payload bytes (8..=1472), then a reply.
pub const OP_STREAM: u8 = 3;
const OP_REPLY: u8 = 0x80;
pub const STATUS_OK: u8 = 0;
pub const STATUS_NOT_FOUND: u8 = 1;
pub const STATUS_FULL: u8 = 2;
pub const REQUEST_LEN: usize = 40;
pub const REPLY_LEN: usize = 56;

/// The value the client stores with `version` of `key`, so any answer can be checked alone.
pub fn value_of(key: u64, version: u64) -> u64 {
    (key.rotate_left(32) ^ version).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// One request as it goes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: u8,
    pub id: u64,
    pub key: u64,
    pub version: u64,
    pub value: u64,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut bytes = [0u8; REQUEST_LEN];
        bytes[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        bytes[4] = self.op;
        bytes[8..16].copy_from_slice(&self.id.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.key.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.version.to_le_bytes());
        bytes[32..40].copy_from_slice(&self.value.to_le_bytes());
        bytes
    }

    /// Parses a request (for the tests' stand-in server); `None` if it is not one.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < REQUEST_LEN || u32_at(bytes, 0) != MAGIC {
            return None;
        }
        Some(Self {
            op: bytes[4],
            id: u64_at(bytes, 8),
            key: u64_at(bytes, 16),
            version: u64_at(bytes, 24),
            value: u64_at(bytes, 32),
        })
    }
}

/// One reply as it comes off the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub op: u8,
    pub status: u8,
    pub id: u64,
    pub key: u64,
    /// The key's stored version after the operation (0: not stored).
    pub version: u64,
    pub value: u64,
    /// Chosen by the guest at boot; it stays the same while the guest runs.
    pub boot_id: u64,
    /// Requests the guest answered before this one since it booted.
    pub served: u64,
}

impl Reply {
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < REPLY_LEN || u32_at(bytes, 0) != MAGIC || bytes[4] & OP_REPLY == 0 {
            return None;
        }
        Some(Self {
            op: bytes[4] & !OP_REPLY,
            status: bytes[5],
            id: u64_at(bytes, 8),
            key: u64_at(bytes, 16),
            version: u64_at(bytes, 24),
            value: u64_at(bytes, 32),
            boot_id: u64_at(bytes, 40),
            served: u64_at(bytes, 48),
        })
    }

    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut bytes = [0u8; REPLY_LEN];
        bytes[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        bytes[4] = self.op | OP_REPLY;
        bytes[5] = self.status;
        for (at, word) in [
            (8, self.id),
            (16, self.key),
            (24, self.version),
            (32, self.value),
            (40, self.boot_id),
            (48, self.served),
        ] {
            bytes[at..at + 8].copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default())
}

/// The shape of the load.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Keys are 1..=keys.
    pub keys: u64,
    /// New requests per second (retries come on top).
    pub rate: u32,
    /// Percentage of new requests that are PUTs.
    pub put_pct: u32,
    /// An unanswered request is sent again after this long.
    pub retry_after: Duration,
    /// At most this many requests wait for an answer; no new request is sent while they do.
    pub window: usize,
    /// Seed of the key and operation choice.
    pub seed: u64,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            keys: 512,
            rate: 2000,
            put_pct: 50,
            retry_after: Duration::from_millis(50),
            window: 64,
            seed: 0x6e65_746b_7600_0001,
        }
    }
}

/// Something an answer showed that must not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

/// What the client knows and has seen.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Per key, the newest version whose PUT was acknowledged.
    pub acked: HashMap<u64, u64>,
    /// Per key, the newest version sent in a PUT.
    pub sent: HashMap<u64, u64>,
    /// Every acknowledged PUT as (key, version), in the order of the acknowledgements: the log
    /// a cold restart replays.
    pub acked_log: Vec<(u64, u64)>,
    pub puts_acked: u64,
    pub gets_checked: u64,
    pub retries: u64,
    pub send_errors: u64,
    pub violations: Vec<Violation>,
    /// The first boot id seen, and every other one (each is also a violation).
    pub boot_ids: Vec<u64>,
    /// When each answer to a request of the load (not a duplicate, not read-back or replay)
    /// arrived.
    pub answer_times: Vec<Instant>,
}

struct Pending {
    request: Request,
    /// For a GET: the key's acknowledged version when it was first sent.
    acked_when_sent: u64,
    last_sent: Instant,
}

/// A client socket (made in the namespace that can reach the guest) and its ledger.
pub struct KvClient {
    socket: UdpSocket,
    guest: SocketAddrV4,
    config: LoadConfig,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    rng: u64,
    /// In `run_until`: answers are stamped into `answer_times`.
    loading: bool,
    pub ledger: Ledger,
}

/// Why the client could not go on (not a protocol violation: those go to the ledger).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("netkv client socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netkv: {left} of {total} requests unanswered after {waited:?}")]
    Unanswered {
        left: usize,
        total: usize,
        waited: Duration,
    },
}

impl KvClient {
    /// Binds a UDP socket on any local address of the calling thread's network namespace.
    pub fn new(guest: SocketAddrV4, config: LoadConfig) -> Result<Self, ClientError> {
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(ClientError::Socket)?;
        socket
            .set_read_timeout(Some(Duration::from_millis(1)))
            .map_err(ClientError::Socket)?;
        let rng = config.seed | 1;
        Ok(Self {
            socket,
            guest,
            config,
            pending: HashMap::new(),
            next_id: 1,
            rng,
            loading: false,
            ledger: Ledger::default(),
        })
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: reproducible from the seed, no dependency.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn send(&mut self, request: &Request) {
        if self.socket.send_to(&request.encode(), self.guest).is_err() {
            // The tap may be gone for a moment (power failure): the retry covers it.
            self.ledger.send_errors += 1;
        }
    }

    /// Sends a new request: a PUT of the key's next version or a GET.
    fn send_new(&mut self, now: Instant) {
        let key = self.random() % self.config.keys + 1;
        let put = self.random() % 100 < u64::from(self.config.put_pct);
        let id = self.next_id;
        self.next_id += 1;
        let request = if put {
            let version = self.ledger.sent.get(&key).copied().unwrap_or(0) + 1;
            self.ledger.sent.insert(key, version);
            Request {
                op: OP_PUT,
                id,
                key,
                version,
                value: value_of(key, version),
            }
        } else {
            Request {
                op: OP_GET,
                id,
                key,
                version: 0,
                value: 0,
            }
        };
        self.submit(request, now);
    }

    fn submit(&mut self, request: Request, now: Instant) {
        let acked_when_sent = self.ledger.acked.get(&request.key).copied().unwrap_or(0);
        self.send(&request);
        self.pending.insert(
            request.id,
            Pending {
                request,
                acked_when_sent,
                last_sent: now,
            },
        );
    }

    fn violation(&mut self, text: String) {
        self.ledger.violations.push(Violation(text));
    }

    /// Checks one reply against the ledger and settles its request.
    fn settle(&mut self, reply: Reply, now: Instant) {
        let Some(pending) = self.pending.remove(&reply.id) else {
            return; // an answer to a retry of something already answered
        };
        if self.loading {
            self.ledger.answer_times.push(now);
        }
        match self.ledger.boot_ids.first() {
            None => self.ledger.boot_ids.push(reply.boot_id),
            Some(&first) if first != reply.boot_id => {
                self.ledger.boot_ids.push(reply.boot_id);
                self.violation(format!(
                    "boot id {:#x} after {first:#x}: the guest booted again",
                    reply.boot_id
                ));
            }
            Some(_) => {}
        }
        let request = pending.request;
        if reply.op != request.op || reply.key != request.key {
            self.violation(format!(
                "reply {reply:?} does not match request {request:?}"
            ));
            return;
        }
        let newest_sent = self.ledger.sent.get(&request.key).copied().unwrap_or(0);
        if reply.version > newest_sent {
            self.violation(format!(
                "key {} has version {} but the client sent at most {newest_sent}",
                reply.key, reply.version
            ));
        } else if reply.version > 0 && reply.value != value_of(reply.key, reply.version) {
            self.violation(format!(
                "key {} version {} holds {:#x}, the client sent {:#x}",
                reply.key,
                reply.version,
                reply.value,
                value_of(reply.key, reply.version)
            ));
        }
        match (request.op, reply.status) {
            (OP_PUT, STATUS_OK) => {
                if reply.version < request.version {
                    self.violation(format!(
                        "PUT key {} version {} acknowledged with stored version {}",
                        request.key, request.version, reply.version
                    ));
                    return;
                }
                let acked = self.ledger.acked.entry(request.key).or_insert(0);
                *acked = (*acked).max(request.version);
                self.ledger.acked_log.push((request.key, request.version));
                self.ledger.puts_acked += 1;
            }
            (OP_GET, STATUS_OK | STATUS_NOT_FOUND) => {
                let found = if reply.status == STATUS_OK {
                    reply.version
                } else {
                    0
                };
                if found < pending.acked_when_sent {
                    self.violation(format!(
                        "stale GET: key {} returned version {found}, version {} was \
                         acknowledged before the GET was sent",
                        request.key, pending.acked_when_sent
                    ));
                }
                self.ledger.gets_checked += 1;
            }
            (_, STATUS_FULL) => self.violation(format!("table full at key {}", request.key)),
            (_, status) => self.violation(format!("status {status} for {request:?}")),
        }
    }

    /// Reads and settles what arrives until nothing came for the socket's 1 ms timeout.
    fn receive(&mut self) -> Result<(), ClientError> {
        let mut buffer = [0u8; 512];
        loop {
            match self.socket.recv_from(&mut buffer) {
                Ok((len, _)) => {
                    let now = Instant::now();
                    match Reply::decode(&buffer[..len]) {
                        Some(reply) => self.settle(reply, now),
                        None => self.violation(format!("malformed reply of {len} bytes")),
                    }
                }
                Err(e)
                    if nothing_arrived(e.kind())
                        || e.kind() == io::ErrorKind::ConnectionRefused =>
                {
                    break
                }
                Err(e) => return Err(ClientError::Socket(e)),
            }
        }
        Ok(())
    }

    fn retry_due(&mut self, now: Instant) {
        let retry_after = self.config.retry_after;
        let due: Vec<Request> = self
            .pending
            .values_mut()
            .filter(|p| now.duration_since(p.last_sent) >= retry_after)
            .map(|p| {
                p.last_sent = now;
                p.request
            })
            .collect();
        for request in due {
            self.ledger.retries += 1;
            self.send(&request);
        }
    }

    /// Runs the load until `stop` returns true (asked between steps, about every millisecond):
    /// new requests at the configured rate while fewer than `window` wait, retries, checks.
    pub fn run_until(&mut self, mut stop: impl FnMut(&Ledger) -> bool) -> Result<(), ClientError> {
        let period = Duration::from_secs(1) / self.config.rate.max(1);
        let mut next = Instant::now();
        self.loading = true;
        let result = self.load_until(period, &mut next, &mut stop);
        self.loading = false;
        result
    }

    fn load_until(
        &mut self,
        period: Duration,
        next: &mut Instant,
        stop: &mut impl FnMut(&Ledger) -> bool,
    ) -> Result<(), ClientError> {
        while !stop(&self.ledger) {
            let now = Instant::now();
            while *next <= now {
                if self.pending.len() < self.config.window {
                    self.send_new(now);
                }
                *next += period;
            }
            self.retry_due(now);
            self.receive()?;
        }
        Ok(())
    }

    /// Sends a PUT of `key`'s next version and returns at once (no wait for the answer; `drain`
    /// retries it until answered). Returns the version sent.
    pub fn send_put(&mut self, key: u64) -> u64 {
        let version = self.ledger.sent.get(&key).copied().unwrap_or(0) + 1;
        self.ledger.sent.insert(key, version);
        let request = Request {
            op: OP_PUT,
            id: self.next_id,
            key,
            version,
            value: value_of(key, version),
        };
        self.next_id += 1;
        self.submit(request, Instant::now());
        version
    }

    /// Requests sent and not answered yet.
    pub fn unanswered(&self) -> usize {
        self.pending.len()
    }

    /// Waits (retrying) for the answers to every request still pending.
    pub fn drain(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let start = Instant::now();
        while !self.pending.is_empty() && start.elapsed() < timeout {
            self.retry_due(Instant::now());
            self.receive()?;
        }
        Ok(())
    }

    /// GETs every key with an acknowledged PUT (`window` at a time, with retries) and checks
    /// each holds that version or a newer one. Returns the number of keys read back.
    pub fn read_back_all(&mut self, timeout: Duration) -> Result<usize, ClientError> {
        self.drain(timeout)?;
        let mut keys: Vec<u64> = self.ledger.acked.keys().copied().collect();
        keys.sort_unstable();
        let gets = keys.into_iter().map(|key| (OP_GET, key, 0));
        self.submit_all(gets, timeout)
    }

    /// PUTs again, in order, every PUT that was acknowledged (`Ledger::acked_log`), as a
    /// database replays its log into a fresh table after a cold restart. Returns the number of
    /// PUTs replayed.
    /// Requests of the load still unanswered wait until the replay is done (a database serves
    /// nobody before its log is replayed), then go on being retried.
    pub fn replay_acknowledged(&mut self, timeout: Duration) -> Result<usize, ClientError> {
        let held = std::mem::take(&mut self.pending);
        let log = std::mem::take(&mut self.ledger.acked_log);
        let puts = log.iter().map(|&(key, version)| (OP_PUT, key, version));
        let replayed = self.submit_all(puts, timeout);
        // The replayed PUTs were acknowledged again and logged again: keep the log as it was.
        self.ledger.acked_log = log;
        self.pending.extend(held);
        replayed
    }

    /// Sends `(op, key, version)` requests `window` at a time with retries until all are
    /// answered (and checked); returns how many there were.
    fn submit_all(
        &mut self,
        requests: impl ExactSizeIterator<Item = (u8, u64, u64)>,
        timeout: Duration,
    ) -> Result<usize, ClientError> {
        let total = requests.len();
        let start = Instant::now();
        let mut queue = requests;
        loop {
            while self.pending.len() < self.config.window {
                let Some((op, key, version)) = queue.next() else {
                    break;
                };
                let id = self.next_id;
                self.next_id += 1;
                let value = if op == OP_PUT {
                    value_of(key, version)
                } else {
                    0
                };
                let request = Request {
                    op,
                    id,
                    key,
                    version,
                    value,
                };
                self.submit(request, Instant::now());
            }
            if self.pending.is_empty() {
                return Ok(total);
            }
            if start.elapsed() > timeout {
                return Err(ClientError::Unanswered {
                    left: self.pending.len() + queue.len(),
                    total,
                    waited: start.elapsed(),
                });
            }
            self.retry_due(Instant::now());
            self.receive()?;
        }
    }

    /// Accepts the next boot id as new (a cold restart the caller made on purpose) instead of
    /// reporting it as a reboot.
    pub fn expect_new_boot(&mut self) {
        self.ledger.boot_ids.clear();
    }

    /// The outage the load saw after `at` (when a failure began: a signal, a pause request,
    /// a kill): the longest time between two consecutive answers whose later one came after
    /// `at`, i.e. from the last answer before the service stopped to the first after it came
    /// back (answers to the load only, not to read-back or replay). `None` without an answer
    /// on each side.
    pub fn outage_after(&self, at: Instant) -> Option<Duration> {
        let times = &self.ledger.answer_times;
        let first_after = times.partition_point(|&t| t <= at);
        (first_after.max(1)..times.len())
            .map(|i| times[i].duration_since(times[i - 1]))
            .max()
            .filter(|_| first_after > 0)
    }
}

/// Ethernet + IPv4 + UDP header bytes in front of a datagram's payload.
pub const FRAME_OVERHEAD: usize = 14 + 20 + 8;

/// One stream of datagrams as the host received it.
#[derive(Clone, Copy, Debug)]
pub struct StreamResult {
    pub sent: u64,
    pub received: u64,
    pub payload: usize,
    /// From the first datagram received to the last.
    pub elapsed: Duration,
}

impl StreamResult {
    pub fn packets_per_s(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Ethernet frame bits per second (headers included, no preamble or gap).
    pub fn gbit_per_s(&self) -> f64 {
        self.packets_per_s() * ((self.payload + FRAME_OVERHEAD) * 8) as f64 / 1e9
    }
}

/// Asks for a large receive buffer (root may exceed rmem_max), so a burst is not dropped by
/// the receiving socket before the reader gets to it.
fn enlarge_receive_buffer(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let bytes: libc::c_int = 32 << 20;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt with a pointer to a c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// Counts datagrams of exactly `payload` bytes on `socket` until `expected` came or none came
/// for 300 ms; returns how many and the time from the first to the last.
/// Whether a `recv_from` error on a socket with a read timeout only means that nothing arrived:
/// the timeout, or a signal handled meanwhile (EINTR: the kernel never restarts a read that has a
/// timeout, and a process frozen and thawed by its host sees one too). The net SIGKILL test once
/// failed on `Interrupted`.
fn nothing_arrived(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn count_stream(socket: &UdpSocket, payload: usize, expected: u64) -> io::Result<(u64, Duration)> {
    let mut buffer = vec![0u8; 2048];
    let (mut received, mut first, mut last) = (0u64, None, Instant::now());
    let mut idle_since = Instant::now();
    while received < expected && idle_since.elapsed() < Duration::from_millis(300) {
        match socket.recv_from(&mut buffer) {
            Ok((len, _)) if len == payload => {
                last = Instant::now();
                first.get_or_insert(last);
                received += 1;
                idle_since = last;
            }
            Ok(_) => {}
            Err(e) if nothing_arrived(e.kind()) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((
        received,
        first.map(|f| last.duration_since(f)).unwrap_or_default(),
    ))
}

impl KvClient {
    /// Asks the guest to send `count` datagrams of `payload` bytes (not [`REPLY_LEN`]) and
    /// counts what arrives: guest -> host throughput through virtio-net and the tap.
    pub fn stream_from_guest(
        &mut self,
        count: u64,
        payload: usize,
    ) -> Result<StreamResult, ClientError> {
        enlarge_receive_buffer(&self.socket);
        let id = self.next_id;
        self.next_id += 1;
        let request = Request {
            op: OP_STREAM,
            id,
            key: count,
            version: payload as u64,
            value: 0,
        };
        self.send(&request);
        let (received, elapsed) =
            count_stream(&self.socket, payload, count).map_err(ClientError::Socket)?;
        Ok(StreamResult {
            sent: count,
            received,
            payload,
            elapsed,
        })
    }
}

/// Addresses of a host-only stream: frames written into a tap as if a guest sent them.
#[derive(Clone, Copy, Debug)]
pub struct TapStream {
    /// The tap interface's own MAC (the frames' destination) and a made-up sender MAC.
    pub tap_mac: [u8; 6],
    pub sender_mac: [u8; 6],
    pub sender: SocketAddrV4,
    pub receiver: SocketAddrV4,
}

impl TapStream {
    /// One frame with the 12-byte virtio-net header in front, as a tap with IFF_VNET_HDR reads.
    pub fn frame(&self, payload: usize, sequence: u64) -> Vec<u8> {
        let mut frame = vec![0u8; 12 + FRAME_OVERHEAD + payload];
        let eth = &mut frame[12..];
        eth[0..6].copy_from_slice(&self.tap_mac);
        eth[6..12].copy_from_slice(&self.sender_mac);
        eth[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut eth[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + 8 + payload) as u16).to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&self.sender.ip().octets());
        ip[16..20].copy_from_slice(&self.receiver.ip().octets());
        let mut sum: u32 = ip
            .chunks(2)
            .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
            .sum();
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let udp = &mut eth[34..42];
        udp[0..2].copy_from_slice(&self.sender.port().to_be_bytes());
        udp[2..4].copy_from_slice(&self.receiver.port().to_be_bytes());
        udp[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        eth[42..50.min(42 + payload)].copy_from_slice(&sequence.to_le_bytes()[..8.min(payload)]);
        frame
    }

    /// The host-only baseline: a thread writes `count` frames into `tap` (a descriptor of a tap
    /// opened with IFF_VNET_HDR, one `write` each, as the VMM's device does) while this thread
    /// counts them on a UDP socket bound to `receiver` (in the tap's namespace).
    pub fn run(
        &self,
        tap: std::os::fd::OwnedFd,
        count: u64,
        payload: usize,
    ) -> Result<StreamResult, ClientError> {
        let socket = UdpSocket::bind(self.receiver).map_err(ClientError::Socket)?;
        socket
            .set_read_timeout(Some(Duration::from_millis(1)))
            .map_err(ClientError::Socket)?;
        enlarge_receive_buffer(&socket);
        // The 12-byte header of VERSION_1 devices, as the VMM sets on its taps (default 10).
        let mut header_len: libc::c_int = 12;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer; the descriptor is a tap.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&tap),
                libc::TUNSETVNETHDRSZ as _,
                &mut header_len,
            )
        };
        if rc != 0 {
            return Err(ClientError::Socket(io::Error::last_os_error()));
        }
        let frame = self.frame(payload, 0);
        let writer = std::thread::spawn(move || {
            let tap = std::fs::File::from(tap);
            let mut sent = 0;
            for _ in 0..count {
                if std::io::Write::write(&mut &tap, &frame).is_ok() {
                    sent += 1;
                }
            }
            sent
        });
        let (received, elapsed) =
            count_stream(&socket, payload, count).map_err(ClientError::Socket)?;
        let sent = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok(StreamResult {
            sent,
            received,
            payload,
            elapsed,
        })
    }
}

/// A [`KvClient`] running its load on its own thread until stopped.
pub struct LoadThread {
    thread: std::thread::JoinHandle<Result<KvClient, ClientError>>,
    stop: Arc<AtomicBool>,
    answers: Arc<AtomicU64>,
}

impl LoadThread {
    /// Starts `client`'s load (`run_until`) on a new thread.
    pub fn start(mut client: KvClient) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        // A client that ran before starts from the answers it already has.
        let answers = Arc::new(AtomicU64::new(client.ledger.answer_times.len() as u64));
        let (stopped, counted) = (stop.clone(), answers.clone());
        let thread = std::thread::spawn(move || {
            client.run_until(|ledger| {
                counted.store(ledger.answer_times.len() as u64, Ordering::Relaxed);
                stopped.load(Ordering::Relaxed)
            })?;
            Ok(client)
        });
        LoadThread {
            thread,
            stop,
            answers,
        }
    }

    /// Answers to new requests so far.
    pub fn answers(&self) -> u64 {
        self.answers.load(Ordering::Relaxed)
    }

    /// Waits until `more` answers came after now; false after `timeout` or if the load ended.
    pub fn wait_answers(&self, more: u64, timeout: Duration) -> bool {
        let target = self.answers() + more;
        let deadline = Instant::now() + timeout;
        while self.answers() < target {
            if Instant::now() >= deadline || self.thread.is_finished() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Stops the load and gives the client back (its ledger holds everything seen).
    pub fn stop(self) -> Result<KvClient, ClientError> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in netkv on loopback: keeps versions as the guest does, or lies as told.
    fn stand_in(lie: fn(&mut Reply)) -> (SocketAddrV4, Arc<AtomicBool>) {
        stand_in_restartable(lie, Arc::new(AtomicBool::new(false)), Default::default())
    }

    /// `stand_in` that forgets its table and takes a new boot id when `restart` is set, and
    /// reads nothing while `gate` is held elsewhere (requests wait or are lost, as in a tap).
    fn stand_in_restartable(
        lie: fn(&mut Reply),
        restart: Arc<AtomicBool>,
        gate: Arc<std::sync::Mutex<()>>,
    ) -> (SocketAddrV4, Arc<AtomicBool>) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let std::net::SocketAddr::V4(address) = socket.local_addr().unwrap() else {
            unreachable!()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut table: HashMap<u64, (u64, u64)> = HashMap::new();
            let mut served = 0;
            let mut boot_id = 7;
            let mut buffer = [0u8; 512];
            while !stopped.load(Ordering::Relaxed) {
                if restart.swap(false, Ordering::Relaxed) {
                    table.clear();
                    boot_id += 1;
                }
                let received = {
                    let _open = gate.lock().unwrap();
                    socket.recv_from(&mut buffer)
                };
                let Ok((len, from)) = received else {
                    continue;
                };
                let request = Request::decode(&buffer[..len]).unwrap();
                let slot = table.entry(request.key).or_insert((0, 0));
                if request.op == OP_PUT && request.version > slot.0 {
                    *slot = (request.version, request.value);
                }
                let mut reply = Reply {
                    op: request.op,
                    status: if slot.0 == 0 {
                        STATUS_NOT_FOUND
                    } else {
                        STATUS_OK
                    },
                    id: request.id,
                    key: request.key,
                    version: slot.0,
                    value: slot.1,
                    boot_id,
                    served,
                };
                served += 1;
                lie(&mut reply);
                socket.send_to(&reply.encode(), from).unwrap();
            }
        });
        (address, stop)
    }

    fn run(lie: fn(&mut Reply)) -> KvClient {
        let (server, stop) = stand_in(lie);
        let mut client = KvClient::new(server, small_load()).unwrap();
        let start = Instant::now();
        client
            .run_until(|ledger| ledger.puts_acked > 300 || start.elapsed() > Duration::from_secs(5))
            .unwrap();
        client.read_back_all(Duration::from_secs(5)).unwrap();
        stop.store(true, Ordering::Relaxed);
        client
    }

    extern "C" fn ignore_signal(_: libc::c_int) {}

    /// A handled signal during the client's reads (EINTR) is not an error. The net SIGKILL test
    /// failed once with `netkv client socket: Interrupted system call`.
    #[test]
    fn signals_during_the_load_are_not_socket_errors() {
        // SAFETY: a zeroed sigaction with a handler that does nothing, installed for SIGUSR2
        // (used by nothing else in this test binary) without SA_RESTART, so that a read the
        // signal interrupts returns EINTR.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            assert_eq!(
                libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()),
                0
            );
        }
        let (server, stop) = stand_in(|_| {});
        let mut client = KvClient::new(server, small_load()).unwrap();
        // SAFETY: pthread_self has no preconditions.
        let loading_thread = unsafe { libc::pthread_self() };
        let done = Arc::new(AtomicBool::new(false));
        let signaller = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut sent = 0u32;
                while !done.load(Ordering::Relaxed) {
                    // SAFETY: the loading thread lives until `done` is set and this is joined.
                    unsafe { libc::pthread_kill(loading_thread, libc::SIGUSR2) };
                    sent += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                sent
            })
        };
        let start = Instant::now();
        let loaded = client.run_until(|_| start.elapsed() > Duration::from_millis(500));
        done.store(true, Ordering::Relaxed);
        let signals = signaller.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        loaded.unwrap_or_else(|e| panic!("after up to {signals} signals: {e}"));
        assert!(signals > 100, "{signals}");
        assert!(client.ledger.puts_acked > 0);
    }

    #[test]
    fn an_honest_server_passes_every_check() {
        let client = run(|_| {});
        assert!(client.ledger.puts_acked > 300);
        assert!(client.ledger.gets_checked > 0);
        assert_eq!(client.ledger.violations, Vec::new());
        assert_eq!(client.ledger.boot_ids, vec![7]);
    }

    #[test]
    fn a_server_that_forgets_writes_is_caught() {
        // Every GET answers "not found": acknowledged PUTs are lost.
        let client = run(|reply| {
            if reply.op == OP_GET {
                reply.status = STATUS_NOT_FOUND;
                reply.version = 0;
            }
        });
        assert!(
            client
                .ledger
                .violations
                .iter()
                .any(|v| v.0.starts_with("stale GET")),
            "{:?}",
            client.ledger.violations
        );
    }

    #[test]
    fn a_stale_version_a_wrong_value_and_a_reboot_are_caught() {
        let client = run(|reply| {
            if reply.op == OP_GET && reply.version > 1 {
                reply.version -= 1;
                reply.value = value_of(reply.key, reply.version);
            }
        });
        assert!(client
            .ledger
            .violations
            .iter()
            .any(|v| v.0.starts_with("stale GET")));

        let client = run(|reply| reply.value ^= 2);
        assert!(client
            .ledger
            .violations
            .iter()
            .any(|v| v.0.contains("the client sent")));

        let client = run(|reply| reply.boot_id = if reply.served > 100 { 8 } else { 7 });
        assert!(client
            .ledger
            .violations
            .iter()
            .any(|v| v.0.contains("booted again")));
    }

    /// A client that got 200 PUTs acknowledged by a stand-in which then restarted empty.
    fn loaded_then_restarted() -> (KvClient, Arc<AtomicBool>) {
        let restart = Arc::new(AtomicBool::new(false));
        let (server, stop) = stand_in_restartable(|_| {}, restart.clone(), Default::default());
        let mut client = KvClient::new(server, small_load()).unwrap();
        client.run_until(|ledger| ledger.puts_acked > 200).unwrap();
        restart.store(true, Ordering::Relaxed);
        (client, stop)
    }

    /// A PUT sent while the server is down is retried until the server is back, then
    /// acknowledged and read back: the probe the power-failure tests send through each outage.
    #[test]
    fn a_put_sent_during_an_outage_is_acknowledged_once_the_server_is_back() {
        let gate = Arc::new(std::sync::Mutex::new(()));
        let (server, stop) =
            stand_in_restartable(|_| {}, Arc::new(AtomicBool::new(false)), gate.clone());
        let mut probe = KvClient::new(server, small_load()).unwrap();
        let down = gate.lock().unwrap();
        assert_eq!(probe.send_put(9000), 1);
        probe.drain(Duration::from_millis(60)).unwrap();
        assert_eq!((probe.unanswered(), probe.ledger.puts_acked), (1, 0));
        drop(down);
        probe.drain(Duration::from_secs(5)).unwrap();
        assert_eq!((probe.unanswered(), probe.ledger.puts_acked), (0, 1));
        assert_eq!(probe.read_back_all(Duration::from_secs(5)).unwrap(), 1);
        stop.store(true, Ordering::Relaxed);
        assert_eq!(probe.ledger.violations, Vec::new());
    }

    fn small_load() -> LoadConfig {
        LoadConfig {
            keys: 16,
            rate: 5000,
            ..LoadConfig::default()
        }
    }

    #[test]
    fn a_cold_restart_is_whole_again_after_the_replay_and_the_outage_is_measured() {
        let (mut client, stop) = loaded_then_restarted();
        std::thread::sleep(Duration::from_millis(30));
        let failed_at = Instant::now();
        client.expect_new_boot();
        let replayed = client.replay_acknowledged(Duration::from_secs(5)).unwrap();
        assert_eq!(replayed, client.ledger.acked_log.len());
        let answers = client.ledger.answer_times.len();
        client
            .run_until(|ledger| ledger.answer_times.len() > answers + 100)
            .unwrap();
        client.read_back_all(Duration::from_secs(5)).unwrap();
        stop.store(true, Ordering::Relaxed);
        assert_eq!(client.ledger.violations, Vec::new());
        assert_eq!(client.ledger.boot_ids, vec![8]);
        let outage = client.outage_after(failed_at).unwrap();
        assert!(outage >= Duration::from_millis(30), "{outage:?}");
    }

    #[test]
    fn a_restart_without_replay_serves_stale_data_and_is_caught() {
        let (mut client, stop) = loaded_then_restarted();
        client.expect_new_boot();
        client.read_back_all(Duration::from_secs(5)).unwrap();
        stop.store(true, Ordering::Relaxed);
        assert!(client
            .ledger
            .violations
            .iter()
            .any(|v| v.0.starts_with("stale GET")));
    }

    #[test]
    fn requests_and_replies_round_trip_the_documented_layout() {
        let request = Request {
            op: OP_PUT,
            id: 3,
            key: 4,
            version: 5,
            value: 6,
        };
        let bytes = request.encode();
        assert_eq!(&bytes[0..4], b"NVKV");
        assert_eq!(Request::decode(&bytes), Some(request));
        assert_eq!(Reply::decode(&bytes), None, "a request is not a reply");
    }
}
