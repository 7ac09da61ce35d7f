"""NVMe in a guest: ours against QEMU's in-process ``nvme`` and QEMU's C vfio-user server
(``x-vfio-user-server`` exporting ``nvme``), in the same run (used by bench/run_all.py).

Every configuration gets a fresh raw image of the same size, opened with the same backing-file
cache mode (QEMU's ``-drive`` default, writeback; ours reads and writes the file with buffered
``preadv``/``pwritev``, the same thing). The guest (QEMU 11.1 under TCG, one vCPU, booted cold)
runs ``bench/aio_qd.c``, a static tool doing Linux native AIO with O_DIRECT at a fixed queue
depth, and reports what it timed with CLOCK_MONOTONIC:

* 4 KiB random reads and writes at queue depth 1 and 32 (IOPS);
* 128 KiB sequential reads and writes at queue depth 1 (MB/s).

Interrupts: QEMU's C server's MSI-X never fires with QEMU's vfio-user client, so its guest
boots with ``pci=nomsi`` (INTx) and ours is measured the same way against it; ours with MSI-X
is measured against QEMU's in-process ``nvme`` with MSI-X. Ours runs once with the C shim and
once with the pure-Python path (``PYVFIO_NO_SHIM=1`` in the server's environment), and once
more with ``--polled-doorbells`` (the doorbell page mapped into the guest and polled by a
thread of ours; QEMU then posts no writes to the device at all, BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfio_user_server.errors import GuestError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


SIZE = 256 << 20
DISK = "/dev/nvme0n1"
SERIAL = "bench0001"


@dataclass(frozen=True)
class Workload:
    key: str
    mode: str
    bs: int
    qd: int
    unit: str  # "IOPS" or "MB/s"


WORKLOADS = (
    Workload("4k_randread_qd1", "randread", 4096, 1, "IOPS"),
    Workload("4k_randwrite_qd1", "randwrite", 4096, 1, "IOPS"),
    Workload("4k_randread_qd32", "randread", 4096, 32, "IOPS"),
    Workload("4k_randwrite_qd32", "randwrite", 4096, 32, "IOPS"),
    Workload("128k_read_qd1", "read", 128 << 10, 1, "MB/s"),
    Workload("128k_write_qd1", "write", 128 << 10, 1, "MB/s"),
)

_AIO_RE = re.compile(r"iops=([0-9.]+) mbs=([0-9.]+)")


def build_aio_qd() -> Path:
    """bench/aio_qd.c built like the guest test programs (static, -O2), cached by hash."""
    from vfio_user_server.testing.guestprog import guest_program

    return guest_program("aio_qd", source=HERE / "aio_qd.c")


Runner = Callable[[str, float], str]  # command, timeout -> output


class Guest:
    """A booted guest with the NVMe disk: run a command in it (``run(cmd, timeout)`` ->
    output); ``qemu_pid`` and ``server_pid`` (None for the in-process device) for CPU-time
    probes (bench/nvme_cost.py)."""

    def __init__(self, run: Runner, qemu_pid: int, server_pid: int | None) -> None:
        self._run = run
        self.qemu_pid = qemu_pid
        self.server_pid = server_pid

    def __call__(self, cmd: str, timeout: float) -> str:
        return self._run(cmd, timeout)


#: seconds one workload may take in the guest before its server counts as stalled: 2,000
#: requests at the slowest rate a server finished with (QEMU's C server losing INTx edges at
#: QD32, 22-40 IOPS) take under 100 s; a server that stops completing at all (the same C
#: server at QD1, once) must cost a row, not the whole table
WORKLOAD_LIMIT = 300.0


class Stalled(GuestError):
    """A workload ran into :data:`WORKLOAD_LIMIT`: ``key`` is its figure's name, ``figures``
    what the configuration measured before it (the guest is not used again)."""

    def __init__(self, key: str, figures: dict[str, float], why: str) -> None:
        super().__init__(f"{key}: no result within {WORKLOAD_LIMIT:.0f} s ({why})")
        self.key = key
        self.figures = figures


def measure(run: Runner, ops: int, workloads: tuple[Workload, ...] = WORKLOADS
            ) -> dict[str, float]:
    """Run every workload once; {key: IOPS or MB/s}. The disk is written once first, so that
    reads find allocated blocks on every server. A workload that times out raises
    :class:`Stalled` with the figures taken before it."""
    run(f"dd if=/dev/zero of={DISK} bs=1M count=32 oflag=direct 2>/dev/null", 600)
    out: dict[str, float] = {}
    for w in workloads:
        n = ops if w.bs == 4096 else max(8, ops // 8)
        if w.qd > 1:
            n = max(n, 4 * w.qd)
        try:
            text = run(f"/bin/aio_qd -f {DISK} -m {w.mode} -b {w.bs} -q {w.qd} -n {n} "
                       f"-s {32 << 20}", WORKLOAD_LIMIT)
        except GuestError as e:
            if "timed out" not in str(e):
                raise
            raise Stalled(w.key, out, str(e).split(";")[0]) from e
        m = _AIO_RE.search(text)
        if not m:
            raise RuntimeError(f"aio_qd said: {text!r}")
        out[w.key] = float(m.group(1) if w.unit == "IOPS" else m.group(2))
    return out


def _drive(image: Path) -> list[str]:
    # QEMU's default cache mode (writeback), as ours: buffered I/O on the host file
    return ["-drive", f"file={image},if=none,id=d0,format=raw"]


@contextmanager
def _guest(workdir: Path, tool: Path, sockets: list[Any], extra: list[str], cmdline: str,
           name: str, server_pid: int | None = None) -> Iterator[Guest]:
    from vfio_user_server.testing.guest import QemuMachine
    from vfio_user_server.testing.provision import provision

    with QemuMachine(provision(), sockets=sockets, modules=["nvme"], workdir=workdir,
                     extra_args=extra, cmdline=cmdline, cold_boot=True,
                     files={"/bin/aio_qd": tool}, name=name) as m:
        m.run(f"for i in $(seq 300); do [ -b {DISK} ] && break; sleep 0.1; done; [ -b {DISK} ]",
              60, check=True)
        assert m.proc is not None
        yield Guest(lambda cmd, timeout: m.run(cmd, timeout, check=True).output, m.proc.pid,
                    server_pid)


@contextmanager
def ours(workdir: Path, image: Path, tool: Path, irq: str, shim: bool,
         polled: bool = False) -> Iterator[Guest]:
    from run_all import server

    from vfio_user_server.testing.guest import VfioUserDevice

    sock = str(workdir / "ours.sock")
    argv = [sys.executable, "-m", "vfio_user_server.cli", "--socket", sock,
            "--log-level", "WARNING", "nvme", "--image", str(image), "--serial", SERIAL,
            *(["--polled-doorbells"] if polled else [])]
    env = dict(os.environ)
    env.pop("PYVFIO_NO_SHIM", None)
    if not shim:
        env["PYVFIO_NO_SHIM"] = "1"
    with server(argv, sock, env=env) as proc, _guest(
            workdir, tool, [VfioUserDevice(sock)], [],
            "pci=nomsi" if irq == "intx" else "", "bench-nvme-ours", proc.pid) as run:
        yield run


@contextmanager
def ours_polled(workdir: Path, image: Path, tool: Path, irq: str, shim: bool
                ) -> Iterator[Guest]:
    """Ours with ``--polled-doorbells``."""
    with ours(workdir, image, tool, irq, shim, polled=True) as run:
        yield run


@contextmanager
def cpeer(workdir: Path, image: Path, tool: Path, irq: str, shim: bool) -> Iterator[Guest]:
    from run_all import cpeer_binary, server

    from vfio_user_server.testing.guest import VfioUserDevice

    binary = cpeer_binary()
    assert binary is not None
    sock = str(workdir / "cpeer.sock")
    obj = {"qom-type": "x-vfio-user-server", "id": "vfuobj0",
           "socket": {"type": "unix", "path": sock}, "device": "nvme0"}
    argv = [str(binary), "-machine", "x-remote,vfio-user=on", "-nodefaults", "-display",
            "none", *_drive(image), "-device", f"nvme,drive=d0,id=nvme0,serial={SERIAL}",
            "-object", json.dumps(obj)]
    with server(argv, sock) as proc, _guest(workdir, tool, [VfioUserDevice(sock)], [],
                                            "pci=nomsi" if irq == "intx" else "",
                                            "bench-nvme-cpeer", proc.pid) as run:
        yield run


@contextmanager
def in_process(workdir: Path, image: Path, tool: Path, irq: str, shim: bool
               ) -> Iterator[Guest]:
    extra = [*_drive(image), "-device", f"nvme,drive=d0,serial={SERIAL}"]
    with _guest(workdir, tool, [], extra, "pci=nomsi" if irq == "intx" else "",
                "bench-nvme-qemu") as run:
        yield run


Maker = Callable[[Path, Path, Path, str, bool], Any]


@dataclass(frozen=True)
class Config:
    name: str
    label: str
    make: Maker
    irq: str
    shim: bool = True


CONFIGS = {c.name: c for c in (
    Config("qemu-msix", "QEMU in-process nvme, MSI-X", in_process, "msix"),
    Config("cpeer-intx", "QEMU x-vfio-user-server nvme, INTx", cpeer, "intx"),
    Config("ours-intx", "ours, INTx, C shim", ours, "intx", True),
    Config("ours-intx-py", "ours, INTx, pure Python", ours, "intx", False),
    Config("ours-msix", "ours, MSI-X, C shim", ours, "msix", True),
    Config("ours-msix-py", "ours, MSI-X, pure Python", ours, "msix", False),
    Config("ours-msix-polled", "ours, MSI-X, polled doorbells, C shim", ours_polled, "msix"),
)}

#: (ours, its peer) pairs of the table: the same interrupt type against the C server, MSI-X
#: against QEMU's in-process device.
PAIRS = (("ours-intx", "cpeer-intx"), ("ours-intx-py", "cpeer-intx"),
         ("ours-msix", "qemu-msix"), ("ours-msix-py", "qemu-msix"),
         ("ours-msix-polled", "qemu-msix"))


def run_config(config: Config, folder: Path, ops: int, tool: Path,
               workloads: tuple[Workload, ...] = WORKLOADS) -> dict[str, float]:
    """One configuration once: a fresh image, server and guest; its figures."""
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    try:
        with config.make(folder, image, tool, config.irq, config.shim) as run:
            return measure(run, ops, workloads)
    finally:
        image.unlink(missing_ok=True)
