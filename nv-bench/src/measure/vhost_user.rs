//! H: the blkcheck guest's disk throughput on a vhost-user-blk disk served by our
//! `nv-vhost-user-blk` vs the same image on the in-process virtio-blk, side by side in one run.
//! Same guest, same shared file-backed RAM, image on tmpfs (the I/O path is measured, not the
//! storage), runs interleaved. Throughput counts the bytes the guest wrote and read back between
//! its first `completed` line and `done`, with the wall time between them seen in its serial log.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration_tests::harness::cmdline_with_tsc;
use integration_tests::process::{Stdout, VmmProcess};

use super::Bench;
use crate::environment::{create_sparse_file, guest_image};
use crate::error::{BenchError, Result};
use crate::output::CsvTable;

const BLOCK_BYTES: u64 = 4096;
const BLOCKS: u64 = 256;
/// Bound for one run (the ring-0 boot is emulated here, the I/O runs at ring 3).
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Disk {
    InProcess,
    VhostUser,
}

impl Disk {
    fn label(self) -> &'static str {
        match self {
            Disk::InProcess => "in-process virtio-blk",
            Disk::VhostUser => "vhost-user-blk (nv-vhost-user-blk)",
        }
    }
}

pub fn run(bench: &mut Bench) -> Result<()> {
    let rounds: u64 = if bench.profile.name == "quick" {
        20
    } else {
        400
    };
    let repetitions = if bench.profile.name == "quick" { 1 } else { 3 };
    let guest = guest_image("blkcheck")?;
    let mut table = CsvTable::new(&["disk", "run", "bytes", "seconds", "mib_per_s"]);
    let mut rates = [Vec::new(), Vec::new()];
    for run in 0..repetitions {
        for (slot, disk) in [Disk::InProcess, Disk::VhostUser].into_iter().enumerate() {
            bench
                .summary
                .progress(format!("H: {} run {run}", disk.label()));
            let (bytes, seconds) = measure(bench, &guest, disk, rounds, run)?;
            let rate = bytes as f64 / seconds / (1024.0 * 1024.0);
            rates[slot].push(rate);
            table.push(vec![
                disk.label().into(),
                run.to_string(),
                bytes.to_string(),
                format!("{seconds:.3}"),
                format!("{rate:.1}"),
            ]);
        }
    }
    table.write(&bench.out_dir, "h_vhost_user.csv")?;
    bench.summary.table(
        "H: blkcheck disk throughput, vhost-user-blk vs in-process",
        &table,
    );
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let in_process = median(&mut rates[0]);
    let vhost_user = median(&mut rates[1]);
    bench.summary.line(format!(
        "H: blkcheck {BLOCKS}x4 KiB blocks x {rounds} rounds (write, flush, read back): \
         in-process virtio-blk {in_process:.1} MiB/s, vhost-user-blk {vhost_user:.1} MiB/s, \
         ratio vhost-user/in-process {:.2} (median of {repetitions})",
        vhost_user / in_process
    ));
    Ok(())
}

/// One run: `(bytes moved, seconds)` from blkcheck's first `completed` line to `done`.
fn measure(bench: &Bench, guest: &Path, disk: Disk, rounds: u64, run: usize) -> Result<(u64, f64)> {
    let tag = format!(
        "h-{}-{run}",
        if disk == Disk::VhostUser { "vu" } else { "blk" }
    );
    let image = bench.tmpfs.join(&format!("{tag}.img"));
    let ram = bench.tmpfs.join(&format!("{tag}.ram"));
    let serial = bench.disk.join(&format!("{tag}.serial"));
    let socket = bench.tmpfs.join(&format!("{tag}.sock"));
    create_sparse_file(&image, BLOCKS * BLOCK_BYTES)?;
    create_sparse_file(&ram, 32 << 20)?;
    let _backend = match disk {
        Disk::InProcess => None,
        Disk::VhostUser => Some(start_backend(bench, &socket, &image, &tag)?),
    };
    let disk_option = match disk {
        Disk::InProcess => format!("path={}", image.display()),
        Disk::VhostUser => format!("vhost_user=on,socket={}", socket.display()),
    };
    let mut arguments = vec![
        "--kernel".to_string(),
        guest.display().to_string(),
        "--cmdline".into(),
        cmdline_with_tsc(&format!("blocks={BLOCKS} rounds={rounds}"), bench.tsc_khz),
        "--memory".into(),
        "size=0".into(),
        "--memory-zone".into(),
        format!("id=mem0,size=32M,file={},shared=on", ram.display()),
        "--disk".into(),
        disk_option,
        "--serial".into(),
        format!("file={}", serial.display()),
        "--console".into(),
        "off".into(),
    ];
    arguments.extend(bench.vmm_arguments.iter().cloned());
    let output = bench.disk.join(&format!("{tag}.vmm"));
    let mut vmm = VmmProcess::start(
        &bench.binaries.cloud_hypervisor,
        &arguments,
        &[],
        &output,
        Stdout::Log,
    )
    .map_err(|e| BenchError::io("starting cloud-hypervisor", e))?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut first: Option<(u64, Instant)> = None;
    let result = loop {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        if first.is_none() {
            first = completed_seqs(&log).next().map(|seq| (seq, Instant::now()));
        }
        if log.contains("blkcheck: done") || log.contains("FAIL") {
            let ended = Instant::now();
            if !log.contains("blkcheck: done ok") {
                break Err(failed(&tag, &log));
            }
            let Some((first_seq, started)) = first else {
                break Err(failed(&tag, &log));
            };
            let blocks = rounds * BLOCKS - first_seq;
            // Each block is written once and read back once.
            break Ok((2 * blocks * BLOCK_BYTES, (ended - started).as_secs_f64()));
        }
        if Instant::now() >= deadline || vmm.try_wait().is_some() {
            break Err(failed(&tag, &format!("{log}\n{}", vmm.stderr_tail(20))));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    vmm.kill();
    for path in [&image, &ram] {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn completed_seqs(log: &str) -> impl Iterator<Item = u64> + '_ {
    log.lines()
        .filter_map(|line| line.strip_prefix("blkcheck: completed seq="))
        .filter_map(|seq| seq.trim().parse().ok())
}

fn failed(tag: &str, log: &str) -> BenchError {
    BenchError::Command {
        command: format!("blkcheck run {tag}"),
        detail: format!("did not finish ok:\n{log}"),
    }
}

/// Starts `nv-vhost-user-blk` on `image` and waits for its socket.
fn start_backend(bench: &Bench, socket: &Path, image: &Path, tag: &str) -> Result<VmmProcess> {
    let _ = std::fs::remove_file(socket);
    let log: PathBuf = bench.disk.join(&format!("{tag}.backend"));
    let arguments = vec![
        "--socket".to_string(),
        socket.display().to_string(),
        "--file".into(),
        image.display().to_string(),
    ];
    let mut backend = VmmProcess::start(
        &bench.binaries.nv_vhost_user_blk,
        &arguments,
        &[],
        &log,
        Stdout::Log,
    )
    .map_err(|e| BenchError::io("starting nv-vhost-user-blk", e))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if Instant::now() >= deadline || backend.try_wait().is_some() {
            return Err(BenchError::Command {
                command: "nv-vhost-user-blk".into(),
                detail: format!("no socket:\n{}", backend.stderr_log()),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(backend)
}
