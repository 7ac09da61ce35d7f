"""DEVICE_SET_IRQS requests: every rule checked once, before anything changes.

:func:`validate_set_irqs` takes a request as it came (index, flags, start, count, fds, data)
and returns a :class:`SetIrqs` that the controller's appliers (one per data type, in
:mod:`vfio_user_server.irq`) can apply without checking anything again, or raises
:class:`~vfio_user_server.errors.IrqError` EINVAL. The rules are VFIO's, as QEMU relies on
them, with the vector counts the device advertises in DEVICE_GET_IRQ_INFO as the only range a
client may address, and every fd checked to be an eventfd.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from .errors import IrqError
from .protocol.constants import IRQ_SET_ACTION_MASK, IRQ_SET_DATA_MASK, IrqIndex, IrqSetFlag

__all__ = ["PlainRequests", "SetIrqs", "is_eventfd", "validate_set_irqs"]

#: What ``readlink /proc/self/fd/N`` says for an eventfd.
_EVENTFD_LINK = "anon_inode:[eventfd]"

# Lookups instead of Enum construction: SET_IRQS(INTX, NONE|UNMASK) comes with every INTx
# interrupt (QEMU's EOI), and waits for its reply.
_INDEXES = {int(i): i for i in IrqIndex}
_KNOWN_FLAGS = int(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK)
_DATA_MASK = int(IRQ_SET_DATA_MASK)
_ACTION_MASK = int(IRQ_SET_ACTION_MASK)
#: the single DATA and the single ACTION flags, by value (two bits set is not a key)
_ONE_DATA = {int(f): f for f in IrqSetFlag if int(f) & _DATA_MASK}
_ONE_ACTION = {int(f): f for f in IrqSetFlag if int(f) & _ACTION_MASK}


def einval(message: str) -> IrqError:
    """The error of a request that breaks a rule (the client gets EINVAL)."""
    return IrqError(message, errno=errno.EINVAL)


@dataclass(frozen=True, slots=True)
class SetIrqs:
    """A DEVICE_SET_IRQS request that passed :func:`validate_set_irqs`.

    ``bools`` holds one byte per vector for DATA_BOOL; ``fds`` one entry per vector for
    DATA_EVENTFD (None de-assigns), or nothing.
    """

    index: IrqIndex
    data_type: IrqSetFlag
    action: IrqSetFlag
    start: int
    count: int
    bools: bytes = b""
    fds: tuple[int | None, ...] = ()

    @property
    def vectors(self) -> range:
        return range(self.start, self.start + self.count)


def _allows_eventfd(index: IrqIndex, action: IrqSetFlag) -> bool:
    """DATA_EVENTFD gives trigger fds (any index) and the INTx resample fd (UNMASK)."""
    return action is IrqSetFlag.ACTION_TRIGGER or (
        action is IrqSetFlag.ACTION_UNMASK and index is IrqIndex.INTX
    )


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an open eventfd (by its anonymous inode's name)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == _EVENTFD_LINK
    except OSError:
        return False


def validate_set_irqs(
    index: int,
    flags: int,
    start: int,
    count: int,
    fds: Sequence[int],
    data: bytes,
    *,
    vector_counts: Mapping[IrqIndex, int],
    owned: Collection[int] = (),
) -> SetIrqs:
    """Check a SET_IRQS request whole; return it as a :class:`SetIrqs` or raise EINVAL.

    ``vector_counts`` is what DEVICE_GET_IRQ_INFO advertises per index, and the only range a
    client may address; ``owned`` are the fds the controller already holds. A negative fd
    de-assigns its vector, as ``-1`` does in VFIO. Nothing is closed here.
    """
    idx = _INDEXES.get(index)
    if idx is None:
        raise einval(f"SET_IRQS: no IRQ index {index}")
    flags = int(flags)
    if flags & ~_KNOWN_FLAGS:
        raise einval(f"SET_IRQS: unknown flag bits {flags:#x}")
    dtype = _ONE_DATA.get(flags & _DATA_MASK)
    action = _ONE_ACTION.get(flags & _ACTION_MASK)
    if dtype is None or action is None:
        raise einval(f"SET_IRQS: need exactly one DATA and one ACTION flag ({flags:#x})")
    if dtype is IrqSetFlag.DATA_EVENTFD and not _allows_eventfd(idx, action):
        raise einval(f"SET_IRQS {idx.name}: eventfd not supported for {action.name}")

    n = vector_counts[idx]
    if start < 0 or count < 0:
        raise einval(f"SET_IRQS: negative start/count ({start}, {count})")
    if start + count > n:  # count 0 may name the end (start == n), as a disable does
        raise einval(f"SET_IRQS {idx.name}: vectors {start}+{count} beyond {n} vectors")

    expected = count if dtype is IrqSetFlag.DATA_BOOL else 0
    if len(data) != expected:
        raise einval(f"SET_IRQS {dtype.name}: {len(data)} data bytes for count {count}, "
                      f"need {expected}")

    if fds and dtype is not IrqSetFlag.DATA_EVENTFD:
        raise einval(f"SET_IRQS: fds sent with {dtype.name}")
    if len(fds) not in (0, count):
        raise einval(f"SET_IRQS: {len(fds)} fds for count {count}")
    valid = [fd for fd in fds if fd >= 0]
    if len(set(valid)) != len(valid):
        raise einval("SET_IRQS: the same fd is given twice")
    if any(fd in owned for fd in valid):
        raise einval("SET_IRQS: an fd is already in use by this controller")
    for fd in valid:
        if not is_eventfd(fd):
            raise einval(f"SET_IRQS: fd {fd} is not an eventfd")

    if dtype is IrqSetFlag.DATA_EVENTFD:
        per_vector = tuple(fd if fd >= 0 else None for fd in fds) if fds else (None,) * count
        return SetIrqs(idx, dtype, action, start, count, fds=per_vector)
    return SetIrqs(idx, dtype, action, start, count, bools=bytes(data))


class PlainRequests:
    """:func:`validate_set_irqs` for requests without fds or data, each shape validated once.

    Such a request's validation depends on its index, flags, start and count and on the
    vector counts, nothing else, so its :class:`SetIrqs` is kept (up to ``limit`` shapes per
    controller). QEMU's INTx EOI sends the same SET_IRQS(INTX, NONE|UNMASK) after every INTx
    interrupt and waits for the reply. A refused request is not kept: it is refused each time.
    """

    __slots__ = ("_counts", "_limit", "_seen")

    def __init__(self, vector_counts: Mapping[IrqIndex, int], limit: int = 64) -> None:
        self._counts = vector_counts
        self._limit = limit
        self._seen: dict[tuple[int, int, int, int], SetIrqs] = {}

    def validate(self, index: int, flags: int, start: int, count: int) -> SetIrqs:
        key = (index, flags, start, count)
        req = self._seen.get(key)
        if req is None:
            req = validate_set_irqs(index, flags, start, count, (), b"",
                                    vector_counts=self._counts)
            if len(self._seen) < self._limit:
                self._seen[key] = req
        return req
