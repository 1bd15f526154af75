/*
 * hpcheck: the ACPI PCI hotplug of a virtio-blk disk as a guest's ACPI code
 * and driver see it, polled from ring 3 (interrupts stay off):
 *
 *   - polls the GED event register (0xf8000000) for the "PCI devices changed"
 *     bit (2), then reads the hotplug controller's PCIU and PCID registers
 *     (0xf8001000, +4) as the DSDT's \_SB_.PHPR.PSCN does;
 *   - on a slot coming up: checks the function there through 0xcf8/0xcfc,
 *     brings the virtio-blk disk up over virtio-pci, writes and reads back a
 *     sector, then keeps doing rounds of I/O, one line per round;
 *   - on a slot asked to go down: stops using it and ejects it as the slot's
 *     _EJ0 does (\_SB_.PHPR.PCEJ: PSEG = 0, B0EJ = 1 << slot), then waits
 *     until the function is gone from configuration space;
 *   - a virtio-blk disk given at boot is used the same way from the start,
 *     and after an eject the next virtio-blk function on the bus, if any;
 *   - any other function that comes up (a network device) is only reported,
 *     and ejected like the disk when its slot is asked to go down.
 *
 * Lines: "hpcheck: ready", "hpcheck: event up=0x.. down=0x..",
 * "hpcheck: disk at device=N id=0x..", "hpcheck: disk io ok device=N",
 * "hpcheck: round=R ok", "hpcheck: function at device=N id=0x..",
 * "hpcheck: eject device=N", "hpcheck: device=N gone",
 * "hpcheck: FAIL ...".
 */
#include "acpi_hotplug.h"
#include "clock.h"
#include "console.h"
#include "port_io.h"
#include "runtime.h"
#include "virtio_blk.h"
#include "virtio_pci.h"

#define VIRTIO_TYPE_BLOCK 2
#define ROUND_PERIOD_MS 50
#define PROBE_SECTOR 1
#define ROUND_SECTORS 8

static uint8_t write_buffer[VIRTIO_BLK_SECTOR_SIZE] __attribute__((aligned(4096)));
static uint8_t read_buffer[VIRTIO_BLK_SECTOR_SIZE] __attribute__((aligned(4096)));

static uint32_t pci_read(unsigned device, unsigned offset)
{
	port_out32(0xcf8, 0x80000000u | device << 11 | (offset & 0xfc));
	return port_in32(0xcfc);
}

static void fail(const char *why, const char *detail)
{
	console_write("hpcheck: FAIL ");
	console_write(why);
	if (detail) {
		console_write(": ");
		console_write(detail);
	}
	console_write("\n");
	guest_stop();
}

/* Writes `seq` into every byte pattern of `sector`, reads it back, compares. */
static void check_sector(struct virtio_blk *disk, uint64_t sector, uint64_t seq)
{
	const char *error = 0;
	for (unsigned i = 0; i < sizeof(write_buffer); i++)
		write_buffer[i] = (uint8_t)(seq * 31 + i);
	memset(read_buffer, 0, sizeof(read_buffer));
	struct virtio_blk_io write = { VIRTIO_BLK_OP_WRITE, sector, write_buffer, sizeof(write_buffer) };
	struct virtio_blk_io read = { VIRTIO_BLK_OP_READ, sector, read_buffer, sizeof(read_buffer) };
	if (virtio_blk_submit(disk, &write, 1, &error) || virtio_blk_submit(disk, &read, 1, &error))
		fail("disk I/O", error);
	if (memcmp(write_buffer, read_buffer, sizeof(read_buffer)))
		fail("read back differs from what was written", 0);
}

/* The device number of the first virtio-blk function on bus 0, 0 if none
 * (the one virtio_blk_open takes). */
static unsigned find_disk(void)
{
	for (unsigned device = 1; device < 32; device++)
		if (pci_read(device, 0) == VIRTIO_PCI_ID(VIRTIO_TYPE_BLOCK))
			return device;
	return 0;
}

/* Brings up the virtio-blk function at `device` and writes its probe sector. */
static struct virtio_blk *bring_up(unsigned device)
{
	uint32_t id = pci_read(device, 0);
	console_write("hpcheck: disk at device=");
	console_write_dec(device);
	console_write(" id=0x");
	console_write_hex(id);
	console_write("\n");
	if (id != VIRTIO_PCI_ID(VIRTIO_TYPE_BLOCK))
		fail("the new function is no virtio-blk", 0);
	const char *error = 0;
	struct virtio_blk *disk = virtio_blk_open(&error);
	if (!disk)
		fail("virtio-blk", error);
	check_sector(disk, PROBE_SECTOR, 0x5a);
	console_write("hpcheck: disk io ok device=");
	console_write_dec(device);
	console_write("\n");
	return disk;
}

static unsigned lowest_bit(uint32_t bits)
{
	unsigned slot = 0;
	while (!(bits & 1u << slot))
		slot++;
	return slot;
}

void guest_main(void)
{
	struct virtio_blk *disk = 0;
	unsigned disk_device = 0;
	uint64_t round = 0;
	struct ticker ticker;

	console_write("hpcheck: boot\n");
	disk_device = find_disk();
	if (disk_device)
		disk = bring_up(disk_device);
	console_write("hpcheck: ready\n");
	ticker_start(&ticker, ROUND_PERIOD_MS);
	for (;;) {
		if (disk && ticker_due(&ticker)) {
			round++;
			check_sector(disk, PROBE_SECTOR + 1 + round % ROUND_SECTORS, round);
			console_write("hpcheck: round=");
			console_write_dec(round);
			console_write(" ok\n");
		}
		if (!(*GED_REGISTER & GED_PCI_DEVICES_CHANGED)) {
			cpu_relax();
			continue;
		}
		*PSEG = 0;
		uint32_t up = *PCIU, down = *PCID;
		console_write("hpcheck: event up=0x");
		console_write_hex(up);
		console_write(" down=0x");
		console_write_hex(down);
		console_write("\n");
		for (uint32_t left = up; left; left &= left - 1) {
			unsigned device = lowest_bit(left);
			if (!disk && pci_read(device, 0) == VIRTIO_PCI_ID(VIRTIO_TYPE_BLOCK)) {
				disk_device = device;
				disk = bring_up(device);
				continue;
			}
			/* Another function (a network device): seen, not driven. */
			console_write("hpcheck: function at device=");
			console_write_dec(device);
			console_write(" id=0x");
			console_write_hex(pci_read(device, 0));
			console_write("\n");
		}
		for (uint32_t left = down; left; left &= left - 1) {
			unsigned device = lowest_bit(left);
			int was_disk = disk && device == disk_device;
			if (was_disk)
				disk = 0;
			console_write("hpcheck: eject device=");
			console_write_dec(device);
			console_write("\n");
			/* \_SB_.PHPR.PCEJ (_SUN, _SEG), as the slot's _EJ0 runs it. */
			*PSEG = 0;
			*B0EJ = 1u << device;
			while (pci_read(device, 0) != 0xffffffffu)
				cpu_relax();
			console_write("hpcheck: device=");
			console_write_dec(device);
			console_write(" gone\n");
			if (was_disk) {
				disk_device = find_disk();
				if (disk_device)
					disk = bring_up(disk_device);
			}
		}
	}
}
