"""Hot reload under a running guest: ``vfio-user-server --reload`` serves a user's device from
a temporary folder (``--app-dir``); the test edits the device's source file while the guest
runs, and the guest reads the register's new behaviour, with the value it wrote into another
register carried, and without a reboot (same boot id, the device never went away). And a
reload to code that reads another state version: NVMe is reset with CSTS.CFS, and the guest's
nvme driver recovers by itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from reload_source import DEVICE, REG_MAGIC, REG_SCRATCH, SPEC, VENDOR, write_device
from supervised import ServerProcess, stop_serving, wait_for

from vfio_user_server.testing.guest import QemuMachine
from vfio_user_server.testing.provision import Provisioned

pytestmark = pytest.mark.e2e


def bar0(guest: QemuMachine) -> int:
    """Enable the reloadable device in the guest; BAR0's physical address."""
    out = guest.run(f"grep -l {DEVICE:#06x} /sys/bus/pci/devices/*/device", check=True).output
    paths = [p.rsplit("/", 1)[0] for p in out.split() if p.startswith("/sys/")]
    assert len(paths) == 1, out
    vendor = guest.run(f"cat {paths[0]}/vendor", check=True).output.strip()
    assert int(vendor, 16) == VENDOR
    guest.run(f"echo 1 > {paths[0]}/enable", check=True)
    base = int(guest.run(f"cut -d' ' -f1 {paths[0]}/resource | head -1", check=True).output, 16)
    assert base
    return base


def wait_reads(guest: QemuMachine, addr: int, value: int) -> None:
    """The guest polls the register (at most 10 minutes) until it reads ``value``."""
    want = f"{value:#010x}".upper().replace("0X", "0x")
    out = guest.run(f"for i in $(seq 6000); do v=$(devmem {addr:#x} 32); "
                    f"[ \"$v\" = {want} ] && break; sleep 0.1; done; echo $v",
                    timeout=700, check=True).output.strip()
    assert int(out, 16) == value, out


def test_a_guest_reads_the_new_behaviour_of_a_saved_source(
        vfio_user_provisioned: Provisioned, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    write_device(app, 0x11111111)
    sock = tmp_path / "r.sock"
    srv = ServerProcess(["--reload", "--log-level", "INFO", "--socket", str(sock),
                         "--app-dir", str(app), SPEC], tmp_path)
    try:
        srv.ready()
        with QemuMachine(vfio_user_provisioned, sockets=[str(sock)],
                         workdir=tmp_path / "guest", name="reload") as guest:
            base = bar0(guest)
            boot_id = guest.run("cat /proc/sys/kernel/random/boot_id", check=True).output
            assert int(guest.run(f"devmem {base + REG_MAGIC:#x} 32", check=True).output,
                       16) == 0x11111111
            guest.run(f"devmem {base + REG_SCRATCH:#x} 32 0x5a5a1234", check=True)

            write_device(app, 0x22222222)  # the register's behaviour changes in the source
            wait_reads(guest, base + REG_MAGIC, 0x22222222)
            scratch = guest.run(f"devmem {base + REG_SCRATCH:#x} 32", check=True).output
            assert int(scratch, 16) == 0x5A5A1234  # the state came along
            write_device(app, 0x33333333)  # and again
            wait_reads(guest, base + REG_MAGIC, 0x33333333)
            assert guest.run("cat /proc/sys/kernel/random/boot_id",
                             check=True).output == boot_id  # never rebooted
            assert guest.run("echo alive", check=True).output.strip() == "alive"
        log = srv.stderr()
        assert log.count("reload: pid") == 2, log
        assert "Traceback" not in log, log
        assert srv.proc.wait(60) == 0, log  # the first process handed over and left
    finally:
        srv.close()
        stop_serving(sock)


NVME_SOURCE = '''\
from vfio_user_devices.nvme import NvmeController


class ReloadNvme(NvmeController):
    state_version = {version}
'''


def test_nvme_reset_by_a_reload_is_recovered_by_the_guests_driver(
        vfio_user_provisioned: Provisioned, tmp_path: Path) -> None:
    """A reload whose code reads another state version: the controller is reset with
    CSTS.CFS set; the guest's nvme driver times a command out, resets the controller, and the
    I/O completes, data intact, without a reboot."""
    app = tmp_path / "app"
    app.mkdir()
    src = app / "reloadnvme.py"
    src.write_text(NVME_SOURCE.format(version=1))
    image = tmp_path / "disk.img"
    sock = tmp_path / "nvme.sock"
    srv = ServerProcess(["--reload", "--log-level", "INFO", "--socket", str(sock), "--app-dir",
                         str(app), "reloadnvme:ReloadNvme", "--image", str(image), "--size",
                         "16M"], tmp_path)
    try:
        srv.ready()
        with QemuMachine(vfio_user_provisioned, sockets=[str(sock)], modules=["nvme"],
                         module_params={"nvme_core": "io_timeout=5 admin_timeout=5"},
                         workdir=tmp_path / "guest", name="reload-nvme") as guest:
            guest.run("for i in $(seq 900); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; "
                      "done; [ -b /dev/nvme0n1 ]", timeout=120, check=True)
            boot_id = guest.run("cat /proc/sys/kernel/random/boot_id", check=True).output
            guest.run("dd if=/dev/urandom of=/tmp/a bs=4096 count=64 && "
                      "dd if=/tmp/a of=/dev/nvme0n1 bs=4096 oflag=direct", check=True)
            src.write_text(NVME_SOURCE.format(version=2))
            wait_for(lambda: "reload: pid" in srv.stderr(), "the reload")
            assert "state version 1; this code reads version 2" in srv.stderr(), srv.stderr()
            # the next write times out (io_timeout=5), the driver resets, the write completes
            out = guest.run("dd if=/tmp/a of=/dev/nvme0n1 bs=4096 seek=64 oflag=direct && "
                            "dd if=/dev/nvme0n1 of=/tmp/b bs=4096 count=64 iflag=direct && "
                            "dd if=/dev/nvme0n1 of=/tmp/c bs=4096 skip=64 count=64 "
                            "iflag=direct && cmp /tmp/a /tmp/b && cmp /tmp/a /tmp/c && "
                            "echo same", timeout=300).output
            assert out.rstrip().endswith("same"), out
            dmesg = guest.run("dmesg", check=True).output
            assert "controller is down; will reset: CSTS=0x2" in dmesg, dmesg[-3000:]
            assert "I/O error" not in dmesg, dmesg[-3000:]
            assert guest.run("cat /proc/sys/kernel/random/boot_id",
                             check=True).output == boot_id
        assert "Traceback" not in srv.stderr(), srv.stderr()
    finally:
        srv.close()
        stop_serving(sock)


