"""Packed virtqueues (VIRTIO_F_RING_PACKED, virtio 1.x, 2.8): the device's side of the one
descriptor ring and the two event suppression structures (split from :mod:`.virtqueue`, whose
rules and checks apply unchanged)."""

from __future__ import annotations

import struct

from ..dma import DmaAccessor
from .spec import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_SIZE,
    EVENT_FLAGS_DESC,
    EVENT_FLAGS_DISABLE,
    EVENT_FLAGS_ENABLE,
    EVENT_SUPPRESS_SIZE,
    PACKED_DESC,
    PACKED_DESC_ALIGN,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PACKED_EVENT_ALIGN,
    need_event,
)
from .virtqueue import _U64_END, MAX_INDIRECT, Buffer, Chain, Virtqueue, VirtqueueError

__all__ = ["PackedVirtqueue"]


class PackedVirtqueue(Virtqueue):
    """A packed virtqueue (VIRTIO_F_RING_PACKED, 2.8): one descriptor ring that the driver
    fills (AVAIL/USED flags against its wrap counter) and the device overwrites with used
    descriptors, plus an event suppression structure each way (``driver`` and ``device``).

    The same checks as the split ring apply: a chain longer than the ring, an indirect
    descriptor with NEXT or inside a chain, a table whose length is not a multiple of 16, a
    readable buffer after a writable one and memory that is not mapped raise
    :class:`VirtqueueError`.
    """

    packed = True

    def __init__(self, index: int, max_size: int) -> None:
        super().__init__(index, max_size)
        self.avail_wrap = 1
        self.used_wrap = 1
        self._signalled_pushed = 0

    @classmethod
    def configured_like(cls, vq: Virtqueue) -> PackedVirtqueue:
        """A packed queue with the driver's configuration of ``vq``."""
        new = cls(vq.index, vq.max_size)
        new.size, new.vector = vq.size, vq.vector
        new.desc, new.driver, new.device = vq.desc, vq.driver, vq.device
        return new

    def check_config(self) -> str | None:
        if not 1 <= self.size <= self.max_size:
            return f"queue {self.index}: size {self.size} not in 1..{self.max_size}"
        for name, addr, align, length in (
            ("descriptor ring", self.desc, PACKED_DESC_ALIGN, PACKED_DESC.size * self.size),
            ("driver area", self.driver, PACKED_EVENT_ALIGN, EVENT_SUPPRESS_SIZE),
            ("device area", self.device, PACKED_EVENT_ALIGN, EVENT_SUPPRESS_SIZE),
        ):
            if addr % align:
                return f"queue {self.index}: {name} at {addr:#x} is not {align}-byte aligned"
            if addr + length > _U64_END:
                return f"queue {self.index}: {name} at {addr:#x} wraps the address space"
        return None

    def ring_areas(self) -> tuple[tuple[int, int], ...]:
        return ((self.desc, PACKED_DESC.size * self.size), (self.driver, EVENT_SUPPRESS_SIZE),
                (self.device, EVENT_SUPPRESS_SIZE))

    def start(self, dma: DmaAccessor, *, event_idx: bool, indirect: bool) -> None:
        super().start(dma, event_idx=event_idx, indirect=indirect)
        self.avail_wrap = self.used_wrap = 1
        self._signalled_pushed = self.pushed

    def _available(self, slot: int) -> bool:
        flags = self._read_u16(self.desc + PACKED_DESC.size * slot + 14)
        avail = bool(flags & PACKED_DESC_F_AVAIL)
        used = bool(flags & PACKED_DESC_F_USED)
        return avail == bool(self.avail_wrap) and used != bool(self.avail_wrap)

    def avail_count(self) -> int:
        """1 if a request is available at the next position, else 0."""
        return int(self._available(self.last_avail))

    def pop(self) -> Chain | None:
        if self.dead or not self._available(self.last_avail):
            return None
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        slot = self.last_avail
        count = 0
        buffer_id = 0
        while True:
            # the flags were seen first (in _available): the rest was written before them
            addr, length, buffer_id, flags = PACKED_DESC.unpack(
                self._read(self.desc + PACKED_DESC.size * slot, PACKED_DESC.size))
            count += 1
            if flags & DESC_F_INDIRECT:
                if count != 1 or flags & DESC_F_NEXT:
                    raise VirtqueueError(
                        f"queue {self.index}: indirect descriptor inside a chain or with NEXT")
                if not self.indirect:
                    raise VirtqueueError(
                        f"queue {self.index}: indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if not length or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise VirtqueueError(f"queue {self.index}: indirect table of {length} bytes")
                if addr + length > _U64_END:
                    raise VirtqueueError(f"queue {self.index}: indirect table wraps")
                table = self._read(addr, length)
                for i in range(length // DESC_SIZE):
                    a, n, _id, f = PACKED_DESC.unpack_from(table, i * DESC_SIZE)
                    if f & DESC_F_INDIRECT:
                        raise VirtqueueError(f"queue {self.index}: nested indirect table")
                    self._add_buffer(readable, writable, a, n, f)
                break
            self._add_buffer(readable, writable, addr, length, flags)
            if not flags & DESC_F_NEXT:
                break
            if count >= self.size:
                raise VirtqueueError(f"queue {self.index}: descriptor chain longer than the ring")
            slot = slot + 1 if slot + 1 < self.size else 0
        chain = Chain(self._dma(), buffer_id, readable, writable, count, self)
        if self.inline:
            self._check_inline(chain)
        self.last_avail += count
        if self.last_avail >= self.size:
            self.last_avail -= self.size
            self.avail_wrap ^= 1
        self.popped += 1
        return chain

    def push(self, chain: Chain, written: int) -> None:
        if not 0 <= written <= chain.writable_length:
            raise ValueError(f"{written} bytes written into {chain.writable_length} writable")
        if self.dead:
            return
        at = self.desc + PACKED_DESC.size * self.used_idx
        # length and ID first, the flags that hand the entry over last
        self._write(at + 8, struct.pack("<IH", written, chain.head))
        flags = PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED if self.used_wrap else 0
        self._write(at + 14, flags.to_bytes(2, "little"))
        self.used_idx += chain.slots
        if self.used_idx >= self.size:
            self.used_idx -= self.size
            self.used_wrap ^= 1
        self.pushed += 1

    def suppress_notifications(self) -> None:
        self._write(self.device + 2, EVENT_FLAGS_DISABLE.to_bytes(2, "little"))

    def enable_notifications(self) -> bool:
        if self.event_idx:
            off_wrap = self.last_avail | self.avail_wrap << 15
            self._write(self.device, struct.pack("<HH", off_wrap, EVENT_FLAGS_DESC))
        else:
            self._write(self.device + 2, EVENT_FLAGS_ENABLE.to_bytes(2, "little"))
        return self._available(self.last_avail)

    def needs_interrupt(self) -> bool:
        if self.pushed == self._signalled_pushed:
            return False
        self._signalled_pushed = self.pushed
        off_wrap, flags = struct.unpack("<HH", self._read(self.driver, EVENT_SUPPRESS_SIZE))
        old, new = self._signalled_used, self.used_idx
        self._signalled_used = new
        if flags == EVENT_FLAGS_DISABLE:
            return False
        if flags != EVENT_FLAGS_DESC or not self.event_idx:
            return True
        off = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.used_wrap:
            off -= self.size
        return need_event(off, new, old)
