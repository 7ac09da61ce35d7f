"""virtio-blk in a guest: ours against QEMU's in-process virtio-blk-pci and QEMU's C vfio-user
server (x-vfio-user-server) exporting virtio-blk-pci, in the same run.

The same Linux guest (QEMU 11.1 under TCG, from ``vfio_user_server.testing.provision``), the
same raw image size and the same backing-file cache mode (QEMU's ``-drive`` default,
writeback, which is what ours does: buffered ``preadv``/``pwritev``); each disk is read and
written with O_DIRECT ``dd`` inside the guest:

* 4 KiB sequential reads and writes at queue depth 1 (IOPS);
* 4 KiB reads at queue depth 32 (32 concurrent ``dd`` processes, IOPS);
* 128 KiB reads and writes (MB/s).

Times are measured on the host around each guest command (the agent's round trip is a few
milliseconds, small against the thousands of requests of each figure).

    python bench/virtio_blk.py                  # 3 interleaved repetitions, INTx everywhere
    python bench/virtio_blk.py --reps 1 --ops 500 --irq msix --configs ours,qemu

Ours runs as the CLI serves it (``python -m vfio_user_server.cli virtio-blk``, one queue,
reads and writes inline; ``ours-worker`` is ``--inline off``), in its own process like the C
server. The C server's MSI-X never fires with QEMU's vfio-user client (its vectors stay masked:
the client emulates the MSI-X table and never sends SET_IRQS UNMASK; BENCHMARKS.md), so
``--irq intx`` (the default) boots every guest with ``pci=nomsi``: INTx against INTx. The C
column needs the binary of ``bench/build_c_peer.sh`` (skipped with a note when it is missing).
Output: one JSON line per figure, configuration and repetition, then a markdown table of the
medians and of the medians of the per-repetition ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_all import cpeer_binary, server

from vfio_user_devices.virtio_blk import VirtioBlk
from vfio_user_server.testing.guest import QemuMachine, VfioUserDevice
from vfio_user_server.testing.provision import provision

SIZE = 256 << 20
MODULES = list(VirtioBlk.guest_modules)
Runner = Callable[[str, float], float]  # command, timeout -> seconds


def measure(run: Runner, ops: int) -> dict[str, float]:
    disk = "/dev/vda"
    out: dict[str, float] = {}
    per = max(1, ops // 32)
    run(f"dd if=/dev/zero of={disk} bs=1M count=64 oflag=direct 2>/dev/null", 600)
    t = run(f"dd if={disk} of=/dev/null bs=4096 count={ops} iflag=direct 2>/dev/null", 600)
    out["read_4k_qd1_iops"] = ops / t
    t = run(f"dd if=/dev/zero of={disk} bs=4096 count={ops} oflag=direct 2>/dev/null", 600)
    out["write_4k_qd1_iops"] = ops / t
    t = run("for j in $(seq 0 31); do "
            f"dd if={disk} of=/dev/null bs=4096 count={per} skip=$((j * {per})) iflag=direct "
            "2>/dev/null & done; wait", 600)
    out["read_4k_qd32_iops"] = 32 * per / t
    n = max(8, ops // 8)
    t = run(f"dd if={disk} of=/dev/null bs=128k count={n} iflag=direct 2>/dev/null", 600)
    out["read_128k_mbs"] = n * 128 / 1024 / t
    t = run(f"dd if=/dev/zero of={disk} bs=128k count={n} oflag=direct 2>/dev/null", 600)
    out["write_128k_mbs"] = n * 128 / 1024 / t
    return out


# Every guest boots cold: a template snapshot would bring its own kernel command line (no
# pci=nomsi) and hot-plugged devices, a different machine from the in-process column's.


def _wait_disk(m: QemuMachine) -> Runner:
    m.run("for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done", 60, check=True)
    return lambda cmd, timeout: m.run(cmd, timeout, check=True).duration


def _drive(image: Path) -> str:
    # QEMU's default cache mode (writeback), as ours: buffered I/O on the host file
    return f"file={image},if=none,id=d0,format=raw"


@contextmanager
def ours(workdir: Path, image: Path, cmdline: str, extra: list[str]) -> Iterator[Runner]:
    sock = str(workdir / "ours.sock")
    argv = [sys.executable, "-m", "vfio_user_server.cli", "--socket", sock,
            "--log-level", "WARNING", "virtio-blk", "--image", str(image), "--queues", "1",
            *extra]
    with server(argv, sock), QemuMachine(
            provision(), sockets=[VfioUserDevice(sock)], modules=MODULES, workdir=workdir,
            cmdline=cmdline, cold_boot=True, name="bench-ours") as m:
        yield _wait_disk(m)


# The C server's virtio device must do its DMA through its PCI bus-master address space, the
# only one where x-vfio-user-server maps the client's DMA regions (vfu_dma_register adds them
# under pci_device_iommu_address_space). Without VIRTIO_F_ACCESS_PLATFORM QEMU's virtio core
# uses address_space_memory instead (virtio_bus_device_plugged): in the x-remote machine that
# holds none of the guest's RAM, so the device reads an empty avail ring, completes nothing,
# and the guest hangs in its first read (the partition scan). iommu_platform=on offers
# ACCESS_PLATFORM, which Linux and SeaBIOS accept; QEMU allows it only without legacy.
CPEER_DMA = "disable-legacy=on,iommu_platform=on"


@contextmanager
def cpeer(workdir: Path, image: Path, cmdline: str, extra: list[str]) -> Iterator[Runner]:
    binary = cpeer_binary()
    assert binary is not None
    sock = str(workdir / "cpeer.sock")
    obj = {"qom-type": "x-vfio-user-server", "id": "vfuobj0",
           "socket": {"type": "unix", "path": sock}, "device": "blk0"}
    argv = [str(binary), "-machine", "x-remote,vfio-user=on", "-nodefaults", "-display",
            "none", "-drive", _drive(image),
            "-device", "virtio-blk-pci,drive=d0,id=blk0,num-queues=1," + CPEER_DMA,
            "-object", json.dumps(obj)]
    with server(argv, sock), QemuMachine(
            provision(), sockets=[VfioUserDevice(sock)], modules=MODULES, workdir=workdir,
            cmdline=cmdline, cold_boot=True, name="bench-cpeer") as m:
        yield _wait_disk(m)


@contextmanager
def in_process(workdir: Path, image: Path, cmdline: str, extra: list[str]) -> Iterator[Runner]:
    args = ["-drive", _drive(image), "-device", "virtio-blk-pci,drive=d0,num-queues=1"]
    with QemuMachine(provision(), modules=MODULES, workdir=workdir, extra_args=args,
                     cmdline=cmdline, cold_boot=True, name="bench-qemu") as m:
        yield _wait_disk(m)


Maker = Callable[[Path, Path, str, list[str]], Any]
CONFIGS: dict[str, tuple[str, Maker, list[str]]] = {
    "ours": ("ours (Python, vfio-user)", ours, []),
    "ours-worker": ("ours, worker (--inline off)", ours, ["--inline", "off"]),
    "cpeer": ("QEMU x-vfio-user-server virtio-blk-pci (C)", cpeer, []),
    "qemu": ("QEMU in-process virtio-blk-pci", in_process, []),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ops", type=int, default=2000, help="4 KiB requests per QD1 figure")
    p.add_argument("--irq", choices=("intx", "msix"), default="intx",
                   help="intx boots the guests with pci=nomsi (default; the C server's MSI-X "
                        "does not fire with QEMU's client)")
    p.add_argument("--configs", default="ours,cpeer,qemu",
                   help=f"comma-separated, run in this order each repetition: {','.join(CONFIGS)}")
    args = p.parse_args()
    names = [n for n in args.configs.split(",") if n]
    for n in names:
        if n not in CONFIGS:
            p.error(f"unknown configuration {n!r}")
    if "cpeer" in names and cpeer_binary() is None:
        print("# no C peer (bash bench/build_c_peer.sh): its column is skipped", flush=True)
        names.remove("cpeer")
    cmdline = "pci=nomsi" if args.irq == "intx" else ""
    results: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    tmp = Path(tempfile.mkdtemp(prefix="bench-virtio-blk-"))
    try:
        for rep in range(args.reps):
            for name in names:
                _label, make, extra = CONFIGS[name]
                image = tmp / f"{name}.img"
                image.unlink(missing_ok=True)
                with open(image, "wb") as f:
                    f.truncate(SIZE)
                workdir = tmp / f"{name}-{rep}"
                workdir.mkdir()
                with make(workdir, image, cmdline, extra) as run:
                    figures = measure(run, args.ops)
                for key, value in figures.items():
                    results[name].setdefault(key, []).append(value)
                    print(json.dumps({"config": name, "irq": args.irq, "rep": rep,
                                      key: round(value, 1)}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = names[0]
    others = names[1:]
    print(f"\n{args.irq}, medians of {args.reps} interleaved repetitions; ratios are "
          "medians of the per-repetition ratios (min-max)\n")
    print("| figure | " + " | ".join(CONFIGS[n][0] for n in names) + " | "
          + " | ".join(f"{base} / {n}" for n in others) + " |")
    print("|---" * (1 + len(names) + len(others)) + "|")
    for key in results[base]:
        cells = [f"{statistics.median(results[n][key]):,.0f}" for n in names]
        for n in others:
            ratios = [a / b for a, b in zip(results[base][key], results[n][key], strict=True)]
            cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        print(f"| {key} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
