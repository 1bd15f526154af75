//! Swap-out and swap-in: the steps and their crash-safe order (see `crate::swap` and
//! docs/multi-vm.md, "Why a crash never loses a VM").

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::allocator::align_up;
use crate::error::{Error, Result, SwapFileProblem};
use crate::fault_injection::{self, FaultPoint};
use crate::identity::{OwnerRecord, Uuid};
use crate::persistence::PersistenceMode;
use crate::region::{find_mut, Region, Shared};
use crate::state_slots::StateArea;
use crate::superblock::FORMAT_VERSION_SWAPPED;
use crate::swap::{SwapInReport, SwapOutReport, SwapProgress, SwapRecord};
use crate::swap_file::{self, SwapMeta, SwapSource};
use crate::vm_handle::{recoverable_state, VmHandle};
use crate::vm_table::{Extent, RunRecord, VmEntry};

fn fault(point: &'static str) {
    debug_assert!(crate::swap::SWAP_FAULT_POINTS.contains(&point));
    fault_injection::reached(FaultPoint::Swap(point));
}

/// Ranges of `[offset, offset + len)` of `file` that may hold data, relative to `offset`
/// (`SEEK_DATA`/`SEEK_HOLE`); the whole range where the file system cannot tell.
fn data_ranges(file: &File, offset: u64, len: u64) -> Vec<(u64, u64)> {
    let end = offset + len;
    let mut ranges = Vec::new();
    let mut at = offset;
    let fd = file.as_raw_fd();
    while at < end {
        // SAFETY: lseek on a descriptor we hold; it only moves that descriptor's offset, which
        // nothing uses (the region is accessed through its mapping and pread/pwrite).
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return vec![(0, len)];
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return vec![(0, len)];
        }
        let hole = (hole as u64).min(end);
        // Page granularity (the region's extents are page aligned).
        let from = data & !(swap_file::PAGE_SIZE - 1);
        let to = align_up(hole, swap_file::PAGE_SIZE).unwrap_or(end).min(end);
        ranges.push((from - offset, to - offset));
        at = to;
    }
    ranges
}

/// A descriptor of the region's file for `pread`/`pwrite` of guest memory, where the store is
/// a file whose page cache its mapping shares (not devdax): bulk copies then take no page
/// faults, which are costly (nested virtualisation makes each one an exit), and `persist` (msync)
/// still covers them. `None`: go through the store's mapping.
fn bulk_file(shared: &Shared) -> Result<Option<File>> {
    match shared.store.file() {
        Some(file) if shared.store.mode() != PersistenceMode::DevDax => file
            .try_clone()
            .map(Some)
            .map_err(|e| Error::io("duplicating the region descriptor", e)),
        _ => Ok(None),
    }
}

/// Whether `[offset, offset + len)` of the store's file is one hole (reads as zeros).
fn is_hole(shared: &Shared, offset: u64, len: u64) -> bool {
    match shared.store.file() {
        Some(file) if shared.store.mode() != PersistenceMode::DevDax => {
            data_ranges(file, offset, len).is_empty()
        }
        _ => false,
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync of directory {}", dir.display()), e))
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Unsupported(format!("path {} contains a NUL byte", path.display())))
}

/// Gives `from` the name `to`, never replacing an existing `to` (`renameat2(RENAME_NOREPLACE)`,
/// or `link` + `unlink` where the file system lacks it).
fn rename_no_replace(from: &Path, to: &Path) -> Result<()> {
    let (c_from, c_to) = (c_path(from)?, c_path(to)?);
    // SAFETY: two NUL-terminated paths that live across the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Err(Error::SwapDestinationExists(to.to_path_buf())),
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            std::fs::hard_link(from, to).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::SwapDestinationExists(to.to_path_buf())
                } else {
                    Error::io(format!("linking {} to {}", from.display(), to.display()), e)
                }
            })?;
            std::fs::remove_file(from)
                .map_err(|e| Error::io(format!("removing {}", from.display()), e))
        }
        _ => Err(Error::io(
            format!("renaming {} to {}", from.display(), to.display()),
            err,
        )),
    }
}

/// The absolute form of a destination (its directory resolved), refused if it exists.
fn destination_path(destination: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(destination)
        .map_err(|e| Error::io(format!("resolving {}", destination.display()), e))?;
    let (Some(dir), Some(name)) = (absolute.parent(), absolute.file_name()) else {
        return Err(Error::Unsupported(format!(
            "swap destination {} names no file",
            destination.display()
        )));
    };
    let dir = dir
        .canonicalize()
        .map_err(|e| Error::io(format!("swap destination directory {}", dir.display()), e))?;
    let path = dir.join(name);
    if std::fs::symlink_metadata(&path).is_ok() {
        return Err(Error::SwapDestinationExists(path));
    }
    Ok(path)
}

