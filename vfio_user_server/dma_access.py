"""What devices use to reach guest memory: :class:`Segment` and :class:`DmaAccessor`.

:meth:`~vfio_user_server.dma.DmaMapTable.translate` cuts a range into :class:`Segment` pieces,
one per map crossed; :class:`DmaAccessor` reads and writes a range through them: directly where
the map is mmapped (a memoryview for sealed, zero-copy maps, a guarded copy otherwise), and with
``DMA_READ`` / ``DMA_WRITE`` messages through the server's :class:`MessageDma` where the map has
no fd. With the C shim, a range inside the map the accessor used last is copied by one C call
(the fast path: a cached translation, the map's pin reference and the guarded copy). Moved out
of :mod:`vfio_user_server.dma` (which re-exports every name) to keep each module one job; see
that module's docstring for the map table's rules."""

from __future__ import annotations

import errno
import logging
import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from .dmacopy import fault_error
from .errors import DmaError

if TYPE_CHECKING:
    import mmap

    from .dma import DmaMapping, DmaMapTable

__all__ = ["DmaAccessor", "DmaWindow", "MessageDma", "Segment", "WindowCache"]

log = logging.getLogger("vfio_user_server.dma")

_Buffer = bytes | bytearray | memoryview
#: A cached map of the fast path: (first IOVA, end IOVA, pin, host address - IOVA, mapping).
_Fast = tuple[int, int, Any, int, "DmaMapping"]


class MessageDma(Protocol):
    """DMA through DMA_READ / DMA_WRITE messages to the client (implemented by the server).

    The implementation chunks requests itself. It raises :class:`DmaError` when it cannot do
    the access (for example when called from the server's loop thread).
    """

    def dma_read(self, iova: int, length: int) -> bytes:
        """Read ``length`` bytes of guest memory at ``iova``."""
        ...

    def dma_write(self, iova: int, data: bytes) -> None:
        """Write ``data`` to guest memory at ``iova``."""
        ...


class Segment:
    """One scatter-gather piece of a translated range.

    ``view`` is a memoryview into the mmapped file (read-only if the access is not a write)
    when the map is :attr:`~DmaMapping.zero_copy`, else None. A direct segment (fd-backed,
    with or without a view) is read and written with :meth:`read_into` / :meth:`write_from`,
    which copy through the guard when there is no view; a segment that is not direct needs
    message DMA. A direct segment holds a reference on its map until :meth:`release`
    (idempotent) is called.
    """

    __slots__ = ("_addr", "_table", "iova", "length", "mapping", "view")

    def __init__(
        self,
        iova: int,
        length: int,
        mapping: DmaMapping,
        view: memoryview | None,
        table: DmaMapTable | None,
        addr: int = 0,
    ) -> None:
        self.iova = iova
        self.length = length
        self.mapping = mapping
        self.view = view
        self._table = table
        self._addr = addr  # host address of the first byte (direct segments)

    @property
    def direct(self) -> bool:
        """True if the piece is mmapped here (a view or a guarded copy; no message DMA)."""
        return self.mapping.direct

    def read_into(self, dst: memoryview) -> None:
        """Copy the segment into the byte buffer ``dst`` (``length`` bytes), safely.

        Raises :class:`DmaError` EFAULT if the client took the memory away, or if the segment
        was released or needs message DMA.
        """
        if self.view is not None:
            dst[:] = self.view
        elif self._table is not None:
            self._table._copy.read(self._addr, dst)
        else:
            raise DmaError(f"{self!r} is not mapped here", errno=errno.EFAULT)

    def write_from(self, src: memoryview) -> None:
        """Copy the byte buffer ``src`` (``length`` bytes) into the segment, safely."""
        if self.view is not None:
            self.view[:] = src
        elif self._table is not None:
            self._table._copy.write(self._addr, src)
        else:
            raise DmaError(f"{self!r} is not mapped here", errno=errno.EFAULT)

    def release(self) -> None:
        """Release the memoryview and the reference on the map."""
        view, self.view = self.view, None
        table, self._table = self._table, None
        if view is not None:
            try:
                view.release()
            except BufferError:
                log.warning("DMA segment %#x+%#x: view still exported", self.iova, self.length)
        if table is not None:
            table._put(self.mapping)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        kind = ("zero-copy" if self.mapping.zero_copy else "direct") if self.direct else "message"
        return f"Segment(iova={self.iova:#x}, length={self.length:#x}, {kind})"


