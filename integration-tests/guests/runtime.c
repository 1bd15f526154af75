/*
 * Ring-3 entry: the boot stub irets to user_entry() with the PVH
 * start_info pointer. Nothing here runs privileged.
 */
#include "runtime.h"
#include "clock.h"
#include "console.h"
#include "layout.h"
#include "params.h"
#include "port_io.h"
#include "start_info.h"

#define I8042_COMMAND 0x64
#define I8042_RESET 0xfe
#define MAX_RAM_RANGES 128
#define LARGE_PAGE (2 * MIB)
#define GIB (1ull << 30)
/* The boot stub maps the low 4 GiB always and RAM above only up to here;
 * RAM beyond it is left out of the map so nothing faults on it. */
#define MAPPED_LIMIT ((4ull + HIGH_GIB_MAX) * GIB)

extern char __bss_start[], __bss_end[], __image_end[];

struct ram_range {
	uint64_t start;
	uint64_t end;
};

static struct ram_range ram_ranges[MAX_RAM_RANGES];
static int ram_range_count;

void *memset(void *destination, int value, size_t length)
{
	unsigned char *bytes = destination;

	while (length--)
		*bytes++ = (unsigned char)value;
	return destination;
}

void *memcpy(void *destination, const void *source, size_t length)
{
	unsigned char *to = destination;
	const unsigned char *from = source;

	while (length--)
		*to++ = *from++;
	return destination;
}

int memcmp(const void *a, const void *b, size_t length)
{
	const unsigned char *left = a, *right = b;

	for (; length; length--, left++, right++)
		if (*left != *right)
			return *left < *right ? -1 : 1;
	return 0;
}

int text_equal(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return *a == *b;
}

void guest_stop(void)
{
	for (;;)
		cpu_relax();
}

void guest_reset(void)
{
	port_out8(I8042_COMMAND, I8042_RESET);
	guest_stop();
}

int ram_contains(uint64_t address, uint64_t length)
{
	uint64_t end = address + length;

	if (end < address)
		return 0;
	while (address < end) {
		int advanced = 0;
		for (int i = 0; i < ram_range_count; i++) {
			if (address >= ram_ranges[i].start && address < ram_ranges[i].end) {
				address = ram_ranges[i].end;
				advanced = 1;
			}
		}
		if (!advanced)
			return 0;
	}
	return 1;
}

uint64_t ram_free_start(void)
{
	return ((uint64_t)__image_end + LARGE_PAGE - 1) & ~(LARGE_PAGE - 1);
}

static void load_memory_map(const struct hvm_start_info *start_info)
{
	if (start_info->version < 1 || !start_info->memmap_paddr) {
		console_write("guest: start_info has no memory map\n");
		return;
	}
	uint64_t map_bytes = (uint64_t)start_info->memmap_entries * sizeof(struct hvm_memmap_entry);
	if (start_info->memmap_paddr + map_bytes > 4 * GIB) {
		/* Only the low 4 GiB are mapped for sure at this point. */
		console_write("guest: start_info memory map above 4 GiB ignored\n");
		return;
	}
	const struct hvm_memmap_entry *map =
		(const struct hvm_memmap_entry *)start_info->memmap_paddr;
	for (uint32_t i = 0; i < start_info->memmap_entries; i++) {
		uint64_t start = map[i].addr;
		uint64_t end = map[i].addr + map[i].size;
		if (map[i].type != HVM_MEMMAP_TYPE_RAM || end <= start || start >= MAPPED_LIMIT)
			continue;
		if (ram_range_count == MAX_RAM_RANGES) {
			console_write("guest: memory map too long, rest ignored\n");
			break;
		}
		ram_ranges[ram_range_count].start = start;
		ram_ranges[ram_range_count].end = end < MAPPED_LIMIT ? end : MAPPED_LIMIT;
		ram_range_count++;
	}
}

static uint64_t service_call(uint64_t service)
{
	uint64_t result = service;

	__asm__ volatile("int %1" : "+a"(result) : "i"(SERVICE_VECTOR) : "memory");
	return result;
}

__attribute__((noreturn)) void user_entry(const struct hvm_start_info *start_info);

void user_entry(const struct hvm_start_info *start_info)
{
	/* The loader does not zero .bss, and on reused non-volatile memory it
	 * holds the previous boot's bytes. */
	memset(__bss_start, 0, (size_t)(__bss_end - __bss_start));

	if (start_info->magic != HVM_START_MAGIC) {
		console_write("guest: FAIL bad PVH start_info magic\n");
		guest_stop();
	}
	load_memory_map(start_info);
	uint64_t cmdline = start_info->cmdline_paddr;
	if (cmdline && cmdline < 4 * GIB)
		params_init((const char *)cmdline);
	else
		params_init(0);
	clock_init();
	/* Opt-in: on the nested PVM host `int $n` from ring 3 raises #UD (its
	 * instruction emulator lacks protected-mode software interrupts), so
	 * the gate is exercised only when asked for. */
	if (param_u64("service_selftest", 0)) {
		uint64_t reply = service_call(SERVICE_PING);
		console_write(reply == SERVICE_PING_REPLY ? "guest: service gate ok\n"
							 : "guest: FAIL service gate\n");
	}
	guest_main();
	guest_stop();
}
