/* virtio 1.x device status bits, the VERSION_1 feature bit and the split
 * virtqueue layout (sections 2.1, 6 and 2.7), shared by the guests' polling
 * drivers. */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

#include <stdint.h>

#define STATUS_ACKNOWLEDGE 1u
#define STATUS_DRIVER 2u
#define STATUS_DRIVER_OK 4u
#define STATUS_FEATURES_OK 8u
#define STATUS_FAILED 128u

#define FEATURE_HIGH_VERSION_1 (1u << 0) /* bit 32 */

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1

struct virtq_desc {
	uint64_t address;
	uint32_t length;
	uint16_t flags;
	uint16_t next;
};

struct virtq_used_element {
	uint32_t id;
	uint32_t length;
};

/* The driver area (available ring) of a queue of `size` entries, as a type. */
#define VIRTQ_AVAIL(size) \
	struct { \
		uint16_t flags; \
		uint16_t index; \
		uint16_t ring[size]; \
		uint16_t used_event; \
	}

/* The device area (used ring) of a queue of `size` entries, as a type. */
#define VIRTQ_USED(size) \
	struct { \
		uint16_t flags; \
		uint16_t index; \
		struct virtq_used_element ring[size]; \
		uint16_t avail_event; \
	}

#endif