class DmaAccessor:
    """Reads and writes guest memory: directly where mmapped, by message elsewhere."""

    def __init__(self, table: DmaMapTable, message_dma: MessageDma | None = None) -> None:
        self.table = table
        self.message_dma = message_dma
        # The fast path (C shim only): the last map read and the last map written, each as one
        # tuple swapped whole, so any thread may use the accessor: (first IOVA, end IOVA, pin,
        # host address minus IOVA, mapping). The map's pin is what keeps it valid: the table
        # closes it when the map goes (DMA_UNMAP, or a map replaced at the same IOVA: the table
        # generation moves), and a copy through a closed pin touches nothing and drops the
        # tuple, so the next access translates again. No generation check is needed per call.
        self._fast_r: _Fast | None = None
        self._fast_w: _Fast | None = None
        shim = table._shim
        if shim is not None:
            self._pin_read = shim._lib.pyvfio_pin_read
            self._pin_write = shim._lib.pyvfio_pin_write
            self._from_buffer = shim._ffi.from_buffer  # called positionally: keywords cost
            self._chars = shim._ffi.typeof("char[]")  # 0.3 us more per call (callgrind)
            self._pin_last = shim.pin_last
            self._pin_stale = shim.pin_stale

    def _fast_miss(self, r: int, fast: _Fast, what: str, iova: int, n: int) -> bool:
        """A fast-path copy returned ``r`` (not 0): raise for a fault, True if it is done,
        False if it copied nothing (the map was removed: the slow path reports it)."""
        if r & self._pin_last:
            self.table._pin_done(fast[4])
        if r & self._pin_stale:
            self._fast_r = self._fast_w = None
            return False
        sig = r & 0xFF
        if sig:
            raise fault_error(what, fast[3] + iova, n, signal.Signals(sig).name)
        return True

    def _msg(self) -> MessageDma:
        if self.message_dma is None:
            raise DmaError(
                "DMA to memory mapped without an fd needs message DMA (DMA_READ/DMA_WRITE), "
                "which is not available here",
                errno=errno.ENODEV,
            )
        return self.message_dma

    def read(self, iova: int, length: int) -> bytes:
        """Read ``length`` bytes at ``iova``."""
        buf = bytearray(length)
        self.read_into(iova, buf)
        return bytes(buf)

    def _one_map(self, iova: int, buf: memoryview, write: bool) -> bool:
        """The common case without segments: ``iova`` and ``buf.nbytes`` bytes lie in one
        fd-backed map with the permission asked for; copy (``write``: ``buf`` to guest
        memory) under a reference on the map, as :meth:`DmaMapTable.translate` would, and
        return True. False: nothing done, the general path decides (and reports errors)."""
        table, n = self.table, buf.nbytes
        with table._lock:
            m = table._find(iova)
            mfile = m._file if m is not None else None
            if (m is None or mfile is None or iova + n > m.end
                    or not (m.writable if write else m.readable)):
                return False
            m._refs += 1
            if m._pin is not None:  # the shim: cache the map for the fast path
                fast = (m.iova, m.end, m._pin, mfile.addr + m.offset - m.iova, m)
                if write:
                    self._fast_w = fast
                else:
                    self._fast_r = fast
        try:
            start = m.offset + (iova - m.iova)
            # Sealed against shrinking: a plain copy cannot fault. With the C shim, copy through
            # it anyway: its memcpy avoids glibc's slow `rep movsb` when the buffer sits a few
            # bytes past the guest address modulo 4 KiB (c_shim/dma_copy.c, BENCHMARKS.md).
            if mfile.trusted and table._copy.name != "c-shim":
                with memoryview(mfile.mm) as whole, whole[start:start + n] as view:
                    if write:
                        view[:] = buf
                    else:
                        buf[:] = view
            elif write:
                table._copy.write(mfile.addr + start, buf)
            else:
                table._copy.read(mfile.addr + start, buf)
        finally:
            table._put(m)
        return True

    def read_into(self, iova: int, buf: bytearray | memoryview) -> None:
        """Fill the writable buffer ``buf`` from guest memory at ``iova``."""
        fast = self._fast_r
        if fast is not None:
            try:
                dst = self._from_buffer(self._chars, buf, True)
            except BufferError:  # read-only or not contiguous: the general path's TypeError
                dst = None
            n = -1 if dst is None else len(dst)
            if fast[0] <= iova and iova + n <= fast[1] and n >= 0:
                r = self._pin_read(fast[2], fast[3] + iova, dst, n)
                if not r or self._fast_miss(r, fast, "read", iova, n):
                    return
        with memoryview(buf) as raw, raw.cast("B") as dst:
            if self._one_map(iova, dst, False):
                return
            segs = self.table.translate(iova, dst.nbytes, write=False)
            try:
                pos = 0
                for s in segs:
                    if s.view is not None:  # zero-copy
                        dst[pos : pos + s.length] = s.view
                        s.release()
                    elif s.direct:  # guarded copy
                        with dst[pos : pos + s.length] as piece:
                            s.read_into(piece)
                        s.release()
                    else:
                        data = self._msg().dma_read(s.iova, s.length)
                        if len(data) != s.length:
                            raise DmaError(
                                f"message DMA read {s.iova:#x}+{s.length:#x} returned "
                                f"{len(data)} bytes",
                                errno=errno.EIO,
                            )
                        dst[pos : pos + s.length] = data
                    pos += s.length
            finally:
                self.table.release(segs)

    def write(self, iova: int, data: _Buffer) -> None:
        """Write ``data`` to guest memory at ``iova``."""
        fast = self._fast_w
        if fast is not None:
            try:
                src = (data if isinstance(data, bytes)
                       else self._from_buffer(self._chars, data, False))
            except BufferError:  # not contiguous: the general path's TypeError
                src = None
            n = -1 if src is None else len(src)
            if fast[0] <= iova and iova + n <= fast[1] and n >= 0:
                r = self._pin_write(fast[2], fast[3] + iova, src, n)
                if not r or self._fast_miss(r, fast, "write", iova, n):
                    return
        with memoryview(data) as raw, raw.cast("B") as src:
            if self._one_map(iova, src, True):
                return
            segs = self.table.translate(iova, src.nbytes, write=True)
            try:
                pos = 0
                for s in segs:
                    piece = src[pos : pos + s.length]
                    if s.view is not None:  # zero-copy
                        s.view[:] = piece
                        s.release()
                    elif s.direct:  # guarded copy
                        s.write_from(piece)
                        s.release()
                    else:
                        self._msg().dma_write(s.iova, bytes(piece))
                    piece.release()
                    pos += s.length
            finally:
                self.table.release(segs)

    def read_u16(self, iova: int) -> int:
        return int(struct.unpack("<H", self.read(iova, 2))[0])

    def read_u32(self, iova: int) -> int:
        return int(struct.unpack("<I", self.read(iova, 4))[0])

    def read_u64(self, iova: int) -> int:
        return int(struct.unpack("<Q", self.read(iova, 8))[0])

    def write_u16(self, iova: int, value: int) -> None:
        self.write(iova, struct.pack("<H", value))

    def write_u32(self, iova: int, value: int) -> None:
        self.write(iova, struct.pack("<I", value))

    def write_u64(self, iova: int, value: int) -> None:
        self.write(iova, struct.pack("<Q", value))

    @contextmanager
    def map(self, iova: int, length: int, write: bool = False) -> Iterator[list[memoryview]]:
        """Direct access: yields one memoryview per map crossed (read-only unless write).

        Every piece must be fd-backed (else :class:`DmaError` EFAULT; see
        :meth:`DmaMapTable.is_direct`). Pieces of :attr:`~DmaMapping.zero_copy` maps are views
        of guest memory itself; the others are bounce buffers, filled by a guarded copy on
        entry and, with ``write``, copied back on a normal exit (so a vanished page is a
        :class:`DmaError`, never a crash; :meth:`DmaMapTable.is_zero_copy` tells which you
        get). The views are released, and the map references dropped, on exit: don't keep
        them.
        """
        segs = self.table.translate(iova, length, write)
        bounces: list[tuple[Segment, memoryview]] = []
        handed: list[memoryview] = []  # bounce views given out, released on exit
        try:
            missing = next((s for s in segs if not s.direct), None)
            if missing is not None:
                raise DmaError(
                    f"DMA {iova:#x}+{length:#x}: {missing.mapping!r} has no fd; "
                    "use read()/write() (message DMA)",
                    errno=errno.EFAULT,
                )
            views: list[memoryview] = []
            for s in segs:
                if s.view is not None:
                    views.append(s.view)
                    continue
                buf = memoryview(bytearray(s.length))
                s.read_into(buf)
                bounces.append((s, buf))
                view = buf if write else buf.toreadonly()
                handed.append(view)
                views.append(view)
            yield views
            if write:
                for s, buf in bounces:
                    s.write_from(buf)
        finally:
            for view in handed:
                view.release()
            for _, buf in bounces:
                buf.release()
            self.table.release(segs)


