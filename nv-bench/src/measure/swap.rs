//! F (issue 12): swap-out and swap-in at the library level (`VmHandle::swap_out`,
//! `Region::swap_in`), side by side with the physical limit on the same file system: a plain
//! sequential `write` + `fsync` of as many bytes to a new file in the same directory, and a
//! sequential `read` of them from a cold page cache. Plus the sparse size check: a VM that
//! touched 1/16 of its RAM writes a file of about that much.
//!
//! The region lives on tmpfs (as an NVDIMM would: memory-speed reads), the files on the disk
//! scratch directory. Repetitions alternate which of the pair runs first.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nv_extension::{
    save_vm, HostError, NvHost, OpenOptions, Region, RunKind, ShutdownKind, VmHandle,
};

use crate::error::{BenchError, Result};
use crate::measure::Bench;
use crate::output::{seconds, CsvTable};
use crate::stats::median;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 16 << 20;

/// Sizes of one run of F.
struct Sizes {
    vm_bytes: u64,
    repetitions: usize,
    sparse_vm_bytes: u64,
}

fn sizes(quick: bool) -> Sizes {
    if quick {
        Sizes {
            vm_bytes: 256 * MIB,
            repetitions: 1,
            sparse_vm_bytes: 256 * MIB,
        }
    } else {
        Sizes {
            vm_bytes: 1024 * MIB,
            repetitions: 3,
            sparse_vm_bytes: 1024 * MIB,
        }
    }
}

/// A paused "guest" whose state is a fixed blob: the coordinator's save with nothing to pause.
struct QuietHost;

impl NvHost for QuietHost {
    fn pause_vcpus(&mut self) -> std::result::Result<(), HostError> {
        Ok(())
    }
    fn quiesce_devices(&mut self) -> std::result::Result<(), HostError> {
        Ok(())
    }
    fn guest_memory_ranges(&self) -> Vec<vm_memory::VolatileSlice<'_>> {
        Vec::new()
    }
    fn save_state(&mut self) -> std::result::Result<Vec<u8>, HostError> {
        Ok(vec![0x5a; 64 * 1024])
    }
    fn resume(&mut self) -> std::result::Result<(), HostError> {
        Ok(())
    }
}

/// Bytes that are never a zero page: block `index` of the test pattern.
fn pattern(index: u64, len: usize) -> Vec<u8> {
    let mut state = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(len);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&(state | 1).to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> BenchError {
    move |e| BenchError::io(context, e)
}

/// Drops a file's clean pages from the page cache, so the next read comes from the disk.
fn drop_cache(path: &Path) -> Result<()> {
    let file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    // SAFETY: an advisory call on a descriptor we hold.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("fsync {}", dir.display())))
}

/// The baseline: `bytes` written sequentially in 16 MiB writes to a new file, fsync, directory
/// fsync (what a swap-out must do at the least).
fn plain_write(path: &Path, bytes: u64) -> Result<Duration> {
    let block = pattern(7, BLOCK);
    let started = Instant::now();
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(format!("creating {}", path.display())))?;
    let mut left = bytes;
    while left > 0 {
        let len = left.min(BLOCK as u64) as usize;
        file.write_all(&block[..len])
            .map_err(io(format!("writing {}", path.display())))?;
        left -= len as u64;
    }
    file.sync_all()
        .map_err(io(format!("fsync {}", path.display())))?;
    fsync_dir(path.parent().expect("a file in a directory"))?;
    Ok(started.elapsed())
}

/// The baseline: the whole file read sequentially in 16 MiB reads.
fn plain_read(path: &Path) -> Result<Duration> {
    let mut buf = vec![0u8; BLOCK];
    let started = Instant::now();
    let mut file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    while file
        .read(&mut buf)
        .map_err(io(format!("reading {}", path.display())))?
        > 0
    {}
    Ok(started.elapsed())
}

/// A suspended VM of `vm_bytes` with `touched` bytes of it written (from offset 0 in 16 MiB
/// blocks spread evenly over the RAM), in a new region at `region_path`.
fn suspended_vm(region_path: &Path, vm_bytes: u64, touched: u64) -> Result<(Region, VmHandle)> {
    let options = OpenOptions {
        create_if_missing: true,
        ..OpenOptions::default()
    };
    let region = Region::open(region_path, &options)?;
    region.create_vm("bench", vm_bytes, b"{}")?;
    let mut handle = region.claim_vm("bench")?;
    handle.begin_run(RunKind::ColdBoot)?;
    let backing = handle.memory_backing()?;
    let blocks = touched / BLOCK as u64;
    let stride = vm_bytes / blocks.max(1);
    for index in 0..blocks {
        backing
            .file
            .write_at(&pattern(index, BLOCK), backing.offset + index * stride)
            .map_err(io(format!(
                "writing guest memory of {}",
                region_path.display()
            )))?;
    }
    save_vm(
        &mut handle,
        &mut QuietHost,
        ShutdownKind::PlannedSuspend,
        Duration::from_secs(30),
    )?;
    Ok((region, handle))
}

/// One repetition's times (seconds) and sizes (bytes).
struct Times {
    plain_bytes: u64,
    write: f64,
    file_bytes: u64,
    swap_out: f64,
    read: f64,
    swap_in: f64,
}

