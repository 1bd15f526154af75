/* Kernel command line: `key=value` parameters and the Linux-style
 * `virtio_mmio.device=<size>@<base>:<irq>` device announcements. */
#ifndef GUEST_PARAMS_H
#define GUEST_PARAMS_H

#include <stdint.h>

#define PARAMS_MAX_CMDLINE 2048
#define PARAMS_MAX_TOKENS 64
#define PARAMS_MAX_VIRTIO_DEVICES 16

struct virtio_mmio_device {
	uint64_t base;
	uint64_t size;
	uint32_t irq;
};

/* Copies and splits the command line; NULL means empty. Longer command
 * lines are cut at PARAMS_MAX_CMDLINE - 1 bytes (reported on the console). */
void params_init(const char *cmdline);
/* The value of the last `key=value` token, or 0 if absent. */
const char *param_str(const char *key);
/* Decimal or 0x-hex value; absent gives `fallback`, malformed gives
 * `fallback` and a console warning. */
uint64_t param_u64(const char *key, uint64_t fallback);
/* Fills `devices` with up to `max` announced virtio-mmio devices in
 * command-line order, malformed tokens skipped with a warning; returns the
 * count. */
int params_virtio_devices(struct virtio_mmio_device *devices, int max);

#endif
