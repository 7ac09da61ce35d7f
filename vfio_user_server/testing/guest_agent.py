"""The command agent of a guest: its serial socket, the reader thread, :meth:`run` and
:meth:`reboot` (a layer of :class:`~vfio_user_server.testing.guest.QemuMachine`)."""

from __future__ import annotations

import logging
import math
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from vfio_user_server.errors import GuestError
from vfio_user_server.testing.guest_base import (
    Result,
)
from vfio_user_server.testing.guest_process import _GuestProcess
from vfio_user_server.testing.initramfs import (
    AGENT_BEGIN,
    AGENT_END,
    AGENT_READY,
)

log = logging.getLogger("vfio_user_server.testing.guest")


def frame_command(cid: int, timeout: int, command: str) -> tuple[str, bytes]:
    """What the host sends the agent for ``command``: its tag and the bytes (a header line
    ``<id> <timeout> <lines> <tag>``, then the script's lines as they are)."""
    if "\0" in command:
        raise GuestError(f"a guest command cannot hold a NUL byte: {command!r}")
    tag = secrets.token_hex(6)
    lines = command.split("\n")
    header = f"{cid} {timeout} {len(lines)} {tag}\n"
    return tag, header.encode() + "\n".join(lines).encode() + b"\n"


@dataclass(frozen=True)
class AgentReady:
    """The agent printed its ready marker (at boot, and again after each reboot)."""


@dataclass(frozen=True)
class AgentResult:
    """A command finished: its id, exit status and output (stdout and stderr, as bytes)."""

    cid: int
    status: int
    output: bytes


_BEGIN = re.compile(rf"{AGENT_BEGIN} (\d+) ([0-9a-f]+)$".encode())
_END = re.compile(rb" (-?\d+)\n")


