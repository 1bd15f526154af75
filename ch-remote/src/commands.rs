//! The command line and how each verb becomes one API call (method, path, body). Pure: no I/O
//! except reading the `create` config file, so the mapping is unit-tested.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};

/// One request to the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiCall {
    pub method: &'static str,
    /// Path under `/api/v1/`, with its query if any.
    pub op: String,
    /// JSON body.
    pub body: Option<String>,
}

impl ApiCall {
    fn get(op: &str) -> Self {
        ApiCall {
            method: "GET",
            op: op.to_owned(),
            body: None,
        }
    }

    fn put(op: &str) -> Self {
        ApiCall {
            method: "PUT",
            op: op.to_owned(),
            body: None,
        }
    }

    fn put_json(op: &str, body: Value) -> Self {
        ApiCall {
            method: "PUT",
            op: op.to_owned(),
            body: Some(body.to_string()),
        }
    }
}

/// A verb that cannot be turned into a request.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot read the VM config {path}: {source}")]
    ReadConfig {
        path: String,
        source: std::io::Error,
    },
    #[error("the VM config {path} is not valid JSON: {source}")]
    ConfigJson {
        path: String,
        source: serde_json::Error,
    },
    #[error("restore option {0:?}: expected key=value")]
    RestoreSyntax(String),
    #[error(
        "restore option {0:?} is not known (source_url, prefault, memory_restore_mode, resume)"
    )]
    RestoreUnknownKey(String),
    #[error("restore option {key}={value}: {expected}")]
    RestoreValue {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("restore needs source_url=URL")]
    RestoreNoSource,
}

#[derive(Debug, Parser)]
#[command(
    name = "ch-remote",
    version,
    about = "Remotely control a cloud-hypervisor (NV-Hypervisor) VMM through its API socket"
)]
pub struct Cli {
    /// Path of the VMM's API socket (`--api-socket` of cloud-hypervisor).
    #[arg(long = "api-socket", value_name = "PATH")]
    pub api_socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ping the VMM: version, build, pid, features.
    Ping,
    /// Information on the VM: state, config, memory size.
    Info,
    /// Per-device counters of the VM.
    Counters,
    /// Create a VM from a VmConfig JSON file (as `vm.create` takes it).
    Create {
        #[arg(value_name = "CONFIG_JSON")]
        path: PathBuf,
    },
    /// Boot the created VM.
    Boot,
    /// Pause the VM.
    Pause,
    /// Resume the paused VM.
    Resume,
    /// Shut the VM down.
    Shutdown,
    /// Shut the VMM process down.
    ShutdownVmm,
    /// Reboot the VM.
    Reboot,
    /// Press the VM's power button.
    PowerButton,
    /// Delete the VM.
    Delete,
    /// Snapshot the (paused) VM into a directory, e.g. file:///var/snap.
    Snapshot {
        #[arg(value_name = "DESTINATION_URL")]
        destination_url: String,
    },
    /// Restore a VM: source_url=file:///dir[,prefault=on][,memory_restore_mode=copy|ondemand][,resume=on]
    Restore {
        #[arg(value_name = "RESTORE_CONFIG")]
        config: String,
    },
    /// NV persistence: status, power-fail, suspend, recover, list.
    #[command(name = "nv-persist", subcommand)]
    NvPersist(NvCommand),
}

#[derive(Debug, Subcommand)]
pub enum NvCommand {
    /// The VM's NV region, persistence mode, last save and its phase timings.
    Status,
    /// Run the power-fail save now; the VMM exits after it.
    PowerFail,
    /// Planned suspend in place (host maintenance); the VMM exits cleanly after it.
    Suspend,
    /// Recover a VM in place from a region into this empty VMM.
    Recover {
        #[arg(long, value_name = "PATH")]
        region: String,
        #[arg(long, value_name = "NAME")]
        vm: String,
    },
    /// List the VMs stored in a region and their state.
    List {
        #[arg(long, value_name = "PATH")]
        region: String,
    },
}

