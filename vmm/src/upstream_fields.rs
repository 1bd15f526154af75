//! Which members of an upstream `VmConfig` JSON body (`vm.create`, a snapshot's `config.json`) this
//! VMM honours. serde alone would silently drop every member `config::VmConfig` lacks, so a body
//! asking for a network card would boot a VM without one. This check runs on the raw JSON first:
//!
//! - members we implement pass;
//! - members whose absence the guest cannot notice in a way that matters (entropy device, platform
//!   identifiers, the debug port, the RTC) are ignored, so that bodies written by upstream tooling,
//!   which always carry `rng`, keep working;
//! - any other upstream member is accepted only "off" (`null`, `false`, `[]`, `{}`), and refused
//!   otherwise, naming it;
//! - members upstream does not know either are refused as unknown (a typo must not pass).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamFieldError {
    #[error("VmConfig member \"{path}\" is not implemented by this VMM (only null, false or empty is accepted)")]
    Unimplemented { path: String },
    #[error("VmConfig member \"{path}\" is unknown")]
    Unknown { path: String },
    #[error("VmConfig member \"{path}\" must be {expected}")]
    WrongType {
        path: String,
        expected: &'static str,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Implemented here; its value is checked by serde and `VmConfig::validate`.
    Honoured,
    /// Implemented here and an object whose own members are checked against another table.
    HonouredObject(&'static [(&'static str, Rule)]),
    /// Implemented here: an array of objects, each checked against another table.
    HonouredArray(&'static [(&'static str, Rule)]),
    /// Not implemented; dropping it changes nothing that matters to the guest.
    Ignored,
    /// Not implemented; accepted only when off.
    OffOnly,
}

const CONSOLE: &[(&str, Rule)] = &[
    ("mode", Rule::Honoured),
    ("file", Rule::Honoured),
    ("socket", Rule::Honoured),
    ("iommu", Rule::OffOnly),
    ("id", Rule::Ignored),
    ("pci_segment", Rule::Ignored),
    ("pci_device_id", Rule::Ignored),
];

const DISK: &[(&str, Rule)] = &[
    ("path", Rule::Honoured),
    ("readonly", Rule::Honoured),
    ("direct", Rule::Honoured),
    ("id", Rule::Honoured),
    // Queue geometry and PCI placement: the guest driver adapts to what the device offers.
    ("num_queues", Rule::Ignored),
    ("queue_size", Rule::Ignored),
    ("queue_affinity", Rule::Ignored),
    ("pci_segment", Rule::Ignored),
    ("pci_device_id", Rule::Ignored),
    ("serial", Rule::Ignored),
    ("sparse", Rule::Ignored),
    ("lock_granularity", Rule::Ignored),
    ("iommu", Rule::OffOnly),
    ("vhost_user", Rule::OffOnly),
    ("vhost_socket", Rule::OffOnly),
    ("rate_limiter_config", Rule::OffOnly),
    ("rate_limit_group", Rule::OffOnly),
    ("backing_files", Rule::OffOnly),
    // A qcow2 image served as raw would corrupt it: only "off" (absent/null) passes.
    ("image_type", Rule::OffOnly),
];

const MEMORY_ZONE: &[(&str, Rule)] = &[
    ("id", Rule::Honoured),
    ("size", Rule::Honoured),
    ("file", Rule::Honoured),
    ("shared", Rule::Honoured),
    ("hugepages", Rule::Honoured),
    ("prefault", Rule::Honoured),
    ("mergeable", Rule::OffOnly),
    ("hugepage_size", Rule::OffOnly),
    ("host_numa_node", Rule::OffOnly),
    ("hotplug_size", Rule::OffOnly),
    ("hotplugged_size", Rule::OffOnly),
    ("reserve", Rule::OffOnly),
];

