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
pub use parse::VmOptionStrings;
pub use validate::{host_vcpu_limit, VcpuLimit};

/// A command-line option string that cannot be used. Every variant names the option (without
/// its dashes) and the offending key or value, so that the one-line message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--{option}: invalid syntax in \"{input}\": {reason}")]
    Syntax {
        option: &'static str,
        input: String,
        reason: &'static str,
    },
    #[error("--{option}: unknown key \"{key}\" (supported: {supported})")]
    UnknownKey {
        option: &'static str,
        key: String,
        supported: String,
    },
    #[error("--{option}: \"{key}\" is a cloud-hypervisor option this VMM does not implement")]
    UnsupportedKey { option: &'static str, key: String },
    #[error("--{option}: \"{key}\" is given more than once")]
    DuplicateKey { option: &'static str, key: String },
    #[error("--{option}: \"{key}\" needs a value ({key}=...)")]
    MissingValue { option: &'static str, key: String },
    #[error("--{option}: {key}=... is required")]
    MissingKey {
        option: &'static str,
        key: &'static str,
    },
    #[error("--{option}: invalid value \"{value}\" for {key}: {reason}")]
    InvalidValue {
        option: &'static str,
        key: String,
        value: String,
        reason: String,
    },
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

/// The syntax errors of the shared parser keep their names here, so that a caller matches one
/// error type for the whole command line.
impl From<option_parser::OptionError> for ConfigError {
    fn from(error: option_parser::OptionError) -> Self {
        use option_parser::OptionError as E;
        match error {
            E::Syntax {
                option,
                input,
                reason,
            } => ConfigError::Syntax {
                option,
                input,
                reason,
            },
            E::UnknownKey {
                option,
                key,
                supported,
            } => ConfigError::UnknownKey {
                option,
                key,
                supported,
            },
            E::UnsupportedKey { option, key } => ConfigError::UnsupportedKey { option, key },
            E::DuplicateKey { option, key } => ConfigError::DuplicateKey { option, key },
            E::MissingValue { option, key } => ConfigError::MissingValue { option, key },
            E::MissingKey { option, key } => ConfigError::MissingKey { option, key },
            E::InvalidValue {
                option,
                key,
                value,
                reason,
            } => ConfigError::InvalidValue {
                option,
                key,
                value,
                reason,
            },
        }
    }
}
