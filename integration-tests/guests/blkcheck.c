/*
 * blkcheck: writes sequence-numbered 4 KiB blocks to the first virtio-blk
 * disk, flushes, reads them back and verifies them (block_check.h), polling
 * for completions.
 */
#include "block_check.h"
#include "params.h"
#include "runtime.h"
#include "virtio_blk.h"

void guest_main(void)
{
	static const struct block_check check = { .name = "blkcheck" };
	const char *error = 0;
	struct virtio_blk *disk = virtio_blk_open(&error);

	block_check_run(&check, disk, error);
	const char *exit_mode = param_str("exit");
	if (exit_mode && text_equal(exit_mode, "reset"))
		guest_reset();
}
