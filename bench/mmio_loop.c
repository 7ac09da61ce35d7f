/*
 * mmio_loop: time trapped BAR0 accesses to an edu device (1234:11e8) from guest userspace.
 *
 * Built statically on the host by bench/guest_mmio.py (same flags as the guest test programs)
 * and put into the benchmark initramfs. It finds the device in /sys/bus/pci/devices (or -d BDF),
 * sets COMMAND.MEMORY in config space, maps BAR0 through resource0 and times N 4-byte reads of
 * the identification register (0x00) and N 4-byte writes of the liveness register (0x04), with
 * CLOCK_MONOTONIC around each loop. Every access exits to QEMU, which forwards it to the
 * vfio-user server (REGION_READ / REGION_WRITE) and waits for the reply.
 *
 *   mmio_loop [-d BDF] [-n N] [-o OFFSET]
 *
 * -o times the register at OFFSET and writes the one after it instead (default 0: the
 * identification and liveness registers); bench/mapped_regs.py uses it for a mapped page.
 *
 * Prints one line: "bdf=... n=N read_ns=R write_ns=W id=0x..." (nanoseconds per access).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define BAR_SIZE (1UL << 20)

static void die(const char *what)
{
	fprintf(stderr, "error: %s: %s\n", what, errno ? strerror(errno) : "failed");
	exit(1);
}

static unsigned long read_hex(const char *path)
{
	char buf[32] = {0};
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || read(fd, buf, sizeof(buf) - 1) <= 0)
		die(path);
	close(fd);
	return strtoul(buf, NULL, 16);
}

static void find_edu(char *bdf, size_t len)
{
	char path[512];
	struct dirent *e;
	DIR *d = opendir("/sys/bus/pci/devices");
	if (!d)
		die("/sys/bus/pci/devices");
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vendor", e->d_name);
		if (read_hex(path) != 0x1234)
			continue;
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/device", e->d_name);
		if (read_hex(path) != 0x11e8)
			continue;
		snprintf(bdf, len, "%s", e->d_name);
		closedir(d);
		return;
	}
	errno = 0;
	die("no edu device (1234:11e8)");
}

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	char bdf[256] = "", path[512];
	long n = 20000;
	unsigned long off = 0;
	int opt, fd;
	uint16_t cmd;
	volatile uint32_t *bar;
	uint32_t id = 0;

	while ((opt = getopt(argc, argv, "d:n:o:")) != -1) {
		if (opt == 'd')
			snprintf(bdf, sizeof(bdf), "%s", optarg);
		else if (opt == 'n')
			n = strtol(optarg, NULL, 0);
		else if (opt == 'o')
			off = strtoul(optarg, NULL, 0) & (BAR_SIZE - 8) & ~3UL;
		else
			return 2;
	}
	if (!bdf[0])
		find_edu(bdf, sizeof(bdf));

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/config", bdf);
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0 || pread(fd, &cmd, 2, 4) != 2)
		die(path);
	cmd |= 0x2; /* memory space */
	if (pwrite(fd, &cmd, 2, 4) != 2)
		die(path);
	close(fd);

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource0", bdf);
	fd = open(path, O_RDWR | O_SYNC | O_CLOEXEC);
	if (fd < 0)
		die(path);
	bar = mmap(NULL, BAR_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (bar == MAP_FAILED)
		die("mmap resource0");
	close(fd);
	bar += off / 4;

	for (long i = 0; i < 100; i++) /* warm up */
		id ^= bar[0];
	double t0 = now_ns();
	for (long i = 0; i < n; i++)
		id = bar[0];
	double t1 = now_ns();
	for (long i = 0; i < n; i++)
		bar[1] = (uint32_t)i;
	(void)bar[1]; /* in case writes are posted: wait for the last one */
	double t2 = now_ns();
	printf("bdf=%s n=%ld read_ns=%.0f write_ns=%.0f id=0x%08x\n", bdf, n, (t1 - t0) / n,
	       (t2 - t1) / n, id);
	return 0;
}
