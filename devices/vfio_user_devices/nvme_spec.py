"""NVMe 1.4 tables for :mod:`vfio_user_devices.nvme`: registers, opcodes, status codes, data
structures (Identify, log pages), submission/completion entry layouts and PRP walking.

Everything here is pure: no threads, no I/O, so it can be tested (and read) on its own.
Numbers are from the NVM Express Base Specification 1.4 (register map section 3.1, admin
commands section 5, NVM commands section 6).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Mapping
from enum import IntEnum
from typing import TypeVar, overload

# --- controller registers (BAR0) --------------------------------------------------------------
REG_CAP = 0x00  # 64-bit
REG_VS = 0x08
REG_INTMS = 0x0C
REG_INTMC = 0x10
REG_CC = 0x14
REG_CSTS = 0x1C
REG_NSSR = 0x20
REG_AQA = 0x24
REG_ASQ = 0x28  # 64-bit
REG_ACQ = 0x30  # 64-bit
REG_CMBLOC = 0x38
REG_CMBSZ = 0x3C
DOORBELL_BASE = 0x1000

VERSION_1_4 = 0x00010400

# CAP fields
CAP_CQR = 1 << 16
CAP_CSS_NVM = 1 << 37


def make_cap(mqes: int, timeout_500ms: int) -> int:
    """CAP: MQES (0-based), CQR, no AMS, TO, DSTRD 0, CSS NVM, MPSMIN = MPSMAX = 4 KiB."""
    return (mqes & 0xFFFF) | CAP_CQR | (timeout_500ms & 0xFF) << 24 | CAP_CSS_NVM


# CC fields
CC_EN = 1 << 0
CC_CSS_SHIFT, CC_CSS_MASK = 4, 0x7
CC_MPS_SHIFT, CC_MPS_MASK = 7, 0xF
CC_AMS_SHIFT, CC_AMS_MASK = 11, 0x7
CC_SHN_SHIFT, CC_SHN_MASK = 14, 0x3
CC_IOSQES_SHIFT, CC_IOSQES_MASK = 16, 0xF
CC_IOCQES_SHIFT, CC_IOCQES_MASK = 20, 0xF
CC_WRITABLE = 0x00FFFFF1

# AQA fields: admin SQ size (ASQS) in bits 11:0, admin CQ size (ACQS) in bits 27:16, 0-based
AQA_WRITABLE = 0x0FFF0FFF


def aqa_sizes(aqa: int) -> tuple[int, int]:
    """(admin SQ entries, admin CQ entries) of an AQA value."""
    return (aqa & 0xFFF) + 1, ((aqa >> 16) & 0xFFF) + 1


#: INTMS/INTMC bit of the one vector used without MSI-X (pin-based or MSI)
INTMS_VECTOR0 = 1 << 0

#: Doorbell stride (CAP.DSTRD 0): 4 bytes, SQ y tail then CQ y head.
DOORBELL_SHIFT = 2


def doorbell_queue(offset: int) -> tuple[int, bool]:
    """(queue id, True for a CQ head doorbell) of a doorbell register offset in BAR0."""
    index = (offset - DOORBELL_BASE) >> DOORBELL_SHIFT
    return index >> 1, bool(index & 1)

# CSTS fields
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
CSTS_SHST_MASK = 3 << CSTS_SHST_SHIFT
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2
CSTS_NSSRO = 1 << 4

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
SQE_SIZE = 64
CQE_SIZE = 16
SQES_LOG2 = 6
CQES_LOG2 = 4


class AdminOpcode(IntEnum):
    DELETE_SQ = 0x00
    CREATE_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_CQ = 0x04
    CREATE_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    KEEP_ALIVE = 0x18


class IoOpcode(IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08
    DSM = 0x09


SCT_GENERIC = 0
SCT_COMMAND_SPECIFIC = 1


class Status(IntEnum):
    """Status field values (SCT << 8 | SC), without DNR/M/CRD."""

    SUCCESS = 0x00
    INVALID_OPCODE = 0x01
    INVALID_FIELD = 0x02
    CID_CONFLICT = 0x03
    DATA_TRANSFER_ERROR = 0x04
    INTERNAL_ERROR = 0x06
    ABORT_REQUESTED = 0x07
    SQ_DELETED = 0x08
    INVALID_NAMESPACE = 0x0B
    COMMAND_SEQUENCE_ERROR = 0x0C
    INVALID_PRP_OFFSET = 0x13
    LBA_OUT_OF_RANGE = 0x80
    CAPACITY_EXCEEDED = 0x81
    # command specific
    INVALID_CQ = 0x100
    INVALID_QID = 0x101
    INVALID_QUEUE_SIZE = 0x102
    ABORT_LIMIT = 0x103
    AER_LIMIT = 0x105
    INVALID_VECTOR = 0x108
    INVALID_LOG_PAGE = 0x109
    INVALID_QUEUE_DELETION = 0x10C
    FEATURE_NOT_SAVEABLE = 0x10D
    FEATURE_NOT_CHANGEABLE = 0x10E


#: Do Not Retry, in the 15-bit status field of a completion (bit 14).
STATUS_DNR = 1 << 14


class NvmeError(Exception):
    """A command fails with ``status`` (DNR is added unless ``retry``)."""

    def __init__(self, status: Status, message: str = "", *, retry: bool = False) -> None:
        super().__init__(message or status.name)
        self.status = status
        self.retry = retry

    @property
    def field(self) -> int:
        """The 15-bit status field of the completion."""
        return int(self.status) | (0 if self.retry else STATUS_DNR)


class Feature(IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIG = 0x09
    WRITE_ATOMICITY = 0x0A
    ASYNC_EVENT_CONFIG = 0x0B


class LogPage(IntEnum):
    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03


class Cns(IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACES = 0x02
    NS_DESCRIPTORS = 0x03


# Async event types / infos (Asynchronous Event Request completion dword 0)
AER_TYPE_ERROR = 0
AER_INFO_INVALID_DOORBELL_REGISTER = 0x00
AER_INFO_INVALID_DOORBELL_VALUE = 0x01


def aer_result(event_type: int, info: int, log_page: int) -> int:
    return (event_type & 7) | (info & 0xFF) << 8 | (log_page & 0xFF) << 16


# --- entries ------------------------------------------------------------------------------------
#: opcode, flags (FUSE / PSDT), CID, NSID, CDW2-3, MPTR, PRP1, PRP2, CDW10..CDW15
SQE = struct.Struct("<BBHIQQQQIIIIII")
#: DW0, DW1, SQ head, SQ id, CID, phase | status << 1
CQE = struct.Struct("<IIHHHH")

assert SQE.size == SQE_SIZE and CQE.size == CQE_SIZE

SqeTuple = tuple[int, int, int, int, int, int, int, int, int, int, int, int, int, int]

# --- command fields -----------------------------------------------------------------------------
# Indices into an ``SQE.unpack`` tuple (:data:`SqeTuple`) and the bits of the fields; the
# decoders below take such a tuple (the per-command path uses the constants, a call less).
SQE_OPCODE, SQE_FLAGS, SQE_CID, SQE_NSID = 0, 1, 2, 3
SQE_PRP1, SQE_PRP2 = 6, 7
CDW10, CDW11, CDW12, CDW13, CDW14, CDW15 = 8, 9, 10, 11, 12, 13

#: CDW0 FLAGS: FUSE (bits 1:0, fused operation) and PSDT (bits 7:6, PRPs or SGLs)
FLAGS_FUSE = 0x03
FLAGS_PSDT = 0xC0
#: NSID meaning every namespace (Flush, Get/Set Features)
NSID_ALL = 0xFFFFFFFF


H = TypeVar("H")


def command_handler(handlers: Mapping[int, H], cmd: SqeTuple, command_set: str) -> H:
    """The handler of the command's opcode; :class:`NvmeError` for fused or unknown commands."""
    if cmd[SQE_FLAGS] & FLAGS_FUSE:
        raise NvmeError(Status.INVALID_FIELD, "fused operations are not supported")
    handler = handlers.get(cmd[SQE_OPCODE])
    if handler is None:
        raise NvmeError(Status.INVALID_OPCODE, f"{command_set} opcode {cmd[SQE_OPCODE]:#x}")
    return handler


