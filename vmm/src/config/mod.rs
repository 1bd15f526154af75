//! VM configuration, in three rooms: [`model`], the serde shape of the upstream `VmConfig` (REST
//! API body of `vm.create`, `config.json` of a snapshot, `vm.info`) with upstream's defaults;
//! `parse`, the cloud-hypervisor v53 command-line option strings (`key=value,key=value`, syntax
//! from the `option_parser` crate); `validate`, what this VMM can honour.
//!
//! Every member upstream v53 has is modelled with upstream's name, type and default, so a config
//! upstream wrote (its `vm.info`, its snapshot `config.json`) reads back whole and `vm.info` prints
//! every member as upstream does; `Option`s that are unset are left out. What this VMM can honour
//! is decided in one place, [`VmConfig::validate`], for the command line and JSON alike: a member
//! we do not implement passes at its default value and is refused, by name, at any other.

pub mod model;
mod parse;
#[cfg(test)]
mod tests;
mod validate;

pub use model::*;
pub use option_parser::OptionError;
pub use parse::{
    format_mac, parse_mac, random_mac, snapshot_url_dir, swap_file_url_path, VmOptionStrings,
    SNAPSHOT_URL_EXPECTED, SWAP_URL_EXPECTED,
};
pub use validate::{host_vcpu_limit, unimplemented_device, vhost_user_mode, VcpuLimit};

/// A configuration that cannot be used, from the command line or JSON. Every variant names the
/// option (without its dashes) and the offending key or value, so that the one-line message says
/// what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The option string itself (syntax, keys) or one value of it.
    #[error(transparent)]
    Option(#[from] OptionError),
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
