/*
 * Sequence-numbered 4 KiB blocks written to the first virtio-blk disk,
 * flushed, read back and verified: the loop of blkcheck and pcimsix, whose
 * disks the host checks with integration_tests::guests::verify_blkcheck_disk.
 *
 *   blocks=N  4 KiB blocks per round (default 256; disk needs N x 4 KiB)
 *   rounds=N  passes over the blocks (default 1)
 *   batch=N   at most N blocks per batch (default: the driver's largest)
 *   verify=all  before each batch, read every block and check it holds what
 *             this guest last wrote there (zeros if never): FAIL otherwise
 *
 * Block b of round r (both from 0) carries seq = r * blocks + b + 1 and is
 * written at byte offset b * 4096. Its 512 little-endian 64-bit words are:
 *   word 0: BLOCK_MAGIC, word 1: seq, word 2: b, word 3: r,
 *   word k (4..511): (seq * 0x9e3779b97f4a7c15) ^ k.
 * Blocks go in batches of the driver's largest (write batch, flush, read
 * batch). Lines, each starting with the guest's name:
 *   <name>: disk sectors=<n> blocks=<n> rounds=<n> transport=<virtio-pci|virtio-mmio>
 *   <name>: completed seq=<n>   after the batch holding seq n was written,
 *                               flushed and read back intact
 *   <name>: done ok
 *   <name>: FAIL <why>[ at seq=<n>]
 */
#ifndef GUEST_BLOCK_CHECK_H
#define GUEST_BLOCK_CHECK_H

#include <stdint.h>

#include "virtio_blk.h"

struct block_check {
	const char *name;
	/* Called before each batch with the number of batches before it; may
	 * be 0. */
	void (*before_batch)(uint64_t batch);
};

/* Runs the rounds on `disk` (0: prints `open_error` as the FAIL). Returns 0
 * after "done ok", -1 after a FAIL line. */
int block_check_run(const struct block_check *check, struct virtio_blk *disk,
		    const char *open_error);

#endif