pub(crate) fn swap_out(
    handle: &mut VmHandle,
    destination: &Path,
    progress: &mut dyn FnMut(SwapProgress),
) -> Result<SwapOutReport> {
    let started = Instant::now();
    handle.check_resident()?;
    let destination = destination_path(destination)?;
    let region = handle.region.clone();
    region.check_path()?;
    // What goes into the file: the committed save and config, under the claim.
    let ((entry, saved), _) = handle.transact_owned(|shared, entry| {
        if !matches!(entry.record, RunRecord::Saved { .. }) {
            return Err(Error::Unsupported(format!(
                "VM {:?} is {}: swap-out needs a committed save that matches its memory \
                 (pause the VM and save it first)",
                entry.name, entry.record
            )));
        }
        let saved = recoverable_state(shared.store.as_ref(), entry)?;
        Ok(((entry.clone(), saved), false))
    })?;
    let memory = handle.memory;
    let memory_size = entry.memory_size;
    let region_path = region.path();
    let meta = SwapMeta {
        name: entry.name.clone(),
        vm_uuid: entry.uuid,
        region_uuid: region.uuid(),
        region_path: region_path.canonicalize().unwrap_or(region_path),
        memory_size,
        seq: saved.seq,
    };
    let data = {
        let shared = region.lock();
        match shared.store.file() {
            Some(file) if shared.store.mode() != PersistenceMode::DevDax => {
                data_ranges(file, memory.offset, memory_size)
            }
            _ => vec![(0, memory_size)],
        }
    };

    // The file, under a temporary name nobody else uses.
    let mut suffix = [0u8; 8];
    suffix.copy_from_slice(&Uuid::random()?.0[..8]);
    let mut partial_name = destination.file_name().expect("checked").to_os_string();
    partial_name.push(format!(".partial-{:016x}", u64::from_le_bytes(suffix)));
    let partial = destination.with_file_name(partial_name);
    let dir = destination.parent().expect("checked").to_path_buf();
    let mut linked = false;
    let written = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&partial)
            .map_err(|e| Error::io(format!("creating swap file {}", partial.display()), e))?;
        let bulk = bulk_file(&region.lock())?;
        let mut read = |offset: u64, buf: &mut [u8]| match &bulk {
            Some(file) => {
                use std::os::unix::fs::FileExt;
                file.read_exact_at(buf, memory.offset + offset)
                    .map_err(|e| Error::io("reading guest memory from the region", e))
            }
            None => region.lock().store.read(memory.offset + offset, buf),
        };
        let written = swap_file::write(
            &mut file,
            &partial,
            &meta,
            SwapSource {
                data_ranges: data,
                read: &mut read,
                state: &saved.state_blob,
                config: &saved.config_blob,
            },
            &mut |done| {
                progress(SwapProgress {
                    done_bytes: done,
                    total_bytes: memory_size,
                });
                fault_injection::swap_out_chunk_written();
            },
            &mut || fault("swap-out-partial"),
        )?;
        file.sync_all()
            .map_err(|e| Error::io(format!("fsync of swap file {}", partial.display()), e))?;
        fault("swap-out-written");
        rename_no_replace(&partial, &destination)?;
        linked = true;
        fsync_dir(&dir)?;
        fault("swap-out-linked");
        Ok(written)
    })();
    let written = match written {
        Ok(written) => written,
        Err(e) => {
            // Nothing in the region changed; leave no file behind (only ours: a destination
            // that appeared meanwhile is someone else's and refused the rename).
            let _ = std::fs::remove_file(if linked { &destination } else { &partial });
            if linked {
                let _ = fsync_dir(&dir);
            }
            return Err(e);
        }
    };
    let record = SwapRecord {
        path: destination.clone(),
        file_size: written.file_size,
        checksum: written.checksum,
    };

    // The one table update: swapped out, extents freed, owner cleared.
    let claim = handle.claim;
    let name = handle.name.clone();
    let committed = region.transact_then(
        |shared, table| {
            let entry = find_mut(table, &name)?;
            if entry.owner != claim {
                return Err(Error::OwnershipLost(name.clone()));
            }
            if !matches!(entry.record, RunRecord::Saved { seq, .. } if seq == saved.seq) {
                return Err(Error::Unsupported(format!(
                    "VM {name:?} changed during its swap-out (now {})",
                    entry.record
                )));
            }
            // An older build must refuse the region before it could meet the new entry.
            Region::update_superblock(shared, |sb| {
                sb.format_version = sb.format_version.max(FORMAT_VERSION_SWAPPED)
            })?;
            // The checkpoint area goes too: a swapped-out VM has a complete save, no epoch.
            let freed = [entry.memory, entry.state, entry.checkpoint];
            entry.memory = Extent { offset: 0, len: 0 };
            entry.state = Extent { offset: 0, len: 0 };
            entry.checkpoint = Extent { offset: 0, len: 0 };
            entry.owner = OwnerRecord::default();
            entry.swap = Some(record.clone());
            Ok((freed, true))
        },
        |shared, freed| {
            fault("swap-out-committed");
            for extent in freed {
                if let Err(e) = shared.store.discard(extent.offset, extent.len) {
                    log::warn!("VM {name:?} swapped out, but its space was not discarded: {e}");
                }
            }
            Ok(())
        },
    );
    if let Err(e) = committed {
        // Unless the update did reach the medium, the VM is resident: remove the file.
        let landed = region
            .transact(|_, table| {
                Ok((
                    table.find(&name).and_then(|e| e.swap.clone()) == Some(record.clone()),
                    false,
                ))
            })
            .unwrap_or(false);
        if !landed {
            let _ = std::fs::remove_file(&destination);
            let _ = fsync_dir(&dir);
            return Err(e);
        }
        log::warn!("VM {name:?}: swap-out committed, then: {e}");
    }
    handle.swapped_out = Some(destination.clone());
    progress(SwapProgress {
        done_bytes: memory_size,
        total_bytes: memory_size,
    });
    Ok(SwapOutReport {
        path: destination,
        file_size: written.file_size,
        memory_bytes_written: written.memory_bytes,
        memory_size,
        seq: saved.seq,
        took: started.elapsed(),
    })
}

