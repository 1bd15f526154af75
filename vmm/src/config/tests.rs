use super::*;

fn assert_invalid_value<T: std::fmt::Debug>(result: Result<T, ConfigError>, expected_key: &str) {
    match result {
        Err(ConfigError::Option(OptionError::InvalidValue { key, .. })) => {
            assert_eq!(key, expected_key)
        }
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
        Err(ConfigError::Option(OptionError::UnknownKey {
            option: "cpus",
            ..
        }))
    ));
    assert!(matches!(
        CpusConfig::parse("boot=1,affinity=[0@[0]]"),
        Err(ConfigError::Option(OptionError::UnsupportedKey {
            option: "cpus",
            ..
        }))
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
    assert_invalid_value(
        MemoryConfig::parse(Some("size=1G,shared=yes"), &[]),
        "shared",
    );
    let memory = |value| {
        command_line(VmOptionStrings {
            memory: Some(value),
            ..Default::default()
        })
    };
    assert_invalid_value(memory("size=1000"), "size");
    assert!(matches!(
        memory("size=0"),
        Err(ConfigError::Invalid {
            option: "memory",
            ..
        })
    ));
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
        matches!(&error, ConfigError::Option(OptionError::DuplicateKey { option: "memory", key }) if key == "size"),
        "{error:?}"
    );
    assert!(error.to_string().contains("\"size\""), "{error}");
    let error = MemoryConfig::parse(Some("size="), &[]).unwrap_err();
    assert!(
        matches!(&error, ConfigError::Option(OptionError::MissingValue { option: "memory", key }) if key == "size"),
        "{error:?}"
    );
    assert!(matches!(
        DiskConfig::parse("path=/a,serial="),
        Err(ConfigError::Option(OptionError::MissingValue { .. }))
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
        matches!(&error, ConfigError::Option(OptionError::InvalidValue { key, .. }) if key == "region_size"),
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
        Err(ConfigError::Option(OptionError::MissingKey {
            key: "id",
            ..
        }))
    ));
    assert!(matches!(
        MemoryZoneConfig::parse("id=a"),
        Err(ConfigError::Option(OptionError::MissingKey {
            key: "size",
            ..
        }))
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
        Err(ConfigError::Option(OptionError::MissingKey {
            key: "path",
            ..
        }))
    ));
    assert!(matches!(
        DiskConfig::parse("path=/img,bw_size=1000"),
        Err(ConfigError::Option(OptionError::UnsupportedKey { .. }))
    ));
    assert!(matches!(
        DiskConfig::parse("path=/img,colour=red"),
        Err(ConfigError::Option(OptionError::UnknownKey { .. }))
    ));
}

/// `transport=` (our extension) picks virtio-mmio; without it the disk is on virtio-pci and
/// the JSON is upstream's (no `transport` member).
#[test]
fn disk_transport_defaults_to_pci_and_mmio_is_an_opt_in() {
    let plain = DiskConfig::parse("path=/img").unwrap();
    assert_eq!(plain.transport, None);
    assert_eq!(
        plain.transport.unwrap_or_default(),
        VirtioTransportKind::Pci
    );
    assert!(serde_json::to_value(&plain)
        .unwrap()
        .get("transport")
        .is_none());
    let mmio = DiskConfig::parse("path=/img,transport=MMIO").unwrap();
    assert_eq!(mmio.transport, Some(VirtioTransportKind::Mmio));
    let json = serde_json::to_value(&mmio).unwrap();
    assert_eq!(json["transport"], "mmio");
    assert_eq!(serde_json::from_value::<DiskConfig>(json).unwrap(), mmio);
    assert_eq!(
        DiskConfig::parse("path=/img,transport=pci")
            .unwrap()
            .transport,
        Some(VirtioTransportKind::Pci)
    );
    assert!(matches!(
        DiskConfig::parse("path=/img,transport=ccw"),
        Err(ConfigError::Option(OptionError::InvalidValue { .. }))
    ));
}

