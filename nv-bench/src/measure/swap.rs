//! F (issue 12): swap-out and swap-in of a running VM through the VMM (`ch-remote nv-persist
//! swap-out`, `cloud-hypervisor --nv ...,swap-in=FILE`), side by side with the physical limit
//! on the same file system: a plain sequential `write` + `fsync` of as many bytes as the swap
//! file has, to a new file in the same directory, and a sequential `read` of the swap file's
//! own bytes (through a second name, a hard link) with the page cache in the same state as for
//! the swap-in. Plus the sparse size check: a VM that keeps 1/16 of its RAM changing writes a
//! file of about that much.
//!
//! The swap times are the VMM's own (`took_us` of its `swap-out-committed` / `swap-in-committed`
//! event: from the start of nv-extension's swap to the end of its last fsync, without the
//! pause and save before a swap-out or the resume after a swap-in). The guest is the counter
//! guest with its area over nearly all its RAM, so every page holds data; it must continue
//! after every swap-in. The region lives on tmpfs (as an NVDIMM would: memory-speed reads), the
//! files in the disk scratch directory. Repetitions alternate which of each pair runs first.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use crate::launch::{Launch, MemoryBacking, TestGuest};
use crate::measure::snapshot::wait_for_socket;
use crate::measure::{Bench, LINE_TIMEOUT, SERVING_TIMEOUT};
use crate::output::{seconds, CsvTable};
use crate::running_vm::RunningVm;
use crate::stats::median;
use crate::vmm_process::run_command;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 16 << 20;
/// Bound for a swap of up to 1 GiB on a shared disk.
const SWAP_TIMEOUT: Duration = Duration::from_secs(180);

/// Sizes of one run of F.
struct Sizes {
    vm_bytes: u64,
    /// The counter guest's area: all of the RAM but the image and its stacks.
    area_mb: u64,
    repetitions: usize,
    sparse_vm_bytes: u64,
    sparse_area_mb: u64,
}

fn sizes(quick: bool) -> Sizes {
    if quick {
        Sizes {
            vm_bytes: 256 * MIB,
            area_mb: 240,
            repetitions: 1,
            sparse_vm_bytes: 256 * MIB,
            sparse_area_mb: 16,
        }
    } else {
        Sizes {
            vm_bytes: 1024 * MIB,
            area_mb: 1000,
            repetitions: 3,
            sparse_vm_bytes: 1024 * MIB,
            sparse_area_mb: 64,
        }
    }
}

/// Bytes that are never a zero page: the plain write's data.
fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
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

/// The baseline of a swap-out: `bytes` written sequentially in 16 MiB writes to a new file,
/// fsync, directory fsync (what a swap-out must do at the least). The file is removed after.
fn plain_write(path: &Path, bytes: u64) -> Result<Duration> {
    let block = pattern(BLOCK);
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
    let took = started.elapsed();
    std::fs::remove_file(path).map_err(io(format!("removing {}", path.display())))?;
    Ok(took)
}

