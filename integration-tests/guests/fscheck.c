/*
 * fscheck: drives a virtio-fs device (found on PCI bus 0) as a FUSE client,
 * by polling its first request queue (queue 1; queue 0 is the high-priority
 * one).
 *
 * FUSE_INIT; LOOKUP of `input=` (default input.txt) in the root; OPEN, READ
 * and a comparison with `expect=`; RELEASE. Then CREATE of `output=` (default
 * output.txt) and `lines=` WRITEs of the fixed-width line
 *   "fscheck line <n, 8 digits>\n"   (22 bytes, at offset (n-1)*22)
 * each followed, every `report` lines, by "fscheck: wrote n=<n>" on COM1.
 * The guest keeps its FUSE session (node ids, file handle) for the whole
 * run, across whatever happens to the VM in between. At the end it READs
 * the whole file back through the same handle, checks every line, RELEASEs
 * it and prints "fscheck: done ok" (or "fscheck: FAIL <why> error=<errno>").
 * `pace_us=` spins between lines so a run can be power-failed mid-way.
 * `files=N` (default 0) first CREATEs N more files "f<4 digits>" and keeps
 * them open, so the backend holds N more inodes and handles (what its saved
 * device state grows with), and prints "fscheck: opened N files".
 * `hotplug=1` boots without the device: it prints "fscheck: waiting for a
 * hotplug", polls the GED for the "PCI devices changed" event, reads the
 * hotplug controller's PCIU as the DSDT's \_SB_.PHPR.PSCN does (printing
 * "fscheck: event up=0x.."), and drives the virtio-fs function that came up.
 */
#include "acpi_hotplug.h"
#include "clock.h"
#include "console.h"
#include "params.h"
#include "runtime.h"
#include "virtio.h"
#include "virtio_pci.h"

#define VIRTIO_ID_FS 26
#define REQUEST_QUEUE 1
#define QUEUE_SIZE 8
#define REQUEST_TIMEOUT_MS 60000

#define FUSE_LOOKUP 1
#define FUSE_OPEN 14
#define FUSE_READ 15
#define FUSE_WRITE 16
#define FUSE_RELEASE 18
#define FUSE_INIT 26
#define FUSE_CREATE 35
#define FUSE_ROOT_ID 1
#define FUSE_KERNEL_VERSION 7
#define FUSE_MINOR_VERSION 31

#define O_RDONLY 0
#define O_RDWR 2
#define O_CREAT 0100
#define O_TRUNC 01000

#define LINE_LEN 22
#define BUFFER_BYTES 8192

struct fuse_in_header {
	uint32_t len;
	uint32_t opcode;
	uint64_t unique;
	uint64_t nodeid;
	uint32_t uid;
	uint32_t gid;
	uint32_t pid;
	uint16_t total_extlen;
	uint16_t padding;
};

struct fuse_out_header {
	uint32_t len;
	int32_t error;
	uint64_t unique;
};

/* fuse_entry_out: nodeid, generation, valid times, then struct fuse_attr. */
#define ENTRY_OUT_BYTES 128
#define ENTRY_NODEID 0
#define ENTRY_ATTR_SIZE 48
#define OPEN_OUT_BYTES 16

static struct {
	struct virtq_desc descriptors[QUEUE_SIZE] __attribute__((aligned(16)));
	VIRTQ_AVAIL(QUEUE_SIZE) avail __attribute__((aligned(16)));
	VIRTQ_USED(QUEUE_SIZE) used __attribute__((aligned(16)));
} queue __attribute__((aligned(4096)));

static struct virtio_pci_function function;
static volatile uint16_t *notify;
static uint16_t next_avail;
static uint64_t unique;
static uint8_t request[BUFFER_BYTES] __attribute__((aligned(64)));
static uint8_t reply[BUFFER_BYTES] __attribute__((aligned(64)));
static int32_t last_error;

static void put_u32(uint8_t *at, uint32_t value)
{
	memcpy(at, &value, 4);
}

static void put_u64(uint8_t *at, uint64_t value)
{
	memcpy(at, &value, 8);
}

