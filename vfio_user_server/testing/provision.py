"""Provision QEMU (with ``vfio-user-pci``), a Debian guest kernel with its modules, and busybox.

Stdlib only. Everything downloaded lives under ``${XDG_CACHE_HOME:-~/.cache}/pyvfio-user/``
(or ``$PYVFIO_CACHE_DIR``) and a second run trusts the cache without touching the network.

How it works:

* **QEMU.** ``$PYVFIO_QEMU`` (a binary, used as is, which must have ``vfio-user-pci``), else a
  ``qemu-system-x86_64`` on ``PATH`` that has ``vfio-user-pci``, else Debian's trixie-backports
  ``qemu-system-x86``: its package closure is resolved by apt against a *private, empty* dpkg
  status and private package lists (the host's own apt state and sources are not used or
  changed), downloaded, and every package is unpacked with ``dpkg-deb -x`` into one folder. The
  binary runs through that folder's own dynamic loader and library path, so the host's (older)
  libc does not matter.
* **Guest.** Debian trixie's current ``linux-image-<release>-amd64-unsigned`` (found through the
  ``linux-image-amd64`` meta-package) and ``busybox-static``, downloaded with the same private
  apt. The uncompressed ``vmlinux`` is extracted from the bzImage (a port of Linux's
  ``scripts/extract-vmlinux``) and kept when it has a PVH entry note, so QEMU boots it directly
  (about twice as fast under TCG as the bzImage).
* **Caching.** Each part is built in a temporary folder, checked, renamed into place
  atomically, and trusted only once its ``stamp.json`` (written last) is there. A lock file keeps
  concurrent runs apart.

Run ``python -m vfio_user_server.testing.provision`` (or ``ci/provision``) to provision and
print what was found.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfio_user_server.errors import ProvisioningError
from vfio_user_server.testing.apt import (
    _extract_debs,
    _log,
    _PrivateApt,
    _run,
)
from vfio_user_server.testing.vmlinux import extract_vmlinux, pvh_entry

__all__ = [
    "MIN_QEMU_VERSION",
    "REQUIRED_MODULES",
    "Kernel",
    "Provisioned",
    "QemuInstall",
    "cache_root",
    "check_qemu",
    "extract_vmlinux",
    "main",
    "provision",
    "provision_qemu",
    "pvh_entry",
]

#: Bump when the layout or the recipe of the cache changes: older caches are then rebuilt.
RECIPE = 1
MIN_QEMU_VERSION = (10, 1)
QEMU_SUITE = "trixie-backports"
GUEST_SUITE = "trixie"
#: zstd comes along so that the bzImage (zstd-compressed on trixie) can be unpacked anywhere.
QEMU_PACKAGES = ("qemu-system-x86", "zstd")
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: Modules the project's guest tests load; provisioning checks the kernel has each of them.
REQUIRED_MODULES = ("gpio-pci-idio-16", "nvme", "uio_pci_generic", "vfio-pci")
#: Applets the init script and the command agent need.
REQUIRED_APPLETS = ("sh", "mount", "insmod", "base64", "cat", "stty", "poweroff", "reboot")


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """The cache folder: ``$PYVFIO_CACHE_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/pyvfio-user``."""
    env = os.environ if env is None else env
    if env.get("PYVFIO_CACHE_DIR"):
        return Path(env["PYVFIO_CACHE_DIR"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "pyvfio-user"


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class QemuInstall:
    """A QEMU that has ``vfio-user-pci``. Callers append their arguments to ``argv_prefix``."""

    binary: Path
    argv_prefix: list[str]
    version: str
    #: ``"PYVFIO_QEMU"``, ``"PATH"`` or ``"debian:<suite>"``.
    source: str
    #: The unpacked package tree for a downloaded QEMU, else None.
    root: Path | None = None


@dataclass(frozen=True)
class Kernel:
    """A guest kernel, its config and its modules folder (``lib/modules/<release>``)."""

    release: str
    package: str
    package_version: str
    vmlinuz: Path
    #: The uncompressed ELF kernel when it has a PVH entry note (QEMU boots it directly).
    vmlinux: Path | None
    config: Path
    modules_dir: Path

    @property
    def image(self) -> Path:
        """The image to give QEMU's ``-kernel``: ``vmlinux`` when usable, else ``vmlinuz``."""
        return self.vmlinux if self.vmlinux is not None else self.vmlinuz

    def config_value(self, option: str) -> str | None:
        """``"y"``, ``"m"``, a string, or None when ``option`` (``CONFIG_...``) is not set."""
        if not option.startswith("CONFIG_"):
            option = "CONFIG_" + option
        prefix = option + "="
        for line in self.config.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :].strip('"')
        return None


