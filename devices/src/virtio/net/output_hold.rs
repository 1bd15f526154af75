//! Output commit for NV checkpoints (the rule Remus follows): while the VMM takes epoch
//! checkpoints, a frame the guest transmits must not reach the network before the epoch that
//! produced it has committed. A VMM killed before that commit rolls the guest back to the
//! previous epoch, and a client that had seen the frame (say, an acknowledgement) would then see
//! it taken back.
//!
//! [`OutputHold`] is that gate, one per VM, shared by its in-process virtio-net devices. The
//! devices know nothing of checkpoints; the VMM arms the hold, seals the running epoch when the
//! devices are quiet for a checkpoint, and releases the sealed epochs' frames once that
//! checkpoint has committed.
//! - **Disarmed** (checkpoints off, the default): one atomic load per transmitted packet; the
//!   worker writes the guest's buffers to the tap itself, as without this module.
//! - **Armed**: the worker copies each transmitted frame (its virtio-net header included) out of
//!   the ring into the hold, tagged with the running epoch, and completes the descriptor at once
//!   (the guest's view of the ring rolls back with the epoch anyway). [`OutputHold::release`]
//!   writes the frames of the sealed epochs to their taps, oldest first.
//! - **Bound**: at most [`HOLD_LIMIT_BYTES`] of frames, plus the one frame that crossed the limit,
//!   are held. A full hold is never emptied by dropping: the worker stops consuming transmit
//!   descriptors (back-pressure: to the guest the ring looks like a slow link's) and the hold
//!   asks the VMM for an early checkpoint; the release after it wakes the workers.
//! - Frames held when the VMM dies are lost with it: their epoch never committed, so the
//!   rolled-back guest sends them again (or not, if it decides differently this time).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::debug;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::Tap;

/// The most frame bytes (virtio-net headers included) a VM holds for output commit. At 10 ms
/// intervals this is 3.3 Gbit/s of guest output before back-pressure starts.
pub const HOLD_LIMIT_BYTES: usize = 4 << 20;

/// One transmitted frame waiting for its epoch to commit.
struct HeldFrame {
    epoch: u64,
    tap: Arc<Tap>,
    queue_pair: usize,
    /// The virtio-net header and the frame, as one `write` to the tap takes them.
    bytes: Vec<u8>,
}

struct HoldState {
    /// Frames produced now are tagged with this epoch; [`OutputHold::seal`] starts the next.
    open_epoch: u64,
    frames: VecDeque<HeldFrame>,
    bytes: usize,
    /// Written when a worker finds the hold full: the VMM's "checkpoint early" request.
    full_evt: Option<EventFd>,
    totals: HoldTotals,
}

/// What the hold did since it was created (for logs and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldTotals {
    /// Frames copied into the hold.
    pub held: u64,
    /// Frames written to their tap after their epoch committed.
    pub released: u64,
    /// Frames the tap refused at release (as a congested link drops them).
    pub tap_errors: u64,
    /// Frames dropped because the run ended without their epoch committing.
    pub discarded: u64,
    /// Times a worker found the hold full and stopped transmitting.
    pub full: u64,
    /// The most bytes held at once.
    pub peak_bytes: usize,
}

/// The frames of sealed epochs that one [`OutputHold::release`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    pub frames: u64,
    pub bytes: u64,
}

/// The output-commit gate of one VM's virtio-net devices (see the module doc).
pub struct OutputHold {
    armed: AtomicBool,
    limit: usize,
    state: Mutex<HoldState>,
    /// Written after every release: workers that stopped on a full hold watch it.
    wake: EventFd,
}

impl OutputHold {
    /// A disarmed hold of [`HOLD_LIMIT_BYTES`].
    pub fn new() -> io::Result<Arc<Self>> {
        Self::with_limit(HOLD_LIMIT_BYTES)
    }