def fused(cmd: SqeTuple) -> bool:
    return bool(cmd[SQE_FLAGS] & FLAGS_FUSE)


def uses_sgl(cmd: SqeTuple) -> bool:
    return bool(cmd[SQE_FLAGS] & FLAGS_PSDT)


# NVM Read, Write, Write Zeroes: SLBA in CDW10-11, NLB (0-based) and FUA in CDW12
RW_NLB_MASK = 0xFFFF
RW_FUA = 1 << 30


def rw_slba(cmd: SqeTuple) -> int:
    """Starting LBA."""
    return cmd[CDW10] | cmd[CDW11] << 32


def rw_nlb(cmd: SqeTuple) -> int:
    """Number of logical blocks (1-based)."""
    return (cmd[CDW12] & RW_NLB_MASK) + 1


def rw_fua(cmd: SqeTuple) -> bool:
    """Force Unit Access."""
    return bool(cmd[CDW12] & RW_FUA)


# Dataset Management: NR (0-based) in CDW10, attributes in CDW11; ranges of 16 bytes
DSM_AD = 1 << 2  # Attribute - Deallocate
#: context attributes, NLB (1-based), SLBA
DSM_RANGE = struct.Struct("<IIQ")


def dsm_ranges(cmd: SqeTuple) -> int:
    """Number of ranges (1-based)."""
    return (cmd[CDW10] & 0xFF) + 1


