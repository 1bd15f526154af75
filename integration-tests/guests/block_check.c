/* The write, flush, read-back and verify loop of blkcheck and pcimsix
 * (see block_check.h). */
#include "block_check.h"
#include "console.h"
#include "params.h"
#include "runtime.h"

#define BLOCK_SIZE 4096
#define BLOCK_WORDS (BLOCK_SIZE / 8)
#define SECTORS_PER_BLOCK (BLOCK_SIZE / VIRTIO_BLK_SECTOR_SIZE)
#define BLOCK_MAGIC 0x4b48434b4c42564eull /* "NVBLKCHK" */
#define PATTERN_MULTIPLIER 0x9e3779b97f4a7c15ull
#define DEFAULT_BLOCKS 256
#define DEFAULT_ROUNDS 1

static void fill_block(uint64_t *words, uint64_t seq, uint64_t block, uint64_t round)
{
	words[0] = BLOCK_MAGIC;
	words[1] = seq;
	words[2] = block;
	words[3] = round;
	for (uint64_t k = 4; k < BLOCK_WORDS; k++)
		words[k] = (seq * PATTERN_MULTIPLIER) ^ k;
}

static uint64_t write_buffers[VIRTIO_BLK_MAX_BATCH][BLOCK_WORDS] __attribute__((aligned(4096)));
static uint64_t read_buffers[VIRTIO_BLK_MAX_BATCH][BLOCK_WORDS] __attribute__((aligned(4096)));
/* verify_span=N: the whole-disk check reads N blocks per request into this
 * (pages the guest itself never writes: only the device does). */
#define MAX_SPAN 8
static uint64_t span_buffer[MAX_SPAN][BLOCK_WORDS] __attribute__((aligned(4096)));

static const char *guest_name;

static void report_failure(const char *why, uint64_t seq)
{
	console_write(guest_name);
	console_write(": FAIL ");
	console_write(why);
	if (seq) {
		console_write(" at seq=");
		console_write_dec(seq);
	}
	console_write("\n");
}

/* Writes, flushes, reads back and compares blocks [first, first + count)
 * of `round`. Returns 0 when all of them are verified. */
static int check_batch(struct virtio_blk *disk, uint64_t blocks, uint64_t round,
		       uint64_t first, int count)
{
	struct virtio_blk_io ios[VIRTIO_BLK_MAX_BATCH];
	const char *error = 0;
	uint64_t first_seq = round * blocks + first + 1;

	for (int i = 0; i < count; i++) {
		fill_block(write_buffers[i], first_seq + (uint64_t)i, first + (uint64_t)i, round);
		ios[i].op = VIRTIO_BLK_OP_WRITE;
		ios[i].sector = (first + (uint64_t)i) * SECTORS_PER_BLOCK;
		ios[i].buffer = write_buffers[i];
		ios[i].length = BLOCK_SIZE;
	}
	if (virtio_blk_submit(disk, ios, count, &error) || virtio_blk_flush(disk, &error)) {
		report_failure(error, first_seq);
		return -1;
	}
	for (int i = 0; i < count; i++) {
		memset(read_buffers[i], 0, BLOCK_SIZE);
		ios[i].op = VIRTIO_BLK_OP_READ;
		ios[i].buffer = read_buffers[i];
	}
	if (virtio_blk_submit(disk, ios, count, &error)) {
		report_failure(error, first_seq);
		return -1;
	}
	for (int i = 0; i < count; i++) {
		if (memcmp(read_buffers[i], write_buffers[i], BLOCK_SIZE)) {
			report_failure("read-back differs from what was written",
				       first_seq + (uint64_t)i);
			return -1;
		}
	}
	console_write(guest_name);
	console_write(": completed seq=");
	console_write_dec(first_seq + (uint64_t)count - 1);
	console_write("\n");
	return 0;
}

/* Block b as the whole-disk check reads it (`got`) must hold what this guest
 * last wrote there (block b < first: round `round`; else round - 1; never
 * written: zeros). Returns 0 when it does. */
static int expect_block(const uint64_t *got, uint64_t b, uint64_t blocks, uint64_t round,
			uint64_t first)
{
	int written = b < first || round > 0;
	uint64_t r = b < first ? round : round - 1;
	if (written)
		fill_block(write_buffers[0], r * blocks + b + 1, b, r);
	else
		memset(write_buffers[0], 0, BLOCK_SIZE);
	if (!memcmp(got, write_buffers[0], BLOCK_SIZE))
		return 0;
	console_write(guest_name);
	console_write(": FAIL disk block ");
	console_write_dec(b);
	console_write(" holds seq=");
	console_write_dec(got[1]);
	console_write(", this guest wrote ");
	console_write_dec(written ? r * blocks + b + 1 : 0);
	console_write("\n");
	return -1;
}

