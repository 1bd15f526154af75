/*
 * Starting the other vCPUs the way firmware and Linux do on hardware, shared
 * by smpcheck and pcimsix (see smp.h).
 */
#include "smp.h"
#include "clock.h"
#include "console.h"
#include "lapic.h"
#include "runtime.h"

#define AP_START_TIMEOUT_MS 2000

#define TRAMPOLINE_BASE 0x10000ull
#define SIPI_VECTOR (TRAMPOLINE_BASE >> 12)

#define ICR_INIT_ASSERT 0x4500u /* INIT, level assert, edge */
#define ICR_STARTUP 0x4600u	/* STARTUP, level assert, edge */

#define AP_KERNEL_STACK 4096
#define AP_USER_STACK 16384

/*
 * The trampoline, copied to TRAMPOLINE_BASE before the SIPI. It runs at
 * CS = TRAMPOLINE_BASE >> 4, IP = 0. Addresses inside it are offsets from
 * smp_trampoline_start; boot_gdt and boot_pml4 are below 4 GiB.
 */
__asm__(
	"	.section .rodata.smp_trampoline, \"a\"\n"
	"	.globl smp_trampoline_start, smp_trampoline_end, smp_trampoline_stage\n"
	"	.code16\n"
	"smp_trampoline_start:\n"
	"	cli\n"
	"	movw %cs, %ax\n"
	"	movw %ax, %ds\n"
	"	movl $1, (smp_trampoline_stage - smp_trampoline_start)\n"
	"	lgdtl (1f - smp_trampoline_start)\n"
	"	movl %cr4, %eax\n"
	"	orl $0x20, %eax\n" /* PAE */
	"	movl %eax, %cr4\n"
	"	movl $boot_pml4, %eax\n"
	"	movl %eax, %cr3\n"
	"	movl $0xc0000080, %ecx\n" /* EFER */
	"	rdmsr\n"
	"	orl $0x100, %eax\n" /* LME */
	"	wrmsr\n"
	"	movl %cr0, %eax\n"
	"	orl $0x80000001, %eax\n" /* PG | PE */
	"	movl %eax, %cr0\n"
	"	ljmpl $0x08, $(0x10000 + 2f - smp_trampoline_start)\n"
	"	.code64\n"
	"2:	movl $2, (0x10000 + smp_trampoline_stage - smp_trampoline_start)\n"
	"	movabsq $smp_ap_long_mode, %rax\n"
	"	jmp *%rax\n"
	"	.balign 8\n"
	"smp_trampoline_stage:\n"
	"	.long 0\n"
	"1:	.word 0x37\n" /* boot_gdt: 7 descriptors */
	"	.long boot_gdt\n"
	"smp_trampoline_end:\n"
	/* Ring 0, long mode, on the shared GDT: own stacks, shared IDT and TSS
	 * (its busy bit cleared first; the BSP loaded it), then ring 3. */
	"	.text\n"
	"smp_ap_long_mode:\n"
	"	movl $0x10, %eax\n"
	"	movl %eax, %ds\n"
	"	movl %eax, %es\n"
	"	movl %eax, %ss\n"
	"	movl %eax, %fs\n"
	"	movl %eax, %gs\n"
	"	movq ap_kernel_stack_top(%rip), %rsp\n"
	"	lidt idt_descriptor(%rip)\n"
	"	andb $0xfd, boot_gdt + 0x2d(%rip)\n"
	"	movw $0x28, %ax\n"
	"	ltr %ax\n"
	"	movl $0x1b, %eax\n"
	"	movl %eax, %ds\n"
	"	movl %eax, %es\n"
	"	movl %eax, %fs\n"
	"	movl %eax, %gs\n"
	"	pushq $0x1b\n"
	"	pushq ap_user_stack_top(%rip)\n"
	"	pushq smp_ap_rflags(%rip)\n"
	"	pushq $0x23\n"
	"	leaq smp_ap_main(%rip), %rax\n"
	"	pushq %rax\n"
	"	iretq\n");

