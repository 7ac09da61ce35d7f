"""QEMU's edu device through a real server and our QEMU-like client."""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator

import pytest
from helpers import WAIT, fired, wait_until

from vfio_user_devices.edu import DMA_START, Edu, factorial32
from vfio_user_server.cli import make_device
from vfio_user_server.pci import COMMAND, COMMAND_MASTER
from vfio_user_server.protocol.constants import IrqIndex, IrqSetFlag
from vfio_user_server.testing import Served, serve

UNMASK = IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK




class Rig:
    """Edu's registers over a device served by :func:`serve`."""

    def __init__(self, served: Served[Edu]) -> None:
        self.dev = served.device
        self.c = served.client

    def r32(self, off: int) -> int:
        return self.c.bar_read(0, off, 4)

    def w32(self, off: int, value: int) -> None:
        self.c.bar_write(0, off, 4, value)

    def w64(self, off: int, value: int) -> None:
        self.c.bar_write(0, off, 8, value)

    def r64(self, off: int) -> int:
        return self.c.bar_read(0, off, 8)

    def block_worker(self) -> threading.Event:
        """Occupy the connection's worker so that queued work waits for the event."""
        gate = threading.Event()
        started = threading.Event()

        def hold() -> None:
            started.set()
            gate.wait(10)

        self.dev.defer(hold)
        assert started.wait(5)
        return gate

    def msi_cap(self) -> int:
        pos = self.c.config_read(0x34, 1)
        while pos:
            if self.c.config_read(pos, 1) == 0x05:
                return pos
            pos = self.c.config_read(pos + 1, 1)
        raise AssertionError("no MSI capability")

    def enable_msi(self) -> int:
        cap = self.msi_cap()
        self.c.config_write(cap + 0x04, 4, 0xFEE00000)
        self.c.config_write(cap + 0x08, 4, 0)
        self.c.config_write(cap + 0x0C, 2, 0x4041)
        self.c.config_write(cap + 0x02, 2, self.c.config_read(cap + 0x02, 2) | 1)
        (efd,) = self.c.enable_irq(IrqIndex.MSI, 1)
        return efd


@contextlib.contextmanager
def served_edu(dev: Edu | None = None, *, fd_backed: bool = True) -> Iterator[Rig]:
    """An Edu with 1 MiB of guest RAM, enabled as its driver does."""
    with serve(dev or Edu(), memory=1 << 20, fd_backed=fd_backed, enable=True) as s:
        yield Rig(s)


@pytest.fixture
def rig() -> Iterator[Rig]:
    with served_edu() as r:
        yield r


def test_factorial32_matches_the_32_bit_loop() -> None:
    for n in range(0, 40):
        assert factorial32(n) == math.factorial(n) % 2**32, n
    assert factorial32(0xFFFFFFFF) == 0


def test_identity(rig: Rig) -> None:
    c = rig.c
    assert c.config_read(0x00, 4) == 0x11E81234
    assert c.config_read(0x08, 4) == 0xFF000010  # class ff, revision 0x10
    assert c.config_read(0x3D, 1) == 1
    assert c.get_region_info(0).size == 1 << 20
    assert c.get_irq_info(IrqIndex.MSI).count == 1
    assert c.config_read(rig.msi_cap() + 2, 2) & 0x0E == 0  # one vector
    assert rig.r32(0x00) == 0x010000ED


def test_liveness_and_access_rules(rig: Rig) -> None:
    assert rig.r32(0x04) == 0
    rig.w32(0x04, 0x12345678)
    assert rig.r32(0x04) == 0xEDCBA987
    # below 0x80 only 4-byte accesses count
    assert rig.c.bar_read(0, 0x04, 2) == 0xFFFF
    rig.c.bar_write(0, 0x04, 2, 0)
    assert rig.r32(0x04) == 0xEDCBA987
    assert rig.r64(0x00) == 2**64 - 1
    assert rig.r32(0x10) == 0xFFFFFFFF  # nothing there
    assert rig.r32(0x40000) == 0xFFFFFFFF  # the DMA buffer is not in the BAR


def test_factorial(rig: Rig) -> None:
    rig.w32(0x08, 5)
    wait_until(lambda: rig.r32(0x20) & 1 == 0, what="the factorial")
    assert rig.r32(0x08) == 120
    rig.w32(0x08, 13)
    wait_until(lambda: rig.r32(0x20) & 1 == 0, what="the factorial")
    assert rig.r32(0x08) == math.factorial(13) % 2**32


