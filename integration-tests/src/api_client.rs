//! One-shot API requests for the end-to-end tests, through the workspace's one client
//! (`api_client`, which reads answers as upstream's `ch-remote` does). These wrappers fail the
//! test on anything upstream's client could not read.

use std::path::Path;
use std::time::Duration;

pub use ::api_client::Answer;
use ::api_client::Connection;

/// Why an exchange got no answer; the text names the step that failed and the error's kind (a
/// read timeout and a reset read apart).
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("connecting to the API socket: {0} ({0:?})")]
    Connect(#[source] std::io::Error),
    #[error("sending the request: {0} ({0:?})")]
    Send(#[source] std::io::Error),
    #[error("reading the answer: {0} ({0:?})")]
    Read(#[source] ::api_client::ClientError),
    #[error("the server closed the connection without an answer")]
    ClosedWithoutAnswer,
}

/// Sends raw `request` bytes and returns the answer, or why there is none (anything upstream's
/// client could not read, no answer within `timeout`): for callers that add what they know of
/// the server to the failure.
pub fn try_exchange(
    socket: &Path,
    request: &[u8],
    timeout: Duration,
) -> Result<Answer, ExchangeError> {
    let mut connection = Connection::open(socket, timeout).map_err(ExchangeError::Connect)?;
    connection.send(request).map_err(ExchangeError::Send)?;
    connection
        .read_answer()
        .map_err(ExchangeError::Read)?
        .ok_or(ExchangeError::ClosedWithoutAnswer)
}

/// Sends raw `request` bytes and returns the answer. Panics on anything upstream's client could
/// not read, or on no answer within `timeout`.
pub fn exchange_answer(socket: &Path, request: &[u8], timeout: Duration) -> Answer {
    try_exchange(socket, request, timeout)
        .unwrap_or_else(|error| panic!("{}: {error}", socket.display()))
}

/// [`exchange_answer`], reduced to status and body.
pub fn exchange(socket: &Path, request: &[u8], timeout: Duration) -> (u16, String) {
    let answer = exchange_answer(socket, request, timeout);
    (answer.status, answer.body)
}

/// The bytes of `method /api/v1/endpoint` with a JSON `body` (empty for none), asking the
/// server to close the connection after its answer.
pub fn request_bytes(method: &str, endpoint: &str, body: &str) -> Vec<u8> {
    ::api_client::test_request_bytes(method, endpoint, Some(body), "Connection: close\r\n")
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
