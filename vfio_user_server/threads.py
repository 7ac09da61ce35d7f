"""Which thread runs a method, marked where the method is defined.

As qemu.qmp marks its ``@upper_half`` and ``@bottom_half`` methods, the connection's methods say
which thread they run on, so the deadlock rule can be read in the code and not only met at run
time. A connection has two kinds of threads (docs/ARCHITECTURE.md, "The connection and its
threads"):

* the **loop thread** reads the client's socket, runs the endpoint and the device's region
  handlers and writes the replies, in arrival order. It must never wait for the client: QEMU
  serves DMA_READ / DMA_WRITE from its main loop under the BQL, which a vCPU holds while it
  waits for our reply to its region access, so a wait there deadlocks.
* **device threads**: threads a device starts, and the connection's worker (``ctx.defer``).
  They raise interrupts and do DMA, and may wait for the client's answers.

The markers::

    @loop_thread    runs on the loop thread only, and never waits for the client
    @device_thread  may wait for the client: never call it on the loop thread (the requester
                    refuses with DmaError EDEADLK rather than deadlock)
    @any_thread     safe on any thread: takes its own locks, never waits for the client

They cost nothing at run time: they record the kind in ``fn.__vfio_user_thread__`` (a test
checks that every method of the connection's parts carries one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

LOOP = "loop"
DEVICE = "device"
ANY = "any"

_ATTR = "__vfio_user_thread__"


def _mark(kind: str) -> Callable[[F], F]:
    def mark(fn: F) -> F:
        setattr(fn, _ATTR, kind)
        return fn

    return mark


#: Runs on the loop thread only, and never waits for the client.
loop_thread = _mark(LOOP)
#: May wait for the client: never on the loop thread.
device_thread = _mark(DEVICE)
#: Safe on any thread.
any_thread = _mark(ANY)


def thread_of(fn: object) -> str | None:
    """The marker of ``fn`` (``"loop"``, ``"device"``, ``"any"``), or None if unmarked."""
    kind = getattr(fn, _ATTR, None)
    return kind if isinstance(kind, str) else None
