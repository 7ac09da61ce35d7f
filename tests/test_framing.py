"""The one message reader (protocol/framing.py), sans-IO: explicit feeds for each rule, and
hypothesis feeding the same byte-and-fd streams split every way the kernel may split them.

fds here are plain numbers (the reader never closes one: it hands back what it does not
deliver), so the tests can check that every fd fed comes out exactly once.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import threading
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfio_user_server.client import Client
from vfio_user_server.errors import ClientError, ConnectionClosed, FramingError, ProtocolError
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import HEADER_SIZE, Command, HeaderFlag, MsgType
from vfio_user_server.protocol.framing import MessageReader, decode_header
from vfio_user_server.protocol.session import (
    MAX_DATA_XFER_SIZE,
    MAX_MSG_FDS,
    SCM_MAX_FD,
    ServerCapabilities,
    max_message_size,
)
from vfio_user_server.protocol.structs import Header
from vfio_user_server.transport import check_read

LIMIT = max_message_size(MAX_DATA_XFER_SIZE)


def wire(msg_id: int, command: int = Command.REGION_WRITE, payload: bytes = b"", *,
         flags: int = 0, size: int | None = None) -> bytes:
    total = HEADER_SIZE + len(payload) if size is None else size
    return codec.encode_header(msg_id, command, total, flags) + payload


def drain(reader: MessageReader) -> list[codec.Message]:
    out = []
    while (m := reader.next_message()) is not None:
        out.append(m)
    return out


# --- the rules, one explicit feed at a time ------------------------------------------------


def test_messages_in_any_pieces() -> None:
    a, b = wire(1, payload=b"abcd"), wire(2, payload=b"")
    reader = MessageReader(LIMIT)
    for byte in a + b:
        reader.feed(bytes([byte]))
    got = drain(reader)
    assert [(m.msg_id, m.payload) for m in got] == [(1, b"abcd"), (2, b"")]
    assert reader.pending_bytes() == 0 and reader.take_fds() == []


def test_fds_bind_to_the_message_that_starts_in_their_read() -> None:
    a, b = wire(1, payload=b"x" * 8), wire(2, payload=b"y" * 8)
    reader = MessageReader(LIMIT)
    reader.feed(a + b[:5], [100])  # a whole, b starts here: the fds are b's
    reader.feed(b[5:])
    first, second = drain(reader)
    assert first.fds == [] and second.fds == [100]


def test_fds_bind_to_a_message_whose_rest_comes_later() -> None:
    a = wire(1, payload=b"x" * 40)
    reader = MessageReader(LIMIT)
    reader.feed(a[:3], [7, 8])  # not even the whole header
    assert reader.next_message() is None
    reader.feed(a[3:30])
    assert reader.next_message() is None
    reader.feed(a[30:])
    assert drain(reader)[0].fds == [7, 8]


def test_a_read_from_inside_one_message_into_the_next_gives_the_next_its_fds() -> None:
    a, b = wire(1, payload=b"x" * 8), wire(2, payload=b"y" * 8)
    reader = MessageReader(LIMIT)
    reader.feed(a[:10])
    reader.feed(a[10:] + b[:1], [4])  # starts inside a, but b starts in it: b's fds
    reader.feed(b[1:])
    assert [m.fds for m in drain(reader)] == [[], [4]]


def test_a_read_of_whole_messages_gives_its_fds_to_the_last() -> None:
    msgs = [wire(i, payload=bytes(i)) for i in range(1, 4)]
    reader = MessageReader(LIMIT)
    reader.feed(b"".join(msgs), [5])
    assert [m.fds for m in drain(reader)] == [[], [], [5]]


@pytest.mark.parametrize("cut", [1, 15, 16, 20])
def test_fds_in_the_middle_of_a_message_are_a_framing_error(cut: int) -> None:
    a = wire(1, payload=b"z" * 8)
    reader = MessageReader(LIMIT)
    reader.feed(a[:cut])
    reader.feed(a[cut:], [9])
    with pytest.raises(FramingError, match="middle of a message"):
        reader.next_message()
    # broken for good: the same error again, later reads are not parsed, no fd is lost
    reader.feed(wire(3), [10])
    with pytest.raises(FramingError, match="middle of a message"):
        reader.next_message()
    assert sorted(reader.take_fds()) == [9, 10]


def test_fds_in_the_middle_are_refused_before_the_message_is_whole() -> None:
    """A client that sends a header, then byte after byte with fds and never the rest, cannot
    make the reader hold its fds: the first read with fds inside the message breaks it."""
    reader = MessageReader(LIMIT)
    reader.feed(wire(1, size=4096)[:HEADER_SIZE] + b"x", [1, 2])  # the message's own fds
    assert reader.next_message() is None and not reader.has_message()
    reader.feed(b"y", [3])
    assert reader.has_message()
    with pytest.raises(FramingError, match=r"middle of a message \(a read of bytes 17..18 of "
                                           r"a 4096-byte message\)"):
        reader.next_message()
    assert sorted(reader.take_fds()) == [1, 2, 3]


def test_fds_of_an_earlier_message_are_not_lost_when_a_later_one_breaks() -> None:
    a, b = wire(1, payload=b"a" * 4), wire(2, payload=b"b" * 4)
    reader = MessageReader(LIMIT)
    reader.feed(a + b[:2], [1])  # b's fds (b starts in this read)
    reader.feed(b[2:10], [2])  # in the middle of b
    reader.feed(b[10:])
    assert drain_until_error(reader) == [[]]
    assert sorted(reader.take_fds()) == [1, 2]


def drain_until_error(reader: MessageReader) -> list[list[int]]:
    fds = []
    with pytest.raises(FramingError):
        while (m := reader.next_message()) is not None:
            fds.append(m.fds)
    return fds


@pytest.mark.parametrize("size", [0, 1, HEADER_SIZE - 1])
def test_size_smaller_than_the_header(size: int) -> None:
    reader = MessageReader(LIMIT)
    reader.feed(wire(1, size=size))
    with pytest.raises(FramingError, match="smaller than the header"):
        reader.next_message()


def test_size_over_the_limit_is_refused_before_the_body() -> None:
    reader = MessageReader(64)
    reader.feed(wire(1, payload=bytes(48)))  # exactly the limit
    assert reader.next_message() is not None
    reader.feed(wire(2, size=65)[:HEADER_SIZE], [3])  # the header alone says too much
    with pytest.raises(FramingError, match="larger than 64"):
        reader.next_message()
    assert reader.take_fds() == [3]


@pytest.mark.parametrize("flags", [2, 3, 0xF, 0x12])
def test_unknown_message_type(flags: int) -> None:
    reader = MessageReader(LIMIT)
    reader.feed(wire(1, flags=flags))
    with pytest.raises(FramingError, match="message type"):
        reader.next_message()


def test_fds_without_bytes() -> None:
    reader = MessageReader(LIMIT)
    with pytest.raises(FramingError):
        reader.feed(b"", [4])
    assert reader.take_fds() == [4]


def test_a_partial_message_at_the_end_keeps_its_fds() -> None:
    reader = MessageReader(LIMIT)
    reader.feed(wire(1, payload=b"q" * 10)[:20], [6])
    assert reader.next_message() is None
    assert reader.pending_bytes() == 20
    assert reader.take_fds() == [6]
    assert reader.pending_bytes() == 0


def test_the_buffer_is_compacted_without_moving_fds() -> None:
    big = wire(1, payload=bytes(600_000))
    small = wire(2, payload=b"s")
    reader = MessageReader(LIMIT)
    reader.feed(big + big + small[:4], [1])  # the fds belong to `small`
    reader.feed(small[4:])
    got = drain(reader)
    assert [m.msg_id for m in got] == [1, 1, 2] and got[2].fds == [1]
    assert reader.pending_bytes() == 0


@pytest.mark.parametrize("header", [wire(1, size=1 << 20), wire(1, size=8),
                                    wire(1, flags=3, size=100)])
def test_a_refused_header_is_waiting_at_once(header: bytes) -> None:
    """has_message() says an error is waiting as soon as a refused header is in (a client that
    sends a huge header and then stalls is dropped at once, not after more bytes)."""
    reader = MessageReader(4096)
    reader.feed(header[:HEADER_SIZE])
    assert reader.has_message()
    with pytest.raises(FramingError):
        reader.next_message()


def test_the_buffer_holds_at_most_one_partial_message_and_one_read() -> None:
    """Whatever the message sizes, a client cannot make the reader's buffer grow past the
    largest message plus one read: taken bytes are dropped at the next feed."""
    limit, chunk = 300_000, 64 * 1024
    stream = b"".join(wire(i, payload=bytes(n)) for i, n in
                      enumerate([limit - HEADER_SIZE, 100, 250_000, 7, limit - HEADER_SIZE] * 4))
    reader = MessageReader(limit)
    biggest = 0
    for at in range(0, len(stream), chunk):
        reader.feed(stream[at:at + chunk])
        biggest = max(biggest, sys.getsizeof(reader._buf))
        drain(reader)
    assert reader.pending_bytes() == 0
    assert biggest <= (limit + chunk) * 9 // 8 + 64  # CPython's bytearray over-allocates 1/8


def test_decode_header_checks_as_the_reader_does() -> None:
    assert decode_header(Header(1, 2, 16, 1, 0).pack()) == Header(1, 2, 16, 1, 0)
    for head in (Header(1, 1, 15, 0, 0).pack(), Header(1, 1, 16, 2, 0).pack(), b"\0" * 15):
        with pytest.raises(FramingError):
            decode_header(head)
    with pytest.raises(FramingError):
        decode_header(Header(1, 1, 100, 0, 0).pack(), max_size=99)


# --- errors by type ------------------------------------------------------------------------


def test_framing_and_protocol_errors_are_told_apart_by_type() -> None:
    assert issubclass(FramingError, ClientError) and issubclass(ProtocolError, ClientError)
    assert not issubclass(FramingError, ProtocolError)
    assert not issubclass(ProtocolError, FramingError)


# --- the transport's half: what one read brought ---------------------------------------------


def test_ancillary_data_cut_short_is_a_framing_error_and_closes_the_fds() -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, w.to_bytes(4, "little", signed=True))]
    try:
        with pytest.raises(FramingError):
            check_read(16, anc, int(socket.MSG_CTRUNC))
        assert os.read(r, 1) == b""  # the write end, our only copy, is closed
    finally:
        os.close(r)


def test_end_of_stream_closes_the_fds_of_the_read() -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, w.to_bytes(4, "little", signed=True))]
    try:
        with pytest.raises(ConnectionClosed):
            check_read(0, anc, 0)
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
    assert check_read(5, [], 0) == []


# --- the limits are written once --------------------------------------------------------------


def test_capabilities_advertise_only_what_can_be_enforced() -> None:
    caps = ServerCapabilities()
    assert caps.to_json()["max_msg_fds"] == MAX_MSG_FDS
    assert caps.max_message_size == max_message_size(caps.max_data_xfer_size)
    assert ServerCapabilities(max_msg_fds=SCM_MAX_FD).max_msg_fds == SCM_MAX_FD
    for bad in ({"max_msg_fds": 0}, {"max_msg_fds": SCM_MAX_FD + 1},
                {"max_data_xfer_size": 511}):
        with pytest.raises(ValueError):
            ServerCapabilities(**bad)


# --- random streams, split every way the kernel may split them ------------------------------


@dataclass
class Stream:
    """Bytes, and the fd-carrying sends in them: (first byte, end, fds)."""

    data: bytes
    sends: list[tuple[int, int, list[int]]]


def reads_of(stream: Stream, cuts: set[int]) -> list[tuple[bytes, list[int]]]:
    """The reads a receiver gets when the kernel ends reads at ``cuts``.

    The kernel's rules (Linux unix_stream_read_generic): a send's fds come with the read
    that holds its first byte, and that read ends no later than the send's last byte.
    """
    cuts = {c for c in cuts if 0 < c < len(stream.data)}
    for first, end, _ in stream.sends:
        if not any(first < c <= end for c in cuts):
            cuts.add(end)
    bounds = [0, *sorted(cuts), len(stream.data)]
    reads = []
    for a, b in itertools.pairwise(bounds):
        if a == b:
            continue
        fds = [fd for first, _end, sfds in stream.sends if a <= first < b for fd in sfds]
        reads.append((stream.data[a:b], fds))
    return reads


def per_send(stream: Stream) -> set[int]:
    """The cuts of one read per send: what a receiver gets when it keeps up with the sender."""
    return {c for first, end, _ in stream.sends for c in (first, end)}


Outcome = tuple[list[tuple[int, int, int, int, bytes, list[int]]], str | None, list[int]]


def run(stream: Stream, cuts: set[int], max_size: int) -> Outcome:
    """Feed the reads, take messages as a transport does; the messages, the error, the fds
    handed back."""
    reader = MessageReader(max_size)
    got: list[tuple[int, int, int, int, bytes, list[int]]] = []
    error = None
    for data, fds in reads_of(stream, cuts):
        # after an error the reader still takes what the socket held, to hand its fds back
        reader.feed(data, fds)
        try:
            while error is None and (m := reader.next_message()) is not None:
                got.append((m.msg_id, m.command, m.flags, m.error, m.payload, m.fds))
        except FramingError as exc:
            error = str(exc)
    return got, error, sorted(reader.take_fds())


@st.composite
def streams(draw: st.DrawFn, *, regular: bool) -> tuple[Stream, int]:
    """Messages (maybe ending in a bad header), with fds sent as QEMU sends them (``regular``:
    each fd-carrying send starts a message and ends inside it) or anywhere at all."""
    max_size = draw(st.integers(HEADER_SIZE, 90))
    data = bytearray()
    starts = []
    for i in range(draw(st.integers(0, 6))):
        payload = draw(st.binary(max_size=80))
        flags = draw(st.sampled_from([0, int(MsgType.REPLY), int(HeaderFlag.NO_REPLY),
                                      int(MsgType.REPLY | HeaderFlag.ERROR)]))
        starts.append(len(data))
        data += wire(i, draw(st.integers(0, 0xFFFF)), payload, flags=flags)
    if draw(st.booleans()):  # a header that cannot start a message, and whatever follows
        size, flags = draw(st.sampled_from([(0, 0), (15, 0), (16, 2), (0xFFFFFFFF, 0)]))
        starts.append(len(data))
        data += wire(99, size=size, flags=flags) + draw(st.binary(max_size=20))
    ends = [*starts[1:], len(data)] if starts else []
    sends: list[tuple[int, int, list[int]]] = []
    next_fd = 1000
    if regular:
        for start, end in zip(starts, ends, strict=True):
            if draw(st.booleans()):
                n = draw(st.integers(1, 3))
                stop = draw(st.integers(start + 1, end))
                sends.append((start, stop, list(range(next_fd, next_fd + n))))
                next_fd += n
    elif data:
        points = sorted(draw(st.sets(st.integers(0, len(data)), max_size=8)))
        for a, b in itertools.pairwise(points):
            if b > a and draw(st.booleans()):
                sends.append((a, b, [next_fd]))
                next_fd += 1
    return Stream(bytes(data), sends), max_size


def fds_fed(stream: Stream) -> list[int]:
    return sorted(fd for _a, _b, fds in stream.sends for fd in fds)


def fds_out(outcome: Outcome) -> list[int]:
    got, _error, left = outcome
    return sorted([fd for m in got for fd in m[5]] + left)


@settings(max_examples=300, deadline=None)
@given(streams(regular=True), st.sets(st.integers(1, 600), max_size=40))
def test_any_split_of_a_regular_stream_gives_the_same_messages_and_errors(
        case: tuple[Stream, int], cuts: set[int]) -> None:
    stream, max_size = case
    reference = run(stream, per_send(stream), max_size)
    assert run(stream, cuts, max_size) == reference
    assert run(stream, set(range(len(stream.data))), max_size) == reference  # byte by byte
    assert fds_out(reference) == fds_fed(stream)
    _got, error, _left = reference
    assert error is None or "middle" not in error  # QEMU's way of sending fds never breaks


@settings(max_examples=300, deadline=None)
@given(streams(regular=False), st.sets(st.integers(1, 600), max_size=40))
def test_any_split_of_any_stream_loses_no_fd_and_changes_no_byte(
        case: tuple[Stream, int], cuts: set[int]) -> None:
    stream, max_size = case
    reference = run(stream, per_send(stream), max_size)
    split = run(stream, cuts, max_size)
    for outcome in (reference, split):
        assert fds_out(outcome) == fds_fed(stream)  # each fd delivered or handed back, once
    # where the fds go may depend on the split (that is the rule), the messages' bytes may not
    # up to the first error either run meets
    ref_msgs, ref_err, _ = reference
    got_msgs, got_err, _ = split
    common = min(len(ref_msgs), len(got_msgs))
    assert [m[:5] for m in got_msgs[:common]] == [m[:5] for m in ref_msgs[:common]]
    if ref_err is not None and "middle" not in ref_err and got_err is not None:
        assert "middle" in got_err or got_err == ref_err
    if ref_err is None and got_err is None:
        assert [m[:5] for m in got_msgs] == [m[:5] for m in ref_msgs]


# --- the Client reads with the same reader ------------------------------------------------------


def test_the_client_drops_a_server_that_breaks_the_framing() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = Client(ours, timeout=10.0)

    def answer() -> None:
        # once the request is here it waits for its reply; this one announces too much
        assert len(theirs.recv(64)) == HEADER_SIZE
        theirs.sendall(wire(1, Command.DEVICE_RESET, flags=int(MsgType.REPLY), size=LIMIT + 1))

    server = threading.Thread(target=answer)
    server.start()
    try:
        with pytest.raises(ConnectionClosed, match="larger than"):
            client.request(Command.DEVICE_RESET)
    finally:
        server.join()
        client.close()
        theirs.close()