def dsm_deallocate(cmd: SqeTuple) -> bool:
    return bool(cmd[CDW11] & DSM_AD)


# Create/Delete I/O SQ/CQ: QID and QSIZE (0-based) in CDW10; PC, IEN, IV / CQID in CDW11
QUEUE_PC = 1 << 0  # physically contiguous
CQ_IEN = 1 << 1  # interrupts enabled


def queue_id(cmd: SqeTuple) -> int:
    return cmd[CDW10] & 0xFFFF


def queue_size(cmd: SqeTuple) -> int:
    """Queue entries (1-based)."""
    return (cmd[CDW10] >> 16) + 1


def queue_contiguous(cmd: SqeTuple) -> bool:
    return bool(cmd[CDW11] & QUEUE_PC)


def cq_interrupts(cmd: SqeTuple) -> bool:
    return bool(cmd[CDW11] & CQ_IEN)


def cq_vector(cmd: SqeTuple) -> int:
    """Create I/O CQ: the interrupt vector."""
    return cmd[CDW11] >> 16


def sq_cqid(cmd: SqeTuple) -> int:
    """Create I/O SQ: the completion queue it posts to."""
    return cmd[CDW11] >> 16


# Identify: CNS in CDW10
def identify_cns(cmd: SqeTuple) -> int:
    return cmd[CDW10] & 0xFF


# Get Log Page: LID and NUMDL in CDW10, NUMDU in CDW11, offset in CDW12-13
def log_page_id(cmd: SqeTuple) -> int:
    return cmd[CDW10] & 0xFF


def log_page_dwords(cmd: SqeTuple) -> int:
    """Number of dwords (1-based)."""
    return ((cmd[CDW10] >> 16) | (cmd[CDW11] & 0xFFFF) << 16) + 1


def log_page_offset(cmd: SqeTuple) -> int:
    return cmd[CDW12] | cmd[CDW13] << 32


# Get/Set Features: FID, SEL (Get) and SV (Set) in CDW10, the value in CDW11
SEL_CURRENT, SEL_DEFAULT, SEL_SAVED, SEL_CAPABILITIES = 0, 1, 2, 3
#: Get Features SEL 3 result: changeable (not saveable, not namespace specific)
FEATURE_CHANGEABLE = 1 << 2


def feature_id(cmd: SqeTuple) -> int:
    return cmd[CDW10] & 0xFF


def feature_select(cmd: SqeTuple) -> int:
    return (cmd[CDW10] >> 8) & 7


def feature_save(cmd: SqeTuple) -> bool:
    return bool(cmd[CDW10] >> 31)


def feature_value(cmd: SqeTuple) -> int:
    return cmd[CDW11]


# Feature values
TMPTH_MASK = 0xFFFF  # Temperature Threshold: TMPTH in bits 15:0


def temperature_selector(value: int) -> tuple[int, int]:
    """Temperature Threshold: (TMPSEL, THSEL)."""
    return (value >> 16) & 0xF, (value >> 20) & 3


def queue_counts(value: int) -> tuple[int, int]:
    """Number of Queues: (NSQR, NCQR), both 0-based."""
    return value & 0xFFFF, value >> 16


def make_queue_counts(nsqr: int, ncqr: int) -> int:
    """Number of Queues value from 0-based counts."""
    return nsqr | ncqr << 16


PM_PS_MASK = 0x1F  # Power Management: power state
VWC_WCE = 1 << 0  # Volatile Write Cache: enable
IVC_IV_MASK = 0xFFFF  # Interrupt Vector Configuration: IV in bits 15:0, CD in bit 16
IVC_CD = 1 << 16  # Interrupt Vector Configuration: Coalescing Disable
IVC_WRITABLE = 0x1FFFF


