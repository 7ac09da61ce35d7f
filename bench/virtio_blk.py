"""virtio-blk in a guest: ours (vfio-user, Python) against QEMU's in-process virtio-blk-pci.

The same Linux guest (QEMU 11.1 under TCG, from ``vfio_user_server.testing.provision``) and the
same raw image size; each disk is read and written with O_DIRECT ``dd`` inside the guest:

* 4 KiB sequential reads and writes at queue depth 1 (IOPS);
* 4 KiB reads at queue depth 32 (32 concurrent ``dd`` processes, IOPS);
* 128 KiB reads and writes (MB/s).

Times are measured on the host around each guest command (the agent's round trip is a few
milliseconds, small against the thousands of requests of each figure).

    python bench/virtio_blk.py                 # both devices, 3 repetitions, medians
    python bench/virtio_blk.py --reps 1 --ops 500

Ours runs twice: as served (every request handed to the connection's worker thread) and with
``inline`` on (requests in fd-backed memory run on the loop thread, in the notify write).
Output: one JSON line per figure and repetition, then a markdown table of the medians. The C
column (QEMU's x-vfio-user-server exporting virtio-blk-pci) needs the C peer of
bench/run_all.py and is not measured by this script.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vfio_user_devices.virtio_blk import VirtioBlk
from vfio_user_server.testing.guest import QemuMachine
from vfio_user_server.testing.harness import DeviceGuest
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


@contextmanager
def ours(workdir: Path, image: Path, *, inline: bool = False) -> Iterator[Runner]:
    dev = VirtioBlk(image, queues=1)
    dev.inline = inline
    try:
        with DeviceGuest([dev], workdir=workdir, modules=MODULES, name="bench-ours") as h:
            h.run("for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done",
                  60, check=True)
            yield lambda cmd, timeout: h.run(cmd, timeout, check=True).duration
    finally:
        dev.close()


@contextmanager
def in_process(workdir: Path, image: Path) -> Iterator[Runner]:
    extra = ["-drive", f"file={image},if=none,id=d0,format=raw,cache=none,aio=threads",
             "-device", "virtio-blk-pci,drive=d0,num-queues=1"]
    with QemuMachine(provision(), modules=MODULES, workdir=workdir, extra_args=extra,
                     name="bench-qemu") as m:
        m.run("for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done",
              60, check=True)
        yield lambda cmd, timeout: m.run(cmd, timeout, check=True).duration


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ops", type=int, default=2000, help="4 KiB requests per QD1 figure")
    args = p.parse_args()
    results: dict[str, dict[str, list[float]]] = {"ours": {}, "ours-inline": {}, "qemu": {}}

    def ours_inline(workdir: Path, image: Path) -> Any:
        return ours(workdir, image, inline=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench-virtio-blk-"))
    try:
        for rep in range(args.reps):
            makers: tuple[tuple[str, Callable[[Path, Path], Any]], ...] = (
                ("ours", ours), ("ours-inline", ours_inline), ("qemu", in_process))
            for name, make in makers:
                image = tmp / f"{name}.img"
                with open(image, "wb") as f:
                    f.truncate(SIZE)
                with make(tmp / f"{name}-{rep}", image) as run:
                    figures = measure(run, args.ops)
                for key, value in figures.items():
                    results[name].setdefault(key, []).append(value)
                    print(json.dumps({"device": name, "rep": rep, key: round(value, 1)}),
                          flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| figure | ours | ours, inline on | QEMU in-process virtio-blk-pci "
          "| ratio (ours) |")
    print("|---|---|---|---|---|")
    for key in results["ours"]:
        a = statistics.median(results["ours"][key])
        w = statistics.median(results["ours-inline"][key])
        b = statistics.median(results["qemu"][key])
        print(f"| {key} | {a:,.0f} | {w:,.0f} | {b:,.0f} | {a / b:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
