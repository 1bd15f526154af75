//! The REST API's HTTP/1.1 reader and router (`vmm/src/api/http.rs`, `routes.rs`): raw bytes as
//! a client would send them on the socket, possibly several pipelined requests.

use vmm::api::{route_connection_bytes, RoutedRequest};

use crate::{message_kind, signature, Target};

pub struct HttpTarget;

const VM_CONFIG: &str = r#"{"cpus":{"boot_vcpus":1,"max_vcpus":1},"memory":{"size":33554432},"payload":{"kernel":"/k"}}"#;

impl Target for HttpTarget {
    fn name(&self) -> &'static str {
        "http"
    }

    fn seeds(&mut self) -> Vec<Vec<u8>> {
        let put = |path: &str, body: &str| {
            format!(
                "PUT /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        };
        vec![
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
            b"GET /api/v1/vm.info HTTP/1.0\r\n\r\n".to_vec(),
            put("vm.create", VM_CONFIG),
            put("vm.snapshot", r#"{"destination_url":"file:///tmp/s"}"#),
            put("vm.restore", r#"{"source_url":"file:///tmp/s","resume":true,"memory_restore_mode":"OnDemand"}"#),
            put("vm.nv-recover", r#"{"region":"/dev/shm/r","vm":"a"}"#),
            b"GET /api/v1/vmm.nv-regions?region=%2Fdev%2Fshm%2Fr HTTP/1.1\r\n\r\n".to_vec(),
            b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET /api/v1/vm.info HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            b"PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(),
            b"GET /api/v1/vm.resize HTTP/1.1\r\n\r\n".to_vec(),
        ]
    }

    fn dictionary(&self) -> &'static [&'static [u8]] {
        &[
            b"HTTP/1.1",
            b"HTTP/1.0",
            b"\r\n",
            b"\r\n\r\n",
            b"Content-Length: ",
            b"Content-Length: 99999999999999999999",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: identity",
            b"Connection: close",
            b"Connection: keep-alive",
            b"Expect: 100-continue",
            b"/api/v1/",
            b"vm.create",
            b"vm.snapshot",
            b"vm.restore",
            b"vm.nv-recover",
            b"vmm.nv-regions?region=",
            b"%2F",
            b"%ff",
            b"%",
            b"GET ",
            b"PUT ",
            b"POST ",
            b"{}",
            b"null",
        ]
    }

    fn max_len(&self) -> usize {
        32 << 10
    }

    fn execute(&mut self, input: &[u8]) -> Result<u64, String> {
        let routed = route_connection_bytes(input);
        let mut parts: Vec<Vec<u8>> = Vec::new();
        for request in &routed {
            match request {
                RoutedRequest::Refused(status) => {
                    if let Some(status) = status {
                        if !(400..600).contains(status) {
                            return Err(format!("framing refused with status {status}"));
                        }
                    }
                    parts.push(format!("refused {status:?}").into_bytes());
                }
                RoutedRequest::Request {
                    method,
                    path,
                    body_len,
                    outcome,
                } => {
                    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(format!("accepted method {method:?}"));
                    }
                    if path
                        .bytes()
                        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
                    {
                        return Err(format!("accepted path {path:?}"));
                    }
                    if *body_len > 1 << 20 {
                        return Err(format!(
                            "accepted a {body_len}-byte body over the 1 MiB limit"
                        ));
                    }
                    match outcome {
                        Ok(request) => {
                            let text = format!("{request:?}");
                            parts
                                .push(message_kind(&text.replace(['(', '{'], " "), 1).into_bytes());
                        }
                        Err(error) => {
                            if !(400..600).contains(&error.status) {
                                return Err(format!("error status {}", error.status));
                            }
                            parts.push(
                                format!("{} {}", error.status, message_kind(&error.message, 3))
                                    .into_bytes(),
                            );
                        }
                    }
                }
            }
        }
        let borrowed: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        Ok(signature(&borrowed))
    }
}
