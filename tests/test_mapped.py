"""Mapped BAR areas (sparse mmap): the declaration, REGION_INFO with the capability and the fd,
trapped accesses into the mapped part, and the memory poller with and without the C shim."""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfio_user_devices.edu import EDU_ID, SCRATCH_OFFSET, SCRATCH_SIZE, Edu
from vfio_user_server.errors import DeviceDefinitionError
from vfio_user_server.mapped import AreaWatcher, MappedBar, PolledArea
from vfio_user_server.mempoll import (
    MemoryWaiter,
    PythonWaiter,
    ShimWaiter,
    WaitResult,
    default_waiter,
    poll_shim_available,
)
from vfio_user_server.pci import Bar
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command, RegionInfoFlag
from vfio_user_server.protocol.structs import RegionInfo
from vfio_user_server.testing import Served, serve

WAIT = 30.0


# --- declaration ------------------------------------------------------------------------------
@pytest.mark.parametrize("areas", [((0x800, 0x1000),), ((0x1000, 0x800),), ((0, 0x3000),),
                                   ((0, 0x1000), (0, 0x1000)), ((0x1000, 0),)])
def test_bad_mapped_areas_are_refused(areas: tuple[tuple[int, int], ...]) -> None:
    with pytest.raises(DeviceDefinitionError):
        Bar(0x2000, mapped=areas)


def test_io_bar_cannot_be_mapped() -> None:
    with pytest.raises(DeviceDefinitionError):
        Bar(0x1000, kind="io", mapped=((0, 0x1000),))


def test_mapped_area_over_msix_is_refused() -> None:
    class Bad(Edu):
        msix_vectors = 2
        msix_bar = 0
        msix_table_offset = SCRATCH_OFFSET

    with pytest.raises(DeviceDefinitionError, match="MSI-X"):
        Bad(mapped_scratch=True)


def test_pieces_split_an_access_at_area_edges() -> None:
    bar = MappedBar(0, 0x4000, ((0x1000, 0x1000),))
    try:
        assert bar.pieces(0xFFC, 8) == [(0xFFC, 4, False), (0x1000, 4, True)]
        assert bar.pieces(0x1FFC, 8) == [(0x1FFC, 4, True), (0x2000, 4, False)]
        assert bar.pieces(0, 4) == [(0, 4, False)]
        assert bar.contains(0x1000, 0x1000) and not bar.contains(0xFFF, 2)
    finally:
        bar.close()


# --- REGION_INFO and trapped accesses --------------------------------------------------------
@pytest.fixture
def served() -> Iterator[Served[Edu]]:
    with serve(Edu(mapped_scratch=True), memory=1 << 20, enable=True) as s:
        yield s
    s.device.mapped(0).close()  # not left to the cycle collector (fd baselines)


def test_region_info_announces_the_area_and_sends_the_fd(served: Served[Edu]) -> None:
    desc = served.client.get_region_info(0)
    assert desc.flags & RegionInfoFlag.MMAP and desc.flags & RegionInfoFlag.CAPS
    assert desc.sparse == [(SCRATCH_OFFSET, SCRATCH_SIZE)]
    assert desc.fd is not None
    try:
        # the client maps the area of the fd at the region's offset + the area's offset
        mem = mmap.mmap(desc.fd, SCRATCH_SIZE, offset=desc.offset + SCRATCH_OFFSET)
        try:
            mem[0:4] = (0x12345678).to_bytes(4, "little")
            assert served.device.mapped(0).u32(SCRATCH_OFFSET) == 0x12345678
            served.device.mapped(0).set_u32(SCRATCH_OFFSET + 8, 0xCAFE)
            assert int.from_bytes(mem[8:12], "little") == 0xCAFE
        finally:
            mem.close()
    finally:
        os.close(desc.fd)
    # BARs without mapped areas and the config space carry neither
    assert not served.client.get_region_info(7).flags & RegionInfoFlag.MMAP


def test_the_client_cannot_resize_the_mapped_memory(served: Served[Edu]) -> None:
    """The fd the client gets is the server's own memory: a client that shrank it would make
    the server's next access to the area (a trapped access, the poller) a SIGBUS."""
    desc = served.client.get_region_info(0)
    assert desc.fd is not None
    try:
        for size in (0, SCRATCH_OFFSET, desc.size + 4096):
            try:
                os.ftruncate(desc.fd, size)
            except PermissionError:
                continue
            os.ftruncate(desc.fd, desc.size)  # put it back before the server touches it
            pytest.fail(f"the client resized the mapped BAR's memory to {size}")
        with pytest.raises(PermissionError):
            fcntl.fcntl(desc.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)  # nor seal it
    finally:
        os.close(desc.fd)
    served.device.mapped(0).set_u32(SCRATCH_OFFSET, 7)
    assert served.client.bar_read(0, SCRATCH_OFFSET, 4) == 7