@dataclass(frozen=True)
class Provisioned:
    """Everything a guest test needs."""

    qemu: QemuInstall
    kernel: Kernel
    busybox: Path
    busybox_version: str
    cache_dir: Path
    notes: list[str] = field(default_factory=list)

    @property
    def qemu_argv_prefix(self) -> list[str]:
        return list(self.qemu.argv_prefix)

    @property
    def kernel_image(self) -> Path:
        return self.kernel.image

    @property
    def modules_dir(self) -> Path:
        return self.kernel.modules_dir

    def summary(self) -> dict[str, Any]:
        return {
            "cache_dir": str(self.cache_dir),
            "qemu": {
                "version": self.qemu.version,
                "source": self.qemu.source,
                "binary": str(self.qemu.binary),
                "argv_prefix": self.qemu.argv_prefix,
            },
            "kernel": {
                "release": self.kernel.release,
                "package": f"{self.kernel.package} {self.kernel.package_version}",
                "image": str(self.kernel.image),
                "vmlinux_pvh": self.kernel.vmlinux is not None,
                "vmlinuz": str(self.kernel.vmlinuz),
                "modules_dir": str(self.kernel.modules_dir),
            },
            "busybox": {"path": str(self.busybox), "version": self.busybox_version},
            "notes": self.notes,
        }


# --------------------------------------------------------------------------------------------
# QEMU checks

_VERSION_RE = re.compile(r"version\s+(\d+)\.(\d+)(?:\.(\d+))?")


def _qemu_version(argv_prefix: Sequence[str]) -> tuple[str, tuple[int, int]]:
    proc = _run([*argv_prefix, "-version"], "querying the QEMU version", timeout=60)
    text = proc.stdout.decode(errors="replace")
    m = _VERSION_RE.search(text)
    if m is None:
        raise ProvisioningError(
            f"cannot read a version from `{shlex.join([*argv_prefix, '-version'])}`: {text!r}"
        )
    full = ".".join(g for g in m.groups() if g is not None)
    return full, (int(m.group(1)), int(m.group(2)))


def _qemu_has_vfio_user(argv_prefix: Sequence[str]) -> bool:
    proc = _run(
        [*argv_prefix, "-machine", "none", "-device", "help"],
        "listing QEMU's devices",
        timeout=60,
    )
    return 'name "vfio-user-pci"' in proc.stdout.decode(errors="replace")


def check_qemu(argv_prefix: Sequence[str], *, what: str = "QEMU") -> str:
    """Return the version of the QEMU that ``argv_prefix`` runs; raise if it lacks vfio-user-pci.

    The error names the version found and the one needed.
    """
    version, (major, minor) = _qemu_version(argv_prefix)
    need = ".".join(map(str, MIN_QEMU_VERSION))
    if not _qemu_has_vfio_user(argv_prefix):
        older = (major, minor) < MIN_QEMU_VERSION
        why = f"it is older than {need}" if older else "it was built without vfio-user support"
        raise ProvisioningError(
            f"{what} ({shlex.join(argv_prefix)}) is QEMU {version}, which has no "
            f"'vfio-user-pci' device ({why}); QEMU >= {need} built with vfio-user is needed. "
            "Unset PYVFIO_QEMU to let pyvfio-user download Debian's trixie-backports QEMU."
        )
    return version


