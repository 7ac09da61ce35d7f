"""Tests of vfio_user_server.dma with real memfds."""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfio_user_server.dma import DmaAccessor, DmaMapping, DmaMapTable, DmaProt
from vfio_user_server.dmacopy import default_copy
from vfio_user_server.errors import DmaError

RW = DmaProt.READ | DmaProt.WRITE
RO = DmaProt.READ
MiB = 1 << 20


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd(size: int = MiB, sealed: bool = True) -> int:
    """Guest RAM as QEMU's memfd backend makes it: sealed against shrinking by default."""
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class FakeMessageDma:
    def __init__(self, size: int = 1 << 16, base: int = 0) -> None:
        self.mem = bytearray(size)
        self.base = base
        self.calls: list[tuple[str, int, int]] = []

    def dma_read(self, iova: int, length: int) -> bytes:
        self.calls.append(("read", iova, length))
        off = iova - self.base
        return bytes(self.mem[off : off + length])

    def dma_write(self, iova: int, data: bytes) -> None:
        self.calls.append(("write", iova, len(data)))
        off = iova - self.base
        self.mem[off : off + len(data)] = data


@pytest.fixture(autouse=True)
def _guarded_copy_chosen() -> None:
    """The process's guarded copy is chosen (the Python one opens /proc/self/mem) before any
    test counts its fds."""
    default_copy()


#: An unmap timeout no test reaches: only the test of the timeout itself waits it out.
GENEROUS = 60.0


@pytest.fixture
def table() -> Iterator[DmaMapTable]:
    t = DmaMapTable(unmap_timeout=GENEROUS)
    yield t
    t.remove_all()


def unmap_signal(t: DmaMapTable) -> threading.Event:
    """An event set by the table's on_unmap hook: the map left lookups and the remove call is
    about to wait for in-flight accesses."""
    unmapping = threading.Event()
    t.on_unmap = lambda _m: unmapping.set()
    return unmapping


# ------------------------------------------------------------------------------ add / remove


def test_map_and_unmap(table: DmaMapTable) -> None:
    before = fd_count()
    fd = memfd()
    table.add(0x10000, 0x1000, RW, fd, 0x2000)
    (m,) = table.maps()
    assert (m.iova, m.size, m.prot, m.offset, m.direct) == (0x10000, 0x1000, RW, 0x2000, True)
    assert table.find(0x10FFF) is m
    assert table.find(0x11000) is None
    table.remove(0x10000, 0x1000)
    assert table.maps() == []
    assert not is_open(fd)
    assert fd_count() == before
    assert table.mapped_file_count() == 0


def test_dedup_same_file(table: DmaMapTable) -> None:
    before = fd_count()
    fd = memfd(4 * MiB)
    fd2 = os.dup(fd)  # a second fd of the same file, as QEMU sends for pc.ram above 4G
    table.add(0, MiB, RW, fd, 0)
    assert is_open(fd)
    table.add(0x1_0000_0000, MiB, RW, fd2, 2 * MiB)
    assert not is_open(fd2), "extra fd of the same file is closed at once"
    assert table.mapped_file_count() == 1
    # our fd + the mmap object's own dup
    assert fd_count() == before + 2
    acc = DmaAccessor(table)
    acc.write(0x1_0000_0000, b"high")
    table.remove(0, MiB)
    assert table.mapped_file_count() == 1
    assert acc.read(0x1_0000_0000, 4) == b"high"
    table.remove(0x1_0000_0000, MiB)
    assert table.mapped_file_count() == 0
    assert fd_count() == before


def test_two_files_two_mappings(table: DmaMapTable) -> None:
    table.add(0, 0x1000, RW, memfd(0x1000), 0)
    table.add(0x1000, 0x1000, RW, memfd(0x1000), 0)
    assert table.mapped_file_count() == 2
    keys = {m.file_key for m in table.maps()}
    assert len(keys) == 2


