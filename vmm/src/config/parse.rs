//! The command-line option strings (`--cpus boot=2`, `--disk path=..,readonly=on`): each option's
//! keys in one [`OptionSpec`] table, read by the shared `option_parser` crate into the structs of
//! [`super::model`]. Values the syntax allows but this VMM cannot honour are left for
//! [`VmConfig::validate`], which judges a `vm.create` body the same way.

use option_parser::{OptionSpec, ParsedOption, IMAGE_TYPES, LOCK_GRANULARITIES};

use super::model::*;
use super::validate::{unimplemented_device, zones_need_size_zero};
use super::{ConfigError, OptionError};

/// `value` spelled as upstream's JSON does when it is one of `words`, else as given.
fn canonical(value: String, words: &[(&str, &str)]) -> String {
    let lower = value.to_ascii_lowercase();
    words
        .iter()
        .find(|(word, _)| *word == lower)
        .map_or(value, |(_, member)| (*member).to_owned())
}

const CPUS_SPEC: OptionSpec = OptionSpec::keyed(
    "cpus",
    "boot max topology kvm_hyperv max_phys_bits features nested core_scheduling profile",
)
// Pinning: refused at any value, so its syntax is not parsed.
.refusing("affinity");

const CORE_SCHEDULING: &[(&str, CoreScheduling)] = &[
    ("vm", CoreScheduling::Vm),
    ("vcpu", CoreScheduling::Vcpu),
    ("off", CoreScheduling::Off),
];

