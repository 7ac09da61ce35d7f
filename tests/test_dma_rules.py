"""DMA rules through a real server: the advertised map limit is the enforced one, fds of the
wrong kind are refused and closed, and the device reaches guest memory only inside mapped
ranges and with each map's permissions."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    WAIT,
    ClientFactory,
    ServerFactory,
    device_dma,
    open_fds,
    wait_until,
)

from vfio_user_server.client import Client, ClientError
from vfio_user_server.dma import DmaProt
from vfio_user_server.protocol.session import ServerCapabilities
from vfio_user_server.sample import (
    BUFFER_OFFSET,
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    STAT_DONE,
    STAT_ERROR,
)
from vfio_user_server.server import Server

PAGE = 0x1000
RO, WO, RW = DmaProt.READ, DmaProt.WRITE, DmaProt.READ | DmaProt.WRITE


def expect_error(err: int, fn: object, *args: object, **kwargs: object) -> None:
    assert callable(fn)
    with pytest.raises(ClientError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value


def sealed_memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def closed_since(before: set[int]) -> Callable[[], bool]:
    return lambda: open_fds() <= before


# --- max_dma_maps: advertised == enforced -----------------------------------------------------


def test_max_dma_maps_advertised_is_enforced(
    make_server: ServerFactory, make_client: ClientFactory
) -> None:
    server = make_server(caps=ServerCapabilities(max_dma_maps=4))
    client = make_client(server)
    limit = client.negotiate()["max_dma_maps"]
    assert limit == 4
    client.get_device_info()
    table = server.wait_for_client(WAIT).table
    fds = [sealed_memfd(PAGE) for _ in range(limit + 1)]
    try:
        for i in range(limit):
            client.dma_map(i * PAGE, PAGE, fd=fds[i])
        before = open_fds()
        expect_error(errno.ENOSPC, client.dma_map, limit * PAGE, PAGE, fd=fds[limit])
        expect_error(errno.ENOSPC, client.dma_map, limit * PAGE, PAGE)  # without an fd too
        wait_until(lambda: open_fds() <= before, what="refused DMA fd closed")
        assert len(table) == limit
        assert table.mapped_file_count() == limit  # never more files (and fds) than maps
        client.dma_unmap(0, PAGE)
        client.dma_map(limit * PAGE, PAGE, fd=fds[limit])  # room again
        assert len(table) == limit
    finally:
        for fd in fds:
            os.close(fd)


# --- fds of the wrong kind --------------------------------------------------------------------


def test_dma_map_with_a_wrong_kind_of_fd(
    client: Client, server: Server, tmp_path: Path
) -> None:
    table = server.wait_for_client(WAIT).table
    r, w = os.pipe()
    a, b = socket.socketpair()
    kinds = {
        "pipe": r,
        "socket": a.fileno(),
        "directory": os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),
        "character device": os.open("/dev/zero", os.O_RDWR),
        "eventfd": os.eventfd(0),
    }
    try:
        for kind, fd in kinds.items():
            before = open_fds()
            with pytest.raises(ClientError) as info:
                client.dma_map(0x10000, PAGE, fd=fd)
            assert info.value.errno == errno.EINVAL, kind
            wait_until(closed_since(before), what=f"refused {kind} fd closed")
            assert table.maps() == [], kind
        # the client is still served
        ram = sealed_memfd(PAGE)
        client.dma_map(0x10000, PAGE, fd=ram)
        os.close(ram)
        assert [m.iova for m in table.maps()] == [0x10000]
    finally:
        for fd in (r, w, kinds["directory"], kinds["character device"], kinds["eventfd"]):
            os.close(fd)
        a.close()
        b.close()


def test_map_bigger_than_its_file_allocates_nothing(client: Client, server: Server) -> None:
    """A huge DMA_MAP size on a small file is checked against the file before anything is
    sized by it: the map falls back to message DMA (QEMU serves it), nothing is mmapped."""
    table = server.wait_for_client(WAIT).table
    fd = sealed_memfd(PAGE)
    try:
        client.dma_map(0x100000, 1 << 40, fd=fd)
    finally:
        os.close(fd)
    [m] = table.maps()
    assert (m.size, m.direct) == (1 << 40, False)
    assert table.mapped_file_count() == 0


# --- DMA only inside mapped ranges, with their permissions -----------------------------------


@pytest.fixture
def mapped(client: Client, server: Server) -> Client:
    """Three fd-backed maps: RW at 0x10000, RO at 0x20000, WO at 0x30000 (filled with 0xAA,
    0xBB, 0xCC), with a hole at 0x11000..0x20000."""
    for iova, prot, byte in ((0x10000, RW, 0xAA), (0x20000, RO, 0xBB), (0x30000, WO, 0xCC)):
        fd = sealed_memfd(PAGE, bytes([byte]) * PAGE)
        try:
            client.dma_map(iova, PAGE, int(prot), fd=fd)
        finally:
            os.close(fd)
    assert len(server.wait_for_client(WAIT).table) == 3
    return client


def guest(server: Server, iova: int, n: int) -> bytes:
    """Guest memory as the server sees it (fd-backed: no message DMA, any thread)."""
    return server.wait_for_client(WAIT).dma.read(iova, n)


def device_buffer(c: Client, n: int) -> bytes:
    """The sample device's DMA buffer, read by the client through BAR0."""
    return b"".join(c.bar_read(0, BUFFER_OFFSET + i, 1).to_bytes(1, "little") for i in range(n))


