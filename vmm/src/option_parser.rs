//! The syntax shared by every cloud-hypervisor option string: `key=value,key=value`, bare words
//! (`--serial tty`), values that contain commas either inside `[...]` or between double quotes
//! (`cmdline="console=ttyS0,115200"`, the quotes are dropped), and the value types upstream uses:
//! toggles (`on|off|true|false`), byte sizes with a `K`, `M` or `G` suffix, integers.
//!
//! Only the syntax lives here; what each option means is in `config`.

use std::str::FromStr;

use crate::config::ConfigError;

/// How a key may appear in an option string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyKind {
    /// `key=value`.
    Value,
    /// A bare word such as `off` or `tty`.
    Flag,
    /// A key upstream accepts that this VMM does not implement. Refused with its own message
    /// rather than "unknown", so that an operator knows the script is valid upstream.
    Unsupported,
}

/// The keys one option (`--memory`, `--disk`, ...) accepts.
pub(crate) struct OptionSpec {
    /// The option's name without dashes, used in every error message.
    pub option: &'static str,
    pub keys: &'static [(&'static str, KeyKind)],
}

impl OptionSpec {
    fn kind_of(&self, key: &str) -> Option<KeyKind> {
        self.keys
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, kind)| *kind)
    }

    fn supported_keys(&self) -> String {
        self.keys
            .iter()
            .filter(|(_, kind)| *kind != KeyKind::Unsupported)
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One option string split into keys and values, checked against its `OptionSpec`.
#[derive(Debug)]
pub(crate) struct ParsedOption {
    option: &'static str,
    /// In the order given; each key at most once.
    entries: Vec<(String, String)>,
}

impl ParsedOption {
    pub(crate) fn parse(spec: &OptionSpec, input: &str) -> Result<Self, ConfigError> {
        let mut entries = Vec::new();
        if input.trim().is_empty() {
            return Ok(ParsedOption {
                option: spec.option,
                entries,
            });
        }
        for item in split_top_level_commas(spec.option, input)? {
            let (key, value) = match item.split_once('=') {
                Some((key, value)) => (key.trim(), Some(value.trim())),
                None => (item.trim(), None),
            };
            match (spec.kind_of(key), value) {
                (None, _) => {
                    return Err(ConfigError::UnknownKey {
                        option: spec.option,
                        key: key.to_owned(),
                        supported: spec.supported_keys(),
                    })
                }
                (Some(KeyKind::Unsupported), _) => {
                    return Err(ConfigError::UnsupportedKey {
                        option: spec.option,
                        key: key.to_owned(),
                    })
                }
                (Some(KeyKind::Value), None) => {
                    return Err(ConfigError::MissingValue {
                        option: spec.option,
                        key: key.to_owned(),
                    })
                }
                (Some(KeyKind::Flag), Some(value)) => {
                    return Err(ConfigError::InvalidValue {
                        option: spec.option,
                        key: key.to_owned(),
                        value: value.to_owned(),
                        reason: "this word takes no value".to_owned(),
                    })
                }
                // `key=` is never "unset": say so here, even for a key nobody reads later.
                (Some(KeyKind::Value), Some("")) => {
                    return Err(ConfigError::MissingValue {
                        option: spec.option,
                        key: key.to_owned(),
                    })
                }
                (Some(KeyKind::Value), Some(value)) => {
                    entries.push((key.to_owned(), value.to_owned()))
                }
                (Some(KeyKind::Flag), None) => entries.push((key.to_owned(), String::new())),
            }
            // Upstream keeps the last of a repeated key; a typo such as `size=1G,size=2G`
            // then silently picks one. Refuse it instead.
            if entries[..entries.len() - 1]
                .iter()
                .any(|(earlier, _)| earlier == key)
            {
                return Err(ConfigError::DuplicateKey {
                    option: spec.option,
                    key: key.to_owned(),
                });
            }
        }
        Ok(ParsedOption {
            option: spec.option,
            entries,
        })
    }

    pub(crate) fn option(&self) -> &'static str {
        self.option
    }

    /// Whether `key` was given at all (the way to test a bare word).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|(name, _)| name == key)
    }

    fn raw(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }

    fn invalid(&self, key: &str, value: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            option: self.option,
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        }
    }

    /// The value of `key`; an empty value (`key=`) is an error, never silently "unset".
    pub(crate) fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.raw(key) {
            None => Ok(None),
            Some("") => Err(ConfigError::MissingValue {
                option: self.option,
                key: key.to_owned(),
            }),
            Some(value) => Ok(Some(value.to_owned())),
        }
    }

    pub(crate) fn required_string(&self, key: &'static str) -> Result<String, ConfigError> {
        self.string(key)?.ok_or(ConfigError::MissingKey {
            option: self.option,
            key,
        })
    }

    pub(crate) fn toggle(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.string(key)? {
            None => Ok(None),
            Some(value) => parse_toggle(&value)
                .map(Some)
                .ok_or_else(|| self.invalid(key, &value, "expected on, off, true or false")),
        }
    }

    pub(crate) fn byte_size(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.string(key)? {
            None => Ok(None),
            Some(value) => parse_byte_size(&value)
                .map(Some)
                .map_err(|reason| self.invalid(key, &value, reason)),
        }
    }

    /// A list as upstream writes one: `[a,b,c]` (the brackets keep the commas inside one value)
    /// or a single bare item.
    pub(crate) fn list(&self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(value) = self.string(key)? else {
            return Ok(None);
        };
        let inner = match value.strip_prefix('[') {
            Some(rest) => rest
                .strip_suffix(']')
                .ok_or_else(|| self.invalid(key, &value, "expected [item,item,...]"))?,
            None => value.as_str(),
        };
        Ok(Some(
            inner
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect(),
        ))
    }

    pub(crate) fn integer<T: FromStr>(&self, key: &str) -> Result<Option<T>, ConfigError> {
        match self.string(key)? {
            None => Ok(None),
            Some(value) => value.parse::<T>().map(Some).map_err(|_| {
                self.invalid(
                    key,
                    &value,
                    format!(
                        "expected an integer that fits {}",
                        std::any::type_name::<T>()
                    ),
                )
            }),
        }
    }
}

