//! The first thing a `recover=on` process does: start creating the KVM VM (the `vm-create`
//! thread, [`EarlyKvmVm`]) before anything else, so that `KVM_CREATE_VM` runs while the command
//! line is parsed and the VMM sets itself up, not after; then, as soon as the logger is up, open
//! the region and hand the VM's RAM, mapped as the region's directory gives it, to that thread,
//! so that its memory slot is registered while the VMM sets itself up and claims the VM.
//!
//! This begins before clap has looked at the command line, so it reads only what it needs from
//! the raw arguments: the `--nv` value, `--seccomp` and whether `--landlock` is there. It decides
//! nothing. The parsed command line is what counts: what was begun for a command line that
//! turns out not to be an in-place recovery is simply dropped (the thread ends, the VM is
//! destroyed, the mapping unmapped), and nothing is begun when `--landlock` appears anywhere
//! among the arguments (a thread started before the policy is enforced would not be bound by
//! it). Nothing begun here can run the guest or read guest memory, and nothing is claimed or
//! written: the VM gets no vCPU until the recovery has claimed the VM and confirmed that the
//! extent mapped ahead is the claimed one (`nv::prepare`). An error met ahead is not reported
//! here: the recovery does that step again and reports it where it always did.

use std::ffi::OsString;

use nv_extension::{OpenOptions, Region};

use crate::config::{NvConfig, SeccompMode};
use crate::kvm_vm::EarlyKvmVm;
use crate::nv::MappedAhead;
use crate::Error;

/// What the raw arguments say about an in-place recovery, as far as starting its VM early goes.
#[derive(Debug, PartialEq, Eq)]
struct RecoveryArguments {
    nv: NvConfig,
    seccomp: SeccompMode,
}

/// The value of option `name` (`--name value` or `--name=value`); if it is repeated (which
/// clap refuses) the last one.
fn option_value<'a>(arguments: &'a [String], name: &str) -> Option<&'a str> {
    let with_equals = format!("{name}=");
    let mut found = None;
    let mut words = arguments.iter();
    while let Some(word) = words.next() {
        if word == name {
            found = words.next().map(String::as_str);
        } else if let Some(value) = word.strip_prefix(&with_equals) {
            found = Some(value);
        }
    }
    found
}

/// `Some` if `arguments` (without the program name) look like an in-place recovery without
/// `--landlock`; `None` for anything else, including what does not parse (clap and the launch
/// report that, later, as they always did).
fn recovery_arguments(arguments: &[OsString]) -> Option<RecoveryArguments> {
    // Non-UTF-8 arguments are clap's to refuse; nothing is started for them.
    let arguments: Vec<String> = arguments
        .iter()
        .map(|argument| argument.to_str().map(str::to_owned))
        .collect::<Option<_>>()?;
    // `--landlock` and `--landlock-rules`, or a value that merely looks like them: no thread.
    if arguments.iter().any(|word| word.starts_with("--landlock")) {
        return None;
    }
    let nv = NvConfig::parse(option_value(&arguments, "--nv")?).ok()?;
    if !nv.recover || nv.swap_in.is_some() {
        return None;
    }
    let seccomp = match option_value(&arguments, "--seccomp") {
        None => SeccompMode::Enforce,
        Some(value) => SeccompMode::from_cli(value)?,
    };
    Some(RecoveryArguments { nv, seccomp })
}

/// An in-place recovery's work begun before the VMM set itself up: the KVM VM being created
/// and, once [`RecoveryAhead::map_memory`] ran, its region opened and the VM's RAM mapped as the
/// region's directory gives it, handed to the VM's thread. Nothing is claimed and nothing of guest
/// memory is read; the recovery (`nv::prepare`) claims the VM and confirms the place.
pub struct RecoveryAhead {
    vm: EarlyKvmVm,
    /// The `--nv` it was started for; `None` when started for a parsed config (nothing is
    /// opened ahead then).
    nv: Option<NvConfig>,
    /// The `--seccomp` mode read from the raw arguments, under which the VM's thread (and the
    /// helper it starts) runs; `None` when started for a parsed config, i.e. under its mode.
    seccomp: Option<SeccompMode>,
    /// The region, if opening it ahead worked (if not, the recovery opens it again and reports
    /// the error where it always did).
    region: Option<Region>,
    /// The RAM mapped from the directory and handed to `vm`, if the directory gave an extent.
    mapped: Option<MappedAhead>,
}

impl std::fmt::Debug for RecoveryAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryAhead")
            .field("nv", &self.nv)
            .field("region", &self.region)
            .field("mapped", &self.mapped.is_some())
            .finish_non_exhaustive()
    }
}

impl RecoveryAhead {
    /// Starts creating the KVM VM now if the process's arguments (`std::env::args_os()`
    /// without the program name) ask for an in-place recovery (`--nv ..,recover=on`, not a
    /// swap-in) and not for `--landlock`. Hand the result to [`crate::run_with`], which uses it
    /// only if the parsed command line is that recovery. `None` when there is nothing to start
    /// or the thread cannot start (the recovery then starts one itself and reports a failure).
    pub fn start(arguments: &[OsString]) -> Option<RecoveryAhead> {
        let recovery = recovery_arguments(arguments)?;
        let vm = EarlyKvmVm::start(recovery.seccomp).ok()?;
        Some(RecoveryAhead {
            vm,
            nv: Some(recovery.nv),
            seccomp: Some(recovery.seccomp),
            region: None,
            mapped: None,
        })
    }

