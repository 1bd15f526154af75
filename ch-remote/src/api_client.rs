//! A small, blocking HTTP/1.1 client over the API's Unix socket: one request per connection,
//! `Content-Length` bodies, responses parsed with `httparse`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::commands::ApiCall;

/// How long to wait for an answer: the VMM may be saving a large VM (snapshot) before it answers.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest response head accepted.
const MAX_HEAD_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("API socket {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the VMM closed the connection without a complete answer")]
    Truncated,
    #[error("the VMM's answer is not valid HTTP: {0}")]
    BadResponse(String),
    /// The server refused or failed the operation; `message` is its error text.
    #[error("{method} {op} failed: HTTP {status}: {message}")]
    Status {
        method: &'static str,
        op: String,
        status: u16,
        message: String,
    },
}

pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    pub fn new(socket: &Path) -> Self {
        ApiClient {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends `call`; `Ok(Some(body))` for a 2xx answer with a body, `Ok(None)` for one without.
    pub fn call(&self, call: &ApiCall) -> Result<Option<Vec<u8>>, ClientError> {
        let path = self.socket.display().to_string();
        let io_error = |source| ClientError::Io {
            path: path.clone(),
            source,
        };
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
                path: path.clone(),
                source,
            })?;
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(io_error)?;
        stream.write_all(&request_bytes(call)).map_err(io_error)?;
        let (status, body) = read_response(&mut stream).map_err(|error| match error {
            ReadError::Io(source) => io_error(source),
            ReadError::Client(error) => error,
        })?;
        if (200..300).contains(&status) {
            Ok((!body.is_empty()).then_some(body))
        } else {
            Err(ClientError::Status {
                method: call.method,
                op: call.op.clone(),
                status,
                message: String::from_utf8_lossy(&body).trim().to_owned(),
            })
        }
    }
}

/// The bytes of one request; the connection is closed after the answer.
pub fn request_bytes(call: &ApiCall) -> Vec<u8> {
    let mut head = format!(
        "{} /api/v1/{} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n",
        call.method, call.op
    );
    let body = call.body.as_deref().unwrap_or("");
    if call.body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

enum ReadError {
    Io(io::Error),
    Client(ClientError),
}

impl From<io::Error> for ReadError {
    fn from(error: io::Error) -> Self {
        ReadError::Io(error)
    }
}

/// Reads one response: its status and body (by Content-Length, else up to end of stream).
fn read_response(stream: &mut impl Read) -> Result<(u16, Vec<u8>), ReadError> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let parsed = response
            .parse(&buffer)
            .map_err(|error| ReadError::Client(ClientError::BadResponse(error.to_string())))?;
        if let httparse::Status::Complete(head_length) = parsed {
            let status = response.code.unwrap_or_default();
            if status == 100 {
                // An interim answer; the real one follows.
                buffer.drain(..head_length);
                continue;
            }
            let content_length = content_length(response.headers)?;
            let mut body = buffer.split_off(head_length);
            match content_length {
                Some(length) => {
                    while body.len() < length {
                        let count = stream.read(&mut chunk)?;
                        if count == 0 {
                            return Err(ReadError::Client(ClientError::Truncated));
                        }
                        body.extend_from_slice(&chunk[..count]);
                    }
                    body.truncate(length);
                }
                None if status == 204 || status == 304 => body.clear(),
                None => {
                    stream.read_to_end(&mut body)?;
                }
            }
            return Ok((status, body));
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return Err(ReadError::Client(ClientError::BadResponse(
                "response head too large".into(),
            )));
        }
        let count = stream.read(&mut chunk)?;
        if count == 0 {
            return Err(ReadError::Client(ClientError::Truncated));
        }
        buffer.extend_from_slice(&chunk[..count]);
    }
}

