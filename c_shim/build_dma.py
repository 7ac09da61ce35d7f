"""cffi builder (out-of-line API mode) of ``vfio_user_server._dma_shim``: guarded DMA copies.

Built by setuptools through ``cffi_modules`` in setup.py. The extension is optional: without a
C compiler the package installs anyway and ``vfio_user_server.guarded`` uses its pure-Python
path.
"""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int pyvfio_dma_install(void);
    int pyvfio_dma_read(uintptr_t guest, void *dst, size_t n);
    int pyvfio_dma_write(uintptr_t guest, const void *src, size_t n);
    """
)
ffibuilder.set_source(
    "vfio_user_server._dma_shim",
    (Path(__file__).parent / "dma_copy.c").read_text(),
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
    optional=True,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
