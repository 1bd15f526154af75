//! The API server thread: accepts connections on the Unix socket and serves each on a thread of
//! its own, so that one slow or stuck client never blocks another. Requests are handed to the
//! control loop one message at a time over the channel; the control loop serialises them.
//!
//! Connections are bounded in total and per client process (by the peer's pid). A connection
//! waiting for a request (idle keep-alive, a client that connected and sent nothing, a slow
//! sender) holds no claim on its slot: when a new client needs one, the longest-waiting of them
//! is closed, so idle or slow clients cannot lock the others out of the API.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::config::SeccompMode;
use crate::seccomp_filters::{apply_filter_for_mode, ThreadKind};

use super::http::{Connection, FramingLimits, Request, Response};
use super::routes::{find_route, route_request};
use super::{ApiError, ApiMessage, ApiRequest, ApiResponse, ApiServerError};

/// Size, time and concurrency limits of the server.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// Largest request body; a `VmConfig` is a few KiB.
    pub max_body_bytes: usize,
    /// Time a client has to send a whole request; also how long an idle keep-alive connection
    /// is kept.
    pub request_timeout: Duration,
    /// Time a new connection has to send the first byte of its first request.
    pub first_byte_timeout: Duration,
    /// Time a client has to take a response before the connection is dropped.
    pub write_timeout: Duration,
    /// Time to wait for the control loop's answer. Generous: a copy snapshot of a large VM takes
    /// seconds.
    pub reply_timeout: Duration,
    /// Connections served at once. When all are taken, a waiting one is closed for the new
    /// client; only when every one is busy at the control loop is the new one answered 503.
    pub max_connections: usize,
    /// Connections one client process may hold; its longest-waiting one makes room.
    pub max_connections_per_client: usize,
    /// The filter the accept thread installs first thing; its connection threads inherit it.
    pub seccomp: SeccompMode,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_header_bytes: 16 << 10,
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(3),
            write_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(600),
            max_connections: 16,
            max_connections_per_client: 8,
            seccomp: SeccompMode::default(),
        }
    }
}

/// What every connection thread shares: the way to the control loop.
struct ControlLoopLink {
    to_vmm: Sender<ApiMessage>,
    wake: EventFd,
    reply_timeout: Duration,
}

impl ControlLoopLink {
    /// Sends one request and waits for its answer.
    fn dispatch(&self, request: ApiRequest) -> ApiResponse {
        let (reply, answer) = mpsc::channel();
        self.to_vmm
            .send(ApiMessage { request, reply })
            .map_err(|_| super::shutting_down())?;
        self.wake.write(1).map_err(|error| {
            ApiError::internal(format!("cannot wake the VMM control loop: {error}"))
        })?;
        match answer.recv_timeout(self.reply_timeout) {
            Ok(response) => response,
            Err(RecvTimeoutError::Timeout) => Err(ApiError::new(
                504,
                format!(
                    "the VMM control loop did not answer within {:?}",
                    self.reply_timeout
                ),
            )),
            Err(RecvTimeoutError::Disconnected) => Err(ApiError::internal(
                "the VMM control loop dropped the request without answering",
            )),
        }
    }
}

/// Starts the accept thread on an already listening socket.
pub(super) fn spawn(
    listener: super::socket::ApiListener,
    to_vmm: Sender<ApiMessage>,
    wake: EventFd,
    limits: ServerLimits,
) -> Result<JoinHandle<()>, ApiServerError> {
    let link = Arc::new(ControlLoopLink {
        to_vmm,
        wake,
        reply_timeout: limits.reply_timeout,
    });
    let (confined_tx, confined) = mpsc::channel();
    let handle = thread::Builder::new()
        .name("http-server".into())
        .spawn(move || {
            // --landlock: the socket is bound; from here this thread opens only the VMM's files.
            let landlocked = crate::landlock::restrict_api_thread()
                .map_err(|error| log::error!("API server thread: {error}"));
            let filter = apply_filter_for_mode(ThreadKind::HttpApi, limits.seccomp);
            let serve = filter.is_ok() && landlocked.is_ok();
            // The spawner waits for this message.
            let _ = confined_tx.send(filter);
            // Never serve unconfined: the socket closes with the listener.
            if serve {
                // The path's lock lives as long as this thread serves it.
                let super::socket::ApiListener {
                    listener,
                    _path_lock,
                } = listener;
                accept_loop(listener, link, limits);
                drop(_path_lock);
            }
        })
        .map_err(ApiServerError::Spawn)?;
    match confined.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(error)) => Err(ApiServerError::Seccomp(error)),
        Err(_) => Err(ApiServerError::Spawn(std::io::Error::other(
            "the API server thread ended before installing its seccomp filter",
        ))),
    }
}

