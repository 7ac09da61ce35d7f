"""The NVMe controller's data movement and NVM command set (:mod:`vfio_user_devices.nvme`).

:class:`GuestData` moves bytes between guest memory (described by PRPs) and the namespace or
Python buffers: straight through the mmapped guest pages where every byte is fd-backed, else by
DMA_READ / DMA_WRITE messages. :class:`IoCommands` runs Read, Write, Flush, Write Zeroes and
Dataset Management on namespace 1.

Both serve two callers: the controller's worker threads, and the inline path on the loop thread
(``inline=True``), where message DMA must never run. There, a step that would need it returns
:attr:`Worker.NEEDED` before any side effect of the command, and the command is left to the
worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from enum import Enum
from typing import TYPE_CHECKING

from vfio_user_server.dma import DmaMapTable, DmaWindow, Segment, WindowCache
from vfio_user_server.errors import DmaError

from .nvme_backend import LBA_SHIFT
from .nvme_spec import (
    CDW10,
    CDW11,
    CDW12,
    CQE_SIZE,
    DSM_RANGE,
    FLAGS_PSDT,
    NSID_ALL,
    PAGE_SIZE,
    RW_FUA,
    RW_NLB_MASK,
    SQE_FLAGS,
    SQE_NSID,
    SQE_OPCODE,
    SQE_PRP1,
    SQE_PRP2,
    Feature,
    IoOpcode,
    NvmeError,
    SqeTuple,
    Status,
    command_handler,
    dsm_deallocate,
    dsm_ranges,
    prp_ranges,
)

if TYPE_CHECKING:
    from .nvme import NvmeController

__all__ = ["MAX_TRANSFER", "MDTS", "GuestData", "IoCommands", "Worker", "check_nsid", "mapped"]

log = logging.getLogger("vfio_user_devices.nvme")

#: Windows onto guest memory kept per controller (queues, PRP lists and data mostly live in
#: the one or two maps of guest RAM).
MAX_WINDOWS = 4

#: Maximum Data Transfer Size: 2**MDTS pages (128 KiB).
MDTS = 5
MAX_TRANSFER = PAGE_SIZE << MDTS


def check_nsid(nsid: int) -> None:
    """The controller has one namespace, NSID 1."""
    if nsid != 1:
        raise NvmeError(Status.INVALID_NAMESPACE, f"namespace {nsid:#x}")


class Worker(Enum):
    """What the inline path returns for a command it must leave to the worker thread."""

    NEEDED = "the command needs the worker (message DMA or a slow host call)"


Ranges = list[tuple[int, int]]


class mapped:  # a function in use (with mapped(...) as views), a class for speed
    """Translate guest ``ranges`` and give one view per piece, or None if some piece has no
    view: no fd (message DMA), or a file not sealed against shrinking, which only guarded
    copies may touch (``direct`` is then still true, and :meth:`copy` reads it).

    ``with mapped(table, ranges, write) as views:`` releases the views (and the references on
    their maps, which a DMA unmap waits for) when the block ends. Raises :class:`DmaError` if
    some byte is not mapped or not accessible. (A class, not a generator: it runs per command.)
    """

    __slots__ = ("_segs", "_views", "direct")

    def __init__(self, table: DmaMapTable, ranges: Iterable[tuple[int, int]], write: bool) -> None:
        segs: list[Segment] = []
        try:
            for iova, n in ranges:
                segs.extend(table.translate(iova, n, write=write))
        except BaseException:
            for s in segs:
                s.release()
            raise
        self._segs = segs
        self.direct = True  # every piece is mmapped here: no message DMA needed
        views: list[memoryview] = []
        for s in segs:
            if s.view is None:
                self._views = None
                self.direct = all(s.direct for s in segs)
                return
            views.append(s.view)
        self._views = views

    def copy(self) -> bytes:
        """The pieces' bytes, by guarded copies (``direct`` only; DmaError if memory is gone)."""
        out = bytearray(sum(s.length for s in self._segs))
        pos = 0
        with memoryview(out) as whole:
            for s in self._segs:
                with whole[pos:pos + s.length] as piece:
                    s.read_into(piece)
                pos += s.length
        return bytes(out)

    def __enter__(self) -> list[memoryview] | None:
        return self._views

    def __exit__(self, *exc: object) -> None:
        for s in self._segs:
            s.release()


