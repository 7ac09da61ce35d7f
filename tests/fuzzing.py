"""Fuzz inputs shaped like QEMU's, shared by the hypothesis tests and the long (atheris) run.

One builder, two sources of choices: :class:`HypothesisSource` (draws, so failures shrink) in
tests/test_fuzz.py, and :class:`BytesSource` (a libFuzzer input, through atheris'
``FuzzedDataProvider``) in tests/fuzz_long.py. Both drive the same checks:

* :func:`check_endpoint`: a sequence of messages into one :class:`Endpoint`: it never raises,
  a reply exists exactly when NO_REPLY is clear, it answers the request's id and command, and
  every fd sent is closed or owned (nothing leaks once the connection is torn down);
* :func:`check_reader`: valid messages cut at arbitrary points, with noise and fds, through the
  framing reader: the same messages come out, or a ProtocolError, nothing else;
* :func:`check_session`: the session table under arbitrary commands and VERSION capabilities.

The messages are biased toward what QEMU sends: mostly requests in the NEGOTIATED and
RUNNING states, posted (NO_REPLY) REGION_WRITEs, DMA_MAPs of page-aligned ranges with a memfd,
SET_IRQS with eventfds, accesses at the sample device's registers; and, less often, the wrong
fd kinds, bad sizes, random flags and random commands.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from vfio_user_server import endpoint as endpoint_module
from vfio_user_server.client import QEMU_CAPABILITIES
from vfio_user_server.dma import DmaMapTable
from vfio_user_server.endpoint import Endpoint, VfioDevice
from vfio_user_server.errors import FramingError, ProtocolError
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import (
    Command,
    FeatureFlag,
    HeaderFlag,
    IrqSetFlag,
    MigState,
)
from vfio_user_server.protocol.framing import MessageReader
from vfio_user_server.protocol.migration import stream as mig_stream
from vfio_user_server.protocol.session import TRANSITIONS, Session, SessionState
from vfio_user_server.protocol.structs import (
    COMMANDS,
    DeviceFeature,
    DeviceInfo,
    DmaMap,
    DmaUnmap,
    IrqInfo,
    IrqSet,
    MigData,
    MigDeviceState,
    RegionAccess,
    RegionInfo,
    RegionIoFds,
    Tail,
    WriteMulti,
    WriteMultiEntry,
)

T = TypeVar("T")

PAGE = 4096
NO_REPLY = int(HeaderFlag.NO_REPLY)
REPLY = 1


class Source(Protocol):
    """Where the builder's choices come from."""

    def number(self, lo: int, hi: int) -> int: ...

    def blob(self, max_size: int) -> bytes: ...


def pick(src: Source, seq: Sequence[T]) -> T:
    return seq[src.number(0, len(seq) - 1)]


def rare(src: Source, n: int) -> bool:
    """True once in ``n`` (on the highest choice: hypothesis and libFuzzer favour 0)."""
    return src.number(0, n - 1) == n - 1


class BytesSource:
    """Choices from an atheris ``FuzzedDataProvider`` (0 / empty once the input runs out)."""

    def __init__(self, fdp: Any) -> None:
        self.fdp = fdp

    def number(self, lo: int, hi: int) -> int:
        return int(self.fdp.ConsumeIntInRange(lo, hi))

    def blob(self, max_size: int) -> bytes:
        return bytes(self.fdp.ConsumeBytes(self.fdp.ConsumeIntInRange(0, max_size)))


# --- messages ------------------------------------------------------------------------------


@dataclass
class FuzzMessage:
    command: int
    flags: int
    payload: bytes
    #: fds to attach: "memfd:<size>", "eventfd", "pipe", "socket", "dir", "file"
    fds: list[str] = field(default_factory=list)


ADDRS = [0, PAGE, 2 * PAGE, 0x10000, 0x100000, 0x40000000, (1 << 64) - PAGE]
SIZES = [PAGE, 2 * PAGE, 0x10000, PAGE, 0, (1 << 64) - 1]
OFFSETS = [0, 4, 8, 0x0C, 0x10, 0x18, 0x1C, 0x20, 0x24, 0x800, 0x2000, 0x3000, 0x3FFC]
CONFIG_OFFSETS = [0, 2, 4, 6, 0x10, 0x14, 0x34, 0x3C, 0x40, 0x50, 0x60, 0x70, 0x100]
REGIONS = [0, 0, 0, 0, 2, 7, 7, 7, 1, 6, 8, 9]
COUNTS = [1, 2, 4, 4, 4, 8]
WRONG_FDS = ["pipe", "socket", "dir", "file"]

