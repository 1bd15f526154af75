/*
 * netkv: a key-value service on virtio-net, the database of the network
 * power-fail tests. It drives the first virtio-net function on PCI bus 0 by
 * polling its used rings, answers ARP requests for its IPv4 address and serves
 * GET/PUT over UDP (protocol in README.md). A PUT is answered only after it is
 * in the table in RAM, so an acknowledged PUT lives as long as the RAM does.
 *
 * The receive queue keeps RX_SIZE buffers posted; each pass takes every used
 * buffer, answers it into the transmit ring and posts it again, then notifies
 * the transmit queue once. The receive queue is notified only after RX_SIZE / 2
 * buffers were posted again (the device sees new buffers without a notify
 * while it has any left), so a busy pass costs about one exit.
 *
 * With pairs=N (2..MAX_PAIRS) it drives the device as a multiqueue driver does:
 * it negotiates VIRTIO_NET_F_MQ and VIRTIO_NET_F_CTRL_VQ, sets up N receive/
 * transmit pairs and the control queue (queue 2 * max_virtqueue_pairs), sends
 * VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET N and fails unless the device acks it, then
 * serves every pair, answering each request on the pair it came in on (the
 * report counts the requests served per pair).
 *
 * With hotplug=1 it boots without a network device and waits for one to be
 * hotplugged (ACPI PCI hotplug, polled as hpcheck does), then serves on it;
 * every HOTPLUG_POLL_MS it looks for its slot being asked to go down, then
 * ejects it and stops serving.
 */
#include "acpi_hotplug.h"
#include "clock.h"
#include "console.h"
#include "params.h"
#include "pci.h"
#include "runtime.h"
#include "virtio.h"
#include "virtio_pci.h"

#define VIRTIO_ID_NET 1
#define VIRTIO_NET_F_MAC (1u << 5)
#define VIRTIO_NET_F_CTRL_VQ (1u << 17)
#define VIRTIO_NET_F_MQ (1u << 22)
#define VIRTIO_NET_CTRL_MQ 4
#define VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 0
#define MAX_PAIRS 2
#define CTRL_SIZE 16
#define CTRL_TIMEOUT_MS 10000
#define RX_QUEUE 0
#define TX_QUEUE 1
#define RX_SIZE 256
#define TX_SIZE 64
#define RX_BUFFER 2048
#define TX_BUFFER 2048
#define NET_HDR_LEN 12 /* struct virtio_net_hdr with num_buffers (VERSION_1) */
#define TX_TIMEOUT_MS 30000
#define HOTPLUG_POLL_MS 100

#define ETH_HDR 14
#define ETHERTYPE_IPV4 0x0800
#define ETHERTYPE_ARP 0x0806
#define IPV4_HDR 20
#define UDP_HDR 8

#define KV_MAGIC 0x564b564eu /* "NVKV" */
#define KV_GET 1
#define KV_PUT 2
#define KV_STREAM 3
#define STREAM_MAX_PAYLOAD 1472 /* a 1514-byte frame */
#define STREAM_MAX_COUNT 100000000ull
#define STREAM_NOTIFY_EVERY 32
#define KV_REPLY 0x80
#define KV_OK 0
#define KV_NOT_FOUND 1
#define KV_FULL 2
#define KV_BAD 3
#define KV_REQUEST_LEN 40
#define KV_REPLY_LEN 56

struct ring_rx {
	struct virtq_desc descriptors[RX_SIZE] __attribute__((aligned(16)));
	VIRTQ_AVAIL(RX_SIZE) avail __attribute__((aligned(16)));
	VIRTQ_USED(RX_SIZE) used __attribute__((aligned(16)));
};

struct ring_tx {
	struct virtq_desc descriptors[TX_SIZE] __attribute__((aligned(16)));
	VIRTQ_AVAIL(TX_SIZE) avail __attribute__((aligned(16)));
	VIRTQ_USED(TX_SIZE) used __attribute__((aligned(16)));
};

struct slot {
	uint64_t key; /* 0: empty */
	uint64_t version;
	uint64_t value;
	uint64_t unused;
};