def test_shared_memory_is_coherent(table: DmaMapTable) -> None:
    fd = memfd(0x4000)
    peer = mmap.mmap(os.dup(fd), 0x4000, flags=mmap.MAP_SHARED)
    try:
        table.add(0x8000, 0x2000, RW, fd, 0x1000)
        acc = DmaAccessor(table)
        peer[0x1010:0x1014] = b"abcd"
        assert acc.read(0x8010, 4) == b"abcd"
        acc.write_u32(0x8020, 0xDEADBEEF)
        assert peer[0x1020:0x1024] == (0xDEADBEEF).to_bytes(4, "little")
        acc.write_u64(0x8028, 0x0102030405060708)
        assert acc.read_u64(0x8028) == 0x0102030405060708
        assert acc.read_u32(0x8020) == 0xDEADBEEF
        acc.write_u16(0x8030, 0xBEEF)
        assert acc.read_u16(0x8030) == 0xBEEF
    finally:
        table.remove_all()
        peer.close()


def test_unmap_never_splits_a_map(table: DmaMapTable) -> None:
    table.add(0x10000, 0x2000, RW, memfd(), 0)
    for iova, size in ((0x10000, 0x1000), (0x11000, 0x1000), (0xF000, 0x2000),
                       (0x11000, 0x10000)):
        with pytest.raises(DmaError) as e:
            table.remove(iova, size)
        assert e.value.errno == errno.EINVAL
    assert len(table) == 1
    assert table.remove(0x10000, 0x2000) == 0x2000
    assert len(table) == 0


def test_unmap_of_an_empty_range_is_a_no_op(table: DmaMapTable) -> None:
    # VFIO type1 semantics; QEMU with a vIOMMU unmaps ranges that were never mapped.
    table.add(0x10000, 0x2000, RW, memfd(), 0)
    assert table.remove(0x50000, 0x1000) == 0
    assert table.remove(0x12000, 0x1000) == 0
    assert len(table) == 1
    with pytest.raises(DmaError):
        table.remove(0x0, 0)


def test_unmap_of_a_range_covering_several_maps(table: DmaMapTable) -> None:
    table.add(0x10000, 0x1000, RW, memfd(), 0)
    table.add(0x12000, 0x1000, RW, None, 0)
    table.add(0x20000, 0x1000, RW, None, 0)
    assert table.remove(0x0, 0x20000) == 0x2000
    assert [m.iova for m in table.maps()] == [0x20000]


@pytest.mark.parametrize(
    ("iova", "size"),
    [(0x10000, 0x1000), (0xF000, 0x2000), (0x11FFF, 0x10), (0x8000, 0x100000), (0x10800, 0x10)],
)
def test_overlap_rejected_and_fd_closed(table: DmaMapTable, iova: int, size: int) -> None:
    table.add(0x10000, 0x2000, RW, None, 0)
    fd = memfd()
    with pytest.raises(DmaError) as e:
        table.add(iova, size, RW, fd, 0)
    assert e.value.errno == errno.EEXIST
    assert not is_open(fd)
    assert len(table) == 1


def test_adjacent_maps_allowed(table: DmaMapTable) -> None:
    table.add(0x10000, 0x1000, RW, None, 0)
    table.add(0xF000, 0x1000, RW, None, 0)
    table.add(0x11000, 0x1000, RW, None, 0)
    assert [m.iova for m in table.maps()] == [0xF000, 0x10000, 0x11000]


@pytest.mark.parametrize(
    ("iova", "size"), [(0, 0), (2**64 - 0x1000, 0x2000), (2**64, 1), (-1, 0x1000)]
)
def test_invalid_maps(table: DmaMapTable, iova: int, size: int) -> None:
    fd = memfd()
    with pytest.raises(DmaError) as e:
        table.add(iova, size, RW, fd, 0)
    assert e.value.errno == errno.EINVAL
    assert not is_open(fd)


def test_map_at_top_of_iova_space(table: DmaMapTable) -> None:
    table.add(2**64 - 0x1000, 0x1000, RW, memfd(0x1000), 0)
    acc = DmaAccessor(table)
    acc.write(2**64 - 4, b"last")
    assert acc.read(2**64 - 4, 4) == b"last"
    with pytest.raises(DmaError):
        acc.read(2**64 - 4, 8)


