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
 * 4 KiB page (measured here: 128 KiB copies at 2.8 GB/s instead of 30 GB/s when
 * dst - src = 16 mod 4096, the skew between a bytearray's data, 16 bytes into its malloc
 * page, and a page-aligned mmap). In that case copy in 2 KiB pieces, below the `rep movsb`
 * threshold, which glibc copies with vector loads and stores (15-18 GB/s). At 1 MiB and
 * above glibc uses its vector or non-temporal loop, which does not suffer from the skew.
 */
#define SKEW_WINDOW 64u
#define CHUNK 2048u
#define CHUNK_UP_TO (1u << 20)

static void copy_bytes(void *dst, const void *src, size_t n)
{
    uintptr_t skew = ((uintptr_t)dst - (uintptr_t)src) & 4095u;

    if (skew == 0 || skew >= SKEW_WINDOW || n <= CHUNK || n >= CHUNK_UP_TO) {
        memcpy(dst, src, n);
        return;
    }
    {
        char *d = dst;
        const char *s = src;

        while (n > CHUNK) {
            memcpy(d, s, CHUNK);
            d += CHUNK;
            s += CHUNK;
            n -= CHUNK;
        }
        memcpy(d, s, n);
    }
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
