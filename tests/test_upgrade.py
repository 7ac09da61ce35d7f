"""Live upgrade in one process: two (or more) Server objects hand over through a socketpair.

What must hold: no message lost, duplicated or reordered across a hand-over (also messages
already read into the old reader's buffer and messages still in the socket buffer), maps and
interrupt eventfds keep working, the device's registers are kept, nothing of the client's is
torn down, and no fd is left behind.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    MSIX_CAP_ID,
    WAIT,
    RawPeer,
    find_capability,
    open_fds,
    wait_eventfd,
    wait_until,
)

from vfio_user_server.client import Client
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command
from vfio_user_server.protocol.framing import MessageReader
from vfio_user_server.protocol.structs import RegionAccess
from vfio_user_server.sample import (
    DMA_FROM_DEVICE,
    DMA_IRQ,
    REG_DMA_ADDR,
    REG_DMA_CMD,
    REG_DMA_LEN,
    REG_DMA_STAT,
    REG_SCRATCH,
    REG_WRITES,
    STAT_DONE,
    SampleDevice,
)
from vfio_user_server.server import Server
from vfio_user_server.upgrade import (
    FDS_PER_SEND,
    HandoverError,
    hand_over,
    receive_and_resume,
    recv_handover,
    send_handover,
)


class Keeper(SampleDevice):
    """The sample device with its registers and buffer declared as state."""

    state_fields = ("scratch", "dma_addr", "dma_len", "dma_stat", "writes", "buffer")


def upgrade(old: Server) -> Server:
    """Hand ``old`` to a new Server (new device object) and return the new one, serving."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    result: list[Server | BaseException] = []

    def new_side() -> None:
        try:
            result.append(receive_and_resume(b, Keeper()))
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=new_side)
    t.start()
    try:
        hand_over(old, a, timeout=WAIT)
    finally:
        t.join(WAIT)
        a.close()
        b.close()
    assert result and isinstance(result[0], Server), result
    old.close()  # the old one lets go: no unlink, no shutdown
    return result[0]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "dev.sock"


@pytest.fixture
def baseline() -> Iterator[None]:
    before = open_fds()
    yield
    assert open_fds() == before


def access(msg_id: int, command: Command, value: int | None) -> bytes:
    payload = RegionAccess(REG_SCRATCH, 0, 4).pack()
    if value is not None:
        payload += value.to_bytes(4, "little")
    return codec.encode(codec.request(msg_id, command, payload))


def test_pipelined_requests_cross_three_hand_overs_once_and_in_order(
        path: Path, baseline: None) -> None:
    server = Server(Keeper(), path, upgradable=True).start()
    peer = RawPeer(path)
    try:
        peer.send(codec.encode(codec.request(1, Command.VERSION,
                                             codec.encode_version(0, 0, {}))))
        assert not peer.recv_message().is_error
        pairs = 12000  # ~800 KB: more than one read, more than the socket buffer
        burst = b"".join(access(2 + 2 * i, Command.REGION_WRITE, i)
                         + access(3 + 2 * i, Command.REGION_READ, None)
                         for i in range(pairs))
        replies: list[codec.Message] = []
        got = threading.Condition()

        def read_replies() -> None:
            for _ in range(2 * pairs):
                msg = peer.recv_message()
                with got:
                    replies.append(msg)
                    got.notify_all()

        reader = threading.Thread(target=read_replies)
        reader.start()
        sender = threading.Thread(target=peer.send, args=(burst,))
        sender.start()
        for step in range(1, 4):  # hand over three times while the burst flows
            want = 2000 * step
            with got:
                assert got.wait_for(lambda: len(replies) >= want, WAIT)  # noqa: B023
            server = upgrade(server)
        sender.join(WAIT)
        reader.join(WAIT)
        assert len(replies) == 2 * pairs
        assert [r.msg_id for r in replies] == [2 + k for k in range(2 * pairs)]
        assert not any(r.is_error for r in replies)
        reads = [int.from_bytes(r.payload[16:20], "little") for r in replies[1::2]]
        assert reads == list(range(pairs))  # each read saw its own write: order held
        peer.send(codec.encode(codec.request(
            9, Command.REGION_READ, RegionAccess(REG_WRITES, 0, 4).pack())))
        assert int.from_bytes(peer.recv_message().payload[16:20], "little") == pairs
    finally:
        peer.close()
        server.close()
    assert not path.exists()  # the last server owns the file it was handed


def test_maps_irqs_and_registers_survive(path: Path, baseline: None) -> None:
    server = Server(Keeper(), path, upgradable=True).start()
    c = Client.connect(path)
    try:
        c.negotiate()
        c.get_device_info()
        mem = c.add_memory(0x100000, 0x10000)
        cap = find_capability(c, MSIX_CAP_ID)
        c.config_write(cap + 2, 2, c.config_read(cap + 2, 2) | 0x8000)
        fds = c.enable_msix(4)
        c.bar_write(0, 0x2000 + 12, 4, 0)  # vector 0 unmasked
        c.bar_write(0, REG_SCRATCH, 4, 0xC0FFEE)
        for _ in range(3):
            server = upgrade(server)
            assert path.exists()
            assert c.bar_read(0, REG_SCRATCH, 4) == 0xC0FFEE
        conn = server.wait_for_client(WAIT)
        assert len(conn.table) == 1
        # the device's buffer went DMA_TO_DEVICE..., here: buffer -> guest memory by the fd map
        server.device.buffer[:4] = b"abcd"  # type: ignore[attr-defined]
        c.bar_write(0, REG_DMA_ADDR, 8, 0x100000 + 0x40)
        c.bar_write(0, REG_DMA_LEN, 4, 4)
        c.bar_write(0, REG_DMA_CMD, 4, DMA_FROM_DEVICE | DMA_IRQ)
        assert wait_eventfd(fds[0]) == 1  # the eventfd handed over fires
        assert c.bar_read(0, REG_DMA_STAT, 4) == STAT_DONE
        assert bytes(mem.mem[0x40:0x44]) == b"abcd"
        assert c.dma_requests == []  # through the mmapped fd, no message DMA
        for fd in fds:
            os.close(fd)
    finally:
        c.close()
        server.wait_for_disconnect(1, WAIT)
        server.close()