def test_max_maps() -> None:
    t = DmaMapTable(max_maps=2)
    t.add(0, 0x1000, RW, None, 0)
    t.add(0x1000, 0x1000, RW, None, 0)
    fd = memfd()
    with pytest.raises(DmaError) as e:
        t.add(0x2000, 0x1000, RW, fd, 0)
    assert e.value.errno == errno.ENOSPC
    assert not is_open(fd)


def test_file_too_small_falls_back_to_message_dma(
    table: DmaMapTable, caplog: pytest.LogCaptureFixture
) -> None:
    fd = memfd(0x1000)
    with caplog.at_level(logging.WARNING):
        table.add(0, 0x2000, RW, fd, 0)
    assert "too small" in caplog.text
    assert not is_open(fd)
    (m,) = table.maps()
    assert not m.direct
    assert table.mapped_file_count() == 0


def _wrong_kind_fds(tmp_path: Path) -> list[tuple[str, int]]:
    r, w = os.pipe()
    os.close(w)
    a, b = socket.socketpair()
    b.close()
    return [
        ("pipe", r),
        ("socket", a.detach()),
        ("directory", os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)),
        ("device", os.open("/dev/zero", os.O_RDWR)),
        ("eventfd", os.eventfd(0)),
    ]


def test_fd_of_the_wrong_kind_is_refused_and_closed(table: DmaMapTable, tmp_path: Path) -> None:
    for kind, fd in _wrong_kind_fds(tmp_path):
        with pytest.raises(DmaError) as e:
            table.add(0, 0x1000, RW, fd, 0)
        assert e.value.errno == errno.EINVAL, kind
        assert not is_open(fd), kind
        assert table.maps() == [], kind


def test_unmappable_file_falls_back_to_message_dma(table: DmaMapTable, tmp_path: Path) -> None:
    path = tmp_path / "write-only"
    path.write_bytes(bytes(0x1000))
    fd = os.open(path, os.O_WRONLY)  # a regular file mmap refuses (EACCES)
    table.add(0, 0x1000, RW, fd, 0)
    assert not is_open(fd)
    assert not table.maps()[0].direct


def test_read_only_fd(table: DmaMapTable) -> None:
    fd = memfd(0x2000)
    os.pwrite(fd, b"rom!", 0x1000)
    ro_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    os.close(fd)
    table.add(0, 0x1000, RO, ro_fd, 0x1000)
    assert table.maps()[0].direct
    assert DmaAccessor(table).read(0, 4) == b"rom!"


def test_hooks_called(table: DmaMapTable) -> None:
    seen: list[tuple[str, DmaMapping]] = []
    t = DmaMapTable(
        on_map=lambda m: seen.append(("map", m)), on_unmap=lambda m: seen.append(("unmap", m))
    )
    t.add(0x1000, 0x1000, RW, memfd(), 0)
    t.add(0x2000, 0x1000, RO, None, 0)
    t.remove(0x1000, 0x1000)
    t.remove_all()
    assert [(k, m.iova) for k, m in seen] == [
        ("map", 0x1000),
        ("map", 0x2000),
        ("unmap", 0x1000),
        ("unmap", 0x2000),
    ]


def test_hook_exception_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def boom(m: DmaMapping) -> None:
        raise RuntimeError("boom")

    t = DmaMapTable(on_map=boom, on_unmap=boom)
    t.add(0, 0x1000, RW, None, 0)
    t.remove(0, 0x1000)
    assert len([r for r in caplog.records if "DMA hook" in r.getMessage()]) == 2


# ---------------------------------------------------------------------------------- translate


def test_translate_across_adjacent_maps(table: DmaMapTable) -> None:
    a, b = memfd(0x2000), memfd(0x2000)
    os.pwrite(a, b"A" * 0x1000, 0x1000)
    os.pwrite(b, b"B" * 0x1000, 0)
    table.add(0x10000, 0x1000, RW, a, 0x1000)
    table.add(0x11000, 0x1000, RW, b, 0)
    segs = table.translate(0x10FF0, 0x20, write=False)
    try:
        assert [(s.iova, s.length, s.direct) for s in segs] == [
            (0x10FF0, 0x10, True),
            (0x11000, 0x10, True),
        ]
        assert segs[0].view is not None and segs[1].view is not None
        assert bytes(segs[0].view) == b"A" * 16
        assert bytes(segs[1].view) == b"B" * 16
        assert segs[0].view.readonly
    finally:
        table.release(segs)
    assert all(s.view is None for s in segs)
    assert DmaAccessor(table).read(0x10FF8, 0x10) == b"A" * 8 + b"B" * 8