IRQ_FLAGS = [
    int(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER),
    int(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER),
    int(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER),
    int(IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_TRIGGER),
    int(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_MASK),
    int(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK),
    int(IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_MASK),
    int(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_UNMASK),
]


def _u(src: Source, common: Sequence[int], bits: int) -> int:
    """A common value most of the time, any ``bits``-wide value otherwise."""
    if rare(src, 8):
        return src.number(0, (1 << bits) - 1)
    return pick(src, common)


def _version(src: Source) -> tuple[bytes, list[str]]:
    kind = src.number(0, 5)
    if kind <= 2:
        return codec.encode_version(0, 0, QEMU_CAPABILITIES), []
    if kind == 3:
        caps: dict[str, Any] = {
            "max_msg_fds": pick(src, [0, 1, 16, 1024, 1025, -1, "x", True]),
            "max_data_xfer_size": pick(src, [0, 511, 512, 1 << 20, None]),
        }
        return codec.encode_version(src.number(0, 2), src.number(0, 2), caps), []
    if kind == 4:
        return struct.pack("<HH", src.number(0, 1), src.number(0, 3)) + src.blob(48), []
    return codec.encode_version(0, 0, None), []


def _dma_map(src: Source) -> tuple[bytes, list[str]]:
    offset = _u(src, [0, 0, 0, PAGE], 64)
    addr = _u(src, ADDRS, 64)
    size = _u(src, SIZES, 64)
    prot = _u(src, [3, 3, 3, 1, 2, 0, 4], 32)
    payload = DmaMap(_u(src, [DmaMap.SIZE], 32), prot, offset, addr, size).pack()
    length = src.number(0, 2) * PAGE if rare(src, 4) else min(offset + size, 1 << 20)
    fds = pick(src, [[f"memfd:{length}"]] * 5 + [[]] * 2 + [[w] for w in WRONG_FDS]
               + [[f"memfd:{length}", "eventfd"]])
    return payload, fds


def _dma_unmap(src: Source) -> tuple[bytes, list[str]]:
    flags = _u(src, [0, 0, 0, 2, 1], 32)
    addr, size = (0, 0) if flags == 2 and not rare(src, 4) else (_u(src, ADDRS, 64),
                                                                  _u(src, SIZES, 64))
    return DmaUnmap(_u(src, [DmaUnmap.SIZE], 32), flags, addr, size).pack(), []


def _get_info(src: Source) -> tuple[bytes, list[str]]:
    return DeviceInfo(_u(src, [DeviceInfo.SIZE], 32), 0, 0, 0).pack(), []


def _region_info(src: Source) -> tuple[bytes, list[str]]:
    argsz = _u(src, [RegionInfo.SIZE, RegionInfo.SIZE, 64, 256, 8], 32)
    return RegionInfo(argsz, 0, _u(src, list(range(10)), 32), 0, 0, 0).pack(), []


def _io_fds(src: Source) -> tuple[bytes, list[str]]:
    return RegionIoFds(_u(src, [RegionIoFds.SIZE], 32), 0, _u(src, REGIONS, 32),
                       src.number(0, 3)).pack(), []


def _irq_info(src: Source) -> tuple[bytes, list[str]]:
    index = _u(src, [2, 2, 1, 0, 3, 4, 5, 6], 32)
    return IrqInfo(_u(src, [IrqInfo.SIZE], 32), 0, index, 0).pack(), []


def _set_irqs(src: Source) -> tuple[bytes, list[str]]:
    flags = _u(src, IRQ_FLAGS, 32)
    index = _u(src, [2, 2, 1, 0, 3, 4, 5], 32)
    start = _u(src, [0, 0, 1, 3, 4], 32)
    count = _u(src, [0, 1, 1, 2, 4, 5], 32)
    data = b""
    fds: list[str] = []
    if flags & IrqSetFlag.DATA_BOOL:
        n = src.number(0, 8) if rare(src, 4) else count
        data = bytes(src.number(0, 1) for _ in range(min(n, 64)))
    if flags & IrqSetFlag.DATA_EVENTFD:
        n = src.number(0, 3) if rare(src, 4) else min(count, 20)
        fds = ["eventfd"] * n
        if n and rare(src, 6):
            fds[src.number(0, n - 1)] = pick(src, WRONG_FDS)
    elif rare(src, 16):
        fds = ["eventfd"]
    argsz = src.number(0, 64) if rare(src, 8) else IrqSet.SIZE + len(data)
    return IrqSet(argsz, flags, index, start, count).pack() + data, fds


