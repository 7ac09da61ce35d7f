"""Every command of the command table, through a real UNIX socket to a running Server."""

from __future__ import annotations

import errno
import mmap
import os
import struct

import pytest
from helpers import (
    CONFIG,
    MMAP_BAR,
    MMAP_BAR_SIZE,
    SPARSE_AREAS,
    WAIT,
    WHOLE_MMAP_BAR,
    ClientFactory,
    MmapSample,
    RawPeer,
    RecordingSample,
    ServerFactory,
    close_all,
    device_dma,
    efd,
    eventfd_quiet,
    negotiated,
    open_fds,
    wait_eventfd,
    wait_until,
)

from vfio_user_server.client import QEMU_CAPABILITIES, Client, ClientError
from vfio_user_server.pci import COMMAND, COMMAND_MASTER, COMMAND_MEMORY
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import (
    HEADER_SIZE,
    Command,
    DeviceInfoFlag,
    DmaLayout,
    DmaUnmapFlag,
    HeaderFlag,
    IrqIndex,
    IrqInfoFlag,
    IrqSetFlag,
    MsgType,
    RegionInfoFlag,
)
from vfio_user_server.protocol.structs import (
    DeviceFeature,
    DeviceInfo,
    DmaMap,
    DmaUnmap,
    IrqInfo,
    IrqSet,
    MigData,
    RegionAccess,
    RegionInfo,
    RegionIoFds,
    WriteMulti,
    WriteMultiEntry,
)
from vfio_user_server.sample import (
    BUFFER_OFFSET,
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    ID_VALUE,
    REG_ID,
    REG_SCRATCH,
    REG_WRITES,
    STAT_DONE,
    STAT_ERROR,
)
from vfio_user_server.server import Server

F = IrqSetFlag
NONE, BOOL, EVENTFD = F.DATA_NONE, F.DATA_BOOL, F.DATA_EVENTFD
MASK, UNMASK, TRIGGER = F.ACTION_MASK, F.ACTION_UNMASK, F.ACTION_TRIGGER


