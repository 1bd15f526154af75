/*
 * smpcheck: the boot vCPU starts the others the way firmware and Linux do on
 * hardware, and every vCPU then runs a counter in ring 3.
 *
 * The BSP (ring 3) finds the processors in the ACPI MADT and starts each AP
 * with INIT and STARTUP IPIs through its local APIC (smp.c); each AP counts
 * in ring 3.
 *
 *   start_delay=N   print N waiting lines before the APs are started
 *                   (default 0)
 *   init_sipi_ms=N  wait between INIT and the first STARTUP (default 10,
 *                   as firmware and Linux do)
 *
 *   smpcheck: boot
 *   smpcheck: madt cpus=<n> bsp_apic=<id>
 *   smpcheck waiting <i>                      start_delay lines
 *   smpcheck: INIT sent to cpu <slot>
 *   smpcheck: cpu <slot> apic=<id> started after <us> us   from the INIT on
 *   smpcheck: FAIL cpu <slot> apic=<id> not started (stage <s>)
 *   smpcheck: FAIL <why>
 *   smpcheck cpus=<n> cpu0=<count> cpu1=<count> ...        about every 100 ms
 *
 * (stage: see smp.h). A counter is the number of loop turns of its vCPU
 * since this boot; across a save/restore it continues.
 */
#include <stdint.h>

#include "clock.h"
#include "console.h"
#include "params.h"
#include "runtime.h"
#include "smp.h"

#define REPORT_PERIOD_MS 100
#define STEPS_PER_TIME_CHECK 4096

static volatile uint64_t counts[SMP_MAX_CPUS];

/* Ring 3 on an AP. */
static void count_forever(uint32_t slot)
{
	for (;;)
		counts[slot]++;
}

static void report(void)
{
	console_write("smpcheck cpus=");
	console_write_dec(smp_cpu_count);
	for (uint32_t i = 0; i < smp_cpu_count; i++) {
		console_write(" cpu");
		console_write_dec(i);
		console_write("=");
		console_write_dec(counts[i]);
	}
	console_write("\n");
}

void guest_main(void)
{
	uint64_t start_delay = param_u64("start_delay", 0);
	uint64_t init_sipi_ms = param_u64("init_sipi_ms", 10);

	console_write("smpcheck: boot\n");
	smp_find_cpus("smpcheck", count_forever);
	console_write("smpcheck: madt cpus=");
	console_write_dec(smp_cpu_count);
	console_write(" bsp_apic=");
	console_write_dec(smp_apic_ids[0]);
	console_write("\n");

	struct ticker ticker;
	ticker_start(&ticker, REPORT_PERIOD_MS);
	for (uint64_t line = 0; line < start_delay;) {
		if (ticker_due(&ticker)) {
			console_write("smpcheck waiting ");
			console_write_dec(++line);
			console_write("\n");
		}
		cpu_relax();
	}

	if (!smp_start_aps(init_sipi_ms))
		guest_stop();

	ticker_start(&ticker, REPORT_PERIOD_MS);
	for (;;) {
		for (int i = 0; i < STEPS_PER_TIME_CHECK; i++)
			counts[0]++;
		if (ticker_due(&ticker))
			report();
	}
}
