//! HTTP/1.1 framing on one connection: reading requests (parsed by `httparse`) under size and time
//! limits, and writing responses. It knows nothing of the API's routes.

use std::io::{self, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Most header lines one request may carry.
const MAX_HEADERS: usize = 32;

/// Most file descriptors one request may carry (SCM_RIGHTS), as many as a multiqueue tap has
/// queue pairs at most; more is refused.
pub const MAX_REQUEST_FDS: usize = 16;

/// A request read off the connection.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path without its query.
    pub path: String,
    pub query: Option<String>,
    pub body: Vec<u8>,
    /// Whether the client wants the connection kept after the answer.
    pub keep_alive: bool,
    /// Descriptors the client sent with the request (SCM_RIGHTS), as upstream's `ch-remote
    /// add-net fd=` does; closed unless the request takes them.
    pub files: Vec<OwnedFd>,
}

/// Why no request could be read. Each maps to a status the server answers before closing.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("conflicting Content-Length headers: {0} and {1}")]
    ConflictingContentLength(usize, usize),
    #[error("request headers exceed {0} bytes")]
    HeadersTooLarge(usize),
    #[error("request body of {length} bytes exceeds the limit of {limit} bytes")]
    BodyTooLarge { length: usize, limit: usize },
    #[error("unsupported transfer encoding {0:?}: send a Content-Length body")]
    UnsupportedTransferEncoding(String),
    #[error("request not received within {0:?}")]
    Timeout(Duration),
    #[error("connection closed in the middle of a request")]
    Truncated,
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
}

impl FramingError {
    /// The status to answer with, or `None` when nothing can or should be written.
    pub fn status(&self) -> Option<u16> {
        match self {
            FramingError::Malformed(_) | FramingError::ConflictingContentLength(..) => Some(400),
            FramingError::HeadersTooLarge(_) => Some(431),
            FramingError::BodyTooLarge { .. } => Some(413),
            FramingError::UnsupportedTransferEncoding(_) => Some(501),
            FramingError::Timeout(_) => Some(408),
            FramingError::Truncated | FramingError::Io(_) => None,
        }
    }
}

/// A response to write.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// `(content type, bytes)`; `None` for 204 and other body-less answers.
    pub body: Option<(&'static str, Vec<u8>)>,
    /// The `Allow` header of a wrong-method answer.
    pub allow: Option<&'static str>,
    /// Close the connection after this response.
    pub close: bool,
}

impl Response {
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Response {
            status,
            body: Some(("application/json", body)),
            allow: None,
            close: false,
        }
    }

    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
            allow: None,
            close: false,
        }
    }

    /// An error answer: the body is the JSON array of strings upstream's clients parse.
    pub fn error(status: u16, body: &[String]) -> Self {
        let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"[]".to_vec());
        Self::json(status, bytes)
    }

    /// An error of the HTTP layer: `[phrase]`, or `[phrase, detail]`.
    pub fn framing_error(status: u16, detail: Option<String>) -> Self {
        let mut body = vec![status_phrase(status).to_owned()];
        body.extend(detail);
        Self::error(status, &body)
    }
}

/// Size and time limits of request reading.
#[derive(Clone, Copy, Debug)]
pub struct FramingLimits {
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    /// From the first wait for a request to its last byte.
    pub request_timeout: Duration,
    /// How long the connection may stay silent before a request starts; then it is closed
    /// quietly. Never longer than `request_timeout`.
    pub idle_timeout: Duration,
}

/// One client connection with its read buffer (which may hold the start of a pipelined request).
pub struct Connection {
    stream: UnixStream,
    buffer: Vec<u8>,
    /// Descriptors received since the last request was complete.
    files: Vec<OwnedFd>,
}

impl Connection {
    pub fn new(stream: UnixStream) -> Self {
        Connection {
            stream,
            buffer: Vec::new(),
            files: Vec::new(),
        }
    }