def test_device_dma_inside_a_read_write_map(mapped: Client, server: Server) -> None:
    assert device_dma(mapped, 0x10000, 16, DMA_TO_DEVICE) == STAT_DONE
    assert device_buffer(mapped, 16) == b"\xAA" * 16
    assert device_dma(mapped, 0x10FF0, 16, DMA_FROM_DEVICE) == STAT_DONE
    assert guest(server, 0x10FF0, 16) == b"\xAA" * 16


@pytest.mark.parametrize(("addr", "length"), [
    (0x0, 16),          # below every map
    (0x11000, 16),      # in the hole after the RW map
    (0x10FF8, 16),      # starts in the RW map, runs into the hole
    (0x1FFF8, 16),      # starts in the hole, runs into the RO map
    (0x31000, 16),      # after the last map
    ((1 << 64) - 8, 16),  # wraps around the IOVA space
])
def test_device_dma_outside_mapped_ranges_fails(
    mapped: Client, server: Server, addr: int, length: int
) -> None:
    assert device_dma(mapped, addr, length, DMA_TO_DEVICE) == STAT_ERROR
    assert device_dma(mapped, addr, length, DMA_FROM_DEVICE) == STAT_ERROR
    # nothing around was touched
    assert guest(server, 0x10000, PAGE) == b"\xAA" * PAGE
    assert guest(server, 0x20000, PAGE) == b"\xBB" * PAGE
    assert device_dma(mapped, 0x10000, 16, DMA_TO_DEVICE) == STAT_DONE  # still serving


def test_read_only_map_refuses_device_writes(mapped: Client, server: Server) -> None:
    assert device_dma(mapped, 0x10000, 16, DMA_TO_DEVICE) == STAT_DONE  # buffer = 0xAA...
    assert device_dma(mapped, 0x20000, 16, DMA_FROM_DEVICE) == STAT_ERROR
    assert device_dma(mapped, 0x1FFF0 + 0x10, 16, DMA_FROM_DEVICE) == STAT_ERROR
    assert guest(server, 0x20000, PAGE) == b"\xBB" * PAGE
    assert device_dma(mapped, 0x20000, 16, DMA_TO_DEVICE) == STAT_DONE  # reads are fine
    assert device_buffer(mapped, 16) == b"\xBB" * 16


def test_write_only_map_refuses_device_reads(mapped: Client, server: Server) -> None:
    assert device_dma(mapped, 0x30000, 16, DMA_TO_DEVICE) == STAT_ERROR
    assert device_dma(mapped, 0x10000, 16, DMA_TO_DEVICE) == STAT_DONE
    assert device_dma(mapped, 0x30000, 16, DMA_FROM_DEVICE) == STAT_DONE  # writes are fine
    m = server.wait_for_client(WAIT).table.find(0x30000)
    assert m is not None and m.writable and not m.readable


def test_unmapped_range_is_gone_for_the_device(mapped: Client, server: Server) -> None:
    mapped.dma_unmap(0x10000, PAGE)
    assert device_dma(mapped, 0x10000, 16, DMA_TO_DEVICE) == STAT_ERROR
    assert device_dma(mapped, 0x10000, 16, DMA_FROM_DEVICE) == STAT_ERROR
    assert server.wait_for_client(WAIT).table.find(0x10000) is None
