"""Random rings never crash a virtqueue: whatever the driver's memory holds, the device gets
requests whose buffers it can use, or a VirtqueueError, and never touches memory outside the
DMA maps (the accessor raises for that, and the rings turn it into VirtqueueError)."""

from __future__ import annotations

import mmap
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfio_user_server.dma import DmaAccessor, DmaMapTable
from vfio_user_server.virtio import PackedVirtqueue, Virtqueue, VirtqueueError

RAM = 64 << 10  # the mapped guest memory: [0, RAM); the rings are in its first 0x210 bytes
SIZE = 16


def accessor(image: bytes) -> tuple[DmaAccessor, DmaMapTable, mmap.mmap]:
    fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)
    mem = mmap.mmap(fd, RAM)
    mem[:len(image)] = image
    table = DmaMapTable()
    table.add(0, RAM, 3, os.dup(fd), 0)
    os.close(fd)
    return DmaAccessor(table), table, mem


descs = st.lists(st.tuples(
    st.one_of(st.integers(0, RAM + 0x100), st.integers(0, (1 << 64) - 1)),  # addr
    st.one_of(st.integers(0, 0x200), st.integers(0, (1 << 32) - 1)),       # len
    st.integers(0, 0xFFFF),                                                # split: flags+next
    st.integers(0, 0xFFFF),                                                # packed: id/flags
), min_size=SIZE, max_size=SIZE)


def build(table: list[tuple[int, int, int, int]], rings: bytes, packed: bool) -> bytes:
    """The descriptor table at 0 (split: flags 0..7 and next; packed: id and any flags),
    then random driver and device areas at 0x100 and 0x180."""
    raw = b"".join(
        struct.pack("<QIHH", a, n, x, y) if packed
        else struct.pack("<QIHH", a, n, x & 7, y % (SIZE + 2))
        for a, n, x, y in table)
    return raw + rings


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=descs, rings=st.binary(min_size=0x110, max_size=0x110), packed=st.booleans(),
       event_idx=st.booleans(), indirect=st.booleans())
def test_random_rings(table: list[tuple[int, int, int, int]], rings: bytes, packed: bool,
                      event_idx: bool, indirect: bool) -> None:
    image = build(table, rings, packed)
    dma, maps, mem = accessor(image)
    try:
        vq: Virtqueue = PackedVirtqueue(0, SIZE) if packed else Virtqueue(0, SIZE)
        vq.desc, vq.driver, vq.device = 0x0, 0x100, 0x180
        assert vq.check_config() is None
        vq.start(dma, event_idx=event_idx, indirect=indirect)
        for _ in range(3 * SIZE):
            try:
                chain = vq.pop()
            except VirtqueueError:
                break
            if chain is None:
                break
            for addr, n in chain.readable + chain.writable:
                assert addr >= 0 and n >= 0 and addr + n <= 1 << 64
            try:
                data = chain.read(0, min(chain.readable_length, 64))
                written = chain.write(data[:min(len(data), chain.writable_length)])
                vq.push(chain, written)
                vq.needs_interrupt()
                vq.enable_notifications()
            except VirtqueueError:
                break
    finally:
        maps.remove_all()
        mem.close()
