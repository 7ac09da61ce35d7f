"""testing.serve: a served device with a ready client, and nothing left behind."""

from __future__ import annotations

import threading

import pytest
from helpers import RecordingSample, device_dma, open_fds

from vfio_user_server.client import ClientError
from vfio_user_server.pci import COMMAND, COMMAND_IO, COMMAND_MASTER, COMMAND_MEMORY
from vfio_user_server.protocol.constants import DmaLayout
from vfio_user_server.protocol.session import SessionState
from vfio_user_server.sample import DMA_TO_DEVICE, STAT_DONE
from vfio_user_server.testing import serve


def test_serve_gives_a_negotiated_client_and_cleans_up() -> None:
    before_fds = open_fds()
    before_threads = set(threading.enumerate())
    dev = RecordingSample()
    with serve(dev) as s:
        assert s.device is dev and s.server.device is dev
        assert s.path.is_socket()
        conn = s.server.wait_for_client(timeout=10)
        assert conn.session.state is SessionState.RUNNING
        assert dev.events == ["connect"] and dev.connected
        assert s.client.config_read(0, 2) == 0x1B36
        assert s.client.config_read(COMMAND, 2) == 0
        assert s.client.memory == []
        path = s.path
    assert not path.exists() and not path.parent.exists()
    assert dev.events == ["connect", "disconnect"] and not dev.connected
    assert open_fds() == before_fds
    assert set(threading.enumerate()) <= before_threads


def test_serve_maps_memory_and_enables_the_device() -> None:
    dev = RecordingSample()
    with serve(dev, memory=1 << 16, enable=True) as s:
        assert s.client.config_read(COMMAND, 2) == COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER
        s.client.write_memory(0x100, b"direct")
        assert device_dma(s.client, 0x100, 6, DMA_TO_DEVICE) == STAT_DONE
        assert bytes(dev.buffer[:6]) == b"direct"
        assert s.client.dma_requests == []


def test_serve_without_fds_makes_dma_go_by_messages() -> None:
    dev = RecordingSample()
    with serve(dev, memory=1 << 16, fd_backed=False, enable=True,
               client_options={"dma_layout": DmaLayout.LEGACY},
               server_options={"dma_timeout": 5.0}) as s:
        s.client.write_memory(0x200, b"by message")
        assert device_dma(s.client, 0x200, 10, DMA_TO_DEVICE) == STAT_DONE
        assert bytes(dev.buffer[:10]) == b"by message"
        assert s.client.dma_requests == [("read", 0x200, 10)]


def test_serve_cleans_up_when_the_test_fails() -> None:
    dev = RecordingSample()
    with pytest.raises(ClientError), serve(dev) as s:
        path = s.path
        s.client.region_read(99, 0, 4)
    assert not path.exists()
    assert dev.events == ["connect", "disconnect"]
