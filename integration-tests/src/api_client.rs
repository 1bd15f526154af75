//! One-shot HTTP/1.1 exchanges over a VMM's `--api-socket`, as the end-to-end tests make them:
//! the request is written, the server closes after answering, and the status and body are
//! returned. Deliberately minimal (no keep-alive, no chunking): the server under test is what is
//! being checked, so the client must not hide its mistakes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Sends raw `request` bytes (they must ask for `Connection: close`, or be a request the server
/// closes after) and returns the answer's status and body. Panics on anything that is not an
/// HTTP answer, or on no answer within `timeout`.
pub fn exchange(socket: &Path, request: &[u8], timeout: Duration) -> (u16, String) {
    let mut stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connecting to the API socket {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(timeout))
        .expect("setting the read timeout");
    stream.write_all(request).expect("sending the request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("reading the answer");
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `method /api/v1/endpoint` with a JSON `body` (empty for none); returns status and body.
pub fn request(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: &str,
    timeout: Duration,
) -> (u16, String) {
    let request = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    exchange(socket, request.as_bytes(), timeout)
}
