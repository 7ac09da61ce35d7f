"""The installed ``vfio-user-server`` as a supervisor runs it: a child process that reports
readiness on a ``NOTIFY_SOCKET`` datagram socket the test owns, so tests wait for the
``READY=1`` datagram (or the process's exit), never for time to pass.

Used by the supervisor and security tests, the soak tests and the end-to-end tests that attach
QEMU to the real command: a server in its own process is measured (``Resources``) without the
test's own fds, threads and allocations.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vfio_user_server.client import Client

#: Generous: the machine may be loaded; nothing here measures time.
DEADLINE = 60.0


def installed_command(name: str = "vfio-user-server") -> str:
    """The console script installed with the package (next to this Python, or on PATH)."""
    beside = Path(sys.executable).parent / name  # the venv's bin, also when not on PATH
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed (pip install -e .)")
    return found


#: The installed command.
CLI = installed_command()


@dataclass(frozen=True)
class Resources:
    """What a process holds: open fds, memory mappings, threads, resident memory."""

    fds: int
    maps: int
    threads: int
    rss_kib: int

    @classmethod
    def of(cls, pid: int) -> Resources:
        status = Path(f"/proc/{pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmRSS:"))
        return cls(
            fds=len(os.listdir(f"/proc/{pid}/fd")),
            maps=len(Path(f"/proc/{pid}/maps").read_text().splitlines()),
            threads=len(os.listdir(f"/proc/{pid}/task")),
            rss_kib=rss,
        )

    def back_to(self, baseline: Resources) -> bool:
        """The same fds and threads as ``baseline``, and no more memory mappings.

        A leak only ever adds mappings; one fewer is ordinary (glibc merges or trims the
        regions of freed thread stacks and heaps once a client has gone).
        """
        return ((self.fds, self.threads) == (baseline.fds, baseline.threads)
                and self.maps <= baseline.maps)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


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
        #: the socket it serves, when made by ``serving``
        self.sock = Path()
        self.notify = NotifyListener(folder, abstract_notify)
        self._err = tempfile.TemporaryFile(prefix="vfu-stderr-")  # noqa: SIM115 (closed in close)
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("LISTEN_", "NOTIFY_SOCKET"))}
        environ.update(env or {})
        environ["NOTIFY_SOCKET"] = self.notify.address
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            [*wrapper, CLI, *args], env=environ, pass_fds=tuple(pass_fds),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err)

    @classmethod
    def serving(cls, sock: Path, device: str, args: Sequence[str] = (), *,
                env: Mapping[str, str] | None = None, log_level: str = "WARNING"
                ) -> ServerProcess:
        """``vfio-user-server --socket SOCK DEVICE ARGS``, once it has sent READY=1 (its
        notify socket beside ``sock``); ``close()`` it when done."""
        p = cls(["--socket", str(sock), "--log-level", log_level, device, *args], sock.parent,
                env=env)
        p.sock = sock
        try:
            p.ready()
            # it sends READY=1 and then closes the datagram socket it sent it on: what it
            # holds is measured (``resources``) once that socket is gone
            wait_for(lambda: not p.datagram_sockets(), "the server to close its notify socket")
        except BaseException:
            p.close()
            raise
        return p

    @property
    def pid(self) -> int:
        return self.proc.pid

    def datagram_sockets(self) -> set[int]:
        """The inodes of the AF_UNIX datagram sockets the server holds."""
        mine = set()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if target.startswith("socket:["):
                mine.add(int(target[8:-1]))
        dgram = set()
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[4], 16) == socket.SOCK_DGRAM:
                dgram.add(int(fields[6]))
        return mine & dgram

    def resources(self) -> Resources:
        return Resources.of(self.pid)

    def connect(self, timeout: float = DEADLINE) -> Client:
        """A negotiated client; retried while the server still serves the previous one."""
        deadline = time.monotonic() + timeout
        while True:
            c = Client.connect(self.sock, timeout=DEADLINE)
            try:
                c.negotiate()
                c.get_device_info()
                return c
            except (ConnectionError, OSError, TimeoutError):
                c.close()
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise

    def settle(self, baseline: Resources, timeout: float = DEADLINE) -> Resources:
        """Wait until fds, maps and threads are back to ``baseline`` (or the deadline)."""
        now = self.resources()
        deadline = time.monotonic() + timeout
        while not now.back_to(baseline) and time.monotonic() < deadline:
            time.sleep(0.02)
            now = self.resources()
        return now

    def ready(self) -> str:
        """The READY=1 datagram; fails with the server's stderr if it exited first."""
        msg = self.notify.wait_for("READY=1", self.proc)
        assert msg is not None, f"exited with {self.proc.wait()}: {self.stderr()}"
        return msg

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait()

    def finish(self) -> None:
        """Stop it with SIGTERM, check it exited with 0, and close it."""
        try:
            status = self.stop()
            assert status == 0, self.stderr()
        finally:
            self.close()

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


def stop_serving(sock: Path) -> None:
    """SIGTERM whoever serves ``sock`` now: the last process of an upgrade or reload chain,
    which the test did not start itself."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(sock).encode() in cmd and b"vfio_user_server.cli" in cmd:
                os.kill(int(pid), signal.SIGTERM)
