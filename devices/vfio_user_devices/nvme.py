"""An NVMe 1.4 controller with one namespace, enough for Linux's ``nvme`` driver.

Served as ``vfio-user-server --socket S nvme [--image PATH] [--size SIZE] [--queues N]``.
ID 1b36:7010 (Red Hat's QEMU vendor ID with a device ID QEMU does not use), class 01:08:02;
Linux binds ``nvme`` by class.

BAR0 (16 KiB, 64-bit): controller registers at 0 (CAP, VS, INTMS, INTMC, CC, CSTS, AQA, ASQ,
ACQ), doorbells from 0x1000 with a 4-byte stride (SQ y tail at 0x1000 + 8y, CQ y head at
0x1004 + 8y). BAR4 (8 KiB, 64-bit): MSI-X table at 0, PBA at 0x1000. One MSI-X vector per
completion queue (as the host chooses in Create I/O CQ; the admin CQ uses vector 0); with
MSI-X off, MSI (one vector) or level-triggered INTx (asserted while a CQ holds entries the
host has not consumed, masked by INTMS).

The namespace (NSID 1, 512-byte blocks) is a host file (``--image``, read and written with
``os.preadv``/``os.pwritev``) or a memfd (``--size``).

Threads: BAR handlers run on the server's loop thread with :attr:`lock` held and mostly only
record state (doorbell values, register writes). A worker thread owned by the controller
fetches submission queue entries, moves data and posts completions, one batch per queue at a
time; it takes :attr:`lock` only to snapshot or commit queue state, never while doing DMA. With
fd-backed guest RAM, data moves straight between the file and guest memory (``preadv`` into
the mmapped guest pages); otherwise through DMA_READ / DMA_WRITE messages.

Inline path: an I/O SQ tail doorbell that finds the worker idle runs up to :data:`INLINE_MAX`
new commands right there, on the loop thread, with the lock held (so the worker cannot start
meanwhile and no DMA unmap can arrive), which saves waking the worker. Only plain Reads and
Writes (no FUA, volatile write cache on: no fsync) whose SQ entries, CQ, PRP lists and data
are all in fd-backed guest memory qualify, since direct DMA is a memory copy but message DMA
must never run on the loop thread. The first command that does not qualify (or that turns out
to need message DMA) stops the run before any side effect of its own; it and the rest are left
to the worker, in order. Admin commands always go to the worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from vfio_user_server.device import PciDevice
from vfio_user_server.dma import Segment
from vfio_user_server.errors import DeviceDefinitionError, DmaError
from vfio_user_server.irq import IrqIndex
from vfio_user_server.options import Option
from vfio_user_server.pci import Bar

from .nvme_spec import (
    AER_INFO_INVALID_DOORBELL_REGISTER,
    AER_INFO_INVALID_DOORBELL_VALUE,
    AER_TYPE_ERROR,
    CC_AMS_MASK,
    CC_AMS_SHIFT,
    CC_CSS_MASK,
    CC_CSS_SHIFT,
    CC_EN,
    CC_IOCQES_MASK,
    CC_IOCQES_SHIFT,
    CC_IOSQES_MASK,
    CC_IOSQES_SHIFT,
    CC_MPS_MASK,
    CC_MPS_SHIFT,
    CC_SHN_MASK,
    CC_SHN_SHIFT,
    CC_WRITABLE,
    CQE,
    CQE_SIZE,
    CQES_LOG2,
    CSTS_CFS,
    CSTS_RDY,
    CSTS_SHST_SHIFT,
    DOORBELL_BASE,
    PAGE_SIZE,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CAP,
    REG_CC,
    REG_CSTS,
    REG_INTMC,
    REG_INTMS,
    REG_VS,
    SHST_COMPLETE,
    SHST_OCCURRING,
    SQE,
    SQE_SIZE,
    SQES_LOG2,
    STATUS_DNR,
    VERSION_1_4,
    AdminOpcode,
    Cns,
    Feature,
    IoOpcode,
    LogPage,
    NvmeError,
    SqeTuple,
    Status,
    active_namespaces,
    aer_result,
    firmware_log,
    identify_controller,
    identify_namespace,
    make_cap,
    namespace_descriptors,
    prp_ranges,
    smart_log,
)

__all__ = ["FileBackend", "NvmeController", "parse_size"]

log = logging.getLogger(__name__)

LBA_SHIFT = 9
BLOCK_SIZE = 1 << LBA_SHIFT
#: Maximum Data Transfer Size: 2**MDTS pages (128 KiB).
MDTS = 5
MAX_TRANSFER = PAGE_SIZE << MDTS
#: Maximum Queue Entries Supported (1024 entries per I/O queue).
MQES = 1023
MAX_IO_QUEUES = 16
#: Asynchronous Event Request Limit (0-based) and Abort Command Limit (0-based).
AERL = 3
ACL = 3
#: Submission queue entries handled per batch before other queues get their turn.
BATCH = 256
#: At most this many commands are executed inline, on the loop thread, per SQ doorbell.
INLINE_MAX = 16
WARNING_TEMP = 0x157  # 343 K
CRITICAL_TEMP = 0x175  # 373 K
CURRENT_TEMP = 0x13B  # 315 K
FIRMWARE = "0.1.0"
MODEL = "pyvfio-user NVMe"

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def parse_size(text: str) -> int:
    """``4096``, ``512K``, ``64M``, ``2G``, ``1T`` (binary units) to bytes."""
    text = text.strip()
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    shift = 0
    if text and text[-1].upper() in units:
        shift = units[text[-1].upper()]
        text = text[:-1]
    elif text[-3:].upper() in ("KIB", "MIB", "GIB", "TIB"):
        shift = units[text[-3].upper()]
        text = text[:-3]
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
    return value << shift


class _Fallocate:
    """``fallocate(2)`` through libc (Python has no punch-hole call)."""

    def __init__(self) -> None:
        self.fn: Any = None
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            self.fn = fn

    def punch(self, fd: int, offset: int, length: int) -> bool:
        if self.fn is None:
            return False
        rc = self.fn(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        return int(rc) == 0


_fallocate = _Fallocate()


class FileBackend:
    """The namespace's blocks: a host file (raw image) or a memfd, by file descriptor."""

    def __init__(self, fd: int, size: int, *, path: str | None = None) -> None:
        self.fd = fd
        self.size = size
        self.path = path
        # Punching beyond EOF with KEEP_SIZE changes nothing: a harmless probe.
        self.can_punch = _fallocate.punch(fd, max(size, 0), PAGE_SIZE)

    @classmethod
    def open(cls, path: str | os.PathLike[str], size: int | None = None) -> FileBackend:
        """Open a raw image; create it (``size`` bytes) if missing; grow it up to ``size``."""
        p = os.fspath(path)
        flags = os.O_RDWR | os.O_CLOEXEC
        if size is not None:
            flags |= os.O_CREAT
        try:
            fd = os.open(p, flags, 0o644)
        except OSError as exc:
            raise DeviceDefinitionError(f"nvme: cannot open image {p!r}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if size is not None and st.st_size < size:
                os.ftruncate(fd, size)
            actual = os.fstat(fd).st_size if size is None else size
        except OSError as exc:
            os.close(fd)
            raise DeviceDefinitionError(f"nvme: image {p!r}: {exc}") from exc
        actual -= actual % BLOCK_SIZE
        if actual <= 0:
            os.close(fd)
            raise DeviceDefinitionError(f"nvme: image {p!r} is smaller than one block")
        return cls(fd, actual, path=p)

    @classmethod
    def memory(cls, size: int) -> FileBackend:
        if size <= 0 or size % BLOCK_SIZE:
            raise DeviceDefinitionError(f"nvme: size {size} is not a positive multiple of 512")
        fd = os.memfd_create("nvme-namespace", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size)

    def readv(self, views: list[memoryview], offset: int) -> None:
        total = sum(v.nbytes for v in views)
        done = os.preadv(self.fd, views, offset)
        if done != total:  # short read (file shrunk under us): finish piecewise
            self._slow_readv(views, offset, done)

    def _slow_readv(self, views: list[memoryview], offset: int, done: int) -> None:
        pos = 0
        for v in views:
            n = v.nbytes
            if pos + n > done:
                start = max(0, done - pos)
                data = os.pread(self.fd, n - start, offset + pos + start)
                v[start:start + len(data)] = data
                v[start + len(data):] = bytes(n - start - len(data))
            pos += n

    def writev(self, views: list[memoryview], offset: int) -> None:
        total = sum(v.nbytes for v in views)
        done = os.pwritev(self.fd, views, offset)
        if done != total:
            data = b"".join(bytes(v) for v in views)
            while done < total:
                done += os.pwrite(self.fd, data[done:], offset + done)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data.ljust(length, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def zero(self, offset: int, length: int) -> None:
        if self.can_punch and _fallocate.punch(self.fd, offset, length):
            return
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.write(offset, chunk[:n])
            offset += n

    def deallocate(self, offset: int, length: int) -> None:
        if self.can_punch:
            _fallocate.punch(self.fd, offset, length)

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class _Defer(Exception):
    """Raised on the inline path when a command needs the worker (message DMA, fsync)."""


class _SubmissionQueue:
    __slots__ = ("base", "cqid", "head", "qid", "size", "tail")

    def __init__(self, qid: int, base: int, size: int, cqid: int) -> None:
        self.qid = qid
        self.base = base
        self.size = size
        self.cqid = cqid
        self.head = 0
        self.tail = 0


class _CompletionQueue:
    __slots__ = ("base", "head", "ien", "iv", "phase", "qid", "size", "sqids", "tail")

    def __init__(self, qid: int, base: int, size: int, iv: int, ien: bool) -> None:
        self.qid = qid
        self.base = base
        self.size = size
        self.iv = iv
        self.ien = ien
        self.head = 0
        self.tail = 0
        self.phase = 1
        self.sqids: set[int] = set()

    def used(self) -> int:
        return (self.tail - self.head) % self.size

    def free(self) -> int:
        return self.size - 1 - self.used()


_Completion = tuple[int, int, int]  # cid, status field, dw0


class NvmeController(PciDevice):
    """The NVMe controller described in the module docstring."""

    vendor_id = 0x1B36
    device_id = 0x7010
    subsystem_vendor_id = 0x1B36
    subsystem_id = 0x0001
    revision = 2
    class_code = 0x010802
    interrupt_pin = 1
    express = True
    bars: ClassVar = {0: Bar(0x4000, kind="mem64"), 4: Bar(0x2000, kind="mem64")}
    msi_vectors = 1
    msix_vectors = MAX_IO_QUEUES + 1
    msix_bar = 4
    msix_table_offset = 0
    msix_pba_offset = 0x1000
    guest_modules = ("nvme",)
    options = (
        Option("--image", "raw image file backing namespace 1 (created with --size if missing)"),
        Option("--size", "namespace size (e.g. 64M, 2G); without --image: in memory",
               type=parse_size),
        Option("--serial", "serial number (default: derived from the image)"),
        Option("--queues", f"I/O queue pairs offered (1..{MAX_IO_QUEUES}, default 8)", type=int,
               default=8),
    )

    def __init__(
        self,
        image: str | os.PathLike[str] | None = None,
        size: int | None = None,
        *,
        serial: str | None = None,
        queues: int = 8,
        backend: FileBackend | None = None,
    ) -> None:
        if not 1 <= queues <= MAX_IO_QUEUES:
            raise DeviceDefinitionError(f"nvme: queues must be 1..{MAX_IO_QUEUES}")
        if backend is None:
            if image is not None:
                backend = FileBackend.open(image, size)
            else:
                backend = FileBackend.memory(size if size is not None else 64 << 20)
        self.backend = backend
        self.blocks = backend.size >> LBA_SHIFT
        self.max_queues = queues
        if serial is None:
            seed = (os.path.realpath(backend.path) if backend.path
                    else f"mem-{os.getpid()}-{id(self)}-{time.time_ns()}")
            serial = "PYV" + hashlib.sha256(seed.encode()).hexdigest()[:12].upper()
        self.serial = serial
        digest = hashlib.sha256(b"pyvfio-user nvme " + serial.encode()).digest()
        self.nguid = digest[:16]
        self.eui64 = bytes([0x02]) + digest[16:23]  # locally administered
        self.uuid = uuid.UUID(bytes=digest[:16], version=4).bytes
        self.cap = make_cap(MQES, 20)
        super().__init__()
        self._cond = threading.Condition(self.lock)
        self.csts = 0
        self._gen = 0
        self._disable_pending = False
        self._worker: threading.Thread | None = None
        self._stop = False
        self._busy = False
        #: True while the loop thread executes commands inline (see :meth:`_inline_sq`)
        self._inline = False
        self._rr = 0
        # counters for SMART (the worker, or the loop thread inline while the worker is idle)
        self.stats = {"read_bytes": 0, "write_bytes": 0, "reads": 0, "writes": 0,
                      "flushes": 0}
        self.power_cycles = 1
        self._created = time.monotonic()
        #: (time, qid, cid, status) of failed commands, newest last (tests, debugging)
        self.errors: deque[tuple[float, int, int, int]] = deque(maxlen=64)
        self.reset()

    # --- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Power-on state (DEVICE_RESET, FLR, construction). Called with the lock held."""
        self.cc = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self.intms = 0
        self._controller_reset()
        self.csts = 0 if not self._busy else self.csts

    def _default_features(self) -> dict[int, int]:
        n = self.max_queues - 1
        return {
            Feature.ARBITRATION: 0,
            Feature.POWER_MANAGEMENT: 0,
            Feature.VOLATILE_WRITE_CACHE: 1,
            Feature.NUMBER_OF_QUEUES: n | n << 16,
            Feature.INTERRUPT_COALESCING: 0,
            Feature.WRITE_ATOMICITY: 0,
            Feature.ASYNC_EVENT_CONFIG: 0,
        }

    def _controller_reset(self) -> None:
        """CC.EN 1 -> 0: delete all queues, drop held commands. Lock held."""
        self._gen += 1
        self.sqs: dict[int, _SubmissionQueue] = {}
        self.cqs: dict[int, _CompletionQueue] = {}
        self.features = self._default_features()
        self.temp_thresholds: dict[tuple[int, int], int] = {(0, 0): WARNING_TEMP}
        self.vector_config: dict[int, int] = {}
        self.io_sq_limit = self.max_queues
        self.io_cq_limit = self.max_queues
        self._aers: list[int] = []
        self._events: deque[int] = deque(maxlen=8)
        #: completions of held commands to post: (cqid, sqid, cid, status, dw0)
        self._post: list[tuple[int, int, int, int, int]] = []
        self._shutdown_pending = False
        self._msi_pending = False
        if self._intx_level:
            self.set_intx(False)
        if self._busy:
            # The worker is moving data for the old queues; RDY drops when it is done.
            self._disable_pending = True
        else:
            self._disable_pending = False
            self.csts &= ~(CSTS_RDY | CSTS_CFS | 3 << CSTS_SHST_SHIFT)

    def close(self) -> None:
        """Stop the worker and close the backing file."""
        self._stop_worker()
        self.backend.close()

    # --- connection ---------------------------------------------------------------------------
    def on_connect(self) -> None:
        with self.lock:
            if self._worker is None or not self._worker.is_alive():
                self._stop = False
                self._worker = threading.Thread(target=self._run, name=f"nvme-{self.serial}",
                                                daemon=True)
                self._worker.start()

    def on_disconnect(self) -> None:
        self._stop_worker()
        with self.lock:
            # Queues point into memory that is gone: back to power-on state.
            self.reset()
            self.csts = 0

    def _stop_worker(self) -> None:
        with self.lock:
            self._stop = True
            self._cond.notify_all()
            worker, self._worker = self._worker, None
        if worker is not None and worker is not threading.current_thread():
            worker.join(10)

    # --- registers ----------------------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar != 0 or offset >= DOORBELL_BASE:
            return 0
        if size == 8:
            return self._reg32(offset & ~3) | self._reg32((offset & ~3) + 4) << 32
        value = self._reg32(offset & ~3) >> 8 * (offset & 3)
        return value & ((1 << 8 * size) - 1)

    def _reg32(self, offset: int) -> int:
        if offset == REG_CAP:
            return self.cap & 0xFFFFFFFF
        if offset == REG_CAP + 4:
            return self.cap >> 32
        if offset == REG_VS:
            return VERSION_1_4
        if offset in (REG_INTMS, REG_INTMC):
            return self.intms
        if offset == REG_CC:
            return self.cc
        if offset == REG_CSTS:
            return self.csts
        if offset == REG_AQA:
            return self.aqa
        if offset in (REG_ASQ, REG_ASQ + 4):
            return (self.asq >> (8 * (offset - REG_ASQ))) & 0xFFFFFFFF
        if offset in (REG_ACQ, REG_ACQ + 4):
            return (self.acq >> (8 * (offset - REG_ACQ))) & 0xFFFFFFFF
        return 0

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != 0:
            return
        if size == 8:
            self._write32(offset, value & 0xFFFFFFFF)
            self._write32(offset + 4, value >> 32)
            return
        if size < 4:
            shift = 8 * (offset & 3)
            aligned = offset & ~3
            if aligned in (REG_INTMS, REG_INTMC) or aligned >= DOORBELL_BASE:
                value <<= shift
            else:
                mask = ((1 << 8 * size) - 1) << shift
                value = (self._reg32(aligned) & ~mask) | (value << shift & mask)
            offset = aligned
        self._write32(offset, value)

    def _write32(self, offset: int, value: int) -> None:
        if offset >= DOORBELL_BASE:
            if offset & 3 == 0:
                self._doorbell(offset, value)
        elif offset == REG_CC:
            self._write_cc(value)
        elif offset == REG_INTMS:
            self.intms |= value
            self._update_interrupts()
        elif offset == REG_INTMC:
            self.intms &= ~value
            self._update_interrupts()
        elif offset == REG_AQA:
            self.aqa = value & 0x0FFF0FFF
        elif offset in (REG_ASQ, REG_ASQ + 4, REG_ACQ, REG_ACQ + 4):
            base = REG_ASQ if offset < REG_ACQ else REG_ACQ
            shift = 8 * (offset - base)
            old = self.asq if base == REG_ASQ else self.acq
            new = (old & ~(0xFFFFFFFF << shift)) | value << shift
            new &= ~(PAGE_SIZE - 1)
            if base == REG_ASQ:
                self.asq = new
            else:
                self.acq = new

    def _write_cc(self, value: int) -> None:
        old = self.cc
        self.cc = value & CC_WRITABLE
        if self.cc & CC_EN and not old & CC_EN:
            if not self._disable_pending:
                self._enable()
        elif old & CC_EN and not self.cc & CC_EN:
            log.debug("nvme: controller reset (CC.EN 1 -> 0)")
            self._controller_reset()
        shn = (self.cc >> CC_SHN_SHIFT) & CC_SHN_MASK
        old_shn = (old >> CC_SHN_SHIFT) & CC_SHN_MASK
        if shn and not old_shn:
            log.info("nvme: shutdown requested")
            self._set_shst(SHST_OCCURRING)
            self._shutdown_pending = True
            self._cond.notify_all()
        elif not shn and old_shn and not self._shutdown_pending:
            self._set_shst(0)

    def _set_shst(self, value: int) -> None:
        self.csts = (self.csts & ~(3 << CSTS_SHST_SHIFT)) | value << CSTS_SHST_SHIFT

    def _enable(self) -> None:
        cc = self.cc
        asqs = (self.aqa & 0xFFF) + 1
        acqs = ((self.aqa >> 16) & 0xFFF) + 1
        problems = []
        if (cc >> CC_CSS_SHIFT) & CC_CSS_MASK:
            problems.append("CC.CSS is not NVM")
        if (cc >> CC_MPS_SHIFT) & CC_MPS_MASK:
            problems.append("CC.MPS is not 4 KiB")
        if (cc >> CC_AMS_SHIFT) & CC_AMS_MASK:
            problems.append("CC.AMS is not round robin")
        if asqs < 2 or acqs < 2:
            problems.append("AQA sizes below 2 entries")
        if not self.asq or not self.acq:
            problems.append("ASQ/ACQ not set")
        if problems:
            log.warning("nvme: cannot enable: %s", "; ".join(problems))
            self.csts |= CSTS_CFS
            return
        cq = _CompletionQueue(0, self.acq, acqs, 0, True)
        sq = _SubmissionQueue(0, self.asq, asqs, 0)
        cq.sqids.add(0)
        self.cqs[0] = cq
        self.sqs[0] = sq
        self.csts = (self.csts & ~(CSTS_CFS | 3 << CSTS_SHST_SHIFT)) | CSTS_RDY
        log.debug("nvme: enabled, admin SQ %#x/%d CQ %#x/%d", self.asq, asqs, self.acq, acqs)

    @property
    def ready(self) -> bool:
        return bool(self.csts & CSTS_RDY) and not self._disable_pending

    # --- doorbells (loop thread, lock held) -----------------------------------------------------
    def _doorbell(self, offset: int, value: int) -> None:
        if not self.ready:
            return
        index = (offset - DOORBELL_BASE) >> 2
        qid = index >> 1
        value &= 0xFFFFFFFF
        if index & 1:
            cq = self.cqs.get(qid)
            if cq is None:
                self._async_error(AER_INFO_INVALID_DOORBELL_REGISTER)
                return
            if value >= cq.size or (value - cq.head) % cq.size > cq.used():
                self._async_error(AER_INFO_INVALID_DOORBELL_VALUE)
                return
            was_full = cq.free() == 0
            cq.head = value
            if was_full:
                self._cond.notify_all()
            if not cq.used():
                self._update_intx()
        else:
            sq = self.sqs.get(qid)
            if sq is None:
                self._async_error(AER_INFO_INVALID_DOORBELL_REGISTER)
                return
            if value >= sq.size:
                self._async_error(AER_INFO_INVALID_DOORBELL_VALUE)
                return
            sq.tail = value
            if qid == 0 or self._busy or not self._inline_sq(sq):
                self._cond.notify_all()

    def _inline_sq(self, sq: _SubmissionQueue) -> bool:
        """Execute up to :data:`INLINE_MAX` new I/O commands of ``sq`` here, on the loop thread.

        Called with the lock held while the worker is idle, so nothing else processes queues.
        Only plain reads and writes whose SQ entries, CQ, PRP lists and data are all in
        fd-backed (directly mapped) guest memory run here: everything else (message DMA,
        fsyncs, other opcodes) stops the inline run before its first side effect and is left
        to the worker, in order. True if the SQ has nothing left for the worker.
        """
        cq = self.cqs.get(sq.cqid)
        if cq is None:
            return False
        size, head = sq.size, sq.head
        n = min((sq.tail - head) % size, cq.free(), INLINE_MAX)
        if n <= 0:
            return False
        if not self._direct(cq.base, cq.size * CQE_SIZE):
            return False
        first = min(n, size - head)
        raw = self._direct_read(sq.base + head * SQE_SIZE, first * SQE_SIZE)
        if raw is not None and first < n:
            rest = self._direct_read(sq.base, (n - first) * SQE_SIZE)
            raw = None if rest is None else raw + rest
        if raw is None:
            return False  # message DMA (or a fault the worker reports)
        gen, qid = self._gen, sq.qid
        vwc = self.features[Feature.VOLATILE_WRITE_CACHE]
        done: list[_Completion] = []
        self._inline = True
        try:
            for i in range(n):
                cmd: SqeTuple = SQE.unpack_from(raw, i * SQE_SIZE)
                opcode = cmd[0]
                if not (opcode == IoOpcode.READ or (
                        opcode == IoOpcode.WRITE and vwc and not cmd[10] & (1 << 30))):
                    break
                try:
                    entry = self._execute(cmd, qid, gen)
                except _Defer:
                    break
                if entry is not None:
                    done.append(entry)
        finally:
            self._inline = False
        if done:
            self._complete(gen, qid, (head + len(done)) % size, done)
        return sq.head == sq.tail

    def _async_error(self, info: int) -> None:
        log.warning("nvme: invalid doorbell write (%s)",
                    "no such queue" if info == AER_INFO_INVALID_DOORBELL_REGISTER else "value")
        self._async_event(aer_result(AER_TYPE_ERROR, info, LogPage.ERROR))

    def _async_event(self, result: int) -> None:
        """Complete a held Asynchronous Event Request, or keep the event for the next one."""
        if self._aers:
            self._post.append((0, 0, self._aers.pop(0), 0, result))
            self._cond.notify_all()
        else:
            self._events.append(result)

    # --- interrupts (lock held) -------------------------------------------------------------------
    def _signal(self, cq: _CompletionQueue) -> None:
        if not cq.ien:
            return
        if self.msix is not None and self.msix.enabled:
            self.irqs.trigger(IrqIndex.MSIX, cq.iv if cq.iv < self.msix_vectors else 0)
        elif self.msi is not None and self.msi.enabled:
            if self.intms & 1:
                self._msi_pending = True
            else:
                self.irqs.trigger(IrqIndex.MSI, 0)
        else:
            self._update_intx()

    def _update_interrupts(self) -> None:
        if self._msi_pending and not self.intms & 1 and self.msi is not None and self.msi.enabled:
            self._msi_pending = False
            self.irqs.trigger(IrqIndex.MSI, 0)
        self._update_intx()

    def _update_intx(self) -> None:
        msi_on = (self.msix is not None and self.msix.enabled) or (
            self.msi is not None and self.msi.enabled)
        level = (not msi_on and not self.intms & 1
                 and any(cq.ien and cq.used() for cq in self.cqs.values()))
        if level != self._intx_level:
            self.set_intx(level)

    # --- worker -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.lock:
                job = None
                while not self._stop:
                    job = self._next_job()
                    if job is not None:
                        break
                    self._cond.wait()
                if job is None:
                    return
                self._busy = True
            try:
                job()
            except Exception:
                log.exception("nvme: worker job failed")
            finally:
                with self.lock:
                    self._busy = False
                    if self._disable_pending:
                        self._disable_pending = False
                        self.csts &= ~(CSTS_RDY | CSTS_CFS | 3 << CSTS_SHST_SHIFT)
                        if self._shutdown_pending:
                            self._set_shst(SHST_OCCURRING)
                        if self.cc & CC_EN:
                            self._enable()

    def _next_job(self) -> Callable[[], None] | None:
        """Pick the next piece of work; called with the lock held."""
        if self._shutdown_pending:
            self._shutdown_pending = False
            return self._do_shutdown
        if self._post and 0 in self.cqs and self.cqs[0].free():
            posts, self._post = self._post, []
            gen = self._gen
            return lambda: self._post_held(posts, gen)
        if not self.ready:
            return None
        qids = list(self.sqs)
        for i in range(len(qids)):
            sq = self.sqs[qids[(self._rr + i) % len(qids)]]
            if sq.tail == sq.head:
                continue
            cq = self.cqs[sq.cqid]
            n = min((sq.tail - sq.head) % sq.size, cq.free(), BATCH)
            if n <= 0:
                continue  # CQ full: wait for its head doorbell
            self._rr = (self._rr + i + 1) % len(qids)
            return self._make_batch(sq, n)
        return None

    def _make_batch(self, sq: _SubmissionQueue, n: int) -> Callable[[], None]:
        gen, qid, base, head, size = self._gen, sq.qid, sq.base, sq.head, sq.size
        return lambda: self._process(gen, qid, base, head, size, n)

    def _do_shutdown(self) -> None:
        try:
            self.backend.flush()
        except OSError as exc:
            log.error("nvme: flush at shutdown failed: %s", exc)
        with self.lock:
            if (self.cc >> CC_SHN_SHIFT) & CC_SHN_MASK:
                self._set_shst(SHST_COMPLETE)
                log.info("nvme: shutdown complete")

    def _process(self, gen: int, qid: int, base: int, head: int, size: int, n: int) -> None:
        """Fetch ``n`` entries of SQ ``qid`` from ``head``, execute them, post completions."""
        first = min(n, size - head)
        try:
            raw = self.dma.read(base + head * SQE_SIZE, first * SQE_SIZE)
            if first < n:
                raw += self.dma.read(base, (n - first) * SQE_SIZE)
        except DmaError as exc:
            log.error("nvme: cannot fetch SQ %d entries: %s", qid, exc)
            with self.lock:
                if gen == self._gen:
                    self.csts |= CSTS_CFS
            return
        done: list[_Completion] = []
        for i in range(n):
            entry = self._execute(SQE.unpack_from(raw, i * SQE_SIZE), qid, gen)
            if entry is not None:
                done.append(entry)
        self._complete(gen, qid, (head + n) % size, done)

    def _execute(self, cmd: SqeTuple, qid: int, gen: int) -> _Completion | None:
        """Run one command; its completion, or None for a held one (AER)."""
        try:
            result = self._admin(cmd, gen) if qid == 0 else self._io(cmd)
        except NvmeError as exc:
            log.debug("nvme: SQ %d opcode %#x cid %d: %s", qid, cmd[0], cmd[2], exc)
            self.errors.append((time.monotonic(), qid, cmd[2], exc.field))
            return (cmd[2], exc.field, 0)
        except _Defer:
            raise
        except Exception:
            log.exception("nvme: SQ %d opcode %#x failed", qid, cmd[0])
            return (cmd[2], Status.INTERNAL_ERROR | STATUS_DNR, 0)
        return None if result is None else (cmd[2], 0, result)

    def _direct(self, iova: int, length: int) -> bool:
        """True if ``iova``/``length`` lies in one fd-backed, writable map (cheap check)."""
        m = self.dma.table.find(iova)
        return m is not None and m.direct and m.writable and iova + length <= m.end

    def _direct_read(self, iova: int, length: int) -> bytes | None:
        """Guest memory by one mmap copy, or None if some of it is not fd-backed (or mapped)."""
        try:
            segs = self.dma.table.translate(iova, length, write=False)
        except DmaError:
            return None
        try:
            if len(segs) == 1 and segs[0].view is not None:
                return bytes(segs[0].view)
            if any(seg.view is None for seg in segs):
                return None
            return b"".join([seg.view for seg in segs if seg.view is not None])
        finally:
            for seg in segs:
                seg.release()

    def _post_held(self, posts: list[tuple[int, int, int, int, int]], gen: int) -> None:
        for cqid, sqid, cid, status, dw0 in posts:
            with self.lock:
                sq = self.sqs.get(sqid)
                head = sq.head if sq is not None else 0
            self._complete(gen, sqid, head, [(cid, status, dw0)], cqid=cqid)

    def _complete(self, gen: int, sqid: int, sq_head: int, done: list[_Completion],
                  cqid: int | None = None) -> None:
        with self.lock:
            if gen != self._gen:
                return
            sq = self.sqs.get(sqid)
            if sq is not None and cqid is None:
                sq.head = sq_head
                cqid = sq.cqid
            cq = self.cqs.get(cqid if cqid is not None else -1)
            if cq is None or not done:
                return
            if len(done) > cq.free():  # only held commands can overflow: keep them
                for cid, status, dw0 in done[cq.free():]:
                    self._post.append((cq.qid, sqid, cid, status, dw0))
                done = done[:cq.free()]
            start, phase = cq.tail, cq.phase
            cq.tail = (cq.tail + len(done)) % cq.size
            if cq.tail <= start:
                cq.phase ^= 1
            base, size = cq.base, cq.size
        entries = []
        pos = start
        for cid, status, dw0 in done:
            entries.append(CQE.pack(dw0, 0, sq_head, sqid, cid, phase | status << 1))
            pos += 1
            if pos == size:
                pos = 0
                phase ^= 1
        try:
            self._write_cqes(base, size, start, entries)
        except DmaError as exc:
            log.error("nvme: cannot post to CQ %d: %s", cq.qid, exc)
            with self.lock:
                if gen == self._gen:
                    self.csts |= CSTS_CFS
            return
        with self.lock:
            if gen == self._gen:
                self._signal(cq)

    def _write_cqes(self, base: int, size: int, start: int, entries: list[bytes]) -> None:
        first = min(len(entries), size - start)
        for addr, chunk in ((base + start * CQE_SIZE, entries[:first]),
                            (base, entries[first:])):
            if not chunk:
                continue
            length = len(chunk) * CQE_SIZE
            try:
                segs = self.dma.table.translate(addr, length, write=True)
            except DmaError:
                segs = []  # dma.write below reports it
            try:
                view = segs[0].view if len(segs) == 1 else None
                if view is not None:
                    # One 16-byte store per entry, so that an entry's phase bit is never
                    # seen before the rest of it.
                    for i, entry in enumerate(chunk):
                        view[i * CQE_SIZE:(i + 1) * CQE_SIZE] = entry
                    continue
            finally:
                for seg in segs:
                    seg.release()
            for i, entry in enumerate(chunk):
                self.dma.write(addr + i * CQE_SIZE, entry)

    # --- data movement ------------------------------------------------------------------------
    def _read_list(self, iova: int, length: int) -> bytes:
        if self._inline and not self.dma.table.is_direct(iova, length):
            raise _Defer
        try:
            return self.dma.read(iova, length)
        except DmaError as exc:
            raise NvmeError(Status.DATA_TRANSFER_ERROR, f"PRP list: {exc}") from exc

    def _ranges(self, cmd: SqeTuple, length: int) -> list[tuple[int, int]]:
        if cmd[1] & 0xC0:
            raise NvmeError(Status.INVALID_FIELD, "SGLs are not supported")
        return prp_ranges(cmd[6], cmd[7], length, self._read_list)

    def _to_guest(self, cmd: SqeTuple, data: bytes, length: int | None = None) -> None:
        """Copy ``data`` (padded or cut to ``length``) to the command's PRPs."""
        if length is not None:
            data = data[:length].ljust(length, b"\0")
        pos = 0
        try:
            for iova, n in self._ranges(cmd, len(data)):
                self.dma.write(iova, data[pos:pos + n])
                pos += n
        except DmaError as exc:
            raise NvmeError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc

    def _from_guest(self, cmd: SqeTuple, length: int) -> bytes:
        try:
            return b"".join(self.dma.read(iova, n) for iova, n in self._ranges(cmd, length))
        except DmaError as exc:
            raise NvmeError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc

    def _file_io(self, cmd: SqeTuple, offset: int, length: int, write: bool) -> None:
        """Move ``length`` bytes between the namespace at ``offset`` and the PRPs."""
        ranges = self._ranges(cmd, length)
        dma = self.dma
        segs: list[Segment] = []
        try:
            try:
                for iova, n in ranges:
                    segs.extend(dma.table.translate(iova, n, write=not write))
            except DmaError as exc:
                raise NvmeError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc
            views = [s.view for s in segs if s.view is not None]
            if len(views) == len(segs):
                if write:
                    self.backend.writev(views, offset)
                else:
                    self.backend.readv(views, offset)
                return
        finally:
            for s in segs:
                s.release()
        # Some memory has no fd: message DMA, which only the worker may do.
        if self._inline:
            raise _Defer
        try:
            if write:
                self.backend.write(offset, b"".join(dma.read(i, n) for i, n in ranges))
            else:
                data = self.backend.read(offset, length)
                pos = 0
                for iova, n in ranges:
                    dma.write(iova, data[pos:pos + n])
                    pos += n
        except DmaError as exc:
            raise NvmeError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc

    # --- I/O commands -------------------------------------------------------------------------
    def _check_nsid(self, nsid: int) -> None:
        if nsid != 1:
            raise NvmeError(Status.INVALID_NAMESPACE, f"namespace {nsid:#x}")

    def _lba_range(self, cmd: SqeTuple) -> tuple[int, int]:
        slba = cmd[8] | cmd[9] << 32
        nlb = (cmd[10] & 0xFFFF) + 1
        if slba + nlb > self.blocks:
            raise NvmeError(Status.LBA_OUT_OF_RANGE, f"LBA {slba}+{nlb} > {self.blocks}")
        return slba, nlb

    def _io(self, cmd: SqeTuple) -> int:
        opcode = cmd[0]
        if cmd[1] & 0x03:
            raise NvmeError(Status.INVALID_FIELD, "fused operations are not supported")
        if opcode == IoOpcode.READ or opcode == IoOpcode.WRITE:
            self._check_nsid(cmd[3])
            slba, nlb = self._lba_range(cmd)
            length = nlb << LBA_SHIFT
            if length > MAX_TRANSFER:
                raise NvmeError(Status.INVALID_FIELD, f"transfer of {length} > MDTS")
            write = opcode == IoOpcode.WRITE
            try:
                self._file_io(cmd, slba << LBA_SHIFT, length, write)
                wce = self.features[Feature.VOLATILE_WRITE_CACHE]
                if write and (cmd[10] & (1 << 30) or not wce):
                    os.fdatasync(self.backend.fd)
            except OSError as exc:
                log.error("nvme: backing file I/O failed: %s", exc)
                raise NvmeError(Status.INTERNAL_ERROR, str(exc)) from exc
            key = "write" if write else "read"
            self.stats[key + "s"] += 1
            self.stats[key + "_bytes"] += length
            return 0
        if opcode == IoOpcode.FLUSH:
            if cmd[3] != 0xFFFFFFFF:
                self._check_nsid(cmd[3])
            try:
                self.backend.flush()
            except OSError as exc:
                raise NvmeError(Status.INTERNAL_ERROR, str(exc)) from exc
            self.stats["flushes"] += 1
            return 0
        if opcode == IoOpcode.WRITE_ZEROES:
            self._check_nsid(cmd[3])
            slba, nlb = self._lba_range(cmd)
            try:
                self.backend.zero(slba << LBA_SHIFT, nlb << LBA_SHIFT)
                if cmd[10] & (1 << 30):
                    os.fdatasync(self.backend.fd)
            except OSError as exc:
                raise NvmeError(Status.INTERNAL_ERROR, str(exc)) from exc
            return 0
        if opcode == IoOpcode.DSM:
            self._check_nsid(cmd[3])
            nr = (cmd[8] & 0xFF) + 1
            data = self._from_guest(cmd, nr * 16)
            ranges = []
            for i in range(nr):
                _attrs, nlb, slba = struct.unpack_from("<IIQ", data, i * 16)
                if slba + nlb > self.blocks:
                    raise NvmeError(Status.LBA_OUT_OF_RANGE, f"DSM range {slba}+{nlb}")
                ranges.append((slba, nlb))
            if cmd[9] & (1 << 2):  # AD: deallocate
                for slba, nlb in ranges:
                    if nlb:
                        self.backend.deallocate(slba << LBA_SHIFT, nlb << LBA_SHIFT)
            return 0
        raise NvmeError(Status.INVALID_OPCODE, f"I/O opcode {opcode:#x}")

    # --- admin commands -----------------------------------------------------------------------
    def _admin(self, cmd: SqeTuple, gen: int) -> int | None:
        opcode = cmd[0]
        if cmd[1] & 0x03:
            raise NvmeError(Status.INVALID_FIELD, "fused operations are not supported")
        handler = self._ADMIN.get(opcode)
        if handler is None:
            raise NvmeError(Status.INVALID_OPCODE, f"admin opcode {opcode:#x}")
        return handler(self, cmd, gen)

    def _identify(self, cmd: SqeTuple, gen: int) -> int:
        cns = cmd[8] & 0xFF
        nsid = cmd[3]
        if cns == Cns.CONTROLLER:
            data = identify_controller(
                vendor_id=self.vendor_id, subsystem_vendor_id=self.subsystem_vendor_id,
                serial=self.serial, model=MODEL, firmware=FIRMWARE, mdts=MDTS, cntlid=1,
                aerl=AERL, acl=ACL, namespaces=1,
                subnqn=f"nqn.2024-01.io.github.pyvfio-user:nvme:{self.serial}",
                volatile_write_cache=True, warning_temp=WARNING_TEMP,
                critical_temp=CRITICAL_TEMP)
        elif cns == Cns.NAMESPACE:
            self._check_nsid(nsid)
            data = identify_namespace(blocks=self.blocks, lba_shift=LBA_SHIFT, nguid=self.nguid,
                                      eui64=self.eui64,
                                      deallocate_zeroes=self.backend.can_punch)
        elif cns == Cns.ACTIVE_NAMESPACES:
            if nsid >= 0xFFFFFFFE:
                raise NvmeError(Status.INVALID_NAMESPACE, f"namespace {nsid:#x}")
            data = active_namespaces(nsid, 1)
        elif cns == Cns.NS_DESCRIPTORS:
            self._check_nsid(nsid)
            data = namespace_descriptors(nguid=self.nguid, uuid=self.uuid, eui64=self.eui64)
        else:
            raise NvmeError(Status.INVALID_FIELD, f"Identify CNS {cns:#x}")
        self._to_guest(cmd, data)
        return 0

    def _get_log_page(self, cmd: SqeTuple, gen: int) -> int:
        lid = cmd[8] & 0xFF
        numd = ((cmd[8] >> 16) | (cmd[9] & 0xFFFF) << 16) + 1
        offset = cmd[10] | cmd[11] << 32
        if offset & 3:
            raise NvmeError(Status.INVALID_FIELD, "log page offset not dword aligned")
        if lid == LogPage.ERROR:
            page = bytes(64)
        elif lid == LogPage.SMART:
            s = self.stats
            page = smart_log(
                temperature=CURRENT_TEMP,
                units_read=(s["read_bytes"] + 512_000 - 1) // 512_000,
                units_written=(s["write_bytes"] + 512_000 - 1) // 512_000,
                host_reads=s["reads"], host_writes=s["writes"],
                power_cycles=self.power_cycles,
                power_on_hours=int((time.monotonic() - self._created) // 3600))
        elif lid == LogPage.FIRMWARE_SLOT:
            page = firmware_log(FIRMWARE)
        else:
            raise NvmeError(Status.INVALID_LOG_PAGE, f"log page {lid:#x}")
        if offset > len(page):
            raise NvmeError(Status.INVALID_FIELD, f"log page offset {offset} too large")
        length = numd * 4
        if length > 1 << 20:
            raise NvmeError(Status.INVALID_FIELD, "log page transfer too large")
        self._to_guest(cmd, page[offset:offset + length], length)
        return 0

    def _create_cq(self, cmd: SqeTuple, gen: int) -> int:
        qid = cmd[8] & 0xFFFF
        qsize = (cmd[8] >> 16) + 1
        pc, ien, iv = cmd[9] & 1, bool(cmd[9] & 2), cmd[9] >> 16
        with self.lock:
            if gen != self._gen:
                raise NvmeError(Status.ABORT_REQUESTED)
            if qid == 0 or qid > self.io_cq_limit or qid in self.cqs:
                raise NvmeError(Status.INVALID_QID, f"CQ {qid}")
            if qsize < 2 or qsize > MQES + 1:
                raise NvmeError(Status.INVALID_QUEUE_SIZE, f"CQ size {qsize}")
            if iv >= self.msix_vectors:
                raise NvmeError(Status.INVALID_VECTOR, f"vector {iv}")
            if not pc:
                raise NvmeError(Status.INVALID_FIELD, "CQ must be physically contiguous")
            if cmd[6] & (PAGE_SIZE - 1) or not cmd[6]:
                raise NvmeError(Status.INVALID_PRP_OFFSET, f"CQ base {cmd[6]:#x}")
            if (self.cc >> CC_IOCQES_SHIFT) & CC_IOCQES_MASK != CQES_LOG2:
                raise NvmeError(Status.INVALID_FIELD, "CC.IOCQES is not 16 bytes")
            self.cqs[qid] = _CompletionQueue(qid, cmd[6], qsize, iv, ien)
        return 0

    def _create_sq(self, cmd: SqeTuple, gen: int) -> int:
        qid = cmd[8] & 0xFFFF
        qsize = (cmd[8] >> 16) + 1
        pc, cqid = cmd[9] & 1, cmd[9] >> 16
        with self.lock:
            if gen != self._gen:
                raise NvmeError(Status.ABORT_REQUESTED)
            if cqid == 0 or cqid not in self.cqs:
                raise NvmeError(Status.INVALID_CQ, f"CQ {cqid}")
            if qid == 0 or qid > self.io_sq_limit or qid in self.sqs:
                raise NvmeError(Status.INVALID_QID, f"SQ {qid}")
            if qsize < 2 or qsize > MQES + 1:
                raise NvmeError(Status.INVALID_QUEUE_SIZE, f"SQ size {qsize}")
            if not pc:
                raise NvmeError(Status.INVALID_FIELD, "SQ must be physically contiguous")
            if cmd[6] & (PAGE_SIZE - 1) or not cmd[6]:
                raise NvmeError(Status.INVALID_PRP_OFFSET, f"SQ base {cmd[6]:#x}")
            if (self.cc >> CC_IOSQES_SHIFT) & CC_IOSQES_MASK != SQES_LOG2:
                raise NvmeError(Status.INVALID_FIELD, "CC.IOSQES is not 64 bytes")
            self.sqs[qid] = _SubmissionQueue(qid, cmd[6], qsize, cqid)
            self.cqs[cqid].sqids.add(qid)
        return 0

    def _delete_sq(self, cmd: SqeTuple, gen: int) -> int:
        qid = cmd[8] & 0xFFFF
        with self.lock:
            sq = self.sqs.get(qid) if qid else None
            if sq is None:
                raise NvmeError(Status.INVALID_QID, f"SQ {qid}")
            del self.sqs[qid]
            cq = self.cqs.get(sq.cqid)
            if cq is not None:
                cq.sqids.discard(qid)
        return 0

    def _delete_cq(self, cmd: SqeTuple, gen: int) -> int:
        qid = cmd[8] & 0xFFFF
        with self.lock:
            cq = self.cqs.get(qid) if qid else None
            if cq is None:
                raise NvmeError(Status.INVALID_QID, f"CQ {qid}")
            if cq.sqids:
                raise NvmeError(Status.INVALID_QUEUE_DELETION, f"CQ {qid} in use")
            del self.cqs[qid]
            self._update_intx()
        return 0

    def _feature_value(self, fid: int, cdw11: int, sel: int) -> int:
        current = sel not in (1, 2)
        if fid == Feature.TEMPERATURE_THRESHOLD:
            tmpsel, thsel = (cdw11 >> 16) & 0xF, (cdw11 >> 20) & 3
            if tmpsel > 8 or thsel > 1:
                raise NvmeError(Status.INVALID_FIELD, "temperature threshold selector")
            default = WARNING_TEMP if (tmpsel, thsel) == (0, 0) else (0xFFFF if thsel == 0 else 0)
            if current:
                return self.temp_thresholds.get((tmpsel, thsel), default)
            return default
        if fid == Feature.INTERRUPT_VECTOR_CONFIG:
            iv = cdw11 & 0xFFFF
            if iv >= self.msix_vectors:
                raise NvmeError(Status.INVALID_FIELD, f"vector {iv}")
            return self.vector_config.get(iv, iv) if current else iv
        if fid not in self.features:
            raise NvmeError(Status.INVALID_FIELD, f"feature {fid:#x}")
        if current:
            return self.features[fid]
        return self._default_features()[fid]

    def _get_features(self, cmd: SqeTuple, gen: int) -> int:
        fid, sel = cmd[8] & 0xFF, (cmd[8] >> 8) & 7
        if sel > 3:
            raise NvmeError(Status.INVALID_FIELD, f"SEL {sel}")
        with self.lock:
            value = self._feature_value(fid, cmd[9], sel)
        if sel == 3:
            return 0x4  # changeable, not saveable, not namespace specific
        return value

    def _set_features(self, cmd: SqeTuple, gen: int) -> int:
        fid, save = cmd[8] & 0xFF, bool(cmd[8] >> 31)
        value = cmd[9]
        with self.lock:
            self._feature_value(fid, value, 0)  # validates fid (and selectors)
            if save:
                raise NvmeError(Status.FEATURE_NOT_SAVEABLE, f"feature {fid:#x}")
            if fid == Feature.NUMBER_OF_QUEUES:
                nsqr, ncqr = value & 0xFFFF, value >> 16
                if nsqr == 0xFFFF or ncqr == 0xFFFF:
                    raise NvmeError(Status.INVALID_FIELD, "65536 queues requested")
                if len(self.sqs) > 1 or len(self.cqs) > 1:
                    raise NvmeError(Status.COMMAND_SEQUENCE_ERROR, "I/O queues exist")
                self.io_sq_limit = min(nsqr + 1, self.max_queues)
                self.io_cq_limit = min(ncqr + 1, self.max_queues)
                # the allocation is reported, the feature keeps the maximum
                return (self.io_sq_limit - 1) | (self.io_cq_limit - 1) << 16
            if fid == Feature.POWER_MANAGEMENT and value & 0x1F:
                raise NvmeError(Status.INVALID_FIELD, f"power state {value & 0x1F}")
            if fid == Feature.TEMPERATURE_THRESHOLD:
                self.temp_thresholds[((value >> 16) & 0xF, (value >> 20) & 3)] = value & 0xFFFF
                return 0
            if fid == Feature.INTERRUPT_VECTOR_CONFIG:
                self.vector_config[value & 0xFFFF] = value & 0x1FFFF
                return 0
            if fid == Feature.VOLATILE_WRITE_CACHE:
                value &= 1
            self.features[fid] = value
        return 0

    def _async_event_request(self, cmd: SqeTuple, gen: int) -> int | None:
        with self.lock:
            if gen != self._gen:
                raise NvmeError(Status.ABORT_REQUESTED)
            if self._events:
                return self._events.popleft()
            if len(self._aers) > AERL:
                raise NvmeError(Status.AER_LIMIT, "too many Asynchronous Event Requests")
            self._aers.append(cmd[2])
        return None

    def _abort(self, cmd: SqeTuple, gen: int) -> int:
        return 1  # commands complete before Abort can see them: "not aborted"

    def _keep_alive(self, cmd: SqeTuple, gen: int) -> int:
        return 0

    _ADMIN: ClassVar[dict[int, Callable[[NvmeController, SqeTuple, int], int | None]]] = {
        AdminOpcode.IDENTIFY: _identify,
        AdminOpcode.GET_LOG_PAGE: _get_log_page,
        AdminOpcode.CREATE_CQ: _create_cq,
        AdminOpcode.CREATE_SQ: _create_sq,
        AdminOpcode.DELETE_SQ: _delete_sq,
        AdminOpcode.DELETE_CQ: _delete_cq,
        AdminOpcode.GET_FEATURES: _get_features,
        AdminOpcode.SET_FEATURES: _set_features,
        AdminOpcode.ASYNC_EVENT_REQUEST: _async_event_request,
        AdminOpcode.ABORT: _abort,
        AdminOpcode.KEEP_ALIVE: _keep_alive,
    }

