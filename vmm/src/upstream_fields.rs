//! Members of a `VmConfig` JSON body (`vm.create`, a snapshot's `config.json`) that this VMM does
//! not know. Upstream ignores unknown members; so do we, but each one is logged at warn level so
//! that a typo (`"cpu"` for `"cpus"`) does not go unnoticed.
//!
//! `config::VmConfig` models every member upstream v53 has, so "unknown" is decided by the structs
//! themselves: the body is read, written back, and every member of the body that did not survive
//! the round trip is one serde dropped. Whether a known member's value can be honoured is not
//! decided here but by `VmConfig::validate`, for the command line and JSON alike.

use serde_json::Value;

use crate::config::VmConfig;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamFieldError {
    #[error("VmConfig member \"{path}\" must be {expected}")]
    WrongType {
        path: String,
        expected: &'static str,
    },
}

/// Logs (warn) every member of `body` that `VmConfig` does not know. Refuses only a body that is
/// not a JSON object; a body serde cannot read is left for serde to describe.
pub fn check_vm_config_fields(body: &Value) -> Result<(), UpstreamFieldError> {
    for path in unknown_members(body)? {
        log::warn!("VmConfig member \"{path}\" is unknown to this VMM and ignored");
    }
    Ok(())
}

/// The paths (`cpus.boot`, `disks[0].colour`) of the members of `body` that `VmConfig` drops.
pub fn unknown_members(body: &Value) -> Result<Vec<String>, UpstreamFieldError> {
    if !body.is_object() {
        return Err(UpstreamFieldError::WrongType {
            path: "(body)".to_owned(),
            expected: "an object",
        });
    }
    let mut unknown = Vec::new();
    let Ok(config) = serde_json::from_value::<VmConfig>(body.clone()) else {
        return Ok(unknown);
    };
    let Ok(kept) = serde_json::to_value(&config) else {
        return Ok(unknown);
    };
    collect_dropped("", body, &kept, &mut unknown);
    Ok(unknown)
}

fn collect_dropped(path: &str, given: &Value, kept: &Value, out: &mut Vec<String>) {
    match (given, kept) {
        (Value::Object(given), Value::Object(kept)) => {
            for (name, value) in given {
                let member = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                match kept.get(name) {
                    Some(kept_value) => collect_dropped(&member, value, kept_value, out),
                    // `null` is how upstream spells an unset `Option`, which we leave out.
                    None if value.is_null() => {}
                    None => out.push(member),
                }
            }
        }
        (Value::Array(given), Value::Array(kept)) => {
            for (index, (value, kept_value)) in given.iter().zip(kept).enumerate() {
                collect_dropped(&format!("{path}[{index}]"), value, kept_value, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_members_are_found_at_every_depth() {
        let body = json!({
            "cpu": {"boot_vcpus": 1},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "boot": 2},
            "payload": {"kernel": "/k"},
            "disks": [{"path": "/a"}, {"path": "/b", "colour": "red"}],
            "memory": {"size": 1073741824, "zones": null},
            "future_member": null
        });
        assert_eq!(
            unknown_members(&body).unwrap(),
            ["cpu", "cpus.boot", "disks[1].colour"]
        );
        assert_eq!(check_vm_config_fields(&body), Ok(()));
    }

    #[test]
    fn a_body_that_is_not_an_object_is_refused() {
        assert!(matches!(
            check_vm_config_fields(&json!([1, 2])),
            Err(UpstreamFieldError::WrongType { .. })
        ));
    }

    #[test]
    fn our_own_serialization_has_no_unknown_member() {
        let config = crate::config::VmConfig::from_options(&crate::config::VmOptionStrings {
            kernel: Some("/k"),
            memory: Some("size=0"),
            memory_zones: vec!["id=mem0,size=64M,file=/ram,shared=on"],
            disks: vec!["path=/d,readonly=on,id=d0"],
            serial: Some("file=/log"),
            console: Some("off"),
            platform: Some("num_pci_segments=1"),
            nv: Some("region=/r,vm=a,create=on"),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        let body = serde_json::to_value(&config).unwrap();
        assert_eq!(unknown_members(&body).unwrap(), Vec::<String>::new());
    }
}
