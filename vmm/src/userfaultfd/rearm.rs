//! The write tracker's re-arm thread (`uffd-rearm`): write-protects the ranges a checkpoint
//! hands it while the checkpoint's own thread saves and commits the epoch, so that re-arming
//! tracking (the kernel's page-table walk and KVM's shadow-entry zap) overlaps the state save
//! instead of following it. The tracker's lock stays with the checkpoint meanwhile: no page is
//! recorded or lifted while a protection is under way (see `EpochLock::start_protect_lifted`).

use std::os::fd::OwnedFd;
use std::sync::{mpsc, Arc, Mutex};
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
pub(super) fn protect_ranges(uffd: &OwnedFd, ranges: &[(usize, usize)]) -> Protected {
    let mut bytes = 0;
    for (index, &(address, length)) in ranges.iter().enumerate() {
        if let Err(error) = set_write_protection(uffd, address, length, true) {
            return Protected {
                ranges: ranges.to_vec(),
                outcome: Err((index, error)),
            };
        }
        bytes += length;
    }
    Protected {
        ranges: ranges.to_vec(),
        outcome: Ok(bytes),
    }
}

/// The thread and its two channels. One protection at a time: `start` then `wait`.
pub(super) struct RearmThread {
    jobs: Option<mpsc::Sender<Ranges>>,
    /// Behind a mutex so the tracker stays `Sync`; only the checkpoint's thread waits on it.
    done: Mutex<mpsc::Receiver<Protected>>,
    thread: Option<JoinHandle<()>>,
}

impl RearmThread {
    /// Starts the thread under the `WriteFault` filter (it makes the same ioctl as the fault
    /// thread); returns once the filter is installed.
    pub(super) fn start(uffd: Arc<OwnedFd>, seccomp: SeccompMode) -> Result<Self, UffdError> {
        let (jobs, job) = mpsc::channel::<Ranges>();
        let (done_tx, done) = mpsc::channel();
        let (confined_tx, confined) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("uffd-rearm".into())
            .spawn(move || {
                let filter = apply_filter_for_mode(ThreadKind::WriteFault, seccomp);
                let installed = filter.is_ok();
                let _ = confined_tx.send(filter.map_err(|e| e.to_string()));
                if !installed {
                    return;
                }
                while let Ok(ranges) = job.recv() {
                    if done_tx.send(protect_ranges(&uffd, &ranges)).is_err() {
                        return;
                    }
                }
            })
            .map_err(UffdError::Spawn)?;
        let rearm = RearmThread {
            jobs: Some(jobs),
            done: Mutex::new(done),
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
        match &self.jobs {
            Some(jobs) => jobs.send(ranges).map_err(|unsent| unsent.0),
            None => Err(ranges),
        }
    }

    /// Waits for the protection `start_protecting` handed over; `None` if the thread died
    /// (panicked) before it answered, so what it protected is unknown.
    pub(super) fn wait(&self) -> Option<Protected> {
        self.done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .recv()
            .ok()
    }
}

impl Drop for RearmThread {
    fn drop(&mut self) {
        // Closing the job channel ends the thread's loop.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
