"""Interrupt state over eventfds: INTx (automasked, resample), MSI, MSI-X, ERR and REQ.

:class:`IrqController` answers ``DEVICE_GET_IRQ_INFO`` (:meth:`~IrqController.info`), applies
``DEVICE_SET_IRQS`` exactly as VFIO does (:meth:`~IrqController.set_irqs`), and lets the device
raise interrupts from any thread (:meth:`~IrqController.trigger`,
:meth:`~IrqController.intx_assert`, :meth:`~IrqController.intx_deassert`).

A SET_IRQS request is checked once, whole, by
:func:`~vfio_user_server.irq_request.validate_set_irqs` (index, flags, the vector range against
the count IRQ_INFO advertises, the data for its type, the fds: how many, no duplicates, none
the controller holds already, each an eventfd). Only a request that passed is applied, by one
small applier per data type (NONE, BOOL, EVENTFD), as libvfio-user's ``lib/irq.c`` does: an
applier never has to undo anything.

It owns every eventfd it is given: fds are closed when replaced, de-assigned, when their index
is disabled, on :meth:`~IrqController.reset` and :meth:`~IrqController.close`, and every fd of
a rejected request is closed too.

INTx follows VFIO's level-triggered, automasked semantics: when the line is high, INTx is not
masked and COMMAND.INTX_DISABLE is clear, the trigger eventfd is written and INTx becomes
masked. An UNMASK (``SET_IRQS`` message, or a readable KVM resample fd) clears the mask and,
if the line is still high, fires and masks again. The resample fd is watched by the
controller's own thread (:meth:`~IrqController.start_watcher`).

MSI / MSI-X vectors can be masked by ``SET_IRQS`` MASK (recorded here) or by the device's own
capability (the ``is_masked`` callback). A masked vector that fires becomes pending
(``set_pending`` callback, for the PBA / MSI pending bits) and fires when unmasked
(:meth:`~IrqController.unmask` or :meth:`~IrqController.vector_unmasked`).

Callbacks (``is_masked``, ``set_pending``) run with the controller's lock held: they must be
quick and must not wait for a lock that another thread may hold while calling into the
controller (reading config space bytes without a lock is fine).

The IRQ constants are those of :mod:`vfio_user_server.protocol.constants`, re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .errors import DeviceDefinitionError, IrqError
from .fds import close_fd
from .irq_request import PlainRequests, SetIrqs, einval, validate_set_irqs
from .protocol.constants import IrqIndex, IrqInfoFlag, IrqSetFlag

__all__ = [
    "IrqController",
    "IrqIndex",
    "IrqInfoFlag",
    "IrqSetFlag",
    "IrqState",
]

log = logging.getLogger(__name__)


#: Most MSI vectors a function can have, and most MSI-X vectors.
MAX_MSI_VECTORS = 32
MAX_MSIX_VECTORS = 2048


@dataclass(frozen=True)
class IrqState:
    """A snapshot of one IRQ index, for tracing and tests."""

    index: IrqIndex
    count: int
    fds: tuple[int | None, ...]
    masked: tuple[bool, ...]
    pending: tuple[bool, ...]
    #: INTx only: the resample (unmask) eventfd, line level, COMMAND.INTX_DISABLE.
    resample_fd: int | None = None
    level: bool = False
    intx_disabled: bool = False


class _Vector:
    __slots__ = ("fd", "masked", "pending")

    def __init__(self) -> None:
        self.fd: int | None = None
        self.masked = False
        self.pending = False


_INDEXES = {int(i): i for i in IrqIndex}


def _signal(fd: int) -> bool:
    """Add 1 to an eventfd. A saturated counter (EAGAIN) is already signalled."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        return True
    except OSError as e:
        log.warning("writing IRQ eventfd %d: %s", fd, e)
        return False
    return True


