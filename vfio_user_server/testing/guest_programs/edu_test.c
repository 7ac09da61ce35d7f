/*
 * edu_test: exercise QEMU's "edu" device (docs/specs/edu.rst) from guest userspace.
 *
 * Built statically on the host by the guest tests and put into the test initramfs. It binds
 * the device to uio_pci_generic (for its INTx interrupt: read() on /dev/uioN waits for one,
 * clearing COMMAND.INTX_DISABLE in config space re-enables it), maps BAR0 through
 * /sys/bus/pci/devices/BDF/resource0, and finds the physical address of a locked page through
 * /proc/self/pagemap (root; without an IOMMU, bus address = physical address) for DMA.
 *
 *   edu_test [-d BDF] [-n N] [-t TIMEOUT_MS]
 *
 * Steps, each printing one line of key=value words:
 *   id          the identification register
 *   liveness    write a value, read back its inverse
 *   factorial   N! with "raise interrupt when done", wait for the interrupt, acknowledge it
 *   raise       raise interrupt 0x40 through 0x60, wait, acknowledge through 0x64
 *   dma         4 KiB of random bytes RAM -> device buffer -> (page cleared) -> RAM, each
 *               with "interrupt when done"; checksum is FNV-1a 32 of the bytes
 * and finally "ok interrupts=K" (K: interrupts counted by uio). Exit status 0 on success, 1
 * with "error: ..." on stderr otherwise.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8
#define BAR_SIZE (1UL << 20)
#define PAGE 4096UL

#define REG_ID 0x00
#define REG_LIVENESS 0x04
#define REG_FACT 0x08
#define REG_STATUS 0x20
#define REG_IRQ_STATUS 0x24
#define REG_IRQ_RAISE 0x60
#define REG_IRQ_ACK 0x64
#define REG_DMA_SRC 0x80
#define REG_DMA_DST 0x88
#define REG_DMA_COUNT 0x90
#define REG_DMA_CMD 0x98

#define STATUS_COMPUTING 0x01
#define STATUS_IRQFACT 0x80
#define DMA_RUN 0x1
#define DMA_TO_RAM 0x2
#define DMA_IRQ 0x4
#define IRQ_FACT 0x1
#define IRQ_DMA 0x100
#define DMA_BUF 0x40000UL
#define DMA_MASK ((1ULL << 28) - 1)

static volatile uint8_t *bar;
static int uio_fd = -1;
static int config_fd = -1;
static int timeout_ms = 10000;
static uint32_t irq_total;

static void die(const char *fmt, const char *arg)
{
	fprintf(stderr, "error: ");
	fprintf(stderr, fmt, arg);
	if (errno)
		fprintf(stderr, ": %s", strerror(errno));
	fprintf(stderr, "\n");
	exit(1);
}

static uint32_t rd32(unsigned long off) { return *(volatile uint32_t *)(bar + off); }
static uint64_t rd64(unsigned long off) { return *(volatile uint64_t *)(bar + off); }
static void wr32(unsigned long off, uint32_t v) { *(volatile uint32_t *)(bar + off) = v; }
static void wr64(unsigned long off, uint64_t v) { *(volatile uint64_t *)(bar + off) = v; }

static unsigned long read_hex_file(const char *path)
{
	char buf[64] = { 0 };
	int fd = open(path, O_RDONLY);

	if (fd < 0 || read(fd, buf, sizeof(buf) - 1) < 0)
		return 0;
	close(fd);
	return strtoul(buf, NULL, 0);
}

static void write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY);

	errno = 0;
	if (fd < 0 || write(fd, text, strlen(text)) < 0)
		die("writing %s", path);
	close(fd);
}

static void find_device(char *bdf, size_t len)
{
	DIR *d = opendir("/sys/bus/pci/devices");
	struct dirent *e;
	char path[512];

	if (!d)
		die("%s", "opendir /sys/bus/pci/devices");
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vendor", e->d_name);
		if (read_hex_file(path) != EDU_VENDOR)
			continue;
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/device", e->d_name);
		if (read_hex_file(path) != EDU_DEVICE)
			continue;
		snprintf(bdf, len, "%s", e->d_name);
		closedir(d);
		return;
	}
	errno = 0;
	die("%s", "no edu device (1234:11e8) found");
}

static void open_uio(const char *bdf)
{
	char path[512];
	struct stat st;
	DIR *d;
	struct dirent *e;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver", bdf);
	if (stat(path, &st) < 0)
		write_file("/sys/bus/pci/drivers/uio_pci_generic/new_id", "1234 11e8");
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/uio", bdf);
	for (int i = 0; i < 100 && !(d = opendir(path)); i++)
		usleep(50000);
	if (!d)
		die("%s: not bound to uio_pci_generic", bdf);
	while ((e = readdir(d)) && strncmp(e->d_name, "uio", 3) != 0)
		;
	if (!e)
		die("%s: no uio device", bdf);
	snprintf(path, sizeof(path), "/dev/%s", e->d_name);
	closedir(d);
	uio_fd = open(path, O_RDWR | O_CLOEXEC);
	if (uio_fd < 0)
		die("open %s", path);
}

static void enable_bus_master(const char *bdf)
{
	char path[512];
	uint16_t cmd;
	int fd;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/config", bdf);
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0 || pread(fd, &cmd, 2, 4) != 2)
		die("read %s", path);
	cmd |= 0x6; /* memory space, bus master */
	if (pwrite(fd, &cmd, 2, 4) != 2)
		die("write %s", path);
	config_fd = fd;
}

