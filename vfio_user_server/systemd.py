"""The two systemd service protocols the command line speaks, without a library.

* **Socket activation** (``sd_listen_fds(3)``): the supervisor passes listening sockets as fds
  3, 4, ... and says so in ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (for which process) and
  ``LISTEN_FDNAMES`` (their ``FileDescriptorName=``, colon-separated). :func:`listen_fds`
  reads and then unsets them, so that no child process takes the fds for its own.
* **Readiness** (``sd_notify(3)``): one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket
  that ``NOTIFY_SOCKET`` names (a leading ``@`` is the abstract namespace). :func:`notify`
  sends it; without ``NOTIFY_SOCKET`` it does nothing.

Any supervisor may use the same variables (they are not systemd's alone).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

__all__ = ["SD_LISTEN_FDS_START", "ActivatedFds", "listen_fds", "notify"]

log = logging.getLogger(__name__)

#: The first fd a supervisor passes.
SD_LISTEN_FDS_START = 3


@dataclass(frozen=True)
class ActivatedFds:
    """The fds passed by socket activation, in order, with their names ("unknown" if none)."""

    fds: tuple[int, ...] = ()
    names: tuple[str, ...] = ()

    def by_name(self, name: str) -> list[int]:
        return [fd for fd, n in zip(self.fds, self.names, strict=True) if n == name]


def listen_fds(environ: MutableMapping[str, str] | None = None,
               pid: int | None = None) -> ActivatedFds:
    """The fds handed over by socket activation, after checking ``LISTEN_PID``.

    Raises ``ValueError`` when the variables are malformed. The variables are removed from
    ``environ`` (``os.environ`` by default) whether or not they were for this process.
    """
    env = os.environ if environ is None else environ
    count_text = env.pop("LISTEN_FDS", None)
    pid_text = env.pop("LISTEN_PID", None)
    names_text = env.pop("LISTEN_FDNAMES", None)
    if count_text is None:
        return ActivatedFds()
    me = os.getpid() if pid is None else pid
    if pid_text is not None:
        try:
            target = int(pid_text)
        except ValueError:
            raise ValueError(f"LISTEN_PID={pid_text!r} is not a process id") from None
        if target != me:
            return ActivatedFds()  # meant for another process (our parent, say)
    try:
        count = int(count_text)
    except ValueError:
        raise ValueError(f"LISTEN_FDS={count_text!r} is not a number") from None
    if count < 0:
        raise ValueError(f"LISTEN_FDS={count_text!r} is negative")
    fds = tuple(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    if names_text is None:
        names: tuple[str, ...] = ("unknown",) * count
    else:
        names = tuple(names_text.split(":")) if count else ()
        if len(names) != count:
            raise ValueError(f"LISTEN_FDNAMES names {len(names)} fds, LISTEN_FDS={count}")
    return ActivatedFds(fds, names)


def notify(state: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send ``state`` (``"READY=1"``, ``"STOPPING=1"``, ``"STATUS=..."``, lines joined by
    newlines) to the supervisor's ``NOTIFY_SOCKET``. Returns whether a datagram was sent.

    A failure to send is logged and otherwise ignored: the service goes on.
    """
    env = os.environ if environ is None else environ
    where = env.get("NOTIFY_SOCKET")
    if not where:
        return False
    if where.startswith("@"):
        address: str | bytes = b"\0" + where[1:].encode()
    elif where.startswith("/"):
        address = where
    else:
        log.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract: not notifying", where)
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify %s: %s", where, exc)
        return False
    finally:
        sock.close()
    return True
