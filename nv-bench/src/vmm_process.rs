//! Short commands the benchmark runs to completion (`ch-remote`). The VMM processes themselves
//! run under the end-to-end tests' harness (`integration_tests::process::VmmProcess`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};

/// Runs a short command (e.g. `ch-remote`) to completion within `timeout`; its stdout on
/// success, an error with its output otherwise.
pub fn run_command(binary: &Path, arguments: &[String], timeout: Duration) -> Result<String> {
    let describe = || format!("{} {}", binary.display(), arguments.join(" "));
    let mut child = Command::new(binary)
        .args(arguments)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError::io(format!("starting {}", describe()), e))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BenchError::Command {
                    command: describe(),
                    detail: format!("still running after {:.1} s", timeout.as_secs_f64()),
                });
            }
            Err(e) => return Err(BenchError::io(format!("waiting for {}", describe()), e)),
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|e| BenchError::io(format!("collecting output of {}", describe()), e))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(BenchError::Command {
            command: describe(),
            detail: format!(
                "{}: {}{}",
                output.status,
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}