def test_translate_mixed_fd_and_message(table: DmaMapTable) -> None:
    table.add(0x0, 0x1000, RW, memfd(0x1000), 0)
    table.add(0x1000, 0x1000, RW, None, 0)
    segs = table.translate(0x800, 0x1000, write=True)
    assert [(s.iova, s.length, s.direct) for s in segs] == [
        (0x800, 0x800, True),
        (0x1000, 0x800, False),
    ]
    assert segs[0].view is not None and not segs[0].view.readonly
    assert segs[1].view is None
    table.release(segs)
    assert table.is_direct(0, 0x1000)
    assert not table.is_direct(0, 0x1001)
    assert not table.is_direct(0x5000, 1)


@pytest.mark.parametrize(("iova", "length"), [(0x2000, 1), (0xFFF, 2), (0x0, 0x3001), (0x2FFF, 2)])
def test_translate_holes(table: DmaMapTable, iova: int, length: int) -> None:
    table.add(0x1000, 0x1000, RW, None, 0)
    table.add(0x3000, 0x1000, RW, memfd(0x1000), 0)
    with pytest.raises(DmaError) as e:
        table.translate(iova, length, write=False)
    assert e.value.errno == errno.EFAULT
    with pytest.raises(DmaError):
        DmaAccessor(table).read(iova, length)


def test_translate_empty(table: DmaMapTable) -> None:
    assert table.translate(0x1234, 0, write=True) == []


def test_read_only_map_never_written(table: DmaMapTable) -> None:
    fd = memfd(0x1000)
    table.add(0, 0x1000, RO, fd, 0)
    acc = DmaAccessor(table)
    with pytest.raises(DmaError) as e:
        acc.write(0x10, b"x")
    assert e.value.errno == errno.EPERM
    with pytest.raises(DmaError) as e:
        table.translate(0, 1, write=True)
    assert e.value.errno == errno.EPERM
    with acc.map(0, 0x10) as views:
        assert views[0].readonly
    assert acc.read(0x10, 1) == b"\0"


def test_read_only_message_map_never_written(table: DmaMapTable) -> None:
    fake = FakeMessageDma()
    table.add(0, 0x1000, RW, None, 0)
    table.add(0x1000, 0x1000, RO, None, 0)
    acc = DmaAccessor(table, fake)
    with pytest.raises(DmaError) as e:
        acc.write(0xFFC, b"12345678")
    assert e.value.errno == errno.EPERM
    assert fake.calls == [], "nothing is written when part of the range is read-only"


def test_write_only_map_not_readable(table: DmaMapTable) -> None:
    table.add(0, 0x1000, DmaProt.WRITE, memfd(0x1000), 0)
    acc = DmaAccessor(table)
    acc.write(0, b"ok")
    with pytest.raises(DmaError) as e:
        acc.read(0, 2)
    assert e.value.errno == errno.EPERM


# ----------------------------------------------------------------------------- message DMA


def test_message_dma_fallback(table: DmaMapTable) -> None:
    fake = FakeMessageDma(0x2000, base=0x1000)
    fd = memfd(0x1000)
    table.add(0x0, 0x1000, RW, fd, 0)
    table.add(0x1000, 0x2000, RW, None, 0)
    acc = DmaAccessor(table, fake)
    acc.write(0xFF0, bytes(range(32)))
    assert fake.calls == [("write", 0x1000, 16)]
    assert bytes(fake.mem[:16]) == bytes(range(16, 32))
    assert os.pread(fd, 16, 0xFF0) == bytes(range(16))
    assert acc.read(0xFF0, 32) == bytes(range(32))
    assert fake.calls[-1] == ("read", 0x1000, 16)
    buf = bytearray(8)
    acc.read_into(0x1000, buf)
    assert buf == bytes(range(16, 24))
    acc.write_u32(0x2000, 7)
    assert acc.read_u32(0x2000) == 7


