"""The device side of a virtio-blk request, without a guest: cost per request and its profile.

A real server and client in this process (guest RAM a memfd, mapped by the server), a
virtio-blk device on a 64 MiB image, one split queue set up by the project's Python driver
with the features Linux takes (EVENT_IDX, indirect descriptors). Each request is what Linux's
``virtio_blk`` sends: one ring descriptor pointing to an indirect table of three (header,
data, status). The requests are published without a notify and the queue is serviced right
here, on this thread, as the worker (or the loop thread, inline) would: so the figure is the
device's own cost per request (ring walk, DMA translation, the file I/O, the used ring and the
interrupt decision), not the transport's.

    python bench/virtio_device.py                      # 4 KiB reads, QD1 and QD32, us/request
    python bench/virtio_device.py --profile 20         # plus cProfile's 20 costliest functions
    python bench/virtio_device.py --size 131072 --write
    python bench/virtio_device.py --inline             # as the inline mode runs it
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import struct
import tempfile
import time
from pathlib import Path

from vfio_user_devices.virtio_blk import VirtioBlk
from vfio_user_server.client import Client
from vfio_user_server.server import Server
from vfio_user_server.virtio.driver import VirtioPciDriver
from vfio_user_server.virtio.spec import (
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    NO_VECTOR,
)

RAM = 16 << 20
QUEUE = 256


class Bench:
    def __init__(self, workdir: Path, size: int, write: bool, inline: bool = False) -> None:
        self.inline = inline
        image = workdir / "disk.img"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        self.dev = VirtioBlk(image, queues=1)
        self.server = Server(self.dev, workdir / "blk.sock").start()
        c = self.c = Client.connect(workdir / "blk.sock", timeout=10)
        c.negotiate()
        c.get_device_info()
        c.add_memory(0, RAM, sealed=True)  # as QEMU's memfd backend: zero-copy
        c.config_write(0x04, 2, 0x6)
        d = self.d = VirtioPciDriver(c, memory=(0x100000, 12 << 20))
        d.initialize(d.device_features())
        d.setup_queue(0, QUEUE, vector=NO_VECTOR)
        d.driver_ok()
        self.q = d.queues[0]
        self.vq = self.dev.queues[0]
        # one indirect table, header, data buffer and status byte per ring slot
        kind = 1 if write else 0
        for slot in range(QUEUE):
            hdr, data, status = d.alloc(16), d.alloc(size, 4096), d.alloc(1)
            table = d.alloc(3 * DESC_SIZE, 16)
            c.write_memory(hdr, struct.pack("<IIQ", kind, 0, (slot * size // 512) % 65536))
            c.write_memory(table, b"".join((
                DESC.pack(hdr, 16, DESC_F_NEXT, 1),
                DESC.pack(data, size, DESC_F_NEXT | (0 if write else DESC_F_WRITE), 2),
                DESC.pack(status, 1, DESC_F_WRITE, 0))))
            d.write_desc(self.q, slot, table, 3 * DESC_SIZE, DESC_F_INDIRECT, 0)
        self.next = 0

    def batch(self, qd: int) -> None:
        heads = [(self.next + i) % QUEUE for i in range(qd)]
        self.next = (self.next + qd) % QUEUE
        self.d.publish(self.q, heads, notify=False)
        before = self.vq.pushed
        if self.inline:
            if not self.dev._service_inline(self.vq):
                raise RuntimeError("inline service handed the queue to the worker")
        else:
            self.dev._service(self.vq, self.dev._gen)
        if self.vq.pushed - before != qd:
            raise RuntimeError(f"{self.vq.pushed - before} of {qd} requests completed")

    def close(self) -> None:
        self.c.close()
        self.server.close()
        self.dev.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096, help="bytes per request")
    p.add_argument("--write", action="store_true", help="writes instead of reads")
    p.add_argument("--inline", action="store_true",
                   help="service the queue as the inline mode does (on the loop thread)")
    p.add_argument("--ops", type=int, default=20000, help="requests per figure")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print the N costliest functions (QD1, cumulative order)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-virtio-dev-") as tmp:
        b = Bench(Path(tmp), args.size, args.write, args.inline)
        try:
            for qd in (1, 32):
                for _ in range(200 // qd):
                    b.batch(qd)  # warm up
                runs = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    for _ in range(args.ops // qd):
                        b.batch(qd)
                    runs.append((time.perf_counter() - t0) / (args.ops // qd * qd) * 1e6)
                print(json.dumps({"size": args.size, "write": args.write,
                                  "inline": args.inline, "qd": qd,
                                  "us_per_request": sorted(runs)[len(runs) // 2],
                                  "runs": [round(r, 2) for r in runs]}), flush=True)
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(args.ops // 4):
                    b.batch(1)
                prof.disable()
                stats = pstats.Stats(prof)
                stats.sort_stats("tottime").print_stats(args.profile)
        finally:
            b.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
