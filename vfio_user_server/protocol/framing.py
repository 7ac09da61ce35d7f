"""Cutting a byte-and-fd stream into messages: the one reader, free of I/O.

Every side of a connection reads with :class:`MessageReader`: the server's connection, the
:class:`~vfio_user_server.client.Client` and the tests' raw peers. A transport gives it what
each read returned (``feed(data, fds)``) and takes whole messages out (``next_message()``);
nothing here touches a socket or closes an fd (the caller closes what :meth:`take_fds` hands
back).

The rules, each applied here and nowhere else:

* **Size.** A header whose size is smaller than the header, larger than ``max_size`` (the
  limit of the reading side's capabilities, see
  :func:`~vfio_user_server.protocol.session.max_message_size`) or whose message type is
  unknown is a :class:`~vfio_user_server.errors.FramingError`: the stream cannot be cut any
  further. It is raised as soon as the header is there, before the body is buffered, so no
  buffer is ever sized by an unchecked client value.
* **fds.** On a UNIX stream socket the fds of one ``sendmsg`` arrive with the read that holds
  its first byte, and that read ends at the latest with that ``sendmsg``'s last byte. A sender
  (QEMU) sends a message's fds with its header, so **a read's fds belong to the last message
  that starts in that read**. fds of a read in which no message starts (it lies inside one
  message, after its first byte) were sent in the middle of a message: a
  :class:`~vfio_user_server.errors.FramingError`, raised as soon as the message's header and
  that read are in, not once the message is whole (a client must not make the server hold
  fds, a read's worth at a time, for a message it never finishes).

Whatever way the kernel splits a stream into reads, a stream whose fd-carrying sends each start
at a message and end inside it gives the same messages with the same fds; a stream that breaks
the size rules gives the same messages, then the same error. The hypothesis tests in
``tests/test_framing.py`` check both.

After a :class:`FramingError` the reader is broken: every later :meth:`next_message` raises
the same error.
"""

from __future__ import annotations

from ..errors import FramingError
from .codec import Message
from .constants import HEADER_SIZE, MSG_TYPE_MASK, MsgType
from .structs import Header

_HEADER = Header.STRUCT
_TYPE_MASK = int(MSG_TYPE_MASK)
_REPLY = int(MsgType.REPLY)

#: One read's fds: (offset of its first byte, offset after its last byte, fds).
_Mark = tuple[int, int, list[int]]


def header_error(size: int, flags: int, max_size: int) -> FramingError | None:
    """Why a header with this ``size`` and ``flags`` cannot start a message, or None."""
    if size < HEADER_SIZE:
        return FramingError(f"message size {size} is smaller than the header")
    if size > max_size:
        return FramingError(f"message of {size} bytes is larger than {max_size}")
    if flags & _TYPE_MASK > _REPLY:
        return FramingError(f"bad message type in flags {flags:#x}")
    return None


def middle_error(first: int, last: int, size: int) -> FramingError:
    """fds of a read of bytes ``first..last`` (from the start of a ``size``-byte message that
    holds them) in which no message starts."""
    return FramingError(f"fds arrived in the middle of a message (a read of bytes {first}"
                        f"..{last} of a {size}-byte message)")


def no_data_error() -> FramingError:
    """fds that came with no bytes (never on a stream socket)."""
    return FramingError("fds without data")


def check_pending(size: int, marks: list[tuple[int, int, list[int]]]) -> None:
    """Refuse an exported read (``import_pending``) that lies outside the ``size`` bytes."""
    for first, last, _fds in marks:
        if not 0 <= first < last <= size:
            raise FramingError(f"pending read {first}..{last} outside {size} bytes")


def decode_header(buf: bytes | bytearray | memoryview, max_size: int = 1 << 32) -> Header:
    """Decode the header at the start of ``buf``, checked as the reader checks it."""
    if len(buf) < HEADER_SIZE:
        raise FramingError(f"header of {len(buf)} bytes, need {HEADER_SIZE}")
    hdr = Header(*_HEADER.unpack_from(buf))
    exc = header_error(hdr.size, hdr.flags, max_size)
    if exc is not None:
        raise exc
    return hdr


