"""The sample device, used through the client the way QEMU and a guest driver would."""

from __future__ import annotations

import errno
import os
import struct

import pytest
from helpers import (
    CONFIG,
    MSI_CAP_ID,
    MSIX_CAP_ID,
    WAIT,
    ClientFactory,
    RecordingSample,
    ServerFactory,
    close_all,
    device_dma,
    eventfd_quiet,
    find_capability,
    negotiated,
    wait_eventfd,
)

from vfio_user_server.client import Client, ClientError
from vfio_user_server.errors import DeviceDefinitionError
from vfio_user_server.pci import COMMAND, COMMAND_INTX_DISABLE, COMMAND_MASTER, COMMAND_MEMORY
from vfio_user_server.pci.config import STATUS, STATUS_CAP_LIST, STATUS_INTERRUPT
from vfio_user_server.protocol.constants import IrqIndex, IrqSetFlag, RegionInfoFlag
from vfio_user_server.sample import (
    BUFFER_OFFSET,
    DMA_FROM_DEVICE,
    DMA_IRQ,
    DMA_TO_DEVICE,
    ID_VALUE,
    REG_DMA_CMD,
    REG_ID,
    REG_INTX,
    REG_IRQ,
    REG_SCRATCH,
    REG_WRITES,
    STAT_DONE,
    STAT_ERROR,
    SampleDevice,
)
from vfio_user_server.server import Server

F = IrqSetFlag
PCIE_CAP_ID = 0x10




# --- negotiation and DMA maps -------------------------------------------------------------


def test_negotiation(raw_client: Client, device: RecordingSample) -> None:
    caps = raw_client.negotiate()
    assert caps == raw_client.server_caps
    assert caps["max_msg_fds"] >= 1 and caps["max_data_xfer_size"] >= 4096
    # the device hears of the client right after the VERSION reply goes out, before the
    # server reads the next request
    info = raw_client.get_device_info()
    assert device.events == ["connect"]
    assert device.connected
    assert info.num_regions >= 8 and info.num_irqs >= 5


def test_dma_map_visible_to_device(client: Client, device: RecordingSample) -> None:
    client.add_memory(0x100000, 0x10000)
    client.add_memory(0x200000, 0x1000, fd_backed=False)
    maps = device.dma.table.maps()
    assert [(m.iova, m.size, m.direct) for m in maps] == [(0x100000, 0x10000, True),
                                                          (0x200000, 0x1000, False)]
    client.dma_unmap(0x100000, 0x10000)
    assert [m.iova for m in device.dma.table.maps()] == [0x200000]


# --- config space -------------------------------------------------------------------------


def test_config_ids(client: Client) -> None:
    assert client.config_read(0x00, 2) == 0x1B36
    assert client.config_read(0x02, 2) == 0x7000
    assert client.config_read(0x08, 1) == 1  # revision
    assert client.config_read(0x09, 3) == 0xFF0000  # class code
    assert client.config_read(0x0E, 1) & 0x7F == 0  # type-0 header
    assert client.config_read(0x2C, 2) == 0x1B36  # subsystem vendor
    assert client.config_read(0x2E, 2) == 0x0001  # subsystem
    assert client.config_read(0x3D, 1) == 1  # INTA
    assert client.config_read(STATUS, 2) & STATUS_CAP_LIST
    # the IDs are read-only
    client.config_write(0x00, 4, 0xFFFFFFFF)
    assert client.config_read(0x00, 4) == 0x7000 << 16 | 0x1B36
    # the capability chain: PM, MSI, MSI-X, PCIe
    assert find_capability(client, MSI_CAP_ID)
    assert find_capability(client, MSIX_CAP_ID)
    assert find_capability(client, PCIE_CAP_ID)
    assert len(client.region_read(CONFIG, 0, 4096)) == 4096


