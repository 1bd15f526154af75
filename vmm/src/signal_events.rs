//! Every signal the VMM handles, in one place. The ones the control loop reacts to
//! (SIGTERM/SIGINT, SIGPWR) arrive as EventFd wake-ups in its epoll: the handler only writes the
//! EventFd registered for its signal, which is async-signal-safe, and everything else happens on
//! the control loop's thread. SIGPWR is blocked in every thread and delivered only while the
//! control loop waits in `epoll_pwait` ([`install_power_fail_signal`], [`mask_without`]);
//! `docs/architecture.md` ("Signals") explains why.
//!
//! Hand-written rather than on `signal-hook`: its registry installs every handler with
//! `SA_RESTART`, which would change what an interrupted call on another thread sees (ours has
//! none: the call fails with EINTR, as before); its self-pipe writes one byte, which an eventfd
//! refuses (it takes 8), and its closure handlers need the same `unsafe` as the one here; and
//! the mask work (block, `epoll_pwait`'s mask, taking a pending signal with `sigtimedwait`),
//! which is most of this file, has no counterpart there.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{block_signal, register_signal_handler};

use crate::Error;

/// Signal numbers are below 65 on Linux (SIGRTMAX is 64).
const SIGNAL_SLOTS: usize = 65;

/// The EventFd each signal writes to; -1 until [`route_to_event_fd`] registers one.
static EVENT_FDS: [AtomicI32; SIGNAL_SLOTS] = [const { AtomicI32::new(-1) }; SIGNAL_SLOTS];

extern "C" fn write_event(
    signal: libc::c_int,
    _info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let fd = usize::try_from(signal)
        .ok()
        .and_then(|index| EVENT_FDS.get(index))
        .map_or(-1, |slot| slot.load(Ordering::Relaxed));
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a live 8-byte buffer and `fd` is an
        // eventfd that stays open for the life of the process once published.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// A non-blocking EventFd and a second handle to it: one for the side that writes it (a signal
/// handler, the API thread), one for the control loop's epoll. The names go into errors.
pub(crate) fn event_fd_pair(
    create: &'static str,
    clone: &'static str,
) -> Result<(EventFd, EventFd), Error> {
    let event = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
        operation: create,
        source,
    })?;
    let other = event.try_clone().map_err(|source| Error::EventFd {
        operation: clone,
        source,
    })?;
    Ok((event, other))
}

/// Makes each of `signals` write the returned (non-blocking) EventFd instead of taking its
/// default action. A later call for the same signal moves it to that call's EventFd (tests build
/// several VMMs in one process). `what` names the route in errors.
pub fn route_to_event_fd(signals: &[libc::c_int], what: &str) -> Result<EventFd, Error> {
    // The handler needs an fd that never closes: give it a duplicate that lives forever, so a
    // later route cannot leave it pointing at a reused fd number.
    let (event, forever) = event_fd_pair("create (signal)", "clone (signal)")?;
    for &signal in signals {
        let slot = usize::try_from(signal)
            .ok()
            .and_then(|index| EVENT_FDS.get(index))
            .ok_or_else(|| Error::SignalHandler(vmm_sys_util::errno::Error::new(libc::EINVAL)))?;
        let previous = slot.swap(forever.as_raw_fd(), Ordering::SeqCst);
        if previous < 0 {
            register_signal_handler(signal, write_event).map_err(|e| {
                log::error!("routing {what} signal {signal}: {e}");
                Error::SignalHandler(e)
            })?;
        }
    }
    std::mem::forget(forever);
    Ok(event)
}

/// Holds SIGPWR pending in the calling thread and every thread it starts later. The binary calls
/// this first thing in `main`: until the handler is installed ([`install_power_fail_signal`])
/// SIGPWR's default action would kill the process and lose the save, and a UPS daemon may signal
/// a VMM that has only just been started. A signal that arrives meanwhile waits; the control
/// loop takes it when it first waits for events.
pub fn hold_power_fail_signal() -> Result<(), Error> {
    match block_signal(libc::SIGPWR) {
        // Already held (e.g. inherited across exec): exactly what is wanted.
        Ok(()) | Err(vmm_sys_util::signal::Error::SignalAlreadyBlocked(_)) => Ok(()),
        Err(e) => Err(Error::PowerFailSignalMask(e.to_string())),
    }
}

