#include "virtio_blk.h"
#include "clock.h"
#include "params.h"
#include "runtime.h"

/* virtio-mmio register offsets (virtio 1.x, section 4.2.2). */
#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_CONFIG_GENERATION 0x0fc
#define REG_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976u /* "virt" */
#define VIRTIO_MMIO_MODERN 2
#define VIRTIO_ID_BLOCK 2

#define STATUS_ACKNOWLEDGE 1u
#define STATUS_DRIVER 2u
#define STATUS_DRIVER_OK 4u
#define STATUS_FEATURES_OK 8u
#define STATUS_FAILED 128u

#define FEATURE_BLK_RO (1u << 5)
#define FEATURE_BLK_FLUSH (1u << 9)
#define FEATURE_HIGH_VERSION_1 (1u << 0) /* bit 32 */

#define REQUEST_IN 0
#define REQUEST_OUT 1
#define REQUEST_FLUSH 4
#define REQUEST_STATUS_OK 0

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1

/* Only the device hole is mapped uncached and guaranteed present. */
#define DEVICE_HOLE_START 0xc0000000ull
#define DEVICE_HOLE_END 0x100000000ull

#define QUEUE_SIZE_WANTED 64
#define QUEUE_SIZE_LIMIT 256
#define DESCRIPTORS_PER_REQUEST 3
/* Generous: a host fdatasync of a large batch on a busy disk. Only time the
 * guest actually spent polling counts (see struct stopwatch). */
#define REQUEST_TIMEOUT_MS 60000

struct virtq_desc {
	uint64_t address;
	uint32_t length;
	uint16_t flags;
	uint16_t next;
};

struct virtq_avail {
	uint16_t flags;
	uint16_t index;
	uint16_t ring[QUEUE_SIZE_LIMIT];
	uint16_t used_event;
};

struct virtq_used_element {
	uint32_t id;
	uint32_t length;
};

struct virtq_used {
	uint16_t flags;
	uint16_t index;
	struct virtq_used_element ring[QUEUE_SIZE_LIMIT];
	uint16_t avail_event;
};

