//! `nv-bench`: the benchmarks of issue 6, measured side by side in one run on this machine.
//!
//! `cargo run --release -p nv-bench -- all` writes CSVs, PNG plots and `summary.txt` (every
//! printed ratio) to `docs/bench/`; `-- --quick` runs a reduced set for the test suite.
//! A measurement that cannot be made here is printed as `NOT MEASURED <what>: <why>`.

mod detached_teardown;
mod environment;
mod error;
mod launch;
mod measure;
mod monotonic;
mod output;
mod plot;
mod profile;
mod running_vm;
mod save_log;
mod serial;
mod stats;
mod throughput;
mod vmm_process;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use integration_tests::binaries::workspace_root;

use crate::environment::{file_system_type, guest_image, guest_tsc_khz, Binaries, ScratchDir};
use crate::error::{BenchError, Result};
use crate::measure::Bench;
use crate::output::Summary;
use crate::profile::Profile;

/// Which measurements to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    /// A, A-floor, B, C, D, E, F, G, H, I, the memory and the checkpoint sections.
    All,
    /// A and B: power-fail save by phase, recovery to running vs copy restore.
    Save,
    /// C: time to recovered service, NV vs copy restore vs cold restart with log replay.
    Service,
    /// E: resuming a state over memory that moved on (upstream shared-memory snapshot vs NV).
    Stale,
    /// D: kvstore throughput on NV-backed vs anonymous memory.
    Overhead,
    /// G: 16 VMs of one region power-failed by one `nv-persist power-fail --region`.
    Region,
    /// F: swap-out and swap-in of a running VM vs plain write+fsync and read of as many bytes.
    Swap,
    /// A-floor: recovery vs the least a process can do to run the guest again; SIGPWR to exit.
    Floor,
    /// H: blkcheck disk throughput over vhost-user-blk vs the in-process virtio-blk.
    VhostUser,
    /// Issue 15: B recovery up to 64 GiB, first touch on huge pages, D with spread.
    Memory,
    /// Issue 15's B at any size alone: recovery of sparse-region VMs up to 64 GiB.
    MemoryFlat,
    /// I: client-visible outage of the netkv database VM, NV vs copy restore vs cold restart.
    Net,
    /// Checkpoints: kvstore throughput with checkpoint_ms = 1, 10, 100 vs off, pause, undo log.
    Checkpoint,
}

#[derive(Parser, Debug)]
#[command(
    name = "nv-bench",
    about = "Power-fail save, in-place recovery vs copy restore vs cold restart, NV overhead"
)]
struct Cli {
    /// What to measure.
    #[arg(value_enum, default_value = "all")]
    which: Which,

    /// Reduced sizes and durations (the test suite's run); results go to
    /// target/nv-bench-quick unless --out is given.
    #[arg(long)]
    quick: bool,

    /// Output directory for CSVs, plots and summary.txt (default: docs/bench for a full run).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,

    /// Scratch directory on tmpfs (NV regions that behave like NVDIMM).
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    tmpfs_dir: PathBuf,

    /// Scratch directory on a disk file system (log disks, snapshots, disk-file regions).
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    disk_dir: PathBuf,

    /// The VMM to measure (default: build this workspace's cloud-hypervisor).
    #[arg(long, value_name = "PATH")]
    ch_binary: Option<PathBuf>,

    /// The ch-remote to drive it with (default: build this workspace's).
    #[arg(long, value_name = "PATH")]
    ch_remote_binary: Option<PathBuf>,

    /// An extra argument for every VMM command line (repeatable), e.g.
    /// `--vmm-arg=--seccomp --vmm-arg=false`; printed with the results.
    #[arg(long = "vmm-arg", value_name = "ARG", allow_hyphen_values = true)]
    vmm_args: Vec<String>,

    /// `checkpoint` only: the key counts to measure (comma-separated; default: the profile's).
    #[arg(long, value_name = "KEYS", value_delimiter = ',')]
    checkpoint_keys: Vec<u64>,

    /// `checkpoint` only: the intervals to measure, in ms (comma-separated; 0 is "off", the
    /// baseline of the printed ratios; default: 0,100,10,1). Naming any skips the tracking
    /// floor (nv-track): a short run to compare the pause of two VMM binaries.
    #[arg(long, value_name = "MS", value_delimiter = ',')]
    checkpoint_ms: Vec<u64>,

