"""Tests of vfio_user_server.irq with real eventfds."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vfio_user_server.client import Client, ClientError
from vfio_user_server.errors import DeviceDefinitionError, IrqError
from vfio_user_server.irq import IrqController, IrqIndex, IrqInfoFlag, IrqSetFlag, IrqState
from vfio_user_server.sample import SampleDevice
from vfio_user_server.server import Server

F = IrqSetFlag
NONE, BOOL, EVENTFD = F.DATA_NONE, F.DATA_BOOL, F.DATA_EVENTFD
MASK, UNMASK, TRIGGER = F.ACTION_MASK, F.ACTION_UNMASK, F.ACTION_TRIGGER
INTX, MSI, MSIX, ERR, REQ = (
    IrqIndex.INTX,
    IrqIndex.MSI,
    IrqIndex.MSIX,
    IrqIndex.ERR,
    IrqIndex.REQ,
)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def efd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class Peer:
    """The client's side of eventfds: we keep a dup to observe signals after handing one over."""

    def __init__(self) -> None:
        self.dups: list[int] = []

    def make(self, n: int = 1) -> tuple[list[int], list[int]]:
        """n fresh eventfds: (fds to hand over, our dups to read)."""
        give = [efd() for _ in range(n)]
        mine = [os.dup(fd) for fd in give]
        self.dups += mine
        return give, mine

    def close(self) -> None:
        for fd in self.dups:
            os.close(fd)


def count(fd: int) -> int:
    """Read and reset an eventfd counter (0 if not signalled)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def wait_count(fd: int, timeout: float = 60.0) -> int:
    """Wait (generously) until an eventfd is signalled, then read and reset it."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    assert p.poll(int(timeout * 1000)), f"eventfd {fd} not signalled in {timeout} s"
    return count(fd)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def expect_einval(fn: Callable[..., object], *args: object) -> None:
    with pytest.raises(IrqError) as e:
        fn(*args)
    assert e.value.errno == errno.EINVAL, e.value


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.close()


@pytest.fixture
def ctl() -> Iterator[IrqController]:
    c = IrqController(intx=True, msi_vectors=4, msix_vectors=16)
    yield c
    c.close()


# ------------------------------------------------------------------------------ IRQ_INFO


def test_info() -> None:
    c = IrqController(intx=True, msi_vectors=8, msix_vectors=64)
    assert c.num_irqs == 5
    assert c.info(INTX) == (1, IrqInfoFlag.EVENTFD | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED)
    assert c.info(MSI) == (8, IrqInfoFlag.EVENTFD | IrqInfoFlag.NORESIZE)
    assert c.info(MSIX) == (64, IrqInfoFlag.EVENTFD)
    assert c.info(ERR) == (1, IrqInfoFlag.EVENTFD)
    assert c.info(REQ) == (1, IrqInfoFlag.EVENTFD)
    with pytest.raises(IrqError) as e:
        c.info(5)
    assert e.value.errno == errno.EINVAL
    d = IrqController(intx=False, msi_vectors=0, msix_vectors=0, err=False, req=False)
    assert [d.info(i)[0] for i in range(5)] == [0, 0, 0, 0, 0]


def test_bad_vector_counts() -> None:
    with pytest.raises(DeviceDefinitionError):
        IrqController(intx=True, msi_vectors=33, msix_vectors=0)
    with pytest.raises(DeviceDefinitionError):
        IrqController(intx=True, msi_vectors=1, msix_vectors=2049)


# ------------------------------------------------------------------------------ SET_IRQS


def test_eventfd_trigger_assign_and_fire(ctl: IrqController, peer: Peer) -> None:
    give, mine = peer.make(4)
    ctl.set_irqs(MSI, EVENTFD | TRIGGER, 0, 4, give, b"")
    assert ctl.state(MSI).fds == tuple(give)
    assert ctl.trigger(MSI, 2)
    assert [count(fd) for fd in mine] == [0, 0, 1, 0]
    ctl.trigger(MSI, 2)
    ctl.trigger(MSI, 2)
    assert count(mine[2]) == 2


def test_msix_one_by_one_like_qemu(ctl: IrqController, peer: Peer) -> None:
    # enable with no vectors: EVENTFD|TRIGGER start 0 count 1, no fd
    ctl.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 1, [], b"")
    assert ctl.state(MSIX).fds[0] is None
    assert not ctl.trigger(MSIX, 0)
    give, mine = peer.make()
    ctl.set_irqs(MSIX, EVENTFD | TRIGGER, 5, 1, give, b"")
    assert ctl.trigger(MSIX, 5)
    assert count(mine[0]) == 1
    assert not ctl.trigger(MSIX, 6)


