//! How a failure is shown on stderr, in upstream's layout: a heading, then each cause of the
//! chain numbered from 0. An error answer from the VMM is unfolded into its status and the JSON
//! array of messages the VMM sent (first the layer, then the causes), continuing the numbering:
//!
//! ```text
//! Error: ch-remote exited with the following chain of errors:
//!   0: http client error
//!   1: Server responded with NotFound
//!   2: Error from API
//!   3: The VM info is not available
//!   4: VM is not created
//! ```
//!
//! A body that is not such an array is shown after `X:` with the reason it could not be read.

use std::error::Error;
use std::fmt::Write;

use api_client::ClientError;

const INDENT: &str = "  ";

pub fn render(top: &(dyn Error + 'static)) -> String {
    let mut text = String::from("Error: ch-remote exited with the following ");
    if top.source().is_none() {
        let _ = writeln!(text, "error:\n{INDENT}{top}");
        return text;
    }
    text.push_str("chain of errors:\n");
    let mut level = 0;
    let mut next = Some(top);
    while let Some(error) = next {
        match error.downcast_ref::<ClientError>() {
            Some(ClientError::ServerResponse(status, body)) => {
                let body = body.as_deref().unwrap_or("");
                match serde_json::from_str::<Vec<String>>(body) {
                    Ok(messages) => {
                        let status = format!("Server responded with {status:?}");
                        for message in std::iter::once(status).chain(messages) {
                            let _ = writeln!(text, "{INDENT}{level}: {message}");
                            level += 1;
                        }
                    }
                    Err(reason) => {
                        let _ = writeln!(
                            text,
                            "{INDENT}X: Can't get remote's error messages from JSON response: \
                             {reason}: body='{body}'"
                        );
                    }
                }
                // The answer is the end of the chain.
                break;
            }
            _ => {
                let _ = writeln!(text, "{INDENT}{level}: {error}");
                level += 1;
            }
        }
        next = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use api_client::StatusCode;

    #[derive(Debug, thiserror::Error)]
    #[error("http client error")]
    struct Top(#[source] ClientError);

    #[derive(Debug, thiserror::Error)]
    #[error("just this")]
    struct Alone;

    fn server(status: StatusCode, body: Option<&str>) -> String {
        render(&Top(ClientError::ServerResponse(
            status,
            body.map(str::to_owned),
        )))
    }

    /// The whole text for a 404 with upstream's three messages is pinned end to end, on the
    /// binary's stderr, by `api_error_exits_1_with_the_messages_numbered_on_stderr` in
    /// tests/against_api_server.rs.
    #[test]
    fn api_error_messages_are_numbered_after_the_status() {
        assert_eq!(
            server(StatusCode::InternalServerError, Some(r#"["a"]"#)),
            "Error: ch-remote exited with the following chain of errors:\n  \
             0: http client error\n  1: Server responded with InternalServerError\n  2: a\n"
        );
    }

    #[test]
    fn non_json_error_body_is_shown_with_the_reason() {
        let text = server(StatusCode::BadRequest, Some("VM is Running"));
        assert!(
            text.contains(
                "  0: http client error\n  X: Can't get remote's error messages from JSON \
                 response: expected value at line 1 column 1: body='VM is Running'\n"
            ),
            "{text}"
        );
        let empty = server(StatusCode::NotFound, None);
        assert!(empty.contains("body=''"), "{empty}");
        // An object is not an array of strings either.
        assert!(server(StatusCode::NotFound, Some(r#"{"a":1}"#)).contains("X: Can't get"));
    }

    #[test]
    fn other_chains_and_single_errors() {
        let parse = "x".parse::<u8>().unwrap_err();
        assert_eq!(
            render(&Top(ClientError::StatusCodeParsing(parse))),
            "Error: ch-remote exited with the following chain of errors:\n\
             \x20 0: http client error\n\
             \x20 1: Error parsing HTTP status code\n\
             \x20 2: invalid digit found in string\n"
        );
        assert_eq!(
            render(&Alone),
            "Error: ch-remote exited with the following error:\n  just this\n"
        );
    }
}
