//! VM configuration: the serde shape of the upstream `VmConfig` (REST API body of `vm.create`,
//! `config.json` of a snapshot, `vm.info`) and the parser of cloud-hypervisor v53 command-line
//! option strings (`key=value,key=value`).
//!
//! Every member upstream v53 has is modelled with upstream's name, type and default, so a config
//! upstream wrote (its `vm.info`, its snapshot `config.json`) reads back whole and `vm.info` prints
//! every member as upstream does; `Option`s that are unset are left out. What this VMM can honour
//! is decided in one place, [`VmConfig::validate`], for the command line and JSON alike: a member
//! we do not implement passes at its default value and is refused, by name, at any other.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::option_parser::{KeyKind, OptionSpec, ParsedOption};

fn default_true() -> bool {
    true
}

/// What to boot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub igvm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_data: Option<String>,
}

/// Upstream's `CpuTopology` (`--cpus topology=T:C:D:P`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTopology {
    pub threads_per_core: u16,
    pub cores_per_die: u16,
    pub dies_per_package: u16,
    pub packages: u16,
}

/// Upstream's `CpuAffinity`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuAffinity {
    pub vcpu: u32,
    pub host_cpus: Vec<usize>,
}

/// Upstream's `CpuFeatures`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    #[serde(default)]
    pub amx: bool,
}

/// Upstream's `CoreScheduling` (`--cpus core_scheduling=vm|vcpu|off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoreScheduling {
    #[default]
    Vm,
    Vcpu,
    Off,
}

/// Upstream's default guest physical address width (PVH boot).
pub const DEFAULT_MAX_PHYS_BITS: u8 = 46;
/// Upstream's only CPU profile in v53.
pub const DEFAULT_CPU_PROFILE: &str = "Host";

fn default_max_phys_bits() -> u8 {
    DEFAULT_MAX_PHYS_BITS
}

fn default_cpu_profile() -> String {
    DEFAULT_CPU_PROFILE.to_owned()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
    #[serde(default)]
    pub kvm_hyperv: bool,
    #[serde(default = "default_max_phys_bits")]
    pub max_phys_bits: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Vec<CpuAffinity>>,
    #[serde(default)]
    pub features: CpuFeatures,
    #[serde(default = "default_true")]
    pub nested: bool,
    #[serde(default)]
    pub core_scheduling: CoreScheduling,
    #[serde(default = "default_cpu_profile")]
    pub profile: String,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
            topology: None,
            kvm_hyperv: false,
            max_phys_bits: DEFAULT_MAX_PHYS_BITS,
            affinity: None,
            features: CpuFeatures::default(),
            nested: true,
            core_scheduling: CoreScheduling::Vm,
            profile: default_cpu_profile(),
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
    pub mergeable: bool,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepage_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_numa_node: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplugged_size: Option<u64>,
    #[serde(default)]
    pub prefault: bool,
    #[serde(default)]
    pub reserve: bool,
}

/// Upstream's `HotplugMethod`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HotplugMethod {
    #[default]
    Acpi,
    VirtioMem,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Bytes of guest RAM outside any zone. 0 when all RAM comes from `zones`.
    pub size: u64,
    #[serde(default)]
    pub mergeable: bool,
    #[serde(default)]
    pub hotplug_method: HotplugMethod,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplugged_size: Option<u64>,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepage_size: Option<u64>,
    #[serde(default)]
    pub prefault: bool,
    #[serde(default)]
    pub reserve: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones: Option<Vec<MemoryZoneConfig>>,
    /// Transparent huge pages for anonymous private RAM (upstream's default: on).
    #[serde(default = "default_true")]
    pub thp: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        // Upstream's default guest RAM.
        MemoryConfig {
            size: 512 << 20,
            mergeable: false,
            hotplug_method: HotplugMethod::Acpi,
            hotplug_size: None,
            hotplugged_size: None,
            shared: false,
            hugepages: false,
            hugepage_size: None,
            prefault: false,
            reserve: false,
            zones: None,
            thp: true,
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

/// Upstream's default virtio-blk queue geometry.
pub const DEFAULT_DISK_NUM_QUEUES: usize = 1;
pub const DEFAULT_DISK_QUEUE_SIZE: u16 = 128;

fn default_disk_num_queues() -> usize {
    DEFAULT_DISK_NUM_QUEUES
}

fn default_disk_queue_size() -> u16 {
    DEFAULT_DISK_QUEUE_SIZE
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Upstream's spec types `path` as a string: when absent it is left out, never `null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default = "default_disk_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_disk_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub vhost_user: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_affinity: Option<Vec<Value>>,
    #[serde(default)]
    pub backing_files: bool,
    #[serde(default = "default_true")]
    pub sparse: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_granularity: Option<String>,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            path: None,
            readonly: false,
            direct: false,
            iommu: false,
            num_queues: DEFAULT_DISK_NUM_QUEUES,
            queue_size: DEFAULT_DISK_QUEUE_SIZE,
            vhost_user: false,
            vhost_socket: None,
            rate_limit_group: None,
            rate_limiter_config: None,
            id: None,
            pci_segment: 0,
            pci_device_id: None,
            serial: None,
            queue_affinity: None,
            backing_files: false,
            sparse: true,
            image_type: None,
            lock_granularity: None,
        }
    }
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub mode: ConsoleOutputMode,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// Upstream's `RngConfig`: every upstream config carries one (an entropy device on
/// `/dev/urandom`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    pub src: String,
    #[serde(default)]
    pub iommu: bool,
}

pub const DEFAULT_RNG_SOURCE: &str = "/dev/urandom";

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig {
            src: DEFAULT_RNG_SOURCE.to_owned(),
            iommu: false,
        }
    }
}

/// Upstream's `DebugConsoleConfig` (the port-0xe9 console, off by default).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugConsoleConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub mode: ConsoleOutputMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iobase: Option<u16>,
}

/// Upstream's default debug-console I/O port.
pub const DEFAULT_DEBUG_CONSOLE_PORT: u16 = 0xe9;

impl Default for DebugConsoleConfig {
    fn default() -> Self {
        DebugConsoleConfig {
            file: None,
            mode: ConsoleOutputMode::Off,
            iobase: Some(DEFAULT_DEBUG_CONSOLE_PORT),
        }
    }
}

pub const DEFAULT_NUM_PCI_SEGMENTS: u16 = 1;
pub const DEFAULT_IOMMU_ADDRESS_WIDTH_BITS: u8 = 64;

fn default_num_pci_segments() -> u16 {
    DEFAULT_NUM_PCI_SEGMENTS
}

fn default_iommu_address_width_bits() -> u8 {
    DEFAULT_IOMMU_ADDRESS_WIDTH_BITS
}

/// Upstream's `PlatformConfig` (`--platform`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformConfig {
    #[serde(default = "default_num_pci_segments")]
    pub num_pci_segments: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_segments: Option<Vec<u16>>,
    #[serde(default = "default_iommu_address_width_bits")]
    pub iommu_address_width_bits: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oem_strings: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_manufacturer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_product_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_family: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_sku_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chassis_asset_tag: Option<String>,
    /// Only in upstream builds with the `tdx` / `sev_snp` features: left out unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tdx: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sev_snp: Option<bool>,
    #[serde(default)]
    pub iommufd: bool,
    #[serde(default = "default_true")]
    pub vfio_p2p_dma: bool,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            num_pci_segments: DEFAULT_NUM_PCI_SEGMENTS,
            iommu_segments: None,
            iommu_address_width_bits: DEFAULT_IOMMU_ADDRESS_WIDTH_BITS,
            system_serial_number: None,
            serial_number: None,
            system_uuid: None,
            uuid: None,
            oem_strings: None,
            system_manufacturer: None,
            system_product_name: None,
            system_version: None,
            system_family: None,
            system_sku_number: None,
            chassis_asset_tag: None,
            tdx: None,
            sev_snp: None,
            iommufd: false,
            vfio_p2p_dma: true,
        }
    }
}

/// Upstream's `LandlockConfig`: one extra path the sandbox may reach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockConfig {
    pub path: String,
    pub access: String,
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

