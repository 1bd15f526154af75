/*
 * pcicheck: enumerates PCI bus 0 the way firmware or an OS does, through
 * both configuration mechanisms: the legacy ports (CONFIG_ADDRESS at 0xcf8,
 * CONFIG_DATA at 0xcfc) and the ECAM window at 0xe8000000 (the MCFG's). For
 * every device and function it reads the ID dword both ways; for each
 * function present it compares all 64 dwords of the header and capability
 * area, reads the extended space through ECAM, sizes its BARs and walks its
 * capability list, and reports it.
 *
 *   mark=N     1..255: writes N into the host bridge's cache line size
 *              register (0x0c) through ECAM, reads it back through the
 *              ports, then every ~100 ms prints the value read through the
 *              ports: a restored VM must still read N
 *   lines=N    with mark=, stop after N mark lines (0: forever)
 *   exit=reset ends the VM through the i8042 at the end (else spins)
 */
#include "clock.h"
#include "console.h"
#include "params.h"
#include "pci.h"
#include "runtime.h"

#define MARK_PERIOD_MS 100

static uint8_t read_mark(void)
{
	return pci_config_read8(0, 0, PCI_REG_HEADER);
}

static void watch_mark(uint64_t mark, uint64_t lines)
{
	/* A byte write through ECAM, a byte read through the ports. */
	*(volatile uint8_t *)pci_ecam(0, 0, PCI_REG_HEADER) = (uint8_t)mark;
	uint8_t read = read_mark();
	console_write("pcicheck: mark written=0x");
	console_write_hex_digits(mark, 2);
	console_write(" read=0x");
	console_write_hex_digits(read, 2);
	console_write("\n");
	struct ticker ticker;
	ticker_start(&ticker, MARK_PERIOD_MS);
	for (uint64_t line = 1; lines == 0 || line <= lines;) {
		if (!ticker_due(&ticker)) {
			cpu_relax();
			continue;
		}
		console_write("pcicheck: mark=0x");
		console_write_hex_digits(read_mark(), 2);
		console_write(" line=");
		console_write_dec(line++);
		console_write("\n");
	}
}

void guest_main(void)
{
	console_write("pcicheck: boot\n");
	pci_enumerate("pcicheck");
	uint64_t mark = param_u64("mark", 0) & 0xff;
	if (mark)
		watch_mark(mark, param_u64("lines", 0));
	console_write("pcicheck: done\n");
	const char *exit = param_str("exit");
	if (exit && text_equal(exit, "reset"))
		guest_reset();
}