class GuestData:
    """Guest memory for one controller: PRP walking, copies, and file I/O into guest pages.

    The inline path (loop thread, controller lock held) reaches zero-copy guest memory through
    cached :class:`~vfio_user_server.dma.DmaWindow` objects: one lookup per DMA map change
    instead of a translation, a map reference and a view per access. That is safe there
    because DMA_UNMAP is handled on the same loop thread, so no map can go away during an
    inline run. The worker keeps translating (its references make an unmap wait for it).
    """

    def __init__(self, ctrl: NvmeController) -> None:
        self._ctrl = ctrl
        self._windows = WindowCache(MAX_WINDOWS)

    def window(self, addr: int, length: int, write: bool) -> DmaWindow | None:
        """The cached zero-copy window holding all of ``[addr, addr + length)`` with the
        permission asked for, or None (no fd, not sealed, not mapped, or split over maps)."""
        return self._windows.get(self._ctrl.dma.table, addr, length, write)

    def _window_io(self, ranges: Ranges, offset: int, write: bool) -> bool | Worker:
        """Inline only: the file I/O straight between the namespace and guest pages through
        one window; False (nothing done) if the ranges are not all in one zero-copy map,
        :attr:`Worker.NEEDED` for a read that would wait for the disk."""
        first, n = ranges[0]
        w = self.window(first, n, not write)  # a Read writes guest memory
        if w is None:
            return False
        start, end, delta = w.start, w.end, w.delta
        for iova, n in ranges:
            if iova < start or iova + n > end:
                return False
        backend = self._ctrl.backend
        with memoryview(w.mm) as whole:
            views = [whole[iova + delta:iova + delta + n] for iova, n in ranges]
            try:
                if write:
                    backend.writev(views, offset)
                elif not backend.readv_nowait(views, offset):
                    return Worker.NEEDED
            finally:
                for v in views:
                    v.release()
        return True

    def direct_read(self, ranges: Iterable[tuple[int, int]]) -> bytes | None:
        """Guest memory by mmap copies, or None if some of it is not fd-backed (or mapped, or
        taken away by the client)."""
        try:
            m = mapped(self._ctrl.dma.table, ranges, write=False)
            with m as views:
                if views is None:  # unsealed memory: guarded copies, still here
                    return m.copy() if m.direct else None
                return bytes(views[0]) if len(views) == 1 else b"".join(views)
        except DmaError:
            return None  # the worker reports it

    def in_one_direct_map(self, iova: int, length: int) -> bool:
        """True if ``iova``/``length`` lies in one fd-backed, writable map (cheap check)."""
        m = self._ctrl.dma.table.find(iova)
        return m is not None and m.direct and m.writable and iova + length <= m.end

    def write_entries(self, base: int, size: int, start: int, entries: list[bytes]) -> None:
        """Write completion entries into the CQ ring at ``base`` (``size`` long) from ``start``."""
        first = min(len(entries), size - start)
        dma = self._ctrl.dma
        for addr, chunk in ((base + start * CQE_SIZE, entries[:first]), (base, entries[first:])):
            if not chunk:
                continue
            try:
                with mapped(dma.table, ((addr, len(chunk) * CQE_SIZE),), write=True) as views:
                    if views is not None and len(views) == 1:
                        view = views[0]
                        # One store per entry, so that an entry's phase bit is never seen
                        # before the rest of it.
                        for i, entry in enumerate(chunk):
                            view[i * CQE_SIZE:(i + 1) * CQE_SIZE] = entry
                        continue
            except DmaError:
                pass  # dma.write below reports it
            for i, entry in enumerate(chunk):
                dma.write(addr + i * CQE_SIZE, entry)

    def ranges(self, cmd: SqeTuple, length: int, inline: bool = False) -> Ranges | Worker:
        """The guest ranges of the command's PRPs (reading PRP lists from guest memory)."""
        if cmd[SQE_FLAGS] & FLAGS_PSDT:
            raise NvmeError(Status.INVALID_FIELD, "SGLs are not supported")
        read_list = self._read_list_inline if inline else self._read_list
        out = prp_ranges(cmd[SQE_PRP1], cmd[SQE_PRP2], length, read_list)
        return Worker.NEEDED if out is None else out

    def _read_list(self, iova: int, length: int) -> bytes:
        try:
            return self._ctrl.dma.read(iova, length)
        except DmaError as exc:
            raise NvmeError(Status.DATA_TRANSFER_ERROR, f"PRP list: {exc}") from exc

    def _read_list_inline(self, iova: int, length: int) -> bytes | None:
        w = self.window(iova, length, False)
        if w is not None:
            at = iova + w.delta
            return w.mm[at:at + length]
        if not self._ctrl.dma.table.is_direct(iova, length):
            return None
        return self._read_list(iova, length)

    def _worker_ranges(self, cmd: SqeTuple, length: int) -> Ranges:
        out = self.ranges(cmd, length)
        assert not isinstance(out, Worker)  # only the inline path hands off
        return out

    def to_guest(self, cmd: SqeTuple, data: bytes, length: int | None = None) -> None:
        """Copy ``data`` (padded or cut to ``length``) to the command's PRPs (worker only)."""
        if length is not None:
            data = data[:length].ljust(length, b"\0")
        pos = 0
        try:
            for iova, n in self._worker_ranges(cmd, len(data)):
                self._ctrl.dma.write(iova, data[pos:pos + n])
                pos += n
        except DmaError as exc:
            raise NvmeError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc

    def from_guest(self, cmd: SqeTuple, length: int) -> bytes:
        """``length`` bytes from the command's PRPs (worker only)."""
        dma = self._ctrl.dma
        try:
            return b"".join(dma.read(iova, n) for iova, n in self._worker_ranges(cmd, length))
        except DmaError as exc:
            raise NvmeError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc

    def file_io(self, cmd: SqeTuple, offset: int, length: int, write: bool,
                inline: bool) -> Worker | None:
        """Move ``length`` bytes between the namespace at ``offset`` and the command's PRPs."""
        ranges = self.ranges(cmd, length, inline)
        if isinstance(ranges, Worker):
            return ranges
        if inline and ranges:
            done = self._window_io(ranges, offset, write)
            if done is Worker.NEEDED:
                return done
            if done:
                return None
        backend, dma = self._ctrl.backend, self._ctrl.dma
        try:
            m = mapped(dma.table, ranges, write=not write)
            with m as views:  # zero-copy only where the memory is sealed
                if views is not None:
                    if write:
                        backend.writev(views, offset)
                    elif not inline:
                        backend.readv(views, offset)
                    elif not backend.readv_nowait(views, offset):
                        return Worker.NEEDED
                    return None
        except DmaError as exc:
            raise NvmeError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc
        # Some memory has no fd: message DMA, which only the worker may do. fd-backed memory
        # without views (not sealed) is copied below through the guard, inline or not.
        if inline and not m.direct:
            return Worker.NEEDED
        try:
            if write:
                backend.write(offset, b"".join(dma.read(i, n) for i, n in ranges))
            else:
                data = backend.read(offset, length)
                pos = 0
                for iova, n in ranges:
                    dma.write(iova, data[pos:pos + n])
                    pos += n
        except DmaError as exc:
            raise NvmeError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc
        return None


