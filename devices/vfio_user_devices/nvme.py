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

Durability (docs/data-integrity.md): a write's completion is posted after its ``pwritev``
returned, so completed data is in the host's page cache and survives QEMU's or the server's
death. It is made durable (``fdatasync``, :meth:`FileBackend.sync`) by Flush, by a write with
Force Unit Access before its completion is posted, by every write while the host has turned
the volatile write cache off, by a shutdown (CC.SHN) and when the client leaves (so a server
stopped by SIGTERM finishes the batch in progress and syncs before it exits).

Threads: BAR handlers run on the server's loop thread with :attr:`lock` held and mostly only
record state (doorbell values, register writes). Worker threads owned by the controller
(:mod:`.nvme_workers`: one, and more while work waits and all are busy, up to one per SQ)
fetch submission queue entries, move data and post completions, one batch of one SQ per worker
at a time, so several queues progress at once; a worker takes :attr:`lock` only to take or end
a job and to commit queue state, never while doing DMA or file I/O. With fd-backed guest RAM,
data moves straight between the file and guest memory (``preadv`` into the mmapped guest
pages); otherwise through DMA_READ / DMA_WRITE messages.

Inline path: an I/O SQ tail doorbell whose SQ has no batch in progress runs up to
``INLINE_MAX`` new commands right there, on the loop thread, with the lock held (no DMA unmap
can arrive meanwhile: unmaps are handled on the same thread), which saves waking a worker.
Only plain Reads and Writes (no FUA, volatile write cache on: no fsync) whose SQ entries, CQ,
PRP lists and data are all in fd-backed guest memory qualify, since direct DMA is a memory copy
but message DMA must never run on the loop thread; a read asks the kernel not to wait for the
disk (``RWF_NOWAIT``) and goes to a worker if it would. The first command that does not qualify
(or that turns out to need message DMA or the disk) stops the run before any side effect the
host can see (a read that would wait may have filled part of its own buffer, which the worker
fills again before its completion); it and the rest are left to a worker, in order. Admin
commands always go to a worker.

Interrupts: one MSI-X vector per CQ, MSI or INTx (above); Interrupt Coalescing (features 08h
and 09h) is applied by :mod:`.nvme_coalesce`.

Modules: this one holds the registers, the controller state machine (CC, CSTS), doorbells,
interrupts and the worker jobs; :mod:`.nvme_queues` the data path (fetch, execute, complete,
inline or in worker batches); :mod:`.nvme_admin` the admin commands by opcode; :mod:`.nvme_io`
the NVM command set and guest data movement; :mod:`.nvme_backend` the namespace's file;
:mod:`.nvme_spec` the specification's numbers, layouts and command fields.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from vfio_user_server.device import PciDevice
from vfio_user_server.errors import DeviceDefinitionError, StateError
from vfio_user_server.irq import IrqIndex
from vfio_user_server.options import Option
from vfio_user_server.pci import Bar
from vfio_user_server.state import StateValue

from .nvme_admin import (
    MQES,
    WARNING_TEMP,
    AdminCommands,
    default_features,
    default_serial,
    namespace_ids,
)
from .nvme_backend import BLOCK_SIZE, LBA_SHIFT, FileBackend, parse_size
from .nvme_coalesce import Coalescer
from .nvme_doorbells import PolledDoorbells, bar0
from .nvme_io import GuestData, IoCommands
from .nvme_queues import CompletionQueue, DataPath, HeldPost, SubmissionQueue
from .nvme_spec import (
    AER_INFO_INVALID_DOORBELL_REGISTER,
    AER_INFO_INVALID_DOORBELL_VALUE,
    AER_TYPE_ERROR,
    AQA_WRITABLE,
    CC_AMS_MASK,
    CC_AMS_SHIFT,
    CC_CSS_MASK,
    CC_CSS_SHIFT,
    CC_EN,
    CC_MPS_MASK,
    CC_MPS_SHIFT,
    CC_SHN_MASK,
    CC_SHN_SHIFT,
    CC_WRITABLE,
    CSTS_CFS,
    CSTS_RDY,
    CSTS_SHST_MASK,
    CSTS_SHST_SHIFT,
    DOORBELL_BASE,
    INTMS_VECTOR0,
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
    VERSION_1_4,
    Feature,
    LogPage,
    aer_result,
    aqa_sizes,
    doorbell_queue,
    make_cap,
)
from .nvme_state import check_state, queue_state, set_queue_state
from .nvme_workers import JOIN_TIMEOUT, Workers

