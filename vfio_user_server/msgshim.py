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
* :class:`ShimSender` encodes and sends every message to the client under one lock in C (the
  loop's replies, the Python path's, device threads' requests);
* :class:`FastPath` serves REGION_READ and REGION_WRITE without a Message, in a loop in C
  (``pyvfio_serve``): the shim reads, decodes each access, calls the device's region handler
  through a cffi callback with the integers (the GIL is taken for the handler only), and
  sends the reply; every complete message already read is served before the next read. The
  shim takes an access only when the Python path would hand it to the handler without an error
  (the session state accepts it, the region has it whole, no more data than advertised, no
  fds); every other message, bad accesses included, ends the loop, comes out as a Message and
  goes through :class:`~vfio_user_server.endpoint.Endpoint` as before. The limits come from
  :mod:`~vfio_user_server.protocol.session` and the device, passed in per connection;
* the same loop answers QEMU's INTx EOI, DEVICE_SET_IRQS(INTX, NONE|UNMASK, 0, 1), which the
  client sends after every INTx interrupt, on the first BAR access after it, and waits for with
  the vCPU stopped (``vfio_pci_intx_eoi``, a synchronous ``vfio_user_send_wait``). Python
  checks those exact bytes once, by the Python path's own rules
  (:meth:`Endpoint.plain_set_irqs <vfio_user_server.endpoint.Endpoint.plain_set_irqs>`), and
  gives them to the shim (:meth:`FastPath.allow_set_irqs`); the shim takes a message equal to
  them byte for byte, without fds, while the session state lets SET_IRQS through, calls the
  IRQ controller's ``set_irqs`` with them through one callback (irq.py keeps the INTx line,
  mask and eventfds) and sends the header-only reply. Every other SET_IRQS takes the Python
  path.