def test_bar_sizing_through_config(client: Client) -> None:
    bar0 = client.config_read(0x10, 4)
    assert bar0 & 0xF == 0x4  # 64-bit memory, not prefetchable
    assert client.config_read(0x18, 4) & 0x3 == 0x1  # BAR2: I/O
    sizes = {}
    for reg in (0x10, 0x14, 0x18, 0x1C, 0x20, 0x24):
        old = client.config_read(reg, 4)
        client.config_write(reg, 4, 0xFFFFFFFF)
        sizes[reg] = client.config_read(reg, 4)
        client.config_write(reg, 4, old)
        assert client.config_read(reg, 4) == old
    assert sizes[0x10] == (~(0x4000 - 1) & 0xFFFFFFF0) | 0x4
    assert sizes[0x14] == 0xFFFFFFFF  # upper half of the 64-bit BAR
    assert sizes[0x18] == (~(256 - 1) & 0xFFFFFFFC) | 0x1
    assert sizes[0x1C] == sizes[0x20] == sizes[0x24] == 0  # unused
    # programming an address
    client.config_write(0x10, 4, 0xFEB00000)
    client.config_write(0x14, 4, 0x1)
    assert client.config_read(0x10, 4) == 0xFEB00004
    assert client.config_read(0x14, 4) == 0x1


def test_rom_bar_reads_zero_without_rom(client: Client) -> None:
    assert client.config_read(0x30, 4) == 0
    client.config_write(0x30, 4, 0xFFFFF800)
    assert client.config_read(0x30, 4) == 0
    assert client.get_region_info(6).size == 0
    with pytest.raises(ClientError) as info:
        client.region_read(6, 0, 4)
    assert info.value.errno == errno.EINVAL


ROM = b"\x55\xaa" + bytes(range(256)) * 12  # 3074 bytes: padded to 4 KiB


class RomSample(RecordingSample):
    rom = ROM


def test_rom_read_back_through_region_6(make_server: ServerFactory,
                                        make_client: ClientFactory) -> None:
    srv = make_server(RomSample())
    c = negotiated(make_client(srv))
    # ROM sizing as QEMU does it
    old = c.config_read(0x30, 4)
    c.config_write(0x30, 4, 0xFFFFF800)
    assert c.config_read(0x30, 4) & 0xFFFFF800 == 0xFFFFF000  # 4 KiB
    c.config_write(0x30, 4, old)
    desc = c.get_region_info(6)
    assert desc.size == 4096
    assert desc.flags == RegionInfoFlag.READ  # read-only
    assert desc.fd is None
    # QEMU reads the whole ROM in one message
    image = c.region_read(6, 0, 4096)
    assert image[:len(ROM)] == ROM
    assert image[len(ROM):] == b"\xff" * (4096 - len(ROM))
    assert c.region_read(6, 0x100, 16) == ROM[0x100:0x110]
    # a read running past the end is short (QEMU loops on short ROM reads)
    assert c.region_read(6, 4096 - 8, 64) == image[-8:]
    with pytest.raises(ClientError) as info:
        c.region_write(6, 0, b"\0\0\0\0")
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ClientError):
        c.region_read(6, 4096, 4)


# --- BARs ---------------------------------------------------------------------------------


def test_bar_access_mem_and_io(client: Client, device: RecordingSample) -> None:
    assert client.bar_read(0, REG_ID, 4) == ID_VALUE
    for size in (1, 2, 4, 8):
        value = int.from_bytes(os.urandom(size), "little")
        client.bar_write(0, BUFFER_OFFSET + 16, size, value)
        assert client.bar_read(0, BUFFER_OFFSET + 16, size) == value
    client.bar_write(0, REG_SCRATCH, 4, 0xCAFE)
    assert client.bar_read(2, 0, 4) == 0xCAFE  # I/O BAR mirrors SCRATCH
    client.bar_write(2, 0, 2, 0xBEEF)
    assert client.bar_read(0, REG_SCRATCH, 4) == 0xBEEF
    # odd-sized accesses are split into aligned pieces
    client.region_write(0, BUFFER_OFFSET + 1, b"\x01\x02\x03\x04\x05\x06\x07")
    assert client.region_read(0, BUFFER_OFFSET + 1, 7) == b"\x01\x02\x03\x04\x05\x06\x07"
    assert bytes(device.buffer[1:8]) == b"\x01\x02\x03\x04\x05\x06\x07"
    writes = client.bar_read(0, REG_WRITES, 4)
    assert writes == device.writes and writes > 0


