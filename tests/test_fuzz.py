"""Random input never crashes the server: every message gets a reply, an error or a hang-up.

* the endpoint fuzz: sequences of QEMU-shaped requests (tests/fuzzing.py) with fds, in every
  session state; a reply exists exactly when NO_REPLY is clear, no fd leaks, and every command's
  handler is reached (the counts are printed and asserted; the run is derandomized);
* the framing reader and the session table under arbitrary cuts, noise and commands;
* a stateful test: a real client and server driven through connect, negotiate, DMA map and
  unmap, device DMA, register access, SET_IRQS, reset and disconnect, checked at every step
  against a model of what the sample device and the map table must hold;
* random byte streams over a real socket, after which the server still serves.

The long form (10^6 inputs and more, through atheris) is tests/fuzz_long.py; see
docs/reliability.md.
"""

from __future__ import annotations

import array
import errno
import mmap
import os
import shutil
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from fuzzing import (
    FuzzMessage,
    HandlerCounter,
    build_migration,
    build_session,
    check_endpoint,
    check_reader,
    check_session,
    make_fd,
)
from helpers import WAIT, RawPeer, device_dma, negotiated, run_in_thread, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from vfio_user_server.client import Client, ClientError
from vfio_user_server.errors import ConnectionClosed
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command, IrqIndex, IrqSetFlag
from vfio_user_server.protocol.session import SessionState
from vfio_user_server.sample import (
    BUFFER_OFFSET,
    BUFFER_SIZE,
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    ID_VALUE,
    REG_ID,
    REG_SCRATCH,
    STAT_DONE,
    STAT_ERROR,
    SampleDevice,
)
from vfio_user_server.server import Server

DEVICE = SampleDevice()

#: Commands the fuzz must complete at least once (the rest are refused by design: the sample
#: device declares no state, so it has no migration; the migration fuzz below completes them).
UNSUPPORTED = {"DIRTY_PAGES", "DEVICE_FEATURE", "MIG_DATA_READ", "MIG_DATA_WRITE"}


class Migratable(SampleDevice):
    """The sample device with state: it supports migration."""

    state_fields = ("scratch", "writes", "buffer")


MIGRATABLE = Migratable()


