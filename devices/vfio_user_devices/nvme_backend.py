"""The NVMe namespace's storage: a host file (raw image) or a memfd, by file descriptor.

Blocks are read and written with ``os.preadv``/``os.pwritev`` straight into the caller's buffers
(guest memory views on the direct DMA path); zeroing and deallocation punch holes where the
file system can.

Durability: a write returns once its bytes are in the host's page cache (they survive the
server's or QEMU's death, not the host's); :meth:`FileBackend.sync` (``fdatasync``) makes every
write that returned before it durable. The controller calls it for Flush, for a write with
Force Unit Access (before its completion is posted), for every write while the volatile write
cache is disabled, and when its client leaves.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable
from typing import Any

from vfio_user_server.errors import DeviceDefinitionError

from .nvme_spec import PAGE_SIZE

__all__ = ["BLOCK_SIZE", "LBA_SHIFT", "FileBackend", "parse_size"]

LBA_SHIFT = 9
BLOCK_SIZE = 1 << LBA_SHIFT

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def parse_size(text: str) -> int:
    """``4096``, ``512K``, ``64M``, ``2G``, ``1T`` (binary units) to bytes."""
    text = text.strip()
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    shift = 0
    if text and text[-1].upper() in units:
        shift = units[text[-1].upper()]
        text = text[:-1]
    elif text[-3:].upper() in ("KIB", "MIB", "GIB", "TIB"):
        shift = units[text[-3].upper()]
        text = text[:-3]
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
    return value << shift


class _Fallocate:
    """``fallocate(2)`` through libc (Python has no punch-hole call)."""

    def __init__(self) -> None:
        self.fn: Any = None
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            self.fn = fn

    def punch(self, fd: int, offset: int, length: int) -> bool:
        if self.fn is None:
            return False
        rc = self.fn(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        return int(rc) == 0


_fallocate = _Fallocate()


class FileBackend:
    """The namespace's blocks: a host file (raw image) or a memfd, by file descriptor."""

    def __init__(self, fd: int, size: int, *, path: str | None = None,
                 sync: Callable[[int], None] | None = None) -> None:
        self.fd = fd
        self.size = size
        self.path = path
        #: ``os.fdatasync`` when None; a test may pass a function that records the calls
        self._sync = sync
        #: completed :meth:`sync` calls (what Flush and FUA cost the host)
        self.syncs = 0
        #: :meth:`readv_nowait` asks the kernel not to wait (``RWF_NOWAIT``); cleared the first
        #: time the file says it cannot (a memfd, some file systems)
        self.nowait = hasattr(os, "RWF_NOWAIT")
        #: reads :meth:`readv_nowait` declined because the data was not in the page cache
        self.would_block = 0
        # Punching beyond EOF with KEEP_SIZE changes nothing: a harmless probe.
        self.can_punch = _fallocate.punch(fd, max(size, 0), PAGE_SIZE)

    @classmethod
    def open(cls, path: str | os.PathLike[str], size: int | None = None, *,
             sync: Callable[[int], None] | None = None) -> FileBackend:
        """Open a raw image; create it (``size`` bytes) if missing; grow it up to ``size``."""
        p = os.fspath(path)
        flags = os.O_RDWR | os.O_CLOEXEC
        if size is not None:
            flags |= os.O_CREAT
        try:
            fd = os.open(p, flags, 0o644)
        except OSError as exc:
            raise DeviceDefinitionError(f"nvme: cannot open image {p!r}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if size is not None and st.st_size < size:
                os.ftruncate(fd, size)
            actual = os.fstat(fd).st_size if size is None else size
        except OSError as exc:
            os.close(fd)
            raise DeviceDefinitionError(f"nvme: image {p!r}: {exc}") from exc
        actual -= actual % BLOCK_SIZE
        if actual <= 0:
            os.close(fd)
            raise DeviceDefinitionError(f"nvme: image {p!r} is smaller than one block")
        return cls(fd, actual, path=p, sync=sync)

    @classmethod
    def memory(cls, size: int) -> FileBackend:
        if size <= 0 or size % BLOCK_SIZE:
            raise DeviceDefinitionError(f"nvme: size {size} is not a positive multiple of 512")
        fd = os.memfd_create("nvme-namespace", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size)

    def readv(self, views: list[memoryview], offset: int) -> None:
        done = os.preadv(self.fd, views, offset)
        total = views[0].nbytes if len(views) == 1 else sum(v.nbytes for v in views)
        if done != total:  # short read (file shrunk under us): finish piecewise
            self._slow_readv(views, offset, done)

    def readv_nowait(self, views: list[memoryview], offset: int) -> bool:
        """:meth:`readv` if it needs no wait for the disk (the loop thread's inline reads);
        False if some of the data is not in the page cache, with ``views`` partly written or
        not at all (the caller reads them again, on a worker)."""
        if not self.nowait:
            self.readv(views, offset)
            return True
        try:
            done = os.preadv(self.fd, views, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            self.would_block += 1
            return False
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            self.nowait = False
            self.readv(views, offset)
            return True
        if done != (views[0].nbytes if len(views) == 1 else sum(v.nbytes for v in views)):
            self.would_block += 1  # partly cached (or past the end): the worker reads it all
            return False
        return True

    def _slow_readv(self, views: list[memoryview], offset: int, done: int) -> None:
        pos = 0
        for v in views:
            n = v.nbytes
            if pos + n > done:
                start = max(0, done - pos)
                data = os.pread(self.fd, n - start, offset + pos + start)
                v[start:start + len(data)] = data
                v[start + len(data):] = bytes(n - start - len(data))
            pos += n

    def writev(self, views: list[memoryview], offset: int) -> None:
        done = os.pwritev(self.fd, views, offset)
        total = views[0].nbytes if len(views) == 1 else sum(v.nbytes for v in views)
        if done != total:
            data = b"".join(bytes(v) for v in views)
            while done < total:
                done += os.pwrite(self.fd, data[done:], offset + done)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data.ljust(length, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def zero(self, offset: int, length: int) -> None:
        if self.can_punch and _fallocate.punch(self.fd, offset, length):
            return
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.write(offset, chunk[:n])
            offset += n

    def deallocate(self, offset: int, length: int) -> None:
        if self.can_punch:
            _fallocate.punch(self.fd, offset, length)

    def sync(self) -> None:
        """Make every write that returned before this call durable (``fdatasync``).

        For NVMe Flush, Force Unit Access, a disabled volatile write cache and the client's
        departure. Raises :class:`OSError` (the caller reports an internal error)."""
        if self._sync is None:
            os.fdatasync(self.fd)
        else:
            self._sync(self.fd)
        self.syncs += 1

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
