/*
 * vfiotest: drive a PCI device from guest userspace through VFIO.
 *
 * Built statically on the host (vfio_user_server.testing.guestprog) and put into the test
 * initramfs. Works with a (virtual) IOMMU and VFIO type 1, or with VFIO no-IOMMU mode when the
 * kernel has it (then DMA addresses are physical, found through /proc/self/pagemap).
 *
 *   vfiotest [-d BDF | -i VENDOR:DEVICE] COMMAND ARGS...
 *
 *   info                                  device, group, IOMMU mode, regions, IRQ counts
 *   read BAR OFFSET WIDTH                 region pread          -> "read ... value=0x..."
 *   write BAR OFFSET WIDTH VALUE          region pwrite         -> "write ... ok"
 *   mread / mwrite (same arguments)       through an mmap of the BAR
 *   irq msix|msi|intx VECTOR 'write BAR OFF WIDTH VALUE' TIMEOUT_MS
 *                                         SET_IRQS with an eventfd, trigger, wait, count
 *                                         ('write ...; write ...': set-up writes first)
 *   dma-to-device LEN SEED                guest buffer (pattern) -> device buffer
 *   dma-from-device LEN SEED              device buffer (pattern, written by BAR) -> guest
 *
 * The device is bound to vfio-pci (driver_override) when it is not already. BAR is a VFIO
 * region index (0-5 BARs, 7 config space). Numbers take C syntax (0x.., decimal). Each
 * command prints one line of "key=value" words and exits 0, or prints "error: ..." on stderr
 * and exits 1. The pattern byte i of SEED is (SEED * 31 + i * 7 + (i >> 8)) & 0xff.
 *
 * This is a test tool for a throwaway guest: it does no cleanup beyond what closing the
 * VFIO files does (which resets the device).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <linux/vfio.h>

/* Sample device registers (vfio_user_server/sample.py). */
#define REG_ID 0x00
#define REG_DMA_ADDR 0x10
#define REG_DMA_LEN 0x18
#define REG_DMA_CMD 0x1c
#define REG_DMA_STAT 0x20
#define BUFFER_OFFSET 0x800
#define BUFFER_SIZE 0x800
#define DMA_TO_DEVICE 1
#define DMA_FROM_DEVICE 2
#define STAT_DONE 2
#define STAT_ERROR 3

#define DEFAULT_IOVA 0x10000000ULL
#define PAGE 4096UL

static const char *prog = "vfiotest";

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

static void die(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: error: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static uint64_t num(const char *s, const char *what)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s || *end)
		die("bad %s: %s", what, s);
	return v;
}

/* Bounded string copy (snprintf "%s" trips -Wformat-truncation). */
static void scopy(char *dst, size_t n, const char *src)
{
	size_t len = strnlen(src, n - 1);
	memcpy(dst, src, len);
	dst[len] = 0;
}

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---------------------------------------------------------------------------------------- */
/* sysfs */

static int read_file(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = 0;
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		buf[--n] = 0;
	return 0;
}

static void write_file(const char *path, const char *value, int must)
{
	int fd = open(path, O_WRONLY);
	if (fd < 0) {
		if (must)
			die("open %s: %s", path, strerror(errno));
		return;
	}
	ssize_t n = write(fd, value, strlen(value));
	if (n < 0 && must)
		die("write '%s' to %s: %s", value, path, strerror(errno));
	close(fd);
}

static unsigned long sysfs_hex(const char *bdf, const char *attr)
{
	char path[PATH_MAX], buf[64];
	snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/%s", bdf, attr);
	if (read_file(path, buf, sizeof buf))
		return ~0UL;
	return strtoul(buf, NULL, 16);
}

static void find_device(unsigned vendor, unsigned device, char *out, size_t len)
{
	DIR *d = opendir("/sys/bus/pci/devices");
	if (!d)
		die("opendir /sys/bus/pci/devices: %s", strerror(errno));
	struct dirent *e;
	char best[64] = "";
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		if (sysfs_hex(e->d_name, "vendor") == vendor &&
		    sysfs_hex(e->d_name, "device") == device &&
		    (!best[0] || strcmp(e->d_name, best) < 0))
			scopy(best, sizeof best, e->d_name);
	}
	closedir(d);
	if (!best[0])
		die("no PCI device %04x:%04x", vendor, device);
	scopy(out, len, best);
}

