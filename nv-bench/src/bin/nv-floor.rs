//! `nv-floor`: the least a process can do on this host to run a saved guest again over memory
//! that already holds it. nv-bench's A-floor execs it next to an NV recovery of the same VM.
//!
//! `nv-floor <region file> <offset> <size> <registers.json>`: maps the VM's extent of the
//! region (private copy-on-write, so the guest's writes never reach the region the real
//! recovery resumes from), creates a KVM VM, registers that memory, creates vCPU 0 with the
//! host's CPUID, sets the saved segment and general registers, and runs it until its first exit
//! to the VMM. `registers.json` is `{"regs": .., "sregs": ..}` as the VMM saved them (kvm-bindings'
//! serde form); nv-bench cuts it out of the saved state before the run.
//!
//! It prints `CLOCK_MONOTONIC` nanoseconds: `main`, `created` (KVM_CREATE_VM returned),
//! `registered` (the memory slot is in),
//! `running` (just before the first KVM_RUN),
//! `exit <reason>` (the first return to user space), `destroyed` (vCPU and VM fds closed:
//! what the kernel takes to tear a VM down, which a VMM's exit pays too).

use std::fs::File;
use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};

#[path = "../monotonic.rs"]
mod monotonic;

use monotonic::monotonic_ns;

/// RAM below the 32-bit device hole: a VM of up to this much has one memory slot at 0.
const RAM_BELOW_HOLE: u64 = 3 << 30;

fn fail(what: &str, error: impl std::fmt::Display) -> ! {
    eprintln!("nv-floor: {what}: {error}");
    std::process::exit(1)
}

fn number(text: &str, what: &str) -> u64 {
    text.parse().unwrap_or_else(|e| fail(what, e))
}

fn main() {
    let main_at = monotonic_ns();
    let arguments: Vec<String> = std::env::args().collect();
    if arguments.len() != 5 {
        fail(
            "usage",
            "nv-floor <region file> <offset> <size> <registers.json>",
        );
    }
    let offset = number(&arguments[2], "offset");
    let size = number(&arguments[3], "size");
    if size == 0 || size > RAM_BELOW_HOLE {
        fail(
            "size",
            "one memory slot below the 32-bit hole only (<= 3 GiB)",
        );
    }
    let registers: serde_json::Value = std::fs::read(&arguments[4])
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
        .unwrap_or_else(|e| fail("registers", e));
    let regs: kvm_regs =
        serde_json::from_value(registers["regs"].clone()).unwrap_or_else(|e| fail("regs", e));
    let sregs: kvm_sregs =
        serde_json::from_value(registers["sregs"].clone()).unwrap_or_else(|e| fail("sregs", e));

    let region = File::options()
        .read(true)
        .open(&arguments[1])
        .unwrap_or_else(|e| fail("opening the region", e));
    // SAFETY: a new private mapping of `size` bytes of an open file at a page-aligned offset
    // (extents are aligned); nothing else refers to that address range.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            region.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if host == libc::MAP_FAILED {
        fail("mapping guest memory", std::io::Error::last_os_error());
    }

    let kvm = Kvm::new().unwrap_or_else(|e| fail("opening /dev/kvm", e));
    let vm = kvm.create_vm().unwrap_or_else(|e| fail("KVM_CREATE_VM", e));
    let created_at = monotonic_ns();
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: host as u64,
    };
    // SAFETY: the slot covers exactly the mapping made above, which stays mapped until the
    // process exits (after the VM fd is closed).
    unsafe { vm.set_user_memory_region(slot) }
        .unwrap_or_else(|e| fail("KVM_SET_USER_MEMORY_REGION", e));
    let registered_at = monotonic_ns();
    let mut vcpu = vm
        .create_vcpu(0)
        .unwrap_or_else(|e| fail("KVM_CREATE_VCPU", e));
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .unwrap_or_else(|e| fail("KVM_GET_SUPPORTED_CPUID", e));
    vcpu.set_cpuid2(&cpuid)
        .unwrap_or_else(|e| fail("KVM_SET_CPUID2", e));
    vcpu.set_sregs(&sregs)
        .unwrap_or_else(|e| fail("KVM_SET_SREGS", e));
    vcpu.set_regs(&regs)
        .unwrap_or_else(|e| fail("KVM_SET_REGS", e));

    let running_at = monotonic_ns();
    let reason = match vcpu.run() {
        Ok(VcpuExit::IoOut(port, _)) => format!("io-out-{port:#x}"),
        Ok(VcpuExit::IoIn(port, _)) => format!("io-in-{port:#x}"),
        Ok(VcpuExit::MmioWrite(address, _)) => format!("mmio-write-{address:#x}"),
        Ok(VcpuExit::MmioRead(address, _)) => format!("mmio-read-{address:#x}"),
        Ok(other) => format!("{other:?}")
            .split(['(', ' '])
            .next()
            .unwrap_or("other")
            .to_string(),
        Err(e) => fail("KVM_RUN", e),
    };
    let exit_at = monotonic_ns();
    drop(vcpu);
    drop(vm);
    let destroyed_at = monotonic_ns();
    println!("main {main_at}");
    println!("created {created_at}");
    println!("registered {registered_at}");
    println!("running {running_at}");
    println!("exit {exit_at} {reason}");
    println!("destroyed {destroyed_at}");
}
