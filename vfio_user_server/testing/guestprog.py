"""Static guest programs: C sources shipped in ``vfio_user_server/testing/guest_programs/``.

:func:`guest_program` compiles one of them with the host's C compiler as a static binary
(``gcc -static -O2 -Wall -Werror``) so it runs in the busybox initramfs, and caches the result
in the provisioning cache folder by a hash of the source, the compiler's version and the flags::

    from vfio_user_server.testing.guestprog import guest_program
    vfiotest = guest_program("vfiotest")          # Path to the cached binary
    QemuMachine(files={"/bin/vfiotest": vfiotest}, ...)

A missing compiler or a missing static C library raises
:class:`~vfio_user_server.errors.ProvisioningError` saying what to install (Debian/Ubuntu:
``apt-get install gcc libc6-dev``). ``$PYVFIO_CC`` names another compiler.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from vfio_user_server.errors import ProvisioningError
from vfio_user_server.testing.provision import cache_root

__all__ = ["CFLAGS", "available_programs", "guest_program", "is_static_elf", "program_source"]

#: Flags every guest program is built with (before any extra ones).
CFLAGS: tuple[str, ...] = ("-static", "-O2", "-Wall", "-Werror")

_INSTALL_HINT = (
    "install a C compiler and the static C library (Debian/Ubuntu: apt-get install gcc libc6-dev)"
)


def _source_dir() -> Path:
    # Package data next to this module (``guest_programs/``, not importable: no __init__.py).
    return Path(str(resources.files("vfio_user_server.testing"))) / "guest_programs"


def available_programs() -> list[str]:
    """The names of the guest programs shipped with the package (``*.c`` in ``guest_programs/``)."""
    folder = _source_dir()
    return sorted(p.stem for p in folder.glob("*.c")) if folder.is_dir() else []


def program_source(name: str) -> bytes:
    """The C source of guest program ``name``."""
    path = _source_dir() / f"{name}.c"
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ProvisioningError(
            f"no guest program {name!r} ({path}); available: {', '.join(available_programs())}"
        ) from exc


def _compiler(env: Mapping[str, str]) -> str:
    cc = env.get("PYVFIO_CC") or "gcc"
    found = shutil.which(cc)
    if found is None:
        raise ProvisioningError(f"C compiler {cc!r} not found on PATH: {_INSTALL_HINT}")
    return found


def _compiler_id(cc: str) -> str:
    try:
        proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisioningError(f"cannot run {cc} --version: {exc}") from exc
    if proc.returncode != 0:
        raise ProvisioningError(f"{cc} --version failed: {proc.stderr.strip()}")
    first = proc.stdout.splitlines()[0] if proc.stdout else ""
    return f"{cc} {first}"


def is_static_elf(data: bytes) -> bool:
    """Whether ``data`` is a 64-bit little-endian ELF with no program interpreter."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            return False
        p_type, = struct.unpack_from("<I", data, off)
        if p_type == 3:  # PT_INTERP: dynamically linked
            return False
    return True


def _explain(cc: str, name: str, stderr: str) -> ProvisioningError:
    text = stderr.strip()
    if "cannot find -lc" in text or "cannot find -lgcc" in text or "crt1.o" in text:
        return ProvisioningError(
            f"building guest program {name!r} with {cc} -static failed: no static C library "
            f"({_INSTALL_HINT}):\n{text}"
        )
    if "No such file or directory" in text and ".h" in text:
        return ProvisioningError(
            f"building guest program {name!r} with {cc} failed: missing headers "
            f"({_INSTALL_HINT}; linux/vfio.h comes with linux-libc-dev):\n{text}"
        )
    return ProvisioningError(f"building guest program {name!r} with {cc} failed:\n{text}")


def guest_program(
    name: str = "vfiotest",
    *,
    extra_cflags: Sequence[str] = (),
    cache: Path | None = None,
    env: Mapping[str, str] | None = None,
    source: Path | None = None,
) -> Path:
    """Return the path of the static binary of guest program ``name``, building it if needed.

    ``source`` builds a C file outside the package (a benchmark's own tool) under ``name``.

    The binary lives in ``<cache>/guest-programs/<name>-<hash>/<name>`` (``cache`` defaults to
    :func:`~vfio_user_server.testing.provision.cache_root`); ``<hash>`` covers the source, the
    compiler's ``--version`` line and the flags, so an edited source is rebuilt.
    """
    env = os.environ if env is None else env
    text = program_source(name) if source is None else source.read_bytes()
    cc = _compiler(env)
    flags = [*CFLAGS, *extra_cflags]
    digest = hashlib.sha256()
    for part in (text, _compiler_id(cc).encode(), "\0".join(flags).encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    key = digest.hexdigest()[:16]
    root = (cache if cache is not None else cache_root(env)) / "guest-programs"
    final = root / f"{name}-{key}" / name
    if final.is_file() and is_static_elf(final.read_bytes()):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        src = tmp / f"{name}.c"
        src.write_bytes(text)
        out = tmp / name
        try:
            proc = subprocess.run(
                [cc, *flags, "-o", str(out), str(src)],
                capture_output=True,
                text=True,
                timeout=300,
                cwd=tmp,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ProvisioningError(f"cannot run {cc} for guest program {name!r}: {exc}") from exc
        if proc.returncode != 0:
            raise _explain(cc, name, proc.stderr)
        if not is_static_elf(out.read_bytes()):
            raise ProvisioningError(
                f"{cc} -static built a dynamically linked {name!r}: {_INSTALL_HINT}"
            )
        src.unlink()
        target = final.parent
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process built the same program meanwhile: use theirs.
            if not final.is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
