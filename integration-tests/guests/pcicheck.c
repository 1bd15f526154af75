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
#include "port_io.h"
#include "runtime.h"

#define CONFIG_ADDRESS 0xcf8
#define CONFIG_DATA 0xcfc
#define CONFIG_ENABLE 0x80000000u
/* arch::layout::PCI_ECAM_START: bus 0, 4 KiB per function. */
#define ECAM_BASE 0xe8000000ul
#define REG_ID 0x00
#define REG_COMMAND_STATUS 0x04
#define REG_CLASS 0x08
#define REG_HEADER 0x0c
#define REG_BAR0 0x10
#define REG_CAPABILITIES 0x34
#define STATUS_CAPABILITIES (1u << 20)
#define HOST_BRIDGE_ID 0x0d578086u
#define HOST_BRIDGE_CLASS 0x060000u
#define MARK_PERIOD_MS 100

static uint64_t failures;

static uint32_t port_config_read(unsigned device, unsigned function,
				 unsigned reg)
{
	port_out32(CONFIG_ADDRESS, CONFIG_ENABLE | device << 11 |
					   function << 8 | (reg & 0xfc));
	return port_in32(CONFIG_DATA);
}

static void port_config_write(unsigned device, unsigned function, unsigned reg,
			      uint32_t value)
{
	port_out32(CONFIG_ADDRESS, CONFIG_ENABLE | device << 11 |
					   function << 8 | (reg & 0xfc));
	port_out32(CONFIG_DATA, value);
}

static volatile uint32_t *ecam(unsigned device, unsigned function, unsigned reg)
{
	return (volatile uint32_t *)(ECAM_BASE + ((uint64_t)device << 15) +
				     ((uint64_t)function << 12) + reg);
}

static void write_hex(uint64_t value, int digits)
{
	for (int shift = (digits - 1) * 4; shift >= 0; shift -= 4)
		console_putc("0123456789abcdef"[(value >> shift) & 0xf]);
}

static void write_bdf(unsigned device, unsigned function)
{
	console_write("00:");
	write_hex(device, 2);
	console_write(".");
	write_hex(function, 1);
}

static void fail(unsigned device, unsigned function, const char *what,
		 unsigned reg, uint32_t ports, uint32_t by_ecam)
{
	failures++;
	console_write("pcicheck: FAIL ");
	write_bdf(device, function);
	console_write(" ");
	console_write(what);
	console_write(" reg=0x");
	write_hex(reg, 3);
	console_write(" ports=0x");
	write_hex(ports, 8);
	console_write(" ecam=0x");
	write_hex(by_ecam, 8);
	console_write("\n");
}

/* Sizes BAR `index` through the ports (all-ones, read, restore) and prints
 * it; returns how many BAR registers it takes (2 for 64-bit, else 1). */
static unsigned report_bar(unsigned device, unsigned function, unsigned index)
{
	unsigned reg = REG_BAR0 + 4 * index;
	uint32_t original = port_config_read(device, function, reg);
	port_config_write(device, function, reg, 0xffffffffu);
	uint32_t mask = port_config_read(device, function, reg);
	port_config_write(device, function, reg, original);
	if (mask == 0)
		return 1;
	unsigned registers = 1;
	uint64_t address, size;
	const char *kind;
	if (mask & 1) {
		kind = "io";
		address = original & ~3u;
		size = (uint32_t)(~(mask & ~3u) + 1) & 0xffff;
	} else if ((mask & 6) == 4 && index < 5) {
		kind = "mem64";
		registers = 2;
		uint32_t high = port_config_read(device, function, reg + 4);
		port_config_write(device, function, reg + 4, 0xffffffffu);
		uint32_t high_mask = port_config_read(device, function, reg + 4);
		port_config_write(device, function, reg + 4, high);
		address = ((uint64_t)high << 32) | (original & ~0xfu);
		size = ~(((uint64_t)high_mask << 32) | (mask & ~0xfu)) + 1;
	} else {
		kind = "mem32";
		address = original & ~0xfu;
		size = (uint32_t)(~(mask & ~0xfu) + 1);
	}
	uint32_t after = port_config_read(device, function, reg);
	if (after != original)
		fail(device, function, "BAR not restored after sizing", reg,
		     after, original);
	console_write("pcicheck: ");
	write_bdf(device, function);
	console_write(" bar");
	console_write_dec(index);
	console_write(" ");
	console_write(kind);
	console_write(" at 0x");
	write_hex(address, 16);
	console_write(" size 0x");
	write_hex(size, 8);
	console_write("\n");
	return registers;
}