extern const uint8_t smp_trampoline_start[], smp_trampoline_end[];
extern const uint8_t smp_trampoline_stage[];

/* What the next AP takes: written by the BSP before its INIT, read by the
 * AP's ring-0 code (stacks) and ring-3 entry (slot). */
uint64_t ap_kernel_stack_top;
uint64_t ap_user_stack_top;
static volatile uint32_t ap_next_slot;

static uint8_t ap_kernel_stacks[SMP_MAX_CPUS][AP_KERNEL_STACK]
	__attribute__((section(".noinit.smp"), aligned(16)));
static uint8_t ap_user_stacks[SMP_MAX_CPUS][AP_USER_STACK]
	__attribute__((section(".noinit.smp"), aligned(16)));

volatile uint32_t smp_started[SMP_MAX_CPUS];
uint32_t smp_apic_ids[SMP_MAX_CPUS];
uint32_t smp_cpu_count;
uint64_t smp_ap_rflags = 0x2;
static const char *guest_name;
static void (*ap_entry)(uint32_t slot);

/* Adds up forward TSC steps only: the TSC jumps, maybe backwards, across a
 * save/restore, and a wait must still end. */
static void delay_us(uint64_t us)
{
	uint64_t ticks = us * clock_ticks_per_ms() / 1000;
	uint64_t waited = 0, last = tsc_read();

	while (waited < ticks) {
		uint64_t now = tsc_read();
		waited += tsc_elapsed(last, now);
		last = now;
		cpu_relax();
	}
}

__attribute__((noreturn)) static void fail(const char *why)
{
	console_write(guest_name);
	console_write(": FAIL ");
	console_write(why);
	console_write("\n");
	guest_stop();
}

/* Ring 3 on an AP. */
__attribute__((noreturn, used)) void smp_ap_main(void)
{
	uint32_t slot = ap_next_slot;

	smp_started[slot] = 1;
	ap_entry(slot);
	guest_stop();
}

static uint32_t read32(uint64_t address)
{
	return *(const volatile uint32_t *)address;
}

static uint64_t read64(uint64_t address)
{
	return *(const volatile uint64_t *)address;
}

static uint8_t checksum(uint64_t address, uint64_t length)
{
	uint8_t sum = 0;

	for (uint64_t i = 0; i < length; i++)
		sum += *(const volatile uint8_t *)(address + i);
	return sum;
}

static uint64_t find_rsdp(void)
{
	for (uint64_t at = 0xe0000; at < 0x100000; at += 16)
		if (memcmp((const void *)at, "RSD PTR ", 8) == 0 &&
		    checksum(at, 20) == 0)
			return at;
	return 0;
}

/* The MADT through the XSDT (revision 2) or RSDT; 0 if absent. Tables must
 * be in the identity-mapped low 4 GiB. */
static uint64_t find_madt(void)
{
	uint64_t rsdp = find_rsdp();
	if (!rsdp)
		fail("no RSDP in 0xe0000-0xfffff");
	int extended = *(const volatile uint8_t *)(rsdp + 15) >= 2;
	uint64_t root = extended ? read64(rsdp + 24) : read32(rsdp + 16);
	uint64_t entry_size = extended ? 8 : 4;
	if (root == 0 || root >= (1ull << 32))
		fail("root table not below 4 GiB");
	uint32_t length = read32(root + 4);
	if (length < 36 || checksum(root, length) != 0)
		fail("bad root table");
	for (uint64_t at = root + 36; at + entry_size <= root + length; at += entry_size) {
		uint64_t table = extended ? read64(at) : read32(at);
		if (table && table < (1ull << 32) && memcmp((const void *)table, "APIC", 4) == 0)
			return table;
	}
	return 0;
}

