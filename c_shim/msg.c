/*
 * The message path in C: the reader of vfio_user_server/protocol/framing.py (MessageReader),
 * reading straight from the socket into one reused buffer, reply encoding and sending, and the
 * REGION_READ / REGION_WRITE fast path.
 *
 * The Python reference is the specification: every rule here is the one of framing.py (size
 * limits, which message a read's fds belong to, fds in the middle of a message), and the
 * hypothesis tests in tests/test_msg_shim.py feed both the same streams. Error texts are
 * Python's: a framing error is returned as a code with its numbers, and
 * vfio_user_server/msgshim.py raises the exception framing.py builds from them.
 *
 * The wire numbers (header layout, command numbers, flags) come from pyvfio_wire.h, which
 * c_shim/build_msg.py generates from protocol/constants.py and protocol/structs.py. The
 * per-connection limits (message size, data per access, which commands the session state
 * accepts, the regions' sizes and permissions) are passed in by Python from
 * protocol/session.py and the device.
 *
 * Fast path: pyvfio_next() takes a REGION_READ / REGION_WRITE only when the Python path would
 * run the device's handler for it without an error (a request, no fds, a payload of the exact
 * shape, a state that accepts it, a region that has the access and holds it whole, no more
 * data than advertised); anything else comes out as a plain message and Python handles it,
 * error replies included. It also takes the one DEVICE_SET_IRQS request Python approved byte
 * for byte (r->irq_set: QEMU's INTx EOI, SET_IRQS(INTX, NONE|UNMASK, 0, 1), which the client
 * sends after every INTx interrupt and waits for with the vCPU stopped); its rules are
 * Python's, C only compares the bytes.
 *
 * The loop, pyvfio_serve(): reads, takes every fast access already in the buffer before the
 * next recvmsg, calls the region's Python handler through one extern "Python" callback per
 * access (which takes the GIL for the handler only), and sends the reply under the sender's
 * lock; it returns to Python for anything else: a message the fast path does not take, a
 * read with fds or at the end of the stream, an error, a callback that asked to stop, or a
 * wake-up (r->stop, or the wake fd, for a job between two messages).
 *
 * cffi releases the GIL around every call here: a blocking recvmsg or sendmsg does not hold
 * up other Python threads. One thread reads a reader; every send to a socket goes through
 * its pyvfio_sender, whose lock serialises them (device threads send requests too).
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "pyvfio_wire.h"

/* next() results */
#define PYVFIO_NONE 0
#define PYVFIO_MESSAGE 1
#define PYVFIO_FAST_READ 2
#define PYVFIO_FAST_WRITE 3
#define PYVFIO_SPECIAL 4 /* next_from(): a read for the caller to check */
#define PYVFIO_INTERRUPTED 5 /* serve(): r->stop or the wake fd (a job between two messages) */
#define PYVFIO_STOPPED 6 /* serve(): a callback asked to stop (Python holds the exception) */
#define PYVFIO_CLOSED 7 /* serve(): the sender is closed */
#define PYVFIO_FAST_SET_IRQS 8 /* the SET_IRQS request of r->irq_set (no fds) */
#define PYVFIO_ERROR (-1)

/* what a callback says in r->status (set by Python only when it is not PYVFIO_CB_REPLY) */
#define PYVFIO_CB_REPLY 0 /* answer the access (a read's value or data is there) */
#define PYVFIO_CB_DONE 1  /* Python answered (an error reply) or there is nothing to say */
#define PYVFIO_CB_STOP 2  /* stop serving: Python raises what it holds */

/* r->region_int bits: the region has handlers that take and give the value as an integer */
#define PYVFIO_INT_READ 1
#define PYVFIO_INT_WRITE 2

/* framing errors (r->err) */
#define PYVFIO_ERR_HEADER 1   /* e1 size, e2 flags, e3 max_size: framing.header_error() */
#define PYVFIO_ERR_MIDDLE 2   /* e1 first, e2 last (from the message's start), e3 its size */
#define PYVFIO_ERR_NO_DATA 3  /* fds fed with no bytes */

/* recv() results besides a positive byte count (committed) */
#define PYVFIO_RECV_SPECIAL 0 /* fds, flags or end of stream: r->rbytes, r->rflags, r->rfds */

#define MAX_REGIONS 16
#define MAX_IRQ_SET 32 /* bytes of the approved SET_IRQS payload (QEMU's: 20) */
#define MIN_ROOM (64 * 1024)
#define FIRST_CAP (256 * 1024)

struct pyvfio_mark {
    size_t first, last; /* offsets in buf of the read's first byte and the byte after its last */
    int nfds;
    int *fds;
};

