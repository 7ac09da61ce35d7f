"""The NVMe controller's worker threads (:mod:`vfio_user_devices.nvme`).

Workers run what the loop thread must not: admin commands, Flush, FUA writes, message DMA,
reads that would wait for the disk, and the commands of doorbells that arrive while a batch of
their SQ is in progress. A worker takes one job at a time from the controller
(``NvmeController.next_job``: a batch of one SQ's entries, held completions, a shutdown), with
the controller's lock held only to take it and to end it.

There is one worker to begin with, and one more whenever work waits while every worker is in a
job, up to one per submission queue: a batch that waits for the disk (a ``preadv`` on a slow
file) then holds up its own queue only, while the other queues' batches run on other workers,
and their plain reads and writes on the loop thread (an SQ is never in two batches or in a
batch and an inline run at once: ``SubmissionQueue.busy``). Workers stay until the client
leaves. All of them wait on the controller's condition.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .nvme import NvmeController

__all__ = ["JOIN_TIMEOUT", "Workers"]

log = logging.getLogger("vfio_user_devices.nvme")

#: How long stopping waits for each worker's job in progress.
JOIN_TIMEOUT = 10.0


class Workers:
    """The worker threads of one controller (see the module docstring)."""

    def __init__(self, ctrl: NvmeController) -> None:
        self._ctrl = ctrl
        self._threads: list[threading.Thread] = []
        #: workers waiting for a job
        self.idle = 0
        #: jobs in progress
        self.busy = 0
        self._stop = False

    @property
    def count(self) -> int:
        return len(self._threads)

    def start(self) -> None:
        """The client connected: one worker, unless some are still there (lock held)."""
        self._threads = [t for t in self._threads if t.is_alive()]
        self._stop = False
        if not self._threads:
            self._spawn()

    def stop(self) -> None:
        """End every worker after its job in progress (lock not held)."""
        ctrl = self._ctrl
        with ctrl.lock:
            self._stop = True
            ctrl.cond.notify_all()
            threads, self._threads = self._threads, []
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(JOIN_TIMEOUT)

    def wake(self) -> None:
        """There is work for a worker (lock held)."""
        self._ctrl.cond.notify_all()
        self._more()

    def _more(self) -> None:
        """Work waits and every worker is in a job: one more worker, at most one per SQ."""
        ctrl = self._ctrl
        if (not self.idle and self._threads and not self._stop
                and len(self._threads) < len(ctrl.sqs) and ctrl.work_waiting()):
            self._spawn()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._run, daemon=True,
                                  name=f"nvme-{self._ctrl.serial}-{len(self._threads)}")
        self._threads.append(thread)
        thread.start()

    def _run(self) -> None:
        ctrl = self._ctrl
        while True:
            with ctrl.lock:
                job = None
                self.idle += 1
                while not self._stop:
                    job = ctrl.next_job()
                    if job is not None:
                        break
                    ctrl.cond.wait()
                self.idle -= 1
                if job is None:
                    return
                self.busy += 1
                self._more()
            try:
                job()
            except Exception:
                log.exception("nvme: worker job failed")
            finally:
                with ctrl.lock:
                    self.busy -= 1
                    if not self.busy:
                        ctrl.jobs_done()
                    ctrl.cond.notify_all()
