"""Bad input over the socket: each case gets an error reply or a clean disconnect, fds that came
with a refused message are closed, and the server keeps serving (the same client after an error
reply, the next client after a disconnect)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import struct
import termios
import threading

import pytest
from helpers import (
    CONFIG,
    WAIT,
    ClientFactory,
    RawPeer,
    RecordingSample,
    ServerFactory,
    close_all,
    device_dma,
    efd,
    negotiated,
    open_fds,
    wait_until,
)

from vfio_user_server.client import QEMU_CAPABILITIES, Client
from vfio_user_server.errors import ConnectionClosed
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import (
    Command,
    HeaderFlag,
    IrqIndex,
    IrqSetFlag,
    MsgType,
)
from vfio_user_server.protocol.session import MAX_MSG_FDS, SCM_MAX_FD, ServerCapabilities
from vfio_user_server.protocol.structs import (
    DeviceInfo,
    DmaMap,
    IrqInfo,
    IrqSet,
    RegionAccess,
    RegionInfo,
)
from vfio_user_server.sample import (
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    ID_VALUE,
    REG_ID,
    REG_SCRATCH,
    REG_WRITES,
    STAT_DONE,
    STAT_ERROR,
)
from vfio_user_server.server import Server

F = IrqSetFlag


# --- helpers ------------------------------------------------------------------------------


def msg(msg_id: int, command: int, payload: bytes = b"", *, flags: int = 0,
        size: int | None = None) -> bytes:
    """A raw message; ``size`` overrides the header's size field."""
    total = 16 + len(payload) if size is None else size
    return codec.encode_header(msg_id, command, total, flags) + payload


def version_msg(msg_id: int = 1) -> bytes:
    return msg(msg_id, Command.VERSION, codec.encode_version(0, 0, QEMU_CAPABILITIES))


def negotiated_peer(server: Server) -> RawPeer:
    peer = RawPeer(server.path)
    peer.send(version_msg())
    reply = peer.recv_message()
    assert reply.msg_id == 1 and not reply.is_error
    return peer


def serves_next_client(server: Server, make_client: ClientFactory) -> None:
    """A new client can connect, negotiate and use the device."""
    c = negotiated(make_client(server))
    assert c.bar_read(0, REG_ID, 4) == ID_VALUE
    c.close()


def expect_disconnect(server: Server, peer: RawPeer, served_before: int) -> None:
    assert peer.at_eof(), "the server did not close the connection"
    peer.close()
    server.wait_for_disconnect(served_before + 1, WAIT)


def probe_fd() -> tuple[int, int]:
    """A pipe: send the write end; the read end sees EOF once every copy is closed."""
    return os.pipe2(os.O_CLOEXEC)


def closed_by_server(read_end: int) -> bool:
    r, _, _ = select.select([read_end], [], [], WAIT)
    return bool(r) and os.read(read_end, 1) == b""


def error_of(peer: RawPeer, msg_id: int) -> int:
    reply = peer.recv_message()
    assert reply.msg_id == msg_id
    assert reply.flags & 0xF == MsgType.REPLY
    assert reply.is_error, "expected an error reply"
    assert reply.payload == b""
    return reply.error


def still_serving(peer: RawPeer, msg_id: int = 500) -> None:
    peer.send(msg(msg_id, Command.REGION_READ, RegionAccess(REG_ID, 0, 4).pack()))
    reply = peer.recv_message()
    assert reply.msg_id == msg_id and not reply.is_error
    assert struct.unpack("<I", reply.payload[16:]) == (ID_VALUE,)


# --- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "payload"), [
    (Command.DEVICE_GET_INFO, b"\x10\0\0\0"),  # shorter than DeviceInfo
    (Command.DEVICE_GET_REGION_INFO, RegionInfo(32, 0, 0, 0, 0, 0).pack()[:20]),
    (Command.DEVICE_GET_IRQ_INFO, IrqInfo(16, 0, 0, 0).pack()[:8]),
    (Command.DEVICE_SET_IRQS, IrqSet(20, F.DATA_NONE | F.ACTION_TRIGGER, 2, 0, 0).pack()[:12]),
    (Command.DMA_MAP, DmaMap(32, 3, 0, 0, 0x1000).pack()[:24]),
    (Command.DMA_UNMAP, b"\x18\0\0\0"),
    (Command.REGION_READ, RegionAccess(0, 0, 4).pack()[:12]),
    (Command.REGION_READ, RegionAccess(0, 0, 4).pack() + b"junk"),  # trailing bytes
    (Command.REGION_WRITE, RegionAccess(4, 0, 4).pack() + b"\0\0"),  # count > data
    (Command.REGION_WRITE, RegionAccess(4, 0, 2).pack() + b"\0\0\0\0"),  # count < data
    (Command.REGION_WRITE_MULTI, b"\x01\0\0"),
    (Command.VERSION, b"\0"),
    (Command.DEVICE_RESET, b"\0"),
])
def test_wrong_sizes(server: Server, make_client: ClientFactory, command: Command,
                     payload: bytes) -> None:
    peer = negotiated_peer(server)
    try:
        peer.send(msg(7, command, payload))
        assert error_of(peer, 7) == errno.EINVAL
        still_serving(peer)
    finally:
        peer.close()
    serves_next_client(server, make_client)