Measured (BENCHMARKS.md): the loop took the server's user-space instructions per message from
about 23,900 (one C call per message, four with the GIL dropped and retaken) to about 10,400
(8,300 with the BAR dispatch's own changes, vfio_user_server/bar_region.py).

The pure-Python path stays: it is chosen when the shim is not built, or forced with
``PYVFIO_NO_SHIM=1`` (the same variable as the DMA copier's), and the server logs which one
runs. Without the shim nothing here is used but :func:`new_reader` and :func:`path_name`.
"""

from __future__ import annotations

import errno
import functools
import importlib
import itertools
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from .dmacopy import ENV_NO_SHIM
from .errors import ConnectionClosed, FramingError
from .protocol.codec import Message
from .protocol.constants import HEADER_SIZE, Command, HeaderFlag, IrqIndex, IrqSetFlag
from .protocol.framing import (
    MessageReader,
    check_pending,
    header_error,
    middle_error,
    no_data_error,
)
from .protocol.session import may_change_state
from .protocol.structs import IrqSet, RegionAccess

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["INTX_EOI", "FastPath", "ShimMessageReader", "ShimSender", "load", "new_reader",
           "path_name"]

log = logging.getLogger(__name__)

_READ = int(Command.REGION_READ)
_WRITE = int(Command.REGION_WRITE)
_SET_IRQS = int(Command.DEVICE_SET_IRQS)
_NO_REPLY = int(HeaderFlag.NO_REPLY)
_ACCESS = RegionAccess.SIZE
#: QEMU's INTx EOI (``vfio_device_irq_unmask``): SET_IRQS(INTX, NONE|UNMASK, 0, 1), argsz the
#: structure's size
INTX_EOI = IrqSet(IrqSet.SIZE, int(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK),
                  int(IrqIndex.INTX), 0, 1).pack()


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


def _nothing() -> None:
    """No SET_IRQS request is taken by the loop (FastPath.apply_set_irqs)."""


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

    def _raise(self, rc: int) -> NoReturn:
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


class ShimSender:
    """Every send to one socket, encoded in C, under one lock in C (``pyvfio_sender``): the
    replies of the loop (:meth:`FastPath.serve`) and of the Python path, and the requests of
    device threads. After :meth:`close` nothing more is sent (ConnectionClosed)."""

    __slots__ = ("_ffi", "_lib", "s")

    def __init__(self, fd: int, reader: ShimMessageReader) -> None:
        self._ffi = reader._ffi
        self._lib = reader._lib
        s = self._lib.pyvfio_sender_new(fd)
        if s == self._ffi.NULL:
            raise MemoryError("message sender: out of memory")
        self.s = self._ffi.gc(s, self._lib.pyvfio_sender_free)

    def send(self, msg: Message) -> None:
        """Header encoded in C, one ``sendmsg`` with the fds, under the lock."""
        ffi = self._ffi
        payload, fds = msg.payload, msg.fds
        with ffi.from_buffer(payload) as p:
            rc = self._lib.pyvfio_sender_send(self.s, msg.msg_id, msg.command, msg.flags,
                                              msg.error, p, len(p), fds or ffi.NULL, len(fds))
        if rc:
            raise _send_error(rc, self._lib)

    def close(self) -> None:
        """No more sends (one in progress finishes first)."""
        self._lib.pyvfio_sender_close(self.s)


def _send_error(rc: int, lib: Any) -> Exception:
    if rc == lib.PYVFIO_CLOSED:
        return ConnectionClosed("connection is closed")
    return _os_error(rc)


#: The FastPath each loop thread serves now, by its slot (the callbacks' first argument).
_serving: dict[int, FastPath] = {}
_slots = itertools.count(1)
_installed: set[int] = set()


def _install(ffi: Any, lib: Any) -> None:
    """Give the shim its callbacks (once)."""
    if id(ffi) in _installed:
        return
    stop = lib.PYVFIO_CB_STOP

    def lost(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        """A callback raised past its own handling (a bug here): stop, the loop says why."""
        del exc_type, tb
        for path in list(_serving.values()):
            if path.loop_thread is threading.current_thread():
                path.stopped = exc
                path._r.status = stop

    # The four callbacks run on the loop thread, inside FastPath.handle_one's C call, with the
    # GIL. Each calls the region's handler as the Python path does (Endpoint), and on an
    # exception answers as the Python path does (FastPath.failed).
    def pyvfio_read_value(slot: int, index: int, offset: int, count: int) -> int:
        path = _serving[slot]
        try:
            return path.read_values[index](offset, count)  # type: ignore[no-any-return]
        except BaseException as exc:
            path.failed(exc)
            return 0

    def pyvfio_read_bytes(slot: int, index: int, offset: int, count: int) -> None:
        path = _serving[slot]
        try:
            data = path.reads[index](offset, count)
            if len(data) != count:
                raise path.conn.endpoint.short_read(index, len(data), count)
            ffi.memmove(path._r.rdata, data, count)
        except BaseException as exc:
            path.failed(exc)

    def pyvfio_write_value(slot: int, index: int, offset: int, count: int, value: int) -> None:
        path = _serving[slot]
        try:
            path.write_values[index](offset, count, value)
        except BaseException as exc:
            path.failed(exc)

    def pyvfio_write_bytes(slot: int, index: int, offset: int, count: int, data: Any) -> None:
        path = _serving[slot]
        try:
            path.writes[index](offset, ffi.unpack(data, count))
        except BaseException as exc:
            path.failed(exc)

    def pyvfio_set_irqs(slot: int) -> None:
        path = _serving[slot]
        try:
            path.apply_set_irqs()
        except BaseException as exc:
            path.failed(exc)

    for callback in (pyvfio_read_value, pyvfio_read_bytes, pyvfio_write_value,
                     pyvfio_write_bytes, pyvfio_set_irqs):
        ffi.def_extern(onerror=lost)(callback)  # by its name
    _installed.add(id(ffi))


class FastPath:
    """REGION_READ / REGION_WRITE of one connection served by the shim's loop.

    :meth:`handle_one` replaces :meth:`Connection.handle_one <vfio_user_server.connection.
    Connection.handle_one>`'s read-decode-dispatch-encode for these two commands: one C call
    (``pyvfio_serve``) serves them, as many as come, calling the region's handler through a
    callback, and returns for any other message, which goes to the connection as a Message.
    Region handlers that take and give the value as an integer (``Region.read_value`` and
    ``write_value``) are called for 1, 2, 4 and 8 bytes; the others with bytes.
    """

    def __init__(self, conn: Connection, reader: ShimMessageReader, sender: ShimSender) -> None:
        for command in (_READ, _WRITE):  # the fast path never records a state change
            assert not may_change_state(command)
        self.conn = conn
        self.reader = reader
        self.sender = sender
        self._lib = lib = reader._lib
        _install(reader._ffi, lib)
        self._r = r = reader._r
        self.slot = next(_slots)
        r.slot = self.slot
        n = len(r.region_perm)
        self.reads: list[Any] = [None] * n
        self.writes: list[Any] = [None] * n
        self.read_values: list[Any] = [None] * n
        self.write_values: list[Any] = [None] * n
        for index, region in conn.endpoint.regions().items():
            if not 0 <= index < n or region.size == 0:
                continue
            r.region_size[index] = region.size
            r.region_perm[index] = (region.read is not None) | (region.write is not None) << 1
            self.reads[index] = region.read
            self.writes[index] = region.write
            self.read_values[index] = region.read_value
            self.write_values[index] = region.write_value
            r.region_int[index] = (
                (lib.PYVFIO_INT_READ if region.read is not None and region.read_value else 0)
                | (lib.PYVFIO_INT_WRITE if region.write is not None and region.write_value
                   else 0))
        r.max_xfer = conn.session.caps.max_data_xfer_size
        #: the SET_IRQS request the loop takes (allow_set_irqs), applied as the Python path does
        self.apply_set_irqs: Callable[[], None] = _nothing
        self.allow_set_irqs(INTX_EOI)
        self.state_changed()
        #: the exception a callback stopped the loop with (raised by handle_one)
        self.stopped: BaseException | None = None
        self.loop_thread: threading.Thread | None = None
        #: the loop returned for a wake-up (the flag, a signal or the watched fd): the caller
        #: looks for a job and drains the fd, then clears this
        self.woken = False
        self._done = (lib.PYVFIO_INTERRUPTED, -errno.EINTR)
        r.fast = 1

    def state_changed(self) -> None:
        """Tell the shim which of the two commands the session's and the migration's states
        let through now (after every message the Python path handled: only those change
        them); a gated access goes to the Python path, which says what to do with it."""
        ungated = self.conn.endpoint.ungated
        self._r.accepts = ((ungated(_READ) << _READ) | (ungated(_WRITE) << _WRITE)
                           | (ungated(_SET_IRQS) << _SET_IRQS))

    def allow_set_irqs(self, payload: bytes) -> bool:
        """Let the loop answer the DEVICE_SET_IRQS request ``payload`` (without fds) itself,
        in place of any it took before, if the Python path would apply it without an error
        (:meth:`Endpoint.plain_set_irqs <vfio_user_server.endpoint.Endpoint.plain_set_irqs>`:
        every rule but the session state's, which :meth:`state_changed` gives the shim). The
        loop then calls the IRQ controller's ``set_irqs`` with it, as the Python path's handler
        does, and sends the reply. False (and none taken) when it would be refused."""
        r = self._r
        r.irq_set_len = 0
        self.apply_set_irqs = _nothing
        if len(payload) > len(r.irq_set):
            return False
        try:
            args = self.conn.endpoint.plain_set_irqs(payload)
        except Exception:
            return False
        irqs = self.conn.endpoint.device.irqs
        self.apply_set_irqs = functools.partial(irqs.set_irqs, *args, (), b"")
        self.reader._ffi.memmove(r.irq_set, payload, len(payload))
        r.irq_set_len = len(payload)
        return True

    def interrupt(self) -> None:
        """(any thread) The loop returns before its next message (a job between two)."""
        self._r.stop = 1

    def watch(self, fd: int) -> None:
        """The loop returns when ``fd`` is readable (polled with the socket in the one wait
        before each read: a job posted at any moment ends the next wait); :attr:`woken` says
        so, for the caller to drain ``fd``."""
        self._r.wake_fd = fd

    def handle_one(self) -> Message | None:
        """Serve fast accesses until another message comes, and return it; None when the
        loop returned without one (a read with fds taken, an interruption: the caller looks
        for a job, then calls again). Raises what the reader and the sender raise, and what a
        callback stopped the loop with."""
        r, lib = self._r, self._lib
        self.loop_thread = threading.current_thread()
        _serving[self.slot] = self
        try:
            kind = lib.pyvfio_serve(r, self.sender.s)
        finally:
            del _serving[self.slot]
        if kind == lib.PYVFIO_MESSAGE:
            return self.reader.message()
        if kind == lib.PYVFIO_SPECIAL:  # fds, flags or the end of the stream
            self.conn.reader.take_special(*self.reader.special())
            return None
        if kind in self._done:  # interrupted: the caller looks for a job
            r.stop = 0
            self.woken = True
            return None
        if kind == lib.PYVFIO_STOPPED:
            exc, self.stopped = self.stopped, None
            assert exc is not None
            raise exc
        if kind == lib.PYVFIO_CLOSED:
            raise ConnectionClosed("connection is closed")
        self.reader._raise(kind)  # a framing error, MemoryError or OSError

    def failed(self, exc: BaseException) -> None:
        """A handler raised (in a callback): the endpoint's answer, as the Python path gives
        it; anything that is not an Exception (or an error sending the answer) stops the loop
        and is raised by :meth:`handle_one`. Called from the callback's ``except`` block."""
        r = self._r
        if isinstance(exc, Exception):
            try:
                reply = self.conn.endpoint.failed(self.reader.message(), exc)
                if reply is not None:
                    self.conn.send(reply)
                r.status = self._lib.PYVFIO_CB_DONE
                return
            except BaseException as again:
                exc = again
        self.stopped = exc
        r.status = self._lib.PYVFIO_CB_STOP
