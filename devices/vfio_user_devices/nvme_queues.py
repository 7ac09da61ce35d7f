"""The NVMe controller's queues and data path (:mod:`vfio_user_devices.nvme`).

:class:`DataPath` fetches submission queue entries, runs them (admin commands through
:class:`~vfio_user_devices.nvme_admin.AdminCommands`, I/O through
:class:`~vfio_user_devices.nvme_io.IoCommands`), posts their completions and signals the
completion queue's interrupt. It runs in batches on the controller's worker threads
(:meth:`DataPath.process`, one batch per SQ at a time, several SQs at once), or inline on the
loop thread for a doorbell whose SQ has no batch in progress (:meth:`DataPath.inline`): there
a command that needs a worker comes back as :attr:`~vfio_user_devices.nvme_io.Worker.NEEDED`,
which ends the inline run before any side effect of that command, and a worker takes it and
the rest in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vfio_user_server.dma import DmaWindow
from vfio_user_server.errors import DmaError

from .nvme_io import GuestData, IoCommands, Worker
from .nvme_spec import (
    CQE,
    CQE_SIZE,
    SQE,
    SQE_CID,
    SQE_OPCODE,
    SQE_SIZE,
    STATUS_DNR,
    Feature,
    NvmeError,
    SqeTuple,
    Status,
)

if TYPE_CHECKING:
    from .nvme import NvmeController
    from .nvme_admin import AdminCommands

__all__ = ["BATCH", "INLINE_MAX", "Completion", "CompletionQueue", "DataPath", "HeldPost",
           "SubmissionQueue"]

log = logging.getLogger("vfio_user_devices.nvme")

#: At most this many commands are executed inline, on the loop thread, per SQ doorbell.
INLINE_MAX = 16
#: Submission queue entries handled per batch before other queues get their turn.
BATCH = 256

#: cid, status field, completion dword 0
Completion = tuple[int, int, int]
#: a completion to post later (held commands): cqid, sqid, cid, status field, dw0
HeldPost = tuple[int, int, int, int, int]


class SubmissionQueue:
    __slots__ = ("base", "busy", "cqid", "head", "qid", "size", "tail")

    def __init__(self, qid: int, base: int, size: int, cqid: int) -> None:
        self.qid = qid
        self.base = base
        self.size = size
        self.cqid = cqid
        self.head = 0
        self.tail = 0
        #: a worker's batch holds entries of this SQ (no other batch or inline run takes it)
        self.busy = False

    def pending(self) -> int:
        """Entries the host submitted that the controller has not fetched."""
        return (self.tail - self.head) % self.size


class CompletionQueue:
    __slots__ = ("base", "head", "ien", "iv", "phase", "qid", "reserved", "size", "sqids",
                 "tail")

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
        #: entries promised to workers' batches in progress (their commands' completions)
        self.reserved = 0

    def used(self) -> int:
        return (self.tail - self.head) % self.size

    def free(self) -> int:
        return self.size - 1 - self.used() - self.reserved


class DataPath:
    """Submission to completion for one controller (see the module docstring)."""

    def __init__(self, ctrl: NvmeController, guest: GuestData, admin: AdminCommands,
                 io: IoCommands) -> None:
        self._ctrl = ctrl
        self._guest = guest
        self._admin = admin
        self._io = io
        self._rr = 0

    def next_job(self) -> Callable[[], None] | None:
        """The worker's next batch: held completions, then SQs round robin (lock held)."""
        ctrl = self._ctrl
        if ctrl.held_posts and 0 in ctrl.cqs and ctrl.cqs[0].free():
            posts, ctrl.held_posts = ctrl.held_posts, []
            gen = ctrl.gen
            return lambda: self.post_held(posts, gen)
        if not ctrl.ready:
            return None
        sq = self._next_sq(True)
        if sq is None:
            return None
        cq = ctrl.cqs[sq.cqid]
        n = min(sq.pending(), cq.free(), BATCH)
        # The SQ is this batch's until it ends, and the CQ keeps room for its completions:
        # other workers' batches and inline runs of other SQs go on meanwhile.
        sq.busy = True
        cq.reserved += n
        gen, qid, base, head, size = ctrl.gen, sq.qid, sq.base, sq.head, sq.size

        def job() -> None:
            try:
                self.process(gen, qid, base, head, size, n)
            finally:
                with ctrl.lock:
                    sq.busy = False
                    cq.reserved -= n

        return job

    def _next_sq(self, take: bool) -> SubmissionQueue | None:
        """The next SQ round robin with entries to fetch, no batch in progress and room in
        its CQ (a full CQ waits for its head doorbell); ``take`` moves the turn past it."""
        ctrl = self._ctrl
        qids = list(ctrl.sqs)
        for i in range(len(qids)):
            sq = ctrl.sqs[qids[(self._rr + i) % len(qids)]]
            if sq.busy or sq.tail == sq.head or ctrl.cqs[sq.cqid].free() <= 0:
                continue
            if take:
                self._rr = (self._rr + i + 1) % len(qids)
            return sq
        return None

    def has_job(self) -> bool:
        """Would :meth:`next_job` find a batch to start (lock held)?"""
        return self._ctrl.ready and self._next_sq(False) is not None

    def inline(self, sq: SubmissionQueue) -> bool:
        """Execute up to :data:`INLINE_MAX` new I/O commands of ``sq`` here, on the loop thread.

        Called with the lock held while no batch of this SQ is in progress (workers may be
        in batches of other SQs: their CQ room is reserved, see :meth:`next_job`).
        Only plain reads and writes whose SQ entries, CQ, PRP lists and data are all in
        fd-backed (directly mapped) guest memory run here: everything else (message DMA,
        fsyncs, other opcodes) stops the inline run before its first side effect and is left
        to the worker, in order. True if the SQ has nothing left for the worker.
        """
        ctrl = self._ctrl
        cq = ctrl.cqs.get(sq.cqid)
        if cq is None:
            return False
        size, head = sq.size, sq.head
        n = min(sq.pending(), cq.free(), INLINE_MAX)
        if n <= 0:
            return False
        sqw = self._guest.window(sq.base, size * SQE_SIZE, False)
        cqw = self._guest.window(cq.base, cq.size * CQE_SIZE, True)
        if sqw is not None and cqw is not None:
            return self._inline_windows(sq, cq, n, sqw, cqw)
        if not self._guest.in_one_direct_map(cq.base, cq.size * CQE_SIZE):
            return False
        first = min(n, size - head)
        pieces = [(sq.base + head * SQE_SIZE, first * SQE_SIZE)]
        if first < n:
            pieces.append((sq.base, (n - first) * SQE_SIZE))
        raw = self._guest.direct_read(pieces)
        if raw is None:
            return False  # message DMA (or a fault the worker reports)
        gen, qid = ctrl.gen, sq.qid
        write_cache = bool(ctrl.features[Feature.VOLATILE_WRITE_CACHE])
        inline_ok, execute = self._io.inline_ok, self.execute
        done: list[Completion] = []
        for i in range(n):
            cmd: SqeTuple = SQE.unpack_from(raw, i * SQE_SIZE)
            if not inline_ok(cmd, write_cache):
                break
            entry = execute(cmd, qid, gen, inline=True)
            if entry is Worker.NEEDED:
                break
            if entry is not None:
                done.append(entry)
        if done:
            self.complete(gen, qid, (head + len(done)) % size, done)
        return sq.head == sq.tail

    def _inline_windows(self, sq: SubmissionQueue, cq: CompletionQueue, n: int,
                        sqw: DmaWindow, cqw: DmaWindow) -> bool:
        """:meth:`inline` with both rings in zero-copy windows: entries are unpacked from the
        SQ and completions packed into the CQ in place (no copy of the ring, no per-command
        translation or list), and the interrupt is signalled once for the run."""
        ctrl = self._ctrl
        gen, qid, size, head = ctrl.gen, sq.qid, sq.size, sq.head
        write_cache = bool(ctrl.features[Feature.VOLATILE_WRITE_CACHE])
        inline_ok, execute, unpack, pack = self._io.inline_ok, self.execute, SQE.unpack_from, \
            CQE.pack_into
        sq_mm, sq_at = sqw.mm, sq.base + sqw.delta
        cq_mm, cq_at = cqw.mm, cq.base + cqw.delta
        tail, phase, cq_size = cq.tail, cq.phase, cq.size
        posted = 0
        try:
            for _ in range(n):
                cmd: SqeTuple = unpack(sq_mm, sq_at + head * SQE_SIZE)
                if not inline_ok(cmd, write_cache):
                    break
                entry = execute(cmd, qid, gen, inline=True)
                if entry is Worker.NEEDED:
                    break
                head = head + 1 if head + 1 < size else 0
                if entry is not None:
                    cid, status, dw0 = entry
                    # one store per entry: its phase bit is never seen before the rest of it
                    pack(cq_mm, cq_at + tail * CQE_SIZE, dw0, 0, head, qid, cid,
                         phase | status << 1)
                    posted += 1
                    tail += 1
                    if tail == cq_size:
                        tail = 0
                        phase ^= 1
        except ValueError:
            # The mmap was closed: not possible while the loop thread runs this (unmaps are
            # handled on it), but if it happens the worker goes the translated way and reports.
            log.warning("nvme: SQ %d: guest memory window closed during an inline run", qid)
        sq.head = head
        cq.tail, cq.phase = tail, phase
        if posted:
            ctrl.signal(cq, posted)
        return sq.head == sq.tail

    def process(self, gen: int, qid: int, base: int, head: int, size: int, n: int) -> None:
        """Fetch ``n`` entries of SQ ``qid`` from ``head``, execute them, post completions."""
        ctrl = self._ctrl
        first = min(n, size - head)
        try:
            raw = ctrl.dma.read(base + head * SQE_SIZE, first * SQE_SIZE)
            if first < n:
                raw += ctrl.dma.read(base, (n - first) * SQE_SIZE)
        except DmaError as exc:
            log.error("nvme: cannot fetch SQ %d entries: %s", qid, exc)
            ctrl.fatal(gen)
            return
        done: list[Completion] = []
        for i in range(n):
            entry = self.execute(SQE.unpack_from(raw, i * SQE_SIZE), qid, gen)
            if isinstance(entry, tuple):
                done.append(entry)
        self.complete(gen, qid, (head + n) % size, done, own=n)

    def execute(self, cmd: SqeTuple, qid: int, gen: int,
                inline: bool = False) -> Completion | Worker | None:
        """Run one command: its completion, None for a held one (AER), or
        :attr:`Worker.NEEDED` (``inline`` only) for one the worker must run."""
        try:
            result = self._admin.run(cmd, gen) if qid == 0 else self._io.run(cmd, inline)
        except NvmeError as exc:
            log.debug("nvme: SQ %d opcode %#x cid %d: %s", qid, cmd[SQE_OPCODE], cmd[SQE_CID],
                      exc)
            self._ctrl.errors.append((time.monotonic(), qid, cmd[SQE_CID], exc.field))
            return (cmd[SQE_CID], exc.field, 0)
        except Exception:
            log.exception("nvme: SQ %d opcode %#x failed", qid, cmd[SQE_OPCODE])
            return (cmd[SQE_CID], Status.INTERNAL_ERROR | STATUS_DNR, 0)
        if result is None or isinstance(result, Worker):
            return result
        return (cmd[SQE_CID], 0, result)

    def post_held(self, posts: list[HeldPost], gen: int) -> None:
        """Post the completions of held commands (worker)."""
        ctrl = self._ctrl
        for cqid, sqid, cid, status, dw0 in posts:
            with ctrl.lock:
                sq = ctrl.sqs.get(sqid)
                head = sq.head if sq is not None else 0
            self.complete(gen, sqid, head, [(cid, status, dw0)], cqid=cqid)

    def complete(self, gen: int, sqid: int, sq_head: int, done: list[Completion],
                 cqid: int | None = None, own: int = 0) -> None:
        """Advance SQ ``sqid`` to ``sq_head``, post ``done`` to its CQ (or ``cqid``), signal.
        ``own``: the CQ entries the batch reserved (released when the batch ends)."""
        ctrl = self._ctrl
        with ctrl.lock:
            if gen != ctrl.gen:
                return
            sq = ctrl.sqs.get(sqid)
            if sq is not None and cqid is None:
                sq.head = sq_head
                cqid = sq.cqid
            cq = ctrl.cqs.get(cqid if cqid is not None else -1)
            if cq is None or not done:
                return
            room = cq.free() + own
            if len(done) > room:  # only held commands can overflow: keep them
                for cid, status, dw0 in done[room:]:
                    ctrl.held_posts.append((cq.qid, sqid, cid, status, dw0))
                done = done[:room]
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
            self._guest.write_entries(base, size, start, entries)
        except DmaError as exc:
            log.error("nvme: cannot post to CQ %d: %s", cq.qid, exc)
            ctrl.fatal(gen)
            return
        with ctrl.lock:
            if gen == ctrl.gen:
                ctrl.signal(cq, len(done))