class AgentStream:
    """Splits what the agent writes on its serial port into :class:`AgentReady` and
    :class:`AgentResult` events (sans-IO: :meth:`feed` bytes, get events).

    Outside a result, the stream is lines: the ready marker, a result's begin line, or noise
    (ignored). After ``AGENT_BEGIN <id> <tag>`` everything up to ``\\nAGENT_END <id> <tag>
    <status>\\n`` is the command's output, byte for byte; the tag is random per command, so no
    output can end a result early.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # where the unparsed part of _buf starts
        self._cid = 0
        self._end: bytes | None = None  # the end marker of the result being read

    def feed(self, data: bytes) -> list[AgentReady | AgentResult]:
        self._buf += data
        events: list[AgentReady | AgentResult] = []
        while True:
            event = self._next()
            if event is None:
                break
            events.append(event)
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        return events

    def _next(self) -> AgentReady | AgentResult | None:
        buf = self._buf
        while self._end is None:
            nl = buf.find(b"\n", self._pos)
            if nl < 0:
                return None
            line = bytes(buf[self._pos : nl]).rstrip(b"\r")
            self._pos = nl + 1
            if line.endswith(AGENT_READY.encode()):
                return AgentReady()
            m = _BEGIN.search(line)
            if m:
                self._cid = int(m.group(1))
                self._end = b"\n" + f"{AGENT_END} {self._cid} ".encode() + m.group(2)
        at = buf.find(self._end, self._pos)
        if at < 0:
            return None
        m = _END.match(buf, at + len(self._end))
        if m is None:
            if buf.find(b"\n", at + len(self._end)) >= 0:  # pragma: no cover - agent bug
                raise GuestError(f"malformed agent end line: {bytes(buf[at:at + 80])!r}")
            return None
        output = bytes(buf[self._pos : at])
        self._pos = m.end()
        self._end = None
        return AgentResult(self._cid, int(m.group(1)), output)


class _GuestAgent(_GuestProcess):
    """The command agent on COM2: commands, their results, readiness and reboots."""

    def _listen_agent(self) -> None:
        if self.agent:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(str(self._path("agent.sock")))
            self._listener.listen(1)

    def _start_agent_reader(self, deadline: float) -> None:
        assert self._listener is not None
        self._agent_sock = self._accept(self._listener, deadline)
        self._reader = threading.Thread(
            target=self._read_agent, name=f"agent-{self.name}", daemon=True
        )
        self._reader.start()

    def _read_agent(self) -> None:
        assert self._agent_sock is not None
        stream = AgentStream()
        sock = self._agent_sock
        with open(self._path("agent.log"), "ab") as alog:
            while True:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    chunk = b""
                # A standby guest's reader serves the machine that adopted it (see .standby).
                owner = self._agent_owner
                if not chunk:
                    with owner._cond:
                        owner._agent_eof = True
                        owner._cond.notify_all()
                    return
                alog.write(chunk)
                events = stream.feed(chunk)
                if not events:
                    continue
                with owner._cond:
                    for event in events:
                        if isinstance(event, AgentReady):
                            owner._ready_count += 1
                        else:
                            owner._results[event.cid] = (event.status, event.output)
                    owner._cond.notify_all()

    def _wait_ready(self, count: int, deadline: float) -> None:
        with self._cond:
            while self._ready_count < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._error("the guest agent did not come up in time")
                if self._agent_eof:
                    raise self._error("the agent serial port closed before the guest was ready")
                self._cond.wait(min(remaining, 0.25))
                if self._cond_check_dead():
                    raise self._error("QEMU exited before the guest was ready")

    def _send(self, frame: bytes) -> None:
        if self._agent_sock is None:
            raise GuestError("this guest has no command agent (agent=False)")
        with self._send_lock:
            self._agent_sock.sendall(frame)

    def run(self, command: str, timeout: float = 60.0, *, check: bool = False) -> Result:
        """Run ``command`` with ``sh`` in the guest; stdout and stderr come back merged.

        The guest kills the command after ``timeout`` seconds (``Result.timed_out``); a guest
        that does not answer within ``timeout`` plus a margin raises :class:`GuestError`.
        """
        if self.proc is None or self._closed:
            raise GuestError("guest is not running")
        with self._cond:
            self._next_id += 1
            cid = self._next_id
        guest_timeout = max(1, math.ceil(timeout)) if timeout > 0 else 0
        _tag, frame = frame_command(cid, guest_timeout, command)
        t0 = time.monotonic()
        self._send(frame)
        deadline = t0 + (timeout if timeout > 0 else 1e9) + 30
        with self._cond:
            while cid not in self._results:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._error(f"no answer from the guest agent to {command!r}")
                if self._agent_eof or self._cond_check_dead():
                    raise self._error(f"the guest went away while running {command!r}")
                self._cond.wait(min(remaining, 0.25))
            status, data = self._results.pop(cid)
        duration = time.monotonic() - t0
        timed_out = timeout > 0 and status == 137 and duration >= guest_timeout - 0.5
        result = Result(
            ok=status == 0,
            status=status,
            output=data.decode(errors="replace"),
            command=command,
            duration=duration,
            timed_out=timed_out,
        )
        return result.check() if check else result

    def reboot(self, *, timeout: float | None = None, via: str = "guest") -> float:
        """Reboot the guest (``reboot -f`` in it, or QMP ``system_reset`` with ``via="qmp"``)
        and wait until the agent is back; return the seconds it took. Needs ``no_reboot=False``.
        """
        if self.no_reboot:
            raise GuestError("reboot() needs QemuMachine(no_reboot=False)")
        with self._cond:
            target = self._ready_count + 1
        t0 = time.monotonic()
        if via == "qmp":
            self.qmp("system_reset")
        else:
            with self._cond:
                self._next_id += 1
                cid = self._next_id
            self._send(frame_command(cid, 0, "sync; reboot -f")[1])
        self._wait_ready(target, t0 + (timeout or self.boot_timeout))
        return time.monotonic() - t0