/// The baseline of a swap-in: the whole file read sequentially in 16 MiB reads, from a cold
/// page cache.
fn plain_read(path: &Path) -> Result<Duration> {
    drop_cache(path)?;
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

/// The properties of the first event named `name` in a VMM's `--event-monitor` file.
fn event_properties(path: &Path, name: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::Deserializer::from_str(&text)
        .into_iter::<serde_json::Value>()
        .map_while(|event| event.ok())
        .find(|event| event["event"] == name)
        .map(|event| event["properties"].clone())
}

/// A number the event monitor wrote as a string property.
fn number(properties: &serde_json::Value, key: &str) -> Option<u64> {
    properties[key].as_str()?.parse().ok()
}

/// What a VMM reported of one swap: (the swap's own time, the swap file's size).
fn swap_report(vm: &RunningVm, direction: &str) -> Result<(Duration, u64)> {
    let events = vm.events.path();
    let missing = |detail: String| BenchError::Command {
        command: format!("swap-{direction}"),
        detail,
    };
    if let Some(failed) = event_properties(events, &format!("swap-{direction}-failed")) {
        return Err(missing(format!("the VMM reported: {}", failed["error"])));
    }
    let committed = event_properties(events, &format!("swap-{direction}-committed"))
        .ok_or_else(|| missing(format!("no swap-{direction}-committed event")))?;
    match (
        number(&committed, "took_us"),
        number(&committed, "file_size"),
    ) {
        (Some(took_us), Some(file_size)) => Ok((Duration::from_micros(took_us), file_size)),
        _ => Err(missing(format!(
            "an event without its numbers: {committed}"
        ))),
    }
}

/// The counter value of the guest's last progress line (`counter=<n> ...`).
fn last_counter(vm: &RunningVm) -> Option<u64> {
    vm.serial.lines().iter().rev().find_map(|line| {
        line.text
            .strip_prefix("counter=")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// The VM of one region that F moves out and back in.
struct SwapVm<'a> {
    bench: &'a Bench,
    region: PathBuf,
    name: String,
    runs: usize,
}

impl SwapVm<'_> {
    fn socket(&self) -> PathBuf {
        self.bench
            .tmpfs
            .join(&format!("{}-{}.sock", self.name, self.runs))
    }

    fn start(&mut self, launch: Launch) -> Result<RunningVm> {
        self.runs += 1;
        let tag = format!("{}-{}", self.name, self.runs);
        let vm = RunningVm::start(
            &self.bench.binaries.cloud_hypervisor,
            &launch,
            &self.bench.disk.join(&format!("{tag}.serial")),
            Some(&self.socket()),
            &self.bench.disk.join(&format!("{tag}.vmm")),
            &self.bench.vmm_arguments,
        )?;
        Ok(vm)
    }

    /// Cold-boots the counter guest with `area_mb` MiB kept changing in `ram_bytes`, and waits
    /// for its first progress line (the whole area written).
    fn boot(&mut self, ram_bytes: u64, area_mb: u64) -> Result<RunningVm> {
        let guest = TestGuest {
            image: self.bench.counter_image.clone(),
            parameters: format!("area_mb={area_mb}"),
            ram_bytes,
            tsc_khz: self.bench.tsc_khz,
            period_ms: 100,
            log_disk: None,
        };
        let backing = MemoryBacking::NvRegion {
            region: self.region.clone(),
            vm: self.name.clone(),
        };
        let mut vm = self.start(Launch::Boot { guest, backing })?;
        vm.wait_for_lines("counter=", 1, SERVING_TIMEOUT)?;
        Ok(vm)
    }

    /// `ch-remote nv-persist swap-out --path file`; the VMM must then exit 0.
    fn swap_out(&self, vm: &mut RunningVm, file: &Path) -> Result<(Duration, u64)> {
        let socket = self.socket();
        wait_for_socket(&socket, LINE_TIMEOUT)?;
        run_command(
            &self.bench.binaries.ch_remote,
            &[
                "--api-socket".into(),
                socket.display().to_string(),
                "nv-persist".into(),
                "swap-out".into(),
                "--path".into(),
                file.display().to_string(),
            ],
            SWAP_TIMEOUT,
        )?;
        let status = vm.wait_exit("the exit after the swap-out", SWAP_TIMEOUT)?;
        if !status.success() {
            return Err(BenchError::UnexpectedExit {
                what: "the VMM after its swap-out".into(),
                status,
                expected: "exit 0".into(),
                vmm_tail: vm.process.stderr_tail(20),
            });
        }
        swap_report(vm, "out")
    }

    /// `--nv ...,swap-in=file`; waits until the guest continued above `counter` (no new boot).
    fn swap_in(&mut self, file: &Path, counter: u64) -> Result<(RunningVm, Duration)> {
        let launch = Launch::NvSwapIn {
            region: self.region.clone(),
            vm: self.name.clone(),
            file: file.to_path_buf(),
        };
        let mut vm = self.start(launch)?;
        let lines = vm.wait_for(
            "the guest continuing after its swap-in",
            SWAP_TIMEOUT,
            |lines| lines.iter().any(|line| line.text.starts_with("counter=")),
        )?;
        if lines.iter().any(|line| line.text.contains("counter: boot"))
            || last_counter(&vm).is_none_or(|after| after <= counter)
        {
            return Err(BenchError::GuestFailed {
                line: format!(
                    "the guest did not continue above counter {counter} after its swap-in: {:?}",
                    lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>()
                ),
            });
        }
        let (took, _) = swap_report(&vm, "in")?;
        Ok((vm, took))
    }
}

/// One repetition's times (seconds) and sizes (bytes).
struct Times {
    file_bytes: u64,
    /// Bytes of the plain write: the swap file's size (the previous one's when the plain
    /// write runs first).
    plain_bytes: u64,
    write: f64,
    swap_out: f64,
    read: f64,
    swap_in: f64,
}

/// One repetition: swap-out and plain write+fsync of as many bytes, then swap-in and a plain
/// read of the same file's bytes, each pair in an order that alternates with `index` (the
/// plain write goes first only once a swap file's size is known). Returns the VM running
/// again.
fn repetition(
    bench: &Bench,
    swap_vm: &mut SwapVm,
    mut vm: RunningVm,
    index: usize,
    previous_file_bytes: Option<u64>,
) -> Result<(RunningVm, Times)> {
    let swap_file = bench.disk.join(&format!("swap-{index}.nvswap"));
    let same_bytes = bench.disk.join(&format!("swap-{index}.same-bytes"));
    let plain_file = bench.disk.join(&format!("plain-{index}.bin"));
    let plain_first = previous_file_bytes.filter(|_| index % 2 == 1);
    let counter = last_counter(&vm).unwrap_or(0);
    let (plain_bytes, write, (swap_out, file_bytes)) = match plain_first {
        Some(bytes) => {
            let written = plain_write(&plain_file, bytes)?;
            (bytes, written, swap_vm.swap_out(&mut vm, &swap_file)?)
        }
        None => {
            let swapped = swap_vm.swap_out(&mut vm, &swap_file)?;
            (swapped.1, plain_write(&plain_file, swapped.1)?, swapped)
        }
    };
    drop(vm);
    // The same bytes under a second name: the swap-in removes its name, not the data.
    std::fs::hard_link(&swap_file, &same_bytes)
        .map_err(io(format!("linking {}", swap_file.display())))?;
    let (read, (vm, swap_in)) = if plain_first.is_some() {
        let read = plain_read(&same_bytes)?;
        drop_cache(&swap_file)?;
        (read, swap_vm.swap_in(&swap_file, counter)?)
    } else {
        drop_cache(&swap_file)?;
        let swapped = swap_vm.swap_in(&swap_file, counter)?;
        (plain_read(&same_bytes)?, swapped)
    };
    std::fs::remove_file(&same_bytes).map_err(io(format!("removing {}", same_bytes.display())))?;
    Ok((
        vm,
        Times {
            file_bytes,
            plain_bytes,
            write: write.as_secs_f64(),
            swap_out: swap_out.as_secs_f64(),
            read: read.as_secs_f64(),
            swap_in: swap_in.as_secs_f64(),
        },
    ))
}

/// F: prints the swap ratios and writes `f_swap.csv`.
pub fn run(bench: &mut Bench) -> Result<()> {
    let sizes = sizes(bench.profile.name == "quick");
    let mut table = CsvTable::new(&[
        "repetition",
        "swap_file_bytes",
        "plain_write_bytes",
        "plain_write_fsync_s",
        "swap_out_s",
        "plain_read_s",
        "swap_in_s",
    ]);
    let gib_s = |bytes: u64, s: f64| bytes as f64 / s / (1u64 << 30) as f64;
    let mut rows = Vec::new();
    let region = bench.tmpfs.join("swap.nv");
    {
        let mut swap_vm = SwapVm {
            bench,
            region: region.clone(),
            name: "swap".into(),
            runs: 0,
        };
        bench.summary.progress(format!(
            "F booting a {} MiB VM that keeps {} MiB changing",
            sizes.vm_bytes / MIB,
            sizes.area_mb
        ));
        let mut vm = swap_vm.boot(sizes.vm_bytes, sizes.area_mb)?;
        for index in 0..sizes.repetitions {
            bench.summary.progress(format!(
                "F swap {} MiB, repetition {}",
                sizes.vm_bytes / MIB,
                index + 1
            ));
            let previous = rows.last().map(|t: &Times| t.file_bytes);
            let (running, times) = repetition(bench, &mut swap_vm, vm, index, previous)?;
            vm = running;
            table.push(vec![
                (index + 1).to_string(),
                times.file_bytes.to_string(),
                times.plain_bytes.to_string(),
                seconds(times.write),
                seconds(times.swap_out),
                seconds(times.read),
                seconds(times.swap_in),
            ]);
            rows.push(times);
        }
        vm.kill();
    }
    let path = table.write(&bench.out_dir, "f_swap.csv")?;
    bench.summary.table("F. swap-out and swap-in", &table);
    let med = |values: Vec<f64>| median(&values).unwrap_or(f64::NAN);
    // Throughput ratios (bytes per second of the swap over those of the plain I/O).
    let out_ratio = med(rows
        .iter()
        .map(|t| gib_s(t.file_bytes, t.swap_out) / gib_s(t.plain_bytes, t.write))
        .collect());
    let in_ratio = med(rows.iter().map(|t| t.read / t.swap_in).collect());
    let rate = |f: &dyn Fn(&Times) -> f64| med(rows.iter().map(f).collect());
    bench.summary.line(format!(
        "F swap-out of a running {} MiB VM ({} MiB kept changing, region on tmpfs) to the disk \
         directory: {:.2} GiB/s vs plain write+fsync of as many bytes {:.2} GiB/s: ratio {:.2} \
         (median of {}; goal >= 0.80)",
        sizes.vm_bytes / MIB,
        sizes.area_mb,
        rate(&|t| gib_s(t.file_bytes, t.swap_out)),
        rate(&|t| gib_s(t.plain_bytes, t.write)),
        out_ratio,
        rows.len()
    ));
    bench.summary.line(format!(
        "F swap-in of it (one pass: each record verified as it is loaded): {:.2} GiB/s vs plain \
         sequential read of the same file's bytes {:.2} GiB/s (both from a cold page cache): \
         ratio {:.2} (median of {}; goal >= 0.80)",
        rate(&|t| gib_s(t.file_bytes, t.swap_in)),
        rate(&|t| gib_s(t.file_bytes, t.read)),
        in_ratio,
        rows.len()
    ));

    // Sparse: 1/16 of the RAM kept changing.
    let mut sparse = SwapVm {
        bench,
        region: region.clone(),
        name: "sparse".into(),
        runs: 0,
    };
    let mut vm = sparse.boot(sizes.sparse_vm_bytes, sizes.sparse_area_mb)?;
    let swap_file = bench.disk.join("sparse.nvswap");
    let (took, file_size) = sparse.swap_out(&mut vm, &swap_file)?;
    drop(vm);
    bench.summary.line(format!(
        "F sparse: a {} MiB VM whose guest keeps {} MiB changing wrote a {:.1} MiB swap file in \
         {:.3} s (goal for 1 GiB / 64 MiB: < 80 MiB)",
        sizes.sparse_vm_bytes / MIB,
        sizes.sparse_area_mb,
        file_size as f64 / MIB as f64,
        took.as_secs_f64()
    ));
    for path in [&region, &swap_file] {
        std::fs::remove_file(path).map_err(io(format!("removing {}", path.display())))?;
    }
    bench.summary.line(format!("F table: {}", path.display()));
    Ok(())
}