const MEMORY: &[(&str, Rule)] = &[
    ("size", Rule::Honoured),
    ("shared", Rule::Honoured),
    ("hugepages", Rule::Honoured),
    ("prefault", Rule::Honoured),
    ("zones", Rule::HonouredArray(MEMORY_ZONE)),
    // Upstream writes its defaults ("Acpi", thp true) into every config it produces.
    ("hotplug_method", Rule::Ignored),
    ("thp", Rule::Ignored),
    ("mergeable", Rule::OffOnly),
    ("hotplug_size", Rule::OffOnly),
    ("hotplugged_size", Rule::OffOnly),
    ("hugepage_size", Rule::OffOnly),
    ("reserve", Rule::OffOnly),
];

const CPUS: &[(&str, Rule)] = &[
    ("boot_vcpus", Rule::Honoured),
    ("max_vcpus", Rule::Honoured),
    // Defaults upstream writes into every config; KVM decides these here.
    ("max_phys_bits", Rule::Ignored),
    ("nested", Rule::Ignored),
    ("core_scheduling", Rule::Ignored),
    ("topology", Rule::OffOnly),
    ("kvm_hyperv", Rule::OffOnly),
    ("affinity", Rule::OffOnly),
    ("features", Rule::OffOnly),
];

const PAYLOAD: &[(&str, Rule)] = &[
    ("kernel", Rule::Honoured),
    ("cmdline", Rule::Honoured),
    ("initramfs", Rule::Honoured),
    ("firmware", Rule::OffOnly),
    ("igvm", Rule::OffOnly),
    ("host_data", Rule::OffOnly),
];

const VM_CONFIG: &[(&str, Rule)] = &[
    ("cpus", Rule::HonouredObject(CPUS)),
    ("memory", Rule::HonouredObject(MEMORY)),
    ("payload", Rule::HonouredObject(PAYLOAD)),
    ("disks", Rule::HonouredArray(DISK)),
    ("serial", Rule::HonouredObject(CONSOLE)),
    ("console", Rule::HonouredObject(CONSOLE)),
    ("pvpanic", Rule::Honoured),
    // Ours: not in upstream's schema.
    ("nv", Rule::Honoured),
    ("rng", Rule::Ignored),
    ("platform", Rule::Ignored),
    ("debug_console", Rule::Ignored),
    ("rtc", Rule::Ignored),
    ("rate_limit_groups", Rule::OffOnly),
    ("net", Rule::OffOnly),
    ("balloon", Rule::OffOnly),
    ("fs", Rule::OffOnly),
    ("generic_vhost_user", Rule::OffOnly),
    ("pmem", Rule::OffOnly),
    ("devices", Rule::OffOnly),
    ("user_devices", Rule::OffOnly),
    ("vdpa", Rule::OffOnly),
    ("vsock", Rule::OffOnly),
    ("numa", Rule::OffOnly),
    ("iommu", Rule::OffOnly),
    ("watchdog", Rule::OffOnly),
    ("pci_segments", Rule::OffOnly),
    ("tpm", Rule::OffOnly),
    ("landlock_enable", Rule::OffOnly),
    ("landlock_rules", Rule::OffOnly),
];

/// Checks a `VmConfig` JSON body before it is deserialized; see the module comment.
pub fn check_vm_config_fields(body: &Value) -> Result<(), UpstreamFieldError> {
    check_object("", body, VM_CONFIG)
}

fn is_off(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(members) => members.is_empty(),
        _ => false,
    }
}