# --- interrupts ---------------------------------------------------------------------------


def test_msix_interrupt(client: Client, device: RecordingSample) -> None:
    cap = find_capability(client, MSIX_CAP_ID)
    control = client.config_read(cap + 2, 2)
    assert control & 0x7FF == 3  # 4 vectors
    assert client.config_read(cap + 4, 4) == 0x2000  # table: BAR0 + 0x2000
    assert client.config_read(cap + 8, 4) == 0x3000  # PBA: BAR0 + 0x3000
    client.config_write(cap + 2, 2, control | 0x8000)
    assert device.msix is not None and device.msix.enabled
    fds = client.enable_msix(4)
    try:
        for v in (0, 3, 1):
            client.bar_write(0, REG_IRQ, 4, v)
            assert wait_eventfd(fds[v]) == 1
        assert all(eventfd_quiet(fd) for fd in fds)
        # a client that programs the table (QEMU doesn't): masked vectors go pending (PBA)
        client.bar_write(0, 0x2000 + 2 * 16 + 12, 4, 1)  # mask vector 2
        client.bar_write(0, REG_IRQ, 4, 2)
        assert eventfd_quiet(fds[2])
        assert client.bar_read(0, 0x3000, 8) & (1 << 2)
        client.bar_write(0, 0x2000 + 2 * 16 + 12, 4, 0)  # unmask: the pending one fires
        assert wait_eventfd(fds[2]) == 1
        assert not client.bar_read(0, 0x3000, 8) & (1 << 2)
        # the function mask holds every vector
        client.config_write(cap + 2, 2, control | 0xC000)
        client.bar_write(0, 0x2000 + 0 * 16 + 12, 4, 0)
        client.bar_write(0, REG_IRQ, 4, 0)
        assert eventfd_quiet(fds[0])
        client.config_write(cap + 2, 2, control | 0x8000)
        assert wait_eventfd(fds[0]) == 1
    finally:
        close_all(fds)


def test_msi_interrupt(client: Client, device: RecordingSample) -> None:
    cap = find_capability(client, MSI_CAP_ID)
    control = client.config_read(cap + 2, 2)
    assert control & 0x0E == 2 << 1  # 4 vectors capable
    assert control & 0x180 == 0x180  # 64-bit, per-vector masking
    client.config_write(cap + 4, 4, 0xFEE00000)
    client.config_write(cap + 8, 4, 0)
    client.config_write(cap + 12, 2, 0x4040)
    client.config_write(cap + 2, 2, control | 0x1 | 2 << 4)  # enable, 4 vectors
    assert device.msi is not None and device.msi.enabled
    fds = client.enable_irq(IrqIndex.MSI, 4)
    try:
        client.bar_write(0, REG_IRQ, 4, 1)
        assert wait_eventfd(fds[1]) == 1
        assert eventfd_quiet(fds[0])
        # per-vector mask: pending bit, fires on unmask
        client.config_write(cap + 16, 4, 1 << 3)
        client.bar_write(0, REG_IRQ, 4, 3)
        assert eventfd_quiet(fds[3])
        assert client.config_read(cap + 20, 4) & (1 << 3)
        client.config_write(cap + 16, 4, 0)
        assert wait_eventfd(fds[3]) == 1
        assert not client.config_read(cap + 20, 4) & (1 << 3)
    finally:
        close_all(fds)


