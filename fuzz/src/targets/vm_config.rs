//! `vm.create` bodies: the JSON parse, the refusal of upstream members we do not implement, and
//! `VmConfig::validate`. An accepted config must be valid and survive its own JSON round trip
//! (what `vm.info` returns must be accepted back, unchanged).

use vmm::api::{build_api_request, ApiRequest};

use crate::{message_kind, signature, text_seeds, Target};

pub struct VmConfigTarget;

const PATH: &str = "/api/v1/vm.create";

/// Parses `body` as the server does: `Ok(config)`, or the error status and message.
fn create(body: &[u8]) -> Result<vmm::config::VmConfig, (u16, String)> {
    match build_api_request(PATH, body, None) {
        Some(Ok(ApiRequest::VmCreate(config))) => Ok(*config),
        Some(Ok(other)) => Err((0, format!("vm.create routed to {other:?}"))),
        Some(Err(error)) => Err((error.status, error.message)),
        None => Err((0, "vm.create has no route".into())),
    }
}

impl Target for VmConfigTarget {
    fn name(&self) -> &'static str {
        "vm_config"
    }

    fn seeds(&mut self) -> Vec<Vec<u8>> {
        text_seeds(&[
            r#"{"payload":{"kernel":"/k"}}"#,
            r#"{"cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":0,"zones":[{"id":"mem0","size":67108864,"file":"/dev/shm/ram","shared":true}]},"payload":{"kernel":"/k","cmdline":"console=ttyS0"},"disks":[{"path":"/d.img","readonly":true,"id":"d0"}],"serial":{"mode":"File","file":"/tmp/s.log"},"console":{"mode":"Off"}}"#,
            r#"{"memory":{"size":1073741824,"shared":true,"prefault":true},"payload":{"kernel":"/k","initramfs":"/i"},"nv":{"region":"/dev/shm/r","vm":"a","create":true,"deadline_ms":50}}"#,
            r#"{"payload":{"kernel":"/k"},"net":[{"tap":"t0"}]}"#,
            r#"{"payload":{"kernel":"/k"},"landlock_enable":false,"landlock_rules":[]}"#,
        ])
    }

    fn dictionary(&self) -> &'static [&'static [u8]] {
        &[
            b"\"cpus\":",
            b"\"boot_vcpus\":",
            b"\"max_vcpus\":",
            b"\"memory\":",
            b"\"size\":",
            b"\"zones\":[",
            b"\"file\":",
            b"\"shared\":true",
            b"\"hugepages\":true",
            b"\"payload\":",
            b"\"kernel\":",
            b"\"firmware\":",
            b"\"disks\":[",
            b"\"path\":",
            b"\"serial\":",
            b"\"mode\":\"File\"",
            b"\"mode\":\"Pty\"",
            b"\"nv\":",
            b"\"region\":",
            b"\"region_size\":",
            b"\"landlock_enable\":true",
            b"\"net\":",
            b"\"platform\":",
            b"null",
            b"true",
            b"[]",
            b"{}",
            b"\"\"",
            b"\"\\u0000\"",
            b"-0",
            b"1.5",
        ]
    }

    fn execute(&mut self, input: &[u8]) -> Result<u64, String> {
        match create(input) {
            Ok(config) => {
                config
                    .validate()
                    .map_err(|e| format!("accepted a config validate() refuses: {e}"))?;
                let json = serde_json::to_vec(&config).map_err(|e| format!("re-encoding: {e}"))?;
                match create(&json) {
                    Ok(again) if again == config => Ok(signature(&[b"accepted"])),
                    Ok(again) => Err(format!(
                        "accepted config changes on its round trip: {config:?} -> {again:?}"
                    )),
                    Err((status, message)) => Err(format!(
                        "accepted config is refused after its round trip ({status} {message}): {}",
                        String::from_utf8_lossy(&json)
                    )),
                }
            }
            Err((400, message)) => {
                // Its kind: how it starts and how it ends (member names are in the middle).
                let kind = message_kind(&message, 3);
                let tail: Vec<&str> = message.split_whitespace().rev().take(2).collect();
                Ok(signature(&[
                    kind.as_bytes(),
                    message_kind(&tail.join(" "), 2).as_bytes(),
                ]))
            }
            Err((status, message)) => Err(format!("vm.create answered {status}: {message}")),
        }
    }
}
