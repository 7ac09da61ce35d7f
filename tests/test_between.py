"""The hand-over slot (vfio_user_server.between): a job reaches a loop thread blocked in the
client's read, woken by a signal (no select() per read), or by the select fallback where no
handler can be installed; and a read interrupted that way loses no byte of a message."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from helpers import RawPeer, RecordingSample

from vfio_user_server import msgshim
from vfio_user_server.between import WAKE_SIGNAL
from vfio_user_server.connection import Connection
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command
from vfio_user_server.protocol.structs import RegionAccess
from vfio_user_server.sample import REG_SCRATCH
from vfio_user_server.server import Server

WAIT = 30.0


def version(peer: RawPeer) -> None:
    peer.send(codec.encode(codec.request(1, Command.VERSION, codec.encode_version(0, 0, {}))))
    assert not peer.recv_message().is_error


def scratch(msg_id: int, value: int | None) -> bytes:
    payload = RegionAccess(REG_SCRATCH, 0, 4).pack()
    if value is None:
        return codec.encode(codec.request(msg_id, Command.REGION_READ, payload))
    payload += value.to_bytes(4, "little")
    return codec.encode(codec.request(msg_id, Command.REGION_WRITE, payload))


def make_server(path: Path, in_main: bool) -> Server:
    if in_main:
        return Server(RecordingSample(), path, upgradable=True)
    previous = signal.signal(WAKE_SIGNAL, signal.SIG_DFL)  # no handler, and none can be made
    made: list[Server] = []
    t = threading.Thread(target=lambda: made.append(
        Server(RecordingSample(), path, upgradable=True)))
    t.start()
    t.join()
    signal.signal(WAKE_SIGNAL, previous)
    return made[0]


@pytest.mark.parametrize("in_main", [True, False], ids=["signal", "select"])
def test_a_job_reaches_a_loop_blocked_in_the_clients_read(tmp_path: Path,
                                                         in_main: bool) -> None:
    server = make_server(tmp_path / "s.sock", in_main)
    assert server._slot.by_signal is in_main
    server.start()
    peer = RawPeer(server.path)
    try:
        version(peer)
        # with the signal, even a read inside a message is cut short for the job (the select
        # fallback waits for the message to end): the bytes stay for after the job
        msg = scratch(2, 0x1234)
        cut = 10 if in_main else 0
        peer.send(msg[:cut])
        ran: list[tuple[str, bool]] = []

        def job(conn: Connection | None) -> bool:
            assert conn is not None
            ran.append((threading.current_thread().name, conn.reader.reader.has_message()))
            return False  # serve on

        assert server.run_between_messages(job, timeout=WAIT) is False
        assert ran and ran[0][0].startswith("vfio-user-server") and ran[0][1] is False
        peer.send(msg[cut:] + scratch(3, None))
        assert not peer.recv_message().is_error
        read = peer.recv_message()
        assert read.msg_id == 3 and read.payload[RegionAccess.SIZE:] == (0x1234).to_bytes(4,
                                                                                   "little")
        # the read timeout is gone: the loop blocks again instead of spinning
        conn = server.wait_for_client(WAIT)
        tv = conn.sock.getsockopt(1, 20, 16)  # SOL_SOCKET, SO_RCVTIMEO
        assert tv == bytes(16)
    finally:
        peer.close()
        server.close()


def test_a_job_posted_between_clients_runs_in_the_accept_loop(tmp_path: Path) -> None:
    server = Server(RecordingSample(), tmp_path / "s.sock", upgradable=True).start()
    try:
        seen: list[Connection | None] = []

        def job(conn: Connection | None) -> bool:
            seen.append(conn)
            return False

        assert server.run_between_messages(job, timeout=WAIT) is False
        assert seen == [None]
    finally:
        server.close()


class PostingSample(RecordingSample):
    """The sample device; a read of the scratch register while ``armed`` makes the job pipe
    readable as a hand-over's post() does, here at the worst moment for the loop: while it is
    busy, after it looked for a job and before it waits again (no flag, no signal)."""

    armed: int | None = None  # the pipe's write end, while armed

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if self.armed is not None and bar == 0 and offset == REG_SCRATCH:
            os.write(self.armed, b"u")
            self.armed = None
        return super().bar_read(bar, offset, size)


def test_the_shims_loop_wakes_for_a_job_posted_while_it_is_busy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shim's loop waits in poll on the client socket and the job pipe: a wake-up that
    comes while a handler runs ends the wait that follows (before the next message), and the
    server drains the pipe then, so the loop serves on instead of waking again and again."""
    pytest.importorskip("vfio_user_server._msg_shim")  # ci/test builds it
    returned = threading.Event()
    real_one = msgshim.FastPath.handle_one

    def handle_one(self: msgshim.FastPath) -> codec.Message | None:
        out = real_one(self)
        if out is None and self.woken:
            returned.set()
        return out

    monkeypatch.setattr(msgshim.FastPath, "handle_one", handle_one)
    dev = PostingSample()
    server = Server(dev, tmp_path / "s.sock", upgradable=True, shim=True).start()
    assert server._slot.by_signal
    peer = RawPeer(server.path)
    try:
        version(peer)
        conn = server.wait_for_client(WAIT)
        assert conn.fast is not None and conn.fast._r.wake_fd == server._slot.pipe
        dev.armed = server._slot._pipe_w
        peer.send(scratch(2, None))
        assert peer.recv_message().msg_id == 2
        assert returned.wait(WAIT), "the loop slept through the job pipe"
        peer.send(scratch(3, 0x55) + scratch(4, None))  # and the loop serves on
        assert peer.recv_message().msg_id == 3
        assert peer.recv_message().payload[RegionAccess.SIZE:] == (0x55).to_bytes(4, "little")
        with pytest.raises(BlockingIOError):  # drained
            os.read(server._slot.pipe, 1)
    finally:
        peer.close()
        server.close()
