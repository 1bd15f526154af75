//! The syntax shared by every cloud-hypervisor option string, on the VMM's command line and in
//! ch-remote's verbs: `key=value,key=value`, bare words (`--serial tty`), values that contain
//! commas either inside `[...]` or between double quotes (`cmdline="console=ttyS0,115200"`), and
//! the value types upstream uses: toggles (`on|off|true|false`), byte sizes with a `K`, `M` or `G`
//! suffix, integers, lists.
//!
//! Two layers: the lexical one ([`split_items`], [`split_list`], [`parse_toggle`],
//! [`parse_byte_size`]) that both programs use, and [`ParsedOption`], the strict reading of the
//! VMM's command line (every key known, none repeated, none empty). What each option means is the
//! caller's business.

use std::str::FromStr;

/// An option string that cannot be used. Every variant names the option (without its dashes) and
/// the offending key or value, so that the one-line message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
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
}

/// Why [`split_items`] refused a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("']' without a matching '['")]
    UnmatchedClose,
    #[error("unterminated double quote")]
    UnterminatedQuote,
    #[error("'[' without a matching ']'")]
    UnmatchedOpen,
}

impl SplitError {
    fn reason(self) -> &'static str {
        match self {
            SplitError::UnmatchedClose => "']' without a matching '['",
            SplitError::UnterminatedQuote => "unterminated double quote",
            SplitError::UnmatchedOpen => "'[' without a matching ']'",
        }
    }
}

