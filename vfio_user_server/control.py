"""The control socket of ``vfio-user-server`` (PATH + ".ctl", mode 0600) and ``upgrade``.

``vfio-user-server upgrade --socket PATH`` connects to PATH.ctl and sends ``upgrade``; the
server starts a new process with the same arguments (the code now on disk), hands it
everything (:mod:`vfio_user_server.upgrade`), waits for its acknowledgement (it serves), answers
``ok PID`` and exits with status 0. When the new process fails, the answer is ``error: ...``
and the old process serves on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from .errors import VfioUserError
from .server import Server
from .upgrade import hand_over

log = logging.getLogger(__name__)

#: The environment variable naming the hand-over fd of a new process.
HANDOVER_ENV = "PYVFIO_HANDOVER_FD"
#: How long the old process waits for the new one to serve.
UPGRADE_TIMEOUT = 120.0


def control_path(path: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(path) + ".ctl")


def _bind_control(path: Path) -> socket.socket:
    """A listening socket at ``path``, 0600 before anyone can reach it, replacing any socket
    there atomically (the old process's, during an upgrade)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    private = Path(tempfile.mkdtemp(prefix=".vfu-ctl-", dir=path.parent))
    tmp = private / "c"
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, 0o600)
        sock.listen(2)
        os.replace(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        with contextlib.suppress(OSError):
            private.rmdir()
    return sock


class ControlSocket:
    """Serve ``upgrade`` requests for one server; ``argv`` starts the new process."""

    def __init__(self, server: Server, path: Path, argv: Sequence[str]) -> None:
        self.server = server
        self.path = path
        self.argv = list(argv)
        self._sock = _bind_control(path)
        self._ino = os.stat(path).st_ino
        #: set once an upgrade handed everything over and its requester has its answer
        self.upgraded = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vfio-user-control",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.settimeout(10.0)
                    line = conn.recv(256).strip()
                    conn.settimeout(None)
                except OSError:
                    continue
                if line != b"upgrade":
                    with contextlib.suppress(OSError):
                        conn.sendall(b"error: unknown command " + line[:40] + b"\n")
                    continue
                try:
                    pid = self.upgrade()
                except Exception as exc:
                    log.error("upgrade failed, serving on: %s", exc)
                    with contextlib.suppress(OSError):
                        conn.sendall(f"error: {exc}\n".encode())
                    continue
                with contextlib.suppress(OSError):
                    conn.sendall(f"ok {pid}\n".encode())
                self.upgraded.set()
                return

    def upgrade(self) -> int:
        """Start the new process, hand over, wait for it to serve; its pid."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        env = dict(os.environ, **{HANDOVER_ENV: str(b.fileno())})
        env.pop("LISTEN_FDS", None)
        env.pop("LISTEN_PID", None)
        env.pop("LISTEN_FDNAMES", None)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "vfio_user_server.cli", *self.argv],
                                    pass_fds=[b.fileno()], env=env)
        finally:
            b.close()
        try:
            hand_over(self.server, a, timeout=UPGRADE_TIMEOUT)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            a.close()
        log.info("upgraded: pid %d serves %s", proc.pid, self.server.path)
        return proc.pid

    def close(self) -> None:
        """Stop listening; the file goes only if it is still ours (not the new process's)."""
        self._sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._ino and not self.upgraded.is_set():
                self.path.unlink()


def request_upgrade(path: str | os.PathLike[str], timeout: float = 2 * UPGRADE_TIMEOUT) -> str:
    """Ask the server on ``path`` to upgrade itself; the new pid (VfioUserError if not)."""
    ctl = control_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    with sock:
        try:
            sock.connect(str(ctl))
        except OSError as exc:
            raise VfioUserError(f"{ctl}: no server control socket ({exc.strerror})") from None
        sock.sendall(b"upgrade\n")
        answer = b""
        while not answer.endswith(b"\n"):
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    text = answer.decode(errors="replace").strip()
    if not text.startswith("ok "):
        raise VfioUserError(f"upgrade of {path} failed: {text or 'no answer'}")
    return text[3:]