impl CpusConfig {
    /// `--cpus boot=N[,max=M][,topology=T:C:D:P][,kvm_hyperv=on|off][,max_phys_bits=N]
    /// [,features=[amx]][,nested=on|off][,core_scheduling=vm|vcpu|off][,profile=host]`;
    /// `max` defaults to `boot`. What this VMM honours is checked by [`VmConfig::validate`].
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&CPUS_SPEC, input)?;
        let defaults = CpusConfig::default();
        let boot_vcpus = parsed.integer_or::<u8>("boot", 1)?;
        let mut features = CpuFeatures::default();
        for feature in parsed.list("features")?.unwrap_or_default() {
            match feature.as_str() {
                "amx" => features.amx = true,
                _ => {
                    return Err(parsed
                        .invalid(
                            "features",
                            &feature,
                            "the only CPU feature upstream knows is amx",
                        )
                        .into())
                }
            }
        }
        let profile = match parsed.string("profile") {
            Some(value) if value.eq_ignore_ascii_case(DEFAULT_CPU_PROFILE) => {
                DEFAULT_CPU_PROFILE.to_owned()
            }
            other => other.unwrap_or(defaults.profile),
        };
        Ok(CpusConfig {
            boot_vcpus,
            max_vcpus: parsed.integer_or::<u8>("max", boot_vcpus)?,
            topology: parsed.read("topology", |value| {
                parse_topology(value)
                    .ok_or("expected threads_per_core:cores_per_die:dies_per_package:packages")
            })?,
            kvm_hyperv: parsed.toggle_or("kvm_hyperv", defaults.kvm_hyperv)?,
            max_phys_bits: parsed.integer_or::<u8>("max_phys_bits", defaults.max_phys_bits)?,
            affinity: None,
            features,
            nested: parsed.toggle_or("nested", defaults.nested)?,
            core_scheduling: parsed
                .choice(
                    "core_scheduling",
                    CORE_SCHEDULING,
                    "expected vm, vcpu or off",
                )?
                .unwrap_or(defaults.core_scheduling),
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

const MEMORY_SPEC: OptionSpec = OptionSpec::keyed(
    "memory",
    "size shared hugepages prefault mergeable hugepage_size hotplug_method hotplug_size \
        hotplugged_size thp reserve",
);

const HOTPLUG_METHODS: &[(&str, HotplugMethod)] = &[
    ("acpi", HotplugMethod::Acpi),
    ("virtio-mem", HotplugMethod::VirtioMem),
    ("virtiomem", HotplugMethod::VirtioMem),
];

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
                let hotplug_method = parsed
                    .choice(
                        "hotplug_method",
                        HOTPLUG_METHODS,
                        "expected acpi or virtio-mem",
                    )?
                    .unwrap_or(defaults.hotplug_method);
                let toggle = |key, default| Ok::<_, ConfigError>(parsed.toggle_or(key, default)?);
                MemoryConfig {
                    size,
                    mergeable: toggle("mergeable", defaults.mergeable)?,
                    hotplug_method,
                    hotplug_size: parsed.byte_size("hotplug_size")?,
                    hotplugged_size: parsed.byte_size("hotplugged_size")?,
                    shared: toggle("shared", defaults.shared)?,
                    hugepages: toggle("hugepages", defaults.hugepages)?,
                    hugepage_size: parsed.byte_size("hugepage_size")?,
                    prefault: toggle("prefault", defaults.prefault)?,
                    reserve: toggle("reserve", defaults.reserve)?,
                    zones: None,
                    thp: toggle("thp", defaults.thp)?,
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
        Ok(memory)
    }
}

const MEMORY_ZONE_SPEC: OptionSpec = OptionSpec::keyed(
    "memory-zone",
    "id size file shared hugepages prefault hugepage_size host_numa_node hotplug_size \
        hotplugged_size mergeable reserve",
);

impl MemoryZoneConfig {
    /// `--memory-zone id=..,size=..[,file=..][,shared=on][,hugepages=on][,prefault=on]...`.
    ///
    /// As upstream, `file=` without `shared=on` is accepted: the file is then mapped privately and
    /// guest writes never reach it. Persistence therefore needs `shared=on`; the NV path checks it.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&MEMORY_ZONE_SPEC, input)?;
        let id = parsed.required_string("id")?;
        let size = parsed.byte_size("size")?.ok_or(OptionError::MissingKey {
            option: "memory-zone",
            key: "size",
        })?;
        let toggle = |key| Ok::<_, ConfigError>(parsed.toggle_or(key, false)?);
        Ok(MemoryZoneConfig {
            id,
            size,
            file: parsed.string("file"),
            mergeable: toggle("mergeable")?,
            shared: toggle("shared")?,
            hugepages: toggle("hugepages")?,
            hugepage_size: parsed.byte_size("hugepage_size")?,
            host_numa_node: parsed.integer::<u32>("host_numa_node")?,
            hotplug_size: parsed.byte_size("hotplug_size")?,
            hotplugged_size: parsed.byte_size("hotplugged_size")?,
            prefault: toggle("prefault")?,
            reserve: toggle("reserve")?,
        })
    }
}

const DISK_SPEC: OptionSpec = OptionSpec::keyed(
    "disk",
    "path readonly direct id iommu queue_size num_queues vhost_user socket rate_limit_group \
        pci_segment serial image_type sparse backing_files lock_granularity transport",
)
// Rate limiting and queue pinning: refused at any value, so their syntax is not parsed.
.refusing(
    "bw_size bw_one_time_burst bw_refill_time ops_size ops_one_time_burst ops_refill_time \
    queue_affinity",
);