class IrqController:
    """The interrupts of one PCI function. Thread-safe."""

    def __init__(
        self,
        *,
        intx: bool,
        msi_vectors: int,
        msix_vectors: int,
        err: bool = True,
        req: bool = True,
        is_masked: Callable[[int, int], bool] | None = None,
        set_pending: Callable[[int, int, bool], None] | None = None,
    ) -> None:
        if not 0 <= msi_vectors <= MAX_MSI_VECTORS:
            raise DeviceDefinitionError(f"MSI vector count {msi_vectors} not in 0..32")
        if not 0 <= msix_vectors <= MAX_MSIX_VECTORS:
            raise DeviceDefinitionError(f"MSI-X vector count {msix_vectors} not in 0..2048")
        #: Vectors per index: what IRQ_INFO advertises and all that SET_IRQS may address.
        self._counts: dict[IrqIndex, int] = {
            IrqIndex.INTX: int(intx),
            IrqIndex.MSI: msi_vectors,
            IrqIndex.MSIX: msix_vectors,
            IrqIndex.ERR: int(err),
            IrqIndex.REQ: int(req),
        }
        self._vecs: dict[IrqIndex, list[_Vector]] = {
            i: [_Vector() for _ in range(n)] for i, n in self._counts.items()
        }
        self._lock = threading.RLock()
        self._level = False
        self._intx_disabled = False
        self._resample_fd: int | None = None
        #: ``is_masked(index, vector)``: the device's capability masks (MSI / MSI-X).
        self.is_masked = is_masked
        #: ``set_pending(index, vector, pending)``: reflect pending bits in the capability.
        self.set_pending = set_pending
        self._watcher = _ResampleWatcher(self)
        self._plain = PlainRequests(self._counts)

    # --------------------------------------------------------------------------- GET_IRQ_INFO

    @property
    def num_irqs(self) -> int:
        """Number of IRQ indices (DEVICE_GET_INFO ``num_irqs``)."""
        return len(IrqIndex)

    def _index(self, index: int) -> IrqIndex:
        idx = _INDEXES.get(index)  # a lookup, not Enum construction: every trigger comes here
        if idx is None:
            raise einval(f"no IRQ index {index}")
        return idx

    def info(self, index: int) -> tuple[int, IrqInfoFlag]:
        """``(count, flags)`` for DEVICE_GET_IRQ_INFO; IrqError EINVAL for unknown indices."""
        idx = self._index(index)
        count = self._counts[idx]
        if idx is IrqIndex.INTX:
            flags = IrqInfoFlag.EVENTFD | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED
        elif idx is IrqIndex.MSI:
            flags = IrqInfoFlag.EVENTFD | IrqInfoFlag.NORESIZE
        else:
            # MSI-X without NORESIZE: QEMU then assigns vectors one by one (notes 2.8).
            flags = IrqInfoFlag.EVENTFD
        return count, flags

    # ------------------------------------------------------------------------------- SET_IRQS

    def set_irqs(
        self,
        index: int,
        flags: int,
        start: int,
        count: int,
        fds: Sequence[int],
        data: bytes = b"",
    ) -> None:
        """Apply DEVICE_SET_IRQS with VFIO semantics; takes ownership of ``fds``.

        The request is validated whole (:func:`validate_set_irqs`, IrqError EINVAL), then
        applied by the applier of its data type. Every fd of ``fds`` the controller does not
        hold afterwards (all of them on error, except those it held before) is closed.
        """
        with self._lock:
            owned = self._owned_fds() if fds else set()
            try:
                req = (validate_set_irqs(index, flags, start, count, fds, data,
                                         vector_counts=self._counts, owned=owned)
                       if fds or data else self._plain.validate(index, flags, start, count))
                self._APPLIERS[req.data_type](self, req)
            finally:
                if fds:
                    owned = self._owned_fds()
                    for fd in set(fds):
                        if fd >= 0 and fd not in owned:
                            close_fd(fd, "IRQ fd")

    def check_plain(self, index: int, flags: int, start: int, count: int) -> None:
        """Validate a SET_IRQS without fds or data as :meth:`set_irqs` does; apply nothing."""
        self._plain.validate(index, flags, start, count)  # the vector counts never change

    # One applier per data type; each gets a request that passed validation.

    def _apply_none(self, req: SetIrqs) -> None:
        if req.count == 0:
            if req.action is IrqSetFlag.ACTION_TRIGGER:  # count 0, NONE|TRIGGER: disable
                self._disable_index(req.index)
            return
        self._act(req.index, req.action, req.vectors)

    def _apply_bool(self, req: SetIrqs) -> None:
        self._act(req.index, req.action,
                  [v for v, b in zip(req.vectors, req.bools, strict=True) if b])

    def _apply_eventfd(self, req: SetIrqs) -> None:
        for fd in req.fds:
            # A blocking eventfd would let the client hang us (a write at a full counter, a
            # read at zero, with the lock held). QEMU's are non-blocking already.
            if fd is not None and os.get_blocking(fd):
                os.set_blocking(fd, False)
        if req.action is IrqSetFlag.ACTION_TRIGGER:
            for v, fd in zip(req.vectors, req.fds, strict=True):
                self._assign(req.index, v, fd)
            if req.index is IrqIndex.INTX:
                self._intx_update()
        elif req.count:  # INTx UNMASK: the resample fd (validation allows nothing else)
            self._set_resample_fd(req.fds[0])

    _APPLIERS: dict[IrqSetFlag, Callable[[IrqController, SetIrqs], None]] = {
        IrqSetFlag.DATA_NONE: _apply_none,
        IrqSetFlag.DATA_BOOL: _apply_bool,
        IrqSetFlag.DATA_EVENTFD: _apply_eventfd,
    }

    def _act(self, idx: IrqIndex, action: IrqSetFlag, vectors: Sequence[int]) -> None:
        """NONE / BOOL actions on the selected vectors."""
        vecs = self._vecs[idx]
        if action is IrqSetFlag.ACTION_TRIGGER:
            # Loopback: fire the vectors in software, as VFIO does, whatever the masks.
            for v in vectors:
                fd = vecs[v].fd
                if fd is not None:
                    _signal(fd)
        elif action is IrqSetFlag.ACTION_MASK:
            for v in vectors:
                vecs[v].masked = True
        else:
            for v in vectors:
                self._unmask(idx, v)

    def _owned_fds(self) -> set[int]:
        owned = {v.fd for vecs in self._vecs.values() for v in vecs if v.fd is not None}
        if self._resample_fd is not None:
            owned.add(self._resample_fd)
        return owned

    def _assign(self, idx: IrqIndex, vector: int, fd: int | None) -> None:
        vec = self._vecs[idx][vector]
        old, vec.fd = vec.fd, fd
        if old is not None and old != fd:
            close_fd(old, "IRQ fd")

    def _set_resample_fd(self, fd: int | None) -> None:
        old, self._resample_fd = self._resample_fd, fd
        if old is not None and old != fd:
            close_fd(old, "IRQ fd")
        self._watcher.wake()

    def _disable_index(self, idx: IrqIndex) -> None:
        for v, vec in enumerate(self._vecs[idx]):
            close_fd(vec.fd, "IRQ fd")
            vec.fd = None
            vec.masked = False
            self._set_pending(idx, v, vec, False)
        if idx is IrqIndex.INTX:
            self._set_resample_fd(None)

    # ---------------------------------------------------------------------------- masking

    def _set_pending(self, idx: IrqIndex, vector: int, vec: _Vector, pending: bool) -> None:
        if vec.pending == pending:
            return
        vec.pending = pending
        if self.set_pending is not None and idx is not IrqIndex.INTX:
            self.set_pending(int(idx), vector, pending)

    def _masked(self, idx: IrqIndex, vector: int, vec: _Vector) -> bool:
        if vec.masked:
            return True
        if self.is_masked is not None and idx in (IrqIndex.MSI, IrqIndex.MSIX):
            return bool(self.is_masked(int(idx), vector))
        return False

    def _vector(self, index: int, vector: int) -> tuple[IrqIndex, _Vector]:
        idx = self._index(index)
        vecs = self._vecs[idx]
        if not 0 <= vector < len(vecs):
            raise einval(f"{idx.name} has no vector {vector}")
        return idx, vecs[vector]

    def _unmask(self, idx: IrqIndex, vector: int) -> None:
        vec = self._vecs[idx][vector]
        vec.masked = False
        if idx is IrqIndex.INTX:
            self._intx_update()
        else:
            self._deliver_pending(idx, vector, vec)

    def _deliver_pending(self, idx: IrqIndex, vector: int, vec: _Vector) -> None:
        if not vec.pending or self._masked(idx, vector, vec):
            return
        self._set_pending(idx, vector, vec, False)
        if vec.fd is not None:
            _signal(vec.fd)
        else:
            log.debug("%s vector %d: pending interrupt dropped (no eventfd)", idx.name, vector)

    def mask(self, index: int, vector: int) -> None:
        """Mask a vector (as SET_IRQS NONE|MASK for one vector)."""
        with self._lock:
            _, vec = self._vector(index, vector)
            vec.masked = True

    def unmask(self, index: int, vector: int) -> None:
        """Unmask a vector (as SET_IRQS NONE|UNMASK): fires it if pending (INTx: if high)."""
        with self._lock:
            idx, _ = self._vector(index, vector)
            self._unmask(idx, vector)

    def vector_unmasked(self, index: int, vector: int | None = None) -> None:
        """The device's capability unmasked ``vector`` (None: every vector of ``index``).

        Pending vectors that are no longer masked fire now.
        """
        with self._lock:
            idx = self._index(index)
            vecs = self._vecs[idx]
            if vector is None:
                targets = range(len(vecs))
            else:
                self._vector(index, vector)
                targets = range(vector, vector + 1)
            for v in targets:
                self._deliver_pending(idx, v, vecs[v])

    # ---------------------------------------------------------------------------- trigger

    def trigger(self, index: int, vector: int = 0) -> bool:
        """Raise an MSI / MSI-X / ERR / REQ vector; True if an eventfd was written.

        A masked vector becomes pending instead (and fires on unmask). A vector without an
        eventfd is dropped. INTx is level-triggered: use :meth:`intx_assert`.
        """
        with self._lock:
            idx, vec = self._vector(index, vector)
            if idx is IrqIndex.INTX:
                raise IrqError("INTx is level-triggered: use intx_assert()/intx_deassert()")
            if self._masked(idx, vector, vec):
                self._set_pending(idx, vector, vec, True)
                return False
            if vec.fd is None:
                log.debug("%s vector %d: no eventfd, interrupt dropped", idx.name, vector)
                return False
            return _signal(vec.fd)

    # ------------------------------------------------------------------------------- INTx

    def _intx(self) -> _Vector:
        vecs = self._vecs[IrqIndex.INTX]
        if not vecs:
            raise IrqError("this device has no INTx")
        return vecs[0]

    def _intx_update(self) -> None:
        """Fire INTx if the line is high, unmasked and enabled (then automask)."""
        vecs = self._vecs[IrqIndex.INTX]
        if not vecs:
            return
        vec = vecs[0]
        if self._level and not vec.masked and not self._intx_disabled and vec.fd is not None:
            _signal(vec.fd)
            vec.masked = True

    def intx_assert(self) -> None:
        """Drive the INTx line high (fires and automasks if unmasked and enabled)."""
        with self._lock:
            self._intx()
            self._level = True
            self._intx_update()

    def intx_deassert(self) -> None:
        """Drive the INTx line low."""
        with self._lock:
            self._intx()
            self._level = False

    def intx_status(self) -> bool:
        """The INTx line level, for config STATUS.INTERRUPT."""
        with self._lock:
            return self._level

    def set_intx_disabled(self, disabled: bool) -> None:
        """COMMAND.INTX_DISABLE changed; clearing it fires a pending (high, unmasked) line."""
        with self._lock:
            self._intx_disabled = disabled
            self._intx_update()

    def intx_unmask(self) -> None:
        """Unmask INTx (as SET_IRQS INTX NONE|UNMASK)."""
        with self._lock:
            self._intx()
            self._unmask(IrqIndex.INTX, 0)

    # ------------------------------------------------------------------- resample fd watching

    def _resample_fd_now(self) -> int | None:
        with self._lock:
            return self._resample_fd

    def _resampled(self, fd: int) -> None:
        """The watcher saw ``fd`` readable: if it is still the resample fd, consume and unmask.

        Never blocks: the fd may have been replaced, or read already.
        """
        with self._lock:
            if fd != self._resample_fd:
                return
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            except OSError as e:
                log.warning("reading INTx resample fd %d: %s", fd, e)
                return
            self._unmask(IrqIndex.INTX, 0)

    def start_watcher(self) -> None:
        """Start the thread that watches the INTx resample fd (idempotent)."""
        self._watcher.start()

    def stop_watcher(self) -> None:
        """Stop the thread started by :meth:`start_watcher` (no-op if not running)."""
        self._watcher.stop()

    # ------------------------------------------------------------------------ reset, close

    def reset(self) -> None:
        """DEVICE_RESET: disable every vector (closing fds), clear masks and pending bits.

        The INTx line level and INTX_DISABLE stay as the device model sets them.
        """
        with self._lock:
            for idx in IrqIndex:
                self._disable_index(idx)

    def close(self) -> None:
        """Client disconnect: stop the watcher and close every fd (as :meth:`reset`)."""
        self.stop_watcher()
        self.reset()

    # ------------------------------------------------------------------------ device state

    def restore(self, *, level: bool, intx_disabled: bool,
                vectors: Mapping[IrqIndex, tuple[Sequence[bool], Sequence[bool]]]) -> None:
        """Set the line level, INTX_DISABLE and each vector's mask and pending bits from a
        saved device state, silently: nothing fires, no callback runs (the capability's own
        pending bits come back with its bytes). Every index's lists must have its count.
        """
        with self._lock:
            for idx, (masked, pending) in vectors.items():
                vecs = self._vecs[idx]
                if len(masked) != len(vecs) or len(pending) != len(vecs):
                    raise IrqError(f"{idx.name}: {len(vecs)} vectors, state has "
                                   f"{len(masked)} / {len(pending)}")
            self._level = level
            self._intx_disabled = intx_disabled
            for idx, (masked, pending) in vectors.items():
                for vec, m, p in zip(self._vecs[idx], masked, pending, strict=True):
                    vec.masked = bool(m)
                    vec.pending = bool(p)

    # --------------------------------------------------------------------------- tracing

    def state(self, index: int) -> IrqState:
        """A snapshot of ``index``: fds per vector, masks, pending bits (and INTx state)."""
        with self._lock:
            idx = self._index(index)
            vecs = self._vecs[idx]
            intx = idx is IrqIndex.INTX
            return IrqState(
                index=idx,
                count=len(vecs),
                fds=tuple(v.fd for v in vecs),
                masked=tuple(v.masked for v in vecs),
                pending=tuple(v.pending for v in vecs),
                resample_fd=self._resample_fd if intx else None,
                level=self._level if intx else False,
                intx_disabled=self._intx_disabled if intx else False,
            )