def test_a_new_client_after_a_hand_over_gets_the_handed_listener(path: Path,
                                                                  baseline: None) -> None:
    server = Server(Keeper(), path, upgradable=True).start()
    try:
        server = upgrade(server)  # no client: only the listener goes
        with Client.connect(path) as c:
            c.negotiate()
            c.bar_write(0, REG_SCRATCH, 4, 7)
            assert c.bar_read(0, REG_SCRATCH, 4) == 7
    finally:
        server.close()


def test_a_refused_hand_over_leaves_the_old_server_serving(path: Path, baseline: None) -> None:
    server = Server(Keeper(), path, upgradable=True).start()
    c = Client.connect(path)
    try:
        c.negotiate()
        c.bar_write(0, REG_SCRATCH, 4, 5)
        a, b = socket.socketpair()
        with a, b:
            def refuse() -> None:
                recv_handover(b).close()
                b.sendall(b"Eno thanks")

            t = threading.Thread(target=refuse)
            t.start()
            with pytest.raises(HandoverError, match="no thanks"):
                hand_over(server, a, timeout=WAIT)
            t.join(WAIT)
        assert not server.handed_over
        assert c.bar_read(0, REG_SCRATCH, 4) == 5
    finally:
        c.close()
        server.wait_for_disconnect(1, WAIT)
        server.close()


def test_many_fds_go_in_chunks() -> None:
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2 * FDS_PER_SEND + 3)]
    a, b = socket.socketpair()
    try:
        t = threading.Thread(target=send_handover, args=(a, {"x": 1}, fds))
        t.start()
        got = recv_handover(b)
        t.join(WAIT)
        assert got.manifest["x"] == 1 and len(got.fds) == len(fds)
        os.eventfd_write(got.fds[-1], 3)
        assert os.eventfd_read(fds[-1]) == 3  # the same file, in order
        got.close()
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()


def test_reader_pending_bytes_and_fds_move_to_a_new_reader() -> None:
    msgs = [codec.encode(codec.request(i, Command.REGION_READ,
                                       RegionAccess(0, 0, 4).pack())) for i in range(3)]
    old = MessageReader(1 << 20)
    r, w = os.pipe()
    try:
        old.feed(msgs[0] + msgs[1], [r])  # the fds go with msg 1 (the last to start)
        old.feed(msgs[2][:10])
        assert old.next_message() is not None
        assert old.has_message()
        data, marks = old.export_pending()
        new = MessageReader(1 << 20)
        new.import_pending(data, marks)
        assert old.take_fds() == [r]  # the old one still held them (the caller dups)
        new.feed(msgs[2][10:])
        m1 = new.next_message()
        assert m1 is not None and m1.msg_id == 1 and m1.fds == [r]
        m2 = new.next_message()
        assert m2 is not None and m2.msg_id == 2 and m2.fds == []
        assert not new.has_message()
    finally:
        os.close(r)
        os.close(w)


def test_a_new_process_that_cannot_load_the_state_changes_nothing(path: Path,
                                                                   baseline: None) -> None:
    """The new side fails late (its device refuses the state, after it rebuilt the maps,
    eventfds and session): it tears none of them down, and the old server serves on."""
    server = Server(Keeper(), path, upgradable=True).start()
    c = Client.connect(path)
    try:
        c.negotiate()
        c.get_device_info()
        mem = c.add_memory(0x100000, 0x10000)
        fds = c.enable_msix(4)
        c.bar_write(0, REG_SCRATCH, 4, 9)
        a, b = socket.socketpair()
        errors: list[BaseException] = []

        def new_side() -> None:
            try:
                receive_and_resume(b, SampleDevice())  # no declared fields: refuses Keeper's
            except BaseException as exc:
                errors.append(exc)

        with a, b:
            t = threading.Thread(target=new_side)
            t.start()
            with pytest.raises(HandoverError, match="refused"):
                hand_over(server, a, timeout=WAIT)
            t.join(WAIT)
        assert errors and "state" in str(errors[0]).lower()
        assert not server.handed_over and path.exists()
        assert c.bar_read(0, REG_SCRATCH, 4) == 9  # the socket was not shut down
        server.device.buffer[:2] = b"ok"  # type: ignore[attr-defined]
        c.bar_write(0, REG_DMA_ADDR, 8, 0x100000)
        c.bar_write(0, REG_DMA_LEN, 4, 2)
        c.bar_write(0, REG_DMA_CMD, 4, DMA_FROM_DEVICE)
        conn = server.wait_for_client(WAIT)
        assert len(conn.table) == 1
        wait_until(lambda: c.bar_read(0, REG_DMA_STAT, 4) == STAT_DONE, what="device DMA")
        assert bytes(mem.mem[:2]) == b"ok"
        for fd in fds:
            os.close(fd)
    finally:
        c.close()
        server.wait_for_disconnect(1, WAIT)
        server.close()