struct pyvfio_reader {
    /* the message next() returned (PYVFIO_MESSAGE or a fast access) */
    uint32_t msg_id, command, size, flags, error;
    size_t payload;   /* offset of its payload in buf */
    int *fds;         /* its fds (PYVFIO_MESSAGE only) */
    int nfds;
    uint64_t offset;  /* a fast access */
    uint32_t index, count;
    /* the framing error, once there is one (sticky) */
    int err;
    uint64_t e1, e2, e3;
    /* the last special read (PYVFIO_RECV_SPECIAL) */
    size_t rbytes;
    int rflags;
    int rfds[PYVFIO_SCM_MAX_FD];
    int nrfds;
    /* limits */
    uint64_t max_size;
    /* the fast path: 0 off; commands accepted (bit per command), data limit, regions */
    int fast;
    uint64_t accepts;
    uint64_t max_xfer;
    uint64_t region_size[MAX_REGIONS];
    unsigned char region_perm[MAX_REGIONS]; /* bit 0 readable, bit 1 writable */
    unsigned char region_int[MAX_REGIONS];  /* PYVFIO_INT_READ, PYVFIO_INT_WRITE */
    /* the SET_IRQS payload Python approved (0 bytes: none), taken while r->accepts has the
     * command's bit */
    unsigned char irq_set[MAX_IRQ_SET];
    uint32_t irq_set_len;
    /* the loop: which Python object the callbacks serve, the callback's answer, the data of
     * a read answered as bytes, and the wake-ups */
    int slot;
    int status;
    unsigned char *rdata;
    size_t caprdata;
    int stop;    /* set by another thread: serve() returns PYVFIO_INTERRUPTED */
    uint64_t reads; /* recvmsg calls so far (tests, profiles) */
    int wake_fd; /* >= 0: polled with the socket before each read (readable: interrupted) */
    /* the buffer: bytes [pos, len) not yet taken */
    unsigned char *buf;
    size_t cap, pos, len;
    /* each pending read's fds */
    struct pyvfio_mark *marks;
    size_t nmarks, capmarks;
    /* fds of refused reads, until take */
    int *dropped;
    size_t ndropped, capdropped;
    /* fds of the message out (grown as needed) */
    int *out;
    size_t capout;
};

static uint64_t get_le(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void put_le(unsigned char *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++, v >>= 8)
        p[i] = (unsigned char)v;
}

struct pyvfio_reader *pyvfio_reader_new(uint64_t max_size)
{
    struct pyvfio_reader *r = calloc(1, sizeof(*r));

    if (r == NULL)
        return NULL;
    r->max_size = max_size;
    r->wake_fd = -1;
    return r;
}

static void free_marks(struct pyvfio_reader *r)
{
    for (size_t i = 0; i < r->nmarks; i++)
        free(r->marks[i].fds);
    r->nmarks = 0;
}

void pyvfio_reader_free(struct pyvfio_reader *r)
{
    if (r == NULL)
        return;
    free_marks(r);
    free(r->marks);
    free(r->dropped);
    free(r->out);
    free(r->rdata);
    free(r->buf);
    free(r);
}

static int grow(void **p, size_t *cap, size_t need, size_t item)
{
    size_t n = *cap ? *cap : 8;
    void *q;

    if (need <= *cap)
        return 0;
    while (n < need)
        n *= 2;
    q = realloc(*p, n * item);
    if (q == NULL)
        return -1;
    *p = q;
    *cap = n;
    return 0;
}

static int drop_fds(struct pyvfio_reader *r, const int *fds, int n)
{
    if (n <= 0)
        return 0;
    if (grow((void **)&r->dropped, &r->capdropped, r->ndropped + n, sizeof(int)) < 0)
        return -ENOMEM;
    memcpy(r->dropped + r->ndropped, fds, n * sizeof(int));
    r->ndropped += n;
    return 0;
}

/* Break the reader (framing.py's _fail): the marks' fds are kept for take, the bytes go. */
static int fail(struct pyvfio_reader *r, int err, uint64_t e1, uint64_t e2, uint64_t e3)
{
    for (size_t i = 0; i < r->nmarks; i++)
        drop_fds(r, r->marks[i].fds, r->marks[i].nfds);
    free_marks(r);
    r->pos = r->len = 0;
    r->err = err;
    r->e1 = e1;
    r->e2 = e2;
    r->e3 = e3;
    return PYVFIO_ERROR;
}

/* The most the buffer grows to for the client's sake: the largest message (or one read). */
static size_t buf_limit(const struct pyvfio_reader *r)
{
    return r->max_size > FIRST_CAP ? (size_t)r->max_size : FIRST_CAP;
}