static void current_driver(const char *bdf, char *out, size_t len)
{
	char path[PATH_MAX], link[PATH_MAX];
	snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver", bdf);
	ssize_t n = readlink(path, link, sizeof link - 1);
	if (n < 0) {
		out[0] = 0;
		return;
	}
	link[n] = 0;
	const char *base = strrchr(link, '/');
	scopy(out, len, base ? base + 1 : link);
}

static void bind_vfio(const char *bdf)
{
	char drv[128], path[PATH_MAX];
	current_driver(bdf, drv, sizeof drv);
	if (!strcmp(drv, "vfio-pci"))
		return;
	if (access("/sys/bus/pci/drivers/vfio-pci", F_OK))
		die("the vfio-pci driver is not loaded");
	if (drv[0]) {
		snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver/unbind", bdf);
		write_file(path, bdf, 1);
	}
	snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver_override", bdf);
	write_file(path, "vfio-pci", 1);
	write_file("/sys/bus/pci/drivers_probe", bdf, 0);
	current_driver(bdf, drv, sizeof drv);
	if (strcmp(drv, "vfio-pci"))
		die("%s did not bind to vfio-pci (driver '%s'); see dmesg", bdf, drv);
}

/* ---------------------------------------------------------------------------------------- */
/* VFIO */

struct dev {
	char bdf[64];
	int container, group, fd;
	int noiommu;
	int group_id;
	struct vfio_region_info regions[VFIO_PCI_NUM_REGIONS];
	void *maps[VFIO_PCI_NUM_REGIONS];
};

