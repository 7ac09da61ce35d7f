"""Guarded copies between Python buffers and guest memory that a client may pull away.

The server mmaps the files a client sends with DMA_MAP. A client that shrinks such a file
(``ftruncate``), or punches a hole that cannot be filled again, makes the next touch of the
mapping raise SIGBUS, which would kill the server. :mod:`vfio_user_server.dma` therefore hands
out plain memoryviews only for files whose seals forbid shrinking (a memfd with
``F_SEAL_SHRINK``, QEMU's default memfd backend) and copies everything else through one of the
copiers here, which turn such a fault into a :class:`DmaError`:

* ``c-shim``: ``vfio_user_server._dma_shim`` (``c_shim/dma_copy.c``, built by cffi when the
  package is installed), a memcpy under a SIGBUS/SIGSEGV handler that jumps back out of the
  copy (sigsetjmp/siglongjmp). The GIL is released during the copy. Its handlers are installed
  on first use and pass every other fault on to the handler they replaced; a SIGBUS handler
  installed later (``faulthandler.enable()`` after the server starts) would come first, so
  enable such tools before.
* ``python``: the pure-Python path, chosen when the shim is missing or when the environment
  variable ``PYVFIO_NO_SHIM`` is set to anything but ``0``. It reads and writes the same
  addresses through ``/proc/self/mem``, where the kernel does the copy: a page that is gone
  gives a short count or ``EIO``, never a signal. It works for every kind of file the mmap
  works for (memfd, tmpfs, hugetlbfs, regular files) and can never grow the file.

Both take the guest side as a host address inside a mapping that stays mapped for the whole
copy (the map table's references make sure of that).
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import logging
import os
import signal
import threading
from typing import Any, Protocol

from .errors import DmaError

__all__ = ["ENV_NO_SHIM", "GuardedCopy", "PythonCopy", "ShimCopy", "buffer_address",
           "default_copy", "fault_error", "shim_available"]

log = logging.getLogger(__name__)

#: Environment variable that forces the pure-Python copier.
ENV_NO_SHIM = "PYVFIO_NO_SHIM"


class GuardedCopy(Protocol):
    """Copies that report a vanished page of guest memory as :class:`DmaError` (EFAULT)."""

    #: ``"c-shim"`` or ``"python"``, for logs.
    name: str

    def read(self, addr: int, dst: memoryview) -> None:
        """Fill the writable byte buffer ``dst`` from host address ``addr``."""
        ...

    def write(self, addr: int, src: memoryview) -> None:
        """Copy the byte buffer ``src`` to host address ``addr``."""
        ...


def fault_error(what: str, addr: int, n: int, cause: str) -> DmaError:
    return DmaError(
        f"DMA {what} of {n:#x} bytes at host {addr:#x}: guest memory is gone ({cause}); "
        "the client shrank or punched its memory file",
        errno=errno.EFAULT,
    )


class ShimCopy:
    """The C shim's guarded memcpy."""

    name = "c-shim"

    def __init__(self, module: Any) -> None:
        self._ffi = module.ffi
        self._lib = module.lib
        #: PIN_LAST / PIN_STALE bits of the pin copies' results.
        self.pin_last = int(module.lib.PIN_LAST)
        self.pin_stale = int(module.lib.PIN_STALE)
        if self._lib.pyvfio_dma_install() != 0:
            raise OSError("the DMA shim could not install its SIGBUS/SIGSEGV handlers")

    # Pins (c_shim/dma_copy.c): a DMA map's reference count for copies that take the
    # reference, check the map is still there and copy, in one call (DmaAccessor's fast path).

    def new_pin(self) -> Any:
        """A new, open pin (a cffi ``struct pyvfio_pin *``, freed with the object)."""
        pin = self._ffi.new("struct pyvfio_pin *")
        self._lib.pyvfio_pin_init(pin)
        return pin

    def pin_close(self, pin: Any) -> None:
        """Close the pin: fast-path copies through it stop touching the map."""
        self._lib.pyvfio_pin_close(pin)

    def pin_refs(self, pin: Any) -> int:
        """Fast-path copies in flight on the pin."""
        return int(self._lib.pyvfio_pin_refs(pin))

    def pin_wait(self, pin: Any, timeout: float) -> int:
        """Wait (without the GIL) up to ``timeout`` s for a closed pin's copies to finish;
        return how many are still in flight."""
        return int(self._lib.pyvfio_pin_wait(pin, max(0, int(timeout * 1000))))

    def read(self, addr: int, dst: memoryview) -> None:
        n = dst.nbytes
        with self._ffi.from_buffer(dst, require_writable=True) as p:
            sig = self._lib.pyvfio_dma_read(addr, p, n)
        if sig:
            raise fault_error("read", addr, n, signal.Signals(sig).name)

    def write(self, addr: int, src: memoryview) -> None:
        n = src.nbytes
        with self._ffi.from_buffer(src) as p:
            sig = self._lib.pyvfio_dma_write(addr, p, n)
        if sig:
            raise fault_error("write", addr, n, signal.Signals(sig).name)


