"""The initramfs builder: newc structure, module dependency resolution, /init content."""

from __future__ import annotations

import gzip
import lzma
import shutil
import stat
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from vfio_user_server.errors import ProvisioningError
from vfio_user_server.testing.initramfs import (
    AGENT_READY,
    BOOT_MARKER,
    CpioArchive,
    ModuleIndex,
    build_initramfs,
    modinfo,
    normalize_module_name,
    read_cpio,
)
from vfio_user_server.testing.provision import cache_root


def fake_module(name: str, depends: str = "", softdep: str | None = None) -> bytes:
    """A minimal ELF64 relocatable with a .modinfo section, like a real .ko."""
    info = f"license=GPL\0name={name}\0depends={depends}\0".encode()
    if softdep is not None:
        info += f"softdep={softdep}\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    info_off = 64
    str_off = info_off + len(info)
    sh_off = (str_off + len(shstrtab) + 7) & ~7
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4] = 2  # ELFCLASS64
    header[5] = 1  # little endian
    header[6] = 1
    struct.pack_into("<HHI", header, 16, 1, 62, 1)  # ET_REL, x86-64
    struct.pack_into("<Q", header, 0x28, sh_off)
    struct.pack_into("<HHHHHH", header, 0x34, 64, 0, 0, 64, 3, 2)

    def sh(name_off: int, sh_type: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name_off, sh_type, 0, 0, off, size, 0, 0, 1, 0)

    body = bytes(header) + info + shstrtab
    body += b"\0" * (sh_off - len(body))
    body += sh(0, 0, 0, 0) + sh(1, 1, info_off, len(info)) + sh(10, 3, str_off, len(shstrtab))
    return body


@pytest.fixture
def modules_dir(tmp_path: Path) -> Path:
    root = tmp_path / "lib/modules/6.0.0-test"
    drivers = root / "kernel/drivers"
    (drivers / "gpio").mkdir(parents=True)
    (drivers / "misc").mkdir(parents=True)
    # top -> mid-dep (xz), leaf (gz), builtin_core (built in, no file)
    (drivers / "gpio/top-mod.ko").write_bytes(fake_module("top_mod", "mid_dep,leaf,builtin_core"))
    (drivers / "misc/mid-dep.ko.xz").write_bytes(lzma.compress(fake_module("mid_dep", "leaf")))
    gz = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    leaf = gz.compress(fake_module("leaf", "")) + gz.flush()
    (drivers / "misc/leaf.ko.gz").write_bytes(leaf)
    (drivers / "misc/soft_user.ko").write_bytes(
        fake_module("soft_user", "", softdep="pre: leaf absent_module post: mid_dep")
    )
    (drivers / "misc/cyc_a.ko").write_bytes(fake_module("cyc_a", "cyc_b"))
    (drivers / "misc/cyc_b.ko").write_bytes(fake_module("cyc_b", "cyc_a"))
    (root / "modules.builtin").write_text("kernel/drivers/base/builtin-core.ko\n")
    return root


@pytest.fixture
def fake_busybox(tmp_path: Path) -> Path:
    path = tmp_path / "busybox"
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --list-full ]; then printf "bin/sh\\nbin/ls\\nsbin/insmod\\n"; exit 0; fi\n'
        "exit 1\n"
    )
    path.chmod(0o755)
    return path


def test_cpio_round_trip() -> None:
    arc = CpioArchive()
    arc.add_file("etc/hello.txt", b"hello world", 0o640)
    arc.add_symlink("bin/sh", "/bin/busybox")
    arc.add_device("dev/console", 5, 1)
    arc.add_dir("empty", 0o700)
    arc.add_file("odd", b"x" * 5, 0o755)
    raw = arc.to_bytes()
    assert raw.startswith(b"070701")
    assert len(raw) % 4 == 0
    assert b"TRAILER!!!" in raw
    entries = {e.name: e for e in read_cpio(raw)}
    # Parents are created before their children.
    names = [e.name for e in read_cpio(raw)]
    assert names.index("etc") < names.index("etc/hello.txt")
    assert entries["etc/hello.txt"].data == b"hello world"
    assert stat.S_IMODE(entries["etc/hello.txt"].mode) == 0o640
    assert entries["etc/hello.txt"].is_file
    assert entries["bin/sh"].is_symlink and entries["bin/sh"].data == b"/bin/busybox"
    con = entries["dev/console"]
    assert stat.S_ISCHR(con.mode) and (con.rdevmajor, con.rdevminor) == (5, 1)
    assert entries["empty"].is_dir and stat.S_IMODE(entries["empty"].mode) == 0o700
    assert entries["odd"].data == b"xxxxx"
    # Distinct inode numbers, as the kernel's unpacker wants for hard-link detection.
    inos = [e.ino for e in entries.values()]
    assert len(set(inos)) == len(inos)
    # The gzip form parses to the same entries.
    assert read_cpio(arc.to_gzip()) == read_cpio(raw)


def _cpio_tool() -> list[str] | None:
    if shutil.which("cpio"):
        return ["cpio", "-t", "--quiet"]
    busybox = cache_root() / "busybox" / "busybox"
    if busybox.exists():
        return [str(busybox), "cpio", "-t"]
    return None


