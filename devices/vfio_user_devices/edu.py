"""QEMU's educational device "edu" (QEMU docs/specs/edu.rst), served over vfio-user.

Served as ``vfio-user-server --socket S edu``. ID 1234:11e8, class 0xff (other), revision
0x10, INTA and an MSI capability with one vector. BAR0 is 1 MiB of memory::

    0x00  RO  identification 0x010000ed (major 1, minor 0, 0xed)
    0x04  RW  liveness: reads the bitwise inverse of the last value written
    0x08  RW  factorial: a write starts computing the factorial of the value (32-bit,
              wrapping); the result replaces it once status bit 0 clears. Ignored while busy.
    0x20  RW  status: bit 0 computing (RO); bit 7 raise interrupt 0x001 when the factorial
              is done
    0x24  RO  interrupt status: the values that raised the interrupt, OR-ed
    0x60  WO  interrupt raise: OR the value into the interrupt status and raise
    0x64  WO  interrupt acknowledge: clear the value's bits; INTx drops when none are left
    0x80  RW  DMA source address (64-bit)
    0x88  RW  DMA destination address (64-bit)
    0x90  RW  DMA transfer count (64-bit)
    0x98  RW  DMA command: bit 0 start (reads 1 while running), bit 1 direction (0: RAM ->
              device, 1: device -> RAM), bit 2 raise interrupt 0x100 when done

With ``--mapped-scratch``, BAR0 0x1000..0x1fff is a page of plain memory mapped into the guest
(sparse mmap, :mod:`vfio_user_server.mapped`): the guest reads and writes it without a message
to the server, the device sees it as :meth:`~vfio_user_server.device.PciDevice.mapped` ``(0)``,
and a reset clears it. QEMU then sends no posted writes to the device (every trapped write
waits for its reply).

The device's DMA buffer is 4 KiB at device address 0x40000 (the side of a transfer that is not
RAM). Registers below 0x80 take 4-byte accesses, the others 4 or 8 bytes; other accesses are
ignored and read all-ones, as in QEMU. Two liberties: the upper halves of the 64-bit registers
can also be read and written with 4-byte accesses (QEMU ignores those), and a transfer outside
the buffer is refused (the DMA completes without moving data, logged) where QEMU aborts.

Interrupts: when MSI is enabled a raise sends the MSI message; otherwise INTx is asserted and
held until the interrupt status is acknowledged back to zero.

DMA addresses are masked with ``dma_mask`` (default 28 bits, as QEMU's ``dma_mask`` property):
use memory below 256 MiB or a wider mask (``--dma-mask``). Factorial and DMA complete
asynchronously on the connection's worker thread (DMA uses :attr:`PciDevice.dma`, which may
need DMA_READ/DMA_WRITE messages and so never runs on the server's loop thread), after
``dma_delay`` seconds for DMA (QEMU uses a 100 ms timer; default here 0).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import ClassVar

from vfio_user_server.device import PciDevice
from vfio_user_server.errors import DmaError, StateError
from vfio_user_server.options import Option, integer, milliseconds
from vfio_user_server.pci import Bar
from vfio_user_server.state import StateValue

log = logging.getLogger(__name__)

EDU_ID = 0x010000ED
BAR_SIZE = 1 << 20
#: The mapped scratch page (``--mapped-scratch``).
SCRATCH_OFFSET = 0x1000
SCRATCH_SIZE = 0x1000

REG_ID = 0x00
REG_LIVENESS = 0x04
REG_FACTORIAL = 0x08
REG_STATUS = 0x20
REG_IRQ_STATUS = 0x24
REG_IRQ_RAISE = 0x60
REG_IRQ_ACK = 0x64
REG_DMA_SRC = 0x80
REG_DMA_DST = 0x88
REG_DMA_COUNT = 0x90
REG_DMA_CMD = 0x98

STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80

DMA_RUN = 0x1
DMA_TO_RAM = 0x2  # direction bit: 0 RAM -> device buffer, 1 device buffer -> RAM
DMA_IRQ = 0x4

IRQ_FACT = 0x001
IRQ_DMA = 0x100

DMA_START = 0x40000
DMA_SIZE = 4096
DEFAULT_DMA_MASK = (1 << 28) - 1

U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1


def factorial32(n: int) -> int:
    """n! modulo 2**32, as the device's 32-bit loop computes it (0! = 1)."""
    if n >= 34:  # 34! has 32 factors of two
        return 0
    result = 1
    for k in range(2, n + 1):
        result = result * k & U32
    return result