def test_fd_replacement_closes_old(ctl: IrqController, peer: Peer) -> None:
    a, amine = peer.make()
    ctl.set_irqs(MSIX, EVENTFD | TRIGGER, 3, 1, a, b"")
    b, bmine = peer.make()
    ctl.set_irqs(MSIX, EVENTFD | TRIGGER, 3, 1, b, b"")
    assert not is_open(a[0])
    assert ctl.state(MSIX).fds[3] == b[0]
    ctl.trigger(MSIX, 3)
    assert (count(amine[0]), count(bmine[0])) == (0, 1)


def test_eventfd_no_fds_deassigns(ctl: IrqController, peer: Peer) -> None:
    give, _ = peer.make(4)
    ctl.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 4, give, b"")
    ctl.set_irqs(MSIX, EVENTFD | TRIGGER, 1, 2, [], b"")  # a "-1" run
    assert ctl.state(MSIX).fds[:4] == (give[0], None, None, give[3])
    assert [is_open(fd) for fd in give] == [True, False, False, True]


def test_eventfd_negative_fd_deassigns_one(ctl: IrqController, peer: Peer) -> None:
    give, _ = peer.make(2)
    ctl.set_irqs(MSI, EVENTFD | TRIGGER, 0, 2, give, b"")
    new, _ = peer.make()
    ctl.set_irqs(MSI, EVENTFD | TRIGGER, 0, 2, [-1, new[0]], b"")
    assert ctl.state(MSI).fds[:2] == (None, new[0])
    assert not is_open(give[0]) and not is_open(give[1])


def test_count0_disables_index(ctl: IrqController, peer: Peer) -> None:
    give, _ = peer.make(16)
    ctl.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 16, give, b"")
    ctl.mask(MSIX, 1)
    ctl.trigger(MSIX, 1)
    ctl.set_irqs(MSIX, NONE | TRIGGER, 0, 0, [], b"")
    st = ctl.state(MSIX)
    assert st.fds == (None,) * 16
    assert not any(st.masked) and not any(st.pending)
    assert not any(is_open(fd) for fd in give)


def test_count0_disables_intx_including_resample(ctl: IrqController, peer: Peer) -> None:
    trig, _ = peer.make()
    res, _ = peer.make()
    ctl.set_irqs(INTX, EVENTFD | TRIGGER, 0, 1, trig, b"")
    ctl.set_irqs(INTX, EVENTFD | UNMASK, 0, 1, res, b"")
    assert ctl.state(INTX).resample_fd == res[0]
    ctl.set_irqs(INTX, NONE | UNMASK, 0, 1, [], b"")
    ctl.set_irqs(INTX, NONE | TRIGGER, 0, 0, [], b"")
    assert ctl.state(INTX).resample_fd is None
    assert ctl.state(INTX).fds == (None,)
    assert not is_open(trig[0]) and not is_open(res[0])


def test_count0_disable_on_absent_index() -> None:
    # QEMU may disable an index the device does not have: accepted, and nothing changes
    c = IrqController(intx=False, msi_vectors=0, msix_vectors=0)
    c.set_irqs(INTX, NONE | TRIGGER, 0, 0, [], b"")
    c.set_irqs(MSI, NONE | TRIGGER, 0, 0, [], b"")
    assert c.state(INTX) == IrqState(INTX, count=0, fds=(), masked=(), pending=())
    assert c.state(MSI) == IrqState(MSI, count=0, fds=(), masked=(), pending=())
    # but no vector of it can be addressed
    with pytest.raises(IrqError) as e:
        c.set_irqs(MSI, NONE | TRIGGER, 0, 1, [], b"")
    assert e.value.errno == errno.EINVAL


def test_count0_other_is_noop(ctl: IrqController) -> None:
    ctl.set_irqs(MSI, NONE | MASK, 0, 0, [], b"")
    ctl.set_irqs(MSI, EVENTFD | TRIGGER, 0, 0, [], b"")
    assert not any(ctl.state(MSI).masked)


def test_loopback_trigger_none_and_bool(ctl: IrqController, peer: Peer) -> None:
    give, mine = peer.make(4)
    ctl.set_irqs(MSI, EVENTFD | TRIGGER, 0, 4, give, b"")
    ctl.set_irqs(MSI, NONE | TRIGGER, 1, 2, [], b"")
    assert [count(fd) for fd in mine] == [0, 1, 1, 0]
    ctl.set_irqs(MSI, BOOL | TRIGGER, 0, 4, [], b"\x01\x00\x00\x01")
    assert [count(fd) for fd in mine] == [1, 0, 0, 1]
    # loopback ignores masks, as in VFIO
    ctl.set_irqs(MSI, NONE | MASK, 0, 4, [], b"")
    ctl.set_irqs(MSI, NONE | TRIGGER, 0, 1, [], b"")
    assert count(mine[0]) == 1


