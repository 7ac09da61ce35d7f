"""The C shim on the message path (vfio_user_server.msgshim, c_shim/msg.c) against the Python
reference: the same random byte-and-fd streams, split into arbitrary reads, give both readers
the same messages, the same errors and the same fds back; random REGION accesses (good and bad)
get the same replies and the same device calls from a server on the fast path and one on the
Python path; so do SET_IRQS requests among them (the loop answers QEMU's INTx EOI itself).

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
from typing import Any, ClassVar

import pytest
from helpers import WAIT, RawPeer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_framing import Stream, per_send, reads_of, streams

from vfio_user_server import msgshim
from vfio_user_server.device import PciDevice
from vfio_user_server.endpoint import Endpoint, Region, VfioDevice
from vfio_user_server.errors import ConnectionClosed, FramingError, VfioUserError
from vfio_user_server.irq import IrqController
from vfio_user_server.pci import Bar
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import (
    HEADER_SIZE,
    Command,
    HeaderFlag,
    IrqIndex,
    IrqSetFlag,
    MsgType,
)
from vfio_user_server.protocol.framing import MessageReader
from vfio_user_server.protocol.session import (
    MAX_DATA_XFER_SIZE,
    SCM_MAX_FD,
    ServerCapabilities,
    max_message_size,
)
from vfio_user_server.protocol.structs import DeviceInfo, IrqSet, RegionAccess
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


class RecordingIrqs(IrqController):
    """An IRQ controller that records each SET_IRQS it applies, and the INTx state after it."""

    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        super().__init__(intx=True, msi_vectors=2, msix_vectors=0)
        self.calls = calls

    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: Any,
                 data: bytes = b"") -> None:
        self.calls.append(("set_irqs", index, flags, start, count, len(fds), data))
        try:
            super().set_irqs(index, flags, start, count, fds, data)
        finally:
            st = self.state(IrqIndex.INTX)
            self.calls.append(("intx", st.masked, st.level, st.fds != (None,)))


class Regions(VfioDevice):
    """Regions of every kind, with handlers that record their calls and fail on purpose."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.irqs = RecordingIrqs(self.calls)
        self.mem = bytearray(0x100)
        self._regions = {
            0: Region(0x100, read=self._read, write=self._write),
            1: Region(0x40, read=self._read),  # read-only
            2: Region(0x40, write=self._write),  # write-only
            3: Region(0, read=self._read, write=self._write),  # empty
            # value handlers beside the bytes ones (1, 2, 4, 8 bytes), as PciDevice's BARs
            5: Region(0x100, read=self._read5, write=self._write5,
                      read_value=self._read_value, write_value=self._write_value),
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

    def _read_value(self, offset: int, size: int) -> int:
        self.calls.append(("read value", offset, size))
        if offset == 0x80:
            raise VfioUserError("refused", errno=errno.EACCES)
        if offset == 0x90:
            raise ValueError("a bug in the device")
        return int.from_bytes(self.mem[offset:offset + size], "little")

    def _write_value(self, offset: int, size: int, value: int) -> None:
        self.calls.append(("write value", offset, size, value))
        if offset == 0x80:
            raise VfioUserError("refused", errno=errno.EPERM)
        if offset == 0x90:
            raise KeyError("a bug in the device")
        self.mem[offset:offset + size] = value.to_bytes(size, "little")

    def _read5(self, offset: int, count: int) -> bytes:
        if count in (1, 2, 4, 8):
            return self._read_value(offset, count).to_bytes(count, "little")
        return self._read(offset, count)

    def _write5(self, offset: int, data: bytes) -> None:
        if len(data) in (1, 2, 4, 8):
            self._write_value(offset, len(data), int.from_bytes(data, "little"))
        else:
            self._write(offset, data)

    def regions(self) -> Mapping[int, Region]:
        return self._regions

    def vfio_reset(self) -> None:
        self.calls.append(("reset",))


class Bars(PciDevice):
    """A PciDevice with the MSI-X table and PBA in BAR 0 beside registers: the framework's
    own BAR handlers (value and bytes), recording what the device sees."""

    vendor_id = 0x1B36
    device_id = 0x0001
    class_code = 0xFF0000
    bars: ClassVar = {0: Bar(0x1000), 2: Bar(0x100)}
    msix_vectors = 4
    msix_table_offset = 0x800

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []
        self.regs: dict[tuple[int, int], int] = {}

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        self.calls.append(("read", bar, offset, size))
        if offset == 0x80:
            raise VfioUserError("refused", errno=errno.EACCES)
        if offset == 0x90:
            return -1  # masked to the access size
        return self.regs.get((bar, offset), 0x1122334455667788 + offset)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.calls.append(("write", bar, offset, size, value))
        if offset == 0x80:
            raise ValueError("a bug in the device")
        self.regs[bar, offset] = value


def make_servers(tmp: Path, make: Callable[[], VfioDevice]) -> dict[bool, tuple[Server, Any]]:
    caps = ServerCapabilities(max_data_xfer_size=0x200)  # a limit the accesses can cross
    out = {}
    for fast in (True, False):
        dev = make()
        srv = Server(dev, Path(tmp, f"{fast}.sock"), caps=caps, shim=fast).start()
        out[fast] = (srv, dev)
    return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, tuple[Server,
                                                                                   Regions]]]:
    out = make_servers(tmp_path_factory.mktemp("fast"), Regions)
    yield out
    for srv, _dev in out.values():
        srv.close()


