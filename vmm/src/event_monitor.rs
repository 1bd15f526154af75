//! `--event-monitor path=..|fd=..`: a stream of JSON events in upstream's shape, so that tools
//! written for cloud-hypervisor's monitor read ours unchanged.
//!
//! Each event is one pretty-printed JSON object followed by an empty line, as upstream writes it:
//!
//! ```text
//! {
//!   "timestamp": { "secs": 0, "nanos": 41250 },
//!   "source": "vm",
//!   "event": "booted",
//!   "properties": null
//! }
//! ```
//!
//! `timestamp` is the time since the monitor was opened; `properties` is `null` or an object of
//! strings. Upstream's sources and events: `vmm` `starting`/`shutdown`; `vm` `booting`, `booted`,
//! `pausing`, `paused`, `resuming`, `resumed`, `snapshotting`, `snapshotted`, `restoring`,
//! `restored`, `rebooting`, `rebooted`, `shutdown`, `deleted`. Ours adds source `nv` (see [`nv`]).
//!
//! Emitting never blocks on the file: events go through a channel to a writer thread, because the
//! power-fail path emits while it races a deadline and must not wait on a slow reader of a pipe.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{EventMonitorConfig, SeccompMode};
use crate::seccomp_filters::{apply_filter_for_mode, ThreadKind};

/// How long `flush` waits for the writer thread before giving up (a stuck pipe reader must not
/// keep the VMM from exiting).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EventMonitorError {
    #[error("--event-monitor path={path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--event-monitor fd={fd}: not an open file descriptor")]
    BadFd { fd: i32 },
    #[error("--event-monitor: cannot start the writer thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("--event-monitor: a monitor is already configured")]
    AlreadySet,
}

#[derive(Serialize)]
struct Event<'a> {
    timestamp: Duration,
    source: &'a str,
    event: &'a str,
    properties: Option<serde_json::Map<String, serde_json::Value>>,
}

enum Message {
    Event(String),
    /// Answered once every event queued before it has been written.
    Flush(mpsc::Sender<()>),
}

/// One open monitor: a file and the thread that writes to it.
pub struct EventMonitor {
    start: Instant,
    /// A `Mutex` because `emit` may run on any thread; it is held only for the channel send.
    sender: Mutex<mpsc::Sender<Message>>,
}

impl EventMonitor {
    /// Starts writing events to `file` from a thread of its own, confined by `seccomp`.
    pub fn new(mut file: File, seccomp: SeccompMode) -> Result<Self, EventMonitorError> {
        let (sender, receiver) = mpsc::channel::<Message>();
        thread::Builder::new()
            .name("event-monitor".to_owned())
            .spawn(move || {
                if let Err(error) = apply_filter_for_mode(ThreadKind::EventMonitor, seccomp) {
                    // Writing unconfined is not an option the operator chose: drop the events.
                    log::error!("event monitor disabled: {error}");
                    return;
                }
                let mut broken = false;
                for message in receiver {
                    match message {
                        Message::Event(_) if broken => {}
                        Message::Event(text) => {
                            if let Err(error) = file
                                .write_all(text.as_bytes())
                                .and_then(|()| file.write_all(b"\n\n"))
                            {
                                // One warning, then drop events: the VM matters more than its log.
                                log::warn!(
                                    "event monitor: writing failed, events dropped: {error}"
                                );
                                broken = true;
                            }
                        }
                        Message::Flush(done) => {
                            let _ = file.flush();
                            let _ = done.send(());
                        }
                    }
                }
            })
            .map_err(EventMonitorError::Thread)?;
        Ok(EventMonitor {
            start: Instant::now(),
            sender: Mutex::new(sender),
        })
    }