Handler = Callable[["IoCommands", SqeTuple, bool], "int | Worker"]


class IoCommands:
    """The NVM command set on namespace 1 (NSID 1, 512-byte blocks)."""

    def __init__(self, ctrl: NvmeController, guest: GuestData) -> None:
        self._ctrl = ctrl
        self._guest = guest

    @staticmethod
    def inline_ok(cmd: SqeTuple, write_cache: bool) -> bool:
        """Plain Reads, and Writes that need no fsync, may run on the loop thread."""
        opcode = cmd[SQE_OPCODE]
        return opcode == IoOpcode.READ or (
            opcode == IoOpcode.WRITE and write_cache and not cmd[CDW12] & RW_FUA)

    def run(self, cmd: SqeTuple, inline: bool = False) -> int | Worker:
        """Execute one command: its completion dword 0, or :attr:`Worker.NEEDED` (inline only).

        Raises :class:`NvmeError` for the command's error status.
        """
        return command_handler(self.HANDLERS, cmd, "I/O")(self, cmd, inline)

    def _lba_range(self, cmd: SqeTuple) -> tuple[int, int]:
        slba = cmd[CDW10] | cmd[CDW11] << 32
        nlb = (cmd[CDW12] & RW_NLB_MASK) + 1
        if slba + nlb > self._ctrl.blocks:
            raise NvmeError(Status.LBA_OUT_OF_RANGE, f"LBA {slba}+{nlb} > {self._ctrl.blocks}")
        return slba, nlb

    def _read_write(self, cmd: SqeTuple, inline: bool) -> int | Worker:
        check_nsid(cmd[SQE_NSID])
        slba, nlb = self._lba_range(cmd)
        length = nlb << LBA_SHIFT
        if length > MAX_TRANSFER:
            raise NvmeError(Status.INVALID_FIELD, f"transfer of {length} > MDTS")
        write = cmd[SQE_OPCODE] == IoOpcode.WRITE
        ctrl = self._ctrl
        try:
            if self._guest.file_io(cmd, slba << LBA_SHIFT, length, write, inline) is not None:
                return Worker.NEEDED
            if write and self.durable_now(cmd):
                ctrl.backend.sync()  # before the completion is posted
        except OSError as exc:
            log.error("nvme: backing file I/O failed: %s", exc)
            raise NvmeError(Status.INTERNAL_ERROR, str(exc)) from exc
        stats = ctrl.stats
        count, nbytes = ("writes", "write_bytes") if write else ("reads", "read_bytes")
        if inline:  # the lock is held
            stats[count] += 1
            stats[nbytes] += length
        else:  # workers of other queues count too
            with ctrl.lock:
                stats[count] += 1
                stats[nbytes] += length
        return 0

    def durable_now(self, cmd: SqeTuple) -> bool:
        """A write that must be durable before it completes: Force Unit Access, or the
        volatile write cache is off."""
        return bool(cmd[CDW12] & RW_FUA) or not self._ctrl.features[Feature.VOLATILE_WRITE_CACHE]

    def _flush(self, cmd: SqeTuple, inline: bool) -> int:
        # Every write whose completion the host has seen returned from pwritev before its
        # completion was posted, so the sync covers it (whatever queue it came from, inline
        # or in another worker's batch). Writes still in progress on other queues have no
        # completion yet, which a flush need not cover. A flush never runs inline.
        if cmd[SQE_NSID] != NSID_ALL:
            check_nsid(cmd[SQE_NSID])
        try:
            self._ctrl.backend.sync()
        except OSError as exc:
            raise NvmeError(Status.INTERNAL_ERROR, str(exc)) from exc
        with self._ctrl.lock:
            self._ctrl.stats["flushes"] += 1
        return 0

    def _write_zeroes(self, cmd: SqeTuple, inline: bool) -> int:
        check_nsid(cmd[SQE_NSID])
        slba, nlb = self._lba_range(cmd)
        backend = self._ctrl.backend
        try:
            backend.zero(slba << LBA_SHIFT, nlb << LBA_SHIFT)
            if self.durable_now(cmd):
                backend.sync()
        except OSError as exc:
            raise NvmeError(Status.INTERNAL_ERROR, str(exc)) from exc
        return 0

    def _dataset_management(self, cmd: SqeTuple, inline: bool) -> int:
        check_nsid(cmd[SQE_NSID])
        nr = dsm_ranges(cmd)
        data = self._guest.from_guest(cmd, nr * DSM_RANGE.size)
        ranges = []
        for i in range(nr):
            _attrs, nlb, slba = DSM_RANGE.unpack_from(data, i * DSM_RANGE.size)
            if slba + nlb > self._ctrl.blocks:
                raise NvmeError(Status.LBA_OUT_OF_RANGE, f"DSM range {slba}+{nlb}")
            ranges.append((slba, nlb))
        if dsm_deallocate(cmd):
            for slba, nlb in ranges:
                if nlb:
                    self._ctrl.backend.deallocate(slba << LBA_SHIFT, nlb << LBA_SHIFT)
        return 0

    HANDLERS: dict[int, Handler] = {
        IoOpcode.READ: _read_write,
        IoOpcode.WRITE: _read_write,
        IoOpcode.FLUSH: _flush,
        IoOpcode.WRITE_ZEROES: _write_zeroes,
        IoOpcode.DSM: _dataset_management,
    }