/* Room for at least `room` more bytes after len: drop what was taken, then grow, never past
 * buf_limit() unless len + room needs it (a caller's feed, never a client's stream). */
static int make_room(struct pyvfio_reader *r, size_t room)
{
    if (r->pos > 0 && r->cap - r->len < room) {
        size_t shift = r->pos;

        memmove(r->buf, r->buf + shift, r->len - shift);
        r->len -= shift;
        r->pos = 0;
        for (size_t i = 0; i < r->nmarks; i++) {
            /* a read that began in a taken message keeps its place relative to the rest */
            r->marks[i].first = r->marks[i].first > shift ? r->marks[i].first - shift : 0;
            r->marks[i].last -= shift;
        }
    }
    if (r->cap - r->len < room) {
        size_t cap = r->cap ? r->cap : FIRST_CAP, limit = buf_limit(r);
        unsigned char *b;

        if (room > SIZE_MAX / 2 - r->len)
            return -ENOMEM;
        while (cap - r->len < room)
            cap *= 2;
        if (cap > limit && r->len <= limit && limit - r->len >= room)
            cap = limit;
        b = realloc(r->buf, cap);
        if (b == NULL)
            return -ENOMEM;
        r->buf = b;
        r->cap = cap;
    }
    return 0;
}

/* The bytes [len, len + n) just landed in buf with `fds`: take them (framing.py's feed). */
static int commit(struct pyvfio_reader *r, size_t n, const int *fds, int nfds)
{
    struct pyvfio_mark *m;

    if (r->err) { /* a broken stream: nothing more is read from it */
        return drop_fds(r, fds, nfds);
    }
    if (nfds > 0 && n == 0) {
        if (drop_fds(r, fds, nfds) < 0)
            return -ENOMEM;
        fail(r, PYVFIO_ERR_NO_DATA, 0, 0, 0);
        return PYVFIO_ERROR;
    }
    if (nfds > 0) {
        if (grow((void **)&r->marks, &r->capmarks, r->nmarks + 1, sizeof(*m)) < 0)
            return -ENOMEM;
        m = &r->marks[r->nmarks];
        m->fds = malloc(nfds * sizeof(int));
        if (m->fds == NULL)
            return -ENOMEM;
        memcpy(m->fds, fds, nfds * sizeof(int));
        m->nfds = nfds;
        m->first = r->len;
        m->last = r->len + n;
        r->nmarks++;
    }
    r->len += n;
    return 0;
}

/* What one read returned. Returns 0, PYVFIO_ERROR (fds without data) or -ENOMEM; the reader
 * owns the fds from here on (on -ENOMEM the caller still does). */
int pyvfio_feed(struct pyvfio_reader *r, const char *data, size_t n, const int *fds, int nfds)
{
    if (r->err)
        return drop_fds(r, fds, nfds);
    if (make_room(r, n) < 0)
        return -ENOMEM;
    if (n) /* no bytes: buf may still be NULL */
        memcpy(r->buf + r->len, data, n);
    return commit(r, n, fds, nfds);
}

/* How much room a read from the socket asks for: MIN_ROOM, or less once the buffer is as large
 * as buf_limit() (the rest of the message in hand always fits: it is never larger than
 * max_size). A client's stream never makes the buffer outgrow buf_limit(). */
static size_t recv_room(struct pyvfio_reader *r)
{
    size_t limit = buf_limit(r), pending = r->len - r->pos;

    if (pending < limit && limit - pending < MIN_ROOM)
        return limit - pending;
    return MIN_ROOM;
}

/* One recvmsg from `sock` straight into the buffer. Returns the byte count (> 0) when the read
 * brought bytes and nothing else (they are taken); PYVFIO_RECV_SPECIAL when it brought fds,
 * flags or the end of the stream (r->rbytes, r->rflags, r->rfds: the caller checks them, then
 * takes the bytes with pyvfio_commit or leaves them); -errno on failure. */
ssize_t pyvfio_recv(struct pyvfio_reader *r, int sock)
{
    union {
        char buf[CMSG_SPACE(PYVFIO_SCM_MAX_FD * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov;
    struct msghdr mh;
    struct cmsghdr *c;
    ssize_t n;

    if (make_room(r, recv_room(r)) < 0)
        return -ENOMEM;
    iov.iov_base = r->buf + r->len;
    iov.iov_len = r->cap - r->len;
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control.buf;
    mh.msg_controllen = sizeof(control.buf);
    r->reads++;
    n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC); /* a client's fds never leak into a child */
    if (n < 0)
        return -errno;
    r->nrfds = 0;
    for (c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));

            if (k > PYVFIO_SCM_MAX_FD - r->nrfds)
                k = PYVFIO_SCM_MAX_FD - r->nrfds;
            memcpy(r->rfds + r->nrfds, CMSG_DATA(c), k * sizeof(int));
            r->nrfds += k;
        }
    }
    mh.msg_flags &= ~MSG_CMSG_CLOEXEC; /* our own flag, echoed back */
    if (n > 0 && r->nrfds == 0 && mh.msg_flags == 0)
        return commit(r, (size_t)n, NULL, 0) == 0 ? n : -ENOMEM;
    r->rbytes = (size_t)n;
    r->rflags = mh.msg_flags;
    return PYVFIO_RECV_SPECIAL;
}