@pytest.mark.skipif(_cpio_tool() is None, reason="no cpio tool (GNU or busybox) to compare with")
def test_cpio_readable_by_another_cpio() -> None:
    tool = _cpio_tool()
    assert tool is not None
    arc = CpioArchive()
    arc.add_file("a/b/c.txt", b"data")
    arc.add_symlink("a/link", "b/c.txt")
    proc = subprocess.run(tool, input=arc.to_bytes(), capture_output=True, check=True)
    assert proc.stdout.decode().split() == ["a", "a/b", "a/b/c.txt", "a/link"]


def test_paths_are_normalised() -> None:
    arc = CpioArchive()
    arc.add_file("/x/../y//z", b"1")
    assert [e.name for e in arc.entries()] == ["y", "y/z"]
    with pytest.raises(ValueError):
        arc.add_file("/", b"")


def test_normalize_module_name() -> None:
    assert normalize_module_name("gpio-pci-idio-16") == "gpio_pci_idio_16"
    assert normalize_module_name("/x/y/gpio-pci-idio-16.ko.xz") == "gpio_pci_idio_16"
    assert normalize_module_name("vfio_pci.ko.zst") == "vfio_pci"


def test_modinfo_parses_elf() -> None:
    info = modinfo(fake_module("m", "a,b"))
    assert info["depends"] == ["a,b"]
    assert info["name"] == ["m"]
    with pytest.raises(ProvisioningError):
        modinfo(b"not an elf")


def test_dependency_resolution(modules_dir: Path) -> None:
    index = ModuleIndex(modules_dir)
    assert index.names() == ["cyc_a", "cyc_b", "leaf", "mid_dep", "soft_user", "top_mod"]
    # Transitive, dependencies first, each once, built-ins left out, - and _ equal.
    assert index.resolve(["top-mod"]) == ["leaf", "mid_dep", "top_mod"]
    assert index.resolve(["top_mod", "leaf", "mid-dep"]) == ["leaf", "mid_dep", "top_mod"]
    assert index.is_builtin("builtin-core") and index.has("builtin_core")
    assert index.resolve(["builtin-core"]) == []
    # softdep pre: modules that exist come first; missing ones are ignored.
    assert index.resolve(["soft-user"]) == ["leaf", "soft_user"]
    with pytest.raises(ProvisioningError, match="not found"):
        index.resolve(["no-such-module"])
    with pytest.raises(ProvisioningError, match="cycle"):
        index.resolve(["cyc_a"])


def test_build_initramfs(modules_dir: Path, fake_busybox: Path, tmp_path: Path) -> None:
    host_file = tmp_path / "tool"
    host_file.write_bytes(b"\x7fELFtool")
    host_file.chmod(0o751)
    data = build_initramfs(
        fake_busybox,
        modules_dir=modules_dir,
        modules=["top-mod"],
        module_params={"top-mod": "debug=1"},
        test_script="echo test",
        files={"usr/bin/tool": host_file, "etc/data": b"abc", "bin/x": (b"#!/bin/sh\n", 0o700)},
    )
    assert data[:2] == b"\x1f\x8b"
    entries = {e.name: e for e in read_cpio(gzip.decompress(data))}
    assert entries["bin/busybox"].data == fake_busybox.read_bytes()
    assert entries["bin/ls"].data == b"/bin/busybox" and entries["bin/ls"].is_symlink
    assert entries["sbin/insmod"].is_symlink
    for name in ("leaf", "mid_dep", "top_mod"):
        body = entries[f"lib/modules/{name}.ko"].data
        assert body.startswith(b"\x7fELF"), name  # decompressed
    init = entries["init"].data.decode()
    assert stat.S_IMODE(entries["init"].mode) == 0o755
    assert init.startswith("#!/bin/busybox sh")
    pos = [init.index(f"insmod /lib/modules/{n}.ko") for n in ("leaf", "mid_dep", "top_mod")]
    assert pos == sorted(pos)
    assert "insmod /lib/modules/top_mod.ko debug=1" in init
    assert "mount -t devtmpfs devtmpfs /dev" in init
    assert init.index("mount -t proc") < pos[0] < init.index(BOOT_MARKER)
    assert "sh /test.sh" in init and entries["test.sh"].data == b"echo test"
    assert "--install" not in init  # applet links are in the archive
    assert AGENT_READY in entries["bin/pyvfio-agent"].data.decode()
    assert entries["usr/bin/tool"].data == b"\x7fELFtool"
    assert stat.S_IMODE(entries["usr/bin/tool"].mode) == 0o751
    assert entries["etc/data"].data == b"abc"
    assert stat.S_IMODE(entries["bin/x"].mode) == 0o700
    assert stat.S_ISCHR(entries["dev/console"].mode)


def test_build_without_applet_list_installs_at_boot(tmp_path: Path) -> None:
    bb = tmp_path / "busybox"
    bb.write_bytes(b"not runnable")
    bb.chmod(0o644)
    entries = {e.name: e for e in read_cpio(build_initramfs(bb, agent_port=None))}
    init = entries["init"].data.decode()
    assert "/bin/busybox --install -s" in init
    assert "pyvfio-agent" not in init


def test_modules_need_a_modules_dir(fake_busybox: Path) -> None:
    with pytest.raises(ProvisioningError):
        build_initramfs(fake_busybox, modules=["nvme"])