def test_loopback_intx(ctl: IrqController, peer: Peer) -> None:
    give, mine = peer.make()
    ctl.set_irqs(INTX, EVENTFD | TRIGGER, 0, 1, give, b"")
    ctl.set_irqs(INTX, NONE | TRIGGER, 0, 1, [], b"")
    assert count(mine[0]) == 1
    ctl.set_irqs(INTX, BOOL | TRIGGER, 0, 1, [], b"\x00")
    assert count(mine[0]) == 0


def test_err_and_req(ctl: IrqController, peer: Peer) -> None:
    e, emine = peer.make()
    r, rmine = peer.make()
    ctl.set_irqs(ERR, EVENTFD | TRIGGER, 0, 1, e, b"")
    ctl.set_irqs(REQ, EVENTFD | TRIGGER, 0, 1, r, b"")
    assert ctl.trigger(ERR)
    assert ctl.trigger(REQ, 0)
    assert (count(emine[0]), count(rmine[0])) == (1, 1)
    ctl.set_irqs(ERR, NONE | TRIGGER, 0, 1, [], b"")
    assert count(emine[0]) == 1


def test_mask_unmask_none_and_bool(ctl: IrqController, peer: Peer) -> None:
    give, mine = peer.make(4)
    ctl.set_irqs(MSI, EVENTFD | TRIGGER, 0, 4, give, b"")
    ctl.set_irqs(MSI, BOOL | MASK, 0, 4, [], b"\x01\x00\x01\x00")
    assert ctl.state(MSI).masked == (True, False, True, False)
    assert [ctl.trigger(MSI, v) for v in range(4)] == [False, True, False, True]
    assert [count(fd) for fd in mine] == [0, 1, 0, 1]
    assert ctl.state(MSI).pending == (True, False, True, False)
    ctl.set_irqs(MSI, BOOL | UNMASK, 0, 4, [], b"\x00\x00\x01\x00")
    assert [count(fd) for fd in mine] == [0, 0, 1, 0]
    assert ctl.state(MSI).pending == (True, False, False, False)
    ctl.set_irqs(MSI, NONE | UNMASK, 0, 1, [], b"")
    assert [count(fd) for fd in mine] == [1, 0, 0, 0]
    assert ctl.state(MSI).masked == (False,) * 4
    ctl.set_irqs(MSI, NONE | MASK, 1, 3, [], b"")
    assert ctl.state(MSI).masked == (False, True, True, True)


def test_msix_masked_pending_fires_on_unmask(peer: Peer) -> None:
    device_mask = {3: True}
    pba: dict[tuple[int, int], bool] = {}
    c = IrqController(
        intx=False,
        msi_vectors=0,
        msix_vectors=8,
        is_masked=lambda i, v: device_mask.get(v, False),
        set_pending=lambda i, v, p: pba.__setitem__((i, v), p),
    )
    try:
        give, mine = peer.make()
        c.set_irqs(MSIX, EVENTFD | TRIGGER, 3, 1, give, b"")
        assert not c.trigger(MSIX, 3)
        assert not c.trigger(MSIX, 3)
        assert count(mine[0]) == 0
        assert pba == {(2, 3): True}
        assert c.state(MSIX).pending[3]
        # still masked by the device: nothing fires
        c.vector_unmasked(MSIX, 3)
        assert count(mine[0]) == 0
        device_mask[3] = False
        c.vector_unmasked(MSIX, 3)
        assert count(mine[0]) == 1, "one pending interrupt fires once"
        assert pba == {(2, 3): False}
        assert not c.state(MSIX).pending[3]
        assert c.trigger(MSIX, 3)
        assert count(mine[0]) == 1
        # recorded (SET_IRQS) mask and unmask()
        c.mask(MSIX, 3)
        c.trigger(MSIX, 3)
        assert pba[(2, 3)]
        c.unmask(MSIX, 3)
        assert count(mine[0]) == 1
        assert not pba[(2, 3)]
        # vector_unmasked(index) rechecks every vector
        device_mask.update({0: True, 3: True})
        c.trigger(MSIX, 3)
        device_mask.clear()
        c.vector_unmasked(MSIX)
        assert count(mine[0]) == 1
    finally:
        c.close()


