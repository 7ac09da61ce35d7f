"""The device side of NVMe I/O, without a guest: cost per command and its profile.

A real server and client in this process (guest RAM a sealed memfd, mapped by the server, as
QEMU's memfd backend), an NVMe controller on a 64 MiB image, one I/O queue pair of depth 256
created through the admin queue like a driver does. Each command is what Linux's ``nvme``
sends for an O_DIRECT read or write: PRP1, plus PRP2 or a PRP list for more than two pages.
The commands are put in the SQ without a doorbell and the queue is serviced right here, on
this thread, as the loop thread (``--path inline``) or the worker (``--path worker``) would:
so the figure is the device's own cost per command (fetch, PRP walk, DMA translation, the
file I/O, the completion entry and the interrupt decision), not the transport's.
``--path doorbell`` goes through BAR0's region handler instead, as a REGION_WRITE decoded by
the message path reaches it: the SQ tail doorbell (which runs the inline path) and then the
CQ head doorbell the host writes after consuming the completions (MSI-X on, so the interrupt
is an eventfd write; ``--intx`` for the INTx line instead, and then the SET_IRQS(INTX, UNMASK)
QEMU sends after each INTx interrupt, as the endpoint handles it).

    python bench/nvme_device.py                      # 4 KiB reads, us/command
    python bench/nvme_device.py --profile 25         # plus cProfile's 25 costliest functions
    python bench/nvme_device.py --size 131072 --write --path worker
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vfio_user_devices.nvme import NvmeController
from vfio_user_devices.nvme_spec import CQE_SIZE, SQE, SQE_SIZE, AdminOpcode, IoOpcode
from vfio_user_server.client import Client
from vfio_user_server.protocol.codec import Message, encode
from vfio_user_server.protocol.constants import Command, IrqSetFlag
from vfio_user_server.protocol.structs import IrqSet
from vfio_user_server.server import Server

PAGE = 4096
RAM = 48 << 20
ASQ, ACQ, SQ1, CQ1 = 0x10000, 0x20000, 0x40000, 0x80000
PRPLISTS = 0x100000  # one page per command slot
DATA = 0x400000
DEPTH = 256


class Bench:
    def __init__(self, workdir: Path, size: int, write: bool) -> None:
        image = workdir / "disk.img"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        self.dev = NvmeController(image)
        self.server = Server(self.dev, workdir / "nvme.sock").start()
        c = self.c = Client.connect(workdir / "nvme.sock", timeout=10)
        c.negotiate()
        c.get_device_info()
        c.add_memory(0, RAM, sealed=True)
        c.config_write(0x04, 2, 0x6)
        c.bar_write(0, 0x24, 4, 31 | 31 << 16)
        c.bar_write(0, 0x28, 8, ASQ)
        c.bar_write(0, 0x30, 8, ACQ)
        c.bar_write(0, 0x14, 4, 1 | 6 << 16 | 4 << 20)
        deadline = time.monotonic() + 30
        while not c.bar_read(0, 0x1C, 4) & 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the controller did not become ready")
            time.sleep(0.001)
        self.admin_tail = 0
        self.admin(AdminOpcode.CREATE_CQ, CQ1, (DEPTH - 1) << 16 | 1, 1 << 16 | 2 | 1)
        self.admin(AdminOpcode.CREATE_SQ, SQ1, (DEPTH - 1) << 16 | 1, 1 << 16 | 1)
        opcode = IoOpcode.WRITE if write else IoOpcode.READ
        pages = (size + PAGE - 1) // PAGE
        nlb = size // 512
        for slot in range(DEPTH):
            data = DATA + slot * size
            prp2 = 0
            if pages == 2:
                prp2 = data + PAGE
            elif pages > 2:
                prp2 = PRPLISTS + slot * PAGE
                c.write_memory(prp2, struct.pack(f"<{pages - 1}Q",
                                                 *(data + i * PAGE for i in range(1, pages))))
            lba = (slot * nlb) % ((64 << 20) // 512 - nlb)
            c.write_memory(SQ1 + slot * SQE_SIZE, SQE.pack(
                opcode, 0, slot, 1, 0, 0, data, prp2, lba, 0, nlb - 1, 0, 0, 0))
        self.sq = self.dev.sqs[1]
        self.cq = self.dev.cqs[1]
        region = self.dev.regions()[0].write
        assert region is not None
        self.bar0_write: Callable[[int, int], None] = (
            lambda offset, value: region(offset, value.to_bytes(4, "little")))
        self.efd = -1
        self.eoi: Callable[[], object] | None = None

    def admin(self, opcode: int, prp1: int, cdw10: int, cdw11: int) -> None:
        c = self.c
        slot = self.admin_tail
        c.write_memory(ASQ + slot * SQE_SIZE,
                       SQE.pack(opcode, 0, slot, 0, 0, 0, prp1, 0, cdw10, cdw11, 0, 0, 0, 0))
        self.admin_tail += 1
        c.bar_write(0, 0x1000, 4, self.admin_tail)
        deadline = time.monotonic() + 30
        while True:
            raw = c.read_memory(ACQ + slot * CQE_SIZE, CQE_SIZE)
            if raw[14] & 1:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no admin completion")
            time.sleep(0.001)
        if raw[14] >> 1 or raw[15]:
            raise RuntimeError(f"admin opcode {opcode:#x} failed: {raw.hex()}")
        c.bar_write(0, 0x1004, 4, self.admin_tail)

    def irqs(self, intx: bool) -> None:
        """Interrupts as a driver sets them up: MSI-X with an eventfd on every vector, or
        INTx with its eventfd (drained here, as QEMU's main loop would)."""
        c = self.c
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if intx:
            c.set_irqs(0, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, 0, 1,
                       fds=[self.efd])
            # QEMU's EOI after each INTx interrupt (a BAR access while it is pending): the
            # request as the endpoint gets it from the reader, and its reply encoded
            conn = self.server.connection
            assert conn is not None
            unmask = Message(0, Command.DEVICE_SET_IRQS, 0, 0, IrqSet(
                IrqSet.SIZE, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK, 0, 0, 1).pack(),
                [])
            handle = conn.endpoint.handle
            self.eoi = lambda: encode(handle(unmask))  # type: ignore[arg-type]
            return
        msix = self.dev.msix
        assert msix is not None
        ctl = msix.offset + 2
        c.config_write(ctl, 2, 0x8000)  # MSI-X enable
        c.set_irqs(2, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, 0, 2,
                   fds=[self.efd] * 2)  # the admin CQ's vector 0, CQ 1's vector 1

    def batch(self, qd: int, path: str) -> None:
        """Submit ``qd`` commands and service them on this thread; consume the completions."""
        dev, sq, cq = self.dev, self.sq, self.cq
        if path == "doorbell":
            write = self.bar0_write
            write(0x1008, (sq.tail + qd) % sq.size)
            if cq.used() != qd:
                raise RuntimeError(f"{cq.used()} completions for {qd} commands")
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.efd)
            write(0x100C, cq.tail)
            if self.eoi is not None:
                self.eoi()
            return
        with dev.lock:
            sq.tail = (sq.tail + qd) % sq.size
            if path == "inline":
                while sq.head != sq.tail:
                    if not dev.datapath.inline(sq) and sq.head != sq.tail:
                        raise RuntimeError("the inline path left commands to the worker")
                job = None
            else:
                job = dev.datapath.next_job()
        if job is not None:
            job()
        with dev.lock:
            if cq.used() != qd:
                raise RuntimeError(f"{cq.used()} completions for {qd} commands")
            cq.head = cq.tail

    def run(self, qd: int, total: int, path: str) -> float:
        t0 = time.perf_counter()
        for _ in range(total // qd):
            self.batch(qd, path)
        return (time.perf_counter() - t0) / (total // qd * qd) * 1e6

    def close(self) -> None:
        if self.efd >= 0:
            os.close(self.efd)
        self.c.close()
        self.server.close()
        self.dev.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--write", action="store_true")
    p.add_argument("--ops", type=int, default=4096)
    p.add_argument("--path", choices=("inline", "worker", "doorbell"), default="inline")
    p.add_argument("--intx", action="store_true", help="--path doorbell: INTx, not MSI-X")
    p.add_argument("--profile", type=int, default=0, help="print the N costliest functions")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-nvme-dev-") as tmp:
        b = Bench(Path(tmp), args.size, args.write)
        try:
            if args.path == "doorbell":
                b.irqs(args.intx)
            b.run(16, 256, args.path)  # warm up
            for qd in (1, 16):
                us = b.run(qd, args.ops, args.path)
                print(json.dumps({"size": args.size, "write": args.write, "path": args.path,
                                  "qd": qd, "us_per_command": round(us, 2)}))
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                b.run(1, args.ops // 4, args.path)
                prof.disable()
                stats = pstats.Stats(prof)
                calls = stats.total_calls  # type: ignore[attr-defined]
                print(f"calls per command: {calls / (args.ops // 4):.0f}")
                stats.sort_stats("tottime").print_stats(args.profile)
        finally:
            b.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
