#include "virtio_blk.h"
#include "clock.h"
#include "params.h"
#include "port_io.h"
#include "runtime.h"
#include "virtio.h"
#include "virtio_pci.h"

#define PCI_ID_VIRTIO_BLK VIRTIO_PCI_ID(2)

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

#define FEATURE_BLK_RO (1u << 5)
#define FEATURE_BLK_FLUSH (1u << 9)

#define REQUEST_IN 0
#define REQUEST_OUT 1
#define REQUEST_FLUSH 4
#define REQUEST_STATUS_OK 0

/* Only the device hole is mapped uncached and guaranteed present. */
#define DEVICE_HOLE_START 0xc0000000ull
#define DEVICE_HOLE_END 0x100000000ull

#define QUEUE_SIZE_WANTED 64
#define QUEUE_SIZE_LIMIT 256
#define DESCRIPTORS_PER_REQUEST 3
/* Generous: a host fdatasync of a large batch on a busy disk. Only time the
 * guest actually spent polling counts (see struct stopwatch). */
#define REQUEST_TIMEOUT_MS 60000

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
	/* virtio-mmio: the register window. */
	volatile uint8_t *registers;
	/* virtio-pci: the structures in BAR 0 and queue 0's notify address. */
	volatile uint8_t *common;
	volatile uint8_t *device_config;
	volatile uint16_t *notify;
	uint32_t notify_multiplier;
	uint64_t capacity_sectors;
	int readonly;
	uint16_t queue_size;
	uint16_t next_avail;
	uint16_t next_used;
	int max_batch;
	/* Set after a failed or timed-out batch: the device may still own the
	 * descriptors, so the queue is not reused. */
	int broken;
	/* Set by virtio_blk_open_interrupts. */
	const struct virtio_blk_interrupts *interrupts;
	int wait_for_interrupts;
	uint64_t missed_interrupts;
	struct virtq_desc descriptors[QUEUE_SIZE_LIMIT] __attribute__((aligned(16)));
	VIRTQ_AVAIL(QUEUE_SIZE_LIMIT) avail __attribute__((aligned(16)));
	VIRTQ_USED(QUEUE_SIZE_LIMIT) used __attribute__((aligned(16)));
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

/* The operations both transports have, each an exit to the VMM. */
static uint32_t get_status(const struct virtio_blk *disk)
{
	if (disk->common)
		return *(volatile uint8_t *)(disk->common + COMMON_DEVICE_STATUS);
	return reg_read(disk, REG_STATUS);
}

static void set_status(struct virtio_blk *disk, uint32_t status)
{
	if (disk->common)
		*(volatile uint8_t *)(disk->common + COMMON_DEVICE_STATUS) = (uint8_t)status;
	else
		reg_write(disk, REG_STATUS, status);
}

static void common_write32(struct virtio_blk *disk, unsigned offset, uint32_t value)
{
	*(volatile uint32_t *)(disk->common + offset) = value;
}

static uint32_t device_features(struct virtio_blk *disk, uint32_t select)
{
	if (disk->common) {
		common_write32(disk, COMMON_DEVICE_FEATURE_SELECT, select);
		return *(volatile uint32_t *)(disk->common + COMMON_DEVICE_FEATURE);
	}
	reg_write(disk, REG_DEVICE_FEATURES_SEL, select);
	return reg_read(disk, REG_DEVICE_FEATURES);
}

static void driver_features(struct virtio_blk *disk, uint32_t select, uint32_t value)
{
	if (disk->common) {
		common_write32(disk, COMMON_DRIVER_FEATURE_SELECT, select);
		common_write32(disk, COMMON_DRIVER_FEATURE, value);
		return;
	}
	reg_write(disk, REG_DRIVER_FEATURES_SEL, select);
	reg_write(disk, REG_DRIVER_FEATURES, value);
}

static uint32_t config_generation(const struct virtio_blk *disk)
{
	if (disk->common)
		return *(volatile uint8_t *)(disk->common + COMMON_CONFIG_GENERATION);
	return reg_read(disk, REG_CONFIG_GENERATION);
}

static uint32_t config_read32(const struct virtio_blk *disk, unsigned offset)
{
	if (disk->device_config)
		return *(volatile uint32_t *)(disk->device_config + offset);
	return reg_read(disk, REG_CONFIG + offset);
}