/* Take the bytes of the last special read with its fds (after the caller checked them). */
int pyvfio_commit(struct pyvfio_reader *r)
{
    return commit(r, r->rbytes, r->rfds, r->nrfds);
}

/* framing.py's _bind: the fds of the message at [start, end). */
static int bind_fds(struct pyvfio_reader *r, size_t start, size_t end)
{
    size_t keep = 0, total = 0;

    for (size_t i = 0; i < r->nmarks; i++) {
        struct pyvfio_mark *m = &r->marks[i];

        if (m->last > end)
            continue;
        if (!(m->first <= start && start < m->last))
            return fail(r, PYVFIO_ERR_MIDDLE, m->first - start, m->last - start, end - start);
        total += m->nfds;
    }
    if (grow((void **)&r->out, &r->capout, total ? total : 1, sizeof(int)) < 0)
        return -ENOMEM;
    r->nfds = 0;
    for (size_t i = 0; i < r->nmarks; i++) {
        struct pyvfio_mark *m = &r->marks[i];

        if (m->last > end) {
            r->marks[keep++] = *m;
        } else {
            memcpy(r->out + r->nfds, m->fds, m->nfds * sizeof(int));
            r->nfds += m->nfds;
            free(m->fds);
        }
    }
    r->nmarks = keep;
    r->fds = r->out;
    return 0;
}

/* The first read with fds that begins after `start`, the first byte of a message that has not
 * all arrived: no message starts in it (framing.py's _middle_mark). */
static const struct pyvfio_mark *middle_mark(const struct pyvfio_reader *r, size_t start)
{
    for (size_t i = 0; i < r->nmarks; i++)
        if (r->marks[i].first > start)
            return &r->marks[i];
    return NULL;
}

#define HDR(f) get_le(p + PYVFIO_HEADER_##f##_OFF, PYVFIO_HEADER_##f##_LEN)
#define ACC(f) get_le(q + PYVFIO_ACCESS_##f##_OFF, PYVFIO_ACCESS_##f##_LEN)

/* A request (posted or not), with no error flag or unknown bits: the only messages the fast
 * path takes; for anything else the Python path says what. */
static int is_plain_request(const struct pyvfio_reader *r)
{
    return (r->flags & ~(uint32_t)PYVFIO_FLAG_NO_REPLY) == PYVFIO_TYPE_COMMAND;
}

/* Is the whole message at p a REGION_READ / REGION_WRITE the Python path would hand to the
 * device's handler without an error? Then decode it into r and say which. */
static int fast_access(struct pyvfio_reader *r, const unsigned char *p)
{
    const unsigned char *q = p + PYVFIO_HEADER_SIZE;
    size_t body = r->size - PYVFIO_HEADER_SIZE;
    uint64_t offset, size;
    uint32_t index, count;
    int writing;

    if (r->command == PYVFIO_CMD_REGION_READ)
        writing = 0;
    else if (r->command == PYVFIO_CMD_REGION_WRITE)
        writing = 1;
    else
        return 0;
    if (!is_plain_request(r))
        return 0;
    if (!(r->accepts >> r->command & 1) || body < PYVFIO_ACCESS_SIZE)
        return 0;
    offset = ACC(OFFSET);
    index = (uint32_t)ACC(REGION);
    count = (uint32_t)ACC(COUNT);
    if (writing ? (count == 0 || body - PYVFIO_ACCESS_SIZE != count)
                : body != PYVFIO_ACCESS_SIZE)
        return 0;
    if (index >= MAX_REGIONS || !(r->region_perm[index] >> writing & 1))
        return 0;
    size = r->region_size[index];
    if (count > r->max_xfer || offset > size || count > size - offset)
        return 0;
    r->offset = offset;
    r->index = index;
    r->count = count;
    return writing ? PYVFIO_FAST_WRITE : PYVFIO_FAST_READ;
}

/* Is the whole message at p the SET_IRQS request Python approved (r->irq_set), while the
 * session state lets SET_IRQS through? No rule of SET_IRQS is here: Python validated these
 * exact bytes as the endpoint and irq_request.py do (msgshim.FastPath.allow_set_irqs). */