static void open_device(struct dev *d)
{
	char path[PATH_MAX], link[PATH_MAX];
	bind_vfio(d->bdf);
	snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", d->bdf);
	ssize_t n = readlink(path, link, sizeof link - 1);
	if (n < 0)
		die("%s has no IOMMU group (no IOMMU and no VFIO no-IOMMU mode?)", d->bdf);
	link[n] = 0;
	d->group_id = atoi(strrchr(link, '/') + 1);

	d->container = open("/dev/vfio/vfio", O_RDWR);
	if (d->container < 0)
		die("open /dev/vfio/vfio: %s", strerror(errno));
	if (ioctl(d->container, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
		die("unknown VFIO API version");
	snprintf(path, sizeof path, "/dev/vfio/%d", d->group_id);
	d->group = open(path, O_RDWR);
	if (d->group < 0) {
		snprintf(path, sizeof path, "/dev/vfio/noiommu-%d", d->group_id);
		d->group = open(path, O_RDWR);
		if (d->group < 0)
			die("open VFIO group %d: %s", d->group_id, strerror(errno));
		d->noiommu = 1;
	}
	struct vfio_group_status status = {.argsz = sizeof status};
	if (ioctl(d->group, VFIO_GROUP_GET_STATUS, &status))
		die("VFIO_GROUP_GET_STATUS: %s", strerror(errno));
	if (!(status.flags & VFIO_GROUP_FLAGS_VIABLE))
		die("VFIO group %d is not viable (other devices bound to host drivers)", d->group_id);
	if (ioctl(d->group, VFIO_GROUP_SET_CONTAINER, &d->container))
		die("VFIO_GROUP_SET_CONTAINER: %s", strerror(errno));
	int type = d->noiommu ? VFIO_NOIOMMU_IOMMU : VFIO_TYPE1v2_IOMMU;
	if (!d->noiommu && ioctl(d->container, VFIO_CHECK_EXTENSION, type) != 1)
		type = VFIO_TYPE1_IOMMU;
	if (ioctl(d->container, VFIO_SET_IOMMU, type))
		die("VFIO_SET_IOMMU(%d): %s", type, strerror(errno));
	d->fd = ioctl(d->group, VFIO_GROUP_GET_DEVICE_FD, d->bdf);
	if (d->fd < 0)
		die("VFIO_GROUP_GET_DEVICE_FD %s: %s", d->bdf, strerror(errno));
	for (unsigned i = 0; i < VFIO_PCI_NUM_REGIONS; i++) {
		struct vfio_region_info *r = &d->regions[i];
		r->argsz = sizeof *r;
		r->index = i;
		if (ioctl(d->fd, VFIO_DEVICE_GET_REGION_INFO, r))
			r->size = 0;
	}
}

static struct vfio_region_info *region(struct dev *d, uint64_t bar, uint64_t off, uint64_t w)
{
	if (bar >= VFIO_PCI_NUM_REGIONS || !d->regions[bar].size)
		die("no region %" PRIu64, bar);
	if (w != 1 && w != 2 && w != 4 && w != 8)
		die("bad width %" PRIu64, w);
	if (off + w > d->regions[bar].size)
		die("offset %#" PRIx64 " width %" PRIu64 " outside region %" PRIu64 " (%#llx bytes)",
		    off, w, bar, (unsigned long long)d->regions[bar].size);
	return &d->regions[bar];
}

static uint64_t reg_read(struct dev *d, uint64_t bar, uint64_t off, uint64_t w)
{
	struct vfio_region_info *r = region(d, bar, off, w);
	uint64_t v = 0;
	ssize_t n = pread(d->fd, &v, w, r->offset + off);
	if (n != (ssize_t)w)
		die("pread region %" PRIu64 " offset %#" PRIx64 ": %s", bar, off,
		    n < 0 ? strerror(errno) : "short read");
	return v;
}

static void reg_write(struct dev *d, uint64_t bar, uint64_t off, uint64_t w, uint64_t v)
{
	struct vfio_region_info *r = region(d, bar, off, w);
	ssize_t n = pwrite(d->fd, &v, w, r->offset + off);
	if (n != (ssize_t)w)
		die("pwrite region %" PRIu64 " offset %#" PRIx64 ": %s", bar, off,
		    n < 0 ? strerror(errno) : "short write");
}

static volatile void *bar_map(struct dev *d, uint64_t bar, uint64_t off, uint64_t w)
{
	struct vfio_region_info *r = region(d, bar, off, w);
	if (!(r->flags & VFIO_REGION_INFO_FLAG_MMAP))
		die("region %" PRIu64 " cannot be mmapped (flags %#x)", bar, r->flags);
	if (!d->maps[bar]) {
		void *p = mmap(NULL, r->size, PROT_READ | PROT_WRITE, MAP_SHARED, d->fd, r->offset);
		if (p == MAP_FAILED)
			die("mmap region %" PRIu64 ": %s", bar, strerror(errno));
		d->maps[bar] = p;
	}
	return (volatile char *)d->maps[bar] + off;
}

static uint64_t mmio_read(struct dev *d, uint64_t bar, uint64_t off, uint64_t w)
{
	volatile void *p = bar_map(d, bar, off, w);
	switch (w) {
	case 1: return *(volatile uint8_t *)p;
	case 2: return *(volatile uint16_t *)p;
	case 4: return *(volatile uint32_t *)p;
	default: return *(volatile uint64_t *)p;
	}
}

static void mmio_write(struct dev *d, uint64_t bar, uint64_t off, uint64_t w, uint64_t v)
{
	volatile void *p = bar_map(d, bar, off, w);
	switch (w) {
	case 1: *(volatile uint8_t *)p = (uint8_t)v; break;
	case 2: *(volatile uint16_t *)p = (uint16_t)v; break;
	case 4: *(volatile uint32_t *)p = (uint32_t)v; break;
	default: *(volatile uint64_t *)p = v; break;
	}
	__sync_synchronize();
}

/* COMMAND: memory and I/O decoding and bus mastering (vfio-pci leaves mastering off). */
static void enable_bus_master(struct dev *d)
{
	uint64_t cmd = reg_read(d, VFIO_PCI_CONFIG_REGION_INDEX, 4, 2);
	reg_write(d, VFIO_PCI_CONFIG_REGION_INDEX, 4, 2, cmd | 0x6);
}

/* ---------------------------------------------------------------------------------------- */
/* commands */

static void print_access(const char *what, uint64_t bar, uint64_t off, uint64_t w)
{
	printf("%s bar=%" PRIu64 " offset=%#" PRIx64 " width=%" PRIu64, what, bar, off, w);
}

static int cmd_info(struct dev *d)
{
	printf("info device=%s group=%d mode=%s vendor=%#06lx device_id=%#06lx", d->bdf,
	       d->group_id, d->noiommu ? "noiommu" : "type1", sysfs_hex(d->bdf, "vendor"),
	       sysfs_hex(d->bdf, "device"));
	for (unsigned i = 0; i < VFIO_PCI_NUM_REGIONS; i++)
		if (d->regions[i].size)
			printf(" region%u=%#llx/%#x", i, (unsigned long long)d->regions[i].size,
			       d->regions[i].flags);
	for (unsigned i = 0; i < VFIO_PCI_NUM_IRQS; i++) {
		struct vfio_irq_info irq = {.argsz = sizeof irq, .index = i};
		if (!ioctl(d->fd, VFIO_DEVICE_GET_IRQ_INFO, &irq) && irq.count)
			printf(" irq%u=%u/%#x", i, irq.count, irq.flags);
	}
	printf("\n");
	return 0;
}

static void set_irqs(struct dev *d, unsigned index, unsigned action, unsigned start,
		     unsigned count, const int *fds)
{
	size_t sz = sizeof(struct vfio_irq_set) + sizeof(int) * count;
	struct vfio_irq_set *set = calloc(1, sz);
	if (!set)
		die("out of memory");
	set->argsz = sz;
	set->index = index;
	set->start = start;
	set->count = count;
	set->flags = action | (fds ? VFIO_IRQ_SET_DATA_EVENTFD : VFIO_IRQ_SET_DATA_NONE);
	if (fds)
		memcpy(set->data, fds, sizeof(int) * count);
	if (ioctl(d->fd, VFIO_DEVICE_SET_IRQS, set))
		die("VFIO_DEVICE_SET_IRQS index %u start %u count %u flags %#x: %s", index, start,
		    count, set->flags, strerror(errno));
	free(set);
}

/* Wait up to timeout_ms for the eventfd; return the count read (0 on timeout). */
static uint64_t wait_event(int efd, double timeout_ms)
{
	double end = now_ms() + timeout_ms;
	uint64_t total = 0;
	for (;;) {
		double left = end - now_ms();
		if (left < 0)
			left = 0;
		struct pollfd p = {.fd = efd, .events = POLLIN};
		int r = poll(&p, 1, (int)left);
		if (r < 0 && errno != EINTR)
			die("poll: %s", strerror(errno));
		if (r > 0) {
			uint64_t c;
			if (read(efd, &c, sizeof c) == sizeof c)
				total += c;
			return total;
		}
		if (left <= 0)
			return 0;
	}
}

static void parse_write(const char *spec, uint64_t *bar, uint64_t *off, uint64_t *w, uint64_t *v)
{
	char verb[16], sb[32], so[32], sw[32], sv[32];
	if (sscanf(spec, "%15s %31s %31s %31s %31s", verb, sb, so, sw, sv) != 5 ||
	    (strcmp(verb, "write") && strcmp(verb, "mwrite")))
		die("trigger must be 'write BAR OFFSET WIDTH VALUE', not '%s'", spec);
	*bar = num(sb, "BAR");
	*off = num(so, "offset");
	*w = num(sw, "width");
	*v = num(sv, "value");
}

static int cmd_irq(struct dev *d, const char *kind, uint64_t vector, const char *trigger,
		   uint64_t timeout_ms)
{
	unsigned index;
	if (!strcmp(kind, "msix"))
		index = VFIO_PCI_MSIX_IRQ_INDEX;
	else if (!strcmp(kind, "msi"))
		index = VFIO_PCI_MSI_IRQ_INDEX;
	else if (!strcmp(kind, "intx"))
		index = VFIO_PCI_INTX_IRQ_INDEX;
	else
		die("interrupt type must be msix, msi or intx, not %s", kind);
	struct vfio_irq_info info = {.argsz = sizeof info, .index = index};
	if (ioctl(d->fd, VFIO_DEVICE_GET_IRQ_INFO, &info))
		die("VFIO_DEVICE_GET_IRQ_INFO %s: %s", kind, strerror(errno));
	if (vector >= info.count)
		die("%s has %u vectors, no vector %" PRIu64, kind, info.count, vector);
	/* "write ...; write ...": all but the last are set-up writes, done first (in the same
	 * open of the device: vfio-pci may reset it on the next one). */
	char spec[512];
	if (strlen(trigger) >= sizeof spec)
		die("trigger too long");
	strcpy(spec, trigger);
	char *last = spec;
	for (char *semi; (semi = strchr(last, ';')) != NULL; last = semi + 1) {
		uint64_t sbar, soff, sw, sv;
		*semi = 0;
		parse_write(last, &sbar, &soff, &sw, &sv);
		reg_write(d, sbar, soff, sw, sv);
	}
	uint64_t bar, off, w, v;
	parse_write(last, &bar, &off, &w, &v);

	int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (efd < 0)
		die("eventfd: %s", strerror(errno));
	/* Enable vectors 0..VECTOR; only VECTOR gets our eventfd. MSI wants a power of two. */
	unsigned count = (unsigned)vector + 1;
	if (index == VFIO_PCI_MSI_IRQ_INDEX)
		while (count & (count - 1))
			count++;
	int fds[64];
	if (count > 64)
		die("too many vectors");
	for (unsigned i = 0; i < count; i++)
		fds[i] = i == vector ? efd : -1;
	/* MSI and MSI-X are memory writes by the device: they need bus mastering. */
	if (index != VFIO_PCI_INTX_IRQ_INDEX)
		enable_bus_master(d);
	set_irqs(d, index, VFIO_IRQ_SET_ACTION_TRIGGER, 0, count, fds);

	double t0 = now_ms();
	reg_write(d, bar, off, w, v);
	uint64_t first = wait_event(efd, (double)timeout_ms);
	double latency = now_ms() - t0;
	if (!first)
		die("no %s interrupt on vector %" PRIu64 " within %" PRIu64 " ms", kind, vector,
		    timeout_ms);
	/* Anything more that arrives shortly after (there should be none for an edge). */
	uint64_t extra = wait_event(efd, 50);
	printf("irq type=%s vector=%" PRIu64 " count=%" PRIu64 " latency_ms=%.1f", kind, vector,
	       first + extra, latency);
	if (index == VFIO_PCI_INTX_IRQ_INDEX) {
		/* The line is still asserted: vfio-pci masked it; unmasking must fire again. */
		set_irqs(d, index, VFIO_IRQ_SET_ACTION_UNMASK, 0, 1, NULL);
		uint64_t second = wait_event(efd, (double)timeout_ms);
		printf(" after_unmask=%" PRIu64, second);
		if (!second) {
			printf("\n");
			fflush(stdout);
			die("no second INTx interrupt after unmasking a still-asserted line");
		}
	}
	printf("\n");
	set_irqs(d, index, VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, NULL);
	close(efd);
	return 0;
}

static uint8_t pattern(uint64_t seed, size_t i)
{
	return (uint8_t)(seed * 31 + i * 7 + (i >> 8));
}

struct dmabuf {
	uint8_t *p;
	size_t size;
	uint64_t iova;
};

static uint64_t phys_addr(void *va)
{
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0)
		die("open /proc/self/pagemap: %s", strerror(errno));
	uint64_t entry;
	off_t pos = (off_t)((uintptr_t)va / PAGE * 8);
	if (pread(fd, &entry, 8, pos) != 8)
		die("pread pagemap: %s", strerror(errno));
	close(fd);
	if (!(entry & (1ULL << 63)))
		die("page not present");
	uint64_t pfn = entry & ((1ULL << 55) - 1);
	if (!pfn)
		die("pagemap gives no PFN (need CAP_SYS_ADMIN)");
	return pfn * PAGE + (uintptr_t)va % PAGE;
}

static void dma_alloc(struct dev *d, struct dmabuf *b, size_t len, uint64_t iova)
{
	b->size = (len + PAGE - 1) / PAGE * PAGE;
	if (!b->size)
		b->size = PAGE;
	b->p = mmap(NULL, b->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED,
		    -1, 0);
	if (b->p == MAP_FAILED)
		die("mmap DMA buffer: %s", strerror(errno));
	memset(b->p, 0, b->size);
	if (mlock(b->p, b->size))
		die("mlock: %s", strerror(errno));
	if (d->noiommu) {
		if (b->size > PAGE)
			die("no-IOMMU mode: DMA length must fit one page");
		b->iova = phys_addr(b->p);
		return;
	}
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof map,
		.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)b->p,
		.iova = iova,
		.size = b->size,
	};
	if (ioctl(d->container, VFIO_IOMMU_MAP_DMA, &map))
		die("VFIO_IOMMU_MAP_DMA iova %#" PRIx64 ": %s", iova, strerror(errno));
	b->iova = iova;
}