def _access(src: Source, writing: bool) -> bytes:
    index = pick(src, REGIONS)
    offset = _u(src, CONFIG_OFFSETS if index == 7 else OFFSETS, 64)
    count = (pick(src, [0, 3, 0x1000, 1 << 20, (1 << 20) + 1]) if rare(src, 16)
             else _u(src, COUNTS, 32))
    head = RegionAccess(offset, index, count).pack()
    if not writing:
        return head
    n = src.number(0, 16) if rare(src, 8) else count
    data = src.blob(min(n, 64)).ljust(min(n, 1 << 21), b"\0")
    return head + data


def _write_multi(src: Source) -> tuple[bytes, list[str]]:
    n = _u(src, [1, 1, 2, 4, 0], 16)
    entries = [
        WriteMultiEntry(_u(src, OFFSETS, 64), pick(src, REGIONS), _u(src, COUNTS, 32),
                        src.blob(8).ljust(8, b"\0")).pack()
        for _ in range(min(n, 8))
    ]
    return WriteMulti(n).pack() + b"".join(entries), []


def _empty(src: Source) -> tuple[bytes, list[str]]:
    return b"", []


def _random(src: Source) -> tuple[bytes, list[str]]:
    return src.blob(96), []


def _sized(command: Command) -> Callable[[Source], tuple[bytes, list[str]]]:
    """At least the command's fixed structure, mostly (the handler then answers for it)."""
    spec = COMMANDS[command].request
    size = spec.SIZE if spec is not None else 0
    tail = COMMANDS[command].request_tail is not Tail.NONE

    def payload(src: Source) -> tuple[bytes, list[str]]:
        if rare(src, 4):
            return src.blob(96), []
        return src.blob(size).ljust(size, b"\0") + (src.blob(16) if tail else b""), []

    return payload


#: DEVICE_FEATURE indices (the spec's, one unknown, the largest) and operation bits.
FEATURES = [2, 2, 2, 1, 6, 7, 8, 3, 0xFFFF]
FEATURE_OPS = [int(FeatureFlag.SET), int(FeatureFlag.SET), int(FeatureFlag.GET),
               int(FeatureFlag.PROBE), int(FeatureFlag.PROBE | FeatureFlag.GET),
               int(FeatureFlag.PROBE | FeatureFlag.SET), int(FeatureFlag.GET | FeatureFlag.SET),
               0, 1 << 19]
#: Migration states to ask for: the ones a client uses most, then every number and one past.
MIG_TARGETS = [MigState.STOP_COPY, MigState.RESUMING, MigState.RUNNING, MigState.STOP,
               *range(9)]


def _device_feature(src: Source) -> tuple[bytes, list[str]]:
    flags = pick(src, FEATURES) | pick(src, FEATURE_OPS)
    if rare(src, 4):
        data = src.blob(24)
    else:
        data = MigDeviceState(int(pick(src, MIG_TARGETS)), _u(src, [0, 0xFFFFFFFF], 32)).pack()
    argsz = _u(src, [64, 64, 16, 8, 15], 32)
    return DeviceFeature(argsz, flags).pack() + data, []


def _mig_data_read(src: Source) -> tuple[bytes, list[str]]:
    size = _u(src, [4096, 16, 0, 1 << 20, (1 << 20) + 1], 32)
    argsz = _u(src, [(MigData.SIZE + size) & 0xFFFFFFFF, 0xFFFFFFFF, 8], 32)
    return MigData(argsz, size).pack(), []


def _mig_data_write(src: Source) -> tuple[bytes, list[str]]:
    """A piece of a migration stream (mostly from its start), or noise."""
    data = mig_stream(src.blob(32))
    start = 0 if src.number(0, 3) else src.number(0, len(data))
    piece = data[start:start + src.number(0, len(data))] if not rare(src, 4) else src.blob(40)
    size = len(piece) if src.number(0, 7) else _u(src, [0, 1, 64], 32)
    return MigData(_u(src, [MigData.SIZE + len(piece), 8], 32), size).pack() + piece, []