static int fast_set_irqs(const struct pyvfio_reader *r, const unsigned char *p)
{
    if (r->command != PYVFIO_CMD_DEVICE_SET_IRQS || r->irq_set_len == 0
        || r->irq_set_len > MAX_IRQ_SET || !is_plain_request(r)
        || !(r->accepts >> r->command & 1))
        return 0;
    if (r->size - PYVFIO_HEADER_SIZE != r->irq_set_len
        || memcmp(p + PYVFIO_HEADER_SIZE, r->irq_set, r->irq_set_len) != 0)
        return 0;
    return PYVFIO_FAST_SET_IRQS;
}

/* framing.py's next_message: the next whole message, or why none. Returns PYVFIO_NONE (feed
 * more), PYVFIO_MESSAGE, PYVFIO_FAST_READ / PYVFIO_FAST_WRITE /
 * PYVFIO_FAST_SET_IRQS (only with r->fast, no fds), or
 * PYVFIO_ERROR (r->err, now and on every later call); -ENOMEM. */
int pyvfio_next(struct pyvfio_reader *r)
{
    const unsigned char *p;
    size_t start, end;
    int kind;

    if (r->len - r->pos < PYVFIO_HEADER_SIZE)
        return r->err ? PYVFIO_ERROR : PYVFIO_NONE;
    start = r->pos;
    p = r->buf + start;
    r->size = (uint32_t)HDR(SIZE);
    r->flags = (uint32_t)HDR(FLAGS);
    if (r->size > r->max_size || r->size < PYVFIO_HEADER_SIZE
        || (r->flags & PYVFIO_TYPE_MASK) > PYVFIO_TYPE_REPLY)
        return fail(r, PYVFIO_ERR_HEADER, r->size, r->flags, r->max_size);
    end = start + r->size;
    if (r->len < end) {
        const struct pyvfio_mark *m = middle_mark(r, start);

        /* fds of a read inside this message: refused now, not once the client completes it
         * (until then they would pile up in the server, a read's worth at a time) */
        if (m != NULL)
            return fail(r, PYVFIO_ERR_MIDDLE, m->first - start, m->last - start, r->size);
        return PYVFIO_NONE;
    }
    r->msg_id = (uint32_t)HDR(MSG_ID);
    r->command = (uint32_t)HDR(COMMAND);
    r->error = (uint32_t)HDR(ERROR);
    r->payload = start + PYVFIO_HEADER_SIZE;
    r->nfds = 0;
    kind = PYVFIO_MESSAGE;
    if (r->nmarks) {
        int rc = bind_fds(r, start, end);

        if (rc != 0)
            return rc;
    } else if (r->fast) {
        kind = fast_access(r, p);
        if (kind == 0)
            kind = fast_set_irqs(r, p);
        if (kind == 0)
            kind = PYVFIO_MESSAGE;
    }
    if (end == r->len) /* all taken (and every read's fds: each ended by here) */
        r->pos = r->len = 0;
    else
        r->pos = end;
    return kind;
}

/* next(), reading from `sock` until there is something to say: the next message or fast
 * access, PYVFIO_ERROR, PYVFIO_SPECIAL (a read with fds, flags or at the end of the stream:
 * see pyvfio_recv; the caller checks it and calls pyvfio_commit, then this again) or -errno
 * (-EINTR included: the caller decides whether to go on). One call per message on the fast
 * path, where a read and a parse would otherwise be two, plus the Python between them. */
static int pyvfio_next_from(struct pyvfio_reader *r, int sock)
{
    for (;;) {
        int kind = pyvfio_next(r);
        ssize_t n;

        if (kind != PYVFIO_NONE)
            return kind;
        {
            /* Wait for the client in poll, not in a blocking recvmsg: a reader asleep in
             * recvmsg on a unix stream socket sleeps on the queue the kernel also wakes when
             * the peer has read what we sent (write space: EPOLLOUT), so every reply the
             * client takes would wake it once for nothing. poll asks for POLLIN only and
             * sleeps through that wake-up. The wake fd, when there is one, is watched too.
             * (No signal mask is changed here: a thread that changes its mask can take a
             * process-directed signal meant for the main thread, which Python then never
             * handles while the main thread sleeps.) */
            struct pollfd p[2] = {{sock, POLLIN, 0}, {r->wake_fd, POLLIN, 0}};
            int rc = poll(p, r->wake_fd >= 0 ? 2 : 1, -1);

            if (rc < 0)
                return -errno;
            if (r->wake_fd >= 0 && p[1].revents)
                return PYVFIO_INTERRUPTED;
        }
        n = pyvfio_recv(r, sock);
        if (n == PYVFIO_RECV_SPECIAL)
            return PYVFIO_SPECIAL;
        if (n < 0)
            return (int)n;
    }
}