def test_message_dma_missing(table: DmaMapTable) -> None:
    table.add(0x1000, 0x1000, RW, None, 0)
    acc = DmaAccessor(table)
    with pytest.raises(DmaError, match="message DMA") as e:
        acc.read(0x1000, 4)
    assert e.value.errno == errno.ENODEV
    with pytest.raises(DmaError) as e:
        acc.write(0x1000, b"x")
    assert e.value.errno == errno.ENODEV


def test_message_dma_short_read(table: DmaMapTable) -> None:
    class Short(FakeMessageDma):
        def dma_read(self, iova: int, length: int) -> bytes:
            return b"\0" * (length - 1)

    table.add(0, 0x1000, RW, None, 0)
    with pytest.raises(DmaError) as e:
        DmaAccessor(table, Short()).read(0, 4)
    assert e.value.errno == errno.EIO


def test_map_context_requires_fd(table: DmaMapTable) -> None:
    table.add(0, 0x1000, RW, memfd(0x1000), 0)
    table.add(0x1000, 0x1000, RW, None, 0)
    acc = DmaAccessor(table, FakeMessageDma())
    with pytest.raises(DmaError) as e, acc.map(0xF00, 0x200):
        pass
    assert e.value.errno == errno.EFAULT
    # the reference taken on the fd-backed map was released
    table.remove(0, 0x1000)
    assert table.mapped_file_count() == 0


def test_map_context_zero_copy(table: DmaMapTable) -> None:
    fd = memfd(0x2000)
    table.add(0x4000, 0x1000, RW, fd, 0)
    table.add(0x5000, 0x1000, RW, os.dup(fd), 0x1000)
    acc = DmaAccessor(table)
    with acc.map(0x4FFE, 4, write=True) as views:
        assert [len(v) for v in views] == [2, 2]
        views[0][:] = b"ab"
        views[1][:] = b"cd"
    assert all(v is not None for v in views)
    with pytest.raises(ValueError):
        views[0].tobytes()  # released on exit
    assert os.pread(fd, 4, 0xFFE) == b"abcd"


def test_read_into_memoryview_and_buffers(table: DmaMapTable) -> None:
    table.add(0, 0x1000, RW, memfd(0x1000), 0)
    acc = DmaAccessor(table)
    acc.write(0, memoryview(b"0123456789"))
    acc.write(10, bytearray(b"ab"))
    buf = bytearray(12)
    with memoryview(buf) as mv:
        acc.read_into(0, mv[2:])
    assert buf == b"\0\x000123456789"


# ----------------------------------------------------------------------- in-flight accesses


def test_unmap_waits_for_inflight_access(table: DmaMapTable) -> None:
    fd = memfd(0x1000)
    table.add(0, 0x1000, RW, os.dup(fd), 0)
    acc = DmaAccessor(table)
    unmapping = unmap_signal(table)
    entered = threading.Event()
    order: list[str] = []

    def worker() -> None:
        with acc.map(0, 0x10, write=True) as views:
            entered.set()
            assert unmapping.wait(GENEROUS)  # remove() has started and is waiting for us
            views[0][:4] = b"late"
            order.append("access done")

    t = threading.Thread(target=worker)
    t.start()
    assert entered.wait(GENEROUS)
    assert table.find(0) is not None
    table.remove(0, 0x1000)
    order.append("remove returned")
    t.join(GENEROUS)
    assert not t.is_alive()
    assert order == ["access done", "remove returned"]
    assert table.mapped_file_count() == 0
    assert os.pread(fd, 4, 0) == b"late"
    os.close(fd)


def test_unmap_removes_from_lookups_at_once(table: DmaMapTable) -> None:
    table.add(0, 0x1000, RW, memfd(0x1000), 0)
    segs = table.translate(0, 8, write=False)
    unmapping = unmap_signal(table)
    removing = threading.Thread(target=table.remove, args=(0, 0x1000))
    removing.start()
    assert unmapping.wait(GENEROUS)
    assert table.maps() == []
    with pytest.raises(DmaError):
        table.translate(0, 8, write=False)
    assert removing.is_alive(), "remove waits for the in-flight segment"
    table.release(segs)
    removing.join(GENEROUS)
    assert not removing.is_alive()
    assert table.mapped_file_count() == 0


