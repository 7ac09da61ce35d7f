"""A virtio-blk request's whole round trip through a server in another process, INTx as QEMU's
client does it: ours (worker or inline) against QEMU's C x-vfio-user-server, no guest.

The server is started as the guest benchmark starts it (``vfio-user-server virtio-blk`` from
the CLI, or the C peer of ``bench/build_c_peer.sh`` exporting ``virtio-blk-pci``); this
process is the client, with guest RAM a sealed memfd (as QEMU's ``memory-backend-memfd``) and
the project's Python driver. Each request is what Linux's ``virtio_blk`` sends (an indirect
table of header, data and status), and each completion is taken the way QEMU's vfio-user
client and Linux's ``vp_interrupt`` take it with INTx:

1. the avail ring is bumped and the queue notified with a posted REGION_WRITE (no reply);
2. the client waits for the INTx trigger eventfd;
3. REGION_READ of the ISR byte (the vCPU waits for it), then SET_IRQS INTX UNMASK (QEMU's
   ``vfio_pci_intx_eoi`` after any BAR access while INTx is pending);
4. the used entries are consumed and ``used_event`` moved past them (``virtqueue_enable_cb``).

So a figure is the server's latency for one notify-to-interrupt cycle plus the two trapped
round trips of the interrupt, with this client's own Python cost (the same for every server).
Configurations run interleaved, ``--reps`` times each; the medians, and the medians of the
per-repetition ratios against the first configuration, are printed.

    python bench/virtio_roundtrip.py                          # ours,ours-worker,cpeer
    python bench/virtio_roundtrip.py --configs ours,ours-worker --reps 7 --ops 3000
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_all import cpeer_binary, server

from vfio_user_server.client import Client
from vfio_user_server.protocol.constants import IrqIndex, IrqSetFlag
from vfio_user_server.virtio.driver import DriverQueue, VirtioPciDriver
from vfio_user_server.virtio.spec import (
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    NO_VECTOR,
)

#: --profile-server: where each of our servers writes its cProfile stats (all threads)
PROFILE_DIR: Path | None = None
RAM = 32 << 20
IMAGE = 64 << 20
QUEUE = 128
F_ACCESS_PLATFORM = 33
#: virtio-blk's SEG_MAX, BLK_SIZE and FLUSH: what Linux takes here that changes nothing
BLK_FEATURES = 1 << 2 | 1 << 6 | 1 << 9


@contextmanager
def ours(workdir: Path, image: Path, inline: bool) -> Iterator[tuple[str, int]]:
    sock = str(workdir / "ours.sock")
    argv = [sys.executable, "-m", "vfio_user_server.cli", "--socket", sock, "--log-level",
            "WARNING", "virtio-blk", "--image", str(image), "--queues", "1"]
    if PROFILE_DIR is not None:
        out = PROFILE_DIR / f"{workdir.name}.prof"
        argv[1:3] = [str(Path(__file__).with_name("thread_profile.py")), str(out), "-m",
                     "vfio_user_server.cli"]
    with server([*argv, "--inline", "on" if inline else "off"], sock) as proc:
        yield sock, proc.pid


@contextmanager
def cpeer(workdir: Path, image: Path, inline: bool) -> Iterator[tuple[str, int]]:
    del inline
    binary = cpeer_binary()
    assert binary is not None
    sock = str(workdir / "cpeer.sock")
    obj = {"qom-type": "x-vfio-user-server", "id": "vfuobj0",
           "socket": {"type": "unix", "path": sock}, "device": "blk0"}
    # iommu_platform=on: see bench/virtio_blk.py (CPEER_DMA)
    argv = [str(binary), "-machine", "x-remote,vfio-user=on", "-nodefaults", "-display",
            "none", "-drive", f"file={image},if=none,id=d0,format=raw", "-device",
            "virtio-blk-pci,drive=d0,id=blk0,num-queues=1,disable-legacy=on,"
            "iommu_platform=on", "-object", json.dumps(obj)]
    with server(argv, sock) as proc:
        yield sock, proc.pid


CONFIGS: dict[str, tuple[Callable[[Path, Path, bool], object], bool]] = {
    "ours": (ours, True),
    "ours-worker": (ours, False),
    "cpeer": (cpeer, False),
}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> int:
    """Voluntary context switches of every thread of process ``pid`` (each is a sleep, so
    one more wake-up to wait for on a busy machine)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue  # the thread ended
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


