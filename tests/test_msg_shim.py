"""The C shim on the message path (vfio_user_server.msgshim, c_shim/msg.c) against the Python
reference: the same random byte-and-fd streams, split into arbitrary reads, give both readers
the same messages, the same errors and the same fds back; random REGION accesses (good and bad)
get the same replies and the same device calls from a server on the fast path and one on the
Python path.

These run whether or not PYVFIO_NO_SHIM is set (it only chooses what a server uses); without
a built shim they are skipped, and ci/test builds it.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers import WAIT, RawPeer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_framing import Stream, per_send, reads_of, streams

from vfio_user_server import msgshim
from vfio_user_server.endpoint import Region, VfioDevice
from vfio_user_server.errors import FramingError, VfioUserError
from vfio_user_server.irq import IrqController
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import HEADER_SIZE, Command, HeaderFlag, MsgType
from vfio_user_server.protocol.framing import MessageReader
from vfio_user_server.protocol.session import (
    MAX_DATA_XFER_SIZE,
    SCM_MAX_FD,
    ServerCapabilities,
    max_message_size,
)
from vfio_user_server.protocol.structs import DeviceInfo, RegionAccess
from vfio_user_server.server import Server

shim = pytest.importorskip("vfio_user_server._msg_shim")

#: ``PYVFIO_SHIM_EXAMPLES=N`` runs N times the parity tests' examples (the sanitizer runs,
#: docs/reliability.md); CI runs them once.
SCALE = max(1, int(os.environ.get("PYVFIO_SHIM_EXAMPLES", "1")))

Reader = MessageReader | msgshim.ShimMessageReader
MakeReader = Callable[[int], Reader]


def python_reader(max_size: int) -> Reader:
    return MessageReader(max_size)


def c_reader(max_size: int) -> Reader:
    return msgshim.ShimMessageReader(max_size, shim)


# --- the two readers, fed the same reads ----------------------------------------------------

Seen = tuple[list[tuple[Any, ...]], str | None, list[int], list[tuple[int, bool]], Any]


def run(make: MakeReader, stream: Stream, cuts: set[int], max_size: int) -> Seen:
    """Feed the reads as a transport does; everything the reader says on the way."""
    reader = make(max_size)
    got: list[tuple[Any, ...]] = []
    looks: list[tuple[int, bool]] = []
    error = None
    exported = None
    for data, fds in reads_of(stream, cuts):
        try:
            reader.feed(data, list(fds))
        except FramingError as exc:  # fds without bytes: the feed itself breaks the stream
            error = error or str(exc)
        looks.append((reader.pending_bytes(), reader.has_message()))
        try:
            while error is None and (m := reader.next_message()) is not None:
                got.append((m.msg_id, m.command, m.flags, m.error, m.payload, m.fds))
                looks.append((reader.pending_bytes(), reader.has_message()))
        except FramingError as exc:
            error = str(exc)
        if exported is None and reader.pending_bytes():
            exported = reader.export_pending()
    if error is not None:  # and again on every later call
        with pytest.raises(FramingError, match=r"."):
            reader.next_message()
    return got, error, sorted(reader.take_fds()), looks, exported


@settings(max_examples=300 * SCALE, deadline=None)
@given(st.one_of(streams(regular=True), streams(regular=False)),
       st.sets(st.integers(1, 600), max_size=40))
def test_both_readers_give_the_same_messages_errors_and_fds(
        case: tuple[Stream, int], cuts: set[int]) -> None:
    stream, max_size = case
    for split in (cuts, per_send(stream), set(range(len(stream.data)))):
        assert run(c_reader, stream, split, max_size) == run(python_reader, stream, split,
                                                             max_size)


@settings(max_examples=100 * SCALE, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=40), st.lists(st.integers(0, 50), max_size=3)),
                max_size=12),
       st.integers(0, 200))
def test_fds_without_bytes_and_any_bytes_agree(reads: list[tuple[bytes, list[int]]],
                                               max_size: int) -> None:
    """Unstructured reads (fds with no bytes among them): the same outcome, fd for fd."""
    outcomes = []
    for make in (python_reader, c_reader):
        reader = make(max_size)
        seen: list[Any] = []
        for data, fds in reads:
            try:
                reader.feed(data, list(fds))
                while (m := reader.next_message()) is not None:
                    seen.append((m.msg_id, m.command, m.payload, m.fds))
            except FramingError as exc:
                seen.append(str(exc))
        outcomes.append((seen, reader.take_fds(), reader.pending_bytes()))
    assert outcomes[0] == outcomes[1]


def test_export_and_import_carry_the_same_messages_across_readers() -> None:
    msgs = [codec.encode_header(i, Command.REGION_WRITE, HEADER_SIZE + 8, 0) + bytes(8)
            for i in range(3)]
    stream = b"".join(msgs)
    for make_old, make_new in ((python_reader, c_reader), (c_reader, python_reader)):
        old = make_old(1 << 20)
        old.feed(stream[:20], [5])
        old.feed(stream[20:40], [6])
        assert old.next_message() is not None
        data, marks = old.export_pending()
        new = make_new(1 << 20)
        new.import_pending(data, marks)
        new.feed(stream[40:])
        assert [(m.msg_id, m.fds) for m in iter(new.next_message, None)] == [(1, [6]), (2, [])]
        new.feed(b"\0")  # a reader with bytes of its own takes no more
        with pytest.raises(ValueError, match="fresh"):
            new.import_pending(data, [])


def test_the_size_limit_can_change_after_negotiation() -> None:
    reader = c_reader(64)
    big = codec.encode_header(1, Command.REGION_READ, 100, 0) + bytes(84)
    reader.max_size = 128
    reader.feed(big)
    assert reader.max_size == 128 and reader.next_message() is not None


def test_the_wire_numbers_of_the_shim_are_the_protocols() -> None:
    lib = shim.lib
    assert lib.PYVFIO_HEADER_SIZE == HEADER_SIZE
    assert lib.PYVFIO_ACCESS_SIZE == RegionAccess.SIZE
    assert lib.PYVFIO_CMD_REGION_READ == Command.REGION_READ
    assert lib.PYVFIO_CMD_REGION_WRITE == Command.REGION_WRITE
    assert lib.PYVFIO_FLAG_NO_REPLY == HeaderFlag.NO_REPLY
    assert lib.PYVFIO_SCM_MAX_FD == SCM_MAX_FD


def test_the_socket_read_takes_fds_and_reports_the_end() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        reader = msgshim.ShimMessageReader(1 << 20, shim)
        msg = codec.encode_header(7, Command.DMA_MAP, HEADER_SIZE + 4, 0) + b"abcd"
        socket.send_fds(a, [msg], [r])
        special = reader.recv(b.fileno())
        assert special is not None
        nbytes, fds, flags = special
        assert nbytes == len(msg) and len(fds) == 1 and flags == 0
        reader.commit()
        got = reader.next_message()
        assert got is not None and got.msg_id == 7 and got.fds == fds
        os.close(fds[0])
        a.sendall(msg)
        assert reader.recv(b.fileno()) is None  # bytes only: taken at once
        got = reader.next_message()
        assert got is not None and got.payload == b"abcd" and got.fds == []
        a.close()
        assert reader.recv(b.fileno()) == (0, [], 0)  # the end of the stream
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


@pytest.mark.parametrize("make", [python_reader, c_reader])
@pytest.mark.parametrize("size,flags", [(1 << 20, 0), (8, 0), (100, 3)])
def test_a_refused_header_is_an_error_waiting(make: MakeReader, size: int, flags: int) -> None:
    """has_message() is true once a refused header is in: the server's upgradable loop asks it
    before it blocks, so a client that sends a huge header and stalls is dropped at once."""
    reader = make(4096)
    reader.feed(codec.encode_header(1, Command.REGION_READ, size, flags))
    assert reader.has_message()
    with pytest.raises(FramingError):
        reader.next_message()


def test_a_client_stream_never_grows_the_buffer_past_the_largest_message() -> None:
    """The shim reads the socket straight into its buffer: however the client's messages fall
    into reads, the buffer never grows past max(the size limit, the first buffer)."""
    limit = max_message_size(MAX_DATA_XFER_SIZE)
    sizes = [limit, HEADER_SIZE, limit - 1, 70_000, limit, 3 * HEADER_SIZE] * 3
    msgs = [codec.encode_header(i, Command.REGION_WRITE, n, 0) + bytes(n - HEADER_SIZE)
            for i, n in enumerate(sizes)]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender = threading.Thread(target=a.sendall, args=(b"".join(msgs),), daemon=True)
    sender.start()
    try:
        reader = msgshim.ShimMessageReader(limit, shim)
        got: list[int] = []
        biggest = 0
        while len(got) < len(msgs):
            m = reader.next_message()
            if m is None:
                assert reader.recv(b.fileno()) is None
                biggest = max(biggest, int(reader._r.cap))
            else:
                got.append(m.msg_id)
        assert got == list(range(len(msgs)))
        assert biggest <= max(limit, 256 * 1024)
    finally:
        sender.join(WAIT)
        a.close()
        b.close()


def test_the_path_is_chosen_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVFIO_NO_SHIM", "1")
    assert isinstance(msgshim.new_reader(100), MessageReader)
    assert msgshim.path_name().startswith("python")
    monkeypatch.setenv("PYVFIO_NO_SHIM", "0")
    assert isinstance(msgshim.new_reader(100), msgshim.ShimMessageReader)
    assert msgshim.path_name() == "c-shim"
    assert isinstance(msgshim.new_reader(100, shim=False), MessageReader)


# --- the fast path against the Python path ------------------------------------------------------


class Regions(VfioDevice):
    """Regions of every kind, with handlers that record their calls and fail on purpose."""

    def __init__(self) -> None:
        self.irqs = IrqController(intx=True, msi_vectors=0, msix_vectors=0)
        self.calls: list[tuple[Any, ...]] = []
        self.mem = bytearray(0x100)
        self._regions = {
            0: Region(0x100, read=self._read, write=self._write),
            1: Region(0x40, read=self._read),  # read-only
            2: Region(0x40, write=self._write),  # write-only
            3: Region(0, read=self._read, write=self._write),  # empty
            6: Region(0x30, read=lambda off, n: bytes(self.mem[off:off + n]),
                      allow_short_read=True),  # the ROM: short reads past its end
            7: Region(0x100, read=self._read, write=self._write),
        }

    def _read(self, offset: int, count: int) -> bytes:
        self.calls.append(("read", offset, count))
        if offset == 0x80:
            raise VfioUserError("refused", errno=errno.EACCES)
        if offset == 0x90:
            raise ValueError("a bug in the device")
        if offset == 0xA0:
            return bytes(count + 1)  # the wrong length
        return bytes(self.mem[offset:offset + count])

    def _write(self, offset: int, data: bytes) -> None:
        self.calls.append(("write", offset, data))
        if offset == 0x80:
            raise VfioUserError("refused", errno=errno.EPERM)
        if offset == 0x90:
            raise KeyError("a bug in the device")
        self.mem[offset:offset + len(data)] = data

    def regions(self) -> Mapping[int, Region]:
        return self._regions

    def vfio_reset(self) -> None:
        self.calls.append(("reset",))


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, tuple[Server,
                                                                                   Regions]]]:
    tmp = tmp_path_factory.mktemp("fast")
    caps = ServerCapabilities(max_data_xfer_size=0x200)  # a limit the accesses can cross
    out = {}
    for fast in (True, False):
        dev = Regions()
        srv = Server(dev, Path(tmp, f"{fast}.sock"), caps=caps, shim=fast).start()
        out[fast] = (srv, dev)
    yield out
    for srv, _dev in out.values():
        srv.close()


READ, WRITE = int(Command.REGION_READ), int(Command.REGION_WRITE)
access = st.tuples(
    st.sampled_from([READ, WRITE]),
    st.sampled_from([0, 1, 2, 3, 4, 6, 7, 8, 9, 16, 0xFFFFFFFF]),  # region
    st.one_of(st.sampled_from([0, 0x2E, 0x3C, 0x80, 0x90, 0xA0, 0xFC, 0x100, 2**64 - 4]),
              st.integers(0, 0x110)),  # offset
    st.sampled_from([0, 1, 2, 4, 8, 0x10, 0x101, 0x201, 0xFFFFFFFF]),  # count
    st.sampled_from([0, int(HeaderFlag.NO_REPLY), int(MsgType.REPLY), int(HeaderFlag.ERROR),
                     0x40]),  # flags
    st.sampled_from([0, 0, 0, 1, -1]),  # bytes more or fewer than the count says
)


def exchange(path: Path, negotiate: bool, accesses: list[tuple[int, ...]]) -> list[Any]:
    """Send the accesses in one burst, then a read whose reply ends them; every reply."""
    peer = RawPeer(path)
    try:
        replies: list[Any] = []
        if negotiate:
            caps = {"max_msg_fds": 16, "max_data_xfer_size": MAX_DATA_XFER_SIZE}
            peer.send(codec.encode(codec.request(0, Command.VERSION,
                                                 codec.encode_version(0, 0, caps))))
            peer.send(codec.encode(codec.request(0, Command.DEVICE_GET_INFO,
                                                 DeviceInfo(16, 0, 0, 0).pack())))
            replies += [peer.recv_message(), peer.recv_message()]
        burst = b""
        for i, (cmd, region, offset, count, flags, more) in enumerate(accesses):
            payload = RegionAccess(offset, region, count).pack()
            if cmd == WRITE:
                payload += bytes(range(max(0, min(count, 0x210) + more) % 256))[:0x210]
            elif more > 0:
                payload += b"x"
            burst += codec.encode(codec.Message(i + 1, cmd, flags, 0, payload))
        end = 0xFFFF
        burst += codec.encode(codec.request(end, READ, RegionAccess(0, 7, 4).pack()))
        peer.send(burst)
        while True:
            m = peer.recv_message()
            replies.append((m.msg_id, m.command, m.flags, m.error, m.payload))
            if m.msg_id == end:
                return replies
    finally:
        peer.close()


@settings(max_examples=120 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.booleans(), st.lists(access, max_size=12))
def test_fast_path_and_python_path_answer_alike(
        servers: dict[bool, tuple[Server, Regions]], negotiate: bool,
        accesses: list[tuple[int, ...]]) -> None:
    outcomes = []
    for fast in (True, False):
        srv, dev = servers[fast]
        dev.calls.clear()
        dev.mem[:] = bytes(len(dev.mem))
        served = srv.connections_served
        replies = exchange(srv.path, negotiate, accesses)
        srv.wait_for_disconnect(served + 1, timeout=30)
        outcomes.append((replies, dev.calls[:], bytes(dev.mem)))
    assert outcomes[0] == outcomes[1]


def test_the_fast_path_serves_accesses_without_the_endpoint(
        servers: dict[bool, tuple[Server, Regions]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof that the fast path runs: the endpoint is not called for a good access."""
    srv, _dev = servers[True]
    handled: list[int] = []
    real = msgshim.FastPath.handle_one

    def counting(self: msgshim.FastPath) -> codec.Message | None:
        msg = real(self)
        handled.append(-1 if msg is None else msg.command)
        return msg

    monkeypatch.setattr(msgshim.FastPath, "handle_one", counting)
    served = srv.connections_served
    replies = exchange(srv.path, True, [(WRITE, 0, 8, 4, 0, 0), (READ, 0, 8, 4, 0, 0)])
    value = struct.unpack_from("<I", replies[-2][4], RegionAccess.SIZE)[0]
    assert value == 0x03020100
    srv.wait_for_disconnect(served + 1, timeout=30)  # the last access counted
    assert handled == [Command.VERSION, Command.DEVICE_GET_INFO, -1, -1, -1]
    assert max_message_size(0x200) == srv.caps.max_message_size
