"""PCI capabilities: one class per capability, each with its register diagram and table.

A capability declares its registers as a tuple of :class:`~.config.Field` (relative offsets,
write and RW1C masks) beside an ASCII diagram, and adds behaviour by registering config-space
hooks in :meth:`Capability.attach`. :class:`CapabilityList` places standard capabilities from
0x40 (4-byte aligned, chained from the Capabilities Pointer at 0x34) and extended capabilities
from 0x100 in a 4 KiB space, and rejects overlaps and overflow.

Callbacks (``on_change``, ``on_flr``, ...) are plain attributes: set them at construction or
later, once the device object exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

from ..errors import DeviceDefinitionError, RegionAccessError
from .bars import NUM_BARS
from .config import (
    CAPABILITIES_POINTER,
    EXPRESS_CONFIG_SPACE_SIZE,
    HEADER_SIZE,
    STATUS,
    STATUS_CAP_LIST,
    ConfigSpace,
    Field,
)

__all__ = [
    "Capability",
    "CapabilityList",
    "DeviceSerialNumber",
    "ExtendedCapability",
    "Msi",
    "MsiX",
    "MsixTable",
    "PciExpress",
    "PowerManagement",
    "VendorSpecific",
    "VendorSpecificExtended",
    "walk_capabilities",
    "walk_extended_capabilities",
]

STANDARD_CAP_START = HEADER_SIZE
STANDARD_CAP_END = 0x100
EXTENDED_CAP_START = 0x100

# Linux gives up after this many capabilities (PCI_FIND_CAP_TTL).
_CAP_TTL = 48


class _Structure:
    """Shared machinery: a register table placed at ``offset`` in a config space."""

    #: The register table (relative offsets). Subclasses with a parameter-dependent layout
    #: override :meth:`fields` instead.
    FIELDS: ClassVar[tuple[Field, ...]] = ()

    def __init__(self, *, offset: int | None = None) -> None:
        #: Requested offset (None: placed automatically).
        self.requested_offset = offset
        self._space: ConfigSpace | None = None
        self._offset = 0
        self._by_name: dict[str, Field] = {}

    # -- layout ----------------------------------------------------------------------------

    def fields(self) -> tuple[Field, ...]:
        """This instance's register table."""
        return self.FIELDS

    def initial_values(self) -> dict[str, int]:
        """Power-on values by field name (missing fields are 0)."""
        return {}

    @property
    def length(self) -> int:
        """Size of the structure in bytes."""
        return max((f.end for f in self.fields()), default=4)

    # -- placement -------------------------------------------------------------------------

    @property
    def placed(self) -> bool:
        """True once the capability has been installed in a config space."""
        return self._space is not None

    @property
    def space(self) -> ConfigSpace:
        """The config space the capability lives in."""
        if self._space is None:
            raise DeviceDefinitionError(f"{type(self).__name__} is not placed in a config space")
        return self._space

    @property
    def offset(self) -> int:
        """Offset of the capability in config space."""
        _ = self.space
        return self._offset

    def install(self, space: ConfigSpace, offset: int) -> None:
        """Define the registers at ``offset`` and attach behaviour (called by the list)."""
        if self._space is not None:
            raise DeviceDefinitionError(
                f"{type(self).__name__} is already placed in a config space; "
                "create one capability object per device instance"
            )
        self._space = space
        self._offset = offset
        self._by_name = {f.name: f for f in self.fields()}
        space.define_fields(offset, self.fields(), self.initial_values())
        self.attach()

    def attach(self) -> None:
        """Register hooks; called once after the registers are defined."""

    def state_restored(self) -> None:
        """The config space bytes were replaced by a saved state's (device state loading).

        A capability that keeps state outside the bytes re-derives it here, silently: no
        callback fires, as nothing changed from the client's point of view.
        """

    # -- register access -------------------------------------------------------------------

    def get(self, name: str) -> int:
        """Current value of register ``name``."""
        space = self.space
        f = self._by_name[name]
        return space.get(self._offset + f.offset, f.size)

    def set(self, name: str, value: int) -> None:
        """Device-side store into register ``name`` (bypasses the masks)."""
        space = self.space
        f = self._by_name[name]
        space.set(self._offset + f.offset, f.size, value)

    def _hook(self, name: str, callback: Callable[[int, int, bytes], None]) -> None:
        f = self._by_name[name]
        start = self.offset + f.offset
        self.space.on_write(start, start + f.size, callback)


class Capability(_Structure):
    """Base class of standard capabilities (in the first 256 bytes).

    Every standard capability starts with::

         15        8 7         0
        +-----------+-----------+
        | next ptr  |  cap ID   |  +0x00
        +-----------+-----------+
    """

    #: Capability ID.
    cap_id: ClassVar[int]

    HEADER: ClassVar[tuple[Field, ...]] = (
        Field("cap_id", 0x00, 1),
        Field("next", 0x01, 1),
    )

    def initial_values(self) -> dict[str, int]:
        return {"cap_id": self.cap_id}


class ExtendedCapability(_Structure):
    """Base class of PCI Express extended capabilities (0x100..0xfff).

    Every extended capability starts with::

         31          20 19    16 15                   0
        +--------------+--------+----------------------+
        |   next ptr   |version |    capability ID     |  +0x00
        +--------------+--------+----------------------+
    """

    #: Extended capability ID (16 bits).
    cap_id: ClassVar[int]
    #: Capability version (4 bits).
    version: ClassVar[int] = 1

    HEADER: ClassVar[tuple[Field, ...]] = (Field("header", 0x00, 4),)

    def initial_values(self) -> dict[str, int]:
        return {"header": self.cap_id | (self.version << 16)}


