"""The server runtime: a UNIX socket, one client at a time, requests handled in order.

:class:`Server` listens, accepts one client at a time and runs its
:class:`~vfio_user_server.connection.Connection` on the loop thread until the client leaves or
breaks the framing (a :class:`~vfio_user_server.errors.FramingError` drops it; a bad request
only gets an error reply). Which thread runs what: :mod:`vfio_user_server.threads` and
docs/ARCHITECTURE.md, "The connection and its threads".
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from . import msgshim
from .between import JobSlot
from .connection import Connection
from .dmacopy import default_copy
from .endpoint import VfioDevice
from .errors import ConnectionClosed, FramingError, VfioUserError
from .memory import release_free_memory
from .protocol.constants import DmaLayout
from .protocol.session import ServerCapabilities
from .threads import any_thread, loop_thread

__all__ = ["Connection", "Server"]

log = logging.getLogger(__name__)

TraceSink = Callable[[str], None]
#: ``factory(server, client_socket, device)``: the Connection serving one client.
ConnectionFactory = Callable[["Server", socket.socket, VfioDevice], Connection]


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


_FAMILIES: dict[int, str] = {socket.AF_UNIX: "AF_UNIX", socket.AF_INET: "AF_INET",
                             socket.AF_INET6: "AF_INET6"}
_TYPES: dict[int, str] = {socket.SOCK_STREAM: "SOCK_STREAM", socket.SOCK_DGRAM: "SOCK_DGRAM",
                          socket.SOCK_SEQPACKET: "SOCK_SEQPACKET"}


def listening_socket(fd: int) -> socket.socket:
    """The listening AF_UNIX stream socket open on ``fd`` (handed over by a supervisor).

    Raises :class:`~vfio_user_server.errors.VfioUserError` saying what ``fd`` is instead: not
    open, not a socket, another family or type, or not listening. The fd is only adopted
    (and made close-on-exec) once it passed; otherwise it is left as it was.
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise VfioUserError(f"fd {fd} is not open ({exc.strerror})", errno=exc.errno) from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = ("a regular file" if stat.S_ISREG(st.st_mode) else
                "a folder" if stat.S_ISDIR(st.st_mode) else
                "a pipe" if stat.S_ISFIFO(st.st_mode) else
                "a character device" if stat.S_ISCHR(st.st_mode) else "not a socket")
        raise VfioUserError(f"fd {fd} is {kind}, not a listening UNIX socket",
                            errno=errno.ENOTSOCK)
    probe = socket.socket(fileno=os.dup(fd))
    try:
        family = probe.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        kind_ = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        accepting = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        probe.close()
    if family != socket.AF_UNIX or kind_ != socket.SOCK_STREAM:
        raise VfioUserError(
            f"fd {fd} is an {_FAMILIES.get(family, f'family {family}')} "
            f"{_TYPES.get(kind_, f'type {kind_}')} socket, not an AF_UNIX SOCK_STREAM one",
            errno=errno.EPROTOTYPE)
    if not accepting:
        raise VfioUserError(f"fd {fd} is a UNIX stream socket that does not listen "
                            "(listen() it before handing it over)", errno=errno.EINVAL)
    os.set_inheritable(fd, False)
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd)


def _socket_name(sock: socket.socket) -> Path:
    """A path naming a socket for messages: its file, ``@name`` if abstract, else its fd."""
    name = sock.getsockname()
    if isinstance(name, bytes):  # abstract namespace: a NUL, then the name
        return Path("@" + name[1:].decode(errors="replace")) if name else Path(
            f"fd-{sock.fileno()}")
    return Path(name) if name else Path(f"fd-{sock.fileno()}")