class _ResampleWatcher:
    """A thread that waits for the INTx resample eventfd and hands it to the controller.

    The controller wakes it (an eventfd of its own) whenever the resample fd changes; the
    thread then polls the new one. It never holds its own lock while calling the controller.
    """

    def __init__(self, controller: IrqController) -> None:
        self._controller = controller
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake_fd: int | None = None
        self._stopping = False

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._thread = threading.Thread(
                target=self._run, args=(self._wake_fd,), name="irq-resample-watcher",
                daemon=True,
            )
            self._thread.start()

    def wake(self) -> None:
        with self._lock:
            if self._wake_fd is not None:
                _signal(self._wake_fd)

    def stop(self) -> None:
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
            if self._wake_fd is not None:
                _signal(self._wake_fd)
        thread.join()
        with self._lock:
            close_fd(self._wake_fd, "IRQ watcher fd")
            self._wake_fd = None
            self._thread = None

    def _run(self, wake: int) -> None:
        while not self._stopping:
            fd = self._controller._resample_fd_now()
            p = select.poll()
            p.register(wake, select.POLLIN)
            if fd is not None:
                p.register(fd, select.POLLIN)
            bad = False
            for polled, ev in p.poll():
                if polled == wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(wake)
                elif ev & select.POLLIN:
                    self._controller._resampled(polled)
                else:
                    bad = True  # closed under us (POLLNVAL) or error: wait for a wake-up
            if bad:
                p = select.poll()
                p.register(wake, select.POLLIN)
                p.poll(50)


