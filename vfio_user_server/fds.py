"""Closing file descriptors that came from a client: never raises, says what failed."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

log = logging.getLogger(__name__)


def close_fd(fd: int | None, what: str = "fd") -> None:
    """Close ``fd`` (None and negative values are ignored); a failure is logged, not raised."""
    if fd is None or fd < 0:
        return
    try:
        os.close(fd)
    except OSError as exc:
        log.warning("closing %s %d: %s", what, fd, exc)


def close_fds(fds: Iterable[int], what: str = "fd") -> None:
    for fd in fds:
        close_fd(fd, what)
