"""Live upgrade under guest I/O: ``vfio-user-server upgrade`` while a guest writes to NVMe.

The NVMe controller is served by the installed command (tests/e2e/test_nvme_integrity.py's
rig: a sparse image, guest RAM a shared memfd); in the guest ``blkverify`` writes generations
of tagged blocks at random and flushes each. The server is upgraded several times in a row,
each time once the guest flushed another generation through the process before; the guest
must see no I/O error and keep flushing, and every flushed block must be in the image.
``PYVFIO_UPGRADES`` (default 3) sets the number of upgrades (the long mode: 20).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from blkverify import flushed_generation
from test_nvme_integrity import BATCH, DISK, GENS, NBLOCKS, PROCS, WAIT, Rig, server_argv

from vfio_user_server.testing.provision import Provisioned

pytestmark = pytest.mark.e2e

UPGRADES = int(os.environ.get("PYVFIO_UPGRADES", "3"))


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + WAIT
    while not gone(pid):
        assert time.monotonic() < deadline, f"server pid {pid} did not exit"
        time.sleep(0.05)


def fd_kinds(pid: int) -> list[str]:
    """What the process's fds are (socket, pipe and eventfd numbers blanked): comparable."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        out.append(target.split("[")[0] if "[" in target else target)
    return sorted(out)


def memfd_maps(pid: int) -> int:
    return sum("/memfd:" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


@pytest.fixture
def rig(vfio_user_provisioned: Provisioned, tmp_path: Path,
        request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(vfio_user_provisioned, tmp_path, request.node.name, shared_memory=True)
    try:
        yield r
    finally:
        r.close()


def test_guest_writes_through_repeated_upgrades(rig: Rig) -> None:
    g = rig.guest.start()
    g.run(f"for i in $(seq 900); do [ -b {DISK} ] && break; sleep 0.1; done; [ -b {DISK} ]",
          timeout=120, check=True)
    g.run(f"setsid /bin/blkverify {DISK} {rig.seed} {NBLOCKS} {BATCH} {PROCS} 0 "
          "</dev/null >/dev/ttyS0 2>&1 &", check=True)
    g.wait_for_console(r"FLUSHED gen 1\s", timeout=120.0)
    pids = [rig.server.pid]
    baseline, maps = fd_kinds(rig.server.pid), memfd_maps(rig.server.pid)
    assert maps > 0  # guest RAM is mmapped: DMA goes through the handed fds
    try:
        for _ in range(UPGRADES):
            before = flushed_generation(rig.guest.console_text())
            done = subprocess.run([*server_argv(), "upgrade", "--socket", str(rig.sock)],
                                  capture_output=True, text=True, timeout=2 * WAIT)
            assert done.returncode == 0, done.stderr + rig.log()
            pids.append(int(done.stdout.rsplit("pid", 1)[1]))
            if len(pids) == 2:
                assert rig.server.wait(WAIT) == 0, rig.log()
            else:
                wait_gone(pids[-2])
            # the guest goes on through the new process: one more generation flushed
            g.wait_for_console(rf"FLUSHED gen {before + 1}\s", timeout=120.0)
        last = max(GENS, flushed_generation(rig.guest.console_text()) + 1)
        g.wait_for_console(rf"FLUSHED gen {last}\s", timeout=60.0 * GENS)
        console = rig.guest.console_text()
        assert "ERROR" not in console, console[-2000:]
        assert not re.search(r"I/O error|timeout, (aborting|reset)", console), console[-2000:]
        assert g.run("echo alive", check=True).output.strip() == "alive"
        assert fd_kinds(pids[-1]) == baseline  # fds and maps back to the first process's
        assert memfd_maps(pids[-1]) == maps
        os.kill(pids[-1], signal.SIGTERM)
        wait_gone(pids[-1])
        assert "vfio_detach failed" not in rig.log()
        rig.guest.close()
        rig.judge(rig.guest.console_text())
    finally:
        for pid in pids[1:]:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