struct request_header {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

struct request_slot {
	struct request_header header;
	volatile uint8_t status;
};

struct virtio_blk {
	volatile uint8_t *registers;
	uint64_t capacity_sectors;
	int readonly;
	uint16_t queue_size;
	uint16_t next_avail;
	uint16_t next_used;
	int max_batch;
	/* Set after a failed or timed-out batch: the device may still own the
	 * descriptors, so the queue is not reused. */
	int broken;
	struct virtq_desc descriptors[QUEUE_SIZE_LIMIT] __attribute__((aligned(16)));
	struct virtq_avail avail __attribute__((aligned(16)));
	struct virtq_used used __attribute__((aligned(16)));
	struct request_slot slots[VIRTIO_BLK_MAX_BATCH];
};

static struct virtio_blk the_disk __attribute__((aligned(4096)));

/* Every register access below is an exit to the VMM (tens of us here). */
static uint32_t reg_read(const struct virtio_blk *disk, unsigned offset)
{
	return *(volatile uint32_t *)(disk->registers + offset);
}

static void reg_write(struct virtio_blk *disk, unsigned offset, uint32_t value)
{
	*(volatile uint32_t *)(disk->registers + offset) = value;
}

static void reg_write_address(struct virtio_blk *disk, unsigned low, unsigned high,
			      const void *address)
{
	reg_write(disk, low, (uint32_t)(uint64_t)address);
	reg_write(disk, high, (uint32_t)((uint64_t)address >> 32));
}

static int fail(struct virtio_blk *disk, const char *why, const char **error)
{
	if (disk->registers)
		reg_write(disk, REG_STATUS, STATUS_FAILED);
	*error = why;
	return -1;
}

static int is_block_device(uint64_t base)
{
	volatile uint32_t *registers = (volatile uint32_t *)base;

	return registers[REG_MAGIC / 4] == VIRTIO_MMIO_MAGIC &&
	       registers[REG_DEVICE_ID / 4] == VIRTIO_ID_BLOCK;
}

static uint64_t read_capacity(struct virtio_blk *disk)
{
	uint32_t generation, low, high;

	/* The 64-bit field is read in two halves: retry if the device changed
	 * its configuration in between. */
	do {
		generation = reg_read(disk, REG_CONFIG_GENERATION);
		low = reg_read(disk, REG_CONFIG);
		high = reg_read(disk, REG_CONFIG + 4);
	} while (generation != reg_read(disk, REG_CONFIG_GENERATION));
	return ((uint64_t)high << 32) | low;
}

static int negotiate(struct virtio_blk *disk, const char **error)
{
	reg_write(disk, REG_STATUS, 0);
	if (reg_read(disk, REG_STATUS) != 0)
		return fail(disk, "device did not reset", error);
	reg_write(disk, REG_STATUS, STATUS_ACKNOWLEDGE);
	reg_write(disk, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);

	reg_write(disk, REG_DEVICE_FEATURES_SEL, 0);
	uint32_t features_low = reg_read(disk, REG_DEVICE_FEATURES);
	reg_write(disk, REG_DEVICE_FEATURES_SEL, 1);
	uint32_t features_high = reg_read(disk, REG_DEVICE_FEATURES);
	if (!(features_high & FEATURE_HIGH_VERSION_1))
		return fail(disk, "device does not offer VIRTIO_F_VERSION_1", error);
	if (!(features_low & FEATURE_BLK_FLUSH))
		return fail(disk, "device does not offer VIRTIO_BLK_F_FLUSH", error);
	disk->readonly = (features_low & FEATURE_BLK_RO) != 0;

	reg_write(disk, REG_DRIVER_FEATURES_SEL, 0);
	reg_write(disk, REG_DRIVER_FEATURES, features_low & (FEATURE_BLK_FLUSH | FEATURE_BLK_RO));
	reg_write(disk, REG_DRIVER_FEATURES_SEL, 1);
	reg_write(disk, REG_DRIVER_FEATURES, FEATURE_HIGH_VERSION_1);

	uint32_t status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
	reg_write(disk, REG_STATUS, status);
	if (!(reg_read(disk, REG_STATUS) & STATUS_FEATURES_OK))
		return fail(disk, "device rejected the feature set", error);
	return 0;
}

static int setup_queue(struct virtio_blk *disk, const char **error)
{
	reg_write(disk, REG_QUEUE_SEL, 0);
	if (reg_read(disk, REG_QUEUE_READY))
		return fail(disk, "queue 0 already in use", error);
	uint32_t max = reg_read(disk, REG_QUEUE_NUM_MAX);
	if (max < DESCRIPTORS_PER_REQUEST)
		return fail(disk, "queue 0 too small", error);
	uint32_t size = QUEUE_SIZE_WANTED;
	while (size > max)
		size >>= 1;
	disk->queue_size = (uint16_t)size;
	disk->max_batch = (int)(size / DESCRIPTORS_PER_REQUEST);
	if (disk->max_batch > VIRTIO_BLK_MAX_BATCH)
		disk->max_batch = VIRTIO_BLK_MAX_BATCH;
	if (disk->max_batch < 1)
		return fail(disk, "queue 0 too small", error);

	/* Polling driver: ask the device not to interrupt. */
	disk->avail.flags = AVAIL_F_NO_INTERRUPT;
	reg_write(disk, REG_QUEUE_NUM, size);
	reg_write_address(disk, REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, disk->descriptors);
	reg_write_address(disk, REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, &disk->avail);
	reg_write_address(disk, REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, &disk->used);
	reg_write(disk, REG_QUEUE_READY, 1);
	return 0;
}

struct virtio_blk *virtio_blk_open(const char **error)
{
	struct virtio_mmio_device devices[PARAMS_MAX_VIRTIO_DEVICES];
	int count = params_virtio_devices(devices, PARAMS_MAX_VIRTIO_DEVICES);
	struct virtio_blk *disk = &the_disk;