/// Splits at commas that are neither inside `[...]` nor inside double quotes; drops the quotes.
fn split_top_level_commas(option: &'static str, input: &str) -> Result<Vec<String>, ConfigError> {
    let syntax_error = |reason: &'static str| ConfigError::Syntax {
        option,
        input: input.to_owned(),
        reason,
    };
    let mut items = Vec::new();
    let mut current = String::new();
    let mut bracket_depth = 0usize;
    let mut in_quotes = false;
    for character in input.trim().chars() {
        match character {
            '"' => in_quotes = !in_quotes,
            '[' if !in_quotes => {
                bracket_depth += 1;
                current.push(character);
            }
            ']' if !in_quotes => {
                bracket_depth = bracket_depth
                    .checked_sub(1)
                    .ok_or_else(|| syntax_error("']' without a matching '['"))?;
                current.push(character);
            }
            ',' if !in_quotes && bracket_depth == 0 => items.push(std::mem::take(&mut current)),
            _ => current.push(character),
        }
    }
    if in_quotes {
        return Err(syntax_error("unterminated double quote"));
    }
    if bracket_depth != 0 {
        return Err(syntax_error("'[' without a matching ']'"));
    }
    items.push(current);
    if items.iter().any(|item| item.trim().is_empty()) {
        return Err(syntax_error("empty item between commas"));
    }
    Ok(items)
}

/// Upstream's toggle words, case-insensitive.
pub(crate) fn parse_toggle(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" => Some(true),
        "off" | "false" => Some(false),
        _ => None,
    }
}

