"""Numbers of the virtio 1.x specification that the transport and the virtqueues use.

Each constant is written once, here; the transport (:mod:`.pci`), the virtqueues
(:mod:`.virtqueue`) and the devices import them. Names follow the specification's.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

# --- PCI identity (4.1.2) -----------------------------------------------------------------------

#: Vendor ID of every virtio PCI function.
VIRTIO_PCI_VENDOR_ID = 0x1AF4
#: Modern (non-transitional) device IDs are 0x1040 + the virtio device ID.
VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040
#: Revision ID 1 or more: a modern-only device (no legacy interface).
VIRTIO_PCI_MODERN_REVISION = 1


class DeviceId(IntEnum):
    """Virtio device IDs (5)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4


# --- device status (2.1) ------------------------------------------------------------------------


class Status(IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


# --- reserved feature bits (6) ------------------------------------------------------------------

F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35

#: Device-specific feature bits are 0..23 (and 50..127); the transport's are in between.
DEVICE_FEATURE_MASK = (1 << 24) - 1


def bit(n: int) -> int:
    """The feature mask of feature bit ``n``."""
    return 1 << n


# --- virtio PCI capabilities (4.1.4) -------------------------------------------------------------


class CfgType(IntEnum):
    """``cfg_type`` of a virtio PCI vendor-specific capability."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5


class CommonCfg(IntEnum):
    """Offsets in the common configuration structure (4.1.4.3), little-endian fields.

    ::

        0x00 le32 device_feature_select   RW      0x16 le16 queue_select        RW
        0x04 le32 device_feature          RO      0x18 le16 queue_size          RW
        0x08 le32 driver_feature_select   RW      0x1A le16 queue_msix_vector   RW
        0x0C le32 driver_feature          RW      0x1C le16 queue_enable        RW
        0x10 le16 config_msix_vector      RW      0x1E le16 queue_notify_off    RO
        0x12 le16 num_queues              RO      0x20 le64 queue_desc          RW
        0x14 u8   device_status           RW      0x28 le64 queue_driver        RW
        0x15 u8   config_generation       RO      0x30 le64 queue_device        RW
                                                  0x38 le16 queue_notify_data   RO
                                                  0x3A le16 queue_reset         RW
                                                  0x3C le16 admin_queue_index   RO
                                                  0x3E le16 admin_queue_num     RO
    """

    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    CONFIG_MSIX_VECTOR = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_DRIVER = 0x28
    QUEUE_DEVICE = 0x30
    QUEUE_NOTIFY_DATA = 0x38
    QUEUE_RESET = 0x3A
    ADMIN_QUEUE_INDEX = 0x3C
    ADMIN_QUEUE_NUM = 0x3E


#: Size of each common configuration field, by offset.
COMMON_CFG_SIZES: dict[int, int] = {
    CommonCfg.DEVICE_FEATURE_SELECT: 4, CommonCfg.DEVICE_FEATURE: 4,
    CommonCfg.DRIVER_FEATURE_SELECT: 4, CommonCfg.DRIVER_FEATURE: 4,
    CommonCfg.CONFIG_MSIX_VECTOR: 2, CommonCfg.NUM_QUEUES: 2,
    CommonCfg.DEVICE_STATUS: 1, CommonCfg.CONFIG_GENERATION: 1,
    CommonCfg.QUEUE_SELECT: 2, CommonCfg.QUEUE_SIZE: 2, CommonCfg.QUEUE_MSIX_VECTOR: 2,
    CommonCfg.QUEUE_ENABLE: 2, CommonCfg.QUEUE_NOTIFY_OFF: 2,
    CommonCfg.QUEUE_DESC: 8, CommonCfg.QUEUE_DRIVER: 8, CommonCfg.QUEUE_DEVICE: 8,
    CommonCfg.QUEUE_NOTIFY_DATA: 2, CommonCfg.QUEUE_RESET: 2,
    CommonCfg.ADMIN_QUEUE_INDEX: 2, CommonCfg.ADMIN_QUEUE_NUM: 2,
}  # fmt: skip
COMMON_CFG_SIZE = 0x40

#: "No MSI-X vector" in config_msix_vector / queue_msix_vector.
NO_VECTOR = 0xFFFF

#: ISR status bits (4.1.4.5).
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

# --- split virtqueues (2.7) ---------------------------------------------------------------------

#: Largest queue size of a split virtqueue.
MAX_QUEUE_SIZE = 32768

#: struct virtq_desc: le64 addr, le32 len, le16 flags, le16 next.
DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

#: avail ring: le16 flags, le16 idx, le16 ring[size], le16 used_event.
AVAIL_F_NO_INTERRUPT = 1
#: used ring: le16 flags, le16 idx, {le32 id, le32 len}[size], le16 avail_event.
USED_F_NO_NOTIFY = 1
USED_ELEM = struct.Struct("<II")
USED_ELEM_SIZE = USED_ELEM.size

#: Alignment the driver must give each part of a split virtqueue.
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4


# --- packed virtqueues (2.8) --------------------------------------------------------------------

#: struct pvirtq_desc: le64 addr, le32 len, le16 id, le16 flags.
PACKED_DESC = struct.Struct("<QIHH")
PACKED_DESC_F_AVAIL = 1 << 7
PACKED_DESC_F_USED = 1 << 15
#: struct pvirtq_event_suppress: le16 desc_event_off_wrap, le16 desc_event_flags.
EVENT_SUPPRESS_SIZE = 4
EVENT_FLAGS_ENABLE = 0
EVENT_FLAGS_DISABLE = 1
EVENT_FLAGS_DESC = 2
PACKED_DESC_ALIGN = 16
PACKED_EVENT_ALIGN = 4


def need_event(event_idx: int, new: int, old: int) -> bool:
    """``vring_need_event``: did the index move past ``event_idx`` going from old to new?"""
    return (new - event_idx - 1) & 0xFFFF < (new - old) & 0xFFFF
