/* COM1 output, usable from ring 0 and ring 3 (the TSS I/O bitmap opens
 * ports 0x3f8-0x3ff to ring 3). */
#ifndef GUEST_CONSOLE_H
#define GUEST_CONSOLE_H

#include <stdint.h>

void console_putc(char c);
void console_write(const char *text);
void console_write_dec(uint64_t value);
/* Always 16 lower-case hex digits, no prefix. */
void console_write_hex(uint64_t value);
/* The low `digits` (1..16) hex digits of `value`, lower case, no prefix. */
void console_write_hex_digits(uint64_t value, int digits);

/* Write `value` at `at` without a NUL, in decimal (at most 20 characters) or
 * as 16 lower-case hex digits, and return the end. */
char *format_dec(char *at, uint64_t value);
char *format_hex(char *at, uint64_t value);

#endif
