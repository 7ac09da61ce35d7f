"""The accessor's fast path (C shim: one call takes the map's pin and does the guarded copy) and
the shim's copy loop for skewed buffers.

The fast path must keep every rule of the general path: an unmap never tears a mapping down
under a copy in flight on another thread, a shrunk memfd is a DmaError (never a crash), a map
replaced at the same IOVA is seen at once, and the errors (unmapped, permission, crossing maps)
are the general path's. The copy loop must be exact at every skew and around its size limits.
The shim is required (``pip install`` builds it), also when ``PYVFIO_NO_SHIM`` is set: these
tests build their own :class:`ShimCopy`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from vfio_user_server import dmacopy
from vfio_user_server.dma import DmaAccessor, DmaMapTable, DmaProt
from vfio_user_server.errors import DmaError

PAGE = 0x1000
SIZE = 64 * PAGE
BASE = 0x10_0000
RW = DmaProt.READ | DmaProt.WRITE
DEADLINE = 60.0  # generous: only a hang reaches it


def _shim() -> Any:
    module = dmacopy._load_shim()
    assert module is not None, "the C shim is not built (pip install needs gcc, Python.h)"
    return module


@pytest.fixture
def shim() -> dmacopy.ShimCopy:
    return dmacopy.ShimCopy(_shim())


def memfd(fill: int, sealed: bool = False, size: int = SIZE) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, bytes([fill]) * size, 0)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


@pytest.fixture
def table(shim: dmacopy.ShimCopy) -> Iterator[DmaMapTable]:
    t = DmaMapTable(copy=shim, unmap_timeout=DEADLINE)
    yield t
    t.remove_all()


def _warm(acc: DmaAccessor, iova: int = BASE) -> None:
    """One read and one write through the general path, which cache the map for the fast
    path (the map must be readable and writable)."""
    buf = bytearray(8)
    acc.read_into(iova, buf)
    acc.write(iova, buf)
    assert acc._fast_r is not None and acc._fast_w is not None


def test_fast_path_is_taken_and_correct(table: DmaMapTable) -> None:
    fd = memfd(0)
    os.pwrite(fd, bytes(range(256)) * (SIZE // 256), 0)
    table.add(BASE, SIZE, RW, fd, 0)
    acc = DmaAccessor(table)
    _warm(acc)
    cached = acc._fast_r, acc._fast_w
    buf = bytearray(PAGE)
    acc.read_into(BASE + 3, buf)
    assert bytes(buf) == (bytes(range(256)) * 17)[3 : 3 + PAGE]
    with memoryview(bytearray(PAGE + 64)) as whole, whole[5 : 5 + PAGE] as view:
        acc.read_into(BASE + 3, view)
        assert bytes(view) == bytes(buf)
    acc.write(BASE + PAGE, b"\xab" * 100)
    acc.write(BASE + PAGE + 100, bytearray(b"\xcd" * 100))
    with memoryview(b"\xef" * 100) as src:
        acc.write(BASE + PAGE + 200, src)
    assert acc.read(BASE + PAGE, 300) == b"\xab" * 100 + b"\xcd" * 100 + b"\xef" * 100
    assert (acc._fast_r, acc._fast_w) == cached  # every access above took the fast path
    acc.read_into(BASE + SIZE - 4, bytearray(4))  # the last bytes
    acc.read_into(BASE + SIZE, bytearray(0))  # empty at the end: nothing to copy


def test_fast_path_errors_are_the_general_paths(table: DmaMapTable) -> None:
    table.add(BASE, SIZE, DmaProt.READ, memfd(1), 0)  # read-only
    table.add(BASE + SIZE, SIZE, DmaProt.WRITE, memfd(2), 0)  # write-only, adjacent
    acc = DmaAccessor(table)
    acc.read_into(BASE, bytearray(8))
    with pytest.raises(DmaError, match="is read-only") as e:
        acc.write(BASE, b"x")
    assert e.value.errno == errno.EPERM
    # crossing into the write-only map: the general path names the map that refuses
    with pytest.raises(DmaError, match="is not readable") as e:
        acc.read_into(BASE + SIZE - 4, bytearray(8))
    assert e.value.errno == errno.EPERM
    acc.write(BASE + SIZE, b"\x07" * 8)  # now cached: the write-only map
    with pytest.raises(DmaError, match="is not readable") as e:
        acc.read_into(BASE + SIZE, bytearray(8))
    assert e.value.errno == errno.EPERM
    with pytest.raises(DmaError, match="is not mapped") as e:
        acc.write(BASE + 2 * SIZE - 4, b"\0" * 8)  # past the last map
    assert e.value.errno == errno.EFAULT
    with pytest.raises(DmaError, match="is not mapped") as e:
        acc.read_into(BASE - 1, bytearray(2))
    assert e.value.errno == errno.EFAULT


def test_map_replaced_at_the_same_iova(table: DmaMapTable, shim: dmacopy.ShimCopy) -> None:
    table.add(BASE, SIZE, RW, memfd(0x11), 0)
    acc = DmaAccessor(table)
    _warm(acc)
    old, old_w = acc._fast_r, acc._fast_w
    assert old is not None and old_w is not None and old[2] is old_w[2]
    table.remove(BASE, SIZE)
    table.add(BASE, SIZE, RW, memfd(0x22), 0)
    assert acc.read(BASE, 16) == b"\x22" * 16  # the generation changed: a new translation
    # Even with the old map forced back into the cache, its closed pin keeps the copy off the
    # old memory: the fast path copies nothing and the general path serves the new map.
    acc._fast_r = old
    buf = bytearray(16)
    acc.read_into(BASE, buf)
    assert bytes(buf) == b"\x22" * 16
    acc._fast_w = old
    acc.write(BASE, b"\x33" * 16)
    assert acc.read(BASE, 16) == b"\x33" * 16
    assert shim.pin_refs(old[2]) == 0
    assert table.mapped_file_count() == 1


def test_shrunk_memfd_under_the_fast_path(table: DmaMapTable) -> None:
    fd = memfd(0x5A)
    table.add(BASE, SIZE, RW, os.dup(fd), 0)
    acc = DmaAccessor(table)
    _warm(acc)
    cached = acc._fast_r, acc._fast_w
    os.ftruncate(fd, PAGE)  # the client takes all but the first page away
    try:
        assert acc.read(BASE, 16) == b"\x5a" * 16
        with pytest.raises(DmaError, match="guest memory is gone") as e:
            acc.read_into(BASE + 2 * PAGE, bytearray(PAGE))
        assert e.value.errno == errno.EFAULT
        with pytest.raises(DmaError, match="guest memory is gone"):
            acc.write(BASE + PAGE - 8, b"\1" * 16)  # crosses into the missing page
        assert (acc._fast_r, acc._fast_w) == cached  # reported by the fast path itself
        pin = cached[0][2] if cached[0] is not None else None
        assert table._shim is not None and table._shim.pin_refs(pin) == 0
    finally:
        os.close(fd)
    assert table.remove(BASE, SIZE) == SIZE  # no reference leaked: no wait, no deferral
    assert table.mapped_file_count() == 0


def test_unmap_waits_for_a_copy_in_flight(table: DmaMapTable, shim: dmacopy.ShimCopy) -> None:
    """A reference on the pin (what a fast-path copy holds while it copies) makes the unmap
    wait; copies that start after the unmap began touch nothing and report the unmap."""
    lib = _shim().lib
    table.add(BASE, SIZE, RW, memfd(0x44), 0)
    mapping = table.find(BASE)
    assert mapping is not None
    acc = DmaAccessor(table)
    _warm(acc)
    assert lib.pyvfio_pin_hold(mapping._pin) == 0  # a copy in flight on "another thread"
    unlinked = threading.Event()
    table.on_unmap = lambda m: unlinked.set()
    remover = threading.Thread(target=table.remove, args=(BASE, SIZE))
    remover.start()
    assert unlinked.wait(DEADLINE)
    # The unmap has closed the pin and waits: the file is still mapped, and a new copy through
    # the cached translation does not touch it.
    assert table.mapped_file_count() == 1
    with pytest.raises(DmaError, match="is not mapped") as e:
        acc.read_into(BASE, bytearray(16))
    assert e.value.errno == errno.EFAULT
    assert remover.is_alive() and table.mapped_file_count() == 1
    assert lib.pyvfio_pin_release(mapping._pin) == lib.PIN_LAST  # the copy ends
    remover.join(DEADLINE)
    assert not remover.is_alive()
    assert table.mapped_file_count() == 0


def test_unmap_timeout_defers_the_munmap(shim: dmacopy.ShimCopy) -> None:
    lib = _shim().lib
    table = DmaMapTable(copy=shim, unmap_timeout=0)
    table.add(BASE, SIZE, RW, memfd(0x55), 0)
    mapping = table.find(BASE)
    assert mapping is not None
    acc = DmaAccessor(table)
    _warm(acc)
    assert lib.pyvfio_pin_hold(mapping._pin) == 0
    assert table.remove(BASE, SIZE) == SIZE  # the timeout passes: deferred
    assert table.mapped_file_count() == 1
    assert lib.pyvfio_pin_hold(mapping._pin) == lib.PIN_STALE  # closed: no new reference
    assert lib.pyvfio_pin_release(mapping._pin) == lib.PIN_LAST
    table._pin_done(mapping)  # what the accessor does when its copy drops the last reference
    assert table.mapped_file_count() == 0


def test_unmap_racing_fast_path_copies_on_another_thread(table: DmaMapTable) -> None:
    """A thread copies in a loop through the fast path while the main thread unmaps: every
    copy either sees the whole map or fails with EFAULT; the unmap finishes; nothing crashes."""
    table.add(BASE, SIZE, RW, memfd(0x66), 0)
    acc = DmaAccessor(table)
    _warm(acc)
    running, stop = threading.Event(), threading.Event()
    outcome: list[object] = []

    def copier() -> None:
        buf = bytearray(16 * PAGE)
        n = 0
        try:
            while not stop.is_set():
                acc.read_into(BASE, buf)
                assert buf[0] == 0x66 and buf[-1] == 0x66
                acc.write(BASE + PAGE, buf)
                n += 1
                if n == 100:
                    running.set()
        except BaseException as exc:  # a DmaError, checked below; anything else fails the test
            outcome.append(exc)
        running.set()

    t = threading.Thread(target=copier)
    t.start()
    assert running.wait(DEADLINE)
    assert table.remove(BASE, SIZE) == SIZE
    assert table.mapped_file_count() == 0
    t.join(DEADLINE)
    stop.set()
    t.join(DEADLINE)
    assert not t.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], DmaError), outcome
    assert outcome[0].errno == errno.EFAULT


# --- the copy loop (c_shim/dma_copy.c copy_bytes) ----------------------------------------------

SIZES = (1, 63, 64, 2047, 2048, 2049, 2111, 4096, 4097, 65536 + 37, (1 << 20) - 1, 1 << 20)


@pytest.mark.parametrize("size", SIZES)
def test_copy_every_skew(size: int) -> None:
    """dst - src = 0..64 (and the mirror, 4096 - skew) modulo the page, at each size around the
    loop's limits and at every destination alignment mod 16: exact, and nothing outside."""
    module = _shim()
    ffi, lib = module.ffi, module.lib
    pattern = os.urandom(size + 4 * PAGE)
    src = ffi.new("char[]", size + 4 * PAGE)
    dst = ffi.new("char[]", size + 4 * PAGE)
    ffi.memmove(src, pattern, len(pattern))
    s_addr = int(ffi.cast("uintptr_t", src))
    d_addr = int(ffi.cast("uintptr_t", dst))
    s_off = (-s_addr) % PAGE  # source page-aligned, as a guest mmap is
    for skew in list(range(65)) + [PAGE - k for k in range(1, 65)]:
        d_off = (s_addr + s_off + skew - d_addr) % PAGE + 16
        ffi.memmove(dst, b"\xee" * (size + 4 * PAGE), size + 4 * PAGE)
        lib.pyvfio_dma_copy_bytes(dst + d_off, src + s_off, size)
        out = ffi.buffer(dst)
        assert out[d_off : d_off + size] == pattern[s_off : s_off + size], (skew, size)
        assert out[d_off - 16 : d_off] == b"\xee" * 16, (skew, size)
        assert out[d_off + size : d_off + size + 16] == b"\xee" * 16, (skew, size)


