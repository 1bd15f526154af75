/*
 * devcheck: drives the legacy devices the way a guest driver would, for the
 * device end-to-end tests.
 *
 *   lines=N    prints N numbered lines of output, then goes on
 *   pvpanic=1  reads the pvpanic port (0x505), prints the supported-events
 *              bitmap, reports a panic (bit 0) and says so
 *   ged=1      polls the ACPI GED event register (0xf8000000) until the
 *              power-button bit (3) is set, as the DSDT's _EVT reads it, and
 *              prints the byte it read
 *   echo=N     reads COM1 input (polling the line status register) and
 *              answers each line with "echo: <line>", N lines, then goes on
 *   exit=reset ends the VM through the i8042 at the end (else spins)
 *   exit=acpi-off   powers off through the ACPI sleep control port (0x600:
 *                   SLP_TYP 5 | SLP_EN, what the FADT and \_S5 announce)
 *   exit=acpi-reset resets through the ACPI reset register (0x600: 1)
 */
#include "console.h"
#include "params.h"
#include "port_io.h"
#include "runtime.h"

#define COM1_RBR 0x3f8
#define COM1_LSR 0x3fd
#define LSR_DATA_READY 0x01
#define PVPANIC_PORT 0x505
#define PVPANIC_PANICKED 0x01
#define LINE_MAX 200
#define ACPI_SHUTDOWN_PORT 0x600
#define ACPI_RESET_VALUE 0x01
#define ACPI_S5_SLEEP_ENABLE 0x34
/* The GED register page and its power-button bit (arch::layout, the DSDT). */
#define GED_REGISTER ((volatile uint8_t *)0xf8000000UL)
#define GED_POWER_BUTTON 0x08

static void print_lines(uint64_t count)
{
	for (uint64_t i = 1; i <= count; i++) {
		console_write("devcheck: line ");
		console_write_dec(i);
		console_write(" of ");
		console_write_dec(count);
		console_write("\n");
	}
}

static void report_panic(void)
{
	uint8_t supported = port_in8(PVPANIC_PORT);

	console_write("devcheck: pvpanic supported=0x");
	console_putc("0123456789abcdef"[supported >> 4]);
	console_putc("0123456789abcdef"[supported & 0xf]);
	console_write("\n");
	if (!(supported & PVPANIC_PANICKED)) {
		console_write("devcheck: FAIL pvpanic does not offer PANICKED\n");
		return;
	}
	port_out8(PVPANIC_PORT, PVPANIC_PANICKED);
	console_write("devcheck: panic reported\n");
}

static void wait_power_button(void)
{
	uint8_t events;

	console_write("devcheck: ged ready\n");
	while (!((events = *GED_REGISTER) & GED_POWER_BUTTON))
		cpu_relax();
	console_write("devcheck: power button events=0x");
	console_putc("0123456789abcdef"[events >> 4]);
	console_putc("0123456789abcdef"[events & 0xf]);
	console_write("\n");
}

static char read_byte(void)
{
	while (!(port_in8(COM1_LSR) & LSR_DATA_READY))
		cpu_relax();
	return (char)port_in8(COM1_RBR);
}

static void echo_lines(uint64_t count)
{
	char line[LINE_MAX + 1];

	console_write("devcheck: echo ready\n");
	for (uint64_t done = 0; done < count; done++) {
		unsigned length = 0;
		for (;;) {
			char c = read_byte();
			if (c == '\n' || c == '\r')
				break;
			if (length < LINE_MAX)
				line[length++] = c;
		}
		line[length] = 0;
		console_write("echo: ");
		console_write(line);
		console_write("\n");
	}
}

void guest_main(void)
{
	console_write("devcheck: boot\n");
	print_lines(param_u64("lines", 0));
	if (param_u64("pvpanic", 0))
		report_panic();
	if (param_u64("ged", 0))
		wait_power_button();
	echo_lines(param_u64("echo", 0));
	console_write("devcheck: done\n");
	const char *exit = param_str("exit");
	if (exit && text_equal(exit, "reset"))
		guest_reset();
	if (exit && text_equal(exit, "acpi-off")) {
		port_out8(ACPI_SHUTDOWN_PORT, ACPI_S5_SLEEP_ENABLE);
		guest_stop();
	}
	if (exit && text_equal(exit, "acpi-reset")) {
		port_out8(ACPI_SHUTDOWN_PORT, ACPI_RESET_VALUE);
		guest_stop();
	}
}
