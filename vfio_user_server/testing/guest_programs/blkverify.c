/*
 * blkverify: random tagged writes to a block device, a flush after each generation.
 *
 * Built statically on the host by the guest tests (tests/e2e/test_nvme_integrity.py) and put
 * into the test initramfs.
 *
 *   blkverify DEVICE SEED NBLOCKS BATCH PROCS GENS
 *
 * Generation g = 1, 2, ... GENS (0: until killed): PROCS processes write BATCH picks of 4 KiB
 * blocks among the first NBLOCKS of DEVICE (opened O_DIRECT; pick k of generation g is block
 * pick(SEED, g, k); process p writes the picks with block % PROCS == p, so no two processes
 * write one block at once), then the parent calls fsync() on the device, which makes Linux
 * send a Flush, and prints "FLUSHED gen g" once it returned. Every 512-byte sector written
 * holds a 32-byte header ("PYVFIOIT", block, generation, sector index, little-endian u64s)
 * and 480 bytes of a splitmix64 stream seeded from (SEED, block, generation, sector), so the
 * host can tell from the image alone which write each sector comes from. The host replays
 * pick() and the stream (the constants below are its specification).
 *
 * Prints "START" first; "ERROR ..." and exit status 1 on any failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define BLOCK 4096
#define SECTOR 512
#define K_GEN 0xD1B54A32D192ED03ULL
#define K_PICK 0xABC98388FB8FAC03ULL
#define K_BLOCK 0x8CB92BA72F3D8DD7ULL
#define K_SECTOR 0x9E3779B97F4A7C15ULL

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

static uint64_t pick(uint64_t seed, uint64_t gen, uint64_t k, uint64_t nblocks)
{
	uint64_t s = seed ^ (gen * K_GEN) ^ (k * K_PICK);
	return splitmix(&s) % nblocks;
}

static void put64(unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static void fill(unsigned char *buf, uint64_t seed, uint64_t block, uint64_t gen)
{
	for (uint64_t sec = 0; sec < BLOCK / SECTOR; sec++) {
		unsigned char *p = buf + sec * SECTOR;
		uint64_t s = seed ^ (block * K_BLOCK) ^ (gen * K_GEN) ^ (sec * K_SECTOR);
		memcpy(p, "PYVFIOIT", 8);
		put64(p + 8, block);
		put64(p + 16, gen);
		put64(p + 24, sec);
		for (int i = 32; i < SECTOR; i += 8)
			put64(p + i, splitmix(&s));
	}
}

static int writer(const char *dev, uint64_t seed, uint64_t nblocks, uint64_t batch,
		  uint64_t procs, uint64_t p, uint64_t gen)
{
	unsigned char *buf;
	int fd = open(dev, O_RDWR | O_DIRECT);

	if (fd < 0 && errno == EINVAL) /* a host file system without O_DIRECT (tests) */
		fd = open(dev, O_RDWR);
	if (fd < 0 || posix_memalign((void **)&buf, BLOCK, BLOCK)) {
		printf("ERROR open %s: %s\n", dev, strerror(errno));
		return 1;
	}
	for (uint64_t k = 0; k < batch; k++) {
		uint64_t b = pick(seed, gen, k, nblocks);
		if (b % procs != p)
			continue;
		fill(buf, seed, b, gen);
		if (pwrite(fd, buf, BLOCK, (off_t)(b * BLOCK)) != BLOCK) {
			printf("ERROR write gen %" PRIu64 " block %" PRIu64 ": %s\n", gen, b,
			       strerror(errno));
			return 1;
		}
	}
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	uint64_t seed, nblocks, batch, procs, gens;
	int fd;

	if (argc != 7) {
		fprintf(stderr, "usage: blkverify DEVICE SEED NBLOCKS BATCH PROCS GENS\n");
		return 2;
	}
	seed = strtoull(argv[2], NULL, 0);
	nblocks = strtoull(argv[3], NULL, 0);
	batch = strtoull(argv[4], NULL, 0);
	procs = strtoull(argv[5], NULL, 0);
	gens = strtoull(argv[6], NULL, 0);
	if (!nblocks || !procs) {
		fprintf(stderr, "blkverify: NBLOCKS and PROCS must be positive\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IONBF, 0);
	fd = open(argv[1], O_RDWR);
	if (fd < 0) {
		printf("ERROR open %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	printf("START\n");
	for (uint64_t gen = 1; !gens || gen <= gens; gen++) {
		int failed = 0;
		for (uint64_t p = 0; p < procs; p++) {
			pid_t pid = fork();
			if (pid < 0) {
				printf("ERROR fork: %s\n", strerror(errno));
				return 1;
			}
			if (pid == 0)
				_exit(writer(argv[1], seed, nblocks, batch, procs, p, gen));
		}
		for (uint64_t p = 0; p < procs; p++) {
			int status;
			if (wait(&status) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
				failed = 1;
		}
		if (failed) {
			printf("ERROR writers of gen %" PRIu64 " failed\n", gen);
			return 1;
		}
		if (fsync(fd)) {
			printf("ERROR fsync gen %" PRIu64 ": %s\n", gen, strerror(errno));
			return 1;
		}
		printf("FLUSHED gen %" PRIu64 "\n", gen);
	}
	printf("DONE\n");
	return 0;
}
