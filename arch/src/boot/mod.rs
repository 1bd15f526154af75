//! Kernel loading: detects the image kind and hands it to the matching boot protocol.
//!
//! - ELF `vmlinux` with a Xen PVH note -> [`pvh`]: entered in 32-bit protected mode at the
//!   note's entry with `hvm_start_info` in EBX (what upstream cloud-hypervisor does for ELF).
//! - bzImage -> [`bzimage`]: entered at its 64-bit entry with the zero page in RSI.
//!
//! Guest memory may have been partly written when an error is returned; the VM must not be
//! started then.

mod bzimage;
mod initramfs;
mod pvh;

use std::fs::File;
use std::io::{self, Read, Seek};

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile};

use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_RAM_START, MIN_RAM_SIZE};
use crate::{write_guest, Error};

/// How the boot vCPU must be entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Xen PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = zero page.
    LinuxBoot64,
}

/// Where and how to start the kernel that [`load_kernel`] put into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    pub protocol: BootProtocol,
    /// First instruction to execute.
    pub entry: GuestAddress,
    /// `hvm_start_info` (PVH) or zero page (LinuxBoot64).
    pub boot_info: GuestAddress,
}

/// Bytes of the image read up front to tell ELF from bzImage: the ELF header, or the bzImage
/// setup header up to and including `init_size` at 0x260.
const HEADER_WINDOW: usize = 0x280;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";

/// Loads `kernel` (ELF with a PVH note, or bzImage) and optionally `initramfs` into `mem`,
/// writes the command line and the boot protocol's structures, and returns the entry point.
///
/// Guest RAM must start at address 0 and cover at least the first MiB (boot structures live
/// there; kernels are loaded from 1 MiB up).
///
/// `acpi_rsdp` is where the ACPI tables' RSDP sits (the caller writes the tables): it goes into
/// `hvm_start_info.rsdp_paddr` (PVH) or `boot_params.acpi_rsdp_addr` (Linux boot protocol);
/// `None` leaves the field 0, a guest without ACPI.
pub fn load_kernel<M, K>(
    mem: &M,
    kernel: &mut K,
    cmdline: &str,
    initramfs: Option<&mut File>,
    acpi_rsdp: Option<GuestAddress>,
) -> Result<BootEntry, Error>
where
    M: GuestMemoryBackend,
    K: Read + Seek + ReadVolatile,
{
    check_boot_area(mem)?;
    check_cmdline(cmdline, CMDLINE_MAX_SIZE - 1)?;

    kernel.rewind().map_err(Error::ReadKernel)?;
    let mut header = [0u8; HEADER_WINDOW];
    let header_len = read_up_to(kernel, &mut header).map_err(Error::ReadKernel)?;
    let header = &header[..header_len];

    let image = KernelImage {
        mem,
        kernel,
        header,
        cmdline,
        initramfs,
        acpi_rsdp: acpi_rsdp.map_or(0, |addr| addr.0),
    };
    if header.starts_with(ELF_MAGIC) {
        pvh::load(image)
    } else if header.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(BZIMAGE_MAGIC) {
        bzimage::load(image)
    } else {
        Err(Error::NotAKernel)
    }
}

/// What [`load_kernel`] hands to the loader of the protocol it detected.
struct KernelImage<'a, M, K> {
    mem: &'a M,
    kernel: &'a mut K,
    /// The start of the image, as read to tell the kinds apart ([`HEADER_WINDOW`] bytes or
    /// fewer).
    header: &'a [u8],
    cmdline: &'a str,
    initramfs: Option<&'a mut File>,
    /// The RSDP's guest-physical address for the boot protocol's field, 0 for none.
    acpi_rsdp: u64,
}

/// Reads into `buf` until it is full or the input ends; returns the number of bytes read.
fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Refuses a kernel that needs `needed` bytes of RAM when the guest has less in total: a
/// clearer message than the placement error that would follow.
fn check_fits_in_ram<M: GuestMemoryBackend>(mem: &M, needed: u64) -> Result<(), Error> {
    let ram: u64 = mem.iter().map(|region| region.len()).sum();
    if needed > ram {
        return Err(Error::KernelLargerThanRam { needed, ram });
    }
    Ok(())
}

/// End (exclusive) of the RAM region that starts at address 0: the highest place below 4 GiB
/// where a 32-bit boot protocol can put things.
fn low_ram_end<M: GuestMemoryBackend>(mem: &M) -> u64 {
    mem.find_region(GuestAddress(0))
        .map_or(0, |region| region.start_addr().0 + region.len())
}

fn check_boot_area<M: GuestMemoryBackend>(mem: &M) -> Result<(), Error> {
    if low_ram_end(mem) < MIN_RAM_SIZE {
        return Err(Error::RamTooSmall {
            needed: MIN_RAM_SIZE,
        });
    }
    Ok(())
}

/// `max` excludes the terminating NUL, as the bzImage `cmdline_size` field does.
fn check_cmdline(cmdline: &str, max: usize) -> Result<(), Error> {
    if cmdline.as_bytes().contains(&0) {
        return Err(Error::CmdlineHasNul);
    }
    if cmdline.len() > max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str) -> Result<(), Error> {
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    write_guest(mem, CMDLINE_START, &bytes, "kernel command line")
}

/// Checks that `[start, end)`, where the loader put the kernel (including its zero-filled
/// tail), is RAM above the boot structures.
fn check_kernel_placement<M: GuestMemoryBackend>(
    mem: &M,
    start: GuestAddress,
    end: u64,
) -> Result<(), Error> {
    let outside = || Error::KernelOutsideRam {
        start: start.0,
        end,
    };
    if start < HIGH_RAM_START || end <= start.0 {
        return Err(outside());
    }
    let region = mem.find_region(start).ok_or_else(outside)?;
    if end - 1 > region.last_addr().raw_value() {
        return Err(outside());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
