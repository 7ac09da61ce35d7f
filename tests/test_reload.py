"""Hot reload: the watcher, the reset when a device's own state is refused, the error report
of a broken source, and ``vfio-user-server --reload`` with clients attached (one process
serving two devices; the guest's view: tests/e2e/test_reload_guest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest
from helpers import open_fds
from reload_source import REG_MAGIC, REG_SCRATCH, SPEC, write_device
from supervised import CLI, DEADLINE, ServerProcess, stop_serving, wait_for
from test_upgrade import Keeper

from vfio_user_devices.edu import Edu
from vfio_user_devices.nvme import NvmeController
from vfio_user_devices.nvme_spec import CSTS_CFS
from vfio_user_devices.virtio_rng import VirtioRng
from vfio_user_server import reload
from vfio_user_server import state as state_mod
from vfio_user_server.client import Client
from vfio_user_server.device import PciDevice
from vfio_user_server.errors import StateError, VfioUserError
from vfio_user_server.pci import Bar
from vfio_user_server.pci.config import COMMAND_MASTER, COMMAND_MEMORY
from vfio_user_server.sample import SampleDevice
from vfio_user_server.server import Server
from vfio_user_server.upgrade import hand_over, receive_and_resume_all
from vfio_user_server.virtio.spec import Status

# --- the watcher ------------------------------------------------------------------------------


def test_a_change_is_reported_once_the_file_holds_still(tmp_path: Path) -> None:
    f = write_device(tmp_path, 1)
    w = reload.Watcher([f])
    assert w.poll() == []
    write_device(tmp_path, 2)
    assert w.poll() == []  # changed: one more poll to see it hold still
    assert w.poll() == [f]
    assert w.poll() == [f]  # until the caller accepts it
    w.accept()
    assert w.poll() == [] and w.poll() == []
    write_device(tmp_path, 3)
    assert w.poll() == []
    write_device(tmp_path, 4)  # still being written: wait again
    assert w.poll() == []
    assert w.poll() == [f]


def test_a_missing_file_is_waited_for(tmp_path: Path) -> None:
    f = write_device(tmp_path, 1)
    w = reload.Watcher([f])
    f.unlink()  # an editor between removing and writing
    assert w.poll() == [] and w.poll() == []
    write_device(tmp_path, 2)
    assert w.poll() == []
    assert w.poll() == [f]


def test_the_previous_process_baseline_catches_a_save_during_the_start(tmp_path: Path) -> None:
    f = write_device(tmp_path, 1)
    seen = reload.Watcher([f]).to_env()
    write_device(tmp_path, 22)  # saved while the new process was starting
    os.environ[reload.SEEN_ENV] = seen
    w = reload.Watcher([f], reload.baseline_from_env())
    assert reload.SEEN_ENV not in os.environ
    assert w.poll() == []
    assert w.poll() == [f]
    assert reload.Watcher([f], {str(f): "junk"}).seen[f] is None  # bad baseline: a change


def test_the_files_watched_are_the_device_module_and_its_siblings() -> None:
    files = reload.source_files([NvmeController])
    names = {f.name for f in files}
    assert {"nvme.py", "nvme_io.py", "nvme_admin.py", "nvme_queues.py"} <= names
    assert "device.py" not in names and "abc.py" not in names
    assert files == sorted(files)


# --- what a broken source reports ----------------------------------------------------------------


def _load_error(folder: Path, source: str, name: str) -> str:
    (folder / f"{name}.py").write_text(source)
    from vfio_user_server.cli import make_device
    try:
        make_device(f"{name}:Reloadable", app_dir=folder)
    except Exception as exc:
        return reload.describe_load_error(exc)
    raise AssertionError("the device loaded")


def test_a_broken_source_is_reported_with_its_file_and_line(tmp_path: Path) -> None:
    syntax = _load_error(tmp_path, "x = 1\ndef (:\n", "broken_syntax")
    assert syntax.startswith(f"{tmp_path / 'broken_syntax.py'}, line 2: SyntaxError")
    name = _load_error(tmp_path, "import os\n\nundefined_name\n", "broken_name")
    assert name == (f"{tmp_path / 'broken_name.py'}, line 3: NameError: name "
                    "'undefined_name' is not defined")
    f = write_device(tmp_path, 5, extra="        raise RuntimeError('not today')\n")
    line = f.read_text().splitlines().index("        raise RuntimeError('not today')") + 1
    built = _load_error(tmp_path, f.read_text(), "broken_init")
    assert built == f"{tmp_path / 'broken_init.py'}, line {line}: RuntimeError: not today"


# --- the device's own state refused: reset, guest told -------------------------------------------


class _Counter(PciDevice):
    __qualname__ = "Counter"  # both versions are the same class to the state
    vendor_id = 0x1B36
    device_id = 0x70AB
    bars: ClassVar = {0: Bar(4096)}
    msix_vectors = 2
    msix_table_offset = 0x800
    state_fields: ClassVar[tuple[str, ...]] = ("count",)

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.lost: list[str] = []

    def state_lost(self, reason: str) -> None:
        self.lost.append(reason)


class _CounterV2(_Counter):
    __qualname__ = "Counter"
    state_version = 2


class _CounterRenamed(_Counter):
    __qualname__ = "Counter"
    state_fields: ClassVar[tuple[str, ...]] = ("total",)

    def __init__(self) -> None:
        super().__init__()
        self.total = 0


def _programmed() -> bytes:
    old = _Counter()
    old.count = 41
    old.config.space.data[4] |= COMMAND_MEMORY | COMMAND_MASTER  # the guest's driver did
    return old.save_state()


@pytest.mark.parametrize("new_class", [_CounterV2, _CounterRenamed])
def test_a_refused_device_state_resets_the_device_and_keeps_the_guests_config(
        new_class: type[_Counter]) -> None:
    data = _programmed()
    with pytest.raises(StateError):  # an upgrade refuses it
        new_class().load_state(data)
    new = new_class()
    assert new.load_state(data, reset_own=True) is False  # a reload resets
    assert new.count == 0  # power-on
    assert new.config.command & (COMMAND_MEMORY | COMMAND_MASTER)  # the guest's setup kept
    assert len(new.lost) == 1 and ("version 1" in new.lost[0] or "keys" in new.lost[0])
    same = _Counter()
    assert same.load_state(data, reset_own=True) is True and same.count == 41
    assert same.lost == []


def test_a_check_state_refusal_resets_too() -> None:
    class Picky(_Counter):
        __qualname__ = "Counter"

        def check_state(self, fields: Any) -> None:
            raise StateError("count out of range")

    new = Picky()
    assert new.load_state(_programmed(), reset_own=True) is False
    assert new.count == 0 and new.lost == ["count out of range"]


def test_another_device_identity_is_refused_even_by_a_reload() -> None:
    class Other(_Counter):
        __qualname__ = "Counter"
        device_id = 0x70AC

    new = Other()
    with pytest.raises(StateError, match="another device"):
        new.load_state(_programmed(), reset_own=True)
    assert new.lost == []


def _bumped(device: PciDevice) -> bytes:
    body = state_mod.decode(device.save_state())
    body["state_version"] += 1
    return state_mod.encode(body)


def test_nvme_tells_a_reset_through_controller_fatal_status() -> None:
    old, new = NvmeController(size=1 << 20, serial="R"), NvmeController(size=1 << 20, serial="R")
    try:
        assert new.load_state(_bumped(old), reset_own=True) is False
        assert new.csts & CSTS_CFS
        assert new.cc == 0  # the driver's controller reset enables it again
    finally:
        old.close()
        new.close()


def test_virtio_tells_a_reset_through_device_needs_reset() -> None:
    old, new = VirtioRng(), VirtioRng()
    assert new.load_state(_bumped(old), reset_own=True) is False
    assert new.status & Status.DEVICE_NEEDS_RESET
    assert new.isr  # the configuration interrupt (INTx: MSI-X is off)


def test_edu_just_starts_afresh() -> None:
    old = Edu()
    old.bar_write(0, 0x04, 4, 0x1234)
    new = Edu()
    assert new.load_state(_bumped(old), reset_own=True) is False
    assert old.bar_read(0, 0x04, 4) == ~0x1234 & 0xFFFFFFFF
    assert new.bar_read(0, 0x04, 4) == Edu().bar_read(0, 0x04, 4)  # power-on


# --- vfio-user-server --reload, clients attached ----------------------------------------------


def _client(sock: Path) -> Client:
    c = Client.connect(sock, timeout=DEADLINE)
    c.negotiate()
    c.get_device_info()
    return c


def test_reload_follows_saves_survives_a_broken_one_and_resets_on_a_new_version(
        tmp_path: Path) -> None:
    src = write_device(tmp_path, 0x11111111)
    a, b = tmp_path / "r.sock", tmp_path / "edu.sock"
    srv = ServerProcess(["--reload", "--log-level", "INFO", "--socket", str(a), "--app-dir",
                         str(tmp_path), SPEC, "--", "--socket", str(b), "edu"], tmp_path)
    try:
        srv.ready()
        with _client(a) as c, _client(b) as e:
            c.add_memory(0x200000, 0x20000)
            c.bar_write(0, REG_SCRATCH, 4, 77)
            e.bar_write(0, 0x04, 4, 0x1234)
            assert c.bar_read(0, REG_MAGIC, 4) == 0x11111111

            def magic(value: int) -> None:
                wait_for(lambda: c.bar_read(0, REG_MAGIC, 4) == value,
                         f"the device to read {value:#x}:\n{srv.stderr()}")

            write_device(tmp_path, 0x22222222)  # a new behaviour, same state: carried
            magic(0x22222222)
            assert c.bar_read(0, REG_SCRATCH, 4) == 77
            assert e.bar_read(0, 0x04, 4) == ~0x1234 & 0xFFFFFFFF  # the other device too

            broken = src.read_text().replace("MAGIC = 0x22222222",
                                             "MAGIC = 0x33333333\nundefined_name")
            src.write_text(broken)
            wait_for(lambda: "reload of" in srv.stderr(), "the failed reload's report")
            log = srv.stderr()
            assert f"{src}, line 7: NameError: name 'undefined_name'" in log, log
            assert c.bar_read(0, REG_MAGIC, 4) == 0x22222222  # the old code serves on
            assert c.bar_read(0, REG_SCRATCH, 4) == 77

            write_device(tmp_path, 0x44444444, version=2)  # the next save retries
            magic(0x44444444)
            assert c.bar_read(0, REG_SCRATCH, 4) == 0  # another state version: reset
            assert "state version 1; this code reads version 2" in srv.stderr()
            assert e.bar_read(0, 0x04, 4) == ~0x1234 & 0xFFFFFFFF  # edu's state carried
        assert srv.proc.poll() == 0  # the first process handed over and left
    finally:
        srv.close()
        stop_serving(a)


def test_upgrade_serves_every_device_of_a_process(tmp_path: Path) -> None:
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    srv = ServerProcess(["--socket", str(a), "edu", "--", "--socket", str(b), "edu"],
                        tmp_path)
    pids = [srv.pid]
    try:
        srv.ready()
        assert Path(f"{a}.ctl").exists() and Path(f"{b}.ctl").exists()
        with _client(a) as e, _client(b) as s:
            e.bar_write(0, 0x04, 4, 0x55)
            s.bar_write(0, 0x04, 4, 0xABCD)  # edu's liveness register reads its complement
            for sock in (a, b, a):  # either control socket upgrades the whole process
                done = subprocess.run([CLI, "upgrade", "--socket", str(sock)],
                                      capture_output=True, text=True, timeout=4 * DEADLINE)
                assert done.returncode == 0, done.stderr + srv.stderr()
                pids.append(int(done.stdout.rsplit("pid", 1)[1]))
                assert e.bar_read(0, 0x04, 4) == ~0x55 & 0xFFFFFFFF
                assert s.bar_read(0, 0x04, 4) == ~0xABCD & 0xFFFFFFFF
        assert srv.proc.wait(DEADLINE) == 0
        os.kill(pids[-1], 15)
        wait_for(lambda: not a.exists() and not b.exists()
                 and not Path(f"{a}.ctl").exists() and not Path(f"{b}.ctl").exists(),
                 "the last process to remove its sockets")
    finally:
        srv.close()
        stop_serving(a)


def test_reload_needs_a_socket_path_for_each_device(tmp_path: Path) -> None:
    done = subprocess.run([CLI, "--reload", "--socket", str(tmp_path / "a.sock"), "edu", "--",
                           "--fd", "0", "edu"], capture_output=True, text=True,
                          timeout=DEADLINE)
    assert done.returncode == 2
    assert "--reload: every device needs --socket PATH" in done.stderr


# --- one hand-over for several servers, in one process ---------------------------------------


def _two_servers(tmp_path: Path) -> tuple[list[Server], list[Client]]:
    servers = [Server(Keeper(), tmp_path / f"{n}.sock", upgradable=True).start()
               for n in "ab"]
    clients = []
    for n, srv in enumerate(servers):
        c = Client.connect(srv.path)
        c.negotiate()
        c.get_device_info()
        c.add_memory(0x100000, 0x10000)
        c.bar_write(0, 0x04, 4, 100 + n)
        clients.append(c)
    return servers, clients


def _hand(servers: list[Any], new_devices: list[Any]) -> tuple[BaseException | None,
                                                               list[Any]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    new: list[Any] = []

    def new_side() -> None:
        try:
            new.extend(receive_and_resume_all(b, [(d, {}) for d in new_devices]))
        except BaseException as exc:
            new.append(exc)

    with a, b:
        t = threading.Thread(target=new_side)
        t.start()
        error: BaseException | None = None
        try:
            hand_over(servers, a, timeout=DEADLINE)
        except Exception as exc:
            error = exc
        t.join(DEADLINE)
    return error, new


def test_several_servers_go_over_together_or_not_at_all(tmp_path: Path) -> None:
    before = open_fds()
    servers, clients = _two_servers(tmp_path)
    new: list[Any] = []
    try:
        # the second new device refuses its state: the first, already rebuilt, is dropped
        # without tearing anything down, and both old servers serve on
        error, refused = _hand(servers, [Keeper(), SampleDevice()])
        assert error is not None and "refused" in str(error), error
        assert len(refused) == 1 and isinstance(refused[0], StateError), refused
        assert not any(srv.handed_over for srv in servers)
        for n, c in enumerate(clients):
            assert c.bar_read(0, 0x04, 4) == 100 + n
            c.bar_write(0, 0x04, 4, 200 + n)
        error, new = _hand(servers, [Keeper(), Keeper()])
        assert error is None and len(new) == 2, (error, new)
        assert all(srv.handed_over for srv in servers)
        for n, c in enumerate(clients):
            assert c.bar_read(0, 0x04, 4) == 200 + n  # each served by its new server
        assert [srv.path for srv in new] == [srv.path for srv in servers]
    finally:
        for srv in servers:
            srv.close()
        for c in clients:
            c.close()
        for srv in new:
            if not isinstance(srv, BaseException):
                srv.wait_for_disconnect(1, DEADLINE)
                srv.close()
    assert open_fds() == before


def test_a_missing_module_is_reported_without_a_misleading_line(tmp_path: Path) -> None:
    from vfio_user_server.cli import make_device
    with pytest.raises(VfioUserError) as info:
        make_device("no_such_module_here:Dev", app_dir=tmp_path)
    assert reload.describe_load_error(info.value) == (
        "ModuleNotFoundError: No module named 'no_such_module_here'")
