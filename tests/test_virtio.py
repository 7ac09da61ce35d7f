"""The virtio-pci transport and split virtqueues, driven through a real server by a Python
virtio driver (:mod:`vfio_user_server.virtio.driver`), the way Linux's virtio_pci does it."""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import MSIX_CAP_ID, find_capability, wait_until

from vfio_user_devices.virtio_rng import MAX_REQUEST, VirtioRng
from vfio_user_server.cli import make_device
from vfio_user_server.client import Client
from vfio_user_server.protocol.constants import IrqIndex, IrqSetFlag
from vfio_user_server.server import Server
from vfio_user_server.virtio import Status, VirtioPciDevice, Virtqueue, VirtqueueError
from vfio_user_server.virtio.driver import DriverQueue, VirtioPciDriver
from vfio_user_server.virtio.pci import VIRTIO_BAR
from vfio_user_server.virtio.spec import (
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    F_VERSION_1,
    ISR_CONFIG,
    ISR_QUEUE,
    NO_VECTOR,
    PACKED_DESC,
    PACKED_DESC_F_AVAIL,
    CfgType,
    CommonCfg,
    bit,
)

WAIT = 10.0
RAM = 16 << 20
DRIVER_MEMORY = (0x100000, 12 << 20)


class Echo(VirtioPciDevice):
    """A test device: each request's readable bytes, reversed, go to its writable buffers."""

    virtio_device_id = 0x3F
    device_features = bit(0) | bit(5)
    num_queues = 2
    queue_size = 64
    msix_vectors = 3
    config_size = 8

    def __init__(self) -> None:
        self.magic = 0x1234
        super().__init__()

    def virtio_config(self) -> bytes:
        return struct.pack("<II", self.magic, 0xCAFE)

    def virtio_config_write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) == 4:
            self.magic = int.from_bytes(data, "little")

    def features_ok(self, features: int) -> bool:
        return not features & bit(5)  # bit 5 is offered but may not be taken

    def process_queue(self, vq: Virtqueue) -> None:
        while (chain := vq.pop()) is not None:
            data = chain.read()[::-1][:chain.writable_length]
            vq.push(chain, chain.write(data))


class Rig:
    def __init__(self, path: Path, dev: VirtioPciDevice, *, fd_backed: bool = True,
                 sealed: bool = False) -> None:
        self.dev = dev
        self.fd_backed = fd_backed
        self.sealed = sealed
        self.server = Server(dev, path).start()
        self.c = Client.connect(path, timeout=WAIT)
        self.c.negotiate()
        self.c.get_device_info()
        self.c.add_memory(0, RAM, fd_backed=fd_backed, sealed=sealed)
        self.c.config_write(0x04, 2, 0x6)  # memory space, bus master
        self.d = VirtioPciDriver(self.c, memory=DRIVER_MEMORY, wait=WAIT)

    def msix(self) -> list[int]:
        cap = find_capability(self.c, MSIX_CAP_ID)
        self.c.config_write(cap + 2, 2, self.c.config_read(cap + 2, 2) | 0x8000)
        n = self.dev.msix_vectors
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
        for start in range(0, n, 16):  # QEMU sends at most 16 fds per message
            chunk = fds[start:start + 16]
            self.c.set_irqs(IrqIndex.MSIX, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER,
                            start, len(chunk), chunk)
        self.fds = fds
        return fds

    def intx(self) -> int:
        return self.c.enable_irq(IrqIndex.INTX, 1)[0]

    def idle(self) -> None:
        """Wait until the device's worker has finished (interrupts decided)."""
        wait_until(lambda: not self.dev._draining, WAIT, "the virtio worker to go idle")

    def ready(self, queues: int = 1, *, features: int | None = None, vectors: bool = True,
              size: int | None = None) -> None:
        if features is None:
            features = self.d.device_features() & ~bit(5)  # Echo refuses bit 5
        status = self.d.initialize(features)
        assert status & Status.FEATURES_OK
        if vectors:
            self.d.common_write(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)
        for q in range(queues):
            self.d.setup_queue(q, size, vector=q + 1 if vectors else NO_VECTOR)
        self.d.driver_ok()

    def close(self) -> None:
        self.c.close()
        self.server.close()
        for fd in getattr(self, "fds", []):
            os.close(fd)


