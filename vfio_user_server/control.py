"""The control socket of ``vfio-user-server`` (PATH + ".ctl", mode 0600) and ``upgrade``.

``vfio-user-server upgrade --socket PATH`` connects to PATH.ctl and sends ``upgrade``; the
server starts a new process with the same arguments (the code now on disk), hands it
everything (:mod:`vfio_user_server.upgrade`; every device of the process, each device socket
having its own control socket), waits for its acknowledgement (it serves), answers
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
from collections.abc import Mapping, Sequence
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
    """Serve ``upgrade`` requests for the servers of one process, on one control socket per
    device socket (``paths``: any of them upgrades the whole process); ``argv`` starts the
    new process."""

    def __init__(self, servers: Server | Sequence[Server], paths: Path | Sequence[Path],
                 argv: Sequence[str]) -> None:
        self.servers = [servers] if isinstance(servers, Server) else list(servers)
        self.paths = [paths] if isinstance(paths, Path) else list(paths)
        self.argv = list(argv)
        self._socks: list[socket.socket] = []
        try:
            for path in self.paths:
                self._socks.append(_bind_control(path))
        except BaseException:
            for sock, path in zip(self._socks, self.paths, strict=False):
                sock.close()
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        self._inos = [os.stat(path).st_ino for path in self.paths]
        self._lock = threading.Lock()  # one upgrade at a time (a request, a reload)
        #: set once an upgrade handed everything over and its requester has its answer
        self.upgraded = threading.Event()
        for sock, path in zip(self._socks, self.paths, strict=True):
            threading.Thread(target=self._loop, args=(sock,), daemon=True,
                             name=f"vfio-user-control:{path.name}").start()

    @property
    def server(self) -> Server:
        return self.servers[0]

    @property
    def path(self) -> Path:
        return self.paths[0]

    def _loop(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
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

    def upgrade(self, env: Mapping[str, str] | None = None) -> int:
        """Start the new process (``env`` added to its environment), hand every server over,
        wait for it to serve; its pid."""
        with self._lock:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            environ = dict(os.environ, **(env or {}), **{HANDOVER_ENV: str(b.fileno())})
            for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
                environ.pop(name, None)
            try:
                proc = subprocess.Popen([sys.executable, "-m", "vfio_user_server.cli",
                                         *self.argv], pass_fds=[b.fileno()], env=environ)
            finally:
                b.close()
            try:
                hand_over(self.servers, a, timeout=UPGRADE_TIMEOUT)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                a.close()
            log.info("upgraded: pid %d serves %s", proc.pid,
                     ", ".join(str(srv.path) for srv in self.servers))
            return proc.pid

    def close(self) -> None:
        """Stop listening; each file goes only if it is still ours (not the new process's)."""
        for sock, path, ino in zip(self._socks, self.paths, self._inos, strict=True):
            sock.close()
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == ino and not self.upgraded.is_set():
                    path.unlink()


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
