//! The write tracker's re-arm thread (`uffd-rearm`): write-protects the ranges a checkpoint
//! hands it while the checkpoint's own thread saves and commits the epoch, so that re-arming
//! tracking (the kernel's page-table walk and KVM's shadow-entry zap) overlaps the state save
//! instead of following it. The tracker's lock stays with the checkpoint meanwhile: no page is
//! recorded or lifted while a protection is under way (see `EpochLock::start_protect_lifted`).
//!
//! A job the thread has not picked up by the time the checkpoint needs it done (no CPU was free
//! for it: on a loaded host both cores may be busy) is taken back and done on the waiting
//! thread, so handing it over never costs more than the wake-up.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use super::{set_write_protection, UffdError};
use crate::config::SeccompMode;
use crate::seccomp_filters::{apply_filter_for_mode, ThreadKind};

/// Host ranges (address, length) to write-protect, in order.
pub(super) type Ranges = Vec<(usize, usize)>;

/// What one protection did: the ranges it was given and, if it stopped, the index of the first
/// range it did not protect and why.
pub(super) struct Protected {
    pub(super) ranges: Ranges,
    pub(super) outcome: Result<usize, (usize, UffdError)>,
}

/// Write-protects `ranges` in order; returns the bytes protected, or where and why it stopped
/// (the ranges from that index on are not protected).
pub(super) fn protect_ranges(uffd: &OwnedFd, ranges: Ranges) -> Protected {
    let mut bytes = 0;
    for (index, &(address, length)) in ranges.iter().enumerate() {
        if let Err(error) = set_write_protection(uffd, address, length, true) {
            return Protected {
                ranges,
                outcome: Err((index, error)),
            };
        }
        bytes += length;
    }
    Protected {
        ranges,
        outcome: Ok(bytes),
    }
}

/// The one job's place, shared by the checkpoint's thread and the re-arm thread.
enum Job {
    Idle,
    /// Handed over, not picked up yet: the waiter may take it back.
    Queued(Ranges),
    /// The re-arm thread is protecting.
    Running,
    Done(Protected),
    /// The thread is stopping or has ended.
    Gone,
}

struct Shared {
    job: Mutex<Job>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Job> {
        self.job
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait<'a>(&self, job: MutexGuard<'a, Job>) -> MutexGuard<'a, Job> {
        self.changed
            .wait(job)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Marks the job place `Gone` when the thread ends, however it ends, so no waiter waits for a
/// thread that is not there.
struct GoneOnExit(Arc<Shared>);

impl Drop for GoneOnExit {
    fn drop(&mut self) {
        *self.0.lock() = Job::Gone;
        self.0.changed.notify_all();
    }
}

/// The thread and the job place it serves. One protection at a time: `start_protecting`, then
/// `wait`.
pub(super) struct RearmThread {
    shared: Arc<Shared>,
    uffd: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl RearmThread {
    /// Starts the thread under the `WriteFault` filter (it makes the same ioctl as the fault
    /// thread); returns once the filter is installed.
    pub(super) fn start(uffd: Arc<OwnedFd>, seccomp: SeccompMode) -> Result<Self, UffdError> {
        let shared = Arc::new(Shared {
            job: Mutex::new(Job::Idle),
            changed: Condvar::new(),
        });
        let (confined_tx, confined) = std::sync::mpsc::channel();
        let served = Arc::clone(&shared);
        let thread_uffd = Arc::clone(&uffd);
        let thread = thread::Builder::new()
            .name("uffd-rearm".into())
            .spawn(move || {
                let _gone = GoneOnExit(Arc::clone(&served));
                let filter = apply_filter_for_mode(ThreadKind::WriteFault, seccomp);
                let installed = filter.is_ok();
                let _ = confined_tx.send(filter.map_err(|e| e.to_string()));
                if installed {
                    serve(&served, &thread_uffd);
                }
            })
            .map_err(UffdError::Spawn)?;
        let rearm = RearmThread {
            shared,
            uffd,
            thread: Some(thread),
        };
        match confined.recv() {
            Ok(Ok(())) => Ok(rearm),
            Ok(Err(reason)) => Err(UffdError::Seccomp(reason)),
            Err(_) => Err(UffdError::Seccomp(
                "the re-arm thread ended before installing its filter".to_string(),
            )),
        }
    }

    /// Hands `ranges` to the thread; gives them back if it is gone.
    pub(super) fn start_protecting(&self, ranges: Ranges) -> Result<(), Ranges> {
        let mut job = self.shared.lock();
        if !matches!(*job, Job::Idle) {
            return Err(ranges);
        }
        *job = Job::Queued(ranges);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// The protection `start_protecting` handed over, once done: by the thread, or here if
    /// the thread has not picked it up yet. `None` if the thread ended while protecting, so
    /// what it protected is unknown.
    pub(super) fn wait(&self) -> Option<Protected> {
        let mut job = self.shared.lock();
        loop {
            match std::mem::replace(&mut *job, Job::Idle) {
                Job::Queued(ranges) => {
                    drop(job);
                    return Some(protect_ranges(&self.uffd, ranges));
                }
                Job::Done(protected) => return Some(protected),
                Job::Running => {
                    *job = Job::Running;
                    job = self.shared.wait(job);
                }
                Job::Idle => return None,
                Job::Gone => {
                    *job = Job::Gone;
                    return None;
                }
            }
        }
    }
}

/// The thread's loop: pick up a queued job, protect, leave the result; until `Gone`.
fn serve(shared: &Shared, uffd: &OwnedFd) {
    let mut job = shared.lock();
    loop {
        match std::mem::replace(&mut *job, Job::Idle) {
            Job::Queued(ranges) => {
                *job = Job::Running;
                drop(job);
                let protected = protect_ranges(uffd, ranges);
                job = shared.lock();
                if matches!(*job, Job::Gone) {
                    return;
                }
                *job = Job::Done(protected);
                shared.changed.notify_all();
            }
            Job::Gone => return,
            other => {
                *job = other;
                job = shared.wait(job);
            }
        }
    }
}

impl Drop for RearmThread {
    fn drop(&mut self) {
        *self.shared.lock() = Job::Gone;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
