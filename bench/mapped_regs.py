"""Sparse-mmap registers in a guest: mapped against trapped, and what polling costs.

Two parts, each figure measured in the same run and interleaved (``--reps`` rounds):

* ``regs``: one guest (QEMU 11.1 under TCG) with QEMU's in-process ``edu``, our edu with
  ``--mapped-scratch`` and our plain edu (both served by the CLI in their own processes).
  ``bench/mmio_loop.c`` times 4-byte reads and writes: the mapped page (0x1000) of ours, the
  in-process edu's ID register, and the trapped registers (ID read, liveness write) of both of
  ours. The trapped write of the mapped edu is synchronous (QEMU posts no writes to a device
  with a mappable region), the plain edu's is posted: the two write columns are that cost.
* ``disks``: for NVMe (trapped doorbells, ``--polled-doorbells``) and virtio-blk (trapped
  notify, ``--polled-notify``), a guest per configuration (restored from the kit's snapshot,
  MSI-X, one vCPU, the device served by the CLI from memory), ``dd`` of 4 KiB O_DIRECT reads
  then writes at queue depth 1; the server's CPU time per request (/proc, all threads) beside
  the rate, since a polling thread spends CPU that the vCPU would otherwise get.

    python bench/mapped_regs.py                      # both parts, 3 rounds
    python bench/mapped_regs.py --only disks --reps 5 --ops 2000

Output: one JSON line per figure and round, then markdown tables of the medians and of the
medians of the per-round ratios (min-max), with the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_all import build_mmio_loop, server

from vfio_user_server.testing.guest import QemuMachine, VfioUserDevice

_LOOP = re.compile(r"bdf=(\S+) n=\d+ read_ns=(\d+) write_ns=(\d+) id=(0x[0-9a-f]+)")
CLI = [sys.executable, "-m", "vfio_user_server.cli"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def ratio_cell(num: list[float], den: list[float]) -> str:
    r = [a / b for a, b in zip(num, den, strict=True)]
    return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"


# --- registers ---------------------------------------------------------------------------------
def regs(tmp: Path, reps: int, n: int) -> None:
    loop = build_mmio_loop()
    socks = {"mapped": str(tmp / "mapped.sock"), "plain": str(tmp / "plain.sock")}
    argv = {"mapped": [*CLI, "--socket", socks["mapped"], "edu", "--mapped-scratch"],
            "plain": [*CLI, "--socket", socks["plain"], "edu"]}
    figures: dict[str, dict[str, list[float]]] = {}
    with ExitStack() as stack:
        for name in socks:
            stack.enter_context(server(argv[name], socks[name]))
        vm = stack.enter_context(QemuMachine(
            sockets=[VfioUserDevice(socks["mapped"]), VfioUserDevice(socks["plain"])],
            extra_args=["-device", "edu"], files={"/bin/mmio_loop": loop},
            name="bench-mapped-regs"))
        bdfs = vm.run("for d in /sys/bus/pci/devices/*; do [ \"$(cat $d/device)\" = 0x11e8 ] "
                      "&& echo ${d##*/} $(head -n1 $d/resource | cut -d' ' -f1); done",
                      60).check().output.split("\n")
        which: dict[str, str] = {}
        for line in filter(None, (b.strip() for b in bdfs)):
            bdf, bar = line.split()
            if bdf.startswith("0000:00:"):
                which["qemu"] = bdf
                continue
            vm.run(f"/bin/mmio_loop -d {bdf} -n 1 >/dev/null", 60).check()  # memory on
            probe = f"{int(bar, 16) + 0x1000:#x}"
            vm.run(f"devmem {probe} 32 0x5a5a5a5a", 60).check()
            got = vm.run(f"devmem {probe} 32", 60).check().output.strip()
            which["mapped" if int(got, 16) == 0x5A5A5A5A else "plain"] = bdf
        if set(which) != {"qemu", "mapped", "plain"}:
            raise RuntimeError(f"could not tell the three edu devices apart: {which}")
        cases = {
            "in-process edu, ID register": (which["qemu"], 0),
            "ours, mapped page": (which["mapped"], 0x1000),
            "ours with a mapped page, trapped registers (writes not posted)":
                (which["mapped"], 0),
            "ours without a mapped page, trapped registers (writes posted)":
                (which["plain"], 0),
        }
        for rep in range(reps):
            for label, (bdf, off) in cases.items():
                out = vm.run(f"/bin/mmio_loop -d {bdf} -n {n} -o {off:#x}", 900).check().output
                m = _LOOP.search(out)
                if not m:
                    raise RuntimeError(f"mmio_loop said: {out!r}")
                for key, value in (("read_ns", int(m.group(2))), ("write_ns", int(m.group(3)))):
                    figures.setdefault(label, {}).setdefault(key, []).append(value)
                print(json.dumps({"part": "regs", "case": label, "rep": rep,
                                  "read_ns": int(m.group(2)), "write_ns": int(m.group(3))}),
                      flush=True)
    base = figures["in-process edu, ID register"]
    print(f"\n4-byte accesses from guest userspace, ns each (median of {reps}); ratio to the "
          "in-process edu read (median of per-round ratios, min-max)\n")
    print("| access | read ns | write ns | read / in-process read |")
    print("|---|---:|---:|---:|")
    for label, f in figures.items():
        print(f"| {label} | {statistics.median(f['read_ns']):,.0f} | "
              f"{statistics.median(f['write_ns']):,.0f} | "
              f"{ratio_cell(f['read_ns'], base['read_ns'])} |")


# --- disks -------------------------------------------------------------------------------------
DISKS: dict[str, tuple[list[str], str]] = {
    "nvme trapped": (["nvme", "--size", "64M", "--queues", "1"], "/dev/nvme0n1"),
    "nvme polled doorbells": (["nvme", "--size", "64M", "--queues", "1",
                               "--polled-doorbells"], "/dev/nvme0n1"),
    "virtio-blk trapped": (["virtio-blk", "--size", "64M", "--queues", "1"], "/dev/vda"),
    "virtio-blk polled notify": (["virtio-blk", "--size", "64M", "--queues", "1",
                                  "--polled-notify"], "/dev/vda"),
}


@contextmanager
def disk_guest(tmp: Path, name: str) -> Iterator[tuple[QemuMachine, int]]:
    args, _disk = DISKS[name]
    sock = str(tmp / (name.replace(" ", "-") + ".sock"))
    modules = ["nvme"] if args[0] == "nvme" else ["virtio_pci", "virtio_blk"]
    with server([*CLI, "--socket", sock, "--log-level", "WARNING", *args], sock) as proc, \
            QemuMachine(sockets=[VfioUserDevice(sock)], modules=modules,
                        name="bench-" + name.replace(" ", "-")) as vm:
        yield vm, proc.pid


def disks(tmp: Path, reps: int, ops: int, names: list[str]) -> None:
    figures: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for rep in range(reps):
        for name in names:
            disk = DISKS[name][1]
            with disk_guest(tmp, name) as (vm, pid):
                vm.run(f"for i in $(seq 200); do [ -b {disk} ] && break; sleep 0.1; done; "
                       f"[ -b {disk} ]", 120).check()
                vm.run(f"dd if=/dev/zero of={disk} bs=4096 count={ops} oflag=direct "
                       "2>/dev/null", 900).check()  # warm: every block once
                for what, cmd in (
                        ("read", f"dd if={disk} of=/dev/null bs=4096 count={ops} iflag=direct"),
                        ("write", f"dd if=/dev/zero of={disk} bs=4096 count={ops} "
                                  "oflag=direct")):
                    cpu0 = cpu_seconds(pid)
                    r = vm.run(cmd + " 2>/dev/null", 900).check()
                    cpu = cpu_seconds(pid) - cpu0
                    iops = ops / r.duration
                    figures[name].setdefault(f"{what}_iops", []).append(iops)
                    figures[name].setdefault(f"{what}_cpu_us", []).append(cpu / ops * 1e6)
                    print(json.dumps({"part": "disks", "config": name, "rep": rep,
                                      f"{what}_4k_qd1_iops": round(iops, 1),
                                      "server_cpu_us_per_req": round(cpu / ops * 1e6, 1)}),
                          flush=True)
    print(f"\n4 KiB O_DIRECT dd at QD1 in the guest, median of {reps} rounds; server CPU "
          "µs per request (all threads); polled / trapped as medians of per-round ratios\n")
    print("| device | read IOPS | write IOPS | server CPU µs/read | server CPU µs/write |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        f = figures[name]
        print(f"| {name} | {statistics.median(f['read_iops']):,.0f} | "
              f"{statistics.median(f['write_iops']):,.0f} | "
              f"{statistics.median(f['read_cpu_us']):,.0f} | "
              f"{statistics.median(f['write_cpu_us']):,.0f} |")
    for trapped, polled in (("nvme trapped", "nvme polled doorbells"),
                            ("virtio-blk trapped", "virtio-blk polled notify")):
        if trapped in figures and polled in figures:
            t, p = figures[trapped], figures[polled]
            print(f"| {polled} / trapped | {ratio_cell(p['read_iops'], t['read_iops'])} | "
                  f"{ratio_cell(p['write_iops'], t['write_iops'])} | "
                  f"{ratio_cell(p['read_cpu_us'], t['read_cpu_us'])} | "
                  f"{ratio_cell(p['write_cpu_us'], t['write_cpu_us'])} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="regs,disks", help="comma-separated: regs,disks")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=20000, help="register accesses per mmio_loop run")
    ap.add_argument("--ops", type=int, default=1000, help="4 KiB requests per dd")
    ap.add_argument("--disks", default=",".join(DISKS),
                    help=f"comma-separated, run in this order each round: {','.join(DISKS)}")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    names = [n for n in args.disks.split(",") if n]
    if not names or any(n not in DISKS for n in names):
        ap.error(f"--disks: choose from {', '.join(DISKS)}")
    print(f"# load average at start: {loadavg()}; {os.cpu_count()} CPUs", flush=True)
    info: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-mapped-"))
    try:
        if "regs" in parts:
            regs(tmp, args.reps, args.n)
        if "disks" in parts:
            disks(tmp, args.reps, args.ops, names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n# load average at end: {loadavg()}", info or "", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
