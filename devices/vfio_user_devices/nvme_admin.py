"""The NVMe controller's admin command set (:mod:`vfio_user_devices.nvme`), one handler per opcode.

Admin commands run on the controller's worker threads only. A handler takes the command and the
controller generation it was fetched under (a controller reset in between makes the commands
that create state fail with ABORT_REQUESTED), and returns the completion's dword 0, or None for
a command held until later (Asynchronous Event Request). It raises :class:`NvmeError` for an
error status. Handlers take the controller's lock to read or change queue and feature state,
never while moving data.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Container
from typing import TYPE_CHECKING

from .nvme_backend import LBA_SHIFT
from .nvme_io import MDTS, GuestData, check_nsid
from .nvme_queues import CompletionQueue, SubmissionQueue
from .nvme_spec import (
    CC_IOCQES_MASK,
    CC_IOCQES_SHIFT,
    CC_IOSQES_MASK,
    CC_IOSQES_SHIFT,
    CQES_LOG2,
    FEATURE_CHANGEABLE,
    IVC_IV_MASK,
    IVC_WRITABLE,
    PAGE_SIZE,
    PM_PS_MASK,
    SEL_CAPABILITIES,
    SEL_CURRENT,
    SEL_DEFAULT,
    SEL_SAVED,
    SQE_CID,
    SQE_NSID,
    SQE_PRP1,
    SQES_LOG2,
    TMPTH_MASK,
    VWC_WCE,
    AdminOpcode,
    Cns,
    Feature,
    LogPage,
    NvmeError,
    SqeTuple,
    Status,
    active_namespaces,
    command_handler,
    cq_interrupts,
    cq_vector,
    feature_id,
    feature_save,
    feature_select,
    feature_value,
    firmware_log,
    identify_cns,
    identify_controller,
    identify_namespace,
    log_page_dwords,
    log_page_id,
    log_page_offset,
    make_queue_counts,
    namespace_descriptors,
    queue_contiguous,
    queue_counts,
    queue_id,
    queue_size,
    smart_log,
    sq_cqid,
    temperature_selector,
)

if TYPE_CHECKING:
    from .nvme import NvmeController

__all__ = ["ACL", "AERL", "MQES", "AdminCommands", "default_features", "default_serial",
           "namespace_ids"]

#: Maximum Queue Entries Supported (0-based: 1024 entries per I/O queue).
MQES = 1023
#: Asynchronous Event Request Limit (0-based) and Abort Command Limit (0-based).
AERL = 3
ACL = 3
WARNING_TEMP = 0x157  # 343 K
CRITICAL_TEMP = 0x175  # 373 K
CURRENT_TEMP = 0x13B  # 315 K
FIRMWARE = "0.1.0"
MODEL = "pyvfio-user NVMe"
#: SMART data units are thousands of 512-byte units
_DATA_UNIT = 512_000
#: The largest Get Log Page transfer served
_MAX_LOG_TRANSFER = 1 << 20


def default_features(max_queues: int) -> dict[int, int]:
    """The features' power-on values (those without selectors)."""
    n = max_queues - 1
    return {
        Feature.ARBITRATION: 0,
        Feature.POWER_MANAGEMENT: 0,
        Feature.VOLATILE_WRITE_CACHE: VWC_WCE,
        Feature.NUMBER_OF_QUEUES: make_queue_counts(n, n),
        Feature.INTERRUPT_COALESCING: 0,
        Feature.WRITE_ATOMICITY: 0,
        Feature.ASYNC_EVENT_CONFIG: 0,
    }


def default_serial(path: str | None, instance: int) -> str:
    """A serial number derived from the image's path (or unique, for a memory namespace)."""
    seed = (os.path.realpath(path) if path
            else f"mem-{os.getpid()}-{instance}-{time.time_ns()}")
    return "PYV" + hashlib.sha256(seed.encode()).hexdigest()[:12].upper()


def namespace_ids(serial: str) -> tuple[bytes, bytes, bytes]:
    """The namespace's NGUID, EUI-64 and UUID, derived from the serial number."""
    digest = hashlib.sha256(b"pyvfio-user nvme " + serial.encode()).digest()
    eui64 = bytes([0x02]) + digest[16:23]  # locally administered
    return digest[:16], eui64, uuid.UUID(bytes=digest[:16], version=4).bytes


def default_temperature(tmpsel: int, thsel: int) -> int:
    """Power-on Temperature Threshold: the composite over-temperature warning, else none."""
    if (tmpsel, thsel) == (0, 0):
        return WARNING_TEMP
    return 0xFFFF if thsel == 0 else 0


Handler = Callable[["AdminCommands", SqeTuple, int], "int | None"]


