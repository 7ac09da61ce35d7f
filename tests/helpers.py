"""Helpers shared by the unit tests: waiting, eventfds, raw sockets, recording devices.

Test modules import them from here (``from helpers import ...``); the fixtures built on them
are in conftest.py.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from vfio_user_server.client import Client
from vfio_user_server.dmacopy import default_copy
from vfio_user_server.endpoint import MmapSpec, Region
from vfio_user_server.pci import Bar
from vfio_user_server.pci.capabilities import Msi, MsiX
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import RegionIndex
from vfio_user_server.protocol.session import MAX_DATA_XFER_SIZE, max_message_size
from vfio_user_server.sample import (
    REG_DMA_ADDR,
    REG_DMA_CMD,
    REG_DMA_LEN,
    REG_DMA_STAT,
    STAT_DONE,
    STAT_ERROR,
    SampleDevice,
)
from vfio_user_server.server import Server
from vfio_user_server.transport import SocketReader, send_bytes

#: Generous timeout for anything we wait for (events, threads, disconnects).
WAIT = 10.0


def open_fds() -> set[int]:
    """The fds open in this process now.

    The process's one guarded DMA copier is made first: without the C shim it holds an fd
    (``/proc/self/mem``) for the life of the process, which is no leak of the test that
    happened to make it.
    """
    default_copy()
    return {int(name) for name in os.listdir("/proc/self/fd")}


def fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def wait_until(cond: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``cond`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)

def fired(fd: int, timeout: float = 0.0) -> int:
    """The count an eventfd collected, waiting up to ``timeout`` seconds for one (0 if none).

    The server writes an interrupt's eventfd on the thread that raised it, under the device's
    lock, before the request that caused it is answered: so ``fired(fd) == 0`` (no wait) right
    after the causing request is an exact negative check, and a wait is only needed for
    interrupts raised by a device's own thread.
    """
    deadline = time.monotonic() + timeout
    while True:
        n = Client.eventfd_count(fd)
        if n or time.monotonic() >= deadline:
            return n
        time.sleep(0.002)


def program_dma(c: Client, addr: int, length: int, cmd: int) -> None:
    """Start the sample device's DMA engine (address, length, then the command)."""
    c.bar_write(0, REG_DMA_ADDR, 8, addr)
    c.bar_write(0, REG_DMA_LEN, 4, length)
    c.bar_write(0, REG_DMA_CMD, 4, cmd)


def wait_dma(c: Client) -> int:
    """Wait for the sample device's DMA to finish; return DMA_STAT (STAT_DONE or STAT_ERROR)."""
    stat = 0

    def done() -> bool:
        nonlocal stat
        stat = c.bar_read(0, REG_DMA_STAT, 4)
        return stat in (STAT_DONE, STAT_ERROR)

    wait_until(done, what="device DMA")
    return stat


def device_dma(c: Client, addr: int, length: int, cmd: int) -> int:
    """Program the sample device's DMA engine and wait for it; return DMA_STAT."""
    program_dma(c, addr, length, cmd)
    return wait_dma(c)



def wait_eventfd(fd: int, timeout: float = WAIT) -> int:
    """Wait for an eventfd to be signalled; return (and clear) its counter. 0 on timeout."""
    import select

    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        return 0
    return Client.eventfd_count(fd)


def eventfd_quiet(fd: int) -> bool:
    """True if the eventfd has not been signalled (non-blocking check; clears nothing)."""
    import select

    r, _, _ = select.select([fd], [], [], 0)
    return not r


def efd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class RecordingSample(SampleDevice):
    """The sample device, recording connection hooks."""

    def __init__(self) -> None:
        self.events: list[str] = []
        super().__init__()

    def on_connect(self) -> None:
        self.events.append("connect")

    def on_disconnect(self) -> None:
        self.events.append("disconnect")


# --- a device with mmap-able regions --------------------------------------------------------

SPARSE_AREAS = [(0, 0x1000), (0x2000, 0x2000)]
MMAP_BAR = 4
MMAP_BAR_SIZE = 0x4000
WHOLE_MMAP_BAR = 5


class MmapSample(RecordingSample):
    """The sample device plus two regions the client may mmap, both backed by one memfd.

    BAR4 (16 KiB) has a SPARSE_MMAP capability with :data:`SPARSE_AREAS`; region 5 (4 KiB,
    read-only) is mappable as a whole (no capability).
    """

    bars: ClassVar = {**RecordingSample.bars, MMAP_BAR: Bar(MMAP_BAR_SIZE, kind="mem32")}

    def __init__(self) -> None:
        super().__init__()
        self.mem_fd = os.memfd_create("bar4", os.MFD_CLOEXEC)
        os.ftruncate(self.mem_fd, MMAP_BAR_SIZE)
        self.mem = mmap.mmap(self.mem_fd, MMAP_BAR_SIZE)
        self._regions[MMAP_BAR] = Region(
            MMAP_BAR_SIZE,
            read=lambda off, n: bytes(self.mem[off:off + n]),
            write=self._write,
            mmap=MmapSpec(self.mem_fd, 0, areas=list(SPARSE_AREAS)),
        )
        self._regions[WHOLE_MMAP_BAR] = Region(0x1000, read=lambda off, n: bytes(n),
                                               mmap=MmapSpec(self.mem_fd, 0))

    def _write(self, off: int, data: bytes) -> None:
        self.mem[off:off + len(data)] = data

    def close(self) -> None:
        self.mem.close()
        os.close(self.mem_fd)


ServerFactory = Callable[..., Server]

ClientFactory = Callable[..., Client]


def negotiated(c: Client) -> Client:
    c.negotiate()
    c.get_device_info()
    return c


# --- raw socket helpers ---------------------------------------------------------------------


class RawPeer:
    """A bare socket to the server, for messages the Client would refuse to send."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(os.fspath(path))
        self.sock.settimeout(WAIT)
        self._rx = SocketReader(self.sock, max_message_size(MAX_DATA_XFER_SIZE), peer="server")

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        send_bytes(self.sock, data, fds or ())

    def recv_message(self) -> codec.Message:
        """The next message from the server, cut by the one reader (fds closed)."""
        msg = self._rx.read_message()
        msg.close_fds()
        return msg

    def at_eof(self) -> bool:
        """Wait (up to WAIT) for the server to close the connection.

        A server that closes with unread input makes the kernel report ECONNRESET instead of
        EOF; both mean the server hung up.
        """
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self._rx.close()
        self.sock.close()


# --- config space helpers -------------------------------------------------------------------


def find_capability(c: Client, cap_id: int) -> int:
    """Walk the standard capability chain through config reads; return the offset or 0."""
    pos = c.config_read(0x34, 1) & 0xFC
    seen = 0
    while pos and seen < 48:
        if c.config_read(pos, 1) == cap_id:
            return pos
        pos = c.config_read(pos + 1, 1) & 0xFC
        seen += 1
    return 0


MSI_CAP_ID = Msi.cap_id
MSIX_CAP_ID = MsiX.cap_id
CONFIG = RegionIndex.CONFIG


def run_in_thread(fn: Callable[[], Any]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t
