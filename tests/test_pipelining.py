"""Bursts: QEMU pipelines posted writes and DMA maps; the server reads them in big chunks.

Many messages arrive in one read; fds must still go with the message they were sent with (the
last message that starts in the read that brought them), and order must hold.
"""

from __future__ import annotations

import os

from helpers import WAIT, RawPeer, RecordingSample, negotiated

from vfio_user_server.client import Client
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command, HeaderFlag
from vfio_user_server.protocol.structs import DmaMap, RegionAccess
from vfio_user_server.sample import REG_SCRATCH
from vfio_user_server.server import Server


def write_msg(msg_id: int, offset: int, value: int, *, posted: bool) -> bytes:
    payload = RegionAccess(offset, 0, 4).pack() + value.to_bytes(4, "little")
    flags = int(HeaderFlag.NO_REPLY) if posted else 0
    return codec.encode(codec.Message(msg_id, Command.REGION_WRITE, flags, 0, payload))


def test_a_burst_of_posted_writes_in_one_send_is_applied_in_order(
    server: Server, device: RecordingSample
) -> None:
    peer = RawPeer(server.path)
    try:
        peer.send(codec.encode(codec.request(1, Command.VERSION, codec.encode_version(0, 0, {}))))
        peer.recv_message()
        burst = b"".join(write_msg(100 + i, REG_SCRATCH, i, posted=True) for i in range(500))
        read = codec.encode(codec.request(9, Command.REGION_READ,
                                          RegionAccess(REG_SCRATCH, 0, 4).pack()))
        peer.send(burst + read)  # one send: the server sees many messages per read
        reply = peer.recv_message()
        assert reply.msg_id == 9 and not reply.is_error
        assert int.from_bytes(reply.payload[16:], "little") == 499
        writes = [a for a in device.accesses if a[0] == "w" and a[2] == REG_SCRATCH]
        assert [a[4] for a in writes[-500:]] == list(range(500))
    finally:
        peer.close()


def test_fds_go_with_their_message_inside_a_burst(server: Server) -> None:
    peer = RawPeer(server.path)
    fd = os.memfd_create("burst")
    os.ftruncate(fd, 0x2000)
    try:
        peer.send(codec.encode(codec.request(1, Command.VERSION, codec.encode_version(0, 0, {}))))
        peer.recv_message()
        before = b"".join(write_msg(10 + i, REG_SCRATCH, i, posted=True) for i in range(20))
        peer.send(before)
        dma_map = codec.encode(codec.request(
            50, Command.DMA_MAP, DmaMap(DmaMap.SIZE, 3, 0, 0x40000, 0x2000).pack()))
        peer.send(dma_map, fds=[fd])
        peer.send(b"".join(write_msg(60 + i, REG_SCRATCH, i, posted=True) for i in range(20)))
        reply = peer.recv_message()
        assert reply.msg_id == 50 and not reply.is_error, reply
        conn = server.wait_for_client(WAIT)
        [m] = [m for m in conn.table.maps() if m.iova == 0x40000]
        assert m.direct and m.size == 0x2000
    finally:
        os.close(fd)
        peer.close()


def test_client_keeps_working_after_bursts(server: Server) -> None:
    c = negotiated(Client.connect(server.path))
    try:
        for i in range(200):
            c.bar_write(0, REG_SCRATCH, 4, i, posted=True)
        assert c.bar_read(0, REG_SCRATCH, 4) == 199
    finally:
        c.close()
