"""NVMe doorbells in mapped memory, polled by the controller (``--polled-doorbells``), as SPDK's
vfio-user NVMe target does.

BAR0's doorbell page (0x1000..0x1fff) becomes a mapped area (:mod:`vfio_user_server.mapped`):
QEMU maps it into the guest, so the driver's doorbell writes are plain stores that never leave
the vCPU. An :class:`~vfio_user_server.mapped.AreaWatcher` thread polls the doorbells of the
queues the controller offers (the C shim waits without the GIL) and hands each changed value to
the controller's doorbell handler, with its lock held, exactly as a trapped write would: on
this thread a tail doorbell whose SQ has no batch in progress runs the inline path here.

What differs from trapped doorbells:

* a doorbell is a value, not an event: two writes of the same value look like one, which the
  queue rules make harmless (a tail cannot come back to the value the controller last saw
  without the controller consuming entries in between);
* the controller keeps the page consistent with its queues: a queue's doorbell reads 0 when the
  queue is created and every doorbell does after a controller reset (the driver counts from 0);
  a state load writes the loaded queues' values;
* a store to the doorbell of a queue that does not exist is ignored (a trapped one raises the
  "invalid doorbell register" asynchronous event);
* QEMU posts no writes to the device any more (every register write waits for its reply), and
  the watcher thread takes CPU from the vCPU on a small host (BENCHMARKS.md, "Sparse-mmap
  registers").
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vfio_user_server.mapped import MappedBar, PolledArea
from vfio_user_server.pci import Bar

from .nvme_spec import DOORBELL_BASE

if TYPE_CHECKING:
    from .nvme import NvmeController

__all__ = ["DOORBELL_PAGE", "PolledDoorbells", "bar0"]

#: The doorbell page of BAR0, mapped into the guest.
DOORBELL_PAGE = 0x1000
_CELL = struct.Struct("<I")


def bar0(size: int) -> Bar:
    """BAR0 with the doorbell page mapped."""
    return Bar(size, kind="mem64", mapped=((DOORBELL_BASE, DOORBELL_PAGE),))


class PolledDoorbells(PolledArea):
    """The doorbell page of one controller and the thread that polls it."""

    def __init__(self, ctrl: NvmeController, mem: MappedBar) -> None:
        self._ctrl = ctrl
        #: SQ tail and CQ head of queues 0..max_queues, 4 bytes each
        length = (ctrl.max_queues + 1) * 8
        self._fmt = struct.Struct(f"<{length // 4}I")
        super().__init__(mem, DOORBELL_BASE, length, name=f"nvme-doorbells-{ctrl.serial}")

    def clear(self, qid: int | None = None, is_cq: bool = False) -> None:
        """Zero one queue's doorbell (``qid``), or all of them (lock held)."""
        if qid is None:
            self.mem.fill(DOORBELL_BASE, self.length)
        elif qid <= self._ctrl.max_queues:
            self.mem.set_u32(DOORBELL_BASE + 8 * qid + (4 if is_cq else 0), 0)

    def load(self) -> None:
        """Write the queues' current values (after a state load; lock held)."""
        self.clear()
        for qid, sq in self._ctrl.sqs.items():
            self.mem.set_u32(DOORBELL_BASE + 8 * qid, sq.tail)
        for qid, cq in self._ctrl.cqs.items():
            self.mem.set_u32(DOORBELL_BASE + 8 * qid + 4, cq.head)

    def changed(self, before: bytes, after: bytes) -> bytes:
        """Watcher thread: ring every doorbell whose value differs from its queue's (CQ heads
        first: they make room for the completions of new submissions). The page is read
        again under the lock and compared with the queues, not with the watcher's snapshots,
        so a reset, a queue creation or a state load in between is never undone."""
        del before, after
        ctrl = self._ctrl
        with ctrl.lock:
            now = self._fmt.unpack_from(self.mem.view, DOORBELL_BASE)
            for i in (*range(1, len(now), 2), *range(0, len(now), 2)):
                if i & 1:
                    cq = ctrl.cqs.get(i >> 1)
                    if cq is not None and now[i] != cq.head:
                        ctrl._doorbell(DOORBELL_BASE + 4 * i, now[i])
                else:
                    sq = ctrl.sqs.get(i >> 1)
                    if sq is not None and now[i] != sq.tail:
                        ctrl._doorbell(DOORBELL_BASE + 4 * i, now[i])
            return self._fmt.pack(*now)
