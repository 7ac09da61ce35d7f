"""Standby guests: the next restore, made while the current test runs.

A restored guest spends most of its start on two things no test needs to wait for: loading
the template snapshot (QEMU's start and ``migrate-incoming``) and its first instructions after
the restore (TCG translating the kernel's paths again: 0.2-0.3 s of QEMU CPU for the first
agent command, 0.01-0.02 s for the next). After each restore, :class:`StandbyPool` makes one
more guest with the same setup in a background thread: it restores the template, resumes it
and runs one warm-up command (``:``), with no device. The next guest with that setup adopts
it (:meth:`~vfio_user_server.testing.guest_restore._GuestRestore._restore`) and only plugs
its devices and settles, which sets the clock and mixes in a host seed after the hand-over.

A standby has never served a test: no test's guest state reaches another. A guest with
``extra_args`` gets none: they may name host state two QEMUs must not share (a
``memory-backend-file``). The pool holds one
standby (ready or being made) per process; a request for another setup replaces it. Its QEMU
is started by the pool's thread, which lives as long as the process, so ``die_with_parent``
kills it with the process (a pytest-xdist worker that crashes too); :meth:`StandbyPool.close`
(the pytest plugin's ``pytest_unconfigure``, and at exit) ends it otherwise.

The pytest plugin turns the pool on; ``$PYVFIO_STANDBY=0`` turns it off, ``=1`` on outside
pytest.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vfio_user_server.testing.guest import QemuMachine

log = logging.getLogger("vfio_user_server.testing.guest")

__all__ = ["POOL", "StandbyPool"]


class StandbyPool:
    """At most one standby guest, made by a long-lived thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: tuple[str, QemuMachine] | None = None
        self._making: str | None = None
        self._wanted: tuple[str, Callable[[], QemuMachine]] | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._enabled = os.environ.get("PYVFIO_STANDBY", "") not in ("", "0")

    @property
    def enabled(self) -> bool:
        return self._enabled and not self._closed and os.environ.get("PYVFIO_STANDBY") != "0"

    def enable(self) -> None:
        """Turn the pool on (the pytest plugin does), unless ``$PYVFIO_STANDBY=0``."""
        with self._cond:
            self._enabled = True
            self._closed = False

    def take(self, key: str, timeout: float) -> QemuMachine | None:
        """The standby for ``key`` (waiting for it if it is being made), or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._ready is None or self._ready[0] != key) and (
                    self._making == key or (self._wanted is not None and self._wanted[0] == key)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            if self._ready is None or self._ready[0] != key:
                return None
            machine = self._ready[1]
            self._ready = None
            return machine

    def refill(self, key: str, make: Callable[[], QemuMachine]) -> None:
        """Have a standby for ``key`` made (replacing one for another key)."""
        old = None
        with self._cond:
            if not self.enabled:
                return
            if self._making == key or (self._ready is not None and self._ready[0] == key):
                return
            if self._ready is not None:
                old, self._ready = self._ready[1], None
            self._wanted = (key, make)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pyvfio-standby",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()
        if old is not None:
            old.close()

    def _run(self) -> None:
        # Never returns: the QEMU processes this thread started (adopted guests too) get
        # SIGKILL when it exits (die_with_parent), so it lives as long as the process.
        while True:
            with self._cond:
                while self._wanted is None or self._closed:
                    self._cond.wait()
                key, make = self._wanted
                self._wanted = None
                self._making = key
            machine: QemuMachine | None = None
            try:
                machine = make()
            except Exception:  # the test's own restore will say what is wrong
                log.warning("making a standby guest failed", exc_info=True)
            drop = None
            with self._cond:
                self._making = None
                if machine is not None:
                    if self._closed or self._wanted is not None:
                        drop = machine
                    else:
                        self._ready = (key, machine)
                self._cond.notify_all()
            if drop is not None:
                drop.close()

    def close(self) -> None:
        """End the standby guest (and the one being made, once made); :meth:`enable` turns
        the pool on again."""
        with self._cond:
            self._closed = True
            self._wanted = None
            ready, self._ready = self._ready, None
            self._cond.notify_all()
        if ready is not None:
            with contextlib.suppress(Exception):
                ready[1].close()
        # One being made is closed by its thread when made, or with the process (its QEMU
        # dies with the thread; guest.py's exit hook closes every live machine).


#: The process's pool.
POOL = StandbyPool()
atexit.register(POOL.close)
