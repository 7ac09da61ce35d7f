"""Base Address Registers and the Expansion ROM register.

A BAR register is sized by the client the usual way: write all-ones, read back. Here that is
nothing but the write mask: the address bits below the BAR size and the type bits are
read-only, so the read-back is ``~(size - 1) | type bits``.

Memory BAR (32-bit, or the lower half of a 64-bit pair)::

     31                                4   3    2  1   0
    +------------------------------------+----+------+---+
    |  base address (RW above size)      | PF | type | 0 |
    +------------------------------------+----+------+---+
      type 00 = 32-bit, 10 = 64-bit (next slot holds bits 63:32); PF = prefetchable

I/O BAR::

     31                                      2   1   0
    +------------------------------------------+---+---+
    |  base address (RW above size)            | 0 | 1 |
    +------------------------------------------+---+---+

Expansion ROM base address (0x30)::

     31                        11 10            1   0
    +----------------------------+---------------+-----+
    |  base address (RW > size)  |   reserved    | EN  |
    +----------------------------+---------------+-----+
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..errors import DeviceDefinitionError
from .config import BAR0, ROM_ADDRESS, ConfigSpace

__all__ = ["NUM_BARS", "Bar", "BarKind", "BarTable", "check_rom_size"]

#: Number of BAR slots in a type-0 header.
NUM_BARS = 6

BarKind = Literal["mem32", "mem64", "io"]

BAR_IO = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8
ROM_ENABLE = 0x1

MIN_IO_SIZE = 4
MAX_IO_SIZE = 1 << 16
MIN_MEM_SIZE = 16
MAX_MEM32_SIZE = 1 << 31
MAX_MEM64_SIZE = 1 << 63
MIN_ROM_SIZE = 2048
#: Mapped areas are whole pages (the client mmaps them).
MAP_PAGE = 4096
MAX_ROM_SIZE = 1 << 24


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class Bar:
    """Definition of one BAR: size in bytes (a power of two) and kind.

    ``kind`` is ``"mem32"``, ``"mem64"`` (occupies this slot and the next) or ``"io"``.
    Memory BARs are at least 16 bytes; QEMU maps BARs on page granularity, so a memory BAR
    smaller than 4096 bytes works but cannot be mmapped. I/O BARs are 4 bytes to 64 KiB.

    ``mapped`` lists ``(offset, size)`` areas of a memory BAR backed by shared memory that the
    client maps straight into the guest (sparse mmap): page-aligned, inside the BAR, not
    overlapping. The guest reads and writes them without a message; the device sees them as
    memory (:meth:`PciDevice.mapped <vfio_user_server.device.PciDevice.mapped>`). A client
    turns off posted writes for the whole device once a BAR has a mapped area (see
    :mod:`vfio_user_server.mapped`).
    """

    size: int
    kind: BarKind = field(default="mem32", kw_only=True)
    prefetchable: bool = field(default=False, kw_only=True)
    mapped: tuple[tuple[int, int], ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        if self.kind not in ("mem32", "mem64", "io"):
            raise DeviceDefinitionError(f"unknown BAR kind {self.kind!r}")
        if not _is_power_of_two(self.size):
            raise DeviceDefinitionError(f"BAR size {self.size:#x} is not a power of two")
        if self.kind == "io":
            if self.prefetchable:
                raise DeviceDefinitionError("an I/O BAR cannot be prefetchable")
            if not MIN_IO_SIZE <= self.size <= MAX_IO_SIZE:
                raise DeviceDefinitionError(
                    f"I/O BAR size {self.size:#x} not in [{MIN_IO_SIZE}, {MAX_IO_SIZE:#x}]"
                )
        else:
            limit = MAX_MEM32_SIZE if self.kind == "mem32" else MAX_MEM64_SIZE
            if not MIN_MEM_SIZE <= self.size <= limit:
                raise DeviceDefinitionError(
                    f"{self.kind} BAR size {self.size:#x} not in [{MIN_MEM_SIZE}, {limit:#x}]"
                )
        self._check_mapped()

    def _check_mapped(self) -> None:
        areas = tuple((int(o), int(s)) for o, s in self.mapped)
        object.__setattr__(self, "mapped", areas)
        if not areas:
            return
        if self.is_io:
            raise DeviceDefinitionError("an I/O BAR cannot have mapped areas")
        end = 0
        for offset, size in sorted(areas):
            if offset % MAP_PAGE or size % MAP_PAGE or size <= 0:
                raise DeviceDefinitionError(
                    f"mapped area {offset:#x}+{size:#x}: offset and size must be multiples of "
                    f"{MAP_PAGE:#x}")
            if offset < end or offset + size > self.size:
                raise DeviceDefinitionError(
                    f"mapped area {offset:#x}+{size:#x} overlaps another or leaves the BAR "
                    f"({self.size:#x} bytes)")
            end = offset + size

    @property
    def is_io(self) -> bool:
        """True for an I/O-space BAR."""
        return self.kind == "io"

    @property
    def is_64bit(self) -> bool:
        """True for a 64-bit memory BAR (uses two slots)."""
        return self.kind == "mem64"

    @property
    def type_bits(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.is_io:
            return BAR_IO
        bits = BAR_MEM_TYPE_64 if self.is_64bit else 0
        return bits | (BAR_MEM_PREFETCH if self.prefetchable else 0)

    @property
    def address_mask(self) -> int:
        """Writable address bits of the whole (up to 64-bit) register."""
        low = 0x3 if self.is_io else 0xF
        width = 64 if self.is_64bit else 32
        return ~(self.size - 1) & ~low & ((1 << width) - 1)


def check_rom_size(size: int) -> None:
    """Raise :class:`DeviceDefinitionError` unless ``size`` is a valid expansion ROM size."""
    if not _is_power_of_two(size) or not MIN_ROM_SIZE <= size <= MAX_ROM_SIZE:
        raise DeviceDefinitionError(
            f"ROM size {size:#x} must be a power of two in [{MIN_ROM_SIZE:#x}, {MAX_ROM_SIZE:#x}]"
        )


class BarTable:
    """The six BAR slots and the expansion ROM of a function.

    ``bars`` maps a slot index (0..5) to a :class:`Bar` or None, as a mapping or a sequence.
    A 64-bit BAR takes its slot and the next, which must then be empty.
    """

    def __init__(
        self,
        bars: Mapping[int, Bar | None] | Sequence[Bar | None] = (),
        rom_size: int | None = None,
    ) -> None:
        items = dict(bars) if isinstance(bars, Mapping) else dict(enumerate(bars))
        slots: list[Bar | None] = [None] * NUM_BARS
        for index, bar in items.items():
            if not 0 <= index < NUM_BARS:
                raise DeviceDefinitionError(f"BAR index {index} not in 0..5")
            slots[index] = bar
        for index, bar in enumerate(slots):
            if bar is None or not bar.is_64bit:
                continue
            if index == NUM_BARS - 1:
                raise DeviceDefinitionError("a 64-bit BAR cannot be in slot 5")
            if slots[index + 1] is not None:
                raise DeviceDefinitionError(
                    f"64-bit BAR {index} needs slot {index + 1} free for its upper half"
                )
        if rom_size is not None:
            check_rom_size(rom_size)
        self.bars: tuple[Bar | None, ...] = tuple(slots)
        self.rom_size = rom_size
        self._space: ConfigSpace | None = None

    def __getitem__(self, index: int) -> Bar | None:
        return self.bars[index]

    def is_upper_half(self, index: int) -> bool:
        """True when slot ``index`` holds the upper half of a 64-bit BAR."""
        if index == 0:
            return False
        below = self.bars[index - 1]
        return below is not None and below.is_64bit

    def install(self, space: ConfigSpace) -> None:
        """Define the BAR and ROM registers (values and masks) in ``space``."""
        for index, bar in enumerate(self.bars):
            if bar is None:
                if not self.is_upper_half(index):
                    space.define(BAR0 + 4 * index, 4)
                continue
            mask = bar.address_mask
            space.define(BAR0 + 4 * index, 4, bar.type_bits, wmask=mask & 0xFFFFFFFF)
            if bar.is_64bit:
                space.define(BAR0 + 4 * (index + 1), 4, 0, wmask=mask >> 32)
        if self.rom_size is None:
            space.define(ROM_ADDRESS, 4)
        else:
            rom_mask = (~(self.rom_size - 1) & 0xFFFFF800) | ROM_ENABLE
            space.define(ROM_ADDRESS, 4, 0, wmask=rom_mask)
        self._space = space

    @property
    def space(self) -> ConfigSpace:
        """The config space the table was installed in."""
        if self._space is None:
            raise DeviceDefinitionError("BAR table is not installed in a config space")
        return self._space

    def address(self, index: int) -> int:
        """Address currently programmed in BAR ``index`` (informational; 0 if unused).

        After a sizing write this is the size mask until the client restores the address.
        """
        bar = self.bars[index]
        if bar is None:
            return 0
        value = self.space.u32(BAR0 + 4 * index)
        if bar.is_io:
            return value & ~0x3 & 0xFFFFFFFF
        address = value & ~0xF & 0xFFFFFFFF
        if bar.is_64bit:
            address |= self.space.u32(BAR0 + 4 * (index + 1)) << 32
        return address

    @property
    def rom_address(self) -> int:
        """Address currently programmed in the ROM register (0 without a ROM)."""
        return self.space.u32(ROM_ADDRESS) & 0xFFFFF800

    @property
    def rom_enabled(self) -> bool:
        """The ROM register's enable bit."""
        return bool(self.space.u32(ROM_ADDRESS) & ROM_ENABLE)