PAYLOADS: dict[int, Callable[[Source], tuple[bytes, list[str]]]] = {
    Command.VERSION: _version,
    Command.DMA_MAP: _dma_map,
    Command.DMA_UNMAP: _dma_unmap,
    Command.DEVICE_GET_INFO: _get_info,
    Command.DEVICE_GET_REGION_INFO: _region_info,
    Command.DEVICE_GET_REGION_IO_FDS: _io_fds,
    Command.DEVICE_GET_IRQ_INFO: _irq_info,
    Command.DEVICE_SET_IRQS: _set_irqs,
    Command.REGION_READ: lambda src: (_access(src, False), []),
    Command.REGION_WRITE: lambda src: (_access(src, True), []),
    Command.REGION_WRITE_MULTI: _write_multi,
    Command.DEVICE_RESET: _empty,
    Command.DIRTY_PAGES: _sized(Command.DIRTY_PAGES),
    Command.DEVICE_FEATURE: _device_feature,
    Command.MIG_DATA_READ: _mig_data_read,
    Command.MIG_DATA_WRITE: _mig_data_write,
    Command.DMA_READ: _random,
    Command.DMA_WRITE: _random,
}

#: Commands by how often QEMU sends them (region accesses and maps dominate).
WEIGHTED = [
    *[Command.REGION_READ] * 6, *[Command.REGION_WRITE] * 6, *[Command.DMA_MAP] * 3,
    *[Command.DMA_UNMAP] * 2, *[Command.DEVICE_SET_IRQS] * 3, Command.REGION_WRITE_MULTI,
    Command.VERSION, Command.DEVICE_GET_INFO, *[Command.DEVICE_GET_REGION_INFO] * 2,
    *[Command.DEVICE_GET_IRQ_INFO] * 2, *[Command.DEVICE_GET_REGION_IO_FDS] * 2,
    Command.DEVICE_RESET, None, None, None,
]
#: QEMU never sends these (the server's own requests, DIRTY_PAGES, and migration v2).
OTHERS = [Command.DIRTY_PAGES, Command.DEVICE_FEATURE, Command.MIG_DATA_READ,
          Command.MIG_DATA_WRITE, Command.DMA_READ, Command.DMA_WRITE]
#: What a migrating client sends: state changes most, the data, and what a stopped device
#: must refuse or take (region accesses, reset).
MIGRATION = [*[Command.DEVICE_FEATURE] * 4, *[Command.MIG_DATA_READ] * 2,
             *[Command.MIG_DATA_WRITE] * 3, Command.REGION_READ, Command.REGION_WRITE,
             Command.REGION_WRITE_MULTI, Command.DEVICE_RESET]


def build_message(src: Source, commands: Sequence[Command | None] = WEIGHTED) -> FuzzMessage:
    """One request, shaped like QEMU's most of the time (or drawn from ``commands``)."""
    if rare(src, 16):  # anything at all
        fds = [pick(src, ["eventfd", "memfd:4096", *WRONG_FDS])] * src.number(0, 2)
        return FuzzMessage(src.number(0, 0xFFFF), src.number(0, 0xFFFFFFFF) & ~0xE, src.blob(96),
                           fds)
    command = int(pick(src, commands) or pick(src, OTHERS))
    payload, fds = PAYLOADS[command](src)
    if command in (Command.REGION_WRITE, Command.REGION_WRITE_MULTI):
        flags = pick(src, [0, NO_REPLY, NO_REPLY])  # QEMU posts most writes
    else:
        flags = pick(src, [0, 0, 0, 0, 0, 0, 0, NO_REPLY])
    choice = src.number(0, 31)
    if choice == 31:
        flags = src.number(0, 0xFFFFFFFF) & ~0xE  # random bits, type request or reply
    elif choice == 30:
        payload += src.blob(16)  # trailing junk
    elif choice == 29:
        payload = payload[: src.number(0, len(payload))]  # cut short
    return FuzzMessage(command, flags, payload, fds)


STATES = [SessionState.RUNNING] * 5 + [SessionState.NEGOTIATED] * 2 + [
    SessionState.AWAIT_VERSION, SessionState.CLOSED]


