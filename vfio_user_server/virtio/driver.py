"""A small virtio-pci driver in Python, for testing virtio devices without a guest.

It drives a device the way Linux's ``virtio_pci`` and ``virtio_ring`` do (capability walk,
reset, feature negotiation, queue setup, split rings with optional indirect tables and
EVENT_IDX, notify writes, used-ring polling) through any *bus* with the methods of
:class:`vfio_user_server.client.Client` used below (``config_read``, ``bar_read``,
``bar_write``, ``read_memory``, ``write_memory``)::

    with Client.connect(path) as c:
        c.negotiate(); c.get_device_info()
        c.add_memory(0, 16 << 20)
        drv = VirtioPciDriver(c, memory=(0x100000, 8 << 20))
        drv.initialize()
        drv.setup_queue(0, 64)
        drv.driver_ok()
        done = drv.request(0, readable=[b"..."], writable=[512])
        print(done.written, done.data)

Everything here is the driver's side and trusts nothing of the device beyond what a test
checks.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Protocol

from .spec import (
    COMMON_CFG_SIZE,
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    F_VERSION_1,
    NO_VECTOR,
    PACKED_DESC,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    USED_ELEM,
    CfgType,
    CommonCfg,
    Status,
)

__all__ = ["Completion", "DriverQueue", "VirtioPciDriver"]

_VNDR = 0x09


class Bus(Protocol):
    def config_read(self, offset: int, size: int) -> int: ...
    def bar_read(self, bar: int, offset: int, size: int) -> int: ...
    def bar_write(self, bar: int, offset: int, size: int, value: int, *,
                  posted: bool = False) -> None: ...
    def read_memory(self, iova: int, count: int) -> bytes: ...
    def write_memory(self, iova: int, data: bytes) -> None: ...


@dataclass
class Completion:
    """A used-ring entry and the bytes of its writable buffers."""

    head: int
    written: int
    data: bytes


@dataclass
class DriverQueue:
    index: int
    size: int
    desc: int
    avail: int
    used: int
    notify: int  # BAR offset
    free: list[int] = field(default_factory=list)
    avail_idx: int = 0
    last_used: int = 0
    #: head -> (descriptor indices, writable buffers (addr, len))
    inflight: dict[int, tuple[list[int], list[tuple[int, int]]]] = field(default_factory=dict)
    # packed ring: wrap counters, free ring entries, entries taken by each buffer ID
    packed: bool = False
    avail_wrap: int = 1
    used_wrap: int = 1
    free_slots: int = 0
    slots: dict[int, int] = field(default_factory=dict)


class VirtioPciDriver:
    """The driver side of the virtio-pci transport over a vfio-user client."""

    def __init__(self, bus: Bus, *, memory: tuple[int, int], wait: float = 10.0) -> None:
        self.bus = bus
        self._next = memory[0]
        self._end = memory[0] + memory[1]
        self.timeout = wait
        self.caps: dict[int, tuple[int, int, int, int]] = {}  # cfg_type -> (pos, bar, off, len)
        self.notify_multiplier = 0
        self.features = 0
        self.queues: dict[int, DriverQueue] = {}
        self.probe()

    # --- memory -------------------------------------------------------------------------------
    def alloc(self, size: int, align: int = 16) -> int:
        """Carve ``size`` bytes out of the driver's memory (never freed)."""
        addr = (self._next + align - 1) // align * align
        if addr + size > self._end:
            raise MemoryError("driver memory exhausted")
        self._next = addr + size
        return addr

    # --- registers ----------------------------------------------------------------------------
    def probe(self) -> None:
        """Find the virtio capabilities, as Linux's ``virtio_pci_find_capability`` does."""
        pos = self.bus.config_read(0x34, 1) & 0xFC
        for _ in range(48):
            if not pos:
                break
            if self.bus.config_read(pos, 1) == _VNDR:
                cfg_type = self.bus.config_read(pos + 3, 1)
                if cfg_type not in self.caps:
                    self.caps[cfg_type] = (pos, self.bus.config_read(pos + 4, 1),
                                           self.bus.config_read(pos + 8, 4),
                                           self.bus.config_read(pos + 12, 4))
                if cfg_type == CfgType.NOTIFY:
                    self.notify_multiplier = self.bus.config_read(pos + 16, 4)
            pos = self.bus.config_read(pos + 1, 1) & 0xFC
        for need in (CfgType.COMMON, CfgType.NOTIFY, CfgType.ISR):
            if need not in self.caps:
                raise LookupError(f"no virtio capability of type {need.name}")
        if self.caps[CfgType.COMMON][3] < COMMON_CFG_SIZE - 8:
            raise LookupError("common configuration too short")

    def _at(self, cfg_type: int, offset: int) -> tuple[int, int]:
        _pos, bar, base, _length = self.caps[cfg_type]
        return bar, base + offset

    def common_read(self, offset: int, size: int) -> int:
        return self.bus.bar_read(*self._at(CfgType.COMMON, offset), size)

    def common_write(self, offset: int, size: int, value: int) -> None:
        bar, off = self._at(CfgType.COMMON, offset)
        self.bus.bar_write(bar, off, size, value)

    def common_write64(self, offset: int, value: int) -> None:
        self.common_write(offset, 4, value & 0xFFFFFFFF)
        self.common_write(offset + 4, 4, value >> 32)

    def config_read(self, offset: int, size: int) -> int:
        """Device configuration, read the way Linux does (retry on a generation change)."""
        while True:
            gen = self.common_read(CommonCfg.CONFIG_GENERATION, 1)
            value = self.bus.bar_read(*self._at(CfgType.DEVICE, offset), size)
            if self.common_read(CommonCfg.CONFIG_GENERATION, 1) == gen:
                return value

    def read_isr(self) -> int:
        return self.bus.bar_read(*self._at(CfgType.ISR, 0), 1)

    @property
    def status(self) -> int:
        return self.common_read(CommonCfg.DEVICE_STATUS, 1)

    def set_status(self, bits: int) -> None:
        self.common_write(CommonCfg.DEVICE_STATUS, 1, self.status | bits)

    def device_features(self) -> int:
        features = 0
        for sel in (0, 1):
            self.common_write(CommonCfg.DEVICE_FEATURE_SELECT, 4, sel)
            features |= self.common_read(CommonCfg.DEVICE_FEATURE, 4) << 32 * sel
        return features

    def reset(self) -> None:
        self.common_write(CommonCfg.DEVICE_STATUS, 1, 0)
        deadline = time.monotonic() + self.timeout
        while self.status:
            if time.monotonic() > deadline:
                raise TimeoutError("device status never read 0 after reset")
            time.sleep(0.001)
        self.queues.clear()

    def initialize(self, features: int | None = None) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, accept ``features`` (default: all offered that this
        driver knows: VERSION_1, INDIRECT_DESC, EVENT_IDX, RING_PACKED, the device's bits),
        FEATURES_OK. Returns the status read back."""
        self.reset()
        self.set_status(Status.ACKNOWLEDGE)
        self.set_status(Status.DRIVER)
        offered = self.device_features()
        if features is None:
            features = offered & ((1 << 24) - 1 | 1 << F_VERSION_1 | 1 << F_RING_INDIRECT_DESC
                                  | 1 << F_RING_EVENT_IDX | 1 << F_RING_PACKED)
        for sel in (0, 1):
            self.common_write(CommonCfg.DRIVER_FEATURE_SELECT, 4, sel)
            self.common_write(CommonCfg.DRIVER_FEATURE, 4, features >> 32 * sel & 0xFFFFFFFF)
        self.features = features
        self.set_status(Status.FEATURES_OK)
        return self.status

    def has(self, feature_bit: int) -> bool:
        return bool(self.features >> feature_bit & 1)

    def setup_queue(self, index: int, size: int | None = None, *, vector: int = NO_VECTOR,
                    enable: bool = True) -> DriverQueue:
        """Lay out queue ``index`` in driver memory and program it (as ``vp_modern_setup_vq``)."""
        self.common_write(CommonCfg.QUEUE_SELECT, 2, index)
        max_size = self.common_read(CommonCfg.QUEUE_SIZE, 2)
        if not max_size:
            raise LookupError(f"queue {index} does not exist")
        if self.common_read(CommonCfg.QUEUE_ENABLE, 2):
            raise RuntimeError(f"queue {index} is already enabled")
        size = max_size if size is None else size
        packed = self.has(F_RING_PACKED)
        desc = self.alloc(DESC_SIZE * size, 16)
        # packed: the driver and device event suppression structures instead of the rings
        avail_len, used_len = (4, 4) if packed else (6 + 2 * size, 6 + 8 * size)
        avail = self.alloc(avail_len, 4)
        used = self.alloc(used_len, 4)
        self.bus.write_memory(desc, bytes(DESC_SIZE * size))
        self.bus.write_memory(avail, bytes(avail_len))
        self.bus.write_memory(used, bytes(used_len))
        self.common_write(CommonCfg.QUEUE_SIZE, 2, size)
        self.common_write64(CommonCfg.QUEUE_DESC, desc)
        self.common_write64(CommonCfg.QUEUE_DRIVER, avail)
        self.common_write64(CommonCfg.QUEUE_DEVICE, used)
        self.common_write(CommonCfg.QUEUE_MSIX_VECTOR, 2, vector)
        off = self.common_read(CommonCfg.QUEUE_NOTIFY_OFF, 2)
        notify = self._at(CfgType.NOTIFY, off * self.notify_multiplier)[1]
        q = DriverQueue(index, size, desc, avail, used, notify, free=list(range(size)),
                        packed=packed, free_slots=size)
        self.queues[index] = q
        if enable:
            self.common_write(CommonCfg.QUEUE_ENABLE, 2, 1)
        return q

    def driver_ok(self) -> None:
        self.set_status(Status.DRIVER_OK)

    # --- requests -----------------------------------------------------------------------------
    def add(self, index: int, readable: list[bytes], writable: list[int], *,
            indirect: bool = False, notify: bool = True) -> int:
        """Make a request available: buffers with ``readable`` contents, then zeroed writable
        buffers of the given lengths. Returns the head descriptor index."""
        q = self.queues[index]
        bufs: list[tuple[int, int, int]] = []
        for data in readable:
            addr = self.alloc(max(1, len(data)), 8)
            self.bus.write_memory(addr, data)
            bufs.append((addr, len(data), 0))
        wbufs = []
        for n in writable:
            addr = self.alloc(max(1, n), 8)
            self.bus.write_memory(addr, bytes(n))
            bufs.append((addr, n, DESC_F_WRITE))
            wbufs.append((addr, n))
        if q.packed:
            return self._add_packed(q, bufs, wbufs, indirect=indirect, notify=notify)
        if indirect:
            table = self.alloc(DESC_SIZE * len(bufs), 16)
            raw = b"".join(
                DESC.pack(a, n, f | (DESC_F_NEXT if i + 1 < len(bufs) else 0), i + 1)
                for i, (a, n, f) in enumerate(bufs))
            self.bus.write_memory(table, raw)
            used_desc = [q.free.pop(0)]
            self.write_desc(q, used_desc[0], table, len(raw), DESC_F_INDIRECT, 0)
        else:
            if len(q.free) < len(bufs):
                raise RuntimeError("queue full")
            used_desc = [q.free.pop(0) for _ in bufs]
            for i, (a, n, f) in enumerate(bufs):
                last = i + 1 == len(bufs)
                self.write_desc(q, used_desc[i], a, n, f | (0 if last else DESC_F_NEXT),
                                0 if last else used_desc[i + 1])
        head = used_desc[0]
        q.inflight[head] = (used_desc, wbufs)
        self.publish(q, [head], notify=notify)
        return head

    def _add_packed(self, q: DriverQueue, bufs: list[tuple[int, int, int]],
                    wbufs: list[tuple[int, int]], *, indirect: bool, notify: bool) -> int:
        if indirect:
            table = self.alloc(DESC_SIZE * len(bufs), 16)
            self.bus.write_memory(table, b"".join(PACKED_DESC.pack(a, n, 0, f)
                                                  for a, n, f in bufs))
            entries = [(table, DESC_SIZE * len(bufs), DESC_F_INDIRECT)]
        else:
            entries = [(a, n, f | (DESC_F_NEXT if i + 1 < len(bufs) else 0))
                       for i, (a, n, f) in enumerate(bufs)]
        if q.free_slots < len(entries) or not q.free:
            raise RuntimeError("queue full")
        buffer_id = q.free.pop(0)
        q.free_slots -= len(entries)
        q.slots[buffer_id] = len(entries)
        q.inflight[buffer_id] = ([buffer_id], wbufs)
        old = q.avail_idx
        head_at, head_flags = 0, 0
        for i, (a, n, f) in enumerate(entries):
            wrap = q.avail_wrap
            flags = f | (PACKED_DESC_F_AVAIL if wrap else PACKED_DESC_F_USED)
            at = q.desc + DESC_SIZE * q.avail_idx
            if i == 0:  # the head's flags go last: they hand the whole chain over
                head_at, head_flags = at, flags
                self.bus.write_memory(at, PACKED_DESC.pack(a, n, buffer_id, 0)[:14])
            else:
                self.bus.write_memory(at, PACKED_DESC.pack(a, n, buffer_id, flags))
            q.avail_idx += 1
            if q.avail_idx == q.size:
                q.avail_idx, q.avail_wrap = 0, q.avail_wrap ^ 1
        self.bus.write_memory(head_at + 14, struct.pack("<H", head_flags))
        if notify and self._packed_should_notify(q, old):
            self.kick(q)
        return buffer_id

    def _packed_should_notify(self, q: DriverQueue, old: int) -> bool:
        off_wrap, flags = struct.unpack("<HH", self.bus.read_memory(q.used, 4))
        if flags == 1:
            return False
        if flags != 2:
            return True
        off = off_wrap & 0x7FFF
        if off_wrap >> 15 != q.avail_wrap:
            off -= q.size
        return bool((q.avail_idx - off - 1) & 0xFFFF < (q.avail_idx - old) & 0xFFFF)

    def write_desc(self, q: DriverQueue, i: int, addr: int, length: int, flags: int,
                   nxt: int) -> None:
        self.bus.write_memory(q.desc + DESC_SIZE * i, DESC.pack(addr, length, flags, nxt))

    def publish(self, q: DriverQueue, heads: list[int], *, notify: bool = True) -> None:
        """Put ``heads`` in the avail ring, bump idx and notify (unless suppressed)."""
        old = q.avail_idx
        for head in heads:
            self.bus.write_memory(q.avail + 4 + 2 * (q.avail_idx % q.size),
                                  struct.pack("<H", head))
            q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        self.bus.write_memory(q.avail + 2, struct.pack("<H", q.avail_idx))
        if notify and self.should_notify(q, old):
            self.kick(q)

    def should_notify(self, q: DriverQueue, old: int) -> bool:
        if self.has(F_RING_EVENT_IDX):
            event: int = struct.unpack("<H", self.bus.read_memory(q.used + 4 + 8 * q.size, 2))[0]
            return (q.avail_idx - event - 1) & 0xFFFF < (q.avail_idx - old) & 0xFFFF
        return not int(struct.unpack("<H", self.bus.read_memory(q.used, 2))[0]) & 1

    def kick(self, q: DriverQueue) -> None:
        bar = self.caps[CfgType.NOTIFY][1]
        self.bus.bar_write(bar, q.notify, 2, q.index, posted=True)

    def used_idx(self, index: int) -> int:
        return int(struct.unpack("<H", self.bus.read_memory(self.queues[index].used + 2, 2))[0])

    def get(self, index: int) -> Completion | None:
        """The next used entry, or None."""
        q = self.queues[index]
        if q.packed:
            return self._get_packed(q)
        if self.used_idx(index) == q.last_used:
            return None
        raw = self.bus.read_memory(q.used + 4 + 8 * (q.last_used % q.size), 8)
        head, written = USED_ELEM.unpack(raw)
        q.last_used = (q.last_used + 1) & 0xFFFF
        descs, wbufs = q.inflight.pop(head)
        q.free.extend(descs)
        data = b"".join(self.bus.read_memory(a, n) for a, n in wbufs)
        return Completion(head, written, data)

    def _get_packed(self, q: DriverQueue) -> Completion | None:
        at = q.desc + DESC_SIZE * q.last_used
        flags = struct.unpack("<H", self.bus.read_memory(at + 14, 2))[0]
        avail, used = bool(flags & PACKED_DESC_F_AVAIL), bool(flags & PACKED_DESC_F_USED)
        if not (avail == used == bool(q.used_wrap)):
            return None
        _addr, written, buffer_id, _flags = PACKED_DESC.unpack(self.bus.read_memory(at, 16))
        n = q.slots.pop(buffer_id)
        q.last_used += n
        if q.last_used >= q.size:
            q.last_used -= q.size
            q.used_wrap ^= 1
        q.free_slots += n
        descs, wbufs = q.inflight.pop(buffer_id)
        q.free.extend(descs)
        data = b"".join(self.bus.read_memory(a, n) for a, n in wbufs)
        return Completion(buffer_id, written, data)

    def wait(self, index: int) -> Completion:
        """Poll for the next used entry (up to ``timeout`` seconds)."""
        deadline = time.monotonic() + self.timeout
        while True:
            done = self.get(index)
            if done is not None:
                return done
            if time.monotonic() > deadline:
                raise TimeoutError(f"no used entry on queue {index} (status {self.status:#x})")
            time.sleep(0.001)

    def request(self, index: int, readable: list[bytes], writable: list[int], *,
                indirect: bool = False) -> Completion:
        """:meth:`add` then :meth:`wait`."""
        head = self.add(index, readable, writable, indirect=indirect)
        done = self.wait(index)
        if done.head != head:
            raise RuntimeError(f"used head {done.head}, expected {head}")
        return done

    def set_used_event(self, index: int, value: int) -> None:
        q = self.queues[index]
        self.bus.write_memory(q.avail + 4 + 2 * q.size, struct.pack("<H", value))

    def set_avail_flags(self, index: int, flags: int) -> None:
        self.bus.write_memory(self.queues[index].avail, struct.pack("<H", flags))
