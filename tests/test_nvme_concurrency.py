"""NVMe queues served concurrently: a read that waits for the disk holds up its own queue only.

The namespace is a file whose reads at one offset block until the test lets them go (and say
"would block" to the loop thread's no-wait read, as an uncached page does). The test driver of
test_nvme then checks that another queue's commands complete meanwhile, through the inline path
(sealed guest RAM) and through the workers (message DMA), and that two submission queues
sharing one small completion queue never overrun it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import WAIT
from test_nvme import DATA, RAM, Rig, cq_base, map_sealed_ram, sq_base

from vfio_user_devices.nvme import NvmeController
from vfio_user_devices.nvme_backend import LBA_SHIFT, FileBackend
from vfio_user_devices.nvme_spec import AdminOpcode, Feature, IoOpcode
from vfio_user_server.testing import serve

SLOW_LBA = 64
SLOW = SLOW_LBA << LBA_SHIFT


class SlowBackend(FileBackend):
    """Reads at :data:`SLOW` wait for :attr:`gate`."""

    gate: threading.Event
    entered: threading.Event

    def _wait(self, offset: int) -> None:
        if offset == SLOW:
            self.entered.set()
            assert self.gate.wait(WAIT)

    def readv(self, views: list[memoryview], offset: int) -> None:
        self._wait(offset)
        super().readv(views, offset)

    def read(self, offset: int, length: int) -> bytes:
        self._wait(offset)
        return super().read(offset, length)

    def readv_nowait(self, views: list[memoryview], offset: int) -> bool:
        if offset == SLOW:
            self.would_block += 1
            return False
        return super().readv_nowait(views, offset)


def slow_backend(image: Path) -> SlowBackend:
    backend = SlowBackend.open(image)
    assert isinstance(backend, SlowBackend)
    return backend


@pytest.fixture(params=["inline", "worker"])
def slow(request: pytest.FixtureRequest, image: Path) -> Iterator[Rig]:
    backend = slow_backend(image)
    backend.gate, backend.entered = threading.Event(), threading.Event()
    dev = NvmeController(backend=backend)
    try:
        inline = request.param == "inline"
        with serve(dev, memory=0 if inline else RAM, fd_backed=False) as s:
            if inline:
                map_sealed_ram(s.client)
            rig = Rig(s)
            rig.d.enable()
            rig.d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 3 | 3 << 16))
            rig.d.create_queues(1)
            rig.d.create_queues(2)
            yield rig
            backend.gate.set()
    finally:
        dev.close()


def backend_of(rig: Rig) -> SlowBackend:
    assert isinstance(rig.dev.backend, SlowBackend)
    return rig.dev.backend


def test_a_blocked_read_stalls_only_its_queue(slow: Rig, image: Path) -> None:
    d, c, backend = slow.d, slow.c, backend_of(slow)
    with open(image, "r+b") as f:
        f.seek(SLOW)
        f.write(b"S" * 4096)
        f.seek(0)
        f.write(b"F" * 4096)
    blocked = d.submit(1, IoOpcode.READ, nsid=1, prp1=DATA, cdw=(SLOW_LBA, 0, 7))
    assert backend.entered.wait(WAIT)  # a worker is in the read
    # queue 2 goes on: reads (inline where guest RAM allows), a flush and an admin command
    for _ in range(3):
        assert d.rw(2, IoOpcode.READ, 0, 8, buf=DATA + 0x10000).status == 0
        assert c.read_memory(DATA + 0x10000, 4096) == b"F" * 4096
        d.ok(2, IoOpcode.FLUSH, nsid=1)
    d.ok(0, AdminOpcode.KEEP_ALIVE)
    assert not d.pending(1)
    backend.gate.set()
    e = d.poll(1)
    d.ring_cq(1)
    assert (e.cid, e.status) == (blocked, 0)
    assert c.read_memory(DATA, 4096) == b"S" * 4096
    assert slow.dev.wait_idle(WAIT)
    assert slow.dev.stats["reads"] == 4


def test_inline_read_that_would_wait_goes_to_a_worker(image: Path) -> None:
    backend = slow_backend(image)
    backend.gate, backend.entered = threading.Event(), threading.Event()
    backend.gate.set()
    dev = NvmeController(backend=backend)
    try:
        with serve(dev, memory=0, fd_backed=False) as s:
            map_sealed_ram(s.client)
            rig = Rig(s)
            rig.d.enable()
            rig.d.create_queues(1)
            calls = []
            original = dev.datapath.process

            def counting(gen: int, qid: int, base: int, head: int, size: int, n: int) -> None:
                calls.append(qid)
                original(gen, qid, base, head, size, n)

            dev.datapath.process = counting  # type: ignore[method-assign]
            assert rig.d.rw(1, IoOpcode.READ, 0, 8).status == 0
            assert calls == []  # inline
            assert rig.d.rw(1, IoOpcode.READ, SLOW_LBA, 8).status == 0
            assert calls == [1] and backend.would_block == 1 and backend.entered.is_set()
    finally:
        dev.close()


def test_no_wait_reads_of_a_real_file_and_a_memfd(image: Path) -> None:
    f = FileBackend.open(image)
    m = FileBackend.memory(1 << 20)
    try:
        os.pwrite(f.fd, b"x" * 4096, 0)
        buf = bytearray(4096)
        with memoryview(buf) as v:
            if f.nowait:  # the page is cached: read without waiting
                assert f.readv_nowait([v], 0) and buf == b"x" * 4096
            os.pwrite(m.fd, b"y" * 4096, 0)
            assert m.readv_nowait([v], 0) and buf == b"y" * 4096  # a plain read if need be
            assert m.readv_nowait([v], 0)
    finally:
        f.close()
        m.close()


def test_two_sqs_sharing_a_small_cq_never_overrun_it(slow: Rig) -> None:
    d, backend = slow.d, backend_of(slow)
    depth = 4  # 3 entries usable
    d.c.write_memory(cq_base(3), bytes(depth * 16))
    d.ok(0, AdminOpcode.CREATE_CQ, prp1=cq_base(3), cdw=((depth - 1) << 16 | 3, 3 << 16 | 3))
    for qid in (3, 4):
        d.ok(0, AdminOpcode.CREATE_SQ, prp1=sq_base(qid),
             cdw=(15 << 16 | qid, 3 << 16 | 1))
        d.sq[qid] = (sq_base(qid), 16, 0)
    d.cq[3] = [cq_base(3), depth, 0, 1]
    blocked = d.submit(3, IoOpcode.READ, nsid=1, prp1=DATA, cdw=(SLOW_LBA, 0, 7))
    assert backend.entered.wait(WAIT)
    flushes = {d.submit(4, IoOpcode.FLUSH, nsid=1, ring=False) for _ in range(5)}
    d.ring_sq(4)
    seen: set[int] = set()
    while len(seen) < 5:  # room for two at a time: the blocked read keeps one
        e = d.poll(3)
        assert e.status == 0 and e.sqid == 4
        seen.add(e.cid)
        d.ring_cq(3)
    assert seen == flushes
    backend.gate.set()
    e = d.poll(3)
    assert (e.cid, e.sqid) == (blocked, 3)
    d.ring_cq(3)
    assert slow.dev.wait_idle(WAIT)


def test_deleting_an_sq_waits_for_its_batch(slow: Rig) -> None:
    d, backend = slow.d, backend_of(slow)
    blocked = d.submit(1, IoOpcode.READ, nsid=1, prp1=DATA, cdw=(SLOW_LBA, 0, 7))
    assert backend.entered.wait(WAIT)
    delete = d.submit(0, AdminOpcode.DELETE_SQ, cdw=(1,))
    d.ok(2, IoOpcode.FLUSH, nsid=1)  # the other queues go on meanwhile
    assert not d.pending(0)  # Delete SQ waits for the read in progress
    backend.gate.set()
    e = d.poll(1)
    assert (e.cid, e.status) == (blocked, 0)
    e = d.poll(0)
    assert (e.cid, e.status) == (delete, 0)
    d.ring_cq(0)
    assert 1 not in slow.dev.sqs
