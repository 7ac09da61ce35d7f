"""PCI configuration space: bytes with write / write-1-to-clear masks, hooks, and the header.

:class:`ConfigSpace` is the raw space: 256 bytes (conventional PCI) or 4096 bytes (PCI
Express). Every byte has a *write mask* (bits the client may set or clear) and a *RW1C mask*
(bits the client clears by writing 1). All other bits are read-only to the client; the device
side changes them with the ``set_*`` methods, which bypass the masks. Reserved bits are
read-only zero simply because nothing ever sets them.

Register tables are written as tuples of :class:`Field` (name, relative offset, size, write
mask, RW1C mask), one line per register, beside an ASCII diagram of the layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import ConfigSpaceError, DeviceDefinitionError

__all__ = [
    "CONFIG_SPACE_SIZE",
    "EXPRESS_CONFIG_SPACE_SIZE",
    "HEADER_FIELDS",
    "ConfigSpace",
    "Field",
    "Header",
    "ReadCallback",
    "WriteCallback",
    "install_header",
]

#: Size of a conventional PCI configuration space.
CONFIG_SPACE_SIZE = 256
#: Size of a PCI Express configuration space (extended capabilities from 0x100).
EXPRESS_CONFIG_SPACE_SIZE = 4096

#: ``callback(offset, length, old_bytes)``: the part of a client write that overlaps the
#: registered range, after the masked bytes were stored; ``old_bytes`` are that part's bytes
#: from before the write.
WriteCallback = Callable[[int, int, bytes], None]
#: ``callback(offset, length)``: the part of a client read that overlaps the registered range,
#: called before the bytes are copied, so it may refresh them with the ``set_*`` methods.
ReadCallback = Callable[[int, int], None]

# Header register offsets (type 0).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
MIN_GNT = 0x3E
MAX_LAT = 0x3F
HEADER_SIZE = 0x40

# Command register bits.
COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_PARITY = 1 << 6
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WMASK = (
    COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_MASTER
    | COMMAND_PARITY
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE
)

# Status register bits.
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
STATUS_MASTER_PARITY_ERROR = 1 << 8
STATUS_SIGNALED_TARGET_ABORT = 1 << 11
STATUS_RECEIVED_TARGET_ABORT = 1 << 12
STATUS_RECEIVED_MASTER_ABORT = 1 << 13
STATUS_SIGNALED_SYSTEM_ERROR = 1 << 14
STATUS_DETECTED_PARITY_ERROR = 1 << 15
STATUS_W1CMASK = (
    STATUS_MASTER_PARITY_ERROR
    | STATUS_SIGNALED_TARGET_ABORT
    | STATUS_RECEIVED_TARGET_ABORT
    | STATUS_RECEIVED_MASTER_ABORT
    | STATUS_SIGNALED_SYSTEM_ERROR
    | STATUS_DETECTED_PARITY_ERROR
)

HEADER_TYPE_MULTIFUNCTION = 0x80


@dataclass(frozen=True)
class Field:
    """One register in a register table.

    ``offset`` is relative to the structure that owns the table, ``size`` is 1 to 4 bytes
    (little-endian), ``wmask`` the client-writable bits and ``w1cmask`` the write-1-to-clear
    bits. Bits in neither mask are read-only.
    """

    name: str
    offset: int
    size: int
    wmask: int = 0
    w1cmask: int = 0

    @property
    def end(self) -> int:
        """First byte after the register."""
        return self.offset + self.size


class ConfigSpace:
    """A configuration space: ``data`` plus per-byte ``wmask`` and ``w1cmask``.

    Client accesses go through :meth:`read` and :meth:`write` (any offset and length inside
    the space). The device side uses :meth:`set_u8` / :meth:`set_u16` / :meth:`set_u32` /
    :meth:`set_bytes` (which ignore the masks) and :meth:`u8` / :meth:`u16` / :meth:`u32`.
    """

    def __init__(self, size: int = CONFIG_SPACE_SIZE) -> None:
        if size not in (CONFIG_SPACE_SIZE, EXPRESS_CONFIG_SPACE_SIZE):
            raise DeviceDefinitionError(f"config space size must be 256 or 4096, not {size}")
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self._write_hooks: list[tuple[int, int, WriteCallback]] = []
        self._read_hooks: list[tuple[int, int, ReadCallback]] = []
        self._reset_hooks: list[Callable[[], None]] = []
        self._power_on: bytes | None = None
        self._preserved: list[tuple[int, int]] = []

    # -- client accesses -------------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ConfigSpaceError(
                f"config access at {offset:#x}+{length} outside the {self.size}-byte space"
            )

    def read(self, offset: int, length: int) -> bytes:
        """Client read of ``length`` bytes at ``offset`` (read hooks run first)."""
        self._check(offset, length)
        end = offset + length
        for start, stop, callback in self._read_hooks:
            if start < end and offset < stop:
                lo, hi = max(start, offset), min(stop, end)
                callback(lo, hi - lo)
        return bytes(self.data[offset:end])

    def write(self, offset: int, data: bytes) -> None:
        """Client write: apply the write and RW1C masks, store, then run write hooks."""
        length = len(data)
        self._check(offset, length)
        end = offset + length
        old = bytes(self.data[offset:end])
        stored = self.data
        wmask = self.wmask
        w1c = self.w1cmask
        for i, value in enumerate(data):
            pos = offset + i
            wm = wmask[pos]
            stored[pos] = ((old[i] & ~wm) | (value & wm)) & ~(value & w1c[pos]) & 0xFF
        for start, stop, callback in list(self._write_hooks):
            if start < end and offset < stop:
                lo, hi = max(start, offset), min(stop, end)
                callback(lo, hi - lo, old[lo - offset : hi - offset])

    # -- hooks -----------------------------------------------------------------------------

    def on_write(self, start: int, end: int, callback: WriteCallback) -> None:
        """Call ``callback(offset, length, old_bytes)`` after each client write into
        ``[start, end)``, with the overlapping part only."""
        self._check(start, end - start)
        self._write_hooks.append((start, end, callback))

    def on_read(self, start: int, end: int, callback: ReadCallback) -> None:
        """Call ``callback(offset, length)`` before each client read overlapping
        ``[start, end)``, so that dynamic registers can be refreshed."""
        self._check(start, end - start)
        self._read_hooks.append((start, end, callback))

    def on_reset(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` at the end of every :meth:`reset`."""
        self._reset_hooks.append(callback)

    # -- device-side access ----------------------------------------------------------------

    def get(self, offset: int, size: int) -> int:
        """Little-endian value of ``size`` bytes at ``offset`` (no hooks)."""
        self._check(offset, size)
        return int.from_bytes(self.data[offset : offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        """Store a little-endian value, bypassing the masks (device side, no hooks)."""
        self._check(offset, size)
        if value < 0 or value >> (8 * size):
            raise ValueError(f"{value:#x} does not fit in {size} bytes")
        self.data[offset : offset + size] = value.to_bytes(size, "little")

    def u8(self, offset: int) -> int:
        """Byte at ``offset``."""
        return self.get(offset, 1)

    def u16(self, offset: int) -> int:
        """Little-endian 16-bit value at ``offset``."""
        return self.get(offset, 2)

    def u32(self, offset: int) -> int:
        """Little-endian 32-bit value at ``offset``."""
        return self.get(offset, 4)

    def set_u8(self, offset: int, value: int) -> None:
        """Store a byte, bypassing the masks."""
        self.set(offset, 1, value)

    def set_u16(self, offset: int, value: int) -> None:
        """Store a 16-bit value, bypassing the masks."""
        self.set(offset, 2, value)

    def set_u32(self, offset: int, value: int) -> None:
        """Store a 32-bit value, bypassing the masks."""
        self.set(offset, 4, value)

    def set_bytes(self, offset: int, data: bytes) -> None:
        """Store raw bytes, bypassing the masks."""
        self._check(offset, len(data))
        self.data[offset : offset + len(data)] = data

    def define(
        self, offset: int, size: int, value: int = 0, *, wmask: int = 0, w1cmask: int = 0
    ) -> None:
        """Declare a register: its power-on value and its write and RW1C masks."""
        if wmask & w1cmask:
            raise DeviceDefinitionError(f"register at {offset:#x}: bits both RW and RW1C")
        self.set(offset, size, value)
        self.wmask[offset : offset + size] = wmask.to_bytes(size, "little")
        self.w1cmask[offset : offset + size] = w1cmask.to_bytes(size, "little")

    def define_fields(
        self, base: int, fields: Iterable[Field], values: dict[str, int] | None = None
    ) -> None:
        """Declare every register of a table at ``base`` (values default to 0)."""
        values = values or {}
        for field in fields:
            self.define(
                base + field.offset,
                field.size,
                values.get(field.name, 0),
                wmask=field.wmask,
                w1cmask=field.w1cmask,
            )

    # -- reset -----------------------------------------------------------------------------

    def capture_power_on(self, preserve: Iterable[tuple[int, int]] = ()) -> None:
        """Remember the current bytes as the power-on state; ``preserve`` lists
        ``(start, end)`` ranges whose current value :meth:`reset` keeps (IDs)."""
        self._power_on = bytes(self.data)
        self._preserved = list(preserve)

    def reset(self) -> None:
        """Restore the power-on bytes (keeping preserved ranges), then run reset hooks."""
        if self._power_on is None:
            raise ConfigSpaceError("reset() before capture_power_on()")
        kept = [(start, bytes(self.data[start:end])) for start, end in self._preserved]
        self.data[:] = self._power_on
        for start, data in kept:
            self.data[start : start + len(data)] = data
        for callback in list(self._reset_hooks):
            callback()


@dataclass(frozen=True)
class Header:
    """Identity and fixed values of a type-0 header.

    ``class_code`` is 24 bits: base class << 16 | subclass << 8 | programming interface.
    ``interrupt_pin`` is 0 (no INTx) or 1..4 for INTA..INTD.
    """

    vendor_id: int
    device_id: int
    revision: int = 0
    class_code: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    interrupt_pin: int = 0
    multifunction: bool = False
    cache_line_size: int = 0
    min_gnt: int = 0
    max_lat: int = 0

    def __post_init__(self) -> None:
        limits = {
            "vendor_id": 0xFFFF,
            "device_id": 0xFFFF,
            "revision": 0xFF,
            "class_code": 0xFFFFFF,
            "subsystem_vendor_id": 0xFFFF,
            "subsystem_id": 0xFFFF,
            "interrupt_pin": 4,
            "cache_line_size": 0xFF,
            "min_gnt": 0xFF,
            "max_lat": 0xFF,
        }
        for name, limit in limits.items():
            value = getattr(self, name)
            if not 0 <= value <= limit:
                raise DeviceDefinitionError(f"header {name} {value:#x} out of range")
        if self.vendor_id == 0xFFFF:
            raise DeviceDefinitionError("vendor ID 0xffff means 'no device'")


#: The type-0 header::
#:
#:     31              16 15               0
#:    +------------------+------------------+
#:    |    Device ID     |    Vendor ID     | 0x00
#:    +------------------+------------------+
#:    | Status (RW1C)    | Command (RW)     | 0x04
#:    +------------------+--------+---------+
#:    |        Class Code         | Rev ID  | 0x08
#:    +--------+--------+---------+---------+
#:    |  BIST  | HdrTyp | LatTmr  | CLS(RW) | 0x0C
#:    +--------+--------+---------+---------+
#:    |        BAR0 .. BAR5 (see bars.py)   | 0x10-0x24
#:    +-------------------------------------+
#:    |        CardBus CIS pointer          | 0x28
#:    +------------------+------------------+
#:    |  Subsystem ID    | Subsys Vendor ID | 0x2C
#:    +------------------+------------------+
#:    |   Expansion ROM base (see bars.py)  | 0x30
#:    +---------------------------+---------+
#:    |         reserved          | CapPtr  | 0x34
#:    +---------------------------+---------+
#:    |         reserved                    | 0x38
#:    +--------+--------+---------+---------+
#:    | MaxLat | MinGnt | IntPin  | IntLine | 0x3C
#:    +--------+--------+---------+---------+
#:
#: Command: IO(0) MEM(1) MASTER(2) PARITY(6) SERR(8) INTX_DISABLE(10) are RW.
#: Status: bits 8, 11-15 are RW1C; INTERRUPT(3) and CAP_LIST(4) are read-only.
#: The latency timer is RW on conventional PCI and hardwired to 0 on PCI Express.
HEADER_FIELDS: tuple[Field, ...] = (
    #     name                   offset               size  wmask          w1cmask
    Field("vendor_id",           VENDOR_ID,           2),
    Field("device_id",           DEVICE_ID,           2),
    Field("command",             COMMAND,             2,    COMMAND_WMASK),
    Field("status",              STATUS,              2,    0,             STATUS_W1CMASK),
    Field("revision",            REVISION_ID,         1),
    Field("class_code",          CLASS_CODE,          3),
    Field("cache_line_size",     CACHE_LINE_SIZE,     1,    0xFF),
    Field("latency_timer",       LATENCY_TIMER,       1,    0xFF),
    Field("header_type",         HEADER_TYPE,         1),
    Field("bist",                BIST,                1),
    Field("cardbus_cis",         CARDBUS_CIS,         4),
    Field("subsystem_vendor_id", SUBSYSTEM_VENDOR_ID, 2),
    Field("subsystem_id",        SUBSYSTEM_ID,        2),
    Field("capabilities_ptr",    CAPABILITIES_POINTER, 1),
    Field("interrupt_line",      INTERRUPT_LINE,      1,    0xFF),
    Field("interrupt_pin",       INTERRUPT_PIN,       1),
    Field("min_gnt",             MIN_GNT,             1),
    Field("max_lat",             MAX_LAT,             1),
)  # fmt: skip


def install_header(space: ConfigSpace, header: Header, *, express: bool = False) -> None:
    """Write the header's registers and masks into ``space`` (BARs and ROM not included)."""
    values = {
        "vendor_id": header.vendor_id,
        "device_id": header.device_id,
        "revision": header.revision,
        "class_code": header.class_code,
        "cache_line_size": header.cache_line_size,
        "header_type": HEADER_TYPE_MULTIFUNCTION if header.multifunction else 0,
        "subsystem_vendor_id": header.subsystem_vendor_id,
        "subsystem_id": header.subsystem_id,
        "interrupt_pin": header.interrupt_pin,
        "min_gnt": 0 if express else header.min_gnt,
        "max_lat": 0 if express else header.max_lat,
    }
    fields = HEADER_FIELDS
    if express:
        # PCI Express hardwires the latency timer to 0.
        fields = tuple(
            Field(f.name, f.offset, f.size) if f.name == "latency_timer" else f for f in fields
        )
    space.define_fields(0, fields, values)