class WindowCache:
    """The few :class:`~vfio_user_server.dma.DmaWindow` objects a hot path keeps (virtqueue
    rings, NVMe queues and PRP lists), all dropped when the map table's ``generation``
    changes: one :meth:`~vfio_user_server.dma.DmaMapTable.window` lookup per map change
    instead of a translation per access. Not thread-safe: one thread uses it.
    """

    __slots__ = ("_gen", "_size", "_windows")

    def __init__(self, size: int) -> None:
        self._size = size
        self._windows: list[DmaWindow] = []
        self._gen = -1

    def clear(self) -> None:
        self._windows = []
        self._gen = -1

    def get(self, table: DmaMapTable, addr: int, length: int,
            write: bool) -> DmaWindow | None:
        """The window holding all of ``[addr, addr + length)`` with the permission asked
        for, or None (no fd, not sealed, not mapped, split over maps, or not permitted)."""
        gen = table.generation
        if gen != self._gen:
            self._windows = []
            self._gen = gen
        end = addr + length
        for w in self._windows:
            if w.start <= addr and end <= w.end:
                return w if (w.writable if write else w.readable) else None
        new = table.window(addr)
        if new is None or end > new.end:
            return None
        if len(self._windows) >= self._size:
            del self._windows[0]
        self._windows.append(new)
        return new if (new.writable if write else new.readable) else None


class DmaWindow:
    """One mmapped map seen by :meth:`DmaMapTable.window`: IOVA ``[start, end)`` is
    ``mm[iova + delta]``."""

    __slots__ = ("delta", "end", "mm", "readable", "start", "writable")

    def __init__(self, start: int, end: int, mm: mmap.mmap, delta: int, readable: bool,
                 writable: bool) -> None:
        self.start = start
        self.end = end
        self.mm = mm
        self.delta = delta
        self.readable = readable
        self.writable = writable