static void map_bar(const char *bdf)
{
	char path[512];
	int fd;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource0", bdf);
	fd = open(path, O_RDWR | O_SYNC);
	if (fd < 0)
		die("open %s", path);
	bar = mmap(NULL, BAR_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (bar == MAP_FAILED)
		die("mmap %s", path);
	close(fd);
}

/*
 * Re-enable the interrupt: uio_pci_generic's handler sets COMMAND.INTX_DISABLE; userspace
 * clears it through config space (the driver has no irqcontrol).
 */
static void irq_enable(void)
{
	uint8_t high;

	if (pread(config_fd, &high, 1, 5) != 1)
		die("%s", "reading COMMAND");
	high &= (uint8_t)~0x4;
	if (pwrite(config_fd, &high, 1, 5) != 1)
		die("%s", "writing COMMAND");
}

static void wait_irq(const char *what)
{
	struct pollfd pfd = { .fd = uio_fd, .events = POLLIN };
	uint32_t count;
	int r;

	do
		r = poll(&pfd, 1, timeout_ms);
	while (r < 0 && errno == EINTR);
	if (r <= 0) {
		errno = r < 0 ? errno : 0;
		die("no interrupt for %s", what);
	}
	if (read(uio_fd, &count, sizeof(count)) != sizeof(count))
		die("%s", "reading the uio interrupt count");
	irq_total = count;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint32_t fnv1a(const uint8_t *p, size_t n)
{
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 16777619u;
	return h;
}

/* A locked page with a physical address under the device's DMA mask. */
static uint8_t *dma_page(uint64_t *phys)
{
	const size_t pages = 4096;
	uint8_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE | MAP_LOCKED, -1, 0);
	int fd = open("/proc/self/pagemap", O_RDONLY);

	if (mem == MAP_FAILED)
		die("%s", "mmap locked memory");
	if (fd < 0)
		die("%s", "open /proc/self/pagemap");
	for (size_t i = 0; i < pages; i++) {
		uint64_t entry;
		uintptr_t va = (uintptr_t)(mem + i * PAGE);

		mem[i * PAGE] = 1; /* make sure it is present */
		if (pread(fd, &entry, 8, (off_t)(va / PAGE * 8)) != 8)
			die("%s", "read /proc/self/pagemap");
		if (!(entry >> 63 & 1) || !(entry & ((1ULL << 55) - 1)))
			continue;
		*phys = (entry & ((1ULL << 55) - 1)) * PAGE;
		if (*phys + PAGE - 1 <= DMA_MASK) {
			close(fd);
			return mem + i * PAGE;
		}
	}
	errno = 0;
	die("%s", "no page below the DMA mask (or no PFNs in pagemap: not root?)");
	return NULL;
}

static void dma(uint64_t src, uint64_t dst, uint64_t count, uint64_t cmd, const char *what)
{
	wr64(REG_DMA_SRC, src);
	wr64(REG_DMA_DST, dst);
	wr64(REG_DMA_COUNT, count);
	wr64(REG_DMA_CMD, cmd | DMA_RUN | DMA_IRQ);
	wait_irq(what);
	if (rd64(REG_DMA_CMD) & DMA_RUN) {
		errno = 0;
		die("%s: DMA still running after its interrupt", what);
	}
	if (!(rd32(REG_IRQ_STATUS) & IRQ_DMA)) {
		errno = 0;
		die("%s: interrupt status lacks 0x100", what);
	}
	wr32(REG_IRQ_ACK, IRQ_DMA);
	irq_enable();
}

int main(int argc, char **argv)
{
	char bdf[256] = { 0 };
	uint32_t n = 10, expect = 1, v;
	uint64_t phys = 0;
	uint8_t *page, saved[PAGE];
	double t0;
	int opt;

	while ((opt = getopt(argc, argv, "d:n:t:")) != -1) {
		switch (opt) {
		case 'd':
			snprintf(bdf, sizeof(bdf), "%s", optarg);
			break;
		case 'n':
			n = (uint32_t)strtoul(optarg, NULL, 0);
			break;
		case 't':
			timeout_ms = atoi(optarg);
			break;
		default:
			fprintf(stderr, "usage: %s [-d BDF] [-n N] [-t TIMEOUT_MS]\n", argv[0]);
			return 1;
		}
	}
	if (!bdf[0])
		find_device(bdf, sizeof(bdf));
	open_uio(bdf);
	enable_bus_master(bdf);
	map_bar(bdf);
	irq_enable();

	v = rd32(REG_ID);
	printf("id=0x%08x bdf=%s\n", v, bdf);
	if (v != 0x010000ed) {
		errno = 0;
		die("%s", "unexpected identification");
	}
	wr32(REG_LIVENESS, 0x12345678);
	v = rd32(REG_LIVENESS);
	printf("liveness=0x%08x\n", v);
	if (v != (uint32_t)~0x12345678u) {
		errno = 0;
		die("%s", "liveness is not the inverse");
	}
	fflush(stdout);

	for (uint32_t k = 2; k <= n; k++)
		expect *= k;
	wr32(REG_STATUS, STATUS_IRQFACT);
	wr32(REG_FACT, n);
	wait_irq("factorial");
	v = rd32(REG_IRQ_STATUS);
	printf("factorial n=%u result=%u expected=%u status=0x%x irq_status=0x%x\n", n,
	       rd32(REG_FACT), expect, rd32(REG_STATUS), v);
	if (rd32(REG_FACT) != expect || (rd32(REG_STATUS) & STATUS_COMPUTING) || !(v & IRQ_FACT)) {
		errno = 0;
		die("%s", "factorial");
	}
	wr32(REG_IRQ_ACK, IRQ_FACT);
	irq_enable();
	wr32(REG_STATUS, 0);

	wr32(REG_IRQ_RAISE, 0x40);
	wait_irq("raise");
	v = rd32(REG_IRQ_STATUS);
	wr32(REG_IRQ_ACK, 0x40);
	printf("raise irq_status=0x%x after_ack=0x%x\n", v, rd32(REG_IRQ_STATUS));
	if (v != 0x40 || rd32(REG_IRQ_STATUS) != 0) {
		errno = 0;
		die("%s", "raise/acknowledge");
	}
	irq_enable();
	fflush(stdout);

	page = dma_page(&phys);
	{
		int fd = open("/dev/urandom", O_RDONLY);

		if (fd < 0 || read(fd, page, PAGE) != (ssize_t)PAGE)
			die("%s", "reading /dev/urandom");
		close(fd);
	}
	memcpy(saved, page, PAGE);
	t0 = now();
	dma(phys, DMA_BUF, PAGE, 0, "DMA to the device");
	memset(page, 0, PAGE);
	dma(DMA_BUF, phys, PAGE, DMA_TO_RAM, "DMA from the device");
	printf("dma bytes=%lu phys=0x%" PRIx64 " checksum=0x%08x roundtrip=%s ms=%.1f\n", PAGE,
	       phys, fnv1a(saved, PAGE), memcmp(saved, page, PAGE) == 0 ? "ok" : "MISMATCH",
	       (now() - t0) * 1000);
	if (memcmp(saved, page, PAGE) != 0) {
		errno = 0;
		die("%s", "DMA round trip changed the data");
	}
	printf("ok interrupts=%u\n", irq_total);
	return 0;
}
