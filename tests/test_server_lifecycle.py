"""The server's life: the socket file, one client at a time, disconnect clean-up, and the
``vfio-user-server`` command line as a subprocess."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    CONFIG,
    MMAP_BAR,
    WAIT,
    ClientFactory,
    MmapSample,
    RawPeer,
    RecordingSample,
    ServerFactory,
    close_all,
    negotiated,
    open_fds,
    wait_eventfd,
    wait_until,
)

from vfio_user_server.client import QEMU_CAPABILITIES, Client
from vfio_user_server.errors import ConnectionClosed, DmaError, VfioUserError
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command, IrqIndex, IrqSetFlag
from vfio_user_server.protocol.structs import IrqSet, RegionAccess
from vfio_user_server.sample import ID_VALUE, REG_ID, REG_SCRATCH
from vfio_user_server.server import Server

# --- the socket file ----------------------------------------------------------------------


def test_socket_mode_default_0600(server: Server) -> None:
    st = os.lstat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o660, 0o666, 0o700])
def test_socket_mode_configurable(make_server: ServerFactory, mode: int) -> None:
    srv = make_server(mode=mode)
    assert stat.S_IMODE(os.lstat(srv.path).st_mode) == mode


def test_socket_mode_does_not_change_umask(make_server: ServerFactory) -> None:
    old = os.umask(0o022)
    try:
        make_server(mode=0o600)
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(old)


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_refuses_to_replace_non_socket(sock_path: Path, kind: str) -> None:
    if kind == "file":
        sock_path.write_text("precious")
    elif kind == "dir":
        sock_path.mkdir()
    else:
        target = sock_path.with_name("target")
        target.write_text("precious")
        sock_path.symlink_to(target)
    srv = Server(RecordingSample(), sock_path)
    try:
        with pytest.raises(VfioUserError) as info:
            srv.start()
        assert info.value.errno == errno.EEXIST
    finally:
        srv.close()
    if kind == "file":
        assert sock_path.read_text() == "precious"
    elif kind == "dir":
        assert sock_path.is_dir()
    else:
        assert sock_path.is_symlink() and sock_path.read_text() == "precious"


def test_replaces_stale_socket(sock_path: Path, make_server: ServerFactory,
                               make_client: ClientFactory) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays, nobody listens
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    srv = make_server()
    assert srv.path == sock_path
    c = negotiated(make_client(srv))
    assert c.bar_read(0, REG_ID, 4) == ID_VALUE


def test_refuses_to_steal_a_live_socket(server: Server, make_client: ClientFactory) -> None:
    other = Server(RecordingSample(), server.path)
    try:
        with pytest.raises(VfioUserError) as info:
            other.start()
        assert info.value.errno == errno.EADDRINUSE
    finally:
        other.close()
    # the first server still owns its socket
    assert os.path.exists(server.path)
    c = negotiated(make_client(server))
    assert c.bar_read(0, REG_ID, 4) == ID_VALUE


def test_socket_appears_only_when_listening(sock_dir: Path) -> None:
    # whoever waits for the path (a launcher, QEMU) connects at once: never ECONNREFUSED
    refused = []
    for i in range(50):
        path = sock_dir / f"race{i}.sock"

        def probe(path: Path = path) -> None:
            while not path.exists():
                pass
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
            except OSError as exc:
                refused.append(exc)
            finally:
                s.close()

        t = threading.Thread(target=probe, daemon=True)
        t.start()
        srv = Server(RecordingSample(), path, mode=0o640)
        try:
            srv.listen()
            t.join(WAIT)
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640
        finally:
            srv.close()
    assert refused == []
    assert sorted(p.name for p in sock_dir.iterdir()) == []  # no temporary names left


def test_long_socket_path(sock_dir: Path, make_client: ClientFactory) -> None:
    name = "s" * (104 - len(str(sock_dir)) - 1)
    path = sock_dir / name
    assert len(str(path)) == 104
    with Server(RecordingSample(), path) as srv:
        c = negotiated(make_client(srv))
        assert c.bar_read(0, REG_ID, 4) == ID_VALUE
        c.close()
    assert list(sock_dir.iterdir()) == []


def test_stop_removes_socket_and_drops_client(make_server: ServerFactory,
                                              make_client: ClientFactory) -> None:
    dev = RecordingSample()
    srv = make_server(dev)
    c = negotiated(make_client(srv))
    srv.stop()
    assert not os.path.exists(srv.path)
    with pytest.raises((ConnectionClosed, OSError)):
        c.bar_read(0, REG_ID, 4)
    assert dev.events == ["connect", "disconnect"]
    srv.stop()  # twice is fine
    srv.close()


def test_context_manager(sock_path: Path) -> None:
    with Server(RecordingSample(), sock_path) as srv, Client.connect(srv.path) as c:
        negotiated(c)
        assert c.bar_read(0, REG_ID, 4) == ID_VALUE
    assert not sock_path.exists()


# --- one client at a time -----------------------------------------------------------------


def test_one_client_at_a_time(server: Server, make_client: ClientFactory,
                              device: RecordingSample) -> None:
    first = negotiated(make_client(server))
    first.bar_write(0, REG_SCRATCH, 4, 0x55)
    second = RawPeer(server.path)
    try:
        assert second.at_eof(), "a second client was not refused"
    finally:
        second.close()
    # the first one is undisturbed
    assert first.bar_read(0, REG_SCRATCH, 4) == 0x55
    first.close()
    server.wait_for_disconnect(1, WAIT)
    third = negotiated(make_client(server))
    # the device state is kept across connections
    assert third.bar_read(0, REG_SCRATCH, 4) == 0x55
    assert device.events == ["connect", "disconnect", "connect"]


def test_waiting_client_served_after_first(server: Server, make_client: ClientFactory) -> None:
    first = negotiated(make_client(server))
    first.close()
    # connect right away, possibly before the server finished with the first one
    second = negotiated(make_client(server))
    assert second.bar_read(0, REG_ID, 4) == ID_VALUE


# --- disconnect clean-up ------------------------------------------------------------------


def test_disconnect_unmaps_and_closes_every_fd(make_server: ServerFactory,
                                                make_client: ClientFactory,
                                                mmap_device: MmapSample) -> None:
    srv = make_server(mmap_device)
    baseline = open_fds()
    c = negotiated(make_client(srv))
    for i in range(4):
        c.add_memory(i * 0x10000, 0x10000)
    c.add_memory(0x100000, 0x1000, fd_backed=False)
    irq_fds = c.enable_irq(IrqIndex.MSIX, 4) + c.enable_irq(IrqIndex.INTX, 1)
    irq_fds += c.enable_irq(IrqIndex.ERR, 1)
    resample = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    c.set_irqs(IrqIndex.INTX, 0x4 | 0x10, 0, 1, [resample])
    desc = c.get_region_info(MMAP_BAR)
    assert desc.fd is not None
    conn = srv.wait_for_client(WAIT)
    table = conn.table
    assert len(table) == 5 and table.mapped_file_count() == 4
    during = open_fds()
    assert len(during - baseline) > 10
    # the client goes away (its own fds closed too)
    c.close()
    close_all([*irq_fds, resample, desc.fd])
    srv.wait_for_disconnect(1, WAIT)
    assert len(table) == 0 and table.mapped_file_count() == 0
    for index in IrqIndex:
        state = mmap_device.irqs.state(index)
        assert all(fd is None for fd in state.fds)
        assert state.resample_fd is None
    wait_until(lambda: open_fds() <= baseline, what="every connection fd closed")
    assert mmap_device.events == ["connect", "disconnect"]
    # the device's own region fd is still open
    os.fstat(mmap_device.mem_fd)
    # and the next client works, interrupts included
    c2 = negotiated(make_client(srv))
    [fd] = c2.enable_irq(IrqIndex.MSIX, 1)
    try:
        mmap_device.irqs.trigger(IrqIndex.MSIX, 0)
        assert wait_eventfd(fd) == 1
    finally:
        os.close(fd)


def test_disconnect_without_negotiation(server: Server, device: RecordingSample,
                                        make_client: ClientFactory) -> None:
    peer = RawPeer(server.path)
    server.wait_for_client(WAIT)
    peer.close()
    server.wait_for_disconnect(1, WAIT)
    # a client that never negotiated is neither reported connected nor disconnected
    assert device.events == []
    negotiated(make_client(server))


def test_disconnect_fails_pending_device_dma(make_server: ServerFactory,
                                             make_client: ClientFactory,
                                             device: RecordingSample) -> None:
    srv = make_server(device, dma_timeout=60.0)
    c = negotiated(make_client(srv, serve_dma=False))
    c.add_memory(0, 0x1000, fd_backed=False)
    conn = srv.wait_for_client(WAIT)
    fut = conn.ctx.defer(lambda: conn.dma.read(0, 16))
    wait_until(lambda: bool(c.unanswered), what="the DMA request in flight")
    c.close()
    exc = fut.exception(WAIT)
    # the waiting device thread learns the client is gone, as a DMA error
    assert isinstance(exc, DmaError)
    assert exc.errno == errno.ENOTCONN
    srv.wait_for_disconnect(1, WAIT)


# --- the command line ---------------------------------------------------------------------


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "vfio-user-server"
    if script.exists():
        return [str(script)]
    found = shutil.which("vfio-user-server")
    return [found] if found else [sys.executable, "-m", "vfio_user_server.cli"]


class Cli:
    def __init__(self, sock: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(
            [*_cli(), "--socket", str(sock), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )

    def wait_listening(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                pytest.fail(f"server exited with {self.proc.returncode}: {err}")
            return self.sock.exists()

        wait_until(ready, timeout=30, what="the CLI server's socket")

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"server did not exit on signal {sig}: {err}")
        return self.proc.returncode, out, err


@pytest.fixture
def cli_procs() -> Iterator[list[Cli]]:
    procs: list[Cli] = []
    yield procs
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.communicate()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_shuts_down_on_signal(sock_path: Path, cli_procs: list[Cli],
                                             sig: int) -> None:
    cli = Cli(sock_path, "sample")
    cli_procs.append(cli)
    cli.wait_listening()
    assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
    with Client.connect(sock_path, timeout=WAIT) as c:
        negotiated(c)
        assert c.bar_read(0, REG_ID, 4) == ID_VALUE
        # a signal while a client is connected
        code, _, err = cli.stop(sig)
        assert code == 0, err
        with pytest.raises((ConnectionClosed, OSError)):
            c.bar_read(0, REG_ID, 4)
    assert not sock_path.exists()
    assert "Traceback" not in err


def test_cli_signal_while_idle(sock_path: Path, cli_procs: list[Cli]) -> None:
    cli = Cli(sock_path, "--mode", "0660", "sample")
    cli_procs.append(cli)
    cli.wait_listening()
    assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o660
    code, _, err = cli.stop(signal.SIGTERM)
    assert code == 0, err
    assert not sock_path.exists()


TRACE_LINE = re.compile(r"^(<-|->) #\d+ [A-Z_]+ (req|reply)\b")


def test_cli_trace_one_line_per_message(sock_path: Path, cli_procs: list[Cli]) -> None:
    cli = Cli(sock_path, "--trace", "sample")
    cli_procs.append(cli)
    cli.wait_listening()
    with Client.connect(sock_path, timeout=WAIT) as c:
        negotiated(c)  # VERSION, DEVICE_GET_INFO
        c.bar_read(0, REG_ID, 4)
        c.bar_write(0, REG_SCRATCH, 4, 1, posted=True)  # no reply
        c.bar_read(0, REG_SCRATCH, 4)
    code, _, err = cli.stop()
    assert code == 0, err
    lines = [line for line in err.splitlines() if TRACE_LINE.match(line)]
    kinds = [(m.group(1), line.split()[2]) for line in lines
             if (m := TRACE_LINE.match(line))]
    assert kinds == [
        ("<-", "VERSION"), ("->", "VERSION"),
        ("<-", "DEVICE_GET_INFO"), ("->", "DEVICE_GET_INFO"),
        ("<-", "REGION_READ"), ("->", "REGION_READ"),
        ("<-", "REGION_WRITE"),
        ("<-", "REGION_READ"), ("->", "REGION_READ"),
    ]
    assert "no-reply" in lines[6]
    assert "region=0" in lines[4] and "count=4" in lines[4]


def test_cli_module_class_device(sock_path: Path, sock_dir: Path,
                                 cli_procs: list[Cli]) -> None:
    moddir = sock_dir / "mods"
    moddir.mkdir()
    (moddir / "my_test_device.py").write_text(textwrap.dedent("""
        from vfio_user_server.sample import SampleDevice

        class OtherId(SampleDevice):
            device_id = 0x7777
    """))
    pythonpath = os.pathsep.join(filter(None, [str(moddir), os.environ.get("PYTHONPATH")]))
    cli = Cli(sock_path, "my_test_device:OtherId", env={"PYTHONPATH": pythonpath})
    cli_procs.append(cli)
    cli.wait_listening()
    with Client.connect(sock_path, timeout=WAIT) as c:
        negotiated(c)
        assert c.config_read(0, 4) == 0x7777 << 16 | 0x1B36
    code, _, err = cli.stop()
    assert code == 0, err


@pytest.mark.parametrize(("device", "message"), [
    ("no-such-device", "unknown device"),
    ("no_such_module_xyz:Dev", "cannot import"),
    ("vfio_user_server.sample:NoSuchClass", "has no attribute"),
    ("os:path", "not a device class"),
])
def test_cli_unknown_device(sock_path: Path, device: str, message: str) -> None:
    proc = subprocess.run([*_cli(), "--socket", str(sock_path), device],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not sock_path.exists()


def test_cli_refuses_non_socket_path(sock_path: Path) -> None:
    sock_path.write_text("keep me")
    proc = subprocess.run([*_cli(), "--socket", str(sock_path), "sample"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3  # cli.EXIT_SOCKET
    assert "not a socket" in proc.stderr
    assert sock_path.read_text() == "keep me"


def test_cli_requires_socket_and_device(sock_path: Path) -> None:
    proc = subprocess.run([*_cli(), "sample"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    proc = subprocess.run([*_cli(), "--list"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "sample" in proc.stdout


def test_cli_once(sock_path: Path, cli_procs: list[Cli]) -> None:
    cli = Cli(sock_path, "--once", "sample")
    cli_procs.append(cli)
    cli.wait_listening()
    with Client.connect(sock_path, timeout=WAIT) as c:
        negotiated(c)
    assert cli.proc.wait(timeout=30) == 0
    assert not sock_path.exists()


def test_next_client_served_after_resample_fd_then_hangup(
        server: Server, device: RecordingSample, make_client: ClientFactory) -> None:
    # A client sets the INTx resample fd and hangs up before the server polls again: the
    # server sees the SET_IRQS and the EOF together. The next client must still be served.
    flags_t = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
    flags_u = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_UNMASK
    for round_ in range(3):
        peer = RawPeer(server.path)
        trigger = os.eventfd(0, os.EFD_CLOEXEC)
        resample = os.eventfd(0, os.EFD_CLOEXEC)
        peer.send(codec.encode(codec.request(1, Command.VERSION,
                                             codec.encode_version(0, 0, QEMU_CAPABILITIES))))
        peer.send(codec.encode(codec.request(2, Command.DEVICE_SET_IRQS,
                                             IrqSet(20, flags_t, IrqIndex.INTX, 0, 1).pack())),
                  [trigger])
        assert peer.recv_message().msg_id == 1
        assert peer.recv_message().msg_id == 2
        with device.lock:
            # the loop thread blocks in this config read until the rest is queued
            peer.send(codec.encode(codec.request(
                3, Command.REGION_READ, RegionAccess(0, CONFIG, 4).pack())))
            peer.send(codec.encode(codec.request(
                4, Command.DEVICE_SET_IRQS, IrqSet(20, flags_u, IrqIndex.INTX, 0, 1).pack(),
                no_reply=True)), [resample])
            peer.sock.shutdown(socket.SHUT_WR)
        assert peer.recv_message().msg_id == 3
        server.wait_for_disconnect(round_ + 1, WAIT)
        peer.close()
        close_all([trigger, resample])
    c = negotiated(make_client(server))
    assert c.bar_read(0, REG_ID, 4) == ID_VALUE
