"""cffi builder (out-of-line API mode) of ``vfio_user_server._dma_shim``: guarded DMA copies.

Built by setuptools through ``cffi_modules`` in setup.py. The extension is optional: without a
C compiler the package installs anyway and ``vfio_user_server.guarded`` uses its pure-Python
path.
"""

import sys
from pathlib import Path

from cffi import FFI

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cflags  # c_shim/cflags.py: PYVFIO_SANITIZE

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int pyvfio_dma_install(void);
    int pyvfio_dma_read(uintptr_t guest, void *dst, size_t n);
    int pyvfio_dma_write(uintptr_t guest, const void *src, size_t n);
    void pyvfio_dma_copy_bytes(void *dst, const void *src, size_t n);
    struct pyvfio_pin { ...; };
    void pyvfio_pin_init(struct pyvfio_pin *p);
    void pyvfio_pin_close(struct pyvfio_pin *p);
    int pyvfio_pin_refs(struct pyvfio_pin *p);
    int pyvfio_pin_hold(struct pyvfio_pin *p);
    int pyvfio_pin_release(struct pyvfio_pin *p);
    int pyvfio_pin_read(struct pyvfio_pin *p, uintptr_t guest, char *dst, size_t n);
    int pyvfio_pin_write(struct pyvfio_pin *p, uintptr_t guest, const char *src, size_t n);
    int pyvfio_pin_wait(struct pyvfio_pin *p, long timeout_ms);
    #define PIN_LAST 0x100
    #define PIN_STALE 0x200
    """
)
ffibuilder.set_source(
    "vfio_user_server._dma_shim",
    (Path(__file__).parent / "dma_copy.c").read_text(),
    extra_compile_args=cflags.compile_args(),
    extra_link_args=cflags.link_args(),
    optional=True,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
