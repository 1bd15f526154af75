/*
 * ACPI PCI hotplug as a guest's ACPI code sees it (arch::layout): the GED's
 * event register (bit 2: PCI devices changed) and the hotplug controller's
 * registers the DSDT's \_SB_.PHPR reads and writes: PCIU (slots up), PCID
 * (slots asked to go down), B0EJ (eject: 1 << slot, as a slot's _EJ0 writes
 * it) and PSEG (the segment the others apply to). Read from ring 3.
 */
#ifndef GUEST_ACPI_HOTPLUG_H
#define GUEST_ACPI_HOTPLUG_H

#include <stdint.h>

#define GED_REGISTER ((volatile uint8_t *)0xf8000000UL)
#define GED_PCI_DEVICES_CHANGED 0x04
#define HOTPLUG_BASE 0xf8001000UL
#define PCIU ((volatile uint32_t *)(HOTPLUG_BASE + 0x0))
#define PCID ((volatile uint32_t *)(HOTPLUG_BASE + 0x4))
#define B0EJ ((volatile uint32_t *)(HOTPLUG_BASE + 0x8))
#define PSEG ((volatile uint32_t *)(HOTPLUG_BASE + 0xc))

#endif