/// Upstream's `VmConfig`, member for member, plus our `nv`. Members of devices this VMM does not
/// have (network, vhost-user, VFIO, ...) are kept as the JSON they came in: they pass
/// [`VmConfig::validate`] only when absent or empty, and print back as given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_groups: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<Vec<Value>>,
    #[serde(default)]
    pub rng: RngConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generic_vhost_user: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pmem: Option<Vec<Value>>,
    #[serde(default = "default_serial")]
    pub serial: ConsoleConfig,
    #[serde(default = "default_console")]
    pub console: ConsoleConfig,
    /// `--pvpanic`: the pvpanic device (here its ISA form, port 0x505; see docs/devices.md).
    #[serde(default)]
    pub pvpanic: bool,
    #[serde(default)]
    pub debug_console: DebugConsoleConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_devices: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vdpa: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Value>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sgx_epc: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<Vec<Value>>,
    #[serde(default)]
    pub watchdog: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtc: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segments: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Value>,
    #[serde(default)]
    pub landlock_enable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landlock_rules: Option<Vec<LandlockConfig>>,
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
    #[error("--{option}: \"{key}\" is given more than once")]
    DuplicateKey { option: &'static str, key: String },
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
    /// A member upstream has, set to a value this VMM cannot honour. Named both ways: as the
    /// command line spells it and as the `VmConfig` JSON member.
    #[error(
        "--{option} {}{value} (VmConfig member \"{member}\") is not supported by this VMM: {reason}",
        key_assignment(key)
    )]
    NotSupported {
        option: &'static str,
        key: &'static str,
        member: String,
        value: String,
        reason: String,
    },
    /// The host cannot run what the config asks for.
    #[error("--{option}: {reason}")]
    Host {
        option: &'static str,
        reason: String,
    },
}

/// `key=` for a keyed option, nothing for a whole-option value (`--net tap=tap0`).
fn key_assignment(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}=")
    }
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
        ("topology", KeyKind::Value),
        ("kvm_hyperv", KeyKind::Value),
        ("max_phys_bits", KeyKind::Value),
        ("features", KeyKind::Value),
        ("nested", KeyKind::Value),
        ("core_scheduling", KeyKind::Value),
        ("profile", KeyKind::Value),
        // Pinning: refused at any value, so its syntax is not parsed.
        ("affinity", KeyKind::Unsupported),
    ],
};

impl CpusConfig {
    /// `--cpus boot=N[,max=M][,topology=T:C:D:P][,kvm_hyperv=on|off][,max_phys_bits=N]
    /// [,features=[amx]][,nested=on|off][,core_scheduling=vm|vcpu|off][,profile=host]`;
    /// `max` defaults to `boot`. What this VMM honours is checked by [`VmConfig::validate`].
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&CPUS_SPEC, input)?;
        let defaults = CpusConfig::default();
        let boot_vcpus = parsed.integer::<u8>("boot")?.unwrap_or(1);
        let max_vcpus = parsed.integer::<u8>("max")?.unwrap_or(boot_vcpus);
        let topology = match parsed.string("topology")? {
            None => None,
            Some(value) => Some(parse_topology(&value).ok_or_else(|| {
                ConfigError::InvalidValue {
                    option: "cpus",
                    key: "topology".to_owned(),
                    value,
                    reason: "expected threads_per_core:cores_per_die:dies_per_package:packages"
                        .to_owned(),
                }
            })?),
        };
        let mut features = CpuFeatures::default();
        for feature in parsed.list("features")?.unwrap_or_default() {
            match feature.as_str() {
                "amx" => features.amx = true,
                _ => {
                    return Err(ConfigError::InvalidValue {
                        option: "cpus",
                        key: "features".to_owned(),
                        value: feature,
                        reason: "the only CPU feature upstream knows is amx".to_owned(),
                    })
                }
            }
        }
        let core_scheduling = match parsed.string("core_scheduling")? {
            None => CoreScheduling::Vm,
            Some(value) => match value.to_ascii_lowercase().as_str() {
                "vm" => CoreScheduling::Vm,
                "vcpu" => CoreScheduling::Vcpu,
                "off" => CoreScheduling::Off,
                _ => {
                    return Err(ConfigError::InvalidValue {
                        option: "cpus",
                        key: "core_scheduling".to_owned(),
                        value,
                        reason: "expected vm, vcpu or off".to_owned(),
                    })
                }
            },
        };
        let profile = match parsed.string("profile")? {
            None => defaults.profile,
            Some(value) if value.eq_ignore_ascii_case(DEFAULT_CPU_PROFILE) => {
                DEFAULT_CPU_PROFILE.to_owned()
            }
            Some(value) => value,
        };
        Ok(CpusConfig {
            boot_vcpus,
            max_vcpus,
            topology,
            kvm_hyperv: parsed.toggle("kvm_hyperv")?.unwrap_or(false),
            max_phys_bits: parsed
                .integer::<u8>("max_phys_bits")?
                .unwrap_or(DEFAULT_MAX_PHYS_BITS),
            affinity: None,
            features,
            nested: parsed.toggle("nested")?.unwrap_or(true),
            core_scheduling,
            profile,
        })
    }
}

fn parse_topology(value: &str) -> Option<CpuTopology> {
    let parts = value
        .split(':')
        .map(|part| part.parse::<u16>().ok())
        .collect::<Option<Vec<_>>>()?;
    match parts[..] {
        [threads_per_core, cores_per_die, dies_per_package, packages] => Some(CpuTopology {
            threads_per_core,
            cores_per_die,
            dies_per_package,
            packages,
        }),
        _ => None,
    }
}

const MEMORY_SPEC: OptionSpec = OptionSpec {
    option: "memory",
    keys: &[
        ("size", KeyKind::Value),
        ("shared", KeyKind::Value),
        ("hugepages", KeyKind::Value),
        ("prefault", KeyKind::Value),
        ("mergeable", KeyKind::Value),
        ("hugepage_size", KeyKind::Value),
        ("hotplug_method", KeyKind::Value),
        ("hotplug_size", KeyKind::Value),
        ("hotplugged_size", KeyKind::Value),
        ("thp", KeyKind::Value),
        ("reserve", KeyKind::Value),
    ],
};

