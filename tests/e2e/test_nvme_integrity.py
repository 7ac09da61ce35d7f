"""Data integrity under faults: random writes and flushes in a guest, then QEMU killed (SIGKILL)
or the server stopped (SIGTERM) mid-stream, then the backing image judged.

The NVMe controller is served by the installed ``vfio-user-server`` command in its own process
(so that a signal can reach it), backed by a sparse image file. Guest RAM is a shared memfd
(data moves straight between the image and guest memory, writes mostly inline on the
doorbell); the SIGTERM test also runs with plain RAM (every byte by DMA_READ/DMA_WRITE
messages, on the worker thread). In the guest, the static program ``blkverify``
(vfio_user_server/testing/guest_programs/blkverify.c) writes generations of tagged 4 KiB blocks at
random (several processes, O_DIRECT) and, after each, fsyncs the device (Linux sends an NVMe
Flush) and prints ``FLUSHED gen N`` on the console. The fault comes after a few generations,
once a write of the next one has reached the image, while the program keeps writing. Then
(tests/blkverify.py): every block written by a generation up to the last one printed holds
that write or a later one, and every sector holds zeros or exactly a sector the guest wrote
there.

``PYVFIO_INTEGRITY_GENS`` (default 6) sets how many flushed generations to wait for before the
fault (the long mode: docs/data-integrity.md).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from blkverify import BLOCK, check_image, flushed_generation, picks

from vfio_user_server.testing.guest import QemuMachine
from vfio_user_server.testing.guestprog import guest_program
from vfio_user_server.testing.provision import Provisioned

pytestmark = pytest.mark.e2e

IMAGE_SIZE = 64 << 20
NBLOCKS = 2048  # the first 8 MiB
BATCH = 64
PROCS = 4
DISK = "/dev/nvme0n1"
GENS = int(os.environ.get("PYVFIO_INTEGRITY_GENS", "6"))
WAIT = 120.0


def server_argv() -> list[str]:
    exe = shutil.which("vfio-user-server", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "vfio_user_server.cli"]


class Rig:
    def __init__(self, prov: Provisioned, tmp: Path, name: str, shared_memory: bool) -> None:
        self.tmp = tmp
        self.image = tmp / "disk.img"
        with open(self.image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        self.sock = tmp / "nvme.sock"
        self.server_log = tmp / "server.log"
        with open(self.server_log, "wb") as log:
            self.server = subprocess.Popen(
                [*server_argv(), "--socket", str(self.sock), "nvme", "--image", str(self.image)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self._wait_log("serving nvme on")
        self.seed = random.getrandbits(63)
        self.guest = QemuMachine(prov, sockets=[str(self.sock)], modules=["nvme"],
                                 files={"/bin/blkverify": guest_program("blkverify")},
                                 shared_memory=shared_memory, workdir=tmp / "guest",
                                 name=name)

    def _wait_log(self, text: str) -> None:
        deadline = time.monotonic() + WAIT
        while text not in self.log():
            if self.server.poll() is not None:
                pytest.fail(f"vfio-user-server exited ({self.server.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"vfio-user-server never logged {text!r}:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.server_log.read_text(errors="replace")

    def start_writing(self) -> None:
        g = self.guest.start()
        g.run(f"for i in $(seq 900); do [ -b {DISK} ] && break; sleep 0.1; done; [ -b {DISK} ]",
              timeout=120, check=True)
        # a volatile write cache: Linux sends Flush on fsync
        assert g.run("cat /sys/block/nvme0n1/queue/write_cache",
                     check=True).output.strip() == "write back"
        g.run(f"setsid /bin/blkverify {DISK} {self.seed} {NBLOCKS} {BATCH} {PROCS} 0 "
              "</dev/null >/dev/ttyS0 2>&1 &", check=True)
        g.wait_for_console(rf"FLUSHED gen {GENS}\s", timeout=60.0 * GENS)
        # mid-stream: the fault comes once a write of the next generation reached the image
        blocks = sorted(picks(self.seed, GENS + 1, BATCH, NBLOCKS))
        deadline = time.monotonic() + WAIT
        with open(self.image, "rb") as f:
            while not any(os.pread(f.fileno(), 32, b * BLOCK)[16:24]
                          == (GENS + 1).to_bytes(8, "little") for b in blocks):
                assert time.monotonic() < deadline, "no write of the next generation arrived"
                time.sleep(0.01)

    def stop_server(self) -> int:
        self.server.send_signal(signal.SIGTERM)
        try:
            return self.server.wait(WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vfio-user-server ignored SIGTERM:\n{self.log()}")

    def judge(self, console: str) -> None:
        flushed = flushed_generation(console)
        assert flushed >= GENS, console[-2000:]
        v = check_image(self.image.read_bytes(), seed=self.seed, nblocks=NBLOCKS, batch=BATCH,
                        flushed=flushed)
        print(f"\nintegrity seed {self.seed:#x}: {flushed} generations flushed, "
              f"{v.verified_blocks} blocks verified ({BLOCK} bytes each), "
              f"{v.newer_blocks} blocks with unflushed later writes, "
              f"{v.sectors_checked} sectors checked")
        assert v.ok, f"seed {self.seed:#x}, flushed {flushed}:\n" + "\n".join(v.problems)
        assert v.verified_blocks > 0

    def close(self) -> None:
        self.guest.close()
        if self.server.poll() is None:
            self.server.kill()
            self.server.wait(WAIT)


@pytest.fixture(params=["memfd"])
def rig(vfio_user_provisioned: Provisioned, tmp_path: Path,
        request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(vfio_user_provisioned, tmp_path, request.node.name,
            shared_memory=request.param == "memfd")
    try:
        yield r
    finally:
        r.close()


def test_qemu_killed_mid_stream_loses_no_flushed_write(rig: Rig) -> None:
    rig.start_writing()
    proc = rig.guest.proc
    assert proc is not None
    proc.kill()
    proc.wait(WAIT)
    console = rig.guest.console_text()
    assert "ERROR" not in console, console[-2000:]
    # the server saw its client go and keeps serving; stopped, it exits cleanly
    assert rig.server.poll() is None, rig.log()
    assert rig.stop_server() == 0, rig.log()
    rig.judge(console)


@pytest.mark.parametrize("rig", ["memfd", "message"], indirect=True)
def test_server_sigterm_mid_stream_loses_no_flushed_write(rig: Rig) -> None:
    rig.start_writing()
    assert rig.stop_server() == 0, rig.log()
    assert re.search(r"signal 15: shutting down", rig.log()), rig.log()
    rig.guest.close()  # no flush can complete from here on: read the console after QEMU ends
    rig.judge(rig.guest.console_text())
