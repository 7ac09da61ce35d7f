"""Live upgrade: one server process hands everything it serves with to another.

The old process, on its loop thread between two messages (nothing is half-handled), quiesces
the device and collects the listening socket, the client socket, every DMA map's fd with its
metadata, every interrupt eventfd (and the INTx resample fd), the session (negotiated
capabilities, DMA layout, state machine, request ids), the reader's unparsed bytes and their
fds, and the device's ``save_state()``. It sends them over a UNIX socket (:func:`send_handover`:
a versioned, length-prefixed JSON manifest, then the fds in SCM_RIGHTS chunks of at most
``SCM_MAX_FD``). The new process rebuilds the server from them (:func:`resume`), starts
serving and acknowledges; only then does the old one let go, closing its own copies and tearing
down nothing: no unmap on the client's side, no device reset, no socket shutdown or unlink. If
the new process fails before its acknowledgement, the old one resumes the device and serves
on. docs/state.md, "Live upgrade".
"""

from __future__ import annotations

import array
import base64
import contextlib
import errno
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import irq
from .connection import Connection
from .errors import VfioUserError
from .fds import close_fds
from .protocol.constants import DmaLayout, MigState
from .protocol.session import SCM_MAX_FD, ServerCapabilities, SessionState
from .server import Server, listening_socket
from .threads import any_thread, loop_thread
from .transport import fds_from_ancillary

__all__ = [
    "FDS_PER_SEND",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_MANIFEST",
    "Handover",
    "HandoverError",
    "hand_over",
    "receive_and_resume",
    "receive_and_resume_all",
    "recv_handover",
    "refuse",
    "resume",
    "send_handover",
]

log = logging.getLogger(__name__)

FORMAT = "pyvfio-user/handover"
#: Bumped whenever the manifest's meaning changes: a new process refuses another version.
FORMAT_VERSION = 1
_MAGIC = b"VFUH"
_LEN = struct.Struct(">I")
#: The largest manifest read (a device state is at most 64 MiB, base64 makes it 4/3 larger).
MAX_MANIFEST = 96 << 20
#: fds per sendmsg: the kernel's limit.
FDS_PER_SEND = SCM_MAX_FD
#: Most fds a hand-over may carry (maps, vectors, pending message fds, two sockets).
MAX_FDS = 65536 + 4096
_ACK_OK = b"K"
_ACK_ERR = b"E"


class HandoverError(VfioUserError):
    """A hand-over that cannot be sent, read or applied (the old process serves on)."""


@dataclass
class Handover:
    """What one process hands the next: the manifest and the fds it indexes (owned here)."""

    manifest: dict[str, Any]
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        close_fds(self.fds, "hand-over fd")
        self.fds = []


# --- the wire ---------------------------------------------------------------------------------
@any_thread
def send_handover(chan: socket.socket, manifest: dict[str, Any], fds: list[int]) -> None:
    """Send ``manifest`` and ``fds`` (still the caller's: the kernel sends duplicates)."""
    body = json.dumps({**manifest, "format": FORMAT, "format_version": FORMAT_VERSION,
                       "nfds": len(fds)}, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_MANIFEST:
        raise HandoverError(f"hand-over manifest of {len(body)} bytes is too large")
    chan.sendall(_MAGIC + _LEN.pack(len(body)) + body)
    for i in range(0, len(fds), FDS_PER_SEND):
        chunk = fds[i:i + FDS_PER_SEND]
        chan.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                               array.array("i", chunk).tobytes())])


