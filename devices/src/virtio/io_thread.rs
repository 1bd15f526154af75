//! The I/O thread that serves a device's queues off the vCPU threads, and the pause protocol
//! the power-fail save relies on.
//!
//! The thread sleeps in epoll on the queue-notify eventfds and a control eventfd. A pause raises
//! a flag that the worker checks between requests, so the request in progress finishes and no new
//! one is popped; the thread then acknowledges and blocks on its command channel until resumed.
//! When `pause()` returns, nothing is popped-but-uncompleted.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{error, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Error, Result};

/// How long `pause()` waits for the request in progress. A backend stuck longer than this is
/// reported rather than hanging the power-fail save forever.
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs first thing in every I/O thread, before it serves anything; an `Err` stops the thread
/// and fails the spawn with that message. The VMM passes one with each device (it installs the
/// thread's seccomp filter): this crate knows nothing of seccomp.
pub type IoThreadStartHook = Arc<dyn Fn() -> std::result::Result<(), String> + Send + Sync>;

/// Serves a device's queues.
pub(crate) trait QueueWorker: Send + 'static {
    /// Serves posted requests until none is left or `pause_requested` is set; the check happens
    /// between requests only, never in the middle of one.
    fn process_queues(&mut self, pause_requested: &AtomicBool);
}

enum Command {
    Pause,
    Resume,
    Stop,
}

/// Handle of a running I/O thread, owned by the device.
pub(crate) struct IoThread {
    handle: Option<JoinHandle<()>>,
    control_evt: EventFd,
    commands: Sender<Command>,
    paused_acks: Receiver<()>,
    pause_requested: Arc<AtomicBool>,
    paused: bool,
}

const CONTROL_TOKEN: u64 = 0;

/// Owns an epoll fd and closes it when the thread ends.
struct Epoll(i32);

impl Drop for Epoll {
    fn drop(&mut self) {
        let _ = epoll::close(self.0);
    }
}

impl IoThread {
    /// Starts `worker` on a thread named `name`, woken by `queue_evts`; the thread runs `hook`
    /// first. With `start_paused` the thread serves nothing until the first `resume()`.
    /// (The devices start theirs through `ServiceThread::activate`.)
    #[cfg(test)]
    pub(crate) fn spawn<W: QueueWorker>(
        name: &str,
        worker: W,
        queue_evts: Vec<EventFd>,
        start_paused: bool,
        hook: Option<IoThreadStartHook>,
    ) -> Result<Self> {
        Self::spawn_watching(name, worker, queue_evts, &[], start_paused, hook)
    }

