//! End-to-end check of both boot protocols on this host's KVM: a synthetic kernel is loaded with
//! `load_kernel`, the boot vCPU is programmed with `arch::regs`, and a few instructions of guest
//! code read the boot structure through the register the protocol names (EBX for PVH, RSI for
//! the 64-bit protocol) and write fields of it to the serial port. This proves KVM accepts the
//! segment/control register state and that the guest finds what the protocol promises.
//!
//! Without /dev/kvm the test fails unless NV_SKIP_KVM=1 is set (project rule: never skip silently).

use std::io::Cursor;

use arch::{load_kernel, BootEntry, BootProtocol};
use integration_tests::minimal_vm::MinimalVm;
use kvm_ioctls::{Kvm, VcpuExit};

const RAM_SIZE: usize = 64 << 20;
const SERIAL_PORT: u16 = 0x3F8;
/// Instructions the guest may execute before we call it hung (each exit is one `out`).
const MAX_EXITS: usize = 16;

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
    let vm = MinimalVm::new(kvm, RAM_SIZE, |_| {});
    let entry = load_kernel(
        &vm.mem,
        &mut Cursor::new(image),
        "console=ttyS0",
        None,
        None,
    )
    .unwrap();
    let mut vcpu = vm.vm.create_vcpu(0).unwrap();
    vm.program_boot_vcpu(&vcpu, &entry);

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

/// PVH: 32-bit code that reads `hvm_start_info` through EBX.
/// mov dx,0x3f8; mov eax,[ebx]; out dx,eax; mov eax,[ebx+24]; out dx,eax; mov eax,cs;
/// out dx,eax; hlt
const PVH_CODE: [u8; 15] = [
    0x66, 0xBA, 0xF8, 0x03, 0x8B, 0x03, 0xEF, 0x8B, 0x43, 0x18, 0xEF, 0x8C, 0xC8, 0xEF, 0xF4,
];

/// The 64-bit Linux protocol: long-mode code that reads the zero page through RSI.
/// mov dx,0x3f8; mov eax,[rsi+0x202]; out dx,eax; mov eax,[rsi+0x228]; out dx,eax; mov eax,cs;
/// out dx,eax; hlt
const LINUX64_CODE: [u8; 22] = [
    0x66, 0xBA, 0xF8, 0x03, 0x8B, 0x86, 0x02, 0x02, 0x00, 0x00, 0xEF, 0x8B, 0x86, 0x28, 0x02, 0x00,
    0x00, 0xEF, 0x8C, 0xC8, 0xEF, 0xF4,
];

/// PVH finds `hvm_start_info` through EBX; the 64-bit protocol finds the zero page through RSI
/// in long mode.
#[test]
fn each_boot_protocol_finds_its_boot_structure() {
    integration_tests::require_kvm!();
    let kvm = Kvm::new().unwrap();
    let cases = [
        // hvm_start_info.magic, low half of cmdline_paddr, then the CS selector.
        (
            pvh_elf(&PVH_CODE),
            BootProtocol::Pvh,
            [0x336E_C578, 0x2_0000, 0x10],
        ),
        // "HdrS" from the zero page, cmd_line_ptr, then the CS selector.
        (
            bzimage(&LINUX64_CODE),
            BootProtocol::LinuxBoot64,
            [u32::from_le_bytes(*b"HdrS"), 0x2_0000, 0x10],
        ),
    ];
    for (image, protocol, expected) in cases {
        let (entry, values) = boot_and_collect(&kvm, image);
        assert_eq!(entry.protocol, protocol);
        assert_eq!(values, expected, "{protocol:?}: values the guest wrote");
    }
}
