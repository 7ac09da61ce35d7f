"""Waiting for memory that another process writes to change: a device polling its mapped areas.

A BAR area the device maps (``Bar(..., mapped=...)``, :mod:`vfio_user_server.mapped`) is
written by the guest straight from its vCPU: no message tells the device. A device that must
react (a doorbell) polls it with a :class:`MemoryWaiter`::

    waiter = default_waiter()
    while not stopping:
        result = waiter.wait_change(view, offset, last, timeout=0.5)
        if result is WaitResult.CHANGED: ...

Two implementations behind one interface, chosen like the DMA copier
(:mod:`vfio_user_server.dmacopy`):

* ``c-shim``: ``vfio_user_server._poll_shim`` (``c_shim/mem_poll.c``, built by cffi when the
  package is installed). It spins for ``spin`` seconds, then sleeps with ``nanosleep``,
  doubling the sleep from 1 µs up to ``max_sleep``, until the bytes differ from ``expected``,
  the timeout passes or the waiter is stopped, and it holds no GIL all that time.
* ``python``: the pure-Python path, chosen when the shim is missing or ``PYVFIO_NO_SHIM`` is set
  to anything but ``0``. It compares the bytes and sleeps with the same backoff (``time.sleep``
  releases the GIL); it does not spin, since a spinning Python thread would hold the GIL
  against the server's loop thread.

:meth:`MemoryWaiter.stop` makes every wait in progress and every later one return
:attr:`WaitResult.STOPPED` (the device's poll thread then exits); :meth:`MemoryWaiter.restart`
clears it.

A polling thread takes CPU from the guest's vCPU on a small host: the spin is short by default
and the backoff bounds the cost of a quiet area (BENCHMARKS.md, "Sparse-mmap registers").
"""

from __future__ import annotations

import enum
import importlib
import logging
import os
import struct
import time
from typing import Any, Protocol

from .dmacopy import ENV_NO_SHIM, buffer_address

__all__ = ["MemoryWaiter", "PythonWaiter", "ShimWaiter", "WaitResult", "default_waiter",
           "poll_shim_available"]

log = logging.getLogger(__name__)

#: Defaults: spin this long before sleeping, and sleep at most this long between looks.
DEFAULT_SPIN = 20e-6
DEFAULT_MAX_SLEEP = 100e-6
_FIRST_SLEEP = 1e-6


class WaitResult(enum.Enum):
    TIMEOUT = 0
    CHANGED = 1
    STOPPED = 2


class MemoryWaiter(Protocol):
    """Waits until bytes of a buffer differ from what the caller last saw."""

    #: ``"c-shim"`` or ``"python"``, for logs.
    name: str

    def wait_change(self, view: memoryview, offset: int, expected: bytes,
                    timeout: float | None) -> WaitResult:
        """Wait until ``view[offset:offset + len(expected)]`` differs from ``expected``."""
        ...

    def wait_u32(self, view: memoryview, offset: int, old: int,
                 timeout: float | None) -> int | None:
        """Wait until the little-endian u32 at ``offset`` is not ``old``: the new value, or
        None on timeout or stop."""
        ...

    def wait_u64(self, view: memoryview, offset: int, old: int,
                 timeout: float | None) -> int | None:
        """As :meth:`wait_u32` for a u64."""
        ...

    def stop(self) -> None:
        """Make waits in progress and later ones return STOPPED."""
        ...

    def restart(self) -> None:
        """Undo :meth:`stop`."""
        ...

    @property
    def stopped(self) -> bool: ...


def _check(view: memoryview, offset: int, length: int) -> None:
    if length <= 0 or offset < 0 or offset + length > view.nbytes:
        raise ValueError(f"wait on [{offset:#x}, {offset + length:#x}) outside a buffer of "
                         f"{view.nbytes:#x} bytes")


