"""Shared fixtures: a Server with a SampleDevice on a temporary UNIX socket, and Clients.

Everything here talks over a real UNIX socket. Socket paths live in a short directory under
``/tmp`` (``sun_path`` is limited to 107 bytes and pytest's ``tmp_path`` can be longer).
The helpers these fixtures use, and that tests import, are in helpers.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import WAIT, ClientFactory, MmapSample, RecordingSample, ServerFactory

from vfio_user_server.client import Client
from vfio_user_server.endpoint import VfioDevice
from vfio_user_server.server import Server


@pytest.fixture
def mmap_device() -> Iterator[MmapSample]:
    dev = MmapSample()
    yield dev
    dev.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vfu-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: Path) -> Path:
    return sock_dir / "dev.sock"


@pytest.fixture
def image(sock_dir: Path) -> Path:
    """An 8 MiB disk image file (all zeros) for a block device's backing store."""
    p = sock_dir / "disk.img"
    with open(p, "wb") as f:
        f.truncate(8 << 20)
    return p


@pytest.fixture
def make_server(sock_dir: Path) -> Iterator[ServerFactory]:
    """Start Servers: ``make_server(device=None, name="dev.sock", **server_kwargs)``."""
    servers: list[Server] = []

    def make(device: VfioDevice | None = None, name: str = "dev.sock", **kwargs: Any) -> Server:
        dev = device if device is not None else RecordingSample()
        srv = Server(dev, sock_dir / name, **kwargs)
        servers.append(srv)
        return srv.start()

    yield make
    for srv in servers:
        srv.close()


@pytest.fixture
def device() -> RecordingSample:
    return RecordingSample()


@pytest.fixture
def server(make_server: ServerFactory, device: RecordingSample) -> Server:
    """A started Server serving ``device`` on a temporary socket (small DMA timeout)."""
    return make_server(device, dma_timeout=2.0)


@pytest.fixture
def make_client() -> Iterator[ClientFactory]:
    """Connect Clients: ``make_client(server_or_path, **client_kwargs)``; closed at teardown."""
    clients: list[Client] = []

    def make(target: Server | str | os.PathLike[str], **kwargs: Any) -> Client:
        path = target.path if isinstance(target, Server) else target
        kwargs.setdefault("timeout", WAIT)
        c = Client.connect(path, **kwargs)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def raw_client(server: Server, make_client: ClientFactory) -> Client:
    """A connected client that has not sent anything yet."""
    return make_client(server)


@pytest.fixture
def client(server: Server, make_client: ClientFactory) -> Client:
    """A connected client that did VERSION and DEVICE_GET_INFO (the session is RUNNING)."""
    c = make_client(server)
    c.negotiate()
    c.get_device_info()
    return c

