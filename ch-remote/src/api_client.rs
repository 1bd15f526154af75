//! A small, blocking HTTP/1.1 client over the API's Unix socket that reads answers exactly as
//! upstream cloud-hypervisor's `ch-remote` does, so that it behaves the same against any VMM:
//!
//! - the status is everything between `HTTP/1.1 ` and the end of that line, trimmed, read as a
//!   number: `HTTP/1.1 200 ` is 200, while `HTTP/1.1 200 OK` is not a number and fails the call
//!   ("Error parsing HTTP status code"), as it does upstream;
//! - only 100, 200 and 204 are successes; every other status is a server error carrying the body;
//! - the body is read by `Content-Length` (header name matched as written); without that header
//!   the answer has no body.

use std::io::{self, Read, Write};
use std::num::ParseIntError;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::commands::ApiCall;

/// How long to wait for an answer: the VMM may be saving a large VM (snapshot) before it answers.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest answer accepted; the API's answers are small JSON documents.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// The statuses upstream's client names; every other number is `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusCode {
    Continue,
    Ok,
    NoContent,
    BadRequest,
    NotFound,
    TooManyRequests,
    InternalServerError,
    NotImplemented,
    Unknown,
}

impl StatusCode {
    pub fn from_number(code: u64) -> Self {
        match code {
            100 => StatusCode::Continue,
            200 => StatusCode::Ok,
            204 => StatusCode::NoContent,
            400 => StatusCode::BadRequest,
            404 => StatusCode::NotFound,
            429 => StatusCode::TooManyRequests,
            500 => StatusCode::InternalServerError,
            501 => StatusCode::NotImplemented,
            _ => StatusCode::Unknown,
        }
    }

    fn is_success(self) -> bool {
        matches!(
            self,
            StatusCode::Continue | StatusCode::Ok | StatusCode::NoContent
        )
    }
}

/// Upstream's client errors, with its messages.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Error writing to or reading from HTTP socket")]
    Socket(#[source] io::Error),
    #[error("Error sending file descriptors")]
    SocketSendFds(#[source] io::Error),
    #[error("Error parsing HTTP status code")]
    StatusCodeParsing(#[source] ParseIntError),
    #[error("HTTP output is missing protocol statement")]
    MissingProtocol,
    #[error("Error parsing HTTP Content-Length field")]
    ContentLengthParsing(#[source] ParseIntError),
    #[error("the answer is larger than {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
    /// The VMM refused or failed the request; the body is its JSON array of messages.
    #[error("Server responded with error {0:?}: {1:?}")]
    ServerResponse(StatusCode, Option<String>),
}

/// Opens the API socket; kept apart from `call` because upstream reports it on its own line.
pub fn connect(socket: &str) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    Ok(stream)
}

/// Sends `call` and reads its answer: `Ok(Some(body))` when the answer has a body (printed as it
/// is), `Ok(None)` when it has none.
pub fn call(stream: &mut UnixStream, call: &ApiCall) -> Result<Option<String>, ClientError> {
    let request = request_bytes(call);
    let mut sent = 0;
    if !call.fds.is_empty() {
        // The descriptors ride on the first bytes of the request, as upstream sends them.
        sent = stream
            .send_with_fds(&[&request[..]], &call.fds)
            .map_err(|error| ClientError::SocketSendFds(io::Error::from(error)))?;
    }
    stream
        .write_all(&request[sent..])
        .and_then(|()| stream.flush())
        .map_err(ClientError::Socket)?;
    parse_response(stream)
}

/// The bytes of one request, with the headers upstream's client sends.
pub fn request_bytes(call: &ApiCall) -> Vec<u8> {
    let mut head = format!(
        "{} /api/v1/{} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n",
        call.method, call.op
    );
    if let Some(body) = &call.body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    if let Some(body) = &call.body {
        bytes.extend_from_slice(body.as_bytes());
    }
    bytes
}

/// Reads until the head is complete and, when it names a `Content-Length`, until that much body
/// has come (or the peer closes); then judges the status line.
pub fn parse_response(stream: &mut impl Read) -> Result<Option<String>, ClientError> {
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut body_offset = None;
    let mut content_length = None;
    loop {
        let count = stream.read(&mut chunk).map_err(ClientError::Socket)?;
        if count == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..count]);
        if answer.len() > MAX_ANSWER_BYTES {
            return Err(ClientError::TooLarge);
        }
        if body_offset.is_none() {
            if let Some(end) = find(&answer, b"\r\n\r\n") {
                body_offset = Some(end + 4);
                content_length = header_value(&answer[..end], "Content-Length")
                    .map(|value| value.trim().parse::<usize>())
                    .transpose()
                    .map_err(ClientError::ContentLengthParsing)?;
                if content_length.is_none() {
                    break;
                }
            }
        }
        if let (Some(offset), Some(length)) = (body_offset, content_length) {
            if answer.len() >= offset + length {
                break;
            }
        }
    }
    let body = match (body_offset, content_length) {
        (Some(offset), Some(_)) => Some(String::from_utf8_lossy(&answer[offset..]).into_owned()),
        _ => None,
    };
    let status = status_code(&answer)?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(ClientError::ServerResponse(status, body))
    }
}

