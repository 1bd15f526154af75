/*
 * Serial output on COM1's transmit register.
 *
 * Every port access is a guest exit (about 57 us from ring 3 here), so the
 * line status register is not polled: emulated 16550s never hold back the
 * transmitter, and polling would double the cost of each byte.
 */
#include "console.h"
#include "port_io.h"

#define COM1_THR 0x3f8

void console_putc(char c)
{
	port_out8(COM1_THR, (uint8_t)c);
}

void console_write(const char *text)
{
	while (*text)
		console_putc(*text++);
}

void console_write_dec(uint64_t value)
{
	char digits[20];
	int count = 0;

	do {
		digits[count++] = (char)('0' + value % 10);
		value /= 10;
	} while (value);
	while (count)
		console_putc(digits[--count]);
}

void console_write_hex(uint64_t value)
{
	static const char hex[] = "0123456789abcdef";

	for (int shift = 60; shift >= 0; shift -= 4)
		console_putc(hex[(value >> shift) & 0xf]);
}