def fired(fd: int, timeout: float = WAIT) -> int:
    r, _, _ = select.select([fd], [], [], timeout)
    return Client.eventfd_count(fd) if r else 0


class InlineEcho(Echo):
    inline = True


@pytest.fixture(params=["sealed", "memfd", "message", "sealed-inline", "memfd-inline",
                        "message-inline"])
def rig(request: pytest.FixtureRequest, sock_dir: Path) -> Iterator[Rig]:
    """Guest RAM: a sealed memfd (zero-copy, the queues' windows), an unsealed one (guarded
    copies) or anonymous memory (message DMA)."""
    dev = InlineEcho() if request.param.endswith("inline") else Echo()
    r = Rig(sock_dir / "v.sock", dev, fd_backed=not request.param.startswith("message"),
            sealed=request.param.startswith("sealed"))
    yield r
    r.close()


@pytest.fixture
def rng(sock_dir: Path) -> Iterator[Rig]:
    r = Rig(sock_dir / "r.sock", VirtioRng())
    yield r
    r.close()


# --- identity and capabilities ----------------------------------------------------------------


def test_identity_and_capabilities(rig: Rig) -> None:
    c, d = rig.c, rig.d
    assert c.config_read(0, 2) == 0x1AF4
    assert c.config_read(2, 2) == 0x1040 + 0x3F
    assert c.config_read(8, 1) == 1  # revision 1: modern only
    bar, off, length = d.caps[CfgType.COMMON][1:]
    assert (bar, off, length) == (VIRTIO_BAR, 0, 0x40)
    assert d.caps[CfgType.ISR][1:] == (VIRTIO_BAR, 0x1000, 1)
    assert d.caps[CfgType.DEVICE][1:] == (VIRTIO_BAR, 0x2000, 8)
    assert d.caps[CfgType.NOTIFY][1:] == (VIRTIO_BAR, 0x3000, 8)
    assert d.notify_multiplier == 4
    assert CfgType.PCI in d.caps
    assert d.common_read(CommonCfg.NUM_QUEUES, 2) == 2
    # no I/O BAR (no legacy interface): BAR0 reads 0
    assert c.config_read(0x10, 4) == 0


def test_pci_cfg_access_capability(rig: Rig) -> None:
    c, d = rig.c, rig.d
    pos = d.caps[CfgType.PCI][0]
    c.config_write(pos + 4, 1, VIRTIO_BAR)
    c.config_write(pos + 8, 4, CommonCfg.NUM_QUEUES)
    c.config_write(pos + 12, 4, 2)
    assert c.config_read(pos + 16, 4) == 2
    # a write through the window: the status register
    c.config_write(pos + 8, 4, CommonCfg.DEVICE_STATUS)
    c.config_write(pos + 12, 4, 1)
    c.config_write(pos + 16, 4, Status.ACKNOWLEDGE)
    assert d.status == Status.ACKNOWLEDGE


def test_device_config_read_and_write(rig: Rig) -> None:
    d = rig.d
    assert d.config_read(0, 4) == 0x1234
    assert d.config_read(4, 2) == 0xCAFE
    assert d.config_read(8, 4) == 0  # past the end: 0
    rig.c.bar_write(VIRTIO_BAR, 0x2000, 4, 0x55AA)
    assert d.config_read(0, 4) == 0x55AA
    gen = d.common_read(CommonCfg.CONFIG_GENERATION, 1)
    rig.dev.config_changed()
    assert d.common_read(CommonCfg.CONFIG_GENERATION, 1) == (gen + 1) & 0xFF


# --- features and status ----------------------------------------------------------------------


def test_features_offered(rig: Rig) -> None:
    d = rig.d
    offered = d.device_features()
    assert offered == (bit(0) | bit(5) | bit(F_VERSION_1) | bit(F_RING_INDIRECT_DESC)
                       | bit(F_RING_EVENT_IDX))
    # feature select past the 64 bits reads 0
    d.common_write(CommonCfg.DEVICE_FEATURE_SELECT, 4, 2)
    assert d.common_read(CommonCfg.DEVICE_FEATURE, 4) == 0