static uint64_t get_u64(const uint8_t *at)
{
	uint64_t value;
	memcpy(&value, at, 8);
	return value;
}

static void fail(const char *why)
{
	console_write("fscheck: FAIL ");
	console_write(why);
	console_write(" error=");
	console_write_dec((uint64_t)(int64_t)(last_error < 0 ? -last_error : last_error));
	console_write("\n");
}

/* Starts a request: the header for `opcode` on `nodeid`; the arguments go
 * after it, `args` bytes. Returns where the arguments go. */
static uint8_t *begin(uint32_t opcode, uint64_t nodeid)
{
	struct fuse_in_header *header = (struct fuse_in_header *)request;
	memset(request, 0, sizeof(struct fuse_in_header));
	header->opcode = opcode;
	header->unique = ++unique;
	header->nodeid = nodeid;
	return request + sizeof(struct fuse_in_header);
}

/* Sends the request of `args` argument bytes with a reply buffer of
 * `reply_bytes`, polls until it is used. Returns the reply's payload length,
 * or -1 (timeout, bad reply, or an error the backend answered: last_error). */
static int64_t send(uint32_t args, uint32_t reply_bytes)
{
	struct fuse_in_header *header = (struct fuse_in_header *)request;
	struct fuse_out_header *out = (struct fuse_out_header *)reply;
	uint16_t head = (uint16_t)(next_avail * 2 % QUEUE_SIZE);
	struct stopwatch watch;

	header->len = (uint32_t)sizeof(*header) + args;
	queue.descriptors[head].address = (uint64_t)request;
	queue.descriptors[head].length = header->len;
	queue.descriptors[head].flags = DESC_F_NEXT;
	queue.descriptors[head].next = (uint16_t)(head + 1);
	queue.descriptors[head + 1].address = (uint64_t)reply;
	queue.descriptors[head + 1].length = reply_bytes;
	queue.descriptors[head + 1].flags = DESC_F_WRITE;
	queue.descriptors[head + 1].next = 0;
	queue.avail.ring[next_avail % QUEUE_SIZE] = head;
	memset(out, 0, sizeof(*out));
	memory_barrier();
	next_avail++;
	queue.avail.index = next_avail;
	memory_barrier();
	*notify = REQUEST_QUEUE;
	stopwatch_start(&watch);
	while (*(volatile uint16_t *)&queue.used.index != next_avail) {
		if (stopwatch_poll_ms(&watch) > REQUEST_TIMEOUT_MS) {
			last_error = 0;
			return -1;
		}
		cpu_relax();
	}
	memory_barrier();
	last_error = out->error;
	if (out->unique != header->unique || out->error != 0 ||
	    out->len < sizeof(*out))
		return -1;
	return (int64_t)out->len - (int64_t)sizeof(*out);
}

static const uint8_t *payload(void)
{
	return reply + sizeof(struct fuse_out_header);
}

static uint32_t put_name(uint8_t *at, const char *name)
{
	uint32_t length = 0;
	while (name[length]) {
		at[length] = (uint8_t)name[length];
		length++;
	}
	at[length++] = 0;
	return length;
}

static int64_t fuse_read(uint64_t nodeid, uint64_t fh, uint64_t offset, uint32_t size)
{
	uint8_t *args = begin(FUSE_READ, nodeid);
	memset(args, 0, 40);
	put_u64(args, fh);
	put_u64(args + 8, offset);
	put_u32(args + 16, size);
	return send(40, (uint32_t)sizeof(struct fuse_out_header) + size);
}

static int fuse_release(uint64_t nodeid, uint64_t fh, uint32_t flags)
{
	uint8_t *args = begin(FUSE_RELEASE, nodeid);
	memset(args, 0, 24);
	put_u64(args, fh);
	put_u32(args + 8, flags);
	return send(24, sizeof(struct fuse_out_header)) < 0 ? -1 : 0;
}

