"""The C shim on the message path: the one reader in C, and REGION_READ / REGION_WRITE in C.

A profile of the server answering trapped BAR accesses (BENCHMARKS.md, "The message path in
C") puts most of its own time in the Python around each message: the reader's header parse and
payload copy, the :class:`~vfio_user_server.protocol.codec.Message`, the endpoint's checks and
dispatch, the reply's encoding and the socket calls. ``vfio_user_server._msg_shim``
(``c_shim/msg.c``, built by cffi when the package is installed) does those in C:

* :class:`ShimMessageReader` is :class:`~vfio_user_server.protocol.framing.MessageReader` with
  the same interface, the same messages and the same errors (tests/test_msg_shim.py feeds both
  the same random streams), reading straight from the socket into one reused buffer
  (:meth:`ShimMessageReader.recv`);
* :class:`FastPath` serves REGION_READ and REGION_WRITE without a Message: the shim decodes the
  access and the device's region handler is called with the integers; the reply is encoded and
  sent by the shim. The shim takes an access only when the Python path would hand it to the
  handler without an error (the session state accepts it, the region has it whole, no more data
  than advertised, no fds); every other message, bad accesses included, comes out as a
  Message and goes through :class:`~vfio_user_server.endpoint.Endpoint` as before. The limits
  come from :mod:`~vfio_user_server.protocol.session` and the device, passed in per connection.

The pure-Python path stays: it is chosen when the shim is not built, or forced with
``PYVFIO_NO_SHIM=1`` (the same variable as the DMA copier's), and the server logs which one
runs. Without the shim nothing here is used but :func:`new_reader` and :func:`path_name`.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .dmacopy import ENV_NO_SHIM
from .errors import ConnectionClosed, FramingError
from .protocol.codec import Message
from .protocol.constants import HEADER_SIZE, Command, HeaderFlag
from .protocol.framing import (
    MessageReader,
    check_pending,
    header_error,
    middle_error,
    no_data_error,
)
from .protocol.session import may_change_state
from .protocol.structs import RegionAccess

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["FastPath", "ShimMessageReader", "load", "new_reader", "path_name", "sender"]

log = logging.getLogger(__name__)

_READ = int(Command.REGION_READ)
_WRITE = int(Command.REGION_WRITE)
_NO_REPLY = int(HeaderFlag.NO_REPLY)
_ACCESS = RegionAccess.SIZE


def _import() -> Any | None:
    try:
        return importlib.import_module("vfio_user_server._msg_shim")
    except ImportError:
        return None


def load() -> Any | None:
    """The shim's module, or None when it is not built or ``PYVFIO_NO_SHIM`` is set."""
    if os.environ.get(ENV_NO_SHIM, "") not in ("", "0"):
        return None
    return _import()


def path_name(shim: bool | None = None) -> str:
    """``"c-shim"`` or ``"python"``, with the reason, for the server's log."""
    if shim is False:
        return "python (chosen by the caller)"
    if shim:
        return "c-shim"
    if os.environ.get(ENV_NO_SHIM, "") not in ("", "0"):
        return f"python ({ENV_NO_SHIM} is set)"
    if _import() is None:
        return "python (the C shim is not built)"
    return "c-shim"


def new_reader(max_size: int, shim: bool | None = None) -> MessageReader | ShimMessageReader:
    """The one reader: the shim's when it runs, else the Python reference. ``shim`` False
    forces the Python reader, True the shim's (ImportError if it is not built)."""
    if shim is False:
        return MessageReader(max_size)
    module = _import() if shim else load()
    return MessageReader(max_size) if module is None else ShimMessageReader(max_size, module)


def _os_error(rc: int) -> OSError:
    if rc == -errno.ENOMEM:
        raise MemoryError("message reader: out of memory")
    return OSError(-rc, os.strerror(-rc))