def test_pending_without_fd_dropped_on_unmask(ctl: IrqController) -> None:
    ctl.mask(MSIX, 0)
    assert not ctl.trigger(MSIX, 0)
    assert ctl.state(MSIX).pending[0]
    ctl.unmask(MSIX, 0)
    assert not ctl.state(MSIX).pending[0]


def test_trigger_errors(ctl: IrqController) -> None:
    expect_einval(ctl.trigger, MSIX, 16)
    expect_einval(ctl.trigger, 7, 0)
    expect_einval(ctl.trigger, INTX, 0)
    c = IrqController(intx=False, msi_vectors=1, msix_vectors=0, err=False)
    expect_einval(c.trigger, ERR)
    expect_einval(c.intx_assert)


# ------------------------------------------------------------------------------ bad input


BAD = [
    pytest.param(MSI, NONE | BOOL | TRIGGER, 0, 1, b"", id="two-data"),
    pytest.param(MSI, EVENTFD | MASK | TRIGGER, 0, 1, b"", id="two-actions"),
    pytest.param(MSI, EVENTFD, 0, 1, b"", id="no-action"),
    pytest.param(MSI, TRIGGER, 0, 1, b"", id="no-data"),
    pytest.param(MSI, EVENTFD | TRIGGER | 0x40, 0, 1, b"", id="unknown-flag"),
    pytest.param(MSI, EVENTFD | TRIGGER, 4, 1, b"", id="start-out-of-range"),
    pytest.param(MSI, EVENTFD | TRIGGER, 3, 2, b"", id="end-out-of-range"),
    pytest.param(MSI, EVENTFD | TRIGGER, 0, 2, b"", id="fd-count-mismatch"),
    pytest.param(INTX, EVENTFD | TRIGGER, 1, 1, b"", id="intx-vector-1"),
    pytest.param(7, EVENTFD | TRIGGER, 0, 1, b"", id="unknown-index"),
    pytest.param(MSI, NONE | TRIGGER, 0, 1, b"", id="fds-with-data-none"),
    pytest.param(MSI, BOOL | MASK, 0, 1, b"\x01", id="fds-with-data-bool"),
    pytest.param(MSI, EVENTFD | MASK, 0, 1, b"", id="eventfd-mask"),
    pytest.param(MSIX, EVENTFD | UNMASK, 0, 1, b"", id="eventfd-unmask-msix"),
    pytest.param(MSI, EVENTFD | TRIGGER, 0, 0, b"", id="fds-with-count-0"),
    pytest.param(MSI, EVENTFD | TRIGGER, -1, 1, b"", id="negative-start"),
    pytest.param(MSI, EVENTFD | TRIGGER, 0, 1, b"\x01", id="data-with-eventfd"),
    pytest.param(MSI, EVENTFD | MASK, 0, 0, b"", id="eventfd-mask-count-0"),
    pytest.param(MSI, EVENTFD | TRIGGER, 5, 0, b"", id="count-0-start-beyond-end"),
    pytest.param(ERR, EVENTFD | TRIGGER, 1, 1, b"", id="err-vector-1"),
]


@pytest.mark.parametrize(("index", "flags", "start", "count", "data"), BAD)
def test_bad_input_closes_fds(
    ctl: IrqController, index: int, flags: int, start: int, count: int, data: bytes
) -> None:
    before = fd_count()
    fd = efd()
    with pytest.raises(IrqError) as e:
        ctl.set_irqs(index, flags, start, count, [fd], data)
    assert e.value.errno == errno.EINVAL
    assert not is_open(fd)
    assert fd_count() == before
    for i in range(5):
        st = ctl.state(i)
        assert all(f is None for f in st.fds)
        assert not any(st.masked)


def test_bad_data(ctl: IrqController) -> None:
    expect_einval(ctl.set_irqs, MSI, BOOL | MASK, 0, 3, [], b"\x01\x01")  # short
    expect_einval(ctl.set_irqs, MSI, BOOL | MASK, 0, 2, [], b"\x01\x01\x01")  # long
    expect_einval(ctl.set_irqs, MSI, BOOL | MASK, 0, 5, [], b"\x01" * 5)  # beyond 4 vectors
    expect_einval(ctl.set_irqs, MSI, NONE | MASK, 0, 1, [], b"\x01")  # NONE takes no data
    assert ctl.state(MSI).masked == (False,) * 4


