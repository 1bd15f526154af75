//! One `cloud-hypervisor` process under test or under measurement: spawned with its arguments,
//! its output captured in a file (stderr, and the serial log when routed to a file), signalled,
//! waited for with a bound, and killed when dropped so a failing test or benchmark leaves no VMM
//! burning a core. The end-to-end tests and nv-bench share it: the fallible core (`start`,
//! `send_signal`, `exit_within`) returns errors for nv-bench to report; the test methods on top
//! fail the test instead.

use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::binaries;
use crate::harness::{
    complete_lines, guest_finished, point_serial_to, read_log, serial_file_arguments,
};

/// How long `wait_exit` and the log waits allow unless `with_timeout` says otherwise: generous,
/// because boot is ring-0 emulated on this KVM.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the waits poll.
const POLL: Duration = Duration::from_millis(10);

/// Where a VMM's stdout goes; stderr always goes to its log file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdout {
    /// Discarded (the tests read stderr and the serial file only).
    Null,
    /// Into the same log file as stderr (nv-bench keeps the whole output for its reports).
    Log,
}

/// A running (or ended, not yet dropped) `cloud-hypervisor` process.
pub struct VmmProcess {
    child: Child,
    stderr: PathBuf,
    serial: Option<PathBuf>,
    timeout: Duration,
    /// The VMM's API socket, if the test gave one: a wait that times out asks the VM through it
    /// (`hang_report::vm`).
    api_socket: Option<PathBuf>,
    /// When the command was started: the origin of "command start to ..." durations.
    pub started: Instant,
}