impl MemoryConfig {
    /// `--memory size=..[,shared=on|off][,hugepages=on|off][,prefault=on|off][,thp=on|off]...`
    /// together with every `--memory-zone`. As upstream, zones add to `size`; `size=0` puts all
    /// RAM in the zones.
    pub fn parse(input: Option<&str>, zones: &[&str]) -> Result<Self, ConfigError> {
        let defaults = MemoryConfig::default();
        let mut memory = match input {
            None => defaults,
            Some(input) => {
                let parsed = ParsedOption::parse(&MEMORY_SPEC, input)?;
                let size = parsed.byte_size("size")?.unwrap_or(defaults.size);
                check_page_multiple(&parsed, "size", size)?;
                let hotplug_method = match parsed.string("hotplug_method")? {
                    None => HotplugMethod::Acpi,
                    Some(value) => match value.to_ascii_lowercase().as_str() {
                        "acpi" => HotplugMethod::Acpi,
                        "virtio-mem" | "virtiomem" => HotplugMethod::VirtioMem,
                        _ => {
                            return Err(ConfigError::InvalidValue {
                                option: "memory",
                                key: "hotplug_method".to_owned(),
                                value,
                                reason: "expected acpi or virtio-mem".to_owned(),
                            })
                        }
                    },
                };
                MemoryConfig {
                    size,
                    mergeable: parsed.toggle("mergeable")?.unwrap_or(false),
                    hotplug_method,
                    hotplug_size: parsed.byte_size("hotplug_size")?,
                    hotplugged_size: parsed.byte_size("hotplugged_size")?,
                    shared: parsed.toggle("shared")?.unwrap_or(false),
                    hugepages: parsed.toggle("hugepages")?.unwrap_or(false),
                    hugepage_size: parsed.byte_size("hugepage_size")?,
                    prefault: parsed.toggle("prefault")?.unwrap_or(false),
                    reserve: parsed.toggle("reserve")?.unwrap_or(false),
                    zones: None,
                    thp: parsed.toggle("thp")?.unwrap_or(true),
                }
            }
        };
        if !zones.is_empty() {
            let zones = zones
                .iter()
                .map(|zone| MemoryZoneConfig::parse(zone))
                .collect::<Result<Vec<_>, _>>()?;
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
        ("hugepage_size", KeyKind::Value),
        ("host_numa_node", KeyKind::Value),
        ("hotplug_size", KeyKind::Value),
        ("hotplugged_size", KeyKind::Value),
        ("mergeable", KeyKind::Value),
        ("reserve", KeyKind::Value),
    ],
};

impl MemoryZoneConfig {
    /// `--memory-zone id=..,size=..[,file=..][,shared=on][,hugepages=on][,prefault=on]...`.
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
        check_page_multiple(&parsed, "size", size)?;
        Ok(MemoryZoneConfig {
            id,
            size,
            file: parsed.string("file")?,
            mergeable: parsed.toggle("mergeable")?.unwrap_or(false),
            shared: parsed.toggle("shared")?.unwrap_or(false),
            hugepages: parsed.toggle("hugepages")?.unwrap_or(false),
            hugepage_size: parsed.byte_size("hugepage_size")?,
            host_numa_node: parsed.integer::<u32>("host_numa_node")?,
            hotplug_size: parsed.byte_size("hotplug_size")?,
            hotplugged_size: parsed.byte_size("hotplugged_size")?,
            prefault: parsed.toggle("prefault")?.unwrap_or(false),
            reserve: parsed.toggle("reserve")?.unwrap_or(false),
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
        ("iommu", KeyKind::Value),
        ("queue_size", KeyKind::Value),
        ("num_queues", KeyKind::Value),
        ("vhost_user", KeyKind::Value),
        ("socket", KeyKind::Value),
        ("rate_limit_group", KeyKind::Value),
        ("pci_segment", KeyKind::Value),
        ("serial", KeyKind::Value),
        ("image_type", KeyKind::Value),
        ("sparse", KeyKind::Value),
        ("backing_files", KeyKind::Value),
        ("lock_granularity", KeyKind::Value),
        // Rate limiting and queue pinning: refused at any value, so their syntax is not parsed.
        ("bw_size", KeyKind::Unsupported),
        ("bw_one_time_burst", KeyKind::Unsupported),
        ("bw_refill_time", KeyKind::Unsupported),
        ("ops_size", KeyKind::Unsupported),
        ("ops_one_time_burst", KeyKind::Unsupported),
        ("ops_refill_time", KeyKind::Unsupported),
        ("queue_affinity", KeyKind::Unsupported),
    ],
};

impl DiskConfig {
    /// `--disk path=..[,readonly=on][,direct=on][,id=..]...`: a raw image behind virtio-blk.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&DISK_SPEC, input)?;
        let image_type =
            parsed
                .string("image_type")?
                .map(|value| match value.to_ascii_lowercase().as_str() {
                    "raw" => "Raw".to_owned(),
                    "qcow2" => "Qcow2".to_owned(),
                    "vhd" | "fixedvhd" => "FixedVhd".to_owned(),
                    "vhdx" => "Vhdx".to_owned(),
                    _ => value,
                });
        let lock_granularity = parsed.string("lock_granularity")?.map(|value| {
            match value.to_ascii_lowercase().as_str() {
                "byte-range" | "byterange" => "ByteRange".to_owned(),
                "full" => "Full".to_owned(),
                _ => value,
            }
        });
        Ok(DiskConfig {
            path: Some(parsed.required_string("path")?),
            readonly: parsed.toggle("readonly")?.unwrap_or(false),
            direct: parsed.toggle("direct")?.unwrap_or(false),
            iommu: parsed.toggle("iommu")?.unwrap_or(false),
            num_queues: parsed
                .integer::<usize>("num_queues")?
                .unwrap_or(DEFAULT_DISK_NUM_QUEUES),
            queue_size: parsed
                .integer::<u16>("queue_size")?
                .unwrap_or(DEFAULT_DISK_QUEUE_SIZE),
            vhost_user: parsed.toggle("vhost_user")?.unwrap_or(false),
            vhost_socket: parsed.string("socket")?,
            rate_limit_group: parsed.string("rate_limit_group")?,
            rate_limiter_config: None,
            id: parsed.string("id")?,
            pci_segment: parsed.integer::<u16>("pci_segment")?.unwrap_or(0),
            pci_device_id: None,
            serial: parsed.string("serial")?,
            queue_affinity: None,
            backing_files: parsed.toggle("backing_files")?.unwrap_or(false),
            sparse: parsed.toggle("sparse")?.unwrap_or(true),
            image_type,
            lock_granularity,
        })
    }
}

const RNG_SPEC: OptionSpec = OptionSpec {
    option: "rng",
    keys: &[("src", KeyKind::Value), ("iommu", KeyKind::Value)],
};

impl RngConfig {
    /// `--rng src=PATH[,iommu=on|off]`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&RNG_SPEC, input)?;
        Ok(RngConfig {
            src: parsed
                .string("src")?
                .unwrap_or_else(|| DEFAULT_RNG_SOURCE.to_owned()),
            iommu: parsed.toggle("iommu")?.unwrap_or(false),
        })
    }
}

const PLATFORM_SPEC: OptionSpec = OptionSpec {
    option: "platform",
    keys: &[
        ("num_pci_segments", KeyKind::Value),
        ("iommu_segments", KeyKind::Value),
        ("iommu_address_width", KeyKind::Value),
        ("serial_number", KeyKind::Value),
        ("uuid", KeyKind::Value),
        ("oem_strings", KeyKind::Value),
        ("manufacturer", KeyKind::Value),
        ("product_name", KeyKind::Value),
        ("version", KeyKind::Value),
        ("family", KeyKind::Value),
        ("sku_number", KeyKind::Value),
        ("chassis_asset_tag", KeyKind::Value),
        ("tdx", KeyKind::Value),
        ("sev_snp", KeyKind::Value),
        ("iommufd", KeyKind::Value),
        ("vfio_p2p_dma", KeyKind::Value),
    ],
};

