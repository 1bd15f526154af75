//! The rate of the TSC a guest's vCPUs count at. The freestanding test guests take it on their
//! command line (`tsc_khz=`) as their only time base, so whoever launches them asks here.
//! KVM reports it per vCPU (KVM_GET_TSC_KHZ); these hosts have no TSC scaling, so it is the
//! host's rate, the same for every VM.

//!
//! It lives with the harness, not in `vmm`: only the launchers of test guests (these tests, the
//! `test-guest` tool, nv-bench) need it, and `vmm` must not be a dependency of its own tests.

use kvm_ioctls::Kvm;

/// A KVM call that failed while reading the rate.
#[derive(Debug, thiserror::Error)]
#[error("{operation} failed (reading the guest TSC rate)")]
pub struct TscError {
    pub operation: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

fn kvm_call<T>(
    operation: &'static str,
    result: Result<T, kvm_ioctls::Error>,
) -> Result<T, TscError> {
    result.map_err(|source| TscError { operation, source })
}

/// The guest TSC rate in kHz, read from a throwaway VM with one vCPU.
pub fn guest_tsc_khz() -> Result<u32, TscError> {
    let kvm = kvm_call("opening /dev/kvm", Kvm::new())?;
    let vm = kvm_call("KVM_CREATE_VM", kvm.create_vm())?;
    let vcpu = kvm_call("KVM_CREATE_VCPU", vm.create_vcpu(0))?;
    kvm_call("KVM_GET_TSC_KHZ", vcpu.get_tsc_khz())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_a_plausible_tsc_frequency() {
        let khz = match guest_tsc_khz() {
            Ok(khz) => khz,
            // As the KVM end-to-end tests: skipped only when asked to, never silently.
            Err(e) if std::env::var("NV_SKIP_KVM").as_deref() == Ok("1") => {
                eprintln!("SKIPPED: {e} and NV_SKIP_KVM=1 is set");
                return;
            }
            Err(e) => panic!("{e} (set NV_SKIP_KVM=1 to skip KVM tests explicitly)"),
        };
        // Any x86 TSC of the last two decades runs between 500 MHz and 10 GHz.
        assert!((500_000..10_000_000).contains(&khz), "{khz} kHz");
    }
}
