"""The server's security rules, each with its test (issue 9, item 9).

Rules tested elsewhere, not repeated here:

* **The socket is 0600 by default**: ``tests/test_server_lifecycle.py``
  ``test_socket_mode_default_0600`` (the Server) and ``test_cli_serves_and_shuts_down_on_signal``
  (the command); ``tests/test_supervisor.py`` ``test_notify_ready_then_stopping`` and
  ``test_several_devices_each_on_its_socket`` (each socket of a multi-device process).
* **DMA only inside mapped ranges, with their permissions**: ``tests/test_dma_rules.py``
  (helper G: ``test_device_dma_outside_mapped_ranges_fails``,
  ``test_read_only_map_refuses_device_writes``, ``test_unmapped_range_is_gone_for_the_device``),
  ``tests/test_dma.py`` (``test_read_only_map_never_written``,
  ``test_write_only_map_not_readable``),
  ``tests/test_bad_input.py`` ``test_device_dma_outside_maps``.
* **A second client cannot disturb the first**: ``tests/test_server_lifecycle.py``
  ``test_one_client_at_a_time`` (the second connection is refused while the first keeps its
  state and is served); here too for a second client that sends before it is refused.

Here: config writes never change read-only bits, for every built-in device; when one process
serves several devices, one device's client cannot reach another device's state; and a client's
fds are received close-on-exec, so they never leak into a program the server starts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import WAIT, RawPeer, device_dma, eventfd_quiet, negotiated, wait_eventfd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from supervised import ServerProcess

from vfio_user_server.cli import BUILTIN_DEVICES, make_device
from vfio_user_server.client import Client
from vfio_user_server.device import PciDevice
from vfio_user_server.errors import VfioUserError
from vfio_user_server.pci import COMMAND
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command, IrqIndex, RegionIndex
from vfio_user_server.protocol.session import SCM_MAX_FD
from vfio_user_server.sample import (
    BUFFER_SIZE,
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    REG_INTX,
    REG_SCRATCH,
    STAT_DONE,
    STAT_ERROR,
    SampleDevice,
)
from vfio_user_server.testing import serve
from vfio_user_server.testing.serve import ENABLE_BITS

#: Options a built-in device needs to be built for a test (a new device with required options
#: fails the test below until it is listed here).
DEVICE_ARGS: dict[str, list[str]] = {"nvme": ["--size", "1M"]}

CONFIG = RegionIndex.CONFIG


def built_in(name: str) -> PciDevice:
    dev = make_device(name, DEVICE_ARGS.get(name, []))
    assert isinstance(dev, PciDevice)
    return dev


def spec_read_only(c: Client, size: int) -> bytearray:
    """Bits the PCI specification makes read-only, found through the client's reads alone:
    the IDs, revision and class, header type, subsystem IDs, the capabilities pointer, and
    every capability's header (ID and next pointer; the extended ones' whole 32-bit header)."""
    mask = bytearray(size)
    for start, length in ((0x00, 4), (0x08, 4), (0x0E, 1), (0x2C, 4), (0x34, 1)):
        mask[start:start + length] = b"\xff" * length
    seen: set[int] = set()
    pos = c.config_read(0x34, 1) & 0xFC
    while pos and pos not in seen:
        seen.add(pos)
        mask[pos:pos + 2] = b"\xff\xff"
        pos = c.config_read(pos + 1, 1) & 0xFC
    if size > 0x100:
        pos = 0x100
        while pos and pos not in seen and c.config_read(pos, 4):
            seen.add(pos)
            mask[pos:pos + 4] = b"\xff" * 4
            pos = (c.config_read(pos, 4) >> 20) & 0xFFC
    return mask


def config_bytes(c: Client, size: int) -> bytes:
    return c.region_read(CONFIG, 0, size)


@contextlib.contextmanager
def served_builtin(name: str) -> Iterator[tuple[PciDevice, Client]]:
    dev = built_in(name)
    try:
        with serve(dev, memory=1 << 16) as s:
            yield dev, s.client
    finally:
        close = getattr(dev, "close", None)
        if close is not None:
            close()


def config_writes(size: int) -> st.SearchStrategy[list[tuple[int, int, int]]]:
    """Lists of (offset, length, value): aligned accesses, half of them in the header."""
    write = st.tuples(st.one_of(st.integers(0, 0x3F), st.integers(0, size - 1)),
                      st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF))
    return st.lists(write.map(lambda w: (w[0] - w[0] % w[1], w[1],
                                         w[2] & ((1 << (8 * w[1])) - 1))),
                    min_size=1, max_size=40)


@pytest.mark.parametrize("name", sorted(BUILTIN_DEVICES))
def test_config_writes_never_change_read_only_bits(name: str) -> None:
    with served_builtin(name) as (dev, c):
        size = len(dev.config.space.data)
        space = dev.config.space
        # read-only: neither writable nor write-1-to-clear in the device's own table, and
        # whatever the specification makes read-only (checked independently of the table)
        table_ro = bytes(~(w | x) & 0xFF for w, x in zip(space.wmask, space.w1cmask,
                                                          strict=True))
        spec_ro = spec_read_only(c, size)
        assert all(s & ~t == 0 for s, t in zip(spec_ro, table_ro, strict=True)), \
            "the device's table lets a client write bits the specification makes read-only"

        def assert_read_only_kept(before: bytes, after: bytes) -> None:
            changed = [(i, before[i], after[i]) for i in range(size)
                       if (before[i] ^ after[i]) & table_ro[i]]
            assert changed == [], f"read-only bits changed (offset, before, after): {changed}"

        # every byte, every bit both ways: all ones, then all zeros; from the top down, so
        # that a function-level reset (PCIe DEVCTL) cannot undo the header's writes
        for pattern in (0xFF, 0x00):
            before = config_bytes(c, size)
            for offset in reversed(range(size)):
                with contextlib.suppress(VfioUserError):
                    c.config_write(offset, 1, pattern)
            assert_read_only_kept(before, config_bytes(c, size))

        @settings(max_examples=30, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(config_writes(size))
        def writes_keep_read_only_bits(writes: list[tuple[int, int, int]]) -> None:
            before = config_bytes(c, size)
            for offset, length, value in writes:
                with contextlib.suppress(VfioUserError):  # a refused write is fine too
                    c.config_write(offset, length, value)
            assert_read_only_kept(before, config_bytes(c, size))

        writes_keep_read_only_bits()
        # the device still answers, with its identity intact
        assert c.config_read(0, 4) == dev.device_id << 16 | dev.vendor_id


# --- a second client ------------------------------------------------------------------------


def test_second_client_sending_first_cannot_disturb_the_first(sock_dir: Path) -> None:
    dev = SampleDevice()
    with serve(dev, memory=1 << 16, enable=True) as s:
        first = s.client
        first.bar_write(0, REG_SCRATCH, 4, 0xA5A5)
        intruder = RawPeer(s.path)
        try:
            # a whole session's worth of requests in one write (the server may hang up first)
            burst = b"".join([
                codec.encode(codec.request(1, Command.VERSION, codec.encode_version(0, 0, {}))),
                codec.encode(codec.request(2, Command.DEVICE_RESET, b"")),
                codec.encode(codec.request(3, Command.DMA_UNMAP, bytes(32))),
            ])
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                intruder.send(burst)
            assert intruder.at_eof(), "a second client was not refused"
        finally:
            intruder.close()
        assert first.bar_read(0, REG_SCRATCH, 4) == 0xA5A5  # no reset reached the device
        first.write_memory(0, b"mine" * 4)
        assert device_dma(first, 0, 16, DMA_TO_DEVICE) == STAT_DONE  # the map is still there
        assert bytes(dev.buffer[:16]) == b"mine" * 4


# --- one process, several devices -----------------------------------------------------------


@pytest.fixture
def two_devices(sock_dir: Path) -> Iterator[tuple[Path, Path]]:
    a, b = sock_dir / "a.sock", sock_dir / "b.sock"
    p = ServerProcess(["--socket", str(a), "sample", "--", "--socket", str(b), "sample"],
                      sock_dir)
    try:
        p.ready()
        yield a, b
        assert p.stop() == 0, p.stderr()
    finally:
        p.close()


def enabled(c: Client) -> Client:
    negotiated(c)
    c.config_write(COMMAND, 2, c.config_read(COMMAND, 2) | ENABLE_BITS)
    return c


def test_one_devices_client_cannot_reach_another_device(two_devices: tuple[Path, Path]
                                                        ) -> None:
    path_a, path_b = two_devices
    with Client.connect(path_a, timeout=WAIT) as a, Client.connect(path_b, timeout=WAIT) as b:
        enabled(a)
        enabled(b)
        # registers: each device has its own
        a.bar_write(0, REG_SCRATCH, 4, 0x1111)
        assert b.bar_read(0, REG_SCRATCH, 4) == 0
        b.bar_write(0, REG_SCRATCH, 4, 0x2222)
        assert a.bar_read(0, REG_SCRATCH, 4) == 0x1111
        # config space: a's BAR programming is not b's
        a.config_write(0x10, 4, 0xFE000000)
        assert b.config_read(0x10, 4) & ~0xF != 0xFE000000

        # maps: a's memory exists for a's device only
        a.add_memory(0, 1 << 16)
        a.write_memory(0, b"A" * BUFFER_SIZE)
        assert device_dma(b, 0, 64, DMA_TO_DEVICE) == STAT_ERROR  # b has no map at 0
        assert device_dma(b, 0, 64, DMA_FROM_DEVICE) == STAT_ERROR
        assert a.read_memory(0, 64) == b"A" * 64  # b's device wrote nothing there
        # b maps its own memory at the same IOVA: each device sees its own client's memory
        b.add_memory(0, 1 << 16)
        b.write_memory(0, b"B" * 64)
        assert device_dma(b, 0, 64, DMA_TO_DEVICE) == STAT_DONE
        assert device_dma(a, 0, 64, DMA_TO_DEVICE) == STAT_DONE
        assert device_dma(b, 0x100, 64, DMA_FROM_DEVICE) == STAT_DONE
        assert b.read_memory(0x100, 64) == b"B" * 64
        assert a.read_memory(0x100, 64) == b"A" * 64
        # b's unmap of that range leaves a's map alone
        b.dma_unmap(0, 1 << 16)
        assert device_dma(a, 0, 64, DMA_FROM_DEVICE) == STAT_DONE
        assert device_dma(b, 0, 64, DMA_TO_DEVICE) == STAT_ERROR

        # interrupts: b's device raising its INTx signals b's eventfd, never a's
        (fd_a,) = a.enable_irq(IrqIndex.INTX, 1)
        (fd_b,) = b.enable_irq(IrqIndex.INTX, 1)
        try:
            b.bar_write(0, REG_INTX, 4, 1)
            assert wait_eventfd(fd_b) == 1
            assert eventfd_quiet(fd_a)  # the trigger went out before b's reply
            b.bar_write(0, REG_INTX, 4, 0)
            a.bar_write(0, REG_INTX, 4, 1)
            assert wait_eventfd(fd_a) == 1
            assert eventfd_quiet(fd_b)
        finally:
            os.close(fd_a)
            os.close(fd_b)

        # a reset through b's client resets b's device only
        b.reset()
        assert b.bar_read(0, REG_SCRATCH, 4) == 0
        assert a.bar_read(0, REG_SCRATCH, 4) == 0x1111


def test_one_devices_client_leaving_leaves_the_other_served(two_devices: tuple[Path, Path]
                                                            ) -> None:
    path_a, path_b = two_devices
    with Client.connect(path_a, timeout=WAIT) as a:
        enabled(a)
        a.add_memory(0, 1 << 16)
        with Client.connect(path_b, timeout=WAIT) as b:
            enabled(b)
            b.add_memory(0, 1 << 16)
            # b breaks the framing and is dropped
            b.send_raw(b"\xff" * 64)
        a.write_memory(0, b"still here")
        assert device_dma(a, 0, 10, DMA_TO_DEVICE) == STAT_DONE
    with Client.connect(path_b, timeout=WAIT) as b2:  # b's socket serves its next client
        enabled(b2)
        assert device_dma(b2, 0, 16, DMA_TO_DEVICE) == STAT_ERROR  # b's old map is gone


def test_fds_sent_inside_an_unfinished_message_are_refused_at_once(
        two_devices: tuple[Path, Path]) -> None:
    """A client sends the header of a large message, then one byte at a time, each with as
    many fds as one sendmsg carries (dups of one fd: they cost it nothing), and never finishes.
    The server must not hold them until the process runs out of fds (which would cost the other
    device's client its DMA maps and eventfds): it drops the client at the first such read."""
    path_a, path_b = two_devices
    r, w = os.pipe()
    peer = RawPeer(path_a)
    try:
        peer.send(codec.encode_header(1, Command.VERSION, 1 << 20, 0))  # within the limit
        for _ in range(3):
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                peer.send(b"v", [r] * SCM_MAX_FD)
        assert peer.at_eof()  # dropped, without the client finishing or hanging up
    finally:
        peer.close()
        os.close(r)
        os.close(w)
    with Client.connect(path_b, timeout=WAIT) as b:  # the other device is served as before
        enabled(b)
        b.add_memory(0, 1 << 16)
        b.write_memory(0, b"still here")
        assert device_dma(b, 0, 10, DMA_TO_DEVICE) == STAT_DONE


def test_client_fds_are_received_close_on_exec() -> None:
    """Every fd the server takes from a client (DMA memfds, IRQ eventfds) is FD_CLOEXEC."""
    import fcntl

    from vfio_user_server.protocol.constants import IrqIndex
    from vfio_user_server.sample import SampleDevice
    from vfio_user_server.testing import serve

    def kinds() -> dict[int, str]:
        out = {}
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/self/fd/{name}")
                if link.startswith("/memfd:") or link == "anon_inode:[eventfd]":
                    out[int(name)] = link
        return out

    before = kinds()
    with serve(SampleDevice(), memory=1 << 20) as s:
        s.client.enable_irq(IrqIndex.MSIX if s.client.get_irq_info(IrqIndex.MSIX).count
                            else IrqIndex.INTX, 1)
        new = {fd: link for fd, link in kinds().items() if fd not in before}
        # the client's own memfd and eventfd, and the server's copies of each
        assert sum(link.startswith("/memfd:") for link in new.values()) >= 2, new
        assert sum(link == "anon_inode:[eventfd]" for link in new.values()) >= 2, new
        inheritable = [f"{fd} {link}" for fd, link in new.items()
                       if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC]
        assert inheritable == []