    /// As [`IoThread::spawn`], and also woken when one of `backend_fds` (a tap) becomes
    /// readable. They are watched edge-triggered: the worker reads them until they would block or
    /// it has nowhere to put the data, and a later queue notify brings it back.
    pub(crate) fn spawn_watching<W: QueueWorker>(
        name: &str,
        worker: W,
        queue_evts: Vec<EventFd>,
        backend_fds: &[i32],
        start_paused: bool,
        hook: Option<IoThreadStartHook>,
    ) -> Result<Self> {
        let control_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        let epoll = Epoll(epoll::create(true).map_err(Error::Epoll)?);
        let watch = |fd: i32, token: u64, events: epoll::Events| {
            epoll::ctl(
                epoll.0,
                epoll::ControlOptions::EPOLL_CTL_ADD,
                fd,
                epoll::Event::new(events, token),
            )
            .map_err(Error::Epoll)
        };
        watch(
            control_evt.as_raw_fd(),
            CONTROL_TOKEN,
            epoll::Events::EPOLLIN,
        )?;
        for (i, evt) in queue_evts.iter().enumerate() {
            watch(evt.as_raw_fd(), i as u64 + 1, epoll::Events::EPOLLIN)?;
        }
        for (i, &fd) in backend_fds.iter().enumerate() {
            let token = (queue_evts.len() + i) as u64 + 1;
            watch(fd, token, epoll::Events::EPOLLIN | epoll::Events::EPOLLET)?;
        }

        let (commands, command_rx) = mpsc::channel();
        let (ack_tx, paused_acks) = mpsc::channel();
        let pause_requested = Arc::new(AtomicBool::new(start_paused));
        let thread_control = control_evt.try_clone().map_err(Error::EventFd)?;
        let loop_state = EventLoop {
            epoll,
            control_evt: thread_control,
            queue_evts,
            commands: command_rx,
            paused_acks: ack_tx,
            pause_requested: pause_requested.clone(),
            worker,
        };
        let (started_tx, started) = mpsc::channel();
        let handle = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let hook_result = hook.map_or(Ok(()), |hook| hook());
                let failed = hook_result.is_err();
                // The spawner waits for this; it cannot be gone.
                let _ = started_tx.send(hook_result);
                if !failed {
                    loop_state.run(start_paused);
                }
            })
            .map_err(Error::ThreadSpawn)?;
        // Report a failed hook to the caller instead of leaving a device without its thread.
        let hook_result = started.recv().unwrap_or_else(|_| {
            Err("the I/O thread ended before running its start hook".to_string())
        });
        if let Err(reason) = hook_result {
            let _ = handle.join();
            return Err(Error::ThreadSpawn(std::io::Error::other(format!(
                "{name}: start hook failed: {reason}"
            ))));
        }
        Ok(Self {
            handle: Some(handle),
            control_evt,
            commands,
            paused_acks,
            pause_requested,
            paused: start_paused,
        })
    }

    fn send(&self, command: Command) -> Result<()> {
        self.commands
            .send(command)
            .map_err(|_| Error::IoThreadGone)?;
        self.control_evt.write(1).map_err(Error::ThreadSignal)
    }

    /// Returns once the thread is quiescent (see the module doc).
    pub(crate) fn pause(&mut self) -> Result<()> {
        if self.paused {
            return Ok(());
        }
        // An earlier pause that timed out may have been acknowledged late; that stale
        // acknowledgement must not satisfy this pause.
        while self.paused_acks.try_recv().is_ok() {}
        self.pause_requested.store(true, Ordering::SeqCst);
        self.send(Command::Pause)?;
        match self.paused_acks.recv_timeout(PAUSE_TIMEOUT) {
            Ok(()) => {
                self.paused = true;
                Ok(())
            }
            Err(RecvTimeoutError::Timeout) => Err(Error::PauseTimeout(PAUSE_TIMEOUT)),
            Err(RecvTimeoutError::Disconnected) => Err(Error::IoThreadGone),
        }
    }

    /// Lets the thread serve again; it first serves whatever was posted meanwhile.
    pub(crate) fn resume(&mut self) -> Result<()> {
        if !self.paused {
            return Ok(());
        }
        self.pause_requested.store(false, Ordering::SeqCst);
        self.send(Command::Resume)?;
        self.paused = false;
        Ok(())
    }

    fn stop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        self.pause_requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.send(Command::Stop) {
            warn!("I/O thread already gone at stop: {e}");
        }
        if handle.join().is_err() {
            error!("I/O thread panicked");
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop();
    }
}

struct EventLoop<W> {
    epoll: Epoll,
    control_evt: EventFd,
    queue_evts: Vec<EventFd>,
    commands: Receiver<Command>,
    paused_acks: Sender<()>,
    pause_requested: Arc<AtomicBool>,
    worker: W,
}

/// What the loop does after handling control commands.
enum Next {
    Continue,
    Exit,
}