def test_intx_automask_unmask_disable(client: Client, device: RecordingSample) -> None:
    [fd] = client.enable_irq(IrqIndex.INTX, 1)
    try:
        client.bar_write(0, REG_INTX, 4, 1)  # assert the line
        assert wait_eventfd(fd) == 1
        assert client.config_read(STATUS, 2) & STATUS_INTERRUPT
        # automasked: no second interrupt while the line stays high
        client.bar_write(0, REG_INTX, 4, 1)
        assert eventfd_quiet(fd)
        # UNMASK with the line still high: fires (and masks) again
        client.set_irqs(IrqIndex.INTX, F.DATA_NONE | F.ACTION_UNMASK, 0, 1)
        assert wait_eventfd(fd) == 1
        # de-assert, unmask: quiet
        client.bar_write(0, REG_INTX, 4, 0)
        assert not client.config_read(STATUS, 2) & STATUS_INTERRUPT
        client.set_irqs(IrqIndex.INTX, F.DATA_NONE | F.ACTION_UNMASK, 0, 1)
        assert eventfd_quiet(fd)
        # COMMAND.INTX_DISABLE holds the interrupt; clearing it delivers it
        client.config_write(COMMAND, 2, COMMAND_INTX_DISABLE)
        client.bar_write(0, REG_INTX, 4, 1)
        assert eventfd_quiet(fd)
        assert client.config_read(STATUS, 2) & STATUS_INTERRUPT  # status still shows it
        client.config_write(COMMAND, 2, 0)
        assert wait_eventfd(fd) == 1
        client.bar_write(0, REG_INTX, 4, 0)
        client.set_irqs(IrqIndex.INTX, F.DATA_NONE | F.ACTION_UNMASK, 0, 1)
        # with MSI-X enabled, the device's interrupt() no longer uses INTx
        cap = find_capability(client, MSIX_CAP_ID)
        client.config_write(cap + 2, 2, client.config_read(cap + 2, 2) | 0x8000)
        [vec] = client.enable_irq(IrqIndex.MSIX, 1)
        client.bar_write(0, REG_IRQ, 4, 0)
        assert wait_eventfd(vec) == 1
        assert eventfd_quiet(fd)
        os.close(vec)
    finally:
        os.close(fd)


def test_interrupt_after_dma_completion(client: Client) -> None:
    [fd] = client.enable_irq(IrqIndex.INTX, 1)
    try:
        client.add_memory(0x1000, 0x1000, fd_backed=False)
        client.write_memory(0x1000, b"irq")
        assert device_dma(client, 0x1000, 3, DMA_TO_DEVICE | DMA_IRQ) == STAT_DONE
        assert wait_eventfd(fd) == 1
    finally:
        os.close(fd)


# --- DMA by the device --------------------------------------------------------------------


@pytest.mark.parametrize("fd_backed", [True, False])
def test_device_dma(client: Client, device: RecordingSample, fd_backed: bool) -> None:
    client.add_memory(0x80000, 0x4000, fd_backed=fd_backed)
    data = os.urandom(2048)
    client.write_memory(0x81000, data)
    assert device_dma(client, 0x81000, 2048, DMA_TO_DEVICE) == STAT_DONE
    assert bytes(device.buffer) == data
    assert client.region_read(0, BUFFER_OFFSET, 2048) == data
    client.region_write(0, BUFFER_OFFSET, b"from the device!")
    assert device_dma(client, 0x83FF0, 16, DMA_FROM_DEVICE) == STAT_DONE
    assert client.read_memory(0x83FF0, 16) == b"from the device!"
    # the messages went only where there was no fd
    assert bool(client.dma_requests) is not fd_backed


def test_device_dma_across_maps(client: Client, device: RecordingSample) -> None:
    client.add_memory(0x0, 0x1000)
    client.add_memory(0x1000, 0x1000, fd_backed=False)
    data = bytes(range(256)) * 4
    client.write_memory(0xE00, data[:0x200])
    client.write_memory(0x1000, data[0x200:])
    assert device_dma(client, 0xE00, len(data), DMA_TO_DEVICE) == STAT_DONE
    assert bytes(device.buffer[:len(data)]) == data
    assert client.dma_requests == [("read", 0x1000, 0x200)]


