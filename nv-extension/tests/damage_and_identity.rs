//! What recovery says when the medium, not the shutdown, is at fault (a damaged state slot),
//! when the region file is deleted or replaced under a running VM, and how a region is opened
//! for a listing: read-only, after checking what the path names.

use std::path::{Path, PathBuf};

use nv_extension::{Error, OpenOptions, Region, RunKind, SaveReport, ShutdownKind, VmHandle};
use rustix::fs::{mkfifoat, Mode, CWD};

mod common;
use common::{create_options, new_region, save_blob};

const MIB: u64 = 1 << 20;
const STATE: &[u8] = b"the committed vCPU state of seq 1";

/// VM "vm" created in `region`, claimed and cold-booted.
fn running_vm(region: &Region) -> VmHandle {
    region.create_vm("vm", 2 * MIB, b"config").unwrap();
    let handle = region.claim_vm("vm").unwrap();
    handle.begin_run(RunKind::ColdBoot).unwrap();
    handle
}

/// A power-fail save of `STATE`.
fn save_state(handle: &mut VmHandle) -> SaveReport {
    save_blob(handle, STATE, ShutdownKind::PowerFail).unwrap()
}

/// A region at `path` with VM "vm" saved (power fail) at seq 1 with `STATE`.
fn saved_region(path: &Path) {
    let region = Region::open(path, &create_options()).unwrap();
    let report = save_state(&mut running_vm(&region));
    assert_eq!(report.seq, 1);
    assert_eq!(report.region_file_changed, None);
}

/// `saved_region` in a fresh temporary directory (deleted when the returned one is dropped).
fn new_saved_region() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region");
    saved_region(&path);
    (dir, path)
}

/// Offset of the slot header holding `STATE` (found by its magic and payload).
fn slot_with_state(image: &[u8]) -> usize {
    image
        .windows(8)
        .enumerate()
        .find(|(offset, window)| *window == b"NVSTSLOT" && image[offset + 64..].starts_with(STATE))
        .map(|(offset, _)| offset)
        .expect("the saved slot")
}

fn recovery_error(path: &Path) -> String {
    let region = Region::open(path, &OpenOptions::default()).unwrap();
    let inspected = region.inspect_recovery("vm").unwrap_err().to_string();
    let handle = region.claim_vm("vm").unwrap();
    let recovered = handle.recover().unwrap_err().to_string();
    assert_eq!(inspected, recovered);
    recovered
}

#[test]
fn a_bit_flip_in_the_committed_slot_is_reported_as_damage_not_as_an_unsafe_shutdown() {
    let (_dir, path) = new_saved_region();
    let pristine = std::fs::read(&path).unwrap();
    let slot = slot_with_state(&pristine);

    // One bit of the payload: the header still names seq 1, its checksum of the payload fails.
    let mut image = pristine.clone();
    image[slot + 64 + 5] ^= 0x10;
    std::fs::write(&path, &image).unwrap();
    let text = recovery_error(&path);
    assert!(text.contains("payload checksum mismatch"), "{text}");
    assert!(text.contains("media damage?"), "{text}");
    assert!(text.contains("seq 1"), "{text}");
    assert!(!text.contains("unsafe shutdown"), "{text}");

    // One bit of the header's sequence: the header checksum fails.
    let mut image = pristine.clone();
    image[slot + 8] ^= 0x01;
    std::fs::write(&path, &image).unwrap();
    let text = recovery_error(&path);
    assert!(text.contains("header checksum mismatch"), "{text}");
    assert!(text.contains("media damage?"), "{text}");
    let slot_index = if text.contains("state slot 0") { 0 } else { 1 };
    assert!(text.contains(&format!("state slot {slot_index}")), "{text}");

    // Undamaged again: the state comes back.
    std::fs::write(&path, &pristine).unwrap();
    let region = Region::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(region.inspect_recovery("vm").unwrap().state_blob, STATE);
}

#[test]
fn a_vm_that_died_without_a_save_is_still_an_unsafe_shutdown() {
    let (_dir, path) = new_saved_region();
    {
        let region = Region::open(&path, &OpenOptions::default()).unwrap();
        let handle = region.claim_vm("vm").unwrap();
        handle.recover().unwrap();
        handle.begin_run(RunKind::Resume).unwrap();
        // Dies here: no save.
    }
    let text = recovery_error(&path);
    assert!(text.contains("unsafe shutdown"), "{text}");
    assert!(!text.contains("media damage"), "{text}");
}

