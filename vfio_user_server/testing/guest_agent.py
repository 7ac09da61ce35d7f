"""The command agent of a guest: its serial socket, the reader thread, :meth:`run` and
:meth:`reboot` (a layer of :class:`~vfio_user_server.testing.guest.QemuMachine`)."""

from __future__ import annotations

import base64
import logging
import math
import re
import socket
import threading
import time

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
        buf = b""
        sock = self._agent_sock
        with open(self._path("agent.log"), "ab") as alog:
            while True:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    with self._cond:
                        self._agent_eof = True
                        self._cond.notify_all()
                    return
                alog.write(chunk)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    self._agent_line(raw.decode(errors="replace").strip("\r"))

    def _agent_line(self, line: str) -> None:
        with self._cond:
            if line.endswith(AGENT_READY):
                self._ready_count += 1
                self._collect.clear()
                self._cond.notify_all()
                return
            m = re.match(rf"^{AGENT_BEGIN} (\d+)$", line)
            if m:
                self._collect[int(m.group(1))] = []
                return
            m = re.match(rf"^{AGENT_END} (\d+) (-?\d+)$", line)
            if m:
                cid = int(m.group(1))
                parts = self._collect.pop(cid, [])
                try:
                    data = base64.b64decode("".join(parts))
                except ValueError:
                    data = ("".join(parts)).encode()
                self._results[cid] = (int(m.group(2)), data)
                self._cond.notify_all()
                return
            for parts in self._collect.values():
                parts.append(line.strip())

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

    def _send(self, line: str) -> None:
        if self._agent_sock is None:
            raise GuestError("this guest has no command agent (agent=False)")
        with self._send_lock:
            self._agent_sock.sendall(line.encode() + b"\n")

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
        payload = base64.b64encode(command.encode()).decode()
        t0 = time.monotonic()
        self._send(f"{cid} {guest_timeout} {payload}")
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
            payload = base64.b64encode(b"sync; reboot -f").decode()
            self._send(f"{cid} 0 {payload}")
        self._wait_ready(target, t0 + (timeout or self.boot_timeout))
        return time.monotonic() - t0