    /// Opens what `--event-monitor` names: a file (created owner-only, or truncated, as upstream
    /// does) or an inherited file descriptor.
    pub fn open(
        config: &EventMonitorConfig,
        seccomp: SeccompMode,
    ) -> Result<Self, EventMonitorError> {
        let file = match config {
            EventMonitorConfig::Path(path) => OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| EventMonitorError::Open {
                    path: path.clone(),
                    source,
                })?,
            EventMonitorConfig::Fd(fd) => {
                // SAFETY: F_GETFD only reads the descriptor flags; it tells us whether `fd` is open.
                let open = unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0;
                if !open || *fd <= libc::STDERR_FILENO {
                    return Err(EventMonitorError::BadFd { fd: *fd });
                }
                // SAFETY: `fd` is open (checked above) and was handed to this process for the
                // monitor alone by whoever started it (the `fd=` contract of the option), so
                // the File becomes its only owner.
                unsafe { File::from_raw_fd(*fd) }
            }
        };
        Self::new(file, seccomp)
    }

    /// Queues one event. Never blocks on I/O, never fails: an event that cannot be written is lost
    /// and the writer thread logs it once.
    pub fn emit(&self, source: &str, event: &str, properties: &[(&str, &str)]) {
        let properties = (!properties.is_empty()).then(|| {
            properties
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).into()))
                .collect()
        });
        let event = Event {
            timestamp: self.start.elapsed(),
            source,
            event,
            properties,
        };
        let Ok(text) = serde_json::to_string_pretty(&event) else {
            return;
        };
        if let Ok(sender) = self.sender.lock() {
            let _ = sender.send(Message::Event(text));
        }
    }

    /// Waits until every event emitted so far is written (or `FLUSH_TIMEOUT` passed).
    pub fn flush(&self) {
        let (done_sender, done) = mpsc::channel();
        let sent = match self.sender.lock() {
            Ok(sender) => sender.send(Message::Flush(done_sender)).is_ok(),
            Err(_) => false,
        };
        if sent {
            let _ = done.recv_timeout(FLUSH_TIMEOUT);
        }
    }
}

static MONITOR: OnceLock<EventMonitor> = OnceLock::new();

/// Opens the process-wide monitor. Called once, by the binary, before any VMM thread starts.
pub fn set_monitor(
    config: &EventMonitorConfig,
    seccomp: SeccompMode,
) -> Result<(), EventMonitorError> {
    if MONITOR.get().is_some() {
        return Err(EventMonitorError::AlreadySet);
    }
    let monitor = EventMonitor::open(config, seccomp)?;
    MONITOR
        .set(monitor)
        .map_err(|_| EventMonitorError::AlreadySet)
}

/// Emits an event to the process-wide monitor; a no-op when `--event-monitor` was not given.
/// Callable from any thread.
pub fn emit(source: &str, event: &str, properties: &[(&str, &str)]) {
    if let Some(monitor) = MONITOR.get() {
        monitor.emit(source, event, properties);
    }
}

/// Writes out every queued event; call before the process exits.
pub fn flush() {
    if let Some(monitor) = MONITOR.get() {
        monitor.flush();
    }
}

/// The VM lifecycle events upstream emits with source `vm`, so that call sites cannot misspell them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmEvent {
    Booting,
    Booted,
    Pausing,
    Paused,
    Resuming,
    Resumed,
    Snapshotting,
    Snapshotted,
    Restoring,
    Restored,
    Rebooting,
    Rebooted,
    Shutdown,
    Deleted,
}

impl VmEvent {
    pub fn name(self) -> &'static str {
        match self {
            VmEvent::Booting => "booting",
            VmEvent::Booted => "booted",
            VmEvent::Pausing => "pausing",
            VmEvent::Paused => "paused",
            VmEvent::Resuming => "resuming",
            VmEvent::Resumed => "resumed",
            VmEvent::Snapshotting => "snapshotting",
            VmEvent::Snapshotted => "snapshotted",
            VmEvent::Restoring => "restoring",
            VmEvent::Restored => "restored",
            VmEvent::Rebooting => "rebooting",
            VmEvent::Rebooted => "rebooted",
            VmEvent::Shutdown => "shutdown",
            VmEvent::Deleted => "deleted",
        }
    }
}

/// One bit per [`VmEvent`] held back by a live [`HeldBack`] guard.
static HELD_BACK: AtomicU32 = AtomicU32::new(0);

fn event_bit(event: VmEvent) -> u32 {
    1 << (event as u32)
}

/// Holds back some `vm` events while it lives (see [`hold_back`]).
#[must_use = "the events are held back only while the guard lives"]
pub struct HeldBack {
    previous: u32,
}

impl Drop for HeldBack {
    fn drop(&mut self) {
        HELD_BACK.store(self.previous, Ordering::Release);
    }
}

/// Until the guard drops, `events` are not written. Upstream's sequences need it where one
/// operation is built from others: `vm.reboot` reports `rebooting`, `rebooted` and nothing of
/// the shutdown and boot inside it; `vm.boot` reports `booting` before it can fail, so the one
/// the VM's own boot would write is held back. Guards nest; the control loop is the only caller.
pub fn hold_back(events: &[VmEvent]) -> HeldBack {
    let bits = events
        .iter()
        .fold(0, |bits, event| bits | event_bit(*event));
    HeldBack {
        previous: HELD_BACK.fetch_or(bits, Ordering::AcqRel),
    }
}

/// Emits a `vm` lifecycle event (no properties, as upstream), unless it is held back.
pub fn emit_vm(event: VmEvent) {
    if HELD_BACK.load(Ordering::Acquire) & event_bit(event) != 0 {
        return;
    }
    emit("vm", event.name(), &[]);
}