def test_unmap_timeout_defers_munmap(caplog: pytest.LogCaptureFixture) -> None:
    before = fd_count()
    t = DmaMapTable(unmap_timeout=0.1)
    t.add(0, 0x1000, RW, memfd(0x1000), 0)
    segs = t.translate(0, 0x1000, write=True)
    with caplog.at_level(logging.WARNING):
        t.remove(0, 0x1000)
    assert "deferred" in caplog.text
    assert t.maps() == []
    assert t.mapped_file_count() == 1, "memory in use is not unmapped"
    view = segs[0].view
    assert view is not None
    view[:4] = b"safe"  # still mapped: no crash
    t.release(segs)
    assert t.mapped_file_count() == 0
    assert fd_count() == before


def test_remove_all_waits_and_closes(table: DmaMapTable) -> None:
    before = fd_count()
    for i in range(8):
        table.add(i * 0x1000, 0x1000, RW, memfd(0x1000), 0)
    table.add(0x10000, 0x1000, RW, None, 0)
    segs = table.translate(0x3000, 0x10, write=False)
    unmapped = 0
    all_unmapped = threading.Event()
    order: list[str] = []

    def on_unmap(_m: DmaMapping) -> None:
        nonlocal unmapped
        unmapped += 1
        if unmapped == 9:
            all_unmapped.set()

    def releaser() -> None:
        assert all_unmapped.wait(GENEROUS)  # remove_all() is now waiting for segs
        order.append("released")
        table.release(segs)

    table.on_unmap = on_unmap
    th = threading.Thread(target=releaser)
    th.start()
    table.remove_all()
    order.append("remove_all returned")
    th.join(GENEROUS)
    assert order == ["released", "remove_all returned"]
    assert table.maps() == []
    assert table.mapped_file_count() == 0
    assert fd_count() == before


def test_escaped_view_does_not_crash(table: DmaMapTable, caplog: pytest.LogCaptureFixture) -> None:
    table.add(0, 0x1000, RW, memfd(0x1000), 0)
    segs = table.translate(0, 0x10, write=False)
    assert segs[0].view is not None
    escaped = memoryview(segs[0].view)  # an export of the segment's view
    with caplog.at_level(logging.WARNING):
        table.release(segs)
        table.remove(0, 0x1000)
    assert bytes(escaped[:2]) == b"\0\0"  # still valid memory
    escaped.release()


def test_concurrent_access_and_remap(table: DmaMapTable) -> None:
    fd = memfd(0x10000)
    acc = DmaAccessor(table)
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        while not stop.is_set():
            try:
                acc.write_u32(0x1000, 1)
                acc.read(0x1000, 0x100)
            except DmaError as e:
                if e.errno != errno.EFAULT:
                    errors.append(e)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    try:
        for _ in range(200):
            table.add(0, 0x10000, RW, os.dup(fd), 0)
            table.remove(0, 0x10000)
    finally:
        stop.set()
        for th in threads:
            th.join()
    os.close(fd)
    assert not errors
    assert table.mapped_file_count() == 0


def test_no_fd_leak_after_many_cycles() -> None:
    before = fd_count()
    t = DmaMapTable()
    acc = DmaAccessor(t, FakeMessageDma(0x1000, base=0x100000))
    shared = memfd(0x20000)
    for i in range(300):
        t.add(0, 0x10000, RW, os.dup(shared), 0)
        t.add(0x10000, 0x10000, RO, os.dup(shared), 0x10000)
        t.add(0x100000, 0x1000, RW, None, 0)
        t.add(0x200000, 0x1000, RW, memfd(0x1000), 0)
        acc.write(0xFFFC, i.to_bytes(4, "little"))
        assert acc.read(0xFFFC, 8)[:4] == i.to_bytes(4, "little")
        acc.write(0x100000, b"m")
        with acc.map(0x200000, 0x10, write=True) as views:
            views[0][0] = 1
        if i % 2:
            t.remove_all()
        else:
            for m in t.maps():
                t.remove(m.iova, m.size)
        with pytest.raises(DmaError):
            t.add(0, 0, RW, os.dup(shared), 0)
    os.close(shared)
    assert fd_count() == before