@pytest.fixture(scope="module")
def pci_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, tuple[Server,
                                                                                       Bars]]]:
    out = make_servers(tmp_path_factory.mktemp("pci"), Bars)
    yield out
    for srv, _dev in out.values():
        srv.close()


READ, WRITE = int(Command.REGION_READ), int(Command.REGION_WRITE)
SET = int(Command.DEVICE_SET_IRQS)
EOI = int(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK)
FLAGS = st.sampled_from([0, int(HeaderFlag.NO_REPLY), int(MsgType.REPLY), int(HeaderFlag.ERROR),
                         0x40])
MORE = st.sampled_from([0, 0, 0, 1, -1])  # bytes more or fewer than the count says
access = st.tuples(
    st.sampled_from([READ, WRITE]),
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 0xFFFFFFFF]),  # region
    st.one_of(st.sampled_from([0, 0x2E, 0x3C, 0x80, 0x90, 0xA0, 0xFC, 0x100, 2**64 - 4]),
              st.integers(0, 0x110)),  # offset
    st.sampled_from([0, 1, 2, 3, 4, 8, 0x10, 0x101, 0x201, 0xFFFFFFFF]),  # count
    FLAGS,
    MORE,
)
#: SET_IRQS: (SET, index, start, count, header flags, more, SET_IRQS flags); more 1 adds a data
#: byte, -1 makes argsz one short. Half of them QEMU's INTx EOI, which the loop takes itself.
set_irqs = st.one_of(
    st.tuples(st.just(SET), st.just(0), st.just(0), st.just(1),
              st.sampled_from([0, 0, int(HeaderFlag.NO_REPLY)]), st.just(0), st.just(EOI)),
    st.tuples(
        st.just(SET),
        st.sampled_from([0, 0, 0, 1, 5]),  # INTx, MSI, no such index
        st.sampled_from([0, 0, 0, 1]),
        st.sampled_from([1, 1, 1, 0, 2]),
        FLAGS,
        MORE,
        st.sampled_from([EOI, EOI, int(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_MASK),
                         int(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER),
                         int(IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_UNMASK), 0x111])),
)
pci_access = st.tuples(
    st.sampled_from([READ, WRITE]),
    st.sampled_from([0, 2, 7]),  # BAR 0 (registers, MSI-X table and PBA), BAR 2, config
    st.one_of(st.sampled_from([0, 0x80, 0x90, 0x800, 0x804, 0x80C, 0x83C, 0x900, 0x904]),
              st.integers(0, 0x1000)),
    st.sampled_from([1, 2, 3, 4, 6, 8, 16]),
    st.sampled_from([0, 0, int(HeaderFlag.NO_REPLY)]),
    st.just(0),
)
#: how a burst ends: a read whose reply ends it, the client's end of stream after whole
#: messages, or in the middle of one
ENDS = st.sampled_from(["read", "eof", "eof inside"])


