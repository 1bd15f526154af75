/*
 * kvstore: a key-value service with an append-only log, for recovery
 * benchmarks.
 *
 * The table is an open-addressing (linear probing) hash table of `keys=`
 * keys in guest RAM after the image. A self-driven workload does GETs and
 * PUTs (`put_pct=` percent PUTs); every PUT is appended to a log on the
 * first virtio-blk disk, written and flushed in batches (when the buffer
 * fills and at every report), the way Redis' AOF does. A cold boot replays
 * the log before serving; a VM recovered in place simply continues.
 *
 * Log format (little-endian), 4 KiB blocks:
 *   block 0: header {magic "NVKVLOG1", log id, keys, check}
 *   blocks 1..: 32-byte records {seq, key, value, check}, 128 per block.
 * Record seq s (from 1) lives at byte 4096 + (s - 1) * 32. Each record's
 * check hashes the previous record's check with its own fields, so replay
 * stops at the first record that is missing, torn, or left over from
 * before an earlier cold boot (its chain no longer matches).
 */
#include "clock.h"
#include "console.h"
#include "params.h"
#include "runtime.h"
#include "virtio_blk.h"

#define DEFAULT_KEYS 100000
#define MAX_KEYS (1ull << 28)
#define DEFAULT_PUT_PERCENT 10
#define REPORT_PERIOD_MS 100
#define OPS_PER_TIME_CHECK 1024
#define REPLAY_PROGRESS_MS 1000

#define BLOCK_SIZE 4096
#define SECTORS_PER_BLOCK (BLOCK_SIZE / VIRTIO_BLK_SECTOR_SIZE)
#define LOG_MAGIC 0x31474f4c564b564eull /* "NVKVLOG1" */
#define RECORDS_PER_BLOCK (BLOCK_SIZE / sizeof(struct log_record))
/* One write request covers the whole buffer. */
#define LOG_BUFFER_BLOCKS 64
#define LOG_BUFFER_BYTES (LOG_BUFFER_BLOCKS * BLOCK_SIZE)

struct slot {
	uint64_t stored_key; /* key + 1; 0 marks an empty slot */
	uint64_t value;
};

struct log_header {
	uint64_t magic;
	uint64_t log_id;
	uint64_t keys;
	uint64_t check;
};

struct log_record {
	uint64_t seq;
	uint64_t key;
	uint64_t value;
	uint64_t check;
};

struct hash_table {
	struct slot *slots;
	uint64_t mask;
	unsigned shift;
};

struct log_state {
	struct virtio_blk *disk;
	uint64_t capacity_blocks;
	uint64_t log_id;
	uint64_t next_seq;
	uint64_t chain;		/* check of the last record appended */
	uint64_t buffer_block;	/* disk block of buffer byte 0 */
	uint64_t used_bytes;	/* bytes of the buffer holding records */
	uint64_t durable_bytes; /* of those, written and flushed */
	int enabled;
};

static uint8_t log_buffer[LOG_BUFFER_BYTES] __attribute__((aligned(4096)));

/* ---- hashing ----------------------------------------------------------- */

static uint64_t mix64(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 31;
	return x;
}

static uint64_t record_check(uint64_t previous, uint64_t seq, uint64_t key, uint64_t value)
{
	return mix64(previous ^ mix64(seq ^ mix64(key ^ mix64(value))));
}

static uint64_t header_check(const struct log_header *header)
{
	return mix64(header->magic ^ mix64(header->log_id ^ mix64(header->keys)));
}

/* ---- table ------------------------------------------------------------- */

static struct slot *table_find(struct hash_table *table, uint64_t key)
{
	uint64_t index = (key * 0x9e3779b97f4a7c15ull) >> table->shift;

	for (;;) {
		struct slot *slot = &table->slots[index];
		if (slot->stored_key == key + 1 || slot->stored_key == 0)
			return slot;
		index = (index + 1) & table->mask;
	}
}

static void table_put(struct hash_table *table, uint64_t key, uint64_t value)
{
	struct slot *slot = table_find(table, key);

	slot->stored_key = key + 1;
	slot->value = value;
}

/* Sized for a load factor of at most 1/2, so probes stay short and an
 * empty slot always exists. Returns -1 if it does not fit in RAM. */
static int table_init(struct hash_table *table, uint64_t keys)
{
	uint64_t slots = 2;
	unsigned bits = 1;

	while (slots < 2 * keys) {
		slots <<= 1;
		bits++;
	}
	uint64_t base = ram_free_start();
	if (!ram_contains(base, slots * sizeof(struct slot)))
		return -1;
	table->slots = (struct slot *)base;
	table->mask = slots - 1;
	table->shift = 64 - bits;
	/* Cold boot on reused memory: clear the previous contents. */
	memset(table->slots, 0, slots * sizeof(struct slot));
	for (uint64_t key = 0; key < keys; key++)
		table_put(table, key, key);
	return 0;
}