def test_duplicate_and_owned_fds_rejected(ctl: IrqController, peer: Peer) -> None:
    fd = efd()
    expect_einval(ctl.set_irqs, MSI, EVENTFD | TRIGGER, 0, 2, [fd, fd], b"")
    assert not is_open(fd)
    give, _ = peer.make()
    ctl.set_irqs(MSI, EVENTFD | TRIGGER, 0, 1, give, b"")
    expect_einval(ctl.set_irqs, MSI, EVENTFD | TRIGGER, 1, 1, give, b"")
    assert is_open(give[0]), "an fd the controller owns is never closed by a bad request"
    assert ctl.state(MSI).fds[0] == give[0]


def not_an_eventfd(kind: str, tmp: str) -> tuple[int, list[int]]:
    """An fd of ``kind`` to hand over, and the fds the test keeps (closed by the test)."""
    if kind == "socket":
        a, b = socket.socketpair()
        return a.detach(), [b.detach()]
    if kind == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        return w, [r]
    if kind == "directory":
        return os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), []
    if kind == "file":
        return os.open(os.path.join(tmp, "f"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC), []
    if kind == "epoll":  # an anonymous inode too, but not an eventfd
        ep = select.epoll()
        try:
            return os.dup(ep.fileno()), []
        finally:
            ep.close()
    raise AssertionError(kind)


FD_KINDS = ["socket", "pipe", "directory", "file", "epoll"]


@pytest.mark.parametrize("kind", FD_KINDS)
@pytest.mark.parametrize(("index", "flags"), [(MSI, EVENTFD | TRIGGER), (INTX, EVENTFD | UNMASK)],
                         ids=["trigger", "resample"])
def test_wrong_kind_of_fd_refused_and_closed(
    ctl: IrqController, peer: Peer, tmp_path: Path, kind: str, index: int, flags: int
) -> None:
    before = fd_count()
    fd, kept = not_an_eventfd(kind, str(tmp_path))
    try:
        expect_einval(ctl.set_irqs, index, flags, 0, 1, [fd], b"")
        assert not is_open(fd), "the refused fd is closed"
        assert ctl.state(index).fds == (None,) * ctl.info(index)[0]
        assert ctl.state(INTX).resample_fd is None
        # one bad fd among good ones: the whole request is refused, every fd closed
        good, _ = peer.make(2)
        fd2, kept2 = not_an_eventfd(kind, str(tmp_path))
        kept += kept2
        expect_einval(ctl.set_irqs, MSI, EVENTFD | TRIGGER, 0, 3, [good[0], fd2, good[1]], b"")
        assert not any(is_open(f) for f in [*good, fd2])
        assert ctl.state(MSI).fds == (None,) * 4
    finally:
        for f in kept:
            os.close(f)
    assert fd_count() == before + len(peer.dups)


def test_many_fds_partly_bad_all_closed(ctl: IrqController) -> None:
    before = fd_count()
    fds = [efd() for _ in range(5)]
    expect_einval(ctl.set_irqs, MSI, EVENTFD | TRIGGER, 0, 5, fds, b"")
    assert not any(is_open(fd) for fd in fds)
    assert fd_count() == before


# ------------------------------------------------------------------------------------ INTx


def setup_intx(ctl: IrqController, peer: Peer, resample: bool = False) -> tuple[int, int | None]:
    give, mine = peer.make()
    ctl.set_irqs(INTX, EVENTFD | TRIGGER, 0, 1, give, b"")
    res = None
    if resample:
        r, rmine = peer.make()
        ctl.set_irqs(INTX, EVENTFD | UNMASK, 0, 1, r, b"")
        res = rmine[0]
    return mine[0], res


def test_intx_automask_and_unmask(ctl: IrqController, peer: Peer) -> None:
    trig, _ = setup_intx(ctl, peer)
    assert not ctl.intx_status()
    ctl.intx_assert()
    assert ctl.intx_status()
    assert count(trig) == 1
    assert ctl.state(INTX).masked == (True,)
    ctl.intx_assert()  # level: still high, masked: nothing more
    assert count(trig) == 0
    # unmask while still asserted: fires again and re-masks
    ctl.set_irqs(INTX, NONE | UNMASK, 0, 1, [], b"")
    assert count(trig) == 1
    assert ctl.state(INTX).masked == (True,)
    ctl.intx_deassert()
    assert not ctl.intx_status()
    ctl.set_irqs(INTX, BOOL | UNMASK, 0, 1, [], b"\x01")
    assert count(trig) == 0
    assert ctl.state(INTX).masked == (False,)
    ctl.intx_assert()
    assert count(trig) == 1
    ctl.intx_deassert()
    ctl.intx_unmask()
    assert count(trig) == 0


def test_intx_mask_message(ctl: IrqController, peer: Peer) -> None:
    trig, _ = setup_intx(ctl, peer)
    ctl.set_irqs(INTX, NONE | MASK, 0, 1, [], b"")
    ctl.intx_assert()
    assert count(trig) == 0
    ctl.set_irqs(INTX, NONE | UNMASK, 0, 1, [], b"")
    assert count(trig) == 1


def test_intx_disable_bit(ctl: IrqController, peer: Peer) -> None:
    trig, _ = setup_intx(ctl, peer)
    ctl.set_intx_disabled(True)
    ctl.intx_assert()
    assert ctl.intx_status(), "STATUS.INTERRUPT shows the line even when disabled"
    assert count(trig) == 0
    assert ctl.state(INTX).intx_disabled
    ctl.set_intx_disabled(False)
    assert count(trig) == 1
    assert ctl.state(INTX).masked == (True,)
    # disabled while masked and deasserted: nothing on re-enable
    ctl.intx_deassert()
    ctl.intx_unmask()
    ctl.set_intx_disabled(True)
    ctl.set_intx_disabled(False)
    assert count(trig) == 0


def test_intx_no_fd_does_not_mask(ctl: IrqController, peer: Peer) -> None:
    ctl.intx_assert()
    assert ctl.state(INTX).masked == (False,)
    trig, _ = setup_intx(ctl, peer)  # assigning the trigger while high fires
    assert count(trig) == 1
    assert ctl.state(INTX).masked == (True,)


def test_intx_resample_fd(ctl: IrqController, peer: Peer) -> None:
    ctl.start_watcher()
    trig, res = setup_intx(ctl, peer, resample=True)
    assert res is not None
    ctl.intx_assert()
    assert count(trig) == 1
    assert ctl.state(INTX).masked == (True,)
    os.eventfd_write(res, 1)  # KVM signals the resample (guest EOI)
    assert wait_count(trig) == 1, "still asserted: the watcher unmasked, it fired again"
    assert count(res) == 0, "the watcher consumed the resample"
    # line low: the resample unmasks without firing, so asserting again fires exactly once,
    # whether the watcher sees the resample before or after the assert
    ctl.intx_deassert()
    os.eventfd_write(res, 1)
    ctl.intx_assert()
    assert wait_count(trig) == 1
    assert count(res) == 0
    assert ctl.state(INTX).masked == (True,)


def test_resample_fd_replacement_and_deassign(ctl: IrqController, peer: Peer) -> None:
    setup_intx(ctl, peer, resample=True)
    first = ctl.state(INTX).resample_fd
    assert first is not None
    r, _ = peer.make()
    ctl.set_irqs(INTX, EVENTFD | UNMASK, 0, 1, r, b"")
    assert not is_open(first)
    assert ctl.state(INTX).resample_fd == r[0]
    ctl.set_irqs(INTX, EVENTFD | UNMASK, 0, 1, [], b"")
    assert ctl.state(INTX).resample_fd is None
    assert not is_open(r[0])


def watcher_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "irq-resample-watcher"}