fn accept_loop(listener: UnixListener, link: Arc<ControlLoopLink>, limits: ServerLimits) {
    let table = Arc::new(ConnectionTable::default());
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning, keep serving.
                log::warn!("API socket accept failed: {error}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Some(slot) = table.admit(&stream, &limits) else {
            refuse_busy(stream, &limits);
            continue;
        };
        let link = Arc::clone(&link);
        let spawned = thread::Builder::new()
            .name("http-connection".into())
            .spawn(move || {
                serve_connection(Connection::new(stream), &slot, &link, &limits);
            });
        if let Err(error) = spawned {
            // The closure (and with it the slot and the stream) was dropped: nothing leaks.
            log::warn!("cannot start an API connection thread: {error}");
        }
    }
}

/// What a connection is doing, as far as sharing slots goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request or for the rest of one: may be closed to make room.
    Waiting,
    /// A whole request was read: it is at the control loop or its answer is being written.
    Busy,
}

struct Tracked {
    id: u64,
    /// The peer's pid (`SO_PEERCRED`); `None` if the kernel would not say.
    client: Option<i32>,
    /// A second handle on the socket, to shut it down when the connection is evicted.
    stream: UnixStream,
    phase: Phase,
    since: Instant,
}

/// The open connections, shared by the accept thread and the connection threads.
#[derive(Default)]
struct ConnectionTable {
    entries: Mutex<Vec<Tracked>>,
    next_id: AtomicU64,
}

impl ConnectionTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Tracked>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Finds a slot for a new connection, closing the longest-waiting connection of the same
    /// client (over its own limit) or of anyone (over the total) if needed. `None`: every slot
    /// is busy at the control loop.
    fn admit(self: &Arc<Self>, stream: &UnixStream, limits: &ServerLimits) -> Option<Slot> {
        let client = peer_pid(stream);
        let handle = stream.try_clone().ok()?;
        let mut entries = self.lock();
        let per_client = entries
            .iter()
            .filter(|entry| client.is_some() && entry.client == client)
            .count();
        if per_client >= limits.max_connections_per_client.max(1)
            && !evict_longest_waiting(&mut entries, |entry| entry.client == client)
        {
            return None;
        }
        if entries.len() >= limits.max_connections.max(1)
            && !evict_longest_waiting(&mut entries, |_| true)
        {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        entries.push(Tracked {
            id,
            client,
            stream: handle,
            phase: Phase::Waiting,
            since: Instant::now(),
        });
        Some(Slot {
            table: Arc::clone(self),
            id,
        })
    }
}

/// Closes the connection that has waited longest among those `eligible`; false if none waits.
fn evict_longest_waiting(entries: &mut Vec<Tracked>, eligible: impl Fn(&Tracked) -> bool) -> bool {
    let oldest = entries
        .iter()
        .enumerate()
        .filter(|(_, entry)| entry.phase == Phase::Waiting && eligible(entry))
        .min_by_key(|(_, entry)| entry.since)
        .map(|(index, _)| index);
    match oldest {
        Some(index) => {
            let evicted = entries.swap_remove(index);
            // Its thread's read ends at once; the thread then gives up quietly.
            let _ = evicted.stream.shutdown(std::net::Shutdown::Both);
            true
        }
        None => false,
    }
}

/// One connection's entry in the table, removed when its thread ends, however it ends.
struct Slot {
    table: Arc<ConnectionTable>,
    id: u64,
}

impl Slot {
    /// Marks the connection busy; false if it was evicted meanwhile (its request is then
    /// dropped unanswered rather than carried out for a client that will never hear of it).
    fn set_busy(&self) -> bool {
        self.set(Phase::Busy)
    }

    fn set_waiting(&self) -> bool {
        self.set(Phase::Waiting)
    }

    fn set(&self, phase: Phase) -> bool {
        let mut entries = self.table.lock();
        match entries.iter_mut().find(|entry| entry.id == self.id) {
            Some(entry) => {
                entry.phase = phase;
                entry.since = Instant::now();
                true
            }
            None => false,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.lock().retain(|entry| entry.id != self.id);
    }
}

/// The pid of the process at the other end of `stream`.
fn peer_pid(stream: &UnixStream) -> Option<i32> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `credentials` and `length` are valid for writes of a `ucred` and its size for the
    // duration of the call; the kernel writes at most `length` bytes.
    let result = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut length,
        )
    };
    (result == 0 && credentials.pid > 0).then_some(credentials.pid)
}