/* One receive/transmit queue pair and the driver's position in it. */
struct pair {
	struct ring_rx rx __attribute__((aligned(4096)));
	struct ring_tx tx __attribute__((aligned(4096)));
	uint8_t rx_buffers[RX_SIZE][RX_BUFFER] __attribute__((aligned(4096)));
	uint8_t tx_buffers[TX_SIZE][TX_BUFFER] __attribute__((aligned(4096)));
	volatile uint16_t *rx_notify, *tx_notify;
	uint16_t rx_queue, tx_queue;
	uint16_t rx_seen, rx_posted, rx_posted_since_notify;
	uint16_t tx_posted;
	uint64_t served; /* requests answered on this pair */
};

struct ring_ctrl {
	struct virtq_desc descriptors[CTRL_SIZE] __attribute__((aligned(16)));
	VIRTQ_AVAIL(CTRL_SIZE) avail __attribute__((aligned(16)));
	VIRTQ_USED(CTRL_SIZE) used __attribute__((aligned(16)));
};

static struct pair pairs[MAX_PAIRS] __attribute__((aligned(4096)));
static struct ring_ctrl ctrl __attribute__((aligned(4096)));
static uint8_t ctrl_request[4] __attribute__((aligned(16)));
static volatile uint8_t ctrl_ack __attribute__((aligned(16)));
/* The pair being served: replies go out on its transmit queue. */
static struct pair *cur = &pairs[0];
static unsigned pair_count = 1;

static struct virtio_pci_function net;
static uint8_t my_mac[6];
static uint8_t my_ip[4];
static uint16_t my_port;
static uint16_t ip_id;

static struct slot *table;
static uint64_t table_mask, table_keys;
static uint64_t boot_id, served, frames, ignored;

