"""Every method of the connection's parts says which thread runs it (vfio_user_server.threads),
and the markers agree with the deadlock rule."""

from __future__ import annotations

import inspect

import pytest

from vfio_user_server.connection import Connection
from vfio_user_server.requester import ClientRequester
from vfio_user_server.threads import ANY, DEVICE, LOOP, thread_of


@pytest.mark.parametrize("cls", [Connection, ClientRequester])
def test_every_method_is_marked(cls: type) -> None:
    unmarked = [name for name, fn in vars(cls).items()
                if inspect.isfunction(fn) and name != "__init__" and thread_of(fn) is None]
    assert unmarked == [], f"{cls.__name__}: say which thread runs {unmarked}"


def test_the_loop_thread_never_waits_for_the_client() -> None:
    # what reads the socket and hands replies over runs on the loop thread; what waits for a
    # reply runs on device threads only
    assert thread_of(Connection.handle_one) == LOOP
    assert thread_of(ClientRequester.complete) == LOOP
    for waiting in (ClientRequester.request, ClientRequester.dma_read,
                    ClientRequester.dma_write, ClientRequester.dma_layout):
        assert thread_of(waiting) == DEVICE
    assert thread_of(Connection.send) == ANY
