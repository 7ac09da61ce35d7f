"""Split virtqueues (virtio 1.x, 2.7): the device's side of the descriptor, avail and used rings.

A :class:`Virtqueue` lives in guest memory, reached through a
:class:`~vfio_user_server.dma.DmaAccessor` (direct maps or message DMA). The device takes
requests with :meth:`Virtqueue.pop` (a :class:`Chain`: the device-readable and device-writable
buffers of one request, indirect tables followed) and gives them back with
:meth:`Virtqueue.push`. Notification suppression both ways is here too: ``used_event`` /
``avail_event`` with ``VIRTIO_F_EVENT_IDX``, the ``NO_INTERRUPT`` / ``NO_NOTIFY`` flags without.

Everything the driver wrote is untrusted: an avail index that runs ahead by more than the queue
size, a head or ``next`` outside the table, a loop, a nested indirect table, an indirect
descriptor that also has ``NEXT``, a table whose length is not a multiple of 16, a readable
buffer after a writable one, or memory that is not mapped all raise :class:`VirtqueueError`
(the transport then sets ``DEVICE_NEEDS_RESET``). Nothing is read outside the DMA maps: every
access goes through the DMA layer, which checks each byte.
"""

from __future__ import annotations

from collections.abc import Callable

from ..dma import DmaAccessor, DmaWindow, WindowCache
from ..errors import DmaError
from .spec import (
    AVAIL_ALIGN,
    AVAIL_F_NO_INTERRUPT,
    DESC,
    DESC_ALIGN,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    USED_ELEM,
    USED_ELEM_SIZE,
    USED_F_NO_NOTIFY,
    need_event,
)

__all__ = ["MAX_INDIRECT", "Chain", "NeedsWorker", "Virtqueue",
           "VirtqueueError"]

#: Most descriptors an indirect table may hold (QEMU's limit too).
MAX_INDIRECT = 1024

_U64_END = 1 << 64
#: Windows a queue keeps (rings, indirect tables, headers: usually all in one map)
_MAX_WINDOWS = 4

Buffer = tuple[int, int]  # (guest address, length)


class VirtqueueError(Exception):
    """The driver broke the virtqueue rules; the device must be reset."""


class NeedsWorker(Exception):
    """Raised in :attr:`Virtqueue.inline` mode before touching memory that is not fd-backed
    (message DMA is not allowed on the server's loop thread), or for a chain the device's
    :attr:`Virtqueue.inline_ok` leaves to the worker; nothing was consumed."""


class Chain:
    """One request: a descriptor chain's readable then writable buffers.

    ``head`` is what goes back in the used ring. :meth:`read` and :meth:`write` move data
    through the DMA layer; device code may also use ``readable`` / ``writable`` directly
    (for example to translate them to memoryviews for ``preadv``/``pwritev``).
    """

    __slots__ = ("_vq", "dma", "head", "readable", "slots", "writable")

    def __init__(self, dma: DmaAccessor, head: int, readable: list[Buffer],
                 writable: list[Buffer], slots: int = 1, vq: Virtqueue | None = None) -> None:
        self.dma = dma
        self._vq = vq  # its cached windows onto guest memory, if any
        #: the split ring's head index, or the packed ring's buffer ID
        self.head = head
        self.readable = readable
        self.writable = writable
        #: ring entries the request took (packed ring)
        self.slots = slots

    @property
    def readable_length(self) -> int:
        r = self.readable
        return r[0][1] if len(r) == 1 else sum(n for _, n in r)

    @property
    def writable_length(self) -> int:
        w = self.writable
        return w[0][1] if len(w) == 1 else sum(n for _, n in w)

    def readable_slice(self, offset: int, length: int) -> list[Buffer]:
        """The ``(address, length)`` pieces of readable bytes ``[offset, offset + length)``."""
        return _slice(self.readable, offset, length)

    def writable_slice(self, offset: int, length: int) -> list[Buffer]:
        """The ``(address, length)`` pieces of writable bytes ``[offset, offset + length)``."""
        return _slice(self.writable, offset, length)

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes (default: all) of the readable buffers from ``offset``."""
        total = self.readable_length
        if length is None:
            length = max(0, total - offset)
        if offset < 0 or length < 0 or offset + length > total:
            raise VirtqueueError(f"read of {offset}+{length} beyond the {total} readable bytes")
        pieces = _slice(self.readable, offset, length)
        vq = self._vq
        if vq is not None and len(pieces) == 1:
            addr, n = pieces[0]
            return vq._read(addr, n)
        out = bytearray()
        try:
            for addr, n in pieces:
                out += vq._read(addr, n) if vq is not None else self.dma.read(addr, n)
        except DmaError as exc:
            raise VirtqueueError(f"readable buffer: {exc}") from exc
        return bytes(out)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Write ``data`` into the writable buffers at ``offset``; returns ``len(data)``."""
        view = memoryview(data).cast("B")
        total = self.writable_length
        if offset < 0 or offset + view.nbytes > total:
            raise VirtqueueError(
                f"write of {offset}+{view.nbytes} beyond the {total} writable bytes")
        pos = 0
        vq = self._vq
        try:
            for addr, n in _slice(self.writable, offset, view.nbytes):
                if vq is not None:
                    vq._write(addr, view[pos:pos + n])
                else:
                    self.dma.write(addr, view[pos:pos + n])
                pos += n
        except DmaError as exc:
            raise VirtqueueError(f"writable buffer: {exc}") from exc
        return pos

    def __repr__(self) -> str:
        return (f"Chain(head={self.head}, readable={self.readable_length}, "
                f"writable={self.writable_length})")


