"""NVMe Interrupt Coalescing (feature 08h) and Interrupt Vector Configuration's Coalescing
Disable (feature 09h), set through admin commands by the test driver of test_nvme, counted on
the vectors' eventfds (MSI-X) or the INTx line.

The coalescer's clock is a test clock that only moves when a test moves it, so what is held
and what is signalled does not depend on how fast this machine runs; one test runs on the real
clock and only waits for the interrupt to come.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import WAIT
from test_nvme import DATA, RAM, Rig, map_sealed_ram, wait_fd

from vfio_user_devices.nvme import NvmeController
from vfio_user_devices.nvme_coalesce import TIME_UNIT, coalescing_settings
from vfio_user_devices.nvme_spec import AdminOpcode, Feature, IoOpcode
from vfio_user_server.client import Client
from vfio_user_server.testing import serve

IC = Feature.INTERRUPT_COALESCING
IVC = Feature.INTERRUPT_VECTOR_CONFIG
CD = 1 << 16


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CoRig(Rig):
    clock: Clock
    fds: list[int]

    def settle(self) -> None:
        """Every completion seen is signalled or held (the worker or the inline run is over)."""
        assert self.dev.wait_idle(WAIT)

    def counts(self) -> list[int]:
        self.settle()
        return [Client.eventfd_count(fd) for fd in self.fds]

    def read(self, qid: int = 1) -> None:
        """A 4 KiB read, its completion polled; the CQ head doorbell is left for later (an
        interrupt-driven driver rings it from its interrupt handler, and the controller
        signals a held interrupt only while the CQ holds entries the host has not consumed)."""
        d = self.d
        cid = d.submit(qid, IoOpcode.READ, nsid=1, prp1=DATA, cdw=(0, 0, 7))
        e = d.poll(qid)
        assert (e.cid, e.status) == (cid, 0)

    def coalesce(self, thr: int, units: int) -> None:
        self.d.ok(0, AdminOpcode.SET_FEATURES, cdw=(IC, thr | units << 8))
        self.settle()
        if self.fds:
            Client.eventfd_count(self.fds[0])  # the admin completion's own interrupt


def make_rig(s: object, dev: NvmeController, msix: bool) -> CoRig:
    rig = CoRig(s)  # type: ignore[arg-type]
    rig.clock = Clock()
    dev.coalescer.clock = rig.clock
    rig.d.enable()
    rig.d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 3 | 3 << 16))
    rig.fds = rig.msix() if msix else []
    rig.d.create_queues(1)
    rig.d.create_queues(2)
    rig.counts()
    return rig


@pytest.fixture(params=["inline", "worker"])
def co(request: pytest.FixtureRequest, image: Path) -> Iterator[CoRig]:
    """MSI-X, with reads run inline (sealed guest RAM) or by the worker (message DMA)."""
    dev = NvmeController(image)
    try:
        inline = request.param == "inline"
        with serve(dev, memory=0 if inline else RAM, fd_backed=False) as s:
            if inline:
                map_sealed_ram(s.client)
            yield make_rig(s, dev, msix=True)
    finally:
        dev.close()


def test_settings() -> None:
    assert coalescing_settings(0) == (0, 0.0)
    assert coalescing_settings(0xFF) == (0, 0.0)  # no time: off
    assert coalescing_settings(0xFF00) == (0, 0.0)  # one entry per interrupt: off
    assert coalescing_settings(0x0A04) == (5, 10 * TIME_UNIT)
    assert coalescing_settings(0xFFFF_FFFF) == (256, 255 * TIME_UNIT)


def test_threshold_holds_interrupts_and_admin_is_never_coalesced(co: CoRig) -> None:
    co.coalesce(3, 255)  # 4 entries per interrupt, 25.5 ms
    for _ in range(3):
        co.read()
        assert co.counts()[:3] == [0, 0, 0]
        co.d.ok(0, AdminOpcode.KEEP_ALIVE)
        assert co.counts()[:3] == [1, 0, 0]  # the admin CQ at once
    co.read()
    assert co.counts()[:3] == [0, 1, 0]  # the fourth entry
    assert co.dev.coalescer.held == {} and co.dev.coalescer.timeouts == 0
    # queues on other vectors count their own entries
    for _ in range(3):
        co.read(2)
    co.read(1)
    assert co.counts()[:3] == [0, 0, 0]
    # one batch of four at once reaches the threshold
    for _ in range(2):
        co.d.submit(2, IoOpcode.FLUSH, nsid=1)
    co.d.ring_sq(2)
    co.d.poll(2)
    co.d.poll(2)
    co.d.ring_cq(2)
    assert co.counts()[:3] == [0, 0, 1]


def test_aggregation_time_ends_a_held_interrupt(co: CoRig) -> None:
    co.coalesce(7, 10)  # 8 entries, 1 ms
    co.read()
    co.read()
    assert co.counts()[1] == 0
    co.clock.now += 9 * TIME_UNIT  # not yet due
    co.dev.coalescer.poke()
    co.d.ok(0, AdminOpcode.KEEP_ALIVE)  # a round trip through the loop thread
    assert co.counts()[1] == 0
    co.clock.now += 2 * TIME_UNIT  # the deadline counts from the first held entry
    co.dev.coalescer.poke()
    assert wait_fd(co.fds[1]) == 1
    assert co.dev.coalescer.timeouts == 1 and co.dev.coalescer.held == {}


def test_coalescing_disable_per_vector(co: CoRig) -> None:
    co.coalesce(3, 255)
    co.d.ok(0, AdminOpcode.SET_FEATURES, cdw=(IVC, 2 | CD))
    assert co.d.ok(0, AdminOpcode.GET_FEATURES, cdw=(IVC, 2)).dw0 == 2 | CD
    co.counts()
    co.read(1)
    co.read(2)
    assert co.counts()[1:3] == [0, 1]  # vector 2 at once, vector 1 held
    co.d.ok(0, AdminOpcode.SET_FEATURES, cdw=(IVC, 1 | CD))  # signals what vector 1 held
    assert co.counts()[:3] == [1, 1, 0]
    co.read(1)
    assert co.counts()[1] == 1
    co.d.ok(0, AdminOpcode.SET_FEATURES, cdw=(IVC, 1))  # coalesced again
    co.counts()
    co.read(1)
    assert co.counts()[1] == 0


def test_turning_coalescing_off_or_quiescing_signals_what_is_held(co: CoRig) -> None:
    co.coalesce(3, 255)
    co.read()
    assert co.counts()[1] == 0
    co.coalesce(0, 0)
    assert co.counts()[1] == 1
    co.read()
    assert co.counts()[1] == 1  # off: every completion interrupts
    co.coalesce(3, 255)
    co.read()
    assert co.counts()[1] == 0
    co.dev.quiesce()
    co.dev.resume()
    assert co.counts()[1] == 1
    # a controller reset drops what is held with the queues, and coalescing with the features
    co.read()
    co.d.disable()
    assert co.dev.coalescer.held == {} and co.dev.coalescer.threshold == 0


def test_real_clock_never_loses_the_interrupt(image: Path) -> None:
    dev = NvmeController(image)
    try:
        with serve(dev, memory=RAM, fd_backed=True) as s:
            rig = make_rig(s, dev, msix=True)
            dev.coalescer.clock = time.monotonic
            rig.coalesce(255, 1)  # 256 entries or 100 us
            for _ in range(3):
                rig.read()
                assert wait_fd(rig.fds[1]) == 1
            assert dev.coalescer.timeouts == 3
    finally:
        dev.close()


def test_intx_line_waits_for_the_threshold(image: Path) -> None:
    dev = NvmeController(image)
    try:
        with serve(dev, memory=RAM, fd_backed=True) as s:
            rig = make_rig(s, dev, msix=False)
            rig.coalesce(1, 255)  # 2 entries
            rig.d.submit(1, IoOpcode.FLUSH, nsid=1)
            rig.d.poll(1)
            rig.settle()
            assert not dev.intx_level
            rig.d.submit(1, IoOpcode.FLUSH, nsid=1)
            rig.d.poll(1)
            rig.settle()
            assert dev.intx_level
            rig.d.ring_cq(1)
            rig.d.r32(0x1C)  # orders the posted doorbell
            assert not dev.intx_level
            rig.d.submit(1, IoOpcode.FLUSH, nsid=1)
            rig.d.poll(1)
            rig.settle()
            assert not dev.intx_level
            rig.clock.now += 256 * TIME_UNIT
            dev.coalescer.poke()
            deadline = time.monotonic() + WAIT
            while not dev.intx_level and time.monotonic() < deadline:
                rig.d.r32(0x1C)
            assert dev.intx_level
    finally:
        dev.close()
