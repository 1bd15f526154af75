//! Runs `nv-bench --quick` end to end on KVM and checks what it produced: every CSV with
//! rows, the plots, the printed ratios, and that guests continued across recovery. It asserts
//! behaviour only; the numbers themselves are never compared with a threshold here.

use std::path::Path;
use std::process::Command;

/// The data rows of the CSV `name` (its header row skipped), each as its cells.
fn csv_rows(dir: &Path, name: &str) -> Vec<Vec<String>> {
    let path = dir.join(name);
    let mut reader =
        csv::Reader::from_path(&path).unwrap_or_else(|e| panic!("{} missing: {e}", path.display()));
    reader
        .records()
        .map(|record| {
            let record = record.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            record.iter().map(str::to_owned).collect()
        })
        .collect()
}

/// The index of the column headed `header` in the CSV file `name`.
fn csv_column(dir: &Path, name: &str, header: &str) -> usize {
    let path = dir.join(name);
    let mut reader =
        csv::Reader::from_path(&path).unwrap_or_else(|e| panic!("{} missing: {e}", path.display()));
    let headers = reader
        .headers()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    headers
        .iter()
        .position(|name| name == header)
        .unwrap_or_else(|| panic!("{} has no column {header:?}: {headers:?}", path.display()))
}

fn assert_png(dir: &Path, name: &str) {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{} missing: {e}", path.display()));
    assert!(
        bytes.len() > 1000 && &bytes[1..4] == b"PNG",
        "{} is not a PNG",
        path.display()
    );
}

/// The rows of `labels` (their second column) in a CSV of `measurement`, in that order; fails
/// the test naming the measurement and the label that has no row.
fn rows_of<'a>(
    rows: &'a [Vec<String>],
    measurement: &str,
    labels: &[&str],
    stdout: &str,
) -> Vec<&'a [String]> {
    labels
        .iter()
        .map(|label| {
            rows.iter()
                .find(|row| row[1] == *label)
                .unwrap_or_else(|| panic!("no {measurement} result for {label}:\n{stdout}"))
                .as_slice()
        })
        .collect()
}

