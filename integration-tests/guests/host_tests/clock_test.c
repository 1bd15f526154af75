/*
 * Host-side test of the guest time base (clock.c) against a TSC that
 * jumps forwards and backwards, as it does across a save/restore or a
 * host reboot on this platform. Built and run by guests.rs's tests.
 */
#include <stdio.h>
#include <stdlib.h>

#include "clock.h"
#include "params.h"

static uint64_t fake_tsc;
static uint64_t fake_khz_param;
static int failures;

uint64_t tsc_read(void)
{
	return fake_tsc;
}

uint64_t param_u64(const char *key, uint64_t fallback)
{
	(void)key;
	return fake_khz_param == ~0ull ? fallback : fake_khz_param;
}

#define CHECK(condition)                                                        \
	do {                                                                    \
		if (!(condition)) {                                             \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, \
				__LINE__, #condition);                          \
			failures++;                                             \
		}                                                               \
	} while (0)

/* A clock of 1000 TSC ticks per ms and a 100 ms ticker started at TSC `start`. */
static void start_ticker_at(struct ticker *ticker, uint64_t start)
{
	fake_khz_param = 1000;
	clock_init();
	fake_tsc = start;
	ticker_start(ticker, 100);
}

static void ticker_fires_once_per_period(void)
{
	struct ticker ticker;

	start_ticker_at(&ticker, 5000000);
	fake_tsc += 99999;
	CHECK(!ticker_due(&ticker));
	fake_tsc += 1;
	CHECK(ticker_due(&ticker));
	CHECK(!ticker_due(&ticker));
}

static void ticker_recovers_from_a_backwards_tsc(void)
{
	struct ticker ticker;

	start_ticker_at(&ticker, 9000000000ull);
	fake_tsc = 1000; /* host rebooted: TSC restarted near zero */
	CHECK(!ticker_due(&ticker));
	fake_tsc += 100000;
	CHECK(ticker_due(&ticker)); /* one period after the new anchor, not after 9e9 */
}

static void ticker_fires_once_after_a_forward_jump(void)
{
	struct ticker ticker;

	start_ticker_at(&ticker, 0);
	fake_tsc = 1ull << 50;
	CHECK(ticker_due(&ticker));
	CHECK(!ticker_due(&ticker));
}

static void zero_or_absent_khz_uses_the_default(void)
{
	struct stopwatch watch;

	fake_khz_param = 0;
	clock_init();
	CHECK(clock_ticks_per_ms() == DEFAULT_TSC_KHZ);
	fake_khz_param = ~0ull;
	clock_init();
	CHECK(clock_ticks_per_ms() == DEFAULT_TSC_KHZ);
	fake_tsc = 0;
	stopwatch_start(&watch);
	fake_tsc = DEFAULT_TSC_KHZ * 10;
	CHECK(stopwatch_poll_ms(&watch) == 10);
}

static void stopwatch_ignores_gaps_and_backwards_steps(void)
{
	struct stopwatch watch;

	fake_khz_param = 1000;
	clock_init();
	fake_tsc = 1000000;
	stopwatch_start(&watch);
	for (int i = 0; i < 30; i++) {
		fake_tsc += 1000; /* 1 ms per poll */
		stopwatch_poll_ms(&watch);
	}
	CHECK(stopwatch_poll_ms(&watch) == 30);
	fake_tsc += 3600000000ull; /* an hour-long pause: not polling time */
	CHECK(stopwatch_poll_ms(&watch) == 30);
	fake_tsc = 5; /* backwards */
	CHECK(stopwatch_poll_ms(&watch) == 30);
	fake_tsc += 2000;
	CHECK(stopwatch_poll_ms(&watch) == 32);
}

static void elapsed_is_never_negative(void)
{
	CHECK(tsc_elapsed(10, 3) == 0);
	CHECK(tsc_elapsed(3, 10) == 7);
	CHECK(tsc_elapsed(~0ull, 0) == 0);
}

int main(void)
{
	ticker_fires_once_per_period();
	ticker_recovers_from_a_backwards_tsc();
	ticker_fires_once_after_a_forward_jump();
	zero_or_absent_khz_uses_the_default();
	stopwatch_ignores_gaps_and_backwards_steps();
	elapsed_is_never_negative();
	if (failures) {
		fprintf(stderr, "clock_test: %d failures\n", failures);
		return 1;
	}
	printf("clock_test: ok\n");
	return 0;
}
