"""Template snapshot folders: keys, creation under concurrency, pruning (no QEMU here)."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from vfio_user_server.testing import snapshot


def test_key_depends_on_every_input() -> None:
    base = {"argv": ["-m", "512M"], "qemu": ["11.1.3", "/q", 1, 2], "initramfs": {"files": {}}}
    key = snapshot.key_of(base)
    assert key == snapshot.key_of(json.loads(json.dumps(base)))  # canonical
    for changed in (
        {**base, "argv": ["-m", "256M"]},
        {**base, "qemu": ["11.1.3", "/q", 1, 3]},
        {**base, "initramfs": {"files": {"/bin/x": ["ab", 0o755]}}},
    ):
        assert snapshot.key_of(changed) != key


def _fill(folder: Path) -> dict[str, object]:
    (folder / "ram").write_bytes(b"r" * 100)
    (folder / "initramfs.cpio.gz").write_bytes(b"i")
    (folder / "console.log").write_text("booted\n")
    return {"boot_time": 1.0}


def test_get_or_create_makes_once_then_reuses(tmp_path: Path) -> None:
    calls: list[Path] = []

    def create(folder: Path) -> dict[str, object]:
        calls.append(folder)
        assert not (tmp_path / "k1").exists()  # built aside, renamed into place
        return _fill(folder)

    tpl, made = snapshot.get_or_create(tmp_path, "k1", create, timeout=10)
    assert made and len(calls) == 1
    assert tpl.ram.read_bytes() == b"r" * 100 and tpl.meta()["boot_time"] == 1.0
    tpl2, made2 = snapshot.get_or_create(tmp_path, "k1", create, timeout=10)
    assert not made2 and tpl2 == tpl and len(calls) == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_failed_creation_leaves_nothing(tmp_path: Path) -> None:
    def create(folder: Path) -> dict[str, object]:
        _fill(folder)
        raise RuntimeError("boot failed")

    with pytest.raises(RuntimeError):
        snapshot.get_or_create(tmp_path, "k2", create, timeout=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k2.lock"]


def test_incomplete_folder_is_rebuilt(tmp_path: Path) -> None:
    (tmp_path / "k3").mkdir()
    (tmp_path / "k3" / "ram").write_bytes(b"half")  # no template.json: not finished
    _tpl, made = snapshot.get_or_create(tmp_path, "k3", _fill, timeout=10)
    assert made
    assert (tmp_path / "k3" / "ram").read_bytes() == b"r" * 100


def _racer(folder: str, marks: str, start: float) -> None:
    def create(tmp: Path) -> dict[str, object]:
        with open(marks, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # hold the lock while the others arrive (not a synchronisation)
        return _fill(tmp)

    while time.time() < start:
        time.sleep(0.001)
    tpl, _made = snapshot.get_or_create(Path(folder), "race", create, timeout=60)
    assert tpl.ram.read_bytes() == b"r" * 100


def test_racing_processes_create_it_once(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.touch()
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 1.0
    procs = [ctx.Process(target=_racer, args=(str(tmp_path / "snaps"), str(marks), start))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(marks.read_text().split()) == 1


def test_prune_keeps_recent_and_the_newest(tmp_path: Path) -> None:
    now = time.time()
    for i in range(snapshot.MAX_TEMPLATES + 3):
        folder = tmp_path / f"t{i:02d}"
        folder.mkdir()
        _fill(folder)
        (folder / "template.json").write_text("{}")
        used = now - snapshot.KEEP_RECENT - 1000 + i  # all old, t00 the oldest
        os.utime(tmp_path / f"t{i:02d}" / "template.json", (used, used))
    os.utime(tmp_path / "t00" / "template.json")  # t00 was just used: kept
    removed = snapshot.prune(tmp_path, now=now)
    assert sorted(removed) == ["t01", "t02", "t03"]
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(left) == snapshot.MAX_TEMPLATES and "t00" in left


def test_restore_is_the_default_with_opt_outs(monkeypatch: pytest.MonkeyPatch) -> None:
    from vfio_user_server.errors import GuestError
    from vfio_user_server.testing.guest import QemuMachine

    monkeypatch.delenv("PYVFIO_COLD_BOOT", raising=False)
    assert QemuMachine()._wants_restore()
    assert not QemuMachine(cold_boot=True)._wants_restore()
    # what cannot be restored boots cold, or is an error when a restore was asked for
    assert not QemuMachine(test_script="true")._wants_restore()
    assert not QemuMachine(agent=False)._wants_restore()
    assert not QemuMachine(sockets=[f"/s{i}" for i in range(16)])._wants_restore()
    with pytest.raises(GuestError, match="agent=False"):
        QemuMachine(agent=False, cold_boot=False)._wants_restore()
    monkeypatch.setenv("PYVFIO_COLD_BOOT", "1")
    assert not QemuMachine()._wants_restore()
    assert QemuMachine(cold_boot=False)._wants_restore()  # explicit beats the environment
    monkeypatch.setenv("PYVFIO_COLD_BOOT", "0")
    assert QemuMachine()._wants_restore()
