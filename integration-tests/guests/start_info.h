/* PVH boot ABI structures (Xen public interface "hvm_start_info", version 1),
 * written from the ABI description: the VMM hands their guest-physical
 * address to the entry point in EBX. */
#ifndef GUEST_START_INFO_H
#define GUEST_START_INFO_H

#include <stdint.h>

#define HVM_START_MAGIC 0x336ec578u
#define HVM_MEMMAP_TYPE_RAM 1u

struct hvm_start_info {
	uint32_t magic;
	uint32_t version;
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;
	uint64_t rsdp_paddr;
	/* Fields below exist from version 1 on. */
	uint64_t memmap_paddr;
	uint32_t memmap_entries;
	uint32_t reserved;
};

struct hvm_memmap_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;
	uint32_t reserved;
};

#endif
