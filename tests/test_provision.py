"""Provisioning: QEMU checks, cache idempotence and atomicity, vmlinux extraction, errors.

The tests that need the real provisioned files fail (never skip) when provisioning fails.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import time
from pathlib import Path

import pytest

from vfio_user_server.errors import ProvisioningError
from vfio_user_server.testing import apt as apt_mod
from vfio_user_server.testing import provision as prov_mod
from vfio_user_server.testing.provision import (
    Provisioned,
    cache_root,
    check_qemu,
    extract_vmlinux,
    provision,
    provision_qemu,
    pvh_entry,
)


def fake_qemu(tmp_path: Path, version: str, vfio_user: bool, name: str = "qemu") -> Path:
    devices = 'name "vfio-pci", bus PCI, desc "VFIO-based PCI device assignment"\n'
    if vfio_user:
        devices += 'name "vfio-user-pci", bus PCI, desc "VFIO over socket PCI device"\n'
    script = tmp_path / name
    script.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do\n'
        '  if [ "$a" = -version ]; then\n'
        f'    echo "QEMU emulator version {version} (Debian)"; exit 0\n'
        "  fi\n"
        "done\n"
        f"cat <<'EOF'\n{devices}EOF\n"
    )
    script.chmod(0o755)
    return script


def test_cache_root_honours_env(tmp_path: Path) -> None:
    assert cache_root({"PYVFIO_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "pyvfio-user"
    assert cache_root({}) == Path.home() / ".cache" / "pyvfio-user"


def test_qemu_without_vfio_user_is_a_clear_error(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, "7.2.19", vfio_user=False)
    env = {"PYVFIO_QEMU": str(qemu), "PATH": os.environ["PATH"]}
    with pytest.raises(ProvisioningError) as err:
        provision_qemu(tmp_path / "cache", env=env)
    message = str(err.value)
    assert "7.2.19" in message
    assert "10.1" in message
    assert "vfio-user-pci" in message
    assert "PYVFIO_QEMU" in message


def test_new_qemu_built_without_vfio_user_says_so(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, "10.2.0", vfio_user=False)
    with pytest.raises(ProvisioningError, match="without vfio-user support"):
        check_qemu([str(qemu)])


def test_pyvfio_qemu_with_vfio_user_is_used_as_is(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, "10.1.1", vfio_user=True)
    found = provision_qemu(tmp_path / "cache", env={"PYVFIO_QEMU": str(qemu), "PATH": ""})
    assert found.argv_prefix == [str(qemu)]
    assert found.version == "10.1.1"
    assert found.source == "PYVFIO_QEMU"
    assert not (tmp_path / "cache" / "qemu").exists()


def test_qemu_on_path_is_used_only_with_vfio_user(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    fake_qemu(good, "11.0.0", vfio_user=True, name="qemu-system-x86_64")
    found = prov_mod._qemu_from_env({"PATH": str(good)})
    assert found is not None and found.source == "PATH" and found.version == "11.0.0"
    old = tmp_path / "old"
    old.mkdir()
    fake_qemu(old, "7.2.0", vfio_user=False, name="qemu-system-x86_64")
    # An old QEMU on PATH is passed over (provisioning then downloads one).
    assert prov_mod._qemu_from_env({"PATH": str(old)}) is None


def test_install_dir_is_atomic(tmp_path: Path) -> None:
    def broken(dest: Path) -> dict[str, object]:
        (dest / "half-made").write_text("x")
        raise ProvisioningError("download failed")

    with pytest.raises(ProvisioningError):
        prov_mod._install_dir(tmp_path, "part", broken)
    assert list(tmp_path.iterdir()) == []  # neither the final folder nor the temporary one

    # A folder without a stamp (a crash before the stamp) is not trusted, and is replaced.
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "stale").write_text("old")
    assert prov_mod._read_stamp(tmp_path / "part") is None

    def good(dest: Path) -> dict[str, object]:
        (dest / "file").write_text("new")
        return {"version": "1"}

    folder, meta = prov_mod._install_dir(tmp_path, "part", good)
    assert sorted(p.name for p in folder.iterdir()) == ["file", "stamp.json"]
    stamp = prov_mod._read_stamp(folder)
    assert stamp is not None and stamp["version"] == "1" and meta["version"] == "1"
    # A stamp from another recipe is not trusted either.
    data = json.loads((folder / "stamp.json").read_text())
    data["recipe"] = -1
    (folder / "stamp.json").write_text(json.dumps(data))
    assert prov_mod._read_stamp(folder) is None


def test_failed_apt_names_the_command_and_stderr(tmp_path: Path) -> None:
    # Port 9 (discard) on loopback: nothing listens there, apt fails at once.
    apt = apt_mod._PrivateApt(tmp_path / "apt", mirror="http://127.0.0.1:9/debian")
    with pytest.raises(ProvisioningError) as err:
        apt.update()
    message = str(err.value)
    assert "apt update" in message
    assert "apt-get" in message and "update" in message
    assert "stderr" in message and "127.0.0.1" in message


def _elf_with_pvh(entry: int | None) -> bytes:
    notes = b""
    if entry is not None:
        desc = struct.pack("<I", entry)
        notes = struct.pack("<III", 4, len(desc), 18) + b"Xen\0" + desc
    other = struct.pack("<III", 4, 4, 1) + b"GNU\0" + b"abcd"
    notes = other + notes
    ph_off = 64
    note_off = ph_off + 56
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1
    struct.pack_into("<HHI", header, 16, 2, 62, 1)
    struct.pack_into("<Q", header, 0x20, ph_off)
    struct.pack_into("<HH", header, 0x36, 56, 1)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 4)
    return bytes(header) + phdr + notes + b"\0" * 64


def _fake_bzimage(payload: bytes, with_header: bool) -> bytes:
    setup_sects = 3
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    if with_header:
        image[0x202:0x206] = b"HdrS"
        struct.pack_into("<H", image, 0x206, 0x20F)
    pm = bytearray(b"\x90" * 100)
    offset = len(pm)
    compressed = gzip.compress(payload, mtime=0)
    pm += compressed + struct.pack("<I", len(payload))  # the kernel appends the size
    if with_header:
        struct.pack_into("<II", image, 0x248, offset, len(compressed) + 4)
    return bytes(image + pm + b"\0" * 32)


@pytest.mark.parametrize("with_header", [True, False])
def test_extract_vmlinux_from_fake_bzimage(with_header: bool) -> None:
    elf = _elf_with_pvh(0x1000B20)
    out = extract_vmlinux(_fake_bzimage(elf, with_header))
    assert out.startswith(elf)
    assert pvh_entry(out) == 0x1000B20


def test_pvh_entry() -> None:
    assert pvh_entry(_elf_with_pvh(0x123456)) == 0x123456
    assert pvh_entry(_elf_with_pvh(None)) is None
    assert pvh_entry(b"MZ not an elf") is None


def test_extract_vmlinux_without_payload() -> None:
    with pytest.raises(ProvisioningError):
        extract_vmlinux(b"\0" * 4096)


# -------------------------------------------------------------------------------------------
# With the real cache (provisioning failures fail these tests; they never skip).


@pytest.fixture(scope="module")
def provisioned() -> Provisioned:
    return provision()


def test_provision_result(provisioned: Provisioned) -> None:
    p = provisioned
    assert p.qemu_argv_prefix[0]
    assert check_qemu(p.qemu_argv_prefix) == p.qemu.version
    assert p.kernel_image.exists() and p.kernel.vmlinuz.exists()
    assert (p.modules_dir / "modules.builtin").exists()
    assert os.access(p.busybox, os.X_OK)
    if p.kernel.vmlinux is not None:
        assert pvh_entry(p.kernel.vmlinux.read_bytes()) is not None
    assert p.kernel.config_value("CONFIG_PVH") == "y"
    assert p.kernel.config_value("GPIO_PCI_IDIO_16") in ("y", "m")
    assert p.kernel.config_value("CONFIG_NO_SUCH_OPTION") is None
    json.dumps(p.summary())


def test_provision_is_idempotent_and_offline(
    provisioned: Provisioned, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_apt(*args: object, **kwargs: object) -> None:
        raise AssertionError("a complete cache must not run apt")

    monkeypatch.setattr(apt_mod._PrivateApt, "__init__", no_apt)
    t0 = time.monotonic()
    again = provision(provisioned.cache_dir)
    assert time.monotonic() - t0 < 10
    assert again.qemu_argv_prefix == provisioned.qemu_argv_prefix
    assert again.kernel == provisioned.kernel
    assert again.busybox == provisioned.busybox


def test_cli_prints_summary(provisioned: Provisioned, capsys: pytest.CaptureFixture[str]) -> None:
    assert prov_mod.main(["--json", "--cache-dir", str(provisioned.cache_dir)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kernel"]["release"] == provisioned.kernel.release
