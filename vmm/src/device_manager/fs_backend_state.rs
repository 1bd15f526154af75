//! virtiofsd's own state in a virtio-fs device's saved state: the bytes the backend wrote
//! through SET_DEVICE_STATE_FD (its inodes, open handles and FUSE_INIT options) with the rings
//! stopped, kept in the JSON state as base64 with their length and CRC-32C, and given to the
//! virtiofsd a restore connects to before the rings start (see `docs/devices.md`).

use std::path::Path;

use devices::virtio::VhostUserFsLink;
use serde::{Deserialize, Serialize};

use super::Error;

/// The backend's device state as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendState {
    /// Bytes of the state (before base64).
    pub len: u64,
    /// CRC-32C of the bytes, checked before they go to a backend.
    pub crc32c: u32,
    /// The bytes, base64 (RFC 4648, with padding).
    pub base64: String,
}

impl BackendState {
    pub fn encode(bytes: &[u8]) -> Self {
        BackendState {
            len: bytes.len() as u64,
            crc32c: crc32c::crc32c(bytes),
            base64: base64_encode(bytes),
        }
    }

    /// The bytes, or why they are not the ones saved.
    pub fn decode(&self) -> Result<Vec<u8>, String> {
        let bytes = base64_decode(&self.base64).ok_or("its base64 is malformed")?;
        if bytes.len() as u64 != self.len {
            return Err(format!(
                "{} bytes where {} were saved",
                bytes.len(),
                self.len
            ));
        }
        let crc = crc32c::crc32c(&bytes);
        if crc != self.crc32c {
            return Err(format!(
                "CRC-32C {crc:#010x} where {:#010x} was saved",
                self.crc32c
            ));
        }
        Ok(bytes)
    }
}

/// Reads the backend state of virtio-fs device `id` on `link` (its device is paused, the rings
/// stopped), cold-plugged or hotplugged alike: the state, or why there is none although the
/// backend offers it. A failure does not fail the save (the VM's own state matters more): it
/// is logged naming the device and recorded in the state.
pub(super) fn save(id: &str, link: &VhostUserFsLink) -> (Option<BackendState>, Option<String>) {
    match link.save_device_state() {
        Ok(Some(bytes)) => (Some(BackendState::encode(&bytes)), None),
        Ok(None) => (None, None),
        Err(e) => {
            log::error!(
                "virtio-fs {id}: the backend's FUSE state is not saved ({e}); after a restore on a \
                 new virtiofsd the guest's open files and looked-up names on it fail"
            );
            (None, Some(e.to_string()))
        }
    }
}

/// The backend state to give the restored device's backend (`saved`, and why it is missing
/// when the save said so), checked. A state whose bytes do not check is refused; a save that
/// lacked it is said in the log.
pub(super) fn restore(
    what: &str,
    socket: &Path,
    saved: Option<&BackendState>,
    missing: Option<&str>,
) -> Result<Option<Vec<u8>>, Error> {
    if let Some(why) = missing {
        log::warn!(
            "{what}: the save has no state of the backend at {} ({why}); the guest's FUSE \
             session continues only if the backend process is the one it had",
            socket.display()
        );
    }
    saved
        .map(|state| {
            state.decode().map_err(|why| {
                Error::State(format!(
                    "{what}: the saved state of the backend at {} is damaged: {why}",
                    socket.display()
                ))
            })
        })
        .transpose()
}

fn base64_encode(bytes: &[u8]) -> String {
    data_encoding::BASE64.encode(bytes)
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    data_encoding::BASE64.decode(text.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors_and_round_trips() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        for bad in ["Zg=", "Z===", "Zm9*", "===="] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_damaged_backend_state_is_refused_not_passed_on() {
        let state = BackendState::encode(b"virtiofsd state");
        assert_eq!(state.decode().unwrap(), b"virtiofsd state");
        let mut flipped = state.clone();
        flipped.base64.replace_range(0..1, "W");
        assert!(flipped.decode().unwrap_err().contains("CRC-32C"));
        let mut short = state.clone();
        short.len += 1;
        assert!(short.decode().unwrap_err().contains("were saved"));
        let mut garbage = state;
        garbage.base64.push('!');
        assert!(garbage.decode().is_err());
    }
}
