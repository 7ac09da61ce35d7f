"""``vfio-user-server upgrade --socket PATH`` through the installed command, a client attached.

The client keeps its connection, its DMA map (mmapped by each new process) and its device
registers across several upgrades in a row; every process that handed over exits; the last
one's fds are the first one's; the control socket is 0600 and goes with the last process.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

from helpers import WAIT, wait_until

from vfio_user_server.client import Client

CLI = Path(sys.executable).parent / "vfio-user-server"
REG_LIVENESS = 0x04


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def fd_kinds(pid: int) -> list[str]:
    """What the process's fds are, with socket and pipe numbers and the process's own pid
    (the pure-Python DMA copier holds ``/proc/PID/mem``) blanked: comparable."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        target = target.replace(f"/proc/{pid}/", "/proc/PID/")
        out.append(target.split("[")[0] if "[" in target else target)
    return sorted(out)


def upgrade(sock: Path) -> int:
    done = subprocess.run([str(CLI), "upgrade", "--socket", str(sock)], capture_output=True,
                          text=True, timeout=12 * WAIT)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.rsplit("pid", 1)[1])


def test_a_client_stays_attached_across_upgrades(tmp_path: Path) -> None:
    sock = tmp_path / "edu.sock"
    log = (tmp_path / "server.log").open("w")
    first = subprocess.Popen([str(CLI), "--socket", str(sock), "edu"], stdout=log, stderr=log)
    pids = [first.pid]
    try:
        def up() -> bool:
            assert first.poll() is None, (tmp_path / "server.log").read_text()
            return sock.exists() and Path(f"{sock}.ctl").exists()

        wait_until(up, 6 * WAIT, "the server's sockets")
        assert stat.S_IMODE(os.stat(f"{sock}.ctl").st_mode) == 0o600
        with Client.connect(sock, timeout=WAIT) as c:
            c.negotiate()
            c.get_device_info()
            c.add_memory(0x200000, 0x20000)
            c.bar_write(0, REG_LIVENESS, 4, 0x1234)
            baseline = fd_kinds(first.pid)
            for n in range(3):
                pid = upgrade(sock)
                assert pid != pids[-1]
                pids.append(pid)
                if n == 0:
                    assert first.wait(6 * WAIT) == 0  # the old one exits with status 0
                else:
                    wait_until(lambda: gone(pids[-2]), 6 * WAIT, "the old process to exit")
                assert c.bar_read(0, REG_LIVENESS, 4) == ~0x1234 & 0xFFFFFFFF
                maps = Path(f"/proc/{pid}/maps").read_text()
                assert "vfio-user-client-ram" in maps  # the DMA map's fd, mmapped anew
                assert fd_kinds(pid) == baseline
            c.bar_write(0, REG_LIVENESS, 4, 0x55)
            assert c.bar_read(0, REG_LIVENESS, 4) == ~0x55 & 0xFFFFFFFF
        os.kill(pids[-1], signal.SIGTERM)
        wait_until(lambda: gone(pids[-1]), 6 * WAIT, "the last server to stop")
        assert not sock.exists() and not Path(f"{sock}.ctl").exists()
    finally:
        for pid in pids[1:]:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        if first.poll() is None:
            first.kill()
            first.wait()
        log.close()


def test_upgrade_without_a_server_fails_clearly(tmp_path: Path) -> None:
    done = subprocess.run([str(CLI), "upgrade", "--socket", str(tmp_path / "none.sock")],
                          capture_output=True, text=True, timeout=6 * WAIT)
    assert done.returncode == 1
    assert "no server control socket" in done.stderr
