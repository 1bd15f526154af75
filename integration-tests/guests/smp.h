/*
 * SMP start-up as firmware and Linux do it on hardware, shared by smpcheck
 * and pcimsix. The boot CPU (ring 3) finds the processors in the ACPI MADT
 * (RSDP found by a scan of 0xe0000-0xfffff, then XSDT or RSDT), copies a
 * real-mode trampoline to 0x10000 and sends each other enabled local APIC an
 * INIT IPI, then two STARTUP IPIs with vector 0x10, through the ICR of its
 * xAPIC page. The AP wakes in real mode at 0x10000, switches straight to long
 * mode on the boot CPU's GDT and page tables, loads the shared IDT and TSS
 * and drops to ring 3 with RFLAGS smp_ap_rflags, where it runs the guest's
 * ap_main. APs are started one at a time: each takes the stacks and slot the
 * boot CPU set up for it.
 *
 * Lines, each starting with the guest's name:
 *   <name>: INIT sent to cpu <slot>
 *   <name>: cpu <slot> apic=<id> started after <us> us   from the INIT on
 *   <name>: FAIL cpu <slot> apic=<id> not started (stage <s>)
 *   <name>: FAIL <why>                                    then stops
 * Stage (what a stuck AP reached): 0 nothing, 1 real mode, 2 long mode
 * ring 0 (ring 3 is the AP's smp_started flag).
 */
#ifndef GUEST_SMP_H
#define GUEST_SMP_H

#include <stdint.h>

#define SMP_MAX_CPUS 16

/* Slot i's APIC ID (slot 0 is the boot CPU), the number of slots, and
 * whether slot i runs its ring-3 code. */
extern uint32_t smp_apic_ids[SMP_MAX_CPUS];
extern uint32_t smp_cpu_count;
extern volatile uint32_t smp_started[SMP_MAX_CPUS];
/* RFLAGS of the APs' ring-3 entry: 0x2 (IF=0) unless the guest sets it
 * before smp_start_aps (0x202 to take interrupts). */
extern uint64_t smp_ap_rflags;

/* Fills smp_apic_ids from the MADT, the boot CPU first; stops the guest with
 * a FAIL line when the tables are unusable. `ap_main` runs in ring 3 on each
 * started AP and must not return. */
void smp_find_cpus(const char *name, void (*ap_main)(uint32_t slot));
/* Starts every AP, waiting `init_sipi_ms` between INIT and the first
 * STARTUP. Returns 1, or 0 after the FAIL line of an AP that did not start. */
int smp_start_aps(uint64_t init_sipi_ms);

#endif