__all__ = ["BLOCK_SIZE", "FileBackend", "NvmeController", "parse_size"]

log = logging.getLogger(__name__)

MAX_IO_QUEUES = 16


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
        Option("--polled-doorbells", "doorbells in memory mapped into the guest, polled by a "
               "thread (no message per doorbell; QEMU then posts no writes)", switch=True),
    )

    #: Registers, queues, features and held work (docs/state.md, :mod:`.nvme_state`); the
    #: namespace's data is the backing file's, not the state's. ``blocks`` and
    #: ``max_queues`` are checked, not changed: a state only loads into a like controller.
    state_fields = ("blocks", "max_queues", "serial", "cc", "csts", "aqa", "asq", "acq",
                    "intms", "features", "vector_config", "temperature_thresholds",
                    "io_sq_limit", "io_cq_limit", "queue_state", "_msi_pending",
                    "_shutdown_pending", "stats", "power_cycles")
    state_version = 1

    def __init__(
        self,
        image: str | os.PathLike[str] | None = None,
        size: int | None = None,
        *,
        serial: str | None = None,
        queues: int = 8,
        backend: FileBackend | None = None,
        polled_doorbells: bool = False,
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
        self.serial = serial if serial is not None else default_serial(backend.path, id(self))
        self.nguid, self.eui64, self.uuid = namespace_ids(self.serial)
        self.cap = make_cap(MQES, 20)
        self.polled_doorbells = polled_doorbells
        super().__init__()
        #: the doorbell page and its poller (``--polled-doorbells``; :mod:`.nvme_doorbells`)
        self.doorbells = PolledDoorbells(self, self.mapped(0)) if polled_doorbells else None
        guest = GuestData(self)
        self.admin = AdminCommands(self, guest)
        self.datapath = DataPath(self, guest, self.admin, IoCommands(self, guest))
        self.cond = threading.Condition(self.lock)
        #: Interrupt Coalescing (features 08h and 09h; :mod:`.nvme_coalesce`)
        self.coalescer = Coalescer(self)
        self.csts = 0
        #: controller generation: each controller reset bumps it, and work fetched under an
        #: older one posts nothing
        self.gen = 0
        self._disable_pending = False
        #: worker threads (:mod:`.nvme_workers`)
        self.workers = Workers(self)
        self._paused = False
        # counters for SMART (workers and the inline path, under the lock)
        self.stats = {"read_bytes": 0, "write_bytes": 0, "reads": 0, "writes": 0,
                      "flushes": 0}
        self.power_cycles = 1
        self.created = time.monotonic()
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
        self.csts = 0 if not self.workers.busy else self.csts

    def _controller_reset(self) -> None:
        """CC.EN 1 -> 0: delete all queues, drop held commands. Lock held."""
        self.gen += 1
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.features = default_features(self.max_queues)
        self.temp_thresholds: dict[tuple[int, int], int] = {(0, 0): WARNING_TEMP}
        self.vector_config: dict[int, int] = {}
        self.io_sq_limit = self.max_queues
        self.io_cq_limit = self.max_queues
        #: CIDs of held Asynchronous Event Requests, and events waiting for one
        self.held_aers: list[int] = []
        self.pending_events: deque[int] = deque(maxlen=8)
        #: completions of held commands to post
        self.held_posts: list[HeldPost] = []
        self.coalescer.drop()
        self.coalescer.configure(self.features[Feature.INTERRUPT_COALESCING])
        if self.doorbells is not None:
            self.doorbells.clear()
        self._shutdown_pending = False
        self._msi_pending = False
        if self._intx_level:
            self.set_intx(False)
        if self.workers.busy:
            # The worker is moving data for the old queues; RDY drops when it is done.
            self._disable_pending = True
        else:
            self._disable_pending = False
            self.csts &= ~(CSTS_RDY | CSTS_CFS | CSTS_SHST_MASK)

    def fatal(self, gen: int) -> None:
        """Controller Fatal Status, for a queue the controller cannot reach (any thread)."""
        with self.lock:
            if gen == self.gen:
                self.csts |= CSTS_CFS

    def close(self) -> None:
        """Stop the worker, make the namespace durable and close the backing file."""
        if self.doorbells is not None:
            self.doorbells.close()
        self.workers.stop()
        self.coalescer.stop()
        if self.backend.fd >= 0:
            self._sync("close")
        self.backend.close()

    def _sync(self, why: str) -> None:
        try:
            self.backend.sync()
        except OSError as exc:
            log.error("nvme: sync at %s failed: %s", why, exc)

    # --- connection ---------------------------------------------------------------------------
    def on_connect(self) -> None:
        with self.lock:
            self.workers.start()
            if self.doorbells is not None:
                self.doorbells.start()

    def on_disconnect(self) -> None:
        # The worker finishes the batch it fetched, then every write that returned is made
        # durable: a client that leaves (QEMU killed, or the server stopping on SIGTERM)
        # loses nothing the controller wrote.
        if self.doorbells is not None:
            self.doorbells.stop()
        self.workers.stop()
        self.coalescer.stop()
        self._sync("disconnect")
        with self.lock:
            # Queues point into memory that is gone: back to power-on state.
            self.reset()
            self.csts = 0

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no worker is in a batch: every command fetched is completed and its
        interrupt signalled. False if it was still busy after ``timeout`` seconds."""
        with self.lock:
            return self.cond.wait_for(lambda: not self.workers.busy, timeout)

    # --- device state (docs/state.md; the rule is in nvme_state's docstring) ----------------------
    def quiesce(self) -> None:
        """Start no batch and run nothing inline; wait for the batch in progress."""
        with self.lock:
            self._paused = True
            if not self.cond.wait_for(lambda: not self.workers.busy, JOIN_TIMEOUT):
                raise StateError("nvme: the worker did not finish its batch in time")
            self.coalescer.flush()  # no held interrupt stays behind in a saved state

    def resume(self) -> None:
        with self.lock:
            self._paused = False
            self.workers.wake()

    @property
    def queue_state(self) -> dict[str, Any]:
        return queue_state(self)

    @queue_state.setter
    def queue_state(self, value: Any) -> None:
        set_queue_state(self, value)

    @property
    def temperature_thresholds(self) -> list[StateValue]:
        return [[sel, th, value] for (sel, th), value in self.temp_thresholds.items()]

    @temperature_thresholds.setter
    def temperature_thresholds(self, value: Any) -> None:
        assert isinstance(value, list)
        self.temp_thresholds = {(t[0], t[1]): t[2] for t in value}

    def check_state(self, fields: Mapping[str, Any]) -> None:
        check_state(self, fields)

    def state_loaded(self) -> None:
        self.gen += 1
        self._disable_pending = False
        self.nguid, self.eui64, self.uuid = namespace_ids(self.serial)
        if self.doorbells is not None:
            self.doorbells.load()
        self.coalescer.drop()
        self.coalescer.configure(self.features[Feature.INTERRUPT_COALESCING])
        self.workers.wake()

    def bar_layout(self) -> Mapping[int, Bar]:
        if not self.polled_doorbells:
            return self.bars
        return {**self.bars, 0: bar0(self.bars[0].size)}

    def state_lost(self, reason: str) -> None:
        """A reload could not carry the controller's state: Controller Fatal Status. The
        guest's driver sees CSTS.CFS when a command times out and resets the controller."""
        del reason
        self.csts |= CSTS_CFS

    # --- registers ----------------------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar != 0 or offset >= DOORBELL_BASE:
            return 0
        if size == 8:
            return self._reg32(offset & ~3) | self._reg32((offset & ~3) + 4) << 32
        value = self._reg32(offset & ~3) >> 8 * (offset & 3)
        return value & ((1 << 8 * size) - 1)

    def _reg32(self, offset: int) -> int:
        if offset in (REG_INTMS, REG_INTMC):
            return self.intms
        for reg, value in ((REG_CAP, self.cap), (REG_ASQ, self.asq), (REG_ACQ, self.acq)):
            if reg <= offset < reg + 8:  # 64-bit registers, by halves
                return (value >> 8 * (offset - reg)) & 0xFFFFFFFF
        if offset == REG_VS:
            return VERSION_1_4
        if offset == REG_CC:
            return self.cc
        if offset == REG_CSTS:
            return self.csts
        return self.aqa if offset == REG_AQA else 0

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != 0:
            return
        if size == 4 and offset >= DOORBELL_BASE:  # the hot path: two doorbells per command
            if not offset & 3:
                self._doorbell(offset, value)
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
            self.aqa = value & AQA_WRITABLE
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
            self.workers.wake()
        elif not shn and old_shn and not self._shutdown_pending:
            self._set_shst(0)

    def _set_shst(self, value: int) -> None:
        self.csts = (self.csts & ~CSTS_SHST_MASK) | value << CSTS_SHST_SHIFT

    def _enable(self) -> None:
        cc = self.cc
        asqs, acqs = aqa_sizes(self.aqa)
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
        cq = CompletionQueue(0, self.acq, acqs, 0, True)
        sq = SubmissionQueue(0, self.asq, asqs, 0)
        cq.sqids.add(0)
        self.cqs[0] = cq
        self.sqs[0] = sq
        self.csts = (self.csts & ~(CSTS_CFS | CSTS_SHST_MASK)) | CSTS_RDY
        log.debug("nvme: enabled, admin SQ %#x/%d CQ %#x/%d", self.asq, asqs, self.acq, acqs)

    @property
    def ready(self) -> bool:
        return bool(self.csts & CSTS_RDY) and not self._disable_pending

    # --- doorbells (loop thread, lock held) -----------------------------------------------------
    def _doorbell(self, offset: int, value: int) -> None:
        if not self.ready:
            return
        qid, is_cq = doorbell_queue(offset)
        value &= 0xFFFFFFFF
        if is_cq:
            cq = self.cqs.get(qid)
            if cq is None:
                self._async_error(AER_INFO_INVALID_DOORBELL_REGISTER)
                return
            size = cq.size
            used = (cq.tail - cq.head) % size
            if value >= size or (value - cq.head) % size > used:
                self._async_error(AER_INFO_INVALID_DOORBELL_VALUE)
                return
            was_full = used >= size - 1 - cq.reserved  # no room: a worker may wait for some
            cq.head = value
            if was_full:
                self.workers.wake()
            if self._intx_level and value == cq.tail:
                # the host consumed every entry: the line may go low. A line that is low
                # stays low (a head doorbell only takes entries away), so with MSI-X or MSI
                # (the line is never raised) the doorbell costs no interrupt decision.
                self.update_intx()
        else:
            sq = self.sqs.get(qid)
            if sq is None:
                self._async_error(AER_INFO_INVALID_DOORBELL_REGISTER)
                return
            if value >= sq.size:
                self._async_error(AER_INFO_INVALID_DOORBELL_VALUE)
                return
            sq.tail = value
            # a batch in progress on this SQ takes the new entries when it ends
            if not sq.busy and (qid == 0 or self._paused or not self.datapath.inline(sq)):
                self.workers.wake()

    def _async_error(self, info: int) -> None:
        log.warning("nvme: invalid doorbell write (%s)",
                    "no such queue" if info == AER_INFO_INVALID_DOORBELL_REGISTER else "value")
        self._async_event(aer_result(AER_TYPE_ERROR, info, LogPage.ERROR))

    def _async_event(self, result: int) -> None:
        """Complete a held Asynchronous Event Request, or keep the event for the next one."""
        if self.held_aers:
            self.held_posts.append((0, 0, self.held_aers.pop(0), 0, result))
            self.workers.wake()
        else:
            self.pending_events.append(result)

    # --- interrupts (lock held) -------------------------------------------------------------------
    def signal(self, cq: CompletionQueue, n: int = 1) -> None:
        """Interrupt for ``n`` new entries in ``cq``, unless coalescing holds it (``n`` 0: the
        coalescer's own, for entries it held)."""
        if not cq.ien:
            return
        co = self.coalescer
        if co.threshold and cq.qid and n and co.hold(cq.iv, n):
            return
        if co.held:
            co.held.pop(cq.iv, None)  # this interrupt covers what the vector held
        msix, msi = self.msix, self.msi
        if msix is not None and msix.enabled:
            self.irqs.trigger(IrqIndex.MSIX, cq.iv if cq.iv < self.msix_vectors else 0)
        elif msi is not None and msi.enabled:
            if self.intms & INTMS_VECTOR0:
                self._msi_pending = True
            else:
                self.irqs.trigger(IrqIndex.MSI, 0)
        elif not self._intx_level and not self.intms & INTMS_VECTOR0 and cq.used():
            # update_intx() for a CQ that just got entries: no MSI on (checked above), so the
            # line goes high unless masked (a mask write already lowered it)
            self.set_intx(True)

    def signal_vector(self, iv: int) -> None:
        """The held interrupt of vector ``iv`` (:mod:`.nvme_coalesce`), if an I/O CQ on it
        still holds entries the host has not consumed."""
        for cq in self.cqs.values():
            if cq.iv == iv and cq.qid and cq.ien and cq.used():
                self.signal(cq, 0)
                return

    def _update_interrupts(self) -> None:
        if (self._msi_pending and not self.intms & INTMS_VECTOR0 and self.msi is not None
                and self.msi.enabled):
            self._msi_pending = False
            self.irqs.trigger(IrqIndex.MSI, 0)
        self.update_intx()

    def update_intx(self) -> None:
        """INTx level: asserted while an interrupting CQ holds entries, unless masked."""
        # cheapest first: the MSI and MSI-X states are config-space reads
        level = (not self.intms & INTMS_VECTOR0
                 and any(cq.ien and cq.tail != cq.head for cq in self.cqs.values())
                 and not (self.msix is not None and self.msix.enabled)
                 and not (self.msi is not None and self.msi.enabled))
        if level != self._intx_level:
            self.set_intx(level)

    # --- worker -----------------------------------------------------------------------------------
    def jobs_done(self) -> None:
        """The last job in progress ended: a controller reset waiting for it completes."""
        if self._disable_pending:
            self._disable_pending = False
            self.csts &= ~(CSTS_RDY | CSTS_CFS | CSTS_SHST_MASK)
            if self._shutdown_pending:
                self._set_shst(SHST_OCCURRING)
            if self.cc & CC_EN:
                self._enable()

    def work_waiting(self) -> bool:
        """Would a worker find a job (lock held)?"""
        return self._shutdown_pending or bool(self.held_posts) or self.datapath.has_job()

    def next_job(self) -> Callable[[], None] | None:
        """A worker's next job, None while paused (lock held)."""
        if self._paused:
            return None
        if self._shutdown_pending:
            self._shutdown_pending = False
            return self._do_shutdown
        return self.datapath.next_job()

    def _do_shutdown(self) -> None:
        self._sync("shutdown")
        with self.lock:
            if (self.cc >> CC_SHN_SHIFT) & CC_SHN_MASK:
                self._set_shst(SHST_COMPLETE)
                log.info("nvme: shutdown complete")
