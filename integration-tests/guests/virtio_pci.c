#include "virtio_pci.h"
#include "port_io.h"
#include "runtime.h"

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
