//! VM configuration: the serde shape of the upstream `VmConfig` (REST API body of `vm.create`,
//! `config.json` of a snapshot) and the parser of cloud-hypervisor v53 command-line option strings
//! (`key=value,key=value`).
//!
//! Field names and defaults follow `docs/openapi.yaml` (the upstream v53 spec extended with NV).
//! On the command line, keys upstream has and we do not implement are refused by name
//! (`ConfigError::UnsupportedKey`); in JSON bodies `upstream_fields` does the same before serde.

use serde::{Deserialize, Serialize};

use crate::option_parser::{KeyKind, OptionSpec, ParsedOption};

/// What to boot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryZoneConfig {
    pub id: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default)]
    pub prefault: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Bytes of guest RAM outside any zone. 0 when all RAM comes from `zones`.
    pub size: u64,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default)]
    pub prefault: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones: Option<Vec<MemoryZoneConfig>>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        // Upstream's default guest RAM.
        MemoryConfig {
            size: 512 << 20,
            shared: false,
            hugepages: false,
            prefault: false,
            zones: None,
        }
    }
}

impl MemoryConfig {
    /// Total guest RAM: `size` plus every zone.
    pub fn total_size(&self) -> u64 {
        self.size
            + self
                .zones
                .iter()
                .flatten()
                .map(|zone| zone.size)
                .sum::<u64>()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Upstream's spec types `path` as a string: when absent it is left out, never `null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Upstream's `ConsoleMode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleOutputMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    #[default]
    Null,
}

/// Upstream's `SerialConfig` / `ConsoleConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    pub mode: ConsoleOutputMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// Our addition: the VM's RAM and volatile state live in an NV region (`--nv`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvConfig {
    /// Path of the region: a file, a DAX file or a devdax device.
    pub region: String,
    /// Name of the VM inside the region.
    pub vm: String,
    #[serde(default)]
    pub create: bool,
    #[serde(default)]
    pub recover: bool,
    #[serde(default)]
    pub force_cold: bool,
    #[serde(default)]
    pub format: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_size: Option<u64>,
    /// Power-fail save budget in milliseconds.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
}

pub fn default_deadline_ms() -> u64 {
    50
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskConfig>>,
    #[serde(default = "default_serial")]
    pub serial: ConsoleConfig,
    #[serde(default = "default_console")]
    pub console: ConsoleConfig,
    /// Not part of upstream's `VmConfig`: set by `--nv` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nv: Option<NvConfig>,
}

/// Upstream: `--serial` defaults to null, `--console` to tty.
pub fn default_serial() -> ConsoleConfig {
    ConsoleConfig {
        mode: ConsoleOutputMode::Null,
        ..Default::default()
    }
}

pub fn default_console() -> ConsoleConfig {
    ConsoleConfig {
        mode: ConsoleOutputMode::Tty,
        ..Default::default()
    }
}

/// `--api-socket path=PATH` or `fd=N` (a bare path is accepted too, as upstream does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiSocketConfig {
    Path(String),
    Fd(i32),
}

/// `--event-monitor path=PATH` or `fd=N`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventMonitorConfig {
    Path(String),
    Fd(i32),
}

/// `--restore source_url=file:///dir,resume=true,...` on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreConfig {
    pub source_url: String,
    #[serde(default)]
    pub prefault: bool,
    #[serde(default)]
    pub resume: bool,
    #[serde(default)]
    pub memory_restore_mode: MemoryRestoreMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryRestoreMode {
    #[default]
    Copy,
    OnDemand,
}

/// `--seccomp true|false|log`: what a thread does on a system call outside its allow list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Upstream's default (`true`): the offending thread traps and the VMM dies with a message.
    #[default]
    Enforce,
    /// `log`: the call is allowed and the kernel logs it (audit), to collect a missing syscall.
    Log,
    /// `false`: no filter at all.
    Disabled,
}

/// Everything the command line asks of one VMM process: `vmm::run` takes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmmLaunch {
    /// Set when the command line describes a VM (`--kernel` ...) or recovers one (`--nv ...,recover=on`).
    pub vm: Option<VmConfig>,
    pub api_socket: Option<ApiSocketConfig>,
    pub event_monitor: Option<EventMonitorConfig>,
    pub restore: Option<RestoreConfig>,
    /// Applied by every thread the VMM spawns, through `seccomp_filters::apply_filter`.
    pub seccomp: SeccompMode,
    /// `--landlock` (with its `--landlock-rules`): the files the VMM may open after start-up.
    pub landlock: Option<crate::landlock::LandlockSettings>,
}