/// A byte count as upstream writes it: decimal digits, optionally followed by `K`, `M` or `G`
/// (powers of 1024). Unlike upstream, a value that does not fit 64 bits is an error instead of
/// silently losing its high bits.
pub fn parse_byte_size(value: &str) -> Result<u64, &'static str> {
    let value = value.trim();
    let (digits, shift) = match value.as_bytes().last() {
        Some(b'K') => (&value[..value.len() - 1], 10),
        Some(b'M') => (&value[..value.len() - 1], 20),
        Some(b'G') => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err("expected a number of bytes with an optional K, M or G suffix, e.g. 512M");
    }
    let number: u64 = digits.parse().map_err(|_| "the number is too large")?;
    number
        .checked_mul(1u64 << shift)
        .ok_or("the size does not fit in 64 bits")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: OptionSpec = OptionSpec {
        option: "test",
        keys: &[
            ("size", KeyKind::Value),
            ("cmdline", KeyKind::Value),
            ("list", KeyKind::Value),
            ("on", KeyKind::Flag),
            ("mergeable", KeyKind::Unsupported),
        ],
    };

    #[test]
    fn splits_keys_and_values() {
        let parsed = ParsedOption::parse(&SPEC, "size=128M,on").unwrap();
        assert_eq!(parsed.string("size").unwrap().as_deref(), Some("128M"));
        assert!(parsed.has("on"));
        assert!(!parsed.has("cmdline"));
    }

    #[test]
    fn quotes_and_brackets_protect_commas() {
        let parsed =
            ParsedOption::parse(&SPEC, "cmdline=\"console=ttyS0,115200\",list=[1,2],size=1")
                .unwrap();
        assert_eq!(
            parsed.string("cmdline").unwrap().as_deref(),
            Some("console=ttyS0,115200")
        );
        assert_eq!(parsed.string("list").unwrap().as_deref(), Some("[1,2]"));
        assert_eq!(parsed.string("size").unwrap().as_deref(), Some("1"));
    }

    #[test]
    fn a_repeated_key_is_refused_by_name() {
        for input in ["size=1,size=2", "size=1,on,size=1", "on,on"] {
            let error = ParsedOption::parse(&SPEC, input).unwrap_err();
            assert!(
                matches!(&error, ConfigError::DuplicateKey { option: "test", .. }),
                "{input}: {error:?}"
            );
        }
        let message = ParsedOption::parse(&SPEC, "size=1,size=2")
            .unwrap_err()
            .to_string();
        assert!(message.contains("\"size\""), "{message}");
    }

    #[test]
    fn an_empty_value_is_refused_even_for_a_key_never_read() {
        assert!(matches!(
            ParsedOption::parse(&SPEC, "size=1,list="),
            Err(ConfigError::MissingValue { key, .. }) if key == "list"
        ));
    }

    #[test]
    fn rejects_bad_syntax() {
        for input in [
            "cmdline=\"a",
            "list=[1,2",
            "list=1]",
            "size=1,,on",
            "size=1,",
        ] {
            assert!(
                matches!(
                    ParsedOption::parse(&SPEC, input),
                    Err(ConfigError::Syntax { .. })
                ),
                "{input}"
            );
        }
    }

    #[test]
    fn rejects_unknown_unsupported_and_misused_keys() {
        assert!(matches!(
            ParsedOption::parse(&SPEC, "sise=1"),
            Err(ConfigError::UnknownKey { key, .. }) if key == "sise"
        ));
        assert!(matches!(
            ParsedOption::parse(&SPEC, "mergeable=on"),
            Err(ConfigError::UnsupportedKey { key, .. }) if key == "mergeable"
        ));
        assert!(matches!(
            ParsedOption::parse(&SPEC, "size"),
            Err(ConfigError::MissingValue { .. })
        ));
        assert!(matches!(
            ParsedOption::parse(&SPEC, "on=1"),
            Err(ConfigError::InvalidValue { .. })
        ));
        assert!(matches!(
            ParsedOption::parse(&SPEC, "size="),
            Err(ConfigError::MissingValue { .. })
        ));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("4096"), Ok(4096));
        assert_eq!(parse_byte_size("4K"), Ok(4 << 10));
        assert_eq!(parse_byte_size("512M"), Ok(512 << 20));
        assert_eq!(parse_byte_size("2G"), Ok(2 << 30));
        assert_eq!(parse_byte_size("0"), Ok(0));
        for bad in ["", "M", "12X", "1.5G", "-1", "512m", "1 G", "17179869184G"] {
            assert!(parse_byte_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn toggles() {
        assert_eq!(parse_toggle("on"), Some(true));
        assert_eq!(parse_toggle("TRUE"), Some(true));
        assert_eq!(parse_toggle("off"), Some(false));
        assert_eq!(parse_toggle("false"), Some(false));
        assert_eq!(parse_toggle("yes"), None);
        let parsed = ParsedOption::parse(&SPEC, "size=maybe").unwrap();
        assert!(matches!(
            parsed.toggle("size"),
            Err(ConfigError::InvalidValue { .. })
        ));
    }
}
