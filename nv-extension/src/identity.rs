//! Identities: random UUIDs, this host boot, and process owner records.
//!
//! An owner record names a process by (boot id, pid, process start time,
//! claim nonce). The boot id makes every owner from a previous boot stale (a
//! host that lost power has no live owners); the start time defeats pid reuse;
//! the nonce distinguishes claims made by this very process, so a claim
//! dropped without release (or an image replayed in a test) is seen as stale.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Read;
use std::sync::Mutex;

use crate::error::{Error, Result};

/// A random (version 4) UUID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A fresh random UUID from the kernel's random source.
    pub fn random() -> Result<Self> {
        let bytes = random_bytes::<16>()?;
        Ok(Uuid(
            uuid::Builder::from_random_bytes(bytes)
                .into_uuid()
                .into_bytes(),
        ))
    }

    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses the canonical 8-4-4-4-12 hex form (only that one: 36 characters).
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != uuid::fmt::Hyphenated::LENGTH {
            return None;
        }
        uuid::Uuid::try_parse(text)
            .ok()
            .map(|parsed| Uuid(parsed.into_bytes()))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&uuid::Uuid::from_bytes(self.0).hyphenated(), f)
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("reading /dev/urandom", e))?;
    Ok(bytes)
}

/// The kernel's id of the current boot; changes on every host boot.
pub(crate) fn boot_id() -> Result<[u8; 16]> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(|e| Error::io("reading /proc/sys/kernel/random/boot_id", e))?;
    Uuid::parse(text.trim())
        .map(|u| u.0)
        .ok_or_else(|| Error::Unsupported(format!("unparsable boot id {:?}", text.trim())))
}

/// Start time (clock ticks since boot) of a process, `None` if it does not exist.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 22 of the stat line is the start time; `rest` starts at field 3.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Who owns a VM of the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OwnerRecord {
    pub boot_id: [u8; 16],
    pub pid: u32,
    pub start_time: u64,
    pub nonce: u64,
}

/// Claim nonces held by live handles of this process.
static LIVE_CLAIMS: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

fn live_claims() -> std::sync::MutexGuard<'static, BTreeSet<u64>> {
    // A poisoned set is still a valid set: a panic elsewhere cannot corrupt it mid-insert.
    LIVE_CLAIMS.lock().unwrap_or_else(|p| p.into_inner())
}

impl OwnerRecord {
    pub fn is_none(&self) -> bool {
        *self == OwnerRecord::default()
    }

    /// A new claim by the calling process, registered as live until released.
    pub(crate) fn new_claim() -> Result<Self> {
        let pid = std::process::id();
        let start_time = process_start_time(pid)
            .ok_or_else(|| Error::Unsupported("cannot read own /proc/self/stat".into()))?;
        let mut nonce = 0;
        while nonce == 0 || live_claims().contains(&nonce) {
            nonce = u64::from_le_bytes(random_bytes::<8>()?);
        }
        live_claims().insert(nonce);
        Ok(OwnerRecord {
            boot_id: boot_id()?,
            pid,
            start_time,
            nonce,
        })
    }

    /// Forgets this claim in the live set (its record on the medium is cleared separately).
    pub(crate) fn release(&self) {
        live_claims().remove(&self.nonce);
    }

    /// Whether the owner recorded here is a process that still runs.
    pub fn is_live(&self) -> bool {
        if self.is_none() {
            return false;
        }
        match boot_id() {
            Ok(current) if current == self.boot_id => {}
            _ => return false,
        }
        if self.pid == std::process::id() {
            return live_claims().contains(&self.nonce);
        }
        process_start_time(self.pid) == Some(self.start_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_random_v4_and_round_trips_through_text() {
        let a = Uuid::random().unwrap();
        let b = Uuid::random().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.0[6] >> 4, 4);
        let text = a.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(Uuid::parse(&text), Some(a));
        assert_eq!(Uuid::parse("not-a-uuid"), None);
    }

    #[test]
    fn uuid_text_is_the_canonical_lower_case_form_only() {
        let uuid = Uuid([
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x80, 0x11, 0x22, 0x33, 0x44, 0x55,
            0x66, 0x77,
        ]);
        let text = "01234567-89ab-cdef-8011-223344556677";
        assert_eq!(uuid.to_string(), text);
        assert_eq!(format!("{uuid:?}"), text);
        assert_eq!(Uuid::parse(text), Some(uuid));
        assert_eq!(Uuid::parse(&text.to_uppercase()), Some(uuid));
        for other in [
            "0123456789abcdef8011223344556677",
            "{01234567-89ab-cdef-8011-223344556677}",
            "0123456-789ab-cdef-8011-223344556677",
            "01234567-89ab-cdef-8011-22334455667g",
        ] {
            assert_eq!(Uuid::parse(other), None, "{other}");
        }
    }

    #[test]
    fn own_claim_is_live_until_released() {
        let claim = OwnerRecord::new_claim().unwrap();
        assert!(claim.is_live());
        claim.release();
        assert!(!claim.is_live());
    }

    #[test]
    fn owner_from_another_boot_or_dead_process_is_stale() {
        let claim = OwnerRecord::new_claim().unwrap();
        let mut other_boot = claim;
        other_boot.boot_id[0] ^= 0xff;
        assert!(!other_boot.is_live());
        // pid 1 exists but never with our start time; a huge pid never exists.
        let mut other_pid = claim;
        other_pid.pid = u32::MAX - 7;
        assert!(!other_pid.is_live());
        claim.release();
    }

    #[test]
    fn parent_process_is_seen_live() {
        let ppid = std::os::unix::process::parent_id();
        let parent = OwnerRecord {
            boot_id: boot_id().unwrap(),
            pid: ppid,
            start_time: process_start_time(ppid).unwrap(),
            nonce: 1,
        };
        assert!(parent.is_live());
    }
}