@pytest.mark.parametrize("command", [0, 11, 12, 19, 99, 0xFFFF])
def test_unknown_or_server_only_commands(server: Server, make_client: ClientFactory,
                                         command: int) -> None:
    peer = negotiated_peer(server)
    try:
        peer.send(msg(7, command, b"\0" * 16))
        err = error_of(peer, 7)
        # unknown numbers: ENOSYS; DMA_READ/DMA_WRITE are server->client only: EINVAL
        assert err == (errno.EINVAL if command in (11, 12) else errno.ENOSYS)
        still_serving(peer)
    finally:
        peer.close()
    serves_next_client(server, make_client)


def test_truncated_message_then_eof(server: Server, make_client: ClientFactory) -> None:
    served = server.connections_served
    peer = negotiated_peer(server)
    r, w = probe_fd()
    try:
        # the header promises 64 bytes; 10 come (with an fd), then the client hangs up
        peer.send(msg(3, Command.DEVICE_SET_IRQS, b"\0" * 10, size=64), fds=[w])
        os.close(w)
        peer.sock.shutdown(2)
        peer.close()
        server.wait_for_disconnect(served + 1, WAIT)
        assert closed_by_server(r)
    finally:
        os.close(r)
    serves_next_client(server, make_client)


def test_truncated_header_then_eof(server: Server, make_client: ClientFactory) -> None:
    served = server.connections_served
    peer = negotiated_peer(server)
    peer.send(msg(3, Command.REGION_READ, RegionAccess(0, 0, 4).pack())[:9])
    peer.close()
    server.wait_for_disconnect(served + 1, WAIT)
    serves_next_client(server, make_client)


@pytest.mark.parametrize("size", [0, 1, 15])
def test_header_size_smaller_than_header(server: Server, make_client: ClientFactory,
                                         size: int) -> None:
    served = server.connections_served
    peer = negotiated_peer(server)
    peer.send(msg(3, Command.REGION_READ, RegionAccess(0, 0, 4).pack(), size=size))
    expect_disconnect(server, peer, served)
    serves_next_client(server, make_client)


@pytest.mark.parametrize("size", [(1 << 24) + 16, 0x7FFFFFFF, 0xFFFFFFFF])
def test_huge_size(server: Server, make_client: ClientFactory, size: int) -> None:
    served = server.connections_served
    peer = negotiated_peer(server)
    peer.send(msg(3, Command.REGION_WRITE, RegionAccess(0, 0, 4).pack(), size=size))
    expect_disconnect(server, peer, served)
    serves_next_client(server, make_client)


def test_bad_message_type(server: Server, make_client: ClientFactory) -> None:
    served = server.connections_served
    peer = negotiated_peer(server)
    peer.send(msg(3, Command.REGION_READ, RegionAccess(0, 0, 4).pack(), flags=0x2))
    expect_disconnect(server, peer, served)
    serves_next_client(server, make_client)


# --- regions and offsets ------------------------------------------------------------------


