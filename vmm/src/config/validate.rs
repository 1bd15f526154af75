//! What this VMM can honour: the one judge of a [`VmConfig`], whether it came from the command
//! line, a `vm.create` body or a snapshot's `config.json`.

use devices::virtio::{VhostUserMode, VHOST_USER_NET_MAX_QUEUE_PAIRS};
use serde_json::Value;

use super::model::*;
use super::{ConfigError, OptionError};

/// Guest RAM is mapped in whole pages; a size that is not a multiple of this is refused up front
/// instead of failing later inside KVM.
pub(super) const GUEST_PAGE_SIZE: u64 = 4096;

/// Upstream: `--memory-zone` "must be used with `--memory size=0`, clearly indicating that the
/// memory will be described through advanced parameters".
pub(super) fn zones_need_size_zero() -> ConfigError {
    ConfigError::Invalid {
        option: "memory-zone",
        reason: "zones need --memory size=0: all guest RAM is then described by the zones"
            .to_owned(),
    }
}

/// The largest virtio-net queue this VMM offers.
pub const MAX_NET_QUEUE_SIZE: u16 = 4096;

/// Upstream's devices (and device-like members) this VMM does not have, and why: one table for
/// the command-line options and the `VmConfig` members of the same name (see `member_name`).
const NO_DEVICE: &[(&str, &str)] = &[
    ("rate-limit-group", "I/O rate limiting is not implemented"),
    (
        "generic-vhost-user",
        "vhost-user devices are not implemented",
    ),
    ("pmem", "virtio-pmem is not implemented"),
    ("device", "VFIO passthrough is not implemented"),
    ("user-device", "vfio-user devices are not implemented"),
    ("vdpa", "vDPA devices are not implemented"),
    ("sgx-epc", "SGX is not implemented"),
    ("numa", "guest NUMA nodes are not implemented"),
    ("pci-segment", "there is only PCI segment 0"),
    ("balloon", "virtio-balloon is not implemented"),
    ("vsock", "virtio-vsock is not implemented"),
    ("rtc", "there is no virtio RTC device"),
    ("tpm", "TPM emulation is not implemented"),
    ("iommu", "there is no virtual IOMMU"),
    ("watchdog", "there is no watchdog device"),
    ("landlock", "Landlock sandboxing is not implemented"),
];

/// The refusal of `--OPTION VALUE` (or its `VmConfig` member) for a device this VMM does not
/// have: the same message on the command line and from `vm.create`.
pub fn unimplemented_device(option: &'static str, value: &str) -> ConfigError {
    let reason = NO_DEVICE
        .iter()
        .find(|(name, _)| *name == option)
        .map_or("this VMM has no such device", |(_, reason)| reason);
    not_supported(option, "", member_name(option), value.to_owned(), reason)
}

