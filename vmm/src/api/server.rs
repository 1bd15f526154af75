//! The API server thread: accepts connections on the Unix socket and serves each on a thread of
//! its own, so that one slow or stuck client never blocks another. Requests are handed to the
//! control loop one message at a time over the channel; the control loop serialises them.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::config::SeccompMode;
use crate::seccomp_filters::{apply_filter_for_mode, ThreadKind};

use super::http::{Connection, FramingLimits, Request, Response};
use super::routes::{build_request, find_route};
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
    /// Time a client has to take a response before the connection is dropped.
    pub write_timeout: Duration,
    /// Time to wait for the control loop's answer. Generous: a copy snapshot of a large VM takes
    /// seconds.
    pub reply_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// The filter the accept thread installs first thing; its connection threads inherit it.
    pub seccomp: SeccompMode,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_header_bytes: 16 << 10,
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(600),
            max_connections: 16,
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
            .map_err(|_| ApiError::new(503, "the VMM control loop is not running"))?;
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
    listener: UnixListener,
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
                accept_loop(listener, link, limits);
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
    let active = Arc::new(AtomicUsize::new(0));
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
        if active.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            active.fetch_sub(1, Ordering::AcqRel);
            refuse_busy(stream, &limits);
            continue;
        }
        let link = Arc::clone(&link);
        let slot = ActiveSlot(Arc::clone(&active));
        let spawned = thread::Builder::new()
            .name("http-connection".into())
            .spawn(move || {
                let _slot = slot;
                serve_connection(Connection::new(stream), &link, &limits);
            });
        if let Err(error) = spawned {
            // The closure (and with it the slot and the stream) was dropped: nothing leaks.
            log::warn!("cannot start an API connection thread: {error}");
        }
    }
}

/// Gives back a connection slot when its thread ends, however it ends.
struct ActiveSlot(Arc<AtomicUsize>);

impl Drop for ActiveSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn refuse_busy(stream: UnixStream, limits: &ServerLimits) {
    let mut connection = Connection::new(stream);
    let mut response = Response::error(503, "too many API connections at once; retry");
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

fn serve_connection(mut connection: Connection, link: &ControlLoopLink, limits: &ServerLimits) {
    let framing = FramingLimits {
        max_header_bytes: limits.max_header_bytes,
        max_body_bytes: limits.max_body_bytes,
        request_timeout: limits.request_timeout,
    };
    loop {
        let request = match connection.read_request(&framing) {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(error) => {
                if let Some(status) = error.status() {
                    let mut response = Response::error(status, &error.to_string());
                    // The stream is out of step (unread body, garbage): it cannot carry on.
                    response.close = true;
                    let _ = connection.write_response(&response, limits.write_timeout);
                }
                return;
            }
        };
        let unwritten = UnwrittenAnswer::new();
        let mut response = handle(&request, link);
        response.close = response.close || !request.keep_alive;
        let written = connection.write_response(&response, limits.write_timeout);
        drop(unwritten);
        if written.is_err() || response.close {
            return;
        }
    }
}

/// Routes one request and turns the control loop's answer into a response.
fn handle(request: &Request, link: &ControlLoopLink) -> Response {
    let Some(route) = find_route(&request.path) else {
        return Response::error(404, &format!("unknown API path {}", request.path));
    };
    if request.method != route.method.as_str() {
        let mut response = Response::error(
            405,
            &format!(
                "{} does not accept {}; use {}",
                route.op,
                request.method,
                route.method.as_str()
            ),
        );
        response.allow = Some(route.method.as_str());
        return response;
    }
    let answer = build_request(route, &request.body, request.query.as_deref())
        .and_then(|api_request| link.dispatch(api_request));
    match answer {
        Ok(Some(body)) => match serde_json::to_vec(&body) {
            Ok(bytes) => Response::json(200, bytes),
            Err(error) => Response::error(500, &format!("cannot encode the answer: {error}")),
        },
        Ok(None) => Response::no_content(),
        // A status outside 4xx/5xx from the control loop is a bug there; still answer an error.
        Err(error) if (400..600).contains(&error.status) => {
            Response::error(error.status, &error.message)
        }
        Err(error) => Response::error(500, &error.message),
    }
}