def test_factorial_is_asynchronous_and_busy_writes_are_ignored(rig: Rig) -> None:
    gate = rig.block_worker()
    rig.w32(0x08, 10)
    assert rig.r32(0x20) & 1  # computing
    assert rig.r32(0x08) == 10  # the operand until done
    rig.w32(0x08, 3)  # ignored while computing
    gate.set()
    wait_until(lambda: rig.r32(0x20) & 1 == 0, what="the factorial")
    assert rig.r32(0x08) == 3628800
    assert rig.dev.completed == [("fact", 10)]


def test_factorial_interrupt_intx(rig: Rig) -> None:
    c = rig.c
    (efd,) = c.enable_irq(IrqIndex.INTX, 1)
    rig.w32(0x20, 0x80)
    assert rig.r32(0x20) == 0x80
    rig.w32(0x20, 0x81)  # bit 0 is read-only
    assert rig.r32(0x20) == 0x80
    rig.w32(0x08, 6)
    assert fired(efd, 5) == 1
    assert rig.r32(0x08) == 720
    assert rig.r32(0x24) == 0x1
    assert rig.dev.intx_level
    rig.w32(0x64, 0x1)
    assert rig.r32(0x24) == 0 and not rig.dev.intx_level
    c.set_irqs(IrqIndex.INTX, UNMASK, 0, 1)
    assert fired(efd) == 0
    # without bit 7, no interrupt
    rig.w32(0x20, 0)
    rig.w32(0x08, 4)
    wait_until(lambda: rig.r32(0x20) & 1 == 0, what="the factorial")
    assert fired(efd) == 0 and rig.r32(0x24) == 0


def test_raise_and_acknowledge_intx_level(rig: Rig) -> None:
    c = rig.c
    (efd,) = c.enable_irq(IrqIndex.INTX, 1)
    rig.w32(0x60, 0x1234)
    assert fired(efd, 2) == 1
    assert rig.r32(0x24) == 0x1234
    rig.w32(0x64, 0x1000)
    assert rig.r32(0x24) == 0x0234
    c.set_irqs(IrqIndex.INTX, UNMASK, 0, 1)  # still asserted: fires again
    assert fired(efd, 2) == 1
    rig.w32(0x64, 0x0234)
    assert not rig.dev.intx_level
    c.set_irqs(IrqIndex.INTX, UNMASK, 0, 1)
    assert fired(efd) == 0
    assert c.config_read(0x06, 2) & 0x08 == 0


def test_msi_when_enabled(rig: Rig) -> None:
    c = rig.c
    (intx,) = c.enable_irq(IrqIndex.INTX, 1)
    msi = rig.enable_msi()
    rig.w32(0x60, 0x1)
    assert fired(msi, 2) == 1
    assert fired(intx) == 0 and not rig.dev.intx_level
    # each raise is a message, even with status still set
    rig.w32(0x60, 0x2)
    assert fired(msi, 2) == 1
    assert rig.r32(0x24) == 0x3
    rig.w32(0x64, 0x3)
    assert rig.r32(0x24) == 0
    # factorial completion by MSI
    rig.w32(0x20, 0x80)
    rig.w32(0x08, 3)
    assert fired(msi, 5) == 1
    assert rig.r32(0x24) == 0x1 and rig.r32(0x08) == 6


def start_dma(rig: Rig, src: int, dst: int, count: int, cmd: int) -> None:
    rig.w64(0x80, src)
    rig.w64(0x88, dst)
    rig.w64(0x90, count)
    rig.w64(0x98, cmd)


@pytest.mark.parametrize("fd_backed", [True, False], ids=["mapped", "message-dma"])
def test_dma_round_trip_with_interrupt(fd_backed: bool) -> None:
    with served_edu(fd_backed=fd_backed) as rig:
        c = rig.c
        (efd,) = c.enable_irq(IrqIndex.INTX, 1)
        data = os.urandom(4096)
        c.write_memory(0x1000, data)
        start_dma(rig, 0x1000, DMA_START, 4096, 0x1 | 0x4)  # RAM -> device, irq
        assert fired(efd, 5) == 1
        assert rig.r64(0x98) & 1 == 0
        assert rig.r32(0x24) == 0x100
        assert bytes(rig.dev.dma_buffer) == data
        rig.w32(0x64, 0x100)
        c.set_irqs(IrqIndex.INTX, UNMASK, 0, 1)
        start_dma(rig, DMA_START + 16, 0x8000, 100, 0x1 | 0x2 | 0x4)  # device -> RAM
        assert fired(efd, 5) == 1
        assert c.read_memory(0x8000, 100) == data[16:116]
        kinds = {kind for kind, _addr, _n in c.dma_requests}
        assert kinds == (set() if fd_backed else {"read", "write"})


