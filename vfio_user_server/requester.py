"""Server-to-client requests: DMA_READ and DMA_WRITE, and the replies that answer them.

:class:`ClientRequester` is the :class:`~vfio_user_server.dma.MessageDma` of a connection. A
device thread sends a request and waits for its reply; the connection's loop thread reads that
reply off the socket and hands it over with :meth:`ClientRequester.complete`. So the rule,
marked on each method (:mod:`vfio_user_server.threads`): the waiting side runs on device
threads and never on the loop thread, which is the only thread that could read the answer.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from .errors import ConnectionClosed, DmaError, DmaTimeoutError
from .protocol import codec
from .protocol.constants import Command, DmaLayout
from .protocol.session import Session
from .protocol.structs import DmaAccess, DmaAccessLegacy
from .threads import any_thread, device_thread, loop_thread

log = logging.getLogger(__name__)

#: Largest chunk of one DMA_READ / DMA_WRITE message (QEMU cannot send big replies reliably).
DMA_CHUNK = 64 * 1024
#: Server request ids start here, away from the client's own.
_FIRST_ID = 0x8000


class ClientRequester:
    """DMA_READ / DMA_WRITE requests to the client of one connection, and their replies.

    ``send`` writes a message on the connection (any thread); ``session`` says whether a
    request may be sent yet; ``layout`` is the client's DMA message layout (AUTO: probed once).
    """

    def __init__(self, send: Callable[[codec.Message], None], session: Session,
                 layout: DmaLayout, timeout: float) -> None:
        self._send = send
        self._session = session
        self.timeout = timeout
        #: the connection's loop thread, once it runs: requests from it are refused
        self.loop_thread: threading.Thread | None = None
        self._pending: dict[int, Future[codec.Message]] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(_FIRST_ID)
        self._layout: DmaLayout | None = None if layout is DmaLayout.AUTO else layout
        self._layout_lock = threading.Lock()
        self._negotiated = threading.Event()

    # --- the loop thread's side -------------------------------------------------------------
    @loop_thread
    def negotiated(self) -> None:
        """The client has its VERSION reply: requests may be sent from now on."""
        self._negotiated.set()

    @loop_thread
    def complete(self, reply: codec.Message) -> None:
        """Hand a reply read off the socket to the device thread waiting for it."""
        with self._pending_lock:
            fut = self._pending.pop(reply.msg_id, None)
        if reply.fds:  # no server request takes fds back
            reply.close_fds()
        if fut is None:
            log.warning("reply #%d to no pending request dropped", reply.msg_id)
            return
        fut.set_result(reply)

    @loop_thread
    def close(self) -> None:
        """The connection is going: every waiting and later request fails (ENOTCONN)."""
        self._negotiated.set()  # wake requesters waiting for negotiation: they fail now
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(ConnectionClosed("client disconnected"))

    # --- live upgrade -----------------------------------------------------------------------
    @loop_thread
    def export(self) -> dict[str, object]:
        """What a new process needs to go on: the next request id and the probed layout.
        Refuses (RuntimeError) while a request waits for its reply: that reply would be lost."""
        with self._pending_lock:
            if self._pending:
                raise RuntimeError(f"{len(self._pending)} DMA request(s) wait for a reply")
            nxt = next(self._ids)
            self._ids = itertools.count(nxt)
        return {"next_id": nxt, "layout": None if self._layout is None else self._layout.value,
                "negotiated": self._negotiated.is_set()}

    @loop_thread
    def restore(self, saved: dict[str, object]) -> None:
        """Go on from :meth:`export`'s record."""
        nxt, layout = saved["next_id"], saved["layout"]
        if not isinstance(nxt, int) or not (layout is None or isinstance(layout, str)):
            raise ValueError("bad requester record")
        self._ids = itertools.count(nxt)
        self._layout = None if layout is None else DmaLayout(layout)
        if saved.get("negotiated"):
            self._negotiated.set()

    # --- the device threads' side -----------------------------------------------------------
    @device_thread
    def request(self, command: Command, payload: bytes) -> codec.Message:
        """Send ``command`` to the client and wait for its reply (DmaError on failure)."""
        if threading.current_thread() is self.loop_thread:
            raise DmaError(
                "message DMA from the server's loop thread would deadlock QEMU; run the work "
                "with ctx.defer() or from a device thread",
                errno=errno.EDEADLK,
            )
        if not self._negotiated.wait(self.timeout) or not self._session.may_request():
            raise DmaError("no negotiated client to send DMA requests to", errno=errno.ENOTCONN)
        msg_id = next(self._ids) & 0xFFFF
        fut: Future[codec.Message] = Future()
        with self._pending_lock:
            self._pending[msg_id] = fut
        try:
            self._send(codec.request(msg_id, command, payload))
            reply = fut.result(timeout=self.timeout)
        except FutureTimeout:
            raise DmaTimeoutError(
                f"{command.name} #{msg_id} got no reply in {self.timeout} s"
            ) from None
        except (ConnectionClosed, OSError) as exc:
            # devices handle DmaError; a client that left is one more reason DMA failed
            raise DmaError(f"{command.name} #{msg_id}: {exc}", errno=errno.ENOTCONN) from exc
        finally:
            with self._pending_lock:
                self._pending.pop(msg_id, None)
        if reply.is_error:
            raise DmaError(f"client refused {command.name}: errno {reply.error} "
                           f"({os.strerror(reply.error) if reply.error else '?'})",
                           errno=reply.error or errno.EIO)
        return reply

    @device_thread
    def dma_layout(self) -> DmaLayout:
        """The DMA message layout of this client, probing it once when set to AUTO."""
        with self._layout_lock:
            if self._layout is None:
                reply = self.request(Command.DMA_WRITE, DmaAccess(0, 0).pack())
                self._layout = DmaLayout.SPEC if reply.payload else DmaLayout.LEGACY
                log.info("client DMA message layout: %s", self._layout.value)
            return self._layout

    @any_thread
    def chunk(self) -> int:
        """Most data bytes in one request: ours, within what the client accepts."""
        return max(512, min(DMA_CHUNK, self._session.client_max_data_xfer))

    @device_thread
    def dma_read(self, iova: int, length: int) -> bytes:
        layout = self.dma_layout()
        out = bytearray()
        step = self.chunk()
        start = DmaAccess.SIZE if layout is DmaLayout.SPEC else DmaAccessLegacy.SIZE
        for pos in range(0, length, step):
            n = min(step, length - pos)
            reply = self.request(Command.DMA_READ, DmaAccess(iova + pos, n).pack())
            data = reply.payload[start:start + n]
            if len(data) != n:
                raise DmaError(f"DMA_READ reply has {len(data)} of {n} bytes", errno=errno.EIO)
            out += data
        return bytes(out)

    @device_thread
    def dma_write(self, iova: int, data: bytes) -> None:
        layout = self.dma_layout()
        step = self.chunk()
        view = memoryview(data)
        for pos in range(0, len(data), step):
            piece = bytes(view[pos:pos + step])
            if layout is DmaLayout.SPEC:
                head = DmaAccess(iova + pos, len(piece)).pack()
            else:
                head = DmaAccessLegacy(iova + pos, len(piece)).pack()
            self.request(Command.DMA_WRITE, head + piece)
