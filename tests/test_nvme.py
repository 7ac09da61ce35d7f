"""The NVMe controller through a real server and our QEMU-like client.

The tests act as a minimal NVMe driver written in Python: queues live in the client's memory
(memfd-backed, so the device reaches them directly, or fd-less, so it uses DMA_READ/WRITE
messages), commands are rung in through BAR0 doorbells, completions are polled by phase bit.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MSI_CAP_ID, MSIX_CAP_ID, WAIT, find_capability

from vfio_user_devices.nvme import BLOCK_SIZE, NvmeController, parse_size
from vfio_user_devices.nvme_admin import AdminCommands
from vfio_user_devices.nvme_io import IoCommands
from vfio_user_devices.nvme_spec import (
    CQE,
    SQE,
    SQE_CID,
    SQE_NSID,
    SQE_OPCODE,
    SQE_PRP1,
    SQE_PRP2,
    STATUS_DNR,
    AdminOpcode,
    Feature,
    IoOpcode,
    NvmeError,
    Status,
    cq_interrupts,
    cq_vector,
    dsm_deallocate,
    dsm_ranges,
    feature_id,
    feature_save,
    feature_select,
    feature_value,
    fused,
    identify_cns,
    log_page_dwords,
    log_page_id,
    log_page_offset,
    make_queue_counts,
    prp_ranges,
    queue_contiguous,
    queue_counts,
    queue_id,
    queue_size,
    rw_fua,
    rw_nlb,
    rw_slba,
    sq_cqid,
    uses_sgl,
)
from vfio_user_server.cli import make_device
from vfio_user_server.client import Client, MemoryRegion
from vfio_user_server.protocol.constants import IrqIndex, IrqSetFlag
from vfio_user_server.server import Server
from vfio_user_server.testing import Served, serve

PAGE = 4096
RAM = 64 << 20
ASQ, ACQ = 0x10000, 0x14000
IDENT = 0x80000
PRPLIST = 0x90000
DATA = 0x100000
QDEPTH = 64


def sq_base(qid: int) -> int:
    return 0x200000 + qid * 0x20000


def cq_base(qid: int) -> int:
    return 0x210000 + qid * 0x20000


class Cqe:
    def __init__(self, raw: bytes) -> None:
        self.dw0, _, self.sq_head, self.sqid, self.cid, sf = CQE.unpack(raw)
        self.phase: int = sf & 1
        self.status: int = sf >> 1

    @property
    def code(self) -> int:
        """Status without DNR/M/CRD."""
        return self.status & 0x7FF

    def __repr__(self) -> str:
        return f"Cqe(cid={self.cid}, status={self.status:#x}, dw0={self.dw0:#x})"


class Driver:
    """Just enough of an NVMe host driver to drive the controller."""

    def __init__(self, c: Client, dev: NvmeController) -> None:
        self.c = c
        self.dev = dev
        self.sq: dict[int, tuple[int, int, int]] = {}  # qid -> (base, size, tail)
        self.cq: dict[int, list[int]] = {}  # qid -> [base, size, head, phase]
        self.cids = 0

    # registers
    def r32(self, off: int) -> int:
        return self.c.bar_read(0, off, 4)

    def r64(self, off: int) -> int:
        return self.c.bar_read(0, off, 8)

    def w32(self, off: int, value: int, posted: bool = False) -> None:
        self.c.bar_write(0, off, 4, value, posted=posted)

    def w64(self, off: int, value: int) -> None:
        self.c.bar_write(0, off, 8, value)

    def wait_csts(self, mask: int, value: int) -> int:
        deadline = time.monotonic() + WAIT
        while True:
            csts = self.r32(0x1C)
            if csts & mask == value:
                return csts
            if time.monotonic() > deadline:
                pytest.fail(f"CSTS {csts:#x}: never got {value:#x} under {mask:#x}")
            time.sleep(0.002)

    def enable(self, admin_depth: int = 32) -> None:
        self.w32(0x24, (admin_depth - 1) | (admin_depth - 1) << 16)
        self.w64(0x28, ASQ)
        self.w64(0x30, ACQ)
        self.c.write_memory(ACQ, bytes(admin_depth * 16))
        self.w32(0x14, 1 | 6 << 16 | 4 << 20)
        self.wait_csts(1, 1)
        self.sq = {0: (ASQ, admin_depth, 0)}
        self.cq = {0: [ACQ, admin_depth, 0, 1]}

    def disable(self) -> None:
        self.w32(0x14, 0)
        self.wait_csts(1, 0)
        self.sq.clear()
        self.cq.clear()

    # commands
    def submit(self, qid: int, opcode: int, *, nsid: int = 0, prp1: int = 0, prp2: int = 0,
               cdw: tuple[int, ...] = (), cid: int | None = None, flags: int = 0,
               ring: bool = True) -> int:
        if cid is None:
            self.cids = (self.cids + 1) & 0xFFFF
            cid = self.cids
        dws = (list(cdw) + [0] * 6)[:6]
        base, size, tail = self.sq[qid]
        self.c.write_memory(base + tail * 64,
                            SQE.pack(opcode, flags, cid, nsid, 0, 0, prp1, prp2, *dws))
        tail = (tail + 1) % size
        self.sq[qid] = (base, size, tail)
        if ring:
            self.ring_sq(qid)
        return cid

    def ring_sq(self, qid: int) -> None:
        self.w32(0x1000 + 8 * qid, self.sq[qid][2], posted=True)

    def poll(self, qid: int, timeout: float = WAIT) -> Cqe:
        base, size, head, phase = self.cq[qid]
        deadline = time.monotonic() + timeout
        while True:
            e = Cqe(self.c.read_memory(base + head * 16, 16))
            if e.phase == phase:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"no completion on CQ {qid}")
            time.sleep(0.0005)
        head += 1
        if head == size:
            head, phase = 0, phase ^ 1
        self.cq[qid][2:] = [head, phase]
        return e

    def ring_cq(self, qid: int) -> None:
        self.w32(0x1004 + 8 * qid, self.cq[qid][2], posted=True)

    def pending(self, qid: int) -> bool:
        base, _size, head, phase = self.cq[qid]
        return bool(Cqe(self.c.read_memory(base + head * 16, 16)).phase == phase)

    def cmd(self, qid: int, opcode: int, **kw: object) -> Cqe:
        cid = self.submit(qid, opcode, **kw)  # type: ignore[arg-type]
        e = self.poll(qid)
        self.ring_cq(qid)
        assert e.cid == cid
        assert e.sqid == qid
        return e

    def ok(self, qid: int, opcode: int, **kw: object) -> Cqe:
        e = self.cmd(qid, opcode, **kw)
        assert e.status == 0, f"opcode {opcode:#x}: status {e.status:#x}"
        return e

    def admin(self, opcode: int, **kw: object) -> Cqe:
        return self.cmd(0, opcode, **kw)

    def identify(self, cns: int, nsid: int = 0) -> bytes:
        self.c.write_memory(IDENT, b"\xaa" * PAGE)
        self.ok(0, AdminOpcode.IDENTIFY, nsid=nsid, prp1=IDENT, cdw=(cns,))
        return self.c.read_memory(IDENT, PAGE)

    def create_queues(self, qid: int, depth: int = QDEPTH, iv: int | None = None,
                      ien: bool = True) -> None:
        vector = qid if iv is None else iv
        self.c.write_memory(cq_base(qid), bytes(depth * 16))
        self.ok(0, AdminOpcode.CREATE_CQ, prp1=cq_base(qid),
                cdw=((depth - 1) << 16 | qid, vector << 16 | (2 if ien else 0) | 1))
        self.ok(0, AdminOpcode.CREATE_SQ, prp1=sq_base(qid),
                cdw=((depth - 1) << 16 | qid, qid << 16 | 1))
        self.sq[qid] = (sq_base(qid), depth, 0)
        self.cq[qid] = [cq_base(qid), depth, 0, 1]

    def prps(self, buf: int, length: int, list_at: int = PRPLIST) -> tuple[int, int]:
        """PRP1/PRP2 for a transfer at ``buf`` (page-aligned pages after the first)."""
        first = PAGE - buf % PAGE
        if length <= first:
            return buf, 0
        rest = [buf + first + i * PAGE for i in range((length - first + PAGE - 1) // PAGE)]
        if len(rest) == 1:
            return buf, rest[0]
        self.c.write_memory(list_at, struct.pack(f"<{len(rest)}Q", *rest))
        return buf, list_at

    def rw(self, qid: int, opcode: int, lba: int, nblocks: int, buf: int = DATA,
           fua: bool = False) -> Cqe:
        prp1, prp2 = self.prps(buf, nblocks * BLOCK_SIZE)
        return self.cmd(qid, opcode, nsid=1, prp1=prp1, prp2=prp2,
                        cdw=(lba & 0xFFFFFFFF, lba >> 32, (nblocks - 1) | (fua << 30)))


class Rig:
    """A Python NVMe driver over a controller served by :func:`serve`."""

    def __init__(self, served: Served[NvmeController]) -> None:
        self.dev = served.device
        self.c = served.client
        self.d = Driver(self.c, self.dev)

    def msix(self, vectors: int = 17) -> list[int]:
        cap = find_capability(self.c, MSIX_CAP_ID)
        ctrl = self.c.config_read(cap + 2, 2)
        self.c.config_write(cap + 2, 2, ctrl | 0x8000)
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]
        for start in range(0, vectors, 16):  # QEMU sends at most 16 fds per message
            chunk = fds[start:start + 16]
            self.c.set_irqs(IrqIndex.MSIX, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER,
                            start, len(chunk), chunk)
        return fds


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="nvme-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def map_sealed_ram(c: Client) -> None:
    """Guest RAM at IOVA 0 as QEMU's memfd backend makes it: sealed against shrinking, so the
    controller reaches it zero-copy (an unsealed memfd goes through guarded copies)."""
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, RAM)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    c.memory.append(MemoryRegion(0, RAM, fd, mmap.mmap(fd, RAM), 3))  # the client closes it
    c.dma_map(0, RAM, 3, fd=fd)


@pytest.fixture(params=["sealed", "memfd", "message"])
def rig(request: pytest.FixtureRequest, image: Path) -> Iterator[Rig]:
    dev = NvmeController(image)
    try:
        sealed = request.param == "sealed"
        with serve(dev, memory=0 if sealed else RAM, fd_backed=request.param == "memfd") as s:
            if sealed:
                map_sealed_ram(s.client)
            yield Rig(s)
    finally:
        dev.close()


@pytest.fixture
def ready(rig: Rig) -> Rig:
    rig.d.enable()
    rig.d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 3 | 3 << 16))
    rig.d.create_queues(1)
    return rig


def wait_fd(fd: int, timeout: float = WAIT) -> int:
    r, _, _ = select.select([fd], [], [], timeout)
    return Client.eventfd_count(fd) if r else 0


# --- pure parts ----------------------------------------------------------------------------------


def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64M") == 64 << 20
    assert parse_size("2g") == 2 << 30
    assert parse_size("1GiB") == 1 << 30
    with pytest.raises(ValueError):
        parse_size("lots")


def test_prp_ranges_single_double_and_chained_lists() -> None:
    lists: dict[int, list[int]] = {}

    def read(iova: int, n: int) -> bytes:
        base = iova & ~0xFFF
        entries = lists[base][(iova - base) // 8:(iova - base) // 8 + n // 8]
        return struct.pack(f"<{len(entries)}Q", *entries)

    assert prp_ranges(0x1000, 0, 512, read) == [(0x1000, 512)]
    assert prp_ranges(0x1800, 0x5000, 4096, read) == [(0x1800, 0x800), (0x5000, 0x800)]
    # contiguous pages merge
    assert prp_ranges(0x1000, 0x2000, 8192, read) == [(0x1000, 8192)]
    # a list spanning two list pages: 600 pages, the first list page holds 511 + a pointer
    pages = [0x100000 + 2 * i * 0x1000 for i in range(600)]
    lists[0x9000] = [*pages[:511], 0xA000]
    lists[0xA000] = pages[511:]
    out = prp_ranges(0x50000, 0x9000, 601 * 4096, read)
    assert out[0] == (0x50000, 4096)
    assert [a for a, _ in out[1:]] == pages
    assert sum(n for _, n in out) == 601 * 4096
    # misaligned entries
    with pytest.raises(NvmeError) as ei:
        prp_ranges(0x1000, 0x2004, 8192, read)
    assert ei.value.status is Status.INVALID_PRP_OFFSET
    lists[0xB000] = [0x3000, 0x4010]
    with pytest.raises(NvmeError):
        prp_ranges(0x1000, 0xB000, 3 * 4096, read)


def test_command_fields_and_dispatch_tables() -> None:
    """The named SQE fields decode what a driver packs; each opcode has one handler."""
    cmd = SQE.unpack(SQE.pack(IoOpcode.WRITE, 0x40, 0x1234, 1, 0, 0, 0x5000, 0x6000,
                              0x89ABCDEF, 0x12, 1 << 30 | 7, 0, 0, 0))
    assert (cmd[SQE_OPCODE], cmd[SQE_CID], cmd[SQE_NSID]) == (IoOpcode.WRITE, 0x1234, 1)
    assert (cmd[SQE_PRP1], cmd[SQE_PRP2]) == (0x5000, 0x6000)
    assert (rw_slba(cmd), rw_nlb(cmd), rw_fua(cmd)) == (0x12_89ABCDEF, 8, True)
    assert uses_sgl(cmd) and not fused(cmd)
    assert dsm_ranges(cmd) == 0xEF + 1 and not dsm_deallocate(cmd)
    plain = SQE.unpack(SQE.pack(IoOpcode.READ, 0x01, 1, 1, 0, 0, 0, 0, 0, 4, 0xFFFF, 0, 0, 0))
    assert (rw_nlb(plain), rw_fua(plain), fused(plain), uses_sgl(plain)) == \
        (0x10000, False, True, False)
    assert dsm_deallocate(plain)
    cq = SQE.unpack(SQE.pack(AdminOpcode.CREATE_CQ, 0, 1, 0, 0, 0, 0x10000, 0,
                             63 << 16 | 3, 5 << 16 | 3, 0, 0, 0, 0))
    assert (queue_id(cq), queue_size(cq), cq_vector(cq)) == (3, 64, 5)
    assert queue_contiguous(cq) and cq_interrupts(cq)
    sq = SQE.unpack(SQE.pack(AdminOpcode.CREATE_SQ, 0, 1, 0, 0, 0, 0x10000, 0,
                             1 << 16 | 4, 3 << 16, 0, 0, 0, 0))
    assert (queue_id(sq), queue_size(sq), sq_cqid(sq), queue_contiguous(sq)) == (4, 2, 3, False)
    log = SQE.unpack(SQE.pack(AdminOpcode.GET_LOG_PAGE, 0, 1, 0, 0, 0, 0, 0,
                              0x7F << 16 | 2, 1, 0x200, 1, 0, 0))
    assert (log_page_id(log), log_page_dwords(log), log_page_offset(log)) == \
        (2, (1 << 16 | 0x7F) + 1, 1 << 32 | 0x200)
    feat = SQE.unpack(SQE.pack(AdminOpcode.SET_FEATURES, 0, 1, 0, 0, 0, 0, 0,
                               1 << 31 | 3 << 8 | Feature.NUMBER_OF_QUEUES, 2 << 16 | 5,
                               0, 0, 0, 0))
    assert (feature_id(feat), feature_select(feat), feature_save(feat)) == \
        (Feature.NUMBER_OF_QUEUES, 3, True)
    assert queue_counts(feature_value(feat)) == (5, 2)
    assert make_queue_counts(5, 2) == feature_value(feat)
    assert identify_cns(SQE.unpack(SQE.pack(AdminOpcode.IDENTIFY, 0, 1, 0, 0, 0, 0, 0,
                                            0x1234_0001, 0, 0, 0, 0, 0))) == 1
    assert set(AdminCommands.HANDLERS) == set(AdminOpcode)
    assert set(IoCommands.HANDLERS) == set(IoOpcode)


def test_cli_options(tmp: Path) -> None:
    img = tmp / "new.img"
    dev = make_device("nvme", ["--image", str(img), "--size", "4M", "--queues", "2",
                               "--serial", "ABC"])
    assert isinstance(dev, NvmeController)
    try:
        assert img.stat().st_size == 4 << 20
        assert dev.blocks == (4 << 20) // 512
        assert dev.max_queues == 2
        assert dev.serial == "ABC"
    finally:
        dev.close()
    mem = make_device("nvme", ["--size", "1M"])
    assert isinstance(mem, NvmeController)
    assert mem.blocks == 2048 and mem.backend.path is None
    mem.close()


# --- registers -----------------------------------------------------------------------------------


def test_identity_and_registers(rig: Rig) -> None:
    c, d = rig.c, rig.d
    assert c.config_read(0, 4) == 0x7010_1B36
    assert c.config_read(8, 4) >> 8 == 0x010802
    cap = d.r64(0)
    assert cap & 0xFFFF == 1023  # MQES
    assert cap >> 16 & 1  # CQR
    assert cap >> 37 & 1  # CSS NVM
    assert (cap >> 32) & 0xF == 0  # DSTRD
    assert (cap >> 48) & 0xFF == 0  # MPSMIN/MAX 4K
    assert d.r32(0) | d.r32(4) << 32 == cap
    assert d.r32(8) == 0x00010400
    assert d.r32(0x1C) == 0
    d.w64(0x28, 0x1234_5678_9000)
    assert d.r64(0x28) == 0x1234_5678_9000
    assert d.r32(0x2C) == 0x1234
    d.w32(0x30, 0xABC000)
    d.w32(0x34, 0x7)
    assert d.r64(0x30) == 0x7_00AB_C000
    d.w32(0x24, 0x001F001F)
    assert d.r32(0x24) == 0x001F001F
    d.w32(0x0C, 0x5)
    assert d.r32(0x0C) == 5 and d.r32(0x10) == 5
    d.w32(0x10, 0x1)
    assert d.r32(0x0C) == 4
    # BAR layout: doorbells read as 0, MSI-X in BAR4
    assert d.r32(0x1000) == 0
    cap_off = find_capability(c, MSIX_CAP_ID)
    assert c.config_read(cap_off + 2, 2) & 0x7FF == 16
    assert c.config_read(cap_off + 4, 4) & 7 == 4


def test_enable_disable_and_bad_config(rig: Rig) -> None:
    d = rig.d
    d.enable()
    assert d.r32(0x14) & 1
    d.disable()
    # CC.MPS != 4K: controller fatal status, never ready
    d.w32(0x24, 0x000F000F)
    d.w64(0x28, ASQ)
    d.w64(0x30, ACQ)
    d.w32(0x14, 1 | 1 << 7)
    assert d.wait_csts(3, 2) & 1 == 0
    d.w32(0x14, 0)
    assert d.wait_csts(3, 0) == 0
    d.enable()


# --- admin ---------------------------------------------------------------------------------------


def test_identify(rig: Rig, image: Path) -> None:
    d = rig.d
    d.enable()
    ctrl = d.identify(1)
    vid, ssvid = struct.unpack_from("<HH", ctrl, 0)
    assert (vid, ssvid) == (0x1B36, 0x1B36)
    assert ctrl[4:24].decode().strip() == rig.dev.serial
    assert ctrl[24:64].decode().strip() == "pyvfio-user NVMe"
    assert ctrl[77] == 5  # MDTS
    assert struct.unpack_from("<I", ctrl, 80)[0] == 0x00010400
    assert ctrl[512] == 0x66 and ctrl[513] == 0x44
    assert struct.unpack_from("<I", ctrl, 516)[0] == 1  # NN
    assert struct.unpack_from("<H", ctrl, 520)[0] & 0x0C == 0x0C  # DSM, write zeroes
    assert ctrl[525] & 1  # VWC
    assert ctrl[768:800].startswith(b"nqn.")
    ns = d.identify(0, nsid=1)
    nsze, ncap, nuse = struct.unpack_from("<QQQ", ns, 0)
    assert nsze == ncap == nuse == image.stat().st_size // 512
    assert ns[25] == 0 and ns[26] == 0
    assert struct.unpack_from("<I", ns, 128)[0] >> 16 & 0xFF == 9
    lst = d.identify(2)
    assert struct.unpack_from("<2I", lst, 0) == (1, 0)
    lst = d.identify(2, nsid=1)
    assert struct.unpack_from("<I", lst, 0)[0] == 0
    desc = d.identify(3, nsid=1)
    assert desc[0] == 1 and desc[1] == 8  # EUI-64
    assert desc[12] == 2 and desc[13] == 16  # NGUID
    assert desc[16:32] == ns[104:120]
    assert desc[32] == 3 and desc[33] == 16  # UUID
    # bad CNS / namespaces
    assert d.admin(AdminOpcode.IDENTIFY, prp1=IDENT, cdw=(0x10,)).code == Status.INVALID_FIELD
    e = d.admin(AdminOpcode.IDENTIFY, nsid=2, prp1=IDENT, cdw=(0,))
    assert e.code == Status.INVALID_NAMESPACE and e.status & STATUS_DNR
    e = d.admin(AdminOpcode.IDENTIFY, nsid=0xFFFFFFFF, prp1=IDENT, cdw=(0,))
    assert e.code == Status.INVALID_NAMESPACE


def test_identify_with_prp_outside_ram_is_a_data_transfer_error(rig: Rig) -> None:
    d = rig.d
    d.enable()
    e = d.admin(AdminOpcode.IDENTIFY, prp1=RAM + 0x100000, cdw=(1,))
    assert e.code == Status.DATA_TRANSFER_ERROR
    # 4 KiB starting mid-page: the second page is outside RAM
    e = d.admin(AdminOpcode.IDENTIFY, prp1=RAM - 0x800, prp2=RAM, cdw=(1,))
    assert e.code == Status.DATA_TRANSFER_ERROR
    e = d.admin(AdminOpcode.IDENTIFY, prp1=0x1800, prp2=0x2100, cdw=(1,))
    assert e.code == Status.INVALID_PRP_OFFSET
    d.identify(1)  # still works


def test_features(rig: Rig) -> None:
    d = rig.d
    d.enable()
    e = d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 63 | 63 << 16))
    assert e.dw0 == 7 | 7 << 16  # 8 allocated of each
    e = d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 1 | 0 << 16))
    assert e.dw0 == 1
    e = d.admin(AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 0xFFFF))
    assert e.code == Status.INVALID_FIELD
    assert d.ok(0, AdminOpcode.GET_FEATURES, cdw=(Feature.VOLATILE_WRITE_CACHE,)).dw0 == 1
    d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.VOLATILE_WRITE_CACHE, 0))
    assert d.ok(0, AdminOpcode.GET_FEATURES, cdw=(Feature.VOLATILE_WRITE_CACHE,)).dw0 == 0
    # default (SEL 1) and capabilities (SEL 3)
    assert d.ok(0, AdminOpcode.GET_FEATURES,
                cdw=(Feature.VOLATILE_WRITE_CACHE | 1 << 8,)).dw0 == 1
    assert d.ok(0, AdminOpcode.GET_FEATURES,
                cdw=(Feature.VOLATILE_WRITE_CACHE | 3 << 8,)).dw0 == 4
    for fid, value in ((Feature.ARBITRATION, 0x03020103), (Feature.INTERRUPT_COALESCING, 0x0A04),
                       (Feature.ASYNC_EVENT_CONFIG, 0x1FF), (Feature.WRITE_ATOMICITY, 1)):
        d.ok(0, AdminOpcode.SET_FEATURES, cdw=(fid, value))
        assert d.ok(0, AdminOpcode.GET_FEATURES, cdw=(fid,)).dw0 == value
    assert d.ok(0, AdminOpcode.GET_FEATURES, cdw=(Feature.TEMPERATURE_THRESHOLD, 0)).dw0 == 0x157
    d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.TEMPERATURE_THRESHOLD, 0x160))
    d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.TEMPERATURE_THRESHOLD, 1 << 20 | 0x100))
    assert d.ok(0, AdminOpcode.GET_FEATURES, cdw=(Feature.TEMPERATURE_THRESHOLD, 0)).dw0 == 0x160
    assert d.ok(0, AdminOpcode.GET_FEATURES,
                cdw=(Feature.TEMPERATURE_THRESHOLD, 1 << 20)).dw0 == 0x100
    d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.POWER_MANAGEMENT, 0))
    e = d.admin(AdminOpcode.SET_FEATURES, cdw=(Feature.POWER_MANAGEMENT, 1))
    assert e.code == Status.INVALID_FIELD
    assert d.ok(0, AdminOpcode.GET_FEATURES, cdw=(Feature.INTERRUPT_VECTOR_CONFIG, 3)).dw0 == 3
    for bad_fid in (0x0C, 0x0F, 0x7F, 0x80, 0xFF):
        assert d.admin(AdminOpcode.GET_FEATURES, cdw=(bad_fid,)).code == Status.INVALID_FIELD
        assert d.admin(AdminOpcode.SET_FEATURES, cdw=(bad_fid, 1)).code == Status.INVALID_FIELD
    e = d.admin(AdminOpcode.SET_FEATURES, cdw=(Feature.ARBITRATION | 1 << 31, 0))
    assert e.code == Status.FEATURE_NOT_SAVEABLE
    # Number of Queues cannot change once I/O queues exist
    d.create_queues(1)
    e = d.admin(AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 3 | 3 << 16))
    assert e.code == Status.COMMAND_SEQUENCE_ERROR


def test_log_pages(ready: Rig) -> None:
    d, c = ready.d, ready.c
    c.write_memory(DATA, b"\x5a" * 4096)
    d.ok(1, IoOpcode.WRITE, nsid=1, prp1=DATA, cdw=(0, 0, 7))
    d.ok(1, IoOpcode.READ, nsid=1, prp1=DATA, cdw=(0, 0, 7))
    for lid, size in ((1, 64), (2, 512), (3, 512)):
        c.write_memory(IDENT, b"\xaa" * PAGE)
        d.ok(0, AdminOpcode.GET_LOG_PAGE, nsid=0xFFFFFFFF, prp1=IDENT,
             cdw=(lid | (size // 4 - 1) << 16,))
        page = c.read_memory(IDENT, size)
        assert c.read_memory(IDENT + size, 4) == b"\xaa" * 4  # nothing beyond NUMD
        if lid == 1:
            assert page == bytes(64)
        if lid == 2:
            assert struct.unpack_from("<H", page, 1)[0] > 273
            assert page[3] == 100
            assert int.from_bytes(page[64:80], "little") == 1  # host reads
            assert int.from_bytes(page[80:96], "little") == 1  # host writes
            assert int.from_bytes(page[32:48], "little") == 1  # data units read
        if lid == 3:
            assert page[0] == 1 and page[8:13] == b"0.1.0"
    # offset and a partial read
    d.ok(0, AdminOpcode.GET_LOG_PAGE, prp1=IDENT, cdw=(3 | 1 << 16, 0, 8))
    assert c.read_memory(IDENT, 8) == b"0.1.0   "
    assert d.admin(AdminOpcode.GET_LOG_PAGE, prp1=IDENT, cdw=(0x7F | 127 << 16,)).code == \
        Status.INVALID_LOG_PAGE
    assert d.admin(AdminOpcode.GET_LOG_PAGE, prp1=IDENT, cdw=(2 | 127 << 16, 0, 4096)).code \
        == Status.INVALID_FIELD


def test_queue_creation_errors(rig: Rig) -> None:
    d = rig.d
    d.enable()
    d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 1 | 1 << 16))

    def create_cq(qid: int, size: int = 16, iv: int = 1, flags: int = 3, base: int = 0) -> int:
        return d.admin(AdminOpcode.CREATE_CQ, prp1=base or cq_base(qid),
                       cdw=((size - 1) << 16 | qid, iv << 16 | flags)).code

    def create_sq(qid: int, cqid: int, size: int = 16, base: int = 0) -> int:
        return d.admin(AdminOpcode.CREATE_SQ, prp1=base or sq_base(qid),
                       cdw=((size - 1) << 16 | qid, cqid << 16 | 1)).code

    assert create_cq(0) == Status.INVALID_QID
    assert create_cq(3) == Status.INVALID_QID  # only 2 allocated
    assert create_cq(1, size=1) == Status.INVALID_QUEUE_SIZE
    assert create_cq(1, size=1025) == Status.INVALID_QUEUE_SIZE
    assert create_cq(1, iv=17) == Status.INVALID_VECTOR
    assert create_cq(1, flags=2) == Status.INVALID_FIELD  # not contiguous
    assert create_cq(1, base=cq_base(1) + 0x10) == Status.INVALID_PRP_OFFSET
    assert create_cq(1) == 0
    assert create_cq(1) == Status.INVALID_QID  # exists
    assert create_sq(1, 0) == Status.INVALID_CQ
    assert create_sq(1, 2) == Status.INVALID_CQ
    assert create_sq(0, 1) == Status.INVALID_QID
    assert create_sq(3, 1) == Status.INVALID_QID
    assert create_sq(1, 1, size=2000) == Status.INVALID_QUEUE_SIZE
    assert create_sq(1, 1) == 0
    assert create_sq(2, 1) == 0  # two SQs may share a CQ
    assert create_sq(2, 1) == Status.INVALID_QID
    assert d.admin(AdminOpcode.DELETE_CQ, cdw=(1,)).code == Status.INVALID_QUEUE_DELETION
    assert d.admin(AdminOpcode.DELETE_CQ, cdw=(0,)).code == Status.INVALID_QID
    assert d.admin(AdminOpcode.DELETE_SQ, cdw=(0,)).code == Status.INVALID_QID
    assert d.admin(AdminOpcode.DELETE_SQ, cdw=(5,)).code == Status.INVALID_QID
    assert d.admin(AdminOpcode.DELETE_SQ, cdw=(1,)).code == 0
    assert d.admin(AdminOpcode.DELETE_SQ, cdw=(1,)).code == Status.INVALID_QID
    assert d.admin(AdminOpcode.DELETE_SQ, cdw=(2,)).code == 0
    assert d.admin(AdminOpcode.DELETE_CQ, cdw=(1,)).code == 0
    assert d.admin(AdminOpcode.DELETE_CQ, cdw=(1,)).code == Status.INVALID_QID


def test_unknown_opcodes_abort_keepalive_and_aer_limit(ready: Rig) -> None:
    d = ready.d
    for opcode in (0x03, 0x7C, 0x80, 0xC0, 0xFF):
        e = d.admin(opcode)
        assert e.code == Status.INVALID_OPCODE and e.status & STATUS_DNR
    for opcode in (0x04, 0x05, 0x0D, 0x7F, 0x81):
        assert d.cmd(1, opcode, nsid=1).code == Status.INVALID_OPCODE
    assert d.ok(0, AdminOpcode.ABORT, cdw=(1 | 99 << 16,)).dw0 & 1
    d.ok(0, AdminOpcode.KEEP_ALIVE)
    # 4 AERs (AERL = 3) are held; the 5th fails
    held = [d.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST) for _ in range(4)]
    e = d.admin(AdminOpcode.ASYNC_EVENT_REQUEST)
    assert e.code == Status.AER_LIMIT
    assert not d.pending(0)
    assert len(held) == 4
    # fused and SGL requests are refused
    assert d.cmd(1, IoOpcode.READ, nsid=1, prp1=DATA, flags=1).code == Status.INVALID_FIELD
    assert d.cmd(1, IoOpcode.READ, nsid=1, prp1=DATA, flags=0x40).code == Status.INVALID_FIELD


def test_invalid_doorbells_raise_async_events(ready: Rig) -> None:
    d = ready.d
    cid = d.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST)
    d.w32(0x1000 + 8 * 5, 1)  # SQ 5 does not exist
    e = d.poll(0)
    d.ring_cq(0)
    assert e.cid == cid and e.status == 0
    assert e.dw0 & 7 == 0 and (e.dw0 >> 8) & 0xFF == 0 and (e.dw0 >> 16) & 0xFF == 1
    # no AER outstanding: the event waits for the next one
    d.w32(0x1000 + 8 * 1, QDEPTH + 5)  # beyond the queue size
    e = d.ok(0, AdminOpcode.ASYNC_EVENT_REQUEST)
    assert (e.dw0 >> 8) & 0xFF == 1
    d.w32(0x1004 + 8 * 1, 7)  # CQ head beyond the tail
    e = d.ok(0, AdminOpcode.ASYNC_EVENT_REQUEST)
    assert (e.dw0 >> 8) & 0xFF == 1
    # the controller still works
    d.ok(1, IoOpcode.FLUSH, nsid=1)
    assert d.r32(0x1C) & 3 == 1


# --- I/O -----------------------------------------------------------------------------------------


def test_write_read_with_prp_lists(ready: Rig, image: Path) -> None:
    d, c = ready.d, ready.c
    for nblocks, buf in ((1, DATA), (8, DATA), (9, DATA + 0x200), (16, DATA + 0x600),
                         (256, DATA)):
        data = os.urandom(nblocks * 512)
        lba = 100 + nblocks
        c.write_memory(buf, data)
        assert d.rw(1, IoOpcode.WRITE, lba, nblocks, buf).status == 0
        with open(image, "rb") as f:
            f.seek(lba * 512)
            assert f.read(len(data)) == data
        c.write_memory(buf, bytes(len(data)))
        assert d.rw(1, IoOpcode.READ, lba, nblocks, buf).status == 0
        assert c.read_memory(buf, len(data)) == data


def test_scattered_pages_and_host_written_data(ready: Rig, image: Path) -> None:
    d, c = ready.d, ready.c
    pattern = os.urandom(64 * 512)
    with open(image, "r+b") as f:
        f.seek(4096 * 3)
        f.write(pattern)
    pages = [DATA + 0x40000 + i * 3 * PAGE for i in range(8)]  # not contiguous
    c.write_memory(PRPLIST, struct.pack("<7Q", *pages[1:]))
    d.ok(1, IoOpcode.READ, nsid=1, prp1=pages[0], prp2=PRPLIST, cdw=(24, 0, 63))
    got = b"".join(c.read_memory(p, PAGE) for p in pages)
    assert got == pattern


def test_fua_flush_write_zeroes_and_dsm(ready: Rig, image: Path) -> None:
    d, c = ready.d, ready.c
    data = os.urandom(16 * 512)
    c.write_memory(DATA, data)
    assert d.rw(1, IoOpcode.WRITE, 0, 16, fua=True).status == 0
    d.ok(1, IoOpcode.FLUSH, nsid=1)
    d.ok(1, IoOpcode.FLUSH, nsid=0xFFFFFFFF)
    assert d.cmd(1, IoOpcode.FLUSH, nsid=2).code == Status.INVALID_NAMESPACE
    d.ok(1, IoOpcode.WRITE_ZEROES, nsid=1, cdw=(4, 0, 3))
    expect = data[:4 * 512] + bytes(4 * 512) + data[8 * 512:]
    assert image.read_bytes()[:16 * 512] == expect
    # DSM deallocate of blocks 8..15 (reads back zeros when the file can punch holes)
    c.write_memory(IDENT, struct.pack("<IIQ", 0, 8, 8))
    d.ok(1, IoOpcode.DSM, nsid=1, prp1=IDENT, cdw=(0, 1 << 2))
    if ready.dev.backend.can_punch:
        assert image.read_bytes()[8 * 512:16 * 512] == bytes(8 * 512)
    c.write_memory(IDENT, struct.pack("<IIQ", 0, 8, ready.dev.blocks))
    e = d.cmd(1, IoOpcode.DSM, nsid=1, prp1=IDENT, cdw=(0, 1 << 2))
    assert e.code == Status.LBA_OUT_OF_RANGE
    e = d.cmd(1, IoOpcode.WRITE_ZEROES, nsid=1, cdw=(ready.dev.blocks - 1, 0, 1))
    assert e.code == Status.LBA_OUT_OF_RANGE


def test_io_errors(ready: Rig) -> None:
    d = ready.d
    blocks = ready.dev.blocks
    assert d.rw(1, IoOpcode.READ, blocks - 1, 2).code == Status.LBA_OUT_OF_RANGE
    assert d.rw(1, IoOpcode.READ, 1 << 40, 1).code == Status.LBA_OUT_OF_RANGE
    assert d.cmd(1, IoOpcode.READ, nsid=2, prp1=DATA).code == Status.INVALID_NAMESPACE
    assert d.cmd(1, IoOpcode.READ, nsid=0, prp1=DATA).code == Status.INVALID_NAMESPACE
    # larger than MDTS (128 KiB)
    assert d.rw(1, IoOpcode.READ, 0, 257).code == Status.INVALID_FIELD
    # PRPs outside guest RAM, a PRP list outside RAM, a list entry outside RAM
    e = d.cmd(1, IoOpcode.READ, nsid=1, prp1=RAM + PAGE, cdw=(0, 0, 0))
    assert e.code == Status.DATA_TRANSFER_ERROR
    e = d.cmd(1, IoOpcode.WRITE, nsid=1, prp1=1 << 50, cdw=(0, 0, 0))
    assert e.code == Status.DATA_TRANSFER_ERROR
    e = d.cmd(1, IoOpcode.READ, nsid=1, prp1=DATA, prp2=RAM + PAGE, cdw=(0, 0, 31))
    assert e.code == Status.DATA_TRANSFER_ERROR
    ready.c.write_memory(PRPLIST, struct.pack("<3Q", DATA + PAGE, RAM * 2, DATA + 3 * PAGE))
    e = d.cmd(1, IoOpcode.READ, nsid=1, prp1=DATA, prp2=PRPLIST, cdw=(0, 0, 31))
    assert e.code == Status.DATA_TRANSFER_ERROR
    # still healthy
    assert d.rw(1, IoOpcode.READ, 0, 8).status == 0
    assert d.r32(0x1C) & 3 == 1


def test_batches_wrap_and_full_cq(ready: Rig, image: Path) -> None:
    """More commands than the CQ holds in one doorbell: the device waits for CQ head."""
    d, c = ready.d, ready.c
    d.create_queues(2, depth=8)
    data = os.urandom(20 * 512)
    for i in range(20):
        c.write_memory(DATA + i * PAGE, data[i * 512:(i + 1) * 512])
    seen = []
    submitted = 0
    for _round in range(4):
        for _ in range(5):
            i = submitted
            d.submit(2, IoOpcode.WRITE, nsid=1, prp1=DATA + i * PAGE, cdw=(i, 0, 0),
                     ring=False)
            submitted += 1
        d.ring_sq(2)
        for _ in range(5):
            seen.append(d.poll(2))
        d.ring_cq(2)
    assert [e.status for e in seen] == [0] * 20
    assert image.read_bytes()[:20 * 512] == data
    # SQ fills to 7 entries while the CQ (8 entries) takes only 7 before the host consumes
    for i in range(7):
        d.submit(2, IoOpcode.READ, nsid=1, prp1=DATA + i * PAGE, cdw=(i, 0, 0), ring=False)
    d.ring_sq(2)
    got = [d.poll(2) for _ in range(7)]
    d.ring_cq(2)
    assert all(e.status == 0 for e in got)
    assert got[-1].sq_head == d.sq[2][2]


def test_inline_commands_and_hand_off_to_the_worker(ready: Rig, image: Path) -> None:
    """With fd-backed memory, plain writes/reads run on the doorbell; the first command that
    does not qualify (a flush) and everything after it go to the worker, in order."""
    d, c, dev = ready.d, ready.c, ready.dev
    d.create_queues(2, depth=16)
    batches: list[int] = []
    process = dev.datapath.process

    def counting(gen: int, qid: int, base: int, head: int, size: int, n: int) -> None:
        batches.append(n)
        process(gen, qid, base, head, size, n)

    def idle() -> None:  # the worker finishes its batch just after posting a completion
        assert dev.wait_idle(WAIT)

    dev.datapath.process = counting  # type: ignore[method-assign]
    data = os.urandom(3 * 512)
    for i in range(3):
        c.write_memory(DATA + i * PAGE, data[i * 512:(i + 1) * 512])
    cids = [d.submit(2, IoOpcode.WRITE, nsid=1, prp1=DATA + i * PAGE, cdw=(i, 0, 0),
                     ring=False) for i in range(3)]
    cids.append(d.submit(2, IoOpcode.FLUSH, nsid=1, ring=False))
    cids.append(d.submit(2, IoOpcode.READ, nsid=1, prp1=DATA + 4 * PAGE, cdw=(1, 0, 0),
                         ring=False))
    idle()
    d.ring_sq(2)
    got = [d.poll(2) for _ in range(5)]
    d.ring_cq(2)
    assert [e.cid for e in got] == cids
    assert all(e.status == 0 for e in got)
    assert image.read_bytes()[:3 * 512] == data
    assert c.read_memory(DATA + 4 * PAGE, 512) == data[512:1024]
    direct = dev.dma.table.is_direct(DATA, PAGE)
    assert batches == ([2] if direct else [5])
    # a plain read alone never wakes the worker with direct memory
    batches.clear()
    idle()
    assert d.rw(2, IoOpcode.READ, 2, 1).status == 0
    assert batches == ([] if direct else [1])


def test_io_into_memory_the_client_took_away(image: Path) -> None:
    """The client shrinks its (unsealed) RAM file under a data buffer: that I/O completes with
    a data transfer error, inline or on the worker, and the controller keeps working."""
    dev = NvmeController(image)
    try:
        with serve(dev, memory=RAM) as s:
            d = Driver(s.client, dev)
            d.enable()
            d.create_queues(1)
            assert dev.dma.table.is_direct(DATA, PAGE)
            assert not dev.dma.table.is_zero_copy(DATA, PAGE)
            fd = s.client.memory[0].fd
            assert fd is not None
            gone = 0x400000
            os.ftruncate(fd, gone)  # queues, PRP lists and DATA stay below
            for opcode in (IoOpcode.WRITE, IoOpcode.READ):
                for blocks in (1, 16):  # one page, and a PRP list (kept in RAM) to lost pages
                    e = d.rw(1, opcode, 0, blocks, buf=gone + 0x200)
                    assert e.code == Status.DATA_TRANSFER_ERROR, e
            assert d.rw(1, IoOpcode.WRITE, 0, 1, buf=DATA).status == 0
            assert d.rw(1, IoOpcode.READ, 0, 1, buf=DATA).status == 0
            assert dev.csts & 0x2 == 0  # no controller fatal status
            assert s.server.connection is not None
    finally:
        dev.close()


def test_msix_vector_per_queue(ready: Rig) -> None:
    d = ready.d
    fds = ready.msix()
    d.create_queues(2)
    d.create_queues(3, iv=5)
    d.create_queues(4, ien=False)
    # the last completion's interrupt follows its entry, within the worker's batch
    assert ready.dev.wait_idle(WAIT)
    for fd in fds:
        Client.eventfd_count(fd)
    d.ok(0, AdminOpcode.KEEP_ALIVE)
    assert ready.dev.wait_idle(WAIT)
    assert [Client.eventfd_count(fd) for fd in fds] == [1] + [0] * (len(fds) - 1)
    for qid, vector in ((1, 1), (2, 2), (3, 5)):
        d.ok(qid, IoOpcode.FLUSH, nsid=1)  # a flush always runs on the worker
        assert ready.dev.wait_idle(WAIT)
        assert Client.eventfd_count(fds[vector]) == 1, f"queue {qid}"
    d.ok(4, IoOpcode.FLUSH, nsid=1)
    assert ready.dev.wait_idle(WAIT)
    assert [Client.eventfd_count(fd) for fd in fds] == [0] * len(fds)


def test_intx_level_follows_unconsumed_completions(ready: Rig) -> None:
    d, dev = ready.d, ready.dev
    d.submit(1, IoOpcode.FLUSH, nsid=1)
    d.poll(1)
    deadline = time.monotonic() + WAIT
    while not dev.intx_level and time.monotonic() < deadline:
        time.sleep(0.001)
    assert dev.intx_level
    d.w32(0x0C, 1)  # INTMS masks it
    assert not dev.intx_level
    d.w32(0x10, 1)
    assert dev.intx_level
    d.ring_cq(1)
    d.r32(0x1C)  # a non-posted access orders the posted doorbell
    assert not dev.intx_level


def test_msi_single_vector(ready: Rig) -> None:
    c, d = ready.c, ready.d
    cap = find_capability(c, MSI_CAP_ID)
    c.config_write(cap + 2, 2, c.config_read(cap + 2, 2) | 1)
    fd = c.enable_irq(IrqIndex.MSI, 1)[0]
    d.ok(1, IoOpcode.FLUSH, nsid=1)
    assert wait_fd(fd) >= 1
    d.w32(0x0C, 1)  # masked: pending until INTMC
    d.ok(1, IoOpcode.FLUSH, nsid=1)
    assert ready.dev.wait_idle(WAIT)  # the flush's batch, signal included, is over
    assert Client.eventfd_count(fd) == 0
    d.w32(0x10, 1)
    assert wait_fd(fd) >= 1


def test_controller_reset_and_shutdown(ready: Rig, image: Path) -> None:
    d, c = ready.d, ready.c
    data = os.urandom(4096)
    c.write_memory(DATA, data)
    assert d.rw(1, IoOpcode.WRITE, 10, 8).status == 0
    held = d.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST)
    assert held
    # normal shutdown: SHST goes to complete
    d.w32(0x14, d.r32(0x14) | 1 << 14)
    d.wait_csts(0xC, 0x8)
    assert image.read_bytes()[10 * 512:10 * 512 + 4096] == data
    # controller reset deletes the I/O queues and held commands
    d.disable()
    assert d.r32(0x1C) == 0
    d.enable()
    d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 0))
    d.create_queues(1)
    c.write_memory(DATA, bytes(4096))
    assert d.rw(1, IoOpcode.READ, 10, 8).status == 0
    assert c.read_memory(DATA, 4096) == data
    # the old SQ 2 never existed; doorbells of deleted queues are ignored while disabled
    d.w32(0x14, 0)
    d.w32(0x1008, 1)
    d.wait_csts(1, 0)


def test_device_reset_mid_io(ready: Rig) -> None:
    d, c = ready.d, ready.c
    for i in range(32):
        d.submit(1, IoOpcode.READ, nsid=1, prp1=DATA + i * PAGE, cdw=(i, 0, 7), ring=False)
    d.ring_sq(1)
    c.reset()
    assert d.r32(0x1C) & 1 == 0 or d.wait_csts(1, 0) == 0
    assert d.r32(0x14) == 0
    d.enable()
    d.identify(1)


def test_many_commands_throughput(ready: Rig) -> None:
    """Queue depth 32 4 KiB reads; reports commands per second (printed with -s)."""
    d = ready.d
    d.create_queues(2, depth=64)
    n = 0
    t0 = time.perf_counter()
    while n < 2048:
        for i in range(32):
            d.submit(2, IoOpcode.READ, nsid=1, prp1=DATA + i * PAGE, cdw=(i * 8, 0, 7),
                     ring=False)
        d.ring_sq(2)
        for _ in range(32):
            assert d.poll(2).status == 0
        d.ring_cq(2)
        n += 32
    elapsed = time.perf_counter() - t0
    print(f"\nnvme: {n / elapsed:.0f} 4 KiB reads/s at QD32 ({'direct' if ready.dev.dma.table.is_direct(DATA, PAGE) else 'message'} DMA)")  # noqa: E501


def test_disconnect_and_reconnect(tmp: Path, image: Path) -> None:
    dev = NvmeController(image)
    server = Server(dev, tmp / "s").start()
    try:
        for n in range(2):
            c = Client.connect(tmp / "s")
            c.negotiate()
            c.add_memory(0, RAM)
            d = Driver(c, dev)
            d.enable()
            d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 0))
            d.create_queues(1)
            assert d.rw(1, IoOpcode.READ, 0, 8).status == 0
            for i in range(16):
                d.submit(1, IoOpcode.READ, nsid=1, prp1=DATA, cdw=(i, 0, 7), ring=False)
            d.ring_sq(1)
            c.close()
            server.wait_for_disconnect(1 + n, timeout=WAIT)
            deadline = time.monotonic() + WAIT
            while dev.csts and time.monotonic() < deadline:
                time.sleep(0.01)
            assert dev.csts == 0
    finally:
        server.close()
        dev.close()