impl Command {
    pub fn to_api_call(&self) -> Result<ApiCall, CommandError> {
        let call = match self {
            Command::Ping => ApiCall::get("vmm.ping"),
            Command::Info => ApiCall::get("vm.info"),
            Command::Counters => ApiCall::get("vm.counters"),
            Command::Create { path } => {
                let shown = path.display().to_string();
                let text =
                    std::fs::read_to_string(path).map_err(|source| CommandError::ReadConfig {
                        path: shown.clone(),
                        source,
                    })?;
                // Checked here so a typo is reported with the file's name, not as the server's 400.
                let config: Value =
                    serde_json::from_str(&text).map_err(|source| CommandError::ConfigJson {
                        path: shown,
                        source,
                    })?;
                ApiCall::put_json("vm.create", config)
            }
            Command::Boot => ApiCall::put("vm.boot"),
            Command::Pause => ApiCall::put("vm.pause"),
            Command::Resume => ApiCall::put("vm.resume"),
            Command::Shutdown => ApiCall::put("vm.shutdown"),
            Command::ShutdownVmm => ApiCall::put("vmm.shutdown"),
            Command::Reboot => ApiCall::put("vm.reboot"),
            Command::PowerButton => ApiCall::put("vm.power-button"),
            Command::Delete => ApiCall::put("vm.delete"),
            Command::Snapshot { destination_url } => {
                ApiCall::put_json("vm.snapshot", json!({ "destination_url": destination_url }))
            }
            Command::Restore { config } => {
                ApiCall::put_json("vm.restore", parse_restore_config(config)?)
            }
            Command::NvPersist(command) => match command {
                NvCommand::Status => ApiCall::get("vm.nv-status"),
                NvCommand::PowerFail => ApiCall::put("vm.power-fail"),
                NvCommand::Suspend => ApiCall::put("vm.nv-suspend"),
                NvCommand::Recover { region, vm } => {
                    ApiCall::put_json("vm.nv-recover", json!({ "region": region, "vm": vm }))
                }
                NvCommand::List { region } => ApiCall::get(&format!(
                    "vmm.nv-regions?region={}",
                    percent_encoding::utf8_percent_encode(region, QUERY_VALUE)
                )),
            },
        };
        Ok(call)
    }
}

/// Everything but unreserved characters is encoded, `/` included: the server decodes it back.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Upstream's restore option string -> the `RestoreConfig` JSON body.
pub fn parse_restore_config(text: &str) -> Result<Value, CommandError> {
    let mut body = Map::new();
    for option in text.split(',').filter(|option| !option.is_empty()) {
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| CommandError::RestoreSyntax(option.to_owned()))?;
        let parsed = match key {
            "source_url" => Value::String(value.to_owned()),
            "prefault" | "resume" => Value::Bool(parse_toggle(key, value)?),
            "memory_restore_mode" => Value::String(parse_restore_mode(value)?.to_owned()),
            _ => return Err(CommandError::RestoreUnknownKey(key.to_owned())),
        };
        body.insert(key.to_owned(), parsed);
    }
    match body.get("source_url") {
        Some(Value::String(url)) if !url.is_empty() => Ok(Value::Object(body)),
        _ => Err(CommandError::RestoreNoSource),
    }
}

fn parse_toggle(key: &str, value: &str) -> Result<bool, CommandError> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(CommandError::RestoreValue {
            key: key.to_owned(),
            value: value.to_owned(),
            expected: "expected on, off, true or false",
        }),
    }
}

