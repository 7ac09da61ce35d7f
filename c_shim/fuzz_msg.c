/*
 * Coverage-guided fuzzing of the message reader in c_shim/msg.c (libFuzzer, clang).
 *
 *   c_shim/fuzz.sh                  # build with clang, run 10 minutes; see docs/reliability.md
 *   c_shim/fuzz.sh -max_total_time=60 -jobs=2
 *
 * Not part of CI. Each input is a byte stream cut into reads, each read with 0..3 fds:
 *
 *   input[0]  bit 7: through a real socket (1) or fed (0); bits 0-1: the size limit;
 *             bit 2: the fast path on; bits 3-6: the fast path's data limit
 *   then ops  one byte: bits 0-5 the read's length (63: two more bytes give it, up to 64 KiB),
 *             bits 6-7 its fds; then that many bytes of the stream
 *
 * Fed: the reads go to pyvfio_feed() with made-up fd numbers and every whole message is taken
 * with pyvfio_next(). Socket: the reads are sent through a socketpair, with real fds (dups of
 * one pipe end), the writer is shut, and the reader takes them with pyvfio_next_from(), checking
 * the special reads as msgshim.SocketReader does.
 *
 * What must hold, besides no sanitizer report: every fd fed leaves the reader exactly once (in
 * a message or by pyvfio_take), and no descriptor of the process is left open afterwards; a
 * message never exceeds the limit; after an error every next() is the same error; has_message()
 * says exactly whether next() returns without more input; a fast access lies inside its region
 * and limits; the buffer never grows past max(limit, first buffer) on the socket path.
 */
#define _GNU_SOURCE
#include "msg.c"

#include <fcntl.h>
#include <stdio.h>

/* assert() that NDEBUG cannot remove (some checks have side effects) */
#define assert(c) ((c) ? (void)0 : (fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, \
                                            __LINE__, #c), abort()))

/* pyvfio_serve()'s callbacks (Python's, through cffi) are never called here: the harness takes
 * messages with pyvfio_next() and pyvfio_next_from() only */
static uint64_t pyvfio_read_value(int slot, uint32_t index, uint64_t offset, uint32_t count)
{
    (void)slot, (void)index, (void)offset, (void)count;
    abort();
}
static void pyvfio_read_bytes(int slot, uint32_t index, uint64_t offset, uint32_t count)
{
    (void)slot, (void)index, (void)offset, (void)count;
    abort();
}
static void pyvfio_write_value(int slot, uint32_t index, uint64_t offset, uint32_t count,
                               uint64_t value)
{
    (void)slot, (void)index, (void)offset, (void)count, (void)value;
    abort();
}
static void pyvfio_write_bytes(int slot, uint32_t index, uint64_t offset, uint32_t count,
                               const char *data)
{
    (void)slot, (void)index, (void)offset, (void)count, (void)data;
    abort();
}
static void pyvfio_set_irqs(int slot)
{
    (void)slot;
    abort();
}

#define FAKE_FD0 100000
#define MAX_FAKE (1 << 16)

static const uint64_t limits[4] = {PYVFIO_HEADER_SIZE + 48, 4096, 64 * 1024 + 17,
                                   (1 << 20) + 4096};

struct op {
    const uint8_t *data;
    size_t n;
    int nfds;
};

static size_t parse_ops(const uint8_t *in, size_t size, struct op *ops, size_t max_ops)
{
    size_t i = 0, k = 0;

    while (i < size && k < max_ops) {
        uint8_t b = in[i++];
        size_t n = b & 0x3f;

        if (n == 0x3f && i + 2 <= size) {
            n = (size_t)in[i] | (size_t)in[i + 1] << 8;
            i += 2;
        }
        if (n > size - i)
            n = size - i;
        ops[k].data = in + i;
        ops[k].n = n;
        ops[k].nfds = b >> 6;
        i += n;
        k++;
    }
    return k;
}

static void setup_fast(struct pyvfio_reader *r, uint8_t cfg)
{
    if (!(cfg & 4))
        return;
    r->fast = 1;
    r->accepts = (uint64_t)1 << PYVFIO_CMD_REGION_READ | (uint64_t)1 << PYVFIO_CMD_REGION_WRITE
                 | (uint64_t)1 << PYVFIO_CMD_DEVICE_SET_IRQS;
    /* QEMU's INTx EOI, as msgshim.FastPath.allow_set_irqs gives it: argsz 20, NONE|UNMASK,
     * INTx, start 0, count 1 */
    static const unsigned char eoi[20] = {20, 0, 0, 0, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                          1, 0, 0, 0};
    memcpy(r->irq_set, eoi, sizeof(eoi));
    r->irq_set_len = sizeof(eoi);
    r->max_xfer = (uint64_t)1 << ((cfg >> 3) & 0xf);
    for (int i = 0; i < MAX_REGIONS; i++) {
        r->region_size[i] = i % 3 == 2 ? 0 : (uint64_t)0x100 << i;
        r->region_perm[i] = (unsigned char)(i & 3);
    }
}

