"""Crash recovery, the device process's side: what it tells its supervisor, and the stream
rule that makes a crash lose at most one message (docs/state.md, "Crash recovery").

In supervised mode (``vfio-user-server --supervise``, :mod:`vfio_user_server.supervisor`) the
device process hands a duplicate of every fd it serves with to the parent as it gets it, over
a ``SOCK_SEQPACKET`` socketpair (one JSON event a datagram, its fds beside it): the listening
socket, the client socket, each DMA map's fd, the interrupt eventfds; it says when they go, and
it sends the client's session and the config space the client programmed.

**The stream.** The connection reads with ``MSG_PEEK`` (``SO_PEEK_OFF`` makes successive peeks
go on, so a burst still costs one read) and consumes a message from the socket only once it
was handled, just before its reply is sent. A small shared page (the *record*, a memfd the
parent maps too) says at every moment where the stream is:

============  ================================================  ==============================
record        the socket's next byte is                          the new process
============  ================================================  ==============================
IDLE          the next message                                   reads on
HANDLING H    H's first byte (H is being handled)                reads H, answers it with an
                                                                 error (DMA_MAP, DMA_UNMAP and
                                                                 SET_IRQS are done again)
CONSUMING H   H's first byte, or the message after H             consumes H if it is still
                                                                 there, then as REPLYING
REPLYING H R  the message after H; R may or may not be sent     sends R if it is header-only,
                                                                 else an error reply to H
============  ================================================  ==============================

A header-only reply that arrives twice costs QEMU a logged "unexpected reply" and nothing
else (``hw/vfio-user/proxy.c`` reads the 16 bytes and drops them), which is why the
ambiguous REPLYING case is safe; a reply with a payload would desynchronise it, so it is never
sent twice. A message is consumed in one ``recv``: QEMU sends each message in one ``sendmsg``,
so a message of up to the advertised size is one socket buffer, taken whole or not at all.
"""

from __future__ import annotations

import array
import base64
import contextlib
import errno
import json
import logging
import mmap
import os
import socket
import struct
import threading
from typing import TYPE_CHECKING, Any

from . import irq
from . import state as _state
from .connection import Connection
from .endpoint import VfioDevice
from .errors import ConnectionClosed
from .protocol import codec
from .protocol.constants import HEADER_SIZE, Command, RegionIndex
from .protocol.structs import DmaMap, Header, RegionAccess
from .protocol.trace import describe
from .threads import any_thread, loop_thread
from .transport import _ANCBUF, SocketReader, check_read

if TYPE_CHECKING:
    from .server import Server

__all__ = [
    "EVENTS_ENV",
    "RECORD_ENV",
    "RECOVER_ENV",
    "Record",
    "Reporter",
    "SupervisedChild",
    "SupervisedConnection",
    "read_record",
    "reset_record",
    "restore",
]

log = logging.getLogger(__name__)

#: The environment of a supervised device process: its event channel, the record's memfd,
#: and (a new process after a crash) the hand-over channel.
EVENTS_ENV = "PYVFIO_SUPERVISOR_FD"
RECORD_ENV = "PYVFIO_RECORD_FD"
RECOVER_ENV = "PYVFIO_RECOVER_FD"

#: Linux's SO_PEEK_OFF (Python's socket module does not name it).
SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)
#: Most fds in one event datagram (the kernel's SCM_MAX_FD is 253).
EVENT_FDS = 200
#: The largest event datagram.
EVENT_SIZE = 1 << 16
#: The errno of the error reply to a request the dead process left unanswered.
LOST_ERRNO = errno.EIO
#: Request ids the new process skips, so that a late reply to the dead one's DMA request
#: can never complete one of its own.
ID_SKIP = 0x4000

_HDR = Header.STRUCT
_NO_REPLY = 0x10
_REPLY = 0x1

# --- the record -----------------------------------------------------------------------------
IDLE, HANDLING, CONSUMING, REPLYING = 0, 1, 2, 3
STATE_NAMES = {IDLE: "idle", HANDLING: "handling", CONSUMING: "consuming",
               REPLYING: "replying"}
