/*
 * Time from the TSC, in units given by the `tsc_khz=` parameter.
 *
 * The guest TSC cannot be restored on this host, so across a save/restore
 * it jumps forwards or backwards. Every helper here treats a backwards step
 * as zero elapsed time and never divides by a value that can be zero.
 */
#ifndef GUEST_CLOCK_H
#define GUEST_CLOCK_H

#include <stdint.h>

#define DEFAULT_TSC_KHZ 2000000ull

#ifdef GUEST_CLOCK_HOST_TEST
/* The host-side test (host_tests/clock_test.c) drives the TSC itself. */
uint64_t tsc_read(void);
#else
static inline uint64_t tsc_read(void)
{
	uint32_t low, high;

	__asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
	return ((uint64_t)high << 32) | low;
}
#endif

/* Reads `tsc_khz=` (0 or absent means DEFAULT_TSC_KHZ). */
void clock_init(void);
uint64_t clock_ticks_per_ms(void);

/* later - earlier, or 0 when the TSC went backwards. */
static inline uint64_t tsc_elapsed(uint64_t earlier, uint64_t later)
{
	return later > earlier ? later - earlier : 0;
}

/* Fires once per period. A backwards TSC step re-anchors the period at the
 * new value instead of waiting for the TSC to climb back. */
struct ticker {
	uint64_t last;
	uint64_t period_ticks;
};

void ticker_start(struct ticker *ticker, uint64_t period_ms);
int ticker_due(struct ticker *ticker);

/* Accumulates time only in small steps, so a save/restore gap (one huge
 * forward step) does not count: for timeouts of polling loops. */
struct stopwatch {
	uint64_t last;
	uint64_t accumulated_ticks;
	uint64_t max_step_ticks;
};

void stopwatch_start(struct stopwatch *watch);
/* Returns the accumulated milliseconds. */
uint64_t stopwatch_poll_ms(struct stopwatch *watch);

#endif