/* Checks of one next() result; returns 1 to go on taking messages. */
static int check_kind(struct pyvfio_reader *r, int kind, unsigned char *out, int *ndone)
{
    (void)ndone;
    if (kind == PYVFIO_MESSAGE || kind == PYVFIO_FAST_READ || kind == PYVFIO_FAST_WRITE) {
        assert(r->size >= PYVFIO_HEADER_SIZE && r->size <= r->max_size);
        assert(r->payload >= PYVFIO_HEADER_SIZE && r->payload + r->size - PYVFIO_HEADER_SIZE
               <= r->cap);
    }
    if (kind == PYVFIO_FAST_READ || kind == PYVFIO_FAST_WRITE) {
        assert(r->fast && r->nfds == 0);
        assert(r->index < MAX_REGIONS && r->count <= r->max_xfer);
        assert(r->offset <= r->region_size[r->index]
               && r->count <= r->region_size[r->index] - r->offset);
        if (kind == PYVFIO_FAST_WRITE)
            assert(r->size == PYVFIO_HEADER_SIZE + PYVFIO_ACCESS_SIZE + r->count);
        else
            assert(r->size == PYVFIO_HEADER_SIZE + PYVFIO_ACCESS_SIZE);
    }
    if (kind == PYVFIO_FAST_SET_IRQS) {
        assert(r->fast && r->nfds == 0 && r->command == PYVFIO_CMD_DEVICE_SET_IRQS);
        assert(r->size == PYVFIO_HEADER_SIZE + r->irq_set_len && r->size <= r->max_size);
        assert(memcmp(r->buf + r->payload, r->irq_set, r->irq_set_len) == 0);
    }
    if (kind == PYVFIO_MESSAGE && out != NULL) {
        for (int i = 0; i < r->nfds; i++) {
            int fd = r->fds[i];

            assert(fd >= FAKE_FD0 && fd < FAKE_FD0 + MAX_FAKE);
            assert(out[fd - FAKE_FD0] == 1); /* fed, not yet out */
            out[fd - FAKE_FD0] = 2;
        }
    }
    return kind == PYVFIO_MESSAGE || kind == PYVFIO_FAST_READ || kind == PYVFIO_FAST_WRITE
           || kind == PYVFIO_FAST_SET_IRQS;
}

static unsigned char fake_state[MAX_FAKE];

static void run_fed(const uint8_t cfg, const struct op *ops, size_t nops)
{
    struct pyvfio_reader *r = pyvfio_reader_new(limits[cfg & 3]);
    int next_fd = FAKE_FD0, errored = 0;

    assert(r != NULL);
    setup_fast(r, cfg);
    memset(fake_state, 0, sizeof(fake_state));
    for (size_t k = 0; k < nops; k++) {
        int fds[3], rc;

        for (int i = 0; i < ops[k].nfds; i++) {
            fake_state[next_fd - FAKE_FD0] = 1;
            fds[i] = next_fd++;
        }
        rc = pyvfio_feed(r, (const char *)ops[k].data, ops[k].n, fds, ops[k].nfds);
        assert(rc == 0 || rc == PYVFIO_ERROR);
        for (;;) {
            int waiting = pyvfio_has_message(r);
            int kind = pyvfio_next(r);

            assert(kind != -ENOMEM);
            assert(waiting == (kind != PYVFIO_NONE));
            if (kind == PYVFIO_ERROR) {
                errored = 1;
                assert(pyvfio_next(r) == PYVFIO_ERROR);
            }
            if (!check_kind(r, kind, fake_state, NULL))
                break;
        }
        if (errored)
            assert(r->err != 0);
    }
    assert(pyvfio_take(r) == 0);
    for (int i = 0; i < r->nfds; i++) {
        int fd = r->fds[i];

        assert(fd >= FAKE_FD0 && fd < next_fd && fake_state[fd - FAKE_FD0] == 1);
        fake_state[fd - FAKE_FD0] = 2;
    }
    for (int fd = FAKE_FD0; fd < next_fd; fd++)
        assert(fake_state[fd - FAKE_FD0] == 2); /* every fd left exactly once */
    assert(pyvfio_next(r) == (r->err ? PYVFIO_ERROR : PYVFIO_NONE));
    pyvfio_reader_free(r);
}