impl<W: QueueWorker> EventLoop<W> {
    fn run(mut self, start_paused: bool) {
        if start_paused {
            if let Next::Exit = self.wait_for_resume() {
                return;
            }
        }
        // Serve what was posted before the thread existed: after a restore the guest's notify
        // may have been lost across the power failure.
        self.worker.process_queues(&self.pause_requested);

        let mut events =
            vec![epoll::Event::new(epoll::Events::empty(), 0); 1 + self.queue_evts.len() + 8];
        loop {
            let count = match epoll::wait(self.epoll.0, -1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("I/O thread: epoll_wait failed, stopping: {e}");
                    return;
                }
            };
            for event in &events[..count] {
                let token = event.data;
                if token == CONTROL_TOKEN {
                    // A non-blocking eventfd read only fails when nothing is pending.
                    let _ = self.control_evt.read();
                    if let Next::Exit = self.handle_commands() {
                        return;
                    }
                } else {
                    // A queue notify, or a backend descriptor that became readable.
                    if let Some(evt) = self.queue_evts.get(token as usize - 1) {
                        let _ = evt.read();
                    }
                    self.worker.process_queues(&self.pause_requested);
                }
            }
        }
    }

    fn handle_commands(&mut self) -> Next {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Pause => {
                    // The worker checks the pause flag between requests and is not running now,
                    // so nothing is in flight.
                    let _ = self.paused_acks.send(());
                    if let Next::Exit = self.wait_for_resume() {
                        return Next::Exit;
                    }
                    self.worker.process_queues(&self.pause_requested);
                }
                Command::Resume => {}
                Command::Stop => return Next::Exit,
            }
        }
        Next::Continue
    }

    fn wait_for_resume(&mut self) -> Next {
        loop {
            match self.commands.recv() {
                Ok(Command::Resume) => return Next::Continue,
                Ok(Command::Pause) => {
                    let _ = self.paused_acks.send(());
                }
                Ok(Command::Stop) | Err(_) => return Next::Exit,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// Counts passes and holds each pass for a while, so a pause lands in the middle of one.
    struct SlowWorker {
        passes: Arc<AtomicU64>,
        in_pass: Arc<AtomicBool>,
    }

    impl QueueWorker for SlowWorker {
        fn process_queues(&mut self, _pause_requested: &AtomicBool) {
            self.in_pass.store(true, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(50));
            self.passes.fetch_add(1, Ordering::SeqCst);
            self.in_pass.store(false, Ordering::SeqCst);
        }
    }

    #[test]
    fn pause_waits_for_the_pass_in_progress_and_resume_serves_again() {
        let passes = Arc::new(AtomicU64::new(0));
        let in_pass = Arc::new(AtomicBool::new(false));
        let notify = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut io = IoThread::spawn(
            "test-io",
            SlowWorker {
                passes: passes.clone(),
                in_pass: in_pass.clone(),
            },
            vec![notify.try_clone().unwrap()],
            false,
            None,
        )
        .unwrap();
        // Let the initial pass start, then pause in its middle.
        while !in_pass.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        io.pause().unwrap();
        assert!(!in_pass.load(Ordering::SeqCst), "pause returned mid-pass");
        let after_pause = passes.load(Ordering::SeqCst);
        assert!(after_pause >= 1);

        // Notifies while paused are not served until resume.
        notify.write(1).unwrap();
        thread::sleep(Duration::from_millis(100));
        assert_eq!(passes.load(Ordering::SeqCst), after_pause);
        io.resume().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while passes.load(Ordering::SeqCst) == after_pause {
            assert!(std::time::Instant::now() < deadline, "no pass after resume");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn idle_worker(passes: &Arc<AtomicU64>) -> SlowWorker {
        SlowWorker {
            passes: passes.clone(),
            in_pass: Arc::new(AtomicBool::new(false)),
        }
    }

    #[test]
    fn the_start_hook_runs_on_the_new_thread_before_it_serves() {
        let ran_on = Arc::new(std::sync::Mutex::new(None));
        let recorder = Arc::clone(&ran_on);
        let hook: IoThreadStartHook = Arc::new(move || {
            *recorder.lock().unwrap() = thread::current().name().map(str::to_string);
            Ok(())
        });
        let passes = Arc::new(AtomicU64::new(0));
        let io =
            IoThread::spawn("hooked-io", idle_worker(&passes), vec![], true, Some(hook)).unwrap();
        assert_eq!(ran_on.lock().unwrap().as_deref(), Some("hooked-io"));
        drop(io);
    }

    #[test]
    fn a_failing_start_hook_fails_the_spawn_and_nothing_is_served() {
        let hook: IoThreadStartHook = Arc::new(|| Err("no filter for you".to_string()));
        let passes = Arc::new(AtomicU64::new(0));
        let error = IoThread::spawn(
            "refused-io",
            idle_worker(&passes),
            vec![],
            false,
            Some(hook),
        )
        .err()
        .expect("a failing hook fails the spawn");
        assert!(error.to_string().contains("no filter for you"), "{error}");
        assert_eq!(
            passes.load(Ordering::SeqCst),
            0,
            "the refused thread served"
        );
    }

    #[test]
    fn started_paused_serves_nothing_before_resume() {
        let passes = Arc::new(AtomicU64::new(0));
        let mut io = IoThread::spawn(
            "test-io",
            SlowWorker {
                passes: passes.clone(),
                in_pass: Arc::new(AtomicBool::new(false)),
            },
            vec![],
            true,
            None,
        )
        .unwrap();
        thread::sleep(Duration::from_millis(100));
        assert_eq!(passes.load(Ordering::SeqCst), 0);
        io.pause().unwrap(); // already paused: returns at once
        io.resume().unwrap();
        io.pause().unwrap();
        assert_eq!(passes.load(Ordering::SeqCst), 1, "one pass on resume");
        drop(io); // joins the thread
    }
}