def expect_error(err: int, fn: object, *args: object, **kwargs: object) -> None:
    assert callable(fn)
    with pytest.raises(ClientError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value


def call(c: Client, command: int, payload: bytes = b"", fds: list[int] | None = None
         ) -> codec.Message:
    reply = c.request(command, payload, fds, check=False)
    assert reply is not None
    return reply


# --- VERSION ------------------------------------------------------------------------------


def test_version_reply_fits_qemu_and_caps(raw_client: Client) -> None:
    reply = call(raw_client, Command.VERSION, codec.encode_version(0, 0, QEMU_CAPABILITIES))
    assert not reply.is_error
    assert reply.is_reply and reply.command == Command.VERSION
    assert HEADER_SIZE + len(reply.payload) <= 214
    assert reply.payload.endswith(b"\0")
    assert not reply.fds
    major, minor, caps = codec.decode_version(reply.payload)
    assert (major, minor) == (0, 0)
    assert 1 <= caps["max_msg_fds"] <= 16
    assert 4096 <= caps["max_data_xfer_size"] <= 64 << 20
    assert caps["pgsizes"] % 4096 == 0
    assert caps["max_dma_maps"] <= 65535
    assert "write_multiple" not in caps
    assert "migration" not in caps
    assert "twin_socket" not in caps


def test_version_higher_minor_answered_with_zero(raw_client: Client) -> None:
    reply = call(raw_client, Command.VERSION, codec.encode_version(0, 7, {}))
    assert not reply.is_error
    assert codec.decode_version(reply.payload)[:2] == (0, 0)


def test_version_without_json(raw_client: Client) -> None:
    reply = call(raw_client, Command.VERSION, struct.pack("<HH", 0, 0))
    assert not reply.is_error
    _, _, caps = codec.decode_version(reply.payload)
    assert caps["max_msg_fds"] >= 1


def test_version_other_major_refused(raw_client: Client) -> None:
    reply = call(raw_client, Command.VERSION, codec.encode_version(1, 0, {}))
    assert reply.is_error and reply.error == errno.ENOTSUP
    assert reply.payload == b""
    # still waiting for a good VERSION
    raw_client.negotiate()


# --- DMA_MAP / DMA_UNMAP ------------------------------------------------------------------


def test_dma_map_with_fd_is_direct(client: Client, server: Server) -> None:
    reply = call(client, Command.DMA_MAP, b"")  # too short for the structure
    assert reply.is_error and reply.error == errno.EINVAL
    ram = client.add_memory(0x10000, 0x4000)
    conn = server.wait_for_client(WAIT)
    [m] = conn.table.maps()
    assert (m.iova, m.size, m.direct, m.writable) == (0x10000, 0x4000, True, True)
    ram.mem[0:4] = b"abcd"
    assert conn.dma.read(0x10000, 4) == b"abcd"
    conn.dma.write(0x10002, b"XY")
    assert bytes(ram.mem[0:4]) == b"abXY"


def test_dma_map_reply_is_header_only(client: Client) -> None:
    reply = call(client, Command.DMA_MAP, DmaMap(DmaMap.SIZE, 3, 0, 0x1000, 0x1000).pack())
    assert not reply.is_error and reply.payload == b""


def test_dma_map_file_offset(client: Client, server: Server) -> None:
    ram = client.add_memory(0x40000, 0x2000, file_offset=0x3000)
    ram.mem[0x3000:0x3004] = b"\x11\x22\x33\x44"
    conn = server.wait_for_client(WAIT)
    assert conn.dma.read(0x40000, 4) == b"\x11\x22\x33\x44"


def test_dma_map_without_fd(client: Client, server: Server) -> None:
    client.add_memory(0x20000, 0x1000, fd_backed=False, writable=False)
    [m] = server.wait_for_client(WAIT).table.maps()
    assert (m.iova, m.size, m.direct, m.writable) == (0x20000, 0x1000, False, False)


def test_dma_unmap_never_splits_a_map(client: Client, server: Server) -> None:
    # VFIO type1 semantics: a range may cover whole maps (QEMU with a vIOMMU unmaps big
    # ranges), never part of one; a range with nothing mapped is a successful no-op.
    table = server.wait_for_client(WAIT).table
    client.dma_map(0x100000, 0x2000)
    expect_error(errno.EINVAL, client.dma_unmap, 0x100000, 0x1000)  # smaller
    expect_error(errno.EINVAL, client.dma_unmap, 0x101000, 0x1000)  # inside
    expect_error(errno.EINVAL, client.dma_unmap, 0xFF000, 0x2000)  # straddles the start
    client.dma_unmap(0x200000, 0x1000)  # elsewhere: nothing to do
    assert len(table) == 1
    client.dma_unmap(0x0, 0x200000)  # covers it whole
    assert len(table) == 0
    client.dma_map(0x100000, 0x2000)
    assert len(table) == 1
    reply = call(client, Command.DMA_UNMAP, DmaUnmap(DmaUnmap.SIZE, 0, 0x100000, 0x2000).pack())
    assert not reply.is_error
    assert DmaUnmap.unpack(reply.payload) == DmaUnmap(DmaUnmap.SIZE, 0, 0x100000, 0x2000)
    assert len(reply.payload) == DmaUnmap.SIZE
    assert len(table) == 0


def test_dma_unmap_all(client: Client, server: Server) -> None:
    table = server.wait_for_client(WAIT).table
    client.add_memory(0, 0x1000)
    client.add_memory(0x1000, 0x1000, fd_backed=False)
    client.add_memory(0x10000, 0x2000)
    assert len(table) == 3
    expect_error(errno.EINVAL, client.dma_unmap, 0x1000, 0x1000, DmaUnmapFlag.ALL)
    assert len(table) == 3
    client.dma_unmap(0, 0, DmaUnmapFlag.ALL)
    assert len(table) == 0
    assert table.mapped_file_count() == 0
    client.dma_map(0x1000, 0x1000)  # the space is free again
    assert len(table) == 1


def test_dma_unmap_dirty_bitmap_unsupported(client: Client) -> None:
    client.dma_map(0, 0x1000)
    payload = DmaUnmap(DmaUnmap.SIZE + 16, DmaUnmapFlag.GET_DIRTY_BITMAP, 0, 0x1000).pack()
    reply = call(client, Command.DMA_UNMAP, payload + struct.pack("<QQ", 4096, 8))
    assert reply.is_error and reply.error == errno.ENOTSUP


@pytest.mark.parametrize(
    ("iova", "size"),
    [
        (0x10000, 0x1000),  # same
        (0x0F000, 0x2000),  # overlaps the start
        (0x13000, 0x2000),  # overlaps the end
        (0x11000, 0x1000),  # inside
        (0x0F000, 0x8000),  # contains
    ],
)
def test_dma_map_overlap_eexist(client: Client, server: Server, iova: int, size: int) -> None:
    table = server.wait_for_client(WAIT).table
    client.dma_map(0x10000, 0x4000)
    before = open_fds()
    fd = os.memfd_create("overlap", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    try:
        expect_error(errno.EEXIST, client.dma_map, iova, size, fd=fd)
    finally:
        os.close(fd)
    # the server closed its copy of the refused fd
    wait_until(lambda: open_fds() <= before, what="refused DMA fd closed")
    assert [(m.iova, m.size) for m in table.maps()] == [(0x10000, 0x4000)]
    # adjacent maps are fine
    client.dma_map(0xF000, 0x1000)
    client.dma_map(0x14000, 0x1000)


def test_dma_map_bad_values(client: Client) -> None:
    expect_error(errno.EINVAL, client.dma_map, 0x1000, 0)
    expect_error(errno.EINVAL, client.dma_map, (1 << 64) - 0x1000, 0x2000)
    expect_error(errno.EINVAL, client.dma_map, 0x1000, 0x1000, prot=0x100)
    reply = call(client, Command.DMA_MAP, DmaMap(8, 3, 0, 0x1000, 0x1000).pack())
    assert reply.is_error and reply.error == errno.EINVAL


def test_dma_maps_before_get_info(raw_client: Client, server: Server) -> None:
    # QEMU sends its maps right after VERSION, before DEVICE_GET_INFO
    raw_client.negotiate()
    raw_client.add_memory(0, 0x1000)
    raw_client.add_memory(0x1000, 0x1000, fd_backed=False)
    raw_client.get_device_info()
    assert len(server.wait_for_client(WAIT).table) == 2


# --- DEVICE_GET_INFO ----------------------------------------------------------------------


def test_get_info(raw_client: Client) -> None:
    raw_client.negotiate()
    reply = call(raw_client, Command.DEVICE_GET_INFO, DeviceInfo(DeviceInfo.SIZE, 0, 0, 0).pack())
    assert not reply.is_error
    assert HEADER_SIZE + len(reply.payload) <= 32
    info = DeviceInfo.unpack(reply.payload)
    assert info.argsz == DeviceInfo.SIZE
    assert info.flags & DeviceInfoFlag.PCI and info.flags & DeviceInfoFlag.RESET
    assert 8 <= info.num_regions <= 100
    assert 3 <= info.num_irqs <= 50


def test_get_info_small_argsz(client: Client) -> None:
    reply = call(client, Command.DEVICE_GET_INFO, DeviceInfo(8, 0, 0, 0).pack())
    assert reply.is_error and reply.error == errno.EINVAL


# --- DEVICE_GET_REGION_INFO ---------------------------------------------------------------

@pytest.fixture
def mmap_client(make_server: ServerFactory, make_client: ClientFactory,
                mmap_device: MmapSample) -> Client:
    srv = make_server(mmap_device, name="mmap.sock")
    return negotiated(make_client(srv))


def test_region_info_all_indices(client: Client) -> None:
    expected = {
        0: (0x4000, RegionInfoFlag.READ | RegionInfoFlag.WRITE),
        1: (0, 0),  # upper half of the 64-bit BAR0
        2: (256, RegionInfoFlag.READ | RegionInfoFlag.WRITE),
        3: (0, 0),
        4: (0, 0),
        5: (0, 0),
        6: (0, 0),  # no ROM
        7: (4096, RegionInfoFlag.READ | RegionInfoFlag.WRITE),
        8: (0, 0),  # VGA
    }
    for index, (size, flags) in expected.items():
        reply = call(client, Command.DEVICE_GET_REGION_INFO,
                     RegionInfo(RegionInfo.SIZE, 0, index, 0, 0, 0).pack())
        assert not reply.is_error, index
        assert len(reply.payload) == RegionInfo.SIZE and not reply.fds
        info = RegionInfo.unpack(reply.payload)
        assert (info.index, info.size, info.flags, info.argsz) == (index, size, int(flags),
                                                                   RegionInfo.SIZE), index
    reply = call(client, Command.DEVICE_GET_REGION_INFO,
                 RegionInfo(RegionInfo.SIZE, 0, 9, 0, 0, 0).pack())
    assert reply.is_error and reply.error == errno.EINVAL
    reply = call(client, Command.DEVICE_GET_REGION_INFO, RegionInfo(16, 0, 0, 0, 0, 0).pack())
    assert reply.is_error and reply.error == errno.EINVAL


def test_region_info_sparse_mmap_argsz_retry(mmap_client: Client, mmap_device: MmapSample
                                             ) -> None:
    c = mmap_client
    needed = RegionInfo.SIZE + 8 + 8 + 16 * len(SPARSE_AREAS)
    # first try with QEMU's 32 bytes: the bare structure, the needed argsz, no caps, no fd
    reply = call(c, Command.DEVICE_GET_REGION_INFO,
                 RegionInfo(RegionInfo.SIZE, 0, MMAP_BAR, 0, 0, 0).pack())
    assert not reply.is_error
    assert len(reply.payload) == RegionInfo.SIZE
    assert reply.fds == []
    info = RegionInfo.unpack(reply.payload)
    assert info.argsz == needed
    assert info.flags & RegionInfoFlag.MMAP
    assert not info.flags & RegionInfoFlag.CAPS
    assert info.size == MMAP_BAR_SIZE
    # a size in between is still too small
    reply = call(c, Command.DEVICE_GET_REGION_INFO,
                 RegionInfo(needed - 1, 0, MMAP_BAR, 0, 0, 0).pack())
    assert len(reply.payload) == RegionInfo.SIZE and reply.fds == []
    # the retry with the needed argsz: the caps and exactly one fd
    reply = call(c, Command.DEVICE_GET_REGION_INFO,
                 RegionInfo(needed, 0, MMAP_BAR, 0, 0, 0).pack())
    try:
        assert len(reply.payload) == needed
        assert HEADER_SIZE + len(reply.payload) <= needed + 16
        assert len(reply.fds) == 1
        info, sparse, mappable = codec.decode_region_info(reply.payload)
        assert info.flags & RegionInfoFlag.CAPS and info.cap_offset == RegionInfo.SIZE
        assert sparse == SPARSE_AREAS
        assert not mappable
        assert os.fstat(reply.fds[0]).st_ino == os.fstat(mmap_device.mem_fd).st_ino
    finally:
        reply.close_fds()
    # a larger argsz gets the same answer
    reply = call(c, Command.DEVICE_GET_REGION_INFO,
                 RegionInfo(4096, 0, MMAP_BAR, 0, 0, 0).pack())
    assert len(reply.payload) == needed and len(reply.fds) == 1
    reply.close_fds()


def test_region_info_mmap_through_client(mmap_client: Client, mmap_device: MmapSample) -> None:
    desc = mmap_client.get_region_info(MMAP_BAR)
    assert desc.fd is not None
    try:
        assert desc.sparse == SPARSE_AREAS
        off, size = SPARSE_AREAS[1]
        m = mmap.mmap(desc.fd, size, offset=desc.offset + off)
        m[0:4] = b"mmap"
        assert bytes(mmap_device.mem[off:off + 4]) == b"mmap"
        m.close()
    finally:
        os.close(desc.fd)
    # whole-region mmap without caps: fd with the first 32-byte reply
    reply = call(mmap_client, Command.DEVICE_GET_REGION_INFO,
                 RegionInfo(RegionInfo.SIZE, 0, WHOLE_MMAP_BAR, 0, 0, 0).pack())
    assert len(reply.fds) == 1 and len(reply.payload) == RegionInfo.SIZE
    info = RegionInfo.unpack(reply.payload)
    assert info.flags == RegionInfoFlag.READ | RegionInfoFlag.MMAP
    reply.close_fds()


def test_region_info_no_fd_leak_on_retries(mmap_client: Client) -> None:
    before = open_fds()
    for _ in range(20):
        desc = mmap_client.get_region_info(MMAP_BAR)
        assert desc.fd is not None
        os.close(desc.fd)
    assert open_fds() <= before


# --- DEVICE_GET_REGION_IO_FDS -------------------------------------------------------------


def test_region_io_fds(client: Client) -> None:
    reply = call(client, Command.DEVICE_GET_REGION_IO_FDS,
                 RegionIoFds(RegionIoFds.SIZE, 0, 0, 0).pack())
    assert not reply.is_error and not reply.fds
    assert RegionIoFds.unpack(reply.payload) == RegionIoFds(RegionIoFds.SIZE, 0, 0, 0)
    for index in (CONFIG, 3, 6, 40):
        reply = call(client, Command.DEVICE_GET_REGION_IO_FDS,
                     RegionIoFds(RegionIoFds.SIZE, 0, index, 0).pack())
        assert reply.is_error and reply.error == errno.EINVAL, index
    reply = call(client, Command.DEVICE_GET_REGION_IO_FDS, RegionIoFds(8, 0, 0, 0).pack())
    assert reply.is_error and reply.error == errno.EINVAL


# --- DEVICE_GET_IRQ_INFO ------------------------------------------------------------------


def test_irq_info(client: Client) -> None:
    expected = {
        IrqIndex.INTX: (1, IrqInfoFlag.EVENTFD | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED),
        IrqIndex.MSI: (4, IrqInfoFlag.EVENTFD | IrqInfoFlag.NORESIZE),
        IrqIndex.MSIX: (4, IrqInfoFlag.EVENTFD),
        IrqIndex.ERR: (1, IrqInfoFlag.EVENTFD),
        IrqIndex.REQ: (1, IrqInfoFlag.EVENTFD),
    }
    for index, (count, flags) in expected.items():
        reply = call(client, Command.DEVICE_GET_IRQ_INFO, IrqInfo(IrqInfo.SIZE, 0, index, 0).pack())
        assert HEADER_SIZE + len(reply.payload) <= 32
        info = IrqInfo.unpack(reply.payload)
        assert (info.argsz, info.index, info.count, info.flags) == (
            IrqInfo.SIZE, index, count, int(flags)), index
    reply = call(client, Command.DEVICE_GET_IRQ_INFO, IrqInfo(IrqInfo.SIZE, 0, 5, 0).pack())
    assert reply.is_error and reply.error == errno.EINVAL


# --- DEVICE_SET_IRQS ----------------------------------------------------------------------


def test_set_irqs_reply_header_only(client: Client) -> None:
    fds = [efd()]
    try:
        reply = call(client, Command.DEVICE_SET_IRQS,
                     IrqSet(IrqSet.SIZE, EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 1).pack(), fds)
        assert not reply.is_error and reply.payload == b""
    finally:
        close_all(fds)


def test_set_irqs_eventfd_trigger_assign_and_deassign(client: Client, device: RecordingSample
                                                      ) -> None:
    fds = client.enable_irq(IrqIndex.MSIX, 4)
    try:
        state = device.irqs.state(IrqIndex.MSIX)
        assert all(fd is not None for fd in state.fds)
        # each server fd is a copy of ours: triggering vector v signals our fd v
        for v in range(4):
            assert device.irqs.trigger(IrqIndex.MSIX, v)
            assert wait_eventfd(fds[v]) == 1
        # de-assign vectors 1..2 (DATA_EVENTFD without fds)
        client.set_irqs(IrqIndex.MSIX, EVENTFD | TRIGGER, 1, 2)
        state = device.irqs.state(IrqIndex.MSIX)
        assert state.fds[0] is not None and state.fds[3] is not None
        assert state.fds[1] is None and state.fds[2] is None
        # replace vector 0 with a new fd: the new one fires, the old one no longer
        new = efd()
        client.set_irqs(IrqIndex.MSIX, EVENTFD | TRIGGER, 0, 1, [new])
        device.irqs.trigger(IrqIndex.MSIX, 0)
        assert wait_eventfd(new) == 1
        assert eventfd_quiet(fds[0])
        os.close(new)
        # wrong number of fds
        extra = [efd(), efd()]
        expect_error(errno.EINVAL, client.set_irqs, IrqIndex.MSIX, EVENTFD | TRIGGER, 0, 1,
                     extra)
        close_all(extra)
    finally:
        close_all(fds)


def test_set_irqs_none_trigger(client: Client, device: RecordingSample) -> None:
    fds = client.enable_irq(IrqIndex.MSI, 4)
    try:
        # DATA_NONE|TRIGGER with a count: loopback trigger of vectors 1 and 2
        client.set_irqs(IrqIndex.MSI, NONE | TRIGGER, 1, 2)
        assert [wait_eventfd(fds[1]), wait_eventfd(fds[2])] == [1, 1]
        assert eventfd_quiet(fds[0]) and eventfd_quiet(fds[3])
        # count 0: disable the index (every fd dropped)
        client.disable_irq(IrqIndex.MSI)
        assert device.irqs.state(IrqIndex.MSI).fds == (None,) * 4
    finally:
        close_all(fds)


def test_set_irqs_bool_trigger(client: Client) -> None:
    fds = client.enable_irq(IrqIndex.MSIX, 4)
    try:
        client.set_irqs(IrqIndex.MSIX, BOOL | TRIGGER, 0, 4, data=bytes([1, 0, 0, 1]))
        assert wait_eventfd(fds[0]) == 1 and wait_eventfd(fds[3]) == 1
        assert eventfd_quiet(fds[1]) and eventfd_quiet(fds[2])
        # data shorter than count
        expect_error(errno.EINVAL, client.set_irqs, IrqIndex.MSIX, BOOL | TRIGGER, 0, 4,
                     data=b"\1\1")
        # data longer than count, and data with DATA_NONE: the length is the data type's
        expect_error(errno.EINVAL, client.set_irqs, IrqIndex.MSIX, BOOL | TRIGGER, 0, 2,
                     data=b"\1\1\1")
        expect_error(errno.EINVAL, client.set_irqs, IrqIndex.MSIX, NONE | TRIGGER, 0, 1,
                     data=b"\1")
        assert all(eventfd_quiet(fd) for fd in fds), "a refused request fires nothing"
    finally:
        close_all(fds)


def test_set_irqs_none_and_bool_mask_unmask(client: Client, device: RecordingSample) -> None:
    fds = client.enable_irq(IrqIndex.MSIX, 4)
    try:
        client.set_irqs(IrqIndex.MSIX, NONE | MASK, 0, 2)
        assert device.irqs.state(IrqIndex.MSIX).masked == (True, True, False, False)
        # a masked vector goes pending instead of firing
        assert not device.irqs.trigger(IrqIndex.MSIX, 1)
        assert eventfd_quiet(fds[1])
        assert device.irqs.state(IrqIndex.MSIX).pending[1]
        # BOOL|UNMASK vector 1 only: the pending interrupt is delivered
        client.set_irqs(IrqIndex.MSIX, BOOL | UNMASK, 0, 2, data=b"\0\1")
        assert wait_eventfd(fds[1]) == 1
        state = device.irqs.state(IrqIndex.MSIX)
        assert state.masked == (True, False, False, False) and not state.pending[1]
        # BOOL|MASK vector 3, NONE|UNMASK vector 0
        client.set_irqs(IrqIndex.MSIX, BOOL | MASK, 2, 2, data=b"\0\1")
        client.set_irqs(IrqIndex.MSIX, NONE | UNMASK, 0, 1)
        assert device.irqs.state(IrqIndex.MSIX).masked == (False, False, False, True)
    finally:
        close_all(fds)


def test_set_irqs_intx_mask_unmask_and_resample_fd(client: Client, device: RecordingSample
                                                   ) -> None:
    [trigger] = client.enable_irq(IrqIndex.INTX, 1)
    resample = efd()
    try:
        # QEMU's KVM sequence: NONE|MASK, EVENTFD|UNMASK (resample fd), NONE|UNMASK
        client.set_irqs(IrqIndex.INTX, NONE | MASK, 0, 1)
        assert device.irqs.state(IrqIndex.INTX).masked == (True,)
        client.set_irqs(IrqIndex.INTX, EVENTFD | UNMASK, 0, 1, [resample])
        assert device.irqs.state(IrqIndex.INTX).resample_fd is not None
        client.set_irqs(IrqIndex.INTX, NONE | UNMASK, 0, 1)
        assert device.irqs.state(IrqIndex.INTX).masked == (False,)
        device.set_intx(True)
        assert wait_eventfd(trigger) == 1
        assert device.irqs.state(IrqIndex.INTX).masked == (True,)  # automasked
        # the guest's EOI: KVM signals the resample fd; the line is still high: fire again
        os.eventfd_write(resample, 1)
        assert wait_eventfd(trigger) == 1
        device.set_intx(False)
        os.eventfd_write(resample, 1)
        wait_until(lambda: device.irqs.state(IrqIndex.INTX).masked == (False,),
                   what="resample unmask")
        assert eventfd_quiet(trigger)
        # de-assign the resample fd
        client.set_irqs(IrqIndex.INTX, EVENTFD | UNMASK, 0, 1)
        assert device.irqs.state(IrqIndex.INTX).resample_fd is None
    finally:
        close_all([trigger, resample])


def test_set_irqs_unsupported_eventfd_actions(client: Client) -> None:
    fds = [efd()]
    try:
        expect_error(errno.EINVAL, client.set_irqs, IrqIndex.MSIX, EVENTFD | MASK, 0, 1, fds)
        expect_error(errno.EINVAL, client.set_irqs, IrqIndex.MSI, EVENTFD | UNMASK, 0, 1, fds)
        # fds without DATA_EVENTFD
        expect_error(errno.EINVAL, client.set_irqs, IrqIndex.MSIX, NONE | TRIGGER, 0, 1, fds)
    finally:
        close_all(fds)


@pytest.mark.parametrize("flags", [
    NONE | BOOL | TRIGGER,  # two DATA flags
    NONE | MASK | UNMASK,  # two ACTIONs
    int(NONE),  # no action
    int(TRIGGER),  # no data type
    NONE | TRIGGER | 0x100,  # unknown bit
])
def test_set_irqs_bad_flags(client: Client, flags: int) -> None:
    expect_error(errno.EINVAL, client.set_irqs, IrqIndex.MSIX, flags, 0, 1)


def test_set_irqs_out_of_range(client: Client) -> None:
    expect_error(errno.EINVAL, client.set_irqs, IrqIndex.MSIX, NONE | TRIGGER, 3, 2)
    expect_error(errno.EINVAL, client.set_irqs, 9, NONE | TRIGGER, 0, 1)
    fds = [efd()]
    try:
        expect_error(errno.EINVAL, client.set_irqs, IrqIndex.ERR, EVENTFD | TRIGGER, 1, 1, fds)
    finally:
        close_all(fds)


def test_set_irqs_err_and_req(client: Client, device: RecordingSample) -> None:
    fds = client.enable_irq(IrqIndex.ERR, 1) + client.enable_irq(IrqIndex.REQ, 1)
    try:
        assert device.irqs.trigger(IrqIndex.ERR, 0)
        assert wait_eventfd(fds[0]) == 1
        assert device.irqs.trigger(IrqIndex.REQ, 0)
        assert wait_eventfd(fds[1]) == 1
        # QEMU's teardown of ERR: EVENTFD count 1, no fd
        client.set_irqs(IrqIndex.ERR, EVENTFD | TRIGGER, 0, 1)
        assert device.irqs.state(IrqIndex.ERR).fds == (None,)
    finally:
        close_all(fds)


# --- REGION_READ / REGION_WRITE -----------------------------------------------------------


def test_region_read_config(client: Client) -> None:
    data = client.region_read(CONFIG, 0, 4096)  # QEMU's initial read, in one message
    assert len(data) == 4096
    assert struct.unpack_from("<HH", data, 0) == (0x1B36, 0x7000)
    reply = call(client, Command.REGION_READ, RegionAccess(0, CONFIG, 8).pack())
    assert RegionAccess.unpack(reply.payload) == RegionAccess(0, CONFIG, 8)
    assert len(reply.payload) == RegionAccess.SIZE + 8


def test_region_write_config(client: Client) -> None:
    reply = call(client, Command.REGION_WRITE, RegionAccess(0x3C, CONFIG, 1).pack() + b"\x0b")
    assert not reply.is_error
    assert reply.payload == RegionAccess(0x3C, CONFIG, 1).pack()  # the 16 bytes, no data
    assert client.config_read(0x3C, 1) == 0x0B


def test_region_read_write_bars(client: Client, device: RecordingSample) -> None:
    assert client.bar_read(0, REG_ID, 4) == ID_VALUE
    client.bar_write(0, REG_SCRATCH, 4, 0xDEADBEEF)
    assert client.bar_read(0, REG_SCRATCH, 4) == 0xDEADBEEF
    assert device.scratch == 0xDEADBEEF
    client.bar_write(0, BUFFER_OFFSET, 8, 0x0102030405060708)
    assert client.bar_read(0, BUFFER_OFFSET, 8) == 0x0102030405060708
    assert client.bar_read(0, BUFFER_OFFSET + 1, 2) == 0x0607
    # the I/O BAR mirrors SCRATCH at 0
    assert client.bar_read(2, 0, 4) == 0xDEADBEEF
    client.bar_write(2, 0, 4, 7)
    assert client.bar_read(0, REG_SCRATCH, 4) == 7


def test_posted_write_gets_no_reply_and_stays_ordered(server: Server) -> None:
    peer = RawPeer(server.path)
    try:
        peer.send(codec.encode(codec.request(1, Command.VERSION,
                                             codec.encode_version(0, 0, QEMU_CAPABILITIES))))
        assert peer.recv_message().msg_id == 1
        # many posted writes, then one read: the read sees every write, and the first
        # message back is the read's reply
        for i in range(50):
            body = RegionAccess(REG_SCRATCH, 0, 4).pack() + struct.pack("<I", i)
            peer.send(codec.encode(codec.request(100 + i, Command.REGION_WRITE, body,
                                                 no_reply=True)))
        peer.send(codec.encode(codec.request(7, Command.REGION_READ,
                                             RegionAccess(REG_SCRATCH, 0, 4).pack())))
        reply = peer.recv_message()
        assert reply.msg_id == 7 and not reply.is_error
        assert reply.payload[RegionAccess.SIZE:] == struct.pack("<I", 49)
        peer.send(codec.encode(codec.request(8, Command.REGION_READ,
                                             RegionAccess(REG_WRITES, 0, 4).pack())))
        reply = peer.recv_message()
        assert reply.msg_id == 8
        assert struct.unpack("<I", reply.payload[RegionAccess.SIZE:]) == (50,)
        # a failing posted write gets no (error) reply either
        bad = RegionAccess(0x4000, 0, 4).pack() + b"\0\0\0\0"
        peer.send(codec.encode(codec.request(9, Command.REGION_WRITE, bad, no_reply=True)))
        peer.send(codec.encode(codec.request(10, Command.REGION_READ,
                                             RegionAccess(REG_SCRATCH, 0, 4).pack())))
        assert peer.recv_message().msg_id == 10
    finally:
        peer.close()


def test_posted_writes_through_client(client: Client, device: RecordingSample) -> None:
    for i in range(20):
        client.bar_write(0, REG_SCRATCH, 4, i, posted=True)
    assert client.bar_read(0, REG_SCRATCH, 4) == 19
    assert [a[4] for a in device.accesses if a[0] == "w"] == list(range(20))


# --- REGION_WRITE_MULTI -------------------------------------------------------------------


def _multi(writes: list[tuple[int, int, bytes]]) -> bytes:
    body = b"".join(WriteMultiEntry(off, reg, len(d), d.ljust(8, b"\0")).pack()
                    for reg, off, d in writes)
    return WriteMulti(len(writes)).pack() + body


def test_write_multi_in_order_no_reply(server: Server, device: RecordingSample) -> None:
    peer = RawPeer(server.path)
    try:
        peer.send(codec.encode(codec.request(1, Command.VERSION,
                                             codec.encode_version(0, 0, QEMU_CAPABILITIES))))
        peer.recv_message()
        writes = [(0, REG_SCRATCH, struct.pack("<I", v)) for v in (1, 2, 3)]
        writes.append((0, BUFFER_OFFSET, b"\x01\x02\x03\x04\x05\x06\x07\x08"))
        writes.append((0, BUFFER_OFFSET + 8, b"\xaa"))
        peer.send(codec.encode(codec.request(2, Command.REGION_WRITE_MULTI, _multi(writes),
                                             no_reply=True)))
        peer.send(codec.encode(codec.request(3, Command.REGION_READ,
                                             RegionAccess(REG_SCRATCH, 0, 4).pack())))
        reply = peer.recv_message()
        assert reply.msg_id == 3
        assert reply.payload[RegionAccess.SIZE:] == struct.pack("<I", 3)
        ws = [(a[2], a[4]) for a in device.accesses if a[0] == "w"]
        assert ws == [(REG_SCRATCH, 1), (REG_SCRATCH, 2), (REG_SCRATCH, 3),
                      (BUFFER_OFFSET, 0x0807060504030201), (BUFFER_OFFSET + 8, 0xAA)]
    finally:
        peer.close()


def test_write_multi_with_reply(client: Client, device: RecordingSample) -> None:
    reply = call(client, Command.REGION_WRITE_MULTI,
                 _multi([(0, REG_SCRATCH, b"\x05\0\0\0"), (2, 0, b"\x06\0\0\0")]))
    assert not reply.is_error
    assert WriteMulti.unpack(reply.payload).wr_cnt == 2
    assert device.scratch == 6
    client.write_multi([(0, REG_SCRATCH, b"\x09\0\0\0")])  # posted
    assert client.bar_read(0, REG_SCRATCH, 4) == 9


def test_write_multi_bad_entries(client: Client) -> None:
    bad_count = WriteMulti(1).pack() + WriteMultiEntry(0, 0, 9, bytes(8)).pack()
    reply = call(client, Command.REGION_WRITE_MULTI, bad_count)
    assert reply.is_error and reply.error == errno.EINVAL
    short = WriteMulti(2).pack() + WriteMultiEntry(0, 0, 4, bytes(8)).pack()
    reply = call(client, Command.REGION_WRITE_MULTI, short)
    assert reply.is_error and reply.error == errno.EINVAL


# --- DMA_READ / DMA_WRITE (server -> client) ----------------------------------------------




LAYOUT_CASES = [
    (DmaLayout.SPEC, DmaLayout.AUTO),
    (DmaLayout.LEGACY, DmaLayout.AUTO),
    (DmaLayout.SPEC, DmaLayout.SPEC),
    (DmaLayout.LEGACY, DmaLayout.LEGACY),
]


@pytest.mark.parametrize(("client_layout", "server_layout"), LAYOUT_CASES)
def test_message_dma_layouts(make_server: ServerFactory, make_client: ClientFactory,
                             device: RecordingSample, client_layout: DmaLayout,
                             server_layout: DmaLayout) -> None:
    traced: list[str] = []
    srv = make_server(device, dma_layout=server_layout, trace=traced.append)
    c = negotiated(make_client(srv, dma_layout=client_layout))
    c.add_memory(0x100000, 0x2000, fd_backed=False)
    pattern = bytes(range(256)) * 8  # 2 KiB
    c.write_memory(0x100400, pattern)
    assert device_dma(c, 0x100400, 2048, DMA_TO_DEVICE) == STAT_DONE
    assert bytes(device.buffer) == pattern
    assert ("read", 0x100400, 2048) in c.dma_requests
    device.buffer[:] = bytes(b ^ 0xFF for b in pattern)
    assert device_dma(c, 0x100000, 100, DMA_FROM_DEVICE) == STAT_DONE
    assert c.read_memory(0x100000, 100) == bytes(b ^ 0xFF for b in pattern[:100])
    assert ("write", 0x100000, 100) in c.dma_requests
    conn = srv.wait_for_client(WAIT)
    assert conn.requester.dma_layout() is client_layout
    probes = [line for line in traced if "DMA_WRITE req" in line and " count=0x0 " in line]
    assert len(probes) == (1 if server_layout is DmaLayout.AUTO else 0)


@pytest.mark.parametrize("client_layout", [DmaLayout.SPEC, DmaLayout.LEGACY])
def test_message_dma_chunks_and_mixed_maps(make_server: ServerFactory, make_client: ClientFactory,
                                           device: RecordingSample, client_layout: DmaLayout
                                           ) -> None:
    srv = make_server(device)
    c = negotiated(make_client(srv, dma_layout=client_layout))
    c.add_memory(0, 0x10000)  # fd-backed
    c.add_memory(0x10000, 0x30000, fd_backed=False)  # message DMA
    conn = srv.wait_for_client(WAIT)
    data = os.urandom(0x20000)
    fut = conn.ctx.defer(lambda: conn.dma.write(0xF000, data))
    fut.result(WAIT)
    assert c.read_memory(0xF000, 0x1000) + c.read_memory(0x10000, 0x1F000) == data
    got = conn.ctx.defer(lambda: conn.dma.read(0xF000, len(data))).result(WAIT)
    assert got == data
    # chunks of at most 64 KiB per message
    assert all(n <= 0x10000 for _, _, n in c.dma_requests)


def test_dma_write_to_read_only_memory_fails(client: Client, server: Server) -> None:
    client.add_memory(0x1000, 0x1000, fd_backed=False, writable=False)
    assert device_dma(client, 0x1000, 16, DMA_FROM_DEVICE) == STAT_ERROR
    assert device_dma(client, 0x1000, 16, DMA_TO_DEVICE) == STAT_DONE


# --- DEVICE_RESET -------------------------------------------------------------------------


def test_device_reset_header_only(client: Client, device: RecordingSample) -> None:
    fds = client.enable_irq(IrqIndex.MSIX, 4)
    try:
        client.bar_write(0, REG_SCRATCH, 4, 0x1234)
        client.config_write(COMMAND, 2, COMMAND_MEMORY | COMMAND_MASTER)
        resets = device.resets
        reply = call(client, Command.DEVICE_RESET)
        assert not reply.is_error
        assert reply.payload == b"" and not reply.fds
        assert device.resets == resets + 1
        assert client.bar_read(0, REG_SCRATCH, 4) == 0
        assert client.config_read(COMMAND, 2) == 0
        assert device.irqs.state(IrqIndex.MSIX).fds == (None,) * 4
        reply = call(client, Command.DEVICE_RESET, b"\0\0\0\0")
        assert reply.is_error and reply.error == errno.EINVAL
    finally:
        close_all(fds)


# --- unsupported: DEVICE_FEATURE, MIG_DATA_*, DIRTY_PAGES ---------------------------------


@pytest.mark.parametrize(("command", "payload"), [
    (Command.DEVICE_FEATURE, DeviceFeature(DeviceFeature.SIZE, 1 | 1 << 16).pack()),
    (Command.DEVICE_FEATURE, DeviceFeature(DeviceFeature.SIZE, 1 | 1 << 18).pack()),
    (Command.MIG_DATA_READ, MigData(MigData.SIZE, 4096).pack()),
    (Command.MIG_DATA_WRITE, MigData(MigData.SIZE + 4, 4).pack() + b"abcd"),
    (Command.DIRTY_PAGES, struct.pack("<II", 8, 1)),
])
def test_unsupported_commands(client: Client, command: Command, payload: bytes) -> None:
    reply = call(client, command, payload)
    assert reply.is_error and reply.error == errno.ENOTSUP
    assert reply.payload == b""
    assert reply.flags & 0xF == MsgType.REPLY and reply.flags & HeaderFlag.ERROR
    assert client.bar_read(0, REG_ID, 4) == ID_VALUE  # still serving