/// The NV events (source `nv`), with the property names tools can rely on. Times are integer
/// microseconds in decimal strings, since upstream's properties are strings.
pub mod nv {
    use std::time::Duration;

    pub const SOURCE: &str = "nv";

    fn micros(duration: Duration) -> String {
        duration.as_micros().to_string()
    }

    /// An event about one saved state of `vm`: its sequence number and how long it took.
    fn emit_with_sequence(event: &str, vm: &str, sequence: u64, total: Duration) {
        super::emit(
            SOURCE,
            event,
            &[
                ("vm", vm),
                ("sequence", &sequence.to_string()),
                ("time_us", &micros(total)),
            ],
        );
    }

    /// A power-fail save began. `trigger`: what started it (`signal`, `api`, ...).
    pub fn power_fail_started(vm: &str, trigger: &str, deadline: Duration) {
        super::emit(
            SOURCE,
            "power-fail-started",
            &[
                ("vm", vm),
                ("trigger", trigger),
                ("deadline_us", &micros(deadline)),
            ],
        );
    }

    /// One phase of a save or a recovery finished (`pause`, `save-vcpus`, `flush`, ...).
    pub fn phase_done(name: &str, time: Duration) {
        super::emit(
            SOURCE,
            "phase-done",
            &[("name", name), ("time_us", &micros(time))],
        );
    }

    /// The saved state is committed in the region: a power loss from here on is recoverable.
    pub fn committed(vm: &str, sequence: u64, total: Duration) {
        emit_with_sequence("committed", vm, sequence, total);
    }

    /// A VM was recovered in place from its region.
    pub fn recovered(vm: &str, sequence: u64, total: Duration) {
        emit_with_sequence("recovered", vm, sequence, total);
    }

    /// A swap began: `direction` is `out` or `in`, `path` the swap file, `total_bytes` the
    /// guest memory it moves.
    pub fn swap_started(direction: &str, vm: &str, path: &str, total_bytes: u64) {
        super::emit(
            SOURCE,
            &format!("swap-{direction}-started"),
            &[
                ("vm", vm),
                ("path", path),
                ("total_bytes", &total_bytes.to_string()),
            ],
        );
    }

    /// How far the swap in progress is, in bytes of guest memory.
    pub fn swap_progress(direction: &str, vm: &str, done_bytes: u64, total_bytes: u64) {
        super::emit(
            SOURCE,
            "swap-progress",
            &[
                ("direction", direction),
                ("vm", vm),
                ("done_bytes", &done_bytes.to_string()),
                ("total_bytes", &total_bytes.to_string()),
            ],
        );
    }

    /// The swap is durable: for `out` the VM lives in `path` only, for `in` in its region.
    pub fn swap_committed(
        direction: &str,
        vm: &str,
        path: &str,
        file_size: u64,
        sequence: u64,
        took: Duration,
    ) {
        super::emit(
            SOURCE,
            &format!("swap-{direction}-committed"),
            &[
                ("vm", vm),
                ("path", path),
                ("file_size", &file_size.to_string()),
                ("sequence", &sequence.to_string()),
                ("took_us", &micros(took)),
            ],
        );
    }

    /// The swap failed; `error` says why. After a failed swap-out the VM is still resident.
    pub fn swap_failed(direction: &str, vm: &str, path: &str, error: &str) {
        super::emit(
            SOURCE,
            &format!("swap-{direction}-failed"),
            &[("vm", vm), ("path", path), ("error", error)],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Splits the file into events the way a reader of upstream's format does.
    fn read_events(path: &std::path::Path) -> Vec<Value> {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.is_empty() || text.ends_with("}\n\n"), "{text:?}");
        serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .map(Result::unwrap)
            .collect()
    }

    /// A monitor writing to a file `events` in a new temporary directory (kept alive by the
    /// returned guard).
    fn monitor_in_temp_dir(
        seccomp: SeccompMode,
    ) -> (tempfile::TempDir, std::path::PathBuf, EventMonitor) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        let monitor = EventMonitor::open(
            &EventMonitorConfig::Path(path.display().to_string()),
            seccomp,
        )
        .unwrap();
        (dir, path, monitor)
    }

