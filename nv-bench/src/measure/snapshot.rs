//! The copy-based baseline through the operator's tool: `ch-remote pause` then
//! `ch-remote snapshot file:///dir` (upstream's layout: config.json, state.json, memory-ranges).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use crate::vmm_process::run_command;

/// Bound for one API call; a 4 GiB snapshot writes 4 GiB.
const API_TIMEOUT: Duration = Duration::from_secs(120);

/// Waits for the API socket to appear (the VMM creates it as it starts).
pub fn wait_for_socket(socket: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !socket.exists() {
        if Instant::now() >= deadline {
            return Err(BenchError::Command {
                command: format!("--api-socket path={}", socket.display()),
                detail: "the VMM did not create its API socket".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Pauses the VM and writes a snapshot into `dir` (created empty); returns the time taken.
pub fn pause_and_snapshot(ch_remote: &Path, socket: &Path, dir: &Path) -> Result<Duration> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| BenchError::io(format!("clearing {}", dir.display()), e))?;
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| BenchError::io(format!("creating {}", dir.display()), e))?;
    let socket_arg = socket.display().to_string();
    let started = Instant::now();
    run_command(
        ch_remote,
        &["--api-socket".into(), socket_arg.clone(), "pause".into()],
        API_TIMEOUT,
    )?;
    run_command(
        ch_remote,
        &[
            "--api-socket".into(),
            socket_arg,
            "snapshot".into(),
            format!("file://{}", dir.display()),
        ],
        API_TIMEOUT,
    )?;
    Ok(started.elapsed())
}
