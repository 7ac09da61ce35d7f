"""Crash recovery's stream rule, state by state (vfio_user_server.supervised's table).

A recovered connection is built over a socketpair whose other end plays the client; the
record a dead process left is given to ``settle()`` as the supervisor hands it over. Each
case checks what the client receives and where the stream goes on: no message is handled
twice, none is skipped, and a reply with a payload is never sent twice.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command, MsgType
from vfio_user_server.protocol.framing import MessageReader
from vfio_user_server.protocol.structs import DmaMap, RegionAccess
from vfio_user_server.sample import REG_ID, REG_SCRATCH, SampleDevice
from vfio_user_server.server import Server
from vfio_user_server.supervised import (
    CONSUMING,
    HANDLING,
    IDLE,
    LOST_ERRNO,
    REPLYING,
    Record,
    SupervisedChild,
    SupervisedConnection,
    read_record,
    settle,
)

HDR = struct.Struct("<HHIII")


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.events, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.record_fd = Record.create()
        self.child = SupervisedChild(theirs.detach(), os.dup(self.record_fd))
        self.device = SampleDevice()
        self.server = Server(self.device, tmp / "s.sock")
        self.client, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn = SupervisedConnection(self.server, mine, self.device, self.child,
                                         recovered=True)
        self.conn.session.state = self.conn.session.state.__class__("running")
        self.reader = MessageReader(1 << 20)
        self.client.settimeout(30)

    def send(self, msg: codec.Message) -> bytes:
        data = codec.encode(msg)
        if msg.fds:
            self.client.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          struct.pack(f"{len(msg.fds)}i", *msg.fds))])
        else:
            self.client.sendall(data)
        return data[:16]

    def recv(self) -> codec.Message:
        while True:
            msg = self.reader.next_message()
            if msg is not None:
                return msg
            self.reader.feed(self.client.recv(65536))

    def nothing_sent(self) -> bool:
        r, _, _ = select.select([self.client], [], [], 0)
        return not r

    def events_sent(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        while True:
            try:
                data, anc, _f, _a = self.events.recvmsg(65536, 1024, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            for _l, _t, fds in anc:
                for fd in struct.unpack(f"{len(fds) // 4}i", fds):
                    os.close(fd)
            out.append(json.loads(data))

    def close(self) -> None:
        self.conn.close()
        self.client.close()
        self.events.close()
        self.child.reporter.sock.close()
        self.child.record.close()
        os.close(self.record_fd)
        self.server.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def read(msg_id: int, offset: int) -> codec.Message:
    return codec.request(msg_id, Command.REGION_READ, RegionAccess(offset, 0, 4).pack())


def write(msg_id: int, offset: int, value: int) -> codec.Message:
    return codec.request(msg_id, Command.REGION_WRITE,
                         RegionAccess(offset, 0, 4).pack() + value.to_bytes(4, "little"))


def value(reply: codec.Message) -> int:
    return int.from_bytes(reply.payload[16:20], "little")


def data_reply_head(req: codec.Message) -> bytes:
    """The header of a REGION_READ's reply (it has a payload)."""
    return HDR.pack(req.msg_id, req.command, 16 + 20, int(MsgType.REPLY), 0)


def test_handling_the_request_is_answered_with_an_error_and_the_next_is_served(
        rig: Rig) -> None:
    head = rig.send(read(7, REG_ID))
    rig.send(read(8, REG_ID))
    settle(rig.conn, HANDLING, head, bytes(16))
    assert rig.nothing_sent()  # the lost request is still in the socket, read next
    rig.conn.handle_one()
    lost = rig.recv()
    assert (lost.msg_id, lost.is_error, lost.error) == (7, True, LOST_ERRNO)
    rig.conn.handle_one()
    ok = rig.recv()
    assert (ok.msg_id, ok.is_error, value(ok)) == (8, False, 0x5A4D0001)