/// Reserves the parts of `extent` that `present` (memory offsets and lengths, ascending)
/// leaves out.
fn reserve_gaps(shared: &mut Shared, extent: Extent, present: &[(u64, u64)]) -> Result<()> {
    let mut at = 0u64;
    for &(offset, len) in present.iter().chain(std::iter::once(&(extent.len, 0))) {
        let offset = offset.min(extent.len);
        if offset > at {
            shared.store.reserve(extent.offset + at, offset - at)?;
        }
        at = at.max(offset.saturating_add(len).min(extent.len));
    }
    Ok(())
}

/// Step 3 of a swap-in: loads and verifies the file into the VM's reserved extents (see
/// `swap_in`), and makes memory and state durable there.
fn load(
    region: &Region,
    path: &Path,
    entry: &VmEntry,
    checked: swap_file::Checked,
    progress: &mut dyn FnMut(u64),
) -> Result<swap_file::Contents> {
    let memory = entry.memory;
    let memory_size = checked.meta.memory_size;
    let seq = checked.meta.seq;
    {
        let shared = &mut *region.lock();
        // A fresh extent is a hole already (freed extents are discarded, new ones placed
        // unwritten); a reused one is discarded now, and zeroed where that is not possible.
        if !is_hole(shared, memory.offset, memory.len) {
            if let Err(e) = shared.store.discard(memory.offset, memory.len) {
                log::debug!("discarding the extent before a swap-in: {e}");
            }
            if !is_hole(shared, memory.offset, memory.len) {
                let zeros = vec![0u8; swap_file::CHUNK_SIZE as usize];
                let mut at = 0;
                while at < memory.len {
                    let len = (memory.len - at).min(zeros.len() as u64);
                    shared
                        .store
                        .write(memory.offset + at, &zeros[..len as usize])?;
                    at += len;
                }
            }
        }
    }
    let bulk = bulk_file(&region.lock())?;
    let mut sink = |offset: u64, data: &[u8]| -> Result<()> {
        if offset + data.len() as u64 > memory_size {
            return Err(Error::Unsupported(
                "swap file page beyond the memory".into(),
            ));
        }
        match &bulk {
            Some(file) => {
                use std::os::unix::fs::FileExt;
                file.write_all_at(data, memory.offset + offset)
                    .map_err(|e| Error::io("loading guest memory into the region", e))
            }
            None => region.lock().store.write(memory.offset + offset, data),
        }
    };
    let mut first_chunk = true;
    let contents = swap_file::read_checked(path, checked, Some(&mut sink), &mut |done| {
        if first_chunk {
            first_chunk = false;
            fault("swap-in-partial");
        }
        progress(done)
    })?;
    let mut shared = region.lock();
    // The pages the file lacks, allocated now (a full file system fails here, not the guest).
    reserve_gaps(&mut shared, memory, &contents.present)?;
    shared.store.persist(memory.offset, memory_size)?;
    let area = StateArea {
        vm_uuid: entry.uuid,
        area: entry.state,
    };
    // Whatever a reused extent held (old slots, a save report), only this state may be found
    // there.
    let zeros = vec![0u8; entry.state.len as usize];
    shared.store.write(entry.state.offset, &zeros)?;
    shared.store.persist(entry.state.offset, entry.state.len)?;
    area.write(shared.store.as_mut(), None, seq, &contents.state)?;
    Ok(contents)
}