/// One repetition: plain write+fsync and swap-out, then plain read and swap-in, in an order
/// that alternates with `index`.
fn repetition(bench: &Bench, index: usize, vm_bytes: u64) -> Result<Times> {
    let region_path = bench.tmpfs.join(&format!("swap-{index}.nv"));
    let swap_file = bench.disk.join(&format!("swap-{index}.swap"));
    let plain_file = bench.disk.join(&format!("plain-{index}.bin"));
    let (region, mut handle) = suspended_vm(&region_path, vm_bytes, vm_bytes)?;
    let swap_first = index % 2 == 1;
    let mut swap_out = || -> Result<(Duration, u64)> {
        let report = handle.swap_out(&swap_file, &mut |_| {})?;
        Ok((report.took, report.file_size))
    };
    let (write, (swap_time, file_bytes)) = if swap_first {
        let swapped = swap_out()?;
        (plain_write(&plain_file, vm_bytes)?, swapped)
    } else {
        let written = plain_write(&plain_file, vm_bytes)?;
        (written, swap_out()?)
    };
    drop(handle);
    drop_cache(&plain_file)?;
    drop_cache(&swap_file)?;
    let swap_in = || -> Result<Duration> {
        let (handle, report) = region.swap_in(&swap_file, Some("bench"), false, &mut |_| {})?;
        drop(handle);
        Ok(report.took)
    };
    let (read, swap_in_time) = if swap_first {
        let swapped = swap_in()?;
        (plain_read(&plain_file)?, swapped)
    } else {
        let read = plain_read(&plain_file)?;
        (read, swap_in()?)
    };
    drop(region);
    for path in [&plain_file, &region_path] {
        std::fs::remove_file(path).map_err(io(format!("removing {}", path.display())))?;
    }
    Ok(Times {
        plain_bytes: vm_bytes,
        write: write.as_secs_f64(),
        file_bytes,
        swap_out: swap_time.as_secs_f64(),
        read: read.as_secs_f64(),
        swap_in: swap_in_time.as_secs_f64(),
    })
}

/// F: prints the swap ratios and writes `f_swap.csv`.
pub fn run(bench: &mut Bench) -> Result<()> {
    let sizes = sizes(bench.profile.name == "quick");
    let mut table = CsvTable::new(&[
        "repetition",
        "plain_bytes",
        "plain_write_fsync_s",
        "plain_read_s",
        "swap_file_bytes",
        "swap_out_s",
        "swap_in_s",
    ]);
    let gib_s = |bytes: u64, s: f64| bytes as f64 / s / (1u64 << 30) as f64;
    let mut rows = Vec::new();
    for index in 0..sizes.repetitions {
        bench.summary.progress(format!(
            "F swap {} MiB, repetition {}",
            sizes.vm_bytes / MIB,
            index + 1
        ));
        let times = repetition(bench, index, sizes.vm_bytes)?;
        table.push(vec![
            (index + 1).to_string(),
            times.plain_bytes.to_string(),
            seconds(times.write),
            seconds(times.read),
            times.file_bytes.to_string(),
            seconds(times.swap_out),
            seconds(times.swap_in),
        ]);
        rows.push(times);
    }
    let path = table.write(&bench.out_dir, "f_swap.csv")?;
    bench.summary.table("F. swap-out and swap-in", &table);
    let med = |values: Vec<f64>| median(&values).unwrap_or(f64::NAN);
    // Throughput ratios (bytes per second of the swap over those of the plain I/O).
    let out_ratio = med(rows
        .iter()
        .map(|t| gib_s(t.file_bytes, t.swap_out) / gib_s(t.plain_bytes, t.write))
        .collect());
    let in_ratio = med(rows
        .iter()
        .map(|t| gib_s(t.file_bytes, t.swap_in) / gib_s(t.plain_bytes, t.read))
        .collect());
    let rate = |f: &dyn Fn(&Times) -> f64| med(rows.iter().map(f).collect());
    bench.summary.line(format!(
        "F swap-out of a {} MiB VM (all touched, region on tmpfs) to the disk directory: \
         {:.2} GiB/s vs plain write+fsync {:.2} GiB/s: ratio {:.2} (median of {}; goal >= 0.80)",
        sizes.vm_bytes / MIB,
        rate(&|t| gib_s(t.file_bytes, t.swap_out)),
        rate(&|t| gib_s(t.plain_bytes, t.write)),
        out_ratio,
        rows.len()
    ));
    bench.summary.line(format!(
        "F swap-in of it (cold page cache; the file is read twice: verified whole, then loaded): \
         {:.2} GiB/s vs plain sequential read {:.2} GiB/s: ratio {:.2} (median of {}; goal >= 0.80)",
        rate(&|t| gib_s(t.file_bytes, t.swap_in)),
        rate(&|t| gib_s(t.plain_bytes, t.read)),
        in_ratio,
        rows.len()
    ));

    // Sparse: 1/16 of the RAM touched.
    let region_path = bench.tmpfs.join("sparse.nv");
    let swap_file = bench.disk.join("sparse.swap");
    let touched = sizes.sparse_vm_bytes / 16;
    let (region, mut handle) = suspended_vm(&region_path, sizes.sparse_vm_bytes, touched)?;
    let report = handle.swap_out(&swap_file, &mut |_| {})?;
    drop(handle);
    drop(region);
    bench.summary.line(format!(
        "F sparse: a {} MiB VM that touched {} MiB wrote a {:.1} MiB swap file ({} MiB of \
         memory) in {:.3} s (goal for 1 GiB / 64 MiB: < 80 MiB)",
        sizes.sparse_vm_bytes / MIB,
        touched / MIB,
        report.file_size as f64 / MIB as f64,
        report.memory_bytes_written / MIB,
        report.took.as_secs_f64()
    ));
    for path in [&region_path, &swap_file] {
        std::fs::remove_file(path).map_err(io(format!("removing {}", path.display())))?;
    }
    bench.summary.line(format!("F table: {}", path.display()));
    Ok(())
}
