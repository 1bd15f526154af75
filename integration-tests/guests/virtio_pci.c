#include "virtio_pci.h"
#include "pci.h"
#include "runtime.h"
#include "virtio.h"

#define VIRTIO_PCI_CAP_COMMON 1
#define VIRTIO_PCI_CAP_NOTIFY 2
#define VIRTIO_PCI_CAP_DEVICE 4
#define MSIX_BIR_MASK 0x7u
/* The VMM puts BAR 0 in the 64-bit window above RAM, which these page tables
 * do not map; the driver moves it into the mapped 32-bit window, as firmware
 * may. */
#define PCI_BAR0_TARGET 0xc8000000ull
#define PCI_BAR0_TARGET_STRIDE 0x100000ull

int virtio_pci_find(uint32_t id, struct virtio_pci_function *function, const char **error)
{
	unsigned device = 0;

	memset(function, 0, sizeof(*function));
	while (device < 32 && pci_config_read(device, 0, 0) != id)
		device++;
	function->device = device;
	if (device == 32) {
		*error = "no such virtio device on PCI bus 0";
		return 1;
	}
	if ((pci_config_read(device, 0, PCI_REG_BAR0) & 0x7) != 0x4) {
		*error = "virtio-pci BAR 0 is not a 64-bit memory BAR";
		return -1;
	}
	uint64_t bar = PCI_BAR0_TARGET + device * PCI_BAR0_TARGET_STRIDE;
	uint32_t command = pci_config_read(device, 0, PCI_REG_COMMAND_STATUS) & 0xffff;
	pci_config_write(device, 0, PCI_REG_COMMAND_STATUS, command & ~PCI_COMMAND_MEMORY);
	pci_config_write(device, 0, PCI_REG_BAR0, (uint32_t)bar);
	pci_config_write(device, 0, PCI_REG_BAR0 + 4, (uint32_t)(bar >> 32));
	pci_config_write(device, 0, PCI_REG_COMMAND_STATUS, command | PCI_COMMAND_MEMORY);
	if (!(pci_config_read(device, 0, PCI_REG_COMMAND_STATUS) & PCI_STATUS_CAPABILITIES)) {
		*error = "virtio-pci function has no capability list";
		return -1;
	}
	for (unsigned at = pci_config_read8(device, 0, PCI_REG_CAPABILITIES), hops = 0; at && hops < 48;
	     at = pci_config_read8(device, 0, at + 1), hops++) {
		uint8_t kind = pci_config_read8(device, 0, at);
		if (kind == PCI_CAP_MSIX) {
			uint32_t table = pci_config_read(device, 0, at + 4);
			uint32_t pba = pci_config_read(device, 0, at + 8);
			function->msix_capability = at;
			function->msix_entries = (pci_config_read(device, 0, at) >> 16 & 0x7ff) + 1;
			if ((table & MSIX_BIR_MASK) == 0 && (pba & MSIX_BIR_MASK) == 0) {
				function->msix_table =
					(volatile uint32_t *)(bar + (table & ~MSIX_BIR_MASK));
				function->msix_pba = (volatile uint64_t *)(bar + (pba & ~MSIX_BIR_MASK));
			}
			continue;
		}
		if (kind != PCI_CAP_VENDOR || pci_config_read8(device, 0, at + 4) != 0)
			continue;
		volatile uint8_t *structure = (volatile uint8_t *)(bar + pci_config_read(device, 0, at + 8));
		switch (pci_config_read8(device, 0, at + 3)) {
		case VIRTIO_PCI_CAP_COMMON:
			function->common = structure;
			break;
		case VIRTIO_PCI_CAP_NOTIFY:
			function->notify = structure;
			function->notify_multiplier = pci_config_read(device, 0, at + 16);
			break;
		case VIRTIO_PCI_CAP_DEVICE:
			function->device_config = structure;
			break;
		}
	}
	if (!function->common || !function->notify || !function->device_config) {
		function->common = 0;
		*error = "virtio-pci capabilities missing";
		return -1;
	}
	return 0;
}

static void common_write32(struct virtio_pci_function *f, unsigned offset, uint32_t value)
{
	*(volatile uint32_t *)(f->common + offset) = value;
}

static void common_write16(struct virtio_pci_function *f, unsigned offset, uint16_t value)
{
	*(volatile uint16_t *)(f->common + offset) = value;
}

static uint16_t common_read16(struct virtio_pci_function *f, unsigned offset)
{
	return *(volatile uint16_t *)(f->common + offset);
}

static void set_status(struct virtio_pci_function *f, uint8_t status)
{
	*(volatile uint8_t *)(f->common + COMMON_DEVICE_STATUS) = status;
}

static uint8_t get_status(struct virtio_pci_function *f)
{
	return *(volatile uint8_t *)(f->common + COMMON_DEVICE_STATUS);
}

static void common_write_address(struct virtio_pci_function *f, unsigned offset,
				 const void *address)
{
	common_write32(f, offset, (uint32_t)(uint64_t)address);
	common_write32(f, offset + 4, (uint32_t)((uint64_t)address >> 32));
}

int virtio_pci_negotiate(struct virtio_pci_function *f, uint32_t features_low,
			 const char **error)
{
	set_status(f, 0);
	if (get_status(f) != 0) {
		*error = "device did not reset";
		return -1;
	}
	set_status(f, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
	common_write32(f, COMMON_DEVICE_FEATURE_SELECT, 1);
	if (!(*(volatile uint32_t *)(f->common + COMMON_DEVICE_FEATURE) &
	      FEATURE_HIGH_VERSION_1)) {
		set_status(f, STATUS_FAILED);
		*error = "device does not offer VIRTIO_F_VERSION_1";
		return -1;
	}
	common_write32(f, COMMON_DEVICE_FEATURE_SELECT, 0);
	if ((*(volatile uint32_t *)(f->common + COMMON_DEVICE_FEATURE) & features_low) !=
	    features_low) {
		set_status(f, STATUS_FAILED);
		*error = "device does not offer the features the driver needs";
		return -1;
	}
	common_write32(f, COMMON_DRIVER_FEATURE_SELECT, 0);
	common_write32(f, COMMON_DRIVER_FEATURE, features_low);
	common_write32(f, COMMON_DRIVER_FEATURE_SELECT, 1);
	common_write32(f, COMMON_DRIVER_FEATURE, FEATURE_HIGH_VERSION_1);
	set_status(f, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(get_status(f) & STATUS_FEATURES_OK)) {
		*error = "device rejected the features";
		return -1;
	}
	return 0;
}

volatile uint16_t *virtio_pci_queue(struct virtio_pci_function *f, uint16_t queue,
				    uint16_t size, const void *descriptors, const void *avail,
				    const void *used, const char **error)
{
	common_write16(f, COMMON_QUEUE_SELECT, queue);
	if (common_read16(f, COMMON_QUEUE_SIZE) < size) {
		*error = "queue too small";
		return 0;
	}
	common_write16(f, COMMON_QUEUE_SIZE, size);
	common_write_address(f, COMMON_QUEUE_DESC, descriptors);
	common_write_address(f, COMMON_QUEUE_DRIVER, avail);
	common_write_address(f, COMMON_QUEUE_DEVICE, used);
	common_write16(f, COMMON_QUEUE_ENABLE, 1);
	return (volatile uint16_t *)(f->notify + common_read16(f, COMMON_QUEUE_NOTIFY_OFF) *
							   f->notify_multiplier);
}

void virtio_pci_driver_ok(struct virtio_pci_function *f)
{
	set_status(f, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
}