# --- reset --------------------------------------------------------------------------------


def test_device_reset(client: Client, device: RecordingSample) -> None:
    client.bar_write(0, REG_SCRATCH, 4, 0x1234)
    client.config_write(COMMAND, 2, COMMAND_MEMORY | COMMAND_MASTER)
    resets = device.resets
    client.reset()
    assert device.resets == resets + 1
    assert client.bar_read(0, REG_SCRATCH, 4) == 0
    assert client.config_read(COMMAND, 2) == 0
    assert client.config_read(0, 4) == 0x7000 << 16 | 0x1B36


@pytest.mark.parametrize(
    ("name", "hook"),
    [("vfio_reset", "reset"), ("vfio_attach", "on_connect"), ("vfio_detach", "on_disconnect"),
     ("device_reset", "reset"), ("client_connected", "on_connect"),
     ("client_disconnected", "on_disconnect")],
)
def test_server_side_names_are_not_hooks(name: str, hook: str) -> None:
    """A device that defines the server's side of an event (or its old name) is told which
    hook to write instead, when its class is defined: the server would never call it."""
    with pytest.raises(DeviceDefinitionError, match=rf"Bad\.{name}: .* override {hook}\(\)"):
        type("Bad", (SampleDevice,), {name: lambda self, *a: None})


def test_function_level_reset(client: Client, device: RecordingSample) -> None:
    cap = find_capability(client, PCIE_CAP_ID)
    assert client.config_read(cap + 4, 4) & (1 << 28)  # FLR capable
    client.bar_write(0, REG_SCRATCH, 4, 0x99)
    resets = device.resets
    client.config_write(cap + 8, 2, client.config_read(cap + 8, 2) | 0x8000)
    assert device.resets == resets + 1
    assert client.bar_read(0, REG_SCRATCH, 4) == 0
    assert not client.config_read(cap + 8, 2) & 0x8000  # reads 0


# --- connections --------------------------------------------------------------------------


def test_disconnect_and_second_connection(server: Server, make_client: ClientFactory,
                                          device: RecordingSample) -> None:
    first = negotiated(make_client(server))
    first.add_memory(0, 0x1000)
    fds = first.enable_msix(4)
    first.bar_write(0, REG_SCRATCH, 4, 0xAB)
    first.close()
    close_all(fds)
    server.wait_for_disconnect(1, WAIT)
    assert not device.connected
    assert device.events == ["connect", "disconnect"]
    # the device keeps its state; the new client starts with no maps and no IRQ fds
    second = negotiated(make_client(server))
    assert device.connected
    assert second.bar_read(0, REG_SCRATCH, 4) == 0xAB
    assert len(device.dma.table) == 0
    assert all(fd is None for fd in device.irqs.state(IrqIndex.MSIX).fds)
    second.add_memory(0, 0x1000, fd_backed=False)
    second.write_memory(0, b"again")
    assert device_dma(second, 0, 5, DMA_TO_DEVICE) == STAT_DONE
    assert bytes(device.buffer[:5]) == b"again"
    [fd] = second.enable_irq(IrqIndex.MSIX, 1)
    try:
        cap = find_capability(second, MSIX_CAP_ID)
        second.config_write(cap + 2, 2, second.config_read(cap + 2, 2) | 0x8000)
        second.bar_write(0, REG_IRQ, 4, 0)
        assert wait_eventfd(fd) == 1
    finally:
        os.close(fd)


def test_dma_without_client_fails_cleanly(device: RecordingSample) -> None:
    # a device that is not connected: the DMA engine reports an error, nothing raises
    assert not device.connected
    device.bar_write(0, REG_DMA_CMD, 4, DMA_TO_DEVICE)
    assert device.dma_stat == STAT_ERROR
    assert struct.pack("<I", device.bar_read(0, REG_ID, 4)) == struct.pack("<I", ID_VALUE)
