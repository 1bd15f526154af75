/* The local APIC (xAPIC) registers the guests use. Its page at 0xfee00000
 * is mapped user-accessible like the whole device hole, so ring 3 programs
 * it too; every vCPU sees its own APIC there. */
#ifndef GUEST_LAPIC_H
#define GUEST_LAPIC_H

#include <stdint.h>

#define LAPIC_BASE 0xfee00000ull
#define LAPIC_ID 0x020
#define LAPIC_EOI 0x0b0
#define LAPIC_SPURIOUS 0x0f0
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_DIVIDE 0x3e0
#define LAPIC_SOFTWARE_ENABLE 0x100
#define LAPIC_SPURIOUS_VECTOR 0xff

static inline uint32_t lapic_read(uint32_t reg)
{
	return *(volatile uint32_t *)(LAPIC_BASE + reg);
}

static inline void lapic_write(uint32_t reg, uint32_t value)
{
	*(volatile uint32_t *)(LAPIC_BASE + reg) = value;
}

/* This vCPU's APIC ID. */
static inline uint32_t lapic_id(void)
{
	return lapic_read(LAPIC_ID) >> 24;
}

#endif