# --- live upgrade (vfio_user_server.upgrade): outside the class, beside it ---------------------
def eventfds(ctl: IrqController) -> tuple[list[tuple[int, int, int]], int | None]:
    """The fds ``ctl`` holds now: ``([(index, vector, fd), ...], resample_fd)``; still its own."""
    with ctl._lock:
        fds = [(int(idx), v, vec.fd) for idx, vecs in ctl._vecs.items()
               for v, vec in enumerate(vecs) if vec.fd is not None]
        return fds, ctl._resample_fd


def adopt_eventfds(ctl: IrqController, fds: Sequence[tuple[int, int, int]],
                   resample_fd: int | None) -> None:
    """``ctl`` takes over the fds another process held (a live upgrade), silently: nothing
    fires. It owns them from here on (also when this raises: they are closed)."""
    with ctl._lock:
        try:
            targets = [ctl._vector(index, vector) for index, vector, _fd in fds]
        except BaseException:
            for _i, _v, fd in fds:
                close_fd(fd, "IRQ fd")
            close_fd(resample_fd, "IRQ fd")
            raise
        for (_idx, vec), (_i, _v, fd) in zip(targets, fds, strict=True):
            old, vec.fd = vec.fd, fd
            if old is not None and old != fd:
                close_fd(old, "IRQ fd")
        ctl._set_resample_fd(resample_fd)