static uint16_t get16be(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static void put16be(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static uint32_t get32le(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64le(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static void put64le(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void fail(const char *why)
{
	console_write("netkv: FAIL ");
	console_write(why);
	console_write("\n");
	guest_stop();
}

/* "a.b.c.d" into 4 bytes; 0 on success. */
static int parse_ipv4(const char *text, uint8_t out[4])
{
	for (int part = 0; part < 4; part++) {
		unsigned value = 0, digits = 0;
		while (*text >= '0' && *text <= '9' && digits < 4) {
			value = value * 10 + (unsigned)(*text++ - '0');
			digits++;
		}
		if (!digits || value > 255 || (part < 3 ? *text != '.' : *text != 0))
			return -1;
		out[part] = (uint8_t)value;
		text++;
	}
	return 0;
}

/* The slot holding `key`, or the empty slot where it belongs. */
static struct slot *lookup(uint64_t key)
{
	uint64_t at = (key * 0x9e3779b97f4a7c15ull) >> 17 & table_mask;
	while (table[at].key && table[at].key != key)
		at = (at + 1) & table_mask;
	return &table[at];
}

/* Waits for room in the transmit ring; returns the free buffer. */
static uint8_t *tx_buffer(void)
{
	struct stopwatch watch;

	if ((uint16_t)(cur->tx_posted - *(volatile uint16_t *)&cur->tx.used.index) >= TX_SIZE) {
		/* Full with frames of this pass the device was not told about yet. */
		memory_barrier();
		*cur->tx_notify = cur->tx_queue;
	}
	stopwatch_start(&watch);
	while ((uint16_t)(cur->tx_posted - *(volatile uint16_t *)&cur->tx.used.index) >= TX_SIZE) {
		if (stopwatch_poll_ms(&watch) > TX_TIMEOUT_MS)
			fail("transmit queue stuck");
		cpu_relax();
	}
	uint8_t *buffer = cur->tx_buffers[cur->tx_posted % TX_SIZE];
	memset(buffer, 0, NET_HDR_LEN);
	return buffer + NET_HDR_LEN;
}

/* Posts the frame just built in tx_buffer() (not yet notified). */
static void tx_post(uint32_t frame_len)
{
	uint16_t slot = cur->tx_posted % TX_SIZE;

	cur->tx.descriptors[slot].address = (uint64_t)cur->tx_buffers[slot];
	cur->tx.descriptors[slot].length = NET_HDR_LEN + frame_len;
	cur->tx.descriptors[slot].flags = 0;
	cur->tx.avail.ring[slot] = slot;
	memory_barrier();
	cur->tx.avail.index = ++cur->tx_posted;
}

static void answer_arp(const uint8_t *frame, uint32_t len)
{
	const uint8_t *arp = frame + ETH_HDR;

	if (len < ETH_HDR + 28 || get16be(arp) != 1 || get16be(arp + 2) != ETHERTYPE_IPV4 ||
	    arp[4] != 6 || arp[5] != 4 || get16be(arp + 6) != 1 || memcmp(arp + 24, my_ip, 4)) {
		ignored++;
		return;
	}
	uint8_t *out = tx_buffer();
	memcpy(out, frame + 6, 6);
	memcpy(out + 6, my_mac, 6);
	put16be(out + 12, ETHERTYPE_ARP);
	uint8_t *reply = out + ETH_HDR;
	memcpy(reply, arp, 6);
	put16be(reply + 6, 2);
	memcpy(reply + 8, my_mac, 6);
	memcpy(reply + 14, my_ip, 4);
	memcpy(reply + 18, arp + 8, 10); /* the asker's MAC and IP */
	tx_post(ETH_HDR + 28);
}

static uint16_t ipv4_checksum(const uint8_t *header)
{
	uint32_t sum = 0;
	for (int i = 0; i < IPV4_HDR; i += 2)
		sum += get16be(header + i);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

/* Applies one request; fills the reply's status, version and value. */
static void serve(const uint8_t *request, uint8_t *reply)
{
	uint8_t op = request[4];
	uint64_t key = get64le(request + 16);
	uint8_t status = KV_OK;
	struct slot *slot = key ? lookup(key) : 0;

	if (!slot || (op != KV_GET && op != KV_PUT)) {
		status = KV_BAD;
	} else if (op == KV_GET) {
		if (!slot->key)
			status = KV_NOT_FOUND;
	} else if (!slot->key && table_keys >= (table_mask + 1) / 2) {
		status = KV_FULL;
	} else {
		uint64_t version = get64le(request + 24);
		/* Versions only grow: a late duplicate never rolls a key back. */
		if (!slot->key || version > slot->version) {
			slot->value = get64le(request + 32);
			slot->version = version;
			compiler_barrier();
			if (!slot->key)
				table_keys++;
			slot->key = key;
		}
	}
	put64le(reply, KV_MAGIC); /* and zeroes bytes 4..7 */
	reply[4] = (uint8_t)(op | KV_REPLY);
	reply[5] = status;
	memcpy(reply + 8, request + 8, 16); /* id and key */
	put64le(reply + 24, slot && slot->key ? slot->version : 0);
	put64le(reply + 32, slot && slot->key ? slot->value : 0);
	put64le(reply + 40, boot_id);
	put64le(reply + 48, served++);
}

/* Starts a frame in the next transmit buffer: Ethernet, IPv4 and UDP headers for a datagram
 * of `payload_len` bytes back to the sender of `frame` (IPv4, UDP). Returns the payload. */
static uint8_t *udp_to_sender(const uint8_t *frame, uint32_t payload_len)
{
	const uint8_t *ip = frame + ETH_HDR;
	const uint8_t *udp = ip + (ip[0] & 0xf) * 4;
	uint8_t *out = tx_buffer();

	memcpy(out, frame + 6, 6);
	memcpy(out + 6, my_mac, 6);
	put16be(out + 12, ETHERTYPE_IPV4);
	uint8_t *oip = out + ETH_HDR;
	oip[0] = 0x45;
	oip[1] = 0;
	put16be(oip + 2, (uint16_t)(IPV4_HDR + UDP_HDR + payload_len));
	put16be(oip + 4, ip_id++);
	put16be(oip + 6, 0x4000); /* don't fragment */
	oip[8] = 64;
	oip[9] = 17;
	put16be(oip + 10, 0);
	memcpy(oip + 12, my_ip, 4);
	memcpy(oip + 16, ip + 12, 4);
	put16be(oip + 10, ipv4_checksum(oip));
	uint8_t *oudp = oip + IPV4_HDR;
	put16be(oudp, my_port);
	memcpy(oudp + 2, udp, 2);
	put16be(oudp + 4, (uint16_t)(UDP_HDR + payload_len));
	put16be(oudp + 6, 0); /* no UDP checksum (allowed over IPv4) */
	return oudp + UDP_HDR;
}

/* STREAM: `key` datagrams of `version` payload bytes (each starting with its number, from
 * 0, little-endian) to the sender as fast as the ring takes them, then the reply. */
static void stream(const uint8_t *frame, const uint8_t *request)
{
	uint64_t count = get64le(request + 16);
	uint64_t size = get64le(request + 24);
	uint8_t reply[KV_REPLY_LEN];

	if (size < 8 || size > STREAM_MAX_PAYLOAD || count > STREAM_MAX_COUNT)
		count = 0;
	for (uint64_t i = 0; i < count; i++) {
		put64le(udp_to_sender(frame, (uint32_t)size), i);
		tx_post(ETH_HDR + IPV4_HDR + UDP_HDR + (uint32_t)size);
		if (i % STREAM_NOTIFY_EVERY == STREAM_NOTIFY_EVERY - 1) {
			memory_barrier();
			*cur->tx_notify = cur->tx_queue;
		}
	}
	put64le(reply, KV_MAGIC);
	reply[4] = KV_STREAM | KV_REPLY;
	reply[5] = count ? KV_OK : KV_BAD;
	memcpy(reply + 8, request + 8, 16);
	put64le(reply + 24, count);
	put64le(reply + 32, size);
	put64le(reply + 40, boot_id);
	put64le(reply + 48, served++);
	memcpy(udp_to_sender(frame, KV_REPLY_LEN), reply, KV_REPLY_LEN);
	tx_post(ETH_HDR + IPV4_HDR + UDP_HDR + KV_REPLY_LEN);
}

static void answer_udp(const uint8_t *frame, uint32_t len)
{
	const uint8_t *ip = frame + ETH_HDR;
	uint32_t ihl = (uint32_t)(ip[0] & 0xf) * 4;

	if (len < ETH_HDR + IPV4_HDR || ip[0] >> 4 != 4 || ihl < IPV4_HDR || ip[9] != 17 ||
	    memcmp(ip + 16, my_ip, 4) || (get16be(ip + 6) & 0x3fff) ||
	    len < ETH_HDR + ihl + UDP_HDR + KV_REQUEST_LEN) {
		ignored++;
		return;
	}
	const uint8_t *udp = ip + ihl;
	const uint8_t *request = udp + UDP_HDR;
	if (get16be(udp + 2) != my_port || get16be(udp + 4) < UDP_HDR + KV_REQUEST_LEN ||
	    get32le(request) != KV_MAGIC) {
		ignored++;
		return;
	}
	if (request[4] == KV_STREAM) {
		stream(frame, request);
		return;
	}
	uint8_t *payload = udp_to_sender(frame, KV_REPLY_LEN);
	serve(request, payload);
	cur->served++;
	tx_post(ETH_HDR + IPV4_HDR + UDP_HDR + KV_REPLY_LEN);
}

static void handle(const uint8_t *frame, uint32_t len)
{
	frames++;
	if (len < ETH_HDR) {
		ignored++;
		return;
	}
	switch (get16be(frame + 12)) {
	case ETHERTYPE_ARP:
		answer_arp(frame, len);
		break;
	case ETHERTYPE_IPV4:
		answer_udp(frame, len);
		break;
	default:
		ignored++;
	}
}

static void rx_post(uint16_t id)
{
	cur->rx.avail.ring[cur->rx_posted % RX_SIZE] = id;
	memory_barrier();
	cur->rx.avail.index = ++cur->rx_posted;
	cur->rx_posted_since_notify++;
}

/* Sets up pair `index` (queues 2 * index and 2 * index + 1) with its receive
 * buffers posted. */
static void open_pair(unsigned index)
{
	const char *error = 0;

	cur = &pairs[index];
	cur->rx_queue = (uint16_t)(2 * index + RX_QUEUE);
	cur->tx_queue = (uint16_t)(2 * index + TX_QUEUE);
	cur->rx.avail.flags = AVAIL_F_NO_INTERRUPT;
	cur->tx.avail.flags = AVAIL_F_NO_INTERRUPT;
	cur->rx_notify = virtio_pci_queue(&net, cur->rx_queue, RX_SIZE, cur->rx.descriptors,
					  &cur->rx.avail, &cur->rx.used, &error);
	if (!cur->rx_notify)
		fail(error);
	cur->tx_notify = virtio_pci_queue(&net, cur->tx_queue, TX_SIZE, cur->tx.descriptors,
					  &cur->tx.avail, &cur->tx.used, &error);
	if (!cur->tx_notify)
		fail(error);
	for (uint16_t id = 0; id < RX_SIZE; id++) {
		cur->rx.descriptors[id].address = (uint64_t)cur->rx_buffers[id];
		cur->rx.descriptors[id].length = RX_BUFFER;
		cur->rx.descriptors[id].flags = DESC_F_WRITE;
		rx_post(id);
	}
}

/* VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET pair_count on the control queue, as a
 * driver does after DRIVER_OK: header, data and ack in three descriptors. */
static void set_pairs(volatile uint16_t *ctrl_notify, uint16_t ctrl_queue)
{
	struct stopwatch watch;

	ctrl_request[0] = VIRTIO_NET_CTRL_MQ;
	ctrl_request[1] = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET;
	ctrl_request[2] = (uint8_t)pair_count;
	ctrl_request[3] = 0;
	ctrl_ack = 0xff;
	ctrl.descriptors[0].address = (uint64_t)ctrl_request;
	ctrl.descriptors[0].length = 2;
	ctrl.descriptors[0].flags = DESC_F_NEXT;
	ctrl.descriptors[0].next = 1;
	ctrl.descriptors[1].address = (uint64_t)(ctrl_request + 2);
	ctrl.descriptors[1].length = 2;
	ctrl.descriptors[1].flags = DESC_F_NEXT;
	ctrl.descriptors[1].next = 2;
	ctrl.descriptors[2].address = (uint64_t)&ctrl_ack;
	ctrl.descriptors[2].length = 1;
	ctrl.descriptors[2].flags = DESC_F_WRITE;
	ctrl.avail.ring[0] = 0;
	memory_barrier();
	ctrl.avail.index = 1;
	memory_barrier();
	*ctrl_notify = ctrl_queue;
	stopwatch_start(&watch);
	while (*(volatile uint16_t *)&ctrl.used.index != 1) {
		if (stopwatch_poll_ms(&watch) > CTRL_TIMEOUT_MS)
			fail("no answer to VQ_PAIRS_SET");
		cpu_relax();
	}
	memory_barrier();
	if (ctrl_ack != 0)
		fail("VQ_PAIRS_SET not acknowledged");
	console_write("netkv: pairs=");
	console_write_dec(pair_count);
	console_write(" acknowledged\n");
}

static void open_net(void)
{
	const char *error = 0;
	uint32_t features = VIRTIO_NET_F_MAC;

	if (pair_count > 1)
		features |= VIRTIO_NET_F_MQ | VIRTIO_NET_F_CTRL_VQ;
	if (virtio_pci_find(VIRTIO_PCI_ID(VIRTIO_ID_NET), &net, &error) ||
	    virtio_pci_negotiate(&net, features, &error))
		fail(error);
	for (int i = 0; i < 6; i++)
		my_mac[i] = net.device_config[i];
	for (unsigned i = 0; i < pair_count; i++)
		open_pair(i);
	volatile uint16_t *ctrl_notify = 0;
	uint16_t ctrl_queue = 0;
	if (pair_count > 1) {
		uint16_t max_pairs = (uint16_t)(net.device_config[8] | net.device_config[9] << 8);
		if (max_pairs < pair_count)
			fail("the device has fewer queue pairs than pairs=");
		ctrl_queue = (uint16_t)(2 * max_pairs);
		ctrl.avail.flags = AVAIL_F_NO_INTERRUPT;
		ctrl_notify = virtio_pci_queue(&net, ctrl_queue, CTRL_SIZE, ctrl.descriptors,
					       &ctrl.avail, &ctrl.used, &error);
		if (!ctrl_notify)
			fail(error);
	}
	virtio_pci_driver_ok(&net);
	if (pair_count > 1)
		set_pairs(ctrl_notify, ctrl_queue);
	for (unsigned i = 0; i < pair_count; i++) {
		cur = &pairs[i];
		*cur->rx_notify = cur->rx_queue;
		cur->rx_posted_since_notify = 0;
	}
}

/* hotplug=1: waits until a slot comes up (the GED event, then PCIU). */
static void wait_for_hotplug(void)
{
	console_write("netkv: waiting for a hotplugged network device\n");
	for (;;) {
		if (*GED_REGISTER & GED_PCI_DEVICES_CHANGED) {
			*PSEG = 0;
			uint32_t up = *PCIU;
			(void)*PCID;
			if (up)
				return;
		}
		cpu_relax();
	}
}

/* hotplug=1: when the network device's slot is asked to go down, ejects it
 * as its _EJ0 does, waits until it is gone and serves no more. */
static void check_unplug(void)
{
	if (!(*GED_REGISTER & GED_PCI_DEVICES_CHANGED))
		return;
	*PSEG = 0;
	(void)*PCIU;
	if (!(*PCID & 1u << net.device))
		return;
	console_write("netkv: eject device=");
	console_write_dec(net.device);
	console_write("\n");
	*B0EJ = 1u << net.device;
	while (pci_config_read(net.device, 0, 0) != 0xffffffffu)
		cpu_relax();
	console_write("netkv: device gone\n");
	for (;;)
		cpu_relax();
}

static void report(void)
{
	console_write("netkv served=");
	console_write_dec(served);
	console_write(" keys=");
	console_write_dec(table_keys);
	console_write(" frames=");
	console_write_dec(frames);
	console_write(" ignored=");
	console_write_dec(ignored);
	if (pair_count > 1) {
		console_write(" pair_served=");
		for (unsigned i = 0; i < pair_count; i++) {
			if (i)
				console_putc(',');
			console_write_dec(pairs[i].served);
		}
	}
	console_write("\n");
}

void guest_main(void)
{
	uint64_t slots = param_u64("slots", 65536);
	uint64_t report_ms = param_u64("report_ms", 1000);
	const char *ip = param_str("ip");
	uint64_t hotplug = param_u64("hotplug", 0);
	uint64_t want_pairs = param_u64("pairs", 1);
	struct ticker ticker, hotplug_ticker;

	boot_id = tsc_read() | 1;
	if (parse_ipv4(ip ? ip : "192.168.249.2", my_ip))
		fail("ip= is not a dotted IPv4 address");
	my_port = (uint16_t)param_u64("port", 7777);
	if (slots < 2 || (slots & (slots - 1)) || slots > (1ull << 24))
		fail("slots= must be a power of two from 2 to 2^24");
	if (want_pairs < 1 || want_pairs > MAX_PAIRS)
		fail("pairs= must be from 1 to 2");
	pair_count = (unsigned)want_pairs;
	table_mask = slots - 1;
	uint64_t bytes = slots * sizeof(struct slot);
	table = (struct slot *)((ram_free_start() + 0xfff) & ~0xfffull);
	if (!ram_contains((uint64_t)table, bytes))
		fail("not enough RAM for the table");
	memset(table, 0, bytes);
	console_write("netkv: boot id=");
	console_write_hex(boot_id);
	console_write("\n");
	if (hotplug)
		wait_for_hotplug();
	open_net();
	console_write("netkv: ready mac=");
	for (int i = 0; i < 6; i++) {
		static const char hex[] = "0123456789abcdef";
		if (i)
			console_putc(':');
		console_putc(hex[my_mac[i] >> 4]);
		console_putc(hex[my_mac[i] & 15]);
	}
	console_write(" ip=");
	for (int i = 0; i < 4; i++) {
		if (i)
			console_putc('.');
		console_write_dec(my_ip[i]);
	}
	console_write(" port=");
	console_write_dec(my_port);
	console_write("\n");

	ticker_start(&ticker, report_ms ? report_ms : 1000);
	ticker_start(&hotplug_ticker, HOTPLUG_POLL_MS);
	for (;;) {
		for (unsigned i = 0; i < pair_count; i++) {
			cur = &pairs[i];
			uint16_t sent_before = cur->tx_posted;
			while (cur->rx_seen != *(volatile uint16_t *)&cur->rx.used.index) {
				memory_barrier();
				struct virtq_used_element used =
					cur->rx.used.ring[cur->rx_seen % RX_SIZE];
				cur->rx_seen++;
				if (used.id < RX_SIZE && used.length > NET_HDR_LEN &&
				    used.length <= RX_BUFFER)
					handle(cur->rx_buffers[used.id] + NET_HDR_LEN,
					       used.length - NET_HDR_LEN);
				else
					ignored++;
				rx_post((uint16_t)(used.id % RX_SIZE));
			}
			if (cur->tx_posted != sent_before) {
				memory_barrier();
				*cur->tx_notify = cur->tx_queue;
			}
			if (cur->rx_posted_since_notify >= RX_SIZE / 2) {
				memory_barrier();
				*cur->rx_notify = cur->rx_queue;
				cur->rx_posted_since_notify = 0;
			}
		}
		if (report_ms && ticker_due(&ticker))
			report();
		if (hotplug && ticker_due(&hotplug_ticker))
			check_unplug();
		cpu_relax();
	}
}
