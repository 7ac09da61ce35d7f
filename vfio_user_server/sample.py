"""A small sample device that exercises every part of the framework.

Served as ``vfio-user-server --socket S sample``. The tests, the guest tests and the tutorial's
readers use it. Its ID is 1b36:7000 (Red Hat's QEMU vendor ID with a device ID QEMU does not
use; no Linux driver binds it on its own).

BAR0 (16 KiB, 64-bit memory)::

    0x000  ID        RO   0x5a4d0001
    0x004  SCRATCH   RW
    0x008  IRQ       WO   raise interrupt: MSI-X / MSI vector = value, or INTx
    0x00c  INTX      RW   INTx line level (1 asserted, 0 deasserted)
    0x010  DMA_ADDR  RW   64-bit guest address (lo at 0x10, hi at 0x14)
    0x018  DMA_LEN   RW   bytes, at most 2 KiB
    0x01c  DMA_CMD   WO   1: guest -> buffer, 2: buffer -> guest; | 0x100: interrupt when done
    0x020  DMA_STAT  RO   0 idle, 1 busy, 2 done, 3 error
    0x024  WRITES    RO   number of BAR writes so far
    0x800  BUFFER    RW   2 KiB device buffer
    0x2000 MSI-X table (4 vectors), 0x3000 PBA

BAR2 (256 bytes, I/O): offset 0 mirrors SCRATCH.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from typing import ClassVar, overload

from .device import PciDevice
from .errors import DmaError
from .pci import Bar

log = logging.getLogger(__name__)

ID_VALUE = 0x5A4D0001
BUFFER_OFFSET = 0x800
BUFFER_SIZE = 0x800

REG_ID = 0x00
REG_SCRATCH = 0x04
REG_IRQ = 0x08
REG_INTX = 0x0C
REG_DMA_ADDR = 0x10
REG_DMA_LEN = 0x18
REG_DMA_CMD = 0x1C
REG_DMA_STAT = 0x20
REG_WRITES = 0x24

DMA_TO_DEVICE = 1
DMA_FROM_DEVICE = 2
DMA_IRQ = 0x100
STAT_IDLE, STAT_BUSY, STAT_DONE, STAT_ERROR = 0, 1, 2, 3


Access = tuple[str, int, int, int, int]


class AccessLog:
    """The last ``limit`` BAR accesses, indexed by their position since the device was made.

    ``len()`` counts every access ever made, so ``log[len(log):]`` taken later gives what
    came since; older entries are dropped (a served device must not grow without bound).
    """

    def __init__(self, limit: int = 4096) -> None:
        self._items: deque[Access] = deque(maxlen=limit)
        self._total = 0
        self._lock = threading.Lock()

    def append(self, item: Access) -> None:
        with self._lock:
            self._items.append(item)
            self._total += 1

    def _snapshot(self) -> tuple[int, list[Access]]:
        with self._lock:
            return self._total - len(self._items), list(self._items)

    def __len__(self) -> int:
        return self._total

    def __iter__(self) -> Iterator[Access]:
        return iter(self._snapshot()[1])

    @overload
    def __getitem__(self, key: int) -> Access: ...

    @overload
    def __getitem__(self, key: slice) -> list[Access]: ...

    def __getitem__(self, key: int | slice) -> Access | list[Access]:
        first, items = self._snapshot()
        if isinstance(key, int):
            pos = key + first + len(items) if key < 0 else key
            if not first <= pos < first + len(items):
                raise IndexError(f"access {key} is not kept (kept: {first}..)")
            return items[pos - first]
        start, stop, step = key.indices(first + len(items))
        if start < first:
            raise IndexError(f"accesses before {first} were dropped")
        return items[start - first:stop - first:step]


class SampleDevice(PciDevice):
    """The sample device described in the module docstring."""

    vendor_id = 0x1B36
    device_id = 0x7000
    subsystem_vendor_id = 0x1B36
    subsystem_id = 0x0001
    revision = 1
    class_code = 0xFF0000
    interrupt_pin = 1
    bars: ClassVar = {0: Bar(0x4000, kind="mem64"), 2: Bar(256, kind="io")}
    msi_vectors = 4
    msix_vectors = 4
    msix_bar = 0
    msix_table_offset = 0x2000
    msix_pba_offset = 0x3000
    express = True

    def __init__(self) -> None:
        super().__init__()
        #: the last BAR accesses: ("r" | "w", bar, offset, size, value)
        self.accesses = AccessLog()
        self.reset()

    def reset(self) -> None:
        self.scratch = 0
        self.dma_addr = 0
        self.dma_len = 0
        self.dma_stat = STAT_IDLE
        self.writes = 0
        self.buffer = bytearray(BUFFER_SIZE)
        self.resets = getattr(self, "resets", -1) + 1

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        value = self._read(bar, offset, size)
        self.accesses.append(("r", bar, offset, size, value))
        return value

    def _read(self, bar: int, offset: int, size: int) -> int:
        if bar == 2:
            return self.scratch if offset == 0 else 0
        if BUFFER_OFFSET <= offset < BUFFER_OFFSET + BUFFER_SIZE:
            pos = offset - BUFFER_OFFSET
            return int.from_bytes(self.buffer[pos:pos + size].ljust(size, b"\0"), "little")
        regs = {
            REG_ID: ID_VALUE,
            REG_SCRATCH: self.scratch,
            REG_INTX: int(self.intx_level),
            REG_DMA_ADDR: self.dma_addr & 0xFFFFFFFF,
            REG_DMA_ADDR + 4: self.dma_addr >> 32,
            REG_DMA_LEN: self.dma_len,
            REG_DMA_STAT: self.dma_stat,
            REG_WRITES: self.writes,
        }
        if size == 8 and offset == REG_DMA_ADDR:
            return self.dma_addr
        return regs.get(offset, 0)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", bar, offset, size, value))
        self.writes += 1
        if bar == 2:
            if offset == 0:
                self.scratch = value
            return
        if BUFFER_OFFSET <= offset < BUFFER_OFFSET + BUFFER_SIZE:
            pos = offset - BUFFER_OFFSET
            data = value.to_bytes(size, "little")[: BUFFER_SIZE - pos]
            self.buffer[pos:pos + len(data)] = data
        elif offset == REG_SCRATCH:
            self.scratch = value
        elif offset == REG_IRQ:
            self.interrupt(value)
        elif offset == REG_INTX:
            self.set_intx(bool(value & 1))
        elif offset == REG_DMA_ADDR:
            if size == 8:
                self.dma_addr = value
            else:
                self.dma_addr = (self.dma_addr & ~0xFFFFFFFF) | value
        elif offset == REG_DMA_ADDR + 4:
            self.dma_addr = (self.dma_addr & 0xFFFFFFFF) | value << 32
        elif offset == REG_DMA_LEN:
            self.dma_len = min(value, BUFFER_SIZE)
        elif offset == REG_DMA_CMD:
            self._start_dma(value)

    def _start_dma(self, cmd: int) -> None:
        if not self.connected:
            self.dma_stat = STAT_ERROR
            return
        self.dma_stat = STAT_BUSY
        addr, length = self.dma_addr, self.dma_len
        # DMA may need DMA_READ/DMA_WRITE messages: never on the loop thread.
        self.defer(lambda: self._run_dma(cmd, addr, length))

    def _run_dma(self, cmd: int, addr: int, length: int) -> None:
        try:
            if cmd & 0xFF == DMA_TO_DEVICE:
                data = self.dma.read(addr, length)
                with self.lock:
                    self.buffer[:length] = data
            elif cmd & 0xFF == DMA_FROM_DEVICE:
                with self.lock:
                    data = bytes(self.buffer[:length])
                self.dma.write(addr, data)
            else:
                raise DmaError(f"unknown DMA command {cmd:#x}")
            status = STAT_DONE
        except DmaError as exc:
            log.warning("sample DMA failed: %s", exc)
            status = STAT_ERROR
        with self.lock:
            self.dma_stat = status
            if cmd & DMA_IRQ:
                self.interrupt(0)