class ShimMessageReader:
    """:class:`~vfio_user_server.protocol.framing.MessageReader` in C (same interface)."""

    __slots__ = ("_error", "_ffi", "_lib", "_r")

    def __init__(self, max_size: int, module: Any | None = None) -> None:
        module = module if module is not None else _import()
        if module is None:
            raise ImportError("the C shim (vfio_user_server._msg_shim) is not built")
        self._ffi = module.ffi
        self._lib = module.lib
        r = self._lib.pyvfio_reader_new(max_size)
        if r == self._ffi.NULL:
            raise MemoryError("message reader: out of memory")
        self._r = self._ffi.gc(r, self._lib.pyvfio_reader_free)
        self._error: FramingError | None = None

    @property
    def max_size(self) -> int:
        return int(self._r.max_size)

    @max_size.setter
    def max_size(self, value: int) -> None:
        self._r.max_size = value

    # --- the interface of MessageReader ---------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        """Append what one read returned; the reader owns ``fds`` from here on."""
        ffi = self._ffi
        n = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
        with ffi.from_buffer(data) as p:
            rc = self._lib.pyvfio_feed(self._r, p, n, fds or ffi.NULL, len(fds or ()))
        if rc:
            self._raise(rc)

    def next_message(self) -> Message | None:
        """The next whole message, or None until more is fed; FramingError as the reference."""
        kind = self._lib.pyvfio_next(self._r)
        if kind == 0:  # PYVFIO_NONE
            return None
        if kind < 0:
            self._raise(kind)
        return self.message()

    def message(self) -> Message:
        """The message :func:`pyvfio_next` just took (any kind), as a Message."""
        r, ffi = self._r, self._ffi
        payload = ffi.buffer(r.buf + r.payload, r.size - HEADER_SIZE)[:]
        fds = list(ffi.unpack(r.fds, r.nfds)) if r.nfds else []
        return Message(r.msg_id, r.command, r.flags, r.error, payload, fds)

    def pending_bytes(self) -> int:
        return int(self._r.len - self._r.pos)

    def has_message(self) -> bool:
        return bool(self._lib.pyvfio_has_message(self._r))

    def export_pending(self) -> tuple[bytes, list[tuple[int, int, list[int]]]]:
        r, ffi = self._r, self._ffi
        pos = r.pos
        data = ffi.buffer(r.buf + pos, r.len - pos)[:] if r.len > pos else b""
        marks = [(max(m.first - pos, 0), m.last - pos, list(ffi.unpack(m.fds, m.nfds)))
                 for m in (r.marks[i] for i in range(r.nmarks))]
        return data, marks

    def import_pending(self, data: bytes, marks: list[tuple[int, int, list[int]]]) -> None:
        r = self._r
        if r.len or r.nmarks or self._error is not None:
            raise ValueError("import_pending needs a fresh reader")
        check_pending(len(data), marks)
        self.feed(data)
        for first, last, fds in marks:
            if self._lib.pyvfio_add_mark(r, first, last, list(fds), len(fds)):
                raise MemoryError("message reader: out of memory")

    def take_fds(self) -> list[int]:
        if self._lib.pyvfio_take(self._r):
            raise MemoryError("message reader: out of memory")
        r = self._r
        return list(self._ffi.unpack(r.fds, r.nfds)) if r.nfds else []

    # --- reading from a socket ------------------------------------------------------------------
    def special(self) -> tuple[int, list[int], int]:
        """The read pyvfio_recv / pyvfio_next_from returned as special: (nbytes, fds, flags)."""
        r = self._r
        return int(r.rbytes), list(r.rfds[0:r.nrfds]), int(r.rflags)

    def recv(self, fd: int) -> tuple[int, list[int], int] | None:
        """One read from the socket ``fd`` into the buffer. None when it brought bytes and
        nothing else (they are taken); else ``(nbytes, fds, flags)`` of a read with fds, flags
        or at the end of the stream, for the caller to check (transport.check_fds) before
        :meth:`commit`. EINTR is retried, as Python's socket calls do; OSError otherwise."""
        lib, r = self._lib, self._r
        while True:
            rc = lib.pyvfio_recv(r, fd)
            if rc > 0:
                return None
            if rc == 0:  # PYVFIO_RECV_SPECIAL
                return self.special()
            if rc != -errno.EINTR:
                raise _os_error(rc)

    def commit(self) -> None:
        """Take the bytes and fds of the read :meth:`recv` returned."""
        rc = self._lib.pyvfio_commit(self._r)
        if rc:
            self._raise(rc)

    def _raise(self, rc: int) -> None:
        """Raise for a result of the shim: the framing error, MemoryError or OSError."""
        if rc != self._lib.PYVFIO_ERROR:
            raise _os_error(rc)
        if self._error is None:
            r, lib = self._r, self._lib
            if r.err == lib.PYVFIO_ERR_HEADER:
                exc = header_error(r.e1, r.e2, r.e3)
                assert exc is not None
            elif r.err == lib.PYVFIO_ERR_MIDDLE:
                exc = middle_error(r.e1, r.e2, r.e3)
            else:
                exc = no_data_error()
            self._error = exc
        raise self._error


