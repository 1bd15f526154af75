//! `--landlock` and `--landlock-rules path=...,access=rw` (upstream's options): after start-up the
//! VMM process can open only the files its configuration names, plus the extra paths the operator
//! lists for what arrives later over the API (a `vm.snapshot` destination, a `vm.restore` source,
//! a region given to `vm.nv-recover`).
//!
//! Landlock restricts the calling thread and the threads it starts afterwards. So `vmm::run`
//! builds one [`LandlockPolicy`] from the launch, hands it to the API server thread (which
//! restricts itself first thing, after its socket is bound: see [`restrict_api_thread`]) and
//! restricts the control loop's thread before the command-line VM is built; vCPU, block I/O and
//! userfaultfd threads start later and inherit it. The event-monitor thread starts earlier; its
//! seccomp filter has no `open` at all.
//!
//! Files a VM will create (a serial `file=`, a memory-zone file, an NV region with `create=on`)
//! are created empty before the restriction so that a rule can name them: a rule names an
//! existing file or directory, and a rule on the parent directory would open all of it.
//!
//! As upstream, the ruleset is built "best effort": on a kernel without Landlock (or with an
//! older ABI) the VMM runs with what the kernel enforces and says so in its log.

use std::fs::OpenOptions;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, ABI,
};

use crate::config::{ConfigError, ConsoleOutputMode, VmConfig, VmmLaunch};
use option_parser::{OptionError, OptionSpec, ParsedOption};

/// The newest Landlock ABI whose rights this VMM asks for (Linux 6.15). Newer rights are not
/// handled (so not restricted); older kernels enforce what they know (best effort).
const TARGET_ABI: ABI = ABI::V7;

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("--landlock-rules is given without --landlock")]
    RulesWithoutLandlock,
    #[error("--landlock: cannot open {path} for a rule: {source}")]
    RulePath {
        path: PathBuf,
        #[source]
        source: landlock::PathFdError,
    },
    #[error("--landlock: building the ruleset: {0}")]
    Ruleset(#[source] landlock::RulesetError),
    #[error("--landlock: restricting the {thread} thread: {source}")]
    Restrict {
        thread: &'static str,
        #[source]
        source: landlock::RulesetError,
    },
}

/// What a rule allows beneath its path: `r` reads (files, directory listings), `w` writes,
/// creates, removes and truncates. Upstream spells it `access=r`, `w` or `rw`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LandlockAccess {
    pub read: bool,
    pub write: bool,
}

impl LandlockAccess {
    pub const READ: LandlockAccess = LandlockAccess {
        read: true,
        write: false,
    };
    pub const READ_WRITE: LandlockAccess = LandlockAccess {
        read: true,
        write: true,
    };

    /// `r`, `w`, `rw` (or `wr`); anything else is refused.
    pub fn parse(value: &str) -> Option<LandlockAccess> {
        if value.is_empty() {
            return None;
        }
        let mut access = LandlockAccess {
            read: false,
            write: false,
        };
        for c in value.chars() {
            match c {
                'r' if !access.read => access.read = true,
                'w' if !access.write => access.write = true,
                _ => return None,
            }
        }
        Some(access)
    }

    fn rights(self) -> BitFlags<AccessFs> {
        let mut rights = BitFlags::EMPTY;
        if self.read {
            rights |= AccessFs::from_read(TARGET_ABI);
        }
        if self.write {
            rights |= AccessFs::from_write(TARGET_ABI);
        }
        rights
    }
}

/// One `--landlock-rules path=PATH,access=r|w|rw` (upstream's `LandlockConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LandlockRule {
    pub path: PathBuf,
    pub access: LandlockAccess,
}

const LANDLOCK_RULES_SPEC: OptionSpec = OptionSpec::keyed("landlock-rules", "path access");

impl LandlockRule {
    pub fn parse(input: &str) -> Result<LandlockRule, ConfigError> {
        let parsed = ParsedOption::parse(&LANDLOCK_RULES_SPEC, input)?;
        let path = parsed.required_string("path")?;
        let access_text = parsed.required_string("access")?;
        let access = LandlockAccess::parse(&access_text).ok_or(ConfigError::from(
            OptionError::InvalidValue {
                option: "landlock-rules",
                key: "access".to_owned(),
                value: access_text,
                reason: "expected r, w or rw".to_owned(),
            },
        ))?;
        Ok(LandlockRule {
            path: PathBuf::from(path),
            access,
        })
    }
}

