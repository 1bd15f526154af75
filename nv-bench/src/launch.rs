//! Command lines for the VMM under test, in cloud-hypervisor v53 syntax plus our `--nv`.

use std::path::{Path, PathBuf};

/// Where the guest's RAM lives.
#[derive(Clone, Debug)]
pub enum MemoryBacking {
    /// Private anonymous memory: a commodity VM.
    Anonymous,
    /// A shared file mapping (`--memory-zone file=..,shared=on`): the mapping NV regions use.
    SharedFile(PathBuf),
    /// An extent of an NV region, created on first use (`--nv region=..,vm=..,create=on`).
    NvRegion { region: PathBuf, vm: String },
    /// As `NvRegion`, its RAM extent left unallocated (`sparse=on`): VMs larger than the host.
    SparseNvRegion { region: PathBuf, vm: String },
    /// Private anonymous memory without transparent huge pages (`thp=off`): 4 KiB pages.
    AnonymousThpOff,
}

/// A test guest (integration-tests/guests) and its parameters.
#[derive(Clone, Debug)]
pub struct TestGuest {
    pub image: PathBuf,
    /// Guest-specific command-line parameters, e.g. `keys=1000000`.
    pub parameters: String,
    pub ram_bytes: u64,
    pub tsc_khz: u32,
    /// How often the guest prints its progress line, in host milliseconds.
    pub period_ms: u32,
    /// The append-only log disk; without one PUTs are not persisted.
    pub log_disk: Option<PathBuf>,
}

/// The guests print "about every 100 ms" of their TSC at the rate `tsc_khz=` tells them.
const GUEST_PERIOD_MS: u64 = 100;

impl TestGuest {
    /// The `tsc_khz=` that makes the guest's 100 ms period last `period_ms` on the host: the
    /// rate scaled down, so fewer ticks make "100 ms". Only the pacing changes; the guest
    /// never turns TSC ticks into a reported time.
    pub fn paced_tsc_khz(&self) -> u64 {
        (u64::from(self.tsc_khz) * u64::from(self.period_ms) / GUEST_PERIOD_MS).max(1)
    }

    /// Guest RAM for `keys`: the table (32 bytes a key at load factor 1/2) plus 64 MiB for the
    /// image, the log buffer and the stack, rounded up to 64 MiB.
    pub fn ram_for_keys(keys: u64) -> u64 {
        let needed = keys * 32 + (64 << 20);
        needed.div_ceil(64 << 20) * (64 << 20)
    }
}

/// What the VMM is asked to do.
#[derive(Clone, Debug)]
pub enum Launch {
    /// Boot the guest from scratch.
    Boot {
        guest: TestGuest,
        backing: MemoryBacking,
    },
    /// Recover an NV VM in place after a power failure.
    NvRecover { region: PathBuf, vm: String },
    /// Swap an NV VM in from its swap file and resume it.
    NvSwapIn {
        region: PathBuf,
        vm: String,
        file: PathBuf,
    },
    /// Restore a copy-based snapshot and resume.
    Restore {
        snapshot_dir: PathBuf,
        on_demand: bool,
    },
}

/// Command-line arguments for `launch`, with serial output to `serial`, JSON events to
/// `events` and an optional API socket.
pub fn arguments(
    launch: &Launch,
    serial: &Path,
    events: &Path,
    api_socket: Option<&Path>,
) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |key: &str, value: String| {
        args.push(key.to_string());
        args.push(value);
    };
    match launch {
        Launch::Boot { guest, backing } => {
            push("--kernel", guest.image.display().to_string());
            push(
                "--cmdline",
                format!("{} tsc_khz={}", guest.parameters, guest.paced_tsc_khz()),
            );
            push("--cpus", "boot=1".into());
            let size = guest.ram_bytes;
            match backing {
                MemoryBacking::Anonymous => push("--memory", format!("size={size}")),
                MemoryBacking::AnonymousThpOff => push("--memory", format!("size={size},thp=off")),
                MemoryBacking::SharedFile(path) => {
                    push("--memory", "size=0".into());
                    push(
                        "--memory-zone",
                        format!("id=mem0,size={size},file={},shared=on", path.display()),
                    );
                }
                MemoryBacking::NvRegion { region, vm } => {
                    push("--memory", format!("size={size}"));
                    push(
                        "--nv",
                        format!("region={},vm={vm},create=on", region.display()),
                    );
                }
                MemoryBacking::SparseNvRegion { region, vm } => {
                    push("--memory", format!("size={size}"));
                    push(
                        "--nv",
                        format!("region={},vm={vm},create=on,sparse=on", region.display()),
                    );
                }
            }
            if let Some(disk) = &guest.log_disk {
                push("--disk", format!("path={}", disk.display()));
            }
        }
        Launch::NvRecover { region, vm } => {
            push(
                "--nv",
                format!("region={},vm={vm},recover=on", region.display()),
            );
        }
        Launch::NvSwapIn { region, vm, file } => {
            push(
                "--nv",
                format!(
                    "region={},vm={vm},swap-in={}",
                    region.display(),
                    file.display()
                ),
            );
        }
        Launch::Restore {
            snapshot_dir,
            on_demand,
        } => {
            let mode = if *on_demand { "ondemand" } else { "copy" };
            push(
                "--restore",
                format!(
                    "source_url=file://{},resume=true,memory_restore_mode={mode}",
                    snapshot_dir.display()
                ),
            );
        }
    }
    // A restored VM writes to the serial file in its saved config; naming it again would
    // conflict with --restore, which takes no VM options.
    if !matches!(launch, Launch::Restore { .. }) {
        push("--serial", format!("file={}", serial.display()));
    }
    push("--event-monitor", format!("path={}", events.display()));
    if let Some(socket) = api_socket {
        push("--api-socket", format!("path={}", socket.display()));
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_covers_the_table_with_headroom() {
        assert_eq!(TestGuest::ram_for_keys(1_000_000), 128 << 20);
        assert_eq!(TestGuest::ram_for_keys(4_000_000), 192 << 20);
        assert!(TestGuest::ram_for_keys(4 << 20) >= (4 << 20) * 32 + (64 << 20));
    }

    #[test]
    fn nv_boot_uses_the_upstream_syntax_plus_nv() {
        let guest = TestGuest {
            image: "/k".into(),
            parameters: "keys=10".into(),
            ram_bytes: 64 << 20,
            tsc_khz: 2_000_000,
            period_ms: 10,
            log_disk: Some("/d".into()),
        };
        let args = arguments(
            &Launch::Boot {
                guest,
                backing: MemoryBacking::NvRegion {
                    region: "/r".into(),
                    vm: "kv".into(),
                },
            },
            Path::new("/s"),
            Path::new("/e"),
            None,
        );
        let line = args.join(" ");
        assert!(line.contains("--memory size=67108864"), "{line}");
        assert!(
            line.contains("tsc_khz=200000 "),
            "10 ms of a 100 ms period: {line}"
        );
        assert!(line.contains("--nv region=/r,vm=kv,create=on"), "{line}");
        assert!(line.contains("--disk path=/d"), "{line}");
        assert!(line.contains("--serial file=/s"), "{line}");
        assert!(line.contains("--event-monitor path=/e"), "{line}");
    }
}
