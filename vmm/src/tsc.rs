//! The rate of the TSC a guest's vCPUs count at. The freestanding test guests take it on their
//! command line (`tsc_khz=`) as their only time base, so whoever launches them asks here.
//! KVM reports it per vCPU (KVM_GET_TSC_KHZ); these hosts have no TSC scaling, so it is the
//! host's rate, the same for every VM.

use kvm_ioctls::Kvm;

use crate::Error;

/// The guest TSC rate in kHz, read from a throwaway VM with one vCPU.
pub fn guest_tsc_khz() -> Result<u32, Error> {
    let kvm = Kvm::new().map_err(Error::KvmOpen)?;
    let vm = kvm.create_vm().map_err(|source| Error::Kvm {
        operation: "KVM_CREATE_VM",
        source,
    })?;
    let vcpu = vm.create_vcpu(0).map_err(|source| Error::Kvm {
        operation: "KVM_CREATE_VCPU",
        source,
    })?;
    vcpu.get_tsc_khz().map_err(|source| Error::VcpuKvm {
        vcpu: 0,
        operation: "KVM_GET_TSC_KHZ",
        source,
    })
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
