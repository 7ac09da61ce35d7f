"""edu's MSI, taken by a real Linux guest.

``uio_pci_generic`` (test_edu_guest.py) only knows INTx, so here the guest drives edu through
vfio-pci behind a virtual IOMMU (Debian's kernel has no VFIO no-IOMMU mode; see e2e_sample.py)
with ``vfiotest``: it enables MSI with an eventfd, raises edu's interrupt (write 0x60), and
counts what arrives. The factorial's completion interrupt arrives the same way.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_sample import GUEST_MODULES, IOMMU_ARGS, IOMMU_CMDLINE

from vfio_user_devices.edu import Edu
from vfio_user_server.server import Server
from vfio_user_server.testing.guest import QemuMachine
from vfio_user_server.testing.guestprog import guest_program
from vfio_user_server.testing.provision import Provisioned

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def edu_vfio(vfio_user_provisioned: Provisioned) -> Iterator[tuple[QemuMachine, Edu]]:
    folder = Path(tempfile.mkdtemp(prefix="pyvfio-edu-msi-", dir="/tmp"))
    device = Edu()
    server = Server(device, folder / "edu.sock").start()
    machine = QemuMachine(
        vfio_user_provisioned,
        sockets=[str(folder / "edu.sock")],
        modules=GUEST_MODULES,
        files={"/bin/vfiotest": guest_program("vfiotest")},
        extra_args=IOMMU_ARGS,
        cmdline=IOMMU_CMDLINE,
        workdir=folder / "guest",
        name="edu-msi",
    )
    try:
        machine.start()
        yield machine, device
    finally:
        machine.close()
        server.close()


def parse(line: str) -> dict[str, str]:
    return dict(word.partition("=")[::2] for word in line.split())


def test_edu_msi_reaches_the_guest(edu_vfio: tuple[QemuMachine, Edu]) -> None:
    machine, device = edu_vfio
    # raise interrupt status bit 0 (register 0x60): edu sends its MSI
    out = machine.run("vfiotest -i 1234:11e8 irq msi 0 'write 0 0x60 4 1' 5000", timeout=60)
    assert out.ok, out.output
    result = parse(out.output.strip().splitlines()[-1])
    assert result["type"] == "msi" and int(result["count"]) >= 1, out.output
    assert device.msi is not None and device.msi.enabled is False  # vfiotest closed it again


def test_edu_factorial_completion_msi(edu_vfio: tuple[QemuMachine, Edu]) -> None:
    machine, device = edu_vfio
    # status 0x80 asks for an interrupt on completion; writing 0x08 starts the factorial. Both
    # in one open of the device: behind a root port (a hot-plugged device) vfio-pci resets it
    # with a secondary bus reset on every open.
    out = machine.run(
        "vfiotest -i 1234:11e8 irq msi 0 'write 0 0x20 4 0x80; write 0 0x08 4 5' 5000",
        timeout=60,
    )
    assert out.ok, out.output
    assert int(parse(out.output.strip().splitlines()[-1])["count"]) >= 1, out.output
    assert ("fact", 5) in device.completed
