/*
 * gpio_event: watch GPIO lines for edges through the GPIO character device (uAPI v2).
 *
 * Built statically on the host by the guest tests and put into the test initramfs (busybox has
 * no gpiomon). Requesting a line with edge detection makes the driver unmask that line's
 * interrupt, which is what enables the change-of-state interrupt of a PCI-IDIO-16.
 *
 *   gpio_event CHIP TIMEOUT_MS COUNT LINE...
 *
 * Requests LINE... of /dev/CHIP as inputs with both edges, prints "ready values=0x..." (the
 * lines' values, bit i for the i-th LINE) and flushes, then prints one line per event,
 * "event offset=N edge=rising|falling seq=S", until COUNT events arrived or TIMEOUT_MS passed
 * without one, and ends with "done events=E". Exit status 0 when COUNT events arrived, 2 on a
 * timeout, 1 on an error (message on stderr).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/gpio.h>

static int fail(const char *what)
{
	fprintf(stderr, "error: %s: %s\n", what, strerror(errno));
	return 1;
}

int main(int argc, char **argv)
{
	struct gpio_v2_line_request req;
	struct gpio_v2_line_values vals;
	char path[256];
	int fd, timeout_ms, count, events = 0;
	unsigned int i, n;

	if (argc < 5) {
		fprintf(stderr, "usage: %s CHIP TIMEOUT_MS COUNT LINE...\n", argv[0]);
		return 1;
	}
	snprintf(path, sizeof(path), "/dev/%s", argv[1]);
	timeout_ms = atoi(argv[2]);
	count = atoi(argv[3]);
	n = (unsigned int)(argc - 4);
	if (n > GPIO_V2_LINES_MAX) {
		fprintf(stderr, "error: too many lines\n");
		return 1;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return fail(path);
	memset(&req, 0, sizeof(req));
	for (i = 0; i < n; i++)
		req.offsets[i] = (unsigned int)strtoul(argv[4 + i], NULL, 0);
	req.num_lines = n;
	req.config.flags = GPIO_V2_LINE_FLAG_INPUT | GPIO_V2_LINE_FLAG_EDGE_RISING |
			   GPIO_V2_LINE_FLAG_EDGE_FALLING;
	req.event_buffer_size = 64;
	snprintf(req.consumer, sizeof(req.consumer), "pyvfio-test");
	if (ioctl(fd, GPIO_V2_GET_LINE_IOCTL, &req) < 0)
		return fail("GPIO_V2_GET_LINE_IOCTL");
	close(fd);

	memset(&vals, 0, sizeof(vals));
	vals.mask = (n >= 64) ? ~0ULL : ((1ULL << n) - 1);
	if (ioctl(req.fd, GPIO_V2_LINE_GET_VALUES_IOCTL, &vals) < 0)
		return fail("GPIO_V2_LINE_GET_VALUES_IOCTL");
	printf("ready values=0x%llx\n", (unsigned long long)vals.bits);
	fflush(stdout);

	while (events < count) {
		struct pollfd pfd = { .fd = req.fd, .events = POLLIN };
		struct gpio_v2_line_event ev;
		int r = poll(&pfd, 1, timeout_ms);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			return fail("poll");
		}
		if (r == 0) {
			printf("done events=%d timeout\n", events);
			return 2;
		}
		if (read(req.fd, &ev, sizeof(ev)) != (ssize_t)sizeof(ev))
			return fail("read event");
		events++;
		printf("event offset=%u edge=%s seq=%u\n", ev.offset,
		       ev.id == GPIO_V2_LINE_EVENT_RISING_EDGE ? "rising" : "falling",
		       ev.line_seqno);
		fflush(stdout);
	}
	printf("done events=%d\n", events);
	return 0;
}
