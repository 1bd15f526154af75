//! The first thing a `recover=on` process does: start the `vm-create` thread ([`EarlyKvmVm`])
//! before anything else. It opens the region, maps the VM's RAM as the region's directory gives
//! it, creates the KVM VM and registers that RAM as its memory slot, all while the command line
//! is parsed and the VMM sets itself up, so that the slot (mostly the kernel's wait for an SRCU
//! grace period) is in place by the time the recovery has claimed the VM and read its state.
//! Log lines of that thread written before the logger is configured are kept and written once
//! it is (the binary's logger buffers them).
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
use std::sync::mpsc::{channel, Receiver, Sender};

use nv_extension::{OpenOptions, Region};
use vm_memory::GuestMemoryMmap;

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

/// What the VM's thread opened and mapped for the recovery before creating the VM.
struct OpenedAhead {
    region: Region,
    /// The RAM mapped from the directory (and registered by the thread), if the directory gave
    /// an extent.
    mapped: Option<MappedAhead>,
}

/// An in-place recovery's work begun before the VMM set itself up, on the `vm-create` thread:
/// its region opened, the VM's RAM mapped as the region's directory gives it, the KVM VM
/// created and that RAM registered as its memory slot. Nothing is claimed and nothing of guest
/// memory is read; the recovery (`nv::prepare`) claims the VM and confirms the place.
pub struct RecoveryAhead {
    vm: EarlyKvmVm,
    /// The `--nv` it was started for; `None` when started for a parsed config (nothing is
    /// opened ahead then).
    nv: Option<NvConfig>,
    /// The `--seccomp` mode read from the raw arguments, under which the VM's thread (and the
    /// helper it starts) runs; `None` when started for a parsed config, i.e. under its mode.
    seccomp: Option<SeccompMode>,
    /// Where the VM's thread sends the region once it opened it (nothing if that failed: the
    /// recovery then opens it again and reports the error where it always did).
    opened: Option<Receiver<OpenedAhead>>,
}

impl std::fmt::Debug for RecoveryAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryAhead")
            .field("nv", &self.nv)
            .field("seccomp", &self.seccomp)
            .finish_non_exhaustive()
    }
}

/// Run first on the VM's thread: opens `nv`'s region and maps the VM's RAM from its directory,
/// sends both to `opened` and returns the RAM for the thread to register. Errors are not
/// reported here: whatever failed is done again by the recovery, which reports it as before.
fn open_and_map(nv: &NvConfig, opened: &Sender<OpenedAhead>) -> Option<GuestMemoryMmap> {
    let region = Region::open(&nv.region, &OpenOptions::default()).ok()?;
    let mapped = MappedAhead::map(nv, &region);
    let memory = mapped.as_ref().map(MappedAhead::guest_memory);
    // The receiver is gone only if the recovery was given up; the region goes with this.
    let _ = opened.send(OpenedAhead { region, mapped });
    memory
}

impl RecoveryAhead {
    /// Starts the in-place recovery's `vm-create` thread now if the process's arguments
    /// (`std::env::args_os()` without the program name) ask for an in-place recovery (`--nv
    /// ..,recover=on`, not a swap-in) and not for `--landlock`: it opens the region, maps the
    /// VM's RAM from the directory, creates the KVM VM and registers the RAM, while the command
    /// line is parsed and the VMM sets itself up. Hand the result to [`crate::run_with`], which
    /// uses it only if the parsed command line is that recovery. `None` when there is nothing
    /// to start or the thread cannot start (the recovery then starts one itself and reports a
    /// failure).
    pub fn start(arguments: &[OsString]) -> Option<RecoveryAhead> {
        let recovery = recovery_arguments(arguments)?;
        let (sender, opened) = channel();
        let nv = recovery.nv.clone();
        let vm =
            EarlyKvmVm::start_after(recovery.seccomp, move || open_and_map(&nv, &sender)).ok()?;
        Some(RecoveryAhead {
            vm,
            nv: Some(recovery.nv),
            seccomp: Some(recovery.seccomp),
            opened: Some(opened),
        })
    }

    /// The VM alone, started for a parsed config: the recovery opens the region itself.
    pub(crate) fn with_vm(vm: EarlyKvmVm) -> RecoveryAhead {
        RecoveryAhead {
            vm,
            nv: None,
            seccomp: None,
            opened: None,
        }
    }

    /// What the VM's thread opened ahead, once it is done opening (it does that first).
    fn take_opened(&mut self) -> Option<OpenedAhead> {
        self.opened.take()?.recv().ok()
    }

    /// What a recovery of `nv` under `seccomp` can use: the VM, and the region and mapping if
    /// they are of `nv`'s region and VM. If a mapping of another VM was registered, the VM has
    /// it, and if the VM's threads were started under another seccomp mode they run under the
    /// wrong filter: then nothing is used and a new VM is started.
    pub(crate) fn into_parts(
        mut self,
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
        match self.take_opened() {
            Some(opened) if same => Ok((self.vm, Some(opened.region), opened.mapped)),
            // Another VM's RAM was registered: the VM cannot be used either.
            Some(OpenedAhead {
                mapped: Some(_), ..
            }) => {
                drop(self);
                Ok((EarlyKvmVm::start(seccomp)?, None, None))
            }
            // Nothing opened, or nothing registered: the VM alone is still good.
            _ => Ok((self.vm, None, None)),
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
