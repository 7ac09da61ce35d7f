"""A mapped register page, read and written by a real guest without a message to the server.

Our edu with ``--mapped-scratch``: BAR0 0x1000..0x1fff is a memfd page announced with the
sparse-mmap capability; QEMU maps it into the guest. The guest writes and reads it with
busybox ``devmem`` (through /dev/mem at the BAR's physical address), the test reads and writes
the device's side of the same memory, and the server's trace shows no REGION_READ/WRITE for the
page, while the trapped registers of page 0 still go through the server, never posted (QEMU
turns posted writes off for a device with a mappable region).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vfio_user_devices.edu import EDU_ID, SCRATCH_OFFSET, Edu
from vfio_user_server.server import Server
from vfio_user_server.testing.guest import QemuMachine
from vfio_user_server.testing.provision import provision

pytestmark = pytest.mark.e2e

ACCESS = re.compile(r"REGION_(READ|WRITE) req.*offset=(0x[0-9a-f]+) region=0 ")


@dataclass
class MappedGuest:
    machine: QemuMachine
    device: Edu
    trace: list[str]
    bar0: int

    def sh(self, command: str) -> str:
        result = self.machine.run(command, timeout=120.0)
        assert result.ok, f"{command!r} failed ({result.status}):\n{result.output}"
        return result.output.strip()

    def bar_accesses(self) -> list[tuple[str, int, bool]]:
        """(READ/WRITE, offset, posted) of every trapped BAR0 access so far."""
        out = []
        for line in list(self.trace):
            m = ACCESS.search(line)
            if m:
                out.append((m.group(1), int(m.group(2), 16), "no-reply" in line))
        return out


@pytest.fixture(scope="module")
def guest() -> Iterator[MappedGuest]:
    folder = Path(tempfile.mkdtemp(prefix="pyvfio-mapped-", dir="/tmp"))
    device = Edu(mapped_scratch=True)
    trace: list[str] = []
    server = Server(device, folder / "edu.sock", trace=trace.append).start()
    try:
        with QemuMachine(provision(), sockets=[str(folder / "edu.sock")],
                         name="e2e-mapped-edu") as machine:
            g = MappedGuest(machine, device, trace, 0)
            found = g.sh("grep -l 0x11e8 /sys/bus/pci/devices/*/device").split()
            assert len(found) == 1
            folder_sys = found[0].rsplit("/", 1)[0]
            g.bar0 = int(g.sh(f"head -n 1 {folder_sys}/resource").split()[0], 16)
            assert g.bar0, "BAR0 has no address"
            # memory decoding on (no driver binds edu here)
            g.sh(f"printf '\\006' | dd of={folder_sys}/config bs=1 seek=4 count=1 "
                 "conv=notrunc 2>/dev/null")
            yield g
    finally:
        server.close()
        device.mapped(0).close()
        shutil.rmtree(folder, ignore_errors=True)


def test_guest_writes_and_reads_the_mapped_page_without_messages(guest: MappedGuest) -> None:
    mem = guest.device.mapped(0)
    page = guest.bar0 + SCRATCH_OFFSET
    before = len(guest.bar_accesses())
    guest.sh(f"devmem {page + 0x10:#x} 32 0x5eed1234")
    assert mem.u32(SCRATCH_OFFSET + 0x10) == 0x5EED1234
    mem.set_u32(SCRATCH_OFFSET + 0x20, 0xC0FFEE11)
    assert int(guest.sh(f"devmem {page + 0x20:#x} 32"), 16) == 0xC0FFEE11
    mem.set_u64(SCRATCH_OFFSET + 0x28, 0x0123456789ABCDEF)
    assert int(guest.sh(f"devmem {page + 0x28:#x} 64"), 16) == 0x0123456789ABCDEF
    in_page = [a for a in guest.bar_accesses()[before:]
               if SCRATCH_OFFSET <= a[1] < SCRATCH_OFFSET + 0x1000]
    assert not in_page, f"accesses to the mapped page reached the server: {in_page}"


def test_trapped_registers_still_reach_the_device_unposted(guest: MappedGuest) -> None:
    before = len(guest.bar_accesses())
    assert int(guest.sh(f"devmem {guest.bar0:#x} 32"), 16) == EDU_ID
    guest.sh(f"devmem {guest.bar0 + 4:#x} 32 0x12345678")
    assert int(guest.sh(f"devmem {guest.bar0 + 4:#x} 32"), 16) == 0xEDCBA987
    seen = guest.bar_accesses()[before:]
    assert ("READ", 0, False) in seen
    writes = [a for a in seen if a[0] == "WRITE" and a[1] == 4]
    assert writes and not any(posted for _, _, posted in writes), \
        f"QEMU posted a write to a device with a mapped region: {writes}"
