"""DMA: the client's map table, translation to scatter-gather, and the message-DMA fallback.

The client (QEMU) sends ``DMA_MAP`` for every guest RAM section, usually with an fd of the
memory backend (memfd, file, hugetlbfs). :class:`DmaMapTable` keeps those maps keyed by IOVA.
Every map brings a *new* fd copy, even for the same file, so files are deduplicated by
``(st_dev, st_ino)`` and mmapped once (``MAP_SHARED``, the whole file); the extra fds are
closed at once and the mapping is closed when the last map on the file goes away.

Direct accesses hold a reference on each map they touch (with the C shim, the accessor's fast
path takes it on the map's *pin* in the same C call as the copy: ``c_shim/dma_copy.c``).
:meth:`DmaMapTable.remove` removes the map from lookups (and closes its pin) at once, then waits
(up to ``unmap_timeout``) for those references to be released; if the timeout passes it logs a
warning and defers the munmap to the release of the last reference, so memory in use is never
unmapped.

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
import threading
import time
from collections.abc import Callable

from .dma_access import DmaAccessor, DmaWindow, MessageDma, Segment, WindowCache
from .dmacopy import GuardedCopy, ShimCopy, buffer_address, default_copy
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
    "WindowCache",
]

log = logging.getLogger(__name__)

#: Seconds :meth:`DmaMapTable.remove` waits for in-flight direct accesses.
DEFAULT_UNMAP_TIMEOUT = 4.0

_IOVA_LIMIT = 1 << 64
_PAGE_SIZE = mmap.PAGESIZE

#: DMA_MAP permission bits (the protocol's flags, written once in protocol.constants).
DmaProt = DmaMapFlag
_PROT_MASK = int(DmaMapFlag.READ | DmaMapFlag.WRITE)


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

    __slots__ = ("_deferred", "_file", "_pin", "_r", "_refs", "_removed", "_w", "iova", "offset",
                 "prot", "size")

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
        self._pin: object = None  # the shim's reference count for fast-path copies
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


def _round_down(value: int, align: int) -> int:
    return value - value % align


def _map_file(fd: int, st: os.stat_result, seals: int, needed: int, want_write: bool,
              iova: int) -> _MappedFile | None:
    """mmap fd's whole file for :meth:`DmaMapTable._attach_file`; None: message DMA (logged)."""
    length = st.st_size
    blk = st.st_blksize
    if blk > _PAGE_SIZE and length % blk:
        # hugetlbfs: only whole huge pages can be mapped.
        length = _round_down(length, blk)
    if length < needed:
        log.warning("DMA_MAP %#x: file too small (%#x bytes, map needs %#x); using message "
                    "DMA", iova, st.st_size, needed)
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
    return _MappedFile((st.st_dev, st.st_ino), fd, mm, length, writable, trusted)


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
        #: The C shim's copier when it is the one used: direct maps get pins.
        self._shim = self._copy if isinstance(self._copy, ShimCopy) else None

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
                f"DMA_MAP {iova:#x}+{size:#x} overflows the IOVA space", errno=errno.EINVAL)
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
            if mfile is not None and self._shim is not None:
                mapping._pin = self._shim.new_pin()
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
            raise DmaError(f"DMA_MAP {iova:#x}: the fd is not a regular file "
                           f"(mode {st.st_mode:#o})", errno=errno.EINVAL)
        key = (st.st_dev, st.st_ino)
        mfile = self._files.get(key)
        if mfile is not None and mfile.length >= needed and (mfile.writable or not want_write):
            mfile.nmaps += 1
            return mfile
        new = _map_file(fd, st, seals, needed, want_write, iova)
        if new is None:
            return None
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
                        raise DmaError(f"DMA_UNMAP {iova:#x}+{size:#x} would split {m!r}",
                                       errno=errno.EINVAL)
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
        if mapping._pin is not None and self._shim is not None:
            self._shim.pin_close(mapping._pin)
        self.generation += 1

    def _pin_refs(self, mapping: DmaMapping) -> int:
        pin, shim = mapping._pin, self._shim
        return 0 if pin is None or shim is None else shim.pin_refs(pin)

    def _drain(self, maps: list[DmaMapping]) -> None:
        deadline = time.monotonic() + self.unmap_timeout
        if self._shim is not None:
            for m in maps:  # fast-path copies (pins closed by _unlink); without the lock
                if m._pin is not None:
                    self._shim.pin_wait(m._pin, deadline - time.monotonic())
        with self._lock:
            for m in maps:
                while m._refs:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                busy = m._refs + self._pin_refs(m)
                if busy:
                    m._deferred = True
                    log.warning("DMA unmap %r: %d access(es) still in flight after %.1fs; "
                                "munmap deferred until they finish", m, busy, self.unmap_timeout)
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

    def map_fds(self) -> list[tuple[DmaMapping, int | None]]:
        """Each map with the fd of its mmapped file (None: message DMA), by IOVA, for a live
        upgrade; the table still owns the fds."""
        with self._lock:
            out: list[tuple[DmaMapping, int | None]] = []
            for start in self._starts:
                m = self._maps[start]
                out.append((m, m._file.fd if m._file is not None else None))
            return out

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
                    f"DMA {iova:#x}+{length:#x}: {addr:#x} is not mapped", errno=errno.EFAULT)
            if write and not m.writable:
                raise DmaError(
                    f"DMA write {iova:#x}+{length:#x}: {m!r} is read-only", errno=errno.EPERM)
            if not write and not m.readable:
                raise DmaError(
                    f"DMA read {iova:#x}+{length:#x}: {m!r} is not readable", errno=errno.EPERM)
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
        return self._all_maps(iova, length, lambda m: m.direct)

    def is_zero_copy(self, iova: int, length: int) -> bool:
        """True if the whole range is mapped from sealed files: :meth:`translate` gives views."""
        return self._all_maps(iova, length, lambda m: m.zero_copy)

    def _all_maps(self, iova: int, length: int, test: Callable[[DmaMapping], bool]) -> bool:
        """True if the whole range is mapped and ``test`` holds for every map it crosses."""
        with self._lock:
            try:
                pieces = self._pieces(iova, length, False)
            except DmaError:
                return False
            return all(test(m) for _, _, m in pieces)

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
            self._finish_deferred(mapping)

    def _pin_done(self, mapping: DmaMapping) -> None:
        """A fast-path copy dropped the last reference on a removed map's pin."""
        with self._lock:
            if not mapping._refs:
                self._finish_deferred(mapping)

    def _finish_deferred(self, mapping: DmaMapping) -> None:
        """The munmap :meth:`_drain` deferred, once nothing is in flight; lock held."""
        if mapping._deferred and not self._pin_refs(mapping):
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