fn refuse_busy(stream: UnixStream, limits: &ServerLimits) {
    let mut connection = Connection::new(stream);
    let mut response = Response::framing_error(
        503,
        Some("too many API connections at once; retry".to_owned()),
    );
    response.close = true;
    // Best effort: the client may already be gone.
    let _ = connection.write_response(&response, limits.write_timeout);
}

/// Requests read but whose answers are not yet on the wire, across the process's API servers.
/// The VMM exits right after answering `vmm.shutdown` or a power-fail save; counting lets it wait
/// until those answers reach the client instead of dying with them in a connection thread.
static UNWRITTEN_ANSWERS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

/// Counts one request from being read until its answer is written (or the write failed).
struct UnwrittenAnswer;

impl UnwrittenAnswer {
    fn new() -> Self {
        let (count, _) = &UNWRITTEN_ANSWERS;
        *count
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) += 1;
        UnwrittenAnswer
    }
}

impl Drop for UnwrittenAnswer {
    fn drop(&mut self) {
        let (count, written) = &UNWRITTEN_ANSWERS;
        let mut count = count
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *count = count.saturating_sub(1);
        written.notify_all();
    }
}

/// Waits until every request read so far has had its answer written, or `timeout` passed.
/// Returns true when none is left.
pub(super) fn wait_for_answers_written(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let (count, written) = &UNWRITTEN_ANSWERS;
    let mut count = count
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    while *count > 0 {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return false;
        }
        count = written
            .wait_timeout(count, remaining)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0;
    }
    true
}

fn serve_connection(
    mut connection: Connection,
    slot: &Slot,
    link: &ControlLoopLink,
    limits: &ServerLimits,
) {
    let mut framing = FramingLimits {
        max_header_bytes: limits.max_header_bytes,
        max_body_bytes: limits.max_body_bytes,
        request_timeout: limits.request_timeout,
        idle_timeout: limits.first_byte_timeout,
    };
    loop {
        let mut request = match connection.read_request(&framing) {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(error) => {
                if let Some(status) = error.status() {
                    let mut response = Response::framing_error(status, Some(error.to_string()));
                    // The stream is out of step (unread body, garbage): it cannot carry on.
                    response.close = true;
                    let _ = connection.write_response(&response, limits.write_timeout);
                }
                return;
            }
        };
        if !slot.set_busy() {
            return;
        }
        let unwritten = UnwrittenAnswer::new();
        let files = std::mem::take(&mut request.files);
        let mut response = handle(&request, files, link);
        response.close = response.close || !request.keep_alive;
        let written = connection.write_response(&response, limits.write_timeout);
        drop(unwritten);
        if written.is_err() || response.close || !slot.set_waiting() {
            return;
        }
        framing.idle_timeout = limits.request_timeout;
    }
}

/// Routes one request and turns the control loop's answer into a response. `files`: the
/// descriptors the client sent with it.
fn handle(request: &Request, files: Vec<OwnedFd>, link: &ControlLoopLink) -> Response {
    let answer = route_request(
        &request.method,
        &request.path,
        &request.body,
        request.query.as_deref(),
    )
    .map(|api_request| with_files(api_request, files))
    .and_then(|api_request| link.dispatch(api_request));
    let mut response = match answer {
        Ok(Some(body)) => match serde_json::to_vec(&body) {
            Ok(bytes) => Response::json(200, bytes),
            Err(error) => Response::error(
                500,
                &ApiError::internal(format!("cannot encode the answer: {error}")).body(),
            ),
        },
        Ok(None) => Response::no_content(),
        // A status outside 4xx/5xx from the control loop is a bug there; still answer an error.
        Err(error) if (400..600).contains(&error.status) => {
            Response::error(error.status, &error.body())
        }
        Err(error) => Response::error(500, &error.body()),
    };
    // A known path asked with the wrong method: `Allow` names the one it takes.
    if let Some(route) =
        find_route(&request.path).filter(|route| request.method != route.method.as_str())
    {
        response.allow = Some(route.method.as_str());
    }
    response
}

/// Gives the descriptors a client sent with its request to the request that takes them, as
/// upstream does: `vm.add-net`'s become its tap `fds` (numbers in its body mean nothing here and
/// give way to them). Any other request closes them.
fn with_files(request: ApiRequest, files: Vec<OwnedFd>) -> ApiRequest {
    if files.is_empty() {
        return request;
    }
    match request {
        ApiRequest::VmAddNet(mut net, _) => {
            if net.fds.take().is_some() {
                log::warn!("vm.add-net: the fds in the body give way to the descriptors sent");
            }
            ApiRequest::VmAddNet(net, files)
        }
        other => {
            log::warn!(
                "{}: {} file descriptor(s) sent with the request closed: it takes none",
                other.operation().path(),
                files.len()
            );
            other
        }
    }
}