fn parse_restore_mode(value: &str) -> Result<&'static str, CommandError> {
    match value.to_ascii_lowercase().as_str() {
        "copy" => Ok("Copy"),
        "ondemand" => Ok("OnDemand"),
        _ => Err(CommandError::RestoreValue {
            key: "memory_restore_mode".to_owned(),
            value: value.to_owned(),
            expected: "expected copy or ondemand",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_for(args: &[&str]) -> ApiCall {
        let mut argv = vec!["ch-remote", "--api-socket", "/tmp/api.sock"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .expect("arguments parse")
            .command
            .to_api_call()
            .expect("request builds")
    }

    #[test]
    fn body_less_verbs_map_to_upstream_paths_and_methods() {
        for (verb, method, op) in [
            ("ping", "GET", "vmm.ping"),
            ("info", "GET", "vm.info"),
            ("counters", "GET", "vm.counters"),
            ("boot", "PUT", "vm.boot"),
            ("pause", "PUT", "vm.pause"),
            ("resume", "PUT", "vm.resume"),
            ("shutdown", "PUT", "vm.shutdown"),
            ("shutdown-vmm", "PUT", "vmm.shutdown"),
            ("reboot", "PUT", "vm.reboot"),
            ("power-button", "PUT", "vm.power-button"),
            ("delete", "PUT", "vm.delete"),
        ] {
            let call = call_for(&[verb]);
            assert_eq!((call.method, call.op.as_str()), (method, op), "{verb}");
            assert_eq!(call.body, None, "{verb}");
        }
    }

    #[test]
    fn nv_persist_family() {
        assert_eq!(
            call_for(&["nv-persist", "status"]),
            ApiCall::get("vm.nv-status")
        );
        assert_eq!(
            call_for(&["nv-persist", "power-fail"]),
            ApiCall::put("vm.power-fail")
        );
        assert_eq!(
            call_for(&["nv-persist", "suspend"]),
            ApiCall::put("vm.nv-suspend")
        );
        let recover = call_for(&[
            "nv-persist",
            "recover",
            "--region",
            "/dev/dax0.0",
            "--vm",
            "db",
        ]);
        assert_eq!(recover.op, "vm.nv-recover");
        let body: Value = serde_json::from_str(recover.body.as_deref().unwrap()).unwrap();
        assert_eq!(body, json!({"region": "/dev/dax0.0", "vm": "db"}));
        let list = call_for(&["nv-persist", "list", "--region", "/tmp/my region&x=1"]);
        assert_eq!(list.method, "GET");
        assert_eq!(
            list.op,
            "vmm.nv-regions?region=%2Ftmp%2Fmy%20region%26x%3D1"
        );
        // Missing flags are usage errors, not requests.
        let argv = [
            "ch-remote",
            "--api-socket",
            "s",
            "nv-persist",
            "recover",
            "--vm",
            "a",
        ];
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[test]
    fn snapshot_and_create_bodies() {
        let snapshot = call_for(&["snapshot", "file:///var/snap"]);
        assert_eq!(
            serde_json::from_str::<Value>(snapshot.body.as_deref().unwrap()).unwrap(),
            json!({"destination_url": "file:///var/snap"})
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("vm.json");
        std::fs::write(&config, r#"{"payload": {"kernel": "/k"}}"#).unwrap();
        let create = call_for(&["create", config.to_str().unwrap()]);
        assert_eq!((create.method, create.op.as_str()), ("PUT", "vm.create"));
        assert!(create.body.unwrap().contains("/k"));

        std::fs::write(&config, "{not json").unwrap();
        let cli = Cli::try_parse_from([
            "ch-remote",
            "--api-socket",
            "s",
            "create",
            config.to_str().unwrap(),
        ])
        .unwrap();
        let error = cli.command.to_api_call().unwrap_err();
        assert!(error.to_string().contains("vm.json"), "{error}");
        let missing = Cli::try_parse_from([
            "ch-remote",
            "--api-socket",
            "s",
            "create",
            "/nonexistent.json",
        ])
        .unwrap();
        assert!(matches!(
            missing.command.to_api_call(),
            Err(CommandError::ReadConfig { .. })
        ));
    }

    #[test]
    fn restore_option_string() {
        assert_eq!(
            parse_restore_config("source_url=file:///snap").unwrap(),
            json!({"source_url": "file:///snap"})
        );
        assert_eq!(
            parse_restore_config(
                "source_url=file:///snap,prefault=on,memory_restore_mode=ondemand,resume=true"
            )
            .unwrap(),
            json!({"source_url": "file:///snap", "prefault": true,
                   "memory_restore_mode": "OnDemand", "resume": true})
        );
        assert!(matches!(
            parse_restore_config("prefault=on"),
            Err(CommandError::RestoreNoSource)
        ));
        assert!(matches!(
            parse_restore_config("source_url=file:///s,bogus=1"),
            Err(CommandError::RestoreUnknownKey(_))
        ));
        assert!(matches!(
            parse_restore_config("source_url=file:///s,resume=maybe"),
            Err(CommandError::RestoreValue { .. })
        ));
        assert!(matches!(
            parse_restore_config("source_url=file:///s,memory_restore_mode=lazy"),
            Err(CommandError::RestoreValue { .. })
        ));
        assert!(matches!(
            parse_restore_config("source_url"),
            Err(CommandError::RestoreSyntax(_))
        ));
        let call = call_for(&["restore", "source_url=file:///snap,resume=on"]);
        assert_eq!((call.method, call.op.as_str()), ("PUT", "vm.restore"));
    }

    #[test]
    fn api_socket_is_required() {
        assert!(Cli::try_parse_from(["ch-remote", "ping"]).is_err());
        assert!(Cli::try_parse_from(["ch-remote", "--api-socket", "s", "explode"]).is_err());
    }
}