    /// B at any size: power failures and recoveries per RAM size (default: the profile's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    flat_cycles: Option<u32>,

    /// TrueType font for plot labels.
    #[arg(long, value_name = "PATH", default_value = plot::DEFAULT_FONT)]
    font: PathBuf,
}

/// One line of `/proc/cpuinfo`'s first `model name`, or "unknown".
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn command_output(program: &str, arguments: &[&str]) -> String {
    std::process::Command::new(program)
        .args(arguments)
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn machine_facts(summary: &mut Summary, tsc_khz: u32, profile: &Profile, cli: &Cli) {
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .to_string();
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib / (1024.0 * 1024.0))
        })
        .unwrap_or(f64::NAN);
    summary.line(format!(
        "machine: {} CPUs ({}), {:.1} GiB RAM, kernel {}, guest TSC {} kHz",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model(),
        memory_gib,
        command_output("uname", &["-r"]),
        tsc_khz
    ));
    summary.line(format!(
        "scratch: tmpfs directory {} ({}), disk directory {} ({})",
        cli.tmpfs_dir.display(),
        file_system_type(&cli.tmpfs_dir),
        cli.disk_dir.display(),
        file_system_type(&cli.disk_dir)
    ));
    summary.line(format!(
        "run: profile {}, commit {}, started {}",
        profile.name,
        command_output(
            "git",
            &[
                "-C",
                &workspace_root().display().to_string(),
                "rev-parse",
                "--short",
                "HEAD"
            ]
        ),
        command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
    ));
}

/// One measurement section over the shared context.
type Section<S = Bench> = fn(&mut S) -> Result<()>;

/// The run's profile: full or quick, with the command line's overrides.
fn profile_for(cli: &Cli) -> Profile {
    let mut profile = if cli.quick {
        Profile::quick()
    } else {
        Profile::full()
    };
    profile.select_checkpoints(&cli.checkpoint_keys, &cli.checkpoint_ms);
    if let Some(cycles) = cli.flat_cycles {
        profile.flat_cycles = cycles as usize;
    }
    profile
}

/// The sections `which` runs, in the order of `all`.
fn sections_for(which: Which) -> Vec<(Which, Section)> {
    let sections: [(Which, Section); 12] = [
        (Which::Overhead, measure::overhead::run),
        (Which::Service, measure::service::run),
        (Which::Save, measure::power_fail::run),
        (Which::Floor, measure::floor::run),
        (Which::Stale, measure::stale_state::run),
        (Which::Region, measure::region_power_fail::run),
        (Which::Swap, measure::swap::run),
        (Which::VhostUser, measure::vhost_user::run),
        (Which::Memory, measure::memory_scale::run),
        (Which::Net, measure::net_outage::run),
        (Which::Checkpoint, measure::checkpoint::run),
        // Part of `memory`: never run by `all` on its own.
        (Which::MemoryFlat, measure::memory_scale::run_flat),
    ];
    sections
        .into_iter()
        .filter(|(section, _)| {
            *section == which || (which == Which::All && *section != Which::MemoryFlat)
        })
        .collect()
}

fn run(cli: Cli) -> Result<()> {
    let started = Instant::now();
    let profile = profile_for(&cli);
    let out_dir = cli.out.clone().unwrap_or_else(|| {
        if cli.quick {
            workspace_root().join("target").join("nv-bench-quick")
        } else {
            workspace_root().join("docs").join("bench")
        }
    });
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| BenchError::io(format!("creating {}", out_dir.display()), e))?;
    plot::use_font(&cli.font)?;
    let binaries = Binaries::locate(cli.ch_binary.clone(), cli.ch_remote_binary.clone())?;
    let tsc_khz = guest_tsc_khz()?;
    let mut summary = Summary::default();
    machine_facts(&mut summary, tsc_khz, &profile, &cli);
    let mut bench = Bench {
        binaries,
        kvstore_image: guest_image("kvstore")?,
        counter_image: guest_image("counter")?,
        tsc_khz,
        profile,
        out_dir: out_dir.clone(),
        tmpfs: ScratchDir::create(&cli.tmpfs_dir, "tmpfs")?,
        disk: ScratchDir::create(&cli.disk_dir, "disk")?,
        summary,
        vmm_arguments: cli.vmm_args.clone(),
    };
    if !bench.vmm_arguments.is_empty() {
        bench.summary.line(format!(
            "run: every VMM started with the extra arguments {:?}",
            bench.vmm_arguments
        ));
    }
    run_sections(
        &mut bench,
        |bench| &mut bench.summary,
        sections_for(cli.which),
        &out_dir,
    )?;
    bench.summary.line("");
    bench.summary.line(format!(
        "nv-bench {} finished in {:.0} s; results in {}",
        bench.profile.name,
        started.elapsed().as_secs_f64(),
        out_dir.display()
    ));
    bench.summary.write(&out_dir)?;
    Ok(())
}