def test_short_argsz_gets_the_bare_info_without_the_fd(served: Served[Edu]) -> None:
    reply = served.client.request(Command.DEVICE_GET_REGION_INFO,
                                  RegionInfo(RegionInfo.SIZE, 0, 0, 0, 0, 0).pack())
    assert reply is not None and not reply.fds
    info, sparse, _ = codec.decode_region_info(reply.payload)
    assert info.argsz == RegionInfo.SIZE + 8 + 8 + 16 and sparse is None
    assert info.flags & RegionInfoFlag.MMAP and not info.flags & RegionInfoFlag.CAPS


def test_trapped_access_into_the_mapped_part_uses_the_same_memory(served: Served[Edu]) -> None:
    c, mem = served.client, served.device.mapped(0)
    c.bar_write(0, SCRATCH_OFFSET + 4, 4, 0xA5A5A5A5)
    assert mem.u32(SCRATCH_OFFSET + 4) == 0xA5A5A5A5
    mem.set_u64(SCRATCH_OFFSET + 16, 0x1122334455667788)
    assert c.bar_read(0, SCRATCH_OFFSET + 16, 8) == 0x1122334455667788
    # the trapped registers are still the device's
    assert c.bar_read(0, 0, 4) == EDU_ID
    c.bar_write(0, 4, 4, 0x0F0F0F0F)
    assert c.bar_read(0, 4, 4) == 0xF0F0F0F0
    # one access across the area's edge: trapped bytes from bar_read, mapped from memory
    mem.set_u32(SCRATCH_OFFSET + SCRATCH_SIZE - 4, 0xDEADBEEF)
    both = c.region_read(0, SCRATCH_OFFSET + SCRATCH_SIZE - 4, 8)
    assert both[:4] == (0xDEADBEEF).to_bytes(4, "little")
    assert both[4:] == b"\xff" * 4  # edu reads all-ones where it has no register
    c.region_write(0, SCRATCH_OFFSET - 4, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert mem.read(SCRATCH_OFFSET, 4) == b"\x05\x06\x07\x08"


def test_reset_clears_the_scratch_page(served: Served[Edu]) -> None:
    served.device.mapped(0).set_u32(SCRATCH_OFFSET, 7)
    served.client.reset()
    assert served.device.mapped(0).u32(SCRATCH_OFFSET) == 0


def test_device_without_mapped_areas_has_no_mmap() -> None:
    with serve(Edu(), memory=1 << 20) as s:
        desc = s.client.get_region_info(0)
        assert not desc.flags & RegionInfoFlag.MMAP and desc.fd is None
        with pytest.raises(DeviceDefinitionError):
            s.device.mapped(0)


# --- the poller ------------------------------------------------------------------------------
@pytest.fixture(params=["c-shim", "python"])
def waiter(request: pytest.FixtureRequest) -> MemoryWaiter:
    if request.param == "python":
        return PythonWaiter()
    assert poll_shim_available(), "the polling shim is not built (pip install -e .)"
    from vfio_user_server import _poll_shim  # type: ignore[attr-defined]

    return ShimWaiter(_poll_shim)


@pytest.fixture
def area() -> Iterator[memoryview]:
    mem = mmap.mmap(-1, 4096)
    view = memoryview(mem)
    yield view
    view.release()
    mem.close()


def _later(fn: object) -> threading.Thread:
    assert callable(fn)
    t = threading.Thread(target=fn)
    t.start()
    return t


def test_wait_times_out_unchanged(waiter: MemoryWaiter, area: memoryview) -> None:
    assert waiter.wait_u32(area, 0, 0, 0.001) is None
    assert waiter.wait_change(area, 0, bytes(16), 0.0) is WaitResult.TIMEOUT


def test_wait_sees_a_change_already_there(waiter: MemoryWaiter, area: memoryview) -> None:
    area[4:8] = b"\x01\0\0\0"
    assert waiter.wait_u32(area, 4, 0, None) == 1
    area[8:16] = (1 << 40).to_bytes(8, "little")
    assert waiter.wait_u64(area, 8, 0, None) == 1 << 40


def test_wait_sees_a_change_from_another_thread(waiter: MemoryWaiter, area: memoryview) -> None:
    def store() -> None:
        area[12:16] = (0xABCD).to_bytes(4, "little")

    t = _later(store)
    assert waiter.wait_u32(area, 12, 0, WAIT) == 0xABCD
    t.join()


def test_wait_on_unaligned_bytes(waiter: MemoryWaiter, area: memoryview) -> None:
    t = _later(lambda: area.__setitem__(5, 9))
    assert waiter.wait_change(area, 3, bytes(3), WAIT) is WaitResult.CHANGED
    t.join()


def test_stop_ends_a_wait_and_restart_clears_it(waiter: MemoryWaiter, area: memoryview) -> None:
    t = _later(waiter.stop)
    assert waiter.wait_change(area, 0, bytes(4), None) is WaitResult.STOPPED
    t.join()
    assert waiter.stopped
    assert waiter.wait_u32(area, 0, 0, None) is None  # stopped: returns at once
    waiter.restart()
    assert not waiter.stopped
    assert waiter.wait_change(area, 0, bytes(4), 0.0) is WaitResult.TIMEOUT


def test_wait_outside_the_buffer_is_refused(waiter: MemoryWaiter, area: memoryview) -> None:
    with pytest.raises(ValueError):
        waiter.wait_u32(area, 4094, 0, 0)
    with pytest.raises(ValueError):
        waiter.wait_change(area, 0, b"", 0)


def test_no_shim_env_selects_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVFIO_NO_SHIM", "1")
    assert default_waiter().name == "python"
    monkeypatch.setenv("PYVFIO_NO_SHIM", "0")
    assert default_waiter().name == ("c-shim" if poll_shim_available() else "python")


def test_area_watcher_calls_back_and_honours_what_it_returns(waiter: MemoryWaiter) -> None:
    bar = MappedBar(0, 0x2000, ((0x1000, 0x1000),))
    seen: list[tuple[bytes, bytes]] = []
    called = threading.Semaphore(0)
    SENTINEL = b"\xff" * 4

    def on_change(before: bytes, after: bytes) -> bytes:
        seen.append((before, after))
        bar.write(0x1000, SENTINEL)  # like a notify cell: back to the sentinel
        called.release()
        return SENTINEL + after[4:]

    bar.write(0x1000, SENTINEL)
    watcher = AreaWatcher(bar, 0x1000, 8, on_change, name="test-watcher", waiter=waiter)
    watcher.start()
    try:
        bar.set_u32(0x1000, 3)
        assert called.acquire(timeout=WAIT)
        assert seen[0] == (SENTINEL + bytes(4), (3).to_bytes(4, "little") + bytes(4))
        bar.set_u32(0x1004, 5)
        assert called.acquire(timeout=WAIT)
        assert seen[1][1] == SENTINEL + (5).to_bytes(4, "little")
        assert watcher.changes == 2
    finally:
        watcher.stop()
        assert not watcher.running
        bar.close()
    with pytest.raises(ValueError):
        AreaWatcher(bar, 0, 8, on_change, name="outside")


def test_polled_area_owns_its_watcher_and_memory() -> None:
    class Counter(PolledArea):
        def __init__(self, mem: MappedBar) -> None:
            super().__init__(mem, 0x1000, 8, name="test-polled")
            self.calls = threading.Semaphore(0)

        def changed(self, before: bytes, after: bytes) -> None:
            self.calls.release()

    area = Counter(MappedBar(0, 0x2000, ((0x1000, 0x1000),)))
    for _ in range(2):  # a client comes, goes, and another comes
        area.start()
        assert area.watcher.running
        area.mem.set_u32(0x1004, area.mem.u32(0x1004) + 1)
        assert area.calls.acquire(timeout=WAIT)
        area.stop()
        assert not area.watcher.running
    area.start()
    area.close()
    assert not area.watcher.running
    with pytest.raises(ValueError):
        area.mem.u32(0x1000)  # released


def test_live_upgrade_of_a_device_with_mapped_areas_is_refused(tmp_path: Path) -> None:
    """The client keeps the old memfd mapped: handing the device to another process would
    leave the guest writing memory nobody reads. Refused, and the old server keeps serving."""
    import socket

    from vfio_user_server.client import Client
    from vfio_user_server.server import Server
    from vfio_user_server.upgrade import HandoverError, hand_over

    path = tmp_path / "edu.sock"
    server = Server(Edu(mapped_scratch=True), path, upgradable=True).start()
    c = Client.connect(path)
    try:
        c.negotiate()
        a, b = socket.socketpair()
        with a, b, pytest.raises(HandoverError, match="mapped BAR areas"):
            hand_over(server, a, timeout=WAIT)
        assert not server.handed_over
        assert c.bar_read(0, 0, 4) == EDU_ID
    finally:
        c.close()
        server.wait_for_disconnect(1, WAIT)
        server.close()
        server.device.mapped(0).close()  # type: ignore[attr-defined]
