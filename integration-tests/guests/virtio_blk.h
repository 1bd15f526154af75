/*
 * Polling virtio-blk driver over virtio-mmio version 2 or virtio-pci (virtio
 * 1.x, split virtqueue), run entirely in ring 3 with interrupts off:
 * completions are found by watching the used ring (no MSI-X vector is set). Guest-physical equals guest-virtual
 * (identity map), so buffers are handed to the device by their address.
 */
#ifndef GUEST_VIRTIO_BLK_H
#define GUEST_VIRTIO_BLK_H

#include <stdint.h>

#define VIRTIO_BLK_SECTOR_SIZE 512
/* Requests per batch; each takes three descriptors. */
#define VIRTIO_BLK_MAX_BATCH 16

enum virtio_blk_op {
	VIRTIO_BLK_OP_READ = 0,
	VIRTIO_BLK_OP_WRITE = 1,
};

struct virtio_blk_io {
	enum virtio_blk_op op;
	uint64_t sector;
	void *buffer;
	uint32_t length; /* multiple of 512 */
};

struct virtio_blk;
struct virtio_pci_function;

/* Interrupt-driven completions on a virtio-pci disk, as a Linux driver has
 * them: the guest's ring-0 handler counts the queue vector's interrupts,
 * ring 3 looks at the used ring when the count changed. */
struct virtio_blk_interrupts {
	/* Called once the function is found, before the driver sets it up:
	 * programs the MSI-X table and enables MSI-X. Returns 0 or sets
	 * *error. */
	int (*program_msix)(const struct virtio_pci_function *function, const char **error);
	/* MSI-X table entries for configuration changes and for queue 0. */
	uint16_t config_vector;
	uint16_t queue_vector;
	/* Interrupts of the queue vector taken so far. */
	uint64_t (*count)(void);
	/* Called on every turn of a wait (the boot vCPU's counter). */
	void (*idle)(void);
};

/* Probes the virtio-mmio devices announced on the command line for the first
 * block device, else PCI bus 0 (0xcf8/0xcfc), and brings it up (VERSION_1 +
 * FLUSH negotiated). Returns 0 or sets *error. */
struct virtio_blk *virtio_blk_open(const char **error);
/* The same on virtio-pci only, with its MSI-X vectors set and completions
 * taken on interrupts (virtio_blk_wait_for_interrupts(disk, 1)). */
struct virtio_blk *virtio_blk_open_interrupts(const struct virtio_blk_interrupts *interrupts,
					      const char **error);
/* With interrupts on, a batch ends when an interrupt came after its
 * notification and the used ring holds all of it; off, by polling (the
 * device still interrupts). Only for a disk opened with interrupts. */
void virtio_blk_wait_for_interrupts(struct virtio_blk *disk, int on);
/* Batches found complete on the used ring without any interrupt for
 * VIRTIO_BLK_INTERRUPT_TIMEOUT_MS. */
uint64_t virtio_blk_missed_interrupts(const struct virtio_blk *disk);
#define VIRTIO_BLK_INTERRUPT_TIMEOUT_MS 2000
/* "virtio-pci" or "virtio-mmio". */
const char *virtio_blk_transport(const struct virtio_blk *disk);
uint64_t virtio_blk_capacity_sectors(const struct virtio_blk *disk);
int virtio_blk_readonly(const struct virtio_blk *disk);
/* Largest batch virtio_blk_submit accepts (queue size permitting). */
int virtio_blk_max_batch(const struct virtio_blk *disk);

/* Runs `count` requests concurrently (one notification) and waits for all.
 * Returns 0, or -1 with *error set; after an I/O error or a timeout every
 * later call fails too (the device may still own the descriptors). */
int virtio_blk_submit(struct virtio_blk *disk, const struct virtio_blk_io *ios,
		      int count, const char **error);
/* VIRTIO_BLK_T_FLUSH: everything completed before is durable on return. */
int virtio_blk_flush(struct virtio_blk *disk, const char **error);

#endif
