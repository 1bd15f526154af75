//! x86_64 guest platform for NV-Hypervisor: the guest-physical memory layout, the e820 map, and
//! the two Linux boot protocols (PVH for ELF `vmlinux`, the 64-bit boot protocol for bzImage).
//!
//! This crate only writes bytes into guest memory and computes register values; it issues no
//! ioctls. The VMM loads the kernel with [`boot::load_kernel`], then programs the boot vCPU with
//! [`regs::setup_regs`], [`regs::setup_sregs`], [`regs::setup_fpu`] and [`regs::initial_msrs`].

pub mod acpi;
pub mod boot;
pub mod e820;
pub mod gdt;
pub mod layout;
pub mod paging;
pub mod regs;

pub use boot::{load_kernel, BootEntry, BootProtocol};

/// Everything that can go wrong while laying out memory and loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the kernel image: {0}")]
    ReadKernel(#[source] std::io::Error),
    #[error("kernel image is truncated ({size} bytes)")]
    KernelTruncated { size: u64 },
    #[error("not a kernel image: neither an ELF file nor a bzImage with a \"HdrS\" setup header")]
    NotAKernel,
    #[error("ELF kernel is not a 64-bit little-endian x86_64 image")]
    UnsupportedElf,
    #[error(
        "ELF kernel has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY note); \
         ELF images are only booted through PVH"
    )]
    NoPvhEntry,
    #[error("failed to load the ELF kernel: {0}")]
    LoadElf(#[source] linux_loader::loader::Error),
    #[error("failed to load the bzImage kernel: {0}")]
    LoadBzImage(#[source] linux_loader::loader::Error),
    #[error(
        "bzImage uses boot protocol {:x}.{:02x}; 2.12 or newer is needed for the 64-bit entry",
        version >> 8,
        version & 0xff
    )]
    BootProtocolTooOld { version: u16 },
    #[error("bzImage has no 64-bit entry point (XLF_KERNEL_64 is not set in xloadflags)")]
    No64BitEntry,
    #[error("kernel needs {needed} bytes of guest RAM, the guest has {ram}")]
    KernelLargerThanRam { needed: u64, ram: u64 },
    #[error("kernel occupies [{start:#x}, {end:#x}), which is not entirely guest RAM")]
    KernelOutsideRam { start: u64, end: u64 },
    #[error("guest RAM must cover [0, {needed:#x}) for the boot structures")]
    RamTooSmall { needed: u64 },
    #[error("kernel command line is {len} bytes, this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineHasNul,
    #[error("cannot read the initramfs: {0}")]
    ReadInitramfs(#[source] std::io::Error),
    #[error(
        "initramfs ({size} bytes) does not fit in guest RAM between the kernel end \
         {kernel_end:#x} and {limit:#x}"
    )]
    InitramfsTooLarge {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("the memory map has {entries} entries, the boot protocol holds at most {max}")]
    TooManyMemoryMapEntries { entries: usize, max: usize },
    #[error("cannot write the {what} to guest memory at {addr:#x}: {source}")]
    WriteGuestMemory {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot write the boot parameters to guest memory: {0}")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
    #[error("virtio-mmio device index {index} is out of range: at most {max} devices")]
    MmioDeviceIndex { index: u32, max: u32 },
}

/// Writes `bytes` at `addr`, naming `what` in the error so a failure says which structure
/// did not fit.
pub(crate) fn write_guest<M: vm_memory::GuestMemoryBackend>(
    mem: &M,
    addr: vm_memory::GuestAddress,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), Error> {
    use vm_memory::Bytes;
    mem.write_slice(bytes, addr)
        .map_err(|source| Error::WriteGuestMemory {
            what,
            addr: addr.0,
            source,
        })
}
