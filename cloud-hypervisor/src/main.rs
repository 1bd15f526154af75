//! `cloud-hypervisor`: the command line of a drop-in cloud-hypervisor v53, plus `--nv`.
//!
//! Exit codes are upstream's: 2 for a usage error (no arguments, unknown option, missing value:
//! clap reports it), 1 for a value that cannot be used or a VMM that fails to start, otherwise what the VMM
//! returns. Every failure is one line on stderr that names the option at fault.

mod logger;

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::{ArgAction, Parser};
use vmm::config::{
    ApiSocketConfig, EventMonitorConfig, RestoreConfig, SeccompMode, VmConfig, VmOptionStrings,
    VmmLaunch,
};
use vmm::event_monitor;
use vmm::recovery_ahead::RecoveryAhead;

/// Shown by `--version`: ours, and what we stand in for.
const VERSION: &str = concat!(
    "v",
    env!("CARGO_PKG_VERSION"),
    " (NV-Hypervisor: persistent VMs on non-volatile memory; drop-in for cloud-hypervisor v53)"
);

#[derive(Parser, Debug)]
#[command(
    name = "cloud-hypervisor",
    version = VERSION,
    about = "NV-Hypervisor: cloud-hypervisor v53 compatible VMM whose VMs survive host power \
             failures in place (RAM in non-volatile memory)"
)]
struct Cli {
    /// Kernel to boot: ELF with a PVH note, or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<String>,

    /// Firmware to boot (upstream's; refused: firmware boot is not implemented).
    #[arg(long, value_name = "PATH")]
    firmware: Option<String>,

    /// Kernel command line.
    #[arg(long, value_name = "CMDLINE")]
    cmdline: Option<String>,

    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<String>,

    /// boot=<boot_vcpus>[,max=<max_vcpus>][,topology=..][,kvm_hyperv=on|off][,max_phys_bits=N]
    /// [,features=..][,nested=on|off][,core_scheduling=vm|vcpu|off][,profile=host]
    #[arg(long, value_name = "boot=N,max=M")]
    cpus: Option<String>,

    /// size=<guest_memory_size>[,shared=on|off][,hugepages=on|off][,prefault=on|off]
    /// [,thp=on|off][,mergeable=on|off][,hotplug_method=..][,hotplug_size=..][,reserve=on|off]
    #[arg(long, value_name = "size=SIZE,...")]
    memory: Option<String>,

    /// id=<id>,size=<size>[,file=<path>][,shared=on|off][,hugepages=on|off][,prefault=on|off]
    #[arg(long = "memory-zone", value_name = "id=ID,size=SIZE,...", num_args = 1.., action = ArgAction::Append)]
    memory_zone: Vec<String>,

    /// path=<disk_image_path>[,readonly=on|off][,direct=on|off][,id=<id>][,num_queues=1]
    /// [,queue_size=128|256][,sparse=on|off][,image_type=raw]
    #[arg(long, value_name = "path=PATH,...", num_args = 1.., action = ArgAction::Append)]
    disk: Vec<String>,

    /// Upstream's network devices: refused (virtio-net is not implemented yet) unless empty.
    #[arg(long, value_name = "tap=..,...", num_args = 1.., action = ArgAction::Append)]
    net: Vec<String>,

    /// src=<entropy_source_path>: the virtio-rng device's source (default /dev/urandom).
    #[arg(long, value_name = "src=PATH")]
    rng: Option<String>,

    /// num_pci_segments=1[,...]: upstream's platform keys, at values this VMM honours.
    #[arg(long, value_name = "num_pci_segments=1,...")]
    platform: Option<String>,

    /// Upstream device options this VMM has no device for: refused by name (exit 1).
    #[arg(long, value_name = "...", num_args = 1.., action = ArgAction::Append)]
    fs: Vec<String>,
    #[arg(long, value_name = "...", num_args = 1.., action = ArgAction::Append)]
    pmem: Vec<String>,
    #[arg(long, value_name = "...", num_args = 1.., action = ArgAction::Append)]
    device: Vec<String>,
    #[arg(long = "user-device", value_name = "...", num_args = 1.., action = ArgAction::Append)]
    user_device: Vec<String>,
    #[arg(long, value_name = "...", num_args = 1.., action = ArgAction::Append)]
    vdpa: Vec<String>,
    #[arg(long, value_name = "...")]
    vsock: Option<String>,
    #[arg(long, value_name = "...")]
    balloon: Option<String>,
    #[arg(long, value_name = "...", num_args = 1.., action = ArgAction::Append)]
    numa: Vec<String>,
    #[arg(long, value_name = "...")]
    tpm: Option<String>,
    #[arg(long = "generic-vhost-user", value_name = "...", num_args = 1.., action = ArgAction::Append)]
    generic_vhost_user: Vec<String>,
    #[arg(long = "rate-limit-group", value_name = "...", num_args = 1.., action = ArgAction::Append)]
    rate_limit_group: Vec<String>,
    #[arg(long = "pci-segment", value_name = "...", num_args = 1.., action = ArgAction::Append)]
    pci_segment: Vec<String>,
    /// Upstream's watchdog device: refused (none here).
    #[arg(long)]
    watchdog: bool,
    /// off: upstream's port-0xe9 debug console, accepted off only.
    #[arg(long = "debug-console", value_name = "off")]
    debug_console: Option<String>,