def build_migration(src: Source, max_messages: int = 8) -> list[FuzzMessage]:
    """Messages of a migrating client, in the RUNNING session state: mostly a state change
    (STOP_COPY or RESUMING most often) first, then what may follow."""
    messages = []
    if src.number(0, 3):
        target = MigDeviceState(int(pick(src, MIG_TARGETS)), 0).pack()
        flags = 2 | int(FeatureFlag.SET)  # MIG_DEVICE_STATE
        messages.append(FuzzMessage(Command.DEVICE_FEATURE, 0,
                                    DeviceFeature(64, flags).pack() + target))
    return messages + [build_message(src, MIGRATION) for _ in range(src.number(1, max_messages))]


def build_session(src: Source, max_messages: int = 4) -> tuple[SessionState, list[FuzzMessage]]:
    """A starting state and the messages that follow.

    Half the time a connection from its start, as QEMU opens it (VERSION, then DEVICE_GET_INFO
    or DMA maps); otherwise a state from :data:`STATES` and whatever comes.
    """
    messages: list[FuzzMessage] = []
    if src.number(0, 1):
        state = SessionState.AWAIT_VERSION
        messages.append(FuzzMessage(Command.VERSION, 0, _version(src)[0]))
        if src.number(0, 1):
            messages.append(FuzzMessage(Command.DEVICE_GET_INFO, 0, _get_info(src)[0]))
    else:
        state = pick(src, STATES)
    messages += [build_message(src) for _ in range(src.number(1, max_messages))]
    return state, messages


# --- fds -------------------------------------------------------------------------------------


def make_fd(kind: str) -> int:
    """An fd of ``kind`` (the caller hands it over; the other ends are closed here)."""
    if kind.startswith("memfd"):
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, int(kind.partition(":")[2] or PAGE))
        return fd
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    if kind == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        return r
    if kind == "socket":
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    if kind == "dir":
        return os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if kind == "file":
        fd, path = tempfile.mkstemp(prefix="pyvfio-fuzz-")
        os.unlink(path)
        os.ftruncate(fd, 2 * PAGE)
        return fd
    raise ValueError(kind)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


# --- checks --------------------------------------------------------------------------------


class HandlerCounter:
    """Counts the inputs that reached each command's handler, and those it completed.

    Installed by wrapping the endpoint's handler table (restored by :meth:`uninstall`).
    """

    def __init__(self) -> None:
        self.reached: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self._saved: dict[int, Any] = {}

    def install(self) -> HandlerCounter:
        table = endpoint_module._HANDLERS
        self._saved = dict(table)
        for cmd, fn in self._saved.items():
            table[cmd] = self._wrap(Command(cmd).name, fn)
        return self

    def _wrap(self, name: str, fn: Any) -> Any:
        def counted(ep: Endpoint, msg: codec.Message) -> Any:
            self.reached[name] += 1
            result = fn(ep, msg)
            self.completed[name] += 1
            return result

        return counted

    def uninstall(self) -> None:
        endpoint_module._HANDLERS.update(self._saved)

    def names(self) -> list[str]:
        return [Command(c).name for c in self._saved]

    def report(self) -> str:
        return ", ".join(f"{n} {self.reached[n]}/{self.completed[n]}" for n in self.names())


def check_endpoint(device: VfioDevice, state: SessionState, messages: list[FuzzMessage]) -> None:
    """Feed ``messages`` to a fresh endpoint in ``state``; raise AssertionError on a bad answer."""
    before = open_fds()
    session = Session()
    session.state = state
    table = DmaMapTable(unmap_timeout=1.0)
    ep = Endpoint(device, session, table)
    try:
        for i, fm in enumerate(messages):
            fds: list[int] = []
            try:
                for kind in fm.fds:
                    fds.append(make_fd(kind))
            except OSError:
                for fd in fds:
                    os.close(fd)
                raise
            msg = codec.Message(i + 1, fm.command, fm.flags, 0, fm.payload, fds)
            reply = ep.handle(msg)  # must not raise
            if msg.no_reply:
                assert reply is None, f"a reply to a NO_REPLY {msg.command_name()}"
            else:
                assert reply is not None, f"no reply to {msg.command_name()} flags {fm.flags:#x}"
                assert reply.msg_id == i + 1 and reply.command == fm.command and reply.is_reply
                assert not reply.is_error or (reply.error > 0 and not reply.payload)
    finally:
        ep.migration.close()  # as the connection does: a stopped device runs again
        table.remove_all()
        device.irqs.close()
    leaked = open_fds() - before
    assert not leaked, f"fds left open: {sorted(leaked)}"