static void close_all(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        assert(close(fds[i]) == 0); /* a real fd of ours, closed once */
}

/* Send what is left of op from byte *off without blocking; its fds go with its first byte.
 * Returns 1 when the op is all sent, 0 when the socket is full. */
static int send_op(int sock, const struct op *op, size_t *off, int fd)
{
    union {
        char buf[CMSG_SPACE(3 * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {(void *)(op->data + *off), op->n - *off};
    struct msghdr mh;
    ssize_t sent;

    if (op->n == 0) /* fds with no bytes never travel on a stream socket */
        return 1;
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (op->nfds > 0 && *off == 0) {
        struct cmsghdr *c;
        int fds[3] = {fd, fd, fd};

        memset(&control, 0, sizeof(control));
        mh.msg_control = control.buf;
        mh.msg_controllen = CMSG_SPACE(op->nfds * sizeof(int));
        c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(op->nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, op->nfds * sizeof(int));
    }
    sent = sendmsg(sock, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
        assert(errno == EAGAIN);
        return 0;
    }
    *off += (size_t)sent;
    return *off == op->n;
}

static void run_socket(const uint8_t cfg, const struct op *ops, size_t nops)
{
    struct pyvfio_reader *r = pyvfio_reader_new(limits[cfg & 3]);
    int sv[2], pipefd[2], probe, shut = 0;
    size_t limit, k = 0, off = 0;

    assert(r != NULL);
    setup_fast(r, cfg);
    limit = buf_limit(r);
    probe = dup(0);
    close(probe);
    /* the reader's end does not block: the writer and the reader take turns in this thread */
    assert(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    assert(fcntl(sv[1], F_SETFL, O_NONBLOCK) == 0);
    assert(pipe2(pipefd, O_CLOEXEC) == 0);
    for (;;) {
        int kind;

        while (k < nops && send_op(sv[0], &ops[k], &off, pipefd[0])) {
            k++;
            off = 0;
        }
        if (k == nops && !shut) {
            shutdown(sv[0], SHUT_WR);
            shut = 1;
        }
        kind = pyvfio_next_from(r, sv[1]);
        assert(r->cap <= limit); /* the client never grows the buffer past the limit */
        if (kind == -EAGAIN) { /* all read: the writer's turn */
            assert(!shut);
            continue;
        }
        if (kind == PYVFIO_SPECIAL) {
            if (r->rbytes == 0 || (r->rflags & MSG_CTRUNC)) { /* end of stream, cut fds */
                close_all(r->rfds, r->nrfds);
                break;
            }
            assert(r->rflags == 0 && r->nrfds > 0 && r->nrfds <= 3);
            assert(pyvfio_commit(r) == 0);
            continue;
        }
        if (kind == PYVFIO_ERROR || kind < 0) {
            assert(kind == PYVFIO_ERROR);
            break;
        }
        check_kind(r, kind, NULL, NULL);
        if (kind == PYVFIO_MESSAGE)
            close_all(r->fds, r->nfds);
    }
    assert(pyvfio_take(r) == 0);
    close_all(r->fds, r->nfds);
    pyvfio_reader_free(r);
    close(sv[0]);
    close(sv[1]);
    close(pipefd[0]);
    close(pipefd[1]);
    assert(dup(0) == probe); /* no descriptor left open */
    close(probe);
}

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t size)
{
    static struct op ops[4096];
    size_t nops;

    if (size < 1)
        return 0;
    nops = parse_ops(in + 1, size - 1, ops, sizeof(ops) / sizeof(ops[0]));
    if (in[0] & 0x80)
        run_socket(in[0], ops, nops);
    else
        run_fed(in[0], ops, nops);
    return 0;
}

#ifdef FUZZ_STANDALONE
/* Without libFuzzer (gcc): run the inputs named on the command line (a saved corpus). */
int main(int argc, char **argv)
{
    static uint8_t buf[1 << 20];

    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        size_t n;

        if (f == NULL) {
            perror(argv[i]);
            return 1;
        }
        n = fread(buf, 1, sizeof(buf), f);
        fclose(f);
        LLVMFuzzerTestOneInput(buf, n);
    }
    printf("%d inputs ran\n", argc - 1);
    return 0;
}
#endif
