#include "clock.h"
#include "params.h"

/* A single poll step longer than this is taken as the VM having been
 * paused or restored, not as time the guest waited. */
#define STOPWATCH_MAX_STEP_MS 50

static uint64_t ticks_per_ms = DEFAULT_TSC_KHZ;

void clock_init(void)
{
	uint64_t khz = param_u64("tsc_khz", DEFAULT_TSC_KHZ);

	ticks_per_ms = khz ? khz : DEFAULT_TSC_KHZ;
}

uint64_t clock_ticks_per_ms(void)
{
	return ticks_per_ms;
}

void ticker_start(struct ticker *ticker, uint64_t period_ms)
{
	ticker->last = tsc_read();
	ticker->period_ticks = period_ms * ticks_per_ms;
}

int ticker_due(struct ticker *ticker)
{
	uint64_t now = tsc_read();

	if (now < ticker->last) {
		ticker->last = now;
		return 0;
	}
	if (now - ticker->last < ticker->period_ticks)
		return 0;
	ticker->last = now;
	return 1;
}

void stopwatch_start(struct stopwatch *watch)
{
	watch->last = tsc_read();
	watch->accumulated_ticks = 0;
	watch->max_step_ticks = STOPWATCH_MAX_STEP_MS * ticks_per_ms;
}

uint64_t stopwatch_poll_ms(struct stopwatch *watch)
{
	uint64_t now = tsc_read();
	uint64_t step = tsc_elapsed(watch->last, now);

	watch->last = now;
	if (step <= watch->max_step_ticks)
		watch->accumulated_ticks += step;
	return watch->accumulated_ticks / ticks_per_ms;
}