static void dma_free(struct dev *d, struct dmabuf *b)
{
	if (!d->noiommu) {
		struct vfio_iommu_type1_dma_unmap unmap = {
			.argsz = sizeof unmap, .iova = b->iova, .size = b->size};
		if (ioctl(d->container, VFIO_IOMMU_UNMAP_DMA, &unmap))
			die("VFIO_IOMMU_UNMAP_DMA: %s", strerror(errno));
	}
	munmap(b->p, b->size);
}

static uint64_t run_dma(struct dev *d, uint64_t iova, size_t len, unsigned cmd, uint64_t timeout_ms)
{
	reg_write(d, 0, REG_DMA_ADDR, 4, iova & 0xffffffff);
	reg_write(d, 0, REG_DMA_ADDR + 4, 4, iova >> 32);
	reg_write(d, 0, REG_DMA_LEN, 4, len);
	reg_write(d, 0, REG_DMA_CMD, 4, cmd);
	double end = now_ms() + (double)timeout_ms;
	uint64_t stat;
	for (;;) {
		stat = reg_read(d, 0, REG_DMA_STAT, 4);
		if (stat == STAT_DONE || stat == STAT_ERROR || now_ms() > end)
			break;
		usleep(1000);
	}
	if (stat != STAT_DONE)
		die("DMA command %u did not complete: status %" PRIu64, cmd, stat);
	return stat;
}