static char *line_text(char *at, uint64_t n)
{
	static const char prefix[] = "fscheck line ";
	for (unsigned i = 0; prefix[i]; i++)
		*at++ = prefix[i];
	for (int digit = 7; digit >= 0; digit--) {
		uint64_t divisor = 1;
		for (int i = 0; i < digit; i++)
			divisor *= 10;
		*at++ = (char)('0' + n / divisor % 10);
	}
	*at++ = '\n';
	return at;
}

/* Waits until a virtio-fs function is on bus 0, announced by ACPI PCI hotplug. */
static void wait_for_hotplug(void)
{
	struct virtio_pci_function probe;
	const char *error = 0;

	console_write("fscheck: waiting for a hotplug\n");
	for (;;) {
		if (!(*GED_REGISTER & GED_PCI_DEVICES_CHANGED)) {
			cpu_relax();
			continue;
		}
		*PSEG = 0;
		uint32_t up = *PCIU;
		console_write("fscheck: event up=0x");
		console_write_hex(up);
		console_write("\n");
		if (up && virtio_pci_find(VIRTIO_PCI_ID(VIRTIO_ID_FS), &probe, &error) != 1)
			return;
	}
}

void guest_main(void)
{
	const char *input = param_str("input");
	const char *output = param_str("output");
	const char *expect = param_str("expect");
	const char *exit = param_str("exit");
	uint64_t lines = param_u64("lines", 200);
	uint64_t every = param_u64("report", 20);
	uint64_t pace_us = param_u64("pace_us", 0);
	uint64_t files = param_u64("files", 0);
	uint64_t hotplug = param_u64("hotplug", 0);
	const char *error = 0;
	int64_t got;

	if (!input)
		input = "input.txt";
	if (!output)
		output = "output.txt";
	if (every == 0)
		every = 1;
	if (lines * LINE_LEN > BUFFER_BYTES - 64) {
		fail("lines= too many for the read-back buffer");
		return;
	}
	if (hotplug)
		wait_for_hotplug();
	if (virtio_pci_find(VIRTIO_PCI_ID(VIRTIO_ID_FS), &function, &error) ||
	    virtio_pci_negotiate(&function, 0, &error)) {
		fail(error);
		return;
	}
	queue.avail.flags = AVAIL_F_NO_INTERRUPT;
	notify = virtio_pci_queue(&function, REQUEST_QUEUE, QUEUE_SIZE, queue.descriptors,
				  &queue.avail, &queue.used, &error);
	if (!notify) {
		fail(error);
		return;
	}
	virtio_pci_driver_ok(&function);

	uint8_t *args = begin(FUSE_INIT, 0);
	memset(args, 0, 16);
	put_u32(args, FUSE_KERNEL_VERSION);
	put_u32(args + 4, FUSE_MINOR_VERSION);
	got = send(16, 256);
	if (got < 8) {
		fail("FUSE_INIT");
		return;
	}
	console_write("fscheck: init major=");
	console_write_dec(*(const uint32_t *)payload());
	console_write(" minor=");
	console_write_dec(*(const uint32_t *)(payload() + 4));
	console_write("\n");

	/* LOOKUP, OPEN, READ and compare the input file. */
	args = begin(FUSE_LOOKUP, FUSE_ROOT_ID);
	if (send(put_name(args, input), 256) < ENTRY_OUT_BYTES) {
		fail("LOOKUP of the input file");
		return;
	}
	uint64_t input_node = get_u64(payload() + ENTRY_NODEID);
	uint64_t input_size = get_u64(payload() + ENTRY_ATTR_SIZE);
	args = begin(FUSE_OPEN, input_node);
	memset(args, 0, 8);
	put_u32(args, O_RDONLY);
	if (send(8, 64) < OPEN_OUT_BYTES) {
		fail("OPEN of the input file");
		return;
	}
	uint64_t input_fh = get_u64(payload());
	got = fuse_read(input_node, input_fh, 0, 4096);
	if (got < 0) {
		fail("READ of the input file");
		return;
	}
	uint64_t expect_length = 0;
	while (expect && expect[expect_length])
		expect_length++;
	if (!expect || (uint64_t)got != expect_length || got != (int64_t)input_size ||
	    memcmp(payload(), expect, expect_length) != 0) {
		fail("the input file does not hold expect=");
		return;
	}
	console_write("fscheck: read ");
	console_write_dec((uint64_t)got);
	console_write(" bytes, as expected\n");
	if (fuse_release(input_node, input_fh, O_RDONLY)) {
		fail("RELEASE of the input file");
		return;
	}

	/* `files=`: more files created and kept open. */
	for (uint64_t f = 0; f < files; f++) {
		char name[6] = { 'f', (char)('0' + f / 1000 % 10), (char)('0' + f / 100 % 10),
				 (char)('0' + f / 10 % 10), (char)('0' + f % 10), 0 };
		args = begin(FUSE_CREATE, FUSE_ROOT_ID);
		memset(args, 0, 16);
		put_u32(args, O_RDWR | O_CREAT | O_TRUNC);
		put_u32(args + 4, 0100644);
		if (send(16 + put_name(args + 16, name), 512) < ENTRY_OUT_BYTES + OPEN_OUT_BYTES) {
			fail("CREATE of a files= file");
			return;
		}
	}
	if (files) {
		console_write("fscheck: opened ");
		console_write_dec(files);
		console_write(" files\n");
	}

	/* CREATE the output file, then WRITE it line by line. */
	args = begin(FUSE_CREATE, FUSE_ROOT_ID);
	memset(args, 0, 16);
	put_u32(args, O_RDWR | O_CREAT | O_TRUNC);
	put_u32(args + 4, 0100644);
	got = send(16 + put_name(args + 16, output), 512);
	if (got < ENTRY_OUT_BYTES + OPEN_OUT_BYTES) {
		fail("CREATE of the output file");
		return;
	}
	uint64_t output_node = get_u64(payload() + ENTRY_NODEID);
	uint64_t output_fh = get_u64(payload() + ENTRY_OUT_BYTES);
	console_write("fscheck: created node=");
	console_write_dec(output_node);
	console_write(" fh=");
	console_write_dec(output_fh);
	console_write("\n");
	for (uint64_t n = 1; n <= lines; n++) {
		args = begin(FUSE_WRITE, output_node);
		memset(args, 0, 40);
		put_u64(args, output_fh);
		put_u64(args + 8, (n - 1) * LINE_LEN);
		put_u32(args + 16, LINE_LEN);
		line_text((char *)args + 40, n);
		got = send(40 + LINE_LEN, 64);
		if (got < 8 || *(const uint32_t *)payload() != LINE_LEN) {
			console_write("fscheck: write n=");
			console_write_dec(n);
			console_write(" answered error=");
			console_write_dec((uint64_t)(int64_t)(last_error < 0 ? -last_error : last_error));
			console_write("\n");
			fail("WRITE of the output file");
			return;
		}
		if (n % every == 0) {
			console_write("fscheck: wrote n=");
			console_write_dec(n);
			console_write("\n");
		}
		if (pace_us) {
			uint64_t start = tsc_read();
			uint64_t ticks = pace_us * clock_ticks_per_ms() / 1000;
			while (tsc_elapsed(start, tsc_read()) < ticks)
				cpu_relax();
		}
	}

	/* Read it all back through the same handle. */
	got = fuse_read(output_node, output_fh, 0, (uint32_t)(lines * LINE_LEN));
	if (got != (int64_t)(lines * LINE_LEN)) {
		fail("READ back of the output file");
		return;
	}
	for (uint64_t n = 1; n <= lines; n++) {
		char expected[LINE_LEN];
		line_text(expected, n);
		if (memcmp(payload() + (n - 1) * LINE_LEN, expected, LINE_LEN) != 0) {
			fail("the output file read back differs");
			return;
		}
	}
	if (fuse_release(output_node, output_fh, O_RDWR)) {
		fail("RELEASE of the output file");
		return;
	}
	console_write("fscheck: done ok\n");
	if (exit && text_equal(exit, "reset"))
		guest_reset();
}
