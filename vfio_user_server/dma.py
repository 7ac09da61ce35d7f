"""DMA: the client's map table, translation to scatter-gather, and the message-DMA fallback.

The client (QEMU) sends ``DMA_MAP`` for every guest RAM section, usually with an fd of the
memory backend (memfd, file, hugetlbfs). :class:`DmaMapTable` keeps those maps keyed by IOVA.
Every map brings a *new* fd copy, even for the same file, so files are deduplicated by
``(st_dev, st_ino)`` and mmapped once (``MAP_SHARED``, the whole file); the extra fds are
closed at once and the mapping is closed when the last map on the file goes away.

Direct accesses hold a reference on each map they touch. :meth:`DmaMapTable.remove` removes
the map from lookups at once, then waits (up to ``unmap_timeout``) for those references to be
released; if the timeout passes it logs a warning and defers the munmap to the release of the
last reference, so memory in use is never unmapped.

Maps without an fd (plain ``-m`` guest RAM, the device's own BARs) are served with
``DMA_READ`` / ``DMA_WRITE`` messages through a :class:`MessageDma` the server supplies.
:class:`DmaAccessor` picks the right path for each piece of a range.

The client can shrink or hole-punch a file after mapping it, and touching a page that is gone
raises SIGBUS. So a file is *trusted* only if its seals forbid shrinking it (``F_SEAL_SHRINK``,
as QEMU's default memfd backend sets; hugetlbfs files are never trusted, since a punched huge
page may not come back): only trusted maps hand out memoryviews (zero-copy). Every other
file-backed map is still accessed directly, but each access is a guarded copy
(:mod:`vfio_user_server.dmacopy`: the C shim, or its pure-Python fallback) that turns a vanished
page into a :class:`DmaError` EFAULT, so the device reports a DMA error and the server keeps
serving. Only regular files are accepted with DMA_MAP (memfd, tmpfs, hugetlbfs and disk files
all are); sockets, pipes, directories and devices are refused.

Python's ``mmap`` cannot be closed while memoryviews into it exist, so every memoryview this
module hands out belongs to a :class:`Segment` (or a :meth:`DmaAccessor.map` block) and is
released with it.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from .dmacopy import GuardedCopy, buffer_address, default_copy
from .errors import DmaError
from .fds import close_fd
from .protocol.constants import DmaMapFlag

__all__ = [
    "DEFAULT_UNMAP_TIMEOUT",
    "DmaAccessor",
    "DmaMapTable",
    "DmaMapping",
    "DmaProt",
    "DmaWindow",
    "MessageDma",
    "Segment",
]

log = logging.getLogger(__name__)

#: Seconds :meth:`DmaMapTable.remove` waits for in-flight direct accesses.
DEFAULT_UNMAP_TIMEOUT = 4.0

_IOVA_LIMIT = 1 << 64
_PAGE_SIZE = mmap.PAGESIZE

_Buffer = bytes | bytearray | memoryview


#: DMA_MAP permission bits (the protocol's flags, written once in protocol.constants).
DmaProt = DmaMapFlag
_PROT_MASK = int(DmaMapFlag.READ | DmaMapFlag.WRITE)


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


class _MappedFile:
    """One mmapped file, shared by every map on that file."""

    __slots__ = ("addr", "fd", "key", "length", "mm", "nmaps", "trusted", "writable")

    def __init__(
        self,
        key: tuple[int, int],
        fd: int,
        mm: mmap.mmap,
        length: int,
        writable: bool,
        trusted: bool,
    ) -> None:
        self.key = key
        self.fd = fd
        self.mm = mm
        self.addr = buffer_address(mm)  # valid until mm is closed
        self.length = length
        self.writable = writable
        self.trusted = trusted  # sealed against shrinking: memoryviews are safe
        self.nmaps = 0

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            # A memoryview escaped its Segment / map() block. Dropping our reference leaves
            # the munmap to the mmap object's deallocation, after the last view is gone.
            log.warning(
                "DMA file %s: memoryviews still exported; munmap deferred to garbage collection",
                self.key,
            )
        close_fd(self.fd, "DMA fd")


class DmaMapping:
    """One DMA_MAP: ``size`` bytes of guest memory at ``iova``.

    ``offset`` is the file offset of the map (0 without an fd); ``direct`` tells whether the
    memory is mmapped here (else message DMA is needed).
    """

    __slots__ = ("_deferred", "_file", "_r", "_refs", "_removed", "_w", "iova", "offset", "prot",
                 "size")

    def __init__(
        self, iova: int, size: int, prot: int, offset: int, file: _MappedFile | None
    ) -> None:
        self.iova = iova
        self.size = size
        self.prot = DmaProt(prot)
        # plain bools: IntFlag arithmetic is slow and these are checked on every access
        self._r = bool(prot & DmaProt.READ)
        self._w = bool(prot & DmaProt.WRITE)
        self.offset = offset
        self._file = file
        self._refs = 0
        self._removed = False
        self._deferred = False

    @property
    def end(self) -> int:
        """First IOVA after the map."""
        return self.iova + self.size

    @property
    def direct(self) -> bool:
        """True if the map is backed by an mmapped file."""
        return self._file is not None

    @property
    def zero_copy(self) -> bool:
        """True if the map's file is sealed against shrinking, so memoryviews into it are safe.

        Other fd-backed maps are reached by guarded copies (still direct, without messages).
        """
        return self._file is not None and self._file.trusted

    @property
    def readable(self) -> bool:
        return self._r

    @property
    def writable(self) -> bool:
        return self._w

    @property
    def file_key(self) -> tuple[int, int] | None:
        """``(st_dev, st_ino)`` of the backing file, or None."""
        return None if self._file is None else self._file.key

    def __repr__(self) -> str:
        return (
            f"DmaMapping(iova={self.iova:#x}, size={self.size:#x}, prot={int(self.prot)}, "
            f"offset={self.offset:#x}, direct={self.direct})"
        )


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


def _round_down(value: int, align: int) -> int:
    return value - value % align


class DmaMapTable:
    """The DMA maps of one client, keyed by IOVA. Thread-safe.

    ``on_map(mapping)`` / ``on_unmap(mapping)`` are called outside the table's lock after a
    map is added / removed from lookups (``on_unmap`` runs *before* :meth:`remove` waits for
    in-flight accesses, so a device can stop them). Exceptions from hooks are logged.
    """

    def __init__(
        self,
        *,
        on_map: Callable[[DmaMapping], None] | None = None,
        on_unmap: Callable[[DmaMapping], None] | None = None,
        unmap_timeout: float = DEFAULT_UNMAP_TIMEOUT,
        max_maps: int | None = None,
        copy: GuardedCopy | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._starts: list[int] = []
        self._maps: dict[int, DmaMapping] = {}
        self._files: dict[tuple[int, int], _MappedFile] = {}
        self._live_files: set[_MappedFile] = set()
        self.on_map = on_map
        self.on_unmap = on_unmap
        self.unmap_timeout = unmap_timeout
        self.max_maps = max_maps
        #: Bumped whenever a map is added or removed: a :meth:`window` is valid while this
        #: is unchanged.
        self.generation = 0
        #: Guarded copies for maps that are not zero-copy (the C shim or the Python path).
        self._copy = copy if copy is not None else default_copy()

    @property
    def copy_name(self) -> str:
        """Which guarded copy this table uses: ``"c-shim"`` or ``"python"``."""
        return self._copy.name

    # ----------------------------------------------------------------------------- maps

    def add(self, iova: int, size: int, prot: int, fd: int | None, offset: int) -> None:
        """Add a map; takes ownership of ``fd`` (closed by the table, also on failure).

        Raises :class:`DmaError` with EINVAL (zero size, overflow past 2**64, bad values, an
        fd that is not a regular file: a socket, pipe, directory or device), EEXIST (overlaps
        an existing map) or ENOSPC (``max_maps`` reached, as the kernel's type1 IOMMU when its
        map count runs out). A regular file that cannot be mmapped, or is too small for the
        map, is logged and the map falls back to message DMA: the client serves the memory
        either way, and refusing a map can abort QEMU.
        """
        owned_fd = fd if fd is not None and fd >= 0 else None
        try:
            mapping = self._add(iova, size, prot, owned_fd, offset)
        except BaseException:
            close_fd(owned_fd, "DMA fd")
            raise
        self._call_hook(self.on_map, mapping)

    def _add(self, iova: int, size: int, prot: int, fd: int | None, offset: int) -> DmaMapping:
        if iova < 0 or size < 0 or offset < 0 or prot < 0:
            raise DmaError(f"DMA_MAP: negative value (iova={iova:#x})", errno=errno.EINVAL)
        if size == 0:
            raise DmaError(f"DMA_MAP of size 0 at {iova:#x}", errno=errno.EINVAL)
        if iova + size > _IOVA_LIMIT:
            raise DmaError(
                f"DMA_MAP {iova:#x}+{size:#x} overflows the IOVA space", errno=errno.EINVAL
            )
        prot = int(prot)
        if prot & ~_PROT_MASK:
            log.debug("DMA_MAP %#x: ignoring unknown flag bits %#x", iova, prot & ~_PROT_MASK)
        prot &= _PROT_MASK
        with self._lock:
            self._check_free(iova, size)
            if self.max_maps is not None and len(self._maps) >= self.max_maps:
                raise DmaError(f"DMA_MAP: too many maps (max {self.max_maps})", errno=errno.ENOSPC)
            mfile = None
            if fd is not None:
                mfile = self._attach_file(fd, offset + size, bool(prot & DmaProt.WRITE), iova)
                if mfile is None or mfile.fd != fd:
                    close_fd(fd, "DMA fd")  # not needed: same file already mapped, or message DMA
            mapping = DmaMapping(iova, size, prot, offset if mfile else 0, mfile)
            bisect.insort(self._starts, iova)
            self._maps[iova] = mapping
            self.generation += 1
        log.debug("DMA map %r", mapping)
        return mapping

    def _check_free(self, iova: int, size: int) -> None:
        i = bisect.bisect_left(self._starts, iova + size)
        if i > 0:
            prev = self._maps[self._starts[i - 1]]
            if prev.end > iova:
                raise DmaError(f"DMA_MAP {iova:#x}+{size:#x} overlaps {prev!r}", errno=errno.EEXIST)

    def _attach_file(self, fd: int, needed: int, want_write: bool, iova: int) -> _MappedFile | None:
        """Find or create the mapping of fd's file. Called with the lock held.

        The fd is kept only if a new mapping is returned whose ``fd`` is ``fd``; the caller
        closes it otherwise.
        """
        # Seals first: once F_SEAL_SHRINK is set, the size fstat reports next can only grow.
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0  # not a memfd
        try:
            st = os.fstat(fd)
        except OSError as e:
            log.warning("DMA_MAP %#x: fstat of fd failed (%s); using message DMA", iova, e)
            return None
        if not stat.S_ISREG(st.st_mode):
            raise DmaError(
                f"DMA_MAP {iova:#x}: the fd is not a regular file (mode {st.st_mode:#o})",
                errno=errno.EINVAL,
            )
        key = (st.st_dev, st.st_ino)
        mfile = self._files.get(key)
        if mfile is not None and mfile.length >= needed and (mfile.writable or not want_write):
            mfile.nmaps += 1
            return mfile
        length = st.st_size
        blk = st.st_blksize
        if blk > _PAGE_SIZE and length % blk:
            # hugetlbfs: only whole huge pages can be mapped.
            length = _round_down(length, blk)
        if length < needed:
            log.warning(
                "DMA_MAP %#x: file too small (%#x bytes, map needs %#x); using message DMA",
                iova,
                st.st_size,
                needed,
            )
            return None
        writable = True
        try:
            try:
                mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED)
            except PermissionError:
                writable = False
                mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except (OSError, ValueError, OverflowError) as e:
            log.warning("DMA_MAP %#x: cannot mmap fd (%s); using message DMA", iova, e)
            return None
        if want_write and not writable:
            mm.close()
            log.warning("DMA_MAP %#x: fd is read-only but map is writable; using message DMA", iova)
            return None
        # hugetlbfs (blocks bigger than a page): a punched huge page is refilled from a pool
        # that can be empty (SIGBUS) even with the seals, so those are never trusted.
        trusted = bool(seals & fcntl.F_SEAL_SHRINK) and blk <= _PAGE_SIZE
        new = _MappedFile(key, fd, mm, length, writable, trusted)
        new.nmaps = 1
        self._files[key] = new  # an older, smaller mapping stays alive for its own maps
        self._live_files.add(new)
        return new

    def remove(self, iova: int, size: int) -> int:
        """Remove the maps in ``[iova, iova + size)``; return how many bytes were unmapped.

        As with VFIO's type1 IOMMU: every map the range touches must lie wholly inside it (a
        map is never split: EINVAL otherwise), and a range with no map in it unmaps nothing
        and is not an error. The usual request matches one map exactly; QEMU with a vIOMMU
        also unmaps large ranges around (or without) maps. Waits up to ``unmap_timeout`` for
        in-flight direct accesses; after that the munmap is deferred to the release of the
        last reference (a warning is logged).
        """
        if size <= 0 or iova < 0 or iova + size > _IOVA_LIMIT:
            raise DmaError(f"DMA_UNMAP {iova:#x}+{size:#x}: bad range", errno=errno.EINVAL)
        end = iova + size
        with self._lock:
            exact = self._maps.get(iova)
            if exact is not None and exact.size == size:
                victims = [exact]
            else:
                first = bisect.bisect_left(self._starts, iova)
                if first > 0 and self._maps[self._starts[first - 1]].end > iova:
                    first -= 1  # a map that starts below the range and reaches into it
                victims = []
                for start in self._starts[first:]:
                    if start >= end:
                        break
                    m = self._maps[start]
                    if m.iova < iova or m.end > end:
                        raise DmaError(
                            f"DMA_UNMAP {iova:#x}+{size:#x} would split {m!r}",
                            errno=errno.EINVAL,
                        )
                    victims.append(m)
            for m in victims:
                self._unlink(m)
        if not victims:
            log.debug("DMA unmap %#x+%#x: nothing mapped there", iova, size)
            return 0
        log.debug("DMA unmap %s", victims)
        for m in victims:
            self._call_hook(self.on_unmap, m)
        self._drain(victims)
        return sum(m.size for m in victims)

    def remove_all(self) -> None:
        """Remove every map (client disconnect, UNMAP_ALL), waiting as :meth:`remove` does."""
        with self._lock:
            maps = [self._maps[s] for s in self._starts]
            for m in maps:
                self._unlink(m)
        for m in maps:
            self._call_hook(self.on_unmap, m)
        self._drain(maps)

    def _unlink(self, mapping: DmaMapping) -> None:
        del self._maps[mapping.iova]
        del self._starts[bisect.bisect_left(self._starts, mapping.iova)]
        mapping._removed = True
        self.generation += 1

    def _drain(self, maps: list[DmaMapping]) -> None:
        deadline = time.monotonic() + self.unmap_timeout
        with self._lock:
            for m in maps:
                while m._refs:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if m._refs:
                    m._deferred = True
                    log.warning(
                        "DMA unmap %r: %d access(es) still in flight after %.1fs; "
                        "munmap deferred until they finish",
                        m,
                        m._refs,
                        self.unmap_timeout,
                    )
                else:
                    self._finish(m)

    def _finish(self, mapping: DmaMapping) -> None:
        """Drop a removed map's reference on its file. Called with the lock held."""
        mfile, mapping._file = mapping._file, None
        if mfile is None:
            return
        mfile.nmaps -= 1
        if mfile.nmaps == 0:
            if self._files.get(mfile.key) is mfile:
                del self._files[mfile.key]
            self._live_files.discard(mfile)
            mfile.close()

    def maps(self) -> list[DmaMapping]:
        """The current maps, by IOVA."""
        with self._lock:
            return [self._maps[s] for s in self._starts]

    def __len__(self) -> int:
        with self._lock:
            return len(self._maps)

    def mapped_file_count(self) -> int:
        """How many files are mmapped now (including ones kept alive by deferred unmaps)."""
        with self._lock:
            return len(self._live_files)

    def find(self, iova: int) -> DmaMapping | None:
        """The map containing ``iova``, or None."""
        with self._lock:
            return self._find(iova)

    def _find(self, iova: int) -> DmaMapping | None:
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0:
            return None
        m = self._maps[self._starts[i]]
        return m if iova < m.end else None

    # ------------------------------------------------------------------------ translation

    def _pieces(self, iova: int, length: int, write: bool) -> list[tuple[int, int, DmaMapping]]:
        """Check coverage and permissions; called with the lock held."""
        if iova < 0 or length < 0 or iova + length > _IOVA_LIMIT:
            raise DmaError(f"DMA range {iova:#x}+{length:#x} is invalid", errno=errno.EFAULT)
        pieces: list[tuple[int, int, DmaMapping]] = []
        addr, end = iova, iova + length
        while addr < end:
            m = self._find(addr)
            if m is None:
                raise DmaError(
                    f"DMA {iova:#x}+{length:#x}: {addr:#x} is not mapped", errno=errno.EFAULT
                )
            if write and not m.writable:
                raise DmaError(
                    f"DMA write {iova:#x}+{length:#x}: {m!r} is read-only", errno=errno.EPERM
                )
            if not write and not m.readable:
                raise DmaError(
                    f"DMA read {iova:#x}+{length:#x}: {m!r} is not readable", errno=errno.EPERM
                )
            n = min(end, m.end) - addr
            pieces.append((addr, n, m))
            addr += n
        return pieces

    def translate(self, iova: int, length: int, write: bool) -> list[Segment]:
        """Split ``iova``/``length`` into segments, one per map it crosses.

        Raises :class:`DmaError` EFAULT if some byte is not mapped, EPERM if ``write`` and a
        map is read-only (or a read and a map is not readable). Direct segments hold a
        reference on their map: release them with :meth:`release` (or
        :meth:`Segment.release`) promptly, since :meth:`remove` waits for them.
        """
        segs: list[Segment] = []
        with self._lock:
            for addr, n, m in self._pieces(iova, length, write):
                mfile = m._file
                if mfile is None:
                    segs.append(Segment(addr, n, m, None, None))
                    continue
                start = m.offset + (addr - m.iova)
                view = None
                if mfile.trusted:
                    base = memoryview(mfile.mm)
                    view = base[start : start + n]
                    base.release()
                    if not write:
                        ro = view.toreadonly()
                        view.release()
                        view = ro
                m._refs += 1
                segs.append(Segment(addr, n, m, view, self, mfile.addr + start))
        return segs

    def release(self, segments: list[Segment]) -> None:
        """Release segments returned by :meth:`translate`."""
        for s in segments:
            s.release()

    def is_direct(self, iova: int, length: int) -> bool:
        """True if the whole range is mapped and fd-backed (no message DMA needed)."""
        with self._lock:
            try:
                pieces = self._pieces(iova, length, False)
            except DmaError:
                return False
            return all(m.direct for _, _, m in pieces)

    def is_zero_copy(self, iova: int, length: int) -> bool:
        """True if the whole range is mapped from sealed files: :meth:`translate` gives views."""
        with self._lock:
            try:
                pieces = self._pieces(iova, length, False)
            except DmaError:
                return False
            return all(m.zero_copy for _, _, m in pieces)

    def window(self, iova: int) -> DmaWindow | None:
        """The zero-copy map containing ``iova`` as a :class:`DmaWindow`, or None (not
        mapped, no fd, or a file not sealed against shrinking: those need guarded copies).

        For hot paths that touch the same small areas again and again (virtqueue rings): the
        caller keeps the window while :attr:`generation` is unchanged and copies through it
        with slices of :attr:`DmaWindow.mm` (never a memoryview kept past one call). No
        reference is held, so :meth:`remove` does not wait for such accesses: a copy that
        races with the unmap of its map reads or writes the file the map had (still mapped
        here, Python's mmap cannot be closed under a running slice) or raises ValueError
        once the mmap is closed.
        """
        with self._lock:
            m = self._find(iova)
            if m is None or m._file is None or not m.zero_copy:
                return None
            return DmaWindow(m.iova, m.end, m._file.mm, m.offset - m.iova, m.readable,
                             m.writable)

    def _put(self, mapping: DmaMapping) -> None:
        with self._lock:
            mapping._refs -= 1
            if mapping._refs or not mapping._removed:
                return  # only _drain() waits, and only for removed maps
            self._cond.notify_all()
            if mapping._deferred:
                mapping._deferred = False
                log.info("DMA unmap %r: deferred munmap done", mapping)
                self._finish(mapping)

    @staticmethod
    def _call_hook(hook: Callable[[DmaMapping], None] | None, mapping: DmaMapping) -> None:
        if hook is None:
            return
        try:
            hook(mapping)
        except Exception:
            log.exception("DMA hook %r failed for %r", hook, mapping)


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


class DmaAccessor:
    """Reads and writes guest memory: directly where mmapped, by message elsewhere."""

    def __init__(self, table: DmaMapTable, message_dma: MessageDma | None = None) -> None:
        self.table = table
        self.message_dma = message_dma

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

    def read_into(self, iova: int, buf: bytearray | memoryview) -> None:
        """Fill the writable buffer ``buf`` from guest memory at ``iova``."""
        with memoryview(buf) as raw, raw.cast("B") as dst:
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
        with memoryview(data) as raw, raw.cast("B") as src:
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