@pytest.mark.parametrize(("region", "offset", "count"), [
    (9, 0, 4),  # no such region
    (100, 0, 4),
    (0xFFFFFFFF, 0, 4),
    (1, 0, 4),  # upper half of a 64-bit BAR: size 0
    (3, 0, 4),  # unused BAR
    (6, 0, 4),  # no ROM
    (8, 0, 4),  # VGA
    (0, 0x4000, 4),  # offset at the end
    (0, 0x3FFC, 8),  # crosses the end
    (0, 1 << 63, 4),  # far out
    (0, 0xFFFFFFFFFFFFFFFC, 8),  # offset + count wraps 2**64
    (2, 0xFE, 4),  # crosses the end of the I/O BAR
    (CONFIG, 4095, 2),  # crosses the end of config space
    (CONFIG, 4096, 1),
    (0, 0, (1 << 20) + 1),  # larger than max_data_xfer_size
])
@pytest.mark.parametrize("write", [False, True])
def test_out_of_range_region_access(server: Server, make_client: ClientFactory, region: int,
                                    offset: int, count: int, write: bool) -> None:
    peer = negotiated_peer(server)
    try:
        if write:
            data = b"\0" * count if count <= 4096 else b""
            body = RegionAccess(offset, region, count).pack() + data
            if not data:
                # a write larger than max_data_xfer_size: only the head, count says more
                body = RegionAccess(offset, region, count).pack()
            peer.send(msg(7, Command.REGION_WRITE, body))
        else:
            peer.send(msg(7, Command.REGION_READ, RegionAccess(offset, region, count).pack()))
        assert error_of(peer, 7) in (errno.EINVAL, errno.E2BIG)
        still_serving(peer)
    finally:
        peer.close()
    serves_next_client(server, make_client)


def test_zero_length_accesses(client: Client) -> None:
    # an empty read or write inside a region is harmless: a reply either way, still serving
    for command, body in ((Command.REGION_READ, RegionAccess(0, 0, 0).pack()),
                          (Command.REGION_READ, RegionAccess(0, CONFIG, 0).pack()),
                          (Command.REGION_WRITE, RegionAccess(4, 0, 0).pack())):
        reply = client.request(command, body, check=False)
        assert reply is not None and reply.payload[:16] in (b"", body)
    assert client.bar_read(0, REG_ID, 4) == ID_VALUE


# --- DMA by the device outside the maps ---------------------------------------------------




@pytest.mark.parametrize("fd_backed", [True, False])
def test_device_dma_outside_maps(client: Client, server: Server, make_client: ClientFactory,
                                 fd_backed: bool) -> None:
    client.add_memory(0x10000, 0x1000, fd_backed=fd_backed)
    for cmd in (DMA_TO_DEVICE, DMA_FROM_DEVICE):
        assert device_dma(client, 0x20000, 64, cmd) == STAT_ERROR  # unmapped
        assert device_dma(client, 0x10FF0, 64, cmd) == STAT_ERROR  # runs off the end
        assert device_dma(client, 0xFFF0, 64, cmd) == STAT_ERROR  # starts before
        assert device_dma(client, (1 << 64) - 16, 64, cmd) == STAT_ERROR  # wraps
        assert device_dma(client, 0x10000, 64, cmd) == STAT_DONE  # and a good one works
    assert client.bar_read(0, REG_ID, 4) == ID_VALUE
    client.close()
    server.wait_for_disconnect(1, WAIT)
    serves_next_client(server, make_client)


def test_client_answers_dma_with_error(make_server: object, make_client: ClientFactory,
                                       device: RecordingSample) -> None:
    # the client's memory map says the address is not there: it answers EFAULT
    assert callable(make_server)
    srv = make_server(device)
    assert isinstance(srv, Server)
    c = negotiated(make_client(srv))
    c.add_memory(0x10000, 0x1000, fd_backed=False)
    c.memory.clear()  # the client forgets it: DMA_READ/WRITE get an error reply
    assert device_dma(c, 0x10000, 64, DMA_TO_DEVICE) == STAT_ERROR
    assert device_dma(c, 0x10000, 64, DMA_FROM_DEVICE) == STAT_ERROR
    assert c.bar_read(0, REG_ID, 4) == ID_VALUE


# --- fds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [MAX_MSG_FDS + 1, SCM_MAX_FD])
def test_more_fds_than_advertised(server: Server, count: int) -> None:
    # a read takes every fd one sendmsg can carry, so none is lost: more than the advertised
    # max_msg_fds is an error reply, and every fd is closed
    peer = RawPeer(server.path)
    peer.send(version_msg())
    _, _, caps = codec.decode_version(peer.recv_message().payload)
    assert caps["max_msg_fds"] == MAX_MSG_FDS
    baseline = open_fds()  # before ours: the fd listing the folder takes the lowest free one
    fds = [efd() for _ in range(count)]
    try:
        body = IrqSet(20, F.DATA_EVENTFD | F.ACTION_TRIGGER, IrqIndex.MSIX, 0, count).pack()
        peer.send(msg(3, Command.DEVICE_SET_IRQS, body), fds=fds)
    finally:
        close_all(fds)
    try:
        assert error_of(peer, 3) == errno.EINVAL
        wait_until(lambda: open_fds() <= baseline, what="fds of the refused message closed")
        still_serving(peer)
    finally:
        peer.close()


