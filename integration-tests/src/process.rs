//! One `cloud-hypervisor` process under test: spawned with its arguments, stderr (and the serial
//! log when the test routes it to a file) captured in the test's scratch directory, signalled,
//! waited for with a bound, and killed when dropped so a failing test leaves no VMM behind.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::binaries;
use crate::harness::read_log;

/// How long `wait_exit` and the log waits allow unless `with_timeout` says otherwise: generous,
/// because boot is ring-0 emulated on this KVM.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the waits poll.
const POLL: Duration = Duration::from_millis(10);

/// A running (or ended, not yet dropped) `cloud-hypervisor` process.
pub struct VmmProcess {
    child: Child,
    stderr: PathBuf,
    serial: Option<PathBuf>,
    timeout: Duration,
}

impl VmmProcess {
    /// Spawns `cloud-hypervisor arguments` with `env` added, stdin and stdout on /dev/null and
    /// stderr written to `dir/<label>.stderr`.
    pub fn spawn(dir: &Path, label: &str, arguments: &[String], env: &[(&str, &str)]) -> Self {
        let stderr = dir.join(format!("{label}.stderr"));
        let mut command = Command::new(binaries::cloud_hypervisor());
        command
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"));
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawning cloud-hypervisor");
        VmmProcess {
            child,
            stderr,
            serial: None,
            timeout: DEFAULT_TIMEOUT,
        }
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
        arguments.extend([
            "--serial".to_string(),
            format!("file={}", serial.display()),
            "--console".to_string(),
            "off".to_string(),
            "-v".to_string(),
        ]);
        Self::spawn(dir, label, &arguments, env).with_serial(serial)
    }

    /// The path of the serial log the test passed in the arguments (`--serial file=`), for
    /// `serial_log` and `wait_serial`.
    pub fn with_serial(mut self, serial: PathBuf) -> Self {
        self.serial = Some(serial);
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

    /// Sends `signal`; fails the test if kill(2) does.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child, which we have not reaped yet (its pid is still ours).
        let result = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(result, 0, "kill({}, {signal})", self.pid());
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// What the process wrote to stderr so far.
    pub fn stderr_log(&self) -> String {
        read_log(&self.stderr)
    }

    /// The serial log so far; the process must have been given one (`with_serial`).
    pub fn serial_log(&self) -> String {
        read_log(
            self.serial
                .as_deref()
                .expect("this VMM has no serial log file"),
        )
    }

    /// Waits until the serial log satisfies `done` and returns it; fails (and kills the VMM) on
    /// a timeout or if the VMM exits first.
    pub fn wait_serial(&mut self, what: &str, done: impl Fn(&str) -> bool) -> String {
        self.wait_log(what, true, done)
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
            if done(&log) {
                return log;
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
                self.kill();
                panic!("timed out waiting for {what}\n{context}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the API socket at `socket` accepts a connection; fails if the process ends
    /// first or `timeout` passes.
    pub fn wait_for_socket(&mut self, socket: &Path, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = self.try_wait() {
                panic!(
                    "cloud-hypervisor ended ({status}) before serving {}:\n{}",
                    socket.display(),
                    self.stderr_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the API socket {} did not come up:\n{}",
                socket.display(),
                self.stderr_log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// The exit status within `timeout`, or `None` (the process is then killed).
    pub fn wait_exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the process to exit; kills it and fails after the timeout.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let timeout = self.timeout;
        self.wait_exit_within(timeout).unwrap_or_else(|| {
            panic!(
                "the VMM did not exit within {timeout:?}\nstderr:\n{}",
                self.stderr_log()
            )
        })
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