static void print_hex(const uint8_t *p, size_t len)
{
	uint32_t sum = 0;
	for (size_t i = 0; i < len; i++)
		sum = sum * 31 + p[i];
	printf(" sum=%08x hex=", sum);
	for (size_t i = 0; i < len; i++)
		printf("%02x", p[i]);
}

static void check_len(uint64_t len)
{
	if (!len || len > BUFFER_SIZE || len % 4)
		die("DMA length must be a multiple of 4 in 4..%d", BUFFER_SIZE);
}

static int cmd_dma_to_device(struct dev *d, uint64_t len, uint64_t seed, uint64_t iova)
{
	check_len(len);
	struct dmabuf b;
	dma_alloc(d, &b, len, iova);
	for (size_t i = 0; i < len; i++)
		b.p[i] = pattern(seed, i);
	enable_bus_master(d);
	run_dma(d, b.iova, len, DMA_TO_DEVICE, 10000);
	/* Read the device buffer back through the BAR and compare. */
	uint8_t *got = malloc(len);
	for (size_t i = 0; i < len; i += 4) {
		uint32_t v = (uint32_t)reg_read(d, 0, BUFFER_OFFSET + i, 4);
		memcpy(got + i, &v, 4);
	}
	for (size_t i = 0; i < len; i++)
		if (got[i] != b.p[i])
			die("device buffer byte %zu is %#x, sent %#x", i, got[i], b.p[i]);
	printf("dma-to-device len=%" PRIu64 " seed=%" PRIu64 " iova=%#" PRIx64 " mode=%s", len, seed,
	       b.iova, d->noiommu ? "noiommu" : "type1");
	print_hex(got, len);
	printf("\n");
	free(got);
	dma_free(d, &b);
	return 0;
}