impl DiskConfig {
    /// `--disk path=..[,readonly=on][,direct=on][,id=..]...`: a raw image behind virtio-blk.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&DISK_SPEC, input)?;
        let defaults = DiskConfig::default();
        let toggle = |key, default| Ok::<_, ConfigError>(parsed.toggle_or(key, default)?);
        Ok(DiskConfig {
            // A vhost-user disk has no image of its own: the backend at `socket=` has it.
            path: if parsed.toggle_or("vhost_user", false)? {
                parsed.string("path")
            } else {
                Some(parsed.required_string("path")?)
            },
            readonly: toggle("readonly", defaults.readonly)?,
            direct: toggle("direct", defaults.direct)?,
            iommu: toggle("iommu", defaults.iommu)?,
            num_queues: parsed.integer_or::<usize>("num_queues", defaults.num_queues)?,
            queue_size: parsed.integer_or::<u16>("queue_size", defaults.queue_size)?,
            vhost_user: toggle("vhost_user", defaults.vhost_user)?,
            vhost_socket: parsed.string("socket"),
            rate_limit_group: parsed.string("rate_limit_group"),
            id: parsed.string("id"),
            pci_segment: parsed.integer_or::<u16>("pci_segment", defaults.pci_segment)?,
            serial: parsed.string("serial"),
            backing_files: toggle("backing_files", defaults.backing_files)?,
            sparse: toggle("sparse", defaults.sparse)?,
            image_type: parsed
                .string("image_type")
                .map(|value| canonical(value, IMAGE_TYPES)),
            lock_granularity: parsed
                .string("lock_granularity")
                .map(|value| canonical(value, LOCK_GRANULARITIES)),
            transport: parsed.choice(
                "transport",
                &[
                    ("pci", VirtioTransportKind::Pci),
                    ("mmio", VirtioTransportKind::Mmio),
                ],
                "expected pci or mmio",
            )?,
            ..defaults
        })
    }
}

const FS_SPEC: OptionSpec =
    OptionSpec::keyed("fs", "tag socket num_queues queue_size id pci_segment");

impl FsConfig {
    /// `--fs tag=,socket=[,num_queues=,queue_size=,id=,pci_segment=]` as upstream; values are
    /// judged by [`VmConfig::validate`].
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&FS_SPEC, input)?;
        Ok(FsConfig {
            tag: parsed.required_string("tag")?,
            socket: parsed.required_string("socket")?,
            num_queues: parsed.integer_or("num_queues", DEFAULT_FS_NUM_QUEUES)?,
            queue_size: parsed.integer_or("queue_size", DEFAULT_FS_QUEUE_SIZE)?,
            id: parsed.string("id"),
            pci_segment: parsed.integer_or("pci_segment", 0)?,
            pci_device_id: None,
        })
    }
}

const NET_SPEC: OptionSpec = OptionSpec::keyed(
    "net",
    "tap ip mask mac host_mac mtu iommu num_queues queue_size id fd vhost_user socket \
        vhost_mode pci_segment offload_tso offload_ufo offload_csum transport",
)
.refusing("bw_size bw_one_time_burst bw_refill_time ops_size ops_one_time_burst ops_refill_time");