/// The config of a VM with the one `--disk disk`, validated as given on the command line and
/// as the same member in a `vm.create` body.
fn disk_on_command_line_and_in_json(disk: &str) -> [Result<(), ConfigError>; 2] {
    let from_cli = command_line(VmOptionStrings {
        disks: vec![disk],
        ..Default::default()
    })
    .map(drop);
    let parsed = DiskConfig::parse(disk).unwrap();
    let json = serde_json::json!({
        "payload": {"kernel": "/k"},
        "memory": {"size": 67108864},
        "disks": [serde_json::to_value(&parsed).unwrap()]
    });
    let from_json = serde_json::from_value::<VmConfig>(json).unwrap().validate();
    [from_cli, from_json]
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
        ("image_type=qcow2", Some("disks[0].image_type")),
        ("pci_segment=1", Some("disks[0].pci_segment")),
        ("backing_files=on", Some("disks[0].backing_files")),
    ];
    for (option, refused) in cases {
        let [from_cli, from_json] =
            disk_on_command_line_and_in_json(&format!("path=/a.img,{option}"));
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

/// A command line as `(option, value)` pairs (`("pvpanic", "")` for the flag).
type CommandLine = &'static [(&'static str, &'static str)];

fn cli_options(given: CommandLine) -> VmOptionStrings<'static> {
    let mut options = VmOptionStrings::default();
    for &(option, value) in given {
        match option {
            "cpus" => options.cpus = Some(value),
            "memory" => options.memory = Some(value),
            "memory-zone" => options.memory_zones.push(value),
            "disk" => options.disks.push(value),
            "net" => options.net.push(value),
            "fs" => options.fs.push(value),
            "rng" => options.rng = Some(value),
            "platform" => options.platform = Some(value),
            "serial" => options.serial = Some(value),
            "console" => options.console = Some(value),
            "firmware" => options.firmware = Some(value),
            "nv" => options.nv = Some(value),
            "pvpanic" => options.pvpanic = true,
            device => options.devices.push((device, value)),
        }
    }
    options
}

/// The outcome of one setting given on the command line and as a `vm.create` body: `Ok` or the
/// refusal's message.
fn both_paths(options: VmOptionStrings, members: serde_json::Value) -> [Result<(), String>; 2] {
    let from_cli = command_line(options)
        .map(drop)
        .map_err(|error| error.to_string());
    let mut body = serde_json::json!({
        "payload": {"kernel": "/k"},
        "memory": {"size": 64u64 << 20},
    });
    for (member, value) in members.as_object().expect("members is an object") {
        match (body.get_mut(member), value) {
            (Some(serde_json::Value::Object(into)), serde_json::Value::Object(given)) => {
                into.extend(given.clone())
            }
            _ => {
                body[member] = value.clone();
            }
        }
    }
    let body = serde_json::to_vec(&body).unwrap();
    let from_json = match crate::api::build_api_request("/api/v1/vm.create", &body, None) {
        Some(Ok(crate::api::ApiRequest::VmCreate(_))) => Ok(()),
        Some(Ok(other)) => panic!("vm.create built {other:?}"),
        Some(Err(error)) => Err(error.message),
        None => panic!("vm.create has no route"),
    };
    [from_cli, from_json]
}