    /// off|null|pty|tty|file=<path>
    #[arg(long, value_name = "MODE")]
    serial: Option<String>,

    /// off|null|pty|tty|file=<path>
    #[arg(long, value_name = "MODE")]
    console: Option<String>,

    /// Enable the pvpanic device (the guest reports its panics to the host).
    #[arg(long)]
    pvpanic: bool,

    /// path=<socket_path>|fd=<fd>|<socket_path>: the REST API socket.
    #[arg(long = "api-socket", value_name = "path=PATH|fd=N")]
    api_socket: Option<String>,

    /// path=<event_file>|fd=<fd>: JSON events of the VMM and the VM.
    #[arg(long = "event-monitor", value_name = "path=PATH|fd=N")]
    event_monitor: Option<String>,

    /// source_url=file:///<dir>[,resume=true][,prefault=on][,memory_restore_mode=copy|ondemand]
    #[arg(long, value_name = "source_url=URL,...", conflicts_with_all = ["kernel", "nv"])]
    restore: Option<String>,

    /// region=<path>,vm=<name>[,create=on][,recover=on][,force-cold=on][,format=on]
    /// [,region_size=<size>][,deadline_ms=<ms>]: keep the VM in a non-volatile region.
    #[arg(long, value_name = "region=PATH,vm=NAME,...")]
    nv: Option<String>,

    /// Log to this file instead of stderr.
    #[arg(long = "log-file", value_name = "PATH")]
    log_file: Option<PathBuf>,

    /// More log output; repeat for more (-v info, -vv debug, -vvv trace).
    #[arg(short = 'v', action = ArgAction::Count)]
    verbose: u8,

    /// Seccomp filtering: true (default) kills on a forbidden call, log only logs it, false disables.
    #[arg(long, value_name = "true|false|log", default_value = "true",
          value_parser = ["true", "false", "log"])]
    seccomp: String,

    /// Restrict the VMM to the files its configuration names (Linux Landlock).
    #[arg(long)]
    landlock: bool,

    /// path=<path>,access=r|w|rw: more paths the VMM may reach under --landlock (snapshot
    /// destinations, restore sources, regions given later over the API).
    #[arg(long = "landlock-rules", value_name = "path=PATH,access=rw", num_args = 1.., action = ArgAction::Append)]
    landlock_rules: Vec<String>,
}

/// Checks a file the VMM will read before anything starts, so the message names the option.
fn check_readable_file(option: &str, path: &str) -> anyhow::Result<()> {
    let metadata = std::fs::metadata(path).with_context(|| format!("--{option} {path}"))?;
    if !metadata.is_file() {
        return Err(anyhow!("--{option} {path}: not a regular file"));
    }
    File::open(path).with_context(|| format!("--{option} {path}"))?;
    Ok(())
}

