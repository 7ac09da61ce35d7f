"""NVMe Flush and Force Unit Access are durable on the host, and a Flush covers earlier writes.

The controller is driven by the Python NVMe driver of ``test_nvme``; its backing file's sync is
observed through :class:`FileBackend`'s ``sync`` hook (or ``os.fdatasync`` itself), and each
sync records what the file held when it ran, so a test shows that the data it must make
durable was already written.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import WAIT
from test_nvme import DATA, PAGE, RAM, Driver, Rig

from vfio_user_devices.nvme import BLOCK_SIZE, FileBackend, NvmeController
from vfio_user_devices.nvme_spec import AdminOpcode, Feature, IoOpcode
from vfio_user_server.testing import serve

NSID_ALL = 0xFFFFFFFF


class SyncRecorder:
    """A backend sync that records the file's first ``span`` bytes at each call and can be
    held (blocked) until the test releases it."""

    def __init__(self, span: int = 64 * BLOCK_SIZE) -> None:
        self.span = span
        self.seen: list[bytes] = []
        self.lock = threading.Condition()
        self.hold = False
        self.entered = 0

    def __call__(self, fd: int) -> None:
        with self.lock:
            self.entered += 1
            self.lock.notify_all()
            if not self.lock.wait_for(lambda: not self.hold, WAIT):
                raise OSError("test never released the sync")
        self.seen.append(os.pread(fd, self.span, 0))
        os.fdatasync(fd)

    def release(self) -> None:
        with self.lock:
            self.hold = False
            self.lock.notify_all()

    def wait_entered(self, count: int) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: self.entered >= count, WAIT), "no sync started"


@pytest.fixture(params=["memfd", "message"])
def rig(request: pytest.FixtureRequest, image: Path) -> Iterator[tuple[Rig, SyncRecorder]]:
    rec = SyncRecorder()
    dev = NvmeController(backend=FileBackend.open(image, sync=rec))
    try:
        with serve(dev, memory=RAM, fd_backed=request.param == "memfd") as s:
            r = Rig(s)
            r.d.enable()
            r.d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 3 | 3 << 16))
            r.d.create_queues(1)
            r.d.create_queues(2, depth=16)
            yield r, rec
    finally:
        rec.release()
        dev.close()


def write(d: Driver, qid: int, lba: int, data: bytes, fua: bool = False) -> None:
    d.c.write_memory(DATA, data)
    assert d.rw(qid, IoOpcode.WRITE, lba, len(data) // BLOCK_SIZE, fua=fua).status == 0


def test_flush_fua_and_disabled_write_cache_sync_after_the_data(
        rig: tuple[Rig, SyncRecorder]) -> None:
    r, rec = rig
    d, dev = r.d, r.dev
    a, b, c, z = (os.urandom(8 * BLOCK_SIZE) for _ in range(4))
    write(d, 1, 0, a)  # plain write, volatile write cache on: no sync
    assert dev.backend.syncs == 0
    write(d, 1, 8, b, fua=True)  # FUA: synced before its completion, the data already there
    assert dev.backend.syncs == 1
    assert rec.seen[-1][:16 * BLOCK_SIZE] == a + b
    d.ok(1, IoOpcode.FLUSH, nsid=1)
    d.ok(2, IoOpcode.FLUSH, nsid=NSID_ALL)
    assert dev.backend.syncs == 3
    # Write Zeroes with FUA syncs too
    d.ok(1, IoOpcode.WRITE_ZEROES, nsid=1, cdw=(0, 0, (1 << 30) | 3))
    assert dev.backend.syncs == 4
    assert rec.seen[-1][:4 * BLOCK_SIZE] == bytes(4 * BLOCK_SIZE)
    # the host turns the volatile write cache off: every write is durable when it completes
    d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.VOLATILE_WRITE_CACHE, 0))
    write(d, 2, 16, c)
    assert dev.backend.syncs == 5
    assert rec.seen[-1][16 * BLOCK_SIZE:24 * BLOCK_SIZE] == c
    d.ok(1, IoOpcode.WRITE_ZEROES, nsid=1, cdw=(24, 0, 7))
    assert dev.backend.syncs == 6
    # and on again: plain writes need no sync, a flush does
    d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.VOLATILE_WRITE_CACHE, 1))
    write(d, 1, 24, z)
    assert dev.backend.syncs == 6
    d.ok(2, IoOpcode.FLUSH, nsid=1)
    assert dev.backend.syncs == 7
    assert rec.seen[-1][24 * BLOCK_SIZE:32 * BLOCK_SIZE] == z
    assert dev.stats["flushes"] == 3


def test_flush_completes_only_after_the_sync_of_earlier_writes(
        rig: tuple[Rig, SyncRecorder]) -> None:
    """Writes completed on SQ 1 (inline on the doorbell with fd-backed memory), then a flush
    on SQ 2: the sync runs with every completed write in the file, and the flush's completion
    is not posted while the sync is still running."""
    r, rec = rig
    d, dev = r.d, r.dev
    blocks = [os.urandom(BLOCK_SIZE) for _ in range(8)]
    for i, data in enumerate(blocks):
        d.c.write_memory(DATA + i * PAGE, data)
        d.submit(1, IoOpcode.WRITE, nsid=1, prp1=DATA + i * PAGE, cdw=(i, 0, 0), ring=False)
    d.ring_sq(1)
    done = [d.poll(1) for _ in blocks]
    d.ring_cq(1)
    assert all(e.status == 0 for e in done)
    with rec.lock:
        rec.hold = True
    cid = d.submit(2, IoOpcode.FLUSH, nsid=1)
    rec.wait_entered(1)
    # The sync is running (held): the flush has not completed.
    assert not d.pending(2)
    rec.release()
    e = d.poll(2)
    d.ring_cq(2)
    assert (e.cid, e.status) == (cid, 0)
    assert rec.seen == [b"".join(blocks) + bytes(rec.span - 8 * BLOCK_SIZE)]
    assert dev.backend.syncs == 1


def test_a_failed_sync_fails_the_flush(rig: tuple[Rig, SyncRecorder],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    r, _rec = rig

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(r.dev.backend, "_sync", broken)
    e = r.d.cmd(1, IoOpcode.FLUSH, nsid=1)
    assert e.status != 0
    write_fua = r.d.rw(1, IoOpcode.WRITE, 0, 1, fua=True)
    assert write_fua.status != 0


def test_default_sync_is_fdatasync_and_runs_when_the_client_leaves(
        image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a hook the backend calls ``os.fdatasync`` on its file; a client that leaves
    (QEMU killed, or the server stopping) gets a last sync after the worker stopped."""
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)  # what nvme_backend calls
    dev = NvmeController(image)
    try:
        with serve(dev, memory=RAM) as s:
            r = Rig(s)
            r.d.enable()
            r.d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 0))
            r.d.create_queues(1)
            write(r.d, 1, 0, os.urandom(BLOCK_SIZE))
            assert calls == []
            r.d.ok(1, IoOpcode.FLUSH, nsid=1)
            assert calls == [dev.backend.fd]
            write(r.d, 1, 1, os.urandom(BLOCK_SIZE))
        # serve() closed the client and waited for the server to see it go
        assert calls == [dev.backend.fd] * 2
    finally:
        dev.close()
    assert len(calls) == 3  # and close() syncs before closing the file