@pytest.mark.parametrize("size", (2049, 4096, 128 << 10))
def test_accessor_copies_at_every_skew(table: DmaMapTable, size: int) -> None:
    """The same through the accessor's fast path (reads and writes) with buffers at every
    offset 0..64 from a page, against the page-aligned guest map."""
    fd = memfd(0, size=1 << 20)
    pattern = os.urandom(1 << 20)
    os.pwrite(fd, pattern, 0)
    table.add(BASE, 1 << 20, RW, fd, 0)
    acc = DmaAccessor(table)
    _warm(acc)
    whole = bytearray(size + 2 * PAGE)
    with memoryview(whole) as mv:
        for off in range(65):
            with mv[off : off + size] as view:
                acc.read_into(BASE + PAGE, view)
                assert view == pattern[PAGE : PAGE + size], off
                view[:] = pattern[2 * PAGE : 2 * PAGE + size]
                acc.write(BASE + 3 * PAGE, view)
            assert acc.read(BASE + 3 * PAGE, size) == pattern[2 * PAGE : 2 * PAGE + size]
            acc.write(BASE + 3 * PAGE, pattern[3 * PAGE : 3 * PAGE + size])


def test_fast_path_refuses_what_the_general_path_refuses(table: DmaMapTable) -> None:
    table.add(BASE, SIZE, RW, memfd(0x77), 0)
    acc = DmaAccessor(table)
    _warm(acc)
    with pytest.raises((TypeError, BufferError)):  # what the general path raises
        acc.read_into(BASE, b"\0" * 16)  # type: ignore[arg-type]  # read-only
    with memoryview(bytearray(64)) as whole, whole[::2] as strided:
        with pytest.raises(TypeError):
            acc.read_into(BASE, strided)
        with pytest.raises(TypeError):
            acc.write(BASE, strided)
    assert acc.read(BASE, 4) == b"\x77" * 4
