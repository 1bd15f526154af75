/* PCI configuration access on segment 0, bus 0, through both mechanisms:
 * the legacy ports (CONFIG_ADDRESS 0xcf8, CONFIG_DATA 0xcfc, opened to ring 3
 * in the TSS I/O bitmap) and the ECAM window at 0xe8000000 (the MCFG's,
 * arch::layout::PCI_ECAM_START). Shared by pcicheck, pcimsix and the
 * virtio-pci discovery. */
#ifndef GUEST_PCI_H
#define GUEST_PCI_H

#include <stdint.h>

#define PCI_REG_ID 0x00
#define PCI_REG_COMMAND_STATUS 0x04
#define PCI_REG_CLASS 0x08
#define PCI_REG_HEADER 0x0c
#define PCI_REG_BAR0 0x10
#define PCI_REG_CAPABILITIES 0x34
#define PCI_COMMAND_MEMORY 0x2u
#define PCI_STATUS_CAPABILITIES (1u << 20)
#define PCI_CAP_MSIX 0x11
#define PCI_CAP_VENDOR 0x09

/* Through the ports; `reg` is rounded down to its dword. */
uint32_t pci_config_read(unsigned device, unsigned function, unsigned reg);
void pci_config_write(unsigned device, unsigned function, unsigned reg, uint32_t value);
uint8_t pci_config_read8(unsigned device, unsigned function, unsigned reg);
/* The dword `reg` of a function in the ECAM window. */
volatile uint32_t *pci_ecam(unsigned device, unsigned function, unsigned reg);

/* Enumerates bus 0 as firmware or an OS does: for every device and function
 * reads the ID dword both ways; for each function present compares all 64
 * dwords of the header and capability area, reads the extended space through
 * ECAM, sizes its BARs and walks its capability list. Prints one line per
 * finding, each starting with `name`: (see pcicheck.c for the lines).
 * Returns the number of disagreements and other failures. */
uint64_t pci_enumerate(const char *name);

#endif