@pytest.mark.parametrize("features, ok", [
    (bit(F_VERSION_1), True),
    (bit(F_VERSION_1) | bit(0) | bit(F_RING_EVENT_IDX), True),
    (bit(0), False),                              # VERSION_1 is required: no legacy
    (bit(F_VERSION_1) | bit(7), False),           # not offered
    (bit(F_VERSION_1) | bit(5), False),           # refused by the device's features_ok
])  # fmt: skip
def test_feature_negotiation(rig: Rig, features: int, ok: bool) -> None:
    status = rig.d.initialize(features)
    assert bool(status & Status.FEATURES_OK) == ok
    assert rig.dev.driver_features == features
    if not ok:
        rig.d.driver_ok()
        assert not rig.d.status & Status.DRIVER_OK


def test_features_frozen_after_features_ok(rig: Rig) -> None:
    rig.d.initialize(bit(F_VERSION_1))
    rig.d.common_write(CommonCfg.DRIVER_FEATURE_SELECT, 4, 0)
    rig.d.common_write(CommonCfg.DRIVER_FEATURE, 4, 1)
    assert rig.dev.driver_features == bit(F_VERSION_1)


def test_reset_by_status_zero(rig: Rig) -> None:
    rig.ready(2)
    assert rig.d.request(0, [b"abc"], [3]).data == b"cba"
    assert all(q.enabled for q in rig.dev.queues)
    rig.d.reset()
    assert rig.d.status == 0
    assert not any(q.enabled for q in rig.dev.queues)
    assert rig.dev.driver_features == 0
    assert rig.d.common_read(CommonCfg.CONFIG_MSIX_VECTOR, 2) == NO_VECTOR
    # and it works again from scratch
    rig.ready(2)
    assert rig.d.request(1, [b"xyz"], [3]).data == b"zyx"


def test_device_reset_message_resets_virtio_state(rig: Rig) -> None:
    rig.ready(1)
    rig.c.reset()
    # status reads non-zero while the worker may still touch guest memory, then 0
    wait_until(lambda: rig.d.status == 0, WAIT, "status 0")
    assert not rig.dev.queues[0].enabled


