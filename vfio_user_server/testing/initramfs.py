"""Build a gzip'd newc cpio initramfs in pure Python: busybox, kernel modules, /init, files.

The initramfs holds:

* ``/bin/busybox`` and a symlink for each of its applets (from ``busybox --list-full`` when the
  binary runs on the host, else ``busybox --install -s`` at boot);
* the kernel modules a test names plus everything they depend on, found through each module's
  ``.modinfo`` ``depends=`` (and ``softdep=pre:``) strings, decompressed (``.ko.xz``,
  ``.ko.gz``, ``.ko.zst``) into ``/lib/modules/NAME.ko``;
* ``/init``: mounts proc, sysfs, devtmpfs and tmpfs, loads the modules in dependency order with
  ``insmod``, prints :data:`BOOT_MARKER` on the console, then runs the test script (and powers
  off, printing :data:`EXIT_MARKER` and its status) and/or the command agent on a serial port;
* ``/bin/pyvfio-agent``, the command agent (see :mod:`vfio_user_server.testing.guest`), and
  ``/bin/pyvfio-settle``, what the kit runs after a restore and a hot-plug (:data:`SETTLE_SCRIPT`);
* any extra files (a static test binary, scripts, data).

Module names are matched with ``-`` and ``_`` treated as equal, as the kernel does.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shlex
import shutil
import stat
import struct
import subprocess
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vfio_user_server.errors import ProvisioningError

__all__ = [
    "AGENT_READY",
    "BOOT_MARKER",
    "EXIT_MARKER",
    "CpioArchive",
    "CpioEntry",
    "ModuleIndex",
    "build_initramfs",
    "modinfo",
    "normalize_module_name",
    "read_cpio",
]

BOOT_MARKER = "PYVFIO-BOOTED"
EXIT_MARKER = "PYVFIO-EXIT"
AGENT_READY = "PYVFIO-AGENT-READY"
AGENT_BEGIN = "PYVFIO-BEGIN"
AGENT_END = "PYVFIO-END"

FileSource = bytes | str | Path | tuple[bytes, int]

# --------------------------------------------------------------------------------------------
# cpio (newc)

_NEWC_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0
    ino: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioArchive:
    """An ordered set of entries written as a newc archive. Parent folders are added for you."""

    def __init__(self) -> None:
        self._entries: dict[str, CpioEntry] = {}

    @staticmethod
    def _clean(path: str) -> str:
        name = os.path.normpath("/" + path).lstrip("/")
        if not name or name == ".":
            raise ValueError(f"bad archive path {path!r}")
        return name

    def _parents(self, name: str) -> None:
        parent = os.path.dirname(name)
        if parent and parent not in self._entries:
            self._parents(parent)
            self._entries[parent] = CpioEntry(parent, stat.S_IFDIR | 0o755, nlink=2)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = self._clean(path)
        self._parents(name)
        self._entries[name] = CpioEntry(name, stat.S_IFDIR | (mode & 0o7777), nlink=2)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        name = self._clean(path)
        self._parents(name)
        self._entries[name] = CpioEntry(name, stat.S_IFREG | (mode & 0o7777), bytes(data))

    def add_symlink(self, path: str, target: str) -> None:
        name = self._clean(path)
        self._parents(name)
        self._entries[name] = CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, path: str, major: int, minor: int, *, char: bool = True) -> None:
        name = self._clean(path)
        self._parents(name)
        kind = stat.S_IFCHR if char else stat.S_IFBLK
        self._entries[name] = CpioEntry(name, kind | 0o600, rdevmajor=major, rdevminor=minor)

    def __contains__(self, path: str) -> bool:
        return self._clean(path) in self._entries

    def entries(self) -> list[CpioEntry]:
        return list(self._entries.values())

    def to_bytes(self) -> bytes:
        """The uncompressed newc archive, ending with the TRAILER!!! entry."""
        out = bytearray()
        for ino, entry in enumerate([*self._entries.values(), None], start=1):
            if entry is None:
                entry = CpioEntry(_TRAILER, 0, nlink=1)
                ino = 0
            name = entry.name.encode() + b"\0"
            fields = (
                ino,
                entry.mode,
                entry.uid,
                entry.gid,
                entry.nlink,
                entry.mtime,
                len(entry.data),
                0,  # devmajor
                0,  # devminor
                entry.rdevmajor,
                entry.rdevminor,
                len(name),
                0,  # check
            )
            out += _NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
            out += name + b"\0" * _pad4(110 + len(name))
            out += entry.data + b"\0" * _pad4(len(entry.data))
        return bytes(out)

    def to_gzip(self, level: int = 6) -> bytes:
        return gzip.compress(self.to_bytes(), compresslevel=level, mtime=0)


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive (gzip'd or not) back into entries, without the trailer."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if data[pos : pos + 6] != _NEWC_MAGIC:
            raise ValueError(f"bad newc magic at offset {pos}: {data[pos : pos + 6]!r}")
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, filesize = f[:7]
        rdevmajor, rdevminor, namesize = f[9], f[10], f[11]
        name_at = pos + 110
        name = data[name_at : name_at + namesize - 1].decode()
        pos = name_at + namesize + _pad4(110 + namesize)
        body = data[pos : pos + filesize]
        pos += filesize + _pad4(filesize)
        if name == _TRAILER:
            return entries
        entries.append(
            CpioEntry(name, mode, body, uid, gid, nlink, mtime, rdevmajor, rdevminor, ino)
        )


# --------------------------------------------------------------------------------------------
# Kernel modules


def normalize_module_name(name: str) -> str:
    """``gpio-pci-idio-16`` and ``gpio_pci_idio_16.ko.xz`` both give ``gpio_pci_idio_16``."""
    base = os.path.basename(name)
    for suffix in (".ko.xz", ".ko.gz", ".ko.zst", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _zstd_decompress(data: bytes) -> bytes:
    try:
        from compression import zstd  # type: ignore[import-not-found,unused-ignore]

        out: bytes = zstd.decompress(data)
        return out
    except ImportError:
        pass
    tool = shutil.which("zstd")
    if tool is None:
        raise ProvisioningError("a .ko.zst module needs the `zstd` tool to be decompressed")
    proc = subprocess.run(
        [tool, "-q", "-d", "-c"], input=data, capture_output=True, check=False, timeout=120
    )
    if proc.returncode != 0:
        raise ProvisioningError(f"zstd failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def read_module(path: Path) -> bytes:
    """The uncompressed bytes of a ``.ko``, ``.ko.xz``, ``.ko.gz`` or ``.ko.zst`` file."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    if path.name.endswith(".zst"):
        return _zstd_decompress(data)
    return data