fn check_object(
    path: &str,
    value: &Value,
    table: &[(&str, Rule)],
) -> Result<(), UpstreamFieldError> {
    let Value::Object(members) = value else {
        return Err(UpstreamFieldError::WrongType {
            path: if path.is_empty() {
                "(body)".to_owned()
            } else {
                path.to_owned()
            },
            expected: "an object",
        });
    };
    for (name, member) in members {
        let member_path = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        let Some((_, rule)) = table.iter().find(|(known, _)| known == name) else {
            return Err(UpstreamFieldError::Unknown { path: member_path });
        };
        match rule {
            Rule::Honoured | Rule::Ignored => {}
            Rule::OffOnly if is_off(member) => {}
            Rule::OffOnly => return Err(UpstreamFieldError::Unimplemented { path: member_path }),
            // null stands for "absent" in upstream bodies; serde handles it.
            Rule::HonouredObject(_) | Rule::HonouredArray(_) if member.is_null() => {}
            Rule::HonouredObject(inner) => check_object(&member_path, member, inner)?,
            Rule::HonouredArray(inner) => {
                let Value::Array(items) = member else {
                    return Err(UpstreamFieldError::WrongType {
                        path: member_path,
                        expected: "an array",
                    });
                };
                for (index, item) in items.iter().enumerate() {
                    check_object(&format!("{member_path}[{index}]"), item, inner)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_body_from_upstream_tooling_passes() {
        let body = json!({
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "max_phys_bits": 46, "nested": true},
            "memory": {"size": 1073741824, "mergeable": false, "hotplug_method": "Acpi",
                       "shared": true, "hugepages": false, "thp": true, "zones": null},
            "payload": {"kernel": "/vmlinux", "cmdline": "console=ttyS0"},
            "disks": [{"path": "/disk.raw", "readonly": false, "num_queues": 1,
                       "queue_size": 128, "vhost_user": false, "id": "_disk0"}],
            "net": null,
            "rng": {"src": "/dev/urandom", "iommu": false},
            "serial": {"mode": "Tty", "iommu": false},
            "console": {"mode": "Off", "iommu": false},
            "iommu": false,
            "watchdog": false,
            "pvpanic": false,
            "fs": [],
            "platform": {"num_pci_segments": 1}
        });
        assert_eq!(check_vm_config_fields(&body), Ok(()));
    }

    #[test]
    fn upstream_features_we_lack_are_refused_by_name() {
        let cases = [
            (json!({"net": [{"tap": "tap0"}]}), "net"),
            (json!({"iommu": true}), "iommu"),
            (
                json!({"memory": {"size": 1, "hotplug_size": 1024}}),
                "memory.hotplug_size",
            ),
            (
                json!({"memory": {"size": 0, "zones": [{"id": "a", "size": 1, "host_numa_node": 0}]}}),
                "memory.zones[0].host_numa_node",
            ),
            (
                json!({"disks": [{"path": "/q", "image_type": "Qcow2"}]}),
                "disks[0].image_type",
            ),
            (json!({"payload": {"firmware": "/fw"}}), "payload.firmware"),
        ];
        for (body, path) in cases {
            assert_eq!(
                check_vm_config_fields(&body),
                Err(UpstreamFieldError::Unimplemented {
                    path: path.to_owned()
                }),
                "{body}"
            );
        }
    }

    #[test]
    fn unknown_members_and_wrong_shapes_are_refused() {
        assert_eq!(
            check_vm_config_fields(&json!({"cpu": {"boot_vcpus": 1}})),
            Err(UpstreamFieldError::Unknown {
                path: "cpu".to_owned()
            })
        );
        assert_eq!(
            check_vm_config_fields(&json!({"cpus": {"boot": 1}})),
            Err(UpstreamFieldError::Unknown {
                path: "cpus.boot".to_owned()
            })
        );
        assert!(matches!(
            check_vm_config_fields(&json!([1, 2])),
            Err(UpstreamFieldError::WrongType { .. })
        ));
        assert!(matches!(
            check_vm_config_fields(&json!({"disks": {"path": "/a"}})),
            Err(UpstreamFieldError::WrongType { .. })
        ));
    }

    #[test]
    fn our_own_serialization_passes() {
        let config = crate::config::VmConfig::from_options(&crate::config::VmOptionStrings {
            kernel: Some("/k"),
            memory: Some("size=0"),
            memory_zones: vec!["id=mem0,size=64M,file=/ram,shared=on"],
            disks: vec!["path=/d,readonly=on,id=d0"],
            serial: Some("file=/log"),
            console: Some("off"),
            pvpanic: true,
            nv: Some("region=/r,vm=a,create=on"),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        let body = serde_json::to_value(&config).unwrap();
        assert_eq!(check_vm_config_fields(&body), Ok(()));
    }
}
