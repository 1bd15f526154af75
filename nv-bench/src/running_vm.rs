//! A VMM process together with the host-stamped view of its guest's serial output.

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use crate::launch::{arguments, Launch};
use crate::serial::{SerialFollower, TimedLine};
use integration_tests::process::{Stdout, VmmProcess};

use crate::measure::service::EXIT_POWER_FAIL_SAVED;

/// Lines by which a test guest says it stopped for good.
fn is_guest_failure(line: &str) -> bool {
    line.contains("FAIL") || line.contains("FAULT") || line.contains("MISMATCH")
}

/// A started VMM and its serial output.
pub struct RunningVm {
    pub process: VmmProcess,
    pub serial: SerialFollower,
    /// The VMM's JSON event stream (`--event-monitor`), host-stamped line by line like the
    /// serial output: it tells when the VMM resumed the VM, apart from the guest's pace.
    pub events: SerialFollower,
}

impl RunningVm {
    /// Starts the VMM for `launch`. The serial file is followed from its current end, so a
    /// VMM that reuses a file only contributes its own lines. Events go to `<output>.events`.
    /// `extra_arguments` are appended to every VMM command line (`--vmm-arg`).
    pub fn start(
        binary: &Path,
        launch: &Launch,
        serial: &Path,
        api_socket: Option<&Path>,
        output: &Path,
        extra_arguments: &[String],
    ) -> Result<Self> {
        let events_path = output.with_extension("events");
        // A fresh file per process: the follower reads it from the start.
        let _ = std::fs::remove_file(&events_path);
        let events = SerialFollower::from_current_end(&events_path);
        let follower = SerialFollower::from_current_end(serial);
        let mut all_arguments = arguments(launch, serial, &events_path, api_socket);
        all_arguments.extend_from_slice(extra_arguments);
        let process = VmmProcess::start(binary, &all_arguments, &[], output, Stdout::Log)
            .map_err(|e| BenchError::io(format!("starting {}", binary.display()), e))?;
        Ok(Self {
            process,
            serial: follower,
            events,
        })
    }

    /// When the VMM command was started.
    pub fn started(&self) -> Instant {
        self.process.started
    }

    /// Waits until `done` accepts the lines seen so far; fails early when the guest reports
    /// a failure or the VMM exits.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[TimedLine]) -> bool,
    ) -> Result<Vec<TimedLine>> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.serial.lines();
            if done(&lines) {
                return Ok(lines);
            }
            if let Some(line) = lines.iter().find(|line| is_guest_failure(&line.text)) {
                return Err(BenchError::GuestFailed {
                    line: line.text.clone(),
                });
            }
            if let Some(status) = self.exit_within(Duration::ZERO)? {
                return Err(BenchError::UnexpectedExit {
                    what: format!("the VMM (while waiting for {what})"),
                    status,
                    expected: "it to keep running".into(),
                    vmm_tail: self.process.stderr_tail(20),
                });
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(what, timeout));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for at least `count` lines containing `needle`.
    pub fn wait_for_lines(
        &mut self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<TimedLine>> {
        self.wait_for(
            &format!("{count} serial line(s) with {needle:?}"),
            timeout,
            |lines| lines.iter().filter(|l| l.text.contains(needle)).count() >= count,
        )
    }

    /// The VMM's exit status if it ends within `timeout` (it keeps running otherwise).
    pub fn exit_within(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        self.process
            .exit_within(timeout)
            .map_err(|e| BenchError::io("waiting for the VMM", e))
    }

    /// Waits up to `timeout` for the VMM to exit on its own.
    pub fn wait_exit(&mut self, what: &str, timeout: Duration) -> Result<ExitStatus> {
        self.exit_within(timeout)?
            .ok_or_else(|| self.timeout(what, timeout))
    }

    /// A power failure: SIGPWR, then the VMM must exit within `timeout` with the code of a
    /// committed save.
    pub fn power_fail(&mut self, timeout: Duration) -> Result<()> {
        self.process
            .send_signal(libc::SIGPWR)
            .map_err(|e| BenchError::io("sending SIGPWR to the VMM", e))?;
        let status = self.wait_exit("the power-fail save", timeout)?;
        if status.code() == Some(EXIT_POWER_FAIL_SAVED) {
            return Ok(());
        }
        Err(BenchError::UnexpectedExit {
            what: "the VMM after SIGPWR".into(),
            status,
            expected: format!("exit code {EXIT_POWER_FAIL_SAVED} (state saved)"),
            vmm_tail: self.process.stderr_tail(20),
        })
    }

    /// A timeout error carrying the serial and VMM output tails.
    pub fn timeout(&self, what: &str, timeout: Duration) -> BenchError {
        BenchError::Timeout {
            what: what.to_string(),
            timeout_s: timeout.as_secs_f64(),
            serial_tail: self.serial.tail_text(10),
            vmm_tail: self.process.stderr_tail(20),
        }
    }

    /// When the host saw the VMM's first `resumed` VM event, if it has.
    pub fn resumed_at(&self) -> Option<Instant> {
        self.events
            .lines()
            .iter()
            .find(|line| line.text.contains("\"event\"") && line.text.contains("\"resumed\""))
            .map(|line| line.at)
    }

    /// Ends the VMM with SIGKILL (a host crash with no warning) and returns the serial lines.
    pub fn kill(mut self) -> Vec<TimedLine> {
        self.process.kill();
        self.serial.finish()
    }
}