impl NetConfig {
    /// `--net tap=NAME,mac=,ip=,mask=,host_mac=,num_queues=,queue_size=,mtu=` or `fd=N`
    /// (`fd=[3,4]` for several queue pairs): a virtio-net device on a tap. Values are judged by
    /// [`VmConfig::validate`], for the command line and a `vm.create` body alike.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&NET_SPEC, input)?;
        let defaults = NetConfig::default();
        let toggle = |key, default| Ok::<_, ConfigError>(parsed.toggle_or(key, default)?);
        let fds = parsed
            .list("fd")?
            .map(|fds| {
                fds.iter()
                    .map(|fd| {
                        fd.parse::<i32>().ok().filter(|fd| *fd >= 0).ok_or_else(|| {
                            parsed.invalid("fd", fd, "expected a file descriptor number")
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        Ok(NetConfig {
            tap: parsed.string("tap"),
            ip: parsed.string("ip").unwrap_or(defaults.ip),
            mask: parsed.string("mask").unwrap_or(defaults.mask),
            mac: Some(parsed.string("mac").unwrap_or_else(random_mac)),
            host_mac: parsed.string("host_mac"),
            mtu: parsed.integer::<u16>("mtu")?,
            iommu: toggle("iommu", defaults.iommu)?,
            num_queues: parsed.integer_or::<usize>("num_queues", defaults.num_queues)?,
            queue_size: parsed.integer_or::<u16>("queue_size", defaults.queue_size)?,
            vhost_user: toggle("vhost_user", defaults.vhost_user)?,
            vhost_socket: parsed.string("socket"),
            vhost_mode: parsed
                .choice(
                    "vhost_mode",
                    &[("client", "Client"), ("server", "Server")],
                    "expected client or server",
                )?
                .map(str::to_owned),
            id: parsed.string("id"),
            fds,
            pci_segment: parsed.integer_or::<u16>("pci_segment", defaults.pci_segment)?,
            offload_tso: toggle("offload_tso", defaults.offload_tso)?,
            offload_ufo: toggle("offload_ufo", defaults.offload_ufo)?,
            offload_csum: toggle("offload_csum", defaults.offload_csum)?,
            transport: parsed.choice(
                "transport",
                &[
                    ("pci", VirtioTransportKind::Pci),
                    ("mmio", VirtioTransportKind::Mmio),
                ],
                "expected pci or mmio",
            )?,
            ..defaults
        })
    }
}

/// A random locally administered unicast MAC, as upstream gives a `--net` without `mac=`.
pub fn random_mac() -> String {
    let mut bytes = [0u8; 6];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        // No entropy yet: a fixed locally administered prefix still makes a valid address.
        bytes = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    }
    bytes[0] = (bytes[0] & 0xfe) | 0x02;
    format_mac(&bytes)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Reads `aa:bb:cc:dd:ee:ff` (six hexadecimal pairs).
pub fn parse_mac(value: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = value.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

const RNG_SPEC: OptionSpec = OptionSpec::keyed("rng", "src iommu");

impl RngConfig {
    /// `--rng src=PATH[,iommu=on|off]`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&RNG_SPEC, input)?;
        let defaults = RngConfig::default();
        Ok(RngConfig {
            src: parsed.string("src").unwrap_or(defaults.src),
            iommu: parsed.toggle_or("iommu", defaults.iommu)?,
        })
    }
}

const PLATFORM_SPEC: OptionSpec = OptionSpec::keyed(
    "platform",
    "num_pci_segments iommu_segments iommu_address_width serial_number uuid oem_strings \
        manufacturer product_name version family sku_number chassis_asset_tag tdx sev_snp iommufd \
        vfio_p2p_dma",
);

impl PlatformConfig {
    /// `--platform num_pci_segments=N[,iommu_segments=[..]][,serial_number=..][,uuid=..]...`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&PLATFORM_SPEC, input)?;
        let defaults = PlatformConfig::default();
        let iommu_segments = match parsed.list("iommu_segments")? {
            None => None,
            Some(items) => Some(
                items
                    .into_iter()
                    .map(|item| {
                        item.parse::<u16>().map_err(|_| {
                            parsed.invalid(
                                "iommu_segments",
                                &item,
                                "expected a list of PCI segment numbers, e.g. [0,1]",
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(PlatformConfig {
            num_pci_segments: parsed
                .integer_or::<u16>("num_pci_segments", defaults.num_pci_segments)?,
            iommu_segments,
            iommu_address_width_bits: parsed
                .integer_or::<u8>("iommu_address_width", defaults.iommu_address_width_bits)?,
            system_serial_number: parsed.string("serial_number"),
            system_uuid: parsed.string("uuid"),
            oem_strings: parsed.list("oem_strings")?,
            system_manufacturer: parsed.string("manufacturer"),
            system_product_name: parsed.string("product_name"),
            system_version: parsed.string("version"),
            system_family: parsed.string("family"),
            system_sku_number: parsed.string("sku_number"),
            chassis_asset_tag: parsed.string("chassis_asset_tag"),
            tdx: parsed.toggle("tdx")?,
            sev_snp: parsed.toggle("sev_snp")?,
            iommufd: parsed.toggle_or("iommufd", defaults.iommufd)?,
            vfio_p2p_dma: parsed.toggle_or("vfio_p2p_dma", defaults.vfio_p2p_dma)?,
            ..defaults
        })
    }
}

/// The words of `--serial` and `--console`. `socket=` is upstream's too, but no device here
/// serves a socket yet, so it is refused rather than ignored.
const fn console_spec(option: &'static str) -> OptionSpec {
    OptionSpec {
        option,
        flags: "off null pty tty",
        values: "file",
        unsupported: "socket iommu tcp",
    }
}

impl ConsoleConfig {
    /// `--serial off|null|pty|tty|file=PATH`.
    pub fn parse_serial(input: &str) -> Result<Self, ConfigError> {
        Self::parse_with(&console_spec("serial"), input)
    }

    /// `--console off|null|pty|tty|file=PATH`.
    pub fn parse_console(input: &str) -> Result<Self, ConfigError> {
        Self::parse_with(&console_spec("console"), input)
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
            file: parsed.string("file"),
            iommu: false,
            socket: None,
        })
    }
}

/// `--api-socket` and `--event-monitor`: `path=` or `fd=`.
const fn path_or_fd_spec(option: &'static str) -> OptionSpec {
    OptionSpec::keyed(option, "path fd")
}

/// Exactly one of `path=` and `fd=` (a file descriptor the parent process left open for us).
fn parse_path_or_fd(parsed: &ParsedOption) -> Result<Option<Result<String, i32>>, ConfigError> {
    let fd = parsed.read("fd", |value| match value.parse::<i32>() {
        Ok(fd) if fd < 0 => Err("a file descriptor is not negative".to_owned()),
        Ok(fd) => Ok(fd),
        Err(_) => Err(format!(
            "expected an integer that fits {}",
            std::any::type_name::<i32>()
        )),
    })?;
    match (parsed.string("path"), fd) {
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
        let missing = ConfigError::from(OptionError::MissingKey {
            option: "api-socket",
            key: "path",
        });
        if !keyed {
            if input.is_empty() {
                return Err(missing);
            }
            return Ok(ApiSocketConfig::Path(input.to_owned()));
        }
        let parsed = ParsedOption::parse(&path_or_fd_spec("api-socket"), input)?;
        match parse_path_or_fd(&parsed)? {
            Some(Ok(path)) => Ok(ApiSocketConfig::Path(path)),
            Some(Err(fd)) => Ok(ApiSocketConfig::Fd(fd)),
            None => Err(missing),
        }
    }
}

impl EventMonitorConfig {
    /// `--event-monitor path=PATH` or `fd=N`. Unlike `--api-socket`, upstream takes no bare path.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&path_or_fd_spec("event-monitor"), input)?;
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

const RESTORE_SPEC: OptionSpec =
    OptionSpec::keyed("restore", "source_url prefault resume memory_restore_mode")
        .refusing("net_fds");

const MEMORY_RESTORE_MODES: &[(&str, MemoryRestoreMode)] = &[
    ("copy", MemoryRestoreMode::Copy),
    ("ondemand", MemoryRestoreMode::OnDemand),
];

impl RestoreConfig {
    /// `--restore source_url=file:///dir[,resume=true][,prefault=on][,memory_restore_mode=copy|ondemand]`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&RESTORE_SPEC, input)?;
        let source_url = parsed.required_string("source_url")?;
        if snapshot_url_dir(&source_url).is_none() {
            return Err(parsed
                .invalid("source_url", &source_url, SNAPSHOT_URL_EXPECTED)
                .into());
        }
        Ok(RestoreConfig {
            source_url,
            prefault: parsed.toggle_or("prefault", false)?,
            resume: parsed.toggle_or("resume", false)?,
            memory_restore_mode: parsed
                .choice(
                    "memory_restore_mode",
                    MEMORY_RESTORE_MODES,
                    "expected copy or ondemand",
                )?
                .unwrap_or_default(),
        })
    }

    /// The snapshot directory named by `source_url`; `None` when it is not `file:///absolute`.
    pub fn source_dir(&self) -> Option<&str> {
        snapshot_url_dir(&self.source_url)
    }
}

/// What a snapshot URL must look like, for the reason a refusal gives.
pub const SNAPSHOT_URL_EXPECTED: &str = "expected file:///absolute/directory";

/// The directory a snapshot URL (`source_url`, `destination_url`) names: the one check for the
/// command line, the API and the snapshot code. Only `file:///absolute/dir` names one.
pub fn snapshot_url_dir(url: &str) -> Option<&str> {
    url.strip_prefix("file://")
        .filter(|path| path.starts_with('/'))
}

/// What a swap file URL must look like, for the reason a refusal gives.
pub const SWAP_URL_EXPECTED: &str = "expected file:///absolute/path/of/the/swap/file";

/// The swap file a swap URL (`destination_url`, `source_url`) names: `file:///absolute/path`,
/// not ending in `/`.
pub fn swap_file_url_path(url: &str) -> Option<&str> {
    snapshot_url_dir(url).filter(|path| !path.ends_with('/'))
}

const NV_SPEC: OptionSpec = OptionSpec::keyed(
    "nv",
    "region vm create recover force-cold format region_size deadline_ms swap-in keep sparse \
     checkpoint_ms",
);

impl NvConfig {
    /// `--nv region=PATH,vm=NAME[,create=on][,recover=on][,force-cold=on][,format=on]
    /// [,region_size=SIZE][,deadline_ms=N][,swap-in=FILE[,keep=on]][,sparse=on]
    /// [,checkpoint_ms=N]`. The values are judged by [`VmConfig::validate`], for
    /// the command line and a `vm.create` body alike.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let parsed = ParsedOption::parse(&NV_SPEC, input)?;
        let toggle = |key| Ok::<_, ConfigError>(parsed.toggle_or(key, false)?);
        Ok(NvConfig {
            region: parsed.required_string("region")?,
            vm: parsed.required_string("vm")?,
            create: toggle("create")?,
            recover: toggle("recover")?,
            force_cold: toggle("force-cold")?,
            format: toggle("format")?,
            region_size: parsed.byte_size("region_size")?,
            deadline_ms: parsed.integer_or::<u64>("deadline_ms", default_deadline_ms())?,
            swap_in: parsed.string("swap-in"),
            keep: toggle("keep")?,
            sparse: toggle("sparse")?,
            checkpoint_ms: parsed.integer::<u64>("checkpoint_ms")?,
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
    pub fs: Vec<&'a str>,
    pub rng: Option<&'a str>,
    pub serial: Option<&'a str>,
    pub console: Option<&'a str>,
    pub pvpanic: bool,
    pub platform: Option<&'a str>,
    pub nv: Option<&'a str>,
    /// Upstream device options this VMM has no device for, as given (`("fs", "tag=t,...")`,
    /// `("watchdog", "on")`): refused by name, by the rule that refuses their `vm.create` members.
    pub devices: Vec<(&'static str, &'a str)>,
}

impl VmConfig {
    /// Builds the VM the command line describes: `None` when it names neither a kernel nor an
    /// NV VM (the VMM then waits for `vm.create` on its API socket, as upstream does).
    pub fn from_options(options: &VmOptionStrings) -> Result<Option<Self>, ConfigError> {
        // Checked before anything else so that no combination lets a device request slip by.
        if let Some((option, value)) = options.devices.first() {
            return Err(unimplemented_device(option, value));
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
        let net = options
            .net
            .iter()
            .filter(|net| !net.trim().is_empty())
            .map(|net| NetConfig::parse(net))
            .collect::<Result<Vec<_>, _>>()?;
        let fs = options
            .fs
            .iter()
            .map(|fs| FsConfig::parse(fs))
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
            net: (!net.is_empty()).then_some(net),
            fs: (!fs.is_empty()).then_some(fs),
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
}
