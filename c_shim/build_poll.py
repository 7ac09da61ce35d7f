"""cffi builder (out-of-line API mode) of ``vfio_user_server._poll_shim``: waiting for a change
in mapped memory without holding the GIL (``vfio_user_server.mempoll``).

Built by setuptools through ``cffi_modules`` in setup.py; optional like the DMA shim (without a
C compiler ``vfio_user_server.mempoll`` uses its pure-Python path).
"""

import sys
from pathlib import Path

from cffi import FFI

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cflags  # c_shim/cflags.py: PYVFIO_SANITIZE

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int pyvfio_wait_change(uintptr_t addr, const char *expected, size_t len,
                           int64_t timeout_ns, const uint32_t *stop, int64_t spin_ns,
                           int64_t max_sleep_ns);
    """
)
ffibuilder.set_source(
    "vfio_user_server._poll_shim",
    (Path(__file__).parent / "mem_poll.c").read_text(),
    extra_compile_args=cflags.compile_args(),
    extra_link_args=cflags.link_args(),
    optional=True,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