RECORD_MAGIC = b"VFUR"
#: magic, format version, state, the message's header, its reply's header (zeros: none)
RECORD = struct.Struct("<4sII16s16s")
RECORD_SIZE = 4096
_NONE = bytes(16)


class Record:
    """The shared page: the stream position of the message being handled."""

    __slots__ = ("_map", "_pack")

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, RECORD_SIZE, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._pack = RECORD.pack_into

    @staticmethod
    def create() -> int:
        """A new record memfd, IDLE (the supervisor's; children get it by inheritance)."""
        fd = os.memfd_create("pyvfio-user-record", os.MFD_CLOEXEC)
        os.ftruncate(fd, RECORD_SIZE)
        reset_record(fd)
        return fd

    def write(self, state: int, head: bytes = _NONE, reply: bytes = _NONE) -> None:
        self._pack(self._map, 0, RECORD_MAGIC, 1, state, head, reply)

    def close(self) -> None:
        self._map.close()


def reset_record(fd: int) -> None:
    """Make the record IDLE (before a new process starts)."""
    os.pwrite(fd, RECORD.pack(RECORD_MAGIC, 1, IDLE, _NONE, _NONE), 0)


def read_record(fd: int) -> dict[str, Any]:
    """The record as the supervisor hands it over (it reads only its own page)."""
    magic, version, state, head, reply = RECORD.unpack(os.pread(fd, RECORD.size, 0))
    if magic != RECORD_MAGIC or version != 1 or state not in STATE_NAMES:
        state, head, reply = IDLE, _NONE, _NONE
    return {"state": state, "head": base64.b64encode(head).decode(),
            "reply": base64.b64encode(reply).decode()}