/// A command-line option string that cannot be used. Every variant names the option (without
/// its dashes) and the offending key or value, so that the one-line message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--{option}: invalid syntax in \"{input}\": {reason}")]
    Syntax {
        option: &'static str,
        input: String,
        reason: &'static str,
    },
    #[error("--{option}: unknown key \"{key}\" (supported: {supported})")]
    UnknownKey {
        option: &'static str,
        key: String,
        supported: String,
    },
    #[error("--{option}: \"{key}\" is a cloud-hypervisor option this VMM does not implement")]
    UnsupportedKey { option: &'static str, key: String },
    #[error("--{option}: \"{key}\" needs a value ({key}=...)")]
    MissingValue { option: &'static str, key: String },
    #[error("--{option}: {key}=... is required")]
    MissingKey {
        option: &'static str,
        key: &'static str,
    },
    #[error("--{option}: invalid value \"{value}\" for {key}: {reason}")]
    InvalidValue {
        option: &'static str,
        key: String,
        value: String,
        reason: String,
    },
    #[error("--{option}: {reason}")]
    Invalid {
        option: &'static str,
        reason: String,
    },
}

/// Guest RAM is mapped in whole pages; a size that is not a multiple of this is refused up front
/// instead of failing later inside KVM.
const GUEST_PAGE_SIZE: u64 = 4096;

fn check_page_multiple(parsed: &ParsedOption, key: &str, size: u64) -> Result<(), ConfigError> {
    if !size.is_multiple_of(GUEST_PAGE_SIZE) {
        return Err(ConfigError::InvalidValue {
            option: parsed.option(),
            key: key.to_owned(),
            value: size.to_string(),
            reason: format!("must be a multiple of {GUEST_PAGE_SIZE} bytes"),
        });
    }
    Ok(())
}

const CPUS_SPEC: OptionSpec = OptionSpec {
    option: "cpus",
    keys: &[
        ("boot", KeyKind::Value),
        ("max", KeyKind::Value),
        ("topology", KeyKind::Unsupported),
        ("kvm_hyperv", KeyKind::Unsupported),
        ("max_phys_bits", KeyKind::Unsupported),
        ("affinity", KeyKind::Unsupported),
        ("features", KeyKind::Unsupported),
        ("nested", KeyKind::Unsupported),
        ("core_scheduling", KeyKind::Unsupported),
    ],
};

impl CpusConfig {
    /// `--cpus boot=N[,max=M]`; `max` defaults to `boot`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&CPUS_SPEC, input)?;
        let boot_vcpus = parsed.integer::<u8>("boot")?.unwrap_or(1);
        let max_vcpus = parsed.integer::<u8>("max")?.unwrap_or(boot_vcpus);
        if boot_vcpus == 0 {
            return Err(ConfigError::InvalidValue {
                option: "cpus",
                key: "boot".to_owned(),
                value: "0".to_owned(),
                reason: "at least one vCPU is needed".to_owned(),
            });
        }
        if max_vcpus < boot_vcpus {
            return Err(ConfigError::Invalid {
                option: "cpus",
                reason: format!("max ({max_vcpus}) is lower than boot ({boot_vcpus})"),
            });
        }
        Ok(CpusConfig {
            boot_vcpus,
            max_vcpus,
        })
    }
}

const MEMORY_SPEC: OptionSpec = OptionSpec {
    option: "memory",
    keys: &[
        ("size", KeyKind::Value),
        ("shared", KeyKind::Value),
        ("hugepages", KeyKind::Value),
        ("prefault", KeyKind::Value),
        ("mergeable", KeyKind::Unsupported),
        ("hugepage_size", KeyKind::Unsupported),
        ("hotplug_method", KeyKind::Unsupported),
        ("hotplug_size", KeyKind::Unsupported),
        ("hotplugged_size", KeyKind::Unsupported),
        ("thp", KeyKind::Unsupported),
        ("reserve", KeyKind::Unsupported),
    ],
};

impl MemoryConfig {
    /// `--memory size=..[,shared=on|off][,hugepages=on|off][,prefault=on|off]` together with every
    /// `--memory-zone`. As upstream, zones add to `size`; `size=0` puts all RAM in the zones.
    pub fn parse(input: Option<&str>, zones: &[&str]) -> Result<Self, ConfigError> {
        let defaults = MemoryConfig::default();
        let mut memory = match input {
            None => defaults,
            Some(input) => {
                let parsed = ParsedOption::parse(&MEMORY_SPEC, input)?;
                let size = parsed.byte_size("size")?.unwrap_or(defaults.size);
                check_page_multiple(&parsed, "size", size)?;
                MemoryConfig {
                    size,
                    shared: parsed.toggle("shared")?.unwrap_or(false),
                    hugepages: parsed.toggle("hugepages")?.unwrap_or(false),
                    prefault: parsed.toggle("prefault")?.unwrap_or(false),
                    zones: None,
                }
            }
        };
        if !zones.is_empty() {
            let zones = zones
                .iter()
                .map(|zone| MemoryZoneConfig::parse(zone))
                .collect::<Result<Vec<_>, _>>()?;
            for (index, zone) in zones.iter().enumerate() {
                if zones[..index].iter().any(|other| other.id == zone.id) {
                    return Err(ConfigError::InvalidValue {
                        option: "memory-zone",
                        key: "id".to_owned(),
                        value: zone.id.clone(),
                        reason: "used by more than one zone".to_owned(),
                    });
                }
            }
            memory.zones = Some(zones);
        }
        if memory.zones.is_some() && memory.size != 0 {
            return Err(zones_need_size_zero());
        }
        if memory.size == 0 && memory.zones.is_none() {
            return Err(ConfigError::Invalid {
                option: "memory",
                reason: "size=0 needs at least one --memory-zone to hold the guest RAM".to_owned(),
            });
        }
        Ok(memory)
    }
}

/// Upstream: `--memory-zone` "must be used with `--memory size=0`, clearly indicating that the
/// memory will be described through advanced parameters".
fn zones_need_size_zero() -> ConfigError {
    ConfigError::Invalid {
        option: "memory-zone",
        reason: "zones need --memory size=0: all guest RAM is then described by the zones"
            .to_owned(),
    }
}