# ---------------------------------------------------------------------------------------------
# Power Management


class PowerManagement(Capability):
    """Power Management (ID 0x01), version 1.2, D0 and D3hot only.

    ::

         31                     16 15         8 7          0
        +-------------------------+------------+------------+
        |     PMC (RO)            |    next    |    0x01    |  +0x00
        +------------+------------+------------+------------+
        | Data (RO)  | BSE (RO)   |   PMCSR                 |  +0x04
        +------------+------------+-------------------------+

        PMC    2:0 version = 011b (1.2); D1/D2/PME not supported.
        PMCSR  1:0 PowerState RW (00 = D0, 11 = D3hot; writes of D1/D2 are ignored)
               3   No_Soft_Reset RO

    ``on_state_change(old, new)`` is called when the power state changes.
    """

    cap_id = 0x01
    FIELDS = (
        *Capability.HEADER,
        #     name     offset size  wmask
        Field("pmc",   0x02,  2),
        Field("pmcsr", 0x04,  2,    0x0003),
        Field("bse",   0x06,  1),
        Field("data",  0x07,  1),
    )  # fmt: skip

    PMC_VERSION_1_2 = 0x0003
    PMCSR_STATE_MASK = 0x0003
    PMCSR_NO_SOFT_RESET = 0x0008
    D0 = 0
    D3HOT = 3

    def __init__(
        self,
        *,
        no_soft_reset: bool = True,
        on_state_change: Callable[[int, int], None] | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(offset=offset)
        self.no_soft_reset = no_soft_reset
        self.on_state_change = on_state_change

    def initial_values(self) -> dict[str, int]:
        pmcsr = self.PMCSR_NO_SOFT_RESET if self.no_soft_reset else 0
        return {**super().initial_values(), "pmc": self.PMC_VERSION_1_2, "pmcsr": pmcsr}

    def attach(self) -> None:
        self._hook("pmcsr", self._pmcsr_written)

    @property
    def power_state(self) -> int:
        """Current power state: 0 (D0) or 3 (D3hot)."""
        return self.get("pmcsr") & self.PMCSR_STATE_MASK

    def _pmcsr_written(self, offset: int, length: int, old: bytes) -> None:
        pmcsr_offset = self.offset + 4
        if offset != pmcsr_offset:
            return  # only the high byte of PMCSR was written: state bits unchanged
        old_state = old[0] & self.PMCSR_STATE_MASK
        new_state = self.power_state
        if new_state not in (self.D0, self.D3HOT):
            pmcsr = self.get("pmcsr")
            self.set("pmcsr", (pmcsr & ~self.PMCSR_STATE_MASK) | old_state)
            return
        if new_state != old_state and self.on_state_change is not None:
            self.on_state_change(old_state, new_state)


# ---------------------------------------------------------------------------------------------
# MSI


class Msi(Capability):
    """MSI (ID 0x05): 1..32 vectors, 32- or 64-bit address, optional per-vector masking.

    ::

         31                     16 15         8 7          0
        +-------------------------+------------+------------+
        |   Message Control       |    next    |    0x05    |  +0x00
        +-------------------------+------------+------------+
        |   Message Address [31:2]                     | 00 |  +0x04
        +----------------------------------------------+----+
        |   Message Upper Address (64-bit only)             |  +0x08
        +-------------------------+-------------------------+
        |   reserved (RO 0)       |   Message Data          |  +0x08 / +0x0C
        +-------------------------+-------------------------+
        |   Mask Bits (per-vector masking only)             |  +0x0C / +0x10
        +---------------------------------------------------+
        |   Pending Bits (RO; per-vector masking only)      |  +0x10 / +0x14
        +---------------------------------------------------+

        Message Control  0   MSI Enable RW
                         3:1 Multiple Message Capable RO (log2 vectors)
                         6:4 Multiple Message Enable RW (clamped to the capable value)
                         7   64-bit address capable RO
                         8   per-vector masking capable RO

    ``on_change()`` is called after the client changes the enable bit, the number of enabled
    vectors or the mask bits.
    """

    cap_id = 0x05
    CONTROL_ENABLE = 0x0001
    CONTROL_MMC_SHIFT = 1
    CONTROL_MME_SHIFT = 4
    CONTROL_MME_MASK = 0x0070
    CONTROL_64BIT = 0x0080
    CONTROL_PER_VECTOR_MASK = 0x0100

    def __init__(
        self,
        vectors: int = 1,
        *,
        address64: bool = True,
        per_vector_mask: bool = False,
        on_change: Callable[[], None] | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(offset=offset)
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise DeviceDefinitionError(f"MSI vectors must be a power of two <= 32, not {vectors}")
        self.vectors = vectors
        self.address64 = address64
        self.per_vector_mask = per_vector_mask
        self.on_change = on_change
        self._state: tuple[bool, int, int] = (False, 1, 0)

    def fields(self) -> tuple[Field, ...]:
        data = 0x0C if self.address64 else 0x08
        table = [
            *Capability.HEADER,
            #     name       offset      size  wmask
            Field("control", 0x02,       2,    self.CONTROL_ENABLE | self.CONTROL_MME_MASK),
            Field("address", 0x04,       4,    0xFFFFFFFC),
        ]  # fmt: skip
        if self.address64:
            table.append(Field("address_hi", 0x08, 4, 0xFFFFFFFF))
        table.append(Field("data", data, 2, 0xFFFF))
        if self.per_vector_mask:
            table += [
                Field("reserved", data + 2, 2),
                Field("mask", data + 4, 4, (1 << self.vectors) - 1),
                Field("pending", data + 8, 4),
            ]
        return tuple(table)

    def initial_values(self) -> dict[str, int]:
        control = (self.vectors.bit_length() - 1) << self.CONTROL_MMC_SHIFT
        if self.address64:
            control |= self.CONTROL_64BIT
        if self.per_vector_mask:
            control |= self.CONTROL_PER_VECTOR_MASK
        return {**super().initial_values(), "control": control}

    def attach(self) -> None:
        self._hook("control", self._control_written)
        if self.per_vector_mask:
            self._hook("mask", self._changed)
        self.space.on_reset(self._changed_silently)
        self._state = self._current_state()

    # -- device view -----------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """MSI Enable bit."""
        return bool(self.get("control") & self.CONTROL_ENABLE)

    @property
    def address(self) -> int:
        """Programmed message address (64-bit when the capability has the upper half)."""
        address = self.get("address")
        if self.address64:
            address |= self.get("address_hi") << 32
        return address

    @property
    def data(self) -> int:
        """Programmed message data (16 bits)."""
        return self.get("data")

    @property
    def num_enabled_vectors(self) -> int:
        """Vectors the client enabled (Multiple Message Enable), 1..vectors."""
        mme = (self.get("control") & self.CONTROL_MME_MASK) >> self.CONTROL_MME_SHIFT
        return 1 << mme

    def message(self, vector: int) -> tuple[int, int]:
        """``(address, data)`` the function writes to signal ``vector``."""
        self._check_vector(vector)
        low = self.num_enabled_vectors - 1
        return self.address, (self.data & ~low) | (vector & low)

    def is_masked(self, vector: int) -> bool:
        """Per-vector mask bit (always False without per-vector masking)."""
        self._check_vector(vector)
        return self.per_vector_mask and bool(self.get("mask") >> vector & 1)

    def is_pending(self, vector: int) -> bool:
        """Pending bit of ``vector`` (always False without per-vector masking)."""
        self._check_vector(vector)
        return self.per_vector_mask and bool(self.get("pending") >> vector & 1)

    def set_pending(self, vector: int, pending: bool) -> None:
        """Set or clear the pending bit of ``vector`` (no-op without per-vector masking)."""
        self._check_vector(vector)
        if not self.per_vector_mask:
            return
        bits = self.get("pending")
        self.set("pending", bits | (1 << vector) if pending else bits & ~(1 << vector))

    # -- internals -------------------------------------------------------------------------

    def _check_vector(self, vector: int) -> None:
        if not 0 <= vector < self.vectors:
            raise IndexError(f"MSI vector {vector} not in 0..{self.vectors - 1}")

    def _current_state(self) -> tuple[bool, int, int]:
        mask = self.get("mask") if self.per_vector_mask else 0
        return self.enabled, self.num_enabled_vectors, mask

    def _control_written(self, offset: int, length: int, old: bytes) -> None:
        control = self.get("control")
        mme = (control & self.CONTROL_MME_MASK) >> self.CONTROL_MME_SHIFT
        mmc = self.vectors.bit_length() - 1
        if mme > mmc:
            self.set("control", (control & ~self.CONTROL_MME_MASK) | mmc << self.CONTROL_MME_SHIFT)
        self._changed(offset, length, old)

    def _changed(self, offset: int, length: int, old: bytes) -> None:
        state = self._current_state()
        if state != self._state:
            self._state = state
            if self.on_change is not None:
                self.on_change()

    def _changed_silently(self) -> None:
        self._changed(0, 0, b"")

    def state_restored(self) -> None:
        self._state = self._current_state()


# ---------------------------------------------------------------------------------------------
# MSI-X


class MsixTable:
    """Memory of an MSI-X table and its Pending Bit Array, for the BAR handler.

    Table entry ``n`` at ``table_offset + 16 * n``::

         31                                           0
        +----------------------------------------------+
        |  Message Address [31:2]                 | 00 |  +0x0
        +----------------------------------------------+
        |  Message Upper Address                       |  +0x4
        +----------------------------------------------+
        |  Message Data                                |  +0x8
        +-----------------------------------------+----+
        |  reserved (RO 0)                        |MASK|  +0xC   (mask set at reset)
        +-----------------------------------------+----+

    The PBA (``ceil(N / 64)`` qwords at ``pba_offset``) is read-only: bit ``n`` is the pending
    bit the interrupt code sets with :meth:`set_pending`. Writes to it are ignored.

    Offsets given to :meth:`read` and :meth:`write` are offsets in the BAR; ``bar`` selects
    the BAR when the table and the PBA live in different BARs (default: the table's BAR).
    ``on_mask_change(vector, masked)`` is called whenever a vector's effective mask (its own
    mask bit or the function mask, or MSI-X being disabled) changes, so pending vectors can be
    delivered on unmask.
    """

    ENTRY_SIZE = 16
    MASK_BIT = 0x1
    _ENTRY_WMASK = (0xFFFFFFFC).to_bytes(4, "little") + b"\xff" * 8 + b"\x01\x00\x00\x00"

    def __init__(
        self,
        vectors: int,
        *,
        table_bar: int,
        table_offset: int,
        pba_bar: int,
        pba_offset: int,
        on_mask_change: Callable[[int, bool], None] | None = None,
    ) -> None:
        self.vectors = vectors
        self.table_bar = table_bar
        self.table_offset = table_offset
        self.pba_bar = pba_bar
        self.pba_offset = pba_offset
        self.on_mask_change = on_mask_change
        self.table_size = vectors * self.ENTRY_SIZE
        self.pba_size = (vectors + 63) // 64 * 8
        self._table = bytearray(self.table_size)
        self._pending = 0
        self._enabled = False
        self._function_mask = False
        self._clear()

    # -- BAR accesses ----------------------------------------------------------------------

    def owns(self, bar: int, offset: int, size: int) -> bool:
        """True when the access lies entirely in this table or this PBA."""
        return self._locate(bar, offset, size) is not None

    def _locate(self, bar: int, offset: int, size: int) -> str | None:
        end = offset + size
        if bar == self.table_bar and self.table_offset <= offset and end <= self._table_end:
            return "table"
        if bar == self.pba_bar and self.pba_offset <= offset and end <= self._pba_end:
            return "pba"
        return None

    @property
    def _table_end(self) -> int:
        return self.table_offset + self.table_size

    @property
    def _pba_end(self) -> int:
        return self.pba_offset + self.pba_size

    def read(self, offset: int, size: int, bar: int | None = None) -> bytes:
        """Read ``size`` bytes at BAR offset ``offset`` of the table or the PBA."""
        bar = self.table_bar if bar is None else bar
        where = self._locate(bar, offset, size)
        if where == "table":
            start = offset - self.table_offset
            return bytes(self._table[start : start + size])
        if where == "pba":
            start = offset - self.pba_offset
            return self._pending.to_bytes(self.pba_size, "little")[start : start + size]
        raise RegionAccessError(f"MSI-X access BAR{bar} {offset:#x}+{size} outside table/PBA")

    def write(self, offset: int, data: bytes, bar: int | None = None) -> None:
        """Write the table (masked as in the diagram); writes to the PBA are ignored."""
        bar = self.table_bar if bar is None else bar
        where = self._locate(bar, offset, len(data))
        if where == "pba":
            return
        if where != "table":
            raise RegionAccessError(
                f"MSI-X access BAR{bar} {offset:#x}+{len(data)} outside table/PBA"
            )
        start = offset - self.table_offset
        before = [self.is_masked(v) for v in self._vectors_in(start, len(data))]
        for i, value in enumerate(data):
            pos = start + i
            wm = self._ENTRY_WMASK[pos % self.ENTRY_SIZE]
            self._table[pos] = (self._table[pos] & ~wm) | (value & wm)
        for vector, was in zip(self._vectors_in(start, len(data)), before, strict=True):
            self._notify(vector, was)

    def _vectors_in(self, start: int, length: int) -> range:
        return range(start // self.ENTRY_SIZE, (start + length - 1) // self.ENTRY_SIZE + 1)

    # -- device view -----------------------------------------------------------------------

    def entry(self, vector: int) -> tuple[int, int, int]:
        """``(address, data, vector_control)`` of table entry ``vector``."""
        self._check_vector(vector)
        base = vector * self.ENTRY_SIZE
        address = int.from_bytes(self._table[base : base + 8], "little")
        data = int.from_bytes(self._table[base + 8 : base + 12], "little")
        control = int.from_bytes(self._table[base + 12 : base + 16], "little")
        return address, data, control

    def is_vector_masked(self, vector: int) -> bool:
        """The entry's own mask bit."""
        return bool(self.entry(vector)[2] & self.MASK_BIT)

    def is_masked(self, vector: int) -> bool:
        """True when ``vector`` may not be signalled: function mask or vector mask set."""
        return self._function_mask or self.is_vector_masked(vector)

    def is_pending(self, vector: int) -> bool:
        """PBA bit of ``vector``."""
        self._check_vector(vector)
        return bool(self._pending >> vector & 1)

    def set_pending(self, vector: int, pending: bool) -> None:
        """Set or clear the PBA bit of ``vector`` (interrupt code)."""
        self._check_vector(vector)
        if pending:
            self._pending |= 1 << vector
        else:
            self._pending &= ~(1 << vector)

    def snapshot(self) -> tuple[bytes, int]:
        """The table bytes and the pending bits (device state saving)."""
        return bytes(self._table), self._pending

    def check_image(self, table: bytes, pending: int) -> str | None:
        """Why ``(table, pending)`` cannot be this table's contents, or None if it can."""
        if len(table) != self.table_size:
            return f"MSI-X table is {len(table)} bytes, not {self.table_size}"
        for pos, value in enumerate(table):
            if value & ~self._ENTRY_WMASK[pos % self.ENTRY_SIZE]:
                return f"MSI-X table byte {pos:#x} has read-only bits set"
        if not 0 <= pending < 1 << self.vectors:
            return f"MSI-X pending bits {pending:#x} beyond {self.vectors} vectors"
        return None

    def restore(self, table: bytes, pending: int, *, enabled: bool, function_mask: bool
                ) -> None:
        """Replace the contents silently (no mask callbacks); :meth:`check_image` first."""
        problem = self.check_image(table, pending)
        if problem is not None:
            raise ValueError(problem)
        self._table[:] = table
        self._pending = pending
        self._enabled = enabled
        self._function_mask = function_mask

    def pending_vectors(self) -> list[int]:
        """Vectors whose PBA bit is set."""
        return [v for v in range(self.vectors) if self._pending >> v & 1]

    def reset(self) -> None:
        """Power-on state: all entries zero with the mask bit set, nothing pending.

        Reports vectors whose effective mask changed through ``on_mask_change``.
        """
        before = [self.is_masked(v) for v in range(self.vectors)]
        self._clear()
        for vector, was in enumerate(before):
            self._notify(vector, was)

    def _clear(self) -> None:
        self._table[:] = bytes(self.table_size)
        for vector in range(self.vectors):
            self._table[vector * self.ENTRY_SIZE + 12] = self.MASK_BIT
        self._pending = 0

    # -- called by the capability ----------------------------------------------------------

    def set_control(self, enabled: bool, function_mask: bool) -> None:
        """Update the Message Control state and report effective mask changes."""
        before = [self.is_masked(v) for v in range(self.vectors)]
        self._enabled = enabled
        self._function_mask = function_mask
        for vector, was in enumerate(before):
            self._notify(vector, was)

    def _notify(self, vector: int, was_masked: bool) -> None:
        masked = self.is_masked(vector)
        if masked != was_masked and self.on_mask_change is not None:
            self.on_mask_change(vector, masked)

    def _check_vector(self, vector: int) -> None:
        if not 0 <= vector < self.vectors:
            raise IndexError(f"MSI-X vector {vector} not in 0..{self.vectors - 1}")


class MsiX(Capability):
    """MSI-X (ID 0x11): N vectors, table and PBA in memory BARs.

    ::

         31                     16 15         8 7          0
        +-------------------------+------------+------------+
        |   Message Control       |    next    |    0x11    |  +0x00
        +-------------------------+------------+------+-----+
        |   Table Offset [31:3]                       | BIR |  +0x04
        +---------------------------------------------+-----+
        |   PBA Offset [31:3]                         | BIR |  +0x08
        +---------------------------------------------+-----+

        Message Control  10:0 Table Size (N - 1) RO
                         14   Function Mask RW
                         15   MSI-X Enable RW

    The table memory is :attr:`table` (an :class:`MsixTable`); by default the PBA follows the
    table in the same BAR. ``on_change()`` is called when the client changes the enable or
    function-mask bit.
    """

    cap_id = 0x11
    FIELDS = (
        *Capability.HEADER,
        #     name       offset size  wmask
        Field("control", 0x02,  2,    0xC000),
        Field("table",   0x04,  4),
        Field("pba",     0x08,  4),
    )  # fmt: skip

    CONTROL_ENABLE = 0x8000
    CONTROL_FUNCTION_MASK = 0x4000
    MAX_VECTORS = 2048

    def __init__(
        self,
        vectors: int,
        *,
        table_bar: int,
        table_offset: int = 0,
        pba_bar: int | None = None,
        pba_offset: int | None = None,
        on_change: Callable[[], None] | None = None,
        on_mask_change: Callable[[int, bool], None] | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(offset=offset)
        if not 1 <= vectors <= self.MAX_VECTORS:
            raise DeviceDefinitionError(f"MSI-X vectors must be 1..2048, not {vectors}")
        pba_bar = table_bar if pba_bar is None else pba_bar
        if pba_offset is None:
            pba_offset = (
                table_offset + vectors * MsixTable.ENTRY_SIZE if pba_bar == table_bar else 0
            )
        for name, bar, off in (("table", table_bar, table_offset), ("PBA", pba_bar, pba_offset)):
            if not 0 <= bar < NUM_BARS:
                raise DeviceDefinitionError(f"MSI-X {name} BIR {bar} not in 0..{NUM_BARS - 1}")
            if off < 0 or off % 8 or off >> 32:
                raise DeviceDefinitionError(f"MSI-X {name} offset {off:#x} not 8-byte aligned")
        self.vectors = vectors
        self.on_change = on_change
        #: The table and PBA memory, served by the BAR handler.
        self.table = MsixTable(
            vectors,
            table_bar=table_bar,
            table_offset=table_offset,
            pba_bar=pba_bar,
            pba_offset=pba_offset,
            on_mask_change=on_mask_change,
        )
        if pba_bar == table_bar and (
            pba_offset < table_offset + self.table.table_size
            and table_offset < pba_offset + self.table.pba_size
        ):
            raise DeviceDefinitionError("MSI-X table and PBA overlap")
        self._state = (False, False)

    def initial_values(self) -> dict[str, int]:
        t = self.table
        return {
            **super().initial_values(),
            "control": self.vectors - 1,
            "table": t.table_offset | t.table_bar,
            "pba": t.pba_offset | t.pba_bar,
        }

    def attach(self) -> None:
        self._hook("control", self._control_written)
        self.space.on_reset(self._after_reset)

    @property
    def enabled(self) -> bool:
        """MSI-X Enable bit."""
        return bool(self.get("control") & self.CONTROL_ENABLE)

    @property
    def function_masked(self) -> bool:
        """Function Mask bit."""
        return bool(self.get("control") & self.CONTROL_FUNCTION_MASK)

    def is_masked(self, vector: int) -> bool:
        """Function mask or the vector's mask bit."""
        return self.table.is_masked(vector)

    def set_pending(self, vector: int, pending: bool) -> None:
        """Set or clear the PBA bit of ``vector``."""
        self.table.set_pending(vector, pending)

    def _control_written(self, offset: int, length: int, old: bytes) -> None:
        self._update()

    def state_restored(self) -> None:
        self._state = (self.enabled, self.function_masked)
        self.table.restore(*self.table.snapshot(), enabled=self.enabled,
                           function_mask=self.function_masked)

    def _after_reset(self) -> None:
        self.table.reset()
        self._update()

    def _update(self) -> None:
        state = (self.enabled, self.function_masked)
        self.table.set_control(*state)
        if state != self._state:
            self._state = state
            if self.on_change is not None:
                self.on_change()


# ---------------------------------------------------------------------------------------------
# PCI Express


class PciExpress(Capability):
    """PCI Express capability (ID 0x10), version 2, for an endpoint.

    ::

         31                     16 15         8 7          0
        +-------------------------+------------+------------+
        |  PCIe Capabilities      |    next    |    0x10    |  +0x00
        +-------------------------+------------+------------+
        |  Device Capabilities (FLR capable = bit 28)       |  +0x04
        +-------------------------+-------------------------+
        |  Device Status (RW1C)   |  Device Control         |  +0x08
        +-------------------------+-------------------------+
        |  Link Capabilities (speed 3:0, width 9:4)         |  +0x0C
        +-------------------------+-------------------------+
        |  Link Status (RO)       |  Link Control           |  +0x10
        +-------------------------+-------------------------+
        |  Slot Capabilities / Control / Status (RO 0)      |  +0x14, +0x18
        +---------------------------------------------------+
        |  Root Control / Capabilities / Status (RO 0)      |  +0x1C, +0x20
        +---------------------------------------------------+
        |  Device Capabilities 2                            |  +0x24
        +-------------------------+-------------------------+
        |  Device Status 2        |  Device Control 2       |  +0x28
        +-------------------------+-------------------------+
        |  Link Capabilities 2 (supported speeds 7:1)       |  +0x2C
        +-------------------------+-------------------------+
        |  Link Status 2          |  Link Control 2         |  +0x30
        +-------------------------+-------------------------+
        |  Slot Capabilities 2 / Control 2 / Status 2 (0)   |  +0x34, +0x38
        +---------------------------------------------------+

        Device Control   4:0 error reporting / relaxed ordering RW, 7:5 MPS RW, 8 ext tag RW,
                         11 no snoop RW, 14:12 max read request RW,
                         15 Initiate FLR: writing 1 calls on_flr(); always reads 0
        Device Status    3:0 error detected bits RW1C
        Link Control     1:0 ASPM, 3 RCB, 6 common clock, 7 extended synch RW

    ``on_flr()`` is called after a write of 1 to Initiate FLR; it normally resets the
    function (``PciConfig.reset()`` and the device's own state).
    """

    cap_id = 0x10
    FIELDS = (
        *Capability.HEADER,
        #     name          offset size  wmask   w1cmask
        Field("pcie_caps",  0x02,  2),
        Field("dev_caps",   0x04,  4),
        Field("dev_ctl",    0x08,  2,    0xF9FF),
        Field("dev_sta",    0x0A,  2,    0,      0x000F),
        Field("link_caps",  0x0C,  4),
        Field("link_ctl",   0x10,  2,    0x00CB),
        Field("link_sta",   0x12,  2),
        Field("slot_caps",  0x14,  4),
        Field("slot_ctl",   0x18,  2),
        Field("slot_sta",   0x1A,  2),
        Field("root_ctl",   0x1C,  2),
        Field("root_caps",  0x1E,  2),
        Field("root_sta",   0x20,  4),
        Field("dev_caps2",  0x24,  4),
        Field("dev_ctl2",   0x28,  2,    0x0010),
        Field("dev_sta2",   0x2A,  2),
        Field("link_caps2", 0x2C,  4),
        Field("link_ctl2",  0x30,  2),
        Field("link_sta2",  0x32,  2),
        Field("slot_caps2", 0x34,  4),
        Field("slot_ctl2",  0x38,  2),
        Field("slot_sta2",  0x3A,  2),
    )  # fmt: skip

    VERSION = 2
    TYPE_ENDPOINT = 0x0
    TYPE_LEGACY_ENDPOINT = 0x1
    TYPE_RC_INTEGRATED_ENDPOINT = 0x9
    DEV_CAPS_EXT_TAG = 1 << 5
    DEV_CAPS_ROLE_BASED_ERR = 1 << 15
    DEV_CAPS_FLR = 1 << 28
    DEV_CTL_FLR = 1 << 15
    DEV_CAPS2_COMPLETION_TIMEOUT_DISABLE = 1 << 4

    def __init__(
        self,
        *,
        flr: bool = True,
        port_type: int = TYPE_ENDPOINT,
        max_payload: int = 128,
        link_speed: int = 1,
        link_width: int = 1,
        on_flr: Callable[[], None] | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(offset=offset)
        if port_type not in (
            self.TYPE_ENDPOINT,
            self.TYPE_LEGACY_ENDPOINT,
            self.TYPE_RC_INTEGRATED_ENDPOINT,
        ):
            raise DeviceDefinitionError(f"PCIe port type {port_type:#x} is not an endpoint")
        if max_payload not in (128, 256, 512, 1024, 2048, 4096):
            raise DeviceDefinitionError(f"PCIe max payload {max_payload} invalid")
        if not 1 <= link_speed <= 6:
            raise DeviceDefinitionError(f"PCIe link speed {link_speed} not in 1..6")
        if link_width not in (1, 2, 4, 8, 12, 16, 32):
            raise DeviceDefinitionError(f"PCIe link width x{link_width} invalid")
        self.flr = flr
        self.port_type = port_type
        self.max_payload = max_payload
        self.link_speed = link_speed
        self.link_width = link_width
        self.on_flr = on_flr

    def initial_values(self) -> dict[str, int]:
        dev_caps = (
            (self.max_payload.bit_length() - 8)
            | self.DEV_CAPS_EXT_TAG
            | self.DEV_CAPS_ROLE_BASED_ERR
            | (self.DEV_CAPS_FLR if self.flr else 0)
        )
        link = self.link_speed | self.link_width << 4
        return {
            **super().initial_values(),
            "pcie_caps": self.VERSION | self.port_type << 4,
            "dev_caps": dev_caps,
            "dev_ctl": 0x2810,  # relaxed ordering, no snoop, 512-byte read requests
            "link_caps": link,
            "link_sta": link,
            "dev_caps2": self.DEV_CAPS2_COMPLETION_TIMEOUT_DISABLE,
            "link_caps2": ((1 << self.link_speed) - 1) << 1,
            "link_ctl2": self.link_speed,
        }

    def attach(self) -> None:
        self._hook("dev_ctl", self._dev_ctl_written)

    def _dev_ctl_written(self, offset: int, length: int, old: bytes) -> None:
        dev_ctl = self.get("dev_ctl")
        if not dev_ctl & self.DEV_CTL_FLR:
            return
        self.set("dev_ctl", dev_ctl & ~self.DEV_CTL_FLR)
        if self.flr and self.on_flr is not None:
            self.on_flr()


# ---------------------------------------------------------------------------------------------
# Vendor-specific


class VendorSpecific(Capability):
    """Vendor-specific capability (ID 0x09) carrying read-only payload bytes.

    ::

         31          24 23        16 15         8 7          0
        +--------------+------------+------------+------------+
        |  payload[0]  |   length   |    next    |    0x09    |  +0x00
        +--------------+------------+------------+------------+
        |  payload[1..] ...                                    |  +0x04
        +------------------------------------------------------+

        length = 3 + len(payload), as the spec counts it (header included).
    """

    cap_id = 0x09

    def __init__(self, payload: bytes, *, offset: int | None = None) -> None:
        super().__init__(offset=offset)
        if len(payload) > STANDARD_CAP_END - STANDARD_CAP_START - 3:
            raise DeviceDefinitionError("vendor-specific payload too long")
        self.payload = bytes(payload)

    def fields(self) -> tuple[Field, ...]:
        return (*Capability.HEADER, Field("length", 0x02, 1))

    @property
    def length(self) -> int:
        return 3 + len(self.payload)

    def initial_values(self) -> dict[str, int]:
        return {**super().initial_values(), "length": self.length}

    def attach(self) -> None:
        self.space.set_bytes(self.offset + 3, self.payload)


class DeviceSerialNumber(ExtendedCapability):
    """Device Serial Number extended capability (ID 0x0003, version 1).

    ::

         31                                              0
        +-------------------------------------------------+
        |  next [31:20] | ver [19:16] |  ID 0x0003        |  +0x00
        +-------------------------------------------------+
        |  Serial Number, lower DW                        |  +0x04
        +-------------------------------------------------+
        |  Serial Number, upper DW                        |  +0x08
        +-------------------------------------------------+
    """

    cap_id = 0x0003
    version = 1
    FIELDS = (
        *ExtendedCapability.HEADER,
        Field("serial_lo", 0x04, 4),
        Field("serial_hi", 0x08, 4),
    )

    def __init__(self, serial: int, *, offset: int | None = None) -> None:
        super().__init__(offset=offset)
        if not 0 <= serial < 1 << 64:
            raise DeviceDefinitionError("serial number must fit in 64 bits")
        self.serial = serial

    def initial_values(self) -> dict[str, int]:
        return {
            **super().initial_values(),
            "serial_lo": self.serial & 0xFFFFFFFF,
            "serial_hi": self.serial >> 32,
        }


class VendorSpecificExtended(ExtendedCapability):
    """Vendor-Specific Extended Capability (ID 0x000b, version 1) with read-only payload.

    ::

         31                                              0
        +-------------------------------------------------+
        |  next [31:20] | ver [19:16] |  ID 0x000b        |  +0x00
        +---------------+-------------+-------------------+
        |  length [31:20] | rev [19:16] | VSEC ID [15:0]  |  +0x04
        +-------------------------------------------------+
        |  payload ...                                    |  +0x08
        +-------------------------------------------------+

        length = 8 + len(payload), the whole structure in bytes.
    """

    cap_id = 0x000B
    version = 1

    def __init__(
        self, vsec_id: int, payload: bytes, *, vsec_rev: int = 0, offset: int | None = None
    ) -> None:
        super().__init__(offset=offset)
        if not 0 <= vsec_id <= 0xFFFF or not 0 <= vsec_rev <= 0xF:
            raise DeviceDefinitionError("VSEC ID must fit 16 bits and revision 4 bits")
        if 8 + len(payload) > 0xFFF:
            raise DeviceDefinitionError("VSEC payload too long")
        self.vsec_id = vsec_id
        self.vsec_rev = vsec_rev
        self.payload = bytes(payload)

    def fields(self) -> tuple[Field, ...]:
        return (*ExtendedCapability.HEADER, Field("vsec_header", 0x04, 4))

    @property
    def length(self) -> int:
        return 8 + len(self.payload)

    def initial_values(self) -> dict[str, int]:
        vsec = self.vsec_id | self.vsec_rev << 16 | self.length << 20
        return {**super().initial_values(), "vsec_header": vsec}

    def attach(self) -> None:
        self.space.set_bytes(self.offset + 8, self.payload)


# ---------------------------------------------------------------------------------------------
# Placement and walking


def _align4(value: int) -> int:
    return (value + 3) & ~3


class CapabilityList:
    """Places capabilities in a config space and chains their next pointers.

    Standard capabilities go from 0x40 upward, extended capabilities from 0x100 (the first one
    must be at 0x100). A capability with an explicit ``offset`` is put there; the others take
    the lowest free 4-byte aligned spot. The chain follows the order given.
    """

    def __init__(
        self,
        capabilities: Sequence[Capability] = (),
        extended: Sequence[ExtendedCapability] = (),
    ) -> None:
        self.capabilities: tuple[Capability, ...] = tuple(capabilities)
        self.extended: tuple[ExtendedCapability, ...] = tuple(extended)

    def install(self, space: ConfigSpace) -> None:
        """Place every capability in ``space``, chain them and set the header pointers."""
        for cap in (*self.capabilities, *self.extended):
            if cap.placed:
                raise DeviceDefinitionError(
                    f"{type(cap).__name__} is already placed in a config space"
                )
        if self.extended and space.size < EXPRESS_CONFIG_SPACE_SIZE:
            raise DeviceDefinitionError("extended capabilities need a 4096-byte config space")
        std_offsets = self._layout(self.capabilities, STANDARD_CAP_START, STANDARD_CAP_END)
        ext_offsets = self._layout(self.extended, EXTENDED_CAP_START, space.size)
        if ext_offsets and ext_offsets[0] != EXTENDED_CAP_START:
            raise DeviceDefinitionError("the first extended capability must be at 0x100")

        for cap, offset in zip(self.capabilities, std_offsets, strict=True):
            cap.install(space, offset)
        for offset, nxt in zip(std_offsets, [*std_offsets[1:], 0], strict=False):
            space.set_u8(offset + 1, nxt)
        if std_offsets:
            space.set_u8(CAPABILITIES_POINTER, std_offsets[0])
            space.set_u16(STATUS, space.u16(STATUS) | STATUS_CAP_LIST)

        for ext, offset in zip(self.extended, ext_offsets, strict=True):
            ext.install(space, offset)
        for offset, nxt in zip(ext_offsets, [*ext_offsets[1:], 0], strict=False):
            space.set_u32(offset, space.u32(offset) & 0xFFFFF | nxt << 20)

    @staticmethod
    def _layout(caps: Sequence[_Structure], start: int, end: int) -> list[int]:
        used = bytearray(end)
        used[:start] = b"\x01" * start

        def claim(cap: _Structure, offset: int) -> None:
            length = _align4(cap.length)
            if offset + length > end:
                raise DeviceDefinitionError(
                    f"{type(cap).__name__} at {offset:#x} (+{cap.length}) overflows {end:#x}"
                )
            if any(used[offset : offset + length]):
                raise DeviceDefinitionError(
                    f"{type(cap).__name__} at {offset:#x} overlaps another structure"
                )
            used[offset : offset + length] = b"\x01" * length

        offsets: list[int | None] = []
        for cap in caps:
            offset = cap.requested_offset
            if offset is not None:
                if offset % 4 or not start <= offset < end:
                    raise DeviceDefinitionError(
                        f"{type(cap).__name__} offset {offset:#x} must be 4-byte aligned "
                        f"in [{start:#x}, {end:#x})"
                    )
                claim(cap, offset)
            offsets.append(offset)
        placed: list[int] = []
        for cap, offset in zip(caps, offsets, strict=True):
            if offset is None:
                length = _align4(cap.length)
                offset = next(
                    (o for o in range(start, end - length + 1, 4) if not any(used[o : o + length])),
                    None,
                )
                if offset is None:
                    raise DeviceDefinitionError(
                        f"no room for {type(cap).__name__} ({cap.length} bytes)"
                    )
                claim(cap, offset)
            placed.append(offset)
        return placed

    def find(self, cap_id: int) -> Capability | None:
        """First standard capability with ``cap_id``."""
        return next((c for c in self.capabilities if c.cap_id == cap_id), None)

    def find_extended(self, cap_id: int) -> ExtendedCapability | None:
        """First extended capability with ``cap_id``."""
        return next((c for c in self.extended if c.cap_id == cap_id), None)


def walk_capabilities(space: ConfigSpace) -> Iterator[tuple[int, int]]:
    """Yield ``(offset, cap_id)`` following the chain from 0x34 the way Linux does."""
    if not space.u16(STATUS) & STATUS_CAP_LIST:
        return
    pos = space.u8(CAPABILITIES_POINTER) & ~3
    for _ in range(_CAP_TTL):
        if pos < STANDARD_CAP_START:
            return
        cap_id = space.u8(pos)
        if cap_id == 0xFF:
            return
        yield pos, cap_id
        pos = space.u8(pos + 1) & ~3


def walk_extended_capabilities(space: ConfigSpace) -> Iterator[tuple[int, int, int]]:
    """Yield ``(offset, cap_id, version)`` following the chain from 0x100."""
    if space.size < EXPRESS_CONFIG_SPACE_SIZE:
        return
    pos = EXTENDED_CAP_START
    for _ in range((EXPRESS_CONFIG_SPACE_SIZE - EXTENDED_CAP_START) // 8):
        header = space.u32(pos)
        if header in (0, 0xFFFFFFFF):
            return
        yield pos, header & 0xFFFF, header >> 16 & 0xF
        pos = header >> 20
        if pos < EXTENDED_CAP_START:
            return