# ------------------------------------------------------------------------------ properties


@settings(max_examples=60, deadline=None)
@given(
    layout=st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(["sealed", "unsealed", "no fd"])),
        min_size=1,
        max_size=6,
    ),
    ops=st.lists(
        st.tuples(st.booleans(), st.integers(0, 0x1F000), st.integers(0, 0x3000), st.binary()),
        max_size=20,
    ),
)
def test_accessor_matches_flat_model(
    layout: list[tuple[int, str]], ops: list[tuple[bool, int, int, bytes]]
) -> None:
    """Maps of 1-4 pages, fd-backed (sealed: zero-copy, or not: guarded copies) or not, laid
    out back to back with optional one-page holes; every read/write either matches a flat
    bytearray model or raises EFAULT on a hole."""
    before = fd_count()
    table = DmaMapTable()
    model = bytearray(0x20000)
    mapped = bytearray(0x20000)  # 1 where mapped
    fake = FakeMessageDma(0x20000)
    fake.mem = model  # message DMA reads/writes the model directly
    files: list[tuple[int, int, int]] = []  # (iova, size, fd dup) for fd-backed maps
    iova = 0
    for pages, kind in layout:
        size = (pages + 1) * 0x1000
        if kind != "no fd":
            fd = memfd(size, sealed=kind == "sealed")
            files.append((iova, size, os.dup(fd)))
            table.add(iova, size, RW, fd, 0)
        else:
            table.add(iova, size, RW, None, 0)
        mapped[iova : iova + size] = b"\1" * size
        iova += size + (0x1000 if pages == 3 else 0)
    acc = DmaAccessor(table, fake)

    def sync_model_from_files() -> None:
        for base, size, fd in files:
            model[base : base + size] = os.pread(fd, size, 0)

    try:
        for is_write, addr, length, payload in ops:
            data = (
                (payload * (length // max(1, len(payload)) + 1))[:length]
                if payload
                else bytes(length)
            )
            covered = all(mapped[addr : addr + length]) and addr + length <= len(mapped)
            if not covered:
                with pytest.raises(DmaError) as e:
                    if is_write:
                        acc.write(addr, data)
                    else:
                        acc.read(addr, length)
                assert e.value.errno == errno.EFAULT
                continue
            if is_write:
                acc.write(addr, data)
                sync_model_from_files()
                # message pieces went to the model; fd pieces to the files
                assert acc.read(addr, length) == data
            else:
                sync_model_from_files()
                assert acc.read(addr, length) == bytes(model[addr : addr + length])
    finally:
        table.remove_all()
        for _, _, fd in files:
            os.close(fd)
    assert fd_count() == before


def test_window_follows_the_map_table() -> None:
    table = DmaMapTable()
    assert table.window(0x1000) is None and table.generation == 0
    fd = memfd()
    os.pwrite(fd, b"ring", 0x2000 + 8)
    table.add(0x10000, 0x4000, DmaProt.READ, fd, 0x2000)
    gen = table.generation
    assert gen > 0
    w = table.window(0x10008)
    assert w is not None and (w.start, w.end) == (0x10000, 0x14000)
    assert w.readable and not w.writable
    assert w.mm[0x10008 + w.delta:0x1000C + w.delta] == b"ring"
    assert table.window(0x14000) is None  # past the map
    table.add(0x20000, 0x1000, DmaProt.READ | DmaProt.WRITE, None, 0)
    assert table.window(0x20000) is None  # no fd: message DMA only
    table.add(0x30000, 0x1000, DmaProt.READ, memfd(sealed=False), 0)
    assert table.window(0x30000) is None  # unsealed: guarded copies only
    assert table.generation > gen
    gen = table.generation
    table.remove(0x10000, 0x4000)
    assert table.generation > gen and table.window(0x10008) is None