/* Whether next() returns without more being fed (a whole message or an error is there). */
int pyvfio_has_message(const struct pyvfio_reader *r)
{
    size_t avail = r->len - r->pos;
    const unsigned char *p;
    uint64_t size, flags;

    if (avail < PYVFIO_HEADER_SIZE)
        return r->err != 0;
    p = r->buf + r->pos;
    size = HDR(SIZE);
    flags = HDR(FLAGS);
    /* a header next() refuses is an error waiting, whatever follows (or never does), and so
     * are fds inside a message not yet whole */
    return avail >= size || size < PYVFIO_HEADER_SIZE || size > r->max_size
           || (flags & PYVFIO_TYPE_MASK) > PYVFIO_TYPE_REPLY
           || middle_mark(r, r->pos) != NULL;
}

/* Every fd the reader still holds into r->out (r->nfds), and the buffer emptied. */
int pyvfio_take(struct pyvfio_reader *r)
{
    size_t total = r->ndropped;

    for (size_t i = 0; i < r->nmarks; i++)
        total += r->marks[i].nfds;
    if (grow((void **)&r->out, &r->capout, total ? total : 1, sizeof(int)) < 0)
        return -ENOMEM;
    if (r->ndropped) /* memcpy from NULL is undefined even for 0 bytes */
        memcpy(r->out, r->dropped, r->ndropped * sizeof(int));
    r->nfds = (int)r->ndropped;
    r->ndropped = 0;
    for (size_t i = 0; i < r->nmarks; i++) {
        memcpy(r->out + r->nfds, r->marks[i].fds, r->marks[i].nfds * sizeof(int));
        r->nfds += r->marks[i].nfds;
    }
    r->fds = r->out;
    free_marks(r);
    r->pos = r->len = 0;
    return 0;
}

/* import_pending's marks, one by one (offsets into the bytes fed since the reader was made). */
int pyvfio_add_mark(struct pyvfio_reader *r, size_t first, size_t last, const int *fds, int n)
{
    struct pyvfio_mark *m;

    if (grow((void **)&r->marks, &r->capmarks, r->nmarks + 1, sizeof(*m)) < 0)
        return -ENOMEM;
    m = &r->marks[r->nmarks];
    m->fds = malloc((n ? n : 1) * sizeof(int));
    if (m->fds == NULL)
        return -ENOMEM;
    if (n)
        memcpy(m->fds, fds, n * sizeof(int));
    m->nfds = n;
    m->first = r->pos + first;
    m->last = r->pos + last;
    r->nmarks++;
    return 0;
}

