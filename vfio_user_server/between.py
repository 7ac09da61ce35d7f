"""A job for a server's loop thread, run between two messages (the live upgrade's hand-over).

:class:`JobSlot` holds at most one job. :meth:`JobSlot.post` (any thread) leaves it and wakes
the loop thread; the loop takes it (:meth:`JobSlot.take`) at the top of its loop, between two
messages, runs it and hands back the result (:meth:`JobSlot.finish`).

Waking the loop thread costs nothing per message. While serving a client the loop thread
blocks in the client socket's ``recvmsg``; :meth:`post` sets a short kernel read timeout
(``SO_RCVTIMEO``) on that socket and sends :data:`WAKE_SIGNAL` to the thread, so the read in
progress ends (EINTR, then the timeout: Python retries an interrupted read, the C shim too) and a
read that starts later ends soon as well; the loop sees ``BlockingIOError``, takes the job and
clears the timeout under the same lock :meth:`post` set it under, so neither happens without
the other. The C shim's loop waits in ``poll`` instead, on the socket and :attr:`JobSlot.pipe`
(:meth:`~vfio_user_server.msgshim.FastPath.watch`): a job posted at any moment, even just
before that wait, ends it. The signal needs a handler (an ignored signal interrupts nothing),
which only the main thread can install (:func:`wake_handler_installed`): a server made
elsewhere, or where a handler from outside Python holds the signal, falls back to a
``select()`` on the socket and :attr:`JobSlot.pipe` before each read. Between clients the
accept loop watches the pipe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import Connection

Job = Callable[["Connection | None"], bool]

#: The signal that wakes a loop thread from its read (ignored by default: no one's business).
WAKE_SIGNAL = signal.SIGURG
#: The read timeout set with it: a read that begins after the signal still ends soon.
WAKE_TIMEOUT = 0.001
_TIMEVAL = struct.Struct("@ll")


def read_timeout(sock: socket.socket, seconds: float) -> None:
    """Set the kernel's SO_RCVTIMEO of ``sock`` (0: none). Python's own timeout stays None,
    so a read that times out raises BlockingIOError."""
    usec = int(seconds * 1e6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    _TIMEVAL.pack(usec // 1_000_000, usec % 1_000_000))


def wake_handler_installed() -> bool:
    """Make sure WAKE_SIGNAL has a handler (so it interrupts a blocking read instead of being
    discarded); False where none can be: not the main thread, or a handler from outside
    Python that is not ours to replace."""
    current = signal.getsignal(WAKE_SIGNAL)
    if current is None:
        return False
    if current not in (signal.SIG_DFL, signal.SIG_IGN):
        return True  # someone's Python handler: it interrupts reads as well as ours
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(WAKE_SIGNAL, _ignore_wake)
    return True


def _ignore_wake(signum: int, frame: Any) -> None:
    del signum, frame  # the interrupted read is the point


class JobSlot:
    """At most one job for the loop thread, and its result for whoever posted it."""

    def __init__(self, enabled: bool) -> None:
        #: readable when a job was posted (the accept loop and the select fallback watch it)
        self.pipe, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        #: the loop thread is woken by a signal, and needs no select() per read
        self.by_signal = enabled and wake_handler_installed()
        self.job: Job | None = None
        self._done = threading.Condition()
        self._result: bool | BaseException | None = None

    def post(self, job: Job, conn: Connection | None, timeout: float | None) -> bool:
        """Leave ``job``, wake the loop, wait for the result (see Server.run_between_messages).
        ``conn`` is the connection being served, if any."""
        with self._done:
            self._result = None
            self.job = job
            os.write(self._pipe_w, b"u")
            if conn is not None:
                conn.interrupt()  # the shim's loop returns before its next message
            thread = conn.loop_thread if conn is not None else None
            if self.by_signal and conn is not None and thread is not None:
                with contextlib.suppress(OSError):  # the client left: the loop is done anyway
                    read_timeout(conn.sock, WAKE_TIMEOUT)
                    if thread.ident is not None:
                        signal.pthread_kill(thread.ident, WAKE_SIGNAL)
            if not self._done.wait_for(lambda: self._result is not None, timeout):
                if self.job is job:  # not started: withdraw it
                    self.job = None
                    raise TimeoutError("the server loop did not take the hand-over in time")
                self._done.wait_for(lambda: self._result is not None)
            result, self._result = self._result, None
        if isinstance(result, BaseException):
            raise result
        return bool(result)

    def take(self, conn: Connection | None) -> Job | None:
        """The loop thread takes the job, if any (a job its caller gave up on is gone)."""
        with contextlib.suppress(OSError):
            os.read(self.pipe, 4096)
        with self._done:
            job, self.job = self.job, None
            if conn is not None and self.by_signal:
                with contextlib.suppress(OSError):
                    read_timeout(conn.sock, 0)  # reads block again (and the new owner's too)
        return job

    def finish(self, result: bool | BaseException) -> None:
        """The job's result, for :meth:`post`."""
        with self._done:
            self._result = result
            self._done.notify_all()

    def close(self) -> None:
        os.close(self.pipe)
        os.close(self._pipe_w)
