//! H. Client-visible outage of a networked database across a failure: the `netkv` guest on
//! virtio-net serves the host load client (`integration_tests::netkv_client`, 2000 requests/s,
//! half PUTs, retried after 50 ms) in a network namespace made for the run; the outage is the
//! time from the client's last answer before the service stopped to its first answer after
//! (the longest gap between two answers from the failure on), for
//! (1) NV in-place recovery (SIGPWR, save, `--nv recover=on`), (2) copy snapshot + restore
//! (`ch-remote pause` + `snapshot`, kill, `--restore`), (3) cold restart with log replay (kill,
//! boot, then every acknowledged PUT replayed in order before the load resumes).
//!
//! The replay's log is the client's record of acknowledged PUTs, which stands in for the write-ahead
//! log the database would keep on a disk: a cold-booted netkv has an empty table, and only the
//! replay brings it back to what was acknowledged. The clock starts at the failure, so each
//! method's save is included. After each run every acknowledged PUT is read back and every
//! answer must have passed the client's checks, or the run counts as not measured.
//!
//! Then virtio-net throughput guest -> host in packets/s and Gbit/s against a host-only tap
//! baseline (see `throughput`).

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::netkv_client::{
    KvClient, LoadConfig, LoadThread, StreamResult, TapStream, FRAME_OVERHEAD,
};
use integration_tests::netns::{
    inheritable_tap, Netns, BASELINE_HOST, BASELINE_SENDER, BASELINE_SENDER_MAC, BASELINE_TAP,
    BASELINE_TAP_MAC, KV_GUEST, KV_GUEST_MAC, KV_TAP,
};

use crate::environment::guest_image;
use crate::error::{BenchError, Result};
use crate::launch::{Launch, MemoryBacking, TestGuest};
use crate::measure::snapshot::{pause_and_snapshot, wait_for_socket};
use crate::measure::{each_variant_repeatedly, Bench, StepNames};
use crate::output::CsvTable;
use crate::running_vm::RunningVm;
use crate::stats::median;

/// Answers the load must get before the failure, and after it to count as resumed.
const ANSWERS_BEFORE: u64 = 2000;
const ANSWERS_AFTER: u64 = 200;
/// Bounds for the guest to be ready and for the load to come back.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const BACK_TIMEOUT: Duration = Duration::from_secs(180);
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);

/// The tests' load, with retries every 5 ms: after an outage the first answer comes at the
/// next retry, so the retry period bounds how much the measurement adds to every method.
fn load_config() -> LoadConfig {
    LoadConfig {
        retry_after: Duration::from_millis(5),
        ..LoadConfig::default()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    NvInPlace,
    CopyRestore,
    ColdRestart,
}

impl Method {
    const ALL: [Method; 3] = [Method::NvInPlace, Method::CopyRestore, Method::ColdRestart];

    fn label(self) -> &'static str {
        match self {
            Method::NvInPlace => "NV in-place recovery",
            Method::CopyRestore => "copy snapshot/restore",
            Method::ColdRestart => "cold restart + log replay",
        }
    }
}

struct OutageRun {
    outage: Duration,
    puts_acked: u64,
    replayed: Option<usize>,
}