def encode_set_irqs(msg_id: int, index: int, start: int, count: int, flags: int, more: int,
                    irq_flags: int) -> bytes:
    payload = IrqSet(IrqSet.SIZE - (more < 0), irq_flags, index, start, count).pack()
    payload += b"\x01" * (more > 0)
    return codec.encode(codec.Message(msg_id, SET, flags, 0, payload))


def encode_access(msg_id: int, cmd: int, region: int, offset: int, count: int, flags: int,
                  more: int, *irq_flags: int) -> bytes:
    if cmd == SET:
        return encode_set_irqs(msg_id, region, offset, count, flags, more, *irq_flags)
    payload = RegionAccess(offset, region, count).pack()
    if cmd == WRITE:
        payload += bytes(range(max(0, min(count, 0x210) + more) % 256))[:0x210]
    elif more > 0:
        payload += b"x"
    return codec.encode(codec.Message(msg_id, cmd, flags, 0, payload))


def exchange(path: Path, version_at: int | None, accesses: list[tuple[int, ...]],
             end: str = "read") -> list[Any]:
    """Send the accesses in one burst, VERSION and DEVICE_GET_INFO before access
    ``version_at`` (None: never), then the end; every reply."""
    peer = RawPeer(path)
    try:
        replies: list[Any] = []
        burst = b""
        caps = {"max_msg_fds": 16, "max_data_xfer_size": MAX_DATA_XFER_SIZE}
        for i, acc in enumerate([*accesses, None]):
            if i == version_at:
                burst += codec.encode(codec.request(0, Command.VERSION,
                                                    codec.encode_version(0, 0, caps)))
                burst += codec.encode(codec.request(0, Command.DEVICE_GET_INFO,
                                                    DeviceInfo(16, 0, 0, 0).pack()))
            if acc is not None:
                burst += encode_access(i + 1, *acc)
        last = 0xFFFF
        if end == "read":
            burst += codec.encode(codec.request(last, READ, RegionAccess(0, 7, 4).pack()))
        elif end == "eof inside":
            burst += encode_access(last, READ, 0, 0, 4, 0, 0)[:20]
        peer.send(burst)
        if end != "read":
            peer.sock.shutdown(socket.SHUT_WR)
        while True:
            try:
                m = peer.recv_message()
            except ConnectionClosed:
                return replies
            replies.append((m.msg_id, m.command, m.flags, m.error, m.payload))
            if m.msg_id == last:
                return replies
    finally:
        peer.close()


def both_paths(servers: dict[bool, tuple[Server, Any]], version_at: int | None,
               accesses: list[tuple[int, ...]], end: str, state: Callable[[Any], Any]
               ) -> None:
    outcomes = []
    for fast in (True, False):
        srv, dev = servers[fast]
        served = srv.connections_served
        replies = exchange(srv.path, version_at, accesses, end)
        srv.wait_for_disconnect(served + 1, timeout=30)  # everything sent was handled
        outcomes.append((replies, state(dev)))
    assert outcomes[0] == outcomes[1]


@settings(max_examples=120 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(access, set_irqs), max_size=12), st.data())
def test_fast_path_and_python_path_answer_alike(
        servers: dict[bool, tuple[Server, Regions]], accesses: list[tuple[int, ...]],
        data: st.DataObject) -> None:
    version_at = data.draw(st.one_of(st.none(), st.integers(0, len(accesses))))
    end = data.draw(ENDS)
    for _fast, (_srv, dev) in servers.items():
        dev.calls.clear()
        dev.mem[:] = bytes(len(dev.mem))
    both_paths(servers, version_at, accesses, end,
               lambda dev: (dev.calls[:], bytes(dev.mem)))


@settings(max_examples=60 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(pci_access, max_size=12), ENDS)
def test_pci_bars_answer_alike_on_both_paths(
        pci_servers: dict[bool, tuple[Server, Bars]], accesses: list[tuple[int, ...]],
        end: str) -> None:
    """PciDevice's own BAR handlers: registers, split accesses, MSI-X table and PBA."""
    for _fast, (_srv, dev) in pci_servers.items():
        dev.calls.clear()
        dev.regs.clear()
    both_paths(pci_servers, 0, accesses, end,
               lambda dev: (dev.calls[:], dict(dev.regs), dev.msix.table.read(0x800, 0x40)))


