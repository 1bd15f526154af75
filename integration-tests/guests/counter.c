/*
 * counter: keeps a memory area changing and proves it intact.
 *
 * Each step increments a 64-bit counter and rewrites one word of the area
 * with a value derived from the counter, updating a running checksum (the
 * wrapping sum of all words). About every 100 ms the whole area is summed
 * again and compared with the running checksum before a progress line is
 * printed, so lost or stale memory after a save/restore shows up.
 *
 * With mailbox_at=ADDR the counter is also stored at ADDR + 8 after every
 * batch of steps (MAILBOX_MAGIC at ADDR), so a test can read the value the
 * guest had when its VMM died from the NV region itself. A TSC that went
 * backwards or jumped by more than GAP_MS between two batches (the guest was
 * resumed in a new VM, or stalled) prints a line at once too, so the first
 * line after a resume is within a batch of the resumed state.
 */
#include "clock.h"
#include "console.h"
#include "params.h"
#include "runtime.h"

#define DEFAULT_AREA_MB 8
#define REPORT_PERIOD_MS 100
/* Steps between TSC reads: keeps rdtsc off the hot path. */
#define STEPS_PER_TIME_CHECK 4096
#define GOLDEN_RATIO_64 0x9e3779b97f4a7c15ull
#define GAP_MS 20
#define MAILBOX_MAGIC 0x786f626c69616d63ull /* "cmailbox" */

static uint64_t initial_word(uint64_t index)
{
	return index * GOLDEN_RATIO_64 + 1;
}

static uint64_t word_for_counter(uint64_t counter)
{
	return (counter * GOLDEN_RATIO_64) ^ (counter >> 7);
}

static uint64_t sum_area(const volatile uint64_t *area, uint64_t words)
{
	uint64_t sum = 0;

	for (uint64_t i = 0; i < words; i++)
		sum += area[i];
	return sum;
}

void guest_main(void)
{
	uint64_t area_mb = param_u64("area_mb", DEFAULT_AREA_MB);
	uint64_t stop_after = param_u64("stop_after", 0);
	uint64_t area_address = param_u64("area_at", ram_free_start());

	console_write("counter: boot\n");
	/* The area must not overlap the image, its stacks or start_info. */
	if (area_mb == 0 || area_mb > (1ull << 20) || (area_address & 7) ||
	    area_address < ram_free_start() ||
	    !ram_contains(area_address, area_mb * MIB)) {
		console_write("counter: FAIL area of ");
		console_write_dec(area_mb);
		console_write(" MiB at 0x");
		console_write_hex(area_address);
		console_write(" is not in RAM\n");
		return;
	}

	uint64_t mailbox_address = param_u64("mailbox_at", 0);
	volatile uint64_t *mailbox = (volatile uint64_t *)mailbox_address;
	if (mailbox_address &&
	    ((mailbox_address & 7) || mailbox_address < ram_free_start() ||
	     !ram_contains(mailbox_address, 16) ||
	     (mailbox_address + 16 > area_address &&
	      mailbox_address < area_address + area_mb * MIB))) {
		console_write("counter: FAIL mailbox at 0x");
		console_write_hex(mailbox_address);
		console_write(" is not in free RAM outside the area\n");
		return;
	}

	volatile uint64_t *area = (volatile uint64_t *)area_address;
	uint64_t words = area_mb * MIB / sizeof(uint64_t);
	uint64_t running_sum = 0;
	for (uint64_t i = 0; i < words; i++) {
		area[i] = initial_word(i);
		running_sum += initial_word(i);
	}

	uint64_t counter = 0, index = 0, lines = 0;
	if (mailbox_address) {
		mailbox[1] = 0;
		mailbox[0] = MAILBOX_MAGIC;
	}
	struct ticker report;
	ticker_start(&report, REPORT_PERIOD_MS);
	uint64_t seen = tsc_read();
	uint64_t gap_ticks = GAP_MS * clock_ticks_per_ms();
	for (;;) {
		for (int step = 0; step < STEPS_PER_TIME_CHECK; step++) {
			uint64_t word = word_for_counter(++counter);
			running_sum += word - area[index];
			area[index] = word;
			if (++index == words)
				index = 0;
		}
		if (mailbox_address)
			mailbox[1] = counter;
		uint64_t now = tsc_read();
		int resumed = now < seen || now - seen > gap_ticks;
		seen = now;
		if (!ticker_due(&report) && !resumed)
			continue;

		uint64_t actual_sum = sum_area(area, words);
		if (actual_sum != running_sum) {
			console_write("counter: MISMATCH counter=");
			console_write_dec(counter);
			console_write(" expected=");
			console_write_hex(running_sum);
			console_write(" actual=");
			console_write_hex(actual_sum);
			console_write("\n");
			return;
		}
		console_write("counter=");
		console_write_dec(counter);
		console_write(" sum=");
		console_write_hex(running_sum);
		console_write(" ok\n");
		if (stop_after && ++lines >= stop_after) {
			console_write("counter: done\n");
			guest_reset();
		}
	}
}