class HypothesisSource:
    """The builder's choices as hypothesis draws (so a failure shrinks)."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def number(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def blob(self, max_size: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_size))


def test_endpoint_fuzz_reaches_every_handler(capsys: pytest.CaptureFixture[str]) -> None:
    counter = HandlerCounter().install()
    states: dict[SessionState, int] = {}

    @settings(max_examples=800, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        src = HypothesisSource(data)
        state, messages = build_session(src)
        states[state] = states.get(state, 0) + 1
        check_endpoint(DEVICE, state, messages)

    try:
        fuzz()
    finally:
        counter.uninstall()
    with capsys.disabled():
        print(f"\nendpoint fuzz, inputs reaching/completing each handler: {counter.report()}")
    missed = [n for n in counter.names() if not counter.reached[n]]
    assert not missed, f"handlers never reached: {missed} ({counter.report()})"
    never_ok = [n for n in counter.names() if n not in UNSUPPORTED and not counter.completed[n]]
    assert not never_ok, f"handlers never completed: {never_ok} ({counter.report()})"
    assert set(states) == set(SessionState)


def test_migration_fuzz_reaches_and_completes_every_migration_command(
        capsys: pytest.CaptureFixture[str]) -> None:
    """DEVICE_FEATURE, MIG_DATA_READ / MIG_DATA_WRITE and region accesses in every migration
    state of a device that supports migration: the endpoint's rules hold, nothing leaks, and
    the device runs again when the connection goes (check_endpoint)."""
    counter = HandlerCounter().install()

    @settings(max_examples=600, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        check_endpoint(MIGRATABLE, SessionState.RUNNING, build_migration(HypothesisSource(data)))
        assert MIGRATABLE._quiesce_depth == 0  # never left stopped

    try:
        fuzz()
    finally:
        counter.uninstall()
    with capsys.disabled():
        print(f"\nmigration fuzz, inputs reaching/completing each handler: {counter.report()}")
    for name in ("DEVICE_FEATURE", "MIG_DATA_READ", "MIG_DATA_WRITE", "REGION_READ"):
        assert counter.completed[name], f"{name} never completed ({counter.report()})"


@pytest.mark.parametrize("flags", [0, 0x10])
def test_a_reply_exactly_when_no_reply_is_clear(flags: int) -> None:
    # check_endpoint asserts the rule; here for good and bad requests of the kinds QEMU posts
    for payload in (b"", codec.encode_version(0, 0, {})[:4]):
        for cmd in (Command.REGION_WRITE, Command.VERSION):
            check_endpoint(DEVICE, SessionState.RUNNING, [FuzzMessage(cmd, flags, payload)])
    check_endpoint(DEVICE, SessionState.AWAIT_VERSION,
                   [FuzzMessage(Command.VERSION, flags, codec.encode_version(0, 0, {}))])
    check_endpoint(DEVICE, SessionState.RUNNING, [FuzzMessage(
        Command.REGION_READ, flags, struct.pack("<QII", REG_ID, 0, 4))])


_messages = st.builds(
    FuzzMessage,
    command=st.integers(0, 0xFFFF),
    flags=st.sampled_from([0, 1, 0x10, 0x21]),
    payload=st.binary(max_size=64),
    fds=st.lists(st.just("eventfd"), max_size=3),
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    messages=st.lists(_messages, min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 512), max_size=8),
    noise=st.one_of(st.just(b""), st.binary(min_size=1, max_size=32)),
    noise_at=st.integers(0, 512),
    max_size=st.sampled_from([1 << 16, 40]),
)
def test_reader_reassembles_any_cut(messages: list[FuzzMessage], cuts: list[int], noise: bytes,
                                    noise_at: int, max_size: int) -> None:
    check_reader(messages, cuts, noise, noise_at, max_size)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    commands=st.lists(st.one_of(st.sampled_from([int(c) for c in Command]),
                                st.integers(0, 0xFFFF)), max_size=12),
    caps=st.lists(st.dictionaries(
        st.sampled_from(["max_msg_fds", "max_data_xfer_size", "pgsizes", "x"]),
        st.one_of(st.integers(-2, 1 << 21), st.booleans(), st.none(), st.text(max_size=3))),
        max_size=3),
)
def test_session_follows_its_table(commands: list[int], caps: list[dict[str, Any]]) -> None:
    check_session(commands, caps)


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


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_server_answers_qemu_shaped_streams_with_fds(server: Server, data: st.DataObject) -> None:
    """Over a real socket, fds riding with their message: one reply per request that wants one,
    in order, and never a hang-up (nothing here breaks the framing)."""
    wait_until(lambda: server.connection is None, what="the last client to leave")
    served = server.connections_served
    state, messages = build_session(HypothesisSource(data), max_messages=6)
    if state is not SessionState.AWAIT_VERSION:
        messages[:0] = [FuzzMessage(Command.VERSION, 0, codec.encode_version(0, 0, {})),
                        FuzzMessage(Command.DEVICE_GET_INFO, 0, bytes([16]) + bytes(15))]
    peer = RawPeer(server.path)
    got: list[int] = []
    ended: list[BaseException] = []

    def read_replies() -> None:  # concurrently, as QEMU does: replies must not back up
        try:
            while True:
                reply = peer.recv_message()
                if reply.is_reply:
                    assert reply.is_error or reply.error == 0
                    got.append(reply.msg_id)
        except (EOFError, OSError, ConnectionClosed) as exc:
            ended.append(exc)

    reader = run_in_thread(read_replies)
    sent = [(i, m.command, hex(m.flags), len(m.payload), m.fds)
            for i, m in enumerate(messages, 1)]
    try:
        wanted: list[int] = []
        for i, fm in enumerate(messages, 1):
            fds = [make_fd(kind) for kind in fm.fds]
            try:
                raw = codec.encode(codec.Message(i, fm.command, fm.flags, 0, fm.payload))
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                done = peer.sock.sendmsg([raw], anc if fds else [])  # fds with the header
                peer.sock.sendall(raw[done:])
            finally:
                for fd in fds:
                    os.close(fd)
            if not fm.flags & 0x1F:  # a request (type 0) without NO_REPLY
                wanted.append(i)
        wait_until(lambda: len(got) >= len(wanted) or bool(ended),
                   what=f"replies {got} of {wanted} to {sent}")
        assert got == wanted, (ended, sent)
    finally:
        peer.sock.shutdown(socket.SHUT_RDWR)
        reader.join(WAIT)
        peer.close()
    server.wait_for_disconnect(served + 1, WAIT)


# --- stateful: a client, the server and a model of the device -----------------------------

PAGE = 4096
SLOTS = 8  # maps live in [0, SLOTS pages)
MSIX_VECTORS = 4


class ClientServerMachine(RuleBasedStateMachine):
    """A real client against a real server; the model is what the device must show."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="vfu-sm-", dir="/tmp")
        self.device = SampleDevice()
        self.server = Server(self.device, Path(self.dir) / "sm.sock", dma_timeout=WAIT).start()
        self.client: Client | None = None
        self.negotiated = False
        self.served = 0
        # the model
        self.maps: dict[int, tuple[int, int, mmap.mmap]] = {}  # iova -> size, prot, memory
        self.scratch = 0
        self.buffer = bytearray(BUFFER_SIZE)
        self.msix: dict[int, int] = {}  # vector -> the client's eventfd

    # --- helpers
    @property
    def c(self) -> Client:
        assert self.client is not None
        return self.client

    def _drop_irqs(self, vectors: list[int] | None = None) -> None:
        for v in list(self.msix) if vectors is None else vectors:
            fd = self.msix.pop(v, None)
            if fd is not None:
                os.close(fd)

    def _drop_maps(self, iovas: list[int]) -> None:
        for iova in iovas:
            self.maps.pop(iova)[2].close()

    def _covering(self, iova: int, length: int, write: bool) -> list[tuple[int, int, int]]:
        """(addr, n, map iova) pieces if the model covers the range (with ``write``), else []."""
        pieces: list[tuple[int, int, int]] = []
        addr, end = iova, iova + length
        while addr < end:
            hit = [m for m, (size, _p, _mm) in self.maps.items() if m <= addr < m + size]
            if not hit or (write and not self.maps[hit[0]][1] & 2):
                return []
            size = self.maps[hit[0]][0]
            n = min(end, hit[0] + size) - addr
            pieces.append((addr, n, hit[0]))
            addr += n
        return pieces

    def _expect_error(self, fn: Any, err: int) -> None:
        with pytest.raises(ClientError) as info:
            fn()
        assert info.value.errno == err

    # --- connection
    @precondition(lambda self: self.client is None)
    @rule()
    def connect(self) -> None:
        self.client = Client.connect(self.server.path, timeout=WAIT)
        self.negotiated = False

    @precondition(lambda self: self.client is not None and not self.negotiated)
    @rule()
    def request_before_version(self) -> None:
        self._expect_error(lambda: self.c.bar_read(0, REG_ID, 4), errno.EINVAL)

    @precondition(lambda self: self.client is not None and not self.negotiated)
    @rule()
    def negotiate(self) -> None:
        caps = self.c.negotiate()
        assert caps["max_dma_maps"] >= SLOTS
        info = self.c.get_device_info()
        assert (info.num_regions, info.num_irqs) == (9, 5)
        self.negotiated = True

    @precondition(lambda self: self.client is not None)
    @rule()
    def disconnect(self) -> None:
        self.c.close()
        self.client = None
        self.served += 1
        self.server.wait_for_disconnect(self.served, WAIT)
        self.negotiated = False
        self._drop_maps(list(self.maps))  # the server forgets the client's maps and fds
        self._drop_irqs()

    # --- DMA maps
    @precondition(lambda self: self.negotiated)
    @rule(slot=st.integers(0, SLOTS - 1), pages=st.integers(1, 3), writable=st.booleans())
    def dma_map(self, slot: int, pages: int, writable: bool) -> None:
        iova, size = slot * PAGE, pages * PAGE
        prot = 3 if writable else 1
        fd = os.memfd_create("sm-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            overlaps = any(m < iova + size and iova < m + s for m, (s, _, _) in self.maps.items())
            if overlaps:
                self._expect_error(lambda: self.c.dma_map(iova, size, prot, fd=fd), errno.EEXIST)
                return
            mem = mmap.mmap(fd, size)
            self.c.dma_map(iova, size, prot, fd=fd)
            self.maps[iova] = (size, prot, mem)
        finally:
            os.close(fd)

    @precondition(lambda self: self.negotiated)
    @rule(slot=st.integers(0, SLOTS - 1), pages=st.integers(1, 4))
    def dma_unmap(self, slot: int, pages: int) -> None:
        iova, end = slot * PAGE, (slot + pages) * PAGE
        touched = [m for m, (s, _, _) in self.maps.items() if m < end and iova < m + s]
        if any(m < iova or m + self.maps[m][0] > end for m in touched):
            self._expect_error(lambda: self.c.dma_unmap(iova, end - iova), errno.EINVAL)
            return
        self.c.dma_unmap(iova, end - iova)
        self._drop_maps(touched)

    @precondition(lambda self: self.negotiated)
    @rule()
    def dma_unmap_all(self) -> None:
        self.c.dma_unmap(0, 0, flags=2)
        self._drop_maps(list(self.maps))

    @precondition(lambda self: self.negotiated)
    @rule(start=st.integers(0, SLOTS * PAGE - 1), length=st.integers(1, BUFFER_SIZE),
          data=st.binary(min_size=BUFFER_SIZE, max_size=BUFFER_SIZE))
    def dma_to_device(self, start: int, length: int, data: bytes) -> None:
        pieces = self._covering(start, length, write=False)
        for addr, n, m in pieces:
            off = addr - m
            self.maps[m][2][off:off + n] = data[addr - start:addr - start + n]
        stat = device_dma(self.c, start, length, DMA_TO_DEVICE)
        assert stat == (STAT_DONE if pieces else STAT_ERROR)
        if pieces:
            self.buffer[:length] = data[:length]

    @precondition(lambda self: self.negotiated)
    @rule(start=st.integers(0, SLOTS * PAGE - 1), length=st.integers(1, BUFFER_SIZE))
    def dma_from_device(self, start: int, length: int) -> None:
        pieces = self._covering(start, length, write=True)
        stat = device_dma(self.c, start, length, DMA_FROM_DEVICE)
        assert stat == (STAT_DONE if pieces else STAT_ERROR)
        for addr, n, m in pieces:
            off = addr - m
            assert self.maps[m][2][off:off + n] == self.buffer[addr - start:addr - start + n]

    # --- registers
    @precondition(lambda self: self.negotiated)
    @rule(value=st.integers(0, 0xFFFFFFFF), posted=st.booleans())
    def write_scratch(self, value: int, posted: bool) -> None:
        self.c.bar_write(0, REG_SCRATCH, 4, value, posted=posted)
        self.scratch = value
        assert self.c.bar_read(0, REG_SCRATCH, 4) == value  # ordered after a posted write

    @precondition(lambda self: self.negotiated)
    @rule(word=st.integers(0, BUFFER_SIZE // 4 - 1), value=st.integers(0, 0xFFFFFFFF))
    def write_buffer(self, word: int, value: int) -> None:
        self.c.bar_write(0, BUFFER_OFFSET + 4 * word, 4, value)
        self.buffer[4 * word:4 * word + 4] = value.to_bytes(4, "little")

    @precondition(lambda self: self.negotiated)
    @rule(word=st.integers(0, BUFFER_SIZE // 4 - 1))
    def read_buffer(self, word: int) -> None:
        got = self.c.bar_read(0, BUFFER_OFFSET + 4 * word, 4)
        assert got == int.from_bytes(self.buffer[4 * word:4 * word + 4], "little")

    @precondition(lambda self: self.negotiated)
    @rule(offset=st.integers(0x4000 - 8, 0x5000), count=st.sampled_from([4, 8, 16]))
    def access_outside(self, offset: int, count: int) -> None:
        if offset + count <= 0x4000:
            self.c.region_read(0, offset, count)
            return
        self._expect_error(lambda: self.c.region_read(0, offset, count), errno.EINVAL)

    # --- interrupts
    @precondition(lambda self: self.negotiated)
    @rule(start=st.integers(0, MSIX_VECTORS - 1), count=st.integers(1, MSIX_VECTORS))
    def set_msix_eventfds(self, start: int, count: int) -> None:
        flags = int(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER)
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        if start + count > MSIX_VECTORS:
            try:
                self._expect_error(
                    lambda: self.c.set_irqs(IrqIndex.MSIX, flags, start, count, fds), errno.EINVAL)
            finally:
                for fd in fds:
                    os.close(fd)
            return
        self.c.set_irqs(IrqIndex.MSIX, flags, start, count, fds)
        self._drop_irqs(list(range(start, start + count)))
        self.msix.update(zip(range(start, start + count), fds, strict=True))

    @precondition(lambda self: self.negotiated)
    @rule()
    def disable_msix(self) -> None:
        self.c.disable_irq(IrqIndex.MSIX)
        self._drop_irqs()

    @precondition(lambda self: self.negotiated)
    @rule(start=st.integers(0, MSIX_VECTORS - 1), count=st.integers(1, MSIX_VECTORS))
    def loopback_trigger(self, start: int, count: int) -> None:
        flags = int(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER)
        if start + count > MSIX_VECTORS:
            self._expect_error(lambda: self.c.set_irqs(IrqIndex.MSIX, flags, start, count),
                               errno.EINVAL)
            return
        self.c.set_irqs(IrqIndex.MSIX, flags, start, count)
        for v, fd in self.msix.items():
            # the reply follows the eventfd write: a fired vector is readable now
            assert Client.eventfd_count(fd) == (1 if start <= v < start + count else 0), v

    # --- reset
    @precondition(lambda self: self.negotiated)
    @rule()
    def reset(self) -> None:
        self.c.reset()
        self.scratch = 0
        self.buffer = bytearray(BUFFER_SIZE)
        self._drop_irqs()

    # --- what the server must show at every step
    @invariant()
    def device_matches_model(self) -> None:
        assert self.device.scratch == self.scratch
        assert self.device.buffer == self.buffer
        fds = self.device.irqs.state(IrqIndex.MSIX).fds
        assert {v for v, fd in enumerate(fds) if fd is not None} == set(self.msix)
        if self.negotiated:
            conn = self.server.connection
            assert conn is not None
            got = {(m.iova, m.size, m.prot) for m in conn.table.maps()}
            assert got == {(i, s, p) for i, (s, p, _) in self.maps.items()}
        elif self.client is None:
            assert self.server.connection is None

    def teardown(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
            self.server.close()
        finally:
            self._drop_irqs()
            self._drop_maps(list(self.maps))
            shutil.rmtree(self.dir, ignore_errors=True)


ClientServerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("PYVFIO_STATEFUL_EXAMPLES", "25")),
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestClientServerMachine = ClientServerMachine.TestCase