/* ---- log --------------------------------------------------------------- */

static void log_failure(const char *what, const char *why)
{
	console_write("kvstore: FAIL ");
	console_write(what);
	console_write(": ");
	console_write(why);
	console_write("\n");
}

static int log_io(struct log_state *log, enum virtio_blk_op op, uint64_t block, void *buffer,
		  uint64_t blocks, const char **error)
{
	struct virtio_blk_io io = {
		.op = op,
		.sector = block * SECTORS_PER_BLOCK,
		.buffer = buffer,
		.length = (uint32_t)(blocks * BLOCK_SIZE),
	};
	return virtio_blk_submit(log->disk, &io, 1, error);
}

static int log_create(struct log_state *log, uint64_t keys)
{
	struct log_header *header = (struct log_header *)log_buffer;
	const char *error = 0;

	memset(log_buffer, 0, BLOCK_SIZE);
	header->magic = LOG_MAGIC;
	header->log_id = mix64(tsc_read()) | 1;
	header->keys = keys;
	header->check = header_check(header);
	if (log_io(log, VIRTIO_BLK_OP_WRITE, 0, log_buffer, 1, &error) ||
	    virtio_blk_flush(log->disk, &error)) {
		log_failure("writing the log header", error);
		return -1;
	}
	log->log_id = header->log_id;
	log->chain = header->log_id;
	log->next_seq = 1;
	return 0;
}

/* Applies the valid prefix of the log to the table; returns the number of
 * records replayed, or -1 on an I/O error. */
static int64_t log_replay(struct log_state *log, struct hash_table *table, uint64_t keys)
{
	const char *error = 0;
	uint64_t replayed = 0;
	struct ticker progress;

	ticker_start(&progress, REPLAY_PROGRESS_MS);
	for (uint64_t block = 1; block < log->capacity_blocks; block += LOG_BUFFER_BLOCKS) {
		uint64_t blocks = log->capacity_blocks - block;
		if (blocks > LOG_BUFFER_BLOCKS)
			blocks = LOG_BUFFER_BLOCKS;
		if (log_io(log, VIRTIO_BLK_OP_READ, block, log_buffer, blocks, &error)) {
			log_failure("reading the log", error);
			return -1;
		}
		if (ticker_due(&progress)) {
			console_write("kvstore: replaying, ");
			console_write_dec(replayed);
			console_write(" records so far\n");
		}
		const struct log_record *records = (const struct log_record *)log_buffer;
		for (uint64_t i = 0; i < blocks * RECORDS_PER_BLOCK; i++) {
			const struct log_record *record = &records[i];
			if (record->seq != log->next_seq || record->key >= keys ||
			    record->check != record_check(log->chain, record->seq, record->key,
							  record->value))
				return (int64_t)replayed;
			table_put(table, record->key, record->value);
			log->chain = record->check;
			log->next_seq++;
			replayed++;
		}
	}
	return (int64_t)replayed;
}

/* Opens the log on `disk`: replays a matching one or starts a new one.
 * Returns the number of replayed records or -1. */
static int64_t log_open(struct log_state *log, struct hash_table *table, uint64_t keys)
{
	const struct log_header *header = (const struct log_header *)log_buffer;
	const char *error = 0;
	int64_t replayed = 0;

	if (log->capacity_blocks < 2) {
		log_failure("opening the log", "disk smaller than 8 KiB");
		return -1;
	}
	if (log_io(log, VIRTIO_BLK_OP_READ, 0, log_buffer, 1, &error)) {
		log_failure("reading the log header", error);
		return -1;
	}
	if (header->magic == LOG_MAGIC && header->check == header_check(header) &&
	    header->keys == keys) {
		log->log_id = header->log_id;
		log->chain = header->log_id;
		log->next_seq = 1;
		replayed = log_replay(log, table, keys);
		if (replayed < 0)
			return -1;
	} else if (log_create(log, keys)) {
		return -1;
	}

	/* Continue appending inside the block that holds the next record. */
	uint64_t next_index = log->next_seq - 1;
	log->buffer_block = 1 + next_index / RECORDS_PER_BLOCK;
	log->used_bytes = (next_index % RECORDS_PER_BLOCK) * sizeof(struct log_record);
	log->durable_bytes = log->used_bytes;
	memset(log_buffer, 0, LOG_BUFFER_BYTES);
	if (log->used_bytes &&
	    log_io(log, VIRTIO_BLK_OP_READ, log->buffer_block, log_buffer, 1, &error)) {
		log_failure("reading the log tail", error);
		return -1;
	}
	memset(log_buffer + log->used_bytes, 0, BLOCK_SIZE - log->used_bytes);
	log->enabled = 1;
	return replayed;
}

static void log_disable(struct log_state *log, const char *why)
{
	console_write("kvstore: log stopped at seq=");
	console_write_dec(log->next_seq - 1);
	console_write(" (");
	console_write(why);
	console_write("), later PUTs are not persisted\n");
	log->enabled = 0;
}

