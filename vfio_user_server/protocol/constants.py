"""Numbers of the vfio-user protocol: commands, header flags, region and IRQ indices.

Values come from QEMU's ``docs/interop/vfio-user.rst`` and Linux's ``<linux/vfio.h>``, whose
ioctl structures the protocol reuses.
"""

from __future__ import annotations

import enum

#: Size of the header that starts every message, request or reply.
HEADER_SIZE = 16

#: Protocol version this implementation speaks (QEMU sends and accepts 0.0).
VERSION_MAJOR = 0
VERSION_MINOR = 0


class Command(enum.IntEnum):
    """vfio-user command numbers (header ``command`` field)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MsgType(enum.IntEnum):
    """Header flags bits 0-3."""

    COMMAND = 0
    REPLY = 1


class HeaderFlag(enum.IntFlag):
    """Header flags above the type nibble."""

    NO_REPLY = 0x10
    ERROR = 0x20


MSG_TYPE_MASK = 0xF


class DmaMapFlag(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlag(enum.IntFlag):
    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1


class DeviceInfoFlag(enum.IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1


class RegionInfoFlag(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionCapId(enum.IntEnum):
    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3


class RegionIndex(enum.IntEnum):
    """Region indices of a vfio PCI device."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


#: Number of regions a PCI device reports (BAR0-5, ROM, CONFIG, VGA).
PCI_NUM_REGIONS = 9


class IrqIndex(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


#: Number of IRQ indices a PCI device reports.
PCI_NUM_IRQS = 5


class IrqInfoFlag(enum.IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlag(enum.IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


IRQ_SET_DATA_MASK = IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD
IRQ_SET_ACTION_MASK = IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER


class FeatureFlag(enum.IntFlag):
    """DEVICE_FEATURE ``flags`` above the feature index (bits 0-15)."""

    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


FEATURE_INDEX_MASK = 0xFFFF


class Feature(enum.IntEnum):
    """DEVICE_FEATURE indices (``VFIO_DEVICE_FEATURE_*`` of <linux/vfio.h>) the spec lists."""

    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


class MigFlag(enum.IntFlag):
    """VFIO_DEVICE_FEATURE_MIGRATION's ``u64 flags``: the optional parts of the v2 FSM."""

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


class MigState(enum.IntEnum):
    """``enum vfio_device_mig_state``: the migration v2 device states."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class DmaLayout(enum.Enum):
    """Where the data of a DMA_READ reply / DMA_WRITE request starts.

    ``SPEC``: the specification's layout (``u64 addr, u64 count``, data at byte 32), used by
    QEMU 11.1. ``LEGACY``: QEMU 10.1 and 10.2 (``u64 addr, u32 count``, data at byte 28, and a
    header-only DMA_WRITE reply). ``AUTO``: probe once per connection with a zero-length
    DMA_WRITE, whose reply is 32 bytes long in the spec's layout and 16 in the legacy one.
    """

    AUTO = "auto"
    SPEC = "spec"
    LEGACY = "legacy"