/// `--landlock` with its extra `--landlock-rules` (empty when only `--landlock` is given).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LandlockSettings {
    pub rules: Vec<LandlockRule>,
}

impl LandlockSettings {
    /// The command line's `--landlock` and `--landlock-rules` values: `None` when Landlock is off.
    pub fn from_cli(enabled: bool, rules: &[String]) -> Result<Option<Self>, LandlockCliError> {
        if !enabled {
            return if rules.is_empty() {
                Ok(None)
            } else {
                Err(LandlockCliError::Landlock(
                    LandlockError::RulesWithoutLandlock,
                ))
            };
        }
        let rules = rules
            .iter()
            .map(|rule| LandlockRule::parse(rule))
            .collect::<Result<Vec<_>, _>>()
            .map_err(LandlockCliError::Config)?;
        Ok(Some(LandlockSettings { rules }))
    }
}

/// A bad `--landlock` / `--landlock-rules` command line.
#[derive(Debug, thiserror::Error)]
pub enum LandlockCliError {
    #[error(transparent)]
    Config(ConfigError),
    #[error(transparent)]
    Landlock(LandlockError),
}

/// One path and what the VMM may do beneath it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRule {
    pub path: PathBuf,
    pub access: LandlockAccess,
}

/// Every path the VMM may reach once restricted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LandlockPolicy {
    pub rules: Vec<PolicyRule>,
}

/// What the kernel enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    Full,
    /// An older ABI: some of the rights asked for are not restricted.
    Partial,
    /// No Landlock in this kernel: nothing is restricted (upstream's behaviour too).
    None,
}

