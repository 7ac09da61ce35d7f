"""Crash recovery under guest I/O: SIGKILL the NVMe device process while a guest writes to it.

The controller is served by ``vfio-user-server --supervise`` (tests/e2e/test_nvme_integrity.py's
rig otherwise: a sparse image, guest RAM a shared memfd); in the guest ``blkverify`` writes
generations of tagged blocks at random and flushes each. Once a write of the next generation
reached the image, the device process gets SIGKILL: the supervisor starts a new one, which
answers what was left unanswered and presents the controller with CSTS.CFS set. The guest's
nvme driver notices when its in-flight commands time out (the queue's ``io_timeout`` is set
to 10 s here, 30 s by default), resets the controller by itself and resubmits them. The guest
must see no I/O error, go on flushing generations, never reboot (same ``boot_id``), and every
flushed block must be in the image. ``PYVFIO_CRASHES`` (default 1) sets how many device
processes are killed in a row (the long mode: docs/state.md, "Crash recovery").
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
from blkverify import BLOCK, flushed_generation, picks
from test_nvme_integrity import BATCH, DISK, GENS, NBLOCKS, PROCS, WAIT, Rig, server_argv

from vfio_user_server.testing.guest import QemuMachine
from vfio_user_server.testing.guestprog import guest_program
from vfio_user_server.testing.provision import Provisioned

pytestmark = pytest.mark.e2e

CRASHES = int(os.environ.get("PYVFIO_CRASHES", "1"))
#: The guest's nvme I/O timeout (ms): how long it takes the driver to notice.
IO_TIMEOUT_MS = 10000


class SupervisedRig(Rig):
    """The integrity rig with the server under ``--supervise``."""

    def __init__(self, prov: Provisioned, tmp: Path, name: str) -> None:
        self.tmp = tmp
        self.image = tmp / "disk.img"
        with open(self.image, "wb") as f:
            f.truncate(64 << 20)
        self.sock = tmp / "nvme.sock"
        self.server_log = tmp / "server.log"
        with open(self.server_log, "wb") as log:
            self.server = subprocess.Popen(
                [*server_argv(), "--supervise", "--socket", str(self.sock), "nvme",
                 "--image", str(self.image)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self._wait_log("serving nvme on")
        self.seed = int.from_bytes(os.urandom(8), "little") >> 1
        self.guest = QemuMachine(prov, sockets=[str(self.sock)], modules=["nvme"],
                                 files={"/bin/blkverify": guest_program("blkverify")},
                                 shared_memory=True, workdir=tmp / "guest", name=name)

    def device_pid(self) -> int | None:
        pid = self.server.pid
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return int(kids[0]) if kids else None


@pytest.fixture
def rig(vfio_user_provisioned: Provisioned, tmp_path: Path,
        request: pytest.FixtureRequest) -> Iterator[SupervisedRig]:
    r = SupervisedRig(vfio_user_provisioned, tmp_path, request.node.name)
    try:
        yield r
    finally:
        r.close()


def wait_next_generation_write(rig: SupervisedRig, gen: int) -> None:
    """Until a write of generation ``gen`` reached the image: I/O is in flight."""
    blocks = sorted(picks(rig.seed, gen, BATCH, NBLOCKS))
    deadline = time.monotonic() + WAIT
    with open(rig.image, "rb") as f:
        while not any(os.pread(f.fileno(), 32, b * BLOCK)[16:24] == gen.to_bytes(8, "little")
                      for b in blocks):
            assert time.monotonic() < deadline, f"no write of generation {gen} arrived"
            time.sleep(0.01)


def test_guest_io_survives_sigkill_of_the_device_process(rig: SupervisedRig) -> None:
    g = rig.guest.start()
    g.run(f"for i in $(seq 900); do [ -b {DISK} ] && break; sleep 0.1; done; [ -b {DISK} ]",
          timeout=120, check=True)
    g.run(f"echo {IO_TIMEOUT_MS} > /sys/block/nvme0n1/queue/io_timeout", check=True)
    boot_id = g.run("cat /proc/sys/kernel/random/boot_id", check=True).output.strip()
    g.run(f"setsid /bin/blkverify {DISK} {rig.seed} {NBLOCKS} {BATCH} {PROCS} 0 "
          "</dev/null >/dev/ttyS0 2>&1 &", check=True)
    g.wait_for_console(r"FLUSHED gen 1\s", timeout=120.0)
    for n in range(CRASHES):
        before = flushed_generation(rig.guest.console_text())
        wait_next_generation_write(rig, before + 1)
        victim = rig.device_pid()
        assert victim is not None, rig.log()
        os.kill(victim, signal.SIGKILL)
        # the guest's driver resets the controller and goes on: more generations flushed
        g.wait_for_console(rf"FLUSHED gen {before + 2}\s", timeout=240.0)
        assert rig.server.poll() is None, rig.log()
        assert rig.log().count("took over (recovery") == n + 1, rig.log()
    last = max(GENS, flushed_generation(rig.guest.console_text()) + 1)
    g.wait_for_console(rf"FLUSHED gen {last}\s", timeout=60.0 * GENS)
    console = rig.guest.console_text()
    assert "ERROR" not in console, console[-2000:]
    assert not re.search(r"I/O error", console), console[-2000:]
    dmesg = g.run("dmesg", check=True).output
    print("\nguest's nvme messages:\n" + "\n".join(
        line for line in dmesg.splitlines() if "nvme" in line))
    assert not re.search(r"I/O error|Buffer I/O", dmesg), dmesg[-3000:]
    # the driver saw the fatal status and reset the controller by itself
    assert "controller is down; will reset" in dmesg, dmesg[-3000:]
    assert g.run("cat /proc/sys/kernel/random/boot_id", check=True).output.strip() == boot_id
    assert g.run("echo alive", check=True).output.strip() == "alive"
    rig.server.send_signal(signal.SIGTERM)
    assert rig.server.wait(WAIT) == 0, rig.log()
    rig.guest.close()
    rig.judge(rig.guest.console_text())