/// Routes SIGPWR (what UPS daemons send when the host runs on battery) to the returned EventFd,
/// which the control loop watches. Replaces SIGPWR's default action, which would kill the VMM.
///
/// SIGPWR stays blocked in the calling thread (the control loop's) and so in every thread it
/// starts (vCPUs, API, workers): the control loop unblocks it only while it waits in
/// `epoll_pwait`. It is therefore only ever delivered to the control loop's thread, never to a
/// vCPU thread that may not run for milliseconds on a busy host: a SIGPWR sent before a SIGTERM
/// has always written its EventFd before the control loop looks at the SIGTERM, so the power
/// failure wins (`docs/recovery.md`, "Signals and long requests"). One held pending by
/// [`hold_power_fail_signal`] is delivered at the control loop's first wait.
pub fn install_power_fail_signal() -> Result<EventFd, Error> {
    let event = route_to_event_fd(&[libc::SIGPWR], "power fail")?;
    hold_power_fail_signal()?;
    Ok(event)
}

/// The calling thread's signal mask with `signals` removed: what the control loop waits with
/// (`epoll_pwait`), so that those signals are delivered only while it waits, and only to it.
pub fn mask_without(signals: &[libc::c_int]) -> Result<libc::sigset_t, Error> {
    // SAFETY: an all-zero sigset_t is a valid value; it is filled by pthread_sigmask next.
    let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: reads the calling thread's mask into `mask`, a live sigset_t; `set` is null, so
    // nothing changes.
    let result = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), &mut mask) };
    if result != 0 {
        return Err(Error::SignalHandler(vmm_sys_util::errno::Error::new(
            result,
        )));
    }
    for &signal in signals {
        // SAFETY: `mask` is a valid sigset_t and `signal` a signal number (checked by the call).
        if unsafe { libc::sigdelset(&mut mask, signal) } != 0 {
            return Err(Error::SignalHandler(vmm_sys_util::errno::Error::new(
                libc::EINVAL,
            )));
        }
    }
    Ok(mask)
}

/// Takes `signal` if it is pending for the calling thread (or the process) while blocked, without
/// waiting; true if it was. `epoll_pwait` restores the blocking mask without delivering a signal
/// that arrived just as events became ready, so the control loop asks for it explicitly.
pub fn take_pending(signal: libc::c_int) -> bool {
    // SAFETY: an all-zero sigset_t is valid; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
    }
    let no_wait = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `set` and `no_wait` are valid for the call; the siginfo pointer may be null.
    unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &no_wait) == signal }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_pending_signal_is_taken_without_waiting() {
        // SIGURG's default action is to ignore it: harmless if anything goes wrong here.
        let signal = libc::SIGURG;
        vmm_sys_util::signal::block_signal(signal).unwrap();
        let mask = mask_without(&[signal]).unwrap();
        // SAFETY: `mask` is a valid sigset_t.
        assert_eq!(unsafe { libc::sigismember(&mask, signal) }, 0);
        assert!(!take_pending(signal), "nothing pending yet");
        // SAFETY: pthread_kill(3) on the calling thread, which blocks `signal`: it stays pending.
        assert_eq!(
            unsafe { libc::pthread_kill(libc::pthread_self(), signal) },
            0
        );
        assert!(take_pending(signal));
        assert!(!take_pending(signal), "taken once");
        vmm_sys_util::signal::unblock_signal(signal).unwrap();
    }

    #[test]
    fn a_routed_signal_wakes_its_event_fd() {
        // SIGUSR2 is not used by the VMM; the test process takes it over.
        let event = route_to_event_fd(&[libc::SIGUSR2], "test").unwrap();
        assert!(
            event.read().is_err(),
            "nothing is pending before the signal"
        );
        // SAFETY: raise(3) on the calling thread; SIGUSR2 now has our handler.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR2) }, 0);
        assert_eq!(event.read().unwrap(), 1);
        let moved = route_to_event_fd(&[libc::SIGUSR2], "test").unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR2) }, 0);
        assert_eq!(moved.read().unwrap(), 1);
        assert!(event.read().is_err(), "the old route is no longer written");
    }
}