def _elf_section(data: bytes, wanted: str) -> bytes | None:
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    endian = "<" if data[5] == 1 else ">"
    shoff = struct.unpack_from(endian + "Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", data, 0x3A)
    if shoff == 0 or shnum == 0 or shstrndx >= shnum:
        return None

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        sh_name = struct.unpack_from(endian + "I", data, base)[0]
        sh_offset, sh_size = struct.unpack_from(endian + "QQ", data, base + 0x18)
        return sh_name, sh_offset, sh_size

    _, str_off, str_size = header(shstrndx)
    strtab = data[str_off : str_off + str_size]
    for i in range(shnum):
        name_off, off, size = header(i)
        end = strtab.find(b"\0", name_off)
        if strtab[name_off:end].decode(errors="replace") == wanted:
            return data[off : off + size]
    return None


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The key/value strings of a module's ``.modinfo`` section (keys may repeat)."""
    section = _elf_section(data, ".modinfo")
    if section is None:
        raise ProvisioningError("not an ELF64 kernel module with a .modinfo section")
    info: dict[str, list[str]] = {}
    for raw in section.split(b"\0"):
        if b"=" not in raw:
            continue
        key, _, value = raw.decode(errors="replace").partition("=")
        info.setdefault(key, []).append(value)
    return info


def _softdep_pre(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        words = value.split()
        mode = None
        for word in words:
            if word.endswith(":"):
                mode = word[:-1]
            elif mode == "pre":
                out.append(word)
    return out


@dataclass
class ModuleIndex:
    """The modules of one kernel: ``modules_dir`` is ``lib/modules/<release>``."""

    modules_dir: Path
    _paths: dict[str, Path] = field(default_factory=dict, init=False, repr=False)
    _builtin: set[str] = field(default_factory=set, init=False, repr=False)
    _deps: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        root = self.modules_dir
        if not root.is_dir():
            raise ProvisioningError(f"no modules folder {root}")
        for path in sorted(root.rglob("*.ko*")):
            if path.name.endswith((".ko", ".ko.xz", ".ko.gz", ".ko.zst")):
                self._paths.setdefault(normalize_module_name(path.name), path)
        builtin = root / "modules.builtin"
        if builtin.exists():
            for line in builtin.read_text().splitlines():
                if line.strip():
                    self._builtin.add(normalize_module_name(line.strip()))

    def names(self) -> list[str]:
        return sorted(self._paths)

    def is_builtin(self, name: str) -> bool:
        return normalize_module_name(name) in self._builtin

    def path(self, name: str) -> Path:
        key = normalize_module_name(name)
        try:
            return self._paths[key]
        except KeyError:
            raise ProvisioningError(
                f"kernel module {name!r} not found in {self.modules_dir}"
            ) from None

    def has(self, name: str) -> bool:
        key = normalize_module_name(name)
        return key in self._paths or key in self._builtin

    def dependencies(self, name: str) -> list[str]:
        """Direct dependencies (``depends=`` then ``softdep`` pre-modules that exist)."""
        key = normalize_module_name(name)
        if key not in self._deps:
            info = modinfo(read_module(self.path(key)))
            deps = [d for v in info.get("depends", []) for d in v.split(",") if d]
            soft = [d for d in _softdep_pre(info.get("softdep", [])) if self.has(d)]
            seen: list[str] = []
            for dep in [*soft, *deps]:
                norm = normalize_module_name(dep)
                if norm not in seen and norm != key:
                    seen.append(norm)
            self._deps[key] = seen
        return list(self._deps[key])

    def resolve(self, names: Sequence[str]) -> list[str]:
        """``names`` and their dependencies, transitively, in load order (dependencies first).

        Built-in modules are left out. A dependency cycle raises ProvisioningError.
        """
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = visiting, 2 = done

        def visit(name: str, chain: tuple[str, ...]) -> None:
            key = normalize_module_name(name)
            if state.get(key) == 2:
                return
            if state.get(key) == 1:
                raise ProvisioningError(f"module dependency cycle: {' -> '.join((*chain, key))}")
            if key in self._builtin and key not in self._paths:
                state[key] = 2
                return
            state[key] = 1
            for dep in self.dependencies(key):
                visit(dep, (*chain, key))
            state[key] = 2
            order.append(key)

        for n in names:
            visit(n, ())
        return order


# --------------------------------------------------------------------------------------------
# /init and the agent

AGENT_SCRIPT = f"""#!/bin/sh
# pyvfio-user command agent. Reads "<id> <timeout> <lines> <tag>" and then <lines> lines of a
# script on a serial port, runs the script (its stdout and stderr into a file) and answers
# "{AGENT_BEGIN} <id> <tag>", the output as it is, a newline, "{AGENT_END} <id> <tag> <status>".
# A fork costs ~20 ms of guest CPU under TCG, an exec as much: builtins only; the script runs
# in a subshell (no exec), a watchdog started once kills it at its timeout (timeout(1) costs
# three forks and two execs), and cat copies the output only when there is some. Each command
# has an output file of its own (what it leaves running cannot write into the next one's).
port=${{1:-/dev/ttyS1}}
stty -F "$port" raw -echo 2>/dev/null
mkfifo /tmp/.agent-wd
# The watchdog: reads "<pid> <seconds>" (0 0: cancel) and kills <pid> when the seconds pass
# before the next request. Its read timeout is the timer: it never polls.
(
    exec 3<>/tmp/.agent-wd
    w=0 s=
    while :; do
        if [ "$w" -eq 0 ]; then
            read -r w s <&3
        elif ! read -r -t "$s" w s <&3; then
            kill -KILL "$w" 2>/dev/null
            w=0
        fi
    done
) </dev/null >/dev/null 2>&1 &
exec 4<>/tmp/.agent-wd
exec <"$port" >"$port" 2>&1
echo "{AGENT_READY}"
while read -r _id _tmo _n _tag; do
    [ -n "$_tag" ] || continue
    while [ "$_n" -gt 0 ] && IFS= read -r _line; do
        printf '%s\\n' "$_line"
        _n=$((_n - 1))
    done >/tmp/.agent-cmd
    [ $((_id % 32)) -eq 0 ] && rm -f /tmp/.agent-out.*
    _out=/tmp/.agent-out.$_id
    (
        exec 4>&-
        unset _id _tmo _n _tag _line _pid _st _out port
        . /tmp/.agent-cmd
    ) </dev/null >"$_out" 2>&1 &
    _pid=$!
    [ "$_tmo" -gt 0 ] 2>/dev/null && echo "$_pid $_tmo" >&4
    wait "$_pid"
    _st=$?
    [ "$_tmo" -gt 0 ] 2>/dev/null && echo "0 0" >&4
    echo "{AGENT_BEGIN} $_id $_tag"
    [ -s "$_out" ] && cat "$_out"
    printf '\\n%s %s %s %s\\n' "{AGENT_END}" "$_id" "$_tag" "$_st"
done
"""


SETTLE_SCRIPT = """\
# pyvfio-settle NOW SEED PORT... (sourced by an agent command: builtins only, one date).
# Sets the wall clock to NOW (seconds since the epoch), mixes SEED (host entropy) into the
# kernel's pool (a restored guest's vmgenid has already made Linux reseed), then rescans the
# bus behind each root port PORT (0000:00:10.0): when the write returns, the kernel has
# enumerated the hot-plugged device, assigned its BARs and probed its driver (acpiphp would do
# the same on its own a moment later; a second scan of the slot finds nothing new).
# "-" skips the clock or the seed.
[ "$1" = - ] || date -u -s "@$1" >/dev/null || echo "pyvfio: cannot set the clock"
[ "$2" = - ] || printf %s "$2" >/dev/urandom
shift 2
pyvfio_rc=0
for pyvfio_rp; do
    for pyvfio_bus in /sys/bus/pci/devices/$pyvfio_rp/pci_bus/*; do
        echo 1 >"$pyvfio_bus/rescan"
    done
    set -- /sys/bus/pci/devices/$pyvfio_rp/????:??:00.0
    if [ ! -e "$1" ]; then
        echo "pyvfio: root port $pyvfio_rp has no device after a rescan"
        pyvfio_rc=1
    fi
done
exit $pyvfio_rc
"""


def init_script(
    modules: Sequence[str],
    module_params: Mapping[str, str],
    *,
    test_script: bool,
    agent_port: str | None,
    install_applets: bool,
) -> str:
    lines = [
        "#!/bin/busybox sh",
        "export PATH=/sbin:/bin:/usr/sbin:/usr/bin",
        "export HOME=/root",
    ]
    if install_applets:
        lines.append("/bin/busybox --install -s")
    lines += [
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
        "mkdir -p /dev/pts /dev/shm",
        "mount -t devpts devpts /dev/pts",
        "mount -t tmpfs tmpfs /tmp",
        "mount -t tmpfs tmpfs /run",
        "mount -t tmpfs tmpfs /dev/shm",
        "[ -d /sys/kernel/debug ] && mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null",
        "ln -sf /proc/self/fd /dev/fd 2>/dev/null",
        "hostname pyvfio-guest",
    ]
    for mod in modules:
        params = module_params.get(mod, "")
        lines.append(
            f"insmod /lib/modules/{mod}.ko {params} || echo 'pyvfio: insmod {mod} failed'".replace(
                "  ", " "
            )
        )
    lines.append(f"echo {BOOT_MARKER}")
    if agent_port is not None:
        bg = " &" if test_script else ""
        lines.append(f"/bin/pyvfio-agent {shlex.quote(agent_port)}{bg}")
        if not test_script:
            lines.append("echo 'pyvfio: agent exited'")
    if test_script:
        lines += [
            "cd /",
            "sh /test.sh",
            "status=$?",
            f'echo "{EXIT_MARKER} $status"',
        ]
    lines += ["sync", "poweroff -f", "sleep 1000", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Building


def _busybox_applets(busybox: Path) -> list[str] | None:
    try:
        proc = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, timeout=30, check=False
        )
    except OSError:
        return None
    if proc.returncode != 0:
        return None
    return [line.strip() for line in proc.stdout.decode().splitlines() if line.strip()]


_APPLETS_CACHE: dict[tuple[str, float], list[str] | None] = {}


def build_initramfs(
    busybox: Path,
    *,
    modules_dir: Path | None = None,
    modules: Sequence[str] = (),
    module_params: Mapping[str, str] | None = None,
    test_script: str | None = None,
    agent_port: str | None = "/dev/ttyS1",
    files: Mapping[str, FileSource] | None = None,
    compress: bool = True,
) -> bytes:
    """Build the initramfs and return its bytes (gzip'd newc unless ``compress=False``).

    ``files`` maps a path in the guest to bytes, to a host file (copied with its mode), or to
    ``(bytes, mode)``. ``module_params`` maps a module name to its insmod parameters.
    """
    archive = CpioArchive()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "root"):
        archive.add_dir(d)
    archive.add_dir("etc")
    archive.add_dir("lib/modules")
    archive.add_device("dev/console", 5, 1)
    archive.add_device("dev/null", 1, 3)
    archive.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    st = busybox.stat()
    key = (str(busybox), st.st_mtime)
    if key not in _APPLETS_CACHE:
        _APPLETS_CACHE[key] = _busybox_applets(busybox)
    applets = _APPLETS_CACHE[key]
    if applets:
        for full in applets:
            if full.lstrip("/") != "bin/busybox":
                archive.add_symlink(full, "/bin/busybox")
    archive.add_symlink("bin/sh", "/bin/busybox")
    archive.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    archive.add_file("etc/group", b"root:x:0:\n")

    params = {normalize_module_name(k): v for k, v in (module_params or {}).items()}
    order: list[str] = []
    if modules:
        if modules_dir is None:
            raise ProvisioningError("modules were asked for but no modules_dir was given")
        index = ModuleIndex(modules_dir)
        order = index.resolve(modules)
        for name in order:
            archive.add_file(f"lib/modules/{name}.ko", read_module(index.path(name)), 0o644)
    if test_script is not None:
        archive.add_file("test.sh", test_script.encode(), 0o755)
    archive.add_file("bin/pyvfio-agent", AGENT_SCRIPT.encode(), 0o755)
    archive.add_file("bin/pyvfio-settle", SETTLE_SCRIPT.encode(), 0o644)
    for path, src in (files or {}).items():
        if isinstance(src, tuple):
            archive.add_file(path, src[0], src[1])
        elif isinstance(src, bytes):
            archive.add_file(path, src, 0o644)
        else:
            host = Path(src)
            archive.add_file(path, host.read_bytes(), host.stat().st_mode & 0o7777)
    archive.add_file(
        "init",
        init_script(
            order,
            params,
            test_script=test_script is not None,
            agent_port=agent_port,
            install_applets=not applets,
        ).encode(),
        0o755,
    )
    return archive.to_gzip() if compress else archive.to_bytes()