	memset(disk, 0, sizeof(*disk));
	for (int i = 0; i < count && !disk->registers; i++)
		if (devices[i].size >= 0x200 && devices[i].base >= DEVICE_HOLE_START &&
		    devices[i].base + 0x200 <= DEVICE_HOLE_END && is_block_device(devices[i].base))
			disk->registers = (volatile uint8_t *)devices[i].base;
	if (!disk->registers) {
		*error = "no virtio-mmio block device on the command line";
		return 0;
	}
	if (reg_read(disk, REG_VERSION) != VIRTIO_MMIO_MODERN) {
		*error = "virtio-mmio device is not version 2";
		return 0;
	}
	if (negotiate(disk, error) || setup_queue(disk, error))
		return 0;
	disk->capacity_sectors = read_capacity(disk);
	reg_write(disk, REG_STATUS,
		  STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	return disk;
}

uint64_t virtio_blk_capacity_sectors(const struct virtio_blk *disk)
{
	return disk->capacity_sectors;
}

int virtio_blk_readonly(const struct virtio_blk *disk)
{
	return disk->readonly;
}

int virtio_blk_max_batch(const struct virtio_blk *disk)
{
	return disk->max_batch;
}

/* Request i of a batch uses descriptors 3i (header), 3i+1 (data, absent
 * for FLUSH) and 3i+2 (status). */
static void build_request(struct virtio_blk *disk, int slot_index, uint32_t type,
			  uint64_t sector, void *buffer, uint32_t length)
{
	struct request_slot *slot = &disk->slots[slot_index];
	uint16_t first = (uint16_t)(slot_index * DESCRIPTORS_PER_REQUEST);
	struct virtq_desc *header = &disk->descriptors[first];
	struct virtq_desc *data = &disk->descriptors[first + 1];
	struct virtq_desc *status = &disk->descriptors[first + 2];

	slot->header.type = type;
	slot->header.reserved = 0;
	slot->header.sector = sector;
	slot->status = 0xff;

	header->address = (uint64_t)&slot->header;
	header->length = sizeof(slot->header);
	header->flags = DESC_F_NEXT;
	if (type == REQUEST_FLUSH) {
		header->next = (uint16_t)(first + 2);
	} else {
		header->next = (uint16_t)(first + 1);
		data->address = (uint64_t)buffer;
		data->length = length;
		data->flags = DESC_F_NEXT | (type == REQUEST_IN ? DESC_F_WRITE : 0);
		data->next = (uint16_t)(first + 2);
	}
	status->address = (uint64_t)&slot->status;
	status->length = 1;
	status->flags = DESC_F_WRITE;
	status->next = 0;

	disk->avail.ring[disk->next_avail % disk->queue_size] = first;
	disk->next_avail++;
}

static int run_batch(struct virtio_blk *disk, int count, const char **error)
{
	struct stopwatch watch;
	uint16_t target = (uint16_t)(disk->next_used + count);

	compiler_barrier();
	*(volatile uint16_t *)&disk->avail.index = disk->next_avail;
	memory_barrier();
	reg_write(disk, REG_QUEUE_NOTIFY, 0);

	stopwatch_start(&watch);
	while (*(volatile uint16_t *)&disk->used.index != target) {
		cpu_relax();
		if (stopwatch_poll_ms(&watch) > REQUEST_TIMEOUT_MS) {
			disk->broken = 1;
			*error = "request timed out";
			return -1;
		}
	}
	memory_barrier();
	disk->next_used = target;
	for (int i = 0; i < count; i++) {
		if (disk->slots[i].status != REQUEST_STATUS_OK) {
			disk->broken = 1;
			*error = disk->slots[i].status == 2 ? "request unsupported by device"
							    : "device reported an I/O error";
			return -1;
		}
	}
	return 0;
}

int virtio_blk_submit(struct virtio_blk *disk, const struct virtio_blk_io *ios, int count,
		      const char **error)
{
	if (disk->broken) {
		*error = "disk unusable after an earlier error";
		return -1;
	}
	if (count < 1 || count > disk->max_batch) {
		*error = "batch size out of range";
		return -1;
	}
	for (int i = 0; i < count; i++) {
		const struct virtio_blk_io *io = &ios[i];
		uint64_t sectors = io->length / VIRTIO_BLK_SECTOR_SIZE;
		if (!io->length || io->length % VIRTIO_BLK_SECTOR_SIZE) {
			*error = "request length is not a whole number of sectors";
			return -1;
		}
		if (io->sector > disk->capacity_sectors ||
		    sectors > disk->capacity_sectors - io->sector) {
			*error = "request beyond the end of the disk";
			return -1;
		}
		if (io->op == VIRTIO_BLK_OP_WRITE && disk->readonly) {
			*error = "disk is read-only";
			return -1;
		}
		build_request(disk, i, io->op == VIRTIO_BLK_OP_WRITE ? REQUEST_OUT : REQUEST_IN,
			      io->sector, io->buffer, io->length);
	}
	return run_batch(disk, count, error);
}

int virtio_blk_flush(struct virtio_blk *disk, const char **error)
{
	if (disk->broken) {
		*error = "disk unusable after an earlier error";
		return -1;
	}
	build_request(disk, 0, REQUEST_FLUSH, 0, 0, 0);
	return run_batch(disk, 1, error);
}
