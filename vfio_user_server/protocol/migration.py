"""Migration v2 as data: the device states, their arcs, and the migration data stream.

The device migration FSM of ``<linux/vfio.h>`` (``enum vfio_device_mig_state``) as the
vfio-user spec keeps it, in two tables (docs/state.md, "Migration"):

* :data:`STATES`: per state, whether the device runs (a stopped device is quiesced: no DMA, no
  interrupts, and the endpoint refuses accesses to its BARs), and which of MIG_DATA_READ and
  MIG_DATA_WRITE it accepts. What a state's arcs *do* follows from these columns (see
  ``vfio_user_server.migration``): leaving a running state quiesces the device, entering a
  saving state takes its state, entering RESUMING opens an input stream, leaving it requires
  a whole, loaded stream.
* :data:`ARCS`: the direct arcs. PRE_COPY and the P2P states are left out: the server does not
  advertise them (a device state is a few KiB, taken whole once the device is stopped, so
  there is nothing to send ahead; the spec marks the P2P states unused in vfio-user), and the
  spec says "if PRE_COPY is not supported, arcs touching it are removed".

Any other change of state is the shortest path of direct arcs on which a saving state
(STOP_COPY) is never an interior step (:func:`path`). ERROR cannot be asked for, nor left
except by DEVICE_RESET; a state the device does not have and a change without a path are
EINVAL, as the kernel and libvfio-user answer.

The data stream: a :class:`~vfio_user_server.protocol.structs.MigStreamHeader` (magic,
version, length), then the device state. :class:`OutStream` hands it out in pieces;
:class:`InStream` takes pieces, refusing one that cannot belong to a stream (nothing is kept
then), and says when the stream is whole.
"""

from __future__ import annotations

import errno
import functools
from collections import deque
from dataclasses import dataclass

from ..errors import ProtocolError
from .constants import MigFlag, MigState
from .structs import MigStreamHeader

__all__ = ["ARCS", "MAGIC", "STATES", "STREAM_VERSION", "InStream", "OutStream", "StateSpec",
           "path", "stream"]


@dataclass(frozen=True)
class StateSpec:
    """What holds in one migration state."""

    #: the device runs: BAR accesses reach it, it may DMA and interrupt (else it is quiesced)
    running: bool
    #: MIG_DATA_READ is accepted (a saving state: the device's state is being read out)
    reads: bool = False
    #: MIG_DATA_WRITE is accepted (the device is loading a new state)
    writes: bool = False


#: The states the server has, and what each allows.
STATES: dict[MigState, StateSpec] = {
    MigState.RUNNING: StateSpec(running=True),
    MigState.STOP: StateSpec(running=False),
    MigState.STOP_COPY: StateSpec(running=False, reads=True),
    MigState.RESUMING: StateSpec(running=False, writes=True),
    # entered only when an arc failed half-way; left only by DEVICE_RESET
    MigState.ERROR: StateSpec(running=False),
}

#: The direct arcs (the spec's "Direct State Transitions" without PRE_COPY).
ARCS: frozenset[tuple[MigState, MigState]] = frozenset({
    (MigState.RUNNING, MigState.STOP),
    (MigState.STOP, MigState.RUNNING),
    (MigState.STOP, MigState.STOP_COPY),
    (MigState.STOP_COPY, MigState.STOP),
    (MigState.STOP, MigState.RESUMING),
    (MigState.RESUMING, MigState.STOP),
})

#: What VFIO_DEVICE_FEATURE_MIGRATION answers: the optional parts of the FSM the tables have.
FLAGS = MigFlag.STOP_COPY

_SAVING = frozenset(s for s, spec in STATES.items() if spec.reads)


@functools.cache
def path(current: MigState, target: MigState) -> tuple[MigState, ...]:
    """The states to go through, in order, from ``current`` to ``target`` (``target`` last;
    empty if they are the same). ProtocolError EINVAL when there is no way."""
    if target not in STATES or target is MigState.ERROR:
        raise ProtocolError(f"migration state {target.name} is not supported",
                            errno=errno.EINVAL)
    if current is MigState.ERROR:
        raise ProtocolError("the device is in the migration ERROR state: only DEVICE_RESET "
                            "leaves it", errno=errno.EINVAL)
    if current is target:
        return ()
    # breadth first: the shortest path; a saving state may only start or end it
    came_from: dict[MigState, MigState] = {current: current}
    todo: deque[MigState] = deque([current])
    while todo:
        here = todo.popleft()
        if here in _SAVING and here is not current:
            continue
        for a, b in sorted(ARCS):
            if a is here and b not in came_from:
                came_from[b] = here
                todo.append(b)
    if target not in came_from:
        raise ProtocolError(f"no migration state change {current.name} -> {target.name}",
                            errno=errno.EINVAL)
    steps: list[MigState] = [target]
    while came_from[steps[-1]] is not current:
        steps.append(came_from[steps[-1]])
    return tuple(reversed(steps))


# --- the data stream ----------------------------------------------------------------------

MAGIC = b"PYVFUMIG"
STREAM_VERSION = 1


def stream(state: bytes) -> bytes:
    """The migration data stream that carries ``state``."""
    return MigStreamHeader(MAGIC, STREAM_VERSION, 0, len(state)).pack() + state


class OutStream:
    """The source's stream, read out in pieces; a short piece is its end."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def read(self, size: int) -> bytes:
        piece = self._data[self._offset:self._offset + size]
        self._offset += len(piece)
        return piece


class InStream:
    """The destination's stream, written in pieces, checked piece by piece."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._buf = bytearray()
        self._length: int | None = None
        #: the whole state arrived and was loaded
        self.loaded = False

    @property
    def received(self) -> int:
        return len(self._buf)

    def check(self, piece: bytes) -> bytes | None:
        """Whether ``piece`` may come next: ProtocolError EINVAL if not (nothing changes).
        Returns the whole device state when ``piece`` completes the stream, else None."""
        if self.loaded:
            raise ProtocolError("the migration stream is complete; no more data",
                                errno=errno.EINVAL)
        buf = bytes(self._buf) + bytes(piece)
        length = self._length
        if length is None:
            head = MigStreamHeader.SIZE
            if not buf[:len(MAGIC)] == MAGIC[:len(buf)]:
                raise ProtocolError("not a migration stream (bad magic)", errno=errno.EINVAL)
            if len(buf) < head:
                return None
            hdr = MigStreamHeader.unpack(buf)
            if hdr.version != STREAM_VERSION or hdr.reserved:
                raise ProtocolError(f"migration stream version {hdr.version}, this server "
                                    f"reads {STREAM_VERSION}", errno=errno.EINVAL)
            if hdr.length > self.max_length:
                raise ProtocolError(f"migration stream of {hdr.length} bytes exceeds "
                                    f"{self.max_length}", errno=errno.EINVAL)
            length = hdr.length
        total = MigStreamHeader.SIZE + length
        if len(buf) > total:
            raise ProtocolError(f"{len(buf) - total} bytes past the end of the migration "
                                "stream", errno=errno.EINVAL)
        return buf[MigStreamHeader.SIZE:] if len(buf) == total else None

    def accept(self, piece: bytes, *, whole: bool) -> None:
        """Keep ``piece`` (which :meth:`check` passed); ``whole``: it completed the stream and
        its state is loaded."""
        self._buf += piece
        if self._length is None and len(self._buf) >= MigStreamHeader.SIZE:
            self._length = MigStreamHeader.unpack(self._buf).length
        if whole:
            self.loaded = True
            self._buf = bytearray()  # the state lives in the device now