def test_dma_registers_frozen_while_running(rig: Rig) -> None:
    rig.c.write_memory(0x2000, b"\xaa" * 64)
    gate = rig.block_worker()
    start_dma(rig, 0x2000, DMA_START, 64, 0x1)
    assert rig.r64(0x98) == 0x1
    assert rig.dev.busy
    rig.w64(0x80, 0x5000)  # ignored while running
    rig.w64(0x98, 0x3)  # ignored: already running
    assert rig.r64(0x80) == 0x2000
    gate.set()
    rig.dev.wait_idle()
    assert rig.r64(0x98) == 0
    assert bytes(rig.dev.dma_buffer[:64]) == b"\xaa" * 64
    assert rig.dev.completed == [("dma", 0x1)]


def test_dma_command_without_start_is_ignored(rig: Rig) -> None:
    rig.w64(0x98, 0x4)
    assert rig.r64(0x98) == 0
    assert not rig.dev.busy


def test_dma_register_halves(rig: Rig) -> None:
    rig.w64(0x88, 0x1122334455667788)
    assert rig.r64(0x88) == 0x1122334455667788
    rig.w32(0x88, 0x0000AAAA)  # low half: the register becomes the 32-bit value (as QEMU)
    assert rig.r64(0x88) == 0xAAAA
    rig.w32(0x8C, 0x1)  # high half (our extension)
    assert rig.r64(0x88) == 0x1_0000AAAA
    assert rig.r32(0x8C) == 0x1


def test_dma_outside_the_buffer_moves_nothing(rig: Rig) -> None:
    rig.c.write_memory(0x1000, b"\x55" * 4096)
    start_dma(rig, 0x1000, DMA_START + 1, 4096, 0x1)
    rig.dev.wait_idle()
    assert bytes(rig.dev.dma_buffer) == bytes(4096)


def test_dma_address_mask(rig: Rig) -> None:
    rig.c.write_memory(0x3000, b"masked!")
    start_dma(rig, 0x1000_3000, DMA_START, 7, 0x1)  # bit 28 is outside the default mask
    rig.dev.wait_idle()
    assert bytes(rig.dev.dma_buffer[:7]) == b"masked!"


def test_dma_needs_bus_master(rig: Rig) -> None:
    rig.c.write_memory(0x1000, b"\x77" * 8)
    rig.c.config_write(COMMAND, 2, rig.c.config_read(COMMAND, 2) & ~COMMAND_MASTER)
    start_dma(rig, 0x1000, DMA_START, 8, 0x1)
    rig.dev.wait_idle()
    assert bytes(rig.dev.dma_buffer[:8]) == bytes(8)


def test_dma_waits_its_delay_before_the_transfer() -> None:
    """The transfer runs after the delay: held in the delay, nothing has moved yet."""
    dev = Edu(dma_delay=0.1)
    asked: list[float] = []
    delaying = threading.Event()
    release = threading.Event()

    def sleep(seconds: float) -> None:
        asked.append(seconds)
        delaying.set()
        assert release.wait(WAIT)

    dev.sleep = sleep
    with served_edu(dev) as rig:
        rig.c.write_memory(0x1000, b"\x11" * 8)
        start_dma(rig, 0x1000, DMA_START, 8, 0x1)
        assert delaying.wait(WAIT)
        assert asked == [0.1]
        assert rig.r64(0x98) & 1 and dev.busy
        assert bytes(dev.dma_buffer[:8]) == bytes(8)
        release.set()
        dev.wait_idle()
        assert rig.r64(0x98) == 0
        assert bytes(dev.dma_buffer[:8]) == b"\x11" * 8


def test_no_delay_by_default(rig: Rig) -> None:
    def sleep(seconds: float) -> None:
        raise AssertionError(f"slept {seconds} s")

    rig.dev.sleep = sleep
    start_dma(rig, 0x1000, DMA_START, 8, 0x1)
    rig.dev.wait_idle()
    assert rig.dev.completed == [("dma", 0x1)]


def test_reset(rig: Rig) -> None:
    (efd,) = rig.c.enable_irq(IrqIndex.INTX, 1)
    rig.w32(0x04, 1)
    rig.w32(0x60, 0x8)
    assert fired(efd, 2) == 1
    rig.c.reset()
    assert rig.r32(0x04) == 0 and rig.r32(0x24) == 0
    assert not rig.dev.intx_level


def test_cli_options() -> None:
    dev = make_device("edu", ["--dma-mask", "0xffffffff", "--dma-delay-ms", "100"])
    assert isinstance(dev, Edu)
    assert dev.dma_mask == 0xFFFFFFFF and dev.dma_delay == pytest.approx(0.1)
