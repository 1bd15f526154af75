//! One `cloud-hypervisor` (or `ch-remote`) process under the benchmark's control: started
//! with its output in a file, signalled, waited for with a bound, and never left running
//! (dropping it kills it), so a failed measurement cannot leave a guest burning a core.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};

/// A running VMM.
pub struct VmmProcess {
    child: Option<Child>,
    output_path: PathBuf,
    /// When the command was started: the origin of "command start to ..." durations.
    pub started: Instant,
}

impl VmmProcess {
    /// Starts `binary` with `arguments`; stdout and stderr go to `output_path`.
    pub fn spawn(binary: &Path, arguments: &[String], output_path: &Path) -> Result<Self> {
        let output = File::create(output_path)
            .map_err(|e| BenchError::io(format!("creating {}", output_path.display()), e))?;
        let errors = output
            .try_clone()
            .map_err(|e| BenchError::io("duplicating the VMM output file", e))?;
        let started = Instant::now();
        let child = Command::new(binary)
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .spawn()
            .map_err(|e| BenchError::io(format!("starting {}", binary.display()), e))?;
        Ok(Self {
            child: Some(child),
            output_path: output_path.to_path_buf(),
            started,
        })
    }

    pub fn output_path(&self) -> &Path {
        &self.output_path
    }

    /// The last `count` lines the VMM printed, for error reports.
    pub fn output_tail(&self, count: usize) -> String {
        let text = std::fs::read_to_string(&self.output_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(count)..].join("\n")
    }

    /// Sends `signal` (e.g. `libc::SIGPWR`) to the process.
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        let Some(child) = self.child.as_ref() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(child.id()).map_err(|_| {
            BenchError::io(
                "VMM pid out of range",
                std::io::ErrorKind::InvalidData.into(),
            )
        })?;
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped, so the pid
        // cannot have been reused) and a valid signal number; it touches no memory of ours.
        let result = unsafe { libc::kill(pid, signal) };
        if result != 0 {
            return Err(BenchError::io(
                format!("sending signal {signal} to the VMM"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to end; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| BenchError::io("waiting for the VMM", e))?
            {
                self.child = None;
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Kills the process (SIGKILL: a host crash with no warning) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

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
