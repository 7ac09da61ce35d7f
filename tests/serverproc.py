"""The installed ``vfio-user-server`` command as a subprocess, and what it holds.

Used by the soak tests and the end-to-end test that attaches QEMU to the real command: a
server in its own process is measured without the test's own fds, threads and allocations.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vfio_user_server.client import Client

WAIT = 30.0


def installed_command(name: str = "vfio-user-server") -> str:
    """The console script installed with the package (next to this Python, or on PATH)."""
    beside = Path(sys.executable).parent / name  # the venv's bin, also when not on PATH
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed (pip install -e .)")
    return found


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

    def same_handles(self, other: Resources) -> bool:
        return (self.fds, self.maps, self.threads) == (other.fds, other.maps, other.threads)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


class ServerProcess:
    """``vfio-user-server --socket SOCK DEVICE ARGS`` (the installed command)."""

    def __init__(self, sock: Path, device: str, args: Sequence[str] = (), *,
                 env: dict[str, str] | None = None, log_level: str = "WARNING") -> None:
        self.sock = sock
        self.log = sock.with_suffix(".log")
        self.argv = [installed_command(), "--socket", str(sock), "--log-level", log_level,
                     device, *args]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        try:
            wait_for(lambda: "serving" in self.log.read_text() or self.proc.poll() is not None,
                     "the server to listen")
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.argv} exited with {self.proc.returncode}:\n"
                                     f"{self.log.read_text()}")
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def resources(self) -> Resources:
        return Resources.of(self.pid)

    def connect(self, timeout: float = WAIT) -> Client:
        """A negotiated client; retried while the server still serves the previous one."""
        deadline = time.monotonic() + timeout
        while True:
            c = Client.connect(self.sock, timeout=WAIT)
            try:
                c.negotiate()
                c.get_device_info()
                return c
            except (ConnectionError, OSError, TimeoutError):
                c.close()
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise

    def settle(self, baseline: Resources, timeout: float = WAIT) -> Resources:
        """Wait until fds, maps and threads are back to ``baseline`` (or the deadline)."""
        now = self.resources()
        deadline = time.monotonic() + timeout
        while not now.same_handles(baseline) and time.monotonic() < deadline:
            time.sleep(0.02)
            now = self.resources()
        return now

    def stop(self, timeout: float = WAIT) -> int:
        """SIGTERM, and the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.argv} ignored SIGTERM for {timeout} s") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")