static void notify_queue0(struct virtio_blk *disk)
{
	if (disk->notify)
		*disk->notify = 0;
	else
		reg_write(disk, REG_QUEUE_NOTIFY, 0);
}

static int fail(struct virtio_blk *disk, const char *why, const char **error)
{
	if (disk->registers || disk->common)
		set_status(disk, STATUS_FAILED);
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
		generation = config_generation(disk);
		low = config_read32(disk, 0);
		high = config_read32(disk, 4);
	} while (generation != config_generation(disk));
	return ((uint64_t)high << 32) | low;
}

static int negotiate(struct virtio_blk *disk, const char **error)
{
	set_status(disk, 0);
	if (get_status(disk) != 0)
		return fail(disk, "device did not reset", error);
	set_status(disk, STATUS_ACKNOWLEDGE);
	set_status(disk, STATUS_ACKNOWLEDGE | STATUS_DRIVER);

	uint32_t features_low = device_features(disk, 0);
	uint32_t features_high = device_features(disk, 1);
	if (!(features_high & FEATURE_HIGH_VERSION_1))
		return fail(disk, "device does not offer VIRTIO_F_VERSION_1", error);
	if (!(features_low & FEATURE_BLK_FLUSH))
		return fail(disk, "device does not offer VIRTIO_BLK_F_FLUSH", error);
	disk->readonly = (features_low & FEATURE_BLK_RO) != 0;

	driver_features(disk, 0, features_low & (FEATURE_BLK_FLUSH | FEATURE_BLK_RO));
	driver_features(disk, 1, FEATURE_HIGH_VERSION_1);

	uint32_t status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
	set_status(disk, status);
	if (!(get_status(disk) & STATUS_FEATURES_OK))
		return fail(disk, "device rejected the feature set", error);
	return 0;
}

static void common_write_address(struct virtio_blk *disk, unsigned offset, const void *address)
{
	common_write32(disk, offset, (uint32_t)(uint64_t)address);
	common_write32(disk, offset + 4, (uint32_t)((uint64_t)address >> 32));
}

static int setup_queue(struct virtio_blk *disk, const char **error)
{
	volatile uint16_t *pci_queue = (volatile uint16_t *)disk->common;
	uint32_t max;

	if (disk->common) {
		pci_queue[COMMON_QUEUE_SELECT / 2] = 0;
		if (pci_queue[COMMON_QUEUE_ENABLE / 2])
			return fail(disk, "queue 0 already in use", error);
		/* queue_size reads the maximum until the driver writes it. */
		max = pci_queue[COMMON_QUEUE_SIZE / 2];
	} else {
		reg_write(disk, REG_QUEUE_SEL, 0);
		if (reg_read(disk, REG_QUEUE_READY))
			return fail(disk, "queue 0 already in use", error);
		max = reg_read(disk, REG_QUEUE_NUM_MAX);
	}
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

	/* A polling driver asks the device not to interrupt. */
	disk->avail.flags = disk->interrupts ? 0 : AVAIL_F_NO_INTERRUPT;
	if (disk->common) {
		pci_queue[COMMON_QUEUE_SIZE / 2] = (uint16_t)size;
		if (disk->interrupts) {
			uint16_t vector = disk->interrupts->queue_vector;
			pci_queue[COMMON_QUEUE_MSIX_VECTOR / 2] = vector;
			if (pci_queue[COMMON_QUEUE_MSIX_VECTOR / 2] != vector)
				return fail(disk, "device refused the queue's MSI-X vector", error);
		}
		common_write_address(disk, COMMON_QUEUE_DESC, disk->descriptors);
		common_write_address(disk, COMMON_QUEUE_DRIVER, &disk->avail);
		common_write_address(disk, COMMON_QUEUE_DEVICE, &disk->used);
		pci_queue[COMMON_QUEUE_ENABLE / 2] = 1;
		disk->notify = (volatile uint16_t *)((volatile uint8_t *)disk->notify +
						     pci_queue[COMMON_QUEUE_NOTIFY_OFF / 2] *
							     disk->notify_multiplier);
		return 0;
	}
	reg_write(disk, REG_QUEUE_NUM, size);
	reg_write_address(disk, REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, disk->descriptors);
	reg_write_address(disk, REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, &disk->avail);
	reg_write_address(disk, REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, &disk->used);
	reg_write(disk, REG_QUEUE_READY, 1);
	return 0;
}

