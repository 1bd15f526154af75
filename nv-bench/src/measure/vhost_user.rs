//! H: the blkcheck guest's disk throughput on a vhost-user-blk disk served by our
//! `nv-vhost-user-blk` vs the same image on the in-process virtio-blk, side by side in one run.
//! Same guest, same shared file-backed RAM, image on tmpfs (the I/O path is measured, not the
//! storage), runs interleaved. Throughput counts the bytes the guest wrote and read back between
//! its first `completed` line and `done`, with the wall time between them seen in its serial log.
//!
//! Then the network: the netkv guest streams UDP datagrams to a host socket (its STREAM request,
//! as section I measures) once through the in-process virtio-net on the namespace's tap and once
//! through a `--net vhost_user=true` device served by our `nv-vhost-user-net` on the same tap,
//! same shared file-backed RAM, runs interleaved; the ratio of the median packet rates.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration_tests::harness::cmdline_with_tsc;
use integration_tests::netkv_client::{KvClient, LoadConfig, FRAME_OVERHEAD};
use integration_tests::netns::{Netns, KV_GUEST, KV_GUEST_MAC, KV_TAP};
use integration_tests::process::{Stdout, VmmProcess};

use super::Bench;
use crate::environment::{create_sparse_file, guest_image};
use crate::error::{BenchError, Result};
use crate::launch::{Launch, MemoryBacking, TestGuest};
use crate::output::CsvTable;
use crate::running_vm::RunningVm;
use crate::stats::median;

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
    net_throughput(bench, repetitions)
}

/// Which path netkv's datagrams take.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NetPath {
    InProcess,
    VhostUser,
}

impl NetPath {
    fn label(self) -> &'static str {
        match self {
            NetPath::InProcess => "in-process virtio-net",
            NetPath::VhostUser => "vhost-user-net (nv-vhost-user-net)",
        }
    }
}

/// Datagram payloads: small packets and full 1514-byte frames, as section I.
const STREAM_PAYLOADS: [usize; 2] = [64, 1472];

/// netkv STREAM through the in-process virtio-net vs through vhost-user-net, same tap.
fn net_throughput(bench: &mut Bench, repetitions: usize) -> Result<()> {
    let count: u64 = if bench.profile.name == "quick" {
        20_000
    } else {
        200_000
    };
    let netns = Netns::try_new("benchvu").map_err(|e| command_failed("network namespace", e))?;
    netns
        .add_kv_tap()
        .map_err(|e| command_failed("the tap in the namespace", e))?;
    let _inside = netns
        .enter()
        .map_err(|e| BenchError::io("entering the network namespace", e))?;
    let guest = guest_image("netkv")?;
    let mut table = CsvTable::new(&[
        "path",
        "payload_bytes",
        "run",
        "sent",
        "received",
        "packets_per_s",
    ]);
    let mut rates: Vec<(NetPath, usize, f64)> = Vec::new();
    for run in 0..repetitions {
        for path in [NetPath::InProcess, NetPath::VhostUser] {
            bench
                .summary
                .progress(format!("H net: {} run {run}", path.label()));
            for (payload, result) in stream_once(bench, &guest, path, count, run)? {
                rates.push((path, payload, result.packets_per_s()));
                table.push(vec![
                    path.label().into(),
                    payload.to_string(),
                    run.to_string(),
                    result.sent.to_string(),
                    result.received.to_string(),
                    format!("{:.0}", result.packets_per_s()),
                ]);
            }
        }
    }
    table.write(&bench.out_dir, "h_vhost_user_net.csv")?;
    bench.summary.table(
        "H: netkv STREAM guest -> host, vhost-user-net vs in-process virtio-net",
        &table,
    );
    for payload in STREAM_PAYLOADS {
        let rate = |path: NetPath| {
            let values: Vec<f64> = rates
                .iter()
                .filter(|row| row.0 == path && row.1 == payload)
                .map(|row| row.2)
                .collect();
            median(&values)
        };
        let (Some(in_process), Some(vhost_user)) =
            (rate(NetPath::InProcess), rate(NetPath::VhostUser))
        else {
            continue;
        };
        bench.summary.line(format!(
            "H net: {count} datagrams of {}-byte frames guest -> host: in-process virtio-net \
             {in_process:.0} packets/s, vhost-user-net {vhost_user:.0} packets/s, ratio \
             vhost-user/in-process {:.2} (median of {repetitions})",
            payload + FRAME_OVERHEAD,
            vhost_user / in_process
        ));
    }
    Ok(())
}