# --- PRPs ---------------------------------------------------------------------------------------
@overload
def prp_ranges(
    prp1: int, prp2: int, length: int, read_list: Callable[[int, int], bytes]
) -> list[tuple[int, int]]: ...
@overload
def prp_ranges(
    prp1: int, prp2: int, length: int, read_list: Callable[[int, int], bytes | None]
) -> list[tuple[int, int]] | None: ...
def prp_ranges(
    prp1: int, prp2: int, length: int, read_list: Callable[[int, int], bytes | None]
) -> list[tuple[int, int]] | None:
    """Guest ranges ``(iova, length)`` described by PRP1/PRP2 for a ``length``-byte transfer.

    ``read_list(iova, nbytes)`` reads PRP list memory (it raises on bad addresses), or returns
    None when it cannot read it now: then so does this function. Adjacent pages are merged.
    Raises :class:`NvmeError` INVALID_PRP_OFFSET for misaligned entries.
    """
    if length <= 0:
        return []
    if prp1 & 3:
        raise NvmeError(Status.INVALID_PRP_OFFSET, f"PRP1 {prp1:#x} is not dword aligned")
    first = min(length, PAGE_SIZE - (prp1 & (PAGE_SIZE - 1)))
    out: list[tuple[int, int]] = [(prp1, first)]
    remaining = length - first
    if remaining == 0:
        return out
    if remaining <= PAGE_SIZE:
        if prp2 & (PAGE_SIZE - 1):
            raise NvmeError(Status.INVALID_PRP_OFFSET, f"PRP2 {prp2:#x} is not page aligned")
        _append(out, prp2, remaining)
        return out
    pages = (remaining + PAGE_SIZE - 1) >> PAGE_SHIFT
    list_addr = prp2
    if list_addr & 7:
        raise NvmeError(Status.INVALID_PRP_OFFSET, f"PRP list {list_addr:#x} not qword aligned")
    while pages:
        room = (PAGE_SIZE - (list_addr & (PAGE_SIZE - 1))) >> 3
        chained = pages > room
        count = room if chained else pages
        raw = read_list(list_addr, count * 8)
        if raw is None:
            return None
        entries = array("Q")
        entries.frombytes(raw)
        data = entries[:-1] if chained else entries
        # (_append inlined: this loop runs once per page of every large transfer)
        last_iova, last_n = out[-1]
        for entry in data:
            if entry & (PAGE_SIZE - 1):
                raise NvmeError(Status.INVALID_PRP_OFFSET, f"PRP entry {entry:#x} not aligned")
            n = remaining if remaining < PAGE_SIZE else PAGE_SIZE
            if last_iova + last_n == entry:
                last_n += n
                out[-1] = (last_iova, last_n)
            else:
                last_iova, last_n = entry, n
                out.append((entry, n))
            remaining -= n
        pages -= len(data)
        if chained:
            list_addr = entries[-1]
            if list_addr & 7:
                raise NvmeError(Status.INVALID_PRP_OFFSET, f"PRP list {list_addr:#x} misaligned")
    return out


def _append(out: list[tuple[int, int]], iova: int, n: int) -> None:
    last_iova, last_n = out[-1]
    if last_iova + last_n == iova:
        out[-1] = (last_iova, last_n + n)
    else:
        out.append((iova, n))


# --- data structures ----------------------------------------------------------------------------
def _ascii(text: str, size: int) -> bytes:
    return text.encode("ascii", "replace")[:size].ljust(size, b" ")


