/*
 * aio_qd: block I/O at a fixed queue depth from guest userspace, for bench/nvme_bench.py.
 *
 * Built statically on the host like bench/mmio_loop.c (vfio_user_server.testing.guestprog's
 * CFLAGS) and put into the benchmark's initramfs. Linux native AIO through the raw system
 * calls (io_setup, io_submit, io_getevents: the guest has no libaio), O_DIRECT, buffers aligned
 * to 4 KiB. It keeps QD requests in flight: each completion is replaced by a new request at once.
 *
 *   aio_qd -f DEV -m randread|randwrite|read|write -b BS -q QD -n OPS [-s SPAN]
 *
 * rand*: offsets uniformly random over the first SPAN bytes (default: the device's size),
 * aligned to BS; read/write: sequential from 0, wrapping at SPAN. Writes write a pattern.
 * Prints one line:
 *   "mode=M bs=BS qd=QD ops=OPS ns=NS iops=I mbs=M"
 * (ns: CLOCK_MONOTONIC from the first submission to the last completion).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_QD 256

static void die(const char *what)
{
	fprintf(stderr, "error: %s: %s\n", what, errno ? strerror(errno) : "failed");
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* xorshift64*: reproducible offsets without libc's rand state */
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_rand(void)
{
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return rng * 0x2545F4914F6CDD1Dull;
}

int main(int argc, char **argv)
{
	const char *dev = NULL, *mode = "randread";
	long bs = 4096, qd = 1, ops = 1000;
	uint64_t span = 0;
	int opt;
	while ((opt = getopt(argc, argv, "f:m:b:q:n:s:")) != -1) {
		switch (opt) {
		case 'f': dev = optarg; break;
		case 'm': mode = optarg; break;
		case 'b': bs = strtol(optarg, NULL, 0); break;
		case 'q': qd = strtol(optarg, NULL, 0); break;
		case 'n': ops = strtol(optarg, NULL, 0); break;
		case 's': span = strtoull(optarg, NULL, 0); break;
		default:
			fprintf(stderr, "usage: aio_qd -f DEV -m MODE -b BS -q QD -n OPS [-s SPAN]\n");
			return 2;
		}
	}
	int is_write = !strcmp(mode, "randwrite") || !strcmp(mode, "write");
	int is_rand = !strncmp(mode, "rand", 4);
	if (!dev || bs <= 0 || bs % 512 || qd < 1 || qd > MAX_QD || ops < 1 ||
	    (strcmp(mode, "randread") && strcmp(mode, "randwrite") && strcmp(mode, "read") &&
	     strcmp(mode, "write"))) {
		errno = EINVAL;
		die("arguments");
	}
	int fd = open(dev, (is_write ? O_RDWR : O_RDONLY) | O_DIRECT | O_CLOEXEC);
	if (fd < 0)
		die(dev);
	if (!span) {
		if (ioctl(fd, BLKGETSIZE64, &span) < 0)
			die("BLKGETSIZE64");
	}
	uint64_t slots = span / (uint64_t)bs;
	if (!slots) {
		errno = EINVAL;
		die("span smaller than one block");
	}
	char *bufs;
	if (posix_memalign((void **)&bufs, 4096, (size_t)bs * (size_t)qd))
		die("posix_memalign");
	for (long i = 0; i < bs * qd; i++)
		bufs[i] = (char)(i * 131 + 7);

	aio_context_t ctx = 0;
	if (syscall(SYS_io_setup, qd, &ctx) < 0)
		die("io_setup");
	struct iocb cbs[MAX_QD];
	struct iocb *ptrs[MAX_QD];
	struct io_event events[MAX_QD];
	uint64_t seq = 0;
	long submitted = 0, done = 0;

#define PREP(i)                                                                       \
	do {                                                                          \
		uint64_t slot = is_rand ? next_rand() % slots : seq++ % slots;       \
		memset(&cbs[i], 0, sizeof(cbs[i]));                                   \
		cbs[i].aio_data = (uint64_t)(i);                                      \
		cbs[i].aio_lio_opcode = is_write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;  \
		cbs[i].aio_fildes = (uint32_t)fd;                                     \
		cbs[i].aio_buf = (uint64_t)(uintptr_t)(bufs + (long)(i) * bs);        \
		cbs[i].aio_nbytes = (uint64_t)bs;                                     \
		cbs[i].aio_offset = (int64_t)(slot * (uint64_t)bs);                   \
	} while (0)

	uint64_t t0 = now_ns();
	long first = qd < ops ? qd : ops;
	for (long i = 0; i < first; i++) {
		PREP(i);
		ptrs[i] = &cbs[i];
	}
	if (syscall(SYS_io_submit, ctx, first, ptrs) != first)
		die("io_submit");
	submitted = first;
	while (done < ops) {
		long got = syscall(SYS_io_getevents, ctx, 1, qd, events, NULL);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			die("io_getevents");
		}
		long again = 0;
		for (long e = 0; e < got; e++) {
			if (events[e].res != bs) {
				errno = events[e].res < 0 ? (int)-events[e].res : EIO;
				die("request");
			}
			done++;
			if (submitted < ops) {
				long i = (long)events[e].data;
				PREP(i);
				ptrs[again++] = &cbs[i];
				submitted++;
			}
		}
		if (again && syscall(SYS_io_submit, ctx, again, ptrs) != again)
			die("io_submit");
	}
	uint64_t ns = now_ns() - t0;
	double secs = (double)ns / 1e9;
	printf("mode=%s bs=%ld qd=%ld ops=%ld ns=%llu iops=%.1f mbs=%.2f\n", mode, bs, qd, ops,
	       (unsigned long long)ns, (double)ops / secs, (double)ops * (double)bs / 1e6 / secs);
	syscall(SYS_io_destroy, ctx);
	close(fd);
	return 0;
}