class Edu(PciDevice):
    """QEMU's edu device (see the module documentation)."""

    vendor_id = 0x1234
    device_id = 0x11E8
    subsystem_vendor_id = 0x1AF4
    subsystem_id = 0x1100
    revision = 0x10
    class_code = 0xFF0000
    interrupt_pin = 1
    bars: ClassVar = {0: Bar(BAR_SIZE, kind="mem32")}
    msi_vectors = 1
    power_management = False
    options = (
        Option("--dma-mask", "mask applied to DMA addresses (default 0x0fffffff, 28 bits)",
               type=integer, default=DEFAULT_DMA_MASK),
        Option("--dma-delay-ms", "delay before a DMA transfer runs (QEMU's edu: 100)",
               type=milliseconds, default=0.0, param="dma_delay"),
        Option("--mapped-scratch", "map a 4 KiB scratch page at BAR0 0x1000 into the guest "
               "(no message per access; QEMU then posts no writes)", switch=True),
    )

    #: The registers and the DMA buffer (docs/state.md). A state is saved between
    #: operations: :meth:`quiesce` waits for a running factorial or DMA to finish.
    state_fields = ("liveness", "fact", "status", "irq_status", "dma_src", "dma_dst",
                    "dma_count", "dma_cmd", "dma_buffer")
    state_version = 1

    def __init__(self, *, dma_mask: int = DEFAULT_DMA_MASK, dma_delay: float = 0.0,
                 mapped_scratch: bool = False) -> None:
        self.mapped_scratch = mapped_scratch
        super().__init__()
        self.dma_mask = dma_mask
        self.dma_delay = dma_delay
        #: How a transfer waits its ``dma_delay`` (a test may replace it to hold a transfer).
        self.sleep: Callable[[float], None] = time.sleep
        self._idle = threading.Condition(self.lock)
        #: (kind, detail) of each finished job: ("fact", n) or ("dma", cmd); for tests
        self.completed: list[tuple[str, int]] = []
        self._generation = 0
        self.reset()

    def bar_layout(self) -> Mapping[int, Bar]:
        if not self.mapped_scratch:
            return self.bars
        return {0: Bar(BAR_SIZE, kind="mem32", mapped=((SCRATCH_OFFSET, SCRATCH_SIZE),))}

    # --- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        with self.lock:
            self._generation += 1  # work still queued from before is dropped
            self.liveness = 0
            self.fact = 0
            self.status = 0
            self.irq_status = 0
            self.dma_src = 0
            self.dma_dst = 0
            self.dma_count = 0
            self.dma_cmd = 0
            self.dma_buffer = bytearray(DMA_SIZE)
            if self.mapped_scratch:
                self.mapped(0).fill(SCRATCH_OFFSET, SCRATCH_SIZE)
            if self.intx_level:
                self.set_intx(False)
            self._idle.notify_all()

    @property
    def busy(self) -> bool:
        """A factorial or a DMA transfer is still running."""
        return bool(self.status & STATUS_COMPUTING or self.dma_cmd & DMA_RUN)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no factorial or DMA is running."""
        with self._idle:
            if not self._idle.wait_for(lambda: not self.busy, timeout):
                raise TimeoutError("edu is still busy")

    # --- interrupts -------------------------------------------------------------------------
    def quiesce(self) -> None:
        """Let a running factorial or DMA finish (the caller sends no new BAR accesses)."""
        self.wait_idle()

    def check_state(self, fields: Mapping[str, StateValue]) -> None:
        limits = {"liveness": U32, "fact": U32, "status": STATUS_IRQFACT, "irq_status": U32,
                  "dma_src": U64, "dma_dst": U64, "dma_count": U64,
                  "dma_cmd": DMA_TO_RAM | DMA_IRQ}
        for name, limit in limits.items():
            value = fields[name]
            if not isinstance(value, int) or value < 0 or value & ~limit:
                raise StateError(f"edu: {name} {value!r} out of range (or work in flight)")
        buffer = fields["dma_buffer"]
        if not isinstance(buffer, (bytes, bytearray)) or len(buffer) != DMA_SIZE:
            raise StateError(f"edu: the DMA buffer is {DMA_SIZE} bytes")

    def state_loaded(self) -> None:
        self._generation += 1
        self._idle.notify_all()

    def raise_irq(self, value: int) -> None:
        """OR ``value`` into the interrupt status and signal (MSI, else assert INTx)."""
        with self.lock:
            self.irq_status |= value & U32
            if not self.irq_status:
                return
            if self.msi is not None and self.msi.enabled:
                self.interrupt(0)
            else:
                self.set_intx(True)

    def lower_irq(self, value: int) -> None:
        """Clear ``value``'s bits; INTx drops when the status reaches zero."""
        with self.lock:
            self.irq_status &= ~value & U32
            if not self.irq_status and not (self.msi is not None and self.msi.enabled):
                self.set_intx(False)

    # --- BAR0 -------------------------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        # the common case first (every trapped access pays for this method): a 32-bit
        # register below 0x80, read whole, one mask and no shift
        if offset < 0x80 and size == 4 and not offset & 3:
            return self._read32(offset) & U32
        if offset < 0x80 or not _valid(offset, size):
            return (1 << 8 * size) - 1
        value = self._read64(offset & ~7)
        if size == 4:
            return (value >> 32 if offset & 4 else value) & U32
        return value & U64

    def _read32(self, offset: int) -> int:
        # one comparison per register (as QEMU's switch), not a dict of them all per read
        if offset == REG_ID:
            return EDU_ID
        if offset == REG_LIVENESS:
            return self.liveness
        if offset == REG_FACTORIAL:
            return self.fact
        if offset == REG_STATUS:
            return self.status
        if offset == REG_IRQ_STATUS:
            return self.irq_status
        return U32

    def _read64(self, offset: int) -> int:
        if offset == REG_DMA_SRC:
            return self.dma_src
        if offset == REG_DMA_DST:
            return self.dma_dst
        if offset == REG_DMA_COUNT:
            return self.dma_count
        if offset == REG_DMA_CMD:
            return self.dma_cmd
        return U64

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if (size != 4 or offset & 3) if offset < 0x80 else not _valid(offset, size):
            return  # _valid() inline below 0x80: the common case pays no call
        if offset == REG_LIVENESS:
            self.liveness = ~value & U32
        elif offset == REG_FACTORIAL:
            self._start_factorial(value & U32)
        elif offset == REG_STATUS:
            self.status = (self.status & ~STATUS_IRQFACT) | (value & STATUS_IRQFACT)
        elif offset == REG_IRQ_RAISE:
            self.raise_irq(value)
        elif offset == REG_IRQ_ACK:
            self.lower_irq(value)
        elif REG_DMA_SRC <= offset < REG_DMA_CMD + 8:
            self._dma_register_write(offset, size, value)

    def _dma_register_write(self, offset: int, size: int, value: int) -> None:
        base = offset & ~7
        if base == REG_DMA_CMD:
            if offset != REG_DMA_CMD or not value & DMA_RUN:
                return  # QEMU: a command without the start bit is ignored
            if self.dma_cmd & DMA_RUN:
                return
            self.dma_cmd = value & U64
            self._start_dma()
            return
        if self.dma_cmd & DMA_RUN:
            return  # registers are frozen while a transfer runs
        name = {REG_DMA_SRC: "dma_src", REG_DMA_DST: "dma_dst", REG_DMA_COUNT: "dma_count"}[base]
        old = getattr(self, name)
        if size == 8:
            new = value
        elif offset & 4:
            new = (old & U32) | (value & U32) << 32
        else:
            new = value & U32  # a 4-byte write to the low half sets the register, as QEMU does
        setattr(self, name, new & U64)

    # --- asynchronous work ------------------------------------------------------------------
    def _run_async(self, fn: Callable[[], None]) -> None:
        if self.connected:
            self.defer(fn)
        else:
            threading.Thread(target=fn, name="edu-work", daemon=True).start()

    def _start_factorial(self, n: int) -> None:
        if self.status & STATUS_COMPUTING:
            return
        self.fact = n
        self.status |= STATUS_COMPUTING
        generation = self._generation
        self._run_async(lambda: self._finish_factorial(n, generation))

    def _finish_factorial(self, n: int, generation: int) -> None:
        result = factorial32(n)
        with self.lock:
            if generation != self._generation:
                return
            self.fact = result
            self.status &= ~STATUS_COMPUTING
            self.completed.append(("fact", n))
            self._idle.notify_all()
            if self.status & STATUS_IRQFACT:
                self.raise_irq(IRQ_FACT)

    def _start_dma(self) -> None:
        job = (self.dma_cmd, self.dma_src, self.dma_dst, self.dma_count, self._generation)
        self._run_async(lambda: self._run_dma(*job))

    def _run_dma(self, cmd: int, src: int, dst: int, count: int, generation: int) -> None:
        if self.dma_delay:
            self.sleep(self.dma_delay)
        try:
            self._transfer(cmd, src, dst, count, generation)
        except DmaError as exc:
            log.warning("edu: DMA failed: %s", exc)
        except Exception:
            log.exception("edu: DMA failed")
        with self.lock:
            if generation != self._generation:
                return
            self.dma_cmd &= ~DMA_RUN
            self.completed.append(("dma", cmd))
            self._idle.notify_all()
            if cmd & DMA_IRQ:
                self.raise_irq(IRQ_DMA)

    def _transfer(self, cmd: int, src: int, dst: int, count: int, generation: int) -> None:
        to_ram = bool(cmd & DMA_TO_RAM)
        device_addr, ram_addr = (src, dst) if to_ram else (dst, src)
        if not DMA_START <= device_addr <= DMA_START + DMA_SIZE - count:
            log.warning("edu: DMA of %#x bytes at device address %#x is outside the buffer "
                        "[%#x, %#x): ignored", count, device_addr, DMA_START,
                        DMA_START + DMA_SIZE)
            return
        if not self.bus_master:
            log.warning("edu: DMA with bus mastering disabled: ignored")
            return
        clamped = ram_addr & self.dma_mask
        if clamped != ram_addr:
            log.warning("edu: clamping DMA %#018x to %#018x", ram_addr, clamped)
        pos = device_addr - DMA_START
        if to_ram:
            with self.lock:
                data = bytes(self.dma_buffer[pos:pos + count])
            self.dma.write(clamped, data)
        else:
            data = self.dma.read(clamped, count)
            with self.lock:
                if generation == self._generation:
                    self.dma_buffer[pos:pos + count] = data


def _valid(offset: int, size: int) -> bool:
    """QEMU's edu: 4-byte accesses below 0x80, 4 or 8 bytes from 0x80, naturally aligned."""
    if offset < 0x80:
        return size == 4 and offset % 4 == 0
    return size in (4, 8) and offset % size == 0
