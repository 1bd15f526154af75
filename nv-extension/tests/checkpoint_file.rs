//! Checkpoints on a real plain-file region: guest memory written through the VMM's own view of
//! the file (as a vCPU writes it through its mapping), undo pages read through the region's
//! mapping, dirty ranges persisted with msync, and a VMM that dies without a save rolled back
//! by a fresh open of the file.

use std::os::unix::fs::FileExt;

use nv_extension::{
    checkpoint_vm, default_undo_pages, OpenOptions, Region, RunKind, ShutdownKind, UndoRecord,
};

mod common;
use common::{new_region, BlobHost};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

#[test]
fn a_vmm_killed_between_checkpoints_recovers_the_last_epoch_from_the_file() {
    let (_dir, path, region) = new_region("ckpt.nv");
    region.create_vm("vm", 2 * MIB, b"cfg").unwrap();
    let handle = region.claim_vm("vm").unwrap();
    handle.begin_run(RunKind::ColdBoot).unwrap();
    let guest = handle.memory_backing().unwrap();
    let write = |page: u64, byte: u8| {
        guest
            .file
            .write_all_at(&[byte; PAGE as usize], guest.offset + page * PAGE)
            .unwrap()
    };
    let memory = || {
        let mut bytes = vec![0; guest.size as usize];
        guest.file.read_exact_at(&mut bytes, guest.offset).unwrap();
        bytes
    };
    let log = handle
        .enable_checkpoints(default_undo_pages(2 * MIB))
        .unwrap();
    // 64 pages asked for; the area is one 2 MiB extent, which holds 503.
    assert_eq!(log.capacity_pages(), 503);
    assert_eq!(log.record_undo(3 * PAGE).unwrap(), UndoRecord::NotArmed);
    write(3, 0xa1);
    let first = checkpoint_vm(&handle, &mut BlobHost(b"one".to_vec()), &log).unwrap();
    assert!(first.arming);

    for (page, byte) in [(3, 0xb2), (7, 0xc3)] {
        assert_eq!(log.record_undo(page * PAGE).unwrap(), UndoRecord::Recorded);
        write(page, byte);
    }
    let second = checkpoint_vm(&handle, &mut BlobHost(b"two".to_vec()), &log).unwrap();
    assert_eq!(second.undo_pages, 2);
    let at_second = memory();
    for (page, byte) in [(3, 0xd4), (9, 0xe5)] {
        assert_eq!(log.record_undo(page * PAGE).unwrap(), UndoRecord::Recorded);
        write(page, byte);
    }
    // The VMM dies: no save; its claim goes with it.
    drop(log);
    drop(handle);
    drop(region);

    let region = Region::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(region.vm("vm").unwrap().status(), "checkpointed");
    let handle = region.claim_vm("vm").unwrap();
    let recovered = handle.recover().unwrap();
    assert_eq!(recovered.state_blob, b"two");
    assert_eq!(recovered.seq, second.seq);
    assert_eq!(recovered.shutdown_kind, ShutdownKind::Checkpoint);
    assert_eq!(memory(), at_second);
    // And the next run starts from there, recoverable at once.
    let log = handle
        .begin_run_checkpointed(default_undo_pages(2 * MIB))
        .unwrap();
    assert_eq!(log.status().epoch, Some(second.seq + 1));
}