/* verify=all: before each batch, every block must hold what this guest
 * last wrote there (expect_block). A disk ahead of or behind the guest's
 * memory fails here. `span` > 1: one request of `span` blocks at a time. */
static int verify_disk(struct virtio_blk *disk, uint64_t blocks, uint64_t round,
		       uint64_t first, int batch, int span)
{
	struct virtio_blk_io ios[VIRTIO_BLK_MAX_BATCH];
	const char *error = 0;
	int per_request = span > 1 ? span : 1;
	int requests = span > 1 ? 1 : batch;

	for (uint64_t at = 0; at < blocks;) {
		uint64_t left = blocks - at;
		int count = 0;
		for (int i = 0; i < requests && left > 0; i++) {
			int n = left < (uint64_t)per_request ? (int)left : per_request;
			ios[i].op = VIRTIO_BLK_OP_READ;
			ios[i].sector = (at + (uint64_t)i * (uint64_t)per_request) * SECTORS_PER_BLOCK;
			ios[i].buffer = span > 1 ? (void *)span_buffer : (void *)read_buffers[i];
			ios[i].length = (uint32_t)n * BLOCK_SIZE;
			left -= (uint64_t)n;
			count++;
		}
		if (virtio_blk_submit(disk, ios, count, &error)) {
			report_failure(error, 0);
			return -1;
		}
		for (int i = 0; i < count; i++) {
			int n = (int)(ios[i].length / BLOCK_SIZE);
			for (int k = 0; k < n; k++) {
				const uint64_t *got = span > 1 ? span_buffer[k] : read_buffers[i];
				if (expect_block(got, at, blocks, round, first))
					return -1;
				at++;
			}
		}
	}
	return 0;
}

int block_check_run(const struct block_check *check, struct virtio_blk *disk,
		    const char *open_error)
{
	uint64_t blocks = param_u64("blocks", DEFAULT_BLOCKS);
	uint64_t rounds = param_u64("rounds", DEFAULT_ROUNDS);
	uint64_t batches = 0;

	guest_name = check->name;
	if (!blocks || blocks > (1ull << 40) || !rounds || rounds > (1ull << 20)) {
		report_failure("blocks= and rounds= must be positive and sane", 0);
		return -1;
	}
	if (!disk) {
		report_failure(open_error, 0);
		return -1;
	}
	if (virtio_blk_readonly(disk)) {
		report_failure("disk is read-only", 0);
		return -1;
	}
	if (virtio_blk_capacity_sectors(disk) / SECTORS_PER_BLOCK < blocks) {
		report_failure("disk smaller than blocks= x 4 KiB", 0);
		return -1;
	}
	console_write(guest_name);
	console_write(": disk sectors=");
	console_write_dec(virtio_blk_capacity_sectors(disk));
	console_write(" blocks=");
	console_write_dec(blocks);
	console_write(" rounds=");
	console_write_dec(rounds);
	console_write(" transport=");
	console_write(virtio_blk_transport(disk));
	console_write("\n");

	int batch = virtio_blk_max_batch(disk);
	uint64_t batch_param = param_u64("batch", (uint64_t)batch);
	if (batch_param >= 1 && batch_param < (uint64_t)batch)
		batch = (int)batch_param;
	const char *verify = param_str("verify");
	int verify_all = verify && text_equal(verify, "all");
	uint64_t span = param_u64("verify_span", 1);
	if (span < 1 || span > MAX_SPAN)
		span = 1;
	for (uint64_t round = 0; round < rounds; round++) {
		for (uint64_t first = 0; first < blocks; first += (uint64_t)batch) {
			uint64_t left = blocks - first;
			int count = left < (uint64_t)batch ? (int)left : batch;
			if (check->before_batch)
				check->before_batch(batches);
			batches++;
			if (verify_all && verify_disk(disk, blocks, round, first, batch, (int)span))
				return -1;
			if (check_batch(disk, blocks, round, first, count))
				return -1;
		}
	}
	console_write(guest_name);
	console_write(": done ok\n");
	return 0;
}

