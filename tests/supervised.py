"""The installed ``vfio-user-server`` as a supervisor runs it: a child process that reports
readiness on a ``NOTIFY_SOCKET`` datagram socket the test owns, so tests wait for the
``READY=1`` datagram (or the process's exit), never for time to pass.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

#: The installed command, beside the interpreter running the tests.
CLI = str(Path(sys.executable).parent / "vfio-user-server")
#: Generous: the machine may be loaded; nothing here measures time.
DEADLINE = 60.0


class NotifyListener:
    """A ``NOTIFY_SOCKET``: a datagram socket at a path in ``folder``, or abstract (``@``)."""

    def __init__(self, folder: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if abstract:
            name = f"pyvfio-test-{os.getpid()}-{id(self):x}"
            self.sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        else:
            path = folder / "notify.sock"
            self.sock.bind(str(path))
            self.address = str(path)
        self.messages: list[str] = []

    def next(self, proc: subprocess.Popen[bytes] | None = None,
             deadline: float = DEADLINE) -> str | None:
        """The next datagram; None if ``proc`` exited first (its last datagrams are read)."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            self.sock.settimeout(0.5)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if proc is not None and proc.poll() is not None:
                    self.sock.settimeout(0)
                    try:
                        data = self.sock.recv(4096)
                    except BlockingIOError:
                        return None
                else:
                    continue
            text = data.decode()
            self.messages.append(text)
            return text
        raise TimeoutError("no notification from the server")

    def wait_for(self, key: str, proc: subprocess.Popen[bytes] | None = None) -> str | None:
        """The first datagram with the line ``key`` (``READY=1``); None if ``proc`` exited."""
        while True:
            msg = self.next(proc)
            if msg is None or key in msg.splitlines():
                return msg

    def close(self) -> None:
        self.sock.close()


class ServerProcess:
    """``vfio-user-server ARGS`` with ``NOTIFY_SOCKET`` set; stderr kept in a file."""

    def __init__(self, args: Sequence[str], folder: Path, *,
                 env: Mapping[str, str] | None = None, pass_fds: Sequence[int] = (),
                 abstract_notify: bool = False, wrapper: Sequence[str] = ()) -> None:
        self.notify = NotifyListener(folder, abstract_notify)
        self._err = tempfile.TemporaryFile(prefix="vfu-stderr-")  # noqa: SIM115 (closed in close)
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("LISTEN_", "NOTIFY_SOCKET"))}
        environ.update(env or {})
        environ["NOTIFY_SOCKET"] = self.notify.address
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            [*wrapper, CLI, *args], env=environ, pass_fds=tuple(pass_fds),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err)

    def ready(self) -> str:
        """The READY=1 datagram; fails with the server's stderr if it exited first."""
        msg = self.notify.wait_for("READY=1", self.proc)
        assert msg is not None, f"exited with {self.proc.wait()}: {self.stderr()}"
        return msg

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait()

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the server did not exit: {self.stderr()}") from None

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._err.close()
        self.notify.close()


def run_cli(args: Sequence[str], *, pass_fds: Sequence[int] = (),
            env: Mapping[str, str] | None = None, wrapper: Sequence[str] = ()
            ) -> subprocess.CompletedProcess[str]:
    """Run the command to its end (for the ones that fail before serving)."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("LISTEN_", "NOTIFY_SOCKET"))}
    environ.update(env or {})
    return subprocess.run([*wrapper, CLI, *args], capture_output=True, text=True, timeout=DEADLINE,
                          pass_fds=tuple(pass_fds), env=environ, stdin=subprocess.DEVNULL)