# --- the event channel ----------------------------------------------------------------------
class Reporter:
    """The device process's end of the event channel (any thread)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._broken = False

    @any_thread
    def send(self, event: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        data = json.dumps(event, separators=(",", ":")).encode()
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
               if fds else [])
        with self._lock:
            if self._broken:
                return
            try:
                self.sock.sendmsg([data], anc)
            except OSError as exc:  # the supervisor is gone: serve on, unsupervised
                self._broken = True
                log.error("supervisor unreachable (%s): serving on without crash recovery",
                          exc)


class SupervisedChild:
    """What a supervised device process holds: its event channel and its record."""

    def __init__(self, events_fd: int, record_fd: int) -> None:
        self.reporter = Reporter(socket.socket(fileno=events_fd))
        self.record = Record(record_fd)
        os.close(record_fd)

    @classmethod
    def from_environment(cls) -> SupervisedChild | None:
        events = os.environ.pop(EVENTS_ENV, None)
        record = os.environ.pop(RECORD_ENV, None)
        if events is None or record is None:
            return None
        return cls(int(events), int(record))

    #: the next connection built is the one a recovery hands over (the supervisor has it)
    recovering = False

    def connection_factory(self, server: Server, sock: socket.socket,
                           device: VfioDevice) -> Connection:
        recovered, self.recovering = self.recovering, False
        return SupervisedConnection(server, sock, device, self, recovered=recovered)

    def report_server(self, server: Server) -> None:
        """The listening socket and what a new process needs to serve on it."""
        listener = server._listener
        assert listener is not None
        self.reporter.send({"ev": "server", "caps": server.caps.to_json(),
                            "dma_layout": server.dma_layout.value, "path": str(server.path),
                            "owns_path": server.owns_path}, [listener.fileno()])

    def report_ready(self) -> None:
        self.reporter.send({"ev": "ready", "pid": os.getpid()})


# --- the stream -----------------------------------------------------------------------------
class PeekingReader(SocketReader):
    """Reads that leave the bytes in the socket (``MSG_PEEK`` from ``SO_PEEK_OFF``), and
    :meth:`consume`, which takes one handled message out of it."""

    __slots__ = ("_scratch",)

    def __init__(self, sock: socket.socket, max_size: int) -> None:
        super().__init__(sock, max_size, peer="client", shim=False)  # the C reader reads itself
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)  # peek from the first unread byte
        self._scratch = memoryview(bytearray(max_size))

    def fill(self) -> None:
        view = self._view
        nbytes, ancdata, rflags, _ = self.sock.recvmsg_into([view], _ANCBUF, socket.MSG_PEEK)
        fds = check_read(nbytes, ancdata, rflags, self.peer) if (
            ancdata or rflags or not nbytes) else None
        self.reader.feed(view[:nbytes], fds)

    def consume(self, size: int) -> None:
        """Take ``size`` handled bytes out of the socket; their fds (the kernel's copies of
        the ones the peek gave) are dropped by the kernel: no ancillary buffer."""
        while size:
            n = self.sock.recv_into(self._scratch, size)
            if not n:
                raise ConnectionClosed("client closed the connection")
            size -= n


class SupervisedConnection(Connection):
    """A client connection that keeps its supervisor able to take over at any moment."""

    def __init__(self, server: Server, sock: socket.socket, device: VfioDevice,
                 child: SupervisedChild, *, recovered: bool = False) -> None:
        super().__init__(server, sock, device)
        self.child = child
        self.record = child.record
        self.reader: PeekingReader = PeekingReader(sock, server.caps.max_message_size)
        # the C reader and sender work on whole reads; here a message is peeked, then consumed
        self.fast = None
        self.csender = None
        #: the header of the message the dead process was handling (a recovered connection)
        self.lost: bytes | None = None
        self._maps: dict[int, tuple[int, int, int, bool]] = {}  # what the supervisor has
        self._config: bytes | None = None
        self._requester: dict[str, object] = {"next_id": 1, "layout": None,
                                              "negotiated": False}
        self.recovered = recovered
        if not recovered:
            child.reporter.send({"ev": "client"}, [sock.fileno()])
            self._report_session()

    @loop_thread
    def handle_one(self) -> None:
        msg = self.reader.read_message()
        if self.server.tracing:
            self.server._trace(describe(msg, direction="<-"))
        head = _HDR.pack(msg.msg_id, msg.command, msg.size, msg.flags, msg.error)
        record = self.record
        if self.lost is not None:
            lost, self.lost = self.lost, None
            if head == lost and self._settle_lost(msg, head):
                return
        record.write(HANDLING, head)
        if msg.is_reply:
            self._finish(msg, head, None)
            self.requester.complete(msg)
            return
        first = self.session.state
        reply = self.endpoint.handle(msg)
        connected = msg.command == Command.VERSION and first is not self.session.state
        if connected:
            self.device_connected = True
            try:
                self.device.vfio_attach(self.ctx)
            except Exception:
                log.exception("device vfio_attach failed")
        self._report(msg)
        if self.session.state is not first:  # VERSION, DEVICE_GET_INFO
            self._report_session()
        self._finish(msg, head, reply)
        if connected:
            self.requester.negotiated()

    @loop_thread
    def _finish(self, msg: codec.Message, head: bytes, reply: codec.Message | None) -> None:
        """Consume ``msg`` from the socket, then send its reply, the record saying where."""
        rhead = _NONE if reply is None else _HDR.pack(
            reply.msg_id, reply.command, reply.size, reply.flags, reply.error)
        record = self.record
        record.write(CONSUMING, head, rhead)
        self.reader.consume(msg.size)
        if reply is not None:
            record.write(REPLYING, head, rhead)
            self.send(reply)
        record.write(IDLE)

    @loop_thread
    def _settle_lost(self, msg: codec.Message, head: bytes) -> bool:
        """The message the dead process was handling, read again: answered with an error
        (True), or False to handle it again: DMA_MAP, DMA_UNMAP and SET_IRQS, so that the
        client's memory and interrupt plumbing stay the same on both sides (a refused DMA_MAP
        can abort QEMU). A map the supervisor already holds is not added twice."""
        reply: codec.Message | None
        if msg.command == Command.DMA_MAP and len(msg.payload) >= DmaMap.SIZE:
            m = DmaMap.unpack(msg.payload)
            have = self.table.find(m.addr)
            if have is None or have.iova != m.addr or have.size != m.size:
                return False
            reply = codec.reply_to(msg)
        elif msg.command in (Command.DMA_MAP, Command.DMA_UNMAP, Command.DEVICE_SET_IRQS):
            return False
        else:
            reply = None if msg.flags & (_NO_REPLY | _REPLY) else codec.error_reply(
                msg, LOST_ERRNO)
            log.warning("answering the request the dead process left with an error: %s",
                        describe(msg, direction="<-"))
        self.record.write(HANDLING, head)
        msg.close_fds()
        self._finish(msg, head, reply)
        return True

    # --- telling the supervisor ---------------------------------------------------------------
    def _report(self, msg: codec.Message) -> None:
        cmd = msg.command
        if cmd == Command.DMA_MAP or cmd == Command.DMA_UNMAP:
            self._report_maps()
        elif cmd == Command.DEVICE_SET_IRQS or cmd == Command.DEVICE_RESET:
            self._report_irqs()
            self._report_config()
        elif (cmd == Command.REGION_WRITE and len(msg.payload) >= RegionAccess.SIZE
              and RegionAccess.unpack(msg.payload).region == RegionIndex.CONFIG):
            self._report_config()

    def _report_session(self) -> None:
        s = self.session
        try:
            requester = self.requester.export()
            self._requester = requester
        except RuntimeError:  # a DMA request waits: the last record will do (ids skip ahead)
            requester = self._requester
        self.child.reporter.send({"ev": "session", "session": {
            "state": s.state.value, "client_max_msg_fds": s.client_max_msg_fds,
            "client_max_data_xfer": s.client_max_data_xfer, "client_caps": s.client_caps},
            "requester": requester, "device_connected": self.device_connected})

    def _report_maps(self) -> None:
        now = {m.iova: (m, fd) for m, fd in self.table.map_fds()}
        send = self.child.reporter.send
        for iova in [i for i in self._maps if i not in now]:
            del self._maps[iova]
            send({"ev": "unmap", "iova": iova})
        for iova, (m, fd) in now.items():
            key = (m.size, int(m.prot), m.offset, fd is not None)
            if self._maps.get(iova) != key:
                self._maps[iova] = key
                send({"ev": "map", "iova": iova, "size": m.size, "prot": int(m.prot),
                      "offset": m.offset}, [] if fd is None else [fd])

    def _report_irqs(self) -> None:
        vectors, resample = irq.eventfds(self.device.irqs)
        fds = [fd for _i, _v, fd in vectors]
        if resample is not None:
            fds.append(resample)
        if len(fds) > EVENT_FDS:
            log.error("%d interrupt fds: more than one event carries; the supervisor keeps "
                      "the first %d", len(fds), EVENT_FDS)
            vectors, fds, resample = vectors[:EVENT_FDS], fds[:EVENT_FDS], None
        self.child.reporter.send({"ev": "irqs", "vectors": [[i, v] for i, v, _fd in vectors],
                                  "resample": resample is not None}, fds)

    def _report_config(self) -> None:
        config = getattr(self.device, "config", None)
        if config is None:
            return
        data = bytes(config.space.data)
        if data != self._config:
            self._config = data
            self.child.reporter.send({"ev": "config",
                                      "bytes": base64.b64encode(data).decode()})

    def adopted(self) -> None:
        """A recovered connection: what the supervisor holds is what this one has."""
        self._maps = {m.iova: (m.size, int(m.prot), m.offset, fd is not None)
                      for m, fd in self.table.map_fds()}
        config = getattr(self.device, "config", None)
        self._config = None if config is None else bytes(config.space.data)

    @loop_thread
    def close(self) -> None:
        was_closed = self.closed
        super().close()
        if not was_closed:
            self.child.reporter.send({"ev": "gone"})


# --- the new process ------------------------------------------------------------------------
def restore(device: Any, server: Server, conn: Connection | None,
            manifest: dict[str, Any]) -> None:
    """:func:`vfio_user_server.upgrade.resume`'s ``restore`` after a crash: settle the
    message the dead process left (the record), bring the PCI state back and tell the guest
    through the device's reset path (:func:`recover_device`)."""
    rec = manifest.get("recovery")
    if not isinstance(rec, dict):
        raise ValueError("hand-over manifest: no recovery record")
    if conn is None:  # no client: the fresh device is all there is to serve
        return
    assert isinstance(conn, SupervisedConnection)
    config = rec.get("config")
    recover_device(device, None if config is None else base64.b64decode(config, validate=True))
    # a late reply to one of the dead process's DMA requests must not match one of ours
    saved = conn.requester.export()
    next_id = saved["next_id"]
    assert isinstance(next_id, int)
    conn.requester.restore({**saved, "next_id": next_id + ID_SKIP})
    conn.adopted()
    settle(conn, int(rec.get("state", IDLE)), base64.b64decode(rec.get("head", "")),
           base64.b64decode(rec.get("reply", "")))