#[test]
fn quick_run_produces_every_measurement() {
    integration_tests::require_kvm!();
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_nv-bench"))
        // nv-bench measures a default build of cloud-hypervisor, which must not read the test-only
        // fault point: if it did, this misspelt one would fail every power-fail save below.
        .env("NV_FAULT_AFTER_PHASE", "not-a-fault-point")
        .args(["--quick", "--out"])
        .arg(out.path())
        .output()
        .expect("running nv-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "nv-bench --quick failed\n{stdout}\n{stderr}"
    );
    let summary = std::fs::read_to_string(out.path().join("summary.txt")).unwrap();
    assert_eq!(summary, stdout, "summary.txt is what was printed");

    // D: all three backings measured, each with a positive rate.
    let overhead = csv_rows(out.path(), "d_overhead.csv");
    let backings = ["anonymous", "shared-file (tmpfs)", "nv-region (tmpfs)"];
    for row in rows_of(&overhead, "D", &backings, &stdout) {
        assert!(row[3].parse::<f64>().unwrap() > 0.0, "{row:?}");
    }
    assert_png(out.path(), "d_overhead.png");

    // C: every method came back to service (a row means the 90% level was reached after the
    // failure), and the curves hold points after the failure for each.
    let service = csv_rows(out.path(), "c_service.csv");
    let curves = csv_rows(out.path(), "c_throughput.csv");
    let methods = [
        "NV in-place recovery",
        "copy snapshot/restore",
        "cold restart + log replay",
    ];
    let results = rows_of(&service, "C", &methods, &stdout);
    for method in methods {
        assert!(
            curves
                .iter()
                .any(|row| row[1] == method && row[2].parse::<f64>().unwrap() > 0.0),
            "no throughput after the failure for {method}"
        );
    }
    let cold = results[2];
    assert!(
        cold[8].parse::<u64>().unwrap() > 0,
        "the cold restart replayed no log: {cold:?}"
    );
    assert_png(out.path(), "c_service_100k.png");

    // A/B: each save has its phases; each recovery continued the guest (nv-bench fails a
    // recovery whose first line is not a progress line, i.e. a reboot).
    let saves = csv_rows(out.path(), "a_save.csv");
    for region in ["tmpfs", "disk-file"] {
        let rows: Vec<_> = saves.iter().filter(|row| row[2] == region).collect();
        assert_eq!(rows.len(), 2, "two power-fail saves on {region}:\n{stdout}");
        for row in rows {
            assert!(row[6].parse::<u64>().unwrap() > 0, "{row:?}");
            assert!(row[7..12].iter().all(|phase| !phase.is_empty()), "{row:?}");
        }
    }
    let recoveries = csv_rows(out.path(), "b_recovery.csv");
    let methods = [
        "NV in place (tmpfs)",
        "NV in place (disk-file)",
        "copy restore",
    ];
    rows_of(&recoveries, "B", &methods, &stdout);
    assert_png(out.path(), "a_save.png");
    assert_png(out.path(), "b_recovery.png");
    // B at any size: a 16 GiB VM (on a sparse region, more RAM than many hosts have) recovers in
    // place after each of its power failures, like the small one.
    let flat = csv_rows(out.path(), "b_flat_recovery.csv");
    for size in [128u64 << 20, 16 << 30] {
        let rows = flat.iter().filter(|row| row[0] == size.to_string()).count();
        assert_eq!(rows, 2, "two recoveries of the {size}-byte VM:\n{stdout}");
    }
    // Every recovery has its `resumed` event and the VMM's own -v figures (exec to vCPUs
    // released, registration wait, irqchip-pit).
    for row in &flat {
        assert!(row[4..8].iter().all(|cell| !cell.is_empty()), "{row:?}");
    }
    assert!(
        stdout.contains("B RATIO NV in-place recovery median 16 GiB / 128 MiB"),
        "{stdout}"
    );
    assert!(
        stdout.contains("B RATIO the VMM's own share of recovery 16 GiB / 128 MiB"),
        "{stdout}"
    );

    // First touch with huge pages: each backing booted with each table (2 MiB, the baseline,
    // and 32 MiB), and a ratio for anonymous RAM and for NV RAM.
    let first_touch = csv_rows(out.path(), "thp_first_touch.csv");
    assert_eq!(first_touch.len(), 8, "2 tables x 4 backings:\n{stdout}");
    for row in &first_touch {
        assert!(row[3].parse::<f64>().unwrap() > 0.0, "{row:?}");
    }
    for ratio in [
        "THP RATIO first touch of 32 MiB anonymous thp=off / anonymous thp=on = ",
        "THP RATIO first touch of 32 MiB nv-region /dev/shm (4 KiB) / nv-region huge tmpfs (2 MiB) = ",
    ] {
        assert!(stdout.contains(ratio), "missing {ratio:?}:\n{stdout}");
    }
    // D with spread: each backing side by side with anonymous thp=on, the baseline against
    // itself too, each ratio line with its range.
    let pairs = csv_rows(out.path(), "d_pairs.csv");
    assert_eq!(pairs.len(), 4, "one pair per backing:\n{stdout}");
    for row in &pairs {
        assert!(row[5].parse::<f64>().unwrap() > 0.0, "{row:?}");
    }
    for backing in [
        "anonymous thp=on",
        "nv-region /dev/shm (4 KiB)",
        "nv-region huge tmpfs (2 MiB)",
        "anonymous thp=off",
    ] {
        let ratio = format!("D RATIO {backing} / anonymous thp=on side by side = ");
        let line = stdout
            .lines()
            .find(|line| line.starts_with(&ratio))
            .unwrap_or_else(|| panic!("missing {ratio:?}:\n{stdout}"));
        assert!(line.contains("(median of 1 pairs, range "), "{line}");
    }

    for ratio in [
        "C keys=100k RATIO cold restart + log replay / NV in-place",
        "C keys=100k RATIO copy snapshot/restore / NV in-place",
        "B 128 MiB RATIO copy restore / NV in place (tmpfs)",
        "D keys=100k nv-region (tmpfs): median",
    ] {
        assert!(stdout.contains(ratio), "missing {ratio:?}:\n{stdout}");
    }
    // E: the upstream-style restore over newer shared memory is not refused; NV refuses to
    // resume a VM that died without a save.
    let stale = csv_rows(out.path(), "e_stale_state.csv");
    assert_eq!(stale.len(), 2, "{stdout}");
    assert!(stale[0][1].contains("RESUMED"), "{:?}", stale[0]);
    assert!(
        stale[1][1].contains("refused (exit code 1)") && stale[1][1].contains("unsafe shutdown"),
        "{:?}",
        stale[1]
    );

    // F: one swap repetition of a 256 MiB VM whose guest keeps 240 MiB changing (it
    // continued after the swap-in, or F fails): a swap file of about that much memory, a plain
    // write of as many bytes, and the ratio and sparse-size lines.
    let swap = csv_rows(out.path(), "f_swap.csv");
    assert_eq!(swap.len(), 1, "{stdout}");
    let (file, plain): (u64, u64) = (swap[0][1].parse().unwrap(), swap[0][2].parse().unwrap());
    assert!((240 << 20..256 << 20).contains(&file), "{:?}", swap[0]);
    assert_eq!(plain, file, "{:?}", swap[0]);
    for line in ["F swap-out of a", "F swap-in of it", "F sparse: a"] {
        assert!(stdout.contains(line), "missing {line:?}:\n{stdout}");
    }

    // A-floor: every repetition ran the floor to a guest exit and a recovery to its resumed
    // event and back out through a committed power-fail save; the ratio and exit lines exist.
    let floor = csv_rows(out.path(), "a_floor.csv");
    assert_eq!(floor.len(), 3, "{stdout}");
    for row in &floor {
        assert!(
            !row[4].is_empty(),
            "the floor's guest never exited: {row:?}"
        );
        // Floor exec->main, ->running, its memory registration, exec->gone; the recovery's
        // exec->vCPUs released; committed->gone.
        for column in [1, 2, 3, 7, 9, 12] {
            assert!(row[column].parse::<f64>().unwrap() > 0.0, "{row:?}");
        }
    }
    for line in [
        "A-floor RATIO recovery exec->vCPUs released / floor exec->running",
        "A-floor RATIO recovery exec->resumed event / floor exec->running",
        "A-floor recovery phases, median ms (VMM -v log): process-start",
        "A-exit SIGPWR->process gone",
    ] {
        assert!(stdout.contains(line), "missing {line:?}:\n{stdout}");
    }
    // H: both disks measured once each, with a positive rate, and the ratio line.
    let vhost_user = csv_rows(out.path(), "h_vhost_user.csv");
    assert_eq!(vhost_user.len(), 2, "{stdout}");
    for row in &vhost_user {
        assert!(
            row[4].parse::<f64>().is_ok_and(|rate| rate > 0.0),
            "{row:?}"
        );
    }
    assert!(
        stdout.contains("ratio vhost-user/in-process"),
        "no H ratio:\n{stdout}"
    );
    // H net: both paths stream both payloads once, every row received datagrams, a ratio each.
    let vhost_user_net = csv_rows(out.path(), "h_vhost_user_net.csv");
    assert_eq!(vhost_user_net.len(), 4, "{stdout}");
    for row in &vhost_user_net {
        assert!(
            row[4].parse::<u64>().is_ok_and(|received| received > 0),
            "{row:?}"
        );
    }
    let net_ratios = stdout
        .lines()
        .filter(|line| line.contains("H net: ") && line.contains("ratio vhost-user/in-process"))
        .count();
    assert_eq!(net_ratios, 2, "no H net ratio per payload:\n{stdout}");
    // I: the netkv database VM's outage for each method (a row means the client resumed, read
    // every acknowledged PUT back and saw no violation), the replay replayed PUTs, and ratios.
    let outages = csv_rows(out.path(), "i_net_outage.csv");
    let methods = [
        "NV in-place recovery",
        "copy snapshot/restore",
        "cold restart + log replay",
    ];
    let results = rows_of(&outages, "I", &methods, &stdout);
    for row in &results {
        assert!(row[3].parse::<f64>().unwrap() > 0.0, "{row:?}");
        assert!(row[4].parse::<u64>().unwrap() > 0, "{row:?}");
    }
    assert!(
        results[2][5].parse::<u64>().unwrap() > 0,
        "{:?}",
        results[2]
    );
    for ratio in [
        "I RATIO copy snapshot/restore / NV in-place",
        "I RATIO cold restart + log replay / NV in-place",
    ] {
        assert!(stdout.contains(ratio), "missing {ratio:?}:\n{stdout}");
    }

    // Checkpoints: one row per interval (off, 100, 10, 1 ms), each with a positive rate; the
    // checkpointed ones took epochs and report their pause, and a ratio against off.
    let checkpoints = csv_rows(out.path(), "checkpoint.csv");
    assert_eq!(checkpoints.len(), 4, "{stdout}");
    let column = |name: &str| csv_column(out.path(), "checkpoint.csv", name);
    let (interval, rate, ratio) = (
        column("checkpoint_ms"),
        column("ops_per_s"),
        column("ratio vs off"),
    );
    let (epochs, early, pause) = (
        column("epochs"),
        column("early epochs"),
        column("pause median us"),
    );
    for row in &checkpoints {
        assert!(
            row[rate].parse::<f64>().is_ok_and(|rate| rate > 0.0),
            "{row:?}"
        );
        if row[interval] != "off" {
            assert!(row[ratio].ends_with('x'), "{row:?}");
            let taken = row[epochs].parse::<u64>().unwrap();
            assert!(taken > 0, "no epochs: {row:?}");
            assert!(row[early].parse::<u64>().unwrap() <= taken, "{row:?}");
            assert!(row[pause].parse::<u64>().unwrap() > 0, "no pause: {row:?}");
        }
    }

    // Only OnDemand restore may be missing, and only as the VMM's clear refusal (issue 5
    // allows "OnDemand, or a clear unsupported error").
    for line in stdout
        .lines()
        .filter(|line| line.starts_with("NOT MEASURED"))
    {
        assert!(
            line.contains("OnDemand") && line.contains("not supported"),
            "a measurement was skipped: {line}\n{stdout}"
        );
    }
}