    /// Reads the next request. `Ok(None)`: the client closed, or stayed idle past the timeout,
    /// between requests.
    pub fn read_request(
        &mut self,
        limits: &FramingLimits,
    ) -> Result<Option<Request>, FramingError> {
        let started = Instant::now();
        let deadline = started + limits.request_timeout;
        let idle_deadline = started + limits.idle_timeout.min(limits.request_timeout);
        let (header_length, body_length, mut request) = loop {
            if let Some(parsed) = self.parse_head(limits)? {
                break parsed;
            }
            if self.buffer.len() > limits.max_header_bytes {
                return Err(FramingError::HeadersTooLarge(limits.max_header_bytes));
            }
            let wait_until = if self.buffer.is_empty() {
                idle_deadline
            } else {
                deadline
            };
            if !self.fill(wait_until, limits.request_timeout)? {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(FramingError::Truncated)
                };
            }
        };
        while self.buffer.len() < header_length + body_length {
            if !self.fill(deadline, limits.request_timeout)? {
                return Err(FramingError::Truncated);
            }
        }
        request
            .body
            .extend_from_slice(&self.buffer[header_length..header_length + body_length]);
        self.buffer.drain(..header_length + body_length);
        request.files = std::mem::take(&mut self.files);
        Ok(Some(request))
    }

    /// Parses the request head if the buffer holds all of it. Returns the head's length, the
    /// declared Content-Length and the request without its body.
    fn parse_head(
        &mut self,
        limits: &FramingLimits,
    ) -> Result<Option<(usize, usize, Request)>, FramingError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        let header_length = match parsed.parse(&self.buffer) {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(FramingError::Malformed(format!(
                    "more than {MAX_HEADERS} header lines"
                )))
            }
            Err(error) => return Err(FramingError::Malformed(error.to_string())),
        };
        if header_length > limits.max_header_bytes {
            return Err(FramingError::HeadersTooLarge(limits.max_header_bytes));
        }
        let method = parsed.method.unwrap_or_default().to_owned();
        let target = parsed.path.unwrap_or_default();
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
            None => (target.to_owned(), None),
        };
        // HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 closes unless asked.
        let mut keep_alive = parsed.version == Some(1);
        let mut content_length: Option<usize> = None;
        let mut expects_continue = false;
        for header in parsed.headers.iter() {
            let value = std::str::from_utf8(header.value)
                .map_err(|_| {
                    FramingError::Malformed(format!("header {} is not UTF-8", header.name))
                })?
                .trim();
            if header.name.eq_ignore_ascii_case("content-length") {
                let length: usize = value.parse().map_err(|_| {
                    FramingError::Malformed(format!("bad Content-Length {value:?}"))
                })?;
                // RFC 9112 6.3: differing lengths leave the message boundary unknown; refuse at
                // once instead of waiting for bytes that may never come.
                match content_length {
                    Some(earlier) if earlier != length => {
                        return Err(FramingError::ConflictingContentLength(earlier, length))
                    }
                    _ => content_length = Some(length),
                }
            } else if header.name.eq_ignore_ascii_case("transfer-encoding")
                && !value.eq_ignore_ascii_case("identity")
            {
                return Err(FramingError::UnsupportedTransferEncoding(value.to_owned()));
            } else if header.name.eq_ignore_ascii_case("connection") {
                if value.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if value.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            } else if header.name.eq_ignore_ascii_case("expect")
                && value.eq_ignore_ascii_case("100-continue")
            {
                expects_continue = true;
            }
        }
        let content_length = content_length.unwrap_or(0);
        if content_length > limits.max_body_bytes {
            return Err(FramingError::BodyTooLarge {
                length: content_length,
                limit: limits.max_body_bytes,
            });
        }
        // curl sends `Expect: 100-continue` for bodies over 1 KiB and waits a second for it.
        let body_pending = self.buffer.len() < header_length + content_length;
        if expects_continue && body_pending {
            self.stream.write_all(b"HTTP/1.1 100 \r\n\r\n")?;
        }
        Ok(Some((
            header_length,
            content_length,
            Request {
                method,
                path,
                query,
                body: Vec::with_capacity(content_length),
                keep_alive,
                files: Vec::new(),
            },
        )))
    }

    /// Reads more bytes into the buffer before `deadline`. `Ok(false)` on end of stream, or on
    /// timeout while nothing of a request has arrived (an idle keep-alive connection).
    fn fill(&mut self, deadline: Instant, timeout: Duration) -> Result<bool, FramingError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return self.timed_out(timeout);
        }
        self.stream.set_read_timeout(Some(remaining))?;
        let mut chunk = [0u8; 4096];
        loop {
            match receive(&self.stream, &mut chunk, &mut self.files) {
                Ok(0) => return Ok(false),
                Ok(count) => {
                    self.buffer.extend_from_slice(&chunk[..count]);
                    return Ok(true);
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return self.timed_out(timeout)
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    fn timed_out(&self, timeout: Duration) -> Result<bool, FramingError> {
        if self.buffer.is_empty() {
            Ok(false)
        } else {
            Err(FramingError::Timeout(timeout))
        }
    }

    /// Writes one response; the caller closes the connection afterwards if `response.close`.
    pub fn write_response(
        &mut self,
        response: &Response,
        write_timeout: Duration,
    ) -> io::Result<()> {
        // A client that stops reading must not wedge this thread either.
        self.stream.set_write_timeout(Some(write_timeout))?;
        // No reason phrase, as upstream: its ch-remote reads everything between "HTTP/1.1 " and
        // the line end as the number, so "200 OK" would fail every call.
        let mut head = format!("HTTP/1.1 {} \r\nServer: NV-Hypervisor\r\n", response.status);
        if let Some(allow) = response.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        if response.close {
            head.push_str("Connection: close\r\n");
        }
        let body: &[u8] = match &response.body {
            Some((content_type, bytes)) => {
                head.push_str(&format!("Content-Type: {content_type}\r\n"));
                bytes
            }
            None => &[],
        };
        // RFC 9110: a 204 carries no Content-Length.
        if response.status != 204 {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut message = head.into_bytes();
        message.extend_from_slice(body);
        self.stream.write_all(&message)?;
        self.stream.flush()
    }
}

/// The standard phrase of a status, used as the first element of an HTTP-layer error body.
pub fn status_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// One `recvmsg` on `stream` into `chunk`: the bytes read, and the descriptors that came with
/// them (SCM_RIGHTS, close-on-exec) appended to `files`. More than [`MAX_REQUEST_FDS`] in all, or
/// descriptors the kernel had to drop for want of room, is an error (those received are closed).
fn receive(stream: &UnixStream, chunk: &mut [u8], files: &mut Vec<OwnedFd>) -> io::Result<usize> {
    const FD_SIZE: usize = std::mem::size_of::<RawFd>();
    // u64 elements: the control buffer must be aligned for `cmsghdr`.
    let mut control = [0u64; 16];
    // SAFETY: CMSG_SPACE only computes a size.
    let room = unsafe { libc::CMSG_SPACE((MAX_REQUEST_FDS * FD_SIZE) as u32) } as usize;
    debug_assert!(room <= std::mem::size_of_val(&control));
    let mut iov = libc::iovec {
        iov_base: chunk.as_mut_ptr().cast(),
        iov_len: chunk.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one; the fields set below point into buffers
    // that outlive the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = room as _;
    // SAFETY: recvmsg writes at most `iov_len` bytes into `chunk` and at most `msg_controllen`
    // bytes into `control`, both valid for writes for the duration of the call.
    let count = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut message, libc::MSG_CMSG_CLOEXEC) };
    if count < 0 {
        return Err(io::Error::last_os_error());
    }
    let before = files.len();
    // SAFETY: the CMSG_* walk stays within the `msg_controllen` bytes the kernel filled in, and
    // each SCM_RIGHTS payload holds `(cmsg_len - CMSG_LEN(0)) / FD_SIZE` descriptors now open in
    // this process, owned by nobody else: each is wrapped in an `OwnedFd` once.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                for index in 0..payload / FD_SIZE {
                    let fd = std::ptr::read_unaligned(data.add(index));
                    files.push(OwnedFd::from_raw_fd(fd));
                }
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    if message.msg_flags & libc::MSG_CTRUNC != 0 || files.len() > MAX_REQUEST_FDS {
        files.truncate(before);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_REQUEST_FDS} file descriptors sent with a request"),
        ));
    }
    Ok(count as usize)
}
