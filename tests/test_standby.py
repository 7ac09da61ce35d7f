"""The standby pool's rules, with stand-in machines (the guests themselves: tests/e2e)."""

from __future__ import annotations

import threading
from typing import Any

from vfio_user_server.testing.standby import StandbyPool


class FakeMachine:
    def __init__(self, key: str) -> None:
        self.key = key
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


def pool() -> StandbyPool:
    p = StandbyPool()
    p.enable()
    return p


def take(p: StandbyPool, key: str, timeout: float) -> Any:
    return p.take(key, timeout)


def maker(key: str, made: list[FakeMachine], gate: threading.Event | None = None) -> Any:
    def make() -> FakeMachine:
        if gate is not None:
            assert gate.wait(30)
        m = FakeMachine(key)
        made.append(m)
        return m
    return make


def test_take_waits_for_the_standby_being_made() -> None:
    p, gate = pool(), threading.Event()
    made: list[FakeMachine] = []
    assert take(p, "a", timeout=0) is None
    p.refill("a", maker("a", made, gate))
    gate.set()
    got = take(p, "a", timeout=30)
    assert got is made[0] and not made[0].closed.is_set()
    assert take(p, "a", timeout=0) is None  # handed out once


def test_another_setup_replaces_the_standby() -> None:
    p = pool()
    made: list[FakeMachine] = []
    p.refill("a", maker("a", made))
    assert take(p, "a", timeout=30) is made[0]
    p.refill("a", maker("a", made))
    # wait until the second is ready (take would hand it out: peek through a third refill)
    assert take(p, "b", timeout=0) is None
    a2 = take(p, "a", timeout=30)
    assert a2 is made[1]
    p.refill("a", maker("a", made))
    deadline = threading.Event()
    for _ in range(3000):
        with p._cond:
            if p._ready is not None:
                break
        deadline.wait(0.01)
    p.refill("b", maker("b", made))
    assert made[2].closed.wait(30)  # the standby for "a" was ended
    assert take(p, "b", timeout=30) is made[3]
    assert take(p, "a", timeout=0) is None


def test_close_ends_the_ready_one_and_the_one_being_made() -> None:
    p, gate = pool(), threading.Event()
    made: list[FakeMachine] = []
    p.refill("a", maker("a", made))
    assert take(p, "a", timeout=30) is made[0]
    p.refill("a", maker("a", made, gate))
    for _ in range(3000):  # until the pool's thread is making it
        with p._cond:
            if p._making == "a":
                break
        threading.Event().wait(0.01)
    p.close()
    gate.set()
    for _ in range(3000):
        if len(made) == 2:
            break
        threading.Event().wait(0.01)
    assert made[1].closed.wait(30)
    assert take(p, "a", timeout=0) is None
    p.refill("a", maker("a", made))  # closed: nothing made
    assert len(made) == 2


def test_a_failing_make_leaves_no_standby() -> None:
    p = pool()

    def make() -> Any:
        raise RuntimeError("no template")

    p.refill("a", make)
    assert take(p, "a", timeout=30) is None


def test_off_unless_enabled(monkeypatch: Any) -> None:
    monkeypatch.delenv("PYVFIO_STANDBY", raising=False)
    p = StandbyPool()
    made: list[FakeMachine] = []
    p.refill("a", maker("a", made))
    assert take(p, "a", timeout=0) is None and not made
    monkeypatch.setenv("PYVFIO_STANDBY", "0")
    p.enable()
    assert not p.enabled