/// The status number: the text after `HTTP/1.1 ` up to the line's end, trimmed.
fn status_code(answer: &[u8]) -> Result<StatusCode, ClientError> {
    let start = find(answer, b"HTTP/1.1").ok_or(ClientError::MissingProtocol)?;
    let line = &answer[start..];
    let end = line
        .iter()
        .position(|&byte| byte == b'\r')
        .unwrap_or(line.len());
    let text = line
        .get("HTTP/1.1 ".len()..end)
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let number = text
        .trim()
        .parse::<u64>()
        .map_err(ClientError::StatusCodeParsing)?;
    Ok(StatusCode::from_number(number))
}

/// The value of the first header written exactly `name: `.
fn header_value(head: &[u8], name: &str) -> Option<String> {
    let pattern = format!("{name}: ");
    let start = find(head, pattern.as_bytes())? + pattern.len();
    let rest = &head[start..];
    let end = rest
        .iter()
        .position(|&byte| byte == b'\r')
        .unwrap_or(rest.len());
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::thread;

    use super::*;

    fn parsed(answer: &[u8]) -> Result<Option<String>, ClientError> {
        parse_response(&mut &answer[..])
    }

    #[test]
    fn request_has_upstream_headers_and_body() {
        let call = ApiCall {
            method: "PUT",
            op: "vm.snapshot".into(),
            body: Some(r#"{"destination_url":"file:///s"}"#.into()),
            fds: Vec::new(),
        };
        assert_eq!(
            String::from_utf8(request_bytes(&call)).unwrap(),
            "PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\
             Content-Length: 31\r\n\r\n{\"destination_url\":\"file:///s\"}"
        );
        let boot = ApiCall {
            method: "PUT",
            op: "vm.boot".into(),
            body: None,
            fds: Vec::new(),
        };
        assert_eq!(
            String::from_utf8(request_bytes(&boot)).unwrap(),
            "PUT /api/v1/vm.boot HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
        );
    }

    #[test]
    fn status_without_reason_phrase_is_read() {
        assert_eq!(
            parsed(
                b"HTTP/1.1 200 \r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            )
            .unwrap(),
            Some("{}".to_owned())
        );
        assert_eq!(parsed(b"HTTP/1.1 204 \r\n\r\n").unwrap(), None);
        // A 200 without Content-Length has no body, whatever follows.
        assert_eq!(parsed(b"HTTP/1.1 200 \r\n\r\nignored").unwrap(), None);
        // Content-Length: 0 is an empty body (upstream prints an empty line for it).
        assert_eq!(
            parsed(b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n").unwrap(),
            Some(String::new())
        );
    }

    #[test]
    fn reason_phrase_fails_as_upstream() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"[..],
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ] {
            assert!(
                matches!(parsed(answer), Err(ClientError::StatusCodeParsing(_))),
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[test]
    fn only_100_200_204_succeed() {
        assert!(parsed(b"HTTP/1.1 100 \r\n\r\n").unwrap().is_none());
        for (code, name) in [
            (201, StatusCode::Unknown),
            (400, StatusCode::BadRequest),
            (404, StatusCode::NotFound),
            (405, StatusCode::Unknown),
            (429, StatusCode::TooManyRequests),
            (500, StatusCode::InternalServerError),
            (501, StatusCode::NotImplemented),
        ] {
            let body = r#"["Error from API","x"]"#;
            let answer = format!(
                "HTTP/1.1 {code} \r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            match parsed(answer.as_bytes()) {
                Err(ClientError::ServerResponse(status, Some(text))) => {
                    assert_eq!((status, text.as_str()), (name, body), "{code}");
                }
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[test]
    fn broken_answers() {
        assert!(matches!(
            parsed(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(ClientError::MissingProtocol)
        ));
        assert!(matches!(parsed(b""), Err(ClientError::MissingProtocol)));
        assert!(matches!(
            parsed(b"HTTP/1.1 200 \r\nContent-Length: many\r\n\r\n"),
            Err(ClientError::ContentLengthParsing(_))
        ));
        // A truncated line does not panic.
        assert!(matches!(
            parsed(b"HTTP/1.1"),
            Err(ClientError::StatusCodeParsing(_))
        ));
        // The peer closing early leaves what came as the body.
        assert_eq!(
            parsed(b"HTTP/1.1 200 \r\nContent-Length: 100\r\n\r\n{\"short\":").unwrap(),
            Some("{\"short\":".to_owned())
        );
    }

    /// A one-shot server over a real socket that sends `answer` in small pieces, to exercise
    /// reassembly; returns the request it got.
    fn serve_once(
        answer: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf, thread::JoinHandle<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let handle = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while find(&request, b"\r\n\r\n").is_none() {
                let count = stream.read(&mut chunk).unwrap();
                request.extend_from_slice(&chunk[..count]);
            }
            for piece in answer.chunks(7) {
                stream.write_all(piece).unwrap();
                thread::sleep(Duration::from_millis(1));
            }
            request
        });
        (dir, socket, handle)
    }

    #[test]
    fn answer_in_pieces_over_a_socket() {
        let (_dir, socket, server) = serve_once(
            b"HTTP/1.1 200 \r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"version\":\"v53\"}",
        );
        let mut stream = connect(socket.to_str().unwrap()).unwrap();
        let body = call(
            &mut stream,
            &ApiCall {
                method: "GET",
                op: "vmm.ping".into(),
                body: None,
                fds: Vec::new(),
            },
        )
        .unwrap();
        assert_eq!(body.as_deref(), Some(r#"{"version":"v53"}"#));
        let request = server.join().unwrap();
        assert!(request.starts_with(b"GET /api/v1/vmm.ping HTTP/1.1\r\n"));
    }

    #[test]
    fn descriptors_travel_with_the_request() {
        use std::os::unix::io::AsRawFd;

        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut head = [0u8; 4096];
            let (count, file) = stream.recv_with_fd(&mut head).unwrap();
            let mut request = head[..count].to_vec();
            let mut chunk = [0u8; 1024];
            while !request.ends_with(b"{\"tap\":\"t\"}") {
                let count = stream.read(&mut chunk).unwrap();
                assert!(count > 0, "request cut short");
                request.extend_from_slice(&chunk[..count]);
            }
            let mut passed = String::new();
            file.expect("a descriptor came with the request")
                .read_to_string(&mut passed)
                .unwrap();
            stream.write_all(b"HTTP/1.1 204 \r\n\r\n").unwrap();
            (request, passed)
        });
        let payload = dir.path().join("payload");
        std::fs::write(&payload, "through SCM_RIGHTS").unwrap();
        let file = std::fs::File::open(&payload).unwrap();
        let mut stream = connect(socket.to_str().unwrap()).unwrap();
        let answer = call(
            &mut stream,
            &ApiCall {
                method: "PUT",
                op: "vm.add-net".into(),
                body: Some(r#"{"tap":"t"}"#.into()),
                fds: vec![file.as_raw_fd()],
            },
        )
        .unwrap();
        assert!(answer.is_none());
        let (request, passed) = server.join().unwrap();
        assert!(request.starts_with(b"PUT /api/v1/vm.add-net HTTP/1.1\r\n"));
        assert_eq!(passed, "through SCM_RIGHTS");
    }

    #[test]
    fn missing_socket_is_an_io_error() {
        assert!(connect("/nonexistent/api.sock").is_err());
    }
}