/* The first virtio-blk function on bus 0 (virtio_pci.c). */
static int pci_find(struct virtio_blk *disk, const char **error)
{
	struct virtio_pci_function function;

	int found = virtio_pci_find(PCI_ID_VIRTIO_BLK, &function, error);

	if (found == 1)
		*error = "no virtio-blk device on virtio-mmio or PCI";
	if (found)
		return -1;
	if (disk->interrupts && disk->interrupts->program_msix(&function, error))
		return -1;
	disk->common = function.common;
	disk->notify = (volatile uint16_t *)function.notify;
	disk->notify_multiplier = function.notify_multiplier;
	disk->device_config = function.device_config;
	return 0;
}

static struct virtio_blk *open_disk(const struct virtio_blk_interrupts *interrupts,
				     const char **error)
{
	struct virtio_mmio_device devices[PARAMS_MAX_VIRTIO_DEVICES];
	int count = interrupts ? 0 : params_virtio_devices(devices, PARAMS_MAX_VIRTIO_DEVICES);
	struct virtio_blk *disk = &the_disk;

	memset(disk, 0, sizeof(*disk));
	disk->interrupts = interrupts;
	disk->wait_for_interrupts = interrupts != 0;
	for (int i = 0; i < count && !disk->registers; i++)
		if (devices[i].size >= 0x200 && devices[i].base >= DEVICE_HOLE_START &&
		    devices[i].base + 0x200 <= DEVICE_HOLE_END && is_block_device(devices[i].base))
			disk->registers = (volatile uint8_t *)devices[i].base;
	if (disk->registers) {
		if (reg_read(disk, REG_VERSION) != VIRTIO_MMIO_MODERN) {
			*error = "virtio-mmio device is not version 2";
			return 0;
		}
	} else if (pci_find(disk, error)) {
		return 0;
	}
	if (negotiate(disk, error))
		return 0;
	if (interrupts) {
		volatile uint16_t *config_vector = (volatile uint16_t *)(disk->common + COMMON_MSIX_CONFIG);
		*config_vector = interrupts->config_vector;
		if (*config_vector != interrupts->config_vector) {
			fail(disk, "device refused the configuration MSI-X vector", error);
			return 0;
		}
	}
	if (setup_queue(disk, error))
		return 0;
	disk->capacity_sectors = read_capacity(disk);
	set_status(disk, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	return disk;
}

struct virtio_blk *virtio_blk_open(const char **error)
{
	return open_disk(0, error);
}

struct virtio_blk *virtio_blk_open_interrupts(const struct virtio_blk_interrupts *interrupts,
					      const char **error)
{
	return open_disk(interrupts, error);
}

void virtio_blk_wait_for_interrupts(struct virtio_blk *disk, int on)
{
	disk->wait_for_interrupts = disk->interrupts && on;
}

uint64_t virtio_blk_missed_interrupts(const struct virtio_blk *disk)
{
	return disk->missed_interrupts;
}

const char *virtio_blk_transport(const struct virtio_blk *disk)
{
	return disk->common ? "virtio-pci" : "virtio-mmio";
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
	/* Interrupt mode: the count at the notification, whether it changed,
	 * and how long the ring has been complete without an interrupt. */
	uint64_t seen = 0;
	int interrupted = 0, waiting_since_complete = 0;
	struct stopwatch since_complete;

	compiler_barrier();
	*(volatile uint16_t *)&disk->avail.index = disk->next_avail;
	memory_barrier();
	if (disk->wait_for_interrupts)
		seen = disk->interrupts->count();
	notify_queue0(disk);

	stopwatch_start(&watch);
	for (;;) {
		int complete = *(volatile uint16_t *)&disk->used.index == target;
		if (!disk->wait_for_interrupts) {
			if (complete)
				break;
		} else if (disk->interrupts->count() != seen) {
			/* The used ring is read after the interrupt: what the
			 * device published before signalling is there. */
			seen = disk->interrupts->count();
			interrupted = 1;
			if (*(volatile uint16_t *)&disk->used.index == target)
				break;
		} else if (complete && interrupted) {
			break;
		} else if (complete && !waiting_since_complete) {
			stopwatch_start(&since_complete);
			waiting_since_complete = 1;
		} else if (complete &&
			   stopwatch_poll_ms(&since_complete) > VIRTIO_BLK_INTERRUPT_TIMEOUT_MS) {
			disk->missed_interrupts++;
			break;
		}
		if (disk->interrupts && disk->interrupts->idle)
			disk->interrupts->idle();
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