class Driver:
    """The client side: Linux's virtio-blk and QEMU's INTx handling (module docstring)."""

    def __init__(self, sock: str, size: int, write: bool) -> None:
        c = self.c = Client.connect(sock, timeout=30)
        c.negotiate()
        c.get_device_info()
        c.add_memory(0, RAM, sealed=True)
        c.config_write(0x04, 2, 0x6)  # memory space, bus master
        d = self.d = VirtioPciDriver(c, memory=(0x100000, RAM - 0x100000))
        offered = d.device_features()
        want = (1 << F_VERSION_1 | 1 << F_RING_INDIRECT_DESC | 1 << F_RING_EVENT_IDX
                | 1 << F_ACCESS_PLATFORM | BLK_FEATURES)
        d.initialize(offered & want)
        self.q: DriverQueue = d.setup_queue(0, QUEUE, vector=NO_VECTOR)
        self.intx = c.enable_irq(IrqIndex.INTX, 1)[0]
        d.driver_ok()
        kind = 1 if write else 0
        for slot in range(QUEUE):
            hdr, data, status = d.alloc(16), d.alloc(size, 4096), d.alloc(1)
            table = d.alloc(3 * DESC_SIZE, 16)
            c.write_memory(hdr, struct.pack("<IIQ", kind, 0, slot * size // 512))
            c.write_memory(table, b"".join((
                DESC.pack(hdr, 16, DESC_F_NEXT, 1),
                DESC.pack(data, size, DESC_F_NEXT | (0 if write else DESC_F_WRITE), 2),
                DESC.pack(status, 1, DESC_F_WRITE, 0))))
            d.write_desc(self.q, slot, table, 3 * DESC_SIZE, DESC_F_INDIRECT, 0)
        self.next = 0
        self.interrupts = 0

    def batch(self, qd: int) -> None:
        d, q = self.d, self.q
        heads = [(self.next + i) % QUEUE for i in range(qd)]
        self.next = (self.next + qd) % QUEUE
        d.publish(q, heads)  # notifies (posted) unless the device suppressed it
        done = 0
        while done < qd:
            if not select.select([self.intx], [], [], 30)[0]:
                raise TimeoutError(f"no interrupt ({done} of {qd} completed)")
            os.eventfd_read(self.intx)
            self.interrupts += 1
            d.read_isr()
            self.c.set_irqs(IrqIndex.INTX, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK,
                            0, 1)
            while d.used_idx(0) != q.last_used:
                q.last_used = (q.last_used + 1) & 0xFFFF
                done += 1
            d.set_used_event(0, q.last_used)
            # a completion published between the check and the used_event store interrupts
            # again, as in Linux (virtqueue_enable_cb_delayed is not used at QD1)

    def close(self) -> None:
        os.close(self.intx)
        self.c.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="ours,ours-worker,cpeer",
                   help=f"comma-separated, run in this order each repetition: {','.join(CONFIGS)}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ops", type=int, default=2000, help="requests per figure")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--write", action="store_true")
    p.add_argument("--qd", default="1,32", help=f"queue depths (at most {QUEUE})")
    p.add_argument("--profile-server", type=Path, metavar="DIR",
                   help="run our servers under bench/thread_profile.py, stats in DIR/NAME-REP.prof")
    args = p.parse_args()
    global PROFILE_DIR
    PROFILE_DIR = args.profile_server
    if PROFILE_DIR is not None:
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.configs.split(",") if n]
    for n in names:
        if n not in CONFIGS:
            p.error(f"unknown configuration {n!r}")
    if "cpeer" in names and cpeer_binary() is None:
        print("# no C peer (bash bench/build_c_peer.sh): its column is skipped", flush=True)
        names.remove("cpeer")
    depths = [int(x) for x in args.qd.split(",")]
    results: dict[str, dict[int, list[float]]] = {n: {qd: [] for qd in depths} for n in names}
    cpu_us: dict[str, dict[int, list[float]]] = {n: {qd: [] for qd in depths} for n in names}
    switches: dict[str, dict[int, list[float]]] = {n: {qd: [] for qd in depths} for n in names}
    with tempfile.TemporaryDirectory(prefix="bench-virtio-rt-") as tmp:
        image = Path(tmp) / "disk.img"
        with open(image, "wb") as f:
            f.truncate(IMAGE)
        for rep in range(args.reps):
            for name in names:
                make, inline = CONFIGS[name]
                workdir = Path(tmp) / f"{name}-{rep}"
                workdir.mkdir()
                with make(workdir, image, inline) as (sock, pid):  # type: ignore[attr-defined]
                    drv = Driver(sock, args.size, args.write)
                    try:
                        for qd in depths:
                            for _ in range(max(1, 100 // qd)):
                                drv.batch(qd)  # warm up
                            n = max(1, args.ops // qd)
                            t0 = time.perf_counter()
                            irqs = drv.interrupts
                            cpu0, sw0 = cpu_seconds(pid), context_switches(pid)
                            for _ in range(n):
                                drv.batch(qd)
                            us = (time.perf_counter() - t0) / (n * qd) * 1e6
                            cpu = (cpu_seconds(pid) - cpu0) / (n * qd) * 1e6
                            sw = (context_switches(pid) - sw0) / (n * qd)
                            switches[name][qd].append(sw)
                            results[name][qd].append(us)
                            cpu_us[name][qd].append(cpu)
                            print(json.dumps({"config": name, "rep": rep, "qd": qd,
                                              "us_per_request": round(us, 1),
                                              "server_cpu_us_per_request": round(cpu, 1),
                                              "server_sleeps_per_request": round(sw, 2),
                                              "interrupts_per_request":
                                                  round((drv.interrupts - irqs) / (n * qd), 2)}),
                                  flush=True)
                    finally:
                        drv.close()
    base = names[0]
    print(f"\nus per request ({args.size} B {'writes' if args.write else 'reads'}), medians of "
          f"{args.reps} interleaved repetitions; ratios: medians of per-repetition ratios\n")
    print("| QD | " + " | ".join(names) + " | "
          + " | ".join(f"{n} / {base}" for n in names[1:]) + " |")
    print("|---" * (1 + 2 * len(names) - 1) + "|")
    for qd in depths:
        cells = [f"{statistics.median(results[n][qd]):,.0f}" for n in names]
        for n in names[1:]:
            r = [a / b for a, b in zip(results[n][qd], results[base][qd], strict=True)]
            cells.append(f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})")
        print(f"| {qd} | " + " | ".join(cells) + " |")
    print("\nserver per request, medians: CPU us (user + system, all threads) / voluntary "
          "context switches (all threads)\n")
    print("| QD | " + " | ".join(names) + " |")
    print("|---" * (1 + len(names)) + "|")
    for qd in depths:
        print(f"| {qd} | " + " | ".join(f"{statistics.median(cpu_us[n][qd]):,.0f} / "
                                        f"{statistics.median(switches[n][qd]):.2f}"
                                        for n in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
