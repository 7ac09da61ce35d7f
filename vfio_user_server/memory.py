"""Giving a departed client's memory back to the system.

A long-running server sees clients come and go (QEMU reconnects, hot-plug cycles). What a
connection allocated (receive buffers, maps, threads) is freed when it ends, but the C allocator
keeps freed heap pages, and reference cycles wait for the garbage collector: without a release
the server's RSS creeps up by some kilobytes per connection (docs/reliability.md has the soak
figures). :func:`release_free_memory` collects the cycles and, on glibc, returns free heap pages
with ``malloc_trim(0)``.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


_malloc_trim = _find_malloc_trim()


def release_free_memory() -> None:
    """Collect garbage and return the C heap's free pages to the system (never raises)."""
    try:
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)
    except Exception:  # hygiene only: never fail a disconnect for it
        log.exception("releasing free memory")
