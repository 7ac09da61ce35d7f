"""ACCES PCI-IDIO-16: 16 optically isolated inputs, 16 FET outputs, change-of-state interrupt.

Served as ``vfio-user-server --socket S gpio-pci-idio-16``. Linux's ``gpio-pci-idio-16``
driver (module ``gpio_pci_idio_16``, PCI driver ``pci-idio-16``) binds it by its ID
494f:0dc8 and registers a 32-line gpiochip: lines 0-15 are the outputs OUT0..OUT15, lines
16-31 the inputs IIN0..IIN15.

BARs, as on the card (a PLX PCI9050 bridge in front of the IDIO-16 logic)::

    BAR0  128 bytes memory  PLX local configuration registers
    BAR1  128 bytes I/O     the same registers
    BAR2    8 bytes I/O     the IDIO-16 registers (the only BAR Linux uses)

IDIO-16 registers (BAR2, byte-wide)::

    +0  read/write  FET outputs 0-7
    +1  read        isolated inputs 0-7          write: clear the pending interrupt
    +2  read        enable the interrupt         write: disable the interrupt
    +3  read        activate the input filters   write: deactivate the input filters
    +4  read/write  FET outputs 8-15
    +5  read        isolated inputs 8-15
    +6  read        interrupt status: bit 2 pending; bit 0 inputs 0-7 changed, bit 1 inputs 8-15
    +7  (unused, reads 0)

Interrupt: while enabled, any change of an input latches a pending interrupt and drives INTx
(level-triggered) until the guest clears it (+1 write) or disables interrupts (+2 write).
The PLX INTCSR register (BAR0/1 +0x4c) gates the line to the bus: LINTi1 enable (bit 0) and
PCI interrupt enable (bit 6), both set at power-on as the card's EEPROM leaves them (Linux
never writes them); bit 2 shows the local interrupt's state.

Python side: :attr:`PciIdio16.outputs`, :meth:`~PciIdio16.output`, the ``on_output`` callback
and :meth:`~PciIdio16.wait_outputs` show what the guest drives; :meth:`~PciIdio16.set_input`
and :meth:`~PciIdio16.set_inputs` change what it reads (and raise the interrupt if enabled).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import ClassVar

from vfio_user_server.device import PciDevice
from vfio_user_server.errors import StateError
from vfio_user_server.options import Option, integer
from vfio_user_server.pci import Bar
from vfio_user_server.state import StateValue

log = logging.getLogger(__name__)

NLINES = 16

# IDIO-16 registers (BAR2)
REG_OUT0_7 = 0
REG_IN0_7 = 1  # write: clear interrupt
REG_IRQ_CTL = 2  # read: enable, write: disable
REG_FILTER_CTL = 3  # read: activate, write: deactivate
REG_OUT8_15 = 4
REG_IN8_15 = 5
REG_IRQ_STATUS = 6

STATUS_GROUP0 = 0x01
STATUS_GROUP1 = 0x02
STATUS_PENDING = 0x04

# PLX PCI9050 local configuration registers (BAR0 memory / BAR1 I/O)
PLX_SIZE = 128
PLX_INTCSR = 0x4C
INTCSR_LINT1_ENABLE = 1 << 0
INTCSR_LINT1_POLARITY = 1 << 1
INTCSR_LINT1_STATUS = 1 << 2
INTCSR_PCI_INT_ENABLE = 1 << 6
INTCSR_RESET = INTCSR_LINT1_ENABLE | INTCSR_LINT1_POLARITY | INTCSR_PCI_INT_ENABLE
#: INTCSR bits a write can change (status bits are read-only).
INTCSR_WMASK = 0xFFFF & ~(INTCSR_LINT1_STATUS | 1 << 5)

OutputCallback = Callable[[int, int], None]


def _log_outputs(old: int, new: int) -> None:
    log.info("outputs %#06x -> %#06x", old, new)


class PciIdio16(PciDevice):
    """ACCES PCI-IDIO-16 as Linux's gpio-pci-idio-16 driver expects it (see module docs)."""

    vendor_id = 0x494F
    device_id = 0x0DC8
    subsystem_vendor_id = 0x494F
    subsystem_id = 0x0DC8
    class_code = 0xFF0000
    interrupt_pin = 1
    bars: ClassVar = {
        0: Bar(PLX_SIZE, kind="mem32"),
        1: Bar(PLX_SIZE, kind="io"),
        2: Bar(8, kind="io"),
    }
    msi_vectors = 0
    msix_vectors = 0
    power_management = False
    guest_modules = ("gpio-pci-idio-16",)
    options = (
        Option("--inputs", "initial input lines as a 16-bit mask (default 0)", type=integer,
               default=0),
        Option("--log-outputs", "log every output change", switch=True),
    )

    #: Outputs, inputs, interrupt control and status, the PLX registers (docs/state.md).
    state_fields = ("_outputs", "_inputs", "irq_enabled", "filters_active", "_status", "plx",
                    "interrupts_raised")
    state_version = 1

    def __init__(self, *, on_output: OutputCallback | None = None, inputs: int = 0,
                 log_outputs: bool = False) -> None:
        super().__init__()
        if log_outputs and on_output is None:
            on_output = _log_outputs
        #: Called as ``on_output(old, new)`` (16-bit masks) when the guest changes an output,
        #: on the server's loop thread with :attr:`lock` held: keep it short.
        self.on_output = on_output
        self._changed = threading.Condition(self.lock)
        self._inputs = 0
        #: change-of-state interrupts latched since creation
        self.interrupts_raised = 0
        self.reset()
        self.set_inputs(inputs)  # interrupts are disabled at power-on: none is raised

    # --- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Power-on state: outputs off, interrupt disabled and clear, filters active.

        The inputs are the outside world's and keep their values.
        """
        with self.lock:
            self._outputs = 0
            self.irq_enabled = False
            self.filters_active = True
            self._status = 0
            self.plx = bytearray(PLX_SIZE)
            self.plx[PLX_INTCSR:PLX_INTCSR + 2] = INTCSR_RESET.to_bytes(2, "little")
            self._drive_intx()
            self._state_changed()

    def check_state(self, fields: Mapping[str, StateValue]) -> None:
        for name, limit in (("_outputs", 0xFFFF), ("_inputs", 0xFFFF),
                            ("_status", STATUS_PENDING | STATUS_GROUP0 | STATUS_GROUP1),
                            ("interrupts_raised", (1 << 64) - 1)):
            value = fields[name]
            if not isinstance(value, int) or value < 0 or value & ~limit:
                raise StateError(f"idio-16: {name} {value!r} out of range")
        plx = fields["plx"]
        if not isinstance(plx, (bytes, bytearray)) or len(plx) != PLX_SIZE:
            raise StateError(f"idio-16: the PLX registers are {PLX_SIZE} bytes")

    def state_loaded(self) -> None:
        self._state_changed()

    @property
    def outputs(self) -> int:
        """The 16 outputs as a mask (bit n: OUTn on)."""
        return self._outputs

    def output(self, line: int) -> bool:
        """Whether output ``line`` (0-15) is on."""
        _check_line(line)
        return bool(self._outputs >> line & 1)

    @property
    def inputs(self) -> int:
        """The 16 inputs as a mask (bit n: IINn high)."""
        return self._inputs

    def set_input(self, line: int, value: bool) -> None:
        """Drive input ``line`` (0-15); a change raises the interrupt when it is enabled."""
        _check_line(line)
        with self.lock:
            bit = 1 << line
            self.set_inputs(self._inputs | bit if value else self._inputs & ~bit)

    def set_inputs(self, mask: int) -> None:
        """Drive all 16 inputs at once; a change raises the interrupt when it is enabled."""
        if not 0 <= mask <= 0xFFFF:
            raise ValueError(f"input mask {mask:#x} is not 16 bits")
        with self.lock:
            changed = self._inputs ^ mask
            self._inputs = mask
            if not changed:
                return
            if self.irq_enabled:
                if not self._status & STATUS_PENDING:
                    self.interrupts_raised += 1
                self._status |= STATUS_PENDING
                if changed & 0x00FF:
                    self._status |= STATUS_GROUP0
                if changed & 0xFF00:
                    self._status |= STATUS_GROUP1
                self._drive_intx()
            self._state_changed()

    @property
    def irq_pending(self) -> bool:
        """A change-of-state interrupt is latched (the guest has not cleared it yet)."""
        return bool(self._status & STATUS_PENDING)

    def wait_outputs(self, predicate: Callable[[int], bool] | int, timeout: float = 10.0
                     ) -> int:
        """Wait until the outputs equal a mask (or satisfy ``predicate``); return them.

        Raises TimeoutError with the last value when they don't in time.
        """
        check = predicate if callable(predicate) else (lambda v: v == predicate)
        with self._changed:
            if not self._wait(lambda: check(self._outputs), timeout):
                raise TimeoutError(f"outputs are {self._outputs:#06x}")
            return self._outputs

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` over the device's state is true.

        It is evaluated with :attr:`lock` held, now and after each change of the device's
        state (every change wakes the waiters). Raises TimeoutError when ``timeout`` passes
        without a change that makes it true, even if it would be true by then: a state change
        that woke nobody is a bug to see, not to hide.
        """
        with self._changed:
            if not self._wait(predicate, timeout):
                raise TimeoutError("condition not met in time")

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """With :attr:`lock` held: True once ``predicate()`` holds, False at the deadline."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0 or not self._changed.wait(left):
                return False
        return True

    def _state_changed(self) -> None:
        """Wake the waiters (lock held): called by every change of the device's state."""
        self._changed.notify_all()

    # --- BAR accesses -----------------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar in (0, 1):
            return int.from_bytes(self.plx[offset:offset + size].ljust(size, b"\0"), "little")
        value = 0
        for i in range(size):
            value |= self._reg_read(offset + i) << 8 * i
        return value

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar in (0, 1):
            self._plx_write(offset, value.to_bytes(size, "little"))
            return
        for i in range(size):
            self._reg_write(offset + i, value >> 8 * i & 0xFF)

    def _reg_read(self, reg: int) -> int:
        if reg == REG_OUT0_7:
            return self._outputs & 0xFF
        if reg == REG_IN0_7:
            return self._inputs & 0xFF
        if reg == REG_IRQ_CTL:
            if not self.irq_enabled:
                log.debug("interrupt enabled")
                self.irq_enabled = True
                self._state_changed()
            return 0
        if reg == REG_FILTER_CTL:
            if not self.filters_active:
                self.filters_active = True
                self._state_changed()
            return 0
        if reg == REG_OUT8_15:
            return self._outputs >> 8
        if reg == REG_IN8_15:
            return self._inputs >> 8
        if reg == REG_IRQ_STATUS:
            return self._status
        return 0

    def _reg_write(self, reg: int, value: int) -> None:
        if reg == REG_OUT0_7:
            self._set_outputs((self._outputs & 0xFF00) | value)
        elif reg == REG_OUT8_15:
            self._set_outputs((self._outputs & 0x00FF) | value << 8)
        elif reg == REG_IN0_7:
            self._status = 0
            self._drive_intx()
            self._state_changed()
        elif reg == REG_IRQ_CTL:
            if self.irq_enabled:
                log.debug("interrupt disabled")
            self.irq_enabled = False
            self._status = 0
            self._drive_intx()
            self._state_changed()
        elif reg == REG_FILTER_CTL:
            self.filters_active = False
            self._state_changed()

    def _set_outputs(self, new: int) -> None:
        old = self._outputs
        if new == old:
            return
        self._outputs = new
        self._state_changed()
        if self.on_output is not None:
            try:
                self.on_output(old, new)
            except Exception:
                log.exception("on_output callback failed")

    def _plx_write(self, offset: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            pos = offset + i
            if pos >= PLX_SIZE:
                break
            if PLX_INTCSR <= pos < PLX_INTCSR + 2:
                keep = (INTCSR_WMASK >> 8 * (pos - PLX_INTCSR)) & 0xFF
                byte = (self.plx[pos] & ~keep) | (byte & keep)
            self.plx[pos] = byte
        self._drive_intx()
        self._state_changed()

    @property
    def intcsr(self) -> int:
        return int.from_bytes(self.plx[PLX_INTCSR:PLX_INTCSR + 2], "little")

    def _drive_intx(self) -> None:
        """INTx = pending local interrupt, gated by the PLX INTCSR enables."""
        local = bool(self._status & STATUS_PENDING)
        csr = self.intcsr
        csr = (csr | INTCSR_LINT1_STATUS) if local else (csr & ~INTCSR_LINT1_STATUS)
        self.plx[PLX_INTCSR:PLX_INTCSR + 2] = csr.to_bytes(2, "little")
        enabled = csr & INTCSR_LINT1_ENABLE and csr & INTCSR_PCI_INT_ENABLE
        level = bool(local and enabled)
        if level != self.intx_level:
            self.set_intx(level)


def _check_line(line: int) -> None:
    if not 0 <= line < NLINES:
        raise IndexError(f"line {line} is not in 0..{NLINES - 1}")
