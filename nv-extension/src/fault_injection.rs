//! Test-only fault points for power failures inside a save.
//!
//! Only a build with the `fault-injection` feature (which the tests enable) has them: there
//! `NV_FAULT_AFTER_PHASE` is read once, at first use, and when it names a point the process
//! calls `abort()` right there: no destructor runs and nothing more reaches the region, which
//! is what a power cut looks like to the medium (for plain files the page cache survives, as it
//! would on an NVDIMM). A build without the feature never reads the variable, so a stray or
//! misspelt one in a production environment cannot fail a real save.

use crate::error::{Error, Result};

pub const ENV_VAR: &str = "NV_FAULT_AFTER_PHASE";

/// A place in the save where a fault can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// After phase K of the coordinator (1 pause .. 5 commit).
    AfterPhase(u8),
    /// Inside the commit: state payload durable, slot header not yet written.
    CommitPayload,
    /// Inside the commit: slot header durable, "saved at seq N" record not yet written.
    CommitHeader,
    /// A step of swap-out or swap-in: one of [`crate::swap::SWAP_FAULT_POINTS`].
    Swap(&'static str),
    /// A step of a checkpoint or of recovery from one: one of
    /// [`crate::checkpoint_area::CHECKPOINT_FAULT_POINTS`].
    Checkpoint(&'static str),
}

impl FaultPoint {
    pub fn parse(text: &str) -> Result<Self> {
        match text.trim() {
            "commit-payload" => Ok(FaultPoint::CommitPayload),
            "commit-header" => Ok(FaultPoint::CommitHeader),
            other if other.starts_with("swap-") => crate::swap::SWAP_FAULT_POINTS
                .iter()
                .find(|name| **name == other)
                .map(|name| FaultPoint::Swap(name))
                .ok_or_else(|| Error::InvalidFaultPoint(text.to_string())),
            other if other.starts_with("ckpt-") => crate::checkpoint_area::CHECKPOINT_FAULT_POINTS
                .iter()
                .find(|name| **name == other)
                .map(|name| FaultPoint::Checkpoint(name))
                .ok_or_else(|| Error::InvalidFaultPoint(text.to_string())),
            other => match other.parse::<u8>() {
                Ok(k @ 1..=5) => Ok(FaultPoint::AfterPhase(k)),
                _ => Err(Error::InvalidFaultPoint(text.to_string())),
            },
        }
    }
}

/// Whether this build has the fault points (the `fault-injection` feature).
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// The configured point, or the text of `NV_FAULT_AFTER_PHASE` when it names none.
#[cfg(feature = "fault-injection")]
fn configured() -> &'static std::result::Result<Option<FaultPoint>, String> {
    static CONFIGURED: std::sync::OnceLock<std::result::Result<Option<FaultPoint>, String>> =
        std::sync::OnceLock::new();
    CONFIGURED.get_or_init(|| match std::env::var(ENV_VAR) {
        Ok(text) if !text.is_empty() => FaultPoint::parse(&text).map(Some).map_err(|_| text),
        _ => Ok(None),
    })
}

/// Without the feature nothing is configured, and the environment is not looked at.
#[cfg(not(feature = "fault-injection"))]
fn configured() -> &'static std::result::Result<Option<FaultPoint>, String> {
    static NOTHING: std::result::Result<Option<FaultPoint>, String> = Ok(None);
    &NOTHING
}

/// Checks the environment once: a misspelt fault point must fail the test, not be ignored.
pub fn check_configuration() -> Result<()> {
    match configured() {
        Ok(_) => Ok(()),
        Err(text) => Err(Error::InvalidFaultPoint(text.clone())),
    }
}

/// Aborts the process if `point` is the configured fault point.
pub(crate) fn reached(point: FaultPoint) {
    if let Ok(Some(configured)) = configured() {
        if *configured == point {
            log::error!("{ENV_VAR}: injecting a power failure at {point:?}");
            std::process::abort();
        }
    }
}

/// Test-only: `NV_SWAP_OUT_PAUSE_MS=<ms>` makes a swap-out wait that long after each 2 MiB
/// chunk of memory it has written, so that an end-to-end test sees its progress (bytes done
/// below the total) deterministically. Like the fault point, only a build with the
/// `fault-injection` feature reads it.
pub const SWAP_OUT_PAUSE_VAR: &str = "NV_SWAP_OUT_PAUSE_MS";

/// The configured pause after each chunk of a swap-out, if any.
#[cfg(feature = "fault-injection")]
fn swap_out_pause() -> Option<std::time::Duration> {
    static PAUSE: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *PAUSE.get_or_init(|| {
        let ms: u64 = std::env::var(SWAP_OUT_PAUSE_VAR)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(std::time::Duration::from_millis(ms))
    })
}

#[cfg(not(feature = "fault-injection"))]
fn swap_out_pause() -> Option<std::time::Duration> {
    None
}

/// Where a swap-out has written a chunk: waits as `NV_SWAP_OUT_PAUSE_MS` says.
pub(crate) fn swap_out_chunk_written() {
    if let Some(pause) = swap_out_pause() {
        std::thread::sleep(pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_point_and_rejects_others() {
        assert_eq!(FaultPoint::parse("3").unwrap(), FaultPoint::AfterPhase(3));
        assert_eq!(
            FaultPoint::parse("commit-payload").unwrap(),
            FaultPoint::CommitPayload
        );
        assert_eq!(
            FaultPoint::parse("commit-header").unwrap(),
            FaultPoint::CommitHeader
        );
        for name in crate::swap::SWAP_FAULT_POINTS {
            assert_eq!(FaultPoint::parse(name).unwrap(), FaultPoint::Swap(name));
        }
        for name in crate::checkpoint_area::CHECKPOINT_FAULT_POINTS {
            assert_eq!(
                FaultPoint::parse(name).unwrap(),
                FaultPoint::Checkpoint(name)
            );
        }
        for bad in ["0", "6", "x", "-1", "swap-out-nowhere", "ckpt-nowhere"] {
            assert!(FaultPoint::parse(bad).is_err(), "{bad}");
        }
    }
}
