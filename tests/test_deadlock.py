"""The loop thread never waits for a server->client request (QEMU's BQL deadlock), and a DMA
request the client never answers times out without stopping the device."""

from __future__ import annotations

import errno
import threading

import pytest
from helpers import (
    WAIT,
    ClientFactory,
    RecordingSample,
    ServerFactory,
    negotiated,
    program_dma,
    wait_dma,
    wait_until,
)

from vfio_user_server.errors import DmaError, DmaTimeoutError
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command, DmaLayout
from vfio_user_server.protocol.structs import DmaAccess
from vfio_user_server.sample import (
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    ID_VALUE,
    REG_ID,
    REG_SCRATCH,
    STAT_DONE,
    STAT_ERROR,
)

#: a register of LoopDma: writing an address makes the device DMA on the loop thread
REG_LOOP_DMA = 0x40


class LoopDma(RecordingSample):
    """A device that (wrongly) does DMA in its BAR write handler, on the server's loop thread."""

    def __init__(self) -> None:
        super().__init__()
        self.loop_results: list[bytes | DmaError] = []

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar == 0 and offset == REG_LOOP_DMA:
            try:
                self.loop_results.append(self.dma.read(value, 8))
            except DmaError as exc:
                self.loop_results.append(exc)
            return
        super().bar_write(bar, offset, size, value)


@pytest.mark.parametrize("layout", [DmaLayout.AUTO, DmaLayout.SPEC, DmaLayout.LEGACY])
def test_message_dma_on_loop_thread_is_edeadlk(make_server: ServerFactory,
                                               make_client: ClientFactory,
                                               layout: DmaLayout) -> None:
    dev = LoopDma()
    # a long DMA timeout: waiting for the client here would make the BAR write time out
    srv = make_server(dev, dma_layout=layout, dma_timeout=120.0)
    client_layout = DmaLayout.LEGACY if layout is DmaLayout.LEGACY else DmaLayout.SPEC
    c = negotiated(make_client(srv, dma_layout=client_layout))
    c.add_memory(0x10000, 0x1000, fd_backed=False)
    c.bar_write(0, REG_LOOP_DMA, 8, 0x10000)  # answered at once, no waiting
    [result] = dev.loop_results
    assert isinstance(result, DmaError)
    assert result.errno == errno.EDEADLK
    # nothing was sent to the client, and the device goes on
    assert c.dma_requests == []
    assert c.bar_read(0, REG_ID, 4) == ID_VALUE
    # the same work, deferred to the worker, is fine
    c.write_memory(0x10000, b"deferred")
    program_dma(c, 0x10000, 8, DMA_TO_DEVICE)
    assert wait_dma(c) == STAT_DONE
    assert bytes(dev.buffer[:8]) == b"deferred"


def test_direct_dma_on_loop_thread_is_fine(make_server: ServerFactory,
                                           make_client: ClientFactory) -> None:
    dev = LoopDma()
    srv = make_server(dev)
    c = negotiated(make_client(srv))
    c.add_memory(0x10000, 0x1000)  # fd-backed: no message needed
    c.write_memory(0x10000, b"directly")
    c.bar_write(0, REG_LOOP_DMA, 8, 0x10000)
    assert dev.loop_results == [b"directly"]


@pytest.mark.parametrize("layout", [DmaLayout.AUTO, DmaLayout.SPEC])
def test_unanswered_dma_times_out_and_device_keeps_working(make_server: ServerFactory,
                                                           make_client: ClientFactory,
                                                           device: RecordingSample,
                                                           layout: DmaLayout) -> None:
    srv = make_server(device, dma_layout=layout, dma_timeout=0.5)
    c = negotiated(make_client(srv, serve_dma=False))
    c.add_memory(0x10000, 0x1000, fd_backed=False)
    c.add_memory(0x20000, 0x1000)  # fd-backed
    program_dma(c, 0x10000, 64, DMA_TO_DEVICE)
    # while the worker waits for the client, the loop thread still answers
    wait_until(lambda: bool(c.unanswered), what="the DMA request to reach the client")
    assert c.bar_read(0, REG_ID, 4) == ID_VALUE
    c.bar_write(0, REG_SCRATCH, 4, 0x77)
    assert c.bar_read(0, REG_SCRATCH, 4) == 0x77
    assert wait_dma(c) == STAT_ERROR
    assert c.unanswered[0].command in (Command.DMA_READ, Command.DMA_WRITE)
    # the device keeps working: direct DMA, and message DMA once the client answers again
    c.write_memory(0x20000, b"fd-backed memory")
    program_dma(c, 0x20000, 16, DMA_TO_DEVICE)
    assert wait_dma(c) == STAT_DONE
    assert bytes(device.buffer[:16]) == b"fd-backed memory"
    c.serve_dma = True
    device.buffer[:5] = b"later"
    program_dma(c, 0x10000, 5, DMA_FROM_DEVICE)
    assert wait_dma(c) == STAT_DONE
    assert c.read_memory(0x10000, 5) == b"later"


def test_dma_timeout_error_type(make_server: ServerFactory, make_client: ClientFactory,
                                device: RecordingSample) -> None:
    srv = make_server(device, dma_layout=DmaLayout.SPEC, dma_timeout=0.3)
    c = negotiated(make_client(srv, serve_dma=False))
    c.add_memory(0, 0x1000, fd_backed=False)
    conn = srv.wait_for_client(WAIT)
    for op in (lambda: conn.dma.read(0, 16), lambda: conn.dma.write(0, b"x" * 16)):
        exc = conn.ctx.defer(op).exception(WAIT)
        assert isinstance(exc, DmaTimeoutError)
        assert exc.errno == errno.ETIMEDOUT
    assert c.bar_read(0, REG_ID, 4) == ID_VALUE


def test_late_reply_is_dropped(make_server: ServerFactory, make_client: ClientFactory,
                               device: RecordingSample) -> None:
    srv = make_server(device, dma_layout=DmaLayout.SPEC, dma_timeout=0.3)
    c = negotiated(make_client(srv, serve_dma=False))
    c.add_memory(0, 0x1000, fd_backed=False)
    conn = srv.wait_for_client(WAIT)
    exc = conn.ctx.defer(lambda: conn.dma.read(0, 4)).exception(WAIT)
    assert isinstance(exc, DmaTimeoutError)
    [late] = c.unanswered
    # the answer comes after all: the server drops it and goes on
    payload = DmaAccess(0, 4).pack() + b"late"
    c.send_raw(codec.encode(codec.reply_to(late, payload)))
    assert c.bar_read(0, REG_ID, 4) == ID_VALUE
    # a new request gets its own, fresh answer
    c.serve_dma = True
    c.write_memory(0, b"good")
    assert conn.ctx.defer(lambda: conn.dma.read(0, 4)).result(WAIT) == b"good"


def test_device_thread_dma(make_server: ServerFactory, make_client: ClientFactory,
                           device: RecordingSample) -> None:
    # message DMA from a device's own thread (not the worker) is allowed too
    srv = make_server(device)
    c = negotiated(make_client(srv))
    c.add_memory(0x1000, 0x1000, fd_backed=False)
    conn = srv.wait_for_client(WAIT)
    out: list[bytes] = []
    def worker() -> None:
        conn.dma.write(0x1000, b"thread")
        out.append(conn.dma.read(0x1000, 6))

    t = threading.Thread(target=worker)
    t.start()
    t.join(WAIT)
    assert out == [b"thread"]