    /// The VM alone, started for a parsed config: the recovery opens the region itself.
    pub(crate) fn with_vm(vm: EarlyKvmVm) -> RecoveryAhead {
        RecoveryAhead {
            vm,
            nv: None,
            seccomp: None,
            region: None,
            mapped: None,
        }
    }

    /// Opens the region and maps the VM's RAM from its directory, and hands the mapping to
    /// the VM's thread, which registers it as soon as the VM exists. Errors are not reported
    /// here: whatever failed is done again by the recovery, which reports it as before.
    pub fn map_memory(&mut self) {
        let Some(nv) = &self.nv else {
            return;
        };
        if self.region.is_some() {
            return;
        }
        let Ok(region) = Region::open(&nv.region, &OpenOptions::default()) else {
            return;
        };
        self.mapped = MappedAhead::map(nv, &region);
        if let Some(mapped) = &self.mapped {
            mapped.hand_to(&self.vm);
        }
        self.region = Some(region);
    }

    /// What a recovery of `nv` under `seccomp` can use: the VM, and the region and mapping if
    /// they are of `nv`'s region and VM. If a mapping of another VM was handed over, the VM has
    /// it, and if the VM's threads were started under another seccomp mode they run under the
    /// wrong filter: then nothing is used and a new VM is started.
    pub(crate) fn into_parts(
        self,
        nv: &NvConfig,
        seccomp: SeccompMode,
    ) -> Result<(EarlyKvmVm, Option<Region>, Option<MappedAhead>), Error> {
        if self.seccomp.is_some_and(|ahead| ahead != seccomp) {
            // Its threads run under another filter than the parsed command line asks for (the
            // raw arguments were read differently): none of it is used.
            drop(self);
            return Ok((EarlyKvmVm::start(seccomp)?, None, None));
        }
        let same = self
            .nv
            .as_ref()
            .is_some_and(|ahead| ahead.region == nv.region && ahead.vm == nv.vm);
        match (same, self.mapped.is_some()) {
            (true, _) => Ok((self.vm, self.region, self.mapped)),
            (false, false) => Ok((self.vm, None, None)),
            (false, true) => {
                drop(self);
                Ok((EarlyKvmVm::start(seccomp)?, None, None))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arguments(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    fn judged(words: &[&str]) -> Option<RecoveryArguments> {
        recovery_arguments(&arguments(words))
    }

    #[test]
    fn an_in_place_recovery_is_recognised_in_both_spellings() {
        let recovery = |seccomp| {
            Some(RecoveryArguments {
                nv: NvConfig::parse("region=/r,vm=a,recover=on").unwrap(),
                seccomp,
            })
        };
        assert_eq!(
            judged(&["-v", "--nv", "region=/r,vm=a,recover=on", "--serial", "tty"]),
            recovery(SeccompMode::Enforce)
        );
        assert_eq!(
            judged(&["--nv=region=/r,vm=a,recover=on"]),
            recovery(SeccompMode::Enforce)
        );
        assert_eq!(
            judged(&["--nv", "region=/r,vm=a,recover=on", "--seccomp", "log"]),
            recovery(SeccompMode::Log)
        );
        assert_eq!(
            judged(&["--seccomp=false", "--nv", "region=/r,vm=a,recover=on"]),
            recovery(SeccompMode::Disabled)
        );
    }

    #[test]
    fn nothing_is_started_for_anything_else() {
        // Not a recovery: a cold boot, a swap-in, no --nv at all, a value that does not parse.
        assert_eq!(judged(&["--nv", "region=/r,vm=a,create=on"]), None);
        assert_eq!(
            judged(&["--nv", "region=/r,vm=a,recover=on,swap-in=/s"]),
            None
        );
        assert_eq!(judged(&["--kernel", "/k", "--memory", "size=1G"]), None);
        assert_eq!(judged(&["--nv", "region=/r,vm=a,recover=maybe"]), None);
        assert_eq!(judged(&["--nv"]), None);
        assert_eq!(judged(&[]), None);
        // --landlock, in any form: a thread started now would escape its policy.
        for landlock in [
            &["--landlock"][..],
            &["--landlock-rules", "path=/x,access=r"][..],
        ] {
            let mut words = vec!["--nv", "region=/r,vm=a,recover=on"];
            words.extend_from_slice(landlock);
            assert_eq!(judged(&words), None, "{words:?}");
        }
        // A --seccomp value clap refuses.
        assert_eq!(
            judged(&["--nv", "region=/r,vm=a,recover=on", "--seccomp", "maybe"]),
            None
        );
    }

    #[test]
    fn non_utf8_arguments_start_nothing() {
        use std::os::unix::ffi::OsStringExt;
        let mut words = arguments(&["--nv", "region=/r,vm=a,recover=on"]);
        words.push(OsString::from_vec(vec![0xff, 0xfe]));
        assert_eq!(recovery_arguments(&words), None);
    }
}
