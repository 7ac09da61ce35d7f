/*
 * nvme_feat: Get or Set Features through Linux's NVME_IOCTL_ADMIN_CMD (the guest side of
 * tests/e2e/test_nvme_guest.py's interrupt coalescing check; Linux's driver never sets them).
 *
 *   nvme_feat DEV set FID VALUE     prints "result=0x..." (completion dword 0)
 *   nvme_feat DEV get FID [CDW11]   prints "result=0x..."
 *
 * Exit status: 0, or 1 with the NVMe status or errno on stderr.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* include/uapi/linux/nvme_ioctl.h's struct nvme_passthru_cmd (nvme_admin_cmd) */
struct admin_cmd {
	uint8_t opcode, flags;
	uint16_t rsvd1;
	uint32_t nsid, cdw2, cdw3;
	uint64_t metadata, addr;
	uint32_t metadata_len, data_len;
	uint32_t cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
	uint32_t timeout_ms, result;
};

#define ADMIN_CMD _IOWR('N', 0x41, struct admin_cmd)

int main(int argc, char **argv)
{
	if (argc < 4 || (strcmp(argv[2], "set") && strcmp(argv[2], "get")) ||
	    (!strcmp(argv[2], "set") && argc != 5)) {
		fprintf(stderr, "usage: nvme_feat DEV set FID VALUE | nvme_feat DEV get FID [CDW11]\n");
		return 2;
	}
	int fd = open(argv[1], O_RDONLY);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	struct admin_cmd cmd;
	memset(&cmd, 0, sizeof(cmd));
	cmd.opcode = strcmp(argv[2], "set") ? 0x0a : 0x09;
	cmd.cdw10 = (uint32_t)strtoul(argv[3], NULL, 0);
	cmd.cdw11 = argc > 4 ? (uint32_t)strtoul(argv[4], NULL, 0) : 0;
	int rc = ioctl(fd, ADMIN_CMD, &cmd);
	if (rc < 0) {
		fprintf(stderr, "ioctl: %s\n", strerror(errno));
		return 1;
	}
	if (rc > 0) {
		fprintf(stderr, "nvme status 0x%x\n", rc);
		return 1;
	}
	printf("result=0x%x\n", cmd.result);
	return 0;
}
