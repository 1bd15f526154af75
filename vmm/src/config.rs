//! VM configuration: the serde shape of the upstream `VmConfig` (REST API body of `vm.create`,
//! `config.json` of a snapshot) and the parser of cloud-hypervisor v53 command-line option strings
//! (`key=value,key=value`).
//!
//! Field names and defaults follow `docs/openapi.yaml` (the upstream v53 spec extended with NV).
//! Options we do not implement are accepted by serde only where ignoring them is harmless; anything
//! else is refused with a clear error rather than silently dropped.

use serde::{Deserialize, Serialize};

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

/// Everything the command line asks of one VMM process: `vmm::run` takes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmmLaunch {
    /// Set when the command line describes a VM (`--kernel` ...) or recovers one (`--nv ...,recover=on`).
    pub vm: Option<VmConfig>,
    pub api_socket: Option<ApiSocketConfig>,
    pub event_monitor: Option<EventMonitorConfig>,
    pub restore: Option<RestoreConfig>,
}
