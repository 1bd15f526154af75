/* Ring-3 runtime shared by the guests: entry from the boot stub, the RAM
 * map, stopping, and the few libc functions the compiler may call. */
#ifndef GUEST_RUNTIME_H
#define GUEST_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#define MIB (1ull << 20)

/* Each guest defines this; it runs in ring 3 after the runtime is set up.
 * Returning stops the guest (guest_stop). */
void guest_main(void);

/* Spins on `pause` forever: hlt faults in ring 3. */
__attribute__((noreturn)) void guest_stop(void);
/* Asks the VMM to end the VM (i8042 reset, 0xfe to port 0x64). */
__attribute__((noreturn)) void guest_reset(void);

/* 1 if [address, address + length) is RAM in the PVH memory map. */
int ram_contains(uint64_t address, uint64_t length);
/* First 2 MiB-aligned guest-physical address after the loaded image. */
uint64_t ram_free_start(void);

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

/* Full barrier: orders the driver's ring writes against its later reads of
 * device-written memory. */
static inline void memory_barrier(void)
{
	__asm__ volatile("lock addl $0, (%%rsp)" ::: "memory", "cc");
}

static inline void compiler_barrier(void)
{
	__asm__ volatile("" ::: "memory");
}

/* 1 if the two NUL-terminated strings are equal. */
int text_equal(const char *a, const char *b);

void *memset(void *destination, int value, size_t length);
void *memcpy(void *destination, const void *source, size_t length);
int memcmp(const void *a, const void *b, size_t length);

#endif