const MEMORY_ZONE_SPEC: OptionSpec = OptionSpec {
    option: "memory-zone",
    keys: &[
        ("id", KeyKind::Value),
        ("size", KeyKind::Value),
        ("file", KeyKind::Value),
        ("shared", KeyKind::Value),
        ("hugepages", KeyKind::Value),
        ("prefault", KeyKind::Value),
        ("hugepage_size", KeyKind::Unsupported),
        ("host_numa_node", KeyKind::Unsupported),
        ("hotplug_size", KeyKind::Unsupported),
        ("hotplugged_size", KeyKind::Unsupported),
        ("mergeable", KeyKind::Unsupported),
        ("reserve", KeyKind::Unsupported),
    ],
};

impl MemoryZoneConfig {
    /// `--memory-zone id=..,size=..[,file=..][,shared=on][,hugepages=on][,prefault=on]`.
    ///
    /// As upstream, `file=` without `shared=on` is accepted: the file is then mapped privately and
    /// guest writes never reach it. Persistence therefore needs `shared=on`; the NV path checks it.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&MEMORY_ZONE_SPEC, input)?;
        let id = parsed.required_string("id")?;
        let size = parsed.byte_size("size")?.ok_or(ConfigError::MissingKey {
            option: "memory-zone",
            key: "size",
        })?;
        if size == 0 {
            return Err(ConfigError::InvalidValue {
                option: "memory-zone",
                key: "size".to_owned(),
                value: "0".to_owned(),
                reason: "a zone needs at least one page".to_owned(),
            });
        }
        check_page_multiple(&parsed, "size", size)?;
        let file = parsed.string("file")?;
        let hugepages = parsed.toggle("hugepages")?.unwrap_or(false);
        if hugepages && file.is_some() {
            return Err(ConfigError::Invalid {
                option: "memory-zone",
                reason: format!("zone {id}: hugepages=on and file= exclude each other"),
            });
        }
        Ok(MemoryZoneConfig {
            id,
            size,
            file,
            shared: parsed.toggle("shared")?.unwrap_or(false),
            hugepages,
            prefault: parsed.toggle("prefault")?.unwrap_or(false),
        })
    }
}

const DISK_SPEC: OptionSpec = OptionSpec {
    option: "disk",
    keys: &[
        ("path", KeyKind::Value),
        ("readonly", KeyKind::Value),
        ("direct", KeyKind::Value),
        ("id", KeyKind::Value),
        ("iommu", KeyKind::Unsupported),
        ("queue_size", KeyKind::Unsupported),
        ("num_queues", KeyKind::Unsupported),
        ("vhost_user", KeyKind::Unsupported),
        ("socket", KeyKind::Unsupported),
        ("bw_size", KeyKind::Unsupported),
        ("bw_one_time_burst", KeyKind::Unsupported),
        ("bw_refill_time", KeyKind::Unsupported),
        ("ops_size", KeyKind::Unsupported),
        ("ops_one_time_burst", KeyKind::Unsupported),
        ("ops_refill_time", KeyKind::Unsupported),
        ("rate_limit_group", KeyKind::Unsupported),
        ("pci_segment", KeyKind::Unsupported),
        ("serial", KeyKind::Unsupported),
        ("image_type", KeyKind::Unsupported),
        ("sparse", KeyKind::Unsupported),
        ("queue_affinity", KeyKind::Unsupported),
        ("backing_files", KeyKind::Unsupported),
        ("lock_granularity", KeyKind::Unsupported),
    ],
};

impl DiskConfig {
    /// `--disk path=..[,readonly=on][,direct=on][,id=..]`: a raw image behind virtio-blk.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&DISK_SPEC, input)?;
        Ok(DiskConfig {
            path: Some(parsed.required_string("path")?),
            readonly: parsed.toggle("readonly")?.unwrap_or(false),
            direct: parsed.toggle("direct")?.unwrap_or(false),
            id: parsed.string("id")?,
        })
    }
}

/// The words of `--serial` and `--console`. `socket=` is upstream's too, but no device here
/// serves a socket yet, so it is refused rather than ignored.
const CONSOLE_KEYS: &[(&str, KeyKind)] = &[
    ("off", KeyKind::Flag),
    ("null", KeyKind::Flag),
    ("pty", KeyKind::Flag),
    ("tty", KeyKind::Flag),
    ("file", KeyKind::Value),
    ("socket", KeyKind::Unsupported),
    ("iommu", KeyKind::Unsupported),
    ("tcp", KeyKind::Unsupported),
];
const SERIAL_SPEC: OptionSpec = OptionSpec {
    option: "serial",
    keys: CONSOLE_KEYS,
};
const CONSOLE_SPEC: OptionSpec = OptionSpec {
    option: "console",
    keys: CONSOLE_KEYS,
};

impl ConsoleConfig {
    /// `--serial off|null|pty|tty|file=PATH`.
    pub fn parse_serial(input: &str) -> Result<Self, ConfigError> {
        Self::parse_with(&SERIAL_SPEC, input)
    }

    /// `--console off|null|pty|tty|file=PATH`.
    pub fn parse_console(input: &str) -> Result<Self, ConfigError> {
        Self::parse_with(&CONSOLE_SPEC, input)
    }

