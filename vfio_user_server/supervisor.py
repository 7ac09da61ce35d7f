"""Crash recovery, the parent's side: ``vfio-user-server --supervise ...``.

A small parent process runs the device process (the same command without ``--supervise``)
and holds a duplicate of everything it serves with, as the device process reports it
(:mod:`vfio_user_server.supervised`): the listening socket, the client socket, each DMA map's
fd, the interrupt eventfds, the client's session and the config space it programmed. When
the device process dies of a signal (SIGKILL, SIGSEGV in native code, ...), the parent starts
a new one and hands all of it over in the live upgrade's format
(:func:`vfio_user_server.upgrade.send_handover`), with the record of the message the dead
process was handling: the new process settles that message, resets the device through its
reset path and serves on. QEMU never sees the socket close.

The parent reads no client byte: only its own events and the record page. It ends with the
device process: the same exit status when that one exits (SIGTERM or SIGINT to the parent are
passed on; ``--once`` ends both when the client leaves), status 1 when recovery fails
:data:`MAX_FAILED_STARTS` times in a row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from . import systemd
from .fds import close_fd, close_fds
from .supervised import (
    EVENT_FDS,
    EVENT_SIZE,
    EVENTS_ENV,
    RECORD_ENV,
    RECOVER_ENV,
    Record,
    read_record,
    reset_record,
)
from .transport import fds_from_ancillary
from .upgrade import HandoverError, _recv_ack, send_handover

__all__ = ["MAX_FAILED_STARTS", "Supervisor", "main"]

log = logging.getLogger(__name__)

#: Recoveries in a row whose new process dies before it serves: then the parent gives up.
MAX_FAILED_STARTS = 3
#: How long a new process may take to acknowledge the hand-over.
RECOVER_TIMEOUT = 60.0
_ANC = socket.CMSG_SPACE(4 * 253)


@dataclass
class _Map:
    entry: dict[str, Any]
    fd: int | None


@dataclass
class Held:
    """Everything the parent holds for the device process, fds owned here."""

    server: dict[str, Any] | None = None
    listener: int | None = None
    client: int | None = None
    session: dict[str, Any] | None = None
    maps: dict[int, _Map] = field(default_factory=dict)
    irqs: list[tuple[int, int, int]] = field(default_factory=list)
    resample: int | None = None
    config: str | None = None

    def drop_client(self) -> None:
        close_fd(self.client, "client socket")
        self.client = None
        self.session = None
        self.config = None
        for m in self.maps.values():
            close_fd(m.fd, "DMA map fd")
        self.maps = {}
        self.drop_irqs()

    def drop_irqs(self) -> None:
        close_fds([fd for _i, _v, fd in self.irqs], "IRQ fd")
        self.irqs = []
        close_fd(self.resample, "IRQ fd")
        self.resample = None

    def close(self) -> None:
        self.drop_client()
        close_fd(self.listener, "listening socket")
        self.listener = None

    def fd_count(self) -> int:
        """The fds held (tests compare it with what the device process holds)."""
        return (sum(fd is not None for fd in (self.listener, self.client, self.resample))
                + sum(m.fd is not None for m in self.maps.values()) + len(self.irqs))

    def apply(self, event: dict[str, Any], fds: list[int]) -> list[int]:
        """Apply one event; the fds it does not keep (closed by the caller)."""
        ev = event.get("ev")
        if ev == "server" and len(fds) == 1:
            close_fd(self.listener, "listening socket")
            self.listener, self.server = fds[0], event
            return []
        if ev == "client" and len(fds) == 1:
            self.drop_client()
            self.client = fds[0]
            return []
        if ev == "session":
            self.session = event
        elif ev == "map" and len(fds) <= 1:
            old = self.maps.pop(int(event["iova"]), None)
            if old is not None:
                close_fd(old.fd, "DMA map fd")
            self.maps[int(event["iova"])] = _Map(event, fds[0] if fds else None)
            return []
        elif ev == "unmap":
            old = self.maps.pop(int(event["iova"]), None)
            if old is not None:
                close_fd(old.fd, "DMA map fd")
        elif ev == "irqs":
            vectors = event.get("vectors", [])
            want = len(vectors) + bool(event.get("resample"))
            if want != len(fds) or want > EVENT_FDS:
                log.error("supervisor: an irqs event with %d fds for %d", len(fds), want)
                return fds
            self.drop_irqs()
            self.irqs = [(int(i), int(v), fd) for (i, v), fd in zip(vectors, fds, strict=False)]
            if event.get("resample"):
                self.resample = fds[-1]
            return []
        elif ev == "config":
            self.config = event.get("bytes")
        elif ev == "gone":
            self.drop_client()
        return fds

    def manifest(self, record: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """The hand-over for a new device process (upgrade.py's format, no device state)."""
        assert self.server is not None and self.listener is not None
        fds: list[int] = [self.listener]

        def index(fd: int) -> int:
            fds.append(fd)
            return len(fds) - 1

        manifest: dict[str, Any] = {
            "caps": self.server["caps"], "dma_layout": self.server["dma_layout"],
            "listener": 0, "path": self.server["path"], "owns_path": self.server["owns_path"],
            "connection": None,
            "recovery": {**record, "config": self.config},
        }
        if self.client is not None and self.session is None:
            self.drop_client()  # it died before saying anything of it: the client sees EOF
        if self.client is not None and self.session is not None:
            manifest["connection"] = {
                "socket": index(self.client),
                "session": self.session["session"],
                "requester": self.session["requester"],
                "device_connected": self.session["device_connected"],
                "dma_maps": [{**{k: m.entry[k] for k in ("iova", "size", "prot", "offset")},
                              "fd": None if m.fd is None else index(m.fd)}
                             for m in self.maps.values()],
                "irqs": [[i, v, index(fd)] for i, v, fd in self.irqs],
                "resample_fd": None if self.resample is None else index(self.resample),
                "reader": {"data": "", "marks": []},
            }
        else:
            manifest["recovery"] = {**record, "state": 0, "config": None}
        return manifest, fds


class Supervisor:
    """Run ``argv`` (the device process's arguments) and bring it back after a crash."""

    def __init__(self, argv: Sequence[str], pass_fds: Sequence[int] = ()) -> None:
        self.argv = list(argv)
        #: fds the first device process inherits (its --fd listening socket)
        self.pass_fds = list(pass_fds)
        self.held = Held()
        self.record_fd = Record.create()
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: socket.socket | None = None
        self.stopping = False
        self.recoveries = 0
        self.ready_told = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # --- the device process ---------------------------------------------------------------
    def _spawn(self, recover: socket.socket | None) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # the parent is the service; it says when it is ready
        env[EVENTS_ENV] = str(theirs.fileno())
        env[RECORD_ENV] = str(self.record_fd)
        passed = [theirs.fileno(), self.record_fd]
        if recover is None:
            passed += self.pass_fds
        else:
            env[RECOVER_ENV] = str(recover.fileno())
            passed.append(recover.fileno())
            for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
                env.pop(name, None)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vfio_user_server.cli", *self.argv],
                pass_fds=passed, env=env)
        finally:
            theirs.close()
        close_fds(self.pass_fds, "--fd socket")  # the device process reports its copy
        self.pass_fds = []
        if self.events is not None:
            self.events.close()
        self.events = mine

    def _read_events(self) -> bool:
        """Apply every event waiting; False at the channel's end (the process is gone)."""
        assert self.events is not None
        while True:
            try:
                data, anc, _flags, _ = self.events.recvmsg(EVENT_SIZE, _ANC,
                                                          socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except OSError:
                return False
            fds = fds_from_ancillary(anc)
            if not data:
                close_fds(fds, "supervisor event fd")
                return False
            try:
                event = json.loads(data)
                if not isinstance(event, dict):
                    raise ValueError("not an object")
                if event.get("ev") == "ready":
                    self._ready(event)
                extra = self.held.apply(event, fds)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("supervisor: bad event from the device process: %s", exc)
                extra = fds
            close_fds(extra, "supervisor event fd")

    def _ready(self, event: dict[str, Any]) -> None:
        if not self.ready_told:
            self.ready_told = True
            systemd.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving (supervised, "
                           f"device process {event.get('pid')})")
        else:
            systemd.notify(f"STATUS=serving (supervised, recovered {self.recoveries} time(s), "
                           f"device process {event.get('pid')})")

    def _recover(self) -> None:
        """Start a new device process and hand it everything the dead one had."""
        record = read_record(self.record_fd)
        reset_record(self.record_fd)  # the new process starts IDLE
        manifest, fds = self.held.manifest(record)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._spawn(b)
        finally:
            b.close()
        try:
            send_handover(a, manifest, fds)
            _recv_ack(a, RECOVER_TIMEOUT)
        finally:
            a.close()
        self.recoveries += 1
        log.warning("supervisor: device process %d took over (recovery %d)",
                    self.proc.pid if self.proc else -1, self.recoveries)

    # --- the loop -----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM if signum != signal.SIGINT else signal.SIGINT)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"s")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        failed = 0
        try:
            self._spawn(None)
            while True:
                status = self._serve_one()
                if status is not None:
                    return status
                if self.held.listener is None:  # it never listened: nothing to carry
                    log.error("supervisor: the device process died before it served")
                    return 1
                try:
                    self._recover()
                    failed = 0
                except (HandoverError, OSError) as exc:
                    failed += 1
                    log.error("supervisor: recovery failed (%d in a row): %s", failed, exc)
                    if self.proc is not None:
                        self.proc.kill()
                        self.proc.wait()
                    if failed >= MAX_FAILED_STARTS:
                        return 1
                    self.proc = None
        finally:
            self.held.close()
            close_fd(self.record_fd, "record")
            if self.events is not None:
                self.events.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _serve_one(self) -> int | None:
        """Follow the device process until it ends: its exit status, or None after a crash
        to recover from (its last events applied)."""
        if self.proc is None:  # a failed recovery: the held fds go to the next attempt
            return None
        assert self.events is not None
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            channel_open = True
            while True:
                watched = [pidfd, self._wake_r] + ([self.events.fileno()] if channel_open
                                                     else [])
                r, _, _ = select.select(watched, [], [])
                if self.events.fileno() in r:
                    channel_open = self._read_events()
                if self._wake_r in r:
                    os.read(self._wake_r, 64)
                if pidfd in r:
                    break
        finally:
            os.close(pidfd)
        self._read_events()  # what it said before it died
        code = self.proc.wait()
        if code >= 0 or self.stopping:
            return code if code >= 0 else 0
        log.error("supervisor: device process %d killed by signal %d; recovering",
                  self.proc.pid, -code)
        return None


def main(argv: Sequence[str], pass_fds: Sequence[int] = ()) -> int:
    """``vfio-user-server --supervise ARGS``: ARGS are the device process's."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return Supervisor(argv, pass_fds).run()
