//! The virtio-net control queue, served by the VMM for the in-process device and for the
//! vhost-user-net front-end alike (a vhost-user backend gets only the data queues, as upstream).
//!
//! A request is a chain: `struct virtio_net_ctrl_hdr { u8 class; u8 cmd; }`, the command's data
//! (for `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` a little-endian u16 of pairs), all driver-readable and
//! possibly split over several descriptors, then one device-writable byte of ack. Only
//! `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` is offered (the device has `VIRTIO_NET_F_CTRL_VQ` only to
//! carry `VIRTIO_NET_F_MQ`); anything else is answered `VIRTIO_NET_ERR`.

use std::sync::atomic::{AtomicBool, Ordering};

use log::error;
use virtio_bindings::virtio_net::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

/// Most driver-readable bytes of a request looked at: the header and a command's data.
const MAX_REQUEST_LEN: usize = 64;

/// What one control request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ControlCommand {
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: use this many queue pairs.
    VqPairsSet(u16),
    /// A class and command not offered.
    Unsupported { class: u8, cmd: u8 },
    /// Too short to hold a header (or the command's data), or outside guest memory.
    Malformed,
}

/// Whether `pairs` is a valid `VQ_PAIRS_SET` for a device of `max_pairs`: from
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN` to `max_virtqueue_pairs` (virtio 1.2, 5.1.6.5.5).
pub(crate) fn pairs_valid(pairs: u16, max_pairs: u16) -> bool {
    (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN as u16..=max_pairs).contains(&pairs)
}

/// Parses a request from its driver-readable bytes.
pub(crate) fn parse(readable: &[u8]) -> ControlCommand {
    let [class, cmd, data @ ..] = readable else {
        return ControlCommand::Malformed;
    };
    if u32::from(*class) == VIRTIO_NET_CTRL_MQ && u32::from(*cmd) == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
    {
        return match data {
            [lo, hi, ..] => ControlCommand::VqPairsSet(u16::from_le_bytes([*lo, *hi])),
            _ => ControlCommand::Malformed,
        };
    }
    ControlCommand::Unsupported {
        class: *class,
        cmd: *cmd,
    }
}

/// Serves every request posted on the control `queue` until none is left or
/// `pause_requested` is set: `handle` answers each parsed command (true: `VIRTIO_NET_OK`),
/// the ack goes into the chain's last device-writable descriptor and the chain into the used
/// ring, so nothing stays popped across a pause. Returns whether any entry was used (the
/// caller raises the queue's interrupt).
///
/// `may_ack` is asked before a request is served, with the descriptor its ack goes into
/// (the guest-write gate): false gives the request back and stops.
pub(crate) fn serve(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    pause_requested: &AtomicBool,
    mut may_ack: impl FnMut(&Descriptor) -> bool,
    mut handle: impl FnMut(ControlCommand) -> bool,
) -> bool {
    let mut used = false;
    while !pause_requested.load(Ordering::SeqCst) {
        if !queue.ready() {
            break;
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.collect();
        if let Some(ack) = descs.iter().rev().find(|d| d.is_write_only()) {
            if !may_ack(ack) {
                let previous = queue.next_avail().wrapping_sub(1);
                queue.set_next_avail(previous);
                break;
            }
        }
        let mut readable = Vec::new();
        let mut malformed = false;
        for desc in descs.iter().filter(|d| !d.is_write_only()) {
            let take = (desc.len() as usize).min(MAX_REQUEST_LEN - readable.len());
            let start = readable.len();
            readable.resize(start + take, 0);
            if mem.read_slice(&mut readable[start..], desc.addr()).is_err() {
                malformed = true;
                break;
            }
            if readable.len() == MAX_REQUEST_LEN {
                break;
            }
        }
        let command = if malformed {
            ControlCommand::Malformed
        } else {
            parse(&readable)
        };
        let ack = if handle(command) {
            VIRTIO_NET_OK as u8
        } else {
            VIRTIO_NET_ERR as u8
        };
        let mut used_len = 0;
        if let Some(status) = descs.iter().rev().find(|d| d.is_write_only()) {
            if mem.write_obj(ack, status.addr()).is_ok() {
                used_len = 1;
            }
        }
        if let Err(e) = queue.add_used(mem, head, used_len) {
            error!("virtio-net: cannot publish control entry for head {head}: {e}");
        }
        used = true;
    }
    used
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    const SIZE: u16 = 8;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const DATA: u64 = 0x8000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn queue(mem: &GuestMemoryMmap) -> Queue {
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    /// Posts one chain (avail entry `nth`) of descriptors from index `first`: readable pieces,
    /// then a one-byte status. Returns the status byte's address.
    fn post(mem: &GuestMemoryMmap, nth: u16, first: u16, pieces: &[&[u8]]) -> u64 {
        let mut addr = DATA + 0x100 * u64::from(nth);
        let count = pieces.len() as u16 + 1;
        for i in 0..count {
            let index = first + i;
            let desc = DESC + 16 * u64::from(index);
            let (len, flags) = match pieces.get(usize::from(i)) {
                Some(piece) => {
                    mem.write_slice(piece, GuestAddress(addr)).unwrap();
                    (piece.len() as u32, 1u16) // NEXT
                }
                None => {
                    mem.write_obj(0xeeu8, GuestAddress(addr)).unwrap();
                    (1, 2u16) // WRITE
                }
            };
            mem.write_obj(addr, GuestAddress(desc)).unwrap();
            mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(desc + 12)).unwrap();
            mem.write_obj(index + 1, GuestAddress(desc + 14)).unwrap();
            addr += 0x10;
        }
        mem.write_obj(first, GuestAddress(AVAIL + 4 + 2 * u64::from(nth)))
            .unwrap();
        mem.write_obj(nth + 1, GuestAddress(AVAIL + 2)).unwrap();
        addr - 0x10
    }

    #[test]
    fn vq_pairs_set_is_parsed_from_one_or_several_descriptors() {
        let mq = VIRTIO_NET_CTRL_MQ as u8;
        let set = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
        assert_eq!(parse(&[mq, set, 2, 0]), ControlCommand::VqPairsSet(2));
        assert_eq!(parse(&[mq, set, 0, 1]), ControlCommand::VqPairsSet(256));
        assert_eq!(parse(&[mq, set, 2]), ControlCommand::Malformed);
        assert_eq!(parse(&[mq]), ControlCommand::Malformed);
        assert_eq!(
            parse(&[VIRTIO_NET_CTRL_RX as u8, 0, 1]),
            ControlCommand::Unsupported {
                class: VIRTIO_NET_CTRL_RX as u8,
                cmd: 0
            }
        );

        let mem = memory();
        let mut q = queue(&mem);
        // Linux's layout: header, data, status in three descriptors; then header and data in
        // one descriptor.
        let status_a = post(&mem, 0, 0, &[&[mq, set], &[2, 0]]);
        let status_b = post(&mem, 1, 3, &[&[mq, set, 3, 0]]);
        let mut seen = Vec::new();
        let used = serve(
            &mut q,
            &mem,
            &AtomicBool::new(false),
            |_| true,
            |c| {
                seen.push(c);
                c == ControlCommand::VqPairsSet(2)
            },
        );
        assert!(used);
        assert_eq!(
            seen,
            [ControlCommand::VqPairsSet(2), ControlCommand::VqPairsSet(3)]
        );
        let ack = |addr: u64| mem.read_obj::<u8>(GuestAddress(addr)).unwrap();
        assert_eq!(ack(status_a), VIRTIO_NET_OK as u8);
        assert_eq!(ack(status_b), VIRTIO_NET_ERR as u8);
        // Both chains are in the used ring, each with the one status byte written.
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 2);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 4)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 8)).unwrap(), 1);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 12)).unwrap(), 3);
    }

    #[test]
    fn nothing_is_popped_once_a_pause_is_requested() {
        let mem = memory();
        let mut q = queue(&mem);
        post(
            &mem,
            0,
            0,
            &[&[
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
                1,
                0,
            ]],
        );
        assert!(!serve(
            &mut q,
            &mem,
            &AtomicBool::new(true),
            |_| true,
            |_| true
        ));
        assert_eq!(q.next_avail(), 0);
        assert!(serve(
            &mut q,
            &mem,
            &AtomicBool::new(false),
            |_| true,
            |_| true
        ));
        assert_eq!(q.next_avail(), 1);
    }

    #[test]
    fn pair_counts_outside_one_to_the_maximum_are_refused() {
        assert!(!pairs_valid(0, 4));
        assert!(pairs_valid(1, 4));
        assert!(pairs_valid(4, 4));
        assert!(!pairs_valid(5, 4));
    }
}