def test_resample_watcher_thread(ctl: IrqController, peer: Peer) -> None:
    before = watcher_threads()
    ctl.start_watcher()
    ctl.start_watcher()  # idempotent
    started = watcher_threads() - before
    assert len(started) == 1
    trig, res = setup_intx(ctl, peer, resample=True)
    assert res is not None
    ctl.intx_assert()
    assert count(trig) == 1
    os.eventfd_write(res, 1)
    assert wait_count(trig) == 1, "the watcher saw the resample and re-fired the asserted line"
    # a new resample fd assigned after start is watched too
    r2, r2mine = peer.make()
    ctl.set_irqs(INTX, EVENTFD | UNMASK, 0, 1, r2, b"")
    os.eventfd_write(r2mine[0], 1)
    assert wait_count(trig) == 1
    ctl.stop_watcher()
    ctl.stop_watcher()
    assert not any(t.is_alive() for t in started), "stop_watcher() joined the thread"


def test_concurrent_triggers(ctl: IrqController, peer: Peer) -> None:
    give, mine = peer.make(16)
    ctl.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 16, give, b"")

    def fire(v: int) -> None:
        for _ in range(500):
            ctl.trigger(MSIX, v)

    threads = [threading.Thread(target=fire, args=(v,)) for v in range(16)]
    for t in threads:
        t.start()
    for _ in range(50):
        new, newmine = peer.make()
        ctl.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 1, new, b"")
        mine[0] = newmine[0]
    for t in threads:
        t.join()
    assert [count(fd) for fd in mine[1:]] == [500] * 15


# ----------------------------------------------------------------------------- reset, close