pub fn run(bench: &mut Bench) -> Result<()> {
    let ram = bench.profile.ram_sizes[0];
    bench.summary.line("");
    bench.summary.line(format!(
        "== I. client-visible outage of the netkv database VM ({} MiB RAM, virtio-net on a tap): last answer before the failure to first after",
        ram >> 20
    ));
    let config = load_config();
    bench.summary.line(format!(
        "I load: {} requests/s, {}% PUTs over {} keys, retry after {} ms, at most {} outstanding",
        config.rate,
        config.put_pct,
        config.keys,
        config.retry_after.as_millis(),
        config.window
    ));
    let image = guest_image("netkv")?;
    let mut table = CsvTable::new(&[
        "ram_mib",
        "method",
        "repetition",
        "outage_s",
        "puts_acknowledged",
        "replayed_puts",
    ]);
    let runs = each_variant_repeatedly(
        bench,
        &Method::ALL,
        bench.profile.service_repetitions,
        StepNames {
            letter: "I",
            keys: config.keys,
            repetition: "run",
            detail: ": load, failure, client resumes",
        },
        Method::label,
        |bench, method, repetition| {
            let run = measure_one(bench, &image, ram, method)?;
            table.push(vec![
                (ram >> 20).to_string(),
                method.label().into(),
                repetition.to_string(),
                format!("{:.4}", run.outage.as_secs_f64()),
                run.puts_acked.to_string(),
                run.replayed.map(|n| n.to_string()).unwrap_or_default(),
            ]);
            bench.summary.line(format!(
                "I {} run {repetition}: outage {:.1} ms, {} PUTs acknowledged{}",
                method.label(),
                run.outage.as_secs_f64() * 1e3,
                run.puts_acked,
                run.replayed
                    .map(|n| format!(", {n} replayed"))
                    .unwrap_or_default()
            ));
            Ok(run)
        },
    );
    let outages = |done: &[OutageRun]| -> Vec<f64> {
        done.iter().map(|run| run.outage.as_secs_f64()).collect()
    };
    let nv = runs
        .iter()
        .find(|(method, _)| *method == Method::NvInPlace)
        .and_then(|(_, done)| median(&outages(done)));
    for (method, done) in &runs {
        let Some(middle) = median(&outages(done)) else {
            continue;
        };
        bench.summary.line(format!(
            "I {}: median outage {:.1} ms over {} run(s)",
            method.label(),
            middle * 1e3,
            done.len()
        ));
        if let (Some(nv), false) = (nv, *method == Method::NvInPlace) {
            bench.summary.line(format!(
                "I RATIO {} / NV in-place = {:.1}x (median client-visible outage)",
                method.label(),
                middle / nv
            ));
        }
    }
    table.write(&bench.out_dir, "i_net_outage.csv")?;
    if let Err(error) = throughput(bench, &image) {
        bench
            .summary
            .not_measured("I virtio-net throughput guest -> host", &error.to_string());
    }
    Ok(())
}

/// Datagram payloads of the throughput measurement: small packets, and full 1514-byte frames.
const STREAM_PAYLOADS: [usize; 2] = [64, 1472];

/// Guest -> host throughput: netkv streams datagrams through virtio-net and the tap to a host
/// socket, against the host alone writing the same frames into a second tap of the same
/// namespace (one `write` each, as the device does) to a socket the same way. Each pair
/// alternates, `service_repetitions` times.
fn throughput(bench: &mut Bench, image: &Path) -> Result<()> {
    let count: u64 = if bench.profile.name == "quick" {
        20_000
    } else {
        200_000
    };
    bench.summary.line(format!(
        "I throughput: {count} UDP datagrams per stream, guest (netkv STREAM, virtio-net, a notify every 32 frames) vs host-only (a thread writing the frames into a tap), each received by a host socket"
    ));
    let netns = Netns::try_new("benchtp").map_err(|e| failed("network namespace", e))?;
    netns
        .add_kv_tap()
        .and_then(|()| netns.add_baseline_tap())
        .map_err(|e| failed("taps in the namespace", e))?;
    let _inside = netns
        .enter()
        .map_err(|e| BenchError::io("entering the network namespace", e))?;
    let guest = netkv_guest(bench, image, bench.profile.ram_sizes[0]);
    let vmm_arguments = with_net(bench);
    let mut vm = RunningVm::start(
        &bench.binaries.cloud_hypervisor,
        &Launch::Boot {
            guest,
            backing: MemoryBacking::Anonymous,
        },
        &bench.disk.join("h-throughput.serial"),
        None,
        &bench.disk.join("h-throughput.vmm"),
        &vmm_arguments,
    )?;
    let measured = stream_pairs(bench, &mut vm, count);
    drop(vm.kill());
    let mut table = CsvTable::new(&[
        "payload_bytes",
        "path",
        "repetition",
        "sent",
        "received",
        "packets_per_s",
        "gbit_per_s",
    ]);
    let measured = measured?;
    for &(payload, repetition, path, result) in &measured {
        table.push(vec![
            payload.to_string(),
            path.into(),
            repetition.to_string(),
            result.sent.to_string(),
            result.received.to_string(),
            format!("{:.0}", result.packets_per_s()),
            format!("{:.3}", result.gbit_per_s()),
        ]);
    }
    for payload in STREAM_PAYLOADS {
        let rate = |path: &str| {
            let values: Vec<f64> = measured
                .iter()
                .filter(|row| row.0 == payload && row.2 == path)
                .map(|row| row.3.packets_per_s())
                .collect();
            median(&values)
        };
        let (Some(guest), Some(host)) = (rate(GUEST_PATH), rate(HOST_PATH)) else {
            continue;
        };
        let frame_bits = ((payload + FRAME_OVERHEAD) * 8) as f64;
        bench.summary.line(format!(
            "I throughput {}-byte frames: guest -> host {:.0} packets/s ({:.3} Gbit/s), host-only tap {:.0} packets/s ({:.3} Gbit/s); RATIO guest / host-only = {:.2}x",
            payload + FRAME_OVERHEAD,
            guest,
            guest * frame_bits / 1e9,
            host,
            host * frame_bits / 1e9,
            guest / host
        ));
    }
    table.write(&bench.out_dir, "i_net_throughput.csv")?;
    Ok(())
}

