"""``vfio-user-server``: device options declared on the class, devices in the current folder.

The folder tests run the installed command in a temporary folder, as a person prototyping a
device does, and talk to it with the Client.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from helpers import WAIT

from vfio_user_devices.edu import DEFAULT_DMA_MASK, Edu
from vfio_user_devices.idio16 import PciIdio16
from vfio_user_devices.nvme import NvmeController
from vfio_user_server.cli import make_device
from vfio_user_server.client import Client
from vfio_user_server.device import PciDevice
from vfio_user_server.errors import VfioUserError
from vfio_user_server.options import Option, integer, option_parser
from vfio_user_server.pci import Bar

CLI = Path(sys.executable).parent / "vfio-user-server"

DEVICE_MODULE = textwrap.dedent('''
    from vfio_user_server.device import PciDevice
    from vfio_user_server.options import Option
    from vfio_user_server.pci import Bar


    class MyDevice(PciDevice):
        vendor_id = 0x1B36
        device_id = 0x1234
        bars = {0: Bar(4096)}
        options = (Option("--answer", "what BAR0 reads", type=int, default=0),)

        def __init__(self, *, answer: int = 0) -> None:
            super().__init__()
            self.answer = answer

        def bar_read(self, bar: int, offset: int, size: int) -> int:
            return self.answer
''')


# --- options declared on the class ----------------------------------------------------------


def test_builtin_devices_take_their_declared_options() -> None:
    edu = make_device("edu", ["--dma-mask", "0xffffffff", "--dma-delay-ms", "250"])
    assert isinstance(edu, Edu)
    assert (edu.dma_mask, edu.dma_delay) == (0xFFFFFFFF, 0.25)
    edu = make_device("edu")
    assert isinstance(edu, Edu)
    assert (edu.dma_mask, edu.dma_delay) == (DEFAULT_DMA_MASK, 0.0)

    idio = make_device("gpio-pci-idio-16", ["--inputs", "0x8001", "--log-outputs"])
    assert isinstance(idio, PciIdio16)
    assert idio.inputs == 0x8001
    assert idio.on_output is not None
    assert isinstance(quiet := make_device("gpio-pci-idio-16"), PciIdio16)
    assert quiet.on_output is None and quiet.inputs == 0

    nvme = make_device("nvme", ["--size", "1M", "--queues", "2", "--serial", "S1"])
    assert isinstance(nvme, NvmeController)
    try:
        assert (nvme.blocks << 9, nvme.max_queues, nvme.serial) == (1 << 20, 2, "S1")
    finally:
        nvme.close()


def test_bad_device_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        make_device("gpio-pci-idio-16", ["--inputs", "lots"])
    assert info.value.code == 2
    assert "argument --inputs: invalid integer value: 'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_device("edu", ["--no-such-option"])


class Old(PciDevice):
    vendor_id = 0x1B36
    device_id = 0x1234

    @classmethod
    def add_arguments(cls, parser: object) -> None:
        del parser


def test_old_argument_hooks_are_refused() -> None:
    with pytest.raises(VfioUserError, match=r"Old\.add_arguments: declare .* 'options'"):
        make_device(f"{__name__}:Old")


def test_option_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="long option"):
        Option("-x", "short")
    with pytest.raises(ValueError, match="two options fill 'size'"):
        option_parser([Option("--size", "a"), Option("--bytes", "b", param="size")], "dev")
    parser = option_parser([Option("--base-address", "b", type=integer, default=0)], "dev")
    assert parser.parse_args(["--base-address", "0x10"]).base_address == 16
    assert "BASE_ADDRESS" in parser.format_help()


class Declared(PciDevice):
    vendor_id = 0x1B36
    device_id = 0x1234
    bars: ClassVar = {0: Bar(4096)}
    options = (Option("--verbose", "talk", switch=True), Option("--name", "a name"))

    def __init__(self, *, verbose: bool = False, name: str | None = None) -> None:
        super().__init__()
        self.verbose, self.name = verbose, name


def test_switch_and_text_options() -> None:
    dev = make_device(f"{__name__}:Declared", ["--verbose", "--name", "x"])
    assert isinstance(dev, Declared) and (dev.verbose, dev.name) == (True, "x")
    dev = make_device(f"{__name__}:Declared")
    assert isinstance(dev, Declared) and (dev.verbose, dev.name) == (False, None)


# --- a device module in the current folder --------------------------------------------------


@pytest.fixture
def folder(sock_dir: Path) -> Path:
    """The current folder of the command: a fresh temporary one."""
    return sock_dir


class Served:
    """The installed CLI as a child process; ``ready`` once it says it is serving."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen([str(CLI), *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def ready(self) -> bool:
        """True when the server listens; False when it exited first."""
        while True:
            line = self.lines.get(timeout=6 * WAIT)
            if line is None:
                self._eof = True
                return False
            self.stderr.append(line)
            if "serving" in line:
                return True

    def finish(self) -> int:
        rc = self.proc.wait(timeout=6 * WAIT)
        while not self._eof:
            line = self.lines.get(timeout=WAIT)
            if line is None:
                self._eof = True
            else:
                self.stderr.append(line)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def talk_to(sock: Path) -> int:
    """Negotiate with the served device and read BAR0; the --once server then exits."""
    with Client.connect(sock, timeout=WAIT) as c:
        c.negotiate()
        c.get_device_info()
        assert c.config_read(0, 4) == 0x1234 << 16 | 0x1B36
        return c.bar_read(0, 0, 4)


def test_cli_imports_a_device_from_the_current_folder(folder: Path) -> None:
    (folder / "mydev.py").write_text(DEVICE_MODULE)
    srv = Served(["--socket", "dev.sock", "--once", "mydev:MyDevice", "--answer", "42"],
                 cwd=folder)
    try:
        assert srv.ready(), "".join(srv.stderr)
        assert talk_to(folder / "dev.sock") == 42
        assert srv.finish() == 0, "".join(srv.stderr)
    finally:
        srv.kill()


def test_cli_app_dir_names_another_folder(folder: Path) -> None:
    (folder / "lib").mkdir()
    (folder / "lib" / "otherdev.py").write_text(DEVICE_MODULE)
    (folder / "run").mkdir()
    srv = Served(["--socket", "dev.sock", "--once", "--app-dir", "../lib", "otherdev:MyDevice"],
                 cwd=folder / "run")
    try:
        assert srv.ready(), "".join(srv.stderr)
        assert talk_to(folder / "run" / "dev.sock") == 0
        assert srv.finish() == 0, "".join(srv.stderr)
    finally:
        srv.kill()


def test_cli_says_where_it_looked(folder: Path) -> None:
    srv = Served(["--socket", "dev.sock", "absent:MyDevice"], cwd=folder)
    try:
        assert not srv.ready()
        assert srv.finish() == 1
        err = "".join(srv.stderr)
        assert "cannot import 'absent'" in err
        assert f"looked in {folder}" in err and "--app-dir" in err
        assert not (folder / "dev.sock").exists()
    finally:
        srv.kill()


def test_app_dir_must_be_a_folder(folder: Path) -> None:
    with pytest.raises(VfioUserError, match="is not a folder"):
        make_device("mydev:MyDevice", app_dir=folder / "missing")
    before = list(sys.path)
    make_device("edu", app_dir=folder / "missing")  # built-in names never look there
    assert sys.path == before