def test_the_loop_serves_a_burst_without_the_endpoint_and_in_one_read(
        servers: dict[bool, tuple[Server, Regions]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof that the loop runs: only what the fast path does not take reaches the endpoint
    or returns to Python, and a burst of posted writes already in the buffer is served before
    the next read of the socket."""
    srv, _dev = servers[True]
    handled: list[int] = []
    returns: list[int] = []
    paths: list[msgshim.FastPath] = []
    real_handle = Endpoint.handle
    real_one = msgshim.FastPath.handle_one

    def handle(self: Endpoint, msg: codec.Message) -> codec.Message | None:
        handled.append(msg.command)
        return real_handle(self, msg)

    def handle_one(self: msgshim.FastPath) -> codec.Message | None:
        paths.append(self)
        returns.append(self._r.reads)
        return real_one(self)

    monkeypatch.setattr(Endpoint, "handle", handle)
    monkeypatch.setattr(msgshim.FastPath, "handle_one", handle_one)
    served = srv.connections_served
    posted = [(WRITE, 0, 8 + 4 * (i % 2), 4, int(HeaderFlag.NO_REPLY), 0) for i in range(40)]
    replies = exchange(srv.path, 0, [*posted, (READ, 0, 8, 4, 0, 0)])
    value = struct.unpack_from("<I", replies[-2][4], RegionAccess.SIZE)[0]
    assert value == 0x03020100
    srv.wait_for_disconnect(served + 1, timeout=30)
    assert handled == [Command.VERSION, Command.DEVICE_GET_INFO]
    # the loop returned for VERSION, DEVICE_GET_INFO and the end of the stream only: the
    # burst (one send, so one read) was served whole before the next read, the end of stream
    assert len(returns) == 3 and returns == [0, 1, 1] and paths[0]._r.reads == 2
    assert max_message_size(0x200) == srv.caps.max_message_size


class Interrupting(Regions):
    """A handler that raises what is not an Exception (as a signal handler's may)."""

    def _read_value(self, offset: int, size: int) -> int:
        raise KeyboardInterrupt


@pytest.mark.parametrize("fast", [True, False])
def test_what_is_not_an_exception_goes_up_the_loop_on_both_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    """A handler's KeyboardInterrupt ends the server's loop thread with it, the connection
    closed on the way (no error reply: it is not the client's error), on either path."""
    seen: list[type[BaseException]] = []
    monkeypatch.setattr("threading.excepthook", lambda args: seen.append(args.exc_type))
    srv = Server(Interrupting(), tmp_path / "s.sock", shim=fast).start()
    try:
        peer = RawPeer(srv.path)
        try:
            peer.send(codec.encode(codec.request(0, Command.VERSION, codec.encode_version(
                0, 0, {"max_msg_fds": 16, "max_data_xfer_size": MAX_DATA_XFER_SIZE}))))
            peer.recv_message()
            peer.send(codec.encode(codec.request(1, READ, RegionAccess(0, 5, 4).pack())))
            assert peer.at_eof()
        finally:
            peer.close()
        srv.join(timeout=30)
        assert seen == [KeyboardInterrupt]
    finally:
        srv.close()


def eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_the_intx_eoi_is_answered_alike_and_by_the_loop_itself(
        servers: dict[bool, tuple[Server, Regions]], monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU's INTx EOI, SET_IRQS(INTX, NONE|UNMASK, 0, 1), on both paths: refused before
    negotiation, then among region accesses it unmasks, fires again while the line is high,
    not while COMMAND.INTX_DISABLE is set, and a posted one is answered by nothing; with fds it
    is refused. The loop takes it without the endpoint; with fds, before negotiation, or with
    an error flag, the Python path does."""
    handled: list[int] = []
    real_handle = Endpoint.handle

    def handle(self: Endpoint, msg: codec.Message) -> codec.Message | None:
        handled.append(msg.command)
        return real_handle(self, msg)

    monkeypatch.setattr(Endpoint, "handle", handle)
    intx = int(IrqIndex.INTX)
    caps = {"max_msg_fds": 16, "max_data_xfer_size": MAX_DATA_XFER_SIZE}
    outcomes: dict[bool, list[Any]] = {}
    seen: dict[bool, list[int]] = {}
    for fast in (True, False):
        srv, dev = servers[fast]
        dev.calls.clear()
        handled.clear()
        served = srv.connections_served
        peer = RawPeer(srv.path)
        trigger = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        spare = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        out: list[Any] = []

        def ask(data: bytes, fds: list[int] | None = None, replies: int = 1) -> None:
            peer.send(data, fds)  # noqa: B023 (each run's own peer and list)
            for _ in range(replies):
                m = peer.recv_message()  # noqa: B023
                out.append((m.msg_id, m.command, m.flags, m.error, m.payload))  # noqa: B023

        def fired() -> None:
            out.append(("fired", eventfd_count(trigger)))  # noqa: B023

        try:
            ask(encode_set_irqs(1, intx, 0, 1, 0, 0, EOI))  # before VERSION: EINVAL
            ask(codec.encode(codec.request(2, Command.VERSION, codec.encode_version(0, 0, caps)))
                + codec.encode(codec.request(3, Command.DEVICE_GET_INFO,
                                             DeviceInfo(16, 0, 0, 0).pack())), replies=2)
            trigger_req = IrqSet(IrqSet.SIZE, int(IrqSetFlag.DATA_EVENTFD
                                                  | IrqSetFlag.ACTION_TRIGGER), intx, 0, 1)
            ask(codec.encode(codec.request(4, SET, trigger_req.pack())), [trigger])
            dev.irqs.intx_assert()  # fires and masks
            fired()
            # the line still high: the EOI among accesses unmasks, fires and masks again
            ask(encode_access(5, WRITE, 0, 0, 4, 0, 0) + encode_set_irqs(6, intx, 0, 1, 0, 0, EOI)
                + encode_access(7, READ, 0, 0, 4, 0, 0), replies=3)
            fired()
            dev.irqs.intx_deassert()
            ask(encode_set_irqs(8, intx, 0, 1, 0, 0, EOI))  # low: unmasked, nothing fires
            fired()
            dev.irqs.set_intx_disabled(True)
            dev.irqs.intx_assert()  # high but disabled: nothing fires, stays unmasked
            ask(encode_set_irqs(9, intx, 0, 1, 0, 0, EOI))
            fired()
            dev.irqs.set_intx_disabled(False)  # enabled: the high line fires now
            fired()
            # posted: no reply (the read after it says it was handled), fires again
            ask(encode_set_irqs(10, intx, 0, 1, int(HeaderFlag.NO_REPLY), 0, EOI)
                + encode_access(11, READ, 0, 0, 4, 0, 0))
            fired()
            # with an fd: DATA_NONE takes none, refused on the Python path, the fd closed
            ask(encode_set_irqs(12, intx, 0, 1, 0, 0, EOI), [spare])
            fired()
            # an error flag on a request: the Python path takes it (and applies it: it is a
            # request all the same)
            ask(encode_set_irqs(13, intx, 0, 1, int(HeaderFlag.ERROR), 0, EOI))
            fired()
            out.append(dev.irqs.state(intx).masked)
        finally:
            peer.close()
            os.close(trigger)
            os.close(spare)
            srv.wait_for_disconnect(served + 1, timeout=30)
            dev.irqs.intx_deassert()
        outcomes[fast] = [*out, dev.calls[:]]
        seen[fast] = [c for c in handled if c == SET]
    assert outcomes[True] == outcomes[False]
    fires = [x[1] for x in outcomes[True] if isinstance(x, tuple) and x[0] == "fired"]
    assert fires == [1, 1, 0, 0, 1, 1, 0, 1]
    errors = [x[3] for x in outcomes[True] if isinstance(x, tuple) and len(x) == 5
              and x[0] in (1, 12)]
    assert errors == [errno.EINVAL, errno.EINVAL]
    # the Python path: all eight SET_IRQS; the loop: the one before VERSION, the trigger with
    # its fd, the EOI with an fd and the one with an error flag
    assert len(seen[False]) == 8 and len(seen[True]) == 4
