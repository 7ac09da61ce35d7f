"""PCI-IDIO-16 through a real server and our QEMU-like client."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from helpers import WAIT, fired

from vfio_user_devices.idio16 import (
    INTCSR_LINT1_ENABLE,
    INTCSR_LINT1_STATUS,
    INTCSR_PCI_INT_ENABLE,
    PLX_INTCSR,
    PciIdio16,
)
from vfio_user_server.cli import make_device
from vfio_user_server.pci import COMMAND, COMMAND_INTX_DISABLE
from vfio_user_server.protocol.constants import IrqIndex, IrqSetFlag
from vfio_user_server.testing import Served, serve

IDIO = 2  # the BAR Linux uses
OUT0, IN0, IRQ_CTL, FILTER, OUT8, IN8, STATUS = range(7)
UNMASK = IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK




class Rig:
    """The IDIO-16 registers over a device served by :func:`serve`."""

    def __init__(self, served: Served[PciIdio16], outputs_seen: list[tuple[int, int]]) -> None:
        self.dev = served.device
        self.c = served.client
        self.outputs_seen = outputs_seen

    def reg(self, reg: int) -> int:
        return self.c.bar_read(IDIO, reg, 1)

    def set_reg(self, reg: int, value: int) -> None:
        self.c.bar_write(IDIO, reg, 1, value)


@pytest.fixture
def rig() -> Iterator[Rig]:
    seen: list[tuple[int, int]] = []
    dev = PciIdio16(on_output=lambda old, new: seen.append((old, new)))
    with serve(dev, memory=1 << 20) as s:
        yield Rig(s, seen)


def test_identity_and_bars(rig: Rig) -> None:
    c = rig.c
    assert c.config_read(0x00, 4) == 0x0DC8494F
    assert c.config_read(0x2C, 4) == 0x0DC8494F  # subsystem
    assert c.config_read(0x3D, 1) == 1  # INTA
    assert c.config_read(0x10, 4) & 1 == 0  # BAR0 memory
    assert c.config_read(0x14, 4) & 1 == 1  # BAR1 I/O
    assert c.config_read(0x18, 4) & 1 == 1  # BAR2 I/O
    assert c.get_region_info(0).size == 128
    assert c.get_region_info(1).size == 128
    assert c.get_region_info(2).size == 8
    assert c.get_irq_info(IrqIndex.INTX).count == 1
    assert c.get_irq_info(IrqIndex.MSI).count == 0


def test_outputs_reach_python_and_read_back(rig: Rig) -> None:
    rig.set_reg(OUT0, 0xA5)
    rig.set_reg(OUT8, 0x5A)
    assert rig.dev.outputs == 0x5AA5
    assert rig.dev.output(0) and not rig.dev.output(1) and rig.dev.output(9)
    assert rig.reg(OUT0) == 0xA5 and rig.reg(OUT8) == 0x5A
    assert rig.outputs_seen == [(0, 0xA5), (0xA5, 0x5AA5)]
    rig.set_reg(OUT0, 0xA5)  # no change: no callback
    assert len(rig.outputs_seen) == 2
    # a 2-byte write covers OUT0 and IN0 (clear interrupt): outputs 0-7 only
    rig.c.bar_write(IDIO, 0, 2, 0xFF0F)
    assert rig.dev.outputs == 0x5A0F


def wakes_waiter(rig: Rig, predicate: Callable[[], bool], act: Callable[[], object]) -> None:
    """``act`` makes ``predicate`` true and wakes a thread blocked in ``wait_for`` on it.

    The waiter evaluates the predicate with the device lock held and keeps it until it
    waits, and ``act`` needs that lock (it goes through the server, or is a device method):
    so ``act`` runs only once the waiter waits, and only a wake-up can make it succeed.
    """
    evaluated = threading.Event()
    errors: list[BaseException] = []

    def watched() -> bool:
        evaluated.set()
        return predicate()

    def waiter() -> None:
        try:
            rig.dev.wait_for(watched, timeout=WAIT)
        except BaseException as exc:
            errors.append(exc)

    assert not predicate()
    t = threading.Thread(target=waiter)
    t.start()
    assert evaluated.wait(WAIT)
    act()
    t.join(2 * WAIT)
    assert not t.is_alive() and errors == []


def test_every_change_wakes_waiters(rig: Rig) -> None:
    dev, c = rig.dev, rig.c
    wakes_waiter(rig, lambda: dev.irq_enabled, lambda: rig.reg(IRQ_CTL))
    dev.set_input(0, True)
    wakes_waiter(rig, lambda: not dev.irq_pending, lambda: rig.set_reg(IN0, 0))
    wakes_waiter(rig, lambda: not dev.irq_enabled, lambda: rig.set_reg(IRQ_CTL, 0))
    wakes_waiter(rig, lambda: not dev.filters_active, lambda: rig.set_reg(FILTER, 0))
    wakes_waiter(rig, lambda: dev.filters_active, lambda: rig.reg(FILTER))
    wakes_waiter(rig, lambda: dev.outputs == 0x8000, lambda: rig.set_reg(OUT8, 0x80))
    wakes_waiter(rig, lambda: dev.inputs == 0x0003, lambda: dev.set_inputs(0x0003))
    intcsr = dev.intcsr
    wakes_waiter(rig, lambda: not dev.intcsr & INTCSR_PCI_INT_ENABLE,
                 lambda: c.bar_write(0, PLX_INTCSR, 2, intcsr & ~INTCSR_PCI_INT_ENABLE))
    wakes_waiter(rig, lambda: dev.outputs == 0, c.reset)


def test_wait_for_fails_at_its_deadline(rig: Rig) -> None:
    """A condition that turned true without waking anyone is a timeout, not a success."""
    calls = 0

    def true_from_the_second_call() -> bool:
        nonlocal calls
        calls += 1
        return calls > 1

    with pytest.raises(TimeoutError):
        rig.dev.wait_for(true_from_the_second_call, timeout=0.01)
    assert calls == 1
    with pytest.raises(TimeoutError, match="outputs are 0x0000"):
        rig.dev.wait_outputs(lambda v: v == 1, timeout=0.01)
    assert rig.dev.wait_outputs(0, timeout=0) == 0  # true at once: no wait


def test_inputs_set_from_python_read_in_guest(rig: Rig) -> None:
    rig.dev.set_inputs(0x1234)
    assert (rig.reg(IN0), rig.reg(IN8)) == (0x34, 0x12)
    rig.dev.set_input(15, True)
    rig.dev.set_input(2, False)
    assert rig.dev.inputs == 0x9230
    # one 8-byte read: OUT0, IN0, IRQ_CTL (enables), FILTER, OUT8, IN8, STATUS, unused
    assert rig.c.bar_read(IDIO, 0, 8).to_bytes(8, "little")[1::4] == bytes([0x30, 0x92])
    assert rig.reg(IN8) == 0x92 and rig.reg(IN0) == 0x30
    with pytest.raises(IndexError):
        rig.dev.set_input(16, True)
    with pytest.raises(ValueError):
        rig.dev.set_inputs(0x10000)


def test_no_interrupt_until_enabled(rig: Rig) -> None:
    (efd,) = rig.c.enable_irq(IrqIndex.INTX, 1)
    rig.dev.set_input(0, True)
    assert fired(efd) == 0
    assert rig.reg(STATUS) == 0
    assert not rig.dev.irq_pending


def test_change_of_state_interrupt_level_and_clear(rig: Rig) -> None:
    c = rig.c
    (efd,) = c.enable_irq(IrqIndex.INTX, 1)
    rig.reg(IRQ_CTL)  # read: enable
    assert rig.dev.irq_enabled
    rig.dev.set_input(3, True)
    assert fired(efd, 2) == 1
    assert rig.dev.intx_level and rig.dev.irq_pending
    assert rig.reg(STATUS) == 0x05  # pending, inputs 0-7 changed
    assert c.config_read(0x06, 2) & 0x08  # Status.Interrupt
    # another change while pending: the line stays up, no new edge (automasked)
    rig.dev.set_input(12, True)
    assert rig.reg(STATUS) == 0x07
    assert fired(efd) == 0
    # unmask while still asserted: fires again (level semantics)
    c.set_irqs(IrqIndex.INTX, UNMASK, 0, 1)
    assert fired(efd, 2) == 1
    # the driver's ack: a write to +1 clears; then unmask, nothing more
    rig.set_reg(IN0, 0)
    assert rig.reg(STATUS) == 0
    assert not rig.dev.intx_level
    assert c.config_read(0x06, 2) & 0x08 == 0
    c.set_irqs(IrqIndex.INTX, UNMASK, 0, 1)
    assert fired(efd) == 0
    # the next change fires again
    rig.dev.set_input(3, False)
    assert fired(efd, 2) == 1
    assert rig.dev.interrupts_raised == 2


def test_disable_drops_the_line_and_stops_interrupts(rig: Rig) -> None:
    c = rig.c
    (efd,) = c.enable_irq(IrqIndex.INTX, 1)
    rig.reg(IRQ_CTL)
    rig.dev.set_input(0, True)
    assert fired(efd, 2) == 1
    rig.set_reg(IRQ_CTL, 0)  # write: disable
    assert not rig.dev.irq_enabled and not rig.dev.intx_level
    c.set_irqs(IrqIndex.INTX, UNMASK, 0, 1)
    rig.dev.set_input(0, False)
    assert fired(efd) == 0
    assert rig.reg(STATUS) == 0


def test_linux_regmap_irq_sequence(rig: Rig) -> None:
    """What gpio-idio-16 (regmap-irq) does: disable, ack, unmask = clear + enable, handle."""
    c = rig.c
    (efd,) = c.enable_irq(IrqIndex.INTX, 1)
    rig.set_reg(IRQ_CTL, 0)  # disable before registering
    assert rig.reg(STATUS) & 0x04 == 0  # nothing pending to ack
    rig.set_reg(FILTER, 0)  # deactivate input filters
    assert not rig.dev.filters_active
    # a line's irq is unmasked: clear interrupt, then read the enable register
    rig.set_reg(IN0, 0)
    rig.reg(IRQ_CTL)
    rig.dev.set_input(7, True)
    assert fired(efd, 2) == 1
    status = rig.reg(STATUS)
    assert status & 0x04
    rig.set_reg(IN0, status)  # ack
    c.set_irqs(IrqIndex.INTX, UNMASK, 0, 1)
    assert fired(efd) == 0


def test_plx_intcsr_gates_the_line(rig: Rig) -> None:
    c = rig.c
    (efd,) = c.enable_irq(IrqIndex.INTX, 1)
    csr = c.bar_read(0, PLX_INTCSR, 4)
    assert csr & INTCSR_LINT1_ENABLE and csr & INTCSR_PCI_INT_ENABLE
    assert c.bar_read(1, PLX_INTCSR, 4) == csr  # I/O BAR mirrors the registers
    c.bar_write(0, PLX_INTCSR, 4, csr & ~INTCSR_PCI_INT_ENABLE)
    rig.reg(IRQ_CTL)
    rig.dev.set_input(1, True)
    assert fired(efd) == 0
    assert c.bar_read(0, PLX_INTCSR, 4) & INTCSR_LINT1_STATUS  # local interrupt seen
    c.bar_write(1, PLX_INTCSR, 4, csr)  # through the I/O BAR
    assert fired(efd, 2) == 1
    # the status bit is read-only
    c.bar_write(0, PLX_INTCSR, 4, csr & ~INTCSR_LINT1_STATUS)
    assert c.bar_read(0, PLX_INTCSR, 4) & INTCSR_LINT1_STATUS


def test_intx_disable_in_command_masks(rig: Rig) -> None:
    c = rig.c
    (efd,) = c.enable_irq(IrqIndex.INTX, 1)
    cmd = c.config_read(COMMAND, 2)
    c.config_write(COMMAND, 2, cmd | COMMAND_INTX_DISABLE)
    rig.reg(IRQ_CTL)
    rig.dev.set_input(1, True)
    assert fired(efd) == 0
    c.config_write(COMMAND, 2, cmd)
    assert fired(efd, 2) == 1


def test_reset(rig: Rig) -> None:
    rig.set_reg(OUT0, 0xFF)
    rig.reg(IRQ_CTL)
    rig.dev.set_inputs(0x00F0)
    assert rig.dev.intx_level
    rig.c.reset()
    assert rig.dev.outputs == 0
    assert not rig.dev.irq_enabled and not rig.dev.intx_level
    assert rig.dev.filters_active
    assert rig.dev.inputs == 0x00F0  # the outside world keeps its state
    assert rig.reg(OUT0) == 0 and rig.reg(IN0) == 0xF0


def test_cli_options() -> None:
    dev = make_device("gpio-pci-idio-16", ["--inputs", "0x8001"])
    assert isinstance(dev, PciIdio16)
    assert dev.inputs == 0x8001