/// One policy for both doors: every option group's settings, given on the command line and as
/// the same members of a `vm.create` body, are accepted by both or refused by both, and the
/// refusal names the same key. (`--nv` values, `--memory size=0` and a socket console used to
/// pass `vm.create` and fail only later, or not at all.)
#[test]
fn every_option_group_follows_one_rule_on_the_command_line_and_in_json() {
    use serde_json::json;
    let cases: Vec<(CommandLine, serde_json::Value, Option<&str>)> = vec![
        (
            &[("cpus", "boot=1,max=1,core_scheduling=off,profile=host")],
            json!({"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "core_scheduling": "Off", "profile": "host"}}),
            None,
        ),
        (
            &[("cpus", "boot=0")],
            json!({"cpus": {"boot_vcpus": 0, "max_vcpus": 0}}),
            Some("boot"),
        ),
        (
            &[("cpus", "boot=1,max=2")],
            json!({"cpus": {"boot_vcpus": 1, "max_vcpus": 2}}),
            Some("cpus.max"),
        ),
        (
            &[("cpus", "boot=1,kvm_hyperv=on")],
            json!({"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": true}}),
            Some("kvm_hyperv"),
        ),
        (
            &[("cpus", "boot=1,nested=off")],
            json!({"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "nested": false}}),
            Some("nested"),
        ),
        (
            &[("cpus", "boot=1,affinity=[0@[0]]")],
            json!({"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "affinity": [{"vcpu": 0, "host_cpus": [0]}]}}),
            Some("affinity"),
        ),
        (
            &[("memory", "size=64M,shared=on,prefault=on,thp=off")],
            json!({"memory": {"size": 64u64 << 20, "shared": true, "prefault": true, "thp": false}}),
            None,
        ),
        (
            &[("memory", "size=0")],
            json!({"memory": {"size": 0}}),
            Some("size=0 needs at least one --memory-zone"),
        ),
        (
            &[("memory", "size=1000")],
            json!({"memory": {"size": 1000}}),
            Some("multiple of 4096"),
        ),
        (
            &[("memory", "size=64M,mergeable=on")],
            json!({"memory": {"mergeable": true}}),
            Some("memory.mergeable"),
        ),
        (
            &[("memory", "size=64M,hugepages=on")],
            json!({"memory": {"hugepages": true}}),
            Some("memory.hugepages"),
        ),
        (
            &[
                ("memory", "size=0"),
                ("memory-zone", "id=m0,size=64M,file=/ram,shared=on"),
            ],
            json!({"memory": {"size": 0, "zones": [{"id": "m0", "size": 64u64 << 20, "file": "/ram", "shared": true}]}}),
            None,
        ),
        (
            &[("memory-zone", "id=m0,size=64M")],
            json!({"memory": {"zones": [{"id": "m0", "size": 64u64 << 20}]}}),
            Some("zones need --memory size=0"),
        ),
        (
            &[
                ("memory", "size=0"),
                ("memory-zone", "id=m0,size=64M,host_numa_node=0"),
            ],
            json!({"memory": {"size": 0, "zones": [{"id": "m0", "size": 64u64 << 20, "host_numa_node": 0}]}}),
            Some("host_numa_node"),
        ),
        (
            &[("memory", "size=0"), ("memory-zone", "id=m0,size=1000")],
            json!({"memory": {"size": 0, "zones": [{"id": "m0", "size": 1000}]}}),
            Some("multiple of 4096"),
        ),
        // Every --disk key: disk_members_follow_one_rule_on_the_command_line_and_in_json.
        (
            &[("disk", "path=/a,readonly=on,id=d0")],
            json!({"disks": [{"path": "/a", "readonly": true, "id": "d0"}]}),
            None,
        ),
        (
            &[("disk", "path=/a,bw_size=10")],
            json!({"disks": [{"path": "/a", "rate_limiter_config": {"bandwidth": {"size": 10, "refill_time": 1}}}]}),
            Some("bw_size"),
        ),
        (
            &[("disk", "path=/a,queue_affinity=[0@[0]]")],
            json!({"disks": [{"path": "/a", "queue_affinity": [{"queue_index": 0, "host_cpus": [0]}]}]}),
            Some("queue_affinity"),
        ),
        (&[("net", "tap=t0")], json!({"net": [{"tap": "t0"}]}), None),
        (
            &[(
                "net",
                "tap=t0,mac=12:34:56:78:9a:bc,num_queues=4,queue_size=512,mtu=9000",
            )],
            json!({"net": [{"tap": "t0", "mac": "12:34:56:78:9a:bc", "num_queues": 4,
                            "queue_size": 512, "mtu": 9000}]}),
            None,
        ),
        (&[("net", "fd=3")], json!({"net": [{"fds": [3]}]}), None),
        (
            &[("net", "tap=t0,mac=12:34:56:78:9a")],
            json!({"net": [{"tap": "t0", "mac": "12:34:56:78:9a"}]}),
            Some("invalid mac \"12:34:56:78:9a\""),
        ),
        (
            &[("net", "mac=13:34:56:78:9a:bc")],
            json!({"net": [{"mac": "13:34:56:78:9a:bc"}]}),
            Some("multicast"),
        ),
        (
            &[("net", "host_mac=zz:34:56:78:9a:bc")],
            json!({"net": [{"host_mac": "zz:34:56:78:9a:bc"}]}),
            Some("invalid host_mac"),
        ),
        (
            &[("net", "tap=t0,num_queues=3")],
            json!({"net": [{"tap": "t0", "num_queues": 3}]}),
            Some("num_queues=3 is not valid"),
        ),
        (
            &[("net", "tap=t0,num_queues=0")],
            json!({"net": [{"tap": "t0", "num_queues": 0}]}),
            Some("num_queues=0 is not valid"),
        ),
        (
            &[("net", "tap=t0,queue_size=100")],
            json!({"net": [{"tap": "t0", "queue_size": 100}]}),
            Some("queue_size=100 is not valid"),
        ),
        (
            &[("net", "ip=10.0.0.300")],
            json!({"net": [{"ip": "10.0.0.300"}]}),
            Some("invalid ip"),
        ),
        (
            &[("net", "fd=[3,4]")],
            json!({"net": [{"fds": [3, 4]}]}),
            Some("one per queue pair"),
        ),
        (
            &[("net", "tap=t0,fd=3")],
            json!({"net": [{"tap": "t0", "fds": [3]}]}),
            Some("tap= and fd="),
        ),
        (
            &[("net", "tap=t0,vhost_user=on,socket=/s")],
            json!({"net": [{"tap": "t0", "vhost_user": true, "vhost_socket": "/s"}]}),
            Some("network is the backend's"),
        ),
        (
            &[("rng", "src=/dev/urandom")],
            json!({"rng": {"src": "/dev/urandom"}}),
            None,
        ),
        (
            &[("rng", "src=/dev/random")],
            json!({"rng": {"src": "/dev/random"}}),
            None,
        ),
        (
            &[("rng", "src=/dev/urandom,iommu=on")],
            json!({"rng": {"src": "/dev/urandom", "iommu": true}}),
            Some("rng.iommu"),
        ),
        (
            &[("platform", "num_pci_segments=1")],
            json!({"platform": {"num_pci_segments": 1}}),
            None,
        ),
        (
            &[("platform", "num_pci_segments=2")],
            json!({"platform": {"num_pci_segments": 2}}),
            Some("num_pci_segments"),
        ),
        (
            &[("platform", "serial_number=S1")],
            json!({"platform": {"serial_number": "S1"}}),
            Some("serial_number"),
        ),
        (
            &[("serial", "file=/log"), ("console", "off")],
            json!({"serial": {"mode": "File", "file": "/log"}, "console": {"mode": "Off"}}),
            None,
        ),
        (
            &[("serial", "tty")],
            json!({"serial": {"mode": "Tty"}}),
            Some("tty is given to both"),
        ),
        (
            &[("serial", "socket=/s")],
            json!({"serial": {"mode": "Socket", "socket": "/s"}}),
            Some("socket"),
        ),
        (
            &[("console", "socket=/s")],
            json!({"console": {"mode": "Socket", "socket": "/s"}}),
            Some("socket"),
        ),
        (&[("pvpanic", "")], json!({"pvpanic": true}), None),
        (
            &[("firmware", "/fw")],
            json!({"payload": {"firmware": "/fw"}}),
            Some("firmware"),
        ),
        // virtio-fs needs RAM its backend can map (upstream's rule for vhost-user).
        (
            &[("fs", "tag=t,socket=/s")],
            json!({"fs": [{"tag": "t", "socket": "/s"}]}),
            Some("virtio-fs needs guest RAM its backend can map"),
        ),
        // The devices this VMM does not have: --vsock, --watchdog, ...
        (
            &[("watchdog", "on")],
            json!({"watchdog": true}),
            Some("(VmConfig member \"watchdog\") is not supported by this VMM"),
        ),
        (
            &[("nv", "region=/r,vm=web-1,create=on,region_size=1G")],
            json!({"nv": {"region": "/r", "vm": "web-1", "create": true, "region_size": 1u64 << 30}}),
            None,
        ),
        (
            &[("nv", "region=/r,vm=a/b")],
            json!({"nv": {"region": "/r", "vm": "a/b"}}),
            Some("use letters, digits"),
        ),
        (
            &[("nv", "region=/r,vm=a,deadline_ms=0")],
            json!({"nv": {"region": "/r", "vm": "a", "deadline_ms": 0}}),
            Some("deadline_ms"),
        ),
        (
            &[("nv", "region=/r,vm=a,region_size=0")],
            json!({"nv": {"region": "/r", "vm": "a", "region_size": 0}}),
            Some("region_size"),
        ),
        (
            &[("nv", "region=/r,vm=a,region_size=1000")],
            json!({"nv": {"region": "/r", "vm": "a", "region_size": 1000}}),
            Some("multiple of 4096"),
        ),
        (
            &[("nv", "region=/r,vm=a,force-cold=on")],
            json!({"nv": {"region": "/r", "vm": "a", "force_cold": true}}),
            Some("force-cold"),
        ),
        (
            &[("nv", "region=/r,vm=")],
            json!({"nv": {"region": "/r", "vm": ""}}),
            Some("vm"),
        ),
    ];
    let mut disagreements = Vec::new();
    for (options, members, refused) in cases {
        let what = format!("{options:?} / {members}");
        let outcomes = both_paths(cli_options(options), members);
        let agree = outcomes.iter().all(|outcome| match (refused, outcome) {
            (None, Ok(())) => true,
            (Some(needle), Err(message)) => message.contains(needle),
            _ => false,
        });
        if !agree {
            disagreements.push(format!("{what}: expected {refused:?}, got {outcomes:?}"));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

#[test]
fn rng_platform_and_net() {
    let with = |options: VmOptionStrings<'static>| command_line(options);
    assert!(with(VmOptionStrings {
        rng: Some("src=/dev/urandom"),
        ..Default::default()
    })
    .is_ok());
    let rng = with(VmOptionStrings {
        rng: Some("src=/dev/hwrng"),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(rng.rng.src, "/dev/hwrng");
    assert_not_supported(
        with(VmOptionStrings {
            rng: Some("iommu=on"),
            ..Default::default()
        }),
        "rng.iommu",
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
    .unwrap()
    .net
    .is_none());
    let net = with(VmOptionStrings {
        net: vec!["tap=tap0,host_mac=02:00:00:00:00:01,num_queues=4"],
        ..Default::default()
    })
    .unwrap()
    .net
    .unwrap();
    assert_eq!(net.len(), 1);
    assert_eq!(net[0].tap.as_deref(), Some("tap0"));
    assert_eq!(net[0].num_queues, 4);
    assert_eq!(net[0].ip, "192.168.249.1");
    assert_eq!(net[0].mask, "255.255.255.0");
    // No mac=: a random locally administered unicast one, shown in vm.info as upstream does.
    let mac = crate::config::parse_mac(net[0].mac.as_deref().unwrap()).unwrap();
    assert_eq!(mac[0] & 0x03, 0x02, "{mac:02x?}");
    let printed = serde_json::to_value(&net[0]).unwrap();
    assert_eq!(printed["tap"], "tap0");
    assert_eq!(printed["num_queues"], 4);
    assert_eq!(printed["queue_size"], 256);
    assert_eq!(printed["offload_tso"], true);
    assert!(printed.get("fds").is_none());
    let error = with(VmOptionStrings {
        net: vec!["tap=tap0,mac=nonsense"],
        ..Default::default()
    })
    .unwrap_err();
    assert!(error.to_string().starts_with("--net"), "{error}");
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
        serde_json::from_str(r#"{"payload":{"kernel":"/k"},"memory":{"size":1048576}}"#).unwrap();
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
        Err(ConfigError::Option(OptionError::MissingValue { .. }))
    ));
    assert!(matches!(
        ConsoleConfig::parse_serial("off,tty"),
        Err(ConfigError::Invalid { .. })
    ));
    assert!(matches!(
        ConsoleConfig::parse_console("loud"),
        Err(ConfigError::Option(OptionError::UnknownKey {
            option: "console",
            ..
        }))
    ));
    assert!(matches!(
        ConsoleConfig::parse_serial("socket=/tmp/s"),
        Err(ConfigError::Option(OptionError::UnsupportedKey { .. }))
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
        Err(ConfigError::Option(OptionError::UnknownKey { .. }))
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
        Err(ConfigError::Option(OptionError::MissingKey {
            key: "source_url",
            ..
        }))
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
            swap_in: None,
            keep: false,
            sparse: false,
            checkpoint_ms: None,
        }
    );
    assert_eq!(
        NvConfig::parse("region=/r,vm=a,checkpoint_ms=10")
            .unwrap()
            .checkpoint_ms,
        Some(10)
    );
    assert!(
        NvConfig::parse("region=/r,vm=a,create=on,sparse=on")
            .unwrap()
            .sparse
    );
    let recover = NvConfig::parse("region=/r,vm=a,recover=on,force-cold=on").unwrap();
    assert!(recover.recover && recover.force_cold);
    assert_eq!(recover.deadline_ms, default_deadline_ms());
    assert!(matches!(
        NvConfig::parse("vm=a"),
        Err(ConfigError::Option(OptionError::MissingKey {
            key: "region",
            ..
        }))
    ));
    assert!(matches!(
        NvConfig::parse("region=/r"),
        Err(ConfigError::Option(OptionError::MissingKey {
            key: "vm",
            ..
        }))
    ));
    let nv_line = |nv| {
        command_line(VmOptionStrings {
            nv: Some(nv),
            ..Default::default()
        })
    };
    assert_invalid_value(nv_line("region=/r,vm=a/b"), "vm");
    assert_invalid_value(nv_line("region=/r,vm=a,deadline_ms=0"), "deadline_ms");
    assert_invalid_value(
        nv_line("region=/r,vm=a,checkpoint_ms=3600001"),
        "checkpoint_ms",
    );
    assert_invalid_value(
        NvConfig::parse("region=/r,vm=a,checkpoint_ms=-1"),
        "checkpoint_ms",
    );
    assert_invalid_value(
        NvConfig::parse("region=/r,vm=a,checkpoint_ms=ten"),
        "checkpoint_ms",
    );
    assert!(nv_line("region=/r,vm=a,checkpoint_ms=0").is_ok());
    assert_invalid_value(
        NvConfig::parse("region=/r,vm=a,region_size=1Q"),
        "region_size",
    );
    assert_invalid_value(nv_line("region=/r,vm=a,region_size=1000"), "region_size");
    assert!(nv_line("region=/r,vm=a,force-cold=on").is_err());
    assert!(matches!(
        NvConfig::parse("region=/r,vm=a,force_cold=on"),
        Err(ConfigError::Option(OptionError::UnknownKey { .. }))
    ));
}

#[test]
fn nv_swap_in_is_checked_alike_on_the_command_line_and_in_json() {
    let nv = NvConfig::parse("region=/r,vm=a,swap-in=/swap/a.nvswap,keep=on").unwrap();
    assert_eq!(nv.swap_in.as_deref(), Some("/swap/a.nvswap"));
    assert!(nv.keep);
    let nv_line = |nv| {
        command_line(VmOptionStrings {
            nv: Some(nv),
            ..Default::default()
        })
    };
    let config = nv_line("region=/r,vm=a,swap-in=/swap/a").unwrap();
    assert_eq!(
        config.nv.as_ref().unwrap().swap_in.as_deref(),
        Some("/swap/a")
    );
    assert!(!config.nv.as_ref().unwrap().keep);
    let refusals = [
        (
            "region=/r,vm=a,keep=on",
            "keep=on only applies with swap-in",
        ),
        ("region=/r,vm=a,swap-in=/s,create=on", "do not combine"),
        ("region=/r,vm=a,swap-in=/s,recover=on", "do not combine"),
        ("region=/r,vm=a,swap-in=/s,format=on", "do not combine"),
    ];
    for (line, reason) in refusals {
        let error = nv_line(line).unwrap_err().to_string();
        assert!(error.contains(reason), "{line}: {error}");
        // The same member in a vm.create body is judged by the same validate.
        let parsed = NvConfig::parse(line).unwrap();
        let json = serde_json::json!({ "nv": parsed, "payload": { "kernel": "/k" } });
        let config: VmConfig = serde_json::from_value(json).unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains(reason), "{line} as JSON: {error}");
    }
    // An empty file name: the option parser refuses it on the command line, validate in JSON.
    assert!(NvConfig::parse("region=/r,vm=a,swap-in=").is_err());
    let json = serde_json::json!({
        "nv": { "region": "/r", "vm": "a", "swap_in": "" },
        "payload": { "kernel": "/k" },
    });
    let config: VmConfig = serde_json::from_value(json).unwrap();
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("name the swap file"), "{error}");
    assert!(matches!(
        NvConfig::parse("region=/r,vm=a,swap_in=/s"),
        Err(ConfigError::Option(OptionError::UnknownKey { .. }))
    ));
    // JSON names: swap_in and keep, absent when unset.
    let json = serde_json::to_value(NvConfig::parse("region=/r,vm=a,swap-in=/s").unwrap()).unwrap();
    assert_eq!(json["swap_in"], "/s");
    assert!(json.get("keep").is_none());
}

#[test]
fn swap_urls_name_absolute_files() {
    assert_eq!(swap_file_url_path("file:///s/a.swap"), Some("/s/a.swap"));
    for bad in ["/s/a.swap", "file://s/a", "file:///s/", "http:///s/a", ""] {
        assert_eq!(swap_file_url_path(bad), None, "{bad}");
    }
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
    let config = command_line(VmOptionStrings::default()).unwrap();
    let json = serde_json::to_value(&config).unwrap();
    assert_eq!(json["cpus"]["boot_vcpus"], 1);
    assert_eq!(json["memory"]["size"], 64 << 20);
    assert_eq!(json["payload"]["kernel"], "/k");
    assert_eq!(json["serial"]["mode"], "Null");
    assert_eq!(json["console"]["mode"], "Tty");
    let back: VmConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, config);
}

/// `--disk vhost_user=on,socket=PATH[,num_queues=,queue_size=]` as upstream: one rule for the
/// command line and a `vm.create` body; what belongs to the backend's image is refused by name.
#[test]
fn vhost_user_disks_take_a_socket_and_no_image() {
    let disk = DiskConfig::parse("vhost_user=on,socket=/run/blk.sock,num_queues=2,queue_size=1024")
        .unwrap();
    assert!(disk.vhost_user);
    assert_eq!(disk.vhost_socket.as_deref(), Some("/run/blk.sock"));
    assert_eq!(disk.path, None);
    assert_eq!((disk.num_queues, disk.queue_size), (2, 1024));
    let cases: [(&str, Option<&str>); 8] = [
        ("vhost_user=on,socket=/s", None),
        ("vhost_user=on,socket=/s,num_queues=4,queue_size=256", None),
        ("vhost_user=on", Some("socket")),
        ("socket=/s,path=/a.img", Some("socket")),
        ("vhost_user=on,socket=/s,path=/a.img", Some("path")),
        ("vhost_user=on,socket=/s,readonly=on", Some("readonly")),
        ("vhost_user=on,socket=/s,transport=mmio", Some("transport")),
        ("vhost_user=on,socket=/s,queue_size=100", Some("queue_size")),
    ];
    for (option, refused) in cases {
        for result in disk_on_command_line_and_in_json(option) {
            match refused {
                None => assert!(result.is_ok(), "{option}: {result:?}"),
                Some(key) => {
                    let text = format!("{result:?}");
                    assert!(text.contains(&format!("\"{key}\"")), "{option}: {text}");
                }
            }
        }
    }
    let twice = command_line(VmOptionStrings {
        disks: vec!["vhost_user=on,socket=/s", "vhost_user=on,socket=/s"],
        ..Default::default()
    });
    assert!(format!("{twice:?}").contains("twice"), "{twice:?}");
}

/// `--net vhost_user=true,socket=PATH,vhost_mode=client|server` as upstream: the mode's words
/// are upstream's (any case on the command line), stored as its JSON enum ("Client", "Server";
/// absent means Client), the queues default to upstream's 2 x 256; a tap, a second device on
/// the same socket and an unknown mode are refused by name, on the command line and in JSON.
#[test]
fn vhost_user_nets_take_a_socket_and_a_mode() {
    let net = NetConfig::parse("vhost_user=true,socket=/run/net.sock,vhost_mode=server").unwrap();
    assert!(net.vhost_user);
    assert_eq!(net.vhost_socket.as_deref(), Some("/run/net.sock"));
    assert_eq!(net.vhost_mode.as_deref(), Some("Server"));
    assert_eq!((net.num_queues, net.queue_size), (2, 256));
    let json = serde_json::to_value(&net).unwrap();
    assert_eq!(json["vhost_mode"], "Server");
    assert_eq!(json["vhost_socket"], "/run/net.sock");
    for (word, stored) in [
        ("client", "Client"),
        ("Client", "Client"),
        ("SERVER", "Server"),
    ] {
        let net = NetConfig::parse(&format!("vhost_user=true,socket=/s,vhost_mode={word}"));
        assert_eq!(net.unwrap().vhost_mode.as_deref(), Some(stored), "{word}");
    }
    assert!(NetConfig::parse("vhost_user=true,socket=/s,vhost_mode=both").is_err());
    assert_eq!(
        vhost_user_mode(None),
        Some(devices::virtio::VhostUserMode::Client)
    );
    let cases: [(&str, Option<&str>); 11] = [
        ("vhost_user=true,socket=/s", None),
        ("vhost_user=true,socket=/s,num_queues=4", None),
        (
            "vhost_user=true,socket=/s,num_queues=3",
            Some("num_queues=3"),
        ),
        (
            "vhost_user=true,socket=/s,num_queues=0",
            Some("num_queues=0"),
        ),
        (
            "vhost_user=on,socket=/s,vhost_mode=client,mac=02:00:00:00:00:01,id=vn0",
            None,
        ),
        ("vhost_user=true,socket=/s,queue_size=1024", None),
        ("vhost_user=true", Some("socket")),
        ("socket=/s", Some("socket")),
        ("vhost_user=true,socket=/s,tap=t0", Some("tap")),
        (
            "vhost_user=true,socket=/s,transport=mmio",
            Some("transport"),
        ),
        (
            "vhost_user=true,socket=/s,num_queues=130",
            Some("at most 64 queue pairs"),
        ),
    ];
    for (option, refused) in cases {
        let from_cli = command_line(VmOptionStrings {
            net: vec![option],
            ..Default::default()
        })
        .map(drop);
        let parsed = NetConfig::parse(option).unwrap();
        let json = serde_json::json!({
            "payload": {"kernel": "/k"},
            "memory": {"size": 67108864},
            "net": [serde_json::to_value(&parsed).unwrap()]
        });
        let from_json = serde_json::from_value::<VmConfig>(json).unwrap().validate();
        for result in [from_cli, from_json] {
            match refused {
                None => assert!(result.is_ok(), "{option}: {result:?}"),
                Some(key) => {
                    let text = format!("{result:?}");
                    assert!(text.contains(key), "{option}: {text}");
                }
            }
        }
    }
    let bad_mode = serde_json::json!({
        "payload": {"kernel": "/k"},
        "memory": {"size": 67108864},
        "net": [{"vhost_user": true, "vhost_socket": "/s", "vhost_mode": "client"}]
    });
    let refused = serde_json::from_value::<VmConfig>(bad_mode)
        .unwrap()
        .validate();
    assert!(format!("{refused:?}").contains("vhost_mode"), "{refused:?}");
    let twice = command_line(VmOptionStrings {
        net: vec!["vhost_user=true,socket=/s", "vhost_user=true,socket=/s"],
        ..Default::default()
    });
    assert!(format!("{twice:?}").contains("twice"), "{twice:?}");
}

/// `--fs tag=,socket=[,num_queues=,queue_size=,id=]` as upstream: num_queues counts request
/// queues and defaults to 1, queue_size to 1024 (upstream's FsConfig defaults), the JSON
/// members are upstream's; on shared RAM (or an NV VM) it passes, a tag longer than the 36
/// bytes of the config space, a bad queue count or size and a socket given twice are refused.
#[test]
fn fs_takes_a_tag_and_a_socket_with_upstreams_defaults() {
    let fs = FsConfig::parse("tag=myfs,socket=/run/fs.sock").unwrap();
    assert_eq!((fs.num_queues, fs.queue_size), (1, 1024));
    assert_eq!(
        serde_json::to_value(&fs).unwrap(),
        serde_json::json!({"tag": "myfs", "socket": "/run/fs.sock", "num_queues": 1, "queue_size": 1024,
               "pci_segment": 0})
    );
    let from_json: FsConfig =
        serde_json::from_value(serde_json::json!({"tag": "myfs", "socket": "/run/fs.sock"}))
            .unwrap();
    assert_eq!(from_json, fs);
    let fs = FsConfig::parse("tag=t,socket=/s,num_queues=2,queue_size=256,id=fs0").unwrap();
    assert_eq!((fs.num_queues, fs.queue_size), (2, 256));
    assert_eq!(fs.id.as_deref(), Some("fs0"));
    assert!(FsConfig::parse("socket=/s").is_err(), "tag is required");
    assert!(FsConfig::parse("tag=t").is_err(), "socket is required");
    assert!(FsConfig::parse("tag=t,socket=/s,cache=always").is_err());

    let shared = |fs: Vec<&str>| {
        command_line(VmOptionStrings {
            memory: Some("size=64M,shared=on"),
            fs,
            ..Default::default()
        })
    };
    let config = shared(vec!["tag=t,socket=/s"]).unwrap();
    assert_eq!(config.fs.unwrap()[0].tag, "t");
    let long_tag = format!("tag={},socket=/s", "x".repeat(37));
    for (fs, expected) in [
        (long_tag.as_str(), "1 to 36 bytes"),
        ("tag=t,socket=/s,num_queues=0", "num_queues"),
        ("tag=t,socket=/s,queue_size=1000", "queue_size"),
        ("tag=t,socket=/s,pci_segment=1", "pci_segment"),
    ] {
        let error = format!("{:?}", shared(vec![fs]));
        assert!(error.contains(expected), "{fs}: {error}");
    }
    let twice = format!("{:?}", shared(vec!["tag=a,socket=/s", "tag=b,socket=/s"]));
    assert!(twice.contains("twice"), "{twice}");
    let private = command_line(VmOptionStrings {
        fs: vec!["tag=t,socket=/s"],
        ..Default::default()
    });
    assert!(format!("{private:?}").contains("shared=on"), "{private:?}");
}

/// Output commit holds a checkpointed VM's transmitted frames in the VMM; a vhost-user-net
/// backend sends them itself, so `checkpoint_ms` with such a device is refused by name (the
/// command line, a `vm.create` body, a hotplug's changed config), while an in-process net, or
/// checkpoints off, pass.
#[test]
fn checkpoints_refuse_a_vhost_user_net() {
    let line = |net: &'static str, nv: &'static str| {
        command_line(VmOptionStrings {
            net: vec![net],
            nv: Some(nv),
            ..Default::default()
        })
    };
    let refused = line(
        "vhost_user=true,socket=/s,id=vn0",
        "region=/r,vm=a,checkpoint_ms=10",
    )
    .unwrap_err();
    let message = refused.to_string();
    assert!(
        message.contains("checkpoint_ms") && message.contains("net vn0 is a vhost-user device"),
        "{message}"
    );
    assert!(line(
        "vhost_user=true,socket=/s",
        "region=/r,vm=a,checkpoint_ms=0"
    )
    .is_ok());
    assert!(line("vhost_user=true,socket=/s", "region=/r,vm=a").is_ok());
    let tap = line("tap=t0", "region=/r,vm=a,checkpoint_ms=10").unwrap();
    assert!(tap.validate_checkpointed_nets().is_ok());
    let unnamed = line("vhost_user=true,socket=/s", "region=/r,vm=a").unwrap();
    let error = unnamed
        .validate_checkpointed_nets()
        .unwrap_err()
        .to_string();
    assert!(error.contains("net _net0"), "{error}");
}

/// NV checkpoints undo disk writes made after an epoch; a vhost-user disk's writes never pass
/// through the VMM, so `checkpoint_ms` with one is refused, naming the disk (off is fine).
#[test]
fn checkpoints_refuse_a_vhost_user_disk() {
    let with = |checkpoint: &str, disk: &'static str| {
        command_line(VmOptionStrings {
            nv: Some(Box::leak(
                format!("region=/r,vm=a{checkpoint}").into_boxed_str(),
            )),
            disks: vec![disk],
            ..Default::default()
        })
    };
    let refused = with(
        ",checkpoint_ms=10",
        "vhost_user=on,socket=/run/b.sock,id=vb",
    );
    let text = refused.expect_err("refused").to_string();
    assert!(text.contains("vhost-user") && text.contains("vb"), "{text}");
    assert!(with(",checkpoint_ms=0", "vhost_user=on,socket=/s").is_ok());
    assert!(with("", "vhost_user=on,socket=/s").is_ok());
    assert!(with(",checkpoint_ms=10", "path=/a.img").is_ok());
}

/// virtiofsd writes the shared directory itself, so no rollback can undo those writes:
/// `checkpoint_ms` with a virtio-fs device is refused, naming it (off is fine).
#[test]
fn checkpoints_refuse_a_virtio_fs_device() {
    let with = |nv: &'static str| {
        command_line(VmOptionStrings {
            nv: Some(nv),
            fs: vec!["tag=t,socket=/s,id=share0"],
            ..Default::default()
        })
    };
    let text = with("region=/r,vm=a,checkpoint_ms=10")
        .expect_err("refused")
        .to_string();
    assert!(
        text.contains("checkpoint_ms") && text.contains("fs share0 is a virtio-fs device"),
        "{text}"
    );
    assert!(with("region=/r,vm=a,checkpoint_ms=0").is_ok());
    let unchecked = with("region=/r,vm=a").unwrap();
    assert!(unchecked.validate_checkpointed_devices().is_err());
}
