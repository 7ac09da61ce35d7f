"""Interrupt Coalescing for the NVMe controller (:mod:`vfio_user_devices.nvme`).

Set Features 08h (Interrupt Coalescing) gives an Aggregation Threshold (THR, bits 7:0, 0's
based: the number of completion entries to aggregate per interrupt vector) and an Aggregation
Time (TIME, bits 15:8, in 100 us units: the longest the controller may delay an interrupt for
it). The controller signals a vector when either is met; THR or TIME 0 turns coalescing off
(THR 0 aggregates one entry, which is no coalescing). Set Features 09h (Interrupt Vector
Configuration) sets Coalescing Disable (CD, bit 16) per vector. The Admin Completion Queue is
never coalesced.

:class:`Coalescer` applies both. A completion queue's interrupt (``NvmeController.signal``)
asks :meth:`Coalescer.hold` first: the entries are counted against their vector, and the
interrupt is held unless that reaches the threshold. The first held entry of a vector sets its
deadline (now + TIME); a timer thread, started when coalescing is first turned on and idle
(blocked on a condition, no polling) while nothing is held, signals every vector whose
deadline has come. An interrupt is therefore never held longer than TIME (plus the time to
take the controller's lock), and never lost: an interrupt for a vector for any other reason
(the admin CQ on vector 0, a threshold reached) covers what was held on it, a change of 08h
or 09h that ends coalescing for a vector signals what it held, and so does a quiesce (before
a state is saved) and a controller reset drops it with the queues.

Every method runs with the controller's lock held, except :meth:`stop` and :meth:`poke`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .nvme_spec import IVC_CD

if TYPE_CHECKING:
    from .nvme import NvmeController

__all__ = ["TIME_UNIT", "Coalescer", "coalescing_settings"]

log = logging.getLogger("vfio_user_devices.nvme")

#: The Aggregation Time's unit, in seconds.
TIME_UNIT = 100e-6


def coalescing_settings(value: int) -> tuple[int, float]:
    """Feature 08h's value as (entries per interrupt, seconds); (0, 0.0) when it is off."""
    thr, units = value & 0xFF, (value >> 8) & 0xFF
    if thr == 0 or units == 0:
        return 0, 0.0
    return thr + 1, units * TIME_UNIT


class Coalescer:
    """Held interrupts per vector and the timer that ends them (see the module docstring)."""

    def __init__(self, ctrl: NvmeController,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ctrl = ctrl
        #: the time source of the deadlines (tests replace it)
        self.clock = clock
        #: entries per interrupt; 0 when coalescing is off
        self.threshold = 0
        self.delay = 0.0
        #: vector -> [entries held, deadline]
        self.held: dict[int, list[float]] = {}
        self._cond = threading.Condition(ctrl.lock)
        self._timer: threading.Thread | None = None
        self._stop = False
        #: interrupts the timer signalled (tests, benchmarks)
        self.timeouts = 0

    def configure(self, value: int) -> None:
        """Apply feature 08h's ``value`` (Set Features, a controller reset, a state load)."""
        self.threshold, self.delay = coalescing_settings(value)
        if not self.threshold:
            self.flush()
            return
        for held in self.held.values():  # a shorter time applies to what is held now
            held[1] = min(held[1], self.clock() + self.delay)
        if self._timer is None or not self._timer.is_alive():
            self._stop = False
            self._timer = threading.Thread(target=self._run, daemon=True,
                                           name=f"nvme-coalesce-{self._ctrl.serial}")
            self._timer.start()
        self._cond.notify()

    def vector_configured(self, iv: int) -> None:
        """Feature 09h changed for vector ``iv``: with CD set, signal what it held."""
        if self._ctrl.vector_config.get(iv, 0) & IVC_CD:
            self.flush(iv)

    def hold(self, iv: int, n: int) -> bool:
        """``n`` new entries for an I/O CQ on vector ``iv``: True if its interrupt waits."""
        if self._ctrl.vector_config.get(iv, 0) & IVC_CD:
            return False
        held = self.held.get(iv)
        if held is None:
            if n >= self.threshold:
                return False
            self.held[iv] = [n, self.clock() + self.delay]
            self._cond.notify()
            return True
        held[0] += n
        if held[0] >= self.threshold:
            del self.held[iv]
            return False
        return True

    def flush(self, iv: int | None = None) -> None:
        """Signal now what is held on vector ``iv`` (or on every vector)."""
        for vector in ([iv] if iv is not None else list(self.held)):
            if self.held.pop(vector, None) is not None:
                self._ctrl.signal_vector(vector)

    def drop(self) -> None:
        """Forget what is held (a controller reset: the queues are gone)."""
        self.held.clear()

    def poke(self) -> None:
        """Have the timer look at the deadlines again (tests that move :attr:`clock`)."""
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        """End the timer thread (the client left, or the controller is closed); lock not held."""
        with self._cond:
            self._stop = True
            self._cond.notify()
            timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.join()

    def _run(self) -> None:
        with self._cond:
            while not self._stop:
                if not self.held:
                    self._cond.wait()
                    continue
                now = self.clock()
                due = [iv for iv, (_, deadline) in self.held.items() if deadline <= now]
                if not due:
                    self._cond.wait(min(d for _, d in self.held.values()) - now)
                    continue
                for iv in due:
                    del self.held[iv]
                    self.timeouts += 1
                    try:
                        self._ctrl.signal_vector(iv)
                    except Exception:
                        log.exception("nvme: coalesced interrupt on vector %d failed", iv)
