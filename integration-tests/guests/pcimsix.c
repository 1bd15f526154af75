/*
 * pcimsix: what a Linux driver does with a virtio-pci disk, MSI-X
 * interrupts included, on every vCPU.
 *
 * 1. Enumerates bus 0 through the ports and ECAM and compares them, sizes
 *    BARs and walks capabilities (pci.c, the lines of pcicheck).
 * 2. Starts the other vCPUs with INIT/SIPI (smp.c); each enables its local
 *    APIC, masks LINT0 and counts in ring 3 with interrupts on.
 * 3. Finds the virtio-blk function, moves its BAR 0 into the 32-bit window
 *    and finds its structures (virtio_pci.c), programs its MSI-X table with
 *    the function masked (entry 0: configuration changes, vector 0x50;
 *    entry 1: queue 0, vector 0x51; both to the boot CPU), enables MSI-X,
 *    unmasks the function, and sets the vectors in the common structure.
 * 4. Checks masking as seen from the guest: with the queue's entry masked
 *    (per-vector mask bit, then the function mask) a completed request
 *    interrupts nobody and sets the entry's pending bit; unmasking delivers
 *    it and clears the bit.
 * 5. Runs the block_check.h rounds with completions taken on interrupts:
 *    the ring-0 handler counts per vCPU (by local APIC ID) and writes the
 *    EOI, ring 3 reads the used ring when the count changed. Before each
 *    batch the queue's entry is pointed at the next started vCPU in turn,
 *    masked while its address changes, as Linux moves an interrupt's
 *    affinity. So every vCPU takes interrupts.
 *
 *   blocks=, rounds=   as block_check.h
 *   exit=reset         end the VM through the i8042 when done (else spins)
 *
 *   pcimsix: boot
 *   pcimsix: ...                                  enumeration, as pcicheck
 *   pcimsix: cpu <slot> apic=<id> started after <us> us
 *   pcimsix: msix entries=<n> device=<d>
 *   pcimsix: masked <vector|function> interrupts=<n> pending=<0|1>
 *   pcimsix: unmasked <vector|function> interrupts=<n> pending=<0|1>
 *   pcimsix: disk sectors=...                     block_check.h lines
 *   pcimsix irq cpus=<n> cpu0=<count> irq0=<n> cpu1=<count> irq1=<n> ... batches=<n> missed=<n> from_kernel=<n>
 *                                                  after every batch
 *   pcimsix: done ok
 *   pcimsix: FAIL <why>
 *
 * cpu<i> is vCPU i's ring-3 counter (the boot CPU counts the turns of its
 * waits for interrupts, the others spin), irq<i> the queue interrupts it
 * took, missed the batches found complete without any interrupt for
 * VIRTIO_BLK_INTERRUPT_TIMEOUT_MS, from_kernel the interrupts that arrived
 * in ring 0 (the guest's ring 0 runs only the handlers, so 0).
 */
#include <stdint.h>

#include "block_check.h"
#include "clock.h"
#include "console.h"
#include "kernel.h"
#include "lapic.h"
#include "params.h"
#include "pci.h"
#include "runtime.h"
#include "smp.h"
#include "virtio_blk.h"
#include "virtio_pci.h"

#define VECTOR_CONFIG 0x50
#define VECTOR_QUEUE 0x51
#define ENTRY_CONFIG 0
#define ENTRY_QUEUE 1
#define LAPIC_LVT_LINT0 0x350
#define LVT_MASKED (1u << 16)
#define MSI_ADDRESS_BASE 0xfee00000u
#define MSIX_CONTROL_ENABLE (1u << 31) /* in the capability's first dword */
#define MSIX_CONTROL_FUNCTION_MASK (1u << 30)
#define MSIX_ENTRY_MASKED 1u
#define MASK_SETTLE_MS 50
#define UNMASK_TIMEOUT_MS 2000

/* What the ring-3 entries start with: IF set, IOPL 0 (overrides boot.S). */
const uint64_t user_entry_rflags = 0x202;

/* Written by the handlers; in .data, not .bss, which ring 3 zeroes after
 * interrupts are on. Indexed by APIC ID. */
static volatile uint64_t queue_interrupts[SMP_MAX_CPUS] __attribute__((section(".data")));
static volatile uint64_t config_interrupts __attribute__((section(".data")));
static volatile uint64_t from_kernel __attribute__((section(".data")));
static volatile uint64_t counts[SMP_MAX_CPUS];

