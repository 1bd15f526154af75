#include "params.h"
#include "console.h"
#include "runtime.h"

#define VIRTIO_MMIO_KEY "virtio_mmio.device"

struct token {
	const char *key;
	const char *value; /* 0 for a bare word */
};

static char cmdline_copy[PARAMS_MAX_CMDLINE];
static struct token tokens[PARAMS_MAX_TOKENS];
static int token_count;

void params_init(const char *cmdline)
{
	int length = 0;

	token_count = 0;
	if (cmdline) {
		while (cmdline[length] && length < PARAMS_MAX_CMDLINE - 1) {
			cmdline_copy[length] = cmdline[length];
			length++;
		}
		if (cmdline[length])
			console_write("guest: command line truncated\n");
	}
	cmdline_copy[length] = 0;

	char *cursor = cmdline_copy;
	for (;;) {
		while (*cursor == ' ' || *cursor == '\t' || *cursor == '\n')
			*cursor++ = 0;
		if (!*cursor)
			break;
		if (token_count == PARAMS_MAX_TOKENS) {
			console_write("guest: too many command line words, rest ignored\n");
			break;
		}
		struct token *token = &tokens[token_count++];
		token->key = cursor;
		token->value = 0;
		while (*cursor && *cursor != ' ' && *cursor != '\t' && *cursor != '\n') {
			if (*cursor == '=' && !token->value) {
				*cursor = 0;
				token->value = cursor + 1;
			}
			cursor++;
		}
	}
}

const char *param_str(const char *key)
{
	const char *found = 0;

	for (int i = 0; i < token_count; i++)
		if (tokens[i].value && text_equal(tokens[i].key, key))
			found = tokens[i].value;
	return found;
}

/* Parses a whole string as an unsigned number; 0 on success. The
 * multiplier suffixes K/M/G are accepted (virtio_mmio sizes use them). */
static int parse_u64(const char *text, const char **end, uint64_t *result)
{
	uint64_t value = 0;
	unsigned base = 10;
	int digits = 0;

	if (text[0] == '0' && (text[1] == 'x' || text[1] == 'X')) {
		base = 16;
		text += 2;
	}
	for (;; text++, digits++) {
		unsigned digit;
		char c = *text;
		if (c >= '0' && c <= '9')
			digit = (unsigned)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f')
			digit = (unsigned)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F')
			digit = (unsigned)(c - 'A' + 10);
		else
			break;
		if (value > (~0ull - digit) / base)
			return -1;
		value = value * base + digit;
	}
	if (!digits)
		return -1;
	*end = text;
	*result = value;
	return 0;
}

static int apply_size_suffix(const char **cursor, uint64_t *value)
{
	unsigned shift = 0;

	switch (**cursor) {
	case 'k': case 'K': shift = 10; break;
	case 'm': case 'M': shift = 20; break;
	case 'g': case 'G': shift = 30; break;
	default: return 0;
	}
	if (*value > (~0ull >> shift))
		return -1;
	*value <<= shift;
	(*cursor)++;
	return 0;
}

uint64_t param_u64(const char *key, uint64_t fallback)
{
	const char *text = param_str(key);
	const char *end;
	uint64_t value;

	if (!text)
		return fallback;
	if (parse_u64(text, &end, &value) == 0 && *end == 0)
		return value;
	console_write("guest: ignoring malformed ");
	console_write(key);
	console_write("=");
	console_write(text);
	console_write(", using ");
	console_write_dec(fallback);
	console_write("\n");
	return fallback;
}

/* <size>[K|M|G]@<base>:<irq>[:<platform id>] */
static int parse_virtio_mmio(const char *text, struct virtio_mmio_device *device)
{
	const char *cursor;
	uint64_t irq;

	if (parse_u64(text, &cursor, &device->size) || apply_size_suffix(&cursor, &device->size))
		return -1;
	if (*cursor++ != '@' || parse_u64(cursor, &cursor, &device->base))
		return -1;
	if (*cursor++ != ':' || parse_u64(cursor, &cursor, &irq) || irq > 0xffffffffull)
		return -1;
	if (*cursor != 0 && *cursor != ':')
		return -1;
	device->irq = (uint32_t)irq;
	return device->size ? 0 : -1;
}

int params_virtio_devices(struct virtio_mmio_device *devices, int max)
{
	int count = 0;

	for (int i = 0; i < token_count && count < max; i++) {
		if (!tokens[i].value || !text_equal(tokens[i].key, VIRTIO_MMIO_KEY))
			continue;
		if (parse_virtio_mmio(tokens[i].value, &devices[count]) == 0) {
			count++;
		} else {
			console_write("guest: ignoring malformed " VIRTIO_MMIO_KEY "=");
			console_write(tokens[i].value);
			console_write("\n");
		}
	}
	return count;
}