/* Enabled local APICs of the MADT (xAPIC and x2APIC entries), BSP first. */
void smp_find_cpus(const char *name, void (*ap_main)(uint32_t slot))
{
	uint32_t bsp_apic = lapic_id();

	guest_name = name;
	ap_entry = ap_main;
	uint64_t madt = find_madt();
	if (!madt)
		fail("no MADT");
	uint32_t length = read32(madt + 4);
	if (checksum(madt, length) != 0)
		fail("MADT checksum");
	smp_apic_ids[0] = bsp_apic;
	smp_cpu_count = 1;
	int bsp_listed = 0;
	for (uint64_t at = madt + 44; at + 2 <= madt + length;) {
		uint8_t type = *(const volatile uint8_t *)at;
		uint8_t size = *(const volatile uint8_t *)(at + 1);
		if (size < 2)
			fail("MADT entry of length < 2");
		uint32_t id = ~0u, flags = 0;
		if (type == 0 && size >= 8) {
			id = *(const volatile uint8_t *)(at + 3);
			flags = read32(at + 4);
		} else if (type == 9 && size >= 16) {
			id = read32(at + 4);
			flags = read32(at + 8);
		}
		if (id != ~0u && (flags & 1)) {
			if (id == bsp_apic)
				bsp_listed = 1;
			else if (smp_cpu_count < SMP_MAX_CPUS)
				smp_apic_ids[smp_cpu_count++] = id;
		}
		at += size;
	}
	if (!bsp_listed)
		fail("the MADT does not list the boot CPU");
}

static int start_ap(uint32_t slot, uint64_t init_sipi_ms)
{
	volatile uint32_t *stage =
		(volatile uint32_t *)(TRAMPOLINE_BASE + (smp_trampoline_stage - smp_trampoline_start));

	*stage = 0;
	ap_next_slot = slot;
	uint64_t init_tsc = tsc_read();
	ap_kernel_stack_top = (uint64_t)&ap_kernel_stacks[slot][AP_KERNEL_STACK];
	ap_user_stack_top = (uint64_t)&ap_user_stacks[slot][AP_USER_STACK] - 8;
	memory_barrier();

	lapic_write(LAPIC_ICR_HIGH, smp_apic_ids[slot] << 24);
	lapic_write(LAPIC_ICR_LOW, ICR_INIT_ASSERT);
	console_write(guest_name);
	console_write(": INIT sent to cpu ");
	console_write_dec(slot);
	console_write("\n");
	delay_us(init_sipi_ms * 1000);
	for (int sipi = 0; sipi < 2 && !smp_started[slot]; sipi++) {
		lapic_write(LAPIC_ICR_HIGH, smp_apic_ids[slot] << 24);
		lapic_write(LAPIC_ICR_LOW, ICR_STARTUP | SIPI_VECTOR);
		delay_us(200);
	}
	struct stopwatch watch;
	stopwatch_start(&watch);
	while (!smp_started[slot]) {
		if (stopwatch_poll_ms(&watch) > AP_START_TIMEOUT_MS) {
			console_write(guest_name);
			console_write(": FAIL cpu ");
			console_write_dec(slot);
			console_write(" apic=");
			console_write_dec(smp_apic_ids[slot]);
			console_write(" not started (stage ");
			console_write_dec(*stage);
			console_write(")\n");
			return 0;
		}
		cpu_relax();
	}
	console_write(guest_name);
	console_write(": cpu ");
	console_write_dec(slot);
	console_write(" apic=");
	console_write_dec(smp_apic_ids[slot]);
	console_write(" started after ");
	console_write_dec(tsc_elapsed(init_tsc, tsc_read()) * 1000 / clock_ticks_per_ms());
	console_write(" us\n");
	return 1;
}


int smp_start_aps(uint64_t init_sipi_ms)
{
	uint64_t trampoline_size = (uint64_t)(smp_trampoline_end - smp_trampoline_start);

	if (!ram_contains(TRAMPOLINE_BASE, 4096))
		fail("the trampoline page is not RAM");
	memcpy((void *)TRAMPOLINE_BASE, smp_trampoline_start, trampoline_size);
	smp_started[0] = 1;
	for (uint32_t slot = 1; slot < smp_cpu_count; slot++)
		if (!start_ap(slot, init_sipi_ms))
			return 0;
	return 1;
}
