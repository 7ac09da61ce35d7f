"""Template snapshots: boot a guest once per setup, save it, restore it for every test.

A cold boot under TCG costs seconds, and it is the same boot for every test with the same
setup. :class:`~vfio_user_server.testing.guest.QemuMachine` therefore boots a *template*
guest once per distinct setup (without any vfio-user device: QEMU's client cannot be
migrated), waits for its command agent, stops it and saves it with QMP ``migrate`` to a
``mapped-ram`` file. Each guest then starts QEMU with ``-incoming defer``, loads that file,
resumes and hot-plugs its vfio-user devices into PCIe root ports the template provides.

This module owns the on-disk side: the key, the folder layout, creation under concurrency
and pruning. The folder is ``<cache>/snapshots/<key>/`` (``$PYVFIO_SNAPSHOT_DIR`` overrides
``<cache>/snapshots``) with

* ``ram`` — the migration stream (``mapped-ram``: RAM pages at fixed offsets, a sparse file
  about as large on disk as the RAM the guest touched);
* ``initramfs.cpio.gz`` — the initramfs the template booted (a restored QEMU loads it too,
  for a later reboot);
* ``console.log`` — the template's boot console;
* ``template.json`` — the key's inputs and figures, written last: a folder without it is
  incomplete and is never used.

The key is a SHA-256 of everything that decides what is in the snapshot: the QEMU command
line with the per-run paths replaced by placeholders (so QEMU, kernel, memory size and kind,
machine options, accelerator, root ports, kernel command line, extra arguments), the identity
of the QEMU binary and of the kernel image (path, size, mtime), and the initramfs inputs (the
/init script the kit generates, the agent, busybox, each module and each extra file by
content). A change in any of them gives another key, so a stale snapshot is never used.

Creation is safe when processes race for it (pytest-xdist workers, parallel CI jobs): the
creator holds ``<key>.lock`` (``flock``), builds in ``<key>.tmp-<pid>-<random>`` and renames
it into place; the others wait for the lock and then find the finished folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfio_user_server.errors import GuestError

__all__ = [
    "FORMAT",
    "MAX_TEMPLATES",
    "Template",
    "cache_folder",
    "file_identity",
    "get_or_create",
    "key_of",
    "prune",
]

#: Bumped when the layout or the way a template is made changes (older folders then age out).
FORMAT = 3

#: Templates kept beyond :data:`KEEP_RECENT` seconds of use: the most recently used ones.
MAX_TEMPLATES = 12
#: A template used within this many seconds is never pruned (another process may restore it).
KEEP_RECENT = 24 * 3600.0

_META = "template.json"


def cache_folder(cache_dir: Path) -> Path:
    """Where templates live: ``$PYVFIO_SNAPSHOT_DIR`` or ``<cache_dir>/snapshots``."""
    env = os.environ.get("PYVFIO_SNAPSHOT_DIR")
    return Path(env) if env else cache_dir / "snapshots"


def file_identity(path: str | os.PathLike[str]) -> list[Any]:
    """``[path, size, mtime_ns]`` of a file (what changes when it is replaced)."""
    st = os.stat(path)
    return [os.fspath(path), st.st_size, st.st_mtime_ns]


def key_of(inputs: Mapping[str, Any]) -> str:
    """The template key: SHA-256 of the canonical JSON of ``inputs`` (and :data:`FORMAT`)."""
    blob = json.dumps({"format": FORMAT, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Template:
    """A finished template folder."""

    key: str
    folder: Path

    @property
    def ram(self) -> Path:
        return self.folder / "ram"

    @property
    def initramfs(self) -> Path:
        return self.folder / "initramfs.cpio.gz"

    @property
    def console_log(self) -> Path:
        return self.folder / "console.log"

    @property
    def meta_path(self) -> Path:
        return self.folder / _META

    def meta(self) -> dict[str, Any]:
        data = json.loads(self.meta_path.read_text())
        return data if isinstance(data, dict) else {}

    def touch(self) -> None:
        """Record a use (pruning keeps the most recently used templates)."""
        with contextlib.suppress(OSError):
            os.utime(self.meta_path)

    def discard(self) -> None:
        """Remove the template (used when restoring from it failed)."""
        _remove(self.folder)


def _valid(folder: Path) -> bool:
    return (folder / _META).is_file() and (folder / "ram").is_file()


def _remove(folder: Path) -> None:
    # Rename first, so that nobody sees a half-removed folder as a template.
    trash = folder.with_name(f"{folder.name}.trash-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path, deadline: float, what: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if time.monotonic() > deadline:
                raise GuestError(f"timed out waiting for another process to create {what} "
                                 f"(lock {path})")
            time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def get_or_create(
    folder: Path,
    key: str,
    create: Callable[[Path], Mapping[str, Any]],
    *,
    timeout: float,
) -> tuple[Template, bool]:
    """The template ``key`` in ``folder``, made with ``create(tmp_folder)`` if missing.

    ``create`` fills the temporary folder (``ram``, ``initramfs.cpio.gz``, ``console.log``)
    and returns the metadata to store. Returns the template and whether this call made it.
    """
    final = folder / key
    template = Template(key, final)
    if _valid(final):
        template.touch()
        return template, False
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / f"{key}.lock", time.monotonic() + timeout, f"template {key}"):
        if _valid(final):
            template.touch()
            return template, False
        if final.exists():
            _remove(final)
        tmp = folder / f"{key}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            meta = dict(create(tmp))
            meta.setdefault("key", key)
            meta.setdefault("created", time.time())
            (tmp / _META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    prune(folder, keep=key)
    return template, True


def prune(folder: Path, *, keep: str = "", now: float | None = None) -> list[str]:
    """Remove old templates: keep those used in the last :data:`KEEP_RECENT` seconds, and
    otherwise the :data:`MAX_TEMPLATES` most recently used. Leftovers of crashed creators
    (``*.tmp-*``, ``*.trash-*`` older than an hour) go too. Returns the removed names."""
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    templates: list[tuple[float, Path]] = []
    for path in entries:
        if not path.is_dir():
            continue
        if ".tmp-" in path.name or ".trash-" in path.name:
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > 3600:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path.name)
            continue
        try:
            used = (path / _META).stat().st_mtime
        except OSError:
            used = 0.0
        templates.append((used, path))
    templates.sort(reverse=True)
    for rank, (used, path) in enumerate(templates):
        if path.name == keep or now - used < KEEP_RECENT or rank < MAX_TEMPLATES:
            continue
        _remove(path)
        removed.append(path.name)
    return removed
