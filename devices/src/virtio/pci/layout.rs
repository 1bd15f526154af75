//! The virtio-pci function's identity, capability types and the layout of its BAR 0. Public so
//! that a driver (the tests' one, the test guests' constants) addresses the device by the same
//! numbers. The BAR offsets are upstream cloud-hypervisor's.

/// Vendor ID of every virtio PCI function.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// A modern device's PCI device ID is this plus its virtio device type (block: 0x1042).
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;

/// Capability ID of a vendor-specific capability (every virtio structure is announced by one).
pub const PCI_CAP_ID_VENDOR: u8 = 0x09;
/// `cfg_type` of the virtio capabilities.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
/// Bytes of a `virtio_pci_cap` (ID and next pointer included); the notify capability adds its
/// 4-byte multiplier, the PCI-configuration-access one its 4-byte data window.
pub const VIRTIO_PCI_CAP_LEN: usize = 16;
/// Offset of `pci_cfg_data` in the PCI-configuration-access capability.
pub const PCI_CFG_DATA_AT: u16 = 16;

/// "No MSI-X vector" in `msix_config` and `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;

/// The one BAR: 64-bit memory, not prefetchable.
pub const VIRTIO_PCI_BAR: usize = 0;
pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x8_0000;
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const COMMON_CFG_SIZE: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x2000;
pub const ISR_SIZE: u64 = 1;
pub const DEVICE_CFG_OFFSET: u64 = 0x4000;
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x6000;
pub const NOTIFY_SIZE: u64 = 0x1000;
/// Queue `i` is notified by a write at `NOTIFY_OFFSET + i * NOTIFY_OFF_MULTIPLIER`
/// (`queue_notify_off` reads `i`): each queue has its own address, so an ioeventfd needs no
/// data match.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x8000;
pub const MSIX_TABLE_SIZE: u64 = 0x4_0000;
pub const MSIX_PBA_OFFSET: u64 = 0x4_8000;
pub const MSIX_PBA_SIZE: u64 = 0x800;

/// Offset from BAR 0's base of queue `queue`'s notification address.
pub const fn notify_offset(queue: usize) -> u64 {
    NOTIFY_OFFSET + queue as u64 * NOTIFY_OFF_MULTIPLIER as u64
}

/// Offsets in the common configuration structure (`struct virtio_pci_common_cfg`), with the
/// width the driver accesses each at.
pub mod common_cfg {
    /// 32 bits.
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// 32 bits, read-only.
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// 32 bits.
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// 32 bits.
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// 16 bits.
    pub const MSIX_CONFIG: u64 = 0x10;
    /// 16 bits, read-only.
    pub const NUM_QUEUES: u64 = 0x12;
    /// 8 bits.
    pub const DEVICE_STATUS: u64 = 0x14;
    /// 8 bits, read-only.
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// 16 bits; the following queue fields are the selected queue's.
    pub const QUEUE_SELECT: u64 = 0x16;
    /// 16 bits.
    pub const QUEUE_SIZE: u64 = 0x18;
    /// 16 bits.
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// 16 bits.
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// 16 bits, read-only.
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// 64 bits each, written as two 32-bit halves (low first) or at once.
    pub const QUEUE_DESC_LO: u64 = 0x20;
    pub const QUEUE_DESC_HI: u64 = 0x24;
    pub const QUEUE_DRIVER_LO: u64 = 0x28;
    pub const QUEUE_DRIVER_HI: u64 = 0x2c;
    pub const QUEUE_DEVICE_LO: u64 = 0x30;
    pub const QUEUE_DEVICE_HI: u64 = 0x34;
    /// End of the structure.
    pub const QUEUE_END: u64 = 0x38;
}