    fn parse_with(spec: &OptionSpec, input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(spec, input)?;
        let modes = [
            ("off", ConsoleOutputMode::Off),
            ("null", ConsoleOutputMode::Null),
            ("pty", ConsoleOutputMode::Pty),
            ("tty", ConsoleOutputMode::Tty),
            ("file", ConsoleOutputMode::File),
        ];
        let mut given = modes.iter().filter(|(word, _)| parsed.has(word));
        let Some((_, mode)) = given.next() else {
            return Err(ConfigError::Invalid {
                option: spec.option,
                reason: "no mode given: expected off, null, pty, tty or file=PATH".to_owned(),
            });
        };
        if given.next().is_some() {
            return Err(ConfigError::Invalid {
                option: spec.option,
                reason: format!("more than one mode in \"{input}\""),
            });
        }
        Ok(ConsoleConfig {
            mode: *mode,
            file: parsed.string("file")?,
            socket: None,
        })
    }
}

const API_SOCKET_SPEC: OptionSpec = OptionSpec {
    option: "api-socket",
    keys: &[("path", KeyKind::Value), ("fd", KeyKind::Value)],
};

/// Parses `fd=N`: a file descriptor the parent process left open for us.
fn parse_fd(parsed: &ParsedOption) -> Result<Option<i32>, ConfigError> {
    match parsed.integer::<i32>("fd")? {
        Some(fd) if fd < 0 => Err(ConfigError::InvalidValue {
            option: parsed.option(),
            key: "fd".to_owned(),
            value: fd.to_string(),
            reason: "a file descriptor is not negative".to_owned(),
        }),
        fd => Ok(fd),
    }
}

/// Shared by `--api-socket` and `--event-monitor`: exactly one of `path=` and `fd=`.
fn parse_path_or_fd(parsed: &ParsedOption) -> Result<Option<Result<String, i32>>, ConfigError> {
    let path = parsed.string("path")?;
    let fd = parse_fd(parsed)?;
    match (path, fd) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid {
            option: parsed.option(),
            reason: "path= and fd= exclude each other".to_owned(),
        }),
        (Some(path), None) => Ok(Some(Ok(path))),
        (None, Some(fd)) => Ok(Some(Err(fd))),
        (None, None) => Ok(None),
    }
}

impl ApiSocketConfig {
    /// `--api-socket path=PATH`, `fd=N`, or, as upstream also accepts, a bare `PATH`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let input = input.trim();
        let keyed = ["path=", "fd="]
            .iter()
            .any(|prefix| input.starts_with(prefix));
        if !keyed {
            if input.is_empty() {
                return Err(ConfigError::MissingKey {
                    option: "api-socket",
                    key: "path",
                });
            }
            return Ok(ApiSocketConfig::Path(input.to_owned()));
        }
        let parsed = ParsedOption::parse(&API_SOCKET_SPEC, input)?;
        match parse_path_or_fd(&parsed)? {
            Some(Ok(path)) => Ok(ApiSocketConfig::Path(path)),
            Some(Err(fd)) => Ok(ApiSocketConfig::Fd(fd)),
            None => Err(ConfigError::MissingKey {
                option: "api-socket",
                key: "path",
            }),
        }
    }
}

const EVENT_MONITOR_SPEC: OptionSpec = OptionSpec {
    option: "event-monitor",
    keys: &[("path", KeyKind::Value), ("fd", KeyKind::Value)],
};

impl EventMonitorConfig {
    /// `--event-monitor path=PATH` or `fd=N`. Unlike `--api-socket`, upstream takes no bare path.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&EVENT_MONITOR_SPEC, input)?;
        match parse_path_or_fd(&parsed)? {
            Some(Ok(path)) => Ok(EventMonitorConfig::Path(path)),
            Some(Err(fd)) => Ok(EventMonitorConfig::Fd(fd)),
            None => Err(ConfigError::Invalid {
                option: "event-monitor",
                reason: "expected path=PATH or fd=N".to_owned(),
            }),
        }
    }
}

const RESTORE_SPEC: OptionSpec = OptionSpec {
    option: "restore",
    keys: &[
        ("source_url", KeyKind::Value),
        ("prefault", KeyKind::Value),
        ("resume", KeyKind::Value),
        ("memory_restore_mode", KeyKind::Value),
        ("net_fds", KeyKind::Unsupported),
    ],
};

impl RestoreConfig {
    /// `--restore source_url=file:///dir[,resume=true][,prefault=on][,memory_restore_mode=copy|ondemand]`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&RESTORE_SPEC, input)?;
        let source_url = parsed.required_string("source_url")?;
        if source_url
            .strip_prefix("file://")
            .is_none_or(|path| !path.starts_with('/'))
        {
            return Err(ConfigError::InvalidValue {
                option: "restore",
                key: "source_url".to_owned(),
                value: source_url,
                reason: "expected file:///absolute/directory".to_owned(),
            });
        }
        let memory_restore_mode = match parsed.string("memory_restore_mode")? {
            None => MemoryRestoreMode::default(),
            Some(mode) => match mode.to_ascii_lowercase().as_str() {
                "copy" => MemoryRestoreMode::Copy,
                "ondemand" => MemoryRestoreMode::OnDemand,
                _ => {
                    return Err(ConfigError::InvalidValue {
                        option: "restore",
                        key: "memory_restore_mode".to_owned(),
                        value: mode,
                        reason: "expected copy or ondemand".to_owned(),
                    })
                }
            },
        };
        Ok(RestoreConfig {
            source_url,
            prefault: parsed.toggle("prefault")?.unwrap_or(false),
            resume: parsed.toggle("resume")?.unwrap_or(false),
            memory_restore_mode,
        })
    }

    /// The snapshot directory named by `source_url`.
    pub fn source_dir(&self) -> Option<&str> {
        self.source_url.strip_prefix("file://")
    }
}

