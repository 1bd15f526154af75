#include "virtio_pci.h"
#include "port_io.h"
#include "runtime.h"
#include "virtio.h"

#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA 0xcfc
#define PCI_COMMAND 0x04
#define PCI_COMMAND_MEMORY 0x2u
#define PCI_STATUS_CAPABILITIES (0x10u << 16)
#define PCI_BAR0 0x10
#define PCI_CAPABILITIES 0x34
#define PCI_CAP_VENDOR 0x09
#define VIRTIO_PCI_CAP_COMMON 1
#define VIRTIO_PCI_CAP_NOTIFY 2
#define VIRTIO_PCI_CAP_DEVICE 4
/* The VMM puts BAR 0 in the 64-bit window above RAM, which these page tables
 * do not map; the driver moves it into the mapped 32-bit window, as firmware
 * may. */
#define PCI_BAR0_TARGET 0xc8000000ull
#define PCI_BAR0_TARGET_STRIDE 0x100000ull

static uint32_t pci_read(unsigned device, unsigned offset)
{
	port_out32(PCI_CONFIG_ADDRESS, 0x80000000u | device << 11 | (offset & 0xfc));
	return port_in32(PCI_CONFIG_DATA);
}

static void pci_write(unsigned device, unsigned offset, uint32_t value)
{
	port_out32(PCI_CONFIG_ADDRESS, 0x80000000u | device << 11 | (offset & 0xfc));
	port_out32(PCI_CONFIG_DATA, value);
}

static uint8_t pci_read8(unsigned device, unsigned offset)
{
	return (uint8_t)(pci_read(device, offset) >> (8 * (offset & 3)));
}

int virtio_pci_find(uint32_t id, struct virtio_pci_function *function, const char **error)
{
	unsigned device = 0;

	memset(function, 0, sizeof(*function));
	while (device < 32 && pci_read(device, 0) != id)
		device++;
	if (device == 32) {
		*error = "no such virtio device on PCI bus 0";
		return 1;
	}
	if ((pci_read(device, PCI_BAR0) & 0x7) != 0x4) {
		*error = "virtio-pci BAR 0 is not a 64-bit memory BAR";
		return -1;
	}
	uint64_t bar = PCI_BAR0_TARGET + device * PCI_BAR0_TARGET_STRIDE;
	uint32_t command = pci_read(device, PCI_COMMAND) & 0xffff;
	pci_write(device, PCI_COMMAND, command & ~PCI_COMMAND_MEMORY);
	pci_write(device, PCI_BAR0, (uint32_t)bar);
	pci_write(device, PCI_BAR0 + 4, (uint32_t)(bar >> 32));
	pci_write(device, PCI_COMMAND, command | PCI_COMMAND_MEMORY);
	if (!(pci_read(device, PCI_COMMAND) & PCI_STATUS_CAPABILITIES)) {
		*error = "virtio-pci function has no capability list";
		return -1;
	}
	for (unsigned at = pci_read8(device, PCI_CAPABILITIES), hops = 0; at && hops < 48;
	     at = pci_read8(device, at + 1), hops++) {
		if (pci_read8(device, at) != PCI_CAP_VENDOR || pci_read8(device, at + 4) != 0)
			continue;
		volatile uint8_t *structure = (volatile uint8_t *)(bar + pci_read(device, at + 8));
		switch (pci_read8(device, at + 3)) {
		case VIRTIO_PCI_CAP_COMMON:
			function->common = structure;
			break;
		case VIRTIO_PCI_CAP_NOTIFY:
			function->notify = structure;
			function->notify_multiplier = pci_read(device, at + 16);
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
