/*
 * Waiting for a change in memory that another process writes: the mapped (sparse-mmap) areas
 * of a BAR, which the guest writes straight from its vCPU (vfio_user_server.mempoll).
 *
 * pyvfio_wait_change() compares `len` bytes at `addr` with `expected` until they differ, the
 * timeout passes or *stop becomes non-zero. It first spins for `spin_ns` (a pause between
 * looks), then sleeps with nanosleep, doubling the sleep from 1 us up to `max_sleep_ns`, so a
 * change soon after the call is seen within a few hundred nanoseconds and a quiet area costs
 * little CPU. Compiled with cffi (c_shim/build_poll.py); cffi releases the GIL around the call,
 * so the server's other threads run while it waits.
 *
 * The memory is read with relaxed atomic loads of 4 bytes when the address and length allow
 * it (a guest's aligned 4- or 8-byte store is then never seen half-way in one word), of single
 * bytes otherwise. The caller keeps the mapping alive for the whole call.
 *
 * Returns 1 when the memory differs from `expected`, 0 on timeout, 2 when stopped.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define WAIT_TIMEOUT 0
#define WAIT_CHANGED 1
#define WAIT_STOPPED 2

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static int differs(const void *addr, const uint8_t *expected, size_t len)
{
    if (((uintptr_t)addr & 3) == 0 && (len & 3) == 0) {
        const uint32_t *p = addr;
        for (size_t i = 0; i < len / 4; i++) {
            uint32_t want;
            memcpy(&want, expected + 4 * i, 4);
            if (__atomic_load_n(&p[i], __ATOMIC_RELAXED) != want)
                return 1;
        }
        return 0;
    }
    const uint8_t *b = addr;
    for (size_t i = 0; i < len; i++)
        if (__atomic_load_n(&b[i], __ATOMIC_RELAXED) != expected[i])
            return 1;
    return 0;
}

int pyvfio_wait_change(uintptr_t addr, const char *expected_, size_t len, int64_t timeout_ns,
                       const uint32_t *stop, int64_t spin_ns, int64_t max_sleep_ns)
{
    const void *mem = (const void *)addr;
    const uint8_t *expected = (const uint8_t *)expected_;
    int64_t start = now_ns();
    int64_t deadline = timeout_ns < 0 ? INT64_MAX : start + timeout_ns;
    int64_t spin_until = start + spin_ns;
    int64_t sleep_ns = 1000;
    int64_t t = start;
    unsigned n = 0;

    for (;;) {
        if (differs(mem, expected, len)) {
            __atomic_thread_fence(__ATOMIC_ACQUIRE); /* reads after this see what came before */
            return WAIT_CHANGED;
        }
        if (__atomic_load_n(stop, __ATOMIC_RELAXED))
            return WAIT_STOPPED;
        if ((++n & 63) == 0 || t >= spin_until)
            t = now_ns();
        if (t >= deadline)
            return WAIT_TIMEOUT;
        if (t < spin_until) {
            cpu_relax();
            continue;
        }
        struct timespec ts = {0, sleep_ns};
        if (sleep_ns > deadline - t)
            ts.tv_nsec = deadline - t;
        nanosleep(&ts, NULL);
        t = now_ns();
        if (sleep_ns < max_sleep_ns) {
            sleep_ns *= 2;
            if (sleep_ns > max_sleep_ns)
                sleep_ns = max_sleep_ns;
        }
    }
}