def sender(reader: ShimMessageReader) -> Callable[[int, Message], None]:
    """The shim's ``send(fd, msg)``: header encoded in C, one ``sendmsg`` with the fds (the
    caller serialises senders, as for transport.send_bytes)."""
    ffi, lib = reader._ffi, reader._lib
    null = ffi.NULL

    def send(fd: int, msg: Message) -> None:
        payload, fds = msg.payload, msg.fds
        with ffi.from_buffer(payload) as p:
            rc = lib.pyvfio_send(fd, msg.msg_id, msg.command, msg.flags, msg.error, p,
                                 len(p), fds or null, len(fds))
        if rc:
            raise _os_error(rc)

    return send


class FastPath:
    """REGION_READ / REGION_WRITE of one connection served through the shim.

    :meth:`handle_one` replaces :meth:`Connection.handle_one <vfio_user_server.connection.
    Connection.handle_one>`'s read-decode-dispatch-encode for these two commands; any other
    message is handed back to the connection as a Message.
    """

    def __init__(self, conn: Connection, reader: ShimMessageReader) -> None:
        for command in (_READ, _WRITE):  # the fast path never records a state change
            assert not may_change_state(command)
        self.conn = conn
        self.reader = reader
        self._lib = reader._lib
        self._ffi = reader._ffi
        self._r = r = reader._r
        self._fd = conn.sock.fileno()
        lib = self._lib
        self._kinds = (lib.PYVFIO_FAST_READ, lib.PYVFIO_FAST_WRITE, lib.PYVFIO_MESSAGE,
                       lib.PYVFIO_SPECIAL)
        self._reads: list[Any] = [None] * len(r.region_perm)
        self._writes: list[Any] = [None] * len(r.region_perm)
        for index, region in conn.endpoint.regions().items():
            if not 0 <= index < len(r.region_perm) or region.size == 0:
                continue
            r.region_size[index] = region.size
            r.region_perm[index] = (region.read is not None) | (region.write is not None) << 1
            self._reads[index] = region.read
            self._writes[index] = region.write
        r.max_xfer = conn.session.caps.max_data_xfer_size
        self.state_changed()
        r.fast = 1

    def state_changed(self) -> None:
        """Tell the shim which of the two commands the session's and the migration's states
        let through now (after every message the Python path handled: only those change
        them); a gated access goes to the Python path, which says what to do with it."""
        ungated = self.conn.endpoint.ungated
        self._r.accepts = (ungated(_READ) << _READ) | (ungated(_WRITE) << _WRITE)

    def handle_one(self) -> Message | None:
        """Read until one message is there; serve it if it is a fast access (None), else
        return it for the Python path. Raises what the reader raises."""
        next_from, r, fd = self._lib.pyvfio_next_from, self._r, self._fd
        fast_read, fast_write, message, special = self._kinds
        while True:
            kind = next_from(r, fd)  # reads the socket as needed: one call per message
            if kind == fast_read:
                self._read()
                return None
            if kind == fast_write:
                self._write()
                return None
            if kind == message:
                return self.reader.message()
            if kind == special:  # fds, flags or the end of the stream
                self.conn.reader.take_special(*self.reader.special())
            elif kind != -errno.EINTR:  # interrupted: go on, as Python's socket calls do
                self.reader._raise(kind)

    def _read(self) -> None:
        r = self._r
        count = r.count
        try:
            data = self._reads[r.index](r.offset, count)
            if len(data) != count:
                raise self.conn.endpoint.short_read(r.index, len(data), count)
        except Exception as exc:
            self._failed(exc)
            return
        if r.flags & _NO_REPLY:  # NO_REPLY: the handler ran, nothing to say
            return
        if type(data) is not bytes:
            data = bytes(data)
        with self.conn.send_lock:
            if self.conn.closed:
                raise ConnectionClosed("connection is closed")
            rc = self._lib.pyvfio_reply_access(r, self._fd, data, count)
        if rc:
            raise _os_error(rc)

    def _write(self) -> None:
        r = self._r
        data = self._ffi.buffer(r.buf + r.payload + _ACCESS, r.count)[:]
        try:
            self._writes[r.index](r.offset, data)
        except Exception as exc:
            self._failed(exc)
            return
        if r.flags & _NO_REPLY:  # posted: NO_REPLY
            return
        with self.conn.send_lock:
            if self.conn.closed:
                raise ConnectionClosed("connection is closed")
            rc = self._lib.pyvfio_reply_access(r, self._fd, self._ffi.NULL, 0)
        if rc:
            raise _os_error(rc)

    def _failed(self, exc: Exception) -> None:
        """The handler raised: the endpoint's answer, as the Python path gives it."""
        msg = self.reader.message()
        reply = self.conn.endpoint.failed(msg, exc)
        if reply is not None:
            self.conn.send(reply)