static int send_all(int sock, struct iovec *iov, int n, const int *fds, int nfds)
{
    union {
        char buf[CMSG_SPACE(PYVFIO_SCM_MAX_FD * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr mh;

    if (nfds < 0 || nfds > PYVFIO_SCM_MAX_FD)
        return -EINVAL;
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = iov;
    mh.msg_iovlen = n;
    if (nfds > 0) { /* the fds travel with the first byte */
        struct cmsghdr *c;

        memset(&control, 0, sizeof(control));
        mh.msg_control = control.buf;
        mh.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    }
    while (mh.msg_iovlen > 0) {
        ssize_t sent = sendmsg(sock, &mh, MSG_NOSIGNAL);

        if (sent < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        mh.msg_control = NULL;
        mh.msg_controllen = 0;
        while (mh.msg_iovlen > 0 && (size_t)sent >= mh.msg_iov->iov_len) {
            sent -= mh.msg_iov->iov_len;
            mh.msg_iov++;
            mh.msg_iovlen--;
        }
        if (mh.msg_iovlen > 0) {
            mh.msg_iov->iov_base = (char *)mh.msg_iov->iov_base + sent;
            mh.msg_iov->iov_len -= sent;
        }
    }
    return 0;
}

/* Encode and send one message: header, payload, fds with its first byte. 0 or -errno. */
static int pyvfio_send(int sock, uint32_t msg_id, uint32_t command, uint32_t flags,
                       uint32_t error, const char *payload, size_t n, const int *fds, int nfds)
{
    unsigned char hdr[PYVFIO_HEADER_SIZE];
    struct iovec iov[2];

    if (n > UINT32_MAX - PYVFIO_HEADER_SIZE)
        return -EMSGSIZE;
    memset(hdr, 0, sizeof(hdr));
    put_le(hdr + PYVFIO_HEADER_MSG_ID_OFF, msg_id, PYVFIO_HEADER_MSG_ID_LEN);
    put_le(hdr + PYVFIO_HEADER_COMMAND_OFF, command, PYVFIO_HEADER_COMMAND_LEN);
    put_le(hdr + PYVFIO_HEADER_SIZE_OFF, PYVFIO_HEADER_SIZE + n, PYVFIO_HEADER_SIZE_LEN);
    put_le(hdr + PYVFIO_HEADER_FLAGS_OFF, flags, PYVFIO_HEADER_FLAGS_LEN);
    put_le(hdr + PYVFIO_HEADER_ERROR_OFF, error, PYVFIO_HEADER_ERROR_LEN);
    iov[0].iov_base = hdr;
    iov[0].iov_len = sizeof(hdr);
    iov[1].iov_base = (void *)payload;
    iov[1].iov_len = n;
    return send_all(sock, iov, n ? 2 : 1, fds, nfds);
}

/* The reply to the fast access next() returned: the access echoed, then `n` bytes of `data`
 * (a read's; 0 for a write). 0 or -errno. */
static int pyvfio_reply_access(const struct pyvfio_reader *r, int sock, const char *data,
                               size_t n)
{
    unsigned char head[PYVFIO_HEADER_SIZE + PYVFIO_ACCESS_SIZE];
    unsigned char *q = head + PYVFIO_HEADER_SIZE;
    struct iovec iov[2];

    memset(head, 0, sizeof(head));
    put_le(head + PYVFIO_HEADER_MSG_ID_OFF, r->msg_id, PYVFIO_HEADER_MSG_ID_LEN);
    put_le(head + PYVFIO_HEADER_COMMAND_OFF, r->command, PYVFIO_HEADER_COMMAND_LEN);
    put_le(head + PYVFIO_HEADER_SIZE_OFF, sizeof(head) + n, PYVFIO_HEADER_SIZE_LEN);
    put_le(head + PYVFIO_HEADER_FLAGS_OFF, PYVFIO_TYPE_REPLY, PYVFIO_HEADER_FLAGS_LEN);
    put_le(q + PYVFIO_ACCESS_OFFSET_OFF, r->offset, PYVFIO_ACCESS_OFFSET_LEN);
    put_le(q + PYVFIO_ACCESS_REGION_OFF, r->index, PYVFIO_ACCESS_REGION_LEN);
    put_le(q + PYVFIO_ACCESS_COUNT_OFF, r->count, PYVFIO_ACCESS_COUNT_LEN);
    iov[0].iov_base = head;
    iov[0].iov_len = sizeof(head);
    iov[1].iov_base = (void *)data;
    iov[1].iov_len = n;
    return send_all(sock, iov, n ? 2 : 1, NULL, 0);
}

/* --- the sender: one per socket, its lock serialises every send ------------------------------ */

struct pyvfio_sender {
    pthread_mutex_t lock;
    int sock;
    int closed; /* under lock: nothing is sent any more */
};

struct pyvfio_sender *pyvfio_sender_new(int sock)
{
    struct pyvfio_sender *s = calloc(1, sizeof(*s));

    if (s == NULL)
        return NULL;
    if (pthread_mutex_init(&s->lock, NULL) != 0) {
        free(s);
        return NULL;
    }
    s->sock = sock;
    return s;
}

void pyvfio_sender_free(struct pyvfio_sender *s)
{
    if (s == NULL)
        return;
    pthread_mutex_destroy(&s->lock);
    free(s);
}

/* No more sends from now on; one in progress finishes first. */
void pyvfio_sender_close(struct pyvfio_sender *s)
{
    pthread_mutex_lock(&s->lock);
    s->closed = 1;
    pthread_mutex_unlock(&s->lock);
}

/* pyvfio_send() under the lock: 0, -errno, or PYVFIO_CLOSED. */
int pyvfio_sender_send(struct pyvfio_sender *s, uint32_t msg_id, uint32_t command,
                       uint32_t flags, uint32_t error, const char *payload, size_t n,
                       const int *fds, int nfds)
{
    int rc;

    pthread_mutex_lock(&s->lock);
    rc = s->closed ? PYVFIO_CLOSED
                   : pyvfio_send(s->sock, msg_id, command, flags, error, payload, n, fds, nfds);
    pthread_mutex_unlock(&s->lock);
    return rc;
}

/* --- the loop ------------------------------------------------------------------------------- */

/* The callbacks (msgshim.py): the region handler of r->slot's connection, with the GIL. The
 * value ones are called for 1, 2, 4 and 8 bytes when the region has PYVFIO_INT_READ /
 * PYVFIO_INT_WRITE; the others take the data as bytes (a read leaves its reply's data in
 * r->rdata). Each sets r->status when it is not PYVFIO_CB_REPLY. */
static uint64_t pyvfio_read_value(int slot, uint32_t index, uint64_t offset, uint32_t count);
static void pyvfio_read_bytes(int slot, uint32_t index, uint64_t offset, uint32_t count);
static void pyvfio_write_value(int slot, uint32_t index, uint64_t offset, uint32_t count,
                               uint64_t value);
static void pyvfio_write_bytes(int slot, uint32_t index, uint64_t offset, uint32_t count,
                               const char *data);
/* The approved SET_IRQS request (r->irq_set), applied by the device's IRQ controller. */
static void pyvfio_set_irqs(int slot);

static int is_value_size(uint32_t count)
{
    return count == 1 || count == 2 || count == 4 || count == 8;
}

/* The SET_IRQS request of r->irq_set: Python applies it (the IRQ controller keeps the INTx
 * state), C sends the reply, the header alone as the Python path's codec.reply_to() makes it.
 * 0, or what pyvfio_serve() returns. */
static int serve_set_irqs(struct pyvfio_reader *r, struct pyvfio_sender *s)
{
    int rc;

    r->status = PYVFIO_CB_REPLY;
    pyvfio_set_irqs(r->slot);
    if (r->status == PYVFIO_CB_STOP)
        return PYVFIO_STOPPED;
    if (r->status != PYVFIO_CB_REPLY || (r->flags & PYVFIO_FLAG_NO_REPLY))
        return 0; /* answered by Python, or posted */
    pthread_mutex_lock(&s->lock);
    rc = s->closed ? PYVFIO_CLOSED
                   : pyvfio_send(s->sock, r->msg_id, r->command, PYVFIO_TYPE_REPLY, 0, NULL, 0,
                                 NULL, 0);
    pthread_mutex_unlock(&s->lock);
    return rc;
}

/* Serve fast accesses from r's socket (s's) until something else comes: returns what
 * pyvfio_next_from() returns when it is not a fast access (PYVFIO_MESSAGE, PYVFIO_SPECIAL,
 * PYVFIO_ERROR, PYVFIO_INTERRUPTED, -errno), or PYVFIO_INTERRUPTED (r->stop), PYVFIO_STOPPED
 * (a callback's PYVFIO_CB_STOP), PYVFIO_CLOSED (the sender is closed before a reply), -errno
 * (a reply's send, or no memory). After any return the reader stands between two messages. */
int pyvfio_serve(struct pyvfio_reader *r, struct pyvfio_sender *s)
{
    for (;;) {
        unsigned char value[8];
        const unsigned char *data = NULL;
        size_t n = 0;
        int kind, rc;

        if (__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE))
            return PYVFIO_INTERRUPTED;
        kind = pyvfio_next_from(r, s->sock);
        if (kind == PYVFIO_FAST_SET_IRQS) {
            rc = serve_set_irqs(r, s);
            if (rc)
                return rc;
            continue;
        }
        if (kind != PYVFIO_FAST_READ && kind != PYVFIO_FAST_WRITE)
            return kind;
        r->status = PYVFIO_CB_REPLY;
        if (kind == PYVFIO_FAST_READ) {
            if ((r->region_int[r->index] & PYVFIO_INT_READ) && is_value_size(r->count)) {
                put_le(value, pyvfio_read_value(r->slot, r->index, r->offset, r->count),
                       (int)r->count);
                data = value;
            } else {
                if (grow((void **)&r->rdata, &r->caprdata, r->count ? r->count : 1, 1) < 0)
                    return -ENOMEM;
                pyvfio_read_bytes(r->slot, r->index, r->offset, r->count);
                data = r->rdata;
            }
            n = r->count;
        } else {
            const unsigned char *p = r->buf + r->payload + PYVFIO_ACCESS_SIZE;

            if ((r->region_int[r->index] & PYVFIO_INT_WRITE) && is_value_size(r->count))
                pyvfio_write_value(r->slot, r->index, r->offset, r->count,
                                   get_le(p, (int)r->count));
            else
                pyvfio_write_bytes(r->slot, r->index, r->offset, r->count, (const char *)p);
        }
        if (r->status == PYVFIO_CB_STOP)
            return PYVFIO_STOPPED;
        if (r->status != PYVFIO_CB_REPLY || (r->flags & PYVFIO_FLAG_NO_REPLY))
            continue; /* answered by Python, or posted */
        pthread_mutex_lock(&s->lock);
        rc = s->closed ? PYVFIO_CLOSED : pyvfio_reply_access(r, s->sock, (const char *)data, n);
        pthread_mutex_unlock(&s->lock);
        if (rc)
            return rc;
    }
}
