"""The server runtime: a UNIX socket, one client at a time, requests handled in order.

This module is the thin transport around :class:`~vfio_user_server.endpoint.Endpoint`: it reads
whatever the client has sent with one ``recvmsg`` (fds included), cuts it into messages, hands
each to the endpoint in order, and writes each reply in one ``sendmsg`` (with its fd, if any).
Replies to the server's own DMA_READ / DMA_WRITE requests are read by the same loop and passed
to the waiting thread.

Threads: the loop thread serves the client; device threads may raise interrupts and DMA; the
per-connection worker (``DeviceContext.defer``) runs device work that needs message DMA. The loop
thread never waits on a server->client request (that deadlocks QEMU, see ARCHITECTURE.md).
"""

from __future__ import annotations

import array
import contextlib
import errno
import itertools
import logging
import os
import select
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TextIO

from .dma import DmaAccessor, DmaMapTable
from .endpoint import DeviceContext, Endpoint, VfioDevice
from .errors import ConnectionClosed, DmaError, DmaTimeoutError, ProtocolError, VfioUserError
from .fds import close_fds
from .memory import release_free_memory
from .protocol import codec
from .protocol.constants import HEADER_SIZE, Command, DmaLayout
from .protocol.session import ServerCapabilities, Session
from .protocol.structs import DmaAccess, DmaAccessLegacy
from .protocol.trace import describe

log = logging.getLogger(__name__)

#: Most fds one message may carry; more is an error (the ancillary buffer is sized for it).
MAX_FDS_PER_MESSAGE = 64
_ANCBUF = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
#: Most bytes taken from the socket by one read.
RECV_CHUNK = 256 * 1024
#: Largest chunk of one DMA_READ / DMA_WRITE message (QEMU cannot send big replies reliably).
DMA_CHUNK = 64 * 1024

TraceSink = Callable[[str], None]
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # the enum's & costs a microsecond per message


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


