#include "virtio_pci.h"
#include "pci.h"
#include "runtime.h"

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