impl PlatformConfig {
    /// `--platform num_pci_segments=N[,iommu_segments=[..]][,serial_number=..][,uuid=..]...`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&PLATFORM_SPEC, input)?;
        let iommu_segments = match parsed.list("iommu_segments")? {
            None => None,
            Some(items) => Some(
                items
                    .into_iter()
                    .map(|item| {
                        item.parse::<u16>().map_err(|_| ConfigError::InvalidValue {
                            option: "platform",
                            key: "iommu_segments".to_owned(),
                            value: item,
                            reason: "expected a list of PCI segment numbers, e.g. [0,1]".to_owned(),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(PlatformConfig {
            num_pci_segments: parsed
                .integer::<u16>("num_pci_segments")?
                .unwrap_or(DEFAULT_NUM_PCI_SEGMENTS),
            iommu_segments,
            iommu_address_width_bits: parsed
                .integer::<u8>("iommu_address_width")?
                .unwrap_or(DEFAULT_IOMMU_ADDRESS_WIDTH_BITS),
            system_serial_number: parsed.string("serial_number")?,
            serial_number: None,
            system_uuid: parsed.string("uuid")?,
            uuid: None,
            oem_strings: parsed.list("oem_strings")?,
            system_manufacturer: parsed.string("manufacturer")?,
            system_product_name: parsed.string("product_name")?,
            system_version: parsed.string("version")?,
            system_family: parsed.string("family")?,
            system_sku_number: parsed.string("sku_number")?,
            chassis_asset_tag: parsed.string("chassis_asset_tag")?,
            tdx: parsed.toggle("tdx")?,
            sev_snp: parsed.toggle("sev_snp")?,
            iommufd: parsed.toggle("iommufd")?.unwrap_or(false),
            vfio_p2p_dma: parsed.toggle("vfio_p2p_dma")?.unwrap_or(true),
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
            iommu: false,
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
    pub firmware: Option<&'a str>,
    pub cmdline: Option<&'a str>,
    pub initramfs: Option<&'a str>,
    pub cpus: Option<&'a str>,
    pub memory: Option<&'a str>,
    pub memory_zones: Vec<&'a str>,
    pub disks: Vec<&'a str>,
    pub net: Vec<&'a str>,
    pub rng: Option<&'a str>,
    pub serial: Option<&'a str>,
    pub console: Option<&'a str>,
    pub pvpanic: bool,
    pub platform: Option<&'a str>,
    pub nv: Option<&'a str>,
}

/// Why `--net` is refused: one message for the command line and `vm.create`.
const NO_NETWORKING: &str =
    "virtio-net is not implemented by this VMM yet; the VM would boot without its network";

impl VmConfig {
    /// Builds the VM the command line describes: `None` when it names neither a kernel nor an
    /// NV VM (the VMM then waits for `vm.create` on its API socket, as upstream does).
    pub fn from_options(options: &VmOptionStrings) -> Result<Option<Self>, ConfigError> {
        // Checked before anything else so that no combination lets a device request slip by.
        if let Some(net) = options.net.iter().find(|net| !net.trim().is_empty()) {
            return Err(ConfigError::NotSupported {
                option: "net",
                key: "",
                member: "net".to_owned(),
                value: (*net).to_owned(),
                reason: NO_NETWORKING.to_owned(),
            });
        }
        let rng = options.rng.map(RngConfig::parse).transpose()?;
        let platform = options.platform.map(PlatformConfig::parse).transpose()?;
        if options.kernel.is_none() && options.firmware.is_none() && options.nv.is_none() {
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
                firmware: options.firmware.map(str::to_owned),
                cmdline: options.cmdline.map(str::to_owned),
                initramfs: options.initramfs.map(str::to_owned),
                ..Default::default()
            },
            disks: (!disks.is_empty()).then_some(disks),
            rng: rng.unwrap_or_default(),
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
            pvpanic: options.pvpanic,
            platform,
            nv: options.nv.map(NvConfig::parse).transpose()?,
            ..Default::default()
        };
        config.validate()?;
        Ok(Some(config))
    }

    /// Whether this VMM can run the config as it is written: the one check for the command line,
    /// a `vm.create` body and a snapshot's `config.json`, so that what `vm.create` accepts
    /// `vm.boot` does not refuse later. Upstream members this VMM does not implement pass at
    /// their default values and are refused, by name, at any other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_cpus()?;
        self.validate_memory()?;
        self.validate_payload()?;
        self.validate_disks()?;
        self.validate_consoles()?;
        self.validate_devices()?;
        self.validate_platform()?;
        self.validate_nv()?;
        Ok(())
    }

    fn validate_cpus(&self) -> Result<(), ConfigError> {
        let cpus = &self.cpus;
        let refuse = |key: &'static str, value: String, reason: &str| {
            Err(not_supported(
                "cpus",
                key,
                format!("cpus.{key}"),
                value,
                reason,
            ))
        };
        if cpus.boot_vcpus == 0 {
            return Err(ConfigError::InvalidValue {
                option: "cpus",
                key: "boot".to_owned(),
                value: "0".to_owned(),
                reason: "at least one vCPU is needed".to_owned(),
            });
        }
        if cpus.max_vcpus < cpus.boot_vcpus {
            return Err(ConfigError::Invalid {
                option: "cpus",
                reason: format!(
                    "max ({}) is lower than boot ({})",
                    cpus.max_vcpus, cpus.boot_vcpus
                ),
            });
        }
        if cpus.max_vcpus > cpus.boot_vcpus {
            return refuse(
                "max",
                cpus.max_vcpus.to_string(),
                "vCPU hotplug is not implemented; max must equal boot",
            );
        }
        if let Some(limit) = host_vcpu_limit() {
            if usize::from(cpus.boot_vcpus) > limit.recommended {
                return Err(ConfigError::Host {
                    option: "cpus",
                    reason: format!(
                        "boot={} exceeds this host's KVM limit of {} vCPUs per VM \
                         (KVM_CAP_NR_VCPUS; KVM_CAP_MAX_VCPUS is {})",
                        cpus.boot_vcpus, limit.recommended, limit.maximum
                    ),
                });
            }
        }
        if let Some(topology) = &cpus.topology {
            let CpuTopology {
                threads_per_core,
                cores_per_die,
                dies_per_package,
                packages,
            } = topology;
            return refuse(
                "topology",
                format!("{threads_per_core}:{cores_per_die}:{dies_per_package}:{packages}"),
                "the guest sees KVM's default CPU topology",
            );
        }
        if cpus.kvm_hyperv {
            return refuse(
                "kvm_hyperv",
                "on".into(),
                "Hyper-V enlightenments are not offered",
            );
        }
        if cpus.max_phys_bits != DEFAULT_MAX_PHYS_BITS {
            return refuse(
                "max_phys_bits",
                cpus.max_phys_bits.to_string(),
                "the guest's physical address width is not limited; only upstream's default 46 is accepted",
            );
        }
        if cpus.affinity.as_ref().is_some_and(|list| !list.is_empty()) {
            return refuse("affinity", "[..]".into(), "vCPU threads are not pinned");
        }
        if cpus.features.amx {
            return refuse(
                "features",
                "[amx]".into(),
                "AMX state is not enabled for guests",
            );
        }
        if !cpus.nested {
            return refuse(
                "nested",
                "off".into(),
                "the guest sees the host's virtualization extensions as KVM reports them",
            );
        }
        if cpus.core_scheduling == CoreScheduling::Vcpu {
            return refuse(
                "core_scheduling",
                "vcpu".into(),
                "no core-scheduling cookies are set (vm and off are accepted)",
            );
        }
        if !cpus.profile.eq_ignore_ascii_case(DEFAULT_CPU_PROFILE) {
            return refuse(
                "profile",
                cpus.profile.clone(),
                "the guest sees the host CPU's model; only the host profile is accepted",
            );
        }
        Ok(())
    }

    fn validate_memory(&self) -> Result<(), ConfigError> {
        let memory = &self.memory;
        let zones = memory.zones.as_deref().unwrap_or_default();
        if !zones.is_empty() && memory.size != 0 {
            return Err(zones_need_size_zero());
        }
        if !memory.size.is_multiple_of(GUEST_PAGE_SIZE) {
            return Err(ConfigError::InvalidValue {
                option: "memory",
                key: "size".to_owned(),
                value: memory.size.to_string(),
                reason: format!("must be a multiple of {GUEST_PAGE_SIZE} bytes"),
            });
        }
        let refuse = |key: &'static str, value: String, reason: &str| {
            Err(not_supported(
                "memory",
                key,
                format!("memory.{key}"),
                value,
                reason,
            ))
        };
        if memory.mergeable {
            return refuse("mergeable", "on".into(), "guest RAM is not offered to KSM");
        }
        if memory.hotplug_method != HotplugMethod::Acpi && memory.hotplug_size.is_some() {
            return refuse(
                "hotplug_method",
                "virtio-mem".into(),
                "memory hotplug is not implemented",
            );
        }
        if let Some(size) = memory.hotplug_size.filter(|size| *size > 0) {
            return refuse(
                "hotplug_size",
                size.to_string(),
                "memory hotplug is not implemented",
            );
        }
        if let Some(size) = memory.hotplugged_size.filter(|size| *size > 0) {
            return refuse(
                "hotplugged_size",
                size.to_string(),
                "memory hotplug is not implemented",
            );
        }
        if memory.hugepages || memory.hugepage_size.is_some() {
            return refuse(
                if memory.hugepages {
                    "hugepages"
                } else {
                    "hugepage_size"
                },
                "on".into(),
                HUGEPAGES_REASON,
            );
        }
        if memory.reserve {
            return refuse("reserve", "on".into(), "guest RAM is not reserved up front");
        }
        for (index, zone) in zones.iter().enumerate() {
            let refuse = |key: &'static str, value: String, reason: &str| {
                Err(not_supported(
                    "memory-zone",
                    key,
                    format!("memory.zones[{index}].{key}"),
                    value,
                    reason,
                ))
            };
            if zones[..index].iter().any(|other| other.id == zone.id) {
                return Err(ConfigError::InvalidValue {
                    option: "memory-zone",
                    key: "id".to_owned(),
                    value: zone.id.clone(),
                    reason: "used by more than one zone".to_owned(),
                });
            }
            if zone.size == 0 || !zone.size.is_multiple_of(GUEST_PAGE_SIZE) {
                return Err(ConfigError::InvalidValue {
                    option: "memory-zone",
                    key: "size".to_owned(),
                    value: zone.size.to_string(),
                    reason: format!(
                        "zone {}: a zone needs a non-zero multiple of {GUEST_PAGE_SIZE} bytes",
                        zone.id
                    ),
                });
            }
            if zone.hugepages || zone.hugepage_size.is_some() {
                return refuse("hugepages", "on".into(), HUGEPAGES_REASON);
            }
            if zone.mergeable {
                return refuse("mergeable", "on".into(), "guest RAM is not offered to KSM");
            }
            if let Some(node) = zone.host_numa_node {
                return refuse(
                    "host_numa_node",
                    node.to_string(),
                    "no NUMA memory policy is applied",
                );
            }
            if let Some(size) = zone.hotplug_size.filter(|size| *size > 0) {
                return refuse(
                    "hotplug_size",
                    size.to_string(),
                    "memory hotplug is not implemented",
                );
            }
            if let Some(size) = zone.hotplugged_size.filter(|size| *size > 0) {
                return refuse(
                    "hotplugged_size",
                    size.to_string(),
                    "memory hotplug is not implemented",
                );
            }
            if zone.reserve {
                return refuse("reserve", "on".into(), "guest RAM is not reserved up front");
            }
        }
        let total = zones
            .iter()
            .try_fold(memory.size, |sum, zone| sum.checked_add(zone.size))
            .ok_or_else(|| ConfigError::Invalid {
                option: "memory",
                reason: "the total guest RAM does not fit in 64 bits".to_owned(),
            })?;
        if total < arch::layout::MIN_RAM_SIZE {
            return Err(ConfigError::Invalid {
                option: "memory",
                reason: format!(
                    "the VM has {total} bytes of RAM; it needs at least {} (1 MiB) to boot",
                    arch::layout::MIN_RAM_SIZE
                ),
            });
        }
        Ok(())
    }

    fn validate_payload(&self) -> Result<(), ConfigError> {
        let payload = &self.payload;
        let refuse = |key: &'static str, value: &str, reason: &str| {
            Err(not_supported(
                key,
                "",
                format!("payload.{key}"),
                value.to_owned(),
                reason,
            ))
        };
        if let Some(firmware) = &payload.firmware {
            return refuse(
                "firmware",
                firmware,
                "firmware boot is not implemented; use --kernel",
            );
        }
        if let Some(igvm) = &payload.igvm {
            return refuse("igvm", igvm, "IGVM boot is not implemented");
        }
        if let Some(host_data) = &payload.host_data {
            return refuse("host-data", host_data, "SEV-SNP is not implemented");
        }
        Ok(())
    }

    fn validate_disks(&self) -> Result<(), ConfigError> {
        let disks = self.disks.as_deref().unwrap_or_default();
        for (index, disk) in disks.iter().enumerate() {
            let refuse = |key: &'static str, value: String, reason: &str| {
                Err(not_supported(
                    "disk",
                    key,
                    format!("disks[{index}].{key}"),
                    value,
                    reason,
                ))
            };
            let earlier = &disks[..index];
            if disk.path.is_none() {
                return Err(ConfigError::MissingKey {
                    option: "disk",
                    key: "path",
                });
            }
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
            if disk.iommu {
                return refuse("iommu", "on".into(), "there is no virtual IOMMU");
            }
            if disk.num_queues != DEFAULT_DISK_NUM_QUEUES {
                return refuse(
                    "num_queues",
                    disk.num_queues.to_string(),
                    "the virtio-blk device has one request queue",
                );
            }
            if disk.queue_size != DEFAULT_DISK_QUEUE_SIZE
                && disk.queue_size != devices::virtio::BLOCK_QUEUE_SIZE
            {
                return Err(not_supported(
                    "disk",
                    "queue_size",
                    format!("disks[{index}].queue_size"),
                    disk.queue_size.to_string(),
                    &format!(
                        "the virtio-blk queue offers {} entries (upstream's default {} is \
                         accepted too)",
                        devices::virtio::BLOCK_QUEUE_SIZE,
                        DEFAULT_DISK_QUEUE_SIZE
                    ),
                ));
            }
            if disk.vhost_user || disk.vhost_socket.is_some() {
                return refuse(
                    "vhost_user",
                    "on".into(),
                    "vhost-user disks are not implemented",
                );
            }
            if let Some(group) = &disk.rate_limit_group {
                return refuse(
                    "rate_limit_group",
                    group.clone(),
                    "I/O rate limiting is not implemented",
                );
            }
            if disk
                .rate_limiter_config
                .as_ref()
                .is_some_and(|v| !is_empty_json(v))
            {
                return refuse(
                    "bw_size",
                    "..".into(),
                    "I/O rate limiting is not implemented",
                );
            }
            if disk.pci_segment != 0 {
                return refuse(
                    "pci_segment",
                    disk.pci_segment.to_string(),
                    "disks are virtio-mmio devices, on no PCI segment",
                );
            }
            if let Some(id) = disk.pci_device_id {
                return refuse(
                    "pci_device_id",
                    id.to_string(),
                    "disks are virtio-mmio devices",
                );
            }
            if let Some(serial) = &disk.serial {
                return refuse(
                    "serial",
                    serial.clone(),
                    "the guest reads a disk ID derived from the image, not a configured serial",
                );
            }
            if disk
                .queue_affinity
                .as_ref()
                .is_some_and(|list| !list.is_empty())
            {
                return refuse(
                    "queue_affinity",
                    "[..]".into(),
                    "I/O threads are not pinned",
                );
            }
            if disk.backing_files {
                return refuse(
                    "backing_files",
                    "on".into(),
                    "images are raw; there are no backing files",
                );
            }
            if let Some(image_type) = disk.image_type.as_deref().filter(|t| *t != "Raw") {
                // A qcow2 image served as raw would show the guest its metadata, and corrupt it.
                return refuse(
                    "image_type",
                    image_type.to_owned(),
                    "only raw images are implemented",
                );
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

    fn validate_consoles(&self) -> Result<(), ConfigError> {
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
            if console.iommu {
                return Err(not_supported(
                    option,
                    "iommu",
                    format!("{option}.iommu"),
                    "on".into(),
                    "there is no virtual IOMMU",
                ));
            }
        }
        let debug = &self.debug_console;
        if debug.mode != ConsoleOutputMode::Off {
            return Err(not_supported(
                "debug-console",
                "",
                "debug_console.mode".into(),
                format!("{:?}", debug.mode).to_ascii_lowercase(),
                "there is no port-0xe9 debug console; only off is accepted",
            ));
        }
        Ok(())
    }

    /// Device members of upstream's `VmConfig` this VMM has no device for.
    fn validate_devices(&self) -> Result<(), ConfigError> {
        let lists: [(&'static str, &Option<Vec<Value>>, &str); 11] = [
            ("net", &self.net, NO_NETWORKING),
            (
                "rate-limit-group",
                &self.rate_limit_groups,
                "I/O rate limiting is not implemented",
            ),
            ("fs", &self.fs, "virtio-fs is not implemented"),
            (
                "generic-vhost-user",
                &self.generic_vhost_user,
                "vhost-user devices are not implemented",
            ),
            ("pmem", &self.pmem, "virtio-pmem is not implemented"),
            (
                "device",
                &self.devices,
                "VFIO passthrough is not implemented",
            ),
            (
                "user-device",
                &self.user_devices,
                "vfio-user devices are not implemented",
            ),
            ("vdpa", &self.vdpa, "vDPA devices are not implemented"),
            ("sgx-epc", &self.sgx_epc, "SGX is not implemented"),
            ("numa", &self.numa, "guest NUMA nodes are not implemented"),
            (
                "pci-segment",
                &self.pci_segments,
                "there is no PCI bus; devices are virtio-mmio",
            ),
        ];
        for (option, list, reason) in lists {
            if let Some(first) = list.as_deref().and_then(<[Value]>::first) {
                return Err(not_supported(
                    option,
                    "",
                    member_name(option),
                    first.to_string(),
                    reason,
                ));
            }
        }
        let singles: [(&'static str, &Option<Value>, &str); 4] = [
            (
                "balloon",
                &self.balloon,
                "virtio-balloon is not implemented",
            ),
            ("vsock", &self.vsock, "virtio-vsock is not implemented"),
            ("rtc", &self.rtc, "there is no virtio RTC device"),
            ("tpm", &self.tpm, "TPM emulation is not implemented"),
        ];
        for (option, value, reason) in singles {
            if let Some(value) = value.as_ref().filter(|value| !is_empty_json(value)) {
                return Err(not_supported(
                    option,
                    "",
                    option.to_owned(),
                    value.to_string(),
                    reason,
                ));
            }
        }
        if self.rng.src != DEFAULT_RNG_SOURCE || self.rng.iommu {
            return Err(not_supported(
                "rng",
                "src",
                "rng.src".into(),
                self.rng.src.clone(),
                "there is no virtio-rng device; upstream's default src=/dev/urandom is accepted \
                 (and offers the guest nothing here)",
            ));
        }
        let flags = [
            ("iommu", self.iommu, "there is no virtual IOMMU"),
            ("watchdog", self.watchdog, "there is no watchdog device"),
            (
                "landlock",
                self.landlock_enable,
                "Landlock sandboxing is not implemented",
            ),
        ];
        for (option, set, reason) in flags {
            if set {
                return Err(not_supported(
                    option,
                    "",
                    member_name(option),
                    "on".into(),
                    reason,
                ));
            }
        }
        Ok(())
    }

    fn validate_platform(&self) -> Result<(), ConfigError> {
        let Some(platform) = &self.platform else {
            return Ok(());
        };
        let refuse = |key: &'static str, value: String, reason: &str| {
            Err(not_supported(
                "platform",
                key,
                format!("platform.{key}"),
                value,
                reason,
            ))
        };
        if platform.num_pci_segments != DEFAULT_NUM_PCI_SEGMENTS {
            return refuse(
                "num_pci_segments",
                platform.num_pci_segments.to_string(),
                "there is no PCI bus; only upstream's default 1 is accepted",
            );
        }
        if platform
            .iommu_segments
            .as_ref()
            .is_some_and(|list| !list.is_empty())
        {
            return refuse("iommu_segments", "[..]".into(), "there is no virtual IOMMU");
        }
        if platform.iommu_address_width_bits != DEFAULT_IOMMU_ADDRESS_WIDTH_BITS {
            return refuse(
                "iommu_address_width",
                platform.iommu_address_width_bits.to_string(),
                "there is no virtual IOMMU",
            );
        }
        let smbios = [
            ("serial_number", &platform.system_serial_number),
            ("serial_number", &platform.serial_number),
            ("uuid", &platform.system_uuid),
            ("uuid", &platform.uuid),
            ("manufacturer", &platform.system_manufacturer),
            ("product_name", &platform.system_product_name),
            ("version", &platform.system_version),
            ("family", &platform.system_family),
            ("sku_number", &platform.system_sku_number),
            ("chassis_asset_tag", &platform.chassis_asset_tag),
        ];
        for (key, value) in smbios {
            if let Some(value) = value {
                return refuse(
                    key,
                    value.clone(),
                    "no SMBIOS tables are written for the guest",
                );
            }
        }
        if platform
            .oem_strings
            .as_ref()
            .is_some_and(|list| !list.is_empty())
        {
            return refuse(
                "oem_strings",
                "[..]".into(),
                "no SMBIOS tables are written for the guest",
            );
        }
        if platform.tdx == Some(true) {
            return refuse(
                "tdx",
                "on".into(),
                "confidential guests are not implemented",
            );
        }
        if platform.sev_snp == Some(true) {
            return refuse(
                "sev_snp",
                "on".into(),
                "confidential guests are not implemented",
            );
        }
        if platform.iommufd {
            return refuse(
                "iommufd",
                "on".into(),
                "VFIO passthrough is not implemented",
            );
        }
        Ok(())
    }

    fn validate_nv(&self) -> Result<(), ConfigError> {
        let Some(nv) = &self.nv else {
            return Ok(());
        };
        if let Some(region_size) = nv.region_size {
            // A region made now holds its metadata (superblocks, two VM-table copies), then the
            // VM's RAM and its two saved-state slots, each rounded up to the extent alignment
            // (nv-extension's default layout, docs/nv-format.md).
            use nv_extension::region::{
                DEFAULT_EXTENT_ALIGNMENT, DEFAULT_STATE_SLOT_LEN, DEFAULT_TABLE_COPY_LEN,
            };
            let round_up = |value: u64| {
                value
                    .div_ceil(DEFAULT_EXTENT_ALIGNMENT)
                    .saturating_mul(DEFAULT_EXTENT_ALIGNMENT)
            };
            let ram = self.memory.total_size();
            let needed = round_up(nv_extension::superblock::AREA_LEN + 2 * DEFAULT_TABLE_COPY_LEN)
                .saturating_add(round_up(ram))
                .saturating_add(round_up(2 * DEFAULT_STATE_SLOT_LEN));
            if nv.create && region_size < needed {
                return Err(ConfigError::InvalidValue {
                    option: "nv",
                    key: "region_size".to_owned(),
                    value: region_size.to_string(),
                    reason: format!(
                        "cannot hold the VM: its metadata, {} MiB of RAM and saved-state slots \
                         need at least {needed} bytes ({} MiB)",
                        ram >> 20,
                        needed.div_ceil(1 << 20)
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Why `hugepages=on` is refused, with or without `--nv`.
const HUGEPAGES_REASON: &str = "guest RAM is not backed by hugetlbfs pages (an NV VM's RAM is \
                                its extent of the region); transparent huge pages (thp=on, the \
                                default) are used for anonymous RAM";

fn not_supported(
    option: &'static str,
    key: &'static str,
    member: String,
    value: String,
    reason: &str,
) -> ConfigError {
    ConfigError::NotSupported {
        option,
        key,
        member,
        value,
        reason: reason.to_owned(),
    }
}

/// The `VmConfig` member a command-line option fills (`user-device` -> `user_devices`).
fn member_name(option: &str) -> String {
    match option {
        "device" => "devices".to_owned(),
        "user-device" => "user_devices".to_owned(),
        "rate-limit-group" => "rate_limit_groups".to_owned(),
        "pci-segment" => "pci_segments".to_owned(),
        "landlock" => "landlock_enable".to_owned(),
        other => other.replace('-', "_"),
    }
}

/// JSON that asks for nothing: `null`, `false`, `{}`, `[]`.
fn is_empty_json(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(members) => members.is_empty(),
        _ => false,
    }
}

/// What KVM on this host allows per VM.
#[derive(Clone, Copy, Debug)]
pub struct VcpuLimit {
    /// `KVM_CAP_NR_VCPUS`: the vCPUs KVM recommends (the host's CPUs on x86). On this project's
    /// nested hosts more than this do not run, so it is the limit enforced.
    pub recommended: usize,
    /// `KVM_CAP_MAX_VCPUS`: the most KVM will create.
    pub maximum: usize,
}

/// KVM's vCPU limits, asked once; `None` when `/dev/kvm` cannot be opened (creating the VM then
/// fails with that error).
pub fn host_vcpu_limit() -> Option<VcpuLimit> {
    static LIMIT: std::sync::OnceLock<Option<VcpuLimit>> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let kvm = kvm_ioctls::Kvm::new().ok()?;
        let maximum = kvm.get_max_vcpus();
        Some(VcpuLimit {
            recommended: kvm.get_nr_vcpus().min(maximum),
            maximum,
        })
    })
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

    /// A config from the command line, checked as `vm.create` checks one.
    fn command_line(options: VmOptionStrings) -> Result<VmConfig, ConfigError> {
        VmConfig::from_options(&VmOptionStrings {
            kernel: Some("/k"),
            memory: options.memory.or(Some("size=64M")),
            ..options
        })
        .map(Option::unwrap)
    }

    fn assert_not_supported<T: std::fmt::Debug>(result: Result<T, ConfigError>, expected: &str) {
        match result {
            Err(error @ ConfigError::NotSupported { .. }) => {
                let ConfigError::NotSupported { ref member, .. } = error else {
                    unreachable!()
                };
                assert_eq!(member, expected, "{error}");
                assert!(error.to_string().contains(expected), "{error}");
            }
            other => panic!("expected {expected} to be refused, got {other:?}"),
        }
    }

    #[test]
    fn cpus() {
        assert_eq!(
            CpusConfig::parse("boot=2").unwrap(),
            CpusConfig {
                boot_vcpus: 2,
                max_vcpus: 2,
                ..Default::default()
            }
        );
        let all = CpusConfig::parse(
            "boot=1,max=2,topology=1:2:1:1,kvm_hyperv=on,max_phys_bits=40,features=[amx],\
             nested=off,core_scheduling=vcpu,profile=host",
        )
        .unwrap();
        assert_eq!(all.max_vcpus, 2);
        assert_eq!(
            all.topology,
            Some(CpuTopology {
                threads_per_core: 1,
                cores_per_die: 2,
                dies_per_package: 1,
                packages: 1
            })
        );
        assert!(all.kvm_hyperv && all.features.amx && !all.nested);
        assert_eq!(all.max_phys_bits, 40);
        assert_eq!(all.core_scheduling, CoreScheduling::Vcpu);
        assert_eq!(all.profile, "Host");
        assert_invalid_value(CpusConfig::parse("boot=x"), "boot");
        assert_invalid_value(CpusConfig::parse("boot=300"), "boot");
        assert_invalid_value(CpusConfig::parse("topology=1:2"), "topology");
        assert_invalid_value(CpusConfig::parse("features=[avx]"), "features");
        assert!(matches!(
            CpusConfig::parse("boot=1,cores=2"),
            Err(ConfigError::UnknownKey { option: "cpus", .. })
        ));
        assert!(matches!(
            CpusConfig::parse("boot=1,affinity=[0@[0]]"),
            Err(ConfigError::UnsupportedKey { option: "cpus", .. })
        ));
    }

    #[test]
    fn cpus_validation() {
        let cpus = |value| {
            command_line(VmOptionStrings {
                cpus: Some(value),
                ..Default::default()
            })
        };
        assert!(cpus("boot=1").is_ok());
        assert_invalid_value(cpus("boot=0"), "boot");
        assert!(matches!(
            cpus("boot=2,max=1"),
            Err(ConfigError::Invalid { option: "cpus", .. })
        ));
        assert_not_supported(cpus("boot=1,max=2"), "cpus.max");
        assert_not_supported(cpus("topology=1:1:1:1"), "cpus.topology");
        assert_not_supported(cpus("kvm_hyperv=on"), "cpus.kvm_hyperv");
        assert_not_supported(cpus("max_phys_bits=40"), "cpus.max_phys_bits");
        assert_not_supported(cpus("features=[amx]"), "cpus.features");
        assert_not_supported(cpus("nested=off"), "cpus.nested");
        assert_not_supported(cpus("core_scheduling=vcpu"), "cpus.core_scheduling");
        assert_not_supported(cpus("profile=skylake"), "cpus.profile");
        // Upstream's defaults, written out, pass.
        assert!(cpus(
            "boot=1,max=1,kvm_hyperv=off,max_phys_bits=46,nested=on,core_scheduling=vm,profile=host"
        )
        .is_ok());
        assert!(cpus("core_scheduling=off").is_ok());
    }

    /// Issue 10 item 9: `--cpus boot=255` was accepted although KVM here runs 2 vCPUs per VM.
    #[test]
    fn more_vcpus_than_kvm_allows_are_refused_with_the_limit() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let limit = kvm.get_nr_vcpus().min(kvm.get_max_vcpus());
        let too_many = u8::try_from(limit + 1).unwrap_or(u8::MAX);
        let boot = format!("boot={too_many}");
        let error = command_line(VmOptionStrings {
            cpus: Some(&boot),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            matches!(error, ConfigError::Host { option: "cpus", .. }),
            "{error}"
        );
        let message = error.to_string();
        assert!(
            message.contains(&format!("limit of {limit} vCPUs")),
            "{message}"
        );
        let error = command_line(VmOptionStrings {
            cpus: Some("boot=255"),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(error, ConfigError::Host { .. }), "{error}");
        let at_limit = format!("boot={limit}");
        assert!(command_line(VmOptionStrings {
            cpus: Some(&at_limit),
            ..Default::default()
        })
        .is_ok());
    }

    #[test]
    fn memory() {
        let memory = MemoryConfig::parse(Some("size=64M,shared=on"), &[]).unwrap();
        assert_eq!(memory.size, 64 << 20);
        assert!(memory.shared);
        assert!(memory.thp, "thp=on is upstream's default");
        assert!(memory.zones.is_none());
        assert!(
            !MemoryConfig::parse(Some("size=64M,thp=off"), &[])
                .unwrap()
                .thp
        );
        assert!(
            MemoryConfig::parse(Some("size=64M,thp=on"), &[])
                .unwrap()
                .thp
        );
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
        let memory = |value| {
            command_line(VmOptionStrings {
                memory: Some(value),
                ..Default::default()
            })
        };
        assert_not_supported(memory("size=1G,hotplug_size=1G"), "memory.hotplug_size");
        assert_not_supported(memory("size=1G,mergeable=on"), "memory.mergeable");
        assert_not_supported(memory("size=1G,hugepage_size=2M"), "memory.hugepage_size");
        assert_not_supported(memory("size=1G,reserve=on"), "memory.reserve");
        assert!(memory("size=1G,mergeable=off,hotplug_method=acpi,thp=on,reserve=off").is_ok());
    }

    /// Issue 10 item 9: duplicate keys and empty values were accepted silently.
    #[test]
    fn duplicate_keys_and_empty_values_name_the_key() {
        let error = MemoryConfig::parse(Some("size=1G,size=2G"), &[]).unwrap_err();
        assert!(
            matches!(&error, ConfigError::DuplicateKey { option: "memory", key } if key == "size"),
            "{error:?}"
        );
        assert!(error.to_string().contains("\"size\""), "{error}");
        let error = MemoryConfig::parse(Some("size="), &[]).unwrap_err();
        assert!(
            matches!(&error, ConfigError::MissingValue { option: "memory", key } if key == "size"),
            "{error:?}"
        );
        assert!(matches!(
            DiskConfig::parse("path=/a,serial="),
            Err(ConfigError::MissingValue { .. })
        ));
    }

    /// Issue 10 item 9: `hugepages=on` was silently ignored with `--nv`.
    #[test]
    fn hugepages_are_refused_with_and_without_nv() {
        for nv in [None, Some("region=/r,vm=a,create=on")] {
            assert_not_supported(
                command_line(VmOptionStrings {
                    memory: Some("size=64M,hugepages=on"),
                    nv,
                    ..Default::default()
                }),
                "memory.hugepages",
            );
        }
        assert_not_supported(
            command_line(VmOptionStrings {
                memory: Some("size=0"),
                memory_zones: vec!["id=a,size=64M,hugepages=on"],
                ..Default::default()
            }),
            "memory.zones[0].hugepages",
        );
    }

    /// Issue 10 item 9: `region_size=3M` for a 64 MiB VM was silently exceeded.
    #[test]
    fn an_nv_region_size_too_small_for_the_vm_is_refused_with_what_it_needs() {
        let nv = |nv| {
            command_line(VmOptionStrings {
                memory: Some("size=64M"),
                nv: Some(nv),
                ..Default::default()
            })
        };
        let error = nv("region=/r,vm=a,create=on,region_size=3M").unwrap_err();
        assert!(
            matches!(&error, ConfigError::InvalidValue { key, .. } if key == "region_size"),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("64 MiB of RAM"), "{message}");
        assert!(message.contains("(68 MiB)"), "{message}");
        assert!(nv("region=/r,vm=a,create=on,region_size=67M").is_err());
        assert!(nv("region=/r,vm=a,create=on,region_size=68M").is_ok());
    }

    /// The size `validate_nv` demands is exactly what nv-extension lays out: a region of that
    /// size holds the VM without growing.
    #[test]
    fn the_region_size_demanded_is_what_the_region_needs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        let nv = format!("region={},vm=a,create=on,region_size=68M", path.display());
        assert!(command_line(VmOptionStrings {
            memory: Some("size=64M"),
            nv: Some(&nv),
            ..Default::default()
        })
        .is_ok());
        let region = nv_extension::Region::open(
            &path,
            &nv_extension::OpenOptions {
                create_if_missing: true,
                region_size: Some(68 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        region.create_vm("a", 64 << 20, b"{}").unwrap();
        assert_eq!(region.size(), 68 << 20, "the region had to grow");
    }

    /// Issue 10 item 9: `vm.create` accepted sizes `vm.boot` then refused.
    #[test]
    fn too_little_ram_to_boot_is_refused_up_front() {
        let config: VmConfig = serde_json::from_value(serde_json::json!({
            "payload": {"kernel": "/k"},
            "memory": {"size": 4096}
        }))
        .unwrap();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Invalid {
                option: "memory",
                ..
            })
        ));
        let zone_of_zero: VmConfig = serde_json::from_value(serde_json::json!({
            "payload": {"kernel": "/k"},
            "memory": {"size": 0, "zones": [{"id": "a", "size": 0}, {"id": "b", "size": 67108864}]}
        }))
        .unwrap();
        assert_invalid_value(zone_of_zero.validate(), "size");
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
        let zones = |zones: Vec<&'static str>| {
            command_line(VmOptionStrings {
                memory: Some("size=0"),
                memory_zones: zones,
                ..Default::default()
            })
        };
        assert_invalid_value(zones(vec!["id=a,size=0"]), "size");
        assert_invalid_value(zones(vec!["id=a,size=4M", "id=a,size=4M"]), "id");
        assert_not_supported(
            zones(vec!["id=a,size=4M,host_numa_node=0"]),
            "memory.zones[0].host_numa_node",
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
        assert_eq!(disk.queue_size, 128);
        assert_eq!(disk.num_queues, 1);
        assert!(disk.sparse);
        assert!(!DiskConfig::parse("path=/img").unwrap().readonly);
        assert!(matches!(
            DiskConfig::parse("readonly=on"),
            Err(ConfigError::MissingKey { key: "path", .. })
        ));
        assert!(matches!(
            DiskConfig::parse("path=/img,bw_size=1000"),
            Err(ConfigError::UnsupportedKey { .. })
        ));
        assert!(matches!(
            DiskConfig::parse("path=/img,colour=red"),
            Err(ConfigError::UnknownKey { .. })
        ));
    }

    /// One rule for the command line and JSON: upstream's defaults pass, other values are
    /// refused by name (they used to be refused on the command line and ignored in JSON).
    #[test]
    fn disk_members_follow_one_rule_on_the_command_line_and_in_json() {
        let cases = [
            ("queue_size=128", None),
            ("queue_size=256", None),
            ("num_queues=1", None),
            ("sparse=off", None),
            ("image_type=raw", None),
            ("pci_segment=0", None),
            ("queue_size=512", Some("disks[0].queue_size")),
            ("num_queues=2", Some("disks[0].num_queues")),
            ("serial=ABC", Some("disks[0].serial")),
            ("iommu=on", Some("disks[0].iommu")),
            ("vhost_user=on", Some("disks[0].vhost_user")),
            ("image_type=qcow2", Some("disks[0].image_type")),
            ("pci_segment=1", Some("disks[0].pci_segment")),
            ("backing_files=on", Some("disks[0].backing_files")),
        ];
        for (option, refused) in cases {
            let disk = format!("path=/a.img,{option}");
            let from_cli = command_line(VmOptionStrings {
                disks: vec![&disk],
                ..Default::default()
            });
            let parsed = DiskConfig::parse(&disk).unwrap();
            let json = serde_json::json!({
                "payload": {"kernel": "/k"},
                "memory": {"size": 67108864},
                "disks": [serde_json::to_value(&parsed).unwrap()]
            });
            let from_json = serde_json::from_value::<VmConfig>(json).unwrap().validate();
            match refused {
                None => {
                    assert!(from_cli.is_ok(), "{option}: {from_cli:?}");
                    assert!(from_json.is_ok(), "{option}: {from_json:?}");
                }
                Some(member) => {
                    assert_not_supported(from_cli, member);
                    assert_not_supported(from_json, member);
                }
            }
        }
    }

    #[test]
    fn rng_platform_and_net() {
        let with = |options: VmOptionStrings<'static>| command_line(options);
        assert!(with(VmOptionStrings {
            rng: Some("src=/dev/urandom"),
            ..Default::default()
        })
        .is_ok());
        assert_not_supported(
            with(VmOptionStrings {
                rng: Some("src=/dev/hwrng"),
                ..Default::default()
            }),
            "rng.src",
        );
        let platform = with(VmOptionStrings {
            platform: Some("num_pci_segments=1,iommufd=off"),
            ..Default::default()
        })
        .unwrap()
        .platform
        .unwrap();
        assert_eq!(platform.num_pci_segments, 1);
        assert!(platform.vfio_p2p_dma);
        assert_not_supported(
            with(VmOptionStrings {
                platform: Some("num_pci_segments=2"),
                ..Default::default()
            }),
            "platform.num_pci_segments",
        );
        assert_not_supported(
            with(VmOptionStrings {
                platform: Some("serial_number=ABC"),
                ..Default::default()
            }),
            "platform.serial_number",
        );
        assert!(with(VmOptionStrings {
            net: vec![""],
            ..Default::default()
        })
        .is_ok());
        let error = with(VmOptionStrings {
            net: vec!["tap=tap0"],
            ..Default::default()
        })
        .unwrap_err();
        assert!(error.to_string().starts_with("--net"), "{error}");
        // Refused even without a VM on the command line (the API would create it later).
        assert!(VmConfig::from_options(&VmOptionStrings {
            net: vec!["tap=tap0"],
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn pvpanic_is_off_by_default_on_with_the_flag_and_a_vm_config_member() {
        let options = VmOptionStrings {
            kernel: Some("/k"),
            memory: Some("size=64M"),
            console: Some("off"),
            ..Default::default()
        };
        let config = VmConfig::from_options(&options).unwrap().unwrap();
        assert!(!config.pvpanic);
        // Upstream's vm.info carries every member: ours shows pvpanic too.
        assert_eq!(serde_json::to_value(&config).unwrap()["pvpanic"], false);
        let with_flag = VmOptionStrings {
            pvpanic: true,
            ..options
        };
        let config = VmConfig::from_options(&with_flag).unwrap().unwrap();
        assert!(config.pvpanic);
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), config);
        // Configs written before the member existed (NV regions, snapshots) still parse.
        let old: VmConfig =
            serde_json::from_str(r#"{"payload":{"kernel":"/k"},"memory":{"size":1048576}}"#)
                .unwrap();
        assert!(!old.pvpanic);
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

    /// Upstream configs written with every unset `Option` as `null` (as its `vm.info` and
    /// snapshot `config.json` spell them) read back, pass the check, and lose nothing but the
    /// `null`s.
    #[test]
    fn an_upstream_config_with_nulls_is_accepted() {
        let body = serde_json::json!({
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "topology": null, "kvm_hyperv": false,
                     "max_phys_bits": 46, "affinity": null, "features": {"amx": false}},
            "memory": {"size": 67108864, "mergeable": false, "hotplug_method": "Acpi",
                       "hotplug_size": null, "hotplugged_size": null, "shared": true,
                       "hugepages": false, "hugepage_size": null, "prefault": false,
                       "zones": null, "thp": true},
            "payload": {"firmware": null, "kernel": "/k", "cmdline": null, "initramfs": null},
            "disks": [{"path": "/d", "readonly": false, "direct": false, "iommu": false,
                       "num_queues": 1, "queue_size": 128, "vhost_user": false,
                       "vhost_socket": null, "rate_limiter_config": null, "id": null,
                       "pci_segment": 0, "serial": null, "queue_affinity": null}],
            "net": null, "rng": {"src": "/dev/urandom", "iommu": false}, "balloon": null,
            "fs": null, "pmem": null,
            "serial": {"file": null, "mode": "Null", "iommu": false, "socket": null},
            "console": {"file": null, "mode": "Off", "iommu": false, "socket": null},
            "devices": null, "user_devices": null, "vdpa": null, "vsock": null,
            "iommu": false, "sgx_epc": null, "numa": null, "watchdog": false,
            "platform": null, "tpm": null
        });
        assert_eq!(
            crate::upstream_fields::unknown_members(&body).unwrap(),
            Vec::<String>::new()
        );
        let config: VmConfig = serde_json::from_value(body).unwrap();
        config.validate().unwrap();
        let printed = serde_json::to_value(&config).unwrap();
        assert!(printed["cpus"].get("topology").is_none());
        assert_eq!(printed["cpus"]["nested"], true);
        assert_eq!(printed["cpus"]["core_scheduling"], "Vm");
        assert_eq!(printed["memory"]["thp"], true);
        assert_eq!(printed["disks"][0]["sparse"], true);
        assert_eq!(printed["debug_console"]["mode"], "Off");
        assert!(printed.get("net").is_none());
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