def test_reset(ctl: IrqController, peer: Peer) -> None:
    setup_intx(ctl, peer, resample=True)
    give, _ = peer.make(4)
    ctl.set_irqs(MSI, EVENTFD | TRIGGER, 0, 4, give, b"")
    e, _ = peer.make()
    ctl.set_irqs(ERR, EVENTFD | TRIGGER, 0, 1, e, b"")
    ctl.intx_assert()
    ctl.mask(MSI, 1)
    ctl.trigger(MSI, 1)
    ctl.reset()
    for i in range(5):
        st = ctl.state(i)
        assert all(f is None for f in st.fds)
        assert not any(st.masked) and not any(st.pending)
    assert ctl.state(INTX).resample_fd is None
    assert not any(is_open(fd) for fd in [*give, *e])
    assert ctl.intx_status(), "the line level belongs to the device model"
    # usable again afterwards
    trig2, _ = setup_intx(ctl, peer)
    assert count(trig2) == 1


def test_close_then_reuse(peer: Peer) -> None:
    before = fd_count()
    c = IrqController(intx=True, msi_vectors=1, msix_vectors=4)
    c.start_watcher()
    give, _ = peer.make(4)
    c.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 4, give, b"")
    c.close()
    assert not any(is_open(fd) for fd in give)
    give2, mine2 = peer.make()
    c.set_irqs(MSI, EVENTFD | TRIGGER, 0, 1, give2, b"")
    assert c.trigger(MSI, 0)
    assert count(mine2[0]) == 1
    c.close()
    assert fd_count() == before + len(peer.dups)


def test_no_fd_leak_after_many_cycles() -> None:
    before = fd_count()
    c = IrqController(intx=True, msi_vectors=4, msix_vectors=32)
    c.start_watcher()
    for i in range(100):
        c.set_irqs(INTX, EVENTFD | TRIGGER, 0, 1, [efd()], b"")
        c.set_irqs(INTX, EVENTFD | UNMASK, 0, 1, [efd()], b"")
        c.set_irqs(MSI, EVENTFD | TRIGGER, 0, 4, [efd() for _ in range(4)], b"")
        c.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 1, [], b"")
        for v in range(0, 32, 3):
            c.set_irqs(MSIX, EVENTFD | TRIGGER, v, 1, [efd()], b"")
            c.set_irqs(MSIX, EVENTFD | TRIGGER, v, 1, [efd()], b"")
        c.intx_assert()
        c.intx_deassert()
        expect_einval(c.set_irqs, MSI, EVENTFD | TRIGGER, 0, 4, [efd(), efd()], b"")
        if i % 3 == 0:
            c.reset()
        elif i % 3 == 1:
            for idx in IrqIndex:
                c.set_irqs(idx, NONE | TRIGGER, 0, 0, [], b"")
        else:
            c.close()
    c.close()
    assert fd_count() == before


def test_err_index_is_wired() -> None:
    """A device's report_error() writes the ERR eventfd QEMU gave (QEMU then stops the VM)."""
    import os
    import tempfile

    from vfio_user_server.client import Client
    from vfio_user_server.protocol.constants import IrqIndex
    from vfio_user_server.sample import SampleDevice
    from vfio_user_server.server import Server

    path = os.path.join(tempfile.mkdtemp(), "err.sock")
    device = SampleDevice()
    with Server(device, path), Client.connect(path) as client:
        client.negotiate()
        client.get_device_info()
        assert client.get_irq_info(IrqIndex.ERR).count == 1
        assert device.report_error() is False  # no eventfd yet
        (efd,) = client.enable_irq(IrqIndex.ERR, 1)
        assert device.report_error() is True
        assert Client.eventfd_count(efd) == 1
        os.close(efd)


def fds_on(target: str) -> int:
    """How many fds of this process refer to ``target`` (a readlink of /proc/self/fd/N)."""
    n = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{name}") == target
    return n


@pytest.fixture
def sample_client(tmp_path: Path) -> Iterator[tuple[SampleDevice, Client]]:
    device = SampleDevice()
    path = str(tmp_path / "irq.sock")
    with Server(device, path), Client.connect(path) as client:
        client.negotiate()
        client.get_device_info()
        yield device, client