def test_the_advertised_limits_are_the_enforced_ones(make_server: ServerFactory,
                                                   make_client: ClientFactory) -> None:
    # a server with its own limits says them in VERSION and holds a client to them
    caps = ServerCapabilities(max_msg_fds=3, max_data_xfer_size=4096)
    server = make_server(caps=caps)
    peer = RawPeer(server.path)
    try:
        peer.send(version_msg())
        _, _, said = codec.decode_version(peer.recv_message().payload)
        assert (said["max_msg_fds"], said["max_data_xfer_size"]) == (3, 4096)
        flags = F.DATA_EVENTFD | F.ACTION_TRIGGER
        for msg_id, count in ((2, 3), (3, 4)):
            fds = [efd() for _ in range(count)]
            try:
                body = IrqSet(20, flags, IrqIndex.MSIX, 0, count).pack()
                peer.send(msg(msg_id, Command.DEVICE_SET_IRQS, body), fds=fds)
            finally:
                close_all(fds)
            reply = peer.recv_message()
            assert reply.msg_id == msg_id
            assert reply.is_error == (count > 3)
        for count, err in ((4096, 0), (4097, errno.E2BIG)):
            peer.send(msg(4, Command.REGION_READ, RegionAccess(0, CONFIG, count).pack()))
            reply = peer.recv_message()
            assert reply.error == err
        # a header announcing more than the limit (data + MESSAGE_OVERHEAD) drops the client
        served = server.connections_served
        peer.send(msg(5, Command.REGION_WRITE, size=caps.max_message_size + 1))
        expect_disconnect(server, peer, served)
    finally:
        peer.close()
    serves_next_client(server, make_client)


@pytest.mark.parametrize(("command", "payload"), [
    (Command.DEVICE_GET_INFO, DeviceInfo(16, 0, 0, 0).pack()),
    (Command.DEVICE_GET_REGION_INFO, RegionInfo(32, 0, 0, 0, 0, 0).pack()),
    (Command.DEVICE_GET_IRQ_INFO, IrqInfo(16, 0, 0, 0).pack()),
    (Command.REGION_READ, RegionAccess(0, 0, 4).pack()),
    (Command.REGION_WRITE, RegionAccess(4, 0, 4).pack() + b"\0\0\0\0"),
    (Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 2, 0, 0)),
    (Command.DEVICE_RESET, b""),
    (Command.VERSION, codec.encode_version(0, 0, {})),
    (Command.DEVICE_SET_IRQS, IrqSet(20, F.DATA_NONE | F.ACTION_TRIGGER, 2, 0, 0).pack()),
    (Command.DEVICE_FEATURE, struct.pack("<II", 8, 1 | 1 << 16)),
    (Command.REGION_WRITE_MULTI, struct.pack("<Q", 0)),
    (99, b""),
])
def test_fds_on_commands_that_take_none(server: Server, command: int, payload: bytes) -> None:
    peer = negotiated_peer(server)
    r, w = probe_fd()
    try:
        peer.send(msg(7, command, payload), fds=[w])
        os.close(w)
        err = error_of(peer, 7)
        assert err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP)
        assert closed_by_server(r), "the server kept the fd"
        still_serving(peer)
    finally:
        os.close(r)
        peer.close()


def test_dma_map_with_two_fds(server: Server) -> None:
    peer = negotiated_peer(server)
    pipes = [probe_fd() for _ in range(2)]
    try:
        peer.send(msg(7, Command.DMA_MAP, DmaMap(32, 3, 0, 0, 0x1000).pack()),
                  fds=[w for _, w in pipes])
        for _, w in pipes:
            os.close(w)
        assert error_of(peer, 7) == errno.EINVAL
        assert all(closed_by_server(r) for r, _ in pipes)
        still_serving(peer)
    finally:
        for r, _ in pipes:
            os.close(r)
        peer.close()