def test_queue_registers(rig: Rig) -> None:
    d = rig.d
    d.initialize()
    d.common_write(CommonCfg.QUEUE_SELECT, 2, 1)
    assert d.common_read(CommonCfg.QUEUE_SIZE, 2) == 64
    assert d.common_read(CommonCfg.QUEUE_NOTIFY_OFF, 2) == 1
    assert d.common_read(CommonCfg.QUEUE_ENABLE, 2) == 0
    d.common_write64(CommonCfg.QUEUE_DESC, 0x1234_5678_9000)
    assert d.common_read(CommonCfg.QUEUE_DESC, 4) == 0x5678_9000
    assert d.common_read(CommonCfg.QUEUE_DESC + 4, 4) == 0x1234
    assert d.common_read(CommonCfg.QUEUE_DESC, 8) == 0x1234_5678_9000
    # vectors: in the table, or NO_VECTOR
    d.common_write(CommonCfg.QUEUE_MSIX_VECTOR, 2, 2)
    assert d.common_read(CommonCfg.QUEUE_MSIX_VECTOR, 2) == 2
    d.common_write(CommonCfg.QUEUE_MSIX_VECTOR, 2, 3)
    assert d.common_read(CommonCfg.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    d.common_write(CommonCfg.CONFIG_MSIX_VECTOR, 2, 99)
    assert d.common_read(CommonCfg.CONFIG_MSIX_VECTOR, 2) == NO_VECTOR
    # a queue that does not exist
    d.common_write(CommonCfg.QUEUE_SELECT, 2, 2)
    assert d.common_read(CommonCfg.QUEUE_SIZE, 2) == 0
    d.common_write(CommonCfg.QUEUE_ENABLE, 2, 1)  # ignored
    assert d.status & Status.DEVICE_NEEDS_RESET == 0


# --- requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
def test_requests_with_msix(rig: Rig, indirect: bool) -> None:
    fds = rig.msix()
    rig.ready(2)
    for q in (0, 1):
        data = os.urandom(3000)
        done = rig.d.request(q, [data[:1000], data[1000:]], [100, 2900], indirect=indirect)
        assert done.written == 3000
        assert done.data == data[::-1]
        assert fired(fds[q + 1]) >= 1
    rig.idle()
    assert Client.eventfd_count(fds[0]) == 0  # no config interrupt


def test_short_writable_space(rig: Rig) -> None:
    rig.ready(1, vectors=False)
    done = rig.d.request(0, [b"0123456789"], [4])
    assert (done.written, done.data) == (4, b"9876")


def test_intx_and_isr(rig: Rig) -> None:
    efd = rig.intx()
    rig.ready(1, vectors=False)
    done = rig.d.request(0, [b"hello"], [5])
    assert done.data == b"olleh"
    assert fired(efd) >= 1
    rig.idle()
    assert rig.dev.intx_level
    assert rig.d.read_isr() == ISR_QUEUE
    assert not rig.dev.intx_level
    assert rig.d.read_isr() == 0  # read clears


def test_msix_without_vector_is_silent(rig: Rig) -> None:
    fds = rig.msix()
    rig.ready(1, vectors=False)  # every vector NO_VECTOR
    rig.d.request(0, [b"a"], [1])
    rig.idle()
    assert [Client.eventfd_count(fd) for fd in fds] == [0, 0, 0]
    assert rig.dev.isr == 0  # with MSI-X on, ISR is not used for queues


def test_many_requests_wrap_the_rings(rig: Rig) -> None:
    rig.ready(1, vectors=False, size=8)
    for i in range(3 * 0x10000 // 0x1000 + 20):  # more than the ring size many times
        data = i.to_bytes(4, "little")
        assert rig.d.request(0, [data], [4]).data == data[::-1]
    assert rig.d.used_idx(0) == 68


def test_batch_of_requests(rig: Rig) -> None:
    rig.ready(1, vectors=False)
    heads = [rig.d.add(0, [bytes([i]) * 3], [3], notify=False) for i in range(20)]
    rig.d.kick(rig.d.queues[0])
    got = [rig.d.wait(0) for _ in heads]
    assert [g.head for g in got] == heads
    assert [g.data for g in got] == [bytes([i]) * 3 for i in range(20)]


def test_requests_before_driver_ok_wait_for_it(rig: Rig) -> None:
    rig.d.initialize(rig.d.device_features() & ~bit(5))
    rig.d.setup_queue(0)
    rig.d.add(0, [b"early"], [5])
    assert rig.d.get(0) is None
    rig.d.driver_ok()
    assert rig.d.wait(0).data == b"ylrae"


def test_event_idx_suppresses_interrupts(rig: Rig) -> None:
    fds = rig.msix()
    rig.ready(1)
    assert rig.d.has(F_RING_EVENT_IDX)
    rig.d.request(0, [b"1"], [1])
    assert fired(fds[1]) == 1
    # the driver asks for an interrupt only once used idx passes 5
    rig.d.set_used_event(0, 5)
    for _ in range(4):
        rig.d.request(0, [b"2"], [1])  # used idx 2..5
    rig.idle()
    assert Client.eventfd_count(fds[1]) == 0
    rig.d.request(0, [b"3"], [1])  # used idx 6: crosses 5
    assert fired(fds[1]) == 1
    rig.idle()
    # the device asks to be notified at the next request: avail_event = last_avail
    q = rig.d.queues[0]
    avail_event = struct.unpack("<H", rig.c.read_memory(q.used + 4 + 8 * q.size, 2))[0]
    assert avail_event == 6


def test_no_interrupt_flag_without_event_idx(rig: Rig) -> None:
    fds = rig.msix()
    rig.ready(1, features=bit(F_VERSION_1) | bit(F_RING_INDIRECT_DESC))
    rig.d.set_avail_flags(0, 1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    rig.d.request(0, [b"1"], [1])
    rig.idle()
    assert Client.eventfd_count(fds[1]) == 0
    rig.d.set_avail_flags(0, 0)
    rig.d.request(0, [b"1"], [1])
    assert fired(fds[1]) == 1
    rig.idle()
    # the device clears NO_NOTIFY when it is done: the driver notifies
    assert struct.unpack("<H", rig.c.read_memory(rig.d.queues[0].used, 2))[0] == 0


# --- bad rings and chains ---------------------------------------------------------------------


def _needs_reset(rig: Rig, fds: list[int]) -> None:
    wait_until(lambda: bool(rig.d.status & Status.DEVICE_NEEDS_RESET), WAIT, "NEEDS_RESET")
    assert fired(fds[0]) >= 1  # the config interrupt


BadChain = Callable[[Rig, DriverQueue], None]
#: hand-made chains at descriptor 0 that the device must refuse
BAD_CHAINS: dict[str, BadChain] = {}


def _chain(name: str) -> Callable[[BadChain], BadChain]:
    def register(fn: BadChain) -> BadChain:
        BAD_CHAINS[name] = fn
        return fn
    return register


@_chain("loop")
def _loop(rig: Rig, q: DriverQueue) -> None:
    buf = rig.d.alloc(16)
    for i in range(4):
        rig.d.write_desc(q, i, buf, 1, DESC_F_NEXT, (i + 1) % 4)


@_chain("next-out-of-range")
def _next_oob(rig: Rig, q: DriverQueue) -> None:
    rig.d.write_desc(q, 0, rig.d.alloc(16), 1, DESC_F_NEXT, 64)


@_chain("unmapped-buffer")
def _unmapped(rig: Rig, q: DriverQueue) -> None:
    rig.d.write_desc(q, 0, RAM + 0x1000, 16, 0, 0)


@_chain("wrapping-buffer")
def _wrapping(rig: Rig, q: DriverQueue) -> None:
    rig.d.write_desc(q, 0, (1 << 64) - 8, 16, 0, 0)


@_chain("readable-after-writable")
def _order(rig: Rig, q: DriverQueue) -> None:
    buf = rig.d.alloc(16)
    rig.d.write_desc(q, 0, buf, 1, DESC_F_WRITE | DESC_F_NEXT, 1)
    rig.d.write_desc(q, 1, buf, 1, 0, 0)


@_chain("indirect-with-next")
def _indirect_next(rig: Rig, q: DriverQueue) -> None:
    table = rig.d.alloc(16)
    rig.c.write_memory(table, DESC.pack(rig.d.alloc(4), 4, 0, 0))
    rig.d.write_desc(q, 0, table, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)


@_chain("indirect-bad-length")
def _indirect_len(rig: Rig, q: DriverQueue) -> None:
    rig.d.write_desc(q, 0, rig.d.alloc(32), 24, DESC_F_INDIRECT, 0)


@_chain("indirect-too-long")
def _indirect_long(rig: Rig, q: DriverQueue) -> None:
    rig.d.write_desc(q, 0, rig.d.alloc(16), 16 * 1025, DESC_F_INDIRECT, 0)


@_chain("nested-indirect")
def _nested(rig: Rig, q: DriverQueue) -> None:
    table = rig.d.alloc(16)
    rig.c.write_memory(table, DESC.pack(table, 16, DESC_F_INDIRECT, 0))
    rig.d.write_desc(q, 0, table, 16, DESC_F_INDIRECT, 0)


@_chain("indirect-next-out-of-table")
def _indirect_oob(rig: Rig, q: DriverQueue) -> None:
    table = rig.d.alloc(32)
    rig.c.write_memory(table, DESC.pack(rig.d.alloc(4), 4, DESC_F_NEXT, 2)
                       + DESC.pack(0, 0, 0, 0))
    rig.d.write_desc(q, 0, table, 32, DESC_F_INDIRECT, 0)


@_chain("indirect-table-unmapped")
def _indirect_unmapped(rig: Rig, q: DriverQueue) -> None:
    rig.d.write_desc(q, 0, RAM - 8, 16, DESC_F_INDIRECT, 0)


@pytest.mark.parametrize("name", sorted(BAD_CHAINS))
def test_bad_chain_needs_reset(rig: Rig, name: str) -> None:
    fds = rig.msix()
    rig.ready(1)
    q = rig.d.queues[0]
    q.free.remove(0)
    q.inflight[0] = ([0], [])
    BAD_CHAINS[name](rig, q)
    rig.d.publish(q, [0])
    _needs_reset(rig, fds)
    # the queue stands still until the reset; then the device works again
    assert rig.d.get(0) is None
    rig.d.reset()
    rig.ready(1)
    assert rig.d.request(0, [b"ok"], [2]).data == b"ko"


def test_bad_head_and_avail_index(rig: Rig) -> None:
    fds = rig.msix()
    rig.ready(1)
    q = rig.d.queues[0]
    rig.c.write_memory(q.avail + 4, struct.pack("<H", 64))  # head 64 of a 64-entry queue
    rig.c.write_memory(q.avail + 2, struct.pack("<H", 1))
    rig.d.kick(q)
    _needs_reset(rig, fds)
    rig.d.reset()
    rig.ready(1)
    q = rig.d.queues[0]
    rig.c.write_memory(q.avail + 2, struct.pack("<H", 65))  # 65 ahead of 0 in a 64-entry queue
    rig.d.kick(q)
    _needs_reset(rig, fds)


def test_bad_queue_configuration(rig: Rig) -> None:
    fds = rig.msix()
    rig.d.initialize()
    rig.d.common_write(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)
    rig.d.setup_queue(0, 48, enable=False)  # not a power of two
    rig.d.common_write(CommonCfg.QUEUE_ENABLE, 2, 1)
    assert rig.d.status & Status.DEVICE_NEEDS_RESET
    assert fired(fds[0]) >= 1
    rig.d.reset()
    rig.d.initialize()
    q = rig.d.setup_queue(0, 64, enable=False)
    rig.d.common_write64(CommonCfg.QUEUE_DESC, q.desc + 8)  # misaligned
    rig.d.common_write(CommonCfg.QUEUE_ENABLE, 2, 1)
    assert rig.d.status & Status.DEVICE_NEEDS_RESET


def test_needs_reset_with_intx_sets_isr_config(rig: Rig) -> None:
    efd = rig.intx()
    rig.ready(1, vectors=False)
    rig.dev.needs_reset("test")
    assert fired(efd) >= 1
    assert rig.d.read_isr() & ISR_CONFIG
    assert rig.d.status & Status.DEVICE_NEEDS_RESET


def test_handler_error_needs_reset(sock_dir: Path) -> None:
    class Broken(Echo):
        def process_queue(self, vq: Virtqueue) -> None:
            chain = vq.pop()
            assert chain is not None
            chain.read(0, 10**6)  # beyond its readable bytes

    r = Rig(sock_dir / "b.sock", Broken())
    try:
        r.ready(1, vectors=False)
        r.d.add(0, [b"x"], [1])
        wait_until(lambda: bool(r.d.status & Status.DEVICE_NEEDS_RESET), WAIT, "NEEDS_RESET")
    finally:
        r.close()


def test_virtqueue_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        Virtqueue(0, 100)
    with pytest.raises(VirtqueueError):
        Virtqueue(0, 8).pop()


# --- virtio-rng -------------------------------------------------------------------------------


def test_rng_gives_entropy(rng: Rig) -> None:
    fds = rng.msix()
    rng.ready(1)
    a = rng.d.request(0, [], [64])
    b = rng.d.request(0, [], [32, 32], indirect=True)
    assert a.written == b.written == 64
    assert a.data != b.data and a.data != bytes(64)
    assert fired(fds[1]) >= 1
    big = rng.d.request(0, [], [MAX_REQUEST + 4096])
    assert big.written == MAX_REQUEST
    assert isinstance(rng.dev, VirtioRng)
    assert rng.dev.bytes_given == 128 + MAX_REQUEST


def test_rng_by_name() -> None:
    dev = make_device("virtio-rng")
    assert isinstance(dev, VirtioRng)
    assert dev.device_id == 0x1044
    assert "virtio-rng" in dev.guest_modules


def test_rng_has_no_device_configuration(rng: Rig) -> None:
    assert CfgType.DEVICE not in rng.d.caps  # Linux refuses a structure of length 0


def test_rng_queue_count(rng: Rig) -> None:
    rng.d.initialize()
    assert rng.d.common_read(CommonCfg.NUM_QUEUES, 2) == 1
    with pytest.raises(LookupError):
        rng.d.setup_queue(1)


def test_dead_queue_is_ignored_after_disconnect(sock_dir: Path) -> None:
    dev = Echo()
    r = Rig(sock_dir / "d.sock", dev)
    r.ready(1, vectors=False)
    assert r.d.request(0, [b"ab"], [2]).data == b"ba"
    r.close()
    wait_until(lambda: not dev.connected, WAIT, "disconnect")
    assert dev.status == 0 and not dev.queues[0].enabled


# --- packed virtqueues ------------------------------------------------------------------------


class PackedEcho(Echo):
    ring_packed = True


@pytest.fixture(params=["memfd", "message"])
def packed(request: pytest.FixtureRequest, sock_dir: Path) -> Iterator[Rig]:
    r = Rig(sock_dir / "p.sock", PackedEcho(), fd_backed=request.param == "memfd")
    yield r
    r.close()


def test_packed_offered_only_when_asked(rig: Rig, packed: Rig) -> None:
    assert not rig.d.device_features() & bit(F_RING_PACKED)
    assert packed.d.device_features() & bit(F_RING_PACKED)


@pytest.mark.parametrize("indirect", [False, True])
def test_packed_requests(packed: Rig, indirect: bool) -> None:
    fds = packed.msix()
    packed.ready(2, size=16)
    assert packed.d.has(F_RING_PACKED)
    assert all(q.packed for q in packed.dev.queues)
    for q in (0, 1):
        data = os.urandom(3000)
        done = packed.d.request(q, [data[:1000], data[1000:]], [100, 2900], indirect=indirect)
        assert done.written == 3000 and done.data == data[::-1]
        assert fired(fds[q + 1]) >= 1


def test_packed_wraps_many_times(packed: Rig) -> None:
    packed.ready(1, vectors=False, size=8)
    for i in range(50):  # 3-entry chains in an 8-entry ring: the wrap lands mid-chain
        data = i.to_bytes(4, "little")
        assert packed.d.request(0, [data[:2], data[2:]], [4]).data == data[::-1]
    assert packed.d.get(0) is None


def test_packed_batch_out_of_order_slots(packed: Rig) -> None:
    packed.ready(1, vectors=False, size=16)
    heads = [packed.d.add(0, [bytes([i])] * (1 + i % 3), [3], notify=False) for i in range(5)]
    packed.d.kick(packed.d.queues[0])
    got = [packed.d.wait(0) for _ in heads]
    assert [g.head for g in got] == heads
    assert [g.data[:g.written] for g in got] == [bytes([i]) * (1 + i % 3) for i in range(5)]
    assert all(g.written == min(3, 1 + i % 3) for i, g in enumerate(got))


def test_packed_event_suppression(packed: Rig) -> None:
    fds = packed.msix()
    packed.ready(1, size=16)
    q = packed.d.queues[0]
    packed.d.request(0, [b"1"], [1])
    assert fired(fds[1]) == 1
    packed.idle()
    # the device asks for a notification at its next position (EVENT_IDX: DESC mode)
    off_wrap, flags = struct.unpack("<HH", packed.c.read_memory(q.used, 4))
    assert (off_wrap, flags) == (2 | 1 << 15, 2)
    # the driver disables interrupts
    packed.c.write_memory(q.avail, struct.pack("<HH", 0, 1))
    packed.d.request(0, [b"2"], [1])
    packed.idle()
    assert Client.eventfd_count(fds[1]) == 0
    # and asks for one when the used entry at position 8 is written
    packed.c.write_memory(q.avail, struct.pack("<HH", 8 | 1 << 15, 2))
    for _ in range(2):
        packed.d.request(0, [b"3"], [1])  # entries at 4 and 6
    packed.idle()
    assert Client.eventfd_count(fds[1]) == 0
    packed.d.request(0, [b"4"], [1])  # entry at 8
    assert fired(fds[1]) == 1


def _packed_bad(packed: Rig, entries: list[tuple[int, int, int]]) -> None:
    fds = packed.msix()
    packed.ready(1, size=8)
    q = packed.d.queues[0]
    for i, (addr, length, flags) in enumerate(entries):
        packed.c.write_memory(q.desc + 16 * i,
                              PACKED_DESC.pack(addr, length, 0, flags | PACKED_DESC_F_AVAIL))
    packed.d.kick(q)
    _needs_reset(packed, fds)
    packed.d.reset()
    packed.ready(1, size=8)
    assert packed.d.request(0, [b"ok"], [2]).data == b"ko"


def test_packed_bad_unmapped_buffer(packed: Rig) -> None:
    _packed_bad(packed, [(RAM + 0x1000, 16, 0)])


def test_packed_bad_chain_longer_than_ring(packed: Rig) -> None:
    _packed_bad(packed, [(0x1000, 1, DESC_F_NEXT)] * 8)


def test_packed_bad_indirect_with_next(packed: Rig) -> None:
    _packed_bad(packed, [(0x1000, 16, DESC_F_INDIRECT | DESC_F_NEXT), (0x1000, 1, 0)])


def test_packed_bad_indirect_length(packed: Rig) -> None:
    _packed_bad(packed, [(0x1000, 20, DESC_F_INDIRECT)])


def test_packed_bad_readable_after_writable(packed: Rig) -> None:
    _packed_bad(packed, [(0x1000, 1, DESC_F_WRITE | DESC_F_NEXT), (0x1000, 1, 0)])


def test_packed_queue_size_need_not_be_a_power_of_two(packed: Rig) -> None:
    packed.ready(1, vectors=False, size=12)
    for i in range(30):
        assert packed.d.request(0, [bytes([i, 1])], [2]).data == bytes([1, i])


def test_reset_stops_a_busy_worker(sock_dir: Path) -> None:
    """A reset while the worker is inside process_queue: status reads non-zero until the
    worker is out, and the old queue gives it nothing more."""
    import threading

    entered, release = threading.Event(), threading.Event()

    class Slow(Echo):
        def process_queue(self, vq: Virtqueue) -> None:
            chain = vq.pop()
            if chain is None:
                return
            entered.set()
            release.wait(WAIT)
            vq.push(chain, chain.write(b"late"))
            self.after_reset = vq.pop()

    dev = Slow()
    r = Rig(sock_dir / "s.sock", dev)
    try:
        r.ready(1, vectors=False)
        r.d.add(0, [b"x"], [4])
        r.d.add(0, [b"y"], [4])
        assert entered.wait(WAIT)
        r.d.common_write(CommonCfg.DEVICE_STATUS, 1, 0)
        assert r.d.status != 0  # the worker may still touch guest memory
        release.set()
        wait_until(lambda: r.d.status == 0, WAIT, "status 0 after the worker left")
        assert dev.after_reset is None
        assert r.d.used_idx(0) == 0  # the dead queue's push went nowhere
    finally:
        release.set()
        r.close()


def test_inline_hands_message_dma_to_the_worker(sock_dir: Path) -> None:
    """Rings in fd-backed memory, a buffer in memory without an fd: the loop thread leaves
    that request (unconsumed) to the worker, which completes it by DMA messages."""
    dev = InlineEcho()
    r = Rig(sock_dir / "i.sock", dev)
    try:
        r.c.add_memory(RAM, 1 << 20, fd_backed=False)
        r.ready(1, vectors=False)
        assert r.d.request(0, [b"direct"], [6]).data == b"tcerid"
        q = r.d.queues[0]
        r.c.write_memory(RAM + 0x100, b"by message")
        head = q.free.pop(0)
        second = q.free.pop(0)
        r.d.write_desc(q, head, RAM + 0x100, 10, DESC_F_NEXT, second)
        out = r.d.alloc(10)
        r.d.write_desc(q, second, out, 10, DESC_F_WRITE, 0)
        q.inflight[head] = ([head, second], [(out, 10)])
        r.d.publish(q, [head])
        done = r.d.wait(0)
        assert done.data == b"egassem yb"
        assert not r.d.status & Status.DEVICE_NEEDS_RESET
        assert ("read", RAM + 0x100, 10) in r.c.dma_requests
    finally:
        r.close()


def test_rings_follow_a_remap_of_guest_ram(rig: Rig) -> None:
    """The queue's cached windows onto guest RAM are dropped when the map table changes:
    after the client replaces its RAM (same addresses, new memory), requests are read from
    and completed in the new memory."""
    rig.ready(1)
    for _ in range(3):
        assert rig.d.request(0, [b"abc"], [3]).data == b"cba"
    rig.idle()
    old = rig.c.read_memory(0, RAM)
    rig.c.dma_unmap(0, RAM)
    rig.c.add_memory(0, RAM, fd_backed=rig.fd_backed, sealed=rig.sealed)
    rig.c.write_memory(0, old)
    for _ in range(3):
        assert rig.d.request(0, [b"xyz"], [3]).data == b"zyx"