# --------------------------------------------------------------------------------------------
# Cache plumbing


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / "stamp.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("recipe") != RECIPE:
        return None
    return data


def _write_stamp(folder: Path, data: Mapping[str, Any]) -> None:
    tmp = folder / ".stamp.json.tmp"
    tmp.write_text(json.dumps({"recipe": RECIPE, "created": time.time(), **data}, indent=2))
    os.replace(tmp, folder / "stamp.json")


def _install_dir(
    cache: Path, name: str, build: Callable[[Path], dict[str, Any]]
) -> tuple[Path, dict[str, Any]]:
    """Build ``cache/name`` through a temporary folder; the stamp is written last."""
    final = cache / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache))
    try:
        meta = build(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_stamp(final, meta)
    return final, {"recipe": RECIPE, **meta}


class _Session:
    """One provisioning run: a lazily created private apt shared by the parts."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self._apt: _PrivateApt | None = None
        self._apt_dir: Path | None = None

    @property
    def apt(self) -> _PrivateApt:
        if self._apt is None:
            self._apt_dir = Path(tempfile.mkdtemp(prefix=".apt-", dir=self.cache))
            self._apt = _PrivateApt(self._apt_dir)
        return self._apt

    def close(self) -> None:
        if self._apt_dir is not None:
            shutil.rmtree(self._apt_dir, ignore_errors=True)
            self._apt_dir = None
            self._apt = None


# --------------------------------------------------------------------------------------------
# QEMU


def _private_qemu_prefix(root: Path) -> list[str]:
    loader = None
    for cand in ("usr/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"):
        if (root / cand).exists():
            loader = root / cand
            break
    if loader is None:
        raise ProvisioningError(f"no ld-linux-x86-64.so.2 in the unpacked QEMU tree {root}")
    libdirs = [
        str(root / d)
        for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib64", "lib64")
        if (root / d).is_dir()
    ]
    firmware: list[str] = []
    for d in ("usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu"):
        if (root / d).is_dir():
            firmware += ["-L", str(root / d)]
    return [
        str(loader),
        "--library-path",
        ":".join(libdirs),
        str(root / "usr/bin/qemu-system-x86_64"),
        *firmware,
    ]


def _private_tool_prefix(root: Path, tool: str) -> list[str] | None:
    binary = root / "usr/bin" / tool
    if not binary.exists():
        return None
    prefix = _private_qemu_prefix(root)
    return [prefix[0], prefix[1], prefix[2], str(binary)]


def _build_qemu(session: _Session, dest: Path) -> dict[str, Any]:
    apt = session.apt
    debs = apt.download_closure(QEMU_PACKAGES, QEMU_SUITE)
    size = sum(d.stat().st_size for d in debs)
    _log(f"unpacking {len(debs)} packages ({size / 1e6:.1f} MB)")
    _extract_debs(debs, dest)
    for deb in debs:
        deb.unlink()
    prefix = _private_qemu_prefix(dest)
    version = check_qemu(prefix, what="the downloaded QEMU")
    return {
        "version": version,
        "packages": sorted(d.name for d in debs),
        "download_bytes": size,
    }


def _qemu_from_env(env: Mapping[str, str]) -> QemuInstall | None:
    named = env.get("PYVFIO_QEMU")
    if named:
        path = shutil.which(named) or named
        if not os.access(path, os.X_OK):
            raise ProvisioningError(f"PYVFIO_QEMU={named} is not an executable file")
        version = check_qemu([path], what=f"PYVFIO_QEMU={named}")
        return QemuInstall(Path(path), [path], version, "PYVFIO_QEMU")
    on_path = shutil.which("qemu-system-x86_64", path=env.get("PATH"))
    if on_path:
        try:
            version = check_qemu([on_path], what=on_path)
        except ProvisioningError as exc:
            _log(f"not using {on_path}: {exc}")
            return None
        return QemuInstall(Path(on_path), [on_path], version, "PATH")
    return None


def _qemu_cached(cache: Path) -> QemuInstall | None:
    folder = cache / "qemu"
    stamp = _read_stamp(folder)
    if stamp is None:
        return None
    prefix = _private_qemu_prefix(folder)
    return QemuInstall(
        Path(prefix[3]), prefix, str(stamp["version"]), f"debian:{QEMU_SUITE}", folder
    )


def _provision_qemu(session: _Session, env: Mapping[str, str]) -> QemuInstall:
    found = _qemu_from_env(env)
    if found is not None:
        return found
    cached = _qemu_cached(session.cache)
    if cached is not None:
        return cached
    _log(f"downloading QEMU from Debian {QEMU_SUITE} into {session.cache / 'qemu'}")
    folder, stamp = _install_dir(session.cache, "qemu", lambda d: _build_qemu(session, d))
    prefix = _private_qemu_prefix(folder)
    return QemuInstall(
        Path(prefix[3]), prefix, str(stamp["version"]), f"debian:{QEMU_SUITE}", folder
    )


def provision_qemu(
    cache_dir: Path | None = None, env: Mapping[str, str] | None = None
) -> QemuInstall:
    """Find or download a QEMU with ``vfio-user-pci`` (see the module docstring)."""
    env = os.environ if env is None else env
    cache = cache_dir or cache_root(env)
    with _locked(cache):
        session = _Session(cache)
        try:
            return _provision_qemu(session, env)
        finally:
            session.close()


# --------------------------------------------------------------------------------------------
# Guest kernel and busybox


def _find_module(modules_dir: Path, name: str) -> bool:
    """True when module ``name`` exists as a file or is built in (``-`` and ``_`` equal)."""
    want = name.replace("-", "_")
    builtin = modules_dir / "modules.builtin"
    if builtin.exists():
        for line in builtin.read_text().splitlines():
            if Path(line).name.split(".ko")[0].replace("-", "_") == want:
                return True
    for path in (modules_dir / "kernel").rglob("*.ko*"):
        if path.name.split(".ko")[0].replace("-", "_") == want:
            return True
    return False


def _build_kernel(session: _Session, dest: Path, zstd_cmd: Sequence[str] | None) -> dict[str, Any]:
    apt = session.apt
    deps = apt.query(["depends", KERNEL_META_PACKAGE], f"apt-cache depends {KERNEL_META_PACKAGE}")
    m = re.search(r"Depends:\s*linux-image-(\S+)", deps)
    if m is None:
        raise ProvisioningError(f"cannot find the kernel behind {KERNEL_META_PACKAGE}: {deps!r}")
    release = m.group(1)
    package = f"linux-image-{release}-unsigned"
    version = apt.candidate(package)
    if version is None:
        package = f"linux-image-{release}"
        version = apt.candidate(package)
    if version is None:
        raise ProvisioningError(f"no candidate for linux-image-{release}[-unsigned]")
    downloads = dest / ".debs"
    (deb,) = apt.download([package], downloads)
    size = deb.stat().st_size
    _log(f"unpacking {deb.name} ({size / 1e6:.1f} MB)")
    tree = dest / ".tree"
    _extract_debs([deb], tree)
    shutil.rmtree(downloads)
    boot = tree / "boot"
    for src, dst in ((f"vmlinuz-{release}", "vmlinuz"), (f"config-{release}", "config")):
        if not (boot / src).exists():
            raise ProvisioningError(f"{package} has no /boot/{src}")
        os.rename(boot / src, dest / dst)
    mods = None
    for cand in (tree / "usr/lib/modules" / release, tree / "lib/modules" / release):
        if cand.is_dir():
            mods = cand
    if mods is None:
        raise ProvisioningError(f"{package} has no lib/modules/{release}")
    os.rename(mods, dest / "modules")
    shutil.rmtree(tree)
    missing = [n for n in REQUIRED_MODULES if not _find_module(dest / "modules", n)]
    if missing:
        raise ProvisioningError(f"kernel {release} lacks the modules {missing}")
    notes: list[str] = []
    vmlinux_ok = False
    try:
        elf = extract_vmlinux((dest / "vmlinuz").read_bytes(), zstd_cmd)
        entry = pvh_entry(elf)
        if entry is None:
            notes.append(f"vmlinux of {release} has no PVH entry note: booting the bzImage")
        else:
            (dest / "vmlinux").write_bytes(elf)
            vmlinux_ok = True
            notes.append(f"vmlinux of {release} has a PVH entry at {entry:#x}")
    except ProvisioningError as exc:
        notes.append(f"could not extract vmlinux from the bzImage ({exc}): booting the bzImage")
    for n in notes:
        _log(n)
    return {
        "release": release,
        "package": package,
        "package_version": version,
        "download_bytes": size,
        "vmlinux": vmlinux_ok,
        "notes": notes,
    }


def _kernel_from(folder: Path, stamp: Mapping[str, Any]) -> Kernel:
    return Kernel(
        release=str(stamp["release"]),
        package=str(stamp["package"]),
        package_version=str(stamp["package_version"]),
        vmlinuz=folder / "vmlinuz",
        vmlinux=(folder / "vmlinux") if stamp.get("vmlinux") else None,
        config=folder / "config",
        modules_dir=folder / "modules",
    )


def _build_busybox(session: _Session, dest: Path) -> dict[str, Any]:
    apt = session.apt
    version = apt.candidate(BUSYBOX_PACKAGE)
    downloads = dest / ".debs"
    (deb,) = apt.download([BUSYBOX_PACKAGE], downloads)
    tree = dest / ".tree"
    _extract_debs([deb], tree)
    found = [p for p in (tree / "usr/bin/busybox", tree / "bin/busybox") if p.exists()]
    if not found:
        raise ProvisioningError(f"{deb.name} has no busybox binary")
    os.rename(found[0], dest / "busybox")
    size = deb.stat().st_size
    shutil.rmtree(tree)
    shutil.rmtree(downloads)
    proc = _run([str(dest / "busybox"), "--list"], "listing busybox applets")
    applets = proc.stdout.decode().split()
    missing = [a for a in REQUIRED_APPLETS if a not in applets]
    if missing:
        raise ProvisioningError(f"busybox {version} lacks the applets {missing}")
    return {"version": version, "download_bytes": size, "applets": applets}


def _vmlinux_boots(qemu: QemuInstall, kernel: Kernel, busybox: Path) -> tuple[bool, str]:
    """Whether this QEMU boots ``kernel.vmlinux`` (PVH) to /init; cached per QEMU binary."""
    from vfio_user_server.testing.initramfs import BOOT_MARKER, build_initramfs

    assert kernel.vmlinux is not None
    record = kernel.vmlinux.parent / "vmlinux-boot.json"
    key = f"{qemu.binary}:{qemu.version}"
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(record.read_text())
        if isinstance(data, dict) and data.get("qemu") == key:
            return bool(data["ok"]), str(data.get("why", ""))
    _log(f"checking that QEMU {qemu.version} boots {kernel.vmlinux.name} (PVH) under TCG")
    with tempfile.TemporaryDirectory(prefix="pyvfio-probe-") as tmp:
        initrd = Path(tmp) / "initrd"
        initrd.write_bytes(build_initramfs(busybox, test_script="true", agent_port=None))
        console = Path(tmp) / "console"
        cmd = [
            *qemu.argv_prefix,
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-m",
            "256M",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(kernel.vmlinux),
            "-initrd",
            str(initrd),
            "-append",
            "console=ttyS0 panic=-1 rdinit=/init quiet",
            "-serial",
            f"file:{console}",
        ]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=240, check=False
            )
            err = proc.stderr.decode(errors="replace")[-500:]
        except subprocess.TimeoutExpired:
            err = "timed out after 240 s"
        text = console.read_text(errors="replace") if console.exists() else ""
        ok = BOOT_MARKER in text
        why = f"booted in {time.monotonic() - t0:.1f} s" if ok else (err or text[-500:])
    with contextlib.suppress(OSError):
        tmp_record = record.with_suffix(".tmp")
        tmp_record.write_text(json.dumps({"qemu": key, "ok": ok, "why": why}))
        os.replace(tmp_record, record)
    _log(f"vmlinux boot check: {'ok, ' if ok else 'FAILED: '}{why}")
    return ok, why


def provision(
    cache_dir: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    refresh: bool = False,
) -> Provisioned:
    """Find or download QEMU, the guest kernel with modules and busybox; idempotent.

    ``refresh=True`` rebuilds the downloaded parts even if the cache is complete.
    Raises :class:`ProvisioningError` saying what failed.
    """
    env = os.environ if env is None else env
    cache = Path(cache_dir) if cache_dir is not None else cache_root(env)
    with _locked(cache):
        if refresh:
            for name in ("qemu", "kernel", "busybox"):
                with contextlib.suppress(FileNotFoundError):
                    (cache / name / "stamp.json").unlink()
        session = _Session(cache)
        try:
            qemu = _provision_qemu(session, env)
            zstd_cmd = None
            if qemu.root is not None:
                zstd_cmd = _private_tool_prefix(qemu.root, "zstd")
            kdir = cache / "kernel"
            kstamp = _read_stamp(kdir)
            if kstamp is None:
                _log(f"downloading the guest kernel from Debian {GUEST_SUITE} into {kdir}")
                kdir, kstamp = _install_dir(
                    cache, "kernel", lambda d: _build_kernel(session, d, zstd_cmd)
                )
            bdir = cache / "busybox"
            bstamp = _read_stamp(bdir)
            if bstamp is None:
                _log(f"downloading {BUSYBOX_PACKAGE} into {bdir}")
                bdir, bstamp = _install_dir(cache, "busybox", lambda d: _build_busybox(session, d))
        finally:
            session.close()
    kernel = _kernel_from(kdir, kstamp)
    notes = [str(n) for n in kstamp.get("notes", [])]
    if kernel.vmlinux is not None:
        with _locked(cache):
            ok, why = _vmlinux_boots(qemu, kernel, bdir / "busybox")
        if not ok:
            notes.append(f"QEMU could not boot vmlinux ({why}): using vmlinuz")
            kernel = dataclasses.replace(kernel, vmlinux=None)
    for option in ("VFIO_NOIOMMU", "GPIO_PCI_IDIO_16", "PVH"):
        notes.append(f"CONFIG_{option}={kernel.config_value(option) or 'not set'}")
    return Provisioned(
        qemu=qemu,
        kernel=kernel,
        busybox=bdir / "busybox",
        busybox_version=str(bstamp["version"]),
        cache_dir=cache,
        notes=notes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vfio_user_server.testing.provision",
        description="Provision QEMU (vfio-user-pci), a guest kernel and busybox for guest tests.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: {cache_root()}")
    parser.add_argument("--refresh", action="store_true", help="download again")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        result = provision(args.cache_dir, refresh=args.refresh)
    except ProvisioningError as exc:
        print(f"provisioning failed: {exc}", file=sys.stderr)
        return 1
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        q, k = summary["qemu"], summary["kernel"]
        print(f"cache:    {summary['cache_dir']}")
        print(f"qemu:     {q['version']} ({q['source']}): {shlex.join(q['argv_prefix'])}")
        print(f"kernel:   {k['release']} ({k['package']}), image {k['image']}")
        print(f"modules:  {k['modules_dir']}")
        print(f"busybox:  {summary['busybox']['version']}: {summary['busybox']['path']}")
        for note in summary["notes"]:
            print(f"note:     {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