def test_handling_a_write_with_no_reply_is_dropped_not_done(rig: Rig) -> None:
    posted = codec.request(3, Command.REGION_WRITE, RegionAccess(REG_SCRATCH, 0, 4).pack()
                           + (0x77).to_bytes(4, "little"), no_reply=True)
    head = rig.send(posted)
    rig.send(read(4, REG_SCRATCH))
    settle(rig.conn, HANDLING, head, bytes(16))
    rig.conn.handle_one()  # refused silently: it asked for no reply
    rig.conn.handle_one()
    reply = rig.recv()
    assert (reply.msg_id, value(reply)) == (4, 0)  # not written: the device was reset


def test_handling_a_dma_map_the_supervisor_holds_is_answered_ok(rig: Rig) -> None:
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 0x10000)
    rig.conn.table.add(0x100000, 0x10000, 3, os.dup(fd), 0)  # handed over already
    rig.conn.adopted()
    req = codec.request(5, Command.DMA_MAP, DmaMap(DmaMap.SIZE, 3, 0, 0x100000, 0x10000).pack(),
                        [fd])
    head = rig.send(req)
    os.close(fd)
    settle(rig.conn, HANDLING, head, bytes(16))
    rig.conn.handle_one()
    reply = rig.recv()
    assert (reply.msg_id, reply.is_error) == (5, False)
    assert len(rig.conn.table) == 1
    assert not [e for e in rig.events_sent() if e["ev"] in ("map", "unmap")]


def test_handling_a_dma_map_not_held_is_done_again(rig: Rig) -> None:
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 0x10000)
    req = codec.request(5, Command.DMA_MAP, DmaMap(DmaMap.SIZE, 3, 0, 0x100000, 0x10000).pack(),
                        [fd])
    head = rig.send(req)
    os.close(fd)
    settle(rig.conn, HANDLING, head, bytes(16))
    rig.conn.handle_one()
    reply = rig.recv()
    assert (reply.msg_id, reply.is_error) == (5, False)
    assert len(rig.conn.table) == 1
    assert [e["ev"] for e in rig.events_sent()] == ["map"]  # the supervisor gets its fd


def test_consuming_a_message_still_in_the_socket_takes_it_out(rig: Rig) -> None:
    req = read(9, REG_ID)
    head = rig.send(req)
    rig.send(read(10, REG_ID))
    settle(rig.conn, CONSUMING, head, data_reply_head(req))
    lost = rig.recv()  # a reply with data may have been lost: an error, never a second copy
    assert (lost.msg_id, lost.error) == (9, LOST_ERRNO)
    rig.conn.handle_one()
    assert rig.recv().msg_id == 10  # 9 was taken out of the socket, not handled again


def test_consuming_a_message_already_taken_leaves_the_next(rig: Rig) -> None:
    req = read(9, REG_ID)
    head = codec.encode(req)[:16]  # the dead process took it out; only 10 is in the socket
    rig.send(read(10, REG_ID))
    settle(rig.conn, CONSUMING, head, data_reply_head(req))
    assert rig.recv().msg_id == 9
    rig.conn.handle_one()
    nxt = rig.recv()
    assert (nxt.msg_id, nxt.is_error) == (10, False)


def test_replying_header_only_is_sent_again(rig: Rig) -> None:
    req = write(11, REG_SCRATCH, 1)
    head = codec.encode(req)[:16]
    reply = HDR.pack(11, Command.REGION_WRITE, 16, int(MsgType.REPLY), 0)
    settle(rig.conn, REPLYING, head, reply)
    got = rig.recv()
    assert (got.msg_id, got.is_error, got.payload) == (11, False, b"")


def test_replying_with_a_payload_becomes_an_error_reply(rig: Rig) -> None:
    req = read(12, REG_ID)
    settle(rig.conn, REPLYING, codec.encode(req)[:16], data_reply_head(req))
    got = rig.recv()
    assert (got.msg_id, got.is_error, got.error) == (12, True, errno.EIO)


def test_idle_leaves_the_stream_alone(rig: Rig) -> None:
    rig.send(read(13, REG_ID))
    settle(rig.conn, IDLE, bytes(16), bytes(16))
    assert rig.nothing_sent()
    rig.conn.handle_one()
    assert rig.recv().msg_id == 13


def test_the_record_follows_each_message(rig: Rig) -> None:
    rig.send(read(14, REG_ID))
    rig.conn.handle_one()
    rig.recv()
    assert read_record(rig.record_fd)["state"] == IDLE