/// After a failed load: gives the extents a swap-in reserved back, in one table update that
/// leaves the entry as it was before the swap-in (swapped out, no extents, no owner), then
/// discards them. A failure here leaves the reservation, which the next swap-in reuses.
fn release_reservation(region: &Region, entry: &VmEntry, claim: OwnerRecord) {
    let name = entry.name.clone();
    let released = region.transact_then(
        |_, table| {
            let entry = find_mut(table, &name)?;
            if entry.owner != claim || entry.swap.is_none() {
                return Ok((Vec::new(), false));
            }
            let freed = vec![entry.memory, entry.state];
            entry.memory = Extent { offset: 0, len: 0 };
            entry.state = Extent { offset: 0, len: 0 };
            entry.owner = OwnerRecord::default();
            Ok((freed, true))
        },
        |shared, freed| {
            for extent in freed {
                if let Err(e) = shared.store.discard(extent.offset, extent.len) {
                    log::warn!("VM {name:?}: a released extent was not discarded: {e}");
                }
            }
            Ok(())
        },
    );
    if let Err(e) = released {
        log::warn!("VM {name:?}: the failed swap-in's extents stay reserved: {e}");
    }
}

pub(crate) fn swap_in(
    region: &Region,
    source: &Path,
    expected_name: Option<&str>,
    keep: bool,
    progress: &mut dyn FnMut(SwapProgress),
) -> Result<(VmHandle, SwapInReport)> {
    let started = Instant::now();
    region.check_path()?;
    let path = std::path::absolute(source)
        .map_err(|e| Error::io(format!("resolving {}", source.display()), e))?;
    let swap_error = |problem| Error::SwapFile {
        path: path.clone(),
        problem,
    };
    // 1. The file's header and trailer, checked before the region is touched.
    let header = swap_file::inspect(&path)?;
    if let Some(expected) = expected_name {
        if expected != header.vm_name {
            return Err(swap_error(SwapFileProblem::NameMismatch {
                expected: expected.to_string(),
                found: header.vm_name,
            }));
        }
    }
    if header.region_uuid != region.uuid() {
        return Err(swap_error(SwapFileProblem::OtherRegion {
            file_region: header.region_uuid,
            region: region.uuid(),
        }));
    }
    let memory_size = header.memory_size;
    // The header and the trailer: enough to match the file against the VM's table entry (its
    // recorded size and final checksum) before the region changes. Every other byte is verified
    // while it is loaded (step 3), into extents no resident VM has.
    let checked = swap_file::check(&path)?;
    let meta = checked.meta.clone();
    let (file_size, claimed_checksum) = (checked.file_size, checked.claimed_checksum);
    fault("swap-in-checked");

    // 2. Extents reserved for the VM, and the claim, in one table update; the entry stays
    // swapped out (a crash leaves it so, with the file, and the next swap-in reuses them).
    let claim = OwnerRecord::new_claim()?;
    let reserved = region.transact(|shared, table| {
        let entry = find_mut(table, &meta.name)?;
        if entry.uuid != meta.vm_uuid {
            return Err(swap_error(SwapFileProblem::NotTheRecordedFile {
                vm: meta.name.clone(),
                detail: format!(
                    "it holds VM uuid {}, the region's VM of that name is {}",
                    meta.vm_uuid, entry.uuid
                ),
            }));
        }
        let Some(recorded) = &entry.swap else {
            return Err(Error::ResidentAlready {
                vm: meta.name.clone(),
                path: path.clone(),
            });
        };
        let mismatch = if entry.record.last_seq() != meta.seq {
            Some(format!(
                "save seq {} in the file, {} in the region",
                meta.seq,
                entry.record.last_seq()
            ))
        } else if recorded.file_size != file_size || recorded.checksum != claimed_checksum {
            Some(format!(
                "{} bytes with checksum {:#010x}, the region recorded {} bytes with {:#010x} ({})",
                file_size,
                claimed_checksum,
                recorded.file_size,
                recorded.checksum,
                recorded.path.display()
            ))
        } else if entry.memory_size != meta.memory_size {
            Some("memory size differs".to_string())
        } else {
            None
        };
        if let Some(detail) = mismatch {
            return Err(swap_error(SwapFileProblem::NotTheRecordedFile {
                vm: meta.name.clone(),
                detail,
            }));
        }
        if entry.owner.is_live() {
            return Err(Error::OwnedByLiveProcess {
                vm: meta.name.clone(),
                pid: entry.owner.pid,
            });
        }
        let sb = shared.superblock.clone();
        let too_big = Error::InvalidSize {
            size: meta.memory_size,
            reason: "guest memory too large",
        };
        let memory_len = align_up(meta.memory_size, sb.extent_alignment).ok_or(too_big)?;
        let state_len = align_up(2 * sb.state_slot_len, sb.extent_alignment).unwrap_or(u64::MAX);
        if entry.memory.len != memory_len || entry.state.len != state_len {
            let mut without = table.clone();
            let other = find_mut(&mut without, &meta.name)?;
            other.memory.len = 0;
            other.state.len = 0;
            // The state extent is reserved whole; the memory's pages are allocated by the
            // writes that load them, and the pages the file lacks right after (step 3): no page
            // is zeroed only to be overwritten, and a full file system fails the swap-in, never
            // a later guest access.
            let offsets = Region::place_extents(shared, &without, &[memory_len, state_len])?;
            shared.store.reserve(offsets[1], state_len)?;
            let entry = find_mut(table, &meta.name)?;
            entry.memory = Extent {
                offset: offsets[0],
                len: memory_len,
            };
            entry.state = Extent {
                offset: offsets[1],
                len: state_len,
            };
        }
        let entry = find_mut(table, &meta.name)?;
        entry.owner = claim;
        Ok((entry.clone(), true))
    });
    let entry = match reserved {
        Ok(entry) => entry,
        Err(e) => {
            claim.release();
            return Err(e);
        }
    };
    // From here an error releases the reservation (`release_reservation`) and drops the
    // handle, which clears the claim; the VM stays swapped out.
    let handle = VmHandle::new(region.clone(), &entry, claim);
    fault("swap-in-reserved");

    // 3. One pass over the file: every record verified as it is read, its pages loaded into
    // the reserved memory extent meanwhile; then the state. Pages absent from the file must
    // read as zero: a hole does; anything else (a reused reservation, a devdax device) is
    // zeroed first.
    let loaded = load(region, &path, &entry, checked, &mut |done| {
        progress(SwapProgress {
            done_bytes: done,
            total_bytes: memory_size,
        })
    });
    let contents = match loaded {
        Ok(contents) => contents,
        Err(e) => {
            release_reservation(region, &entry, claim);
            return Err(e);
        }
    };
    fault("swap-in-loaded");

    // 4. The one update that makes the VM resident; then the version back to 1 if no other
    // VM is swapped out.
    let name = meta.name.clone();
    let checksum = contents.checksum;
    debug_assert_eq!(checksum, claimed_checksum);
    region.transact_then(
        |_, table| {
            let entry = find_mut(table, &name)?;
            if entry.owner != claim {
                return Err(Error::OwnershipLost(name.clone()));
            }
            if entry.swap.as_ref().map(|s| s.checksum) != Some(checksum) {
                return Err(Error::OwnershipLost(name.clone()));
            }
            // The record (the save the file holds) stands; the VM is resident again.
            entry.config = contents.config.clone();
            entry.swap = None;
            Ok((crate::superblock::required_version(table), true))
        },
        |shared, version| {
            Region::update_superblock(shared, |sb| sb.format_version = *version)?;
            Ok(())
        },
    )?;
    fault("swap-in-committed");

    // 5. Only now may the file go.
    let file_removed = !keep
        && match std::fs::remove_file(&path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    if let Err(e) = fsync_dir(dir) {
                        log::warn!("{e}");
                    }
                }
                true
            }
            Err(e) => {
                log::warn!(
                    "VM {name:?} swapped in, but {} was not removed: {e}",
                    path.display()
                );
                false
            }
        };
    progress(SwapProgress {
        done_bytes: memory_size,
        total_bytes: memory_size,
    });
    Ok((
        handle,
        SwapInReport {
            path,
            file_size,
            seq: meta.seq,
            took: started.elapsed(),
            file_removed,
        },
    ))
}
