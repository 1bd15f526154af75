//! The service loop of a device whose requests are independent descriptor chains served one at a
//! time (virtio-console's transmit queue, virtio-rng): pop, serve, publish, interrupt; and the
//! I/O thread every virtio device here runs its worker on.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::error;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::guest_write_gate::GuestWrites;
use super::io_thread::{IoThread, QueueWorker};
use super::{ActivationContext, BeforeWrite, GuestWriteGateSlot, VirtioInterrupt};
use crate::{Error, Result};

/// One queue of a device and what serving it needs.
pub(crate) struct ServedQueue<'a> {
    /// Names the device in log lines.
    pub name: &'static str,
    pub mem: &'a GuestMemoryMmap,
    pub queue: &'a Mutex<Queue>,
    /// The queue's index, for its interrupt.
    pub index: u16,
    pub interrupt: &'a VirtioInterrupt,
    /// Asked before each chain is served (see [`super::GuestWriteGate`]).
    pub guest_writes: &'a GuestWriteGateSlot,
    /// The most bytes `serve` writes into one chain's buffers.
    pub max_write: usize,
}

impl ServedQueue<'_> {
    /// Asks the guest-write gate about what serving `chain` writes: the first `max_write`
    /// bytes of its writable buffers and the used ring.
    fn may_write(&self, queue: &Queue, chain: &DescriptorChain<&GuestMemoryMmap>) -> bool {
        if !self.guest_writes.is_installed() {
            return true;
        }
        let mut writes = GuestWrites::default();
        writes.add_used_ring(self.mem, queue);
        let mut left = self.max_write;
        for desc in chain.clone().writable() {
            let len = (desc.len() as usize).min(left);
            if len == 0 {
                break;
            }
            writes.add(self.mem, desc.addr(), len);
            left -= len;
        }
        match self.guest_writes.ask(&writes) {
            BeforeWrite::Proceed => true,
            BeforeWrite::Defer => false,
            BeforeWrite::Fail(reason) => {
                // Never fits (a chain's writes are far fewer pages than a log holds).
                error!("{}: guest writes refused: {reason}", self.name);
                false
            }
        }
    }

    /// Serves posted chains with `serve` (which returns the bytes it wrote into the chain) until
    /// none is left or `pause_requested` is set, checked between chains only: a chain popped is
    /// served and published before a pause is acknowledged, so a save never sees it half done.
    /// Interrupts the driver once at the end if it completed any and the driver wants it.
    /// Returns how many chains it completed.
    pub fn serve(
        &self,
        pause_requested: &AtomicBool,
        mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
    ) -> usize {
        let mut completed = 0usize;
        while !pause_requested.load(Ordering::SeqCst) {
            // The lock is not held while serving, so the vCPU's register reads do not wait.
            let Ok(mut queue) = self.queue.lock() else {
                error!("{}: queue lock poisoned; stopping service", self.name);
                return completed;
            };
            let Some(chain) = queue.pop_descriptor_chain(self.mem) else {
                break;
            };
            if !self.may_write(&queue, &chain) {
                // Not now: nothing was written; the chain goes back, the resume serves it.
                let previous = queue.next_avail().wrapping_sub(1);
                queue.set_next_avail(previous);
                break;
            }
            drop(queue);
            let head = chain.head_index();
            let used_len = serve(chain);
            let Ok(mut queue) = self.queue.lock() else {
                error!("{}: queue lock poisoned; stopping service", self.name);
                return completed;
            };
            match queue.add_used(self.mem, head, used_len) {
                Ok(()) => completed += 1,
                Err(e) => error!(
                    "{}: cannot publish used entry for head {head}: {e}",
                    self.name
                ),
            }
        }
        if completed > 0 {
            let notify = match self.queue.lock() {
                Ok(mut queue) => queue.needs_notification(self.mem).unwrap_or(true),
                Err(_) => true,
            };
            if notify {
                if let Err(e) = self.interrupt.signal_used_queue(self.index) {
                    error!("{}: cannot raise the interrupt: {e}", self.name);
                }
            }
        }
        completed
    }
}

/// The `reset`, `pause` and `resume` of a `VirtioDevice` whose I/O thread is the
/// [`ServiceThread`] in field `$thread`: reset stops and joins it after the chain in progress.
macro_rules! service_thread_lifecycle {
    ($thread:ident) => {
        fn reset(&mut self) {
            self.$thread.stop();
        }

        fn pause(&mut self) -> $crate::Result<()> {
            self.$thread.pause()
        }

        fn resume(&mut self) -> $crate::Result<()> {
            self.$thread.resume()
        }
    };
}
pub(crate) use service_thread_lifecycle;

/// The I/O thread of a device, from activation to reset: started once, paused and resumed around
/// a save, stopped (joined) on reset or drop.
#[derive(Default)]
pub(crate) struct ServiceThread(Option<IoThread>);

impl ServiceThread {
    /// Activates the device: refuses a second activation, builds the worker from `ctx` with
    /// `worker` (which checks the queues it needs), and starts it on a thread named `name` with
    /// the activation's notifications (and `backend_fds`, see [`IoThread::spawn_watching`]),
    /// paused if the activation says so, confined by its start hook.
    pub fn activate<W: QueueWorker>(
        &mut self,
        name: &str,
        ctx: ActivationContext,
        backend_fds: &[RawFd],
        worker: impl FnOnce(&ActivationContext) -> Result<W>,
    ) -> Result<()> {
        if self.0.is_some() {
            return Err(Error::AlreadyActivated);
        }
        let worker = worker(&ctx)?;
        self.0 = Some(IoThread::spawn_watching(
            name,
            worker,
            ctx.queue_evts,
            backend_fds,
            ctx.start_paused,
            ctx.io_thread_start,
        )?);
        Ok(())
    }

    /// Stops and joins the thread after the chain in progress.
    pub fn stop(&mut self) {
        self.0 = None;
    }

    pub fn pause(&mut self) -> Result<()> {
        self.0.as_mut().map_or(Ok(()), IoThread::pause)
    }

    pub fn resume(&mut self) -> Result<()> {
        self.0.as_mut().map_or(Ok(()), IoThread::resume)
    }
}

/// The queue at `index` of an activation, checked to be usable in its memory.
pub(crate) fn usable_queue(ctx: &ActivationContext, index: usize) -> Result<Arc<Mutex<Queue>>> {
    let queue = ctx
        .queues
        .get(index)
        .cloned()
        .ok_or(Error::QueueNotUsable(index))?;
    if !queue
        .lock()
        .map_err(|_| Error::QueueLockPoisoned)?
        .is_valid(&ctx.mem)
    {
        return Err(Error::QueueNotUsable(index));
    }
    Ok(queue)
}
