//! End-to-end check of both boot protocols on this host's KVM: a synthetic kernel is loaded with
//! `load_kernel`, the boot vCPU is programmed with `arch::regs`, and a few instructions of guest
//! code read the boot structure through the register the protocol names (EBX for PVH, RSI for
//! the 64-bit protocol) and write fields of it to the serial port. This proves KVM accepts the
//! segment/control register state and that the guest finds what the protocol promises.
//!
//! Without /dev/kvm the test fails unless NV_SKIP_KVM=1 is set (project rule: never skip silently).

use std::io::Cursor;

use arch::{load_kernel, BootEntry, BootProtocol};
use kvm_bindings::{kvm_userspace_memory_region, Msrs};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const RAM_SIZE: usize = 64 << 20;
const SERIAL_PORT: u16 = 0x3F8;
/// Instructions the guest may execute before we call it hung (each exit is one `out`).
const MAX_EXITS: usize = 16;

fn kvm_or_skip() -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) if std::env::var("NV_SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("NV_SKIP_KVM=1: skipping KVM boot test ({e})");
            None
        }
        Err(e) => panic!("/dev/kvm is not usable ({e}); set NV_SKIP_KVM=1 to skip KVM tests"),
    }
}

fn put(image: &mut [u8], offset: usize, bytes: &[u8]) {
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// ELF64 with one PT_LOAD segment at 1 MiB holding `code`, and a PVH note pointing at it.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let mut image = vec![0u8; 0x1200];
    put(&mut image, 0, b"\x7fELF\x02\x01\x01");
    put(&mut image, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut image, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut image, 24, &0x10_0000u64.to_le_bytes()); // e_entry
    put(&mut image, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut image, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut image, 56, &2u16.to_le_bytes()); // e_phnum
    put(&mut image, 64, &1u32.to_le_bytes()); // PT_LOAD
    put(&mut image, 72, &0x1000u64.to_le_bytes()); // p_offset
    put(&mut image, 88, &0x10_0000u64.to_le_bytes()); // p_paddr
    put(&mut image, 96, &0x200u64.to_le_bytes()); // p_filesz
    put(&mut image, 104, &0x200u64.to_le_bytes()); // p_memsz
    put(&mut image, 120, &4u32.to_le_bytes()); // PT_NOTE
    put(&mut image, 128, &176u64.to_le_bytes());
    put(&mut image, 152, &20u64.to_le_bytes());
    put(&mut image, 176, &4u32.to_le_bytes()); // n_namesz
    put(&mut image, 180, &4u32.to_le_bytes()); // n_descsz
    put(&mut image, 184, &18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    put(&mut image, 188, b"Xen\0");
    put(&mut image, 192, &0x10_0000u32.to_le_bytes());
    put(&mut image, 0x1000, code);
    image
}

/// bzImage whose protected-mode part has `code` at the 64-bit entry (load address + 0x200).
fn bzimage(code: &[u8]) -> Vec<u8> {
    let setup_size = 5 * 512;
    let mut image = vec![0u8; setup_size + 0x1000];
    image[0x1F1] = 4; // setup_sects
    put(&mut image, 0x1F4, &(0x1000u32 / 16).to_le_bytes()); // syssize
    put(&mut image, 0x1FE, &0xAA55u16.to_le_bytes());
    put(&mut image, 0x202, b"HdrS");
    put(&mut image, 0x206, &0x020Fu16.to_le_bytes());
    image[0x211] = 1; // LOADED_HIGH
    put(&mut image, 0x214, &0x10_0000u32.to_le_bytes());
    put(&mut image, 0x22C, &0x7FFF_FFFFu32.to_le_bytes());
    put(&mut image, 0x236, &1u16.to_le_bytes()); // XLF_KERNEL_64
    put(&mut image, 0x238, &2047u32.to_le_bytes());
    put(&mut image, setup_size + 0x200, code);
    image
}

/// Boots `image` and returns the 32-bit values the guest wrote to the serial port before `hlt`.
fn boot_and_collect(kvm: &Kvm, image: Vec<u8>) -> (BootEntry, Vec<u32>) {
    // `mem` is declared before `vm` so that it is dropped after it: KVM must not keep a
    // mapping to memory that is already unmapped.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
    let vm = kvm.create_vm().unwrap();
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).unwrap();
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: `host` is the start of `mem`'s mapping of this region, valid for
        // `region.len()` bytes, and `mem` outlives `vm` (declared first, dropped last).
        unsafe { vm.set_user_memory_region(region).unwrap() };
    }
    let entry = load_kernel(&mem, &mut Cursor::new(image), "console=ttyS0", None).unwrap();

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    arch::regs::setup_sregs(&entry, &mem, &mut sregs).unwrap();
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&arch::regs::setup_regs(&entry)).unwrap();
    vcpu.set_fpu(&arch::regs::setup_fpu()).unwrap();
    let msrs = arch::regs::initial_msrs();
    let written = vcpu.set_msrs(&Msrs::from_entries(&msrs).unwrap()).unwrap();
    assert_eq!(written, msrs.len(), "KVM refused a boot MSR");

    let mut values = Vec::new();
    for _ in 0..MAX_EXITS {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(SERIAL_PORT, data) if data.len() == 4 => {
                values.push(u32::from_le_bytes(data.try_into().unwrap()));
            }
            VcpuExit::Hlt => return (entry, values),
            other => panic!("unexpected exit {other:?} after {values:x?}"),
        }
    }
    panic!("guest did not halt; wrote {values:x?}");
}

#[test]
fn pvh_guest_finds_start_info_through_ebx() {
    let Some(kvm) = kvm_or_skip() else { return };
    // 32-bit code: mov dx,0x3f8; mov eax,[ebx]; out dx,eax; mov eax,[ebx+24]; out dx,eax;
    //              mov eax,cs; out dx,eax; hlt
    let code = [
        0x66, 0xBA, 0xF8, 0x03, 0x8B, 0x03, 0xEF, 0x8B, 0x43, 0x18, 0xEF, 0x8C, 0xC8, 0xEF, 0xF4,
    ];
    let (entry, values) = boot_and_collect(&kvm, pvh_elf(&code));
    assert_eq!(entry.protocol, BootProtocol::Pvh);
    // hvm_start_info.magic, low half of cmdline_paddr, then the CS selector.
    assert_eq!(values, vec![0x336E_C578, 0x2_0000, 0x10]);
}

#[test]
fn linux64_guest_finds_zero_page_through_rsi_in_long_mode() {
    let Some(kvm) = kvm_or_skip() else { return };
    // 64-bit code: mov dx,0x3f8; mov eax,[rsi+0x202]; out dx,eax; mov eax,[rsi+0x228];
    //              out dx,eax; mov eax,cs; out dx,eax; hlt
    let code = [
        0x66, 0xBA, 0xF8, 0x03, 0x8B, 0x86, 0x02, 0x02, 0x00, 0x00, 0xEF, 0x8B, 0x86, 0x28, 0x02,
        0x00, 0x00, 0xEF, 0x8C, 0xC8, 0xEF, 0xF4,
    ];
    let (entry, values) = boot_and_collect(&kvm, bzimage(&code));
    assert_eq!(entry.protocol, BootProtocol::LinuxBoot64);
    // "HdrS" from the zero page, cmd_line_ptr, then the CS selector.
    assert_eq!(values, vec![u32::from_le_bytes(*b"HdrS"), 0x2_0000, 0x10]);
}
