"""Hot reload (``vfio-user-server --reload ...``): save the device's source, the server
upgrades itself to it.

A :class:`Reloader` thread polls the source files of the devices the process serves
(:func:`source_files`: the file of each device class's module and the other modules loaded
from its folder) with ``os.stat`` every :data:`POLL_INTERVAL` seconds: stdlib only, any
filesystem, no inotify limits. A file whose device, inode, size or modification time changed,
and that then stayed the same for one more poll (an editor writing in several steps, or
renaming a new file into place), starts a live upgrade of the whole process
(:class:`~vfio_user_server.control.ControlSocket`, :mod:`vfio_user_server.upgrade`). The new
process runs with ``reset_own``: the device state is carried when the new code reads its
``state_version`` and fields, and otherwise the device's own part starts from power-on while
the guest is told through the device's reset path (``PciDevice.state_lost``).

A new source that fails to import or to build its device is refused by the new process with
:func:`describe_load_error` (file, line, exception): the old process logs it and serves on with
the code it has; the next save tries again. docs/state.md, "Hot reload".
"""

from __future__ import annotations

import json
import logging
import os
import sys
import sysconfig
import threading
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .control import ControlSocket

__all__ = ["POLL_INTERVAL", "SEEN_ENV", "Reloader", "Watcher", "describe_load_error",
           "source_files"]

log = logging.getLogger(__name__)

#: Seconds between two looks at the source files.
POLL_INTERVAL = 0.5
#: The environment variable by which a process hands the file signatures it reloaded on to
#: the next one (which compares with them, so a save during its start is not missed).
SEEN_ENV = "PYVFIO_RELOAD_SEEN"

_FRAMEWORK = Path(__file__).resolve().parent
#: Where a device's own code is not: this package and the standard library (importlib).
_NOT_DEVICE_CODE = (_FRAMEWORK, Path(sysconfig.get_paths()["stdlib"]).resolve())

#: (st_dev, st_ino, st_size, st_mtime_ns), or None while the file is missing
Signature = tuple[int, int, int, int] | None


def source_files(classes: Iterable[type]) -> list[Path]:
    """The source files to watch for these device classes: each class's module, and every
    module loaded from that module's folder (its helpers; a package's siblings). Sorted."""
    files: set[Path] = set()
    loaded = [Path(f).resolve() for m in list(sys.modules.values())
              if isinstance(f := getattr(m, "__file__", None), str) and f.endswith(".py")]
    for cls in classes:
        name = getattr(sys.modules.get(cls.__module__), "__file__", None)
        if not isinstance(name, str) or not name.endswith(".py"):
            continue
        own = Path(name).resolve()
        files.add(own)
        files.update(f for f in loaded if f.parent == own.parent)
    return sorted(files)


def signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Watcher:
    """Which watched files changed since they were last seen, once they stopped changing.

    ``baseline`` (from :data:`SEEN_ENV`) gives what the previous process saw; files it does
    not name are taken as they are now.
    """

    def __init__(self, files: Iterable[Path], baseline: Mapping[str, Any] | None = None
                 ) -> None:
        self.files = list(files)
        base = baseline or {}
        self.seen: dict[Path, Signature] = {}
        for f in self.files:
            old = base.get(str(f), ...)
            self.seen[f] = (signature(f) if old is ... else
                            tuple(old) if isinstance(old, list) and len(old) == 4 else None)
        self._pending: dict[Path, Signature] | None = None

    def poll(self) -> list[Path]:
        """The files that changed and then held still for one poll (empty: nothing to do).
        The caller :meth:`accept`\\ s them, whatever the reload gave."""
        now = {f: signature(f) for f in self.files}
        if now == self.seen or any(sig is None for sig in now.values()):
            self._pending = None  # unchanged, or a file missing (being replaced)
            return []
        if now != self._pending:
            self._pending = now  # changed: wait until it holds still
            return []
        return [f for f in self.files if now[f] != self.seen[f]]

    def accept(self) -> None:
        """What the last poll saw is the new baseline (a failed reload waits for a save)."""
        if self._pending is not None:
            self.seen = dict(self._pending)
        self._pending = None

    def to_env(self) -> str:
        return json.dumps({str(f): sig for f, sig in self.seen.items()})


def baseline_from_env() -> dict[str, Any] | None:
    """The signatures the previous process handed on (and removes them from the environment)."""
    text = os.environ.pop(SEEN_ENV, None)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def describe_load_error(exc: BaseException) -> str:
    """``FILE, line N: Type: message`` for what loading or building a device raised: where a
    SyntaxError points, else the innermost frame outside this package and the import
    machinery (the device's own code), else the innermost frame (none for an ImportError)."""
    while exc.__cause__ is not None and not isinstance(exc, SyntaxError):
        exc = exc.__cause__  # the ImportError "cannot import" wraps
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}, line {exc.lineno}: {type(exc).__name__}: {exc.msg}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<frozen")]
    own = [f for f in frames
           if not any(Path(f.filename).resolve().is_relative_to(d) for d in _NOT_DEVICE_CODE)]
    # an import that found nothing has no line of the device's to point at
    where = (own or ([] if isinstance(exc, ImportError) else frames))[-1:]
    place = f"{where[0].filename}, line {where[0].lineno}: " if where else ""
    return f"{place}{type(exc).__name__}: {exc}"


class Reloader:
    """Watch ``files``; on a change, upgrade the process through ``ctl``."""

    def __init__(self, ctl: ControlSocket, files: Iterable[Path],
                 baseline: Mapping[str, Any] | None = None,
                 interval: float = POLL_INTERVAL) -> None:
        self.ctl = ctl
        self.watcher = Watcher(files, baseline)
        self.interval = interval
        #: reload attempts that failed (the old code serves on)
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vfio-user-reload", daemon=True)
        names = ", ".join(str(f) for f in self.watcher.files)
        log.info("reload: watching %s (every %.1f s)", names, interval)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            changed = self.watcher.poll()
            if changed and self.reload(changed):
                return

    def reload(self, changed: list[Path]) -> bool:
        """Upgrade to the code now on disk; True once the new process serves."""
        names = ", ".join(str(f) for f in changed)
        log.info("reload: %s changed: starting a process with the new code", names)
        self.watcher.accept()
        try:
            pid = self.ctl.upgrade(env={SEEN_ENV: self.watcher.to_env()})
        except Exception as exc:
            self.failures += 1
            log.error("reload of %s failed; serving on with the code loaded before (the "
                      "next save retries): %s", names, exc)
            return False
        log.info("reload: pid %d serves the new code", pid)
        self.ctl.upgraded.set()
        return True

    def stop(self) -> None:
        self._stop.set()
