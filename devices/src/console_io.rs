//! Where the guest's serial bytes go and come from, chosen so that the VMM never blocks on them:
//! output files opened non-blocking and owner-only, pseudo-terminals (`--serial pty`), an output
//! wrapper that drops what cannot be written instead of stalling or failing the guest (with a
//! rate-limited log), and a thread that feeds host input into the UART's receive FIFO.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{error, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Error, Result, SerialDevice};

/// How often a failing output logs a summary of what it dropped (the first failure is logged at
/// once).
pub const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Opens a `file=` target of `--serial`/`--console` for the guest's output without ever blocking.
///
/// - A file that does not exist is created with mode 0600: guest output may hold secrets.
/// - A regular file is truncated, as upstream does.
/// - A FIFO is opened read-write. Opened write-only, `open(2)` would block until a reader appears
///   (and with `O_NONBLOCK` fails with ENXIO instead). Holding both ends, the VMM never blocks
///   and never gets EPIPE: output fills the pipe (64 KiB) for a reader that attaches later and is
///   dropped once the pipe is full, like a serial line nobody listens to.
/// - Everything is non-blocking (a FIFO, a terminal): a full output drops bytes (see
///   [`LossyOutput`]) instead of stopping the vCPU that wrote them.
pub fn open_output_file(path: &Path) -> io::Result<File> {
    let is_fifo = fs::metadata(path).is_ok_and(|meta| meta.file_type().is_fifo());
    let mut options = OpenOptions::new();
    options
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    if is_fifo {
        options.read(true);
    } else {
        // If a FIFO replaced the file since the check, the write-only non-blocking open fails
        // with ENXIO: an error, never a hang.
        options.create(true).truncate(true);
    }
    options.open(path)
}

/// A pseudo-terminal for `--serial pty` / `--console pty`: the VMM holds the main side, a user
/// attaches to the path of the other side (`screen /dev/pts/N`).
pub struct Pty {
    main: File,
    /// The VMM keeps the other side open too. Without it, the main side reads EIO (and polls
    /// hang-up) whenever no user is attached, and output written then would be thrown away by the
    /// kernel; with it, output waits in the terminal's buffer for the next user.
    _sub: File,
    path: PathBuf,
}

