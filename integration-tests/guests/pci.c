#include "pci.h"
#include "console.h"
#include "port_io.h"

#define CONFIG_ADDRESS 0xcf8
#define CONFIG_DATA 0xcfc
#define CONFIG_ENABLE 0x80000000u
/* Bus 0, 4 KiB per function. */
#define ECAM_BASE 0xe8000000ul
#define HOST_BRIDGE_ID 0x0d578086u
#define HOST_BRIDGE_CLASS 0x060000u

static void select_register(unsigned device, unsigned function, unsigned reg)
{
	port_out32(CONFIG_ADDRESS, CONFIG_ENABLE | device << 11 | function << 8 | (reg & 0xfc));
}

uint32_t pci_config_read(unsigned device, unsigned function, unsigned reg)
{
	select_register(device, function, reg);
	return port_in32(CONFIG_DATA);
}

void pci_config_write(unsigned device, unsigned function, unsigned reg, uint32_t value)
{
	select_register(device, function, reg);
	port_out32(CONFIG_DATA, value);
}

uint8_t pci_config_read8(unsigned device, unsigned function, unsigned reg)
{
	return (uint8_t)(pci_config_read(device, function, reg) >> (8 * (reg & 3)));
}

volatile uint32_t *pci_ecam(unsigned device, unsigned function, unsigned reg)
{
	return (volatile uint32_t *)(ECAM_BASE + ((uint64_t)device << 15) +
				     ((uint64_t)function << 12) + reg);
}

static uint64_t failures;
static const char *guest_name;

static void write_name(void)
{
	console_write(guest_name);
	console_write(": ");
}



static void write_bdf(unsigned device, unsigned function)
{
	console_write("00:");
	console_write_hex_digits(device, 2);
	console_write(".");
	console_write_hex_digits(function, 1);
}

static void fail(unsigned device, unsigned function, const char *what,
		 unsigned reg, uint32_t ports, uint32_t by_ecam)
{
	failures++;
	write_name();
	console_write("FAIL ");
	write_bdf(device, function);
	console_write(" ");
	console_write(what);
	console_write(" reg=0x");
	console_write_hex_digits(reg, 3);
	console_write(" ports=0x");
	console_write_hex_digits(ports, 8);
	console_write(" ecam=0x");
	console_write_hex_digits(by_ecam, 8);
	console_write("\n");
}

/* Sizes BAR `index` through the ports (all-ones, read, restore) and prints
 * it; returns how many BAR registers it takes (2 for 64-bit, else 1). */
static unsigned report_bar(unsigned device, unsigned function, unsigned index)
{
	unsigned reg = PCI_REG_BAR0 + 4 * index;
	uint32_t original = pci_config_read(device, function, reg);
	pci_config_write(device, function, reg, 0xffffffffu);
	uint32_t mask = pci_config_read(device, function, reg);
	pci_config_write(device, function, reg, original);
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
		uint32_t high = pci_config_read(device, function, reg + 4);
		pci_config_write(device, function, reg + 4, 0xffffffffu);
		uint32_t high_mask = pci_config_read(device, function, reg + 4);
		pci_config_write(device, function, reg + 4, high);
		address = ((uint64_t)high << 32) | (original & ~0xfu);
		size = ~(((uint64_t)high_mask << 32) | (mask & ~0xfu)) + 1;
	} else {
		kind = "mem32";
		address = original & ~0xfu;
		size = (uint32_t)(~(mask & ~0xfu) + 1);
	}
	uint32_t after = pci_config_read(device, function, reg);
	if (after != original)
		fail(device, function, "BAR not restored after sizing", reg,
		     after, original);
	write_name();
	write_bdf(device, function);
	console_write(" bar");
	console_write_dec(index);
	console_write(" ");
	console_write(kind);
	console_write(" at 0x");
	console_write_hex_digits(address, 16);
	console_write(" size 0x");
	console_write_hex_digits(size, 8);
	console_write("\n");
	return registers;
}

static void report_capabilities(unsigned device, unsigned function)
{
	if (!(pci_config_read(device, function, PCI_REG_COMMAND_STATUS) &
	      PCI_STATUS_CAPABILITIES))
		return;
	unsigned at = pci_config_read(device, function, PCI_REG_CAPABILITIES) & 0xfc;
	for (unsigned walked = 0; at != 0 && walked < 48; walked++) {
		uint32_t header = pci_config_read(device, function, at);
		write_name();
		write_bdf(device, function);
		console_write(" capability 0x");
		console_write_hex_digits(header & 0xff, 2);
		console_write(" at 0x");
		console_write_hex_digits(at, 2);
		console_write("\n");
		at = (header >> 8) & 0xfc;
	}
}

/* Returns 1 when the function is present. */
static int check_function(unsigned device, unsigned function)
{
	uint32_t id = pci_config_read(device, function, PCI_REG_ID);
	uint32_t id_ecam = *pci_ecam(device, function, PCI_REG_ID);
	if (id != id_ecam) {
		fail(device, function, "ID differs", PCI_REG_ID, id, id_ecam);
		return 0;
	}
	if (id == 0xffffffffu)
		return 0;
	for (unsigned reg = 0; reg < 256; reg += 4) {
		uint32_t ports = pci_config_read(device, function, reg);
		uint32_t by_ecam = *pci_ecam(device, function, reg);
		if (ports != by_ecam)
			fail(device, function, "register differs", reg, ports,
			     by_ecam);
	}
	uint32_t extended = *pci_ecam(device, function, 0x100);
	uint32_t class = pci_config_read(device, function, PCI_REG_CLASS) >> 8;
	uint32_t header = (pci_config_read(device, function, PCI_REG_HEADER) >> 16) & 0xff;
	write_name();
	write_bdf(device, function);
	console_write(" id ");
	console_write_hex_digits(id & 0xffff, 4);
	console_write(":");
	console_write_hex_digits(id >> 16, 4);
	console_write(" class ");
	console_write_hex_digits(class, 6);
	console_write(" header 0x");
	console_write_hex_digits(header, 2);
	console_write(" extended 0x");
	console_write_hex_digits(extended, 8);
	console_write("\n");
	if (device == 0 && function == 0) {
		if (id != HOST_BRIDGE_ID || class != HOST_BRIDGE_CLASS)
			fail(0, 0, "not the host bridge", PCI_REG_ID, id, class);
		else
			{
			write_name();
			console_write("host bridge found\n");
		}
	}
	if ((header & 0x7f) == 0)
		for (unsigned bar = 0; bar < 6;)
			bar += report_bar(device, function, bar);
	report_capabilities(device, function);
	return 1;
}

uint64_t pci_enumerate(const char *name)
{
	uint64_t present = 0;

	guest_name = name;
	failures = 0;

	for (unsigned device = 0; device < 32; device++)
		for (unsigned function = 0; function < 8; function++)
			present += check_function(device, function);
	write_name();
	console_write("bus 0 functions=");
	console_write_dec(present);
	console_write(" failures=");
	console_write_dec(failures);
	console_write("\n");
	if (failures == 0)
		{
		write_name();
		console_write("ports and ECAM agree\n");
	}
	return failures;
}