def check_reader(messages: list[FuzzMessage], cuts: list[int], noise: bytes, noise_at: int,
                 max_size: int = 1 << 16) -> None:
    """The one framing reader, fed the encoded messages in reads cut at ``cuts``.

    Each message's fds (stand-in numbers: the reader never touches an fd) come with the read
    that holds its first byte, which ends at the latest with the message, as on a UNIX socket.
    Without ``noise`` every message must come out whole, in order, with its own fds, up to the
    first one over ``max_size`` (then a FramingError); with ``noise`` inserted at ``noise_at``
    a FramingError is the only failure allowed and the messages before the noise come out as
    sent. Whatever happens, every fd fed leaves the reader exactly once (in a message or by
    ``take_fds``).
    """
    encoded = [codec.encode(codec.Message(i + 1, m.command, m.flags, 0, m.payload))
               for i, m in enumerate(messages)]
    starts: list[int] = []
    pos = 0
    for e in encoded:
        starts.append(pos)
        pos += len(e)
    stream = b"".join(encoded)
    fds_of = {i: [1000 + 16 * i + k for k in range(min(len(m.fds), 16))]
              for i, m in enumerate(messages) if m.fds}
    at = min(noise_at, len(stream)) if noise else len(stream)
    if noise:
        stream = stream[:at] + noise + stream[at:]
        starts = [p if p < at else p + len(noise) for p in starts]
    # reads: the cuts, and a cut after every message that carries fds
    bounds = {min(c, len(stream)) for c in cuts} | {len(stream)}
    for i in fds_of:
        bounds.add(starts[i] + len(encoded[i]))
    reads: list[tuple[int, int]] = []
    prev = 0
    for b in sorted(bounds):
        if b > prev:
            reads.append((prev, b))
            prev = b
    reader = MessageReader(max_size)
    got: list[codec.Message] = []
    fed: list[int] = []
    failed = False
    try:
        for first, last in reads:
            fds = [fd for i, more in fds_of.items() if first <= starts[i] < last for fd in more]
            fed += fds
            reader.feed(stream[first:last], fds)
            while (msg := reader.next_message()) is not None:
                got.append(msg)
    except FramingError:
        failed = True
    out = [fd for m in got for fd in m.fds] + reader.take_fds()
    assert sorted(out) == sorted(fed), f"fds in {sorted(fed)}, out {sorted(out)}"
    expected = [(i + 1, m.command, m.flags, m.payload, fds_of.get(i, []))
                for i, m in enumerate(messages)]
    seen = [(m.msg_id, m.command, m.flags, m.payload, m.fds) for m in got]
    whole = 0  # messages that must come out: before the noise, up to the first too big
    for i, e in enumerate(encoded):
        if len(e) > max_size or (noise and starts[i] + len(e) > at):
            break
        whole += 1
    assert seen[:whole] == expected[:whole]
    if not noise:
        assert failed == (whole < len(messages)), (failed, whole, len(messages))
        assert len(seen) == whole


def check_session(commands: list[int], caps: list[dict[str, Any]]) -> None:
    """Drive a Session by the table; only ProtocolError may come out of it."""
    session = Session()
    caps_iter = iter(caps)
    for cmd in commands:
        before = session.state
        if session.accepts(cmd):
            assert session.check(cmd) == cmd
            if cmd == Command.VERSION:
                with contextlib.suppress(ProtocolError):
                    session.negotiate(0, 0, next(caps_iter, {}))
                    session.completed(cmd)
            else:
                session.completed(cmd)
        else:
            try:
                session.check(cmd)
            except ProtocolError as exc:
                assert exc.errno > 0
            else:
                raise AssertionError(f"state {before} refused {cmd} but check passed")
        allowed = {before}
        with contextlib.suppress(ValueError):
            allowed.add(TRANSITIONS.get((before, Command(cmd)), before))
        assert session.state in allowed, f"{before} -> {session.state} on {cmd}"