impl VmConfig {
    /// Whether this VMM can run the config as it is written: the one check for the command line,
    /// a `vm.create` body and a snapshot's `config.json`, so that what `vm.create` accepts
    /// `vm.boot` does not refuse later. Upstream members this VMM does not implement pass at
    /// their default values and are refused, by name, at any other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_cpus()?;
        self.validate_memory()?;
        self.validate_payload()?;
        self.validate_disks()?;
        self.validate_net()?;
        self.validate_fs()?;
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
            return Err(ConfigError::from(OptionError::InvalidValue {
                option: "cpus",
                key: "boot".to_owned(),
                value: "0".to_owned(),
                reason: "at least one vCPU is needed".to_owned(),
            }));
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
        if is_set(&cpus.affinity) {
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
        if zones.is_empty() && memory.size == 0 {
            return Err(ConfigError::Invalid {
                option: "memory",
                reason: "size=0 needs at least one --memory-zone to hold the guest RAM".to_owned(),
            });
        }
        if !memory.size.is_multiple_of(GUEST_PAGE_SIZE) {
            return Err(ConfigError::from(OptionError::InvalidValue {
                option: "memory",
                key: "size".to_owned(),
                value: memory.size.to_string(),
                reason: format!("must be a multiple of {GUEST_PAGE_SIZE} bytes"),
            }));
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
        if memory.hotplug_method != HotplugMethod::Acpi && memory.hotplug_size.is_some() {
            return refuse(
                "hotplug_method",
                "virtio-mem".into(),
                "memory hotplug is not implemented",
            );
        }
        if let Some((key, value, reason)) = unsupported_ram(
            memory.mergeable,
            memory.hugepages,
            memory.hugepage_size,
            memory.hotplug_size,
            memory.hotplugged_size,
            memory.reserve,
        ) {
            return refuse(key, value, reason);
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
                return Err(ConfigError::from(OptionError::InvalidValue {
                    option: "memory-zone",
                    key: "id".to_owned(),
                    value: zone.id.clone(),
                    reason: "used by more than one zone".to_owned(),
                }));
            }
            if zone.size == 0 || !zone.size.is_multiple_of(GUEST_PAGE_SIZE) {
                return Err(ConfigError::from(OptionError::InvalidValue {
                    option: "memory-zone",
                    key: "size".to_owned(),
                    value: zone.size.to_string(),
                    reason: format!(
                        "zone {}: a zone needs a non-zero multiple of {GUEST_PAGE_SIZE} bytes",
                        zone.id
                    ),
                }));
            }
            if let Some(node) = zone.host_numa_node {
                return refuse(
                    "host_numa_node",
                    node.to_string(),
                    "no NUMA memory policy is applied",
                );
            }
            if let Some((key, value, reason)) = unsupported_ram(
                zone.mergeable,
                zone.hugepages,
                zone.hugepage_size,
                zone.hotplug_size,
                zone.hotplugged_size,
                zone.reserve,
            ) {
                return refuse(key, value, reason);
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

    /// `--net`: what the tap and the virtio-net device can be built from. The tap itself (does
    /// it exist, may we create it, is `fd=` a tap) is checked when the device is built.
    fn validate_net(&self) -> Result<(), ConfigError> {
        let nets = self.net.as_deref().unwrap_or_default();
        for (index, net) in nets.iter().enumerate() {
            let member = |key: &str| format!("net[{index}].{key}");
            let invalid = |reason: String| {
                Err(ConfigError::Invalid {
                    option: "net",
                    reason,
                })
            };
            let refuse = |key: &'static str, value: String, reason: &str| {
                Err(not_supported("net", key, member(key), value, reason))
            };
            for (key, value) in [("mac", &net.mac), ("host_mac", &net.host_mac)] {
                if let Some(mac) = value {
                    match super::parse::parse_mac(mac) {
                        None => {
                            return invalid(format!(
                                "invalid {key} \"{mac}\": expected six hexadecimal byte pairs, \
                                 aa:bb:cc:dd:ee:ff"
                            ))
                        }
                        Some(bytes) if bytes[0] & 1 != 0 => {
                            return invalid(format!(
                                "invalid {key} \"{mac}\": a multicast address cannot be a \
                                 device's address"
                            ))
                        }
                        Some(_) => {}
                    }
                }
            }
            for (key, value) in [("ip", &net.ip), ("mask", &net.mask)] {
                if value.parse::<std::net::Ipv4Addr>().is_err() {
                    if value.parse::<std::net::Ipv6Addr>().is_ok() {
                        return refuse(key, value.clone(), "only IPv4 tap addresses are set");
                    }
                    return invalid(format!(
                        "invalid {key} \"{value}\": expected an IPv4 address"
                    ));
                }
            }
            if net.num_queues < 2 || net.num_queues % 2 != 0 {
                return invalid(format!(
                    "num_queues={} is not valid: virtio-net queues come in receive/transmit \
                     pairs, so an even number of at least 2 is needed",
                    net.num_queues
                ));
            }
            if !net.queue_size.is_power_of_two()
                || net.queue_size < 2
                || net.queue_size > MAX_NET_QUEUE_SIZE
            {
                return invalid(format!(
                    "queue_size={} is not valid: a power of two from 2 to {MAX_NET_QUEUE_SIZE} \
                     is needed",
                    net.queue_size
                ));
            }
            if let Some(mtu) = net.mtu.filter(|mtu| *mtu < 68) {
                return invalid(format!("mtu={mtu} is below IPv4's minimum of 68"));
            }
            if let Some(fds) = &net.fds {
                if net.tap.is_some() {
                    return invalid("tap= and fd= name two taps; give one".to_owned());
                }
                if fds.len() != net.num_queues / 2 {
                    return invalid(format!(
                        "{} tap descriptor(s) for num_queues={}: one per queue pair is needed",
                        fds.len(),
                        net.num_queues
                    ));
                }
            }
            validate_vhost_user_net(net, &nets[..index])?;
            if net.iommu {
                return refuse("iommu", "on".into(), "there is no virtual IOMMU");
            }
            if net.pci_segment != 0 {
                return refuse(
                    "pci_segment",
                    net.pci_segment.to_string(),
                    "there is only PCI segment 0",
                );
            }
            if let Some(id) = net.pci_device_id {
                return refuse(
                    "pci_device_id",
                    id.to_string(),
                    "PCI slots are assigned in order",
                );
            }
            if net
                .rate_limiter_config
                .as_ref()
                .is_some_and(|v| !is_empty_json(v))
            {
                return refuse(
                    "rate_limiter_config",
                    "set".into(),
                    "I/O rate limiting is not implemented",
                );
            }
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
            if disk.vhost_user || disk.vhost_socket.is_some() {
                validate_vhost_user_disk(index, disk, earlier)?;
            } else if disk.path.is_none() {
                return Err(ConfigError::from(OptionError::MissingKey {
                    option: "disk",
                    key: "path",
                }));
            }
            if disk.direct {
                // Silently opening the image buffered would break what the operator asked for
                // (no host page cache); refuse until O_DIRECT with aligned bounce buffers exists.
                return Err(ConfigError::from(OptionError::InvalidValue {
                    option: "disk",
                    key: "direct".to_owned(),
                    value: "on".to_owned(),
                    reason: "O_DIRECT images are not implemented; images are opened buffered and \
                             a guest FLUSH is an fdatasync"
                        .to_owned(),
                }));
            }
            if disk.iommu {
                return refuse("iommu", "on".into(), "there is no virtual IOMMU");
            }
            if disk.num_queues != DEFAULT_DISK_NUM_QUEUES && !disk.vhost_user {
                return refuse(
                    "num_queues",
                    disk.num_queues.to_string(),
                    "the virtio-blk device has one request queue",
                );
            }
            if disk.queue_size != DEFAULT_DISK_QUEUE_SIZE
                && disk.queue_size != devices::virtio::BLOCK_QUEUE_SIZE
                && !disk.vhost_user
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
                    "there is only PCI segment 0",
                );
            }
            if let Some(id) = disk.pci_device_id {
                return refuse(
                    "pci_device_id",
                    id.to_string(),
                    "PCI slots are assigned in order",
                );
            }
            if let Some(serial) = &disk.serial {
                return refuse(
                    "serial",
                    serial.clone(),
                    "the guest reads a disk ID derived from the image, not a configured serial",
                );
            }
            if is_set(&disk.queue_affinity) {
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
                return Err(ConfigError::from(OptionError::InvalidValue {
                    option: "disk",
                    key: "path".to_owned(),
                    value: disk.path.clone().unwrap_or_default(),
                    reason: "the same image is given twice".to_owned(),
                }));
            }
            if disk.id.is_some() && earlier.iter().any(|other| other.id == disk.id) {
                return Err(ConfigError::from(OptionError::InvalidValue {
                    option: "disk",
                    key: "id".to_owned(),
                    value: disk.id.clone().unwrap_or_default(),
                    reason: "used by more than one disk".to_owned(),
                }));
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
                return Err(ConfigError::from(OptionError::MissingKey {
                    option,
                    key: "file",
                }));
            }
            if console.mode == ConsoleOutputMode::Socket || console.socket.is_some() {
                return Err(not_supported(
                    option,
                    "socket",
                    format!("{option}.socket"),
                    console.socket.clone().unwrap_or_default(),
                    "no device here serves a socket; use off, null, pty, tty or file=",
                ));
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
        let lists = [
            ("rate-limit-group", &self.rate_limit_groups),
            ("generic-vhost-user", &self.generic_vhost_user),
            ("pmem", &self.pmem),
            ("device", &self.devices),
            ("user-device", &self.user_devices),
            ("vdpa", &self.vdpa),
            ("sgx-epc", &self.sgx_epc),
            ("numa", &self.numa),
            ("pci-segment", &self.pci_segments),
        ];
        for (option, list) in lists {
            if let Some(first) = list.as_deref().and_then(<[Value]>::first) {
                return Err(unimplemented_device(option, &first.to_string()));
            }
        }
        let singles = [
            ("balloon", &self.balloon),
            ("vsock", &self.vsock),
            ("rtc", &self.rtc),
            ("tpm", &self.tpm),
        ];
        for (option, value) in singles {
            if let Some(value) = value.as_ref().filter(|value| !is_empty_json(value)) {
                return Err(unimplemented_device(option, &value.to_string()));
            }
        }
        // Any source is accepted here; the device opens it at start-up and a source that
        // cannot be read fails there, naming it.
        if self.rng.iommu {
            return Err(not_supported(
                "rng",
                "iommu",
                "rng.iommu".into(),
                "on".into(),
                "there is no virtual IOMMU",
            ));
        }
        let flags = [
            ("iommu", self.iommu),
            ("watchdog", self.watchdog),
            ("landlock", self.landlock_enable),
        ];
        if let Some((option, _)) = flags.into_iter().find(|(_, set)| *set) {
            return Err(unimplemented_device(option, "on"));
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
                "there is only PCI segment 0; only upstream's default 1 is accepted",
            );
        }
        if is_set(&platform.iommu_segments) {
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
        if is_set(&platform.oem_strings) {
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

    /// What a VM with checkpoints cannot keep consistent with a rollback, refused: a
    /// vhost-user-net backend ([`Self::validate_checkpointed_nets`]) and a virtio-fs backend,
    /// whose file writes virtiofsd makes where the VMM cannot undo them.
    pub fn validate_checkpointed_devices(&self) -> Result<(), ConfigError> {
        self.validate_checkpointed_nets()?;
        let Some((index, fs)) = self.fs.iter().flatten().enumerate().next() else {
            return Ok(());
        };
        let id = fs.id.clone().unwrap_or_else(|| format!("_fs{index}"));
        Err(ConfigError::Invalid {
            option: "nv",
            reason: format!(
                "checkpoint_ms: fs {id} is a virtio-fs device, whose backend (virtiofsd) writes                  the shared directory itself: those writes cannot be undone on a rollback. Leave                  checkpoints off for a VM with --fs"
            ),
        })
    }

    /// A VM with checkpoints holds what its guest transmits until the epoch that produced it
    /// committed (output commit, `docs/checkpoints.md`); a vhost-user-net backend moves the
    /// frames itself, out of the VMM's reach, so it cannot be held. Checked for `checkpoint_ms`
    /// (here, for the command line, `vm.create` and a hotplug) and for `vm.nv-checkpoint`.
    pub fn validate_checkpointed_nets(&self) -> Result<(), ConfigError> {
        let Some((index, net)) = self
            .net
            .iter()
            .flatten()
            .enumerate()
            .find(|(_, net)| net.vhost_user)
        else {
            return Ok(());
        };
        let id = net.id.clone().unwrap_or_else(|| format!("_net{index}"));
        Err(ConfigError::Invalid {
            option: "nv",
            reason: format!(
                "checkpoint_ms: net {id} is a vhost-user device, whose backend sends the guest's \
                 frames itself: they cannot be held until the checkpoint that produced them \
                 commits (output commit). Use an in-process virtio-net device (tap= or fd=) or \
                 leave checkpoints off"
            ),
        })
    }

    fn validate_nv(&self) -> Result<(), ConfigError> {
        let Some(nv) = &self.nv else {
            return Ok(());
        };
        let invalid = |key: &str, value: &str, reason: &str| {
            Err(ConfigError::from(OptionError::InvalidValue {
                option: "nv",
                key: key.to_owned(),
                value: value.to_owned(),
                reason: reason.to_owned(),
            }))
        };
        for (key, value) in [("region", &nv.region), ("vm", &nv.vm)] {
            if value.is_empty() {
                return invalid(key, value, "must not be empty");
            }
        }
        // The name is stored in the region's directory and shown by `nv-persist list`: keep it
        // printable and free of separators that would make it ambiguous there.
        if !nv
            .vm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return invalid("vm", &nv.vm, "use letters, digits, '-', '_' and '.' only");
        }
        match nv.region_size {
            Some(0) => {
                return invalid(
                    "region_size",
                    "0",
                    "a region needs room for at least its header",
                )
            }
            Some(size) if !size.is_multiple_of(GUEST_PAGE_SIZE) => {
                return invalid(
                    "region_size",
                    &size.to_string(),
                    &format!("must be a multiple of {GUEST_PAGE_SIZE} bytes"),
                )
            }
            _ => {}
        }
        if nv.deadline_ms == 0 {
            return invalid(
                "deadline_ms",
                "0",
                "the power-fail save needs a budget of at least 1 ms",
            );
        }
        if let Some(interval) = nv.checkpoint_ms.filter(|ms| *ms > MAX_CHECKPOINT_MS) {
            return invalid(
                "checkpoint_ms",
                &interval.to_string(),
                &format!(
                    "the interval is at most {MAX_CHECKPOINT_MS} ms (0 turns checkpoints off)"
                ),
            );
        }
        if nv.checkpoint_ms.is_some_and(|ms| ms > 0) {
            self.validate_checkpointed_devices()?;
            // Checkpoints undo disk writes made after an epoch; a vhost-user backend writes
            // where the VMM cannot see it first.
            if let Some(disk) = self.disks.iter().flatten().find(|d| d.vhost_user) {
                return Err(ConfigError::Invalid {
                    option: "nv",
                    reason: format!(
                        "checkpoint_ms needs every disk's writes to pass through the VMM (to undo \
                         them on a rollback); disk {} is vhost-user",
                        disk.id
                            .as_deref()
                            .or(disk.vhost_socket.as_deref())
                            .unwrap_or("?")
                    ),
                });
            }
        }
        if nv.sparse && !nv.create {
            return Err(ConfigError::Invalid {
                option: "nv",
                reason: "sparse=on only applies with create=on".to_owned(),
            });
        }
        if nv.force_cold && !nv.recover {
            return Err(ConfigError::Invalid {
                option: "nv",
                reason: "force-cold=on only applies with recover=on".to_owned(),
            });
        }
        match &nv.swap_in {
            Some(file) if file.is_empty() => {
                return invalid(
                    "swap-in",
                    file,
                    "name the swap file to bring the VM back from",
                )
            }
            Some(_) if nv.create || nv.recover || nv.force_cold || nv.format => {
                return Err(ConfigError::Invalid {
                    option: "nv",
                    reason: "swap-in=FILE brings the VM back from its swap file and resumes it: \
                             do not combine it with create=on, recover=on, force-cold=on or \
                             format=on"
                        .to_owned(),
                });
            }
            None if nv.keep => {
                return Err(ConfigError::Invalid {
                    option: "nv",
                    reason: "keep=on only applies with swap-in=FILE".to_owned(),
                });
            }
            _ => {}
        }
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
                return Err(ConfigError::from(OptionError::InvalidValue {
                    option: "nv",
                    key: "region_size".to_owned(),
                    value: region_size.to_string(),
                    reason: format!(
                        "cannot hold the VM: its metadata, {} MiB of RAM and saved-state slots \
                         need at least {needed} bytes ({} MiB)",
                        ram >> 20,
                        needed.div_ceil(1 << 20)
                    ),
                }));
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

/// What `--memory` and each `--memory-zone` share and this VMM does not do (KSM, hugetlbfs
/// pages, hotplug, reserving): the first one asked for, as (key, value, reason).
fn unsupported_ram(
    mergeable: bool,
    hugepages: bool,
    hugepage_size: Option<u64>,
    hotplug_size: Option<u64>,
    hotplugged_size: Option<u64>,
    reserve: bool,
) -> Option<(&'static str, String, &'static str)> {
    let on = |set: bool| set.then(|| "on".to_owned());
    let hotplug = |size: Option<u64>| size.filter(|size| *size > 0).map(|size| size.to_string());
    let hotplug_reason = "memory hotplug is not implemented";
    [
        (
            "mergeable",
            on(mergeable),
            "guest RAM is not offered to KSM",
        ),
        ("hugepages", on(hugepages), HUGEPAGES_REASON),
        (
            "hugepage_size",
            hugepage_size.map(|size| size.to_string()),
            HUGEPAGES_REASON,
        ),
        ("hotplug_size", hotplug(hotplug_size), hotplug_reason),
        ("hotplugged_size", hotplug(hotplugged_size), hotplug_reason),
        ("reserve", on(reserve), "guest RAM is not reserved up front"),
    ]
    .into_iter()
    .find_map(|(key, value, reason)| Some((key, value?, reason)))
}

/// A list member that asks for something: given and not empty.
fn is_set<T>(list: &Option<Vec<T>>) -> bool {
    list.as_ref().is_some_and(|list| !list.is_empty())
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

/// `--net vhost_user=true,socket=PATH[,vhost_mode=client|server]` as upstream: the backend at
/// the socket owns the network side, so a tap is refused; up to
/// [`VHOST_USER_NET_MAX_QUEUE_PAIRS`] queue pairs (the control queue of several is the VMM's).
fn validate_vhost_user_net(net: &NetConfig, earlier: &[NetConfig]) -> Result<(), ConfigError> {
    let invalid = |key: &str, value: String, reason: &str| {
        Err(ConfigError::from(OptionError::InvalidValue {
            option: "net",
            key: key.to_owned(),
            value,
            reason: reason.to_owned(),
        }))
    };
    if let Some(mode) = &net.vhost_mode {
        if vhost_user_mode(Some(mode)).is_none() {
            return invalid(
                "vhost_mode",
                mode.clone(),
                "expected client or server (Client or Server in JSON)",
            );
        }
    }
    if !net.vhost_user {
        return match &net.vhost_socket {
            Some(socket) => invalid(
                "socket",
                socket.clone(),
                "a socket is for a vhost-user device: add vhost_user=true",
            ),
            None => Ok(()),
        };
    }
    let Some(socket) = &net.vhost_socket else {
        return Err(ConfigError::from(OptionError::MissingKey {
            option: "net",
            key: "socket",
        }));
    };
    if let Some(tap) = &net.tap {
        return invalid(
            "tap",
            tap.clone(),
            "a vhost-user net device's network is the backend's: give socket= only",
        );
    }
    if net.fds.is_some() {
        return invalid(
            "fd",
            "given".into(),
            "a vhost-user net device's network is the backend's: give socket= only",
        );
    }
    if net.transport == Some(VirtioTransportKind::Mmio) {
        return invalid(
            "transport",
            "mmio".into(),
            "vhost-user net devices are on virtio-pci",
        );
    }
    // Odd and zero counts were refused with the tap's rule (receive/transmit pairs).
    if net.num_queues > 2 * VHOST_USER_NET_MAX_QUEUE_PAIRS {
        return invalid(
            "num_queues",
            net.num_queues.to_string(),
            &format!(
                "a vhost-user net device has at most {VHOST_USER_NET_MAX_QUEUE_PAIRS} queue pairs \
                 ({} queues)",
                2 * VHOST_USER_NET_MAX_QUEUE_PAIRS
            ),
        );
    }
    if earlier
        .iter()
        .any(|other| other.vhost_user && other.vhost_socket.as_ref() == Some(socket))
    {
        return invalid(
            "socket",
            socket.clone(),
            "the same vhost-user socket is given twice",
        );
    }
    Ok(())
}

/// How the VMM reaches a vhost-user backend, from a config's `vhost_mode`: "Client" (the
/// default) or "Server"; `None` for anything else.
pub fn vhost_user_mode(mode: Option<&str>) -> Option<VhostUserMode> {
    match mode {
        None | Some("Client") => Some(VhostUserMode::Client),
        Some("Server") => Some(VhostUserMode::Server),
        Some(_) => None,
    }
}

impl VmConfig {
    /// Each `--fs`: a tag the device's configuration space holds, upstream's queue rules, one
    /// device per socket, and RAM the backend can map (upstream's rule: vhost-user needs shared
    /// memory; an NV VM's RAM is a shared mapping).
    fn validate_fs(&self) -> Result<(), ConfigError> {
        let all = self.fs.as_deref().unwrap_or_default();
        for (index, fs) in all.iter().enumerate() {
            let invalid = |key: &str, value: String, reason: String| {
                Err(ConfigError::from(OptionError::InvalidValue {
                    option: "fs",
                    key: key.to_owned(),
                    value,
                    reason,
                }))
            };
            let unsupported = |key: &'static str, value: String, reason: String| {
                Err(not_supported(
                    "fs",
                    key,
                    format!("fs[{index}].{key}"),
                    value,
                    &reason,
                ))
            };
            let tag_len = devices::virtio::VIRTIO_FS_TAG_LEN;
            if fs.tag.is_empty() || fs.tag.len() > tag_len {
                return invalid(
                    "tag",
                    fs.tag.clone(),
                    format!("a virtio-fs tag is 1 to {tag_len} bytes"),
                );
            }
            if fs.socket.is_empty() {
                return invalid("socket", String::new(), "a socket path is needed".into());
            }
            let max_queues = devices::virtio::VIRTIO_FS_MAX_REQUEST_QUEUES;
            if fs.num_queues == 0 || fs.num_queues > max_queues {
                return unsupported(
                    "num_queues",
                    fs.num_queues.to_string(),
                    format!("a virtio-fs device has 1 to {max_queues} request queues"),
                );
            }
            if let Some(reason) = vhost_user_queue_size_refusal(fs.queue_size) {
                return unsupported("queue_size", fs.queue_size.to_string(), reason);
            }
            if fs.pci_segment != 0 {
                return unsupported(
                    "pci_segment",
                    fs.pci_segment.to_string(),
                    "there is only PCI segment 0".into(),
                );
            }
            if let Some(id) = fs.pci_device_id {
                return unsupported(
                    "pci_device_id",
                    id.to_string(),
                    "devices take the next free slot".into(),
                );
            }
            if all[..index].iter().any(|other| other.socket == fs.socket) {
                return invalid(
                    "socket",
                    fs.socket.clone(),
                    "the same vhost-user socket is given twice".into(),
                );
            }
        }
        if !all.is_empty() && !self.memory_is_shared() {
            return Err(ConfigError::Invalid {
                option: "fs",
                reason: "virtio-fs needs guest RAM its backend can map: --memory shared=on (or \
                         shared=on memory zones), or an NV VM"
                    .to_owned(),
            });
        }
        Ok(())
    }

    /// Whether every byte of guest RAM is a shared mapping a vhost-user backend can map.
    fn memory_is_shared(&self) -> bool {
        self.nv.is_some()
            || ((self.memory.size == 0 || self.memory.shared)
                && self.memory.zones.iter().flatten().all(|zone| zone.shared))
    }
}

/// Most queues a vhost-user disk may ask for.
const VHOST_USER_DISK_MAX_QUEUES: usize = 64;

/// Why a vhost-user device (disk or virtio-fs) cannot have `queue_size`, or `None` if it can: the
/// front-end's rings are a power of two up to `VHOST_USER_BLK_MAX_QUEUE_SIZE`.
fn vhost_user_queue_size_refusal(queue_size: u16) -> Option<String> {
    let max_queue_size = devices::virtio::VHOST_USER_BLK_MAX_QUEUE_SIZE;
    (!queue_size.is_power_of_two() || queue_size > max_queue_size)
        .then(|| format!("a vhost-user queue size is a power of two up to {max_queue_size}"))
}

/// A `--disk vhost_user=on,socket=PATH[,num_queues=,queue_size=]`: the backend at the socket
/// owns the image, so the options of an image are refused; the queues are the front-end's.
fn validate_vhost_user_disk(
    index: usize,
    disk: &DiskConfig,
    earlier: &[DiskConfig],
) -> Result<(), ConfigError> {
    let invalid = |key: &str, value: String, reason: &str| {
        Err(ConfigError::from(OptionError::InvalidValue {
            option: "disk",
            key: key.to_owned(),
            value,
            reason: reason.to_owned(),
        }))
    };
    let Some(socket) = &disk.vhost_socket else {
        return Err(ConfigError::from(OptionError::MissingKey {
            option: "disk",
            key: "socket",
        }));
    };
    if !disk.vhost_user {
        return invalid(
            "socket",
            socket.clone(),
            "a socket is for a vhost-user disk: add vhost_user=on",
        );
    }
    if let Some(path) = &disk.path {
        return invalid(
            "path",
            path.clone(),
            "a vhost-user disk's image is the backend's: give socket= only",
        );
    }
    if disk.readonly {
        return invalid(
            "readonly",
            "on".into(),
            "a vhost-user disk is read-only when its backend serves it so",
        );
    }
    if disk.transport == Some(VirtioTransportKind::Mmio) {
        return invalid(
            "transport",
            "mmio".into(),
            "vhost-user disks are on virtio-pci",
        );
    }
    let unsupported = |key: &'static str, value: String, reason: String| {
        Err(not_supported(
            "disk",
            key,
            format!("disks[{index}].{key}"),
            value,
            &reason,
        ))
    };
    if disk.num_queues == 0 || disk.num_queues > VHOST_USER_DISK_MAX_QUEUES {
        return unsupported(
            "num_queues",
            disk.num_queues.to_string(),
            format!("a vhost-user disk has 1 to {VHOST_USER_DISK_MAX_QUEUES} queues"),
        );
    }
    if let Some(reason) = vhost_user_queue_size_refusal(disk.queue_size) {
        return unsupported("queue_size", disk.queue_size.to_string(), reason);
    }
    if earlier
        .iter()
        .any(|other| other.vhost_user && other.vhost_socket.as_ref() == Some(socket))
    {
        return invalid(
            "socket",
            socket.clone(),
            "the same vhost-user socket is given twice",
        );
    }
    Ok(())
}
