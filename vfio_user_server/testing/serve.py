"""A device served on a temporary socket with a connected client: for device unit tests.

No QEMU, no guest: the :class:`~vfio_user_server.client.Client` talks to the server the way
QEMU's ``vfio-user-pci`` does, so a test drives the device through the real protocol and looks
at its Python state at the same time::

    from vfio_user_server.testing import serve

    def test_blinker():
        with serve(Blinker(), memory=1 << 20, enable=True) as s:
            s.client.bar_write(0, 0, 4, 1)
            assert s.device.leds == 1

The client has negotiated (VERSION, then DEVICE_GET_INFO, as QEMU starts); ``memory`` maps
that much guest RAM at IOVA 0 (``fd_backed=False``: without an fd, so the device's DMA goes
by messages), and ``enable`` turns on memory and I/O decoding and bus mastering in the COMMAND
register, as a guest driver does before it uses the device. On exit the client disconnects
and the server stops; the device is the caller's and is not closed.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..client import Client
from ..endpoint import VfioDevice
from ..pci import COMMAND, COMMAND_IO, COMMAND_MASTER, COMMAND_MEMORY
from ..server import Server

__all__ = ["Served", "serve"]

D = TypeVar("D", bound=VfioDevice)

#: What ``enable=True`` sets in the COMMAND register.
ENABLE_BITS = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER


@dataclass(frozen=True)
class Served(Generic[D]):
    """What :func:`serve` gives: the device, its running server, and a connected client."""

    device: D
    server: Server
    client: Client

    @property
    def path(self) -> Path:
        """The server's socket (connect more clients to it)."""
        return self.server.path


@contextlib.contextmanager
def serve(
    device: D,
    *,
    memory: int = 0,
    fd_backed: bool = True,
    enable: bool = False,
    timeout: float = 10.0,
    server_options: Mapping[str, Any] | None = None,
    client_options: Mapping[str, Any] | None = None,
) -> Iterator[Served[D]]:
    """Serve ``device`` on a temporary socket; yield it with its server and a ready client.

    ``timeout`` bounds each client request. ``server_options`` go to
    :class:`~vfio_user_server.server.Server` (``dma_timeout``, ``trace``, ``caps``, ...),
    ``client_options`` to :class:`~vfio_user_server.client.Client` (``dma_layout``,
    ``serve_dma``, ...).
    """
    # a short folder: a socket path must fit in sun_path (107 bytes)
    folder = Path(tempfile.mkdtemp(prefix="vfu-", dir="/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            server = Server(device, folder / "dev.sock", **dict(server_options or {}))
            stack.callback(server.close)
            server.start()
            client = Client.connect(server.path, timeout=timeout,
                                    **dict(client_options or {}))
            stack.callback(client.close)
            client.negotiate()
            client.get_device_info()
            if memory:
                client.add_memory(0, memory, fd_backed=fd_backed)
            if enable:
                client.config_write(COMMAND, 2, client.config_read(COMMAND, 2) | ENABLE_BITS)
            yield Served(device, server, client)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