    /// Issue 10 hardening: the event file the VMM creates is owner-only.
    #[test]
    fn a_created_event_file_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, path, _monitor) = monitor_in_temp_dir(SeccompMode::Disabled);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "event file mode {mode:o}");
    }

    #[test]
    fn writes_upstream_shaped_events_in_order() {
        let (_dir, path, monitor) = monitor_in_temp_dir(SeccompMode::Enforce);
        monitor.emit("vmm", "starting", &[]);
        monitor.emit("vm", "booted", &[("id", "0")]);
        monitor.flush();

        let events = read_events(&path);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["source"], "vmm");
        assert_eq!(events[0]["event"], "starting");
        assert_eq!(events[0]["properties"], Value::Null);
        assert!(events[0]["timestamp"]["secs"].is_u64());
        assert!(events[0]["timestamp"]["nanos"].is_u64());
        assert_eq!(events[1]["event"], "booted");
        assert_eq!(events[1]["properties"]["id"], "0");
        let nanos = |event: &Value| {
            event["timestamp"]["secs"].as_u64().unwrap() * 1_000_000_000
                + event["timestamp"]["nanos"].as_u64().unwrap()
        };
        assert!(nanos(&events[1]) >= nanos(&events[0]));
    }

    #[test]
    fn events_from_many_threads_are_all_written_whole() {
        let (_dir, path, monitor) = monitor_in_temp_dir(SeccompMode::Enforce);
        thread::scope(|scope| {
            for thread_index in 0..4 {
                let monitor = &monitor;
                scope.spawn(move || {
                    for event_index in 0..50 {
                        let id = format!("{thread_index}-{event_index}");
                        monitor.emit("vm", "paused", &[("id", &id)]);
                    }
                });
            }
        });
        monitor.flush();
        assert_eq!(read_events(&path).len(), 200);
    }

    #[test]
    fn rejects_bad_targets() {
        assert!(matches!(
            EventMonitor::open(
                &EventMonitorConfig::Path("/nonexistent-dir/events".to_owned()),
                SeccompMode::Disabled
            ),
            Err(EventMonitorError::Open { .. })
        ));
        assert!(matches!(
            EventMonitor::open(&EventMonitorConfig::Fd(987_654), SeccompMode::Disabled),
            Err(EventMonitorError::BadFd { fd: 987_654 })
        ));
        // Standard streams are not ours to take over and close.
        assert!(matches!(
            EventMonitor::open(&EventMonitorConfig::Fd(1), SeccompMode::Disabled),
            Err(EventMonitorError::BadFd { fd: 1 })
        ));
    }

    #[test]
    fn accepts_an_inherited_fd() {
        use std::os::fd::IntoRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        let fd = File::create(&path).unwrap().into_raw_fd();
        let monitor =
            EventMonitor::open(&EventMonitorConfig::Fd(fd), SeccompMode::Enforce).unwrap();
        monitor.emit("vmm", "starting", &[]);
        monitor.flush();
        assert_eq!(read_events(&path).len(), 1);
    }

    /// The only test that touches the process-wide monitor (it can be set once per process).
    #[test]
    fn global_monitor_is_a_no_op_until_set_then_carries_nv_events() {
        emit("vm", "booted", &[]);
        flush();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        let config = EventMonitorConfig::Path(path.display().to_string());
        set_monitor(&config, SeccompMode::Enforce).unwrap();
        assert!(matches!(
            set_monitor(&config, SeccompMode::Enforce),
            Err(EventMonitorError::AlreadySet)
        ));
        emit_vm(VmEvent::Paused);
        {
            let _outer = hold_back(&[VmEvent::Booting, VmEvent::Shutdown]);
            {
                let _inner = hold_back(&[VmEvent::Booted]);
                emit_vm(VmEvent::Booting);
                emit_vm(VmEvent::Booted);
            }
            emit_vm(VmEvent::Booted);
            emit_vm(VmEvent::Shutdown);
        }
        emit_vm(VmEvent::Shutdown);
        nv::power_fail_started("web-1", "api", Duration::from_millis(50));
        nv::phase_done("pause", Duration::from_micros(1234));
        nv::committed("web-1", 7, Duration::from_millis(3));
        nv::recovered("web-1", 7, Duration::from_millis(2));
        flush();

        let mut events = read_events(&path);
        let lifecycle: Vec<_> = events.drain(..3).map(|e| e["event"].clone()).collect();
        // Held back: the inner booting/booted and the shutdown inside the outer guard.
        assert_eq!(lifecycle, ["paused", "booted", "shutdown"]);
        let names: Vec<_> = events.iter().map(|e| e["event"].clone()).collect();
        assert_eq!(
            names,
            ["power-fail-started", "phase-done", "committed", "recovered"]
        );
        assert!(events.iter().all(|e| e["source"] == "nv"));
        assert_eq!(events[0]["properties"]["deadline_us"], "50000");
        assert_eq!(events[1]["properties"]["name"], "pause");
        assert_eq!(events[1]["properties"]["time_us"], "1234");
        assert_eq!(events[2]["properties"]["sequence"], "7");
    }
}
