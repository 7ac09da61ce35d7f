"""QEMU's edu device, served by us, driven from a real Linux guest by ``edu_test``.

``edu_test`` (a static C program from ``vfio_user_server/testing/guest_programs/``, built by
:mod:`vfio_user_server.testing.guestprog`) binds the device to uio_pci_generic for its INTx,
maps BAR0 through sysfs, and uses /proc/self/pagemap for the physical address of a locked page
(no IOMMU: the device sees guest-physical addresses). It checks the ID and liveness registers,
a factorial with its completion interrupt, a raised/acknowledged interrupt, and a 4 KiB random
buffer moved by DMA to the device and back, each DMA ending with interrupt 0x100.

Twice: guest RAM a shared memfd (the server maps it) and plain RAM (no fd: DMA_READ/DMA_WRITE
messages, which must run on the device's worker, never on the server's loop thread).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vfio_user_devices.edu import Edu
from vfio_user_server.server import Server
from vfio_user_server.testing.guest import QemuMachine
from vfio_user_server.testing.guestprog import guest_program
from vfio_user_server.testing.provision import provision

pytestmark = pytest.mark.e2e


@dataclass
class EduGuest:
    machine: QemuMachine
    device: Edu
    messages: list[str]

    def sh(self, command: str, timeout: float = 120.0) -> str:
        result = self.machine.run(command, timeout=timeout)
        assert result.ok, f"{command!r} failed ({result.status}):\n{result.output}"
        return result.output

    def edu_test(self, *args: str) -> dict[str, dict[str, str]]:
        """Run edu_test; return its lines as {first word: {key: value}}."""
        out = self.sh("edu_test " + " ".join(args))
        steps: dict[str, dict[str, str]] = {}
        for line in out.splitlines():
            words = line.split()
            if not words:
                continue
            name = words[0].partition("=")[0]
            steps[name] = dict(w.partition("=")[::2] for w in words)
        return steps


def fnv1a(data: bytes) -> int:
    h = 2166136261
    for byte in data:
        h = (h ^ byte) * 16777619 & 0xFFFFFFFF
    return h


@pytest.fixture(scope="module", params=[True, False], ids=["memfd-ram", "plain-ram"])
def edu(request: pytest.FixtureRequest) -> Iterator[EduGuest]:
    shared: bool = request.param
    folder = Path(tempfile.mkdtemp(prefix="pyvfio-edu-", dir="/tmp"))
    device = Edu()
    messages: list[str] = []

    def trace(line: str) -> None:
        if "DMA_READ" in line or "DMA_WRITE" in line:
            messages.append(line)

    server = Server(device, folder / "edu.sock", trace=trace).start()
    try:
        with QemuMachine(
            provision(),
            sockets=[str(folder / "edu.sock")],
            modules=["uio_pci_generic"],
            files={"/bin/edu_test": guest_program("edu_test")},
            shared_memory=shared,
            name=f"e2e-edu-{'memfd' if shared else 'plain'}",
        ) as machine:
            yield EduGuest(machine, device, messages)
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_guest_sees_the_edu_device(edu: EduGuest) -> None:
    found = edu.sh("grep -l 0x11e8 /sys/bus/pci/devices/*/device").split()
    assert len(found) == 1
    folder = found[0].rsplit("/", 1)[0]
    ids = edu.sh(f"cat {folder}/vendor {folder}/class {folder}/revision").split()
    assert ids == ["0x1234", "0xff0000", "0x10"]


def test_factorial_interrupts_and_dma_round_trip(edu: EduGuest) -> None:
    dev = edu.device
    steps = edu.edu_test("-n", "12")
    assert steps["id"]["id"] == "0x010000ed"
    assert steps["liveness"]["liveness"] == "0xedcba987"
    assert steps["factorial"]["result"] == "479001600"
    assert steps["factorial"]["irq_status"] == "0x1"
    assert steps["raise"]["irq_status"] == "0x40"
    assert steps["dma"]["roundtrip"] == "ok"
    assert int(steps["ok"]["interrupts"]) >= 4  # factorial, raise, two DMAs
    # what the guest sent is what the device holds
    assert int(steps["dma"]["checksum"], 16) == fnv1a(bytes(dev.dma_buffer))
    phys = int(steps["dma"]["phys"], 16)
    assert ("fact", 12) in dev.completed
    assert [c for k, c in dev.completed if k == "dma"][-2:] == [0x5, 0x7]
    assert dev.irq_status == 0 and not dev.intx_level
    # the guest counted the interrupts on uio_pci_generic's line
    counts = [int(line.split()[1]) for line in edu.sh("cat /proc/interrupts").splitlines()
              if line.rstrip().endswith("uio_pci_generic")]
    assert counts and counts[0] >= 4
    # plain RAM has no fd: the DMA went by messages (and worked, so not on the loop thread)
    if not edu.machine.shared_memory:
        assert edu.messages, "expected DMA_READ/DMA_WRITE messages"
    else:
        assert not edu.messages
    assert phys < 1 << 28


def test_second_run_wrapping_factorial(edu: EduGuest) -> None:
    steps = edu.edu_test("-n", "20")
    assert steps["factorial"]["result"] == str(2432902008176640000 % 2**32)
    assert steps["dma"]["roundtrip"] == "ok"
