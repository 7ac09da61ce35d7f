"""Bytes and fds over a UNIX stream socket: the I/O half of the one message reader.

:class:`SocketReader` does the reads (one ``recvmsg_into`` takes whatever the peer has sent,
fds included) and hands them to the sans-IO
:class:`~vfio_user_server.protocol.framing.MessageReader`, which cuts them into messages.
:func:`send_bytes` writes one encoded message with its fds. The server's connection, the
:class:`~vfio_user_server.client.Client` and the tests' raw peers all use these two.
"""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence

from .errors import ConnectionClosed, FramingError
from .fds import close_fds
from .protocol.codec import Message
from .protocol.framing import MessageReader
from .protocol.session import SCM_MAX_FD

#: Most bytes taken from the socket by one read.
RECV_CHUNK = 256 * 1024
#: Room for the ancillary data of one read: the kernel never passes more fds in one read.
_ANCBUF = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # the enum's & costs a microsecond per message
_SOL_SOCKET = socket.SOL_SOCKET
_SCM_RIGHTS = socket.SCM_RIGHTS


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of SCM_RIGHTS entries in ``recvmsg`` ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


def check_read(nbytes: int, ancdata: list[tuple[int, int, bytes]], rflags: int,
               peer: str = "peer") -> list[int]:
    """The fds of one read, after checking it: ancillary data cut short is a FramingError (its
    fds are lost, so no message can be trusted); no bytes is the peer's end of stream."""
    fds = fds_from_ancillary(ancdata) if ancdata else []
    if rflags & _MSG_CTRUNC:
        close_fds(fds)
        raise FramingError(f"{peer} sent more fds in one message than one read can carry")
    if nbytes == 0:
        close_fds(fds)
        raise ConnectionClosed(f"{peer} closed the connection")
    return fds


class SocketReader:
    """Messages from a socket: reads fed to a :class:`MessageReader`, one message at a time.

    A read takes whatever has arrived (up to :data:`RECV_CHUNK` bytes), so a burst of
    pipelined messages costs one system call. Not thread-safe: one thread reads.
    """

    __slots__ = ("_view", "peer", "reader", "sock")

    def __init__(self, sock: socket.socket, max_size: int, *, peer: str = "peer",
                 chunk: int = RECV_CHUNK) -> None:
        self.sock = sock
        self.reader = MessageReader(max_size)
        self.peer = peer
        self._view = memoryview(bytearray(chunk))

    def read_message(self) -> Message:
        """The next message; blocks for more reads as needed.

        Raises :class:`~vfio_user_server.errors.FramingError` when the stream breaks the
        framing rules, :class:`~vfio_user_server.errors.ConnectionClosed` at the peer's end of
        stream, and ``OSError`` from the socket.
        """
        reader = self.reader
        while True:
            msg = reader.next_message()
            if msg is not None:
                return msg
            self.fill()

    def fill(self) -> None:
        """One read from the socket into the reader."""
        view = self._view
        # CLOEXEC: a client's fds never leak into a program this process starts.
        nbytes, ancdata, rflags, _ = self.sock.recvmsg_into([view], _ANCBUF,
                                                            socket.MSG_CMSG_CLOEXEC)
        if ancdata or rflags or not nbytes:
            fds = self._checked(nbytes, ancdata, rflags)
            self.reader.feed(view[:nbytes], fds)
        else:
            self.reader.feed(view[:nbytes])

    def _checked(self, nbytes: int, ancdata: list[tuple[int, int, bytes]], rflags: int
                 ) -> list[int]:
        try:
            return check_read(nbytes, ancdata, rflags, self.peer)
        except ConnectionClosed:
            if self.reader.pending_bytes():
                raise ConnectionClosed(f"{self.peer} closed the connection inside a message"
                                       ) from None
            raise

    def close(self) -> None:
        """Close the fds of messages that never arrived whole (the socket is the owner's)."""
        close_fds(self.reader.take_fds(), "message fd")


def send_bytes(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Write ``data``; ``fds`` travel with its first byte (one ``sendmsg``).

    The caller serialises senders (a lock) when several threads send.
    """
    if not fds:
        sock.sendall(data)
        return
    anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])