def _socket_is_live(path: Path) -> bool:
    """True if something accepts connections on the UNIX socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except OSError:
        return False  # ECONNREFUSED: a stale socket file
    finally:
        probe.close()
    return True


def _at_eof(sock: socket.socket) -> bool:
    """Whether the peer has closed ``sock`` (nothing left to read), without consuming data."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Connection:
    """One client connection: socket I/O, the endpoint, and server->client requests."""

    def __init__(
        self,
        server: Server,
        sock: socket.socket,
        device: VfioDevice,
    ) -> None:
        self.server = server
        self.sock = sock
        self.device = device
        self.session = Session(caps=server.caps, dma_layout=server.dma_layout)
        self.table = DmaMapTable()
        self.dma = DmaAccessor(self.table, self)
        self.endpoint = Endpoint(device, self.session, self.table)
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future[codec.Message]] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(0x8000)
        self._layout: DmaLayout | None = (
            None if server.dma_layout is DmaLayout.AUTO else server.dma_layout
        )
        self._layout_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="vfio-user-worker")
        self._negotiated = threading.Event()
        self._rbuf = bytearray()
        self._rpos = 0
        self._fdmarks: list[tuple[int, int, list[int]]] = []  # (first, last byte, fds) of reads
        self._rx_chunk = bytearray(RECV_CHUNK)
        self._rx_view = memoryview(self._rx_chunk)
        self.loop_thread: threading.Thread | None = None
        self.closed = False
        #: the device was told about this client (vfio_attach), so it hears it leave
        self.device_connected = False
        self.ctx = DeviceContext(self.dma, self.table, self._worker.submit, None)

    # --- sending ----------------------------------------------------------------------------
    def send(self, msg: codec.Message) -> None:
        data = codec.encode(msg)
        if self.server.tracing:
            self.server._trace(describe(msg, direction="->"))
        with self._send_lock:
            if self.closed:
                raise ConnectionClosed("connection is closed")
            if not msg.fds:
                self.sock.sendall(data)
                return
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds).tobytes())]
            sent = self.sock.sendmsg([data], anc)  # the fds travel with the header
            if sent < len(data):
                self.sock.sendall(data[sent:])

    # --- receiving --------------------------------------------------------------------------
    def read_message(self) -> codec.Message:
        """The next message, from a buffer filled by as few ``recvmsg`` calls as possible.

        One read takes whatever the client has sent (pipelined posted writes and DMA maps come
        in bursts). fds arrive with the read that holds the header of the message they were
        sent with, and Linux ends such a read right after that message's bytes: so a read's
        fds belong to the last message that starts in it. fds anywhere else (in the middle of
        a message) break the protocol.
        """
        while True:
            msg = self._parse()
            if msg is not None:
                return msg
            self._fill()

    def _fill(self) -> None:
        nbytes, ancdata, rflags, _ = self.sock.recvmsg_into([self._rx_view], _ANCBUF)
        fds = _fds_from_ancillary(ancdata) if ancdata else []
        if rflags & _MSG_CTRUNC:
            close_fds(fds)
            raise ProtocolError(f"more than {MAX_FDS_PER_MESSAGE} fds in one message")
        if nbytes == 0:
            close_fds(fds)
            inside = len(self._rbuf) > self._rpos
            raise ConnectionClosed("client closed the connection"
                                   + (" inside a message" if inside else ""))
        start = len(self._rbuf)
        self._rbuf += self._rx_view[:nbytes]
        if fds:
            self._fdmarks.append((start, start + nbytes, fds))

    def _parse(self) -> codec.Message | None:
        buf, pos = self._rbuf, self._rpos
        if len(buf) - pos < HEADER_SIZE:
            return None
        msg_id, command, size, flags, error = codec.unpack_header(buf, pos)
        limit = self.session.caps.max_data_xfer_size + 4096
        if size > limit:
            raise ProtocolError(f"message of {size} bytes is larger than {limit}")
        end = pos + size
        if len(buf) < end:
            return None
        fds: list[int] = []
        if self._fdmarks:
            fds = self._fds_for(pos, end)
        payload = bytes(buf[pos + HEADER_SIZE:end])
        if end == len(buf):
            buf.clear()
            self._rpos = 0
        elif end > 1 << 20:  # keep the buffer from growing: drop what was parsed
            del buf[:end]
            self._rpos = 0
            self._fdmarks = [(a - end, b - end, f) for a, b, f in self._fdmarks]
        else:
            self._rpos = end
        return codec.Message(msg_id, command, flags, error, payload, fds)

    def _fds_for(self, start: int, end: int) -> list[int]:
        """Take the fds that came with the message at [start, end) (see read_message)."""
        mine: list[int] = []
        keep: list[tuple[int, int, list[int]]] = []
        for first, last, fds in self._fdmarks:
            if first <= start < last and end >= last:
                mine += fds
            elif start < first < end or last <= start:
                close_fds(mine + fds)
                raise ProtocolError("fds arrived in the middle of a message")
            else:
                keep.append((first, last, fds))
        self._fdmarks = keep
        return mine

    def handle_one(self) -> None:
        msg = self.read_message()
        if self.server.tracing:
            self.server._trace(describe(msg, direction="<-"))
        if msg.is_reply:
            self._complete(msg)
            return
        first = self.session.state
        reply = self.endpoint.handle(msg)
        if msg.command == Command.VERSION and first is not self.session.state:
            # before the reply: once the client has it, the device must know its client
            self.device_connected = True
            try:
                self.device.vfio_attach(self.ctx)
            except Exception:
                log.exception("device vfio_attach failed")
        if reply is not None:
            self.send(reply)
        if self.device_connected and not self._negotiated.is_set():
            self._negotiated.set()  # server->client requests may follow the VERSION reply now

    def _complete(self, msg: codec.Message) -> None:
        with self._pending_lock:
            fut = self._pending.pop(msg.msg_id, None)
        if fut is None:
            log.warning("reply #%d to no pending request dropped", msg.msg_id)
            msg.close_fds()
            return
        if msg.fds:
            msg.close_fds()
        fut.set_result(msg)

    # --- server -> client requests (the MessageDma protocol of dma.py) -----------------------
    def _request(self, command: Command, payload: bytes) -> codec.Message:
        if threading.current_thread() is self.loop_thread:
            raise DmaError(
                "message DMA from the server's loop thread would deadlock QEMU; run the work "
                "with ctx.defer() or from a device thread",
                errno=errno.EDEADLK,
            )
        if not self._negotiated.wait(self.server.dma_timeout) or not self.session.may_request():
            raise DmaError("no negotiated client to send DMA requests to", errno=errno.ENOTCONN)
        msg_id = next(self._ids) & 0xFFFF
        fut: Future[codec.Message] = Future()
        with self._pending_lock:
            self._pending[msg_id] = fut
        try:
            self.send(codec.request(msg_id, command, payload))
            reply = fut.result(timeout=self.server.dma_timeout)
        except FutureTimeout:
            raise DmaTimeoutError(
                f"{command.name} #{msg_id} got no reply in {self.server.dma_timeout} s"
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

    def dma_layout(self) -> DmaLayout:
        """The DMA message layout of this client, probing it once when set to AUTO."""
        with self._layout_lock:
            if self._layout is None:
                reply = self._request(Command.DMA_WRITE, DmaAccess(0, 0).pack())
                self._layout = DmaLayout.SPEC if reply.payload else DmaLayout.LEGACY
                log.info("client DMA message layout: %s", self._layout.value)
            return self._layout

    def _chunk(self) -> int:
        return max(512, min(DMA_CHUNK, self.session.client_max_data_xfer))

    def dma_read(self, iova: int, length: int) -> bytes:
        layout = self.dma_layout()
        out = bytearray()
        step = self._chunk()
        for pos in range(0, length, step):
            n = min(step, length - pos)
            reply = self._request(Command.DMA_READ, DmaAccess(iova + pos, n).pack())
            start = DmaAccess.SIZE if layout is DmaLayout.SPEC else DmaAccessLegacy.SIZE
            data = reply.payload[start:start + n]
            if len(data) != n:
                raise DmaError(f"DMA_READ reply has {len(data)} of {n} bytes", errno=errno.EIO)
            out += data
        return bytes(out)

    def dma_write(self, iova: int, data: bytes) -> None:
        layout = self.dma_layout()
        step = self._chunk()
        view = memoryview(data)
        for pos in range(0, len(data), step):
            piece = bytes(view[pos:pos + step])
            if layout is DmaLayout.SPEC:
                head = DmaAccess(iova + pos, len(piece)).pack()
            else:
                head = DmaAccessLegacy(iova + pos, len(piece)).pack()
            self._request(Command.DMA_WRITE, head + piece)

    # --- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Tear down: fail waiters, stop the worker, unmap DMA, close fds, tell the device."""
        if self.closed:
            return
        with self._send_lock:
            self.closed = True
        self.session.close()
        self._negotiated.set()  # wake requesters waiting for negotiation: they fail now
        marks, self._fdmarks = self._fdmarks, []
        for _first, _last, fds in marks:  # fds of a message that never arrived whole
            close_fds(fds)
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(ConnectionClosed("client disconnected"))
        self._worker.shutdown(wait=True, cancel_futures=True)
        try:
            self.table.remove_all()
        finally:
            try:
                self.device.irqs.close()
            finally:
                with contextlib.suppress(OSError):
                    self.sock.close()
                try:
                    if self.device_connected:  # a client that never negotiated is no news
                        self.device.vfio_detach()
                except Exception:
                    log.exception("device vfio_detach failed")


class Server:
    """Serve one device on a UNIX socket, one client at a time, until :meth:`stop`.

    ``Server(device, "/run/dev.sock").serve_forever()`` blocks; ``start()`` runs the same loop
    in a background thread and returns once the socket listens.
    """

    def __init__(
        self,
        device: VfioDevice,
        path: str | os.PathLike[str],
        *,
        mode: int = 0o600,
        caps: ServerCapabilities | None = None,
        dma_layout: DmaLayout = DmaLayout.AUTO,
        dma_timeout: float = 5.0,
        trace: bool | TraceSink = False,
        trace_file: TextIO | None = None,
        release_memory: bool = False,
    ) -> None:
        self.device = device
        #: after each client, give its memory back to the system (the CLI's long-lived server)
        self.release_memory = release_memory
        self.path = Path(path)
        self.mode = mode
        self.caps = caps or ServerCapabilities()
        self.dma_layout = dma_layout
        self.dma_timeout = dma_timeout
        self._trace_sink: TraceSink | None
        if callable(trace):
            self._trace_sink = trace
        elif trace:
            out = trace_file or sys.stderr
            self._trace_sink = lambda line: print(line, file=out, flush=True)
        else:
            self._trace_sink = None
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.connection: Connection | None = None
        self.connections_served = 0
        self._connected = threading.Condition()
        self._closed_pipes = False
        self._listener_lock = threading.Lock()
        self._serving = False
        self._handover: socket.socket | None = None  # a client the refuser accepted

    @property
    def tracing(self) -> bool:
        return self._trace_sink is not None

    def _trace(self, line: str) -> None:
        if self._trace_sink is not None:
            self._trace_sink(line)

    # --- socket -----------------------------------------------------------------------------
    def listen(self) -> None:
        """Create the listening socket (refusing to replace a path that is not a socket)."""
        if self._listener is not None:
            return
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise VfioUserError(f"{self.path} exists and is not a socket; not replacing it",
                                    errno=errno.EEXIST)
            if _socket_is_live(self.path):
                raise VfioUserError(f"{self.path}: another server is listening there",
                                    errno=errno.EADDRINUSE)
            self.path.unlink()  # stale: nobody listens
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Bind inside a private (0700) folder beside the path, give the socket its mode, listen,
        # then rename it into place: whoever waits for the path to appear (a launcher, QEMU)
        # may connect at once, and nobody else can reach it before it has its mode. This needs
        # no process-wide umask change (other threads may be creating files).
        try:
            private = Path(tempfile.mkdtemp(prefix=".vfu-", dir=self.path.parent))
        except OSError:
            sock.close()
            raise
        tmp = private / "s"
        if len(os.fsencode(tmp)) > 107:  # sun_path is 108 bytes with the NUL: bind in place
            tmp = self.path
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, self.mode)
            sock.listen(4)
            if tmp != self.path:
                os.rename(tmp, self.path)
        except BaseException:
            sock.close()
            if tmp != self.path:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise
        finally:
            with contextlib.suppress(OSError):
                private.rmdir()
        self._listener = sock

    # --- main loop --------------------------------------------------------------------------
    def serve_forever(self) -> None:
        self.listen()
        assert self._listener is not None
        with self._listener_lock:
            # from here on only this thread closes the listener (stop() just wakes it)
            self._serving = True
        try:
            while not self._stopping.is_set():
                client = self._accept()
                if client is None:
                    continue
                self._serve_client(client)
        finally:
            with self._listener_lock:
                self._serving = False
                self._close_listener()

    def _accept(self) -> socket.socket | None:
        assert self._listener is not None
        if self._handover is not None:  # accepted by the refuser as the last client left
            client, self._handover = self._handover, None
            if self._stopping.is_set():
                client.close()
                return None
            return client
        r, _, _ = select.select([self._listener.fileno(), self._wake_r], [], [])
        if self._wake_r in r:
            # stop(), or an IRQ-watch wake-up left over from the last connection: drain it,
            # or select() returns at once forever and no client is ever accepted again
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)
        if self._stopping.is_set() or self._listener.fileno() not in r:
            return None
        try:
            client, _ = self._listener.accept()
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return None
        return client

    def _serve_client(self, client: socket.socket) -> None:
        conn = Connection(self, client, self.device)
        conn.loop_thread = threading.current_thread()
        conn.ctx.loop_thread = conn.loop_thread
        with self._connected:
            self.connection = conn
            self._connected.notify_all()
        log.info("client connected on %s", self.path)
        # The loop thread blocks in the client socket's recvmsg: no poll per message. The
        # INTx resample fds are watched by the interrupt controller's own thread, a second
        # client is refused by a small thread, and stop() shuts the socket down to end it.
        irqs = self.device.irqs
        irqs.start_watcher()
        done_r, done_w = os.pipe2(os.O_CLOEXEC)
        refuser = threading.Thread(target=self._refuse_others, args=(done_r, client),
                                   name=f"vfio-user-refuser:{self.path.name}", daemon=True)
        refuser.start()
        try:
            while not self._stopping.is_set():
                conn.handle_one()
        except ConnectionClosed:
            log.info("client disconnected from %s", self.path)
        except ProtocolError as exc:
            log.error("dropping client: %s", exc)
        except (ConnectionResetError, BrokenPipeError) as exc:
            log.info("client went away: %s", exc)  # an ordinary hang-up with data in flight
        except OSError as exc:
            log.error("dropping client after socket error: %s", exc)
        finally:
            os.write(done_w, b"x")
            refuser.join()
            os.close(done_r)
            os.close(done_w)
            try:
                conn.close()
            finally:
                if self.release_memory:
                    with self._connected:
                        self.connection = None
                    del conn
                    release_free_memory()  # the connection's memory, now that nothing holds it
                # only now: wait_for_disconnect() promises maps, fds and the device are done
                with self._connected:
                    self.connection = None
                    self.connections_served += 1
                    self._connected.notify_all()

    def _refuse_others(self, done_r: int, current: socket.socket) -> None:
        """While a client is served, accept and close any other (one client at a time).

        A client that arrives while the current one is hanging up is kept for the accept loop
        instead: the loop thread may not have seen that EOF yet.
        """
        listener = self._listener
        assert listener is not None
        while True:
            r, _, _ = select.select([listener.fileno(), done_r], [], [])
            if done_r in r:
                return
            try:
                extra, _ = listener.accept()
            except OSError:
                continue
            if _at_eof(current):
                self._handover = extra
                return
            log.warning("refusing a second client on %s: one client at a time", self.path)
            extra.close()

    # --- lifetime ---------------------------------------------------------------------------
    def start(self) -> Server:
        """Listen, then serve in a background thread; returns once the socket listens."""
        self.listen()
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"vfio-user-server:{self.path.name}", daemon=True
        )
        self._thread.start()
        return self

    def wait_for_client(self, timeout: float | None = None) -> Connection:
        with self._connected:
            if not self._connected.wait_for(lambda: self.connection is not None, timeout):
                raise TimeoutError("no client connected")
            assert self.connection is not None
            return self.connection

    def wait_for_disconnect(self, count: int = 1, timeout: float | None = None) -> None:
        with self._connected:
            if not self._connected.wait_for(lambda: self.connections_served >= count, timeout):
                raise TimeoutError("client did not disconnect")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, drop the client, and remove the socket. Safe to call twice."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        conn = self.connection
        if conn is not None:  # wakes the loop thread blocked in recvmsg
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._listener_lock:
            if not self._serving:  # else the loop, which may be polling it, closes it
                self._close_listener()

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def close(self) -> None:
        self.stop()
        if not self._closed_pipes:
            self._closed_pipes = True
            os.close(self._wake_r)
            os.close(self._wake_w)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
