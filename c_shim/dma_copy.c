/*
 * Guarded copies to and from guest memory mapped from a client's file.
 *
 * A vfio-user client hands the server an fd for its guest RAM (DMA_MAP) and the server mmaps
 * it. If the client later shrinks the file (ftruncate) or punches a hole that cannot be filled,
 * touching the mapping raises SIGBUS, and a plain memcpy would kill the server. Here every copy
 * runs with a per-thread "guard": the SIGBUS/SIGSEGV handler checks that the faulting address
 * lies inside the guest-side range of the copy in progress on this thread, and if so jumps back
 * (siglongjmp) to the copy, which returns the signal number instead of crashing. Faults
 * anywhere else are handed to the handler that was installed before ours (Python's
 * faulthandler, or the default action).
 *
 * Only memcpy runs between sigsetjmp and the fault, and memcpy holds no lock, so leaving it by
 * siglongjmp is safe; sigsetjmp(env, 1) also restores the signal mask (the handler runs with
 * the signal blocked).
 *
 * The handlers are installed once per process, on the first use. A SIGBUS/SIGSEGV handler
 * installed after ours (faulthandler.enable() called later, for instance) would see the faults
 * first; enable such tools before the server starts (pytest and python -X faulthandler do).
 *
 * Compiled with cffi (c_shim/build_dma.py) into vfio_user_server._dma_shim; cffi releases the
 * GIL around these calls, so large copies run in parallel with Python threads.
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

struct guard {
    sigjmp_buf env;
    uintptr_t lo, hi; /* the guest-side bytes of the copy in progress */
};

/* The guard of this thread's copy in progress, or NULL. initial-exec TLS: reading it from the
 * signal handler must not allocate (the default TLS model may, on a thread's first access). */
static __thread struct guard *volatile current __attribute__((tls_model("initial-exec")));

static struct sigaction previous_bus, previous_segv;
static pthread_once_t install_once = PTHREAD_ONCE_INIT;
static int install_result = -1;

static void on_fault(int sig, siginfo_t *info, void *uctx)
{
    struct guard *g = current;
    uintptr_t addr = (uintptr_t)info->si_addr;
    struct sigaction *prev = sig == SIGBUS ? &previous_bus : &previous_segv;

    if (g != NULL && addr >= g->lo && addr < g->hi)
        siglongjmp(g->env, sig);
    /* Not a fault of a guarded copy: behave as if we had never been installed. */
    if (prev->sa_flags & SA_SIGINFO) {
        prev->sa_sigaction(sig, info, uctx);
    } else if (prev->sa_handler == SIG_DFL || prev->sa_handler == SIG_IGN) {
        /* Restore it; returning re-runs the faulting instruction, which now gets the
         * default action (a core dump), as without us. */
        sigaction(sig, prev, NULL);
    } else {
        prev->sa_handler(sig);
    }
}

static void install(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous_bus) != 0)
        return;
    if (sigaction(SIGSEGV, &sa, &previous_segv) != 0) {
        sigaction(SIGBUS, &previous_bus, NULL);
        return;
    }
    install_result = 0;
}

/* Install the handlers, once per process (so ours never becomes its own "previous").
 * Returns 0, or -1 if sigaction failed. */
int pyvfio_dma_install(void)
{
    pthread_once(&install_once, install);
    return install_result;
}

/*
 * memcpy, avoiding one slow case of glibc's x86-64 memcpy (before glibc 2.39, bug 30994):
 * between about 2 KiB and the non-temporal threshold it copies with `rep movsb`, which on AMD
 * Zen runs 10-50x slower when the destination lies a few bytes past the source modulo the
 * 4 KiB page (measured here: 128 KiB copies at 2.8 GB/s instead of 30-45 GB/s when
 * dst - src = 16 mod 4096, the skew between a bytearray's data, 16 bytes into its malloc
 * page, and a page-aligned mmap; 4 KiB copies too). In that case copy with a plain loop of
 * 16-byte loads and stores (fixed-size memcpy, which the compiler turns into vector moves:
 * baseline SSE2 on x86-64, whatever the target has elsewhere), 64 bytes per iteration, stores
 * aligned: 43-46 GB/s at 128 KiB on this machine, where 2 KiB glibc pieces gave 15. At 1 MiB
 * and above glibc uses its non-temporal loop, which does not suffer from the skew.
 * The skew is the same for every piece of a copy (both pointers move together), so splitting
 * a copy cannot avoid it; only a copy without `rep movsb` does.
 */
#define SKEW_WINDOW 64u
#define LOOP_FROM 2048u
#define LOOP_UP_TO (1u << 20)

static void copy_loop(unsigned char *d, const unsigned char *s, size_t n)
{
    size_t head = (16u - ((uintptr_t)d & 15u)) & 15u; /* n > LOOP_FROM > head */
    unsigned char a[16], b[16], c[16], e[16];

    memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    while (n >= 64) {
        memcpy(a, s, 16);
        memcpy(b, s + 16, 16);
        memcpy(c, s + 32, 16);
        memcpy(e, s + 48, 16);
        memcpy(d, a, 16);
        memcpy(d + 16, b, 16);
        memcpy(d + 32, c, 16);
        memcpy(d + 48, e, 16);
        d += 64;
        s += 64;
        n -= 64;
    }
    memcpy(d, s, n);
}

