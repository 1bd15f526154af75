/*
 * Ring-0 part of the boot stub: the little that must run privileged.
 *
 * Ring 0 is emulated on this host (about 350 ns per instruction), so this
 * file does only what cannot be assembled as data in boot.S: the TSS
 * descriptor (its base is split across fields), the IDT gates (same), and
 * page directories for RAM above 4 GiB, whose size only start_info knows.
 */
#include <stdint.h>

#include "console.h"
#include "kernel.h"
#include "layout.h"
#include "start_info.h"

extern uint64_t boot_gdt[];
extern uint64_t boot_pdpt[512];
extern uint8_t boot_tss[], boot_tss_end[];
extern uint8_t isr_stubs[];
extern uint8_t service_entry[];

struct idt_gate {
	uint16_t offset_low;
	uint16_t selector;
	uint8_t ist;
	uint8_t type_attr;
	uint16_t offset_mid;
	uint32_t offset_high;
	uint32_t reserved;
};

struct descriptor_pointer {
	uint16_t limit;
	uint64_t base;
} __attribute__((packed));

extern struct descriptor_pointer idt_descriptor;

#define IDT_ENTRIES (SERVICE_VECTOR + 1)
#define GATE_INTERRUPT_DPL0 0x8e
#define GATE_INTERRUPT_DPL3 0xee
#define TSS_GDT_INDEX (SEL_TSS / 8)
#define TSS_TYPE_AVAILABLE_PRESENT 0x89ull

#define GIB (1ull << 30)
#define LARGE_PAGE (2ull << 20)
#define PTE_TABLE 0x007ull
#define PTE_LARGE_RAM 0x087ull
#define MAX_MEMMAP_ENTRIES 128

/* Loaded from the image (".data"), so gates not set below are zero, that
 * is not present, on every boot. */
static struct idt_gate idt[IDT_ENTRIES]
	__attribute__((section(".data.idt"), aligned(16)));

/* Filled entry by entry before use, so they need no zeroing. */
static uint64_t high_page_directories[HIGH_GIB_MAX][512]
	__attribute__((section(".noinit.pagedirs"), aligned(4096)));

static void set_gate(unsigned vector, const void *handler, uint8_t type_attr)
{
	uint64_t address = (uint64_t)handler;
	struct idt_gate *gate = &idt[vector];

	gate->offset_low = (uint16_t)address;
	gate->selector = SEL_KERNEL_CODE;
	gate->ist = 0;
	gate->type_attr = type_attr;
	gate->offset_mid = (uint16_t)(address >> 16);
	gate->offset_high = (uint32_t)(address >> 32);
	gate->reserved = 0;
}

static void install_tss_descriptor(void)
{
	uint64_t base = (uint64_t)boot_tss;
	uint64_t limit = (uint64_t)(boot_tss_end - boot_tss) - 1;

	boot_gdt[TSS_GDT_INDEX] = (limit & 0xffff) | ((base & 0xffffff) << 16) |
				  (TSS_TYPE_AVAILABLE_PRESENT << 40) |
				  (((limit >> 16) & 0xf) << 48) |
				  (((base >> 24) & 0xff) << 56);
	boot_gdt[TSS_GDT_INDEX + 1] = base >> 32;
}

static void map_gib(uint64_t gib)
{
	uint64_t *directory = high_page_directories[gib - 4];
	uint64_t address = gib * GIB;

	for (unsigned i = 0; i < 512; i++, address += LARGE_PAGE)
		directory[i] = address | PTE_LARGE_RAM;
	/* The slot was not present before, so no TLB entry needs flushing. */
	boot_pdpt[gib] = (uint64_t)directory | PTE_TABLE;
}

/* The low 4 GiB are mapped statically; map each further GiB that holds RAM
 * according to the PVH memory map. */
static void map_high_ram(const struct hvm_start_info *start_info)
{
	if (start_info->magic != HVM_START_MAGIC || start_info->version < 1)
		return; /* ring 3 reports the bad start_info */
	if (start_info->memmap_paddr >= 4 * GIB)
		return;

	const struct hvm_memmap_entry *map =
		(const struct hvm_memmap_entry *)start_info->memmap_paddr;
	uint32_t entries = start_info->memmap_entries;
	if (entries > MAX_MEMMAP_ENTRIES)
		entries = MAX_MEMMAP_ENTRIES;

	int truncated = 0;
	for (uint32_t i = 0; i < entries; i++) {
		if (map[i].type != HVM_MEMMAP_TYPE_RAM || map[i].size == 0)
			continue;
		uint64_t first = map[i].addr;
		uint64_t last = map[i].addr + map[i].size - 1;
		if (last < first || last < 4 * GIB)
			continue;
		if (first < 4 * GIB)
			first = 4 * GIB;
		for (uint64_t gib = first / GIB; gib <= last / GIB; gib++) {
			if (gib >= 4 + HIGH_GIB_MAX) {
				truncated = 1;
				break;
			}
			if (boot_pdpt[gib] == 0)
				map_gib(gib);
		}
	}
	if (truncated)
		console_write("boot: RAM above the mapped limit is ignored\n");
}

__attribute__((weak)) void guest_kernel_setup(void)
{
}

void kernel_set_interrupt_gate(unsigned vector, void (*handler)(void))
{
	if (vector >= EXCEPTION_VECTORS && vector < IDT_ENTRIES)
		set_gate(vector, (const void *)handler, GATE_INTERRUPT_DPL0);
}

void kernel_setup(const struct hvm_start_info *start_info)
{
	install_tss_descriptor();
	for (unsigned vector = 0; vector < EXCEPTION_VECTORS; vector++)
		set_gate(vector, isr_stubs + vector * ISR_STUB_SIZE,
			 GATE_INTERRUPT_DPL0);
	set_gate(SERVICE_VECTOR, service_entry, GATE_INTERRUPT_DPL3);
	idt_descriptor.limit = sizeof(idt) - 1;
	idt_descriptor.base = (uint64_t)idt;
	map_high_ram(start_info);
	guest_kernel_setup();
}

/* Any exception is a guest bug: say where, then stop this vCPU. */
void kernel_fault(uint64_t vector, uint64_t error_code, uint64_t rip,
		  uint64_t cs, uint64_t cr2)
{
	console_write("guest: FAULT vector=");
	console_write_dec(vector);
	console_write(" error=0x");
	console_write_hex(error_code);
	console_write(" rip=0x");
	console_write_hex(rip);
	console_write(" cs=0x");
	console_write_hex(cs);
	console_write(" cr2=0x");
	console_write_hex(cr2);
	console_write("\n");
	for (;;)
		__asm__ volatile("cli; hlt");
}

uint64_t kernel_service(uint64_t service)
{
	switch (service) {
	case SERVICE_PING:
		return SERVICE_PING_REPLY;
	case SERVICE_HALT:
		for (;;)
			__asm__ volatile("cli; hlt");
	default:
		return ~0ull;
	}
}
