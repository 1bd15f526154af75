//! Upstream's `key=value,key=value` argument syntax of the `add-*` verbs, `restore` and the
//! migrations, turned into the JSON body the API takes. Each verb has a table of the keys upstream
//! accepts, the JSON member each fills and its value type; unknown keys are refused before any
//! request is sent, as upstream's client does.
//!
//! Only the members given on the command line (and the ones a verb always sends) are in the body:
//! every other member has a default on the server side (see the OpenAPI spec), so the VMM sees the
//! same configuration upstream's client would give it.

use option_parser::{parse_byte_size, parse_toggle, split_list, IMAGE_TYPES, LOCK_GRANULARITIES};
use serde_json::{json, Map, Value};

/// How a key's value is read and written into the body.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Any text, sent as a JSON string.
    Text,
    /// `on|off|true|false`, sent as a JSON boolean.
    Toggle,
    /// A decimal integer.
    Integer,
    /// Bytes, with an optional `K`, `M` or `G` suffix (powers of 1024).
    Size,
    /// One of a few words (matched without regard to case) -> the JSON string upstream uses.
    Choice(&'static [(&'static str, &'static str)]),
    /// A MAC address `xx:xx:xx:xx:xx:xx`.
    Mac,
    /// An IP address.
    Ip,
    /// One number of a token bucket of `rate_limiter_config`.
    Bucket(Bucket, BucketPart),
    /// File descriptors of this process, `N` or `[N,M,...]`: put under the member for the caller
    /// to take out and pass with SCM_RIGHTS, as upstream's client does.
    FdList,
    /// Accepted upstream, but needs something this client does not do; refused with the reason.
    Unsupported(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bucket {
    Bandwidth,
    Ops,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BucketPart {
    Size,
    OneTimeBurst,
    RefillTime,
}

#[derive(Clone, Copy)]
struct Key {
    name: &'static str,
    member: &'static str,
    kind: Kind,
}

const fn key(name: &'static str, kind: Kind) -> Key {
    Key {
        name,
        member: name,
        kind,
    }
}

const fn renamed(name: &'static str, member: &'static str, kind: Kind) -> Key {
    Key { name, member, kind }
}

/// The keys of one verb's argument, in groups (the groups several verbs share are written once).
pub struct Syntax {
    keys: &'static [&'static [Key]],
    required: &'static [&'static str],
}

/// Why an argument string was refused.
#[derive(Debug, thiserror::Error)]
pub enum SyntaxError {
    #[error("unknown option: {0:?}")]
    UnknownOption(String),
    #[error("unbalanced quotes or brackets in {0:?}")]
    Unbalanced(String),
    #[error("invalid value {value:?} for {key}: expected {expected}")]
    InvalidValue {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("{0} missing")]
    Missing(&'static str),
    #[error("option {key} is not supported by this ch-remote: {reason}")]
    Unsupported { key: String, reason: &'static str },
}

const VHOST_MODES: &[(&str, &str)] = &[("client", "Client"), ("server", "Server")];
const RESTORE_MODES: &[(&str, &str)] = &[("copy", "Copy"), ("ondemand", "OnDemand")];
const MIGRATION_MODES: &[(&str, &str)] = &[("precopy", "Precopy"), ("postcopy", "Postcopy")];
const TIMEOUT_STRATEGIES: &[(&str, &str)] = &[("cancel", "Cancel"), ("ignore", "Ignore")];

const NET_FDS: &str = "per-device file descriptor lists are not translated by this client";

const IOMMU: Key = key("iommu", Kind::Toggle);

/// Where a device sits: upstream's `id`, `pci_segment` and `pci_device_id`, on every device.
const DEVICE_ADDRESS: &[Key] = &[
    key("id", Kind::Text),
    key("pci_segment", Kind::Integer),
    key("pci_device_id", Kind::Integer),
];

const QUEUES: &[Key] = &[
    key("num_queues", Kind::Integer),
    key("queue_size", Kind::Integer),
];

const VHOST_USER: &[Key] = &[
    key("vhost_user", Kind::Toggle),
    renamed("socket", "vhost_socket", Kind::Text),
];

const RATE_LIMIT: &[Key] = &[
    key("bw_size", Kind::Bucket(Bucket::Bandwidth, BucketPart::Size)),
    key(
        "bw_one_time_burst",
        Kind::Bucket(Bucket::Bandwidth, BucketPart::OneTimeBurst),
    ),
    key(
        "bw_refill_time",
        Kind::Bucket(Bucket::Bandwidth, BucketPart::RefillTime),
    ),
    key("ops_size", Kind::Bucket(Bucket::Ops, BucketPart::Size)),
    key(
        "ops_one_time_burst",
        Kind::Bucket(Bucket::Ops, BucketPart::OneTimeBurst),
    ),
    key(
        "ops_refill_time",
        Kind::Bucket(Bucket::Ops, BucketPart::RefillTime),
    ),
];

/// `add-disk`: upstream's `--disk` keys.
pub const DISK: Syntax = Syntax {
    keys: &[
        &[
            key("path", Kind::Text),
            key("readonly", Kind::Toggle),
            key("direct", Kind::Toggle),
            IOMMU,
            key("rate_limit_group", Kind::Text),
            key("serial", Kind::Text),
            key("image_type", Kind::Choice(IMAGE_TYPES)),
            key("sparse", Kind::Toggle),
            key("backing_files", Kind::Toggle),
            key("lock_granularity", Kind::Choice(LOCK_GRANULARITIES)),
            key(
                "queue_affinity",
                Kind::Unsupported("queue affinity lists are not translated by this client"),
            ),
        ],
        QUEUES,
        VHOST_USER,
        RATE_LIMIT,
        DEVICE_ADDRESS,
    ],
    required: &[],
};

/// `add-net`: upstream's `--net` keys.
pub const NET: Syntax = Syntax {
    keys: &[
        &[
            key("tap", Kind::Text),
            key("ip", Kind::Ip),
            key("mask", Kind::Ip),
            key("mac", Kind::Mac),
            key("host_mac", Kind::Mac),
            key("mtu", Kind::Integer),
            IOMMU,
            key("vhost_mode", Kind::Choice(VHOST_MODES)),
            renamed("fd", "fds", Kind::FdList),
            key("offload_tso", Kind::Toggle),
            key("offload_ufo", Kind::Toggle),
            key("offload_csum", Kind::Toggle),
        ],
        QUEUES,
        VHOST_USER,
        RATE_LIMIT,
        DEVICE_ADDRESS,
    ],
    required: &[],
};

/// `add-fs`: upstream's `--fs` keys.
pub const FS: Syntax = Syntax {
    keys: &[
        &[key("tag", Kind::Text), key("socket", Kind::Text)],
        QUEUES,
        DEVICE_ADDRESS,
    ],
    required: &["tag", "socket"],
};

/// `add-pmem`: upstream's `--pmem` keys.
pub const PMEM: Syntax = Syntax {
    keys: &[
        &[
            key("file", Kind::Text),
            key("size", Kind::Size),
            IOMMU,
            key("discard_writes", Kind::Toggle),
        ],
        DEVICE_ADDRESS,
    ],
    required: &["file"],
};

/// `add-vsock`: upstream's `--vsock` keys.
pub const VSOCK: Syntax = Syntax {
    keys: &[
        &[key("cid", Kind::Integer), key("socket", Kind::Text), IOMMU],
        DEVICE_ADDRESS,
    ],
    required: &["cid", "socket"],
};

/// `add-device`: upstream's `--device` (VFIO) keys.
pub const DEVICE: Syntax = Syntax {
    keys: &[
        &[
            key("path", Kind::Text),
            IOMMU,
            key("x_nv_gpudirect_clique", Kind::Integer),
        ],
        DEVICE_ADDRESS,
    ],
    required: &["path"],
};

/// `add-user-device`: upstream's `--user-device` keys.
pub const USER_DEVICE: Syntax = Syntax {
    keys: &[&[key("socket", Kind::Text)], DEVICE_ADDRESS],
    required: &["socket"],
};

/// `add-vdpa`: upstream's `--vdpa` keys.
pub const VDPA: Syntax = Syntax {
    keys: &[
        &[
            key("path", Kind::Text),
            key("num_queues", Kind::Integer),
            IOMMU,
        ],
        DEVICE_ADDRESS,
    ],
    required: &["path"],
};

/// `restore`: upstream's `--restore` keys.
pub const RESTORE: Syntax = Syntax {
    keys: &[&[
        key("source_url", Kind::Text),
        key("prefault", Kind::Toggle),
        key("memory_restore_mode", Kind::Choice(RESTORE_MODES)),
        key("resume", Kind::Toggle),
        key("net_fds", Kind::Unsupported(NET_FDS)),
    ]],
    required: &["source_url"],
};

/// `send-migration`.
pub const SEND_MIGRATION: Syntax = Syntax {
    keys: &[&[
        key("destination_url", Kind::Text),
        key("local", Kind::Toggle),
        key("downtime_ms", Kind::Integer),
        key("timeout_s", Kind::Integer),
        key("timeout_strategy", Kind::Choice(TIMEOUT_STRATEGIES)),
        key("connections", Kind::Integer),
        key("tls_dir", Kind::Text),
        key("memory_mode", Kind::Choice(MIGRATION_MODES)),
    ]],
    required: &["destination_url"],
};

/// `receive-migration`: `receiver_url=` is required, so the bare URL form is refused.
pub const RECEIVE_MIGRATION: Syntax = Syntax {
    keys: &[&[
        key("receiver_url", Kind::Text),
        key("tls_dir", Kind::Text),
        key("memory_mode", Kind::Choice(MIGRATION_MODES)),
    ]],
    required: &["receiver_url"],
};

impl Syntax {
    fn find(&self, name: &str) -> Option<&Key> {
        self.keys
            .iter()
            .copied()
            .flatten()
            .find(|key| key.name == name)
    }

    /// Parses `text` into the JSON object upstream's client sends for it.
    pub fn parse(&self, text: &str) -> Result<Map<String, Value>, SyntaxError> {
        let mut body = Map::new();
        let mut buckets = [[None::<u64>; 3]; 2];
        for item in split_items(text)? {
            // As upstream: an item without `=` is taken whole as a key name, and is unknown.
            let (name, raw) = item.split_once('=').unwrap_or((item, ""));
            let key = self
                .find(name)
                .filter(|_| item.contains('='))
                .ok_or_else(|| SyntaxError::UnknownOption(name.to_owned()))?;
            let value = unquote(raw);
            let invalid = |expected| SyntaxError::InvalidValue {
                key: name.to_owned(),
                value: value.to_owned(),
                expected,
            };
            let parsed = match key.kind {
                Kind::Text => Value::String(value.to_owned()),
                Kind::Toggle => Value::Bool(parse_toggle(value).ok_or_else(|| invalid(TOGGLE))?),
                Kind::Integer => json!(value
                    .parse::<u64>()
                    .map_err(|_| invalid("a non-negative integer"))?),
                Kind::Size => json!(parse_byte_size(value).map_err(|_| invalid(SIZE))?),
                Kind::Choice(words) => {
                    let lower = value.to_ascii_lowercase();
                    let (_, member) = words
                        .iter()
                        .find(|(word, _)| *word == lower)
                        .ok_or_else(|| invalid(choice_text(words)))?;
                    Value::String((*member).to_owned())
                }
                Kind::Mac => {
                    if !is_mac(value) {
                        return Err(invalid("a MAC address xx:xx:xx:xx:xx:xx"));
                    }
                    Value::String(value.to_owned())
                }
                Kind::Ip => {
                    value
                        .parse::<std::net::IpAddr>()
                        .map_err(|_| invalid("an IP address"))?;
                    Value::String(value.to_owned())
                }
                Kind::FdList => json!(parse_fd_list(value).ok_or_else(|| invalid(FDS))?),
                Kind::Bucket(bucket, part) => {
                    let number = value
                        .parse::<u64>()
                        .map_err(|_| invalid("a non-negative integer"))?;
                    buckets[bucket as usize][part as usize] = Some(number);
                    continue;
                }
                Kind::Unsupported(reason) => {
                    return Err(SyntaxError::Unsupported {
                        key: name.to_owned(),
                        reason,
                    })
                }
            };
            body.insert(key.member.to_owned(), parsed);
        }
        if let Some(limiter) = rate_limiter(&buckets) {
            body.insert("rate_limiter_config".to_owned(), limiter);
        }
        for required in self.required {
            if !body.contains_key(*required) {
                return Err(SyntaxError::Missing(required));
            }
        }
        Ok(body)
    }
}

const TOGGLE: &str = "on, off, true or false";
const FDS: &str = "a file descriptor number or a list [N,M,...]";
const SIZE: &str = "a size in bytes, optionally with a K, M or G suffix";

fn choice_text(words: &[(&str, &str)]) -> &'static str {
    // The few lists above, spelled out for the message.
    match words.first().map(|(word, _)| *word) {
        Some("raw") => "raw, qcow2, vhd or vhdx",
        Some("byte-range") => "byte-range or full",
        Some("client") => "client or server",
        Some("copy") => "copy or ondemand",
        Some("precopy") => "precopy or postcopy",
        Some("cancel") => "cancel or ignore",
        _ => "one of the documented words",
    }
}

/// A bucket exists when its size and refill time are both non-zero, as upstream decides.
fn rate_limiter(buckets: &[[Option<u64>; 3]; 2]) -> Option<Value> {
    let bucket = |parts: &[Option<u64>; 3]| {
        let size = parts[BucketPart::Size as usize].unwrap_or(0);
        let refill_time = parts[BucketPart::RefillTime as usize].unwrap_or(0);
        (size != 0 && refill_time != 0).then(|| {
            json!({
                "size": size,
                "one_time_burst": parts[BucketPart::OneTimeBurst as usize].unwrap_or(0),
                "refill_time": refill_time,
            })
        })
    };
    let bandwidth = bucket(&buckets[Bucket::Bandwidth as usize]);
    let ops = bucket(&buckets[Bucket::Ops as usize]);
    if bandwidth.is_none() && ops.is_none() {
        return None;
    }
    let mut limiter = Map::new();
    if let Some(bandwidth) = bandwidth {
        limiter.insert("bandwidth".to_owned(), bandwidth);
    }
    if let Some(ops) = ops {
        limiter.insert("ops".to_owned(), ops);
    }
    Some(Value::Object(limiter))
}

/// `3` or `[3,4]`: non-negative descriptor numbers.
fn parse_fd_list(text: &str) -> Option<Vec<i32>> {
    split_list(text)?
        .into_iter()
        .map(|number| number.parse::<i32>().ok().filter(|fd| *fd >= 0))
        .collect()
}

fn is_mac(text: &str) -> bool {
    let parts: Vec<&str> = text.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|part| part.len() == 2 && part.chars().all(|c| c.is_ascii_hexdigit()))
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(value)
}

/// Splits on commas that are neither inside `[...]` nor between double quotes (the quotes stay
/// in the items).
fn split_items(text: &str) -> Result<Vec<&str>, SyntaxError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    option_parser::split_items(text).map_err(|_| SyntaxError::Unbalanced(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(syntax: &Syntax, text: &str) -> Value {
        Value::Object(syntax.parse(text).unwrap())
    }

    #[test]
    fn disk_keys_become_upstream_members() {
        assert_eq!(
            parsed(
                &DISK,
                "path=/img/a.raw,readonly=on,direct=false,num_queues=2,queue_size=256,id=disk1,\
                 serial=\"S,N\",image_type=qcow2,sparse=off,lock_granularity=full,pci_segment=1"
            ),
            json!({"path": "/img/a.raw", "readonly": true, "direct": false, "num_queues": 2,
                   "queue_size": 256, "id": "disk1", "serial": "S,N", "image_type": "Qcow2",
                   "sparse": false, "lock_granularity": "Full", "pci_segment": 1})
        );
        assert_eq!(
            parsed(&DISK, "vhost_user=on,socket=/run/vu.sock"),
            json!({"vhost_user": true, "vhost_socket": "/run/vu.sock"})
        );
    }

    #[test]
    fn rate_limiter_needs_size_and_refill_time() {
        assert_eq!(
            parsed(
                &DISK,
                "path=/a,bw_size=1000,bw_refill_time=100,ops_size=5,ops_one_time_burst=9,\
                 ops_refill_time=10"
            )["rate_limiter_config"],
            json!({"bandwidth": {"size": 1000, "one_time_burst": 0, "refill_time": 100},
                   "ops": {"size": 5, "one_time_burst": 9, "refill_time": 10}})
        );
        let no_refill = parsed(&DISK, "path=/a,bw_size=1000");
        assert!(
            no_refill.get("rate_limiter_config").is_none(),
            "{no_refill}"
        );
    }

    /// `ch-remote add-net vhost_user=true,socket=..,vhost_mode=server` is the `vm.add-net` body
    /// upstream's ch-remote sends.
    #[test]
    fn vhost_user_net_becomes_upstreams_body() {
        assert_eq!(
            parsed(
                &NET,
                "vhost_user=true,socket=/run/net.sock,vhost_mode=server,mac=02:00:00:00:00:07"
            ),
            json!({"vhost_user": true, "vhost_socket": "/run/net.sock", "vhost_mode": "Server",
                   "mac": "02:00:00:00:00:07"})
        );
    }

    #[test]
    fn net_validates_addresses() {
        assert_eq!(
            parsed(
                &NET,
                "tap=tap0,mac=12:34:56:78:9a:bc,ip=192.168.1.1,mask=255.255.255.0,num_queues=4,\
                 vhost_mode=Server,offload_tso=off,mtu=1400"
            ),
            json!({"tap": "tap0", "mac": "12:34:56:78:9a:bc", "ip": "192.168.1.1",
                   "mask": "255.255.255.0", "num_queues": 4, "vhost_mode": "Server",
                   "offload_tso": false, "mtu": 1400})
        );
        assert!(matches!(
            NET.parse("mac=12:34"),
            Err(SyntaxError::InvalidValue { .. })
        ));
        assert!(matches!(
            NET.parse("ip=300.1.1.1"),
            Err(SyntaxError::InvalidValue { .. })
        ));
        assert_eq!(
            parsed(&NET, "fd=[3,4],mac=12:34:56:78:9a:bc")["fds"],
            json!([3, 4])
        );
        assert_eq!(parsed(&NET, "fd=7")["fds"], json!([7]));
        for bad in ["fd=[3,x]", "fd=-1", "fd=[]", "fd=[3"] {
            assert!(NET.parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            RESTORE.parse("source_url=file:///s,net_fds=[net0@[3]]"),
            Err(SyntaxError::Unsupported { .. })
        ));
    }

    #[test]
    fn required_keys_and_unknown_keys() {
        assert!(matches!(
            FS.parse("tag=myfs"),
            Err(SyntaxError::Missing("socket"))
        ));
        assert!(matches!(
            VSOCK.parse("socket=/v"),
            Err(SyntaxError::Missing("cid"))
        ));
        assert!(matches!(
            PMEM.parse("size=1G"),
            Err(SyntaxError::Missing("file"))
        ));
        assert!(matches!(
            DEVICE.parse(""),
            Err(SyntaxError::Missing("path"))
        ));
        assert!(matches!(
            DISK.parse("path=/a,bogus=1"),
            Err(SyntaxError::UnknownOption(key)) if key == "bogus"
        ));
        // A bare word is an unknown option, even when it names a key.
        assert!(matches!(
            DISK.parse("readonly"),
            Err(SyntaxError::UnknownOption(key)) if key == "readonly"
        ));
        assert!(matches!(
            RECEIVE_MIGRATION.parse("unix:/tmp/sock"),
            Err(SyntaxError::UnknownOption(key)) if key == "unix:/tmp/sock"
        ));
        assert!(matches!(
            DISK.parse("path=\"/a"),
            Err(SyntaxError::Unbalanced(_))
        ));
        assert!(matches!(
            DISK.parse("path=/a,readonly=yes"),
            Err(SyntaxError::InvalidValue { .. })
        ));
        // Toggles are read by the shared option_parser, as upstream reads them: any case.
        assert_eq!(
            parsed(&DISK, "path=/a,readonly=ON,direct=False"),
            json!({"path": "/a", "readonly": true, "direct": false})
        );
    }

    #[test]
    fn sizes_and_last_value_wins() {
        for (size, bytes) in [
            ("4096", 4096),
            ("2K", 2048),
            ("3M", 3 << 20),
            ("1G", 1 << 30),
        ] {
            assert_eq!(
                parsed(&PMEM, &format!("file=/p,size={size}"))["size"],
                bytes
            );
        }
        for bad in ["1g", "G", "99999999999G"] {
            assert!(
                matches!(
                    PMEM.parse(&format!("file=/p,size={bad}")),
                    Err(SyntaxError::InvalidValue { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            parsed(&PMEM, "file=/p,size=128M,file=/q,discard_writes=on"),
            json!({"file": "/q", "size": 128u64 << 20, "discard_writes": true})
        );
    }
}
