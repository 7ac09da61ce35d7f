"""The private apt that provisioning fetches Debian packages with, and the command runner it
uses (for :mod:`.provision`).

:class:`_PrivateApt` runs the host's ``apt-get`` with a private, empty dpkg status and private
package lists and sources (:data:`APT_SUITES` of :data:`DEBIAN_MIRROR`, signed by the Debian
archive keyring): the host's own apt state and sources are not used or changed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from vfio_user_server.errors import ProvisioningError

DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_COMPONENT = "main"
APT_SUITES = ("trixie", "trixie-backports")
KEYRINGS = (
    "/usr/share/keyrings/debian-archive-keyring.pgp",
    "/usr/share/keyrings/debian-archive-keyring.gpg",
)

_log_lock = threading.Lock()


def _log(message: str, stream: TextIO | None = None) -> None:
    with _log_lock:
        print(f"pyvfio-user provision: {message}", file=stream or sys.stderr, flush=True)

def _fail(what: str, cmd: Sequence[str], returncode: int | None, stderr: str) -> ProvisioningError:
    status = "timed out" if returncode is None else f"exited with status {returncode}"
    stderr = stderr.strip()
    if len(stderr) > 4000:
        stderr = "...\n" + stderr[-4000:]
    return ProvisioningError(
        f"{what} failed: `{shlex.join(cmd)}` {status}\n--- stderr ---\n{stderr or '(empty)'}"
    )


def _run(
    cmd: Sequence[str],
    what: str,
    *,
    cwd: Path | None = None,
    timeout: float = 600,
    check: bool = True,
    input_bytes: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,
            input=input_bytes,
            stdin=None if input_bytes is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ProvisioningError(f"{what} failed: `{cmd[0]}` not found ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if exc.stderr else ""
        raise _fail(what, cmd, None, err) from exc
    if check and proc.returncode != 0:
        raise _fail(what, cmd, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc

def _keyring() -> str:
    for path in KEYRINGS:
        if os.path.exists(path):
            return path
    raise ProvisioningError(
        "no Debian archive keyring found (looked for " + ", ".join(KEYRINGS) + "); "
        "install the 'debian-archive-keyring' package"
    )


_GET_RE = re.compile(r"^Get:\d+\s+\S+\s+\S+\s+\S+\s+(\S+)\s+\S+\s+(\S+)\s+\[([^\]]+)\]")
_FETCH_FAIL_RE = re.compile(r"Failed to fetch (\S+)")


class _PrivateApt:
    """apt with its own lists, cache, sources and an empty dpkg status: the host is untouched."""

    def __init__(self, root: Path, mirror: str = DEBIAN_MIRROR) -> None:
        for tool in ("apt-get", "apt-cache", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise ProvisioningError(
                    f"`{tool}` is not on PATH: provisioning downloads Debian packages with apt "
                    "and needs a Debian-like host (or set PYVFIO_QEMU to a QEMU >= 10.1)"
                )
        self.root = root
        keyring = _keyring()
        (root / "state" / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "parts").mkdir(parents=True, exist_ok=True)
        (root / "state" / "status").write_text("")
        (root / "etc" / "preferences").write_text("")
        lines = [
            f"deb [signed-by={keyring}] {mirror} {suite} {DEBIAN_COMPONENT}\n"
            for suite in APT_SUITES
        ]
        (root / "etc" / "sources.list").write_text("".join(lines))
        self.updated = False

    def options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::State": r / "state",
            "Dir::State::status": r / "state" / "status",
            "Dir::Etc::SourceList": r / "etc" / "sources.list",
            "Dir::Etc::SourceParts": r / "etc" / "parts",
            "Dir::Etc::Preferences": r / "etc" / "preferences",
            "Dir::Etc::PreferencesParts": r / "etc" / "parts",
            "Dir::Cache": r / "cache",
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
            "Debug::NoLocking": "1",
            "APT::Architecture": "amd64",
            "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
            "APT::Get::List-Cleanup": "0",
        }
        out: list[str] = []
        for key, value in opts.items():
            if key == "APT::Sandbox::User" and not value:
                continue
            out += ["-o", f"{key}={value}"]
        return out

    def update(self) -> None:
        if self.updated:
            return
        _log(f"apt update (private lists: {', '.join(APT_SUITES)} from {DEBIAN_MIRROR})")
        cmd = ["apt-get", *self.options(), "-q", "update"]
        proc = _run(cmd, "apt update of the private package lists", timeout=600)
        err = proc.stderr.decode(errors="replace")
        if re.search(r"^(E:|W: Failed to fetch|Err:)", err, re.M):
            raise _fail("apt update of the private package lists", cmd, proc.returncode, err)
        self.updated = True

    def query(self, args: Sequence[str], what: str) -> str:
        self.update()
        proc = _run(["apt-cache", *self.options(), *args], what, timeout=300)
        return proc.stdout.decode(errors="replace")

    def candidate(self, package: str) -> str | None:
        text = self.query(["policy", package], f"apt-cache policy {package}")
        m = re.search(r"^\s*Candidate:\s*(\S+)", text, re.M)
        if m is None or m.group(1) == "(none)":
            return None
        return m.group(1)

    def _stream(self, cmd: list[str], what: str, cwd: Path | None = None) -> None:
        """Run an apt download command, printing a progress line for every package fetched."""
        self.update()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        assert proc.stdout is not None and proc.stderr is not None
        err_chunks: list[str] = []
        stderr = proc.stderr
        reader = threading.Thread(target=lambda: err_chunks.append(stderr.read()), daemon=True)
        reader.start()
        for line in proc.stdout:
            m = _GET_RE.match(line)
            if m:
                _log(f"downloading {m.group(1)} {m.group(2)} [{m.group(3)}]")
        try:
            rc = proc.wait(timeout=1200)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
        reader.join(timeout=10)
        err = "".join(err_chunks)
        failed = _FETCH_FAIL_RE.findall(err)
        if rc != 0 or failed or re.search(r"^E:", err, re.M):
            names = sorted({Path(url).name.split("_")[0] for url in failed})
            label = f"{what} (package(s): {', '.join(names)})" if names else what
            raise _fail(label, cmd, rc, err)

    def download_closure(self, packages: Sequence[str], target_release: str) -> list[Path]:
        """Download ``packages`` and everything they depend on (no recommends)."""
        archives = self.root / "cache" / "archives"
        cmd = [
            "apt-get",
            *self.options(),
            "-y",
            "--no-install-recommends",
            "--download-only",
            "-t",
            target_release,
            "install",
            *packages,
        ]
        what = f"downloading {' '.join(packages)} and dependencies from {target_release}"
        self._stream(cmd, what)
        debs = sorted(archives.glob("*.deb"))
        if not debs:
            raise ProvisioningError(f"apt downloaded nothing for {' '.join(packages)}")
        return debs

    def download(self, packages: Sequence[str], dest: Path) -> list[Path]:
        """Download exactly ``packages`` (no dependencies) into ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.deb"))
        cmd = ["apt-get", *self.options(), "download", *packages]
        self._stream(cmd, f"downloading {' '.join(packages)}", cwd=dest)
        debs = sorted(set(dest.glob("*.deb")) - before)
        if len(debs) != len(packages):
            raise ProvisioningError(
                f"apt-get download {' '.join(packages)} produced {[d.name for d in debs]}"
            )
        return debs


def _extract_debs(debs: Sequence[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(dest)], f"unpacking {deb.name}", timeout=600)
