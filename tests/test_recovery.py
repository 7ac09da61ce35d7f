"""Crash recovery (``vfio-user-server --supervise``): SIGKILL the device process and the client,
our own, keeps working on the same connection.

What must hold: a request the dead process was handling gets an error reply (EIO), the next
ones are answered by the new process; the DMA maps and interrupt eventfds the client gave
work in the new process; the device was reset through its reset path (its registers back to
power-on, the config space the client programmed kept); the supervisor holds no fd of a
client that left; it exits with the device process (SIGTERM, ``--once``).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MSIX_CAP_ID, find_capability, wait_eventfd
from supervised import DEADLINE, Resources, ServerProcess, wait_for

from vfio_user_server.client import Client
from vfio_user_server.errors import ErrorReply
from vfio_user_server.sample import (
    DMA_FROM_DEVICE,
    DMA_IRQ,
    DMA_TO_DEVICE,
    REG_DMA_ADDR,
    REG_DMA_CMD,
    REG_DMA_LEN,
    REG_DMA_STAT,
    REG_SCRATCH,
    STAT_DONE,
)

#: A sample device whose read of HANG blocks for ever, after touching the file MARK: the
#: test kills the device process in the middle of that request.
HANG_DEVICE = '''
import ctypes
import os
import threading

from vfio_user_server.sample import SampleDevice

HANG = 0x100
SEGV = 0x104


class Hang(SampleDevice):
    def bar_read(self, bar, offset, size):
        if bar == 0 and offset == HANG:
            with open(os.environ["HANG_MARK"], "w") as f:
                f.write(str(os.getpid()))
            threading.Event().wait()
        if bar == 0 and offset == SEGV:
            ctypes.string_at(0)  # a segfault in native code
        return super().bar_read(bar, offset, size)
'''
HANG = 0x100
SEGV = 0x104


def device_pid(server: ServerProcess) -> int | None:
    """The supervisor's one child, the device process."""
    kids = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    return int(kids[0]) if kids else None


def kill_device(server: ServerProcess, sig: int = signal.SIGKILL) -> int:
    """Kill the device process with ``sig``; the pid of the one that took over."""
    old = device_pid(server)
    assert old is not None
    os.kill(old, sig)
    wait_for(lambda: device_pid(server) not in (None, old), "a new device process")
    new = device_pid(server)
    assert new is not None
    return new


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerProcess]:
    (tmp_path / "hangdev.py").write_text(HANG_DEVICE)
    sock = tmp_path / "dev.sock"
    server = ServerProcess(["--supervise", "--socket", str(sock), "--log-level", "WARNING",
                            "--app-dir", str(tmp_path), "hangdev:Hang"], tmp_path,
                           env={"HANG_MARK": str(tmp_path / "mark")})
    server.sock = sock
    try:
        server.ready()
        wait_for(lambda: not server.datagram_sockets(), "the notify socket to close")
        yield server
    finally:
        server.close()


def connect(server: ServerProcess) -> Client:
    c = Client.connect(server.sock, timeout=DEADLINE)
    c.negotiate()
    c.get_device_info()
    return c


def test_kill_between_messages_keeps_maps_eventfds_and_config(served: ServerProcess) -> None:
    baseline = Resources.of(served.pid)
    first = device_pid(served)
    assert first is not None
    device_baseline = Resources.of(first)
    c = connect(served)
    try:
        mem = c.add_memory(0x100000, 0x10000)
        cap = find_capability(c, MSIX_CAP_ID)
        c.config_write(cap + 2, 2, c.config_read(cap + 2, 2) | 0x8000)
        fds = c.enable_msix(4)
        c.bar_write(0, REG_SCRATCH, 4, 0xC0FFEE)
        assert c.bar_read(0, REG_SCRATCH, 4) == 0xC0FFEE
        for _ in range(2):
            kill_device(served)
            # the device was reset: its registers are back to power-on ...
            assert c.bar_read(0, REG_SCRATCH, 4) == 0
            # ... and what the client programmed in config space is kept (MSI-X enabled)
            assert c.config_read(cap + 2, 2) & 0x8000
            c.bar_write(0, REG_SCRATCH, 4, 0xC0FFEE)
        # the map handed over: guest memory -> device buffer -> guest memory, by the fd
        mem.mem[0x10:0x14] = b"wxyz"
        c.bar_write(0, REG_DMA_ADDR, 8, 0x100000 + 0x10)
        c.bar_write(0, REG_DMA_LEN, 4, 4)
        c.bar_write(0, REG_DMA_CMD, 4, DMA_TO_DEVICE)
        wait_for(lambda: c.bar_read(0, REG_DMA_STAT, 4) == STAT_DONE, "DMA to the device")
        c.bar_write(0, REG_DMA_ADDR, 8, 0x100000 + 0x40)
        c.bar_write(0, REG_DMA_CMD, 4, DMA_FROM_DEVICE | DMA_IRQ)
        assert wait_eventfd(fds[0]) == 1  # the eventfd handed over fires
        assert bytes(mem.mem[0x40:0x44]) == b"wxyz"
        assert c.dma_requests == []  # through the mmapped fd, no message DMA
        for fd in fds:
            os.close(fd)
    finally:
        c.close()
    # the supervisor let go of the client's socket, maps and eventfds
    wait_for(lambda: Resources.of(served.pid).fds == baseline.fds,
             "the supervisor's fds back to its baseline")
    # and the device process that took over holds what the first one held before the client
    now = device_pid(served)
    assert now is not None
    wait_for(lambda: Resources.of(now).fds == device_baseline.fds,
             "the device process's fds back to the first one's baseline")
    c = connect(served)  # the new device process serves the next client, as usual
    try:
        assert c.bar_read(0, REG_SCRATCH, 4) == 0xC0FFEE
    finally:
        c.close()