    /// A disarmed hold of `limit` bytes (tests use small ones).
    pub fn with_limit(limit: usize) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            armed: AtomicBool::new(false),
            limit,
            state: Mutex::new(HoldState {
                open_epoch: 1,
                frames: VecDeque::new(),
                bytes: 0,
                full_evt: None,
                totals: HoldTotals::default(),
            }),
            wake: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, HoldState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts holding transmitted frames; `full_evt` is written when the hold is full.
    pub fn arm(&self, full_evt: EventFd) {
        let mut state = self.lock();
        state.full_evt = Some(full_evt);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Whether frames are held now (one atomic load: the disarmed data path's only cost).
    pub fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// Ends the running epoch: the frames held so far belong to the epoch returned, later ones to
    /// the next. Call with the devices quiet, before the checkpoint that commits it.
    pub fn seal(&self) -> u64 {
        let mut state = self.lock();
        let sealed = state.open_epoch;
        state.open_epoch += 1;
        sealed
    }

    /// The checkpoint that followed [`OutputHold::seal`]'s `sealed` committed: writes every frame
    /// of that epoch and earlier ones to its tap, in the order the guest sent them, and wakes the
    /// workers that stopped on a full hold.
    pub fn release(&self, sealed: u64) -> Released {
        let released = {
            let mut state = self.lock();
            let mut released = Released::default();
            while state.frames.front().is_some_and(|f| f.epoch <= sealed) {
                let Some(frame) = state.frames.pop_front() else {
                    break;
                };
                state.bytes -= frame.bytes.len();
                released.frames += 1;
                released.bytes += frame.bytes.len() as u64;
                write_frame(&frame, &mut state.totals);
            }
            released
        };
        let _ = self.wake.write(1);
        released
    }

    /// No epoch can be rolled back to any more (checkpoints turned off, or a save that is newer
    /// than every held frame committed): stops holding and writes every held frame, in order.
    pub fn disarm_and_release(&self) -> Released {
        let released = {
            let mut state = self.lock();
            // Under the lock: a worker that saw the hold armed re-checks under it, so no frame
            // is queued behind this flush or written around it.
            self.armed.store(false, Ordering::SeqCst);
            state.full_evt = None;
            let mut released = Released::default();
            while let Some(frame) = state.frames.pop_front() {
                released.frames += 1;
                released.bytes += frame.bytes.len() as u64;
                write_frame(&frame, &mut state.totals);
            }
            state.bytes = 0;
            released
        };
        let _ = self.wake.write(1);
        released
    }

    /// The run ended without its last epochs committing (the VM stopped): stops holding and
    /// drops the held frames, which no committed state ever produced.
    pub fn disarm_and_discard(&self) -> u64 {
        let mut state = self.lock();
        self.armed.store(false, Ordering::SeqCst);
        state.full_evt = None;
        let dropped = state.frames.len() as u64;
        state.frames.clear();
        state.bytes = 0;
        state.totals.discarded += dropped;
        let _ = self.wake.write(1);
        dropped
    }

    /// Whether another frame fits. When it does not, asks for an early checkpoint: the caller
    /// stops consuming transmit descriptors until a release wakes it.
    pub(super) fn has_room(&self) -> bool {
        let mut state = self.lock();
        if state.bytes < self.limit {
            return true;
        }
        state.totals.full += 1;
        if let Some(evt) = &state.full_evt {
            let _ = evt.write(1);
        }
        false
    }

    /// Holds `bytes` (header and frame) for the tap's queue pair `queue_pair`, or gives them
    /// back when the hold was disarmed meanwhile (the caller then writes them itself).
    pub(super) fn hold(
        &self,
        tap: &Arc<Tap>,
        queue_pair: usize,
        bytes: Vec<u8>,
    ) -> Result<(), Vec<u8>> {
        let mut state = self.lock();
        if !self.armed.load(Ordering::SeqCst) {
            return Err(bytes);
        }
        let epoch = state.open_epoch;
        state.bytes += bytes.len();
        state.totals.held += 1;
        state.totals.peak_bytes = state.totals.peak_bytes.max(state.bytes);
        state.frames.push_back(HeldFrame {
            epoch,
            tap: Arc::clone(tap),
            queue_pair,
            bytes,
        });
        Ok(())
    }

    /// Readable after each release; the workers watch it (edge-triggered).
    pub(super) fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Frames held now.
    pub fn held_frames(&self) -> usize {
        self.lock().frames.len()
    }

    pub fn totals(&self) -> HoldTotals {
        self.lock().totals
    }
}

/// Writes one released frame to its tap; a refusal is counted, as a congested link's drop.
fn write_frame(frame: &HeldFrame, totals: &mut HoldTotals) {
    let Some(fd) = frame.tap.queue_fds().nth(frame.queue_pair) else {
        totals.tap_errors += 1;
        return;
    };
    // SAFETY: `bytes` is a live buffer of that length; the tap only reads it; `fd` stays open as
    // long as `frame.tap` does.
    let written = unsafe { libc::write(fd, frame.bytes.as_ptr().cast(), frame.bytes.len()) };
    if written < 0 {
        debug!(
            "virtio-net: a released frame was refused by tap {}: {}",
            frame.tap.name(),
            io::Error::last_os_error()
        );
        totals.tap_errors += 1;
    } else {
        totals.released += 1;
    }
}
