"""The installed commands, end to end: QEMU against ``vfio-user-server`` run as a program, and
``vfio-user-launch``.

Every other end-to-end test serves its device inside the pytest process; these run the console
scripts the package installs, as a user would, in their own processes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from supervised import ServerProcess, installed_command

from vfio_user_server.sample import ID_VALUE, REG_SCRATCH
from vfio_user_server.testing.guest import QemuMachine
from vfio_user_server.testing.provision import Provisioned

pytestmark = pytest.mark.e2e


def sample_bar0(guest: QemuMachine) -> int:
    """Enable the sample device (1b36:7000) in the guest; return BAR0's physical address."""
    out = guest.run("grep -l 0x7000 /sys/bus/pci/devices/*/device", check=True).output
    paths = [p.rsplit("/", 1)[0] for p in out.split() if p.startswith("/sys/")]
    assert len(paths) == 1, out
    guest.run(f"echo 1 > {paths[0]}/enable", check=True)
    base = int(guest.run(f"cut -d' ' -f1 {paths[0]}/resource | head -1", check=True).output, 16)
    assert base
    return base


def test_qemu_attaches_to_the_installed_vfio_user_server(
        vfio_user_provisioned: Provisioned, tmp_path: Path) -> None:
    srv = ServerProcess.serving(tmp_path / "sample.sock", "sample", log_level="INFO")
    try:
        with QemuMachine(vfio_user_provisioned, sockets=[str(srv.sock)],
                         workdir=tmp_path / "guest", name="installed-server") as guest:
            base = sample_bar0(guest)
            assert int(guest.run(f"devmem {base:#x} 32", check=True).output, 16) == ID_VALUE
            guest.run(f"devmem {base + REG_SCRATCH:#x} 32 0x1234abcd", check=True)
            out = guest.run(f"devmem {base + REG_SCRATCH:#x} 32", check=True).output
            assert int(out, 16) == 0x1234ABCD
        # QEMU is gone: the server saw its client leave and still runs
        assert srv.proc.poll() is None, srv.stderr()
        status = srv.stop()
        log = srv.stderr()
    finally:
        srv.close()
    assert status == 0, log
    assert "client connected" in log and "client disconnected" in log, log
    assert "Traceback" not in log, log


def test_vfio_user_launch_exits_with_the_status_of_the_guest_command(tmp_path: Path) -> None:
    # one boot: the device is visible in the guest, and the command's status comes back
    cmd = "grep -l 0x7000 /sys/bus/pci/devices/*/device && exit 3"
    proc = subprocess.run([installed_command("vfio-user-launch"), "--run", cmd, "sample"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path, check=False)
    assert proc.returncode == 3, (proc.stdout, proc.stderr[-3000:])
    assert "/sys/bus/pci/devices/" in proc.stdout, proc.stdout
    assert "guest up in" in proc.stderr, proc.stderr[-3000:]