def recover_device(device: Any, config: bytes | None) -> None:
    """This fresh device takes the config space the client programmed (as the supervisor
    kept it), loaded as any state is (checked: same IDs and capability layout), and the
    device's reset path tells the guest that its own state is gone (``state_lost``: NVMe sets
    CSTS.CFS), as a hot reload that cannot carry a state does."""
    if not hasattr(device, "save_state"):
        with device.lock:
            device.vfio_reset()
        return
    body = _state.decode(device.save_state())
    if config is not None:
        body["config"]["bytes"] = base64.b64encode(config).decode()
    device.load_state(_state.encode(body))
    log.warning("%s: the server process died; the device's own state is lost: reset, guest "
                "told", type(device).__name__)
    with device.lock:
        device.state_lost("the server process died")


@loop_thread
def settle(conn: SupervisedConnection, state: int, head: bytes, reply: bytes) -> None:
    """Act on the dead process's record (the table in the module's docstring)."""
    if state == IDLE or len(head) != HEADER_SIZE:
        return
    log.warning("the dead process was %s a message: %s", STATE_NAMES.get(state, "?"),
                _HDR.unpack(head))
    if state == HANDLING:
        conn.lost = head
        return
    if state == CONSUMING:
        try:
            at = conn.sock.recv(HEADER_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            at = b""
        finally:  # that peek moved the peek offset: the reader starts at the first byte
            conn.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        if at == head:
            conn.reader.consume(_HDR.unpack(head)[2])
    msg_id, command, _size, flags, _err = _HDR.unpack(head)
    if reply == _NONE or flags & (_NO_REPLY | _REPLY):
        return
    r_id, r_command, r_size, r_flags, r_error = _HDR.unpack(reply)
    answer = (codec.Message(r_id, r_command, r_flags, r_error, b"") if r_size == HEADER_SIZE
              else codec.error_reply(codec.Message(msg_id, command), LOST_ERRNO))
    with contextlib.suppress(OSError):
        conn.send(answer)


def receive_recovery(chan: socket.socket, device: Any, child: SupervisedChild,
                     **server_kwargs: Any) -> Server:
    """The new process's side of a recovery: read the hand-over, rebuild, serve, acknowledge."""
    from .upgrade import _send_ack, recv_handover, resume

    child.recovering = True
    try:
        handover = recv_handover(chan)
        server = resume(device, handover, restore=restore,
                        connection_factory=child.connection_factory, **server_kwargs)
        server.start()
    except Exception as exc:
        _send_ack(chan, f"{type(exc).__name__}: {exc}")
        raise
    _send_ack(chan)
    return server

