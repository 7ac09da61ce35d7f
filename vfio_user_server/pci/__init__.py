"""The PCI function model: configuration space, BARs and capabilities. No I/O.

The parts live in :mod:`.config` (``ConfigSpace``, ``Header``), :mod:`.bars` (``Bar``,
``BarTable``) and :mod:`.capabilities`; :class:`PciConfig`, defined here, puts them together
into the initialized configuration space of one function::

    msix = MsiX(8, table_bar=0, table_offset=0x2000, pba_offset=0x3000)
    config = PciConfig(
        Header(vendor_id=0x1B36, device_id=0x1234, class_code=0x018000, interrupt_pin=1),
        bars={0: Bar(0x4000, kind="mem64"), 2: Bar(256, kind="io")},
        capabilities=[PowerManagement(), Msi(4, per_vector_mask=True), msix,
                      PciExpress(on_flr=device.flr)],
        extended_capabilities=[DeviceSerialNumber(0x1122334455667788)],
    )
    config.write(0x04, b"\\x06\\x00")            # a client config write
    config.find_capability(MsiX) is msix        # True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TypeVar, overload

from ..errors import DeviceDefinitionError
from .bars import NUM_BARS, Bar, BarKind, BarTable
from .capabilities import (
    Capability,
    CapabilityList,
    DeviceSerialNumber,
    ExtendedCapability,
    Msi,
    MsiX,
    MsixTable,
    PciExpress,
    PowerManagement,
    VendorSpecific,
    VendorSpecificExtended,
    walk_capabilities,
    walk_extended_capabilities,
)
from .config import (
    COMMAND,
    COMMAND_INTX_DISABLE,
    COMMAND_IO,
    COMMAND_MASTER,
    COMMAND_MEMORY,
    CONFIG_SPACE_SIZE,
    DEVICE_ID,
    EXPRESS_CONFIG_SPACE_SIZE,
    REVISION_ID,
    STATUS,
    STATUS_INTERRUPT,
    SUBSYSTEM_VENDOR_ID,
    VENDOR_ID,
    ConfigSpace,
    Field,
    Header,
    install_header,
)

__all__ = [
    "COMMAND",
    "COMMAND_INTX_DISABLE",
    "COMMAND_IO",
    "COMMAND_MASTER",
    "COMMAND_MEMORY",
    "CONFIG_SPACE_SIZE",
    "EXPRESS_CONFIG_SPACE_SIZE",
    "NUM_BARS",
    "Bar",
    "BarKind",
    "BarTable",
    "Capability",
    "CapabilityList",
    "ConfigSpace",
    "DeviceSerialNumber",
    "ExtendedCapability",
    "Field",
    "Header",
    "Msi",
    "MsiX",
    "MsixTable",
    "PciConfig",
    "PciExpress",
    "PowerManagement",
    "VendorSpecific",
    "VendorSpecificExtended",
    "walk_capabilities",
    "walk_extended_capabilities",
]

C = TypeVar("C", bound=Capability)
E = TypeVar("E", bound=ExtendedCapability)


class PciConfig:
    """The initialized configuration space of one PCI function.

    ``bars`` maps slot index to :class:`Bar` (or None), as a mapping or a sequence of up to 6.
    ``rom_size`` gives the expansion ROM size (None: no ROM; the register then reads 0).
    The space is 4096 bytes when ``express`` is true, or when a :class:`PciExpress` or any
    extended capability is given; otherwise 256. Capability objects are used as given (keep a
    reference, or look them up with :meth:`find_capability`) and belong to this config only.
    """

    def __init__(
        self,
        header: Header,
        *,
        bars: Mapping[int, Bar | None] | Sequence[Bar | None] = (),
        rom_size: int | None = None,
        capabilities: Sequence[Capability] = (),
        extended_capabilities: Sequence[ExtendedCapability] = (),
        express: bool = False,
    ) -> None:
        express = (
            express
            or bool(extended_capabilities)
            or any(isinstance(c, PciExpress) for c in capabilities)
        )
        self.header = header
        self.express = express
        #: The BAR slots and ROM; ``bars.address(i)`` is BAR i's programmed address.
        self.bars = BarTable(bars, rom_size)
        self._caps = CapabilityList(capabilities, extended_capabilities)
        for cap in capabilities:
            if isinstance(cap, MsiX):
                self._check_msix(cap)
        #: The configuration space the client reads and writes.
        self.space = ConfigSpace(EXPRESS_CONFIG_SPACE_SIZE if express else CONFIG_SPACE_SIZE)
        install_header(self.space, header, express=express)
        self.bars.install(self.space)
        self._caps.install(self.space)
        self.space.capture_power_on(
            preserve=[(VENDOR_ID, DEVICE_ID + 2), (REVISION_ID, REVISION_ID + 4),
                      (SUBSYSTEM_VENDOR_ID, SUBSYSTEM_VENDOR_ID + 4)]
        )  # fmt: skip

    def _check_msix(self, cap: MsiX) -> None:
        table = cap.table
        for what, index, start, size in (
            ("table", table.table_bar, table.table_offset, table.table_size),
            ("PBA", table.pba_bar, table.pba_offset, table.pba_size),
        ):
            bar = self.bars[index]
            if bar is None or bar.is_io:
                raise DeviceDefinitionError(f"MSI-X {what} BIR {index} is not a memory BAR")
            if start + size > bar.size:
                raise DeviceDefinitionError(
                    f"MSI-X {what} ({start:#x}+{size:#x}) does not fit in BAR{index}"
                )

    # -- client access ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Size of the configuration space: 256 or 4096."""
        return self.space.size

    def read(self, offset: int, length: int) -> bytes:
        """Client read (see :meth:`ConfigSpace.read`)."""
        return self.space.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        """Client write (see :meth:`ConfigSpace.write`)."""
        self.space.write(offset, data)

    def reset(self) -> None:
        """Restore power-on values (IDs kept) and reset every capability's state.

        This is what DEVICE_RESET and FLR do to configuration space; the MSI-X table is reset
        too, and capability callbacks report the resulting state changes.
        """
        self.space.reset()

    # -- device view -----------------------------------------------------------------------

    @property
    def command(self) -> int:
        """Current Command register."""
        return self.space.u16(COMMAND)

    def set_interrupt_status(self, asserted: bool) -> None:
        """Set the Status register's Interrupt Status bit (INTx asserted)."""
        status = self.space.u16(STATUS)
        self.space.set_u16(
            STATUS, status | STATUS_INTERRUPT if asserted else status & ~STATUS_INTERRUPT
        )

    def bar_address(self, index: int) -> int:
        """Address programmed in BAR ``index`` (informational; 0 when unused)."""
        return self.bars.address(index)

    @property
    def capabilities(self) -> tuple[Capability, ...]:
        """Standard capabilities, in chain order."""
        return self._caps.capabilities

    @property
    def extended_capabilities(self) -> tuple[ExtendedCapability, ...]:
        """Extended capabilities, in chain order."""
        return self._caps.extended

    @overload
    def find_capability(self, kind: type[C]) -> C | None: ...
    @overload
    def find_capability(self, kind: int) -> Capability | None: ...
    def find_capability(self, kind: int | type[Capability]) -> Capability | None:
        """First standard capability with this ID, or of this class."""
        if isinstance(kind, int):
            return self._caps.find(kind)
        return next((c for c in self._caps.capabilities if isinstance(c, kind)), None)

    @overload
    def find_extended_capability(self, kind: type[E]) -> E | None: ...
    @overload
    def find_extended_capability(self, kind: int) -> ExtendedCapability | None: ...
    def find_extended_capability(
        self, kind: int | type[ExtendedCapability]
    ) -> ExtendedCapability | None:
        """First extended capability with this ID, or of this class."""
        if isinstance(kind, int):
            return self._caps.find_extended(kind)
        return next((c for c in self._caps.extended if isinstance(c, kind)), None)

    def walk_capabilities(self) -> Iterator[tuple[int, int]]:
        """``(offset, cap_id)`` for each standard capability, read from config space."""
        return walk_capabilities(self.space)

    def walk_extended_capabilities(self) -> Iterator[tuple[int, int, int]]:
        """``(offset, cap_id, version)`` for each extended capability, from config space."""
        return walk_extended_capabilities(self.space)
