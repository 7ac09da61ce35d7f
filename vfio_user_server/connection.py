"""One client connection of the server, in three parts and two kinds of threads.

* **Framing**: a :class:`~vfio_user_server.transport.SocketReader` cuts what the client sends
  into messages (the one reader, :mod:`vfio_user_server.protocol.framing`); the size limit is
  the one the server advertised. Its :class:`~vfio_user_server.errors.FramingError` ends the
  connection.
* **Requests to the client**: a :class:`~vfio_user_server.requester.ClientRequester` sends
  DMA_READ / DMA_WRITE for device threads and gets their replies from the loop.
* **Teardown**: :meth:`Connection.close`, each part closing what it owns, in an order that
  leaves no thread waiting and no fd open.

Every method says which thread runs it (:mod:`vfio_user_server.threads`): the loop thread reads
and dispatches in order and never waits for the client; device threads may.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .dma import DmaAccessor, DmaMapTable
from .endpoint import DeviceContext, Endpoint, VfioDevice
from .errors import ConnectionClosed
from .msgshim import FastPath, ShimMessageReader, ShimSender
from .protocol import codec
from .protocol.constants import Command
from .protocol.session import Session
from .protocol.trace import describe
from .requester import ClientRequester
from .threads import any_thread, loop_thread
from .transport import SocketReader, send_bytes

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

_VERSION = int(Command.VERSION)


class Connection:
    """One client connection: framing, the endpoint, requests to the client, teardown."""

    def __init__(self, server: Server, sock: socket.socket, device: VfioDevice) -> None:
        self.server = server
        self.sock = sock
        self.device = device
        self.session = Session(caps=server.caps, dma_layout=server.dma_layout)
        self.table = DmaMapTable(max_maps=server.caps.max_dma_maps)  # what VERSION advertised
        self.endpoint = Endpoint(device, self.session, self.table)
        #: framing: the one reader, limited to what the server advertises
        self.reader = SocketReader(sock, server.caps.max_message_size, peer="client",
                                   shim=server.shim)
        #: DMA_READ / DMA_WRITE to the client, for device threads
        self.requester = ClientRequester(self.send, self.session, server.dma_layout,
                                         server.dma_timeout)
        self.dma = DmaAccessor(self.table, self.requester)
        #: serialises sends (replies, requests of device threads); the shim's fast path too
        self.send_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="vfio-user-worker")
        self.loop_thread: threading.Thread | None = None
        self.closed = False
        #: the device was told about this client (vfio_attach), so it hears it leave
        self.device_connected = False
        self.ctx = DeviceContext(self.dma, self.table, self._worker.submit, None)
        #: the C shim (vfio_user_server.msgshim): every send encoded and sent in C under the
        #: shim's lock (not send_lock), and REGION_READ/WRITE served by its loop without a
        #: Message. Not the loop while tracing: the trace describes each Message.
        reader = self.reader.reader
        self.fast: FastPath | None = None
        self.csender: ShimSender | None = None
        if isinstance(reader, ShimMessageReader):
            self.csender = ShimSender(sock.fileno(), reader)
            if not server.tracing and self.reader.direct:
                self.fast = FastPath(self, reader, self.csender)

    @loop_thread
    def bind_loop_thread(self, thread: threading.Thread) -> None:
        """``thread`` serves this connection: message DMA is refused on it."""
        self.loop_thread = thread
        self.requester.loop_thread = thread
        self.ctx.loop_thread = thread

    # --- sending ----------------------------------------------------------------------------
    @any_thread
    def send(self, msg: codec.Message) -> None:
        """Write one message (a reply, or a request to the client) with its fds."""
        if self.server.tracing:
            self.server._trace(describe(msg, direction="->"))
        if self.csender is not None:  # the shim's lock and closed flag
            self.csender.send(msg)
            return
        with self.send_lock:
            if self.closed:
                raise ConnectionClosed("connection is closed")
            send_bytes(self.sock, codec.encode(msg), msg.fds)  # fds travel with the header

    @any_thread
    def interrupt(self) -> None:
        """The loop thread returns from the shim's loop before its next message (a job is
        waiting for it: vfio_user_server.between)."""
        if self.fast is not None:
            self.fast.interrupt()

    @loop_thread
    def _close_sends(self) -> None:
        """Nothing is sent from now on (a send in progress finishes first)."""
        with self.send_lock:
            self.closed = True
        if self.csender is not None:
            self.csender.close()

    # --- receiving and dispatch -------------------------------------------------------------
    @loop_thread
    def handle_one(self) -> None:
        """Read one message and act on it: a request is answered, a reply goes to its waiter.

        Raises what the reader raises: FramingError (drop the client), ConnectionClosed, OSError.
        """
        if self.fast is not None:
            msg = self.fast.handle_one()  # serves REGION_READ/WRITE itself
            if msg is None:
                return
        else:
            msg = self.reader.read_message()
        if self.server.tracing:
            self.server._trace(describe(msg, direction="<-"))
        if msg.is_reply:
            self.requester.complete(msg)
            return
        first = self.session.state
        reply = self.endpoint.handle(msg)
        if self.fast is not None:
            self.fast.state_changed()
        connected = msg.command == _VERSION and first is not self.session.state
        if connected:
            # before the reply: once the client has it, the device must know its client
            self.device_connected = True
            try:
                self.device.vfio_attach(self.ctx)
            except Exception:
                log.exception("device vfio_attach failed")
        if reply is not None:
            self.send(reply)
        if connected:
            self.requester.negotiated()  # requests may follow the VERSION reply now

    # --- teardown ---------------------------------------------------------------------------
    @loop_thread
    def close(self) -> None:
        """Tear down: fail waiters, stop the worker, unmap DMA, close fds, tell the device.

        The order matters: no more sends; waiting requesters fail (so the worker can finish);
        the worker stops; only then are the maps, the interrupt fds and the socket closed, and
        the device told last, when nothing of this client is left.
        """
        if self.closed:
            return
        self._close_sends()
        self.session.close()
        self.requester.close()
        self.reader.close()  # fds of a message that never arrived whole
        self._worker.shutdown(wait=True, cancel_futures=True)
        try:
            self.table.remove_all()
        finally:
            try:
                self.device.irqs.close()
            finally:
                with contextlib.suppress(OSError):
                    self.sock.close()
                self.endpoint.migration.close()  # a stopped device runs again
                try:
                    if self.device_connected:  # a client that never negotiated is no news
                        self.device.vfio_detach()
                except Exception:
                    log.exception("device vfio_detach failed")

    @loop_thread
    def abandon(self) -> None:
        """After a live upgrade handed this connection to another process: close this
        process's copies of its fds and stop its threads, but tear down nothing the new owner
        uses: no socket shutdown, no device detach (NVMe would reset), nothing told to the
        client. The device stays quiesced: it is the old process's, and no longer serves."""
        if self.closed:
            return
        self._close_sends()
        self.requester.close()
        self.reader.close()  # our copies of the fds of a message not yet whole
        self._worker.shutdown(wait=True, cancel_futures=True)
        try:
            self.table.remove_all()  # munmap and close our copies; the maps live on over there
        finally:
            try:
                self.device.irqs.close()  # our copies of the eventfds
            finally:
                self.sock.close()  # close(), not shutdown(): the socket is the new process's
