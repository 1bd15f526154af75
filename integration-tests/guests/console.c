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

char *format_dec(char *at, uint64_t value)
{
	char digits[20];
	int count = 0;

	do {
		digits[count++] = (char)('0' + value % 10);
		value /= 10;
	} while (value);
	while (count)
		*at++ = digits[--count];
	return at;
}

char *format_hex(char *at, uint64_t value)
{
	static const char hex[] = "0123456789abcdef";

	for (int shift = 60; shift >= 0; shift -= 4)
		*at++ = hex[(value >> shift) & 0xf];
	return at;
}

static void console_write_n(const char *text, const char *end)
{
	while (text < end)
		console_putc(*text++);
}

void console_write_dec(uint64_t value)
{
	char text[20];

	console_write_n(text, format_dec(text, value));
}

void console_write_hex(uint64_t value)
{
	char text[16];

	console_write_n(text, format_hex(text, value));
}

void console_write_hex_digits(uint64_t value, int digits)
{
	char text[16];

	format_hex(text, value);
	console_write_n(text + 16 - digits, text + 16);
}
