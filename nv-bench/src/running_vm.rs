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

/// When `events` (a VMM's `--event-monitor` file) shows the event `name`, waiting up to `timeout`
/// for it. The file is read by the follower's own thread every few milliseconds, so an event the
/// VMM wrote before something the caller just saw (the guest's first serial line after a
/// recovery) may not have been read yet: looking once can miss it.
pub fn first_event_within(
    events: &SerialFollower,
    name: &str,
    timeout: Duration,
) -> Option<Instant> {
    let needle = format!("\"{name}\"");
    let deadline = Instant::now() + timeout;
    loop {
        let seen = events
            .lines()
            .iter()
            .find(|line| line.text.contains("\"event\"") && line.text.contains(&needle))
            .map(|line| line.at);
        if seen.is_some() || Instant::now() >= deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
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

    /// When the host saw the VMM's first `resumed` VM event, waiting up to `timeout` for it.
    pub fn wait_for_resumed_event(&self, timeout: Duration) -> Option<Instant> {
        first_event_within(&self.events, "resumed", timeout)
    }

    /// Ends the VMM with SIGKILL (a host crash with no warning) and returns the serial lines.
    pub fn kill(mut self) -> Vec<TimedLine> {
        self.process.kill();
        self.serial.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const RESUMED: &str = "{\n  \"timestamp\": {\n    \"secs\": 0,\n    \"nanos\": 1\n  },\n  \"source\": \"vm\",\n  \"event\": \"resumed\",\n  \"properties\": null\n}\n\n";

    #[test]
    fn an_event_written_after_the_question_is_still_seen() {
        // B-flat asked for the `resumed` event once, when the guest's first serial line was
        // seen: the events follower had not read the file yet and the run got no event.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        let follower = SerialFollower::from_current_end(&path);
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                let mut file = std::fs::File::create(&path).unwrap();
                file.write_all(b"{\n  \"event\": \"resuming\"\n}\n\n")
                    .unwrap();
                file.write_all(RESUMED.as_bytes()).unwrap();
                Instant::now()
            })
        };
        let asked = Instant::now();
        let seen = first_event_within(&follower, "resumed", Duration::from_secs(10));
        let written = writer.join().unwrap();
        let seen = seen.expect("the resumed event, written 30 ms after the question");
        assert!(seen >= written && seen > asked);
    }

    #[test]
    fn an_event_that_never_comes_is_none_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        std::fs::write(&path, "").unwrap();
        let follower = SerialFollower::from_current_end(&path);
        std::fs::write(&path, RESUMED.replace("resumed", "resuming")).unwrap();
        assert_eq!(
            first_event_within(&follower, "resumed", Duration::from_millis(50)),
            None
        );
    }
}
