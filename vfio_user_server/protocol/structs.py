"""The wire layouts of vfio-user, in one table.

Every fixed-size structure is a frozen dataclass declared with its ``struct`` format; packing and
unpacking are derived from that single declaration (:class:`WireStruct`). :data:`COMMANDS` then
says, per command, which structure starts the request and the reply, what follows it, how
many fds may travel with it, and whether the request's ``argsz`` is checked. Handlers never
shift bits by hand.

All integers are little-endian ("host-endian" in the spec, and every supported host is LE).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ..errors import EncodeError, ProtocolError
from .constants import Command


class WireStruct:
    """Base of fixed-size wire structures; subclasses pass ``fmt=`` and are dataclasses."""

    STRUCT: ClassVar[struct.Struct]
    SIZE: ClassVar[int]
    _FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, fmt: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if fmt:
            cls.STRUCT = struct.Struct(fmt)
            cls.SIZE = cls.STRUCT.size

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        if not cls._FIELDS:
            cls._FIELDS = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        return cls._FIELDS

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        """Decode the structure at ``offset``; a short buffer is a :class:`ProtocolError`."""
        if len(buf) - offset < cls.SIZE:
            raise ProtocolError(
                f"{cls.__name__}: need {cls.SIZE} bytes at offset {offset}, have "
                f"{max(0, len(buf) - offset)}"
            )
        return cls(*cls.STRUCT.unpack_from(buf, offset))

    def pack(self) -> bytes:
        """Encode; a field value out of its range is an :class:`EncodeError` (a local bug)."""
        try:
            return self.STRUCT.pack(*(getattr(self, n) for n in self._field_names()))
        except struct.error as exc:
            raise EncodeError(f"{type(self).__name__}: value out of range: {exc}") from exc


# --- The table of layouts --------------------------------------------------------------------
# Field order is the wire order. Format characters: H=u16 I=u32 Q=u64 s=bytes.


@dataclass(frozen=True, slots=True)
class Header(WireStruct, fmt="<HHIII"):
    """Every message: ``u16 msg_id, u16 command, u32 size (with header), u32 flags, u32 error``."""

    msg_id: int
    command: int
    size: int
    flags: int
    error: int


@dataclass(frozen=True, slots=True)
class Version(WireStruct, fmt="<HH"):
    """VERSION request and reply: ``u16 major, u16 minor``, then NUL-terminated JSON."""

    major: int
    minor: int


@dataclass(frozen=True, slots=True)
class DmaMap(WireStruct, fmt="<IIQQQ"):
    """DMA_MAP: ``u32 argsz, u32 flags, u64 offset (in the fd), u64 addr (iova), u64 size``."""

    argsz: int
    flags: int
    offset: int
    addr: int
    size: int


@dataclass(frozen=True, slots=True)
class DmaUnmap(WireStruct, fmt="<IIQQ"):
    """DMA_UNMAP: ``u32 argsz, u32 flags, u64 addr, u64 size`` (+ obsolete bitmap)."""

    argsz: int
    flags: int
    addr: int
    size: int


@dataclass(frozen=True, slots=True)
class DirtyBitmap(WireStruct, fmt="<QQ"):
    """The obsolete ``vfio_bitmap`` after DMA_UNMAP with GET_DIRTY_BITMAP."""

    pgsize: int
    size: int


@dataclass(frozen=True, slots=True)
class DeviceInfo(WireStruct, fmt="<IIII"):
    """DEVICE_GET_INFO request and reply."""

    argsz: int
    flags: int
    num_regions: int
    num_irqs: int


@dataclass(frozen=True, slots=True)
class RegionInfo(WireStruct, fmt="<IIIIQQ"):
    """DEVICE_GET_REGION_INFO (``struct vfio_region_info``); caps follow in the reply."""

    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class RegionCapHeader(WireStruct, fmt="<HHI"):
    """Region info capability header; ``next`` counts from the start of RegionInfo."""

    id: int
    version: int
    next: int


@dataclass(frozen=True, slots=True)
class SparseMmap(WireStruct, fmt="<II"):
    """SPARSE_MMAP capability body: ``u32 nr_areas, u32 reserved``, then the areas."""

    nr_areas: int
    reserved: int


@dataclass(frozen=True, slots=True)
class SparseMmapArea(WireStruct, fmt="<QQ"):
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class RegionIoFds(WireStruct, fmt="<IIII"):
    """DEVICE_GET_REGION_IO_FDS request and reply head: ``argsz, flags, index, count``."""

    argsz: int
    flags: int
    index: int
    count: int


@dataclass(frozen=True, slots=True)
class IrqInfo(WireStruct, fmt="<IIII"):
    """DEVICE_GET_IRQ_INFO request and reply."""

    argsz: int
    flags: int
    index: int
    count: int


@dataclass(frozen=True, slots=True)
class IrqSet(WireStruct, fmt="<IIIII"):
    """DEVICE_SET_IRQS (``struct vfio_irq_set``); DATA_BOOL bytes follow, eventfds ride along."""

    argsz: int
    flags: int
    index: int
    start: int
    count: int


@dataclass(frozen=True, slots=True)
class RegionAccess(WireStruct, fmt="<QII"):
    """REGION_READ / REGION_WRITE: ``u64 offset, u32 region, u32 count`` (+ data)."""

    offset: int
    region: int
    count: int


@dataclass(frozen=True, slots=True)
class DmaAccess(WireStruct, fmt="<QQ"):
    """DMA_READ / DMA_WRITE as the spec (and QEMU 11.1) lays them out: data at byte 32."""

    addr: int
    count: int


@dataclass(frozen=True, slots=True)
class DmaAccessLegacy(WireStruct, fmt="<QI"):
    """DMA_READ reply / DMA_WRITE request of QEMU 10.1 and 10.2: ``u32 count``, data at 28."""

    addr: int
    count: int


@dataclass(frozen=True, slots=True)
class WriteMulti(WireStruct, fmt="<Q"):
    """REGION_WRITE_MULTI head: ``u64 wr_cnt``, then ``wr_cnt`` WriteMultiEntry."""

    wr_cnt: int


@dataclass(frozen=True, slots=True)
class WriteMultiEntry(WireStruct, fmt="<QII8s"):
    offset: int
    region: int
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DeviceFeature(WireStruct, fmt="<II"):
    """DEVICE_FEATURE: ``u32 argsz, u32 flags`` (feature index in bits 0-15)."""

    argsz: int
    flags: int


@dataclass(frozen=True, slots=True)
class MigData(WireStruct, fmt="<II"):
    """MIG_DATA_READ / MIG_DATA_WRITE: ``u32 argsz, u32 size`` (+ data)."""

    argsz: int
    size: int


@dataclass(frozen=True, slots=True)
class MigrationFeature(WireStruct, fmt="<Q"):
    """VFIO_DEVICE_FEATURE_MIGRATION data (GET): ``u64 flags`` (MigFlag)."""

    flags: int


@dataclass(frozen=True, slots=True)
class MigDeviceState(WireStruct, fmt="<II"):
    """VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE data: ``u32 device_state, u32 data_fd`` (unused)."""

    device_state: int
    data_fd: int


@dataclass(frozen=True, slots=True)
class MigStreamHeader(WireStruct, fmt="<8sIIQ"):
    """Our migration data stream (MIG_DATA_READ / MIG_DATA_WRITE carry it in pieces):
    ``8s magic, u32 version, u32 reserved (0), u64 length``, then ``length`` bytes of device
    state (docs/state.md). The length tells the destination when the stream is whole."""

    magic: bytes
    version: int
    reserved: int
    length: int


class Tail(enum.Enum):
    """What may follow the fixed structure of a message."""

    NONE = "none"  # nothing: the message is exactly the structure
    JSON = "json"  # optional NUL-terminated JSON (VERSION)
    DATA = "data"  # opaque bytes whose length another field gives
    ANY = "any"  # a length the handler checks (caps, bitmaps, entries)


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """How one command looks on the wire (client -> server unless ``server_request``)."""

    command: Command
    request: type[WireStruct] | None
    request_tail: Tail
    reply: type[WireStruct] | None
    #: fds a request may carry; None: as many as the server's ``max_msg_fds`` allows
    max_request_fds: int | None = 0
    server_request: bool = False  # sent by the server to the client
    #: The request starts with ``u32 argsz``, which must be at least the request structure's
    #: size (the size of the request for DMA_MAP and SET_IRQS, the largest reply the client
    #: takes for the others; see :attr:`min_argsz`). Unsupported commands are not checked.
    argsz: bool = False

    @property
    def min_argsz(self) -> int | None:
        """The smallest ``argsz`` a request may carry, or None if it has no argsz to check."""
        if not self.argsz or self.request is None:
            return None
        return self.request.SIZE


#: The one table: per command, its request structure, what may follow, its reply structure,
#: the fds a request may carry and whether its argsz is checked.
COMMANDS: dict[Command, CommandSpec] = {
    spec.command: spec
    for spec in (
        CommandSpec(Command.VERSION, Version, Tail.JSON, Version),
        CommandSpec(Command.DMA_MAP, DmaMap, Tail.NONE, None, max_request_fds=1, argsz=True),
        CommandSpec(Command.DMA_UNMAP, DmaUnmap, Tail.ANY, DmaUnmap, argsz=True),
        CommandSpec(Command.DEVICE_GET_INFO, DeviceInfo, Tail.NONE, DeviceInfo, argsz=True),
        CommandSpec(Command.DEVICE_GET_REGION_INFO, RegionInfo, Tail.NONE, RegionInfo,
                    argsz=True),
        CommandSpec(Command.DEVICE_GET_REGION_IO_FDS, RegionIoFds, Tail.NONE, RegionIoFds,
                    argsz=True),
        CommandSpec(Command.DEVICE_GET_IRQ_INFO, IrqInfo, Tail.NONE, IrqInfo, argsz=True),
        CommandSpec(Command.DEVICE_SET_IRQS, IrqSet, Tail.DATA, None, max_request_fds=None,
                    argsz=True),
        CommandSpec(Command.REGION_READ, RegionAccess, Tail.NONE, RegionAccess),
        CommandSpec(Command.REGION_WRITE, RegionAccess, Tail.DATA, RegionAccess),
        CommandSpec(Command.DMA_READ, DmaAccess, Tail.NONE, DmaAccess, server_request=True),
        CommandSpec(Command.DMA_WRITE, DmaAccess, Tail.DATA, DmaAccess, server_request=True),
        CommandSpec(Command.DEVICE_RESET, None, Tail.NONE, None),
        CommandSpec(Command.DIRTY_PAGES, None, Tail.ANY, None),
        CommandSpec(Command.REGION_WRITE_MULTI, WriteMulti, Tail.ANY, WriteMulti),
        CommandSpec(Command.DEVICE_FEATURE, DeviceFeature, Tail.ANY, DeviceFeature,
                    argsz=True),
        CommandSpec(Command.MIG_DATA_READ, MigData, Tail.NONE, MigData, argsz=True),
        CommandSpec(Command.MIG_DATA_WRITE, MigData, Tail.DATA, None, argsz=True),
    )
}