class _Base:
    name = "base"

    def __init__(self, spin: float = DEFAULT_SPIN, max_sleep: float = DEFAULT_MAX_SLEEP) -> None:
        if spin < 0 or max_sleep < _FIRST_SLEEP:
            raise ValueError("spin must be >= 0 and max_sleep >= 1 µs")
        self.spin = spin
        self.max_sleep = max_sleep

    def wait_change(self, view: memoryview, offset: int, expected: bytes,
                    timeout: float | None) -> WaitResult:
        raise NotImplementedError

    def _wait_int(self, fmt: str, view: memoryview, offset: int, old: int,
                  timeout: float | None) -> int | None:
        if self.wait_change(view, offset, struct.pack(fmt, old), timeout) is WaitResult.CHANGED:
            value: int = struct.unpack_from(fmt, view, offset)[0]
            return value
        return None

    def wait_u32(self, view: memoryview, offset: int, old: int,
                 timeout: float | None) -> int | None:
        return self._wait_int("<I", view, offset, old, timeout)

    def wait_u64(self, view: memoryview, offset: int, old: int,
                 timeout: float | None) -> int | None:
        return self._wait_int("<Q", view, offset, old, timeout)


class ShimWaiter(_Base):
    """The C shim: spin, then nanosleep backoff, without the GIL."""

    name = "c-shim"

    def __init__(self, module: Any, spin: float = DEFAULT_SPIN,
                 max_sleep: float = DEFAULT_MAX_SLEEP) -> None:
        super().__init__(spin, max_sleep)
        self._ffi = module.ffi
        self._lib = module.lib
        self._stop = self._ffi.new("uint32_t *")

    def wait_change(self, view: memoryview, offset: int, expected: bytes,
                    timeout: float | None) -> WaitResult:
        _check(view, offset, len(expected))
        timeout_ns = -1 if timeout is None else max(0, int(timeout * 1e9))
        # the address stays valid while ``view`` holds the buffer (the caller's mapping)
        addr = buffer_address(view) + offset
        rc = self._lib.pyvfio_wait_change(addr, expected, len(expected), timeout_ns, self._stop,
                                          int(self.spin * 1e9), int(self.max_sleep * 1e9))
        return WaitResult(rc)

    def stop(self) -> None:
        self._stop[0] = 1

    def restart(self) -> None:
        self._stop[0] = 0

    @property
    def stopped(self) -> bool:
        return bool(self._stop[0])


class PythonWaiter(_Base):
    """Pure Python: compare, then ``time.sleep`` with the same backoff (no spinning)."""

    name = "python"

    def __init__(self, spin: float = DEFAULT_SPIN, max_sleep: float = DEFAULT_MAX_SLEEP) -> None:
        super().__init__(spin, max_sleep)
        self._stopped = False

    def wait_change(self, view: memoryview, offset: int, expected: bytes,
                    timeout: float | None) -> WaitResult:
        length = len(expected)
        _check(view, offset, length)
        deadline = None if timeout is None else time.monotonic() + timeout
        sleep = _FIRST_SLEEP
        end = offset + length
        while True:
            if view[offset:end] != expected:
                return WaitResult.CHANGED
            if self._stopped:
                return WaitResult.STOPPED
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return WaitResult.TIMEOUT
            time.sleep(sleep if deadline is None else min(sleep, deadline - now))
            sleep = min(sleep * 2, self.max_sleep)

    def stop(self) -> None:
        self._stopped = True

    def restart(self) -> None:
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped


def _load_shim() -> Any | None:
    try:
        return importlib.import_module("vfio_user_server._poll_shim")
    except ImportError:
        return None


def poll_shim_available() -> bool:
    """True if the polling shim is built and importable (whatever ``PYVFIO_NO_SHIM`` says)."""
    return _load_shim() is not None


def default_waiter(spin: float = DEFAULT_SPIN,
                   max_sleep: float = DEFAULT_MAX_SLEEP) -> MemoryWaiter:
    """A new waiter (each poll thread has its own, with its own stop flag): the shim if built
    and not disabled by ``PYVFIO_NO_SHIM``, else the Python one."""
    if os.environ.get(ENV_NO_SHIM, "") not in ("", "0"):
        log.debug("memory polling: python (%s is set)", ENV_NO_SHIM)
        return PythonWaiter(spin, max_sleep)
    module = _load_shim()
    if module is None:
        log.debug("memory polling: python (the C shim is not built)")
        return PythonWaiter(spin, max_sleep)
    return ShimWaiter(module, spin, max_sleep)
