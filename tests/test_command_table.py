"""The three tables agree: the command table (wire layouts, fds, argsz), the session's states and
the endpoint's handlers; and the argsz column is enforced before any handler runs."""

from __future__ import annotations

import dataclasses
import errno

import pytest

from vfio_user_server import endpoint
from vfio_user_server.dma import DmaMapTable
from vfio_user_server.endpoint import Endpoint
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command
from vfio_user_server.protocol.session import ACCEPTS, Session, SessionState
from vfio_user_server.protocol.structs import COMMANDS, CommandSpec
from vfio_user_server.sample import SampleDevice

ARGSZ_COMMANDS = [cmd for cmd, spec in COMMANDS.items() if spec.argsz]


def starts_with_argsz(spec: CommandSpec) -> bool:
    return (spec.request is not None
            and dataclasses.fields(spec.request)[0].name == "argsz")  # type: ignore[arg-type]


def test_handlers_cover_exactly_the_commands_the_session_accepts() -> None:
    accepted = {int(cmd) for cmds in ACCEPTS.values() for cmd in cmds}
    assert set(endpoint._HANDLERS) == accepted
    # and what no state accepts is what the server itself sends
    assert {c for c in COMMANDS if int(c) not in accepted} == {
        c for c, spec in COMMANDS.items() if spec.server_request
    }


def test_argsz_column() -> None:
    assert {c.name for c in ARGSZ_COMMANDS} == {
        "DMA_MAP", "DMA_UNMAP", "DEVICE_GET_INFO", "DEVICE_GET_REGION_INFO",
        "DEVICE_GET_REGION_IO_FDS", "DEVICE_GET_IRQ_INFO", "DEVICE_SET_IRQS",
        "DEVICE_FEATURE", "MIG_DATA_READ", "MIG_DATA_WRITE",
    }
    for cmd, spec in COMMANDS.items():
        if spec.argsz:
            assert starts_with_argsz(spec), cmd
            assert spec.request is not None and spec.min_argsz == spec.request.SIZE
        else:
            assert spec.min_argsz is None
            if starts_with_argsz(spec):  # only commands answered ENOTSUP leave it unchecked
                assert endpoint._HANDLERS[cmd] is endpoint._unsupported, cmd


def request_with_argsz(cmd: Command, argsz: int) -> codec.Message:
    request = COMMANDS[cmd].request
    assert request is not None
    nfields = len(dataclasses.fields(request))  # type: ignore[arg-type]
    payload = request.STRUCT.pack(argsz, *[0] * (nfields - 1))
    return codec.request(7, cmd, payload)


@pytest.mark.parametrize("cmd", ARGSZ_COMMANDS, ids=lambda c: c.name)
def test_argsz_checked_before_dispatch(monkeypatch: pytest.MonkeyPatch, cmd: Command) -> None:
    calls: list[int] = []

    def handler(ep: Endpoint, msg: codec.Message) -> None:
        calls.append(msg.msg_id)

    monkeypatch.setitem(endpoint._HANDLERS, int(cmd), handler)
    session = Session(state=SessionState.RUNNING)
    table = DmaMapTable()
    device = SampleDevice()
    ep = Endpoint(device, session, table)
    min_argsz = COMMANDS[cmd].min_argsz
    assert min_argsz is not None
    try:
        for argsz in (0, min_argsz - 1):
            reply = ep.handle(request_with_argsz(cmd, argsz))
            assert reply is not None and reply.is_error and reply.error == errno.EINVAL
        assert calls == []
        for argsz in (min_argsz, 0xFFFFFFFF):
            reply = ep.handle(request_with_argsz(cmd, argsz))
            assert reply is not None and not reply.is_error
        assert calls == [7, 7]
    finally:
        table.remove_all()
        device.irqs.close()


def test_a_reply_that_cannot_be_encoded_is_our_bug_eio(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A handler whose reply does not fit its layout gets EIO and a traceback, not EINVAL."""
    from vfio_user_server.protocol.structs import DeviceInfo

    def handler(ep: Endpoint, msg: codec.Message) -> bytes:
        return DeviceInfo(DeviceInfo.SIZE, 0, 1 << 32, 0).pack()  # num_regions > u32

    monkeypatch.setitem(endpoint._HANDLERS, int(Command.DEVICE_GET_INFO), handler)
    table = DmaMapTable()
    device = SampleDevice()
    ep = Endpoint(device, Session(state=SessionState.RUNNING), table)
    try:
        reply = ep.handle(request_with_argsz(Command.DEVICE_GET_INFO, 16))
        assert reply is not None and reply.is_error and reply.error == errno.EIO
        assert any(r.exc_info and "not encodable" in r.getMessage() for r in caplog.records)
    finally:
        table.remove_all()
        device.irqs.close()