static struct virtio_pci_function function;
static struct virtio_blk *disk;
static uint64_t batches;

static void count_origin(const struct interrupt_frame *frame)
{
	if ((frame->cs & 3) != 3)
		from_kernel++;
}

__attribute__((interrupt)) static void on_queue(struct interrupt_frame *frame)
{
	uint32_t id = lapic_id();

	if (id < SMP_MAX_CPUS)
		queue_interrupts[id]++;
	count_origin(frame);
	lapic_write(LAPIC_EOI, 0);
}

__attribute__((interrupt)) static void on_config(struct interrupt_frame *frame)
{
	config_interrupts++;
	count_origin(frame);
	lapic_write(LAPIC_EOI, 0);
}

/* Ring 0, before the drop to ring 3: a few emulated stores. */
void guest_kernel_setup(void)
{
	kernel_set_interrupt_gate(VECTOR_QUEUE, (void (*)(void))on_queue);
	kernel_set_interrupt_gate(VECTOR_CONFIG, (void (*)(void))on_config);
}

/* Ring 3, on each vCPU: nothing but MSIs may interrupt (LINT0, the PIC's
 * virtual wire, masked). */
static void enable_local_apic(void)
{
	lapic_write(LAPIC_SPURIOUS, LAPIC_SOFTWARE_ENABLE | LAPIC_SPURIOUS_VECTOR);
	lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
}

static void ap_main(uint32_t slot)
{
	enable_local_apic();
	for (;;)
		counts[slot]++;
}

__attribute__((noreturn)) static void fail(const char *why)
{
	console_write("pcimsix: FAIL ");
	console_write(why);
	console_write("\n");
	guest_stop();
}

static uint64_t queue_interrupt_total(void)
{
	uint64_t total = 0;

	for (uint32_t i = 0; i < SMP_MAX_CPUS; i++)
		total += queue_interrupts[i];
	return total;
}

static void count_boot_cpu(void)
{
	counts[0]++;
}

static volatile uint32_t *msix_entry(unsigned entry)
{
	return function.msix_table + 4 * entry;
}

static void msix_control(uint32_t bits)
{
	uint32_t header = pci_config_read(function.device, 0, function.msix_capability);

	pci_config_write(function.device, 0, function.msix_capability, (header & 0x3fffffffu) | bits);
}

static void msix_target(unsigned entry, uint32_t apic_id, uint32_t vector)
{
	volatile uint32_t *at = msix_entry(entry);

	at[0] = MSI_ADDRESS_BASE | apic_id << 12;
	at[1] = 0;
	at[2] = vector; /* fixed delivery, edge */
}

static int msix_pending(unsigned entry)
{
	return (int)((function.msix_pba[entry / 64] >> (entry % 64)) & 1);
}

/* virtio_blk_interrupts.program_msix: table programmed with the function
 * masked, then enabled, as Linux's pci_enable_msix does. */
static int program_msix(const struct virtio_pci_function *found, const char **error)
{
	function = *found;
	if (!function.msix_capability || !function.msix_table) {
		*error = "no MSI-X table in BAR 0";
		return -1;
	}
	if (function.msix_entries <= ENTRY_QUEUE) {
		*error = "MSI-X table too small";
		return -1;
	}
	msix_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
	msix_target(ENTRY_CONFIG, smp_apic_ids[0], VECTOR_CONFIG);
	msix_target(ENTRY_QUEUE, smp_apic_ids[0], VECTOR_QUEUE);
	msix_entry(ENTRY_CONFIG)[3] = 0;
	msix_entry(ENTRY_QUEUE)[3] = 0;
	msix_control(MSIX_CONTROL_ENABLE);
	console_write("pcimsix: msix entries=");
	console_write_dec(function.msix_entries);
	console_write(" device=");
	console_write_dec(function.device);
	console_write("\n");
	return 0;
}

static void wait_ms(uint64_t ms, int (*done)(uint64_t), uint64_t since)
{
	struct ticker ticker;

	ticker_start(&ticker, ms);
	while (!ticker_due(&ticker) && !(done && done(since)))
		cpu_relax();
}

static int interrupt_came(uint64_t since)
{
	return queue_interrupt_total() != since;
}