/// Splits `input` at the commas that are neither inside `[...]` nor between double quotes. The
/// items are returned as written, quotes included; what to do with empty items and quotes is the
/// caller's rule.
pub fn split_items(input: &str) -> Result<Vec<&str>, SplitError> {
    let mut items = Vec::new();
    let mut start = 0;
    let mut bracket_depth = 0usize;
    let mut in_quotes = false;
    for (index, character) in input.char_indices() {
        match character {
            '"' => in_quotes = !in_quotes,
            '[' if !in_quotes => bracket_depth += 1,
            ']' if !in_quotes => {
                bracket_depth = bracket_depth
                    .checked_sub(1)
                    .ok_or(SplitError::UnmatchedClose)?
            }
            ',' if !in_quotes && bracket_depth == 0 => {
                items.push(&input[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    if in_quotes {
        return Err(SplitError::UnterminatedQuote);
    }
    if bracket_depth != 0 {
        return Err(SplitError::UnmatchedOpen);
    }
    items.push(&input[start..]);
    Ok(items)
}

/// A list as upstream writes one: `[a,b,c]` (the brackets keep the commas inside one value) or a
/// single bare item. `None` when a `[` is not closed. Items are trimmed, empty ones kept.
pub fn split_list(value: &str) -> Option<Vec<&str>> {
    let inner = match value.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']')?,
        None => value,
    };
    Some(inner.split(',').map(str::trim).collect())
}

/// Upstream's toggle words, case-insensitive.
pub fn parse_toggle(value: &str) -> Option<bool> {
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

/// `--disk image_type=` words (matched without regard to case) and the JSON name upstream's
/// `ImageType` gives each: both programs turn the word into the same member value.
pub const IMAGE_TYPES: &[(&str, &str)] = &[
    ("raw", "Raw"),
    ("qcow2", "Qcow2"),
    ("vhd", "FixedVhd"),
    ("fixedvhd", "FixedVhd"),
    ("vhdx", "Vhdx"),
];

/// `--disk lock_granularity=` words and upstream's `LockGranularity` JSON names.
pub const LOCK_GRANULARITIES: &[(&str, &str)] = &[
    ("byte-range", "ByteRange"),
    ("byterange", "ByteRange"),
    ("full", "Full"),
];

/// The keys one option (`--memory`, `--disk`, ...) accepts, each list written as one string of
/// names separated by spaces, so that a table reads as the option's usage line does.
#[derive(Clone, Copy, Debug)]
pub struct OptionSpec {
    /// The option's name without dashes, used in every error message.
    pub option: &'static str,
    /// Bare words such as `off` or `tty`.
    pub flags: &'static str,
    /// Keys written `key=value`.
    pub values: &'static str,
    /// Keys upstream accepts that this program does not implement. Refused with their own
    /// message rather than "unknown", so that an operator knows the script is valid upstream.
    pub unsupported: &'static str,
}

/// How a key may appear in an option string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyKind {
    Value,
    Flag,
    Unsupported,
}

impl OptionSpec {
    /// An option of `key=value` keys only.
    pub const fn keyed(option: &'static str, values: &'static str) -> Self {
        OptionSpec {
            option,
            flags: "",
            values,
            unsupported: "",
        }
    }

    /// The same keys, plus upstream keys refused as not implemented.
    pub const fn refusing(self, unsupported: &'static str) -> Self {
        OptionSpec {
            unsupported,
            ..self
        }
    }

    fn kind_of(&self, key: &str) -> Option<KeyKind> {
        let lists = [
            (self.flags, KeyKind::Flag),
            (self.values, KeyKind::Value),
            (self.unsupported, KeyKind::Unsupported),
        ];
        lists
            .into_iter()
            .find(|(names, _)| names.split_whitespace().any(|name| name == key))
            .map(|(_, kind)| kind)
    }

    fn supported_keys(&self) -> String {
        self.flags
            .split_whitespace()
            .chain(self.values.split_whitespace())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One option string split into keys and values, checked against its [`OptionSpec`].
#[derive(Debug)]
pub struct ParsedOption {
    option: &'static str,
    /// In the order given; each key at most once.
    entries: Vec<(String, String)>,
}

impl ParsedOption {
    /// Splits `input` (double quotes are dropped) and refuses unknown, not implemented, repeated
    /// and empty keys.
    pub fn parse(spec: &OptionSpec, input: &str) -> Result<Self, OptionError> {
        let option = spec.option;
        let mut entries: Vec<(String, String)> = Vec::new();
        let input = input.trim();
        if input.is_empty() {
            return Ok(ParsedOption { option, entries });
        }
        let syntax_error = |reason: &'static str| OptionError::Syntax {
            option,
            input: input.to_owned(),
            reason,
        };
        let items = split_items(input).map_err(|error| syntax_error(error.reason()))?;
        let items: Vec<String> = items.iter().map(|item| item.replace('"', "")).collect();
        if items.iter().any(|item| item.trim().is_empty()) {
            return Err(syntax_error("empty item between commas"));
        }
        for item in &items {
            let (key, value) = match item.split_once('=') {
                Some((key, value)) => (key.trim(), Some(value.trim())),
                None => (item.trim(), None),
            };
            let key_error =
                |make: fn(&'static str, String) -> OptionError| make(option, key.into());
            let entry = match (spec.kind_of(key), value) {
                (None, _) => {
                    return Err(OptionError::UnknownKey {
                        option,
                        key: key.to_owned(),
                        supported: spec.supported_keys(),
                    })
                }
                (Some(KeyKind::Unsupported), _) => {
                    return Err(key_error(|option, key| OptionError::UnsupportedKey {
                        option,
                        key,
                    }))
                }
                // `key=` is never "unset": say so here, even for a key nobody reads later.
                (Some(KeyKind::Value), None | Some("")) => {
                    return Err(key_error(|option, key| OptionError::MissingValue {
                        option,
                        key,
                    }))
                }
                (Some(KeyKind::Flag), Some(value)) => {
                    return Err(OptionError::InvalidValue {
                        option,
                        key: key.to_owned(),
                        value: value.to_owned(),
                        reason: "this word takes no value".to_owned(),
                    })
                }
                (Some(KeyKind::Value), Some(value)) => (key.to_owned(), value.to_owned()),
                (Some(KeyKind::Flag), None) => (key.to_owned(), String::new()),
            };
            // Upstream keeps the last of a repeated key; a typo such as `size=1G,size=2G`
            // then silently picks one. Refuse it instead.
            if entries.iter().any(|(earlier, _)| *earlier == entry.0) {
                return Err(key_error(|option, key| OptionError::DuplicateKey {
                    option,
                    key,
                }));
            }
            entries.push(entry);
        }
        Ok(ParsedOption { option, entries })
    }

    pub fn option(&self) -> &'static str {
        self.option
    }

    /// Whether `key` was given at all (the way to test a bare word).
    pub fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|(name, _)| name == key)
    }

    /// An [`OptionError::InvalidValue`] of this option.
    pub fn invalid(&self, key: &str, value: &str, reason: impl Into<String>) -> OptionError {
        OptionError::InvalidValue {
            option: self.option,
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        }
    }

    /// The value of `key`, if given (never empty: [`ParsedOption::parse`] refuses `key=`).
    pub fn string(&self, key: &str) -> Option<String> {
        self.entries
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.clone())
    }

    pub fn required_string(&self, key: &'static str) -> Result<String, OptionError> {
        self.string(key).ok_or(OptionError::MissingKey {
            option: self.option,
            key,
        })
    }

    /// The value of `key` read by `read`; a value it refuses is named with `read`'s reason.
    pub fn read<T, R: Into<String>>(
        &self,
        key: &str,
        read: impl FnOnce(&str) -> Result<T, R>,
    ) -> Result<Option<T>, OptionError> {
        self.string(key)
            .map(|value| read(&value).map_err(|reason| self.invalid(key, &value, reason)))
            .transpose()
    }

    pub fn toggle(&self, key: &str) -> Result<Option<bool>, OptionError> {
        self.read(key, |value| {
            parse_toggle(value).ok_or("expected on, off, true or false")
        })
    }

    pub fn byte_size(&self, key: &str) -> Result<Option<u64>, OptionError> {
        self.read(key, parse_byte_size)
    }

    /// A list (see [`split_list`]); empty items are dropped.
    pub fn list(&self, key: &str) -> Result<Option<Vec<String>>, OptionError> {
        self.read(key, |value| {
            split_list(value)
                .map(|items| {
                    items
                        .into_iter()
                        .filter(|item| !item.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .ok_or("expected [item,item,...]")
        })
    }

    pub fn integer<T: FromStr>(&self, key: &str) -> Result<Option<T>, OptionError> {
        self.read(key, |value| {
            value.parse::<T>().map_err(|_| {
                format!(
                    "expected an integer that fits {}",
                    std::any::type_name::<T>()
                )
            })
        })
    }

    /// `integer(key)`, or `default` when the key is not given.
    pub fn integer_or<T: FromStr>(&self, key: &str, default: T) -> Result<T, OptionError> {
        Ok(self.integer(key)?.unwrap_or(default))
    }

    /// `toggle(key)`, or `default` when the key is not given.
    pub fn toggle_or(&self, key: &str, default: bool) -> Result<bool, OptionError> {
        Ok(self.toggle(key)?.unwrap_or(default))
    }

    /// One of `words` (matched without regard to case) -> its meaning; any other value is
    /// refused with `reason`.
    pub fn choice<T: Copy>(
        &self,
        key: &str,
        words: &[(&str, T)],
        reason: &str,
    ) -> Result<Option<T>, OptionError> {
        self.read(key, |value| {
            let lower = value.to_ascii_lowercase();
            words
                .iter()
                .find(|(word, _)| *word == lower)
                .map(|(_, meaning)| *meaning)
                .ok_or(reason)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: OptionSpec = OptionSpec {
        option: "test",
        flags: "on",
        values: "size cmdline list",
        unsupported: "mergeable",
    };

    #[test]
    fn splits_keys_and_values() {
        let parsed = ParsedOption::parse(&SPEC, "size=128M,on").unwrap();
        assert_eq!(parsed.string("size").as_deref(), Some("128M"));
        assert!(parsed.has("on"));
        assert!(!parsed.has("cmdline"));
    }

    #[test]
    fn quotes_and_brackets_protect_commas() {
        let parsed =
            ParsedOption::parse(&SPEC, "cmdline=\"console=ttyS0,115200\",list=[1,2],size=1")
                .unwrap();
        assert_eq!(
            parsed.string("cmdline").as_deref(),
            Some("console=ttyS0,115200")
        );
        assert_eq!(parsed.string("list").as_deref(), Some("[1,2]"));
        assert_eq!(
            parsed.list("list").unwrap(),
            Some(vec!["1".into(), "2".into()])
        );
        assert_eq!(parsed.string("size").as_deref(), Some("1"));
        assert_eq!(
            split_items("a=\"x,y\",b=[1,[2,3]],c"),
            Ok(vec!["a=\"x,y\"", "b=[1,[2,3]]", "c"])
        );
    }

    #[test]
    fn a_repeated_key_is_refused_by_name() {
        for input in ["size=1,size=2", "size=1,on,size=1", "on,on"] {
            let error = ParsedOption::parse(&SPEC, input).unwrap_err();
            assert!(
                matches!(&error, OptionError::DuplicateKey { option: "test", .. }),
                "{input}: {error:?}"
            );
        }
        let message = ParsedOption::parse(&SPEC, "size=1,size=2")
            .unwrap_err()
            .to_string();
        assert_eq!(message, "--test: \"size\" is given more than once");
    }

    #[test]
    fn an_empty_value_is_refused_even_for_a_key_never_read() {
        assert!(matches!(
            ParsedOption::parse(&SPEC, "size=1,list="),
            Err(OptionError::MissingValue { key, .. }) if key == "list"
        ));
    }

    #[test]
    fn rejects_bad_syntax() {
        for (input, reason) in [
            ("cmdline=\"a", "unterminated double quote"),
            ("list=[1,2", "'[' without a matching ']'"),
            ("list=1]", "']' without a matching '['"),
            ("size=1,,on", "empty item between commas"),
            ("size=1,", "empty item between commas"),
        ] {
            assert_eq!(
                ParsedOption::parse(&SPEC, input).unwrap_err(),
                OptionError::Syntax {
                    option: "test",
                    input: input.to_owned(),
                    reason
                },
                "{input}"
            );
        }
    }

    #[test]
    fn rejects_unknown_unsupported_and_misused_keys() {
        assert_eq!(
            ParsedOption::parse(&SPEC, "sise=1")
                .unwrap_err()
                .to_string(),
            "--test: unknown key \"sise\" (supported: on, size, cmdline, list)"
        );
        assert!(matches!(
            ParsedOption::parse(&SPEC, "mergeable=on"),
            Err(OptionError::UnsupportedKey { key, .. }) if key == "mergeable"
        ));
        assert!(matches!(
            ParsedOption::parse(&SPEC, "size"),
            Err(OptionError::MissingValue { .. })
        ));
        assert!(matches!(
            ParsedOption::parse(&SPEC, "on=1"),
            Err(OptionError::InvalidValue { .. })
        ));
        assert!(matches!(
            ParsedOption::parse(&SPEC, "size="),
            Err(OptionError::MissingValue { .. })
        ));
    }

    #[test]
    fn a_key_not_given_takes_the_default_and_a_bad_value_is_still_refused() {
        let parsed = ParsedOption::parse(&SPEC, "size=12,list=off").unwrap();
        assert_eq!(parsed.integer_or::<u16>("size", 7), Ok(12));
        assert_eq!(parsed.integer_or::<u16>("cmdline", 7), Ok(7));
        assert!(matches!(
            parsed.integer_or::<u8>("list", 7),
            Err(OptionError::InvalidValue { key, .. }) if key == "list"
        ));
        assert_eq!(parsed.toggle_or("list", true), Ok(false));
        assert_eq!(parsed.toggle_or("cmdline", true), Ok(true));
        assert!(matches!(
            parsed.toggle_or("size", false),
            Err(OptionError::InvalidValue { key, .. }) if key == "size"
        ));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("4096"), Ok(4096));
        assert_eq!(parse_byte_size("4K"), Ok(4 << 10));
        assert_eq!(parse_byte_size("512M"), Ok(512 << 20));
        assert_eq!(parse_byte_size("2G"), Ok(2 << 30));
        assert_eq!(parse_byte_size("0"), Ok(0));
        for bad in [
            "",
            "M",
            "12X",
            "1.5G",
            "-1",
            "+1",
            "512m",
            "1 G",
            "17179869184G",
        ] {
            assert!(parse_byte_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn toggles_and_choices() {
        assert_eq!(parse_toggle("on"), Some(true));
        assert_eq!(parse_toggle("TRUE"), Some(true));
        assert_eq!(parse_toggle("off"), Some(false));
        assert_eq!(parse_toggle("false"), Some(false));
        assert_eq!(parse_toggle("yes"), None);
        let parsed = ParsedOption::parse(&SPEC, "size=maybe,cmdline=B").unwrap();
        assert!(matches!(
            parsed.toggle("size"),
            Err(OptionError::InvalidValue { .. })
        ));
        let words = [("a", 1), ("b", 2)];
        assert_eq!(parsed.choice("cmdline", &words, "a or b"), Ok(Some(2)));
        assert_eq!(parsed.choice("list", &words, "a or b"), Ok(None));
        assert_eq!(
            parsed
                .choice("size", &words, "a or b")
                .unwrap_err()
                .to_string(),
            "--test: invalid value \"maybe\" for size: a or b"
        );
    }

    #[test]
    fn lists() {
        assert_eq!(split_list("[3,4]"), Some(vec!["3", "4"]));
        assert_eq!(split_list("7"), Some(vec!["7"]));
        assert_eq!(split_list("[]"), Some(vec![""]));
        assert_eq!(split_list("[3"), None);
    }
}