def _recv_exact(chan: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data, anc, _flags, _ = chan.recvmsg(n - len(buf), socket.CMSG_SPACE(4 * FDS_PER_SEND),
                                             socket.MSG_CMSG_CLOEXEC)
        close_fds(fds_from_ancillary(anc), "stray hand-over fd")
        if not data:
            raise HandoverError("hand-over channel closed early")
        buf += data
    return bytes(buf)


@any_thread
def recv_handover(chan: socket.socket) -> Handover:
    """Read one hand-over: the manifest, checked for its format and version, and its fds."""
    head = _recv_exact(chan, len(_MAGIC) + _LEN.size)
    if head[:len(_MAGIC)] != _MAGIC:
        raise HandoverError("not a pyvfio-user hand-over")
    (size,) = _LEN.unpack_from(head, len(_MAGIC))
    if size > MAX_MANIFEST:
        raise HandoverError(f"hand-over manifest of {size} bytes is too large")
    try:
        manifest = json.loads(_recv_exact(chan, size))
    except ValueError as exc:
        raise HandoverError(f"hand-over manifest is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise HandoverError("not a pyvfio-user hand-over manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise HandoverError(f"hand-over format version {manifest.get('format_version')!r}; "
                            f"this code reads version {FORMAT_VERSION}")
    nfds = manifest.get("nfds")
    if not isinstance(nfds, int) or not 0 <= nfds <= MAX_FDS:
        raise HandoverError(f"bad fd count {nfds!r} in the hand-over")
    fds: list[int] = []
    try:
        while len(fds) < nfds:
            data, anc, flags, _ = chan.recvmsg(1, socket.CMSG_SPACE(4 * FDS_PER_SEND),
                                                  socket.MSG_CMSG_CLOEXEC)
            fds += fds_from_ancillary(anc)
            if flags & socket.MSG_CTRUNC:
                raise HandoverError("hand-over fds cut short (out of fds?)")
            if not data:
                raise HandoverError(f"hand-over channel closed after {len(fds)} of {nfds} fds")
        if len(fds) != nfds:
            raise HandoverError(f"hand-over brought {len(fds)} fds, manifest says {nfds}")
    except BaseException:
        close_fds(fds, "hand-over fd")
        raise
    return Handover(manifest, fds)


def _send_ack(chan: socket.socket, error: str | None = None) -> None:
    with contextlib.suppress(OSError):
        if error is None:
            chan.sendall(_ACK_OK)
        else:
            chan.sendall(_ACK_ERR + error.encode(errors="replace")[:4000])


def _recv_ack(chan: socket.socket, timeout: float | None) -> None:
    chan.settimeout(timeout)
    try:
        data = chan.recv(4096)
    except TimeoutError:
        raise HandoverError(f"the new process did not acknowledge in {timeout} s") from None
    finally:
        chan.settimeout(None)
    if data[:1] == _ACK_OK:
        return
    if data[:1] == _ACK_ERR:
        raise HandoverError("the new process refused the hand-over: "
                            + data[1:].decode(errors="replace"))
    raise HandoverError("the new process went away before acknowledging")


# --- the old process --------------------------------------------------------------------------
class _Fds:
    """The fds of a manifest, each once, by index."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._index: dict[int, int] = {}

    def index(self, fd: int) -> int:
        if fd not in self._index:
            self._index[fd] = len(self.fds)
            self.fds.append(fd)
        return self._index[fd]


@loop_thread
def _collect(server: Server, conn: Connection | None) -> tuple[dict[str, Any], list[int]]:
    """The manifest and fds of ``server`` (its device already quiesced)."""
    device = server.device
    save_state = getattr(device, "save_state", None)
    if save_state is None:
        raise HandoverError(f"{type(device).__name__} cannot save its state")
    listener = server._listener
    if listener is None:
        raise HandoverError("the server does not listen")
    fds = _Fds()
    manifest: dict[str, Any] = {
        "caps": server.caps.to_json(),
        "dma_layout": server.dma_layout.value,
        "listener": fds.index(listener.fileno()),
        "path": str(server.path),
        "owns_path": server.owns_path,  # the last process that serves removes the file
        "connection": None,
    }
    if conn is not None:
        reader = conn.reader.reader
        data, marks = reader.export_pending()
        log.info("hand-over: %d unread bytes, %d DMA maps", len(data), len(conn.table))
        session = conn.session
        vectors, resample = irq.eventfds(device.irqs)
        manifest["connection"] = {
            "socket": fds.index(conn.sock.fileno()),
            "session": {"state": session.state.value,
                        "client_max_msg_fds": session.client_max_msg_fds,
                        "client_max_data_xfer": session.client_max_data_xfer,
                        "client_caps": session.client_caps},
            "requester": conn.requester.export(),
            "device_connected": conn.device_connected,
            "dma_maps": [{"iova": m.iova, "size": m.size, "prot": int(m.prot),
                          "offset": m.offset, "fd": None if fd is None else fds.index(fd)}
                         for m, fd in conn.table.map_fds()],
            "irqs": [[index, vector, fds.index(fd)] for index, vector, fd in vectors],
            "resample_fd": None if resample is None else fds.index(resample),
            "reader": {"data": base64.b64encode(data).decode(),
                       "marks": [[first, last, [fds.index(fd) for fd in mfds]]
                                 for first, last, mfds in marks]},
        }
    manifest["device_state"] = base64.b64encode(save_state()).decode()
    return manifest, fds.fds


class _Parked:
    """One server of a hand-over, its loop thread parked in the job until the decision."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.collected = threading.Event()  # payload or error set
        self.decided = threading.Event()
        self.commit = False
        self.payload: tuple[dict[str, Any], list[int]] | None = None
        self.error: BaseException | None = None

    def job(self, conn: Connection | None) -> bool:
        """On the server's loop thread: quiesce, collect, wait for the decision."""
        stack = contextlib.ExitStack()
        quiesced = getattr(self.server.device, "quiesced", None)
        try:
            if conn is not None and conn.endpoint.migration.state is not MigState.RUNNING:
                # the new process would start RUNNING: the client's migration would be lost
                raise HandoverError("the device is migrating (migration state "
                                    f"{conn.endpoint.migration.state.name}): no hand-over now",
                                    errno=errno.EBUSY)
            if quiesced is not None:
                stack.enter_context(quiesced())
            self.payload = _collect(self.server, conn)
        except BaseException as exc:
            stack.close()
            self.error = exc
            self.collected.set()
            raise
        self.collected.set()
        self.decided.wait()
        if not self.commit:
            stack.close()  # resume: this process serves on
            return False
        stack.pop_all()  # stays quiesced: the device is the new process's now
        log.info("handed %s over to the new process", self.server.path)
        return True

    def run(self, timeout: float | None) -> None:
        try:
            self.server.run_between_messages(self.job, timeout=timeout)
        except BaseException as exc:
            if self.error is None:
                self.error = exc
        finally:
            self.collected.set()  # also when the loop never took the job


@any_thread
def hand_over(servers: Server | Sequence[Server], chan: socket.socket, *,
              timeout: float | None = 60.0) -> None:
    """Hand ``servers`` (each started ``upgradable``; the devices of one process) to the
    process at the other end of ``chan``: one hand-over each, in order, then one
    acknowledgement for all.

    Every server's loop thread stops between two messages and stays parked until the new
    process acknowledged (then none of them serves any more, and nothing was torn down) or
    failed (then every device is resumed and serves on, nothing lost: HandoverError, or what
    collecting raised).
    """
    group = [servers] if isinstance(servers, Server) else list(servers)
    for srv in group:
        if srv.stopping:
            raise HandoverError(f"{srv.path} no longer serves: nothing to hand over")
    parked = [_Parked(srv) for srv in group]
    wait = None if timeout is None else 2 * timeout
    threads = [threading.Thread(target=p.run, args=(wait,), daemon=True,
                                name=f"vfio-user-handover:{p.server.path.name}")
               for p in parked]
    for t in threads:
        t.start()
    try:
        for p in parked:
            p.collected.wait()
            if p.error is not None:
                raise p.error
        for p in parked:
            assert p.payload is not None
            send_handover(chan, *p.payload)
        _recv_ack(chan, timeout)
        for p in parked:
            p.commit = True
    finally:
        for p in parked:
            p.decided.set()
        for t in threads:
            t.join()
    if not all(p.server.handed_over for p in parked):
        raise HandoverError("the hand-over did not complete")


# --- the new process --------------------------------------------------------------------------
def _get(d: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise HandoverError(f"hand-over manifest: {key!r} missing")
    value = d[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise HandoverError(f"hand-over manifest: {key!r} is {type(value).__name__}")
    return value


@any_thread
def resume(device: Any, handover: Handover, *, reset_own: bool = False,
           **server_kwargs: Any) -> Server:
    """Rebuild the server of a hand-over around ``device`` (a fresh instance of the same
    class): the listener, the connection with its session, maps, eventfds and unread bytes,
    and the device state. Returns the server, not yet started (``start()`` serves where the
    old process stopped). ``handover``'s fds are consumed (closed here, duplicates kept).

    ``reset_own`` (hot reload): a device state whose device part this code refuses (another
    ``state_version``) resets the device, guest told (``PciDevice.load_state``)."""
    m = handover.manifest
    fds = handover.fds

    def dup(index: Any) -> int:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(fds):
            raise HandoverError(f"hand-over manifest: no fd #{index!r}")
        return os.dup(fds[index])

    server: Server | None = None
    conn: Connection | None = None
    try:
        try:
            caps = ServerCapabilities(**_get(m, "caps", dict))
            layout = DmaLayout(_get(m, "dma_layout", str))
        except (TypeError, ValueError) as exc:
            raise HandoverError(f"hand-over manifest: bad capabilities: {exc}") from None
        state = base64.b64decode(_get(m, "device_state", str), validate=True)
        listener = listening_socket(dup(_get(m, "listener", int)))
        server_kwargs.setdefault("upgradable", True)
        server = Server(device, listener, caps=caps, dma_layout=layout, **server_kwargs)
        server.owns_path = _get(m, "owns_path", bool)
        server.path = Path(_get(m, "path", str))
        c = m.get("connection")
        if c is not None:
            sock = socket.socket(fileno=dup(_get(c, "socket", int)))
            sock.setblocking(True)
            conn = Connection(server, sock, device)
            s = _get(c, "session", dict)
            try:
                conn.session.state = SessionState(_get(s, "state", str))
            except ValueError as exc:
                raise HandoverError(f"hand-over manifest: {exc}") from None
            conn.session.client_max_msg_fds = _get(s, "client_max_msg_fds", int)
            conn.session.client_max_data_xfer = _get(s, "client_max_data_xfer", int)
            conn.session.client_caps = _get(s, "client_caps", dict)
            try:
                conn.requester.restore(_get(c, "requester", dict))
            except (ValueError, KeyError) as exc:
                raise HandoverError(f"hand-over manifest: requester: {exc}") from None
            for entry in _get(c, "dma_maps", list):
                fd = entry.get("fd") if isinstance(entry, dict) else None
                conn.table.add(_get(entry, "iova", int), _get(entry, "size", int),
                               _get(entry, "prot", int), None if fd is None else dup(fd),
                               _get(entry, "offset", int))
            vectors: list[tuple[int, int, int]] = []
            try:
                for item in _get(c, "irqs", list):
                    index, vector, fd = item
                    vectors.append((int(index), int(vector), dup(fd)))
                resample = c.get("resample_fd")
                irq.adopt_eventfds(device.irqs, vectors,
                                   None if resample is None else dup(resample))
            except (TypeError, ValueError) as exc:
                close_fds([fd for _i, _v, fd in vectors], "IRQ fd")
                raise HandoverError(f"hand-over manifest: irqs: {exc}") from None
            r = _get(c, "reader", dict)
            marks: list[tuple[int, int, list[int]]] = []
            for first, last, idx in _get(r, "marks", list):
                marks.append((int(first), int(last), [dup(i) for i in idx]))
            try:
                conn.reader.reader.import_pending(
                    base64.b64decode(_get(r, "data", str), validate=True), marks)
            except BaseException:
                close_fds([fd for _f, _l, mfds in marks for fd in mfds], "message fd")
                raise
            if _get(c, "device_connected", bool):
                conn.device_connected = True
                device.vfio_attach(conn.ctx)
        if reset_own:
            device.load_state(state, reset_own=True)
        else:
            device.load_state(state)
        if conn is not None:
            server.adopt(conn)
        return server
    except BaseException:
        if conn is not None:
            conn.abandon()
        if server is not None:
            server.handed_over = True  # never unlink the old process's socket
            server.close()
        raise
    finally:
        handover.close()


def _discard(server: Server) -> None:
    """Drop a server resumed but never started (a sibling failed): tear nothing down."""
    conn, server._first = server._first, None
    if conn is not None:
        conn.abandon()
    server.handed_over = True  # never unlink the old process's socket
    server.close()


@any_thread
def refuse(chan: socket.socket, error: str) -> None:
    """The new process's side when it cannot even try (its device failed to load): the old
    process serves on and reports ``error``."""
    _send_ack(chan, error)


@any_thread
def receive_and_resume_all(chan: socket.socket, devices: Sequence[tuple[Any, dict[str, Any]]],
                           *, reset_own: bool = False) -> list[Server]:
    """The new process's side: read one hand-over per ``(device, server_kwargs)``, in the
    old process's order, rebuild every server, start them all, then acknowledge (or tell the
    old process why not, so that it serves on: nothing was started then)."""
    servers: list[Server] = []
    try:
        for device, kwargs in devices:
            servers.append(resume(device, recv_handover(chan), reset_own=reset_own, **kwargs))
        for srv in servers:
            srv.start()
    except Exception as exc:
        for srv in servers:
            if not srv.started:
                _discard(srv)
        _send_ack(chan, f"{type(exc).__name__}: {exc}")
        raise
    _send_ack(chan)
    return servers


@any_thread
def receive_and_resume(chan: socket.socket, device: Any, *, reset_own: bool = False,
                       **server_kwargs: Any) -> Server:
    """:func:`receive_and_resume_all` for one device."""
    return receive_and_resume_all(chan, [(device, server_kwargs)], reset_own=reset_own)[0]