impl Pty {
    /// Opens a new pseudo-terminal in raw mode (no echo, no line editing, no CR/LF translation:
    /// bytes pass unchanged both ways). The main side is non-blocking.
    pub fn open() -> Result<Pty> {
        let fail = |operation: &'static str| Error::Pty {
            operation,
            source: io::Error::last_os_error(),
        };
        // SAFETY: plain FFI call; the result is checked before use.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(fail("posix_openpt"));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let main = unsafe { File::from_raw_fd(fd) };
        // SAFETY: `main` is an open pseudo-terminal main side for both calls.
        if unsafe { libc::grantpt(main.as_raw_fd()) } != 0 {
            return Err(fail("grantpt"));
        }
        // SAFETY: as above.
        if unsafe { libc::unlockpt(main.as_raw_fd()) } != 0 {
            return Err(fail("unlockpt"));
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `name` is writable for its whole length, which is what we pass.
        let rc = unsafe { libc::ptsname_r(main.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        if rc != 0 {
            return Err(Error::Pty {
                operation: "ptsname_r",
                source: io::Error::from_raw_os_error(rc),
            });
        }
        // SAFETY: on success ptsname_r wrote a NUL-terminated string into `name`.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        let path = PathBuf::from(path.to_string_lossy().into_owned());
        let sub = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .map_err(|source| Error::Pty {
                operation: "open the terminal side",
                source,
            })?;
        set_raw_mode(&sub)?;
        set_non_blocking(&main)?;
        Ok(Pty {
            main,
            _sub: sub,
            path,
        })
    }

    /// The path a user opens to reach the guest (`/dev/pts/N`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Another handle on the main side (for the output writer or the input thread).
    pub fn main(&self) -> Result<File> {
        self.main.try_clone().map_err(|source| Error::Pty {
            operation: "dup",
            source,
        })
    }
}

fn set_raw_mode(terminal: &File) -> Result<()> {
    // SAFETY: termios is plain data; tcgetattr overwrites it before it is read.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `terminal` is an open terminal and `termios` is writable.
    if unsafe { libc::tcgetattr(terminal.as_raw_fd(), &mut termios) } != 0 {
        return Err(Error::Pty {
            operation: "tcgetattr",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `termios` is a valid, initialised termios.
    unsafe { libc::cfmakeraw(&mut termios) };
    // SAFETY: `terminal` is open; `termios` is only read.
    if unsafe { libc::tcsetattr(terminal.as_raw_fd(), libc::TCSANOW, &termios) } != 0 {
        return Err(Error::Pty {
            operation: "tcsetattr",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn set_non_blocking(file: &File) -> Result<()> {
    // SAFETY: F_GETFL/F_SETFL only read and set the status flags of an fd we own.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(Error::Pty {
            operation: "fcntl(O_NONBLOCK)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Decides when dropped output is worth a log line: the first failure at once, then at most one
/// summary per interval (with the count of dropped bytes), so a guest writing to `/dev/full`
/// cannot flood the log with a line per byte.
#[derive(Debug)]
pub struct DropReporter {
    interval: Duration,
    last_report: Option<Instant>,
    unreported: u64,
    total: u64,
    failing: bool,
    last_error: String,
}

impl DropReporter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_report: None,
            unreported: 0,
            total: 0,
            failing: false,
            last_error: String::new(),
        }
    }

    /// `bytes` could not be written because of `error`; returns the line to log, if one is due.
    pub fn dropped(&mut self, now: Instant, bytes: usize, error: &io::Error) -> Option<String> {
        self.total += bytes as u64;
        self.unreported += bytes as u64;
        self.failing = true;
        self.last_error = error.to_string();
        if self.last_report.is_none() {
            self.last_report = Some(now);
            self.unreported = 0;
            return Some(format!(
                "cannot write ({error}); guest output is dropped while this lasts, with a \
                 summary at most every {}s",
                self.interval.as_secs()
            ));
        }
        self.summary_if_due(now)
    }

    /// A write went through; returns a summary line if drops are still unreported and one is due.
    pub fn delivered(&mut self, now: Instant) -> Option<String> {
        self.failing = false;
        self.summary_if_due(now)
    }

    /// The summary of drops not yet reported (when the output goes away).
    pub fn finish(&mut self) -> Option<String> {
        (self.unreported > 0).then(|| self.summary(None))
    }

    /// Bytes dropped so far.
    pub fn total_dropped(&self) -> u64 {
        self.total
    }

    fn summary_if_due(&mut self, now: Instant) -> Option<String> {
        let last = self.last_report?;
        let since = now.saturating_duration_since(last);
        if self.unreported == 0 || since < self.interval {
            return None;
        }
        self.last_report = Some(now);
        Some(self.summary(Some(since)))
    }

    fn summary(&mut self, since: Option<Duration>) -> String {
        let period = since
            .map(|since| format!(" in the last {}s", since.as_secs()))
            .unwrap_or_default();
        let line = format!(
            "{} bytes of guest output dropped{period} ({} in all; last error: {}){}",
            self.unreported,
            self.total,
            self.last_error,
            if self.failing {
                ""
            } else {
                "; writing works again"
            }
        );
        self.unreported = 0;
        line
    }
}

/// Guest output that never fails and never blocks the guest: what the inner writer refuses
/// (a full disk, `/dev/full`, a full FIFO or terminal buffer) is dropped, counted and reported
/// through a [`DropReporter`]. `vm-superio` writes each byte as the guest's `out` executes, so an
/// error here would otherwise become a log line per byte.
pub struct LossyOutput<W: Write> {
    inner: W,
    what: String,
    reporter: DropReporter,
}

impl<W: Write> LossyOutput<W> {
    /// `what` names the output in log lines (e.g. `serial output /var/log/vm.serial`).
    pub fn new(inner: W, what: impl Into<String>) -> Self {
        Self::with_interval(inner, what, DROP_REPORT_INTERVAL)
    }

    pub fn with_interval(inner: W, what: impl Into<String>, interval: Duration) -> Self {
        Self {
            inner,
            what: what.into(),
            reporter: DropReporter::new(interval),
        }
    }

    /// Bytes dropped so far.
    pub fn dropped(&self) -> u64 {
        self.reporter.total_dropped()
    }
}

impl<W: Write> Write for LossyOutput<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let result = self.inner.write(buf);
        let now = Instant::now();
        let line = match result {
            Ok(written) if written > 0 => {
                if let Some(line) = self.reporter.delivered(now) {
                    warn!("{}: {line}", self.what);
                }
                return Ok(written);
            }
            // `write_all` retries an interrupted write itself.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Ok(_) => self.reporter.dropped(
                now,
                buf.len(),
                &io::Error::new(io::ErrorKind::WriteZero, "nothing was written"),
            ),
            Err(e) => self.reporter.dropped(now, buf.len(), &e),
        };
        if let Some(line) = line {
            warn!("{}: {line}", self.what);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Nothing is buffered here; a failing flush of the inner writer loses nothing more.
        let _ = self.inner.flush();
        Ok(())
    }
}

impl<W: Write> Drop for LossyOutput<W> {
    fn drop(&mut self) {
        if let Some(line) = self.reporter.finish() {
            warn!("{}: {line}", self.what);
        }
    }
}

/// epoll tokens of the input thread.
const TOKEN_SOURCE: u64 = 0;
const TOKEN_RX_SPACE: u64 = 1;
const TOKEN_STOP: u64 = 2;

/// Feeds bytes from a host file (a pty's main side) into COM1's receive FIFO, never more than
/// the FIFO takes: while it is full the thread stops reading the source (the host side then sees
/// the terminal's own flow control) and waits for the guest to empty it, which the UART reports
/// through the device's receive-space eventfd. Stops when dropped.
pub struct SerialInput {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl SerialInput {
    /// Starts the thread `serial-input`. `rx_space` is the eventfd the device was built with
    /// ([`SerialDevice::with_input`]). The thread runs `start_hook` first (the VMM's seccomp
    /// filter for device I/O threads).
    pub fn start(
        source: File,
        device: Arc<Mutex<SerialDevice>>,
        rx_space: EventFd,
        start_hook: Option<crate::virtio::IoThreadStartHook>,
    ) -> Result<SerialInput> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        let thread_stop = stop.try_clone().map_err(Error::EventFd)?;
        let epoll_fd = epoll::create(true).map_err(Error::Epoll)?;
        // SAFETY: `epoll_fd` was just created and is owned by nothing else.
        let epoll_file = unsafe { File::from_raw_fd(epoll_fd) };
        for (fd, token) in [
            (source.as_raw_fd(), TOKEN_SOURCE),
            (rx_space.as_raw_fd(), TOKEN_RX_SPACE),
            (thread_stop.as_raw_fd(), TOKEN_STOP),
        ] {
            epoll::ctl(
                epoll_fd,
                epoll::ControlOptions::EPOLL_CTL_ADD,
                fd,
                epoll::Event::new(epoll::Events::EPOLLIN, token),
            )
            .map_err(Error::Epoll)?;
        }
        let thread = thread::Builder::new()
            .name("serial-input".to_owned())
            .spawn(move || {
                if let Some(hook) = start_hook {
                    if let Err(e) = hook() {
                        error!("serial input disabled: {e}");
                        return;
                    }
                }
                InputLoop {
                    epoll: epoll_file,
                    source,
                    device,
                    rx_space,
                    pending: Vec::new(),
                    reading: true,
                }
                .run();
                drop(thread_stop);
            })
            .map_err(Error::ThreadSpawn)?;
        Ok(SerialInput {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for SerialInput {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct InputLoop {
    epoll: File,
    source: File,
    device: Arc<Mutex<SerialDevice>>,
    rx_space: EventFd,
    /// Read from the source, not yet taken by the FIFO.
    pending: Vec<u8>,
    /// Whether the source is watched (it is not while `pending` waits for FIFO space).
    reading: bool,
}

/// The receive FIFO of a 16550A.
const FIFO_BYTES: usize = 64;

impl InputLoop {
    fn run(mut self) {
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 3];
        loop {
            let count = match epoll::wait(self.epoll.as_raw_fd(), -1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("serial input stopped: epoll: {e}");
                    return;
                }
            };
            for event in &events[..count] {
                match event.data {
                    TOKEN_STOP => return,
                    TOKEN_RX_SPACE => {
                        let _ = self.rx_space.read();
                    }
                    _ => {
                        if !self.read_source() {
                            return;
                        }
                    }
                }
            }
            self.feed_fifo();
            if self.watch_source(self.pending.is_empty()).is_err() {
                return;
            }
        }
    }

    /// Reads what the source has (when nothing is pending). False when input is over.
    fn read_source(&mut self) -> bool {
        if !self.pending.is_empty() {
            return true;
        }
        let mut buf = [0u8; FIFO_BYTES];
        match self.source.read(&mut buf) {
            Ok(0) => {
                log::info!("serial input: end of input");
                false
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                true
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                true
            }
            Err(e) => {
                error!("serial input stopped: {e}");
                false
            }
        }
    }

    fn feed_fifo(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut device = self
            .device
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let room = device.rx_capacity().min(self.pending.len());
        if room == 0 {
            return;
        }
        match device.enqueue_input(&self.pending[..room]) {
            Ok(taken) => {
                self.pending.drain(..taken);
            }
            Err(e) => warn!("serial input: {e}"),
        }
    }

    fn watch_source(&mut self, reading: bool) -> io::Result<()> {
        if reading == self.reading {
            return Ok(());
        }
        let events = if reading {
            epoll::Events::EPOLLIN
        } else {
            epoll::Events::empty()
        };
        epoll::ctl(
            self.epoll.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_MOD,
            self.source.as_raw_fd(),
            epoll::Event::new(events, TOKEN_SOURCE),
        )
        .inspect_err(|e| error!("serial input stopped: epoll: {e}"))?;
        self.reading = reading;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BusDevice, EventFdInterrupt};
    use rustix::fs::{mkfifoat, Mode, CWD};
    use std::os::unix::fs::PermissionsExt;

    /// A writer that fails every write.
    struct Full;

    impl Write for Full {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
    }

    #[test]
    fn a_failing_output_logs_once_then_a_summary_per_interval() {
        let start = Instant::now();
        let error = io::Error::from_raw_os_error(libc::ENOSPC);
        let mut reporter = DropReporter::new(Duration::from_secs(10));
        let mut lines = Vec::new();
        // 10 000 bytes over 25 s, one byte per 2.5 ms: a line at the start, at 10 s and at 20 s.
        for i in 0..10_000u64 {
            let now = start + Duration::from_micros(i * 2_500);
            lines.extend(reporter.dropped(now, 1, &error));
        }
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines[0].contains("No space left on device"), "{}", lines[0]);
        // Byte 0 was in the first line; bytes 1..=4000 came in the next 10 s.
        assert!(lines[1].starts_with("4000 bytes"), "{}", lines[1]);
        assert!(lines[1].contains("in the last 10s"), "{}", lines[1]);
        assert!(lines[2].starts_with("4000 bytes"), "{}", lines[2]);
        // The output recovers; the rest is reported once it is due, then nothing more.
        let later = start + Duration::from_secs(40);
        let line = reporter.delivered(later).unwrap();
        assert!(line.starts_with("1999 bytes"), "{line}");
        assert!(line.contains("10000 in all"), "{line}");
        assert!(line.ends_with("writing works again"), "{line}");
        assert_eq!(reporter.delivered(later + Duration::from_secs(60)), None);
        assert_eq!(reporter.finish(), None);
        assert_eq!(reporter.total_dropped(), 10_000);
    }

    #[test]
    fn unreported_drops_are_summarised_at_the_end() {
        let start = Instant::now();
        let error = io::Error::from_raw_os_error(libc::EAGAIN);
        let mut reporter = DropReporter::new(Duration::from_secs(10));
        assert!(reporter.dropped(start, 5, &error).is_some());
        assert!(reporter.dropped(start, 7, &error).is_none());
        assert!(reporter.delivered(start).is_none());
        let line = reporter.finish().unwrap();
        assert!(line.starts_with("7 bytes"), "{line}");
    }

    #[test]
    fn lossy_output_never_fails_the_guest() {
        let mut out = LossyOutput::new(Full, "test output");
        for _ in 0..1000 {
            out.write_all(b"x").unwrap();
            out.flush().unwrap();
        }
        assert_eq!(out.dropped(), 1000);
    }

    #[test]
    fn output_files_are_created_owner_only_and_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut file = open_output_file(&path).unwrap();
        file.write_all(b"first run").unwrap();
        drop(file);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut file = open_output_file(&path).unwrap();
        file.write_all(b"x").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"x");
    }

    #[test]
    fn a_fifo_without_reader_opens_at_once_and_keeps_output_for_a_late_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.fifo");
        mkfifoat(CWD, &path, Mode::RUSR | Mode::WUSR).unwrap();
        // A blocking write-only open would hang here: the test would never finish.
        let (done, opened) = std::sync::mpsc::channel();
        let open_path = path.clone();
        thread::spawn(move || {
            let _ = done.send(open_output_file(&open_path));
        });
        let file = opened
            .recv_timeout(Duration::from_secs(5))
            .expect("opening a FIFO without a reader must not block")
            .unwrap();
        let mut out = LossyOutput::new(file, "fifo");
        out.write_all(b"early\n").unwrap();
        // More than the pipe holds: the excess is dropped, nothing blocks.
        for _ in 0..100_000 {
            out.write_all(b"0123456789").unwrap();
        }
        assert!(out.dropped() > 0);
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let mut start = [0u8; 6];
        reader.read_exact(&mut start).unwrap();
        assert_eq!(&start, b"early\n");
    }

    fn read_available(file: &mut File, want: usize, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.len() < want && Instant::now() < deadline {
            match file.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("reading: {e}"),
            }
        }
        got
    }

    #[test]
    fn pty_carries_output_out_and_input_into_the_fifo_with_flow_control() {
        let pty = Pty::open().unwrap();
        assert!(
            pty.path().starts_with("/dev/pts"),
            "{}",
            pty.path().display()
        );
        let line = Arc::new(EventFdInterrupt::new().unwrap());
        let rx_space = EventFd::new(EFD_NONBLOCK).unwrap();
        let device = Arc::new(Mutex::new(SerialDevice::with_input(
            line,
            Box::new(LossyOutput::new(pty.main().unwrap(), "pty")),
            rx_space.try_clone().unwrap(),
        )));
        let _input =
            SerialInput::start(pty.main().unwrap(), device.clone(), rx_space, None).unwrap();
        let mut user = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(pty.path())
            .unwrap();

        // Guest output, byte by byte, arrives unchanged (raw mode: no CR added).
        for b in b"boot\n" {
            device.lock().unwrap().write(0, &[*b]);
        }
        assert_eq!(
            read_available(&mut user, 5, Duration::from_secs(5)),
            b"boot\n"
        );

        // 200 input bytes: more than the 64-byte FIFO. The guest reads them all, in order.
        let input: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
        user.write_all(&input).unwrap();
        let mut received = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while received.len() < input.len() && Instant::now() < deadline {
            let mut dev = device.lock().unwrap();
            let mut lsr = [0u8];
            dev.read(5, &mut lsr);
            if lsr[0] & 1 != 0 {
                let mut b = [0u8];
                dev.read(0, &mut b);
                received.push(b[0]);
            } else {
                drop(dev);
                thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(received, input);
    }
}
