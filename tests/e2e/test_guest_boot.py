"""Really provision and boot a guest (no device). These tests never skip: a provisioning or
boot failure fails them loudly."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from vfio_user_server.errors import GuestError
from vfio_user_server.testing.guest import QemuMachine, Result, VfioUserDevice
from vfio_user_server.testing.provision import Provisioned, provision

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def prov() -> Provisioned:
    return provision()


@pytest.fixture(scope="module")
def guest(prov: Provisioned) -> Iterator[QemuMachine]:
    # Booted cold: these tests are about the boot itself (console, boot time, reboot).
    with QemuMachine(prov, no_reboot=False, name="boot-test", cold_boot=True) as machine:
        yield machine


def test_qemu_lists_vfio_user_pci(prov: Provisioned) -> None:
    proc = subprocess.run(
        [*prov.qemu_argv_prefix, "-machine", "none", "-device", "help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert 'name "vfio-user-pci"' in proc.stdout


def test_boots_and_reports(guest: QemuMachine, prov: Provisioned) -> None:
    assert guest.alive
    assert guest.accel in ("tcg", "kvm")
    assert guest.boot_time is not None and guest.boot_time < 120
    assert "PYVFIO-BOOTED" in guest.console_text()
    log = guest.qemu_log.read_text()
    assert f"accel={guest.accel}" in log


def test_uname(guest: QemuMachine, prov: Provisioned) -> None:
    result = guest.run("uname -r", timeout=30)
    assert result == Result(
        ok=True,
        status=0,
        output=prov.kernel.release + "\n",
        command="uname -r",
        duration=result.duration,
    )


def test_exit_status_and_output(guest: QemuMachine) -> None:
    result = guest.run("echo hi; exit 3", timeout=30)
    assert not result.ok
    assert result.status == 3
    assert result.output == "hi\n"
    with pytest.raises(GuestError, match="status 3"):
        result.check()


def test_binary_safe_output_and_stderr(guest: QemuMachine) -> None:
    result = guest.run("printf 'a\\tb\\n\\001\\377'; echo err >&2", timeout=30)
    assert result.ok
    assert result.output.startswith("a\tb\n\x01")
    assert "err\n" in result.output
    long = guest.run("seq 1 20000", timeout=60)
    assert long.output.splitlines()[-1] == "20000"
    quoted = guest.run("x='it'\"'\"'s'; echo \"$x\" $((6*7))", timeout=30)
    assert quoted.output == "it's 42\n"


def test_guest_side_timeout(guest: QemuMachine) -> None:
    result = guest.run("sleep 30", timeout=2)
    assert result.timed_out and not result.ok
    # The agent is still usable afterwards.
    assert guest.run("echo still here", timeout=30).output == "still here\n"


def test_modules_and_qmp(guest: QemuMachine) -> None:
    status = guest.qmp("query-status")
    assert status["status"] == "running"
    assert guest.run("test -e /proc/self && test -c /dev/null").ok


def test_reboot(guest: QemuMachine) -> None:
    took = guest.reboot(timeout=180)
    assert took > 0
    assert guest.run("cat /proc/uptime", timeout=30).ok
    assert guest.console_text().count("PYVFIO-BOOTED") == 2


def test_device_json_syntax() -> None:
    dev = VfioUserDevice("/tmp/x.sock", id="gpio0", props={"x-msg-timeout": 10000})
    assert dev.to_json() == {
        "driver": "vfio-user-pci",
        "socket": {"type": "unix", "path": "/tmp/x.sock"},
        "id": "gpio0",
        "x-msg-timeout": 10000,
    }


def test_modules_load_and_teardown_leaves_nothing(prov: Provisioned) -> None:
    machine = QemuMachine(
        prov,
        modules=["gpio-pci-idio-16", "nvme", "uio_pci_generic", "vfio-pci"],
        shared_memory=False,
        name="modules",
    )
    with machine:
        lsmod = machine.run("cat /proc/modules", timeout=30).check().output
        for mod in ("gpio_pci_idio_16", "nvme", "uio_pci_generic", "vfio_pci"):
            assert mod + " " in lsmod
        pid = machine.proc.pid if machine.proc else -1
        workdir = machine.workdir
    assert machine.proc is not None and machine.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert workdir is not None and not workdir.exists()


def test_test_script_mode(prov: Provisioned) -> None:
    with QemuMachine(prov, agent=False, test_script="echo from-script; exit 5") as machine:
        t0 = time.monotonic()
        assert machine.wait_exit(timeout=120) == 5
        assert time.monotonic() - t0 < 120
        assert "from-script" in machine.console_text()


def test_iommu_lets_vfio_pci_bind(prov: Provisioned) -> None:
    # QEMU's in-process edu device (1234:11e8) stands in for a vfio-user device here.
    script = r"""
set -e
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor):$(cat $d/device)" = 0x1234:0x11e8 ]; then dev=$d; fi
done
bdf=$(basename $dev)
echo vfio-pci > $dev/driver_override
echo $bdf > /sys/bus/pci/drivers_probe
group=$(basename $(readlink $dev/iommu_group))
echo driver=$(basename $(readlink $dev/driver)) group=$group
test -c /dev/vfio/$group
test -c /dev/vfio/vfio
grep -q '^vfio_iommu_type1 ' /proc/modules
"""
    with QemuMachine(
        prov, modules=["vfio-pci"], iommu=True, extra_args=["-device", "edu"], name="iommu"
    ) as machine:
        result = machine.run(script, timeout=60)
        assert result.ok, result.output
        assert "driver=vfio-pci" in result.output
