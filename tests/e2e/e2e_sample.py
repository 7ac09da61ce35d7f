"""Helpers for test_sample_guest.py: the sample device served here, a guest driving it.

The guest drives the device from userspace with ``vfiotest`` (a static C program built by
:mod:`vfio_user_server.testing.guestprog`) through VFIO. The Debian guest kernel has no VFIO
no-IOMMU mode (``CONFIG_VFIO_NOIOMMU`` is off), so the guest gets a virtual IOMMU:
``intel-iommu`` with interrupt remapping (multi-vector MSI needs it on x86) and
``caching-mode=on`` (QEMU needs it to tell vfio-user about the guest's IOMMU maps). DMA
addresses the device sees are IOVAs the guest mapped with ``VFIO_IOMMU_MAP_DMA``; QEMU sends
them to the server as DMA_MAP (with the memfd when RAM is shared) or leaves the server to use
DMA_READ/DMA_WRITE messages (RAM with no fd).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vfio_user_server.sample import SampleDevice
from vfio_user_server.server import Server
from vfio_user_server.testing.guest import QemuMachine, Result
from vfio_user_server.testing.provision import Provisioned

#: Guest modules: vfio-pci (pulls in vfio, vfio-pci-core, irqbypass) and the type 1 IOMMU
#: backend (not a dependency of vfio-pci, so named explicitly).
GUEST_MODULES = ["vfio-pci", "vfio_iommu_type1"]
IOMMU_ARGS = ["-device", "intel-iommu,intremap=on,caching-mode=on"]
IOMMU_CMDLINE = "intel_iommu=on"


@dataclass
class DmaRecord:
    """One DMA the sample device ran, as seen on the server side."""

    cmd: int
    addr: int
    length: int
    data: bytes
    #: whether the whole range was fd-backed (direct) in the DMA table when it ran
    direct: bool
    #: number of DMA maps in the table then, and how many of them were direct
    maps: int
    direct_maps: int
    #: whether the whole range was zero-copy (files sealed against shrinking) then
    zero_copy: bool = False


class RecordingSample(SampleDevice):
    """The sample device, recording each DMA (the buffer is reset when the guest's vfio-pci
    closes the device, so tests look here instead of at ``buffer``)."""

    def __init__(self) -> None:
        self.dma_log: list[DmaRecord] = []
        super().__init__()

    def _run_dma(self, cmd: int, addr: int, length: int) -> None:
        ctx = self._ctx
        direct = zero_copy = False
        maps = direct_maps = 0
        if ctx is not None:
            direct = ctx.table.is_direct(addr, length)
            zero_copy = ctx.table.is_zero_copy(addr, length)
            all_maps = ctx.table.maps()
            maps = len(all_maps)
            direct_maps = sum(1 for m in all_maps if m.direct)
        super()._run_dma(cmd, addr, length)
        with self.lock:
            data = bytes(self.buffer[:length])
        self.dma_log.append(
            DmaRecord(cmd & 0xFF, addr, length, data, direct, maps, direct_maps, zero_copy)
        )


@dataclass
class SampleGuest:
    """A booted guest with the sample device attached; ``run`` runs a shell command in it."""

    machine: QemuMachine
    device: RecordingSample
    server: Server
    trace: list[str] = field(default_factory=list)
    trace_lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, command: str, timeout: float = 60.0) -> Result:
        return self.machine.run(command, timeout=timeout)

    def vfiotest(self, *args: str, timeout: float = 60.0) -> dict[str, str]:
        """Run ``vfiotest ARGS`` and return its "key=value" words (asserts it succeeded)."""
        quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
        result = self.machine.run(f"vfiotest {quoted}", timeout=timeout)
        assert result.ok, f"vfiotest {quoted} failed ({result.status}):\n{result.output}"
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert lines, f"vfiotest {quoted} printed nothing"
        return parse_words(lines[-1])

    def trace_lines(self, needle: str) -> list[str]:
        with self.trace_lock:
            return [line for line in self.trace if needle in line]


def parse_words(line: str) -> dict[str, str]:
    words = line.split()
    out = {"_": words[0]} if words else {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        out[key] = value if sep else ""
    return out


def boot_sample_guest(
    prov: Provisioned,
    vfiotest: Path,
    *,
    shared_memory: bool = True,
    no_reboot: bool = True,
    name: str = "e2e-sample",
    extra_args: Sequence[str] = (),
    cold_boot: bool | None = None,
) -> Iterator[SampleGuest]:
    """Serve a RecordingSample on a fresh socket and boot a guest with it attached."""
    folder = Path(tempfile.mkdtemp(prefix="pyvfio-e2e-", dir="/tmp"))
    device = RecordingSample()
    trace: list[str] = []
    lock = threading.Lock()

    def sink(line: str) -> None:
        with lock:
            trace.append(line)

    server = Server(device, folder / "sample.sock", trace=sink).start()
    try:
        with QemuMachine(
            prov,
            sockets=[str(folder / "sample.sock")],
            modules=GUEST_MODULES,
            files={"/bin/vfiotest": vfiotest},
            shared_memory=shared_memory,
            cmdline=IOMMU_CMDLINE,
            extra_args=[*IOMMU_ARGS, *extra_args],
            no_reboot=no_reboot,
            name=name,
            cold_boot=cold_boot,
        ) as machine:
            yield SampleGuest(machine, device, server, trace, lock)
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)