static int cmd_dma_from_device(struct dev *d, uint64_t len, uint64_t seed, uint64_t iova)
{
	check_len(len);
	struct dmabuf b;
	dma_alloc(d, &b, len, iova);
	memset(b.p, 0xee, b.size);
	for (size_t i = 0; i < len; i += 4) {
		uint32_t v = 0;
		for (size_t k = 0; k < 4; k++)
			v |= (uint32_t)pattern(seed, i + k) << (8 * k);
		reg_write(d, 0, BUFFER_OFFSET + i, 4, v);
	}
	enable_bus_master(d);
	run_dma(d, b.iova, len, DMA_FROM_DEVICE, 10000);
	for (size_t i = 0; i < len; i++)
		if (b.p[i] != pattern(seed, i))
			die("guest buffer byte %zu is %#x, device had %#x", i, b.p[i], pattern(seed, i));
	if (len < b.size && b.p[len] != 0xee)
		die("DMA wrote past its length");
	printf("dma-from-device len=%" PRIu64 " seed=%" PRIu64 " iova=%#" PRIx64 " mode=%s", len,
	       seed, b.iova, d->noiommu ? "noiommu" : "type1");
	print_hex(b.p, len);
	printf("\n");
	dma_free(d, &b);
	return 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: %s [-d BDF | -i VENDOR:DEVICE] [-a IOVA] COMMAND ARGS\n"
		"  info\n"
		"  read|mread BAR OFFSET WIDTH\n"
		"  write|mwrite BAR OFFSET WIDTH VALUE\n"
		"  irq msix|msi|intx VECTOR 'write BAR OFFSET WIDTH VALUE' TIMEOUT_MS\n"
		"  dma-to-device|dma-from-device LEN SEED\n",
		prog);
	exit(2);
}