def _queued(peer: RawPeer) -> int:
    """Bytes ``peer`` sent that the server has not read yet (SIOCOUTQ of a UNIX socket)."""
    out = fcntl.ioctl(peer.sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", out)[0])


_MIDDLE = msg(3, Command.REGION_WRITE, RegionAccess(REG_SCRATCH, 0, 4).pack() + b"\1\2\3\4")


def test_fds_in_the_middle_of_a_message(server: Server, make_client: ClientFactory) -> None:
    # The rule (protocol/framing.py): a read's fds belong to the last message that starts in
    # it. Whether the kernel hands the server the header and the fd-carrying rest in one read
    # or two is not ours to choose, so this asserts what holds either way: the write is refused
    # (an EINVAL reply: the fd came with the message, which takes none; or a disconnect: the
    # fd came in the middle of it), the fd is closed, the server serves on. The two cases are
    # pinned down one by one below, and the rule itself in tests/test_framing.py.
    device = server.device
    assert isinstance(device, RecordingSample)
    served = server.connections_served
    peer = negotiated_peer(server)
    r, w = probe_fd()
    try:
        peer.send(_MIDDLE[:16])
        peer.send(_MIDDLE[16:], fds=[w])
        os.close(w)
        try:
            refused = error_of(peer, 3)
        except (ConnectionClosed, ConnectionResetError):
            expect_disconnect(server, peer, served)
        else:
            assert refused == errno.EINVAL
            still_serving(peer)
            peer.close()
        assert closed_by_server(r)
        assert device.scratch == 0, "the refused write was applied"
    finally:
        os.close(r)
    serves_next_client(server, make_client)


def test_fds_after_the_header_was_read_drop_the_client(server: Server,
                                                       make_client: ClientFactory) -> None:
    # the server has read the header (nothing of ours is left queued) when the rest comes with
    # an fd: fds in the middle of a message, a framing error
    served = server.connections_served
    peer = negotiated_peer(server)
    r, w = probe_fd()
    try:
        peer.send(_MIDDLE[:16])
        wait_until(lambda: _queued(peer) == 0, what="the server to read the header")
        peer.send(_MIDDLE[16:], fds=[w])
        os.close(w)
        expect_disconnect(server, peer, served)
        assert closed_by_server(r)
    finally:
        os.close(r)
    serves_next_client(server, make_client)


class _GatedSample(RecordingSample):
    """Reading REG_WRITES blocks the loop thread until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar == 0 and offset == REG_WRITES:
            self.entered.set()
            assert self.gate.wait(WAIT)
        return super().bar_read(bar, offset, size)


def test_fds_read_with_their_header_bind_to_the_message(make_server: ServerFactory) -> None:
    # both parts are queued while the loop thread is busy, so one read takes them: the fd
    # came in the read where the message starts and is its fd; the message takes none
    device = _GatedSample()
    server = make_server(device)
    peer = negotiated_peer(server)
    r, w = probe_fd()
    try:
        peer.send(msg(2, Command.REGION_READ, RegionAccess(REG_WRITES, 0, 4).pack()))
        assert device.entered.wait(WAIT)
        peer.send(_MIDDLE[:16])
        peer.send(_MIDDLE[16:], fds=[w])
        os.close(w)
        device.gate.set()
        assert not peer.recv_message().is_error
        assert error_of(peer, 3) == errno.EINVAL
        assert closed_by_server(r)
        assert device.scratch == 0
        still_serving(peer)
    finally:
        device.gate.set()
        os.close(r)
        peer.close()


def test_reply_sent_as_request(server: Server, make_client: ClientFactory) -> None:
    # a reply nobody asked for is dropped (with its fds); the connection goes on
    peer = negotiated_peer(server)
    r, w = probe_fd()
    try:
        for flags in (MsgType.REPLY, MsgType.REPLY | HeaderFlag.ERROR):
            peer.send(msg(9, Command.REGION_READ, RegionAccess(0, 0, 4).pack(), flags=flags))
        peer.send(msg(10, Command.DMA_READ, struct.pack("<QQ", 0, 4) + b"abcd",
                      flags=MsgType.REPLY), fds=[w])
        os.close(w)
        assert closed_by_server(r)
        still_serving(peer, 11)
    finally:
        os.close(r)
        peer.close()
    serves_next_client(server, make_client)


# --- session order ------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "payload"), [
    (Command.DEVICE_GET_INFO, DeviceInfo(16, 0, 0, 0).pack()),
    (Command.DMA_MAP, DmaMap(32, 3, 0, 0, 0x1000).pack()),
    (Command.REGION_READ, RegionAccess(0, 0, 4).pack()),
    (Command.DEVICE_RESET, b""),
])
def test_commands_before_version(server: Server, make_client: ClientFactory, command: int,
                                 payload: bytes) -> None:
    peer = RawPeer(server.path)
    try:
        peer.send(msg(5, command, payload))
        assert error_of(peer, 5) == errno.EINVAL
        # nothing happened, and VERSION still works
        assert len(server.wait_for_client(WAIT).table) == 0
        peer.send(version_msg(6))
        assert not peer.recv_message().is_error
        still_serving(peer)
    finally:
        peer.close()
    serves_next_client(server, make_client)


def test_posted_command_before_version_gets_no_reply(server: Server) -> None:
    peer = RawPeer(server.path)
    try:
        peer.send(msg(5, Command.REGION_WRITE, RegionAccess(4, 0, 4).pack() + b"\0" * 4,
                      flags=HeaderFlag.NO_REPLY))
        peer.send(version_msg(6))
        assert peer.recv_message().msg_id == 6
    finally:
        peer.close()


def test_second_version(client: Client, device: RecordingSample) -> None:
    reply = client.request(Command.VERSION, codec.encode_version(0, 0, QEMU_CAPABILITIES),
                           check=False)
    assert reply is not None and reply.is_error and reply.error == errno.EINVAL
    assert device.events == ["connect"]
    assert client.bar_read(0, REG_ID, 4) == ID_VALUE


def _json(doc: object) -> bytes:
    return struct.pack("<HH", 0, 0) + json.dumps(doc).encode() + b"\0"


@pytest.mark.parametrize("payload", [
    struct.pack("<HH", 0, 0) + b"{not json}\0",
    struct.pack("<HH", 0, 0) + b'{"capabilities": {}}',  # no NUL
    struct.pack("<HH", 0, 0) + b"\xff\xfe\0",  # not UTF-8
    _json([1, 2]),
    _json({"capabilities": 5}),
    _json({"capabilities": {"max_msg_fds": -1}}),
    _json({"capabilities": {"max_msg_fds": "16"}}),
    _json({"capabilities": {"max_msg_fds": True}}),
    _json({"capabilities": {"max_data_xfer_size": 0}}),
    _json({"capabilities": {"max_data_xfer_size": 4.5}}),
])
def test_bad_version_json(server: Server, make_client: ClientFactory, payload: bytes) -> None:
    peer = RawPeer(server.path)
    try:
        peer.send(msg(5, Command.VERSION, payload))
        assert error_of(peer, 5) == errno.EINVAL
        peer.send(version_msg(6))
        assert not peer.recv_message().is_error
        still_serving(peer)
    finally:
        peer.close()
    serves_next_client(server, make_client)


@pytest.mark.parametrize(("flags", "count", "data"), [
    (0, 1, b""),  # neither
    (F.DATA_NONE | F.DATA_EVENTFD | F.ACTION_TRIGGER, 1, b""),
    (F.DATA_NONE | F.ACTION_MASK | F.ACTION_TRIGGER, 1, b""),
    (F.DATA_BOOL | F.ACTION_TRIGGER, 4, b"\1"),  # too little bool data
    (F.DATA_NONE | F.ACTION_TRIGGER | 1 << 6, 1, b""),
    (0xFFFFFFFF, 1, b""),
    (F.DATA_NONE | F.ACTION_TRIGGER, 0xFFFFFFFF, b""),
])
def test_invalid_set_irqs(client: Client, device: RecordingSample, flags: int, count: int,
                          data: bytes) -> None:
    fds = client.enable_irq(IrqIndex.MSIX, 4)
    try:
        before = device.irqs.state(IrqIndex.MSIX)
        reply = client.request(
            Command.DEVICE_SET_IRQS,
            IrqSet(20 + len(data), flags, IrqIndex.MSIX, 0, count).pack() + data, check=False)
        assert reply is not None and reply.is_error and reply.error == errno.EINVAL
        assert device.irqs.state(IrqIndex.MSIX) == before
        assert client.bar_read(0, REG_ID, 4) == ID_VALUE
    finally:
        close_all(fds)


def test_set_irqs_argsz_too_small(client: Client) -> None:
    reply = client.request(Command.DEVICE_SET_IRQS,
                           IrqSet(8, F.DATA_NONE | F.ACTION_TRIGGER, 2, 0, 0).pack(), check=False)
    assert reply is not None and reply.is_error and reply.error == errno.EINVAL