def identify_controller(
    *,
    vendor_id: int,
    subsystem_vendor_id: int,
    serial: str,
    model: str,
    firmware: str,
    mdts: int,
    cntlid: int,
    aerl: int,
    acl: int,
    namespaces: int,
    subnqn: str,
    volatile_write_cache: bool,
    warning_temp: int,
    critical_temp: int,
) -> bytes:
    """The 4 KiB Identify Controller data structure (CNS 01h)."""
    d = bytearray(4096)
    struct.pack_into("<HH", d, 0, vendor_id, subsystem_vendor_id)
    d[4:24] = _ascii(serial, 20)
    d[24:64] = _ascii(model, 40)
    d[64:72] = _ascii(firmware, 8)
    d[72] = 0  # RAB
    d[73:76] = b"\x00\x00\x00"  # IEEE OUI (none)
    d[76] = 0  # CMIC: single port, single controller
    d[77] = mdts
    struct.pack_into("<HI", d, 78, cntlid, VERSION_1_4)
    d[111] = 1  # CNTRLTYPE: I/O controller
    struct.pack_into("<H", d, 256, 0)  # OACS: no optional admin commands
    d[258] = acl
    d[259] = aerl
    d[260] = 0x03  # FRMW: slot 1 read-only, 1 slot
    d[261] = 0x00  # LPA
    d[262] = 0  # ELPE: 1 error log entry
    d[263] = 0  # NPSS: 1 power state
    d[264] = 1  # AVSCC: admin vendor specific commands use the standard format
    struct.pack_into("<HH", d, 266, warning_temp, critical_temp)
    d[512] = SQES_LOG2 << 4 | SQES_LOG2  # SQES
    d[513] = CQES_LOG2 << 4 | CQES_LOG2  # CQES
    struct.pack_into("<HI", d, 514, 0, namespaces)  # MAXCMD, NN
    struct.pack_into("<H", d, 520, 0x000C)  # ONCS: Dataset Management, Write Zeroes
    # VWC: present, and Flush with NSID FFFFFFFFh is supported
    d[525] = 0x07 if volatile_write_cache else 0x00
    nqn = subnqn.encode()[:255]
    d[768:768 + len(nqn)] = nqn
    # Power state 0: max power 25.00 W (centiwatts), entry/exit latencies 0
    struct.pack_into("<H", d, 2048, 2500)
    return bytes(d)


def identify_namespace(
    *, blocks: int, lba_shift: int, nguid: bytes, eui64: bytes, deallocate_zeroes: bool
) -> bytes:
    """The 4 KiB Identify Namespace data structure (CNS 00h), one LBA format."""
    d = bytearray(4096)
    struct.pack_into("<QQQ", d, 0, blocks, blocks, blocks)
    d[24] = 0x04 if deallocate_zeroes else 0x00  # NSFEAT: deallocated or unwritten error
    d[25] = 0  # NLBAF: 1 format
    d[26] = 0  # FLBAS: format 0, no metadata
    # DLFEAT: read of deallocated blocks returns zeros, Write Zeroes may deallocate
    d[33] = 0x09 if deallocate_zeroes else 0x00
    d[104:120] = nguid
    d[120:128] = eui64
    struct.pack_into("<I", d, 128, lba_shift << 16)  # LBAF0: LBADS, no metadata, best RP
    return bytes(d)


def namespace_descriptors(*, nguid: bytes, uuid: bytes, eui64: bytes) -> bytes:
    """Namespace Identification Descriptor list (CNS 03h): EUI-64, NGUID and UUID."""
    d = bytearray(4096)
    pos = 0
    for nidt, nid in ((1, eui64), (2, nguid), (3, uuid)):
        struct.pack_into("<BBH", d, pos, nidt, len(nid), 0)
        d[pos + 4:pos + 4 + len(nid)] = nid
        pos += 4 + len(nid)
    return bytes(d)


def active_namespaces(after: int, count: int) -> bytes:
    """Active Namespace ID list (CNS 02h): NSIDs 1..count greater than ``after``."""
    ids = [n for n in range(1, count + 1) if n > after][:1024]
    return struct.pack(f"<{len(ids)}I", *ids).ljust(4096, b"\0")


def smart_log(
    *,
    temperature: int,
    units_read: int,
    units_written: int,
    host_reads: int,
    host_writes: int,
    power_cycles: int,
    power_on_hours: int,
) -> bytes:
    """SMART / Health Information log page (02h), 512 bytes."""
    d = bytearray(512)
    d[0] = 0  # critical warning
    struct.pack_into("<H", d, 1, temperature)
    d[3] = 100  # available spare
    d[4] = 10  # spare threshold
    d[5] = 0  # percentage used
    for off, value in ((32, units_read), (48, units_written), (64, host_reads),
                       (80, host_writes), (112, power_cycles), (128, power_on_hours)):
        d[off:off + 16] = value.to_bytes(16, "little")
    return bytes(d)


def firmware_log(firmware: str) -> bytes:
    """Firmware Slot Information log page (03h): slot 1 active."""
    d = bytearray(512)
    d[0] = 1
    d[8:16] = _ascii(firmware, 8)
    return bytes(d)