static void report_mask(const char *state, const char *how, uint64_t interrupts, int pending)
{
	console_write("pcimsix: ");
	console_write(state);
	console_write(" ");
	console_write(how);
	console_write(" interrupts=");
	console_write_dec(interrupts);
	console_write(" pending=");
	console_write_dec((uint64_t)pending);
	console_write("\n");
}

/* A read completes while the queue's entry is masked (`function_mask`: the
 * whole function): no interrupt, the pending bit set; unmasking delivers it
 * and clears the bit. The completion is found by polling meanwhile. */
static void check_masking(int function_mask)
{
	static uint64_t buffer[512] __attribute__((aligned(4096)));
	const char *how = function_mask ? "function" : "vector";
	struct virtio_blk_io io = { VIRTIO_BLK_OP_READ, 0, buffer, sizeof(buffer) };
	const char *error = 0;

	virtio_blk_wait_for_interrupts(disk, 0);
	uint64_t before = queue_interrupt_total();
	if (function_mask)
		msix_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
	else
		msix_entry(ENTRY_QUEUE)[3] = MSIX_ENTRY_MASKED;
	if (virtio_blk_submit(disk, &io, 1, &error))
		fail(error);
	wait_ms(MASK_SETTLE_MS, 0, 0);
	uint64_t masked = queue_interrupt_total() - before;
	int pending = msix_pending(ENTRY_QUEUE);
	report_mask("masked", how, masked, pending);

	before = queue_interrupt_total();
	if (function_mask)
		msix_control(MSIX_CONTROL_ENABLE);
	else
		msix_entry(ENTRY_QUEUE)[3] = 0;
	wait_ms(UNMASK_TIMEOUT_MS, interrupt_came, before);
	report_mask("unmasked", how, queue_interrupt_total() - before, msix_pending(ENTRY_QUEUE));
	virtio_blk_wait_for_interrupts(disk, 1);
}

static void report(uint64_t batches)
{
	console_write("pcimsix irq cpus=");
	console_write_dec(smp_cpu_count);
	for (uint32_t i = 0; i < smp_cpu_count; i++) {
		console_write(" cpu");
		console_write_dec(i);
		console_write("=");
		console_write_dec(counts[i]);
		console_write(" irq");
		console_write_dec(i);
		console_write("=");
		console_write_dec(smp_apic_ids[i] < SMP_MAX_CPUS ? queue_interrupts[smp_apic_ids[i]] : 0);
	}
	console_write(" batches=");
	console_write_dec(batches);
	console_write(" missed=");
	console_write_dec(virtio_blk_missed_interrupts(disk));
	console_write(" from_kernel=");
	console_write_dec(from_kernel);
	console_write("\n");
}

/* block_check.before_batch: reports the batch before, then points the
 * queue's entry at the next vCPU. */
static void before_batch(uint64_t batch)
{
	if (batch)
		report(batch);
	batches = batch + 1;
	volatile uint32_t *entry = msix_entry(ENTRY_QUEUE);
	entry[3] = MSIX_ENTRY_MASKED;
	msix_target(ENTRY_QUEUE, smp_apic_ids[batch % smp_cpu_count], VECTOR_QUEUE);
	entry[3] = 0;
}

void guest_main(void)
{
	static const struct virtio_blk_interrupts interrupts = {
		.program_msix = program_msix,
		.config_vector = ENTRY_CONFIG,
		.queue_vector = ENTRY_QUEUE,
		.count = queue_interrupt_total,
		.idle = count_boot_cpu,
	};
	static const struct block_check check = {
		.name = "pcimsix",
		.before_batch = before_batch,
	};
	const char *error = 0;

	enable_local_apic();
	console_write("pcimsix: boot\n");
	if (pci_enumerate("pcimsix"))
		fail("PCI enumeration");
	smp_find_cpus("pcimsix", ap_main);
	smp_ap_rflags = user_entry_rflags;
	if (!smp_start_aps(param_u64("init_sipi_ms", 10)))
		guest_stop();
	disk = virtio_blk_open_interrupts(&interrupts, &error);
	if (!disk)
		fail(error);
	check_masking(0);
	check_masking(1);
	if (block_check_run(&check, disk, error) == 0)
		report(batches);
	const char *exit_mode = param_str("exit");
	if (exit_mode && text_equal(exit_mode, "reset"))
		guest_reset();
}