def _slice(buffers: list[Buffer], offset: int, length: int) -> list[Buffer]:
    """The pieces of ``buffers`` covering ``[offset, offset + length)`` of their concatenation."""
    out: list[Buffer] = []
    pos = 0
    end = offset + length
    for addr, n in buffers:
        if pos >= end:
            break
        lo, hi = max(offset, pos), min(end, pos + n)
        if lo < hi:
            out.append((addr + lo - pos, hi - lo))
        pos += n
    return out


class Virtqueue:
    """One split virtqueue: its configuration (written by the driver through the transport)
    and, once :meth:`start` ed, the device's ring state."""

    #: True for the packed ring layout
    packed = False

    def __init__(self, index: int, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two <= {MAX_QUEUE_SIZE}")
        self.index = index
        self.max_size = max_size
        # configuration (transport registers)
        self.size = max_size
        self.vector = 0xFFFF
        self.desc = 0
        self.driver = 0
        self.device = 0
        self.enabled = False
        # ring state
        self.dma: DmaAccessor | None = None
        self.event_idx = False
        self.indirect = False
        self.last_avail = 0
        self.used_idx = 0
        self._avail_idx = 0  # last avail idx read from the ring
        self._signalled_used = 0
        self._signalled_valid = False
        #: set by the transport: a notify arrived and the queue waits for the worker
        self.kicked = False
        #: set when the queue's device is reset: the worker drops what it was doing
        self.dead = False
        #: chains popped / pushed since the queue started (for tests and statistics)
        self.popped = 0
        self.pushed = 0
        #: set by the transport while it runs the queue on the loop thread: every access must
        #: be to fd-backed memory, else :class:`NeedsWorker` (before anything is consumed)
        self.inline = False
        #: set by the transport with :attr:`inline`: may this chain run on the loop thread?
        #: (else :class:`NeedsWorker`, before the chain is consumed)
        self.inline_ok: Callable[[Chain], bool] | None = None
        # windows onto the mmapped maps this queue touched (rings, tables, headers)
        self._windows = WindowCache(_MAX_WINDOWS)

    def __repr__(self) -> str:
        return (f"Virtqueue({self.index}, size={self.size}, enabled={self.enabled}, "
                f"last_avail={self.last_avail}, used={self.used_idx})")

    # --- configuration --------------------------------------------------------------------------
    def check_config(self) -> str | None:
        """What is wrong with the driver's configuration, or None."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            return f"queue {self.index}: size {size} is not a power of two <= {self.max_size}"
        for name, addr, align, length in (
            ("descriptor table", self.desc, DESC_ALIGN, DESC_SIZE * size),
            ("driver area", self.driver, AVAIL_ALIGN, 6 + 2 * size),
            ("device area", self.device, USED_ALIGN, 6 + USED_ELEM_SIZE * size),
        ):
            if addr % align:
                return f"queue {self.index}: {name} at {addr:#x} is not {align}-byte aligned"
            if addr + length > _U64_END:
                return f"queue {self.index}: {name} at {addr:#x} wraps the address space"
        return None

    def ring_areas(self) -> tuple[tuple[int, int], ...]:
        """``(address, length)`` of the descriptor table, driver area and device area."""
        return ((self.desc, DESC_SIZE * self.size), (self.driver, 6 + 2 * self.size),
                (self.device, 6 + USED_ELEM_SIZE * self.size))

    def rings_direct(self) -> bool:
        """Are all three ring areas in mmapped (fd-backed) memory, each within one map?"""
        return all(self._window(addr, n, False) is not None for addr, n in self.ring_areas())

    def start(self, dma: DmaAccessor, *, event_idx: bool, indirect: bool) -> None:
        """The driver enabled the queue: begin at index 0 with the negotiated features."""
        self.dma = dma
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = self.used_idx = self._avail_idx = 0
        self._signalled_used = 0
        self._signalled_valid = False
        self._windows.clear()
        self.enabled = True

    # --- guest memory helpers -----------------------------------------------------------------
    def _dma(self) -> DmaAccessor:
        if self.dma is None:
            raise VirtqueueError(f"queue {self.index} is not enabled")
        return self.dma

    def _window(self, addr: int, length: int, write: bool) -> DmaWindow | None:
        """The cached mmapped window holding all of ``[addr, addr + length)`` with the
        permission asked for, or None (then the DMA layer decides: message DMA, or an
        error)."""
        return self._windows.get(self._dma().table, addr, length, write)

    def _add_buffer(self, readable: list[Buffer], writable: list[Buffer], addr: int,
                    length: int, flags: int) -> None:
        """Check one descriptor's buffer and file it: device-readable ones come first."""
        if addr + length > _U64_END:
            raise VirtqueueError(f"queue {self.index}: buffer {addr:#x}+{length:#x} wraps")
        if flags & DESC_F_WRITE:
            writable.append((addr, length))
        elif writable:
            raise VirtqueueError(
                f"queue {self.index}: device-readable buffer after a writable one")
        else:
            readable.append((addr, length))

    def _read(self, addr: int, length: int) -> bytes:
        w = self._window(addr, length, False)
        if w is not None:
            at = addr + w.delta
            try:
                return w.mm[at:at + length]
            except ValueError:
                pass  # the mmap was closed under us (unmapped): the DMA layer says why
        if self.inline:
            return self._inline_access(addr, length, None)
        try:
            return self._dma().read(addr, length)
        except DmaError as exc:
            raise VirtqueueError(f"queue {self.index}: {exc}") from exc

    def _inline_access(self, addr: int, length: int,
                       data: bytes | memoryview | None) -> bytes:
        """Read (``data`` None) or write through the mmapped guest memory only."""
        try:
            segs = self._dma().table.translate(addr, length, write=data is not None)
        except DmaError as exc:
            raise VirtqueueError(f"queue {self.index}: {exc}") from exc
        try:
            if any(s.view is None for s in segs):
                raise NeedsWorker
            if data is None:
                return b"".join(bytes(s.view) for s in segs if s.view is not None)
            pos = 0
            for s in segs:
                if s.view is not None:
                    s.view[:] = data[pos:pos + s.length]
                    pos += s.length
            return b""
        finally:
            for s in segs:
                s.release()

    def _check_inline(self, chain: Chain) -> None:
        """In inline mode: every buffer of ``chain`` must be fd-backed."""
        table = self._dma().table
        for bufs, write in ((chain.readable, False), (chain.writable, True)):
            for addr, n in bufs:
                if n and self._window(addr, n, write) is None and not table.is_direct(addr, n):
                    raise NeedsWorker

    def _read_u16(self, addr: int) -> int:
        return int.from_bytes(self._read(addr, 2), "little")

    def _write(self, addr: int, data: bytes | memoryview) -> None:
        length = len(data)
        w = self._window(addr, length, True)
        if w is not None:
            at = addr + w.delta
            try:
                w.mm[at:at + length] = data
                return
            except ValueError:
                pass  # the mmap was closed under us (unmapped): the DMA layer says why
        if self.inline:
            self._inline_access(addr, len(data), data)
            return
        try:
            self._dma().write(addr, data)
        except DmaError as exc:
            raise VirtqueueError(f"queue {self.index}: {exc}") from exc

    # --- requests -------------------------------------------------------------------------------
    def avail_count(self) -> int:
        """How many requests the driver has made available that were not popped (reads idx)."""
        idx = self._read_u16(self.driver + 2)
        pending = (idx - self.last_avail) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(
                f"queue {self.index}: avail idx {idx} is {pending} ahead of {self.last_avail} "
                f"(size {self.size})")
        self._avail_idx = idx
        return pending

    def pop(self) -> Chain | None:
        """The next available request, or None (always None once the device was reset)."""
        if self.dead or (self._avail_idx == self.last_avail and not self.avail_count()):
            return None
        slot = self.last_avail % self.size
        head = self._read_u16(self.driver + 4 + 2 * slot)
        if head >= self.size:
            raise VirtqueueError(f"queue {self.index}: head {head} >= size {self.size}")
        chain = self._walk(head)
        if self.inline:
            self._check_inline(chain)
            if self.inline_ok is not None and not self.inline_ok(chain):
                raise NeedsWorker
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        self.popped += 1
        return chain

    def _walk(self, head: int) -> Chain:
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        table: bytes | None = None  # the indirect table, once followed
        limit = self.size
        i = head
        count = 0
        while True:
            if table is None:
                raw = self._read(self.desc + DESC_SIZE * i, DESC_SIZE)
                addr, length, flags, nxt = DESC.unpack(raw)
            else:
                addr, length, flags, nxt = DESC.unpack_from(table, DESC_SIZE * i)
            if flags & DESC_F_INDIRECT:
                if table is not None:
                    raise VirtqueueError(f"queue {self.index}: nested indirect table")
                if not self.indirect:
                    raise VirtqueueError(
                        f"queue {self.index}: indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & DESC_F_NEXT:
                    raise VirtqueueError(f"queue {self.index}: indirect descriptor with NEXT")
                if count:
                    raise VirtqueueError(
                        f"queue {self.index}: indirect descriptor after others in a chain")
                if not length or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise VirtqueueError(
                        f"queue {self.index}: indirect table of {length} bytes")
                if addr + length > _U64_END:
                    raise VirtqueueError(f"queue {self.index}: indirect table wraps")
                table = self._read(addr, length)
                limit = length // DESC_SIZE
                i = 0
                continue
            self._add_buffer(readable, writable, addr, length, flags)
            count += 1
            if not flags & DESC_F_NEXT:
                break
            if count >= limit:
                raise VirtqueueError(f"queue {self.index}: descriptor chain loops")
            if nxt >= limit:
                raise VirtqueueError(f"queue {self.index}: next {nxt} >= {limit}")
            i = nxt
        return Chain(self._dma(), head, readable, writable, 1, self)

    def push(self, chain: Chain, written: int) -> None:
        """Return ``chain`` to the driver; ``written`` bytes went into its writable buffers."""
        if not 0 <= written <= chain.writable_length:
            raise ValueError(f"{written} bytes written into {chain.writable_length} writable")
        if self.dead:
            return
        slot = self.used_idx % self.size
        self._write(self.device + 4 + USED_ELEM_SIZE * slot, USED_ELEM.pack(chain.head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._write(self.device + 2, self.used_idx.to_bytes(2, "little"))
        self.pushed += 1

    # --- notification suppression -------------------------------------------------------------
    def suppress_notifications(self) -> None:
        """While the device works through the queue, ask the driver not to notify."""
        if not self.event_idx:
            self._write(self.device, USED_F_NO_NOTIFY.to_bytes(2, "little"))
        # with EVENT_IDX an avail_event left behind already suppresses notifications

    def enable_notifications(self) -> bool:
        """Ask for a notification at the next request; True if requests arrived meanwhile."""
        if self.event_idx:
            self._write(self.device + 4 + USED_ELEM_SIZE * self.size,
                        self.last_avail.to_bytes(2, "little"))
        else:
            self._write(self.device, b"\0\0")
        return self.avail_count() > 0

    def needs_interrupt(self) -> bool:
        """After pushes: does the driver want an interrupt for them?"""
        if self._signalled_used == self.used_idx:
            return False  # nothing pushed since the last decision
        if self.event_idx:
            used_event = self._read_u16(self.driver + 4 + 2 * self.size)
            old, valid = self._signalled_used, self._signalled_valid
            self._signalled_used, self._signalled_valid = self.used_idx, True
            return not valid or need_event(used_event, self.used_idx, old)
        self._signalled_used, self._signalled_valid = self.used_idx, True
        return not self._read_u16(self.driver) & AVAIL_F_NO_INTERRUPT
