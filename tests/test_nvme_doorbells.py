"""NVMe with ``--polled-doorbells``: the doorbell page mapped (sparse mmap) and polled.

The test driver of test_nvme rings doorbells with trapped writes, which land in the same
memory, and also straight through the region's fd, as the guest does once QEMU maps it.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until
from test_nvme import DATA, RAM, Rig

from vfio_user_devices.nvme import NvmeController
from vfio_user_devices.nvme_spec import AdminOpcode, Feature, IoOpcode
from vfio_user_server.protocol.constants import RegionInfoFlag
from vfio_user_server.testing import serve


@pytest.fixture(params=["c-shim", "python"])
def polled(request: pytest.FixtureRequest, image: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    if request.param == "python":
        monkeypatch.setenv("PYVFIO_NO_SHIM", "1")
    else:  # CI runs the unit tests again with PYVFIO_NO_SHIM=1: this case wants the shim
        monkeypatch.delenv("PYVFIO_NO_SHIM", raising=False)
    dev = NvmeController(image, polled_doorbells=True, queues=4)
    assert dev.doorbells is not None
    assert dev.doorbells.watcher.waiter.name == request.param
    try:
        with serve(dev, memory=RAM, fd_backed=True) as s:
            rig = Rig(s)
            rig.d.enable()
            rig.d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 3 | 3 << 16))
            rig.d.create_queues(1)
            yield rig
    finally:
        dev.close()


def test_doorbell_page_is_announced_mapped(polled: Rig) -> None:
    desc = polled.c.get_region_info(0)
    try:
        assert desc.flags & RegionInfoFlag.MMAP and desc.sparse == [(0x1000, 0x1000)]
        assert desc.fd is not None
    finally:
        if desc.fd is not None:
            os.close(desc.fd)
    assert not polled.c.get_region_info(4).flags & RegionInfoFlag.MMAP  # MSI-X stays trapped
    assert polled.dev.doorbells is not None and polled.dev.doorbells.watcher.running


def test_io_through_polled_doorbells(polled: Rig, image: Path) -> None:
    d, c = polled.d, polled.c
    data = os.urandom(8 * 512)
    c.write_memory(DATA, data)
    assert d.rw(1, IoOpcode.WRITE, 8, 8).status == 0
    c.write_memory(DATA, bytes(len(data)))
    assert d.rw(1, IoOpcode.READ, 8, 8).status == 0
    assert c.read_memory(DATA, len(data)) == data
    assert image.read_bytes()[8 * 512:16 * 512] == data
    for i in range(100):  # wraps the 64-entry queue
        assert d.rw(1, IoOpcode.READ, i % 16, 1).status == 0
    assert polled.dev.doorbells is not None and polled.dev.doorbells.watcher.changes > 100


def test_doorbells_written_through_the_mapping(polled: Rig) -> None:
    """As the guest does: a plain store into the mmapped page, no message at all."""
    d, c = polled.d, polled.c
    desc = c.get_region_info(0)
    assert desc.fd is not None
    page = mmap.mmap(desc.fd, 0x1000, offset=desc.offset + 0x1000)
    os.close(desc.fd)
    try:
        d.w32 = lambda off, value, posted=False: page.__setitem__(  # type: ignore[method-assign]
            slice(off - 0x1000, off - 0x1000 + 4), value.to_bytes(4, "little"))
        for i in range(10):
            assert d.rw(1, IoOpcode.READ, i, 1).status == 0
        assert d.ok(0, AdminOpcode.GET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES,)).status == 0
    finally:
        page.close()


def test_reset_and_queue_creation_zero_the_doorbells(polled: Rig) -> None:
    d, dev = polled.d, polled.dev
    assert dev.doorbells is not None
    mem = dev.mapped(0)
    for i in range(3):
        assert d.rw(1, IoOpcode.READ, i, 1).status == 0
    d.r32(0x1C)  # a reply: the posted doorbell writes before it are in memory
    assert mem.u32(0x1000 + 8) == 3 and mem.u32(0x1004 + 8) == 3
    d.disable()
    assert all(mem.u32(0x1000 + 4 * i) == 0 for i in range(10))
    # a store left in the page of a queue that does not exist is ignored, then zeroed when
    # the queue is created, so the new queue counts from 0
    d.enable()
    d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 3 | 3 << 16))
    d.w32(0x1000 + 8 * 2, 5)
    d.create_queues(2)
    assert mem.u32(0x1000 + 8 * 2) == 0
    assert d.rw(2, IoOpcode.READ, 0, 1).status == 0
    assert not dev.pending_events  # no "invalid doorbell" event for the stray store


def test_state_load_writes_the_queue_values(polled: Rig) -> None:
    d, dev = polled.d, polled.dev
    for i in range(2):
        assert d.rw(1, IoOpcode.READ, i, 1).status == 0
    d.r32(0x1C)  # the posted CQ head write is in memory
    wait_until(lambda: dev.cqs[1].head == 2)  # the watcher handed the head over
    state = dev.save_state()
    assert dev.doorbells is not None
    dev.doorbells.stop()  # a page out of step with the queues, as a new process would have
    dev.mapped(0).fill(0x1000, 0x1000)
    dev.load_state(state)
    assert dev.mapped(0).u32(0x1000 + 8) == 2 and dev.mapped(0).u32(0x1004 + 8) == 2
    dev.doorbells.start()
    assert d.rw(1, IoOpcode.READ, 0, 1).status == 0
