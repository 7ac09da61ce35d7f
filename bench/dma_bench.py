"""DMA copy bandwidth against memcpy in the same process (used by bench/run_all.py).

A :class:`~vfio_user_server.dma.DmaMapTable` maps a memfd as a client's DMA_MAP would, and
:class:`~vfio_user_server.dma_access.DmaAccessor` reads and writes it (translation, the
guarded copy or the zero-copy view, release), as a device does:

* ``guarded``: a memfd *not* sealed against shrinking, so every copy goes through the guarded
  copier: the C shim (``c_shim/dma_copy.c``) or the pure-Python path (``/proc/self/mem``);
* ``zero-copy``: a memfd sealed with ``F_SEAL_SHRINK`` (QEMU's default), copied through
  memoryviews of the mmap (the same for both copiers).

The reference is ``memcpy`` (``ctypes.memmove``) between two buffers of the same size in the
same process, interleaved with the others, so that each figure is a ratio measured in one go.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import time
from collections.abc import Callable

from vfio_user_server.dma import DmaMapTable
from vfio_user_server.dma_access import DmaAccessor
from vfio_user_server.dmacopy import GuardedCopy, PythonCopy, ShimCopy, _load_shim

PROT_RW = 3
SIZES = (4096, 128 << 10, 1 << 20)
REGION = 8 << 20


def _memfd(sealed: bool) -> int:
    fd = os.memfd_create("bench-dma", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, REGION)
    os.pwrite(fd, b"\x5a" * REGION, 0)  # allocate every page: no first-touch faults timed
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def copiers() -> dict[str, GuardedCopy]:
    out: dict[str, GuardedCopy] = {}
    module = _load_shim()
    if module is not None:
        out["shim"] = ShimCopy(module)
    out["python"] = PythonCopy()
    return out


def _rate(fn: Callable[[], None], size: int, seconds: float) -> float:
    """MB/s of ``fn`` (which moves ``size`` bytes), run for about ``seconds``."""
    fn()
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(8):
            fn()
        n += 8
        now = time.perf_counter()
        if now >= deadline:
            break
    return n * size / (now - t0) / 1e6


def measure(seconds: float = 0.2, reps: int = 3) -> dict[str, dict[str, list[float]]]:
    """{figure: {"memcpy": [MB/s per round], "shim": [...], "python": [...]}} over ``reps``
    interleaved rounds (each round measures memcpy, then every copier, back to back)."""
    cps = copiers()
    samples: dict[str, dict[str, list[float]]] = {}
    src = bytearray(os.urandom(1 << 20)) * (REGION >> 20)
    dst = bytearray(REGION)
    src_addr = ctypes.addressof(ctypes.c_char.from_buffer(src))
    dst_addr = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    tables: dict[tuple[str, bool], DmaAccessor] = {}
    try:
        for name, cp in cps.items():
            for sealed in (False, True):
                table = DmaMapTable(copy=cp)
                table.add(0x100000, REGION, PROT_RW, _memfd(sealed), 0)
                tables[(name, sealed)] = DmaAccessor(table)
        for _ in range(reps):
            for size in SIZES:
                for sealed in (False, True):
                    kind = "zero-copy" if sealed else "guarded"
                    for op in ("read", "write"):
                        fig = f"DMA {op} {size // 1024} KiB, {kind}"
                        s = samples.setdefault(fig, {})

                        def ref(size: int = size) -> None:
                            ctypes.memmove(dst_addr, src_addr, size)
                        s.setdefault("memcpy", []).append(_rate(ref, size, seconds))
                        for name in cps:
                            acc = tables[(name, sealed)]
                            view = memoryview(dst)[:size]
                            data = memoryview(src)[:size]
                            def rd(acc: DmaAccessor = acc, view: memoryview = view) -> None:
                                acc.read_into(0x100000, view)

                            def wr(acc: DmaAccessor = acc, data: memoryview = data) -> None:
                                acc.write(0x100000, data)
                            s.setdefault(name, []).append(
                                _rate(rd if op == "read" else wr, size, seconds))
                            view.release()
                            data.release()
    finally:
        for acc in tables.values():
            acc.table.remove_all()
        for cp in cps.values():
            if isinstance(cp, PythonCopy):
                cp.close()
    return samples
