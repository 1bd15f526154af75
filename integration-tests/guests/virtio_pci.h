/* virtio-pci discovery on PCI bus 0 through the legacy configuration ports
 * 0xcf8/0xcfc (virtio 1.x, section 4.1), shared by the guests' drivers. */
#ifndef GUEST_VIRTIO_PCI_H
#define GUEST_VIRTIO_PCI_H

#include <stdint.h>

/* Vendor 0x1af4, device 0x1040 + virtio device type, as one config dword. */
#define VIRTIO_PCI_ID(type) ((0x1040u + (type)) << 16 | 0x1af4u)

/* struct virtio_pci_common_cfg, with the width each field is accessed at. */
#define COMMON_DEVICE_FEATURE_SELECT 0x00 /* 32 */
#define COMMON_DEVICE_FEATURE 0x04	 /* 32 */
#define COMMON_DRIVER_FEATURE_SELECT 0x08 /* 32 */
#define COMMON_DRIVER_FEATURE 0x0c	 /* 32 */
#define COMMON_DEVICE_STATUS 0x14	 /* 8 */
#define COMMON_CONFIG_GENERATION 0x15	 /* 8 */
#define COMMON_QUEUE_SELECT 0x16	 /* 16 */
#define COMMON_QUEUE_SIZE 0x18		 /* 16 */
#define COMMON_QUEUE_ENABLE 0x1c	 /* 16 */
#define COMMON_QUEUE_NOTIFY_OFF 0x1e	 /* 16 */
#define COMMON_QUEUE_DESC 0x20		 /* 2 x 32 */
#define COMMON_QUEUE_DRIVER 0x28	 /* 2 x 32 */
#define COMMON_QUEUE_DEVICE 0x30	 /* 2 x 32 */

/* A virtio function's structures in its BAR 0. */
struct virtio_pci_function {
	volatile uint8_t *common;
	volatile uint8_t *device_config;
	/* Base of the notify structure; a queue's address is
	 * notify + queue_notify_off * notify_multiplier. */
	volatile uint8_t *notify;
	uint32_t notify_multiplier;
	/* Device number on bus 0. */
	unsigned device;
	/* The MSI-X capability's offset in configuration space (0: none),
	 * its table (16 bytes per entry) and pending bit array when in BAR 0,
	 * and its table size. */
	unsigned msix_capability;
	volatile uint32_t *msix_table;
	volatile uint64_t *msix_pba;
	unsigned msix_entries;
};

/* struct virtio_pci_common_cfg's MSI-X vector fields (16 bits). */
#define COMMON_MSIX_CONFIG 0x10
#define COMMON_QUEUE_MSIX_VECTOR 0x1a
#define VIRTIO_MSI_NO_VECTOR 0xffff

/* Finds the first function with config dword 0 `id` (VIRTIO_PCI_ID) on bus
 * 0, moves its BAR 0 into the mapped 32-bit window (memory decoding off while
 * it does; the VMM moves the region and its notify ioeventfds) and finds its
 * common, notify and device structures and its MSI-X table through the
 * capability list. Returns
 * 0; 1 when there is no such function, -1 when it is unusable, with `*error`
 * set. */
int virtio_pci_find(uint32_t id, struct virtio_pci_function *function, const char **error);

/* Resets the function and negotiates VERSION_1 plus `features_low` (bits
 * 0..31, each of which the device must offer), up to FEATURES_OK. Returns 0,
 * or -1 with `*error` set. */
int virtio_pci_negotiate(struct virtio_pci_function *function, uint32_t features_low,
			 const char **error);

/* Sets up queue `queue` with `size` entries at the given descriptor table,
 * driver and device areas (guest-physical = virtual here) and enables it.
 * Returns the queue's notify address, or 0 with `*error` set when the device's
 * queue is smaller than `size`. */
volatile uint16_t *virtio_pci_queue(struct virtio_pci_function *function, uint16_t queue,
				    uint16_t size, const void *descriptors, const void *avail,
				    const void *used, const char **error);

/* Sets DRIVER_OK: the device may use the enabled queues. */
void virtio_pci_driver_ok(struct virtio_pci_function *function);

#endif