/// Runs `sections` in order, each followed by how long it took. A section that fails ends the
/// run, but not before `summary.txt` and `results.md` are written with everything measured up to
/// it and the failure: a full run is long, and a late section's failure must not lose the
/// earlier ones.
fn run_sections<S>(
    state: &mut S,
    summary: fn(&mut S) -> &mut Summary,
    sections: impl IntoIterator<Item = (Which, Section<S>)>,
    out_dir: &std::path::Path,
) -> Result<()> {
    for (which, section) in sections {
        let section_started = Instant::now();
        if let Err(error) = section(state) {
            let summary = summary(state);
            summary.line(format!("({which:?} FAILED: {error})"));
            summary.write(out_dir)?;
            return Err(error);
        }
        summary(state).line(format!(
            "({:?} took {:.0} s)",
            which,
            section_started.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nv-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section_names(which: Which) -> Vec<Which> {
        sections_for(which).into_iter().map(|(w, _)| w).collect()
    }

    #[test]
    fn memory_flat_runs_b_flat_alone_and_all_does_not_run_it_twice() {
        assert_eq!(section_names(Which::MemoryFlat), [Which::MemoryFlat]);
        assert_eq!(section_names(Which::Memory), [Which::Memory]);
        let all = section_names(Which::All);
        assert!(all.contains(&Which::Memory), "{all:?}");
        assert!(!all.contains(&Which::MemoryFlat), "{all:?}");
        assert_eq!(all.len(), 11);
    }

    #[test]
    fn flat_cycles_overrides_the_profile_and_must_be_positive() {
        let cli = Cli::try_parse_from(["nv-bench", "memory-flat", "--flat-cycles", "9"]).unwrap();
        assert_eq!(cli.which, Which::MemoryFlat);
        assert_eq!(profile_for(&cli).flat_cycles, 9);
        let quick = Cli::try_parse_from(["nv-bench", "--quick"]).unwrap();
        assert_eq!(
            profile_for(&quick).flat_cycles,
            Profile::quick().flat_cycles
        );
        assert!(Cli::try_parse_from(["nv-bench", "--flat-cycles", "0"]).is_err());
    }

    struct Run {
        summary: Summary,
        ran: Vec<&'static str>,
    }

    fn summary_of(run: &mut Run) -> &mut Summary {
        &mut run.summary
    }

    fn measures(run: &mut Run) -> Result<()> {
        run.ran.push("overhead");
        run.summary.line("D measured 1.000x");
        Ok(())
    }

    fn fails(run: &mut Run) -> Result<()> {
        run.ran.push("checkpoint");
        Err(BenchError::GuestFailed {
            line: "nv-track: guest exit".into(),
        })
    }

    fn never_reached(run: &mut Run) -> Result<()> {
        run.ran.push("net");
        Ok(())
    }

    /// The full run at 4f2a023 lost its 21 minutes of results: the last section failed and no
    /// summary.txt was written.
    #[test]
    fn a_failing_section_still_writes_what_the_run_measured() {
        let out = tempfile::tempdir().unwrap();
        let mut run = Run {
            summary: Summary::default(),
            ran: Vec::new(),
        };
        let sections: [(Which, Section<Run>); 3] = [
            (Which::Overhead, measures),
            (Which::Checkpoint, fails),
            (Which::Net, never_reached),
        ];
        let error = run_sections(&mut run, summary_of, sections, out.path()).unwrap_err();
        assert!(error.to_string().contains("nv-track: guest exit"));
        assert_eq!(run.ran, ["overhead", "checkpoint"]);
        let text = std::fs::read_to_string(out.path().join("summary.txt")).unwrap();
        assert!(text.contains("D measured 1.000x"), "{text}");
        assert!(text.contains("(Overhead took"), "{text}");
        assert!(
            text.contains("(Checkpoint FAILED: the guest reported a failure: nv-track"),
            "{text}"
        );
        assert!(out.path().join("results.md").exists());
    }
}