#[test]
fn a_save_into_a_deleted_region_file_says_so_and_recovery_refuses_a_replaced_one() {
    let (dir, path, region) = new_region("region");
    let mut handle = running_vm(&region);
    std::fs::remove_file(&path).unwrap();
    let report = save_state(&mut handle);
    // Still saved into the open file (it may be all that is left), and named as such.
    let refused = handle.recover().unwrap_err().to_string();
    assert!(refused.contains("deleted"), "{refused}");
    let changed = report
        .region_file_changed
        .expect("the deletion is reported");
    assert!(changed.contains("deleted while in use"), "{changed}");
    drop(handle);
    drop(region);

    // Replaced while a recovering process holds it: the resume is refused, not run from a
    // file whose next save nobody would find.
    saved_region(&path);
    let region = Region::open(&path, &OpenOptions::default()).unwrap();
    let handle = region.claim_vm("vm").unwrap();
    let copy = dir.path().join("copy");
    std::fs::copy(&path, &copy).unwrap();
    std::fs::rename(&copy, &path).unwrap();
    let error = handle.recover().unwrap_err();
    assert!(matches!(error, Error::RegionFileChanged { .. }), "{error}");
    assert!(error.to_string().contains("another file"), "{error}");
}

/// `IN_CLOSE_WRITE` / `IN_CLOSE_NOWRITE` events on `path` while `action` runs: whether the file
/// was opened for writing.
fn close_events(path: &Path, action: impl FnOnce()) -> (usize, usize) {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain syscalls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::inotify_init1(libc::IN_NONBLOCK);
        assert!(fd >= 0);
        let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let watch = libc::inotify_add_watch(
            fd,
            name.as_ptr(),
            libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE | libc::IN_MODIFY,
        );
        assert!(watch >= 0);
        action();
        let mut buffer = [0u8; 4096];
        let read = libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len());
        let mut counts = (0, 0);
        let mut offset = 0usize;
        while read > 0 && offset < read as usize {
            let event: libc::inotify_event =
                std::ptr::read_unaligned(buffer.as_ptr().add(offset).cast());
            if event.mask & (libc::IN_CLOSE_WRITE | libc::IN_MODIFY) != 0 {
                counts.0 += 1;
            }
            if event.mask & libc::IN_CLOSE_NOWRITE != 0 {
                counts.1 += 1;
            }
            offset += std::mem::size_of::<libc::inotify_event>() + event.len as usize;
        }
        libc::close(fd);
        counts
    }
}

#[test]
fn a_read_only_open_lists_without_opening_for_write_and_refuses_changes() {
    let (dir, path) = new_saved_region();
    let before = std::fs::read(&path).unwrap();
    let read_only = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let (written, read) = close_events(&path, || {
        let region = Region::open(&path, &read_only).unwrap();
        let vms = region.list_vms().unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!(region.inspect_recovery("vm").unwrap().state_blob, STATE);
        assert!(region.create_vm("other", 2 * MIB, b"x").is_err());
        let refused = region.delete_vm("vm").unwrap_err();
        assert!(matches!(refused, Error::ReadOnly { .. }), "{refused}");
        assert!(region.claim_vm("vm").is_err());
    });
    assert_eq!(
        written, 0,
        "a read-only listing opened the region for writing"
    );
    assert!(read >= 1, "no close event seen");
    assert_eq!(std::fs::read(&path).unwrap(), before);

    let missing = dir.path().join("missing");
    let error = Region::open(&missing, &read_only).unwrap_err();
    assert_eq!(error.kind(), nv_extension::ErrorKind::NotFound);
    assert!(!missing.exists());
    let creating = OpenOptions {
        create_if_missing: true,
        ..read_only.clone()
    };
    assert!(Region::open(&missing, &creating).is_err());
    assert!(!missing.exists());
}

#[test]
fn fifos_directories_and_other_devices_are_refused_before_being_opened() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifoat(CWD, &fifo, Mode::RUSR | Mode::WUSR).unwrap();
    for read_only in [true, false] {
        let options = OpenOptions {
            read_only,
            ..OpenOptions::default()
        };
        // A FIFO opened for reading would block forever: this must return at once.
        let text = Region::open(&fifo, &options).unwrap_err().to_string();
        assert!(text.contains("is a FIFO"), "{text}");
        let text = Region::open(dir.path(), &options).unwrap_err().to_string();
        assert!(text.contains("is a directory"), "{text}");
        let error = Region::open("/dev/null", &options).unwrap_err();
        assert!(error.to_string().contains("not device-DAX"), "{error}");
        assert_eq!(error.kind(), nv_extension::ErrorKind::InvalidInput);
    }
}
