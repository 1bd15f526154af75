//! The command-line option parsers (the `option_parser` crate and the `parse` functions of
//! `vmm/src/config/parse.rs`). An input is one option string per line, in this order: `--cpus`,
//! `--memory`, two `--memory-zone`, `--disk`, `--serial`, `--console`, `--nv`, `--api-socket`,
//! `--event-monitor`, `--restore`, `--landlock-rules`; an empty line leaves the option out.
//!
//! Every refusal must name its option (the one-line message says what to fix), and a VM config
//! the command line accepts must be accepted, unchanged, by `vm.create` too.

use vmm::api::{build_api_request, ApiRequest};
use vmm::config::{
    ApiSocketConfig, ConfigError, EventMonitorConfig, RestoreConfig, VmConfig, VmOptionStrings,
};
use vmm::landlock::LandlockRule;

use crate::{message_kind, signature, text_seeds, Target};

pub struct CliTarget;

/// One of the parsers of an option that is not part of the VM config.
type OtherParser = fn(&str) -> Result<(), ConfigError>;

const OPTIONS: [&str; 12] = [
    "cpus",
    "memory",
    "memory-zone",
    "memory-zone",
    "disk",
    "serial",
    "console",
    "nv",
    "api-socket",
    "event-monitor",
    "restore",
    "landlock-rules",
];

fn check_names_option(error: &ConfigError, option: &str) -> Result<(), String> {
    let message = error.to_string();
    if message.starts_with("--") {
        Ok(())
    } else {
        Err(format!(
            "--{option} refusal does not name an option: {message}"
        ))
    }
}

impl Target for CliTarget {
    fn name(&self) -> &'static str {
        "cli"
    }

    fn seeds(&mut self) -> Vec<Vec<u8>> {
        text_seeds(&[
            "boot=2,max=2\nsize=0\nid=mem0,size=64M,file=/dev/shm/ram,shared=on\nid=mem1,size=2M\npath=/d.img,readonly=on,id=d0\nfile=/tmp/s.log\noff\n\npath=/tmp/api.sock\nfd=3\nsource_url=file:///tmp/s,resume=true,memory_restore_mode=ondemand\npath=/var/snap,access=rw",
            "boot=1\nsize=256M,shared=on\n\n\npath=/a\ntty\nnull\nregion=/dev/shm/r,vm=a,create=on,region_size=1G,deadline_ms=100\n/tmp/api.sock\npath=/tmp/ev\nsource_url=file:///s,prefault=on\npath=\"/a b\",access=r",
            "boot=1,topology=1:1:1:1\nsize=1G,hugepages=on\n\n\npath=/a,direct=on\npty\nsocket=/x\nregion=/r,vm=a,recover=on,force-cold=on\nfd=-1\nfd=x\nsource_url=http://x\npath=/x,access=x",
            "\nsize=12Q\n\n\n\n\n\n\n\n\n\n",
        ])
    }

    fn dictionary(&self) -> &'static [&'static [u8]] {
        &[
            b"boot=",
            b"max=",
            b"size=",
            b"shared=on",
            b"hugepages=on",
            b"prefault=off",
            b"id=",
            b"file=",
            b"path=",
            b"readonly=true",
            b"region=",
            b"vm=",
            b"create=on",
            b"recover=on",
            b"deadline_ms=",
            b"region_size=",
            b"fd=",
            b"source_url=file://",
            b"access=rw",
            b",",
            b"\"",
            b"[",
            b"]",
            b"=",
            b"K",
            b"M",
            b"G",
        ]
    }

    fn execute(&mut self, input: &[u8]) -> Result<u64, String> {
        // Command-line arguments are C strings: a NUL byte cannot reach the option parsers.
        let text = String::from_utf8_lossy(input).replace('\0', "");
        let mut lines: Vec<&str> = text.split('\n').collect();
        lines.resize(OPTIONS.len(), "");
        let given = |index: usize| Some(lines[index]).filter(|line| !line.is_empty());
        let options = VmOptionStrings {
            kernel: Some("/k"),
            cmdline: Some("console=ttyS0"),
            initramfs: None,
            cpus: given(0),
            memory: given(1),
            memory_zones: [given(2), given(3)].into_iter().flatten().collect(),
            disks: given(4).into_iter().collect(),
            serial: given(5),
            console: given(6),
            nv: given(7),
            ..Default::default()
        };
        let mut parts: Vec<String> = Vec::new();
        match VmConfig::from_options(&options) {
            Ok(Some(config)) => {
                config.validate().map_err(|e| {
                    format!("the command line accepted a config validate() refuses: {e}")
                })?;
                let json = serde_json::to_vec(&config).map_err(|e| e.to_string())?;
                match build_api_request("/api/v1/vm.create", &json, None) {
                    Some(Ok(ApiRequest::VmCreate(api))) if *api == config => {}
                    Some(Ok(other)) => {
                        return Err(format!(
                            "CLI config differs over the API: {config:?} -> {other:?}"
                        ))
                    }
                    Some(Err(error)) => {
                        return Err(format!(
                            "a config the command line accepts is refused by vm.create ({} {}): {}",
                            error.status,
                            error.message,
                            String::from_utf8_lossy(&json)
                        ))
                    }
                    None => return Err("vm.create has no route".into()),
                }
                parts.push("vm ok".into());
            }
            Ok(None) => return Err("a command line with --kernel describes no VM".into()),
            Err(error) => {
                check_names_option(&error, "vm")?;
                parts.push(message_kind(&error.to_string(), 3));
            }
        }
        let others: [(usize, OtherParser); 4] = [
            (8, |s| ApiSocketConfig::parse(s).map(|_| ())),
            (9, |s| EventMonitorConfig::parse(s).map(|_| ())),
            (10, |s| RestoreConfig::parse(s).map(|_| ())),
            (11, |s| LandlockRule::parse(s).map(|_| ())),
        ];
        for (index, parse) in others {
            if let Some(line) = given(index) {
                match parse(line) {
                    Ok(()) => parts.push(format!("{index} ok")),
                    Err(error) => {
                        check_names_option(&error, OPTIONS[index])?;
                        parts.push(format!("{index} {}", message_kind(&error.to_string(), 3)));
                    }
                }
            }
        }
        let borrowed: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
        Ok(signature(&borrowed))
    }
}