def _at_eof(sock: socket.socket) -> bool:
    """Whether the peer has closed ``sock`` (nothing left to read), without consuming data."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Server:
    """Serve one device on a UNIX socket, one client at a time, until :meth:`stop`.

    ``Server(device, "/run/dev.sock").serve_forever()`` blocks; ``start()`` runs the same loop
    in a background thread and returns once the socket listens.

    ``path`` may instead be a socket that already listens (``--fd N``, systemd socket
    activation: see :func:`listening_socket`): the server then serves on it, and on close
    closes it but leaves its file alone, which belongs to whoever created it.
    """

    def __init__(
        self,
        device: VfioDevice,
        path: str | os.PathLike[str] | socket.socket,
        *,
        mode: int = 0o600,
        caps: ServerCapabilities | None = None,
        dma_layout: DmaLayout = DmaLayout.AUTO,
        dma_timeout: float = 5.0,
        trace: bool | TraceSink = False,
        trace_file: TextIO | None = None,
        release_memory: bool = False,
        upgradable: bool = False,
        connection_factory: ConnectionFactory | None = None,
        shim: bool | None = None,
    ) -> None:
        self.device = device
        #: the message path: None the C shim when it is built and PYVFIO_NO_SHIM is not set
        #: (vfio_user_server.msgshim), False the pure-Python path, True the shim
        self.shim = shim
        # chosen (and said) before the socket listens: a signal right after finds it done
        log.info("DMA guarded copies: %s", default_copy().name)
        log.info("message path: %s", msgshim.path_name(shim))
        #: after each client, give its memory back to the system (the CLI's long-lived server)
        self.release_memory = release_memory
        self._listener: socket.socket | None = None
        #: whether close() removes the socket file (not for a socket handed over)
        self.owns_path = not isinstance(path, socket.socket)
        if isinstance(path, socket.socket):
            self._listener = path
            self.path = _socket_name(path)
        else:
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
        #: live upgrade (vfio_user_server.upgrade): a hand-over job waits in the slot for the
        #: loop thread, which takes it between two messages (no message half-handled), woken
        #: from its read by a signal (vfio_user_server.between: no select() per read)
        self.upgradable = upgradable
        #: builds the Connection of each client (crash recovery's supervised mode has its own)
        self.connection_factory: ConnectionFactory = connection_factory or Connection
        self._slot = JobSlot(upgradable)  # vfio_user_server.between
        #: set once the listener and client went to another process: nothing is torn down
        self.handed_over = False
        self._first: Connection | None = None  # a connection rebuilt from a hand-over

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
        if not self.owns_path:
            raise VfioUserError(f"{self.path}: the socket handed over is closed",
                                errno=errno.EBADF)
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
        if not self.path.parent.is_dir():
            raise VfioUserError(f"cannot create the socket {self.path}: the folder "
                                f"{self.path.parent} does not exist", errno=errno.ENOENT)
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
        with self._listener_lock:
            if self._stopping.is_set():  # stop() came first: it closed the listener
                return
            self.listen()
            assert self._listener is not None
            # from here on only this thread closes the listener (stop() just wakes it)
            self._serving = True
        try:
            if self._first is not None:
                first, self._first = self._first, None
                self._serve_client(first)
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
        watched = [self._listener.fileno(), self._wake_r]
        if self.upgradable:
            watched.append(self._slot.pipe)
        r, _, _ = select.select(watched, [], [])
        if self._slot.pipe in r and self._run_upgrade_job(None):
            return None
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

    @loop_thread
    def _serve_client(self, client: socket.socket | Connection) -> None:
        conn = (client if isinstance(client, Connection)
                else self.connection_factory(self, client, self.device))
        conn.bind_loop_thread(threading.current_thread())
        with self._connected:
            self.connection = conn
            self._connected.notify_all()
        log.info("client connected on %s", self.path)
        # The loop thread blocks in the client socket's recvmsg (the shim's loop in a poll
        # for POLLIN only, which sleeps through the wake-up of each reply read). The
        # INTx resample fds are watched by the interrupt controller's own thread, a second
        # client is refused by a small thread, and stop() shuts the socket down to end it.
        irqs = self.device.irqs
        irqs.start_watcher()
        done_r, done_w = os.pipe2(os.O_CLOEXEC)
        refuser = threading.Thread(target=self._refuse_others, args=(done_r, client),
                                   name=f"vfio-user-refuser:{self.path.name}", daemon=True)
        refuser.start()
        fast = conn.fast if self.upgradable else None
        if fast is not None:  # the shim's loop polls the job pipe with the socket, signal or not
            fast.watch(self._slot.pipe)
        try:
            while not self._stopping.is_set():
                if self.upgradable:  # a hand-over between two messages, even inside a burst
                    woken = False
                    if fast is not None and fast.woken:  # take() drains the pipe, job or not
                        fast.woken, woken = False, True
                    if (woken or self._slot.job is not None) and self._run_upgrade_job(conn):
                        break
                    if not self._slot.by_signal and not conn.reader.reader.has_message():
                        r, _, _ = select.select([conn.sock.fileno(), self._slot.pipe], [], [])
                        if conn.sock.fileno() not in r:
                            if self._run_upgrade_job(conn):  # drains the pipe, job or not
                                break
                            continue
                try:
                    conn.handle_one()
                except BlockingIOError:  # a read cut short for a hand-over (never otherwise)
                    if not self._slot.by_signal:
                        raise
                    if self._run_upgrade_job(conn):
                        break
        except ConnectionClosed:
            log.info("client disconnected from %s", self.path)
        except FramingError as exc:  # the stream cannot be cut into messages any more
            log.error("dropping client: %s", exc)
        except (ConnectionResetError, BrokenPipeError) as exc:
            log.info("client went away: %s", exc)  # an ordinary hang-up with data in flight
        except OSError as exc:
            log.error("dropping client after socket error: %s", exc)
        except Exception:  # a bug must cost this client only, never the server
            log.exception("dropping client after an internal error")
        finally:
            os.write(done_w, b"x")
            refuser.join()
            os.close(done_r)
            os.close(done_w)
            try:
                if self.handed_over:
                    conn.abandon()
                else:
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

    # --- live upgrade -------------------------------------------------------------------------
    @loop_thread
    def _run_upgrade_job(self, conn: Connection | None) -> bool:
        """Run the hand-over asked for by :meth:`run_between_messages`; True if this process
        no longer serves (the loop ends, tearing down nothing)."""
        job = self._slot.take(conn)
        if job is None:
            return False
        result: bool | BaseException
        try:
            result = job(conn)
        except BaseException as exc:  # the caller gets it; this process serves on
            result = exc
        if result is True:
            self.handed_over = True
            self._stopping.set()
        self._slot.finish(result)
        return result is True

    @any_thread
    def run_between_messages(self, job: Callable[[Connection | None], bool],
                             timeout: float | None = None) -> bool:
        """Run ``job(connection or None)`` on the loop thread between two messages (the
        server must be ``upgradable``); its True means the process handed everything over and
        stops serving without tearing anything down. Returns the job's result or raises what
        it raised; TimeoutError if the loop did not run it in time."""
        if not self.upgradable:
            raise VfioUserError("this server was not started upgradable", errno=errno.EINVAL)
        return self._slot.post(job, self.connection, timeout)

    def adopt(self, conn: Connection) -> None:
        """Serve ``conn`` (rebuilt from a hand-over) first, then accept clients as usual."""
        self._first = conn

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

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called or the server was handed over (no more serving)."""
        return self._stopping.is_set()

    @property
    def started(self) -> bool:
        """Whether :meth:`start` runs the loop in a background thread."""
        return self._thread is not None

    def join(self, timeout: float | None = None) -> None:
        """Wait for the loop started by :meth:`start` to end."""
        if self._thread is not None:
            self._thread.join(timeout)

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
        if conn is not None and not self.handed_over:  # wakes the loop thread in recvmsg
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
            if self.owns_path and not self.handed_over:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def close(self) -> None:
        self.stop()
        if not self._closed_pipes:
            self._closed_pipes = True
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._slot.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
