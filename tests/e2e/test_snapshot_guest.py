"""Guests restored from a template snapshot, with their devices hot-plugged.

The device-facing checks (BARs, MSI-X, MSI, INTx, DMA with memfd and plain RAM, drivers
binding) are the other e2e modules, which restore by default; this module checks what the
restore itself promises: one template per setup, reused; a fresh RNG and the wall clock;
the boot console kept; the devices there when ``start`` returns; a user's device class in the
plugin's marker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vfio_user_server.sample import SampleDevice
from vfio_user_server.server import Server
from vfio_user_server.testing.guest import RESTORE_MARKER, QemuMachine
from vfio_user_server.testing.harness import Guest
from vfio_user_server.testing.initramfs import BOOT_MARKER
from vfio_user_server.testing.provision import Provisioned

pytestmark = pytest.mark.e2e


class UserDevice(SampleDevice):
    """A user's own device class (the sample with another device id)."""

    device_id = 0x7001


def urandom(machine: QemuMachine) -> bytes:
    return bytes.fromhex(machine.run("head -c 32 /dev/urandom | hexdump -v -e '1/1 \"%02x\"'",
                                     timeout=60, check=True).output.strip())


def test_restores_share_a_template_with_fresh_rng_and_clock(
    vfio_user_provisioned: Provisioned, tmp_path: Path
) -> None:
    seen: list[bytes] = []
    templates = set()
    for i in range(2):
        with QemuMachine(vfio_user_provisioned, cold_boot=False, memory_mib=256,
                         workdir=tmp_path / f"g{i}", name=f"restore{i}") as m:
            assert m.restored and m.template is not None
            templates.add(m.template.folder)
            if i == 1:
                assert not m.template_made  # the second one found the first one's template
            assert "-incoming" not in m.template.meta()["inputs"]["argv"]
            console = m.console_text()
            assert BOOT_MARKER in console and RESTORE_MARKER in console
            # vmgenid: a new VM generation id made Linux reseed its RNG at once
            assert "crng reseeded due to virtual machine fork" in m.run("dmesg").output
            seen.append(urandom(m))
            guest_now = int(m.run("date +%s", check=True).output)
            assert abs(guest_now - time.time()) < 60
    assert len(templates) == 1
    assert seen[0] != seen[1]


def test_devices_are_there_when_start_returns(
    vfio_user_provisioned: Provisioned, tmp_path: Path
) -> None:
    servers = [Server(SampleDevice(), tmp_path / f"d{i}.sock").start() for i in range(2)]
    try:
        with QemuMachine(vfio_user_provisioned, sockets=[str(s.path) for s in servers],
                         cold_boot=False, workdir=tmp_path / "g", name="restore-two") as m:
            assert m.restored
            # no waiting: both enumerated, behind the kit's root ports, BARs assigned
            out = m.run("grep -l 0x7000 /sys/bus/pci/devices/*/device", check=True).output
            paths = sorted(line.rsplit("/", 1)[0] for line in out.split())
            assert [p.rsplit("/", 1)[1] for p in paths] == ["0000:01:00.0", "0000:02:00.0"]
            for p in paths:
                first = m.run(f"head -1 {p}/resource", check=True).output.split()
                assert int(first[0], 16) != 0  # BAR0 assigned
            for s in servers:
                assert s.wait_for_client(30) is not None
    finally:
        for s in servers:
            s.close()


def test_restore_with_pci_nomsi(vfio_user_provisioned: Provisioned, tmp_path: Path) -> None:
    # The kit's settle rescans the root port's bus itself: it needs no hot-plug interrupt.
    # (It used to wait for pciehp, which gets no interrupt on QEMU's root ports without MSI,
    # until the boot timeout.)
    server = Server(SampleDevice(), tmp_path / "d.sock").start()
    try:
        with QemuMachine(vfio_user_provisioned, sockets=[str(server.path)], cold_boot=False,
                         cmdline="pci=nomsi", workdir=tmp_path / "g", name="nomsi") as m:
            assert m.restored
            assert "pci=nomsi" in m.run("cat /proc/cmdline", check=True).output
            dev = m.run("grep -l 0x7000 /sys/bus/pci/devices/*/device", check=True)
            path = dev.output.strip().rsplit("/", 1)[0]
            assert int(m.run(f"head -1 {path}/resource", check=True).output.split()[0], 16)
            assert "MSI" not in m.run("cat /proc/interrupts", check=True).output
    finally:
        server.close()


@pytest.mark.vfio_user_devices(devices=[UserDevice])
def test_user_device_class_in_the_marker(guest: Guest) -> None:
    # restored unless the run asks for cold boots ($PYVFIO_COLD_BOOT, as ci/test does)
    cold_run = os.environ.get("PYVFIO_COLD_BOOT", "") not in ("", "0")
    assert guest.started_machine.restored is not cold_run
    assert isinstance(guest.device, UserDevice)
    assert "0x7001" in guest.run("cat /sys/bus/pci/devices/*/device", check=True).output


@pytest.mark.vfio_user_devices("sample", cold_boot=True)
def test_marker_opts_out_into_a_cold_boot(guest: Guest) -> None:
    assert not guest.started_machine.restored
    assert "0x7000" in guest.run("cat /sys/bus/pci/devices/*/device", check=True).output
