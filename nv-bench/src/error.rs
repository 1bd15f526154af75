//! The benchmark's error type: every way a measurement can fail to produce a number.

use std::path::PathBuf;
use std::process::ExitStatus;

/// Why a benchmark step failed. A failed step never produces a number; the run reports it.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("building the {guest} test guest: {source}")]
    GuestBuild {
        guest: String,
        #[source]
        source: integration_tests::guests::GuestBuildError,
    },

    #[error("`cargo build -p {package}` failed ({status}); fix the build or pass --ch-binary/--ch-remote-binary")]
    CargoBuild { package: String, status: ExitStatus },

    #[error("reading the host TSC rate from /dev/kvm: {0}")]
    Kvm(#[from] kvm_ioctls::Error),

    #[error("{what} did not happen within {timeout_s:.1} s\n--- serial (last lines) ---\n{serial_tail}\n--- VMM output (last lines) ---\n{vmm_tail}")]
    Timeout {
        what: String,
        timeout_s: f64,
        serial_tail: String,
        vmm_tail: String,
    },

    #[error("the guest reported a failure: {line}")]
    GuestFailed { line: String },

    #[error("{what} ended with {status}, expected {expected}\n--- VMM output (last lines) ---\n{vmm_tail}")]
    UnexpectedExit {
        what: String,
        status: ExitStatus,
        expected: String,
        vmm_tail: String,
    },

    #[error("NV region: {0}")]
    Nv(#[from] nv_extension::Error),

    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },

    #[error("the VMM printed no power-fail phase timings in {log}; cannot report save phases")]
    NoPhaseTimings { log: PathBuf },

    #[error("drawing {path}: {detail}")]
    Plot { path: PathBuf, detail: String },

    #[error("no usable font for plot labels ({detail}); install fonts-dejavu-core (ci/install-deps.sh does) or pass --font PATH")]
    Font { detail: String },
}

impl BenchError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, BenchError>;