static void report_capabilities(unsigned device, unsigned function)
{
	if (!(port_config_read(device, function, REG_COMMAND_STATUS) &
	      STATUS_CAPABILITIES))
		return;
	unsigned at = port_config_read(device, function, REG_CAPABILITIES) & 0xfc;
	for (unsigned walked = 0; at != 0 && walked < 48; walked++) {
		uint32_t header = port_config_read(device, function, at);
		console_write("pcicheck: ");
		write_bdf(device, function);
		console_write(" capability 0x");
		write_hex(header & 0xff, 2);
		console_write(" at 0x");
		write_hex(at, 2);
		console_write("\n");
		at = (header >> 8) & 0xfc;
	}
}

/* Returns 1 when the function is present. */
static int check_function(unsigned device, unsigned function)
{
	uint32_t id = port_config_read(device, function, REG_ID);
	uint32_t id_ecam = *ecam(device, function, REG_ID);
	if (id != id_ecam) {
		fail(device, function, "ID differs", REG_ID, id, id_ecam);
		return 0;
	}
	if (id == 0xffffffffu)
		return 0;
	for (unsigned reg = 0; reg < 256; reg += 4) {
		uint32_t ports = port_config_read(device, function, reg);
		uint32_t by_ecam = *ecam(device, function, reg);
		if (ports != by_ecam)
			fail(device, function, "register differs", reg, ports,
			     by_ecam);
	}
	uint32_t extended = *ecam(device, function, 0x100);
	uint32_t class = port_config_read(device, function, REG_CLASS) >> 8;
	uint32_t header = (port_config_read(device, function, REG_HEADER) >> 16) & 0xff;
	console_write("pcicheck: ");
	write_bdf(device, function);
	console_write(" id ");
	write_hex(id & 0xffff, 4);
	console_write(":");
	write_hex(id >> 16, 4);
	console_write(" class ");
	write_hex(class, 6);
	console_write(" header 0x");
	write_hex(header, 2);
	console_write(" extended 0x");
	write_hex(extended, 8);
	console_write("\n");
	if (device == 0 && function == 0) {
		if (id != HOST_BRIDGE_ID || class != HOST_BRIDGE_CLASS)
			fail(0, 0, "not the host bridge", REG_ID, id, class);
		else
			console_write("pcicheck: host bridge found\n");
	}
	if ((header & 0x7f) == 0)
		for (unsigned bar = 0; bar < 6;)
			bar += report_bar(device, function, bar);
	report_capabilities(device, function);
	return 1;
}

static void enumerate(void)
{
	uint64_t present = 0;

	for (unsigned device = 0; device < 32; device++)
		for (unsigned function = 0; function < 8; function++)
			present += check_function(device, function);
	console_write("pcicheck: bus 0 functions=");
	console_write_dec(present);
	console_write(" failures=");
	console_write_dec(failures);
	console_write("\n");
	if (failures == 0)
		console_write("pcicheck: ports and ECAM agree\n");
}

static uint8_t read_mark(void)
{
	port_out32(CONFIG_ADDRESS, CONFIG_ENABLE | REG_HEADER);
	return port_in8(CONFIG_DATA);
}

static void watch_mark(uint64_t mark, uint64_t lines)
{
	/* A byte write through ECAM, a byte read through the ports. */
	*(volatile uint8_t *)ecam(0, 0, REG_HEADER) = (uint8_t)mark;
	uint8_t read = read_mark();
	console_write("pcicheck: mark written=0x");
	write_hex(mark, 2);
	console_write(" read=0x");
	write_hex(read, 2);
	console_write("\n");
	struct ticker ticker;
	ticker_start(&ticker, MARK_PERIOD_MS);
	for (uint64_t line = 1; lines == 0 || line <= lines;) {
		if (!ticker_due(&ticker)) {
			cpu_relax();
			continue;
		}
		console_write("pcicheck: mark=0x");
		write_hex(read_mark(), 2);
		console_write(" line=");
		console_write_dec(line++);
		console_write("\n");
	}
}

void guest_main(void)
{
	console_write("pcicheck: boot\n");
	enumerate();
	uint64_t mark = param_u64("mark", 0) & 0xff;
	if (mark)
		watch_mark(mark, param_u64("lines", 0));
	console_write("pcicheck: done\n");
	const char *exit = param_str("exit");
	if (exit && text_equal(exit, "reset"))
		guest_reset();
}