impl VmmProcess {
    /// Starts `binary arguments` with `env` added and stdin on /dev/null; stderr (and stdout if
    /// `stdout` says so) is written to `log`.
    pub fn start(
        binary: &Path,
        arguments: &[String],
        env: &[(&str, &str)],
        log: &Path,
        stdout: Stdout,
    ) -> io::Result<Self> {
        let errors = File::create(log)?;
        let output = match stdout {
            Stdout::Null => Stdio::null(),
            Stdout::Log => Stdio::from(errors.try_clone()?),
        };
        let mut command = Command::new(binary);
        command
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors);
        for (key, value) in env {
            command.env(key, value);
        }
        let started = Instant::now();
        let child = command.spawn()?;
        Ok(VmmProcess {
            child,
            stderr: log.to_path_buf(),
            serial: None,
            timeout: DEFAULT_TIMEOUT,
            api_socket: None,
            started,
        })
    }

    /// Spawns `cloud-hypervisor arguments` with `env` added, stdin and stdout on /dev/null and
    /// stderr written to `dir/<label>.stderr`.
    pub fn spawn(dir: &Path, label: &str, arguments: &[String], env: &[(&str, &str)]) -> Self {
        let stderr = dir.join(format!("{label}.stderr"));
        Self::start(
            &binaries::cloud_hypervisor(),
            arguments,
            env,
            &stderr,
            Stdout::Null,
        )
        .unwrap_or_else(|e| panic!("spawning cloud-hypervisor: {e}"))
    }

    /// `spawn` with the guest's serial port written to `dir/<label>.serial` (`--serial file=`),
    /// the console off and `-v` logging, for `serial_log` and `wait_serial`.
    pub fn spawn_with_serial_file(
        dir: &Path,
        label: &str,
        arguments: &[String],
        env: &[(&str, &str)],
    ) -> Self {
        let serial = dir.join(format!("{label}.serial"));
        let mut arguments = arguments.to_vec();
        arguments.extend(serial_file_arguments(&serial));
        arguments.push("-v".to_string());
        Self::spawn(dir, label, &arguments, env).with_serial(serial)
    }

    /// Restores the snapshot in the directory `snapshot` in a new VMM (`--restore
    /// source_url=file://...,resume=true` and `-v`), with stderr in `dir/<label>.stderr` and the
    /// guest's serial port in `dir/<label>.serial`: the snapshot's config is pointed there
    /// (`point_serial_to`), for `serial_log` and `wait_serial`.
    pub fn spawn_restore(dir: &Path, label: &str, snapshot: &Path) -> Self {
        let serial = dir.join(format!("{label}.serial"));
        point_serial_to(snapshot, &serial);
        let arguments = [
            "--restore".to_string(),
            format!("source_url=file://{},resume=true", snapshot.display()),
            "-v".to_string(),
        ];
        Self::spawn(dir, label, &arguments, &[]).with_serial(serial)
    }

    /// The path of the serial log the test passed in the arguments (`--serial file=`), for
    /// `serial_log` and `wait_serial`.
    pub fn with_serial(mut self, serial: PathBuf) -> Self {
        self.serial = Some(serial);
        self
    }

    /// The API socket the test passed in the arguments (`--api-socket path=`): a `wait_serial`
    /// or `wait_stderr` that times out then reports the VM's counters, whether it pauses, and
    /// its vCPUs' registers (`hang_report::vm`).
    pub fn with_api_socket(mut self, socket: PathBuf) -> Self {
        self.api_socket = Some(socket);
        self
    }

    /// The bound of `wait_exit`, `wait_serial` and `wait_stderr` (`DEFAULT_TIMEOUT` otherwise).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The exit status if the process has ended, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("waiting for cloud-hypervisor")
    }

    /// Sends `signal` (e.g. `libc::SIGPWR`).
    pub fn send_signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: kill(2) on our own child, which we have not reaped yet (its pid is still ours);
        // it touches no memory of ours.
        if unsafe { libc::kill(self.pid(), signal) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Sends `signal`; fails the test if kill(2) does.
    pub fn signal(&self, signal: libc::c_int) {
        if let Err(error) = self.send_signal(signal) {
            panic!("kill({}, {signal}): {error}", self.pid());
        }
    }

    /// Sends `signal` and waits for the exit code `expected` (SIGPWR and "state saved, powered
    /// off", SIGTERM and 0, ...); fails naming `what`, the status and stderr otherwise. Returns
    /// stderr.
    pub fn signal_and_expect_exit(
        &mut self,
        signal: libc::c_int,
        expected: i32,
        what: &str,
    ) -> String {
        self.signal(signal);
        self.expect_exit(expected, what)
    }

    /// Waits for the exit code `expected`; fails naming `what`, the status and stderr otherwise.
    /// Returns stderr.
    pub fn expect_exit(&mut self, expected: i32, what: &str) -> String {
        let status = self.wait_exit();
        let stderr = self.stderr_log();
        assert_eq!(
            status.code(),
            Some(expected),
            "{what} ({status})\nstderr:\n{stderr}"
        );
        stderr
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// What the process wrote to stderr so far.
    pub fn stderr_log(&self) -> String {
        read_log(&self.stderr)
    }

    /// The last `count` lines of stderr, for error reports.
    pub fn stderr_tail(&self, count: usize) -> String {
        let log = self.stderr_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(count)..].join("\n")
    }

    /// The serial log so far; the process must have been given one (`with_serial`).
    pub fn serial_log(&self) -> String {
        read_log(
            self.serial
                .as_deref()
                .expect("this VMM has no serial log file"),
        )
    }

    /// Waits until the serial log's complete lines satisfy `done` and returns them; fails (and
    /// kills the VMM) on a timeout or if the VMM exits first. `done` never sees a line still
    /// being written (a guest writes its serial a byte at a time): no wait can match half a
    /// line (`harness::complete_lines`).
    pub fn wait_serial(&mut self, what: &str, done: impl Fn(&str) -> bool) -> String {
        self.wait_log(what, true, done)
    }

    /// Waits for the test guest `guest` (e.g. "blkcheck") to finish, its "`guest`: done" or a
    /// FAIL line written whole (`harness::guest_finished`), and checks that it passed
    /// ("`guest`: done ok"); fails with the serial log and stderr's tail otherwise. Returns the
    /// serial log.
    pub fn wait_guest_done_ok(&mut self, guest: &str) -> String {
        let log = self.wait_serial(&format!("{guest} to finish"), |log| {
            guest_finished(log, guest)
        });
        assert!(
            log.contains(&format!("{guest}: done ok")),
            "{log}\n{}",
            self.stderr_tail(30)
        );
        log
    }

    /// Waits until stderr satisfies `done` and returns it; fails (and kills the VMM) on a
    /// timeout or if the VMM exits first.
    pub fn wait_stderr(&mut self, what: &str, done: impl Fn(&str) -> bool) -> String {
        self.wait_log(what, false, done)
    }

    fn wait_log(&mut self, what: &str, serial: bool, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + self.timeout;
        loop {
            let log = if serial {
                self.serial_log()
            } else {
                self.stderr_log()
            };
            let seen = if serial { complete_lines(&log) } else { &log };
            if done(seen) {
                return seen.to_string();
            }
            let context = if serial {
                format!("serial:\n{log}\nstderr:\n{}", self.stderr_log())
            } else {
                format!("stderr:\n{log}")
            };
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("VMM exited ({status}) before {what}\n{context}");
            }
            if Instant::now() >= deadline {
                let report = self.hang_report();
                self.kill();
                panic!("timed out waiting for {what}\n{context}\n{report}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What the process's threads and, with `with_api_socket`, its VM are doing: for a wait
    /// that timed out, before the VMM is killed. The log above it shows the guest's last
    /// progress.
    pub fn hang_report(&self) -> String {
        let mut report = crate::hang_report::threads(self.pid());
        if let Some(socket) = &self.api_socket {
            let scratch = self.stderr.parent().unwrap_or(Path::new("/tmp"));
            report.push_str(&crate::hang_report::vm(socket, scratch));
        }
        report
    }

    /// Waits until the API socket at `socket` accepts a connection; fails if the process ends
    /// first or `timeout` passes.
    pub fn wait_for_socket(&mut self, socket: &Path, timeout: Duration) {
        let what = format!("serving the API socket {}", socket.display());
        self.wait_until(&what, timeout, || UnixStream::connect(socket).is_ok());
    }

    /// Waits until the file `socket` exists (a backend that created its socket), without
    /// connecting to it: a vhost-user backend serves one front-end at a time.
    pub fn wait_for_socket_file(&mut self, socket: &Path, timeout: Duration) {
        let what = format!("creating the socket {}", socket.display());
        self.wait_until(&what, timeout, || socket.exists());
    }

    /// Polls `ready` until it holds; fails if the process ends first or `timeout` passes.
    fn wait_until(&mut self, what: &str, timeout: Duration, ready: impl Fn() -> bool) {
        let deadline = Instant::now() + timeout;
        while !ready() {
            if let Some(status) = self.try_wait() {
                panic!(
                    "the process ended ({status}) before {what}:\n{}",
                    self.stderr_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "not {what} within {timeout:?}:\n{}",
                self.stderr_log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// The exit status once the process ends within `timeout`; `None` if it still runs then
    /// (it keeps running). A zero `timeout` only looks.
    pub fn exit_within(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The exit status within `timeout`, or `None` (the process is then killed).
    pub fn wait_exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = self
            .exit_within(timeout)
            .expect("waiting for cloud-hypervisor");
        if status.is_none() {
            self.kill();
        }
        status
    }

    /// Waits for the process to exit; kills it and fails after the timeout.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let timeout = self.timeout;
        if let Some(status) = self
            .exit_within(timeout)
            .expect("waiting for cloud-hypervisor")
        {
            return status;
        }
        let report = crate::hang_report::threads(self.pid());
        self.kill();
        panic!(
            "the VMM did not exit within {timeout:?}\nstderr:\n{}\n{report}",
            self.stderr_log()
        )
    }

    /// Waits for the process to exit for as long as the guest makes progress: `progress` reads
    /// a number from the serial log's complete lines that grows while the guest works (batches
    /// done, say). It fails (with `hang_report`, killing the VMM) once that number has stood
    /// still for the timeout, or if the VMM outlives `give_up` altogether. For runs whose
    /// length depends on the host's load, where a fixed bound on the whole run is either tight
    /// or meaningless.
    pub fn wait_exit_while_progressing(
        &mut self,
        give_up: Duration,
        progress: impl Fn(&str) -> u64,
    ) -> ExitStatus {
        let started = Instant::now();
        let mut last = progress(complete_lines(&self.serial_log()));
        let mut last_change = Instant::now();
        loop {
            if let Some(status) = self
                .exit_within(POLL * 10)
                .expect("waiting for cloud-hypervisor")
            {
                return status;
            }
            let now = progress(complete_lines(&self.serial_log()));
            if now != last {
                (last, last_change) = (now, Instant::now());
            }
            let stalled = last_change.elapsed() >= self.timeout;
            if stalled || started.elapsed() >= give_up {
                let report = self.hang_report();
                self.kill();
                panic!(
                    "{} (progress {last})\nserial:\n{}\nstderr:\n{}\n{report}",
                    if stalled {
                        format!("the guest made no progress for {:?}", self.timeout)
                    } else {
                        format!("the VMM did not exit within {give_up:?}")
                    },
                    self.serial_log(),
                    self.stderr_log()
                );
            }
        }
    }

    /// `wait_exit`'s exit code, -1 for a death by signal.
    pub fn wait_exit_code(&mut self) -> i32 {
        self.wait_exit().code().unwrap_or(-1)
    }

    /// SIGKILL and reap: whatever is left of a VMM the test is done with.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in "VMM" (a shell) whose serial log is `log`, bounded by `timeout` per stall.
    fn shell(script: &str, log: &Path, timeout: Duration) -> VmmProcess {
        let stderr = log.with_extension("stderr");
        VmmProcess::start(
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            &[],
            &stderr,
            Stdout::Null,
        )
        .unwrap()
        .with_serial(log.to_path_buf())
        .with_timeout(timeout)
    }

    fn lines(log: &str) -> u64 {
        log.lines().count() as u64
    }

    /// `wait_serial` on a guest that has written half of its last line: it waits for the rest
    /// (the raw log already matches) and returns the whole line.
    #[test]
    fn wait_serial_waits_for_a_torn_line_to_be_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial");
        std::fs::write(&log, "conrng: sent=100\nconrng: done").unwrap();
        let finished = |log: &str| log.contains("conrng: done") || log.contains("FAIL");
        assert!(
            finished(&read_log(&log)),
            "the raw log matches the half line"
        );
        let script = format!("sleep 0.3; printf ' ok\\n' >> {}; sleep 30", log.display());
        let mut run = shell(&script, &log, Duration::from_secs(30));
        let seen = run.wait_serial("conrng to finish", finished);
        assert_eq!(seen, "conrng: sent=100\nconrng: done ok\n");
    }

    #[test]
    #[should_panic(expected = "timed out waiting for conrng to finish")]
    fn wait_serial_never_matches_a_line_that_stays_torn() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial");
        std::fs::write(&log, "conrng: sent=100\nconrng: done").unwrap();
        let mut run = shell("sleep 30", &log, Duration::from_millis(300));
        run.wait_serial("conrng to finish", |log| log.contains("conrng: done"));
    }

    #[test]
    fn a_run_that_keeps_progressing_may_outlast_the_stall_bound() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial");
        let script = format!(
            "for i in 1 2 3 4 5 6; do echo $i >> {}; sleep 0.1; done",
            log.display()
        );
        let mut run = shell(&script, &log, Duration::from_millis(400));
        let status = run.wait_exit_while_progressing(Duration::from_secs(30), lines);
        assert!(status.success(), "{status}");
        assert_eq!(lines(&run.serial_log()), 6);
    }

    #[test]
    #[should_panic(expected = "the guest made no progress for")]
    fn a_run_that_stands_still_fails_after_the_stall_bound() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial");
        let script = format!("echo 1 >> {}; sleep 30", log.display());
        let mut run = shell(&script, &log, Duration::from_millis(300));
        run.wait_exit_while_progressing(Duration::from_secs(30), lines);
    }
}