def test_kill_mid_request_answers_it_with_an_error(served: ServerProcess,
                                                   tmp_path: Path) -> None:
    c = connect(served)
    try:
        mem = c.add_memory(0x100000, 0x10000)
        c.bar_write(0, REG_SCRATCH, 4, 0x5A5A)
        failed: list[BaseException] = []

        def read_hang() -> None:
            try:
                c.bar_read(0, HANG, 4)
            except BaseException as exc:  # checked below
                failed.append(exc)

        t = threading.Thread(target=read_hang)
        t.start()
        mark = tmp_path / "mark"
        wait_for(mark.exists, "the device process to hang in the request")
        os.kill(int(mark.read_text()), signal.SIGKILL)
        t.join(DEADLINE)
        assert not t.is_alive()
        assert len(failed) == 1 and isinstance(failed[0], ErrorReply), failed
        assert failed[0].errno == errno.EIO
        # the connection goes on, in order, with the device reset and the map kept
        assert c.bar_read(0, REG_SCRATCH, 4) == 0
        c.bar_write(0, REG_SCRATCH, 4, 1)
        assert c.bar_read(0, REG_SCRATCH, 4) == 1
        mem.mem[:4] = b"abcd"
        c.bar_write(0, REG_DMA_ADDR, 8, 0x100000)
        c.bar_write(0, REG_DMA_LEN, 4, 4)
        c.bar_write(0, REG_DMA_CMD, 4, DMA_TO_DEVICE)
        wait_for(lambda: c.bar_read(0, REG_DMA_STAT, 4) == STAT_DONE, "DMA to the device")
        assert c.bar_read(0, 0x800, 4) == int.from_bytes(b"abcd", "little")
    finally:
        c.close()


def test_a_segfault_in_native_code_mid_request(served: ServerProcess) -> None:
    c = connect(served)
    try:
        c.bar_write(0, REG_SCRATCH, 4, 0x77)
        old = device_pid(served)
        with pytest.raises(ErrorReply) as exc:
            c.bar_read(0, SEGV, 4)
        assert exc.value.errno == errno.EIO
        assert device_pid(served) not in (None, old)
        assert c.bar_read(0, REG_SCRATCH, 4) == 0  # reset; the poison request not run again
        assert "killed by signal 11" in served.stderr()
    finally:
        c.close()


def test_kill_without_a_client_and_stop(served: ServerProcess) -> None:
    kill_device(served)
    c = connect(served)
    try:
        c.bar_write(0, REG_SCRATCH, 4, 3)
        assert c.bar_read(0, REG_SCRATCH, 4) == 3
    finally:
        c.close()
    child = device_pid(served)
    assert served.stop() == 0
    assert child is not None and not Path(f"/proc/{child}").exists()
    assert not served.sock.exists()


def test_once_ends_with_the_client(tmp_path: Path) -> None:
    sock = tmp_path / "dev.sock"
    server = ServerProcess(["--supervise", "--socket", str(sock), "--once",
                            "--log-level", "WARNING", "sample"], tmp_path)
    server.sock = sock
    try:
        server.ready()
        c = connect(server)
        kill_device(server)
        assert c.bar_read(0, REG_SCRATCH, 4) == 0
        c.close()
        assert server.wait() == 0
    finally:
        server.close()


def test_supervise_needs_one_device_on_a_socket(tmp_path: Path) -> None:
    from supervised import run_cli

    done = run_cli(["--supervise", "--socket", str(tmp_path / "a"), "sample", "--",
                    "--socket", str(tmp_path / "b"), "sample"])
    assert done.returncode == 2 and "--supervise serves one device" in done.stderr


def test_supervise_a_listening_fd(tmp_path: Path) -> None:
    import socket

    sock = tmp_path / "fd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)
    server = ServerProcess(["--supervise", "--fd", str(listener.fileno()),
                            "--log-level", "WARNING", "sample"], tmp_path,
                           pass_fds=[listener.fileno()])
    listener.close()
    server.sock = sock
    try:
        server.ready()
        c = connect(server)
        try:
            c.bar_write(0, REG_SCRATCH, 4, 9)
            kill_device(server)
            assert c.bar_read(0, REG_SCRATCH, 4) == 0
        finally:
            c.close()
        assert server.stop() == 0
    finally:
        server.close()