/* Writes the not yet durable blocks of the buffer and flushes them. */
static void log_sync(struct log_state *log)
{
	const char *error = 0;

	if (!log->enabled || log->durable_bytes == log->used_bytes)
		return;
	uint64_t first = log->durable_bytes / BLOCK_SIZE;
	uint64_t end = (log->used_bytes + BLOCK_SIZE - 1) / BLOCK_SIZE;
	if (log_io(log, VIRTIO_BLK_OP_WRITE, log->buffer_block + first,
		   log_buffer + first * BLOCK_SIZE, end - first, &error) ||
	    virtio_blk_flush(log->disk, &error)) {
		log_failure("writing the log", error);
		log_disable(log, "I/O error");
		return;
	}
	log->durable_bytes = log->used_bytes;
}

static void log_append(struct log_state *log, uint64_t key, uint64_t value)
{
	if (!log->enabled)
		return;
	if (log->used_bytes == LOG_BUFFER_BYTES) {
		log_sync(log);
		if (!log->enabled)
			return;
		log->buffer_block += LOG_BUFFER_BLOCKS;
		log->used_bytes = 0;
		log->durable_bytes = 0;
		memset(log_buffer, 0, LOG_BUFFER_BYTES);
	}
	if (log->buffer_block + log->used_bytes / BLOCK_SIZE >= log->capacity_blocks) {
		log_disable(log, "disk full");
		return;
	}
	struct log_record *record = (struct log_record *)(log_buffer + log->used_bytes);
	record->seq = log->next_seq++;
	record->key = key;
	record->value = value;
	record->check = record_check(log->chain, record->seq, key, value);
	log->chain = record->check;
	log->used_bytes += sizeof(struct log_record);
}

/* ---- workload ---------------------------------------------------------- */

static uint64_t next_random(uint64_t *state)
{
	uint64_t x = *state;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545f4914f6cdd1dull;
}

static void report(uint64_t ops, uint64_t keys)
{
	console_write("kv ops=");
	console_write_dec(ops);
	console_write(" tsc=");
	console_write_dec(tsc_read());
	console_write(" keys=");
	console_write_dec(keys);
	console_write("\n");
}

static void serve(struct hash_table *table, struct log_state *log, uint64_t keys,
		  uint64_t put_percent)
{
	/* PUT when the low 16 random bits fall below this threshold. */
	uint64_t put_threshold = put_percent * 65536 / 100;
	uint64_t random_state = mix64(tsc_read()) | 1;
	uint64_t ops = 0;
	struct ticker ticker;

	ticker_start(&ticker, REPORT_PERIOD_MS);
	for (;;) {
		for (int i = 0; i < OPS_PER_TIME_CHECK; i++) {
			uint64_t random = next_random(&random_state);
			uint64_t key = ((random >> 32) * keys) >> 32;
			struct slot *slot = table_find(table, key);
			if ((random & 0xffff) < put_threshold) {
				slot->stored_key = key + 1;
				slot->value = ops;
				log_append(log, key, ops);
			} else if (slot->stored_key != key + 1) {
				console_write("kvstore: FAIL key ");
				console_write_dec(key);
				console_write(" missing from the table\n");
				return;
			}
			ops++;
		}
		if (ticker_due(&ticker)) {
			report(ops, keys);
			log_sync(log);
		}
	}
}

void guest_main(void)
{
	uint64_t keys = param_u64("keys", DEFAULT_KEYS);
	uint64_t put_percent = param_u64("put_pct", DEFAULT_PUT_PERCENT);
	struct hash_table table;
	struct log_state log = { 0 };
	const char *error = 0;

	if (keys == 0 || keys > MAX_KEYS || put_percent > 100) {
		console_write("kvstore: FAIL keys= must be 1..268435456 and put_pct= 0..100\n");
		return;
	}
	if (table_init(&table, keys)) {
		console_write("kvstore: FAIL the table for keys=");
		console_write_dec(keys);
		console_write(" does not fit in RAM\n");
		return;
	}
	log.disk = virtio_blk_open(&error);
	int64_t replayed = 0;
	if (!log.disk) {
		console_write("kvstore: no log disk (");
		console_write(error);
		console_write("), PUTs are not persisted\n");
	} else if (virtio_blk_readonly(log.disk)) {
		console_write("kvstore: log disk is read-only, PUTs are not persisted\n");
	} else {
		log.capacity_blocks = virtio_blk_capacity_sectors(log.disk) / SECTORS_PER_BLOCK;
		replayed = log_open(&log, &table, keys);
		if (replayed < 0)
			return;
	}
	console_write("kvstore: replayed ");
	console_write_dec((uint64_t)replayed);
	console_write(" records\n");
	console_write("kvstore: serving\n");
	serve(&table, &log, keys, put_percent);
}
