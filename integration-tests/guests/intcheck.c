/*
 * intcheck: does this host deliver external interrupts to a guest that runs
 * in ring 3? Ring 0 enables the local APIC, installs two ring-0 interrupt
 * handlers that count, optionally starts the LAPIC timer, and the boot stub
 * enters ring 3 with IF=1. Ring 3 spins and reports the counters.
 *
 *   timer=N      LAPIC timer, periodic, initial count N at divide-by-1 (0 = off)
 *   max_lines=N  give up after N status lines without a stop request (500)
 *
 * Vector 0x40 is for the host's interrupts (an MSI through irqfd or
 * KVM_SIGNAL_MSI), 0x41 is the LAPIC timer, 0x42 is the host's stop request:
 * the guest then stops its timer, waits one more period for stragglers,
 * prints the final counters and resets.
 *
 *   intcheck: ready
 *   intcheck got <n>                  whenever the host's interrupt count changes
 *   intcheck external=<n> timer=<n> from_user=<n> from_kernel=<n>   every 20 ms
 *   intcheck final external=<n> timer=<n> from_user=<n> from_kernel=<n>
 *   intcheck: FAIL no stop request                       after max_lines
 *
 * from_user counts interrupts (the stop request included) that arrived while
 * ring 3 ran (the saved CS has RPL 3), from_kernel the others.
 */
#include <stdint.h>

#include "clock.h"
#include "console.h"
#include "kernel.h"
#include "lapic.h"
#include "params.h"
#include "runtime.h"

#define LAPIC_TIMER_PERIODIC (1u << 17)
#define LAPIC_DIVIDE_BY_1 0xb

#define VECTOR_EXTERNAL 0x40
#define VECTOR_TIMER 0x41
#define VECTOR_STOP 0x42
#define LINE_PERIOD_MS 20

/* What the ring-3 entry starts with: IF set, IOPL 0 (overrides boot.S). */
const uint64_t user_entry_rflags = 0x202;

/* In .data, not .bss: ring 3 zeroes .bss after interrupts are already on. */
static volatile uint64_t external_count __attribute__((section(".data")));
static volatile uint64_t timer_count __attribute__((section(".data")));
static volatile uint64_t from_user_count __attribute__((section(".data")));
static volatile uint64_t from_kernel_count __attribute__((section(".data")));
static volatile uint64_t stop_requested __attribute__((section(".data")));

static void count_origin(const struct interrupt_frame *frame)
{
	if ((frame->cs & 3) == 3)
		from_user_count++;
	else
		from_kernel_count++;
}

__attribute__((interrupt)) static void on_external(struct interrupt_frame *frame)
{
	external_count++;
	count_origin(frame);
	lapic_write(LAPIC_EOI, 0);
}

__attribute__((interrupt)) static void on_timer(struct interrupt_frame *frame)
{
	timer_count++;
	count_origin(frame);
	lapic_write(LAPIC_EOI, 0);
}

__attribute__((interrupt)) static void on_stop(struct interrupt_frame *frame)
{
	stop_requested = 1;
	count_origin(frame);
	lapic_write(LAPIC_EOI, 0);
}

/* Ring 0, before the drop to ring 3: a few emulated stores. The command line
 * is parsed in ring 3 (too many instructions for emulated ring 0), which also
 * programs the timer. */
void guest_kernel_setup(void)
{
	kernel_set_interrupt_gate(VECTOR_EXTERNAL, (void (*)(void))on_external);
	kernel_set_interrupt_gate(VECTOR_TIMER, (void (*)(void))on_timer);
	kernel_set_interrupt_gate(VECTOR_STOP, (void (*)(void))on_stop);
	lapic_write(LAPIC_SPURIOUS, LAPIC_SOFTWARE_ENABLE | LAPIC_SPURIOUS_VECTOR);
}

static void print_counters(const char *prefix)
{
	console_write(prefix);
	console_write(" external=");
	console_write_dec(external_count);
	console_write(" timer=");
	console_write_dec(timer_count);
	console_write(" from_user=");
	console_write_dec(from_user_count);
	console_write(" from_kernel=");
	console_write_dec(from_kernel_count);
	console_write("\n");
}

void guest_main(void)
{
	uint64_t max_lines = param_u64("max_lines", 500);
	uint64_t timer_initial_count = param_u64("timer", 0);

	if (timer_initial_count > 0xffffffffull)
		timer_initial_count = 0xffffffffull;
	if (timer_initial_count) {
		/* The LAPIC page is mapped user-accessible like the rest of
		 * the device hole, so ring 3 programs the timer. */
		lapic_write(LAPIC_TIMER_DIVIDE, LAPIC_DIVIDE_BY_1);
		lapic_write(LAPIC_LVT_TIMER, LAPIC_TIMER_PERIODIC | VECTOR_TIMER);
		lapic_write(LAPIC_TIMER_INITIAL, (uint32_t)timer_initial_count);
	}
	console_write("intcheck: ready\n");

	struct ticker ticker;
	uint64_t external_seen = 0;
	ticker_start(&ticker, LINE_PERIOD_MS);
	for (uint64_t line = 0; !stop_requested;) {
		/* Lets the host send one interrupt at a time: two edge
		 * interrupts of one vector that meet in the IRR count once. */
		uint64_t external = external_count;
		if (external != external_seen) {
			external_seen = external;
			console_write("intcheck got ");
			console_write_dec(external);
			console_write("\n");
		}
		if (!ticker_due(&ticker)) {
			cpu_relax();
			continue;
		}
		if (++line > max_lines) {
			console_write("intcheck: FAIL no stop request\n");
			guest_reset();
		}
		print_counters("intcheck");
	}
	lapic_write(LAPIC_TIMER_INITIAL, 0);
	/* One more period, so what was in flight when the stop came is counted. */
	ticker_start(&ticker, LINE_PERIOD_MS);
	while (!ticker_due(&ticker))
		cpu_relax();
	print_counters("intcheck final");
	guest_reset();
}
