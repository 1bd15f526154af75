//! One-shot HTTP/1.1 exchanges over a VMM's `--api-socket`, read the way upstream
//! cloud-hypervisor's `ch-remote` reads them, so a VMM that would break upstream's client breaks
//! these tests too: the status is the text between `HTTP/1.1 ` and the end of the status line,
//! trimmed, parsed as a number (a reason phrase after the code makes it fail), and an error
//! body must be a JSON array of strings. Deliberately minimal (no keep-alive, no chunking): the
//! server under test is what is being checked, so the client must not hide its mistakes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// An answer as upstream's client sees it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The status line exactly as received, without its CRLF.
    pub status_line: String,
    /// Header lines `(name, value)`, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The messages of an error answer: a JSON array of strings with a JSON content type, as
    /// upstream's client requires (it prints them numbered). Panics on anything else.
    pub fn error_messages(&self) -> Vec<String> {
        assert!(self.status >= 400, "not an error answer: {self:?}");
        assert_eq!(
            self.header("Content-Type"),
            Some("application/json"),
            "{self:?}"
        );
        crate::openapi::error_messages(self.body.as_bytes())
            .unwrap_or_else(|error| panic!("{error}"))
    }
}

/// Parses a whole response as upstream's `ch-remote` does. `Err` says what it would choke on.
pub fn parse_answer(response: &str) -> Result<Answer, String> {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of head: {response:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_owned();
    let code = status_line
        .strip_prefix("HTTP/1.1 ")
        .ok_or_else(|| format!("not an HTTP/1.1 status line: {status_line:?}"))?;
    let status = code
        .trim()
        .parse()
        .map_err(|_| format!("Error parsing HTTP status code from {status_line:?}"))?;
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    Ok(Answer {
        status,
        status_line,
        headers,
        body: body.to_owned(),
    })
}

/// Sends raw `request` bytes (they must ask for `Connection: close`, or be a request the server
/// closes after) and returns the whole answer. Panics on anything upstream's client could not
/// read, or on no answer within `timeout`.
pub fn exchange_answer(socket: &Path, request: &[u8], timeout: Duration) -> Answer {
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
    parse_answer(&response).unwrap_or_else(|error| panic!("{error}"))
}

/// [`exchange_answer`], reduced to status and body.
pub fn exchange(socket: &Path, request: &[u8], timeout: Duration) -> (u16, String) {
    let answer = exchange_answer(socket, request, timeout);
    (answer.status, answer.body)
}

/// The bytes of `method /api/v1/endpoint` with a JSON `body` (empty for none).
pub fn request_bytes(method: &str, endpoint: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `method /api/v1/endpoint` with a JSON `body` (empty for none); the whole answer.
pub fn call(socket: &Path, method: &str, endpoint: &str, body: &str, timeout: Duration) -> Answer {
    exchange_answer(socket, &request_bytes(method, endpoint, body), timeout)
}

/// `method /api/v1/endpoint` with a JSON `body` (empty for none); returns status and body.
pub fn request(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: &str,
    timeout: Duration,
) -> (u16, String) {
    let answer = call(socket, method, endpoint, body, timeout);
    (answer.status, answer.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_as_upstreams_client_does() {
        let answer = parse_answer("HTTP/1.1 204 \r\nServer: x\r\n\r\n").unwrap();
        assert_eq!(answer.status, 204);
        assert_eq!(answer.header("server"), Some("x"));
        // A reason phrase is what made every upstream ch-remote call fail.
        assert!(parse_answer("HTTP/1.1 200 OK\r\n\r\n{}").is_err());
        assert!(parse_answer("HTTP/1.0 200 \r\n\r\n").is_err());
    }

    #[test]
    fn error_bodies_must_be_arrays_of_strings() {
        let answer =
            parse_answer("HTTP/1.1 404 \r\nContent-Type: application/json\r\n\r\n[\"Not Found\"]")
                .unwrap();
        assert_eq!(answer.error_messages(), ["Not Found"]);
        let plain =
            parse_answer("HTTP/1.1 404 \r\nContent-Type: application/json\r\n\r\nnope").unwrap();
        assert!(std::panic::catch_unwind(|| plain.error_messages()).is_err());
    }
}
