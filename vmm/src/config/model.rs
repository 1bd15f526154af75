//! The serde model of upstream's `VmConfig` with upstream's defaults.

use serde::{Deserialize, Serialize};
use serde_json::Value;

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

/// Every member is optional: a missing one takes upstream's default (`Default`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskConfig {
    /// Upstream's spec types `path` as a string: when absent it is left out, never `null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub readonly: bool,
    pub direct: bool,
    pub iommu: bool,
    pub num_queues: usize,
    pub queue_size: u16,
    pub vhost_user: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub pci_segment: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_affinity: Option<Vec<Value>>,
    pub backing_files: bool,
    pub sparse: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_granularity: Option<String>,
    /// Our extension (`transport=mmio`): the virtio transport of the disk. Absent means
    /// virtio-pci, upstream's only one; left out of the JSON when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<VirtioTransportKind>,
}

/// Which virtio transport a device sits on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtioTransportKind {
    /// A function on PCI segment 0 (the default, as upstream).
    #[default]
    Pci,
    /// A virtio-mmio slot announced on the kernel command line (`virtio_mmio.device=`).
    Mmio,
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
            transport: None,
        }
    }
}

/// Upstream's virtio-net defaults.
pub const DEFAULT_NET_IP: &str = "192.168.249.1";
pub const DEFAULT_NET_MASK: &str = "255.255.255.0";
pub const DEFAULT_NET_NUM_QUEUES: usize = 2;

/// Upstream's `--fs` defaults: one request queue of 1024 entries.
pub const DEFAULT_FS_NUM_QUEUES: usize = 1;
pub const DEFAULT_FS_QUEUE_SIZE: u16 = 1024;

fn default_fs_num_queues() -> usize {
    DEFAULT_FS_NUM_QUEUES
}

fn default_fs_queue_size() -> u16 {
    DEFAULT_FS_QUEUE_SIZE
}

/// `--fs tag=,socket=[,num_queues=,queue_size=,id=]` (upstream's `FsConfig`): a virtio-fs
/// device whose backend (virtiofsd) listens on `socket`. `num_queues` counts the request
/// queues; the device has one high-priority queue besides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    pub tag: String,
    pub socket: String,
    #[serde(default = "default_fs_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
}
pub const DEFAULT_NET_QUEUE_SIZE: u16 = 256;

/// Upstream's `NetConfig`: a virtio-net device on a tap (`tap=` by name, a new one when absent,
/// or `fd=` descriptors handed over).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    pub ip: String,
    pub mask: String,
    /// The guest's MAC; a random locally administered one when absent (filled in at parse and
    /// validation, so `vm.info` shows the one the guest got, as upstream).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    pub iommu: bool,
    pub num_queues: usize,
    pub queue_size: u16,
    pub vhost_user: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhost_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Tap descriptors handed over (`fd=3` or `fd=[3,4]`), one per queue pair.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fds: Option<Vec<i32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<Value>,
    pub pci_segment: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    pub offload_tso: bool,
    pub offload_ufo: bool,
    pub offload_csum: bool,
    /// Our extension (`transport=mmio`), as for disks; absent means virtio-pci.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<VirtioTransportKind>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            tap: None,
            ip: DEFAULT_NET_IP.to_owned(),
            mask: DEFAULT_NET_MASK.to_owned(),
            mac: None,
            host_mac: None,
            mtu: None,
            iommu: false,
            num_queues: DEFAULT_NET_NUM_QUEUES,
            queue_size: DEFAULT_NET_QUEUE_SIZE,
            vhost_user: false,
            vhost_socket: None,
            vhost_mode: None,
            id: None,
            fds: None,
            rate_limiter_config: None,
            pci_segment: 0,
            pci_device_id: None,
            offload_tso: true,
            offload_ufo: true,
            offload_csum: true,
            transport: None,
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

/// Upstream's `PlatformConfig` (`--platform`). Every member is optional: a missing one takes
/// upstream's default (`Default`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlatformConfig {
    pub num_pci_segments: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iommu_segments: Option<Vec<u16>>,
    pub iommu_address_width_bits: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_serial_number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oem_strings: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_manufacturer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_product_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_family: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_sku_number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chassis_asset_tag: Option<String>,
    /// Only in upstream builds with the `tdx` / `sev_snp` features: left out unless given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tdx: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sev_snp: Option<bool>,
    pub iommufd: bool,
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
    /// `swap-in=FILE`: bring the swapped-out VM back from this swap file, then resume it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<String>,
    /// `keep=on` (with `swap-in`): keep the swap file once the swap-in committed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
    /// `sparse=on` (with `create=on`): leave the new VM's RAM extent unallocated in a file region
    /// (normally it is allocated at create, so that a full file system is an error then and not
    /// a SIGBUS at the guest's first touch). For VMs larger than the backing can hold at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sparse: bool,
    /// `checkpoint_ms=N`: take an epoch checkpoint every N ms (0: off, the default), so the VM
    /// survives a failure without warning, losing at most one interval. `None`: not given (a
    /// recovery keeps the stored interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_ms: Option<u64>,
}

/// The longest checkpoint interval `checkpoint_ms` and `vm.nv-checkpoint` accept: one hour.
pub const MAX_CHECKPOINT_MS: u64 = 3_600_000;

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
    pub net: Option<Vec<NetConfig>>,
    #[serde(default)]
    pub rng: RngConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<Vec<FsConfig>>,
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