class PythonCopy:
    """Copies through ``/proc/self/mem``: the kernel reports a missing page as an error."""

    name = "python"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self._pid = -1
        try:
            self._mem()  # open it now: one fd for the copier's life, not on the first DMA
        except DmaError as exc:
            log.error("%s; DMA to unsealed guest memory will fail", exc)

    def _mem(self) -> int:
        pid = os.getpid()
        if self._pid == pid:
            return self._fd
        with self._lock:
            if self._pid != pid:  # first use, or a forked child: its own address space
                try:
                    fd = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
                except OSError as exc:
                    raise DmaError(f"cannot open /proc/self/mem for DMA copies: {exc}",
                                   errno=errno.EIO) from exc
                if self._fd >= 0:
                    os.close(self._fd)  # the parent's, inherited across fork
                self._fd, self._pid = fd, pid
            return self._fd

    def close(self) -> None:
        """Close the ``/proc/self/mem`` fd (copies after this fail)."""
        with self._lock:
            fd, self._fd, self._pid = self._fd, -1, -2
        if fd >= 0:
            os.close(fd)

    def read(self, addr: int, dst: memoryview) -> None:
        fd, n, done = self._mem(), dst.nbytes, 0
        while done < n:
            with dst[done:] as rest:
                try:
                    got = os.preadv(fd, [rest], addr + done)
                except OSError as exc:
                    cause = os.strerror(exc.errno or errno.EIO)
                    raise fault_error("read", addr, n, cause) from exc
            if got <= 0:
                raise fault_error("read", addr, n, f"short read at {done:#x}")
            done += got

    def write(self, addr: int, src: memoryview) -> None:
        fd, n, done = self._mem(), src.nbytes, 0
        while done < n:
            with src[done:] as rest:
                try:
                    put = os.pwrite(fd, rest, addr + done)
                except OSError as exc:
                    cause = os.strerror(exc.errno or errno.EIO)
                    raise fault_error("write", addr, n, cause) from exc
            if put <= 0:
                raise fault_error("write", addr, n, f"short write at {done:#x}")
            done += put


def _load_shim() -> Any | None:
    try:
        return importlib.import_module("vfio_user_server._dma_shim")
    except ImportError:
        return None


def shim_available() -> bool:
    """True if the C shim is built and importable (whatever ``PYVFIO_NO_SHIM`` says)."""
    return _load_shim() is not None


_default: GuardedCopy | None = None
_default_lock = threading.Lock()


def default_copy() -> GuardedCopy:
    """The process's copier: the shim if built and not disabled, else the Python one."""
    global _default
    with _default_lock:
        if _default is None:
            _default = _select()
        return _default


def _select() -> GuardedCopy:
    if os.environ.get(ENV_NO_SHIM, "") not in ("", "0"):
        log.info("DMA guarded copies: python (%s is set)", ENV_NO_SHIM)
        return PythonCopy()
    module = _load_shim()
    if module is None:
        log.info("DMA guarded copies: python (the C shim is not built)")
        return PythonCopy()
    try:
        copy = ShimCopy(module)
    except OSError as exc:
        log.warning("DMA guarded copies: python (%s)", exc)
        return PythonCopy()
    log.debug("DMA guarded copies: c-shim")
    return copy


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer``; only ``buf`` is read."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_void_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def buffer_address(obj: Any) -> int:
    """The address of the first byte of a buffer object (an ``mmap``, read-only or not).

    The buffer is released again at once: the address stays valid as long as the object keeps
    its memory (for an mmap: until it is closed).
    """
    view = _PyBuffer()
    if _get_buffer(obj, ctypes.byref(view), 0) != 0:  # pragma: no cover - raises instead
        raise TypeError(f"{type(obj).__name__} has no buffer")
    try:
        return int(view.buf or 0)
    finally:
        _release_buffer(ctypes.byref(view))
