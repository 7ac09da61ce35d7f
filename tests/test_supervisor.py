"""``vfio-user-server`` under a supervisor: ``--fd N``, systemd socket activation
(``LISTEN_FDS``), readiness through ``NOTIFY_SOCKET``, several devices in one process, and
the exit statuses. Each runs the installed command as a child process and waits on its
``READY=1`` datagram.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import WAIT, negotiated
from supervised import ServerProcess, run_cli

from vfio_user_devices.edu import Edu
from vfio_user_devices.idio16 import PciIdio16
from vfio_user_server import systemd
from vfio_user_server.cli import EXIT_DEVICE, EXIT_OK, EXIT_SOCKET, EXIT_USAGE
from vfio_user_server.client import Client
from vfio_user_server.sample import ID_VALUE, REG_ID, SampleDevice
from vfio_user_server.server import Server


def ids(cls: type) -> int:
    return int(cls.device_id) << 16 | int(cls.vendor_id)  # type: ignore[attr-defined]


def served_id(path: Path | str) -> int:
    with Client.connect(path, timeout=WAIT) as c:
        negotiated(c)
        return c.config_read(0, 4)


@pytest.fixture
def procs() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for p in started:
        p.close()


def listening_unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # inheritable by pass_fds
    s.bind(str(path))
    s.listen(4)
    return s


# --- readiness -------------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_then_stopping(sock_dir: Path, procs: list[ServerProcess],
                                    abstract: bool) -> None:
    sock = sock_dir / "dev.sock"
    p = ServerProcess(["--socket", str(sock), "sample"], sock_dir, abstract_notify=abstract)
    procs.append(p)
    ready = p.ready().splitlines()
    # READY=1 comes once the socket listens: connect at once
    assert f"STATUS=serving sample on {sock}" in ready
    assert f"MAINPID={p.proc.pid}" in ready
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
    assert served_id(sock) == ids(SampleDevice)
    p.proc.send_signal(signal.SIGTERM)
    assert p.notify.wait_for("STOPPING=1", p.proc) is not None
    assert p.wait() == EXIT_OK, p.stderr()
    assert not sock.exists()


# --- a socket handed over: --fd N -----------------------------------------------------------


def test_fd_serves_a_handed_over_socket(sock_dir: Path, procs: list[ServerProcess]) -> None:
    path = sock_dir / "handed.sock"
    listener = listening_unix(path)
    try:
        p = ServerProcess(["--fd", str(listener.fileno()), "edu"], sock_dir,
                          pass_fds=[listener.fileno()])
        procs.append(p)
        assert f"STATUS=serving edu on fd {listener.fileno()}" in p.ready().splitlines()
        assert served_id(path) == ids(Edu)
        assert served_id(path) == ids(Edu)  # and the next client too
        assert p.stop() == EXIT_OK, p.stderr()
        # the file is the supervisor's: left in place, and the supervisor's socket still listens
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))
        probe.close()
    finally:
        listener.close()


def _not_a_listener(kind: str, folder: Path) -> tuple[int, list[object]]:
    keep: list[object] = []
    if kind == "regular file":
        f = open(folder / "file", "wb")  # noqa: SIM115
        keep.append(f)
        return f.fileno(), keep
    if kind == "pipe":
        r, w = os.pipe()
        keep.extend([r, w])
        return r, keep
    if kind == "datagram socket":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(folder / "dgram"))
    elif kind == "stream socket not listening":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(folder / "idle"))
    else:  # "TCP listener"
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
    keep.append(s)
    return s.fileno(), keep


@pytest.mark.parametrize(("kind", "message"), [
    ("regular file", "is a regular file, not a listening UNIX socket"),
    ("pipe", "is a pipe, not a listening UNIX socket"),
    ("datagram socket", "is an AF_UNIX SOCK_DGRAM socket, not an AF_UNIX SOCK_STREAM one"),
    ("TCP listener", "is an AF_INET SOCK_STREAM socket, not an AF_UNIX SOCK_STREAM one"),
    ("stream socket not listening", "is a UNIX stream socket that does not listen"),
])
def test_fd_of_the_wrong_kind_is_refused(sock_dir: Path, kind: str, message: str) -> None:
    fd, keep = _not_a_listener(kind, sock_dir)
    try:
        proc = run_cli(["--fd", str(fd), "sample"], pass_fds=[fd])
    finally:
        for k in keep:
            if isinstance(k, int):
                os.close(k)
            else:
                k.close()  # type: ignore[attr-defined]
    assert proc.returncode == EXIT_SOCKET, proc.stderr
    assert f"vfio-user-server: fd {fd} {message}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fd_not_open_is_refused() -> None:
    fd = 1000  # far above what the child opens (nothing passes it)
    proc = run_cli(["--fd", str(fd), "sample"])
    assert proc.returncode == EXIT_SOCKET, proc.stderr
    assert f"fd {fd} is not open" in proc.stderr


# --- systemd socket activation --------------------------------------------------------------


#: What systemd does between fork and exec: the fds to 3, 4, ..., LISTEN_PID its own pid.
_ACTIVATE = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]  # out of the way
for fd in fds:
    os.close(fd)
for i, fd in enumerate(copies):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.setdefault("LISTEN_PID", str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""


def activation(fds: list[int], names: list[str] | None = None
               ) -> tuple[list[str], dict[str, str]]:
    """A wrapper that puts ``fds`` at 3, 4, ... and sets LISTEN_PID to the pid that then
    execs the command, with LISTEN_FDS (and LISTEN_FDNAMES) in the environment."""
    env = {"LISTEN_FDS": str(len(fds))}
    if names is not None:
        env["LISTEN_FDNAMES"] = ":".join(names)
    return [sys.executable, "-c", _ACTIVATE, ",".join(map(str, fds))], env


def test_socket_activation_in_order(sock_dir: Path, procs: list[ServerProcess]) -> None:
    a, b = listening_unix(sock_dir / "a.sock"), listening_unix(sock_dir / "b.sock")
    try:
        wrapper, env = activation([a.fileno(), b.fileno()])
        p = ServerProcess(["edu", "--", "gpio-pci-idio-16"], sock_dir, env=env,
                          pass_fds=[a.fileno(), b.fileno()], wrapper=wrapper)
        procs.append(p)
        assert "STATUS=serving edu on fd 3, gpio-pci-idio-16 on fd 4" in p.ready().splitlines()
        assert served_id(sock_dir / "a.sock") == ids(Edu)
        assert served_id(sock_dir / "b.sock") == ids(PciIdio16)
        assert p.stop() == EXIT_OK, p.stderr()
    finally:
        a.close()
        b.close()


def test_socket_activation_by_name(sock_dir: Path, procs: list[ServerProcess]) -> None:
    a, b = listening_unix(sock_dir / "a.sock"), listening_unix(sock_dir / "b.sock")
    try:
        wrapper, env = activation([a.fileno(), b.fileno()], ["gpio", "edu"])
        p = ServerProcess(["--fd-name", "edu", "edu", "--", "--fd-name", "gpio",
                           "gpio-pci-idio-16"], sock_dir, env=env,
                          pass_fds=[a.fileno(), b.fileno()], wrapper=wrapper)
        procs.append(p)
        p.ready()
        assert served_id(sock_dir / "a.sock") == ids(PciIdio16)
        assert served_id(sock_dir / "b.sock") == ids(Edu)
        assert p.stop() == EXIT_OK, p.stderr()
    finally:
        a.close()
        b.close()


def test_socket_activation_for_another_pid_is_ignored() -> None:
    # LISTEN_PID names another process (our parent, say): the fds are not ours
    proc = run_cli(["sample"], env={"LISTEN_FDS": "1", "LISTEN_PID": "1"})
    assert proc.returncode == EXIT_USAGE
    assert "socket activation (LISTEN_FDS) is needed" in proc.stderr


def test_socket_activation_count_must_match(sock_dir: Path) -> None:
    a = listening_unix(sock_dir / "a.sock")
    try:
        wrapper, env = activation([a.fileno()])
        proc = run_cli(["sample", "--", "edu"], env=env, pass_fds=[a.fileno()],
                       wrapper=wrapper)
        assert proc.returncode == EXIT_USAGE, proc.stderr
        assert "2 device(s) without --socket/--fd/--fd-name, but 1 unclaimed" in proc.stderr
        proc = run_cli(["--fd-name", "nvme", "sample"], env={**env, "LISTEN_FDNAMES": "edu"},
                       pass_fds=[a.fileno()], wrapper=wrapper)
        assert proc.returncode == EXIT_USAGE, proc.stderr
        assert "--fd-name nvme: no socket-activated fd has that name (LISTEN_FDNAMES: edu)" \
            in proc.stderr
    finally:
        a.close()


# --- several devices in one process ---------------------------------------------------------


def test_several_devices_each_on_its_socket(sock_dir: Path,
                                            procs: list[ServerProcess]) -> None:
    a, b, c = (sock_dir / n for n in ("a.sock", "b.sock", "c.sock"))
    p = ServerProcess(["--socket", str(a), "sample", "--", "--socket", str(b), "--mode",
                       "0660", "edu", "--dma-mask", "0xffffffff", "--", "--socket", str(c),
                       "gpio-pci-idio-16", "--inputs", "0x8001"], sock_dir)
    procs.append(p)
    p.ready()
    assert stat.S_IMODE(os.lstat(a).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(b).st_mode) == 0o660
    # a client on each at the same time
    with Client.connect(a, timeout=WAIT) as ca, Client.connect(b, timeout=WAIT) as cb, \
            Client.connect(c, timeout=WAIT) as cc:
        for cl in (ca, cb, cc):
            negotiated(cl)
        assert ca.bar_read(0, REG_ID, 4) == ID_VALUE
        assert cb.config_read(0, 4) == ids(Edu)
        assert (cc.bar_read(2, 1, 1), cc.bar_read(2, 5, 1)) == (0x01, 0x80)  # idio16 inputs
    assert p.stop() == EXIT_OK, p.stderr()
    assert not any(x.exists() for x in (a, b, c))


def test_once_per_device(sock_dir: Path, procs: list[ServerProcess]) -> None:
    a, b = sock_dir / "a.sock", sock_dir / "b.sock"
    p = ServerProcess(["--socket", str(a), "--once", "sample", "--", "--socket", str(b),
                       "--once", "sample"], sock_dir)
    procs.append(p)
    p.ready()
    served_id(a)
    assert p.proc.poll() is None  # b has not had its client yet
    served_id(b)
    assert p.wait() == EXIT_OK, p.stderr()


# --- exit statuses --------------------------------------------------------------------------


def test_exit_status_bad_arguments(sock_dir: Path) -> None:
    for args in (["sample"], ["--socket", str(sock_dir / "s"), "--mode", "rw", "sample"],
                 ["--socket", str(sock_dir / "s"), "sample", "--", "--socket", "x"],
                 ["--socket", str(sock_dir / "s"), "--fd", "3", "sample"],
                 ["--no-such-option"], ["--socket", str(sock_dir / "s"), "edu", "--bogus"]):
        proc = run_cli(args)
        assert proc.returncode == EXIT_USAGE, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (sock_dir / "s").exists()


def test_exit_status_device_import_failure(sock_dir: Path) -> None:
    proc = run_cli(["--socket", str(sock_dir / "s"), "no_such_module_xyz:Dev"])
    assert proc.returncode == EXIT_DEVICE
    assert "cannot import 'no_such_module_xyz'" in proc.stderr
    assert not (sock_dir / "s").exists()


def test_exit_status_socket_in_use(sock_path: Path) -> None:
    with Server(SampleDevice(), sock_path):
        proc = run_cli(["--socket", str(sock_path), "sample"])
        assert proc.returncode == EXIT_SOCKET
        assert f"{sock_path}: another server is listening there" in proc.stderr
        assert served_id(sock_path) == ids(SampleDevice)  # the first one is untouched


def test_exit_status_second_device_socket_in_use(sock_dir: Path) -> None:
    a, b = sock_dir / "a.sock", sock_dir / "b.sock"
    with Server(SampleDevice(), b):
        proc = run_cli(["--socket", str(a), "sample", "--", "--socket", str(b), "edu"])
        assert proc.returncode == EXIT_SOCKET
        assert f"{b}: another server is listening there" in proc.stderr
    assert not a.exists()  # the first device's socket was closed and removed


def test_socket_in_a_missing_folder(sock_dir: Path) -> None:
    missing = sock_dir / "not" / "here"
    proc = run_cli(["--socket", str(missing / "dev.sock"), "sample"])
    assert proc.returncode == EXIT_SOCKET
    assert f"the folder {missing} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_exit_status_signal_stop(sock_path: Path, procs: list[ServerProcess],
                                 sig: int) -> None:
    p = ServerProcess(["--socket", str(sock_path), "sample"], sock_path.parent)
    procs.append(p)
    p.ready()
    assert p.stop(sig) == EXIT_OK, p.stderr()
    assert f"signal {int(sig)}: shutting down" in p.stderr()


# --- the environment variables, parsed ------------------------------------------------------


def test_listen_fds_parsing() -> None:
    env = {"LISTEN_FDS": "2", "LISTEN_PID": "42", "LISTEN_FDNAMES": "a:b", "OTHER": "x"}
    got = systemd.listen_fds(env, pid=42)
    assert (got.fds, got.names) == ((3, 4), ("a", "b"))
    assert env == {"OTHER": "x"}  # removed: no child takes them for its own
    assert systemd.listen_fds({"LISTEN_FDS": "1", "LISTEN_PID": "41"}, pid=42).fds == ()
    assert systemd.listen_fds({}, pid=42).fds == ()
    assert systemd.listen_fds({"LISTEN_FDS": "1"}, pid=42).names == ("unknown",)
    for bad, message in (({"LISTEN_FDS": "x"}, "not a number"),
                         ({"LISTEN_FDS": "-1"}, "negative"),
                         ({"LISTEN_FDS": "1", "LISTEN_PID": "me"}, "not a process id"),
                         ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}, "names 1 fds")):
        with pytest.raises(ValueError, match=message):
            systemd.listen_fds(dict(bad), pid=42)


def test_malformed_listen_fds_is_a_usage_error() -> None:
    proc = run_cli(["sample"], env={"LISTEN_FDS": "two"})
    assert proc.returncode == EXIT_USAGE
    assert "LISTEN_FDS='two' is not a number" in proc.stderr


def test_notify_without_a_socket_sends_nothing(sock_dir: Path) -> None:
    assert systemd.notify("READY=1", {}) is False
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": "relative"}) is False
    # a supervisor that went away costs a warning, not the service
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(sock_dir / "gone")}) is False
