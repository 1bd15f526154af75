//! The live process that owns a VM, held by a pidfd, so that an outside tool (`ch-remote
//! nv-persist power-fail --region`) can signal every VMM of a region and wait for each to exit.
//!
//! A pid alone can be reused between reading it from the owner record and signalling it. The
//! pidfd is opened first and the owner record's liveness check (boot id, pid, start time) runs
//! after: if the record's process is still alive then, the pidfd names that very process, and a
//! signal sent through it can never reach a later process that got the same pid.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::identity::OwnerRecord;

/// A live owner process of a VM.
#[derive(Debug)]
pub struct OwnerProcess {
    pid: u32,
    pidfd: OwnedFd,
}

impl OwnerProcess {
    /// The owner's process if `owner` names a live one; `None` if it is gone (or never was).
    pub(crate) fn open(owner: &OwnerRecord) -> Result<Option<OwnerProcess>> {
        if owner.is_none() {
            return Ok(None);
        }
        let Ok(pid) = libc::pid_t::try_from(owner.pid) else {
            return Ok(None);
        };
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let error = std::io::Error::last_os_error();
            return match error.raw_os_error() {
                // No such process: the owner is gone.
                Some(libc::ESRCH) => Ok(None),
                _ => Err(Error::io(format!("pidfd_open of pid {pid}"), error)),
            };
        }
        // SAFETY: `fd` is a descriptor pidfd_open just returned; nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // Checked after the pidfd exists: see the module comment.
        Ok(owner.is_live().then_some(OwnerProcess {
            pid: owner.pid,
            pidfd,
        }))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` to this process (never to another one with its pid).
    pub fn signal(&self, signal: libc::c_int) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo and no flags.
        let result = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if result < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the process has exited (its pidfd is readable then).
    pub fn has_exited(&self) -> bool {
        wait_for_any_exit(&[self], Duration::ZERO).is_ok_and(|exited| exited > 0)
    }
}

/// Waits up to `timeout` until at least one of `processes` has exited; returns how many have.
pub fn wait_for_any_exit(processes: &[&OwnerProcess], timeout: Duration) -> std::io::Result<usize> {
    let mut fds: Vec<libc::pollfd> = processes
        .iter()
        .map(|process| libc::pollfd {
            fd: process.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let timeout_ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structures.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if ready >= 0 {
            return Ok(ready as usize);
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn record_of(pid: u32) -> OwnerRecord {
        OwnerRecord {
            boot_id: crate::identity::boot_id().unwrap(),
            pid,
            start_time: crate::identity::process_start_time(pid).unwrap(),
            nonce: 1,
        }
    }

    #[test]
    fn a_live_owner_is_signalled_and_its_exit_seen_a_dead_or_reused_one_is_not_opened() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let record = record_of(child.id());
        let process = OwnerProcess::open(&record).unwrap().expect("a live owner");
        assert_eq!(process.pid(), child.id());
        assert!(!process.has_exited());
        // Same pid, another start time: a process that reused the pid is not the owner.
        let reused = OwnerRecord {
            start_time: record.start_time + 1,
            ..record
        };
        assert!(OwnerProcess::open(&reused).unwrap().is_none());
        process.signal(libc::SIGKILL).unwrap();
        assert_eq!(
            wait_for_any_exit(&[&process], Duration::from_secs(10)).unwrap(),
            1
        );
        assert!(process.has_exited());
        child.wait().unwrap();
        assert!(OwnerProcess::open(&record).unwrap().is_none(), "reaped");
        assert!(OwnerProcess::open(&OwnerRecord::default())
            .unwrap()
            .is_none());
    }
}