class AdminCommands:
    """The admin commands of one controller, dispatched by opcode through :attr:`HANDLERS`."""

    def __init__(self, ctrl: NvmeController, guest: GuestData) -> None:
        self._ctrl = ctrl
        self._guest = guest

    def run(self, cmd: SqeTuple, gen: int) -> int | None:
        """Execute one admin command fetched under controller generation ``gen``."""
        return command_handler(self.HANDLERS, cmd, "admin")(self, cmd, gen)

    def _check_generation(self, gen: int) -> None:
        if gen != self._ctrl.gen:
            raise NvmeError(Status.ABORT_REQUESTED)

    # --- identify and log pages -----------------------------------------------------------------
    def identify(self, cmd: SqeTuple, gen: int) -> int:
        ctrl = self._ctrl
        cns, nsid = identify_cns(cmd), cmd[SQE_NSID]
        if cns == Cns.CONTROLLER:
            data = identify_controller(
                vendor_id=ctrl.vendor_id, subsystem_vendor_id=ctrl.subsystem_vendor_id,
                serial=ctrl.serial, model=MODEL, firmware=FIRMWARE, mdts=MDTS, cntlid=1,
                aerl=AERL, acl=ACL, namespaces=1,
                subnqn=f"nqn.2024-01.io.github.pyvfio-user:nvme:{ctrl.serial}",
                volatile_write_cache=True, warning_temp=WARNING_TEMP,
                critical_temp=CRITICAL_TEMP)
        elif cns == Cns.NAMESPACE:
            check_nsid(nsid)
            data = identify_namespace(blocks=ctrl.blocks, lba_shift=LBA_SHIFT, nguid=ctrl.nguid,
                                      eui64=ctrl.eui64,
                                      deallocate_zeroes=ctrl.backend.can_punch)
        elif cns == Cns.ACTIVE_NAMESPACES:
            if nsid >= 0xFFFFFFFE:
                raise NvmeError(Status.INVALID_NAMESPACE, f"namespace {nsid:#x}")
            data = active_namespaces(nsid, 1)
        elif cns == Cns.NS_DESCRIPTORS:
            check_nsid(nsid)
            data = namespace_descriptors(nguid=ctrl.nguid, uuid=ctrl.uuid, eui64=ctrl.eui64)
        else:
            raise NvmeError(Status.INVALID_FIELD, f"Identify CNS {cns:#x}")
        self._guest.to_guest(cmd, data)
        return 0

    def get_log_page(self, cmd: SqeTuple, gen: int) -> int:
        ctrl = self._ctrl
        lid, offset = log_page_id(cmd), log_page_offset(cmd)
        if offset & 3:
            raise NvmeError(Status.INVALID_FIELD, "log page offset not dword aligned")
        if lid == LogPage.ERROR:
            page = bytes(64)
        elif lid == LogPage.SMART:
            s = ctrl.stats
            page = smart_log(
                temperature=CURRENT_TEMP,
                units_read=(s["read_bytes"] + _DATA_UNIT - 1) // _DATA_UNIT,
                units_written=(s["write_bytes"] + _DATA_UNIT - 1) // _DATA_UNIT,
                host_reads=s["reads"], host_writes=s["writes"],
                power_cycles=ctrl.power_cycles,
                power_on_hours=int((time.monotonic() - ctrl.created) // 3600))
        elif lid == LogPage.FIRMWARE_SLOT:
            page = firmware_log(FIRMWARE)
        else:
            raise NvmeError(Status.INVALID_LOG_PAGE, f"log page {lid:#x}")
        if offset > len(page):
            raise NvmeError(Status.INVALID_FIELD, f"log page offset {offset} too large")
        length = log_page_dwords(cmd) * 4
        if length > _MAX_LOG_TRANSFER:
            raise NvmeError(Status.INVALID_FIELD, "log page transfer too large")
        self._guest.to_guest(cmd, page[offset:offset + length], length)
        return 0

    # --- queues ---------------------------------------------------------------------------------
    def _check_new_queue(self, kind: str, qid: int, limit: int, existing: Container[int],
                         cmd: SqeTuple) -> int:
        """Common checks of Create I/O CQ/SQ (lock held); the queue size."""
        qsize = queue_size(cmd)
        if qid == 0 or qid > limit or qid in existing:
            raise NvmeError(Status.INVALID_QID, f"{kind} {qid}")
        if qsize < 2 or qsize > MQES + 1:
            raise NvmeError(Status.INVALID_QUEUE_SIZE, f"{kind} size {qsize}")
        return qsize

    def _check_base(self, kind: str, cmd: SqeTuple, cc_shift: int, cc_mask: int,
                    log2: int) -> None:
        """Create I/O CQ/SQ: contiguous, page-aligned base, entry size from CC (lock held)."""
        base = cmd[SQE_PRP1]
        if not queue_contiguous(cmd):
            raise NvmeError(Status.INVALID_FIELD, f"{kind} must be physically contiguous")
        if base & (PAGE_SIZE - 1) or not base:
            raise NvmeError(Status.INVALID_PRP_OFFSET, f"{kind} base {base:#x}")
        if (self._ctrl.cc >> cc_shift) & cc_mask != log2:
            name = "IOCQES" if kind == "CQ" else "IOSQES"
            raise NvmeError(Status.INVALID_FIELD, f"CC.{name} is not {1 << log2} bytes")

    def create_cq(self, cmd: SqeTuple, gen: int) -> int:
        ctrl = self._ctrl
        qid, iv = queue_id(cmd), cq_vector(cmd)
        with ctrl.lock:
            self._check_generation(gen)
            qsize = self._check_new_queue("CQ", qid, ctrl.io_cq_limit, ctrl.cqs, cmd)
            if iv >= ctrl.msix_vectors:
                raise NvmeError(Status.INVALID_VECTOR, f"vector {iv}")
            self._check_base("CQ", cmd, CC_IOCQES_SHIFT, CC_IOCQES_MASK, CQES_LOG2)
            ctrl.cqs[qid] = CompletionQueue(qid, cmd[SQE_PRP1], qsize, iv, cq_interrupts(cmd))
            if ctrl.doorbells is not None:
                ctrl.doorbells.clear(qid, is_cq=True)
        return 0

    def create_sq(self, cmd: SqeTuple, gen: int) -> int:
        ctrl = self._ctrl
        qid, cqid = queue_id(cmd), sq_cqid(cmd)
        with ctrl.lock:
            self._check_generation(gen)
            if cqid == 0 or cqid not in ctrl.cqs:
                raise NvmeError(Status.INVALID_CQ, f"CQ {cqid}")
            qsize = self._check_new_queue("SQ", qid, ctrl.io_sq_limit, ctrl.sqs, cmd)
            self._check_base("SQ", cmd, CC_IOSQES_SHIFT, CC_IOSQES_MASK, SQES_LOG2)
            ctrl.sqs[qid] = SubmissionQueue(qid, cmd[SQE_PRP1], qsize, cqid)
            if ctrl.doorbells is not None:
                ctrl.doorbells.clear(qid)
            ctrl.cqs[cqid].sqids.add(qid)
        return 0

    def delete_sq(self, cmd: SqeTuple, gen: int) -> int:
        ctrl = self._ctrl
        qid = queue_id(cmd)
        with ctrl.lock:
            sq = ctrl.sqs.get(qid) if qid else None
            if sq is None:
                raise NvmeError(Status.INVALID_QID, f"SQ {qid}")
            # a batch of this SQ on another worker completes first (and so never posts to,
            # or moves the head of, a queue created again under the same id)
            ctrl.cond.wait_for(lambda: not sq.busy or gen != ctrl.gen)
            self._check_generation(gen)
            if ctrl.sqs.get(qid) is not sq:
                raise NvmeError(Status.INVALID_QID, f"SQ {qid}")
            del ctrl.sqs[qid]
            cq = ctrl.cqs.get(sq.cqid)
            if cq is not None:
                cq.sqids.discard(qid)
        return 0

    def delete_cq(self, cmd: SqeTuple, gen: int) -> int:
        ctrl = self._ctrl
        qid = queue_id(cmd)
        with ctrl.lock:
            cq = ctrl.cqs.get(qid) if qid else None
            if cq is None:
                raise NvmeError(Status.INVALID_QID, f"CQ {qid}")
            if cq.sqids:
                raise NvmeError(Status.INVALID_QUEUE_DELETION, f"CQ {qid} in use")
            del ctrl.cqs[qid]
            ctrl.update_intx()
        return 0

    # --- features -------------------------------------------------------------------------------
    def _feature(self, fid: int, value: int, sel: int) -> int:
        """The feature's value for ``sel`` (lock held); validates the fid and selectors."""
        ctrl = self._ctrl
        current = sel not in (SEL_DEFAULT, SEL_SAVED)
        if fid == Feature.TEMPERATURE_THRESHOLD:
            tmpsel, thsel = temperature_selector(value)
            if tmpsel > 8 or thsel > 1:
                raise NvmeError(Status.INVALID_FIELD, "temperature threshold selector")
            default = default_temperature(tmpsel, thsel)
            return ctrl.temp_thresholds.get((tmpsel, thsel), default) if current else default
        if fid == Feature.INTERRUPT_VECTOR_CONFIG:
            iv = value & IVC_IV_MASK
            if iv >= ctrl.msix_vectors:
                raise NvmeError(Status.INVALID_FIELD, f"vector {iv}")
            return ctrl.vector_config.get(iv, iv) if current else iv
        if fid not in ctrl.features:
            raise NvmeError(Status.INVALID_FIELD, f"feature {fid:#x}")
        if current:
            return ctrl.features[fid]
        return default_features(ctrl.max_queues)[fid]

    def get_features(self, cmd: SqeTuple, gen: int) -> int:
        fid, sel = feature_id(cmd), feature_select(cmd)
        if sel > SEL_CAPABILITIES:
            raise NvmeError(Status.INVALID_FIELD, f"SEL {sel}")
        with self._ctrl.lock:
            value = self._feature(fid, feature_value(cmd), sel)
        if sel == SEL_CAPABILITIES:
            return FEATURE_CHANGEABLE
        return value

    def set_features(self, cmd: SqeTuple, gen: int) -> int:
        ctrl = self._ctrl
        fid, value = feature_id(cmd), feature_value(cmd)
        with ctrl.lock:
            self._feature(fid, value, SEL_CURRENT)  # validates fid (and selectors)
            if feature_save(cmd):
                raise NvmeError(Status.FEATURE_NOT_SAVEABLE, f"feature {fid:#x}")
            if fid == Feature.NUMBER_OF_QUEUES:
                nsqr, ncqr = queue_counts(value)
                if nsqr == 0xFFFF or ncqr == 0xFFFF:
                    raise NvmeError(Status.INVALID_FIELD, "65536 queues requested")
                if len(ctrl.sqs) > 1 or len(ctrl.cqs) > 1:
                    raise NvmeError(Status.COMMAND_SEQUENCE_ERROR, "I/O queues exist")
                ctrl.io_sq_limit = min(nsqr + 1, ctrl.max_queues)
                ctrl.io_cq_limit = min(ncqr + 1, ctrl.max_queues)
                # the allocation is reported, the feature keeps the maximum
                return make_queue_counts(ctrl.io_sq_limit - 1, ctrl.io_cq_limit - 1)
            if fid == Feature.POWER_MANAGEMENT and value & PM_PS_MASK:
                raise NvmeError(Status.INVALID_FIELD, f"power state {value & PM_PS_MASK}")
            if fid == Feature.TEMPERATURE_THRESHOLD:
                ctrl.temp_thresholds[temperature_selector(value)] = value & TMPTH_MASK
                return 0
            if fid == Feature.INTERRUPT_VECTOR_CONFIG:
                ctrl.vector_config[value & IVC_IV_MASK] = value & IVC_WRITABLE
                ctrl.coalescer.vector_configured(value & IVC_IV_MASK)
                return 0
            if fid == Feature.VOLATILE_WRITE_CACHE:
                value &= VWC_WCE
            ctrl.features[fid] = value
            if fid == Feature.INTERRUPT_COALESCING:
                ctrl.coalescer.configure(value)
        return 0

    # --- the rest -------------------------------------------------------------------------------
    def async_event_request(self, cmd: SqeTuple, gen: int) -> int | None:
        ctrl = self._ctrl
        with ctrl.lock:
            self._check_generation(gen)
            if ctrl.pending_events:
                return ctrl.pending_events.popleft()
            if len(ctrl.held_aers) > AERL:
                raise NvmeError(Status.AER_LIMIT, "too many Asynchronous Event Requests")
            ctrl.held_aers.append(cmd[SQE_CID])
        return None

    def abort(self, cmd: SqeTuple, gen: int) -> int:
        return 1  # commands complete before Abort can see them: "not aborted"

    def keep_alive(self, cmd: SqeTuple, gen: int) -> int:
        return 0

    HANDLERS: dict[int, Handler] = {
        AdminOpcode.IDENTIFY: identify,
        AdminOpcode.GET_LOG_PAGE: get_log_page,
        AdminOpcode.CREATE_CQ: create_cq,
        AdminOpcode.CREATE_SQ: create_sq,
        AdminOpcode.DELETE_SQ: delete_sq,
        AdminOpcode.DELETE_CQ: delete_cq,
        AdminOpcode.GET_FEATURES: get_features,
        AdminOpcode.SET_FEATURES: set_features,
        AdminOpcode.ASYNC_EVENT_REQUEST: async_event_request,
        AdminOpcode.ABORT: abort,
        AdminOpcode.KEEP_ALIVE: keep_alive,
    }
