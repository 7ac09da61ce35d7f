"""Soak: connect/disconnect cycles leave the server process as it was.

The server is the installed ``vfio-user-server sample`` in its own process. Each cycle does what
QEMU does in a session: VERSION, device info, region and IRQ info, two DMA maps with fds, MSI-X
eventfds, register accesses, a device DMA in both directions, a reset, then disconnects. After
the cycles the server's open fds and threads are back to the baseline taken after a warm-up, it
holds no more memory mappings (/proc/PID/maps) than then, and its RSS grew by less than 1 MiB.

A few cycles run in the normal suite; ``PYVFIO_SOAK=1`` runs 1,000 (``PYVFIO_SOAK_CYCLES=N``
for another number). The figures of the last long run are in docs/reliability.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import device_dma
from supervised import DEADLINE, Resources, ServerProcess, wait_for

from vfio_user_server.client import Client
from vfio_user_server.sample import (
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    ID_VALUE,
    REG_ID,
    REG_SCRATCH,
    STAT_DONE,
    STAT_ERROR,
    AccessLog,
)

LONG = os.environ.get("PYVFIO_SOAK") == "1"
CYCLES = int(os.environ.get("PYVFIO_SOAK_CYCLES", "1000" if LONG else "30"))
WARMUP = 5
RSS_GROWTH_LIMIT_KIB = 1024


@pytest.fixture
def sample_process() -> Iterator[ServerProcess]:
    d = Path(tempfile.mkdtemp(prefix="vfu-soak-", dir="/tmp"))
    try:
        srv = ServerProcess.serving(d / "soak.sock", "sample")
        try:
            yield srv
        finally:
            srv.finish()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def one_session(srv: ServerProcess, i: int) -> None:
    c = srv.connect()
    try:
        for index in range(9):
            c.get_region_info(index)
        for index in range(5):
            c.get_irq_info(index)
        c.add_memory(0x100000, 0x10000)
        c.add_memory(0x200000, 0x4000, writable=False)
        fds = c.enable_msix(4)
        try:
            assert c.bar_read(0, REG_ID, 4) == ID_VALUE
            c.bar_write(0, REG_SCRATCH, 4, i, posted=True)
            assert c.bar_read(0, REG_SCRATCH, 4) == i
            c.write_memory(0x200000, i.to_bytes(4, "little") * 16)
            assert device_dma(c, 0x200000, 64, DMA_TO_DEVICE) == STAT_DONE
            assert device_dma(c, 0x100000 + 0x100, 64, DMA_FROM_DEVICE) == STAT_DONE
            assert c.read_memory(0x100000 + 0x100, 64) == i.to_bytes(4, "little") * 16
            assert device_dma(c, 0x200000, 64, DMA_FROM_DEVICE) == STAT_ERROR  # read-only map
            if i % 2:
                c.dma_unmap(0x100000, 0x10000)
            c.reset()
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        c.close()


def test_connect_disconnect_cycles_leave_the_server_as_it_was(
        sample_process: ServerProcess) -> None:
    srv = sample_process
    start = srv.resources()
    for i in range(WARMUP):
        one_session(srv, i)
    # the warm-up's last client may still be leaving: its threads and fds go first (the maps
    # of what the warm-up loaded stay: they are the baseline)
    wait_for(lambda: (srv.resources().threads, srv.resources().fds) == (start.threads,
                                                                         start.fds),
             "the server to be idle again")
    baseline = srv.resources()
    for i in range(CYCLES):
        one_session(srv, WARMUP + i)
        if LONG and i % 100 == 99:
            print(f"\nsoak: after {i + 1} sessions {srv.resources()}", flush=True)
    after = srv.settle(baseline)
    growth = after.rss_kib - baseline.rss_kib
    print(f"\nsoak: {CYCLES} client sessions; server before {baseline}, after {after}; "
          f"RSS growth {growth} KiB")
    assert after.back_to(baseline), (baseline, after)
    assert growth < RSS_GROWTH_LIMIT_KIB, (baseline, after)


def test_resources_of_a_process_are_read_from_proc() -> None:
    me = Resources.of(os.getpid())
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert Resources.of(os.getpid()).fds == me.fds + 1
    finally:
        os.close(fd)
    assert me.threads >= 1 and me.maps > 10 and me.rss_kib > 1000


def test_the_sample_device_keeps_a_bounded_access_log() -> None:
    log = AccessLog(limit=4)
    for i in range(10):
        log.append(("w", 0, 4, 4, i))
    assert len(log) == 10
    assert [a[4] for a in log] == [6, 7, 8, 9]
    assert [a[4] for a in log[8:]] == [8, 9]
    assert log[9][4] == 9 and log[-1][4] == 9
    with pytest.raises(IndexError):
        log[2:]
    with pytest.raises(IndexError):
        log[5]


def test_a_server_that_releases_memory_still_counts_its_clients(make_server: Any) -> None:
    srv = make_server(release_memory=True)
    for n in range(1, 4):
        c = Client.connect(srv.path, timeout=DEADLINE)
        c.negotiate()
        assert srv.wait_for_client(DEADLINE) is not None
        c.close()
        srv.wait_for_disconnect(n, DEADLINE)
        assert srv.connection is None and srv.connections_served == n
