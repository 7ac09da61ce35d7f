"""Soak with a guest: reboots, and hot-unplug/re-plug cycles, leave the server as it was.

The server is the installed ``vfio-user-server`` in its own process (its fds, memory mappings,
threads and RSS are read from /proc). After the cycles, fds, mappings and threads are back to the
baseline and RSS grew by less than 1 MiB.

* reboots: the guest reboots (``reboot -f``) and probes the device again each time, over one
  vfio-user connection (QEMU resets the device, it does not reconnect);
* hot-unplug/re-plug: ``device_del`` / ``device_add`` through QMP into a PCIe root port; each
  plug is a new connection. The device has no MSI-X: QEMU 11.1.3 aborts on unplug of a
  vfio-user device with MSI-X (docs/qemu-issues.md, tests/e2e/test_hotplug.py).

A few cycles of each run in the normal suite; ``PYVFIO_SOAK=1`` runs 100 reboots and 50
unplug/re-plug cycles (``PYVFIO_SOAK_REBOOTS`` / ``PYVFIO_SOAK_PLUGS`` for other numbers).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from supervised import Resources, ServerProcess, wait_for

from vfio_user_server.sample import ID_VALUE
from vfio_user_server.testing.guest import QemuMachine, VfioUserDevice
from vfio_user_server.testing.provision import Provisioned

pytestmark = pytest.mark.e2e

LONG = os.environ.get("PYVFIO_SOAK") == "1"
REBOOTS = int(os.environ.get("PYVFIO_SOAK_REBOOTS", "100" if LONG else "3"))
PLUGS = int(os.environ.get("PYVFIO_SOAK_PLUGS", "50" if LONG else "3"))
RSS_GROWTH_LIMIT_KIB = 1024
GUEST_WAIT = 120.0
HERE = Path(__file__).resolve().parent


def sample_ids(guest: QemuMachine) -> list[str]:
    return guest.run("cat /sys/bus/pci/devices/*/device").output.split()


def read_id(guest: QemuMachine) -> int:
    out = guest.run("grep -l 0x7000 /sys/bus/pci/devices/*/device", check=True).output
    path = out.split()[0].rsplit("/", 1)[0]
    guest.run(f"echo 1 > {path}/enable", check=True)
    base = int(guest.run(f"cut -d' ' -f1 {path}/resource | head -1", check=True).output, 16)
    return int(guest.run(f"devmem {base:#x} 32", check=True).output, 16)


def guest_sees(guest: QemuMachine, present: bool) -> Callable[[], bool]:
    return lambda: ("0x7000" in sample_ids(guest)) is present


def check(srv: ServerProcess, what: str, n: int, baseline: Resources) -> None:
    """Once the server settles after ``n`` ``what``: print its figures, and check its fds, maps
    and threads are back to ``baseline`` and its RSS grew less than the limit."""
    after = srv.settle(baseline)
    print(f"\nsoak: {n} {what}; server before {baseline}, after {after}; RSS growth "
          f"{after.rss_kib - baseline.rss_kib} KiB", flush=True)
    assert after.back_to(baseline), (baseline, after)
    assert after.rss_kib - baseline.rss_kib < RSS_GROWTH_LIMIT_KIB, (baseline, after)


def test_guest_reboots_leave_the_server_as_it_was(vfio_user_provisioned: Provisioned,
                                                  tmp_path: Path) -> None:
    srv = ServerProcess.serving(tmp_path / "reboot.sock", "sample")
    try:
        with QemuMachine(vfio_user_provisioned, sockets=[str(srv.sock)], no_reboot=False,
                         workdir=tmp_path / "guest", name="soak-reboot") as guest:
            assert read_id(guest) == ID_VALUE
            guest.reboot()  # warm-up: the first reset's paths run once before the baseline
            assert read_id(guest) == ID_VALUE
            baseline = srv.resources()
            t0 = time.monotonic()
            for i in range(REBOOTS):
                guest.reboot()
                assert read_id(guest) == ID_VALUE, f"after reboot {i + 1}"
                if LONG and i % 10 == 9:
                    print(f"\nsoak: {i + 1} reboots in {time.monotonic() - t0:.0f} s, "
                          f"{srv.resources()}", flush=True)
            check(srv, "guest reboots", REBOOTS, baseline)
    finally:
        srv.finish()


def test_hot_unplug_replug_cycles_leave_the_server_as_it_was(
        vfio_user_provisioned: Provisioned, tmp_path: Path) -> None:
    srv = ServerProcess.serving(tmp_path / "plug.sock", "soak_devices:NoMsixSample",
                                env={"PYTHONPATH": str(HERE)})
    try:
        with QemuMachine(
            vfio_user_provisioned,
            extra_args=["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1"],
            workdir=tmp_path / "guest", name="soak-plug",
        ) as guest:
            idle = srv.resources()

            def cycle(n: int) -> None:
                dev_id = guest.attach(VfioUserDevice(str(srv.sock), id=f"hp{n}",
                                                     props={"bus": "rp1"}))
                wait_for(guest_sees(guest, True), f"plug {n} in the guest", GUEST_WAIT)
                assert read_id(guest) == ID_VALUE
                guest.detach(dev_id)
                wait_for(guest_sees(guest, False), f"unplug {n} in the guest", GUEST_WAIT)
                # the server has let the client go when it is back to its idle threads and fds
                wait_for(lambda: srv.resources().threads == idle.threads
                         and srv.resources().fds == idle.fds, f"the server to idle after {n}",
                         GUEST_WAIT)

            cycle(0)  # warm-up
            baseline = srv.resources()
            t0 = time.monotonic()
            for i in range(1, PLUGS + 1):
                cycle(i)
                if LONG and i % 10 == 0:
                    print(f"\nsoak: {i} plug cycles in {time.monotonic() - t0:.0f} s, "
                          f"{srv.resources()}", flush=True)
            check(srv, "hot-unplug/re-plug cycles", PLUGS, baseline)
    finally:
        srv.finish()