impl LandlockPolicy {
    /// The rules for `launch`: the files of its VM (kernel, initramfs, disks, serial and console
    /// files, memory-zone files, the NV region, a `--restore` source and the files of its
    /// config), `/dev/kvm` (every boot and restore opens it), what the NV layer reads (`/proc`
    /// for the boot id and the liveness of a VM's owner, `/dev/urandom` for new UUIDs), the sysfs
    /// attributes of a devdax device, then the operator's `--landlock-rules`.
    ///
    /// Creates, empty, the files the VM would create (so that a rule can name them).
    pub fn for_launch(launch: &VmmLaunch, settings: &LandlockSettings) -> LandlockPolicy {
        let mut policy = LandlockPolicy::default();
        policy.allow("/dev/kvm", LandlockAccess::READ_WRITE);
        policy.allow("/dev/urandom", LandlockAccess::READ);
        policy.allow("/proc", LandlockAccess::READ);
        if let Some(vm) = &launch.vm {
            policy.allow_vm(vm);
        }
        if let Some(restore) = &launch.restore {
            if let Some(dir) = restore.source_dir() {
                policy.allow(dir, LandlockAccess::READ);
                // The snapshot's config names the files the restored VM maps (shared zones).
                if let Some(config) = std::fs::read(Path::new(dir).join("config.json"))
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<VmConfig>(&bytes).ok())
                {
                    policy.allow_vm(&config);
                }
            }
        }
        for rule in &settings.rules {
            policy.allow(&rule.path, rule.access);
        }
        policy
    }

    fn allow(&mut self, path: impl Into<PathBuf>, access: LandlockAccess) {
        self.rules.push(PolicyRule {
            path: path.into(),
            access,
        });
    }

    /// A file the VMM will create if missing: created now, empty, so that the rule has a target.
    /// Guest RAM (`private`: a zone file, a region) is created owner-only, as nv-extension
    /// creates a region.
    fn allow_created(&mut self, path: &str, private: bool) {
        use std::os::unix::fs::OpenOptionsExt;
        if !Path::new(path).exists() {
            let mode = if private { 0o600 } else { 0o666 };
            if let Err(error) = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
            {
                // The VM's own open reports the real problem (a missing directory, ...).
                log::warn!("--landlock: cannot create {path} ahead of the VM: {error}");
            }
        }
        self.allow(path, LandlockAccess::READ_WRITE);
    }

    fn allow_vm(&mut self, vm: &VmConfig) {
        for path in [
            &vm.payload.kernel,
            &vm.payload.initramfs,
            &vm.payload.firmware,
        ]
        .into_iter()
        .flatten()
        {
            self.allow(path, LandlockAccess::READ);
        }
        for disk in vm.disks.iter().flatten() {
            if let Some(path) = &disk.path {
                let access = if disk.readonly {
                    LandlockAccess::READ
                } else {
                    LandlockAccess::READ_WRITE
                };
                self.allow(path, access);
            }
        }
        // The entropy source is opened again by a restore.
        self.allow(&vm.rng.src, LandlockAccess::READ);
        for console in [&vm.serial, &vm.console] {
            if console.mode == ConsoleOutputMode::File {
                if let Some(path) = &console.file {
                    self.allow_created(path, false);
                }
            }
        }
        for zone in vm.memory.zones.iter().flatten() {
            if let Some(path) = &zone.file {
                self.allow_created(path, true);
                self.allow_dax_sysfs(Path::new(path));
            }
        }
        if let Some(nv) = &vm.nv {
            if nv.create {
                self.allow_created(&nv.region, true);
            } else {
                self.allow(&nv.region, LandlockAccess::READ_WRITE);
            }
            self.allow_dax_sysfs(Path::new(&nv.region));
            // `swap-in=FILE`: read, then removed from its directory once the VM is resident.
            if let Some(file) = &nv.swap_in {
                let dir = Path::new(file)
                    .parent()
                    .filter(|dir| !dir.as_os_str().is_empty());
                self.allow(dir.unwrap_or(Path::new(".")), LandlockAccess::READ_WRITE);
            }
        }
    }

    /// A devdax device's size and alignment are read from its sysfs directory (a symlink under
    /// `/sys/dev/char`, resolved: Landlock checks the real path).
    fn allow_dax_sysfs(&mut self, device: &Path) {
        use std::os::unix::fs::MetadataExt;
        let Ok(metadata) = std::fs::metadata(device) else {
            return;
        };
        if !metadata.file_type().is_char_device() {
            return;
        }
        let link = format!(
            "/sys/dev/char/{}:{}",
            libc::major(metadata.rdev()),
            libc::minor(metadata.rdev())
        );
        if let Ok(real) = std::fs::canonicalize(&link) {
            self.allow(real, LandlockAccess::READ);
        }
    }

    /// Restricts the calling thread (and the threads it starts from now on) to the policy.
    pub fn restrict_current_thread(
        &self,
        thread: &'static str,
    ) -> Result<Enforcement, LandlockError> {
        let handled = AccessFs::from_all(TARGET_ABI);
        let mut ruleset = Ruleset::default()
            .handle_access(handled)
            .map_err(LandlockError::Ruleset)?
            .create()
            .map_err(LandlockError::Ruleset)?;
        for rule in &self.rules {
            let fd = match PathFd::new(&rule.path) {
                Ok(fd) => fd,
                // A path that does not exist cannot be reached anyway; the VM's own open of it
                // fails with its usual message. Say why in the log.
                Err(source) if !rule.path.exists() => {
                    log::warn!("--landlock: no rule for {} ({source})", rule.path.display());
                    continue;
                }
                Err(source) => {
                    return Err(LandlockError::RulePath {
                        path: rule.path.clone(),
                        source,
                    })
                }
            };
            let mut rights = rule.access.rights();
            if !rule.path.is_dir() {
                // Directory rights (make, remove, read a listing) mean nothing on a file.
                rights &= AccessFs::from_file(TARGET_ABI);
            }
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, rights))
                .map_err(LandlockError::Ruleset)?;
        }
        let status = ruleset
            .restrict_self()
            .map_err(|source| LandlockError::Restrict { thread, source })?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => Enforcement::Full,
            RulesetStatus::PartiallyEnforced => Enforcement::Partial,
            RulesetStatus::NotEnforced => Enforcement::None,
        })
    }

    /// `restrict_current_thread` for the control loop, with the outcome in the log.
    pub fn enforce(&self) -> Result<Enforcement, LandlockError> {
        let enforcement = self.restrict_current_thread("control loop")?;
        let abi = kernel_abi();
        match enforcement {
            Enforcement::Full => log::info!(
                "--landlock: {} rules enforced (kernel Landlock ABI {abi})",
                self.rules.len()
            ),
            Enforcement::Partial => log::warn!(
                "--landlock: enforced in part: the kernel's Landlock ABI {abi} lacks some rights"
            ),
            Enforcement::None => log::warn!(
                "--landlock: this kernel does not enforce Landlock (ABI {abi}); the VMM runs \
                 without it, as upstream does"
            ),
        }
        Ok(enforcement)
    }
}