static void copy_bytes(void *dst, const void *src, size_t n)
{
    uintptr_t skew = ((uintptr_t)dst - (uintptr_t)src) & 4095u;

    if (skew == 0 || skew >= SKEW_WINDOW || n <= LOOP_FROM || n >= LOOP_UP_TO)
        memcpy(dst, src, n);
    else
        copy_loop(dst, src, n);
}

/* Exposed for the tests: the copy without the guard, at any skew and size. */
void pyvfio_dma_copy_bytes(void *dst, const void *src, size_t n)
{
    copy_bytes(dst, src, n);
}

/* memcpy(dst, src, n) where the guest side is [guest, guest + n). Returns 0, or the signal
 * (SIGBUS, SIGSEGV) that stopped the copy part way. */
static int guarded_copy(void *dst, const void *src, size_t n, uintptr_t guest)
{
    struct guard g;
    int sig;

    g.lo = guest;
    g.hi = guest + n;
    sig = sigsetjmp(g.env, 1);
    if (sig == 0) {
        current = &g;
        __atomic_signal_fence(__ATOMIC_SEQ_CST); /* the guard is set before the copy starts */
        copy_bytes(dst, src, n);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
    }
    current = NULL;
    return sig;
}

/* Guest memory at address guest -> dst. */
int pyvfio_dma_read(uintptr_t guest, void *dst, size_t n)
{
    return guarded_copy(dst, (const void *)guest, n, guest);
}

/* src -> guest memory at address guest. */
int pyvfio_dma_write(uintptr_t guest, const void *src, size_t n)
{
    return guarded_copy((void *)guest, src, n, guest);
}

/*
 * Pins: the reference count of one DMA map for copies that run without the map table's lock
 * (the accessor's fast path, vfio_user_server/dma_access.py). A copy takes a reference, checks
 * that the map is not closed, copies under the guard and drops the reference, all in one call.
 * The table closes the pin when it removes the map from lookups, then waits (pyvfio_pin_wait)
 * for the count to reach 0 before it munmaps. Both sides use sequentially consistent atomics:
 * either the copy sees the pin closed (and touches nothing), or the unmap sees its reference
 * (and waits for it).
 */
struct pyvfio_pin {
    int refs;
    int closed;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

#define PIN_LAST 0x100  /* this call dropped the last reference of a closed pin */
#define PIN_STALE 0x200 /* the pin was closed: nothing copied */

void pyvfio_pin_init(struct pyvfio_pin *p)
{
    p->refs = 0;
    p->closed = 0;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
}

void pyvfio_pin_close(struct pyvfio_pin *p)
{
    __atomic_store_n(&p->closed, 1, __ATOMIC_SEQ_CST);
}

int pyvfio_pin_refs(struct pyvfio_pin *p)
{
    return __atomic_load_n(&p->refs, __ATOMIC_SEQ_CST);
}

static int pin_put(struct pyvfio_pin *p)
{
    if (__atomic_sub_fetch(&p->refs, 1, __ATOMIC_SEQ_CST) == 0
        && __atomic_load_n(&p->closed, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
        return PIN_LAST;
    }
    return 0;
}

/* A reference held across several calls (the tests hold one to stand in for a copy in flight):
 * 0, or PIN_STALE (closed: no reference taken). */
int pyvfio_pin_hold(struct pyvfio_pin *p)
{
    __atomic_add_fetch(&p->refs, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&p->closed, __ATOMIC_SEQ_CST))
        return PIN_STALE | pin_put(p);
    return 0;
}

/* Drop a reference of pyvfio_pin_hold: 0, or PIN_LAST. */
int pyvfio_pin_release(struct pyvfio_pin *p)
{
    return pin_put(p);
}

/* Guarded copy under a reference on the pin. Returns 0, or the signal that stopped the copy,
 * or'ed with PIN_STALE (closed: nothing copied) and PIN_LAST. */
static int pin_copy(struct pyvfio_pin *p, void *dst, const void *src, size_t n, uintptr_t guest)
{
    int sig;

    __atomic_add_fetch(&p->refs, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&p->closed, __ATOMIC_SEQ_CST))
        return PIN_STALE | pin_put(p);
    sig = guarded_copy(dst, src, n, guest);
    return sig | pin_put(p);
}

int pyvfio_pin_read(struct pyvfio_pin *p, uintptr_t guest, char *dst, size_t n)
{
    return pin_copy(p, dst, (const void *)guest, n, guest);
}

int pyvfio_pin_write(struct pyvfio_pin *p, uintptr_t guest, const char *src, size_t n)
{
    return pin_copy(p, (void *)guest, src, n, guest);
}

/* Wait up to timeout_ms for the pin's references to drop to 0 (the caller closed it first).
 * Returns the references left (0: drained). Runs without the GIL. */
int pyvfio_pin_wait(struct pyvfio_pin *p, long timeout_ms)
{
    struct timespec deadline;
    int left;

    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec += 1;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&p->mu);
    while ((left = __atomic_load_n(&p->refs, __ATOMIC_SEQ_CST)) > 0)
        if (pthread_cond_timedwait(&p->cv, &p->mu, &deadline) != 0) {
            left = __atomic_load_n(&p->refs, __ATOMIC_SEQ_CST);
            break;
        }
    pthread_mutex_unlock(&p->mu);
    return left;
}
