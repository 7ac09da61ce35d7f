"""virtio-blk through a real server, driven by the Python virtio driver."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import wait_until
from test_virtio import WAIT, Rig, fired

from vfio_user_devices.virtio_blk import (
    F_DISCARD,
    F_MQ,
    F_RO,
    F_WRITE_ZEROES,
    MAX_QUEUES,
    VirtioBlk,
)
from vfio_user_server.cli import make_device
from vfio_user_server.virtio import Status
from vfio_user_server.virtio.spec import CommonCfg

SIZE = 4 << 20
OK, IOERR, UNSUPP = 0, 1, 2


def hdr(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


class Blk(Rig):
    dev: VirtioBlk

    def read(self, sector: int, length: int, q: int = 0, indirect: bool = False
             ) -> tuple[int, bytes]:
        done = self.d.request(q, [hdr(0, sector)], [length, 1], indirect=indirect)
        # on success the data and the status byte were written, else the status byte only
        assert done.written == (length + 1 if done.data[-1] == OK else 1)
        return done.data[-1], done.data[:-1]

    def write(self, sector: int, data: bytes, q: int = 0, indirect: bool = False) -> int:
        done = self.d.request(q, [hdr(1, sector), data], [1], indirect=indirect)
        assert done.written == 1
        return done.data[0]

    def simple(self, kind: int, payload: bytes = b"", q: int = 0) -> int:
        done = self.d.request(q, [hdr(kind), payload] if payload else [hdr(kind)], [1])
        return done.data[0]


@pytest.fixture
def image(sock_dir: Path) -> Path:
    p = sock_dir / "disk.img"
    with open(p, "wb") as f:
        f.truncate(SIZE)
    return p


def make(sock_dir: Path, image: Path, *, fd_backed: bool = True, sealed: bool = False,
         **kw: object) -> Blk:
    dev = VirtioBlk(image, **kw)  # type: ignore[arg-type]
    r = Blk(sock_dir / "blk.sock", dev, fd_backed=fd_backed, sealed=sealed)
    return r


@pytest.fixture(params=["sealed", "memfd", "message", "sealed-packed", "memfd-packed",
                        "message-packed", "sealed-worker"])
def blk(request: pytest.FixtureRequest, sock_dir: Path, image: Path) -> Iterator[Blk]:
    r = make(sock_dir, image, fd_backed=not request.param.startswith("message"),
             sealed=request.param.startswith("sealed"), queues=2,
             packed=request.param.endswith("packed"),
             inline=not request.param.endswith("worker"))
    r.ready(2)
    yield r
    r.close()
    r.dev.close()


def host(image: Path, offset: int, length: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_config_and_features(blk: Blk) -> None:
    d = blk.d
    assert d.config_read(0, 8) == SIZE // 512  # capacity
    assert d.config_read(0x0C, 4) == 254  # seg_max
    assert d.config_read(0x14, 4) == 512  # blk_size
    assert d.config_read(0x22, 2) == 2  # num_queues
    offered = d.device_features()
    assert offered & (1 << F_MQ | 1 << F_DISCARD | 1 << F_WRITE_ZEROES)
    assert not offered & 1 << F_RO
    assert blk.c.config_read(2, 2) == 0x1042
    assert blk.c.config_read(0x09, 3) == 0x018000


@pytest.mark.parametrize("indirect", [False, True])
def test_write_then_read(blk: Blk, image: Path, indirect: bool) -> None:
    data = os.urandom(8192 + 512)
    assert blk.write(7, data, indirect=indirect) == OK
    assert host(image, 7 * 512, len(data)) == data
    status, got = blk.read(7, len(data), q=1, indirect=indirect)
    assert status == OK and got == data
    # host-side changes are seen by reads
    with open(image, "r+b") as f:
        f.seek(100 * 512)
        f.write(b"\x5a" * 512)
    assert blk.read(100, 512) == (OK, b"\x5a" * 512)


def test_scattered_buffers(blk: Blk, image: Path) -> None:
    data = os.urandom(4096)
    parts = [data[:100], data[100:1000], data[1000:]]
    done = blk.d.request(0, [hdr(1, 3), *parts], [1], indirect=True)
    assert done.data == bytes([OK])
    assert host(image, 3 * 512, 4096) == data
    done = blk.d.request(0, [hdr(0, 3)], [1000, 3000, 96, 1])
    assert done.written == 4097 and done.data[:-1] == data and done.data[-1] == OK


def test_errors(blk: Blk) -> None:
    assert blk.read(SIZE // 512 - 1, 1024)[0] == IOERR  # past the end
    assert blk.write(0, b"x" * 100) == IOERR  # not a multiple of 512
    assert blk.simple(99) == UNSUPP
    assert blk.dev.stats["error"] == 3
    assert not blk.d.status & Status.DEVICE_NEEDS_RESET


def test_flush_and_get_id(blk: Blk) -> None:
    assert blk.simple(4) == OK
    assert blk.dev.stats["flush"] == 1
    done = blk.d.request(0, [hdr(8)], [20, 1])
    assert done.data[-1] == OK
    assert done.data[:20].rstrip(b"\0").decode() == blk.dev.serial


def test_discard_and_write_zeroes(blk: Blk, image: Path) -> None:
    assert blk.write(0, b"\xff" * 8192) == OK
    seg = struct.pack("<QII", 2, 4, 0)
    assert blk.simple(13, seg) == OK  # write zeroes, sectors 2..5
    assert host(image, 0, 8192) == b"\xff" * 1024 + bytes(2048) + b"\xff" * 5120
    assert blk.simple(13, struct.pack("<QII", 8, 2, 1)) == OK  # may unmap
    assert host(image, 8 * 512, 1024) == bytes(1024)
    assert blk.simple(11, struct.pack("<QII", 0, 16, 0)) == OK  # discard
    assert blk.simple(11, struct.pack("<QII", 0, 8, 1)) == UNSUPP  # unmap flag on discard
    assert blk.simple(11, struct.pack("<QII", SIZE // 512, 1, 0)) == IOERR  # outside
    assert blk.simple(11, b"\0" * 15) == IOERR  # not whole segments


def test_request_without_status_byte_needs_reset(blk: Blk) -> None:
    blk.d.add(0, [hdr(0)], [])
    wait_until(lambda: bool(blk.d.status & Status.DEVICE_NEEDS_RESET), WAIT, "NEEDS_RESET")


def test_unmapped_data_buffer_needs_reset(blk: Blk) -> None:
    q = blk.d.queues[0]
    start = q.avail_idx
    head = blk.d.add(0, [hdr(0)], [512, 1], notify=False)
    # point the data descriptor (the chain's second) outside guest memory; the address is
    # the first field of both layouts
    slot = (start + 1) % q.size if q.packed else q.inflight[head][0][1]
    blk.c.write_memory(q.desc + 16 * slot, struct.pack("<Q", 1 << 40))
    blk.d.kick(q)
    wait_until(lambda: bool(blk.d.status & Status.DEVICE_NEEDS_RESET), WAIT, "NEEDS_RESET")


def test_read_only(sock_dir: Path, image: Path) -> None:
    with open(image, "r+b") as f:
        f.write(b"\x11" * 512)
    os.chmod(image, 0o444)
    r = make(sock_dir, image, read_only=True, queues=1)
    try:
        fds = r.msix()
        r.ready(1)
        assert r.d.device_features() & 1 << F_RO
        assert not r.d.device_features() & (1 << F_DISCARD | 1 << F_WRITE_ZEROES)
        assert r.write(0, b"\x22" * 512) == IOERR
        assert r.read(0, 512) == (OK, b"\x11" * 512)
        assert r.simple(13, struct.pack("<QII", 0, 1, 0)) == UNSUPP
        assert r.simple(4) == OK
        assert host(image, 0, 512) == b"\x11" * 512
        assert fired(fds[1]) >= 1
    finally:
        r.close()
        r.dev.close()


def test_multiqueue(sock_dir: Path, image: Path) -> None:
    r = make(sock_dir, image, queues=MAX_QUEUES)
    try:
        fds = r.msix()
        r.ready(MAX_QUEUES)
        assert r.d.common_read(CommonCfg.NUM_QUEUES, 2) == MAX_QUEUES
        for q in range(MAX_QUEUES):
            assert r.write(q * 8, bytes([q]) * 512, q=q) == OK
            assert fired(fds[q + 1]) >= 1
        for q in range(MAX_QUEUES):
            assert r.read(q * 8, 512, q=(q + 1) % MAX_QUEUES) == (OK, bytes([q]) * 512)
    finally:
        r.close()
        r.dev.close()


def test_memory_backed_by_name() -> None:
    dev = make_device("virtio-blk", ["--size", "1M", "--queues", "3", "--read-only",
                                     "--packed"])
    assert isinstance(dev, VirtioBlk)
    try:
        assert dev.sectors == 2048 and dev.num_queues == 3 and dev.read_only
        assert dev.ring_packed
        assert dev.device_id == 0x1042
        assert "virtio_blk" in dev.guest_modules
    finally:
        dev.close()


def test_bad_queue_count() -> None:
    from vfio_user_server.errors import DeviceDefinitionError

    with pytest.raises(DeviceDefinitionError):
        VirtioBlk(size=1 << 20, queues=MAX_QUEUES + 1)


@pytest.mark.parametrize("fd_backed", [True, False])
@pytest.mark.parametrize("inline", [True, False])
def test_inline_option(sock_dir: Path, image: Path, fd_backed: bool, inline: bool) -> None:
    """``--inline on`` (the default): reads and writes in fd-backed RAM run in the notify
    write, on the loop thread; a flush, and every request in RAM without fds, go to the worker.
    ``--inline off``: every request goes to the worker."""
    served = make_device("virtio-blk", ["--image", str(image)]
                         + ([] if inline else ["--inline", "off"]))
    assert isinstance(served, VirtioBlk) and served.inline is inline
    served.close()
    r = make(sock_dir, image, fd_backed=fd_backed, sealed=fd_backed, queues=1, inline=inline)
    where: dict[str, list[bool]] = {"readv": [], "writev": [], "read": [], "write": [],
                                    "sync": []}
    backend = r.dev.backend

    def recorder(name: str) -> Callable[..., object]:
        orig = getattr(backend, name)

        def record(*args: object) -> object:
            ctx = r.dev._ctx
            where[name].append(ctx is not None and ctx.in_loop_thread())
            return orig(*args)
        return record

    for name in where:
        setattr(backend, name, recorder(name))
    try:
        assert r.dev.inline is inline
        r.ready(1)
        data = os.urandom(4096)
        assert r.write(8, data) == OK
        assert r.read(8, 4096) == (OK, data)
        assert r.simple(4) == OK  # flush
        assert host(image, 8 * 512, 4096) == data
        on_loop = inline and fd_backed
        moved = where["readv"] + where["writev"] + where["read"] + where["write"]
        assert len(moved) == 2 and all(t is on_loop for t in moved), where
        assert where["sync"] == [False]  # never on the loop thread
    finally:
        r.close()
        r.dev.close()


@pytest.mark.parametrize("fd_backed", [True, False])
@pytest.mark.parametrize("shim", [True, False], ids=["c-shim", "python"])
def test_polled_notify_option(sock_dir: Path, image: Path, fd_backed: bool, shim: bool,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``--polled-notify``: the notify page is mapped (sparse mmap, with its fd) and polled; a
    notification stored there (here by a trapped write into the same memory) kicks the
    queue, once per store of the same queue index."""
    from vfio_user_server.protocol.constants import RegionInfoFlag
    from vfio_user_server.virtio.notify_poll import SENTINEL

    if not shim:
        monkeypatch.setenv("PYVFIO_NO_SHIM", "1")
    else:  # CI runs the unit tests again with PYVFIO_NO_SHIM=1: this case wants the shim
        monkeypatch.delenv("PYVFIO_NO_SHIM", raising=False)
    served = make_device("virtio-blk", ["--image", str(image), "--polled-notify"])
    assert isinstance(served, VirtioBlk) and served.polled_notify
    served.close()
    r = make(sock_dir, image, fd_backed=fd_backed, sealed=fd_backed, queues=2,
             polled_notify=True)
    try:
        poller = r.dev._notify_poller
        assert poller is not None and poller.watcher.waiter.name == ("c-shim" if shim
                                                                     else "python")
        desc = r.c.get_region_info(4)
        assert desc.fd is not None and desc.sparse == [(0x3000, 0x1000)]
        assert desc.flags & RegionInfoFlag.MMAP
        os.close(desc.fd)
        r.ready(2)
        for i in range(20):  # the same queue index stored again and again
            data = os.urandom(4096)
            assert r.write(8 + 8 * i, data, q=i % 2) == OK
            assert r.read(8 + 8 * i, 4096, q=i % 2) == (OK, data)
            assert host(image, (8 + 8 * i) * 512, 4096) == data
        assert poller.watcher.changes >= 2
        r.c.reset()
        assert r.dev.mapped(4).u32(0x3000) == SENTINEL
    finally:
        r.close()
        r.dev.close()