const NV_SPEC: OptionSpec = OptionSpec {
    option: "nv",
    keys: &[
        ("region", KeyKind::Value),
        ("vm", KeyKind::Value),
        ("create", KeyKind::Value),
        ("recover", KeyKind::Value),
        ("force-cold", KeyKind::Value),
        ("format", KeyKind::Value),
        ("region_size", KeyKind::Value),
        ("deadline_ms", KeyKind::Value),
    ],
};

impl NvConfig {
    /// `--nv region=PATH,vm=NAME[,create=on][,recover=on][,force-cold=on][,format=on]
    /// [,region_size=SIZE][,deadline_ms=N]`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&NV_SPEC, input)?;
        let region = parsed.required_string("region")?;
        let vm = parsed.required_string("vm")?;
        // The name is stored in the region's directory and shown by `nv-persist list`: keep it
        // printable and free of separators that would make it ambiguous there.
        if !vm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(ConfigError::InvalidValue {
                option: "nv",
                key: "vm".to_owned(),
                value: vm,
                reason: "use letters, digits, '-', '_' and '.' only".to_owned(),
            });
        }
        let region_size = parsed.byte_size("region_size")?;
        if let Some(size) = region_size {
            if size == 0 {
                return Err(ConfigError::InvalidValue {
                    option: "nv",
                    key: "region_size".to_owned(),
                    value: "0".to_owned(),
                    reason: "a region needs room for at least its header".to_owned(),
                });
            }
            check_page_multiple(&parsed, "region_size", size)?;
        }
        let deadline_ms = parsed
            .integer::<u64>("deadline_ms")?
            .unwrap_or_else(default_deadline_ms);
        if deadline_ms == 0 {
            return Err(ConfigError::InvalidValue {
                option: "nv",
                key: "deadline_ms".to_owned(),
                value: "0".to_owned(),
                reason: "the power-fail save needs a budget of at least 1 ms".to_owned(),
            });
        }
        let create = parsed.toggle("create")?.unwrap_or(false);
        let recover = parsed.toggle("recover")?.unwrap_or(false);
        let force_cold = parsed.toggle("force-cold")?.unwrap_or(false);
        if force_cold && !recover {
            return Err(ConfigError::Invalid {
                option: "nv",
                reason: "force-cold=on only applies with recover=on".to_owned(),
            });
        }
        Ok(NvConfig {
            region,
            vm,
            create,
            recover,
            force_cold,
            format: parsed.toggle("format")?.unwrap_or(false),
            region_size,
            deadline_ms,
        })
    }
}

/// The VM-describing options of one command line, as the user typed them.
#[derive(Clone, Debug, Default)]
pub struct VmOptionStrings<'a> {
    pub kernel: Option<&'a str>,
    pub cmdline: Option<&'a str>,
    pub initramfs: Option<&'a str>,
    pub cpus: Option<&'a str>,
    pub memory: Option<&'a str>,
    pub memory_zones: Vec<&'a str>,
    pub disks: Vec<&'a str>,
    pub serial: Option<&'a str>,
    pub console: Option<&'a str>,
    pub nv: Option<&'a str>,
}

impl VmConfig {
    /// Builds the VM the command line describes: `None` when it names neither a kernel nor an
    /// NV VM (the VMM then waits for `vm.create` on its API socket, as upstream does).
    pub fn from_options(options: &VmOptionStrings) -> Result<Option<Self>, ConfigError> {
        if options.kernel.is_none() && options.nv.is_none() {
            return Ok(None);
        }
        let disks = options
            .disks
            .iter()
            .map(|disk| DiskConfig::parse(disk))
            .collect::<Result<Vec<_>, _>>()?;
        let config = VmConfig {
            cpus: options
                .cpus
                .map(CpusConfig::parse)
                .transpose()?
                .unwrap_or_default(),
            memory: MemoryConfig::parse(options.memory, &options.memory_zones)?,
            payload: PayloadConfig {
                kernel: options.kernel.map(str::to_owned),
                cmdline: options.cmdline.map(str::to_owned),
                initramfs: options.initramfs.map(str::to_owned),
                firmware: None,
            },
            disks: (!disks.is_empty()).then_some(disks),
            serial: options
                .serial
                .map(ConsoleConfig::parse_serial)
                .transpose()?
                .unwrap_or_else(default_serial),
            console: options
                .console
                .map(ConsoleConfig::parse_console)
                .transpose()?
                .unwrap_or_else(default_console),
            nv: options.nv.map(NvConfig::parse).transpose()?,
        };
        config.validate()?;
        Ok(Some(config))
    }

