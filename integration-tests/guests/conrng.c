/*
 * conrng: reads random bytes from virtio-rng and writes numbered lines to
 * virtio-console, both found on PCI bus 0 and driven by polling.
 *
 * For each n in 1..lines: one 16-byte request to virtio-rng (it must come
 * back with 16 bytes, and not all 16 zero), then the line
 *   "conrng line <n> <16 hex digits of the random bytes>\n"
 * as one transmit buffer on the console's transmit queue, waited for until
 * used. Every `report` lines the serial port (COM1) gets
 *   "conrng: sent=<n> rng=<requests completed>"
 * and at the end "conrng: done ok" (or "conrng: FAIL <why>"). `pace_us=`
 * spins between lines so a run lasts long enough to be power-failed mid-use.
 */
#include "clock.h"
#include "console.h"
#include "params.h"
#include "runtime.h"
#include "virtio.h"
#include "virtio_pci.h"

#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4
#define CONSOLE_TRANSMIT_QUEUE 1

#define QUEUE_SIZE 8
#define RNG_BYTES 16
#define LINE_MAX 64
#define REQUEST_TIMEOUT_MS 30000

/* One device with one queue in use, one buffer at a time. */
struct device {
	struct virtio_pci_function function;
	volatile uint16_t *notify;
	uint16_t queue;
	uint16_t next_avail;
	struct virtq_desc descriptors[QUEUE_SIZE] __attribute__((aligned(16)));
	VIRTQ_AVAIL(QUEUE_SIZE) avail __attribute__((aligned(16)));
	VIRTQ_USED(QUEUE_SIZE) used __attribute__((aligned(16)));
};

static struct device rng __attribute__((aligned(4096)));
static struct device console __attribute__((aligned(4096)));
static uint8_t random_bytes[RNG_BYTES];
static char line[LINE_MAX];

/* Reset, VERSION_1 only, queue `queue` at QUEUE_SIZE entries, DRIVER_OK. */
static int open_device(struct device *d, uint32_t type, uint16_t queue, const char **error)
{
	if (virtio_pci_find(VIRTIO_PCI_ID(type), &d->function, error) ||
	    virtio_pci_negotiate(&d->function, 0, error))
		return -1;
	d->queue = queue;
	d->avail.flags = AVAIL_F_NO_INTERRUPT;
	d->notify = virtio_pci_queue(&d->function, queue, QUEUE_SIZE, d->descriptors, &d->avail,
				     &d->used, error);
	if (!d->notify)
		return -1;
	virtio_pci_driver_ok(&d->function);
	return 0;
}

/* Posts one buffer, notifies and polls until it is used; returns the used
 * length, or -1 after REQUEST_TIMEOUT_MS of guest time. */
static int64_t transfer(struct device *d, const void *buffer, uint32_t length, int writable)
{
	uint16_t slot = d->next_avail % QUEUE_SIZE;
	struct stopwatch watch;

	d->descriptors[slot].address = (uint64_t)buffer;
	d->descriptors[slot].length = length;
	d->descriptors[slot].flags = writable ? DESC_F_WRITE : 0;
	d->descriptors[slot].next = 0;
	d->avail.ring[slot] = slot;
	memory_barrier();
	d->next_avail++;
	d->avail.index = d->next_avail;
	memory_barrier();
	*d->notify = d->queue;
	stopwatch_start(&watch);
	while (*(volatile uint16_t *)&d->used.index != d->next_avail) {
		if (stopwatch_poll_ms(&watch) > REQUEST_TIMEOUT_MS)
			return -1;
		cpu_relax();
	}
	memory_barrier();
	return d->used.ring[slot].length;
}

static char *append(char *at, const char *text)
{
	while (*text)
		*at++ = *text++;
	return at;
}

static void fail(const char *why, uint64_t n)
{
	console_write("conrng: FAIL ");
	console_write(why);
	console_write(" at line ");
	console_write_dec(n);
	console_write("\n");
}

static void report(uint64_t sent, uint64_t rng_done)
{
	console_write("conrng: sent=");
	console_write_dec(sent);
	console_write(" rng=");
	console_write_dec(rng_done);
	console_write("\n");
}

void guest_main(void)
{
	uint64_t lines = param_u64("lines", 1000);
	uint64_t every = param_u64("report", 50);
	uint64_t pace_us = param_u64("pace_us", 0);
	const char *exit = param_str("exit");
	const char *error = 0;
	uint64_t rng_done = 0;

	if (every == 0)
		every = 1;
	if (open_device(&rng, VIRTIO_ID_RNG, 0, &error)) {
		fail(error, 0);
		return;
	}
	if (open_device(&console, VIRTIO_ID_CONSOLE, CONSOLE_TRANSMIT_QUEUE, &error)) {
		fail(error, 0);
		return;
	}
	console_write("conrng: devices ready\n");
	for (uint64_t n = 1; n <= lines; n++) {
		memset(random_bytes, 0, sizeof(random_bytes));
		int64_t got = transfer(&rng, random_bytes, RNG_BYTES, 1);
		if (got != RNG_BYTES) {
			fail(got < 0 ? "rng request timed out" : "short rng fill", n);
			return;
		}
		rng_done++;
		uint64_t folded = 0;
		for (int i = 0; i < RNG_BYTES; i++)
			folded = folded << 8 ^ folded >> 56 ^ random_bytes[i];
		int all_zero = 1;
		for (int i = 0; i < RNG_BYTES; i++)
			all_zero &= random_bytes[i] == 0;
		if (all_zero) {
			fail("rng gave 16 zero bytes", n);
			return;
		}
		char *at = append(line, "conrng line ");
		at = format_dec(at, n);
		at = append(at, " ");
		at = format_hex(at, folded);
		*at++ = '\n';
		if (transfer(&console, line, (uint32_t)(at - line), 0) < 0) {
			fail("console write timed out", n);
			return;
		}
		if (n % every == 0)
			report(n, rng_done);
		if (pace_us) {
			uint64_t start = tsc_read();
			uint64_t ticks = pace_us * clock_ticks_per_ms() / 1000;
			while (tsc_elapsed(start, tsc_read()) < ticks)
				cpu_relax();
		}
	}
	report(lines, rng_done);
	console_write("conrng: done ok\n");
	if (exit && text_equal(exit, "reset"))
		guest_reset();
}