const GUEST_PATH: &str = "guest virtio-net -> host";
const HOST_PATH: &str = "host-only tap -> host";

type StreamRow = (usize, usize, &'static str, StreamResult);

fn stream_pairs(bench: &Bench, vm: &mut RunningVm, count: u64) -> Result<Vec<StreamRow>> {
    vm.wait_for_lines("netkv: ready", 1, READY_TIMEOUT)?;
    let mut client = KvClient::new(KV_GUEST, load_config())
        .map_err(|e| failed("netkv client", e.to_string()))?;
    let baseline = TapStream {
        tap_mac: BASELINE_TAP_MAC,
        sender_mac: BASELINE_SENDER_MAC,
        sender: BASELINE_SENDER,
        receiver: BASELINE_HOST,
    };
    let mut rows = Vec::new();
    for repetition in 0..bench.profile.service_repetitions {
        for payload in STREAM_PAYLOADS {
            let guest = client
                .stream_from_guest(count, payload)
                .map_err(|e| failed("netkv stream", e.to_string()))?;
            if guest.received == 0 {
                return Err(failed("netkv stream", "no datagram arrived"));
            }
            let host = baseline
                .run(inheritable_tap(BASELINE_TAP), count, payload)
                .map_err(|e| failed("tap baseline stream", e.to_string()))?;
            rows.push((payload, repetition, GUEST_PATH, guest));
            rows.push((payload, repetition, HOST_PATH, host));
        }
    }
    Ok(rows)
}

fn failed(what: impl Into<String>, detail: impl Into<String>) -> BenchError {
    BenchError::Command {
        command: what.into(),
        detail: detail.into(),
    }
}

fn measure_one(bench: &Bench, image: &Path, ram: u64, method: Method) -> Result<OutageRun> {
    let netns = Netns::try_new("bench").map_err(|e| failed("network namespace", e))?;
    // A permanent neighbour entry: the host's ARP state machine, which may be probing at 1 s
    // intervals when the guest comes back, stays out of the measured outage (tests/net.rs
    // keeps resolving the guest by ARP).
    let guest_ip = KV_GUEST.ip().to_string();
    netns
        .add_kv_tap()
        .and_then(|()| {
            netns.ip(&[
                "neigh",
                "replace",
                &guest_ip,
                "lladdr",
                KV_GUEST_MAC,
                "dev",
                KV_TAP,
                "nud",
                "permanent",
            ])
        })
        .map_err(|e| failed("netkv tap in the namespace", e))?;
    // This thread (and every VMM it starts, and the client's socket) lives in the namespace
    // until the guard drops; the namespace itself goes after it.
    let _inside = netns
        .enter()
        .map_err(|e| BenchError::io("entering the network namespace", e))?;
    let tag = format!("h-{method:?}");
    let region = bench.tmpfs.join(&format!("{tag}.region"));
    let snapshot_dir = bench.disk.join(&format!("{tag}.snapshot"));
    let result = measure_with(bench, image, ram, method, &tag, &region, &snapshot_dir);
    let _ = std::fs::remove_file(&region);
    let _ = std::fs::remove_dir_all(&snapshot_dir);
    result
}

fn measure_with(
    bench: &Bench,
    image: &Path,
    ram: u64,
    method: Method,
    tag: &str,
    region: &Path,
    snapshot_dir: &Path,
) -> Result<OutageRun> {
    let guest = netkv_guest(bench, image, ram);
    let backing = match method {
        Method::NvInPlace => MemoryBacking::NvRegion {
            region: region.into(),
            vm: "kv".into(),
        },
        Method::CopyRestore | Method::ColdRestart => MemoryBacking::Anonymous,
    };
    let socket = (method == Method::CopyRestore).then(|| bench.tmpfs.join(&format!("{tag}.sock")));
    let vmm_arguments = with_net(bench);
    let serial = bench.disk.join(&format!("{tag}.serial"));
    let boot = Launch::Boot {
        guest: guest.clone(),
        backing,
    };
    let mut vm = RunningVm::start(
        &bench.binaries.cloud_hypervisor,
        &boot,
        &serial,
        socket.as_deref(),
        &bench.disk.join(&format!("{tag}.vmm")),
        &vmm_arguments,
    )?;
    vm.wait_for_lines("netkv: ready", 1, READY_TIMEOUT)?;
    let client = KvClient::new(KV_GUEST, load_config())
        .map_err(|e| failed("netkv client", e.to_string()))?;
    let mut load = LoadThread::start(client);
    if !load.wait_answers(ANSWERS_BEFORE, BACK_TIMEOUT) {
        return Err(failed(
            "netkv load",
            format!("fewer than {ANSWERS_BEFORE} answers before the failure"),
        ));
    }

    let failed_at = Instant::now();
    let mut replayed = None;
    let restarted_vm = match method {
        Method::NvInPlace => {
            vm.power_fail(SAVE_TIMEOUT)?;
            vm.kill();
            let launch = Launch::NvRecover {
                region: region.into(),
                vm: "kv".into(),
            };
            start(bench, &launch, &serial, tag, &bench.vmm_arguments)?
        }
        Method::CopyRestore => {
            let socket = socket.as_deref().unwrap_or(Path::new(""));
            wait_for_socket(socket, Duration::from_secs(5))?;
            pause_and_snapshot(&bench.binaries.ch_remote, socket, snapshot_dir)?;
            vm.kill();
            let launch = Launch::Restore {
                snapshot_dir: snapshot_dir.into(),
                on_demand: false,
            };
            start(bench, &launch, &serial, tag, &bench.vmm_arguments)?
        }
        Method::ColdRestart => {
            vm.kill();
            // The database is down: the load stops until the log is replayed.
            let mut client = stop(load)?;
            let mut restarted = start(bench, &boot, &serial, tag, &vmm_arguments)?;
            restarted.wait_for_lines("netkv: ready", 1, READY_TIMEOUT)?;
            client.expect_new_boot();
            replayed = Some(
                client
                    .replay_acknowledged(BACK_TIMEOUT)
                    .map_err(|e| failed("log replay", e.to_string()))?,
            );
            load = LoadThread::start(client);
            restarted
        }
    };
    if !load.wait_answers(ANSWERS_AFTER, BACK_TIMEOUT) {
        return Err(failed(
            "netkv load",
            format!("fewer than {ANSWERS_AFTER} answers within {BACK_TIMEOUT:?} after the failure"),
        ));
    }
    let mut client = stop(load)?;
    let read_back = client.read_back_all(BACK_TIMEOUT);
    drop(restarted_vm.kill());
    read_back.map_err(|e| failed("read-back of every acknowledged PUT", e.to_string()))?;
    if let Some(violation) = client.ledger.violations.first() {
        return Err(failed(
            "netkv client checks",
            format!(
                "{} violation(s), the first: {}",
                client.ledger.violations.len(),
                violation.0
            ),
        ));
    }
    let outage = client
        .outage_after(failed_at)
        .ok_or_else(|| failed("netkv load", "no answer on one side of the failure"))?;
    Ok(OutageRun {
        outage,
        puts_acked: client.ledger.puts_acked,
        replayed,
    })
}

/// netkv on the namespace's address, in `ram` bytes.
fn netkv_guest(bench: &Bench, image: &Path, ram: u64) -> TestGuest {
    TestGuest {
        image: image.into(),
        parameters: format!("ip={} port={}", KV_GUEST.ip(), KV_GUEST.port()),
        ram_bytes: ram,
        tsc_khz: bench.tsc_khz,
        period_ms: 1000,
        log_disk: None,
    }
}

/// The run's extra VMM arguments with netkv's `--net` on the namespace's tap.
fn with_net(bench: &Bench) -> Vec<String> {
    let mut arguments = bench.vmm_arguments.clone();
    arguments.extend([
        "--net".to_string(),
        format!("tap={KV_TAP},mac={KV_GUEST_MAC},num_queues=2"),
    ]);
    arguments
}

fn start(
    bench: &Bench,
    launch: &Launch,
    serial: &Path,
    tag: &str,
    arguments: &[String],
) -> Result<RunningVm> {
    RunningVm::start(
        &bench.binaries.cloud_hypervisor,
        launch,
        serial,
        None,
        &bench.disk.join(&format!("{tag}.restart.vmm")),
        arguments,
    )
}

fn stop(load: LoadThread) -> Result<KvClient> {
    load.stop()
        .map_err(|e| failed("netkv client", e.to_string()))
}