/// Upstream device options this VMM has no device for, as given: `VmConfig::from_options`
/// refuses them by the rule that refuses the same members of a `vm.create` body.
fn unimplemented_devices(cli: &Cli) -> Vec<(&'static str, &str)> {
    let lists: [(&'static str, &[String]); 8] = [
        ("pmem", &cli.pmem),
        ("device", &cli.device),
        ("user-device", &cli.user_device),
        ("vdpa", &cli.vdpa),
        ("numa", &cli.numa),
        ("generic-vhost-user", &cli.generic_vhost_user),
        ("rate-limit-group", &cli.rate_limit_group),
        ("pci-segment", &cli.pci_segment),
    ];
    let singles = [
        ("vsock", &cli.vsock),
        ("balloon", &cli.balloon),
        ("tpm", &cli.tpm),
    ];
    lists
        .into_iter()
        .flat_map(|(option, values)| values.iter().map(move |value| (option, value.as_str())))
        .chain(
            singles
                .into_iter()
                .filter_map(|(option, value)| Some((option, value.as_deref()?))),
        )
        .chain(cli.watchdog.then_some(("watchdog", "on")))
        .collect()
}

/// `--debug-console` is accepted off only: silently running without the console would be worse
/// than not starting.
fn refuse_debug_console(cli: &Cli) -> anyhow::Result<()> {
    if let Some(mode) = cli.debug_console.as_deref() {
        if !mode.trim().eq_ignore_ascii_case("off") {
            return Err(anyhow!(
                "--debug-console {mode}: the port-0xe9 debug console is not implemented by this \
                 VMM; only off is accepted"
            ));
        }
    }
    Ok(())
}

/// Turns the command line into what `vmm::run` takes. Pure apart from reading file metadata.
fn build_launch(cli: &Cli) -> anyhow::Result<VmmLaunch> {
    refuse_debug_console(cli)?;
    let options = VmOptionStrings {
        kernel: cli.kernel.as_deref(),
        firmware: cli.firmware.as_deref(),
        cmdline: cli.cmdline.as_deref(),
        initramfs: cli.initramfs.as_deref(),
        cpus: cli.cpus.as_deref(),
        memory: cli.memory.as_deref(),
        memory_zones: cli.memory_zone.iter().map(String::as_str).collect(),
        disks: cli.disk.iter().map(String::as_str).collect(),
        net: cli.net.iter().map(String::as_str).collect(),
        fs: cli.fs.iter().map(String::as_str).collect(),
        rng: cli.rng.as_deref(),
        serial: cli.serial.as_deref(),
        console: cli.console.as_deref(),
        pvpanic: cli.pvpanic,
        platform: cli.platform.as_deref(),
        nv: cli.nv.as_deref(),
        devices: unimplemented_devices(cli),
    };
    let vm = VmConfig::from_options(&options)?;
    if let Some(kernel) = &cli.kernel {
        check_readable_file("kernel", kernel)?;
    }
    if let Some(initramfs) = &cli.initramfs {
        check_readable_file("initramfs", initramfs)?;
    }
    let seccomp = SeccompMode::from_cli(&cli.seccomp)
        .ok_or_else(|| anyhow!("--seccomp: invalid value \"{}\"", cli.seccomp))?;
    Ok(VmmLaunch {
        vm,
        api_socket: cli
            .api_socket
            .as_deref()
            .map(ApiSocketConfig::parse)
            .transpose()?,
        event_monitor: cli
            .event_monitor
            .as_deref()
            .map(EventMonitorConfig::parse)
            .transpose()?,
        restore: cli
            .restore
            .as_deref()
            .map(RestoreConfig::parse)
            .transpose()?,
        seccomp,
        landlock: vmm::landlock::LandlockSettings::from_cli(cli.landlock, &cli.landlock_rules)?,
    })
}

fn open_log_file(path: &PathBuf) -> anyhow::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("--log-file {}", path.display()))
}

/// Everything after argument parsing; `Err` is a failure to start (exit code 1). `recovery`: the
/// in-place recovery `main` began (its region being opened and its KVM VM created), if it did.
fn start(cli: Cli, recovery: Option<RecoveryAhead>) -> anyhow::Result<i32> {
    let log_file = cli.log_file.as_ref().map(open_log_file).transpose()?;
    // The lines logged so far (the start, the recovery's `vm-create` thread) are written now.
    logger::configure(log_file, logger::level_for_verbosity(cli.verbose));

    let launch = build_launch(&cli)?;
    if let Some(monitor) = &launch.event_monitor {
        event_monitor::set_monitor(monitor, launch.seccomp)?;
    }
    event_monitor::emit("vmm", "starting", &[]);

    let result = vmm::run_with(launch, recovery);
    event_monitor::emit("vmm", "shutdown", &[]);
    event_monitor::flush();
    log::logger().flush();
    Ok(result?)
}