int main(int argc, char **argv)
{
	struct dev d;
	memset(&d, 0, sizeof d);
	unsigned vendor = 0x1b36, device = 0x7000;
	uint64_t iova = DEFAULT_IOVA;
	int opt;
	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt(argc, argv, "+d:i:a:h")) != -1) {
		switch (opt) {
		case 'd':
			scopy(d.bdf, sizeof d.bdf, optarg);
			break;
		case 'i':
			if (sscanf(optarg, "%x:%x", &vendor, &device) != 2)
				die("bad -i %s (want VENDOR:DEVICE in hex)", optarg);
			break;
		case 'a':
			iova = num(optarg, "IOVA");
			break;
		default:
			usage();
		}
	}
	argc -= optind;
	argv += optind;
	if (argc < 1)
		usage();
	if (!d.bdf[0])
		find_device(vendor, device, d.bdf, sizeof d.bdf);
	const char *c = argv[0];
	if (!strcmp(c, "bind") && argc == 1) {
		bind_vfio(d.bdf);
		printf("bind device=%s driver=vfio-pci\n", d.bdf);
		return 0;
	}
	open_device(&d);
	if (!strcmp(c, "info") && argc == 1)
		return cmd_info(&d);
	if ((!strcmp(c, "read") || !strcmp(c, "mread")) && argc == 4) {
		uint64_t bar = num(argv[1], "BAR"), off = num(argv[2], "offset"),
			 w = num(argv[3], "width");
		uint64_t v = c[0] == 'm' ? mmio_read(&d, bar, off, w) : reg_read(&d, bar, off, w);
		print_access(c, bar, off, w);
		printf(" value=%#" PRIx64 "\n", v);
		return 0;
	}
	if ((!strcmp(c, "write") || !strcmp(c, "mwrite")) && argc == 5) {
		uint64_t bar = num(argv[1], "BAR"), off = num(argv[2], "offset"),
			 w = num(argv[3], "width"), v = num(argv[4], "value");
		if (c[0] == 'm')
			mmio_write(&d, bar, off, w, v);
		else
			reg_write(&d, bar, off, w, v);
		print_access(c, bar, off, w);
		printf(" value=%#" PRIx64 " ok\n", v);
		return 0;
	}
	if (!strcmp(c, "irq") && argc == 5)
		return cmd_irq(&d, argv[1], num(argv[2], "vector"), argv[3],
			       num(argv[4], "timeout"));
	if (!strcmp(c, "dma-to-device") && argc == 3)
		return cmd_dma_to_device(&d, num(argv[1], "length"), num(argv[2], "seed"), iova);
	if (!strcmp(c, "dma-from-device") && argc == 3)
		return cmd_dma_from_device(&d, num(argv[1], "length"), num(argv[2], "seed"), iova);
	usage();
}