    /// Checks across options, as upstream's `VmConfig::validate` does for the parts we share. Also
    /// called on a `vm.create` body, which never went through the option parsers.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus.boot_vcpus == 0 {
            return Err(ConfigError::Invalid {
                option: "cpus",
                reason: "at least one vCPU is needed".to_owned(),
            });
        }
        if self.cpus.max_vcpus < self.cpus.boot_vcpus {
            return Err(ConfigError::Invalid {
                option: "cpus",
                reason: format!(
                    "max ({}) is lower than boot ({})",
                    self.cpus.max_vcpus, self.cpus.boot_vcpus
                ),
            });
        }
        if self
            .memory
            .zones
            .as_ref()
            .is_some_and(|zones| !zones.is_empty())
            && self.memory.size != 0
        {
            return Err(zones_need_size_zero());
        }
        if self.memory.total_size() == 0 {
            return Err(ConfigError::Invalid {
                option: "memory",
                reason: "the VM has no RAM".to_owned(),
            });
        }
        if self.serial.mode == ConsoleOutputMode::Tty && self.console.mode == ConsoleOutputMode::Tty
        {
            return Err(ConfigError::Invalid {
                option: "serial",
                reason: "tty is given to both --serial and --console; turn one off".to_owned(),
            });
        }
        for (option, console) in [("serial", &self.serial), ("console", &self.console)] {
            if console.mode == ConsoleOutputMode::File && console.file.is_none() {
                return Err(ConfigError::MissingKey {
                    option,
                    key: "file",
                });
            }
        }
        let disks = self.disks.as_deref().unwrap_or_default();
        for (index, disk) in disks.iter().enumerate() {
            let earlier = &disks[..index];
            if disk.direct {
                // Silently opening the image buffered would break what the operator asked for
                // (no host page cache); refuse until O_DIRECT with aligned bounce buffers exists.
                return Err(ConfigError::InvalidValue {
                    option: "disk",
                    key: "direct".to_owned(),
                    value: "on".to_owned(),
                    reason: "O_DIRECT images are not implemented; images are opened buffered and \
                             a guest FLUSH is an fdatasync"
                        .to_owned(),
                });
            }
            if disk.path.is_some() && earlier.iter().any(|other| other.path == disk.path) {
                return Err(ConfigError::InvalidValue {
                    option: "disk",
                    key: "path".to_owned(),
                    value: disk.path.clone().unwrap_or_default(),
                    reason: "the same image is given twice".to_owned(),
                });
            }
            if disk.id.is_some() && earlier.iter().any(|other| other.id == disk.id) {
                return Err(ConfigError::InvalidValue {
                    option: "disk",
                    key: "id".to_owned(),
                    value: disk.id.clone().unwrap_or_default(),
                    reason: "used by more than one disk".to_owned(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_invalid_value<T: std::fmt::Debug>(
        result: Result<T, ConfigError>,
        expected_key: &str,
    ) {
        match result {
            Err(ConfigError::InvalidValue { key, .. }) => assert_eq!(key, expected_key),
            other => panic!("expected an invalid {expected_key}, got {other:?}"),
        }
    }

    #[test]
    fn cpus() {
        assert_eq!(
            CpusConfig::parse("boot=2").unwrap(),
            CpusConfig {
                boot_vcpus: 2,
                max_vcpus: 2
            }
        );
        assert_eq!(
            CpusConfig::parse("boot=1,max=2").unwrap(),
            CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 2
            }
        );
        assert_invalid_value(CpusConfig::parse("boot=0"), "boot");
        assert_invalid_value(CpusConfig::parse("boot=x"), "boot");
        assert_invalid_value(CpusConfig::parse("boot=300"), "boot");
        assert!(matches!(
            CpusConfig::parse("boot=2,max=1"),
            Err(ConfigError::Invalid { option: "cpus", .. })
        ));
        assert!(matches!(
            CpusConfig::parse("boot=1,cores=2"),
            Err(ConfigError::UnknownKey { option: "cpus", .. })
        ));
        assert!(matches!(
            CpusConfig::parse("boot=1,topology=1:1:1:1"),
            Err(ConfigError::UnsupportedKey { option: "cpus", .. })
        ));
    }

    #[test]
    fn memory() {
        let memory = MemoryConfig::parse(Some("size=64M,shared=on"), &[]).unwrap();
        assert_eq!(memory.size, 64 << 20);
        assert!(memory.shared);
        assert!(memory.zones.is_none());
        assert_eq!(MemoryConfig::parse(None, &[]).unwrap().size, 512 << 20);
        assert_invalid_value(MemoryConfig::parse(Some("size=64X"), &[]), "size");
        assert_invalid_value(MemoryConfig::parse(Some("size=1000"), &[]), "size");
        assert_invalid_value(
            MemoryConfig::parse(Some("size=1G,shared=yes"), &[]),
            "shared",
        );
        assert!(matches!(
            MemoryConfig::parse(Some("size=0"), &[]),
            Err(ConfigError::Invalid {
                option: "memory",
                ..
            })
        ));
        assert!(matches!(
            MemoryConfig::parse(Some("size=1G,hotplug_size=1G"), &[]),
            Err(ConfigError::UnsupportedKey { .. })
        ));
    }

    #[test]
    fn memory_zones() {
        let memory = MemoryConfig::parse(
            Some("size=0"),
            &[
                "id=mem0,size=1G,file=/dev/dax0.0,shared=on",
                "id=mem1,size=64M",
            ],
        )
        .unwrap();
        let zones = memory.zones.as_ref().unwrap();
        assert_eq!(zones.len(), 2);
        assert_eq!(zones[0].id, "mem0");
        assert_eq!(zones[0].file.as_deref(), Some("/dev/dax0.0"));
        assert!(zones[0].shared);
        assert!(!zones[1].shared);
        assert_eq!(memory.total_size(), (1 << 30) + (64 << 20));

        assert!(matches!(
            MemoryZoneConfig::parse("size=1G"),
            Err(ConfigError::MissingKey { key: "id", .. })
        ));
        assert!(matches!(
            MemoryZoneConfig::parse("id=a"),
            Err(ConfigError::MissingKey { key: "size", .. })
        ));
        assert_invalid_value(MemoryZoneConfig::parse("id=a,size=0"), "size");
        assert!(MemoryZoneConfig::parse("id=a,size=1G,file=/f,hugepages=on").is_err());
        assert_invalid_value(
            MemoryConfig::parse(Some("size=0"), &["id=a,size=4K", "id=a,size=4K"]),
            "id",
        );
        for memory in [Some("size=64M"), None] {
            assert!(matches!(
                MemoryConfig::parse(memory, &["id=a,size=4K"]),
                Err(ConfigError::Invalid {
                    option: "memory-zone",
                    ..
                })
            ));
        }
    }

    #[test]
    fn disks() {
        let disk = DiskConfig::parse("path=/img,readonly=on,id=disk0").unwrap();
        assert_eq!(disk.path.as_deref(), Some("/img"));
        assert!(disk.readonly);
        assert_eq!(disk.id.as_deref(), Some("disk0"));
        assert!(!DiskConfig::parse("path=/img").unwrap().readonly);
        assert!(matches!(
            DiskConfig::parse("readonly=on"),
            Err(ConfigError::MissingKey { key: "path", .. })
        ));
        assert!(matches!(
            DiskConfig::parse("path=/img,vhost_user=on"),
            Err(ConfigError::UnsupportedKey { .. })
        ));
        assert!(matches!(
            DiskConfig::parse("path=/img,colour=red"),
            Err(ConfigError::UnknownKey { .. })
        ));
    }

    #[test]
    fn serial_and_console() {
        for (input, mode) in [
            ("off", ConsoleOutputMode::Off),
            ("null", ConsoleOutputMode::Null),
            ("tty", ConsoleOutputMode::Tty),
            ("pty", ConsoleOutputMode::Pty),
        ] {
            let serial = ConsoleConfig::parse_serial(input).unwrap();
            assert_eq!(serial.mode, mode);
            assert!(serial.file.is_none());
        }
        let serial = ConsoleConfig::parse_serial("file=/tmp/serial.log").unwrap();
        assert_eq!(serial.mode, ConsoleOutputMode::File);
        assert_eq!(serial.file.as_deref(), Some("/tmp/serial.log"));
        assert_eq!(
            ConsoleConfig::parse_console("off").unwrap().mode,
            ConsoleOutputMode::Off
        );
        assert!(matches!(
            ConsoleConfig::parse_serial("file="),
            Err(ConfigError::MissingValue { .. })
        ));
        assert!(matches!(
            ConsoleConfig::parse_serial("off,tty"),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            ConsoleConfig::parse_console("loud"),
            Err(ConfigError::UnknownKey {
                option: "console",
                ..
            })
        ));
        assert!(matches!(
            ConsoleConfig::parse_serial("socket=/tmp/s"),
            Err(ConfigError::UnsupportedKey { .. })
        ));
    }

    #[test]
    fn api_socket() {
        assert_eq!(
            ApiSocketConfig::parse("path=/run/ch.sock").unwrap(),
            ApiSocketConfig::Path("/run/ch.sock".to_owned())
        );
        assert_eq!(
            ApiSocketConfig::parse("/run/ch.sock").unwrap(),
            ApiSocketConfig::Path("/run/ch.sock".to_owned())
        );
        assert_eq!(
            ApiSocketConfig::parse("fd=3").unwrap(),
            ApiSocketConfig::Fd(3)
        );
        assert_invalid_value(ApiSocketConfig::parse("fd=three"), "fd");
        assert_invalid_value(ApiSocketConfig::parse("fd=-1"), "fd");
        assert!(ApiSocketConfig::parse("path=/a,fd=3").is_err());
        assert!(ApiSocketConfig::parse("path=/a,mode=0600").is_err());
        assert!(ApiSocketConfig::parse("").is_err());
    }

    #[test]
    fn event_monitor() {
        assert_eq!(
            EventMonitorConfig::parse("path=/tmp/events").unwrap(),
            EventMonitorConfig::Path("/tmp/events".to_owned())
        );
        assert_eq!(
            EventMonitorConfig::parse("fd=4").unwrap(),
            EventMonitorConfig::Fd(4)
        );
        assert!(matches!(
            EventMonitorConfig::parse("/tmp/events"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(EventMonitorConfig::parse("").is_err());
        assert!(EventMonitorConfig::parse("path=/a,fd=4").is_err());
    }

    #[test]
    fn restore() {
        let restore = RestoreConfig::parse(
            "source_url=file:///var/snap,resume=true,prefault=on,memory_restore_mode=ondemand",
        )
        .unwrap();
        assert_eq!(restore.source_dir(), Some("/var/snap"));
        assert!(restore.resume);
        assert!(restore.prefault);
        assert_eq!(restore.memory_restore_mode, MemoryRestoreMode::OnDemand);
        let plain = RestoreConfig::parse("source_url=file:///s").unwrap();
        assert!(!plain.resume);
        assert_eq!(plain.memory_restore_mode, MemoryRestoreMode::Copy);
        assert_invalid_value(RestoreConfig::parse("source_url=/var/snap"), "source_url");
        assert_invalid_value(
            RestoreConfig::parse("source_url=http://host/snap"),
            "source_url",
        );
        assert_invalid_value(
            RestoreConfig::parse("source_url=file:///s,memory_restore_mode=lazy"),
            "memory_restore_mode",
        );
        assert!(matches!(
            RestoreConfig::parse("resume=true"),
            Err(ConfigError::MissingKey {
                key: "source_url",
                ..
            })
        ));
    }

    #[test]
    fn nv() {
        let nv = NvConfig::parse(
            "region=/dev/dax0.0,vm=web-1,create=on,format=on,region_size=2G,deadline_ms=80",
        )
        .unwrap();
        assert_eq!(
            nv,
            NvConfig {
                region: "/dev/dax0.0".to_owned(),
                vm: "web-1".to_owned(),
                create: true,
                recover: false,
                force_cold: false,
                format: true,
                region_size: Some(2 << 30),
                deadline_ms: 80,
            }
        );
        let recover = NvConfig::parse("region=/r,vm=a,recover=on,force-cold=on").unwrap();
        assert!(recover.recover && recover.force_cold);
        assert_eq!(recover.deadline_ms, default_deadline_ms());
        assert!(matches!(
            NvConfig::parse("vm=a"),
            Err(ConfigError::MissingKey { key: "region", .. })
        ));
        assert!(matches!(
            NvConfig::parse("region=/r"),
            Err(ConfigError::MissingKey { key: "vm", .. })
        ));
        assert_invalid_value(NvConfig::parse("region=/r,vm=a/b"), "vm");
        assert_invalid_value(
            NvConfig::parse("region=/r,vm=a,deadline_ms=0"),
            "deadline_ms",
        );
        assert_invalid_value(
            NvConfig::parse("region=/r,vm=a,region_size=1Q"),
            "region_size",
        );
        assert!(NvConfig::parse("region=/r,vm=a,force-cold=on").is_err());
        assert!(matches!(
            NvConfig::parse("region=/r,vm=a,force_cold=on"),
            Err(ConfigError::UnknownKey { .. })
        ));
    }

    #[test]
    fn whole_command_line() {
        let options = VmOptionStrings {
            kernel: Some("/guest.elf"),
            cmdline: Some("console=ttyS0"),
            cpus: Some("boot=2"),
            memory: Some("size=0"),
            memory_zones: vec!["id=mem0,size=64M,file=/tmp/ram,shared=on"],
            disks: vec!["path=/a.img", "path=/b.img,readonly=on"],
            serial: Some("file=/tmp/serial.log"),
            console: Some("off"),
            ..Default::default()
        };
        let config = VmConfig::from_options(&options).unwrap().unwrap();
        assert_eq!(config.cpus.boot_vcpus, 2);
        assert_eq!(config.memory.total_size(), 64 << 20);
        assert_eq!(config.disks.as_ref().unwrap().len(), 2);
        assert_eq!(config.payload.kernel.as_deref(), Some("/guest.elf"));
        assert_eq!(config.console.mode, ConsoleOutputMode::Off);
        assert!(config.nv.is_none());

        assert_eq!(
            VmConfig::from_options(&VmOptionStrings::default()),
            Ok(None)
        );

        let double_tty = VmOptionStrings {
            kernel: Some("/k"),
            serial: Some("tty"),
            ..Default::default()
        };
        assert!(matches!(
            VmConfig::from_options(&double_tty),
            Err(ConfigError::Invalid {
                option: "serial",
                ..
            })
        ));

        let same_disk_twice = VmOptionStrings {
            kernel: Some("/k"),
            disks: vec!["path=/a.img", "path=/a.img"],
            ..Default::default()
        };
        assert_invalid_value(VmConfig::from_options(&same_disk_twice), "path");

        let direct_disk = VmOptionStrings {
            kernel: Some("/k"),
            disks: vec!["path=/a.img,direct=on"],
            ..Default::default()
        };
        assert_invalid_value(VmConfig::from_options(&direct_disk), "direct");
        let buffered_disk = VmOptionStrings {
            kernel: Some("/k"),
            disks: vec!["path=/a.img,direct=off"],
            ..Default::default()
        };
        assert!(VmConfig::from_options(&buffered_disk).is_ok());
    }

    #[test]
    fn serde_names_match_upstream() {
        let config = VmConfig::from_options(&VmOptionStrings {
            kernel: Some("/k"),
            memory: Some("size=64M"),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["cpus"]["boot_vcpus"], 1);
        assert_eq!(json["memory"]["size"], 64 << 20);
        assert_eq!(json["payload"]["kernel"], "/k");
        assert_eq!(json["serial"]["mode"], "Null");
        assert_eq!(json["console"]["mode"], "Tty");
        let back: VmConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, config);
    }
}