fn content_length(headers: &[httparse::Header]) -> Result<Option<usize>, ReadError> {
    let Some(header) = headers
        .iter()
        .find(|header| header.name.eq_ignore_ascii_case("content-length"))
    else {
        return Ok(None);
    };
    std::str::from_utf8(header.value)
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| ReadError::Client(ClientError::BadResponse("bad Content-Length".into())))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::thread;

    use super::*;

    /// A one-shot server: records the request it got and sends `answer` in small pieces, to
    /// exercise reassembly.
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
            // The request ends with its head when it has no body, or after Content-Length bytes.
            loop {
                let count = stream.read(&mut chunk).unwrap();
                request.extend_from_slice(&chunk[..count]);
                let mut headers = [httparse::EMPTY_HEADER; 16];
                let mut parsed = httparse::Request::new(&mut headers);
                if let Ok(httparse::Status::Complete(head)) = parsed.parse(&request) {
                    let length = content_length(parsed.headers).ok().flatten().unwrap_or(0);
                    if request.len() >= head + length {
                        break;
                    }
                }
            }
            for piece in answer.chunks(7) {
                // The client may hang up early on garbage: not this side's failure.
                if stream.write_all(piece).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(1));
            }
            request
        });
        (dir, socket, handle)
    }

    fn put_boot() -> ApiCall {
        ApiCall {
            method: "PUT",
            op: "vm.boot".into(),
            body: None,
        }
    }

    #[test]
    fn request_carries_method_path_and_body() {
        let call = ApiCall {
            method: "PUT",
            op: "vm.snapshot".into(),
            body: Some(r#"{"destination_url":"file:///s"}"#.into()),
        };
        let bytes = String::from_utf8(request_bytes(&call)).unwrap();
        assert!(bytes.starts_with("PUT /api/v1/vm.snapshot HTTP/1.1\r\n"));
        assert!(bytes.contains("Content-Length: 31\r\n"));
        assert!(bytes.ends_with("\r\n\r\n{\"destination_url\":\"file:///s\"}"));
    }

    #[test]
    fn json_answer_is_returned() {
        let (_dir, socket, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"version\":\"v53\"}",
        );
        let body = ApiClient::new(&socket)
            .call(&ApiCall {
                method: "GET",
                op: "vmm.ping".into(),
                body: None,
            })
            .unwrap();
        assert_eq!(body.unwrap(), br#"{"version":"v53"}"#);
        let request = server.join().unwrap();
        assert!(request.starts_with(b"GET /api/v1/vmm.ping HTTP/1.1\r\n"));
    }

    #[test]
    fn no_content_is_none() {
        let (_dir, socket, server) = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert!(ApiClient::new(&socket).call(&put_boot()).unwrap().is_none());
        server.join().unwrap();
    }

    #[test]
    fn interim_100_is_skipped() {
        let (_dir, socket, server) =
            serve_once(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n");
        assert!(ApiClient::new(&socket).call(&put_boot()).unwrap().is_none());
        server.join().unwrap();
    }

    #[test]
    fn error_status_carries_the_server_message() {
        let (_dir, socket, server) = serve_once(
            b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 13\r\n\r\nVM is Running",
        );
        let error = ApiClient::new(&socket).call(&put_boot()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "PUT vm.boot failed: HTTP 405: VM is Running"
        );
        server.join().unwrap();
    }

    #[test]
    fn truncated_answer_is_an_error() {
        let (_dir, socket, server) =
            serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"short\":");
        let error = ApiClient::new(&socket).call(&put_boot()).unwrap_err();
        assert!(matches!(error, ClientError::Truncated), "{error}");
        server.join().unwrap();
    }

    #[test]
    fn garbage_answer_is_an_error() {
        let (_dir, socket, server) = serve_once(b"SSH-2.0-OpenSSH\r\n\r\n");
        let error = ApiClient::new(&socket).call(&put_boot()).unwrap_err();
        assert!(matches!(error, ClientError::BadResponse(_)), "{error}");
        server.join().unwrap();
    }

    #[test]
    fn missing_socket_names_the_path() {
        let error = ApiClient::new(Path::new("/nonexistent/api.sock"))
            .call(&put_boot())
            .unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/api.sock"),
            "{error}"
        );
    }
}
