"""End to end: a Linux guest under QEMU's vfio-user-pci drives the sample device served here.

The guest uses ``vfiotest`` (vfio_user_server/testing/guest_programs/vfiotest.c) through VFIO with a
virtual IOMMU (see conftest). These tests never skip: a provisioning, build or boot failure
fails them. Note that every ``vfiotest`` run opens the device through vfio-pci, which resets
it (PCIe FLR): device state does not survive from one run to the next, so each check is done
within one run or on what the server recorded.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_sample import SampleGuest, boot_sample_guest

from vfio_user_server.sample import (
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    ID_VALUE,
    REG_ID,
    REG_INTX,
    REG_IRQ,
    REG_SCRATCH,
    SampleDevice,
)
from vfio_user_server.testing.guestprog import guest_program
from vfio_user_server.testing.provision import Provisioned, provision

pytestmark = pytest.mark.e2e

MSIX_TABLE = 0x2000


@pytest.fixture(scope="module")
def prov() -> Provisioned:
    return provision()


@pytest.fixture(scope="module")
def vfiotest_binary() -> Path:
    return guest_program("vfiotest")


@pytest.fixture(scope="module")
def sample_guest(prov: Provisioned, vfiotest_binary: Path) -> Iterator[SampleGuest]:
    """Guest RAM is a shared memfd: the server gets fds and maps guest memory directly."""
    yield from boot_sample_guest(prov, vfiotest_binary, shared_memory=True, name="e2e-memfd")


@pytest.fixture(scope="module")
def plain_ram_guest(prov: Provisioned, vfiotest_binary: Path) -> Iterator[SampleGuest]:
    """Guest RAM with no fd (plain ``-m``): the server must use DMA_READ/DMA_WRITE messages."""
    yield from boot_sample_guest(prov, vfiotest_binary, shared_memory=False, name="e2e-plain")


@pytest.fixture(scope="module")
def shm_file_guest(prov: Provisioned, vfiotest_binary: Path) -> Iterator[SampleGuest]:
    """Guest RAM from a shared file on tmpfs (``memory-backend-file``, no seals): the server
    maps it and reaches it by guarded copies, still without DMA messages."""
    fd, name = tempfile.mkstemp(prefix="pyvfio-e2e-ram-", dir="/dev/shm")
    os.close(fd)
    try:
        yield from boot_sample_guest(
            prov, vfiotest_binary, shared_memory=False, name="e2e-shm-file",
            extra_args=["-object", f"memory-backend-file,id=mem,size=512M,mem-path={name},"
                        "share=on", "-machine", "memory-backend=mem"])
    finally:
        os.unlink(name)


def pattern(seed: int, length: int) -> bytes:
    """The byte pattern vfiotest uses (see vfiotest.c)."""
    return bytes((seed * 31 + i * 7 + (i >> 8)) & 0xFF for i in range(length))


def device_dir(g: SampleGuest) -> str:
    out = g.run("grep -l 0x7000 /sys/bus/pci/devices/*/device").output.split()
    paths = [p.rsplit("/", 1)[0] for p in out if p.startswith("/sys/")]
    candidates = [
        p for p in paths if g.run(f"cat {p}/vendor").output.strip() == "0x1b36"
    ]
    assert len(candidates) == 1, f"expected one 1b36:7000 device, guest has {out}"
    return candidates[0]


def new_accesses(g: SampleGuest, start: int) -> list[tuple[str, int, int, int, int]]:
    """BAR accesses since ``start`` (the MSI-X table/PBA area, QEMU's business, left out)."""
    with g.device.lock:
        found = g.device.accesses[start:]
    return [a for a in found if not (a[1] == 0 and a[2] >= MSIX_TABLE)]


# ------------------------------------------------------------------------------------------
# Enumeration and config space


def test_guest_enumerates_the_device(sample_guest: SampleGuest) -> None:
    g = sample_guest
    path = device_dir(g)
    ids = g.run(
        f"cat {path}/vendor {path}/device {path}/class {path}/subsystem_vendor "
        f"{path}/subsystem_device {path}/revision"
    )
    assert ids.ok, ids.output
    assert ids.output.split() == [
        "0x1b36", "0x7000", "0xff0000", "0x1b36", "0x0001", "0x01"
    ]
    assert g.machine.boot_time is not None


def _cap_offsets(cfg: bytes) -> dict[int, int]:
    caps: dict[int, int] = {}
    pos = cfg[0x34] & 0xFC
    seen = 0
    while pos and seen < 48:
        caps.setdefault(cfg[pos], pos)
        pos = cfg[pos + 1] & 0xFC
        seen += 1
    return caps


def _qemu_emulated(cfg: bytes) -> set[int]:
    """Config bytes QEMU's vfio-pci emulates (so the guest may see other values than ours)."""
    skip: set[int] = set()
    skip |= set(range(0x04, 0x08))  # command, status
    skip |= set(range(0x10, 0x28))  # BARs
    skip |= set(range(0x30, 0x34))  # expansion ROM BAR
    skip.add(0x3C)  # interrupt line
    caps = _cap_offsets(cfg)
    if 0x05 in caps:  # MSI: control's enable/size bits, address, data, mask, pending
        msi = caps[0x05]
        skip |= set(range(msi + 2, msi + 24))
    if 0x11 in caps:  # MSI-X: control (enable, function mask)
        msix = caps[0x11]
        skip |= {msix + 2, msix + 3}
    if 0x10 in caps:
        # PCI Express: QEMU turns an endpoint on a root bus into a root-complex integrated
        # endpoint (device/port type in the capabilities register) and clears the link
        # registers (hw/vfio/pci.c vfio_setup_pcie_cap).
        exp = caps[0x10]
        skip |= {exp + 2}
        skip |= set(range(exp + 0x0C, exp + 0x14))  # link capabilities, control, status
        skip |= set(range(exp + 0x2C, exp + 0x34))  # link capabilities 2, control 2, status 2
    return skip


def test_config_space_matches_the_server(sample_guest: SampleGuest) -> None:
    g = sample_guest
    path = device_dir(g)
    dump = g.run(f"hexdump -v -e '16/1 \"%02x \" \"\\n\"' {path}/config")
    assert dump.ok, dump.output
    guest_cfg = bytes(int(b, 16) for b in dump.output.split())
    assert len(guest_cfg) >= 256
    with g.device.lock:
        ours = g.device.config.read(0, 256)
    skip = _qemu_emulated(ours)
    assert len(skip) < 80  # most of the header and capabilities are compared
    diffs = [
        f"{i:#04x}: guest {guest_cfg[i]:#04x} server {ours[i]:#04x}"
        for i in range(256)
        if i not in skip and guest_cfg[i] != ours[i]
    ]
    assert not diffs, "config space differs:\n" + "\n".join(diffs)
    # And the parts QEMU emulates still say the same about the device's resources.
    assert _cap_offsets(guest_cfg) == _cap_offsets(ours)
    assert guest_cfg[0x10] & 0x7 == ours[0x10] & 0x7 == 0x4  # BAR0: 64-bit memory
    assert guest_cfg[0x18] & 0x1 == ours[0x18] & 0x1 == 0x1  # BAR2: I/O
    assert guest_cfg[0x3D] == ours[0x3D] == 1  # INTA


# ------------------------------------------------------------------------------------------
# BAR accesses


@pytest.mark.parametrize("verb", ["", "m"], ids=["pread", "mmap"])
def test_bar0_accesses_reach_the_handlers(sample_guest: SampleGuest, verb: str) -> None:
    g = sample_guest
    start = len(g.device.accesses)
    out = g.vfiotest(f"{verb}read", "0", str(REG_ID), "4")
    assert int(out["value"], 16) == ID_VALUE
    assert new_accesses(g, start) == [("r", 0, REG_ID, 4, ID_VALUE)]

    for width, offset, value in ((4, REG_SCRATCH, 0x12345678), (2, REG_SCRATCH + 2, 0xBEEF),
                                 (1, REG_SCRATCH + 1, 0x5A), (8, 0x10, 0x1122334455667788)):
        start = len(g.device.accesses)
        out = g.vfiotest(f"{verb}write", "0", hex(offset), str(width), hex(value))
        assert "ok" in out
        assert new_accesses(g, start) == [("w", 0, offset, width, value)]

    # A write then a read in one run (vfio-pci resets the device between runs).
    start = len(g.device.accesses)
    out = g.vfiotest(f"{verb}read", "0", "0x24", "4")  # WRITES: none since the reset
    assert int(out["value"], 16) == 0
    assert new_accesses(g, start) == [("r", 0, 0x24, 4, 0)]


def test_bar2_io_accesses_reach_the_handlers(sample_guest: SampleGuest) -> None:
    g = sample_guest
    start = len(g.device.accesses)
    g.vfiotest("write", "2", "0", "4", "0xcafe0042")
    g.vfiotest("read", "2", "0", "2")
    g.vfiotest("write", "2", "4", "1", "0x7")
    assert new_accesses(g, start) == [
        ("w", 2, 0, 4, 0xCAFE0042),
        ("r", 2, 0, 2, 0),  # reset by vfio-pci's FLR in between
        ("w", 2, 4, 1, 7),
    ]


# ------------------------------------------------------------------------------------------
# Interrupts


@pytest.mark.parametrize(
    ("kind", "vector"), [("msix", 0), ("msix", 3), ("msi", 0), ("msi", 1)]
)
def test_message_interrupt_reaches_the_guest(
    sample_guest: SampleGuest, kind: str, vector: int
) -> None:
    g = sample_guest
    start = len(g.device.accesses)
    out = g.vfiotest("irq", kind, str(vector), f"write 0 {REG_IRQ:#x} 4 {vector}", "5000")
    assert out["_"] == "irq" and out["type"] == kind
    assert int(out["vector"]) == vector
    assert int(out["count"]) == 1
    assert ("w", 0, REG_IRQ, 4, vector) in new_accesses(g, start)


def test_intx_reaches_the_guest_and_refires_after_unmask(sample_guest: SampleGuest) -> None:
    g = sample_guest
    start = len(g.device.accesses)
    out = g.vfiotest("irq", "intx", "0", f"write 0 {REG_INTX:#x} 4 1", "5000")
    assert int(out["count"]) == 1
    # The line stays asserted: after vfio-pci's unmask it fires again.
    assert int(out["after_unmask"]) >= 1
    assert ("w", 0, REG_INTX, 4, 1) in new_accesses(g, start)
    # Deassert (vfio-pci's reset on the next open clears it too).
    g.vfiotest("write", "0", hex(REG_INTX), "4", "0")
    assert not g.device.intx_level


# ------------------------------------------------------------------------------------------
# DMA


def _check_dma_both_ways(g: SampleGuest, *, direct: bool) -> None:
    # guest memory -> device
    before = len(g.device.dma_log)
    out = g.vfiotest("dma-to-device", "2048", "11")
    sent = pattern(11, 2048)
    assert bytes.fromhex(out["hex"]) == sent
    records = g.device.dma_log[before:]
    assert len(records) == 1
    rec = records[0]
    assert rec.cmd == DMA_TO_DEVICE
    assert rec.addr == int(out["iova"], 16) and rec.length == 2048
    assert rec.data == sent  # what the server read from guest memory
    assert rec.direct is direct

    # device -> guest memory (the guest fills the device buffer through BAR writes first)
    before = len(g.device.dma_log)
    out = g.vfiotest("dma-from-device", "1024", "77")
    wanted = pattern(77, 1024)
    assert bytes.fromhex(out["hex"]) == wanted  # what the guest found in its memory
    records = g.device.dma_log[before:]
    assert len(records) == 1
    rec = records[0]
    assert rec.cmd == DMA_FROM_DEVICE
    assert rec.length == 1024 and rec.data == wanted
    assert rec.direct is direct


def test_dma_both_ways_with_shared_memory(sample_guest: SampleGuest) -> None:
    g = sample_guest
    reads = len(g.trace_lines(" DMA_READ "))
    writes = len(g.trace_lines(" DMA_WRITE "))
    _check_dma_both_ways(g, direct=True)
    assert g.device.dma_log[-1].direct_maps >= 1
    # QEMU's memfd backend seals its RAM against shrinking: zero-copy, no guarded copy.
    assert all(rec.zero_copy for rec in g.device.dma_log[-2:])
    # Direct access through the memfd: no DMA messages were needed.
    assert len(g.trace_lines(" DMA_READ ")) == reads
    assert len(g.trace_lines(" DMA_WRITE ")) == writes
    # RAM comes with its memfd (ROM/firmware regions, mapped before the guest turns the
    # IOMMU on, may come without).
    assert any("fds=1" in line for line in g.trace_lines(" DMA_MAP req"))


def test_dma_both_ways_with_a_shared_file_is_direct(shm_file_guest: SampleGuest) -> None:
    g = shm_file_guest
    reads = len(g.trace_lines(" DMA_READ "))
    writes = len(g.trace_lines(" DMA_WRITE "))
    _check_dma_both_ways(g, direct=True)
    # an unsealed file: guarded copies, not memoryviews, and still no DMA messages
    assert not any(rec.zero_copy for rec in g.device.dma_log[-2:])
    assert len(g.trace_lines(" DMA_READ ")) == reads
    assert len(g.trace_lines(" DMA_WRITE ")) == writes


def test_dma_both_ways_with_plain_ram_uses_messages(plain_ram_guest: SampleGuest) -> None:
    g = plain_ram_guest
    reads = len(g.trace_lines(" DMA_READ req"))
    writes = len(g.trace_lines(" DMA_WRITE req"))
    _check_dma_both_ways(g, direct=False)
    for rec in g.device.dma_log:
        assert rec.maps >= 1 and rec.direct_maps == 0  # mapped, but no fd to map it with
    maps = g.trace_lines(" DMA_MAP req")
    assert maps and not any("fds=1" in line for line in maps)
    # The server moved the data with DMA_READ / DMA_WRITE messages.
    assert len(g.trace_lines(" DMA_READ req")) > reads
    assert len(g.trace_lines(" DMA_WRITE req")) > writes


# ------------------------------------------------------------------------------------------
# Reboot


def test_guest_reboot_reattaches_the_device(prov: Provisioned, vfiotest_binary: Path) -> None:
    # Booted cold: the device is there at power-on, before and after the reboot.
    for g in boot_sample_guest(prov, vfiotest_binary, no_reboot=False,
                               name="e2e-reboot", cold_boot=True):
        assert int(g.vfiotest("read", "0", "0", "4")["value"], 16) == ID_VALUE
        resets = g.device.resets
        seconds = g.machine.reboot()
        assert seconds < 180
        assert g.device.resets > resets  # QEMU reset the device on the way
        path = device_dir(g)
        assert g.run(f"cat {path}/vendor {path}/device").output.split() == ["0x1b36", "0x7000"]
        assert int(g.vfiotest("read", "0", "0", "4")["value"], 16) == ID_VALUE
        irq = g.vfiotest("irq", "msix", "1", f"write 0 {REG_IRQ:#x} 4 1", "5000")
        assert int(irq["count"]) == 1
        out = g.vfiotest("dma-from-device", "256", "5")
        assert bytes.fromhex(out["hex"]) == pattern(5, 256)
        assert isinstance(g.device, SampleDevice)
