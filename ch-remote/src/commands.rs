//! The command line and how each verb becomes one API call (method, path, body). Pure: the only
//! input besides the arguments is the `create` config, read from a file or from the reader given
//! for stdin, so the mapping is unit-tested.
//!
//! The verbs, their arguments and their bodies are upstream cloud-hypervisor v53's `ch-remote`'s,
//! so scripts written for upstream work unchanged; `nv-persist ...` is ours.

use std::io::Read;

use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};

use crate::option_syntax::{self, Syntax, SyntaxError};
use crate::region_commands::RegionAction;

pub use api_client::ApiCall;

/// A `PUT` with a JSON body, sent as `serde_json` writes it (compact), as upstream does.
fn put_json(op: &str, body: Value) -> ApiCall {
    ApiCall::put_body(op, body.to_string())
}

/// A verb whose arguments cannot be turned into a request. The messages are upstream's; the
/// cause follows as the error's source.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("Error parsing {what} syntax")]
    Syntax {
        what: &'static str,
        #[source]
        source: SyntaxError,
    },
    #[error("Error parsing CPU count")]
    InvalidCpuCount(#[source] std::num::ParseIntError),
    #[error("Error parsing memory size")]
    InvalidMemorySize(#[source] SizeError),
    #[error("Error parsing balloon size")]
    InvalidBalloonSize(#[source] SizeError),
    #[error("Error parsing disk size")]
    InvalidDiskSize(#[source] SizeError),
    #[error("Error reading from stdin")]
    ReadingStdin(#[source] std::io::Error),
    #[error("--path must name a file")]
    EmptyPath,
    #[error("the path {0:?} is not valid UTF-8")]
    NotUtf8(String),
    #[error("Error reading the current directory")]
    CurrentDir(#[source] std::io::Error),
    #[error("Error reading from file {path}")]
    ReadingFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A byte size that is not `N`, `NK`, `NM` or `NG`.
#[derive(Debug, thiserror::Error)]
#[error("invalid size {0:?}: expected bytes, optionally with a K, M or G suffix")]
pub struct SizeError(String);

#[derive(Debug, Parser)]
#[command(
    name = "ch-remote",
    version,
    about = "Remotely control a cloud-hypervisor (NV-Hypervisor) VMM through its API socket",
    arg_required_else_help = true
)]
pub struct Cli {
    /// HTTP API socket path (UNIX domain socket).
    #[arg(long = "api-socket", value_name = "PATH")]
    pub api_socket: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add a VFIO device: path=<device_path>[,iommu=on|off][,id=<id>][,pci_segment=<n>]
    AddDevice {
        #[arg(value_name = "DEVICE_CONFIG")]
        config: String,
    },
    /// Add a block device: path=<image>[,readonly=on|off][,direct=on|off][,id=<id>]...
    AddDisk {
        #[arg(value_name = "DISK_CONFIG")]
        config: String,
    },
    /// Add a virtio-fs device: tag=<tag>,socket=<path>[,num_queues=<n>][,queue_size=<n>]...
    AddFs {
        #[arg(value_name = "FS_CONFIG")]
        config: String,
    },
    /// Add a network device: tap=<if>[,mac=<mac>][,ip=<ip>][,mask=<mask>][,num_queues=<n>]...
    AddNet {
        #[arg(value_name = "NET_CONFIG")]
        config: String,
    },
    /// Add a persistent memory device: file=<path>[,size=<size>][,discard_writes=on|off]...
    AddPmem {
        #[arg(value_name = "PMEM_CONFIG")]
        config: String,
    },
    /// Add a userspace (vfio-user) device: socket=<path>[,id=<id>][,pci_segment=<n>]
    AddUserDevice {
        #[arg(value_name = "DEVICE_CONFIG")]
        config: String,
    },
    /// Add a vDPA device: path=<device_path>[,num_queues=<n>][,iommu=on|off][,id=<id>]...
    AddVdpa {
        #[arg(value_name = "VDPA_CONFIG")]
        config: String,
    },
    /// Add a vsock device: cid=<cid>,socket=<path>[,iommu=on|off][,id=<id>]...
    AddVsock {
        #[arg(value_name = "VSOCK_CONFIG")]
        config: String,
    },
    /// Boot a created VM.
    Boot,
    /// Write a coredump of the VM to file://<path>.
    Coredump {
        #[arg(value_name = "FILE_PATH")]
        destination_url: String,
    },
    /// Counters from the VM.
    Counters,
    /// Create a VM from a JSON configuration (a file, or stdin when absent or `-`).
    Create {
        #[arg(value_name = "PATH", default_value = "-")]
        path: String,
    },
    /// Delete the VM.
    Delete,
    /// Information on the VM.
    Info,
    /// Inject an NMI.
    Nmi,
    /// Pause the VM.
    Pause,
    /// Ping the VMM to check that its API server answers.
    Ping,
    /// Press the VM's power button.
    PowerButton,
    /// Reboot the VM.
    Reboot,
    /// Receive a migration: receiver_url=<unix:PATH|tcp:HOST:PORT>[,tls_dir=<dir>][,memory_mode=precopy|postcopy]
    ReceiveMigration {
        #[arg(value_name = "RECEIVE_MIGRATION_CONFIG")]
        config: String,
    },
    /// Remove a device by its id.
    RemoveDevice {
        #[arg(value_name = "DEVICE_ID")]
        id: String,
    },
    /// Resize the VM: vCPUs, memory, balloon.
    Resize {
        /// New balloon size in bytes (K/M/G suffix).
        #[arg(long, value_name = "SIZE")]
        balloon: Option<String>,
        /// New vCPU count.
        #[arg(long, value_name = "COUNT")]
        cpus: Option<String>,
        /// New memory size in bytes (K/M/G suffix).
        #[arg(long, value_name = "SIZE")]
        memory: Option<String>,
    },
    /// Resize a disk.
    ResizeDisk {
        /// Disk identifier.
        #[arg(long, visible_alias = "id", value_name = "ID")]
        disk: String,
        /// New disk size in bytes (K/M/G suffix).
        #[arg(long, value_name = "SIZE")]
        size: String,
    },
    /// Resize a memory zone.
    ResizeZone {
        /// Memory zone identifier.
        #[arg(long, value_name = "ID")]
        id: String,
        /// New zone size in bytes (K/M/G suffix).
        #[arg(long, value_name = "SIZE")]
        size: String,
    },
    /// Restore a VM: source_url=file://<dir>[,prefault=on|off][,memory_restore_mode=copy|ondemand][,resume=on|off]
    Restore {
        #[arg(value_name = "RESTORE_CONFIG")]
        config: String,
    },
    /// Resume the paused VM.
    Resume,
    /// Send a migration: destination_url=<unix:PATH|tcp:HOST:PORT>[,local=on|off][,downtime_ms=<ms>]...
    SendMigration {
        #[arg(value_name = "SEND_MIGRATION_CONFIG")]
        config: String,
        /// Send memory without copying (UNIX socket migration); same as local=on.
        #[arg(long)]
        local: bool,
    },
    /// Shut the VM down.
    Shutdown,
    /// Shut the VMM down.
    ShutdownVmm,
    /// Snapshot the (paused) VM into a directory: file://<dir>.
    Snapshot {
        #[arg(value_name = "DESTINATION_URL")]
        destination_url: String,
    },
    /// NV persistence: status, power-fail, suspend, recover, list, swap-out, swap-in,
    /// checkpoint.
    #[command(name = "nv-persist", subcommand)]
    NvPersist(NvCommand),
}

#[derive(Debug, Subcommand)]
pub enum NvCommand {
    /// The VM's NV region, persistence mode, last save and its phase timings.
    Status,
    /// Run the power-fail save now; the VMM exits after it. With --region (no --api-socket):
    /// send SIGPWR to every live VMM of the region and wait for each VM's committed save.
    PowerFail {
        /// Every VM of this region instead of the VMM at --api-socket.
        #[arg(long, value_name = "PATH")]
        region: Option<String>,
        /// How long to wait for the saves (with --region), in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 10_000, requires = "region")]
        timeout_ms: u64,
    },
    /// Planned suspend in place (host maintenance); the VMM exits cleanly after it.
    Suspend,
    /// Recover a VM in place from a region into this empty VMM.
    Recover {
        #[arg(long, value_name = "PATH")]
        region: String,
        #[arg(long, value_name = "NAME")]
        vm: String,
    },
    /// List the VMs stored in a region and their state (without --api-socket: read the region
    /// directly, read-only).
    List {
        #[arg(long, value_name = "PATH")]
        region: String,
    },
    /// Swap the VM out to a new file and free its NV memory; the VMM exits after it.
    SwapOut {
        #[arg(long, value_name = "FILE")]
        path: String,
    },
    /// Swap a swapped-out VM back in from its file into this empty VMM and resume it.
    SwapIn {
        #[arg(long, value_name = "FILE")]
        path: String,
        /// The region to swap into (default: the one recorded in the file).
        #[arg(long, value_name = "PATH")]
        region: Option<String>,
        /// Keep the swap file after the swap-in (default: remove it).
        #[arg(long)]
        keep: bool,
    },
    /// Take an epoch checkpoint every N milliseconds (0: off), so the VM survives a failure
    /// without warning, losing at most one interval.
    Checkpoint {
        #[arg(long, value_name = "N")]
        interval_ms: u64,
    },
}

impl Command {
    /// The verb when it works on a region itself rather than through a VMM's API: `power-fail
    /// --region` always, `list` when no API socket is given.
    pub fn region_action(&self, has_api_socket: bool) -> Option<RegionAction> {
        match self {
            Command::NvPersist(NvCommand::PowerFail {
                region: Some(region),
                timeout_ms,
            }) => Some(RegionAction::PowerFail {
                region: region.clone(),
                timeout: std::time::Duration::from_millis(*timeout_ms),
            }),
            Command::NvPersist(NvCommand::List { region }) if !has_api_socket => {
                Some(RegionAction::List {
                    region: region.clone(),
                })
            }
            _ => None,
        }
    }

    /// The request for this verb; `stdin` is read only by `create` without a path or with `-`.
    pub fn to_api_call(&self, stdin: &mut dyn Read) -> Result<ApiCall, CommandError> {
        let call = match self {
            Command::AddDevice { config } => {
                add("vm.add-device", "device", &option_syntax::DEVICE, config)?
            }
            Command::AddDisk { config } => {
                add("vm.add-disk", "disk", &option_syntax::DISK, config)?
            }
            Command::AddFs { config } => {
                add("vm.add-fs", "filesystem", &option_syntax::FS, config)?
            }
            Command::AddNet { config } => {
                // As upstream: the descriptors leave the body and travel with the request, since
                // their numbers mean nothing in the VMM's process.
                let mut body = parse("network", &option_syntax::NET, config)?;
                let fds = body
                    .remove("fds")
                    .and_then(|fds| {
                        serde_json::from_value::<Vec<std::os::unix::io::RawFd>>(fds).ok()
                    })
                    .unwrap_or_default();
                ApiCall {
                    fds,
                    ..put_json("vm.add-net", Value::Object(body))
                }
            }
            Command::AddPmem { config } => add(
                "vm.add-pmem",
                "persistent memory",
                &option_syntax::PMEM,
                config,
            )?,
            Command::AddUserDevice { config } => add(
                "vm.add-user-device",
                "user device",
                &option_syntax::USER_DEVICE,
                config,
            )?,
            Command::AddVdpa { config } => {
                add("vm.add-vdpa", "vDPA device", &option_syntax::VDPA, config)?
            }
            Command::AddVsock { config } => {
                add("vm.add-vsock", "vsock", &option_syntax::VSOCK, config)?
            }
            Command::Boot => ApiCall::put("vm.boot"),
            Command::Coredump { destination_url } => {
                put_json("vm.coredump", json!({ "destination_url": destination_url }))
            }
            Command::Counters => ApiCall::get("vm.counters"),
            Command::Create { path } => ApiCall {
                method: "PUT",
                op: "vm.create".to_owned(),
                // Sent as read, as upstream does: the VMM reports a config it cannot take.
                body: Some(read_config(path, stdin)?),
                fds: Vec::new(),
            },
            Command::Delete => ApiCall::put("vm.delete"),
            Command::Info => ApiCall::get("vm.info"),
            Command::Nmi => ApiCall::put("vm.nmi"),
            Command::Pause => ApiCall::put("vm.pause"),
            Command::Ping => ApiCall::get("vmm.ping"),
            Command::PowerButton => ApiCall::put("vm.power-button"),
            Command::Reboot => ApiCall::put("vm.reboot"),
            Command::ReceiveMigration { config } => put_json(
                "vm.receive-migration",
                Value::Object(parse(
                    "receive-migration",
                    &option_syntax::RECEIVE_MIGRATION,
                    config,
                )?),
            ),
            Command::RemoveDevice { id } => put_json("vm.remove-device", json!({ "id": id })),
            Command::Resize {
                balloon,
                cpus,
                memory,
            } => {
                let desired_vcpus = cpus
                    .as_deref()
                    .map(|cpus| cpus.trim().parse::<u8>())
                    .transpose()
                    .map_err(CommandError::InvalidCpuCount)?;
                let desired_ram = memory
                    .as_deref()
                    .map(byte_size)
                    .transpose()
                    .map_err(CommandError::InvalidMemorySize)?;
                let desired_balloon = balloon
                    .as_deref()
                    .map(byte_size)
                    .transpose()
                    .map_err(CommandError::InvalidBalloonSize)?;
                // Upstream sends every member, `null` for the ones not given.
                put_json(
                    "vm.resize",
                    json!({
                        "desired_vcpus": desired_vcpus,
                        "desired_ram": desired_ram,
                        "desired_balloon": desired_balloon,
                    }),
                )
            }
            Command::ResizeDisk { disk, size } => put_json(
                "vm.resize-disk",
                json!({
                    "id": disk,
                    "desired_size": byte_size(size).map_err(CommandError::InvalidDiskSize)?,
                }),
            ),
            Command::ResizeZone { id, size } => put_json(
                "vm.resize-zone",
                json!({
                    "id": id,
                    "desired_ram": byte_size(size).map_err(CommandError::InvalidMemorySize)?,
                }),
            ),
            Command::Restore { config } => put_json(
                "vm.restore",
                Value::Object(parse("restore", &option_syntax::RESTORE, config)?),
            ),
            Command::Resume => ApiCall::put("vm.resume"),
            Command::SendMigration { config, local } => {
                let mut body = parse("send-migration", &option_syntax::SEND_MIGRATION, config)?;
                if *local {
                    body.insert("local".to_owned(), Value::Bool(true));
                }
                body.entry("local").or_insert(Value::Bool(false));
                put_json("vm.send-migration", Value::Object(body))
            }
            Command::Shutdown => ApiCall::put("vm.shutdown"),
            Command::ShutdownVmm => ApiCall::put("vmm.shutdown"),
            Command::Snapshot { destination_url } => {
                put_json("vm.snapshot", json!({ "destination_url": destination_url }))
            }
            Command::NvPersist(command) => match command {
                NvCommand::Status => ApiCall::get("vm.nv-status"),
                NvCommand::PowerFail { .. } => ApiCall::put("vm.power-fail"),
                NvCommand::Suspend => ApiCall::put("vm.nv-suspend"),
                NvCommand::Recover { region, vm } => {
                    put_json("vm.nv-recover", json!({ "region": region, "vm": vm }))
                }
                NvCommand::List { region } => ApiCall::get(&format!(
                    "vmm.nv-regions?region={}",
                    percent_encoding::utf8_percent_encode(region, QUERY_VALUE)
                )),
                NvCommand::SwapOut { path } => put_json(
                    "vm.nv-swap-out",
                    json!({ "destination_url": swap_file_url(path)? }),
                ),
                NvCommand::SwapIn { path, region, keep } => {
                    let mut body = json!({ "source_url": swap_file_url(path)?, "keep": keep });
                    if let Some(region) = region {
                        body["region"] = json!(absolute(region)?);
                    }
                    put_json("vm.nv-swap-in", body)
                }
                NvCommand::Checkpoint { interval_ms } => {
                    put_json("vm.nv-checkpoint", json!({ "interval_ms": interval_ms }))
                }
            },
        };
        Ok(call)
    }
}

/// A path as the VMM must get it: absolute (the VMM's working directory is not ours).
fn absolute(path: &str) -> Result<String, CommandError> {
    if path.is_empty() {
        return Err(CommandError::EmptyPath);
    }
    let absolute = std::path::absolute(path).map_err(CommandError::CurrentDir)?;
    absolute
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| CommandError::NotUtf8(path.to_owned()))
}

/// `--path FILE` as the `file:///absolute/path` URL of the swap requests.
fn swap_file_url(path: &str) -> Result<String, CommandError> {
    Ok(format!("file://{}", absolute(path)?))
}

fn parse(
    what: &'static str,
    syntax: &Syntax,
    text: &str,
) -> Result<Map<String, Value>, CommandError> {
    syntax
        .parse(text)
        .map_err(|source| CommandError::Syntax { what, source })
}

fn add(op: &str, what: &'static str, syntax: &Syntax, text: &str) -> Result<ApiCall, CommandError> {
    Ok(put_json(op, Value::Object(parse(what, syntax, text)?)))
}

fn byte_size(text: &str) -> Result<u64, SizeError> {
    option_parser::parse_byte_size(text).map_err(|_| SizeError(text.to_owned()))
}

fn read_config(path: &str, stdin: &mut dyn Read) -> Result<String, CommandError> {
    let mut text = String::new();
    if path == "-" {
        stdin
            .read_to_string(&mut text)
            .map_err(CommandError::ReadingStdin)?;
    } else {
        text = std::fs::read_to_string(path).map_err(|source| CommandError::ReadingFile {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(text)
}

/// Everything but unreserved characters is encoded, `/` included: the server decodes it back.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    fn try_call(args: &[&str], stdin: &str) -> Result<ApiCall, CommandError> {
        let mut argv = vec!["ch-remote", "--api-socket", "/tmp/api.sock"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .expect("arguments parse")
            .command
            .to_api_call(&mut stdin.as_bytes())
    }

    fn call_for(args: &[&str]) -> ApiCall {
        try_call(args, "").expect("request builds")
    }

    fn body_of(call: &ApiCall) -> Value {
        serde_json::from_str(call.body.as_deref().expect("a body")).expect("JSON body")
    }

    /// `args` build a `PUT /api/v1/<op>` whose JSON body is `body`.
    fn assert_put(args: &[&str], op: &str, body: Value) {
        let call = call_for(args);
        assert_eq!((call.method, call.op.as_str()), ("PUT", op), "{args:?}");
        assert_eq!(body_of(&call), body, "{args:?}");
    }

    fn usage_error(args: &[&str]) -> ErrorKind {
        let mut argv = vec!["ch-remote", "--api-socket", "s"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect_err("usage error").kind()
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
            ("nmi", "PUT", "vm.nmi"),
        ] {
            let call = call_for(&[verb]);
            assert_eq!((call.method, call.op.as_str()), (method, op), "{verb}");
            assert_eq!(call.body, None, "{verb}");
        }
    }

    #[test]
    fn add_verbs_send_their_config_as_json() {
        for (args, op, body) in [
            (
                ["add-disk", "path=/img/d.raw,readonly=on,id=d1"],
                "vm.add-disk",
                json!({"path": "/img/d.raw", "readonly": true, "id": "d1"}),
            ),
            (
                ["add-net", "tap=tap1,mac=aa:bb:cc:dd:ee:ff,num_queues=2"],
                "vm.add-net",
                json!({"tap": "tap1", "mac": "aa:bb:cc:dd:ee:ff", "num_queues": 2}),
            ),
            (
                [
                    "add-fs",
                    "tag=share,socket=/run/fs.sock,num_queues=1,queue_size=512",
                ],
                "vm.add-fs",
                json!({"tag": "share", "socket": "/run/fs.sock", "num_queues": 1,
                       "queue_size": 512}),
            ),
            (
                ["add-pmem", "file=/pmem.img,size=1G,discard_writes=on"],
                "vm.add-pmem",
                json!({"file": "/pmem.img", "size": 1u64 << 30, "discard_writes": true}),
            ),
            (
                ["add-vsock", "cid=3,socket=/run/vsock.sock,id=v0"],
                "vm.add-vsock",
                json!({"cid": 3, "socket": "/run/vsock.sock", "id": "v0"}),
            ),
            (
                ["add-vdpa", "path=/dev/vhost-vdpa-0,num_queues=2"],
                "vm.add-vdpa",
                json!({"path": "/dev/vhost-vdpa-0", "num_queues": 2}),
            ),
            (
                [
                    "add-device",
                    "path=/sys/bus/pci/devices/0000:01:00.0/,iommu=on",
                ],
                "vm.add-device",
                json!({"path": "/sys/bus/pci/devices/0000:01:00.0/", "iommu": true}),
            ),
            (
                ["add-user-device", "socket=/run/vfio-user.sock,id=u0"],
                "vm.add-user-device",
                json!({"socket": "/run/vfio-user.sock", "id": "u0"}),
            ),
        ] {
            assert_put(&args, op, body);
        }
    }

    #[test]
    fn add_net_passes_its_descriptors_beside_the_body() {
        let call = call_for(&["add-net", "fd=[3,4],mac=12:34:56:78:9a:bc,id=net1"]);
        assert_eq!(call.fds, vec![3, 4]);
        assert_eq!(
            body_of(&call),
            json!({"mac": "12:34:56:78:9a:bc", "id": "net1"})
        );
        assert!(call_for(&["add-net", "tap=tap0"]).fds.is_empty());
    }

    #[test]
    fn add_verbs_refuse_bad_syntax_before_sending() {
        for (args, what) in [
            (["add-disk", "path=/a,nope=1"], "disk"),
            (["add-net", "mac=zz"], "network"),
            (["add-fs", "tag=x"], "filesystem"),
            (["add-pmem", "size=1G"], "persistent memory"),
            (["add-vsock", "cid=x,socket=/s"], "vsock"),
            (["add-vdpa", "num_queues=1"], "vDPA device"),
            (["add-device", "iommu=on"], "device"),
            (["add-user-device", "id=x"], "user device"),
        ] {
            let error = try_call(&args, "").unwrap_err();
            assert_eq!(error.to_string(), format!("Error parsing {what} syntax"));
            assert!(
                std::error::Error::source(&error).is_some(),
                "{args:?}: the cause follows"
            );
        }
    }

    #[test]
    fn positional_arguments_are_required() {
        for verb in [
            "add-device",
            "add-disk",
            "add-fs",
            "add-net",
            "add-pmem",
            "add-user-device",
            "add-vdpa",
            "add-vsock",
            "coredump",
            "receive-migration",
            "remove-device",
            "restore",
            "send-migration",
            "snapshot",
        ] {
            assert_eq!(
                usage_error(&[verb]),
                ErrorKind::MissingRequiredArgument,
                "{verb}"
            );
        }
        assert_eq!(
            usage_error(&["resize-zone", "--id", "z"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            usage_error(&["resize-disk", "--size", "1G"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(usage_error(&["explode"]), ErrorKind::InvalidSubcommand);
        assert_eq!(usage_error(&["ping", "extra"]), ErrorKind::UnknownArgument);
        assert_eq!(usage_error(&["resize", "--cpus"]), ErrorKind::InvalidValue);
        // No arguments at all: the help, as a usage error (exit 2).
        assert_eq!(
            Cli::try_parse_from(["ch-remote"]).unwrap_err().kind(),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
        // --api-socket is checked by main, after parsing (exit 1, as upstream).
        assert!(Cli::try_parse_from(["ch-remote", "ping"])
            .unwrap()
            .api_socket
            .is_none());
    }

    #[test]
    fn resize_family() {
        assert_put(
            &["resize", "--cpus", "2", "--memory", "1G"],
            "vm.resize",
            json!({"desired_vcpus": 2, "desired_ram": 1u64 << 30, "desired_balloon": null}),
        );
        assert_eq!(
            body_of(&call_for(&["resize", "--balloon", "512M"])),
            json!({"desired_vcpus": null, "desired_ram": null, "desired_balloon": 512u64 << 20})
        );
        assert!(matches!(
            try_call(&["resize", "--cpus", "two"], ""),
            Err(CommandError::InvalidCpuCount(_))
        ));
        assert!(matches!(
            try_call(&["resize", "--memory", "1X"], ""),
            Err(CommandError::InvalidMemorySize(_))
        ));
        assert!(matches!(
            try_call(&["resize", "--balloon", "1.5G"], ""),
            Err(CommandError::InvalidBalloonSize(_))
        ));

        let zone = call_for(&["resize-zone", "--id", "mem0", "--size", "2G"]);
        assert_eq!(zone.op, "vm.resize-zone");
        assert_eq!(
            body_of(&zone),
            json!({"id": "mem0", "desired_ram": 2u64 << 30})
        );
        assert!(matches!(
            try_call(&["resize-zone", "--id", "mem0", "--size", "big"], ""),
            Err(CommandError::InvalidMemorySize(_))
        ));

        for flag in ["--disk", "--id"] {
            let disk = call_for(&["resize-disk", flag, "disk0", "--size", "10G"]);
            assert_eq!(disk.op, "vm.resize-disk");
            assert_eq!(
                body_of(&disk),
                json!({"id": "disk0", "desired_size": 10u64 << 30})
            );
        }
    }

    #[test]
    fn single_value_verbs() {
        assert_put(
            &["remove-device", "_disk0"],
            "vm.remove-device",
            json!({"id": "_disk0"}),
        );
        assert_put(
            &["snapshot", "file:///var/snap"],
            "vm.snapshot",
            json!({"destination_url": "file:///var/snap"}),
        );
        assert_put(
            &["coredump", "file:///var/core"],
            "vm.coredump",
            json!({"destination_url": "file:///var/core"}),
        );
    }

    #[test]
    fn create_reads_a_file_or_stdin_and_sends_it_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("vm.json");
        std::fs::write(&config, r#"{"payload": {"kernel": "/k"}}"#).unwrap();
        let create = call_for(&["create", config.to_str().unwrap()]);
        assert_eq!((create.method, create.op.as_str()), ("PUT", "vm.create"));
        assert_eq!(
            create.body.as_deref(),
            Some(r#"{"payload": {"kernel": "/k"}}"#)
        );

        for args in [&["create"][..], &["create", "-"]] {
            let from_stdin = try_call(args, "{\"cpus\":{}}\n").unwrap();
            assert_eq!(
                from_stdin.body.as_deref(),
                Some("{\"cpus\":{}}\n"),
                "{args:?}"
            );
        }
        // Not JSON: sent anyway, the VMM's answer tells (as upstream).
        assert_eq!(
            try_call(&["create"], "{not json").unwrap().body.as_deref(),
            Some("{not json")
        );

        match try_call(&["create", "/nonexistent/vm.json"], "") {
            Err(error @ CommandError::ReadingFile { .. }) => {
                assert!(
                    error.to_string().contains("/nonexistent/vm.json"),
                    "{error}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn restore_option_string() {
        assert_eq!(
            body_of(&call_for(&["restore", "source_url=file:///snap"])),
            json!({"source_url": "file:///snap"})
        );
        assert_put(
            &[
                "restore",
                "source_url=file:///snap,prefault=on,memory_restore_mode=ondemand,resume=true",
            ],
            "vm.restore",
            json!({"source_url": "file:///snap", "prefault": true,
                   "memory_restore_mode": "OnDemand", "resume": true}),
        );
        for bad in [
            "prefault=on",
            "source_url=file:///s,bogus=1",
            "source_url=file:///s,resume=maybe",
            "source_url=file:///s,memory_restore_mode=lazy",
            "source_url",
        ] {
            let error = try_call(&["restore", bad], "").unwrap_err();
            assert_eq!(error.to_string(), "Error parsing restore syntax", "{bad}");
        }
    }

    #[test]
    fn migrations() {
        assert_put(
            &["receive-migration", "receiver_url=unix:/tmp/mig.sock"],
            "vm.receive-migration",
            json!({"receiver_url": "unix:/tmp/mig.sock"}),
        );
        assert_eq!(
            body_of(&call_for(&[
                "receive-migration",
                "receiver_url=tcp:0.0.0.0:6000,tls_dir=/tls,memory_mode=postcopy"
            ])),
            json!({"receiver_url": "tcp:0.0.0.0:6000", "tls_dir": "/tls",
                   "memory_mode": "Postcopy"})
        );
        // The bare URL is refused here, before anything is sent.
        let bare = try_call(&["receive-migration", "unix:/tmp/mig.sock"], "").unwrap_err();
        assert_eq!(bare.to_string(), "Error parsing receive-migration syntax");

        assert_put(
            &[
                "send-migration",
                "destination_url=unix:/tmp/mig.sock,local=true",
            ],
            "vm.send-migration",
            json!({"destination_url": "unix:/tmp/mig.sock", "local": true}),
        );
        assert_eq!(
            body_of(&call_for(&[
                "send-migration",
                "destination_url=tcp:10.0.0.2:6000,downtime_ms=200,timeout_s=60,\
                 timeout_strategy=ignore,connections=4,memory_mode=precopy"
            ])),
            json!({"destination_url": "tcp:10.0.0.2:6000", "local": false,
                   "downtime_ms": 200, "timeout_s": 60, "timeout_strategy": "Ignore",
                   "connections": 4, "memory_mode": "Precopy"})
        );
        assert_eq!(
            body_of(&call_for(&[
                "send-migration",
                "--local",
                "destination_url=unix:/s"
            ]))["local"],
            json!(true)
        );
        assert!(try_call(&["send-migration", "unix:/tmp/mig.sock"], "").is_err());
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
        // `recover --region --vm` -> PUT vm.nv-recover with its body: the verb table of
        // tests/against_api_server.rs checks it on the wire.
        let list = call_for(&["nv-persist", "list", "--region", "/tmp/my region&x=1"]);
        assert_eq!(list.method, "GET");
        assert_eq!(
            list.op,
            "vmm.nv-regions?region=%2Ftmp%2Fmy%20region%26x%3D1"
        );
        // Missing flags are usage errors, not requests.
        assert_eq!(
            usage_error(&["nv-persist", "recover", "--vm", "a"]),
            ErrorKind::MissingRequiredArgument
        );
    }

    fn region_action_of(argv: &[&str]) -> Option<RegionAction> {
        let cli = Cli::try_parse_from(argv).expect("arguments parse");
        cli.command.region_action(cli.api_socket.is_some())
    }

    #[test]
    fn region_verbs_work_without_a_socket() {
        assert_eq!(
            region_action_of(&["ch-remote", "nv-persist", "power-fail", "--region", "/r"]),
            Some(RegionAction::PowerFail {
                region: "/r".into(),
                timeout: std::time::Duration::from_secs(10),
            })
        );
        assert_eq!(
            region_action_of(&[
                "ch-remote",
                "nv-persist",
                "power-fail",
                "--region",
                "/r",
                "--timeout-ms",
                "250"
            ]),
            Some(RegionAction::PowerFail {
                region: "/r".into(),
                timeout: std::time::Duration::from_millis(250),
            })
        );
        // Without --region, power-fail is the API call to one VMM; a timeout alone is a mistake.
        assert_eq!(
            region_action_of(&["ch-remote", "--api-socket", "s", "nv-persist", "power-fail"]),
            None
        );
        assert_eq!(
            usage_error(&["nv-persist", "power-fail", "--timeout-ms", "5"]),
            ErrorKind::MissingRequiredArgument
        );
        // list reads the region itself without a socket, and asks the VMM with one.
        assert_eq!(
            region_action_of(&["ch-remote", "nv-persist", "list", "--region", "/r"]),
            Some(RegionAction::List {
                region: "/r".into()
            })
        );
        assert_eq!(
            region_action_of(&[
                "ch-remote",
                "--api-socket",
                "s",
                "nv-persist",
                "list",
                "--region",
                "/r"
            ]),
            None
        );
    }

    #[test]
    fn nv_persist_checkpoint_verb() {
        assert_put(
            &["nv-persist", "checkpoint", "--interval-ms", "10"],
            "vm.nv-checkpoint",
            json!({ "interval_ms": 10 }),
        );
        assert_put(
            &["nv-persist", "checkpoint", "--interval-ms", "0"],
            "vm.nv-checkpoint",
            json!({ "interval_ms": 0 }),
        );
        assert_eq!(
            usage_error(&["nv-persist", "checkpoint"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            usage_error(&["nv-persist", "checkpoint", "--interval-ms", "ten"]),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn nv_persist_swap_verbs() {
        assert_put(
            &["nv-persist", "swap-out", "--path", "/swap/web 1.nvswap"],
            "vm.nv-swap-out",
            json!({ "destination_url": "file:///swap/web 1.nvswap" }),
        );
        assert_put(
            &["nv-persist", "swap-in", "--path", "/swap/a"],
            "vm.nv-swap-in",
            json!({ "source_url": "file:///swap/a", "keep": false }),
        );
        assert_put(
            &[
                "nv-persist",
                "swap-in",
                "--path",
                "/swap/a",
                "--region",
                "/dev/shm/r",
                "--keep",
            ],
            "vm.nv-swap-in",
            json!({ "source_url": "file:///swap/a", "region": "/dev/shm/r", "keep": true }),
        );
        // A relative path is made absolute here: the VMM runs elsewhere.
        let relative = body_of(&call_for(&["nv-persist", "swap-out", "--path", "a.swap"]));
        let expected = std::env::current_dir().unwrap().join("a.swap");
        assert_eq!(
            relative["destination_url"],
            format!("file://{}", expected.display())
        );
        assert!(matches!(
            try_call(&["nv-persist", "swap-out", "--path", ""], ""),
            Err(CommandError::EmptyPath)
        ));
        assert_eq!(
            usage_error(&["nv-persist", "swap-out"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            usage_error(&["nv-persist", "swap-in", "--region", "/r"]),
            ErrorKind::MissingRequiredArgument
        );
    }
}