fn main() -> ExitCode {
    // First: the time before `main` is the first phase of a recovery's breakdown.
    vmm::startup_phases::note_main_entered();
    // Before anything else: a UPS daemon's SIGPWR must wait for the VMM's handler, not kill us.
    if let Err(error) = vmm::signal_events::hold_power_fail_signal() {
        eprintln!("cloud-hypervisor: {error}");
        return ExitCode::from(1);
    }
    // Every line from now on is kept until the command line says where and how much to log.
    if let Err(error) = logger::install_buffering() {
        eprintln!("cloud-hypervisor: installing the logger: {error}");
        return ExitCode::from(1);
    }
    log::info!("cloud-hypervisor {VERSION} starting");
    // An in-place recovery's region is opened and its KVM VM created from now on, while the
    // rest starts; it is used only if the parsed command line is that recovery
    // (`vmm::recovery_ahead`).
    let arguments: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let recovery = vmm::recovery_ahead::RecoveryAhead::start(&arguments);
    // No arguments at all: upstream prints its usage on stderr and exits 2.
    if std::env::args_os().len() <= 1 {
        let usage = <Cli as clap::CommandFactory>::command().render_usage();
        eprintln!("{usage}\n\nFor more information, try '--help'.");
        return ExitCode::from(2);
    }
    // Usage errors, --help and --version: clap prints and exits (2, 0, 0).
    let cli = Cli::parse();
    match start(cli, recovery) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(error) => {
            // The context chain on one line ("--kernel /x: No such file ..."); a cause whose
            // text the layer above already printed is not repeated (as in the API's bodies).
            let chain = vmm::api::cause_chain(error.as_ref());
            eprintln!("cloud-hypervisor: {}", chain.join(": "));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(arguments: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cloud-hypervisor").chain(arguments.iter().copied()))
    }

    #[test]
    fn upstream_style_command_line_builds_a_launch() {
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let kernel_path = kernel.path().to_str().unwrap();
        let parsed = cli(&[
            "--kernel",
            kernel_path,
            "--cmdline",
            "console=ttyS0",
            "--cpus",
            "boot=2",
            "--memory",
            "size=0",
            "--memory-zone",
            "id=mem0,size=64M,file=/tmp/ram,shared=on",
            "--disk",
            "path=/a.img",
            "path=/b.img,readonly=on",
            "--serial",
            "tty",
            "--console",
            "off",
            "--api-socket",
            "/tmp/ch.sock",
            "--seccomp",
            "log",
            "-vv",
        ])
        .unwrap();
        assert_eq!(parsed.verbose, 2);
        let launch = build_launch(&parsed).unwrap();
        let vm = launch.vm.unwrap();
        assert_eq!(vm.cpus.boot_vcpus, 2);
        assert_eq!(vm.disks.unwrap().len(), 2);
        assert_eq!(vm.memory.total_size(), 64 << 20);
        assert_eq!(
            launch.api_socket,
            Some(ApiSocketConfig::Path("/tmp/ch.sock".to_owned()))
        );
        assert_eq!(launch.seccomp, SeccompMode::Log);
    }

    #[test]
    fn repeated_flags_accumulate() {
        let parsed = cli(&[
            "--disk",
            "path=/a",
            "--disk",
            "path=/b",
            "--seccomp",
            "false",
        ])
        .unwrap();
        assert_eq!(parsed.disk, ["path=/a", "path=/b"]);
        assert_eq!(
            build_launch(&parsed).unwrap().seccomp,
            SeccompMode::Disabled
        );
    }

    #[test]
    fn usage_errors_are_clap_errors() {
        assert!(cli(&["--frobnicate"]).is_err());
        assert!(cli(&["--seccomp", "maybe"]).is_err());
        assert!(cli(&["--kernel"]).is_err());
        assert!(cli(&["--restore", "source_url=file:///s", "--kernel", "/k"]).is_err());
    }

    #[test]
    fn landlock_takes_upstreams_rules_and_they_need_it() {
        let launch = build_launch(
            &cli(&[
                "--landlock",
                "--landlock-rules",
                "path=/var/snap,access=rw",
                "path=/srv/img,access=r",
            ])
            .unwrap(),
        )
        .unwrap();
        let rules = launch.landlock.unwrap().rules;
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[1].path, PathBuf::from("/srv/img"));
        assert_eq!(build_launch(&cli(&[]).unwrap()).unwrap().landlock, None);
        let message = |arguments: &[&str]| {
            format!("{:#}", build_launch(&cli(arguments).unwrap()).unwrap_err())
        };
        let alone = message(&["--landlock-rules", "path=/x,access=r"]);
        assert!(alone.contains("without --landlock"), "{alone}");
        let bad = message(&["--landlock", "--landlock-rules", "path=/x,access=x"]);
        assert!(bad.starts_with("--landlock-rules"), "{bad}");
    }

    #[test]
    fn bad_values_name_the_option() {
        let message = |arguments: &[&str]| {
            format!("{:#}", build_launch(&cli(arguments).unwrap()).unwrap_err())
        };
        let missing = message(&["--kernel", "/nonexistent/vmlinux"]);
        assert!(
            missing.starts_with("--kernel /nonexistent/vmlinux"),
            "{missing}"
        );
        let directory = message(&["--kernel", "/"]);
        assert!(directory.contains("not a regular file"), "{directory}");
        let size = message(&["--kernel", "/k", "--memory", "size=12Q"]);
        assert!(size.starts_with("--memory"), "{size}");
        let monitor = message(&["--event-monitor", "/tmp/x"]);
        assert!(monitor.starts_with("--event-monitor"), "{monitor}");
    }
}
