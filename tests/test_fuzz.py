"""Random input never crashes the server: every message gets a reply, an error or a hang-up.

Property tests over the endpoint (all commands, flags and payloads, in every session state)
and over a real socket (arbitrary byte streams), after which the server still serves the next
client.
"""

from __future__ import annotations

import socket
import struct

from helpers import negotiated, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfio_user_server.client import Client
from vfio_user_server.dma import DmaMapTable
from vfio_user_server.endpoint import Endpoint
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command
from vfio_user_server.protocol.session import Session, SessionState
from vfio_user_server.protocol.structs import COMMANDS
from vfio_user_server.sample import ID_VALUE, REG_ID, SampleDevice
from vfio_user_server.server import Server

DEVICE = SampleDevice()

commands = st.one_of(st.sampled_from([int(c) for c in Command]), st.integers(0, 0xFFFF))
# payloads that start like the command's structure often, and are random otherwise
payloads = st.binary(max_size=96)


def structured_payload(command: int, raw: bytes, fields: list[int]) -> bytes:
    try:
        spec = COMMANDS[Command(command)]
    except (ValueError, KeyError):
        return raw
    if spec.request is None:
        return raw
    fmt = spec.request.STRUCT.format
    values = []
    for i, ch in enumerate(fmt.lstrip("<")):
        v = fields[i % len(fields)] if fields else 0
        values.append(v.to_bytes(8, "little") if ch == "s" else v & {
            "H": 0xFFFF, "I": 0xFFFFFFFF, "Q": (1 << 64) - 1}[ch])
    return struct.pack(fmt, *values) + raw


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    state=st.sampled_from(list(SessionState)),
    command=commands,
    flags=st.integers(0, 0xFFFFFFFF),
    raw=payloads,
    fields=st.lists(st.one_of(st.integers(0, 64), st.integers(0, (1 << 64) - 1)), max_size=6),
    structured=st.booleans(),
)
def test_endpoint_answers_anything(state: SessionState, command: int, flags: int, raw: bytes,
                                   fields: list[int], structured: bool) -> None:
    session = Session()
    session.state = state
    table = DmaMapTable()
    try:
        endpoint = Endpoint(DEVICE, session, table)
        payload = structured_payload(command, raw, fields) if structured else raw
        msg = codec.Message(1, command, flags, 0, payload, [])
        reply = endpoint.handle(msg)  # must not raise
        if reply is not None:
            assert reply.msg_id == 1 and reply.command == command and reply.is_reply
            assert not msg.no_reply
    finally:
        table.remove_all()
        DEVICE.irqs.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(stream=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=8))
def test_server_survives_random_streams(server: Server, stream: list[bytes]) -> None:
    # the previous example's client must be gone first: one client at a time
    wait_until(lambda: server.connection is None, what="the last client to leave")
    served = server.connections_served
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(server.path))
    sock.settimeout(5)
    try:
        version = codec.encode(codec.request(0, Command.VERSION, codec.encode_version(0, 0, {})))
        sock.sendall(version)
        for chunk in stream:
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server hung up on us: allowed
    finally:
        sock.close()
    server.wait_for_disconnect(served + 1, 10)
    c = negotiated(Client.connect(server.path))
    try:
        assert c.bar_read(0, REG_ID, 4) == ID_VALUE
    finally:
        c.close()