/// One VM on `path`: netkv streams `count` datagrams of each payload; `(payload, result)`.
fn stream_once(
    bench: &Bench,
    guest: &Path,
    path: NetPath,
    count: u64,
    run: usize,
) -> Result<Vec<(usize, integration_tests::netkv_client::StreamResult)>> {
    let tag = format!(
        "h-net-{}-{run}",
        if path == NetPath::VhostUser {
            "vu"
        } else {
            "tap"
        }
    );
    let ram = bench.tmpfs.join(&format!("{tag}.ram"));
    let serial = bench.disk.join(&format!("{tag}.serial"));
    let socket = bench.tmpfs.join(&format!("{tag}.sock"));
    create_sparse_file(&ram, 64 << 20)?;
    let mut backend = None;
    let net = match path {
        NetPath::InProcess => format!("tap={KV_TAP},mac={KV_GUEST_MAC},num_queues=2"),
        NetPath::VhostUser => {
            let arguments = vec![
                "--socket".to_string(),
                socket.display().to_string(),
                "--tap".into(),
                KV_TAP.into(),
            ];
            backend = Some(start_backend(
                &bench.binaries.nv_vhost_user_net,
                &arguments,
                bench.disk.join(&format!("{tag}.backend")),
                &socket,
            )?);
            format!(
                "vhost_user=true,socket={},mac={KV_GUEST_MAC}",
                socket.display()
            )
        }
    };
    let launch = Launch::Boot {
        guest: TestGuest {
            image: guest.into(),
            parameters: format!("ip={} port={}", KV_GUEST.ip(), KV_GUEST.port()),
            ram_bytes: 64 << 20,
            tsc_khz: bench.tsc_khz,
            period_ms: 1000,
            log_disk: None,
        },
        backing: MemoryBacking::SharedFile(ram.clone()),
    };
    let mut arguments = bench.vmm_arguments.clone();
    arguments.extend(["--net".to_string(), net]);
    let mut vm = RunningVm::start(
        &bench.binaries.cloud_hypervisor,
        &launch,
        &serial,
        None,
        &bench.disk.join(&format!("{tag}.vmm")),
        &arguments,
    )?;
    let result = (|| {
        vm.wait_for_lines("netkv: ready", 1, RUN_TIMEOUT)?;
        let mut client = KvClient::new(KV_GUEST, LoadConfig::default())
            .map_err(|e| command_failed("netkv client", e.to_string()))?;
        // One answered PUT first (retried): the host has the guest's MAC and the device runs
        // before the stream's single request is sent.
        client.send_put(1);
        client
            .drain(Duration::from_secs(30))
            .map_err(|e| command_failed("netkv PUT", e.to_string()))?;
        if client.unanswered() != 0 {
            return Err(command_failed(
                "netkv PUT",
                format!("no answer on {}", path.label()),
            ));
        }
        let mut results = Vec::new();
        for payload in STREAM_PAYLOADS {
            let result = client
                .stream_from_guest(count, payload)
                .map_err(|e| command_failed("netkv stream", e.to_string()))?;
            if result.received == 0 {
                return Err(command_failed(
                    "netkv stream",
                    format!("no datagram arrived on {}", path.label()),
                ));
            }
            results.push((payload, result));
        }
        Ok(results)
    })();
    drop(vm.kill());
    if let Some(mut backend) = backend {
        backend.kill();
    }
    let _ = std::fs::remove_file(&ram);
    result
}

fn command_failed(what: &str, detail: impl Into<String>) -> BenchError {
    BenchError::Command {
        command: what.into(),
        detail: detail.into(),
    }
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
        Disk::VhostUser => Some(start_backend(
            &bench.binaries.nv_vhost_user_blk,
            &[
                "--socket".to_string(),
                socket.display().to_string(),
                "--file".into(),
                image.display().to_string(),
            ],
            bench.disk.join(&format!("{tag}.backend")),
            &socket,
        )?),
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
        if let Some(ok) = run_end(&log) {
            let ended = Instant::now();
            if !ok {
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

/// Whether the guest's run has ended, from the complete lines of its serial `log` (the last
/// line may still be being written: "blkcheck: done o" is not an end yet): `Some(true)` for
/// `blkcheck: done ok`, `Some(false)` for another end or a failure, `None` while it runs.
fn run_end(log: &str) -> Option<bool> {
    let complete = &log[..log.rfind('\n').map_or(0, |end| end + 1)];
    let mut ended = None;
    for line in complete.lines() {
        if line.contains("FAIL") {
            return Some(false);
        }
        if line.starts_with("blkcheck: done") {
            ended = Some(line.trim_end() == "blkcheck: done ok");
        }
    }
    ended
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

/// Starts `binary` (a vhost-user backend) with `arguments`, its output in `log`, and waits
/// for its socket.
fn start_backend(
    binary: &Path,
    arguments: &[String],
    log: PathBuf,
    socket: &Path,
) -> Result<VmmProcess> {
    let _ = std::fs::remove_file(socket);
    let mut backend = VmmProcess::start(binary, arguments, &[], &log, Stdout::Log)
        .map_err(|e| BenchError::io(format!("starting {}", binary.display()), e))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if Instant::now() >= deadline || backend.try_wait().is_some() {
            return Err(BenchError::Command {
                command: binary.display().to_string(),
                detail: format!("no socket:\n{}", backend.stderr_log()),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(backend)
}

#[cfg(test)]
mod tests {
    use super::run_end;

    #[test]
    fn a_run_ends_only_on_a_complete_line() {
        assert_eq!(
            run_end("blkcheck: completed seq=16\nblkcheck: done o"),
            None
        );
        assert_eq!(
            run_end("blkcheck: completed seq=16\nblkcheck: done ok\n"),
            Some(true)
        );
        assert_eq!(run_end("blkcheck: done bad\n"), Some(false));
        assert_eq!(run_end("blkcheck: FAIL at block 3\n"), Some(false));
        assert_eq!(run_end("blkcheck: FAI"), None);
    }
}