@pytest.mark.parametrize("kind", FD_KINDS)
def test_wire_wrong_kind_of_fd_gets_einval_and_is_closed(
    sample_client: tuple[SampleDevice, Client], tmp_path: Path, kind: str
) -> None:
    device, client = sample_client
    fd, kept = not_an_eventfd(kind, str(tmp_path))
    target = os.readlink(f"/proc/self/fd/{fd}")
    ours = fds_on(target)
    try:
        for index, flags in [(MSIX, EVENTFD | TRIGGER), (INTX, EVENTFD | UNMASK),
                             (ERR, EVENTFD | TRIGGER)]:
            with pytest.raises(ClientError) as e:
                client.set_irqs(index, flags, 0, 1, [fd])
            assert e.value.errno == errno.EINVAL
            assert fds_on(target) == ours, "the server closed its copy before it replied"
        assert device.irqs.state(MSIX).fds == (None,) * device.irqs.info(MSIX)[0]
        assert device.irqs.state(INTX).resample_fd is None
        (good,) = client.enable_irq(ERR, 1)  # the connection still serves
        assert device.report_error() is True
        assert Client.eventfd_count(good) == 1
        os.close(good)
    finally:
        for f in [fd, *kept]:
            os.close(f)


def test_wire_vectors_are_those_irq_info_advertises(
    sample_client: tuple[SampleDevice, Client],
) -> None:
    device, client = sample_client
    for index in IrqIndex:
        n = client.get_irq_info(index).count
        assert n == device.irqs.info(index)[0] == device.irqs.state(index).count
        if n:
            fds = client.enable_irq(index, n)  # all n vectors: accepted
            assert all(f is not None for f in device.irqs.state(index).fds)
            client.set_irqs(index, NONE | TRIGGER, n - 1, 1)  # the last vector: accepted
            for f in fds:
                os.close(f)
        for start, count in [(n, 1), (0, n + 1), (n + 1, 0)]:
            with pytest.raises(ClientError) as e:
                client.set_irqs(index, NONE | MASK, start, count)
            assert e.value.errno == errno.EINVAL, (index, start, count)
        assert not any(device.irqs.state(index).masked)
        client.disable_irq(index)


@pytest.mark.parametrize(("index", "flags"), [(MSIX, EVENTFD | TRIGGER), (INTX, EVENTFD | UNMASK)],
                         ids=["trigger", "resample"])
def test_blocking_eventfd_made_non_blocking(
    ctl: IrqController, peer: Peer, index: int, flags: int
) -> None:
    # A blocking eventfd would let the client hang the server: a write at a full counter or a
    # read at zero blocks, with the controller's lock held.
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    mine = os.dup(fd)
    peer.dups.append(mine)
    ctl.set_irqs(index, flags, 0, 1, [fd], b"")
    assert not os.get_blocking(mine), "the controller made the shared description non-blocking"


def test_saturated_blocking_eventfd_does_not_hang_trigger(peer: Peer) -> None:
    ctl = IrqController(intx=False, msi_vectors=0, msix_vectors=1)  # not closed if it hangs
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    mine = os.dup(fd)
    peer.dups.append(mine)
    os.eventfd_write(mine, 0xFFFF_FFFF_FFFF_FFFE)  # one short of the maximum: a write blocks
    ctl.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 1, [fd], b"")
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(ctl.trigger(MSIX, 0)), daemon=True)
    t.start()
    t.join(60)  # a hang detector only: it returns at once unless the write blocks
    assert result == [True], "a saturated counter counts as signalled, and nothing blocks"
    ctl.close()


def test_repeated_unmask_like_qemu_eoi(ctl: IrqController, peer: Peer) -> None:
    """QEMU's EOI sends the same SET_IRQS(INTX, NONE|UNMASK) after every INTx interrupt: the
    second and later ones (validated once) act exactly like the first, and a bad request of
    the same kind is refused every time, not remembered."""
    trig, _ = setup_intx(ctl, peer)
    for _ in range(3):
        ctl.intx_assert()
        assert count(trig) == 1
        assert ctl.state(INTX).masked == (True,)
        ctl.set_irqs(INTX, NONE | UNMASK, 0, 1, [], b"")  # still high: fires, re-masks
        assert count(trig) == 1
        ctl.intx_deassert()
        ctl.set_irqs(INTX, NONE | UNMASK, 0, 1, [], b"")
        assert count(trig) == 0
        assert ctl.state(INTX).masked == (False,)
    for _ in range(2):
        expect_einval(ctl.set_irqs, INTX, NONE | UNMASK, 0, 2, [], b"")
        expect_einval(ctl.set_irqs, INTX, NONE | UNMASK | MASK, 0, 1, [], b"")
        expect_einval(ctl.set_irqs, 9, NONE | UNMASK, 0, 1, [], b"")
    # with fds the same shape is validated (and its fds checked) every time
    res, _ = peer.make()
    ctl.set_irqs(INTX, EVENTFD | UNMASK, 0, 1, res, b"")
    expect_einval(ctl.set_irqs, INTX, EVENTFD | UNMASK, 0, 1, [res[0]], b"")