/// The kernel's Landlock ABI version (0: none), as `landlock_create_ruleset` reports it.
pub fn kernel_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag the call only returns
    // the ABI version (or an error); it reads and writes no memory.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    version.max(0)
}

/// The policy the API server thread applies to itself (set by `vmm::run` before it starts).
static API_THREAD_POLICY: OnceLock<LandlockPolicy> = OnceLock::new();

/// Makes the API server thread, started next, restrict itself to `policy`.
pub fn restrict_api_thread_to(policy: &LandlockPolicy) {
    // A second VMM in one process (tests) keeps the first policy; both come from `--landlock`.
    let _ = API_THREAD_POLICY.set(policy.clone());
}

/// Called by the API server thread first thing: restricts it when `--landlock` is on.
pub fn restrict_api_thread() -> Result<(), LandlockError> {
    match API_THREAD_POLICY.get() {
        Some(policy) => policy.restrict_current_thread("API server").map(|_| ()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConsoleConfig, DiskConfig, MemoryZoneConfig, NvConfig, PayloadConfig};

    #[test]
    fn access_is_r_w_or_rw() {
        assert_eq!(LandlockAccess::parse("r"), Some(LandlockAccess::READ));
        assert_eq!(
            LandlockAccess::parse("rw"),
            Some(LandlockAccess::READ_WRITE)
        );
        assert_eq!(
            LandlockAccess::parse("wr"),
            Some(LandlockAccess::READ_WRITE)
        );
        assert_eq!(
            LandlockAccess::parse("w"),
            Some(LandlockAccess {
                read: false,
                write: true
            })
        );
        for bad in ["", "x", "rr", "rwx", "R", " r"] {
            assert_eq!(LandlockAccess::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn read_and_write_rights_are_upstreams_split() {
        let read = LandlockAccess::READ.rights();
        assert!(read.contains(AccessFs::ReadFile | AccessFs::ReadDir));
        assert!(!read.contains(AccessFs::WriteFile));
        let write = LandlockAccess::parse("w").unwrap().rights();
        assert!(write.contains(AccessFs::WriteFile | AccessFs::MakeReg | AccessFs::Truncate));
        assert!(!write.contains(AccessFs::ReadFile));
        assert_eq!(
            LandlockAccess::READ_WRITE.rights(),
            AccessFs::from_all(TARGET_ABI)
        );
    }

    #[test]
    fn rules_parse_in_upstreams_syntax() {
        let rule = LandlockRule::parse("path=/var/snap,access=rw").unwrap();
        assert_eq!(rule.path, PathBuf::from("/var/snap"));
        assert_eq!(rule.access, LandlockAccess::READ_WRITE);
        let quoted = LandlockRule::parse("path=\"/a b\",access=\"r\"").unwrap();
        assert_eq!(quoted.path, PathBuf::from("/a b"));
        for (bad, needle) in [
            ("path=/x", "access"),
            ("access=r", "path"),
            ("path=/x,access=x", "expected r, w or rw"),
            ("path=/x,access=r,mode=1", "unknown key"),
        ] {
            let message = LandlockRule::parse(bad).unwrap_err().to_string();
            assert!(message.starts_with("--landlock-rules"), "{message}");
            assert!(message.contains(needle), "{bad}: {message}");
        }
    }

    #[test]
    fn rules_need_landlock() {
        assert_eq!(LandlockSettings::from_cli(false, &[]).unwrap(), None);
        let error = LandlockSettings::from_cli(false, &["path=/x,access=r".to_owned()])
            .unwrap_err()
            .to_string();
        assert!(error.contains("without --landlock"), "{error}");
        let settings = LandlockSettings::from_cli(true, &["path=/x,access=r".to_owned()])
            .unwrap()
            .unwrap();
        assert_eq!(settings.rules.len(), 1);
    }

    #[test]
    fn policy_names_every_file_of_the_config_and_creates_missing_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        std::fs::write(at("kernel"), b"k").unwrap();
        std::fs::write(at("ro.img"), b"").unwrap();
        let vm = VmConfig {
            payload: PayloadConfig {
                kernel: Some(at("kernel")),
                ..Default::default()
            },
            disks: Some(vec![
                DiskConfig {
                    path: Some(at("rw.img")),
                    ..Default::default()
                },
                DiskConfig {
                    path: Some(at("ro.img")),
                    readonly: true,
                    ..Default::default()
                },
            ]),
            serial: ConsoleConfig {
                mode: ConsoleOutputMode::File,
                file: Some(at("serial.log")),
                ..Default::default()
            },
            memory: crate::config::MemoryConfig {
                size: 0,
                zones: Some(vec![MemoryZoneConfig {
                    id: "mem0".into(),
                    size: 1 << 20,
                    file: Some(at("ram")),
                    shared: true,
                    ..Default::default()
                }]),
                ..Default::default()
            },
            nv: Some(NvConfig {
                region: at("region"),
                vm: "a".into(),
                create: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        // A swap-in reads its file and removes it from its directory.
        let mut swap_in = vm.clone();
        swap_in.nv.as_mut().unwrap().swap_in = Some(at("swap/a.nvswap"));
        let swap_in_policy = LandlockPolicy::for_launch(
            &VmmLaunch {
                vm: Some(swap_in),
                ..Default::default()
            },
            &LandlockSettings::default(),
        );
        assert!(swap_in_policy
            .rules
            .iter()
            .any(|rule| rule.path == Path::new(&at("swap"))
                && rule.access == LandlockAccess::READ_WRITE));
        let launch = VmmLaunch {
            vm: Some(vm),
            ..Default::default()
        };
        let settings = LandlockSettings {
            rules: vec![LandlockRule {
                path: PathBuf::from(at("snapshots")),
                access: LandlockAccess::READ_WRITE,
            }],
        };
        let policy = LandlockPolicy::for_launch(&launch, &settings);
        let access_of = |path: &str| {
            policy
                .rules
                .iter()
                .find(|rule| rule.path == Path::new(path))
                .map(|rule| rule.access)
        };
        assert_eq!(access_of("/dev/kvm"), Some(LandlockAccess::READ_WRITE));
        assert_eq!(access_of(&at("kernel")), Some(LandlockAccess::READ));
        assert_eq!(access_of(&at("rw.img")), Some(LandlockAccess::READ_WRITE));
        assert_eq!(access_of(&at("ro.img")), Some(LandlockAccess::READ));
        assert_eq!(
            access_of(&at("serial.log")),
            Some(LandlockAccess::READ_WRITE)
        );
        assert_eq!(access_of(&at("ram")), Some(LandlockAccess::READ_WRITE));
        assert_eq!(access_of(&at("region")), Some(LandlockAccess::READ_WRITE));
        assert_eq!(
            access_of(&at("snapshots")),
            Some(LandlockAccess::READ_WRITE)
        );
        // Outputs the VM creates exist (empty) so that their rules have a target; the region
        // is an empty file, which nv-extension formats on `create=on`.
        for created in ["serial.log", "ram", "region"] {
            assert_eq!(
                std::fs::metadata(at(created)).unwrap().len(),
                0,
                "{created}"
            );
        }
        // Guest RAM is owner-only, as nv-extension creates a region.
        use std::os::unix::fs::PermissionsExt;
        for private in ["ram", "region"] {
            let mode = std::fs::metadata(at(private)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{private}: {mode:o}");
        }
        // A disk is never created by the policy: a missing disk stays an error of the VM.
        assert!(!Path::new(&at("rw.img")).exists());
    }

    #[test]
    fn a_restricted_thread_opens_only_what_its_rules_name() {
        assert!(kernel_abi() >= 1, "this host's kernel has no Landlock");
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        let other = dir.path().join("other");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("secret"), b"s").unwrap();
        let policy = LandlockPolicy {
            rules: vec![PolicyRule {
                path: allowed.clone(),
                access: LandlockAccess::READ_WRITE,
            }],
        };
        // Landlock binds a thread for good: test it on a thread of its own.
        let outcome = std::thread::spawn(move || {
            let enforcement = policy.restrict_current_thread("test").unwrap();
            let write_inside = std::fs::write(allowed.join("f"), b"x").is_ok();
            let read_outside = std::fs::read(other.join("secret")).map_err(|e| e.kind());
            let create_outside = std::fs::write(other.join("new"), b"x").map_err(|e| e.kind());
            (enforcement, write_inside, read_outside, create_outside)
        })
        .join()
        .unwrap();
        assert_eq!(outcome.0, Enforcement::Full);
        assert!(outcome.1, "writing beneath the rule's directory");
        assert_eq!(outcome.2, Err(std::io::ErrorKind::PermissionDenied));
        assert_eq!(outcome.3, Err(std::io::ErrorKind::PermissionDenied));
        // This thread was never restricted.
        assert!(std::fs::read(dir.path().join("other/secret")).is_ok());
    }
}