class MessageReader:
    """Reassemble messages, with their fds, from the reads of a stream (sans-IO).

    ``max_size`` is the largest message accepted, header included; the transport may change
    it (the Client does once it has negotiated). Reads are appended to one buffer that
    advances an offset, as h11's receive buffer does: taking a message costs one header unpack
    and one copy of its payload, whatever number of messages one read brought.
    """

    __slots__ = ("_buf", "_dropped", "_error", "_marks", "_pos", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0
        self._marks: list[_Mark] = []
        self._dropped: list[int] = []  # fds of a refused read, until take_fds()
        self._error: FramingError | None = None

    def feed(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        """Append what one read returned: its bytes and the fds that came with them.

        The reader owns ``fds`` from here on; they leave it in a message or by
        :meth:`take_fds`.
        """
        if self._error is not None:  # a broken stream: nothing more is read from it
            if fds:
                self._dropped += fds
            return
        buf = self._buf
        if self._pos:  # drop what was taken: the buffer holds one partial message and this read
            del buf[:self._pos]  # (a prefix: CPython moves its start, copies nothing)
            if self._marks:
                pos = self._pos
                self._marks = [(a - pos, b - pos, f) for a, b, f in self._marks]
            self._pos = 0
        start = len(buf)
        buf += data
        if fds:
            if len(buf) == start:  # fds come with at least one byte on a stream socket
                self._dropped += fds
                self._fail(no_data_error())
            self._marks.append((start, len(buf), fds))

    def next_message(self) -> Message | None:
        """The next whole message, or None until more is fed.

        Raises :class:`~vfio_user_server.errors.FramingError` when the stream breaks the size
        or fd rules (and again on every later call).
        """
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_SIZE:
            if self._error is not None:
                raise self._error
            return None
        msg_id, command, size, flags, error = _HEADER.unpack_from(buf, pos)
        if size > self.max_size or size < HEADER_SIZE or flags & _TYPE_MASK > _REPLY:
            exc = header_error(size, flags, self.max_size)
            assert exc is not None
            self._fail(exc)
        end = pos + size
        if len(buf) < end:
            if self._marks:  # fds inside this message: refused now, not once it is whole
                mark = self._middle_mark(pos)
                if mark is not None:
                    self._fail(middle_error(mark[0] - pos, mark[1] - pos, size))
            return None
        fds = self._bind(pos, end) if self._marks else []
        payload = bytes(buf[pos + HEADER_SIZE:end])
        if end == len(buf):  # all taken (and every read's fds: each ended by here)
            buf.clear()
            self._pos = 0
        else:  # the next feed() drops what was taken
            self._pos = end
        return Message(msg_id, command, flags, error, payload, fds)

    def pending_bytes(self) -> int:
        """Bytes fed but not yet taken as a message (a partial message at EOF)."""
        return len(self._buf) - self._pos

    def has_message(self) -> bool:
        """Whether a whole message (or a framing error) is waiting: next_message() returns
        without more being fed."""
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            return self._error is not None
        size: int
        flags: int
        size, flags = _HEADER.unpack_from(self._buf, self._pos)[2:4]
        # a header next_message() refuses is an error waiting, whatever follows (or never
        # does), and so are fds inside a message not yet whole
        return (avail >= size or size < HEADER_SIZE or size > self.max_size
                or flags & _TYPE_MASK > _REPLY or self._middle_mark(self._pos) is not None)

    def export_pending(self) -> tuple[bytes, list[tuple[int, int, list[int]]]]:
        """The unparsed bytes and each pending read's fds as ``(first, last, fds)`` offsets
        into those bytes (a live upgrade carries them to a new reader: :meth:`import_pending`).
        The reader keeps owning the fds; the caller duplicates or sends them."""
        pos = self._pos
        marks = [(max(first - pos, 0), last - pos, list(fds)) for first, last, fds in self._marks]
        return bytes(self._buf[pos:]), marks

    def import_pending(self, data: bytes, marks: list[tuple[int, int, list[int]]]) -> None:
        """Start from what :meth:`export_pending` gave in another reader: the same messages,
        with the same fds, come out. Only on a fresh reader; it owns the fds from here on."""
        if self._buf or self._marks or self._error is not None:
            raise ValueError("import_pending needs a fresh reader")
        check_pending(len(data), marks)
        self._buf += data
        self._marks = [(first, last, list(fds)) for first, last, fds in marks]

    def take_fds(self) -> list[int]:
        """Every fd the reader still holds (of unfinished or refused messages); the caller
        closes them. The buffer is emptied: the reader is done with this stream."""
        fds, self._dropped = self._dropped, []
        for _first, _last, more in self._marks:
            fds += more
        self._marks = []
        self._buf.clear()
        self._pos = 0
        return fds

    # --- the slow paths ---------------------------------------------------------------------
    def _fail(self, exc: FramingError) -> None:
        """Break the reader: keep the fds for take_fds(), forget the bytes, raise ``exc``."""
        for _first, _last, fds in self._marks:
            self._dropped += fds
        self._marks = []
        self._buf.clear()
        self._pos = 0
        self._error = exc
        raise exc

    def _middle_mark(self, start: int) -> _Mark | None:
        """The first read with fds that begins after ``start``, the first byte of a message
        that has not all arrived: no message starts in it."""
        for mark in self._marks:
            if mark[0] > start:
                return mark
        return None

    def _bind(self, start: int, end: int) -> list[int]:
        """Take the fds of the message at [start, end): those of each read it is the last
        message to start in (see the module's docstring)."""
        mine: list[int] = []
        keep: list[_Mark] = []
        for mark in self._marks:
            first, last, fds = mark
            if last > end:  # the read goes on past this message: a later one starts in it
                keep.append(mark)
            elif first <= start < last:  # it ends in this message and holds its start
                mine += fds
            else:  # it lies inside this message after its first byte: no message starts in it
                self._fail(middle_error(first - start, last - start, end - start))
        self._marks = keep
        return mine
