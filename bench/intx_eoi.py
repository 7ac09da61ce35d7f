"""What QEMU's INTx EOI costs our server: SET_IRQS(INTX, NONE|UNMASK, 0, 1) round trips.

QEMU's client sends this request after every INTx interrupt, on the first BAR access after it,
and waits for the reply with the vCPU stopped (``vfio_pci_intx_eoi``). A raw blocking client
(bench/access_latency.py's) sets an INTx trigger eventfd as QEMU does, then alternates blocks
of EOIs and of 4-byte REGION_READs of BAR0 (the fast path's own message, for scale) and reports
the mean round trip and the server's CPU time per message (/proc, every thread), per block
kind, with the load average. ``--tree`` runs the server from another source tree (its own
built shim), for a before/after in the same run:

    python bench/intx_eoi.py --tree /work/main --tree . --rounds 5

Timing on a loaded 2-CPU machine hardly resolves a few microseconds, so ``--calls`` counts
instead: the server runs in this process (the tree's code: set PYTHONPATH), and a profile hook
on its threads counts the Python functions and the C functions called from Python per message
(the difference between N and 2N messages of each kind, over N):

    PYTHONPATH=/work/main python bench/intx_eoi.py --calls

"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

from access_latency import call, cpu_seconds, program_bar0

from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command, IrqIndex, IrqSetFlag
from vfio_user_server.protocol.structs import IrqSet, RegionAccess

HDR = struct.Struct("<HHIII")
EOI = IrqSet(IrqSet.SIZE, int(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK),
             int(IrqIndex.INTX), 0, 1).pack()
TRIGGER = IrqSet(IrqSet.SIZE, int(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER),
                 int(IrqIndex.INTX), 0, 1).pack()


def block(sock: socket.socket, pid: int, cmd: int, payload: bytes, n: int) -> tuple[float, float]:
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    for i in range(n):
        call(sock, i & 0xFFFF, cmd, payload)
    return (time.perf_counter() - t0) / n * 1e6, (cpu_seconds(pid) - c0) / n * 1e6


def serve(tree: str, path: str, prefix: list[str]) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "vfio_user_server.cli", "--socket",
                             path, "--log-level", "WARNING", "sample"], env=env)
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"server did not create {path}")
        time.sleep(0.05)
    return proc


def set_up(sock: socket.socket, path: str, efd: int) -> None:
    """VERSION, DEVICE_GET_INFO, BAR0 enabled, an INTx trigger eventfd (as QEMU does)."""
    for _ in range(1200):  # the socket may exist before the server listens
        try:
            sock.connect(path)
            break
        except ConnectionRefusedError:
            time.sleep(0.05)
    caps = {"max_msg_fds": 16, "max_data_xfer_size": 1048576}
    call(sock, 0, Command.VERSION, codec.encode_version(0, 0, caps))
    call(sock, 1, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
    program_bar0(sock)
    msg = HDR.pack(5, Command.DEVICE_SET_IRQS, 16 + len(TRIGGER), 0, 0) + TRIGGER
    socket.send_fds(sock, [msg], [efd])
    head = sock.recv(16)
    assert HDR.unpack(head)[3] == 1, head  # a reply, no error


READ = RegionAccess(4, 0, 4).pack()
KINDS = {"eoi": (Command.DEVICE_SET_IRQS, EOI), "read": (Command.REGION_READ, READ)}


def run_calls(n: int) -> dict[str, object]:
    """Python calls per message of each kind, in this process's server's threads."""
    import threading

    import vfio_user_server
    from vfio_user_server.sample import SampleDevice
    from vfio_user_server.server import Server

    counts = {"call": 0, "c_call": 0}

    def hook(frame: object, event: str, arg: object) -> None:
        if event in counts:
            counts[event] += 1

    out: dict[str, object] = {"code": os.path.dirname(vfio_user_server.__file__), "n": n}
    for kind, (cmd, payload) in KINDS.items():
        per = []
        for m in (n, 2 * n):
            tmp = tempfile.mkdtemp()
            path = os.path.join(tmp, "eoi.sock")
            threading.setprofile(hook)  # the server's threads, started from here on
            srv = Server(SampleDevice(), path).start()
            threading.setprofile(None)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                set_up(sock, path, efd)
                before = dict(counts)
                for i in range(m):
                    call(sock, i & 0xFFFF, cmd, payload)
                per.append({k: counts[k] - before[k] for k in counts})
            finally:
                sock.close()
                os.close(efd)
                srv.close()
        for k in counts:
            out[f"{kind}_{k}s"] = round((per[1][k] - per[0][k]) / n, 1)
    return out


def run_tree(tree: str, rounds: int, n: int) -> dict[str, object]:
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "eoi.sock")
    proc = serve(tree, path, [])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        set_up(sock, path, efd)
        read = READ
        out: dict[str, list[float]] = {"eoi": [], "eoi_cpu": [], "read": [], "read_cpu": []}
        block(sock, proc.pid, Command.DEVICE_SET_IRQS, EOI, n)  # warm up
        block(sock, proc.pid, Command.REGION_READ, read, n)
        for _ in range(rounds):
            for name, cmd, payload in (("eoi", Command.DEVICE_SET_IRQS, EOI),
                                       ("read", Command.REGION_READ, read)):
                us, cpu = block(sock, proc.pid, cmd, payload, n)
                out[name].append(us)
                out[f"{name}_cpu"].append(cpu)
        return {"tree": tree, "n": n, "rounds": rounds, "loadavg": os.getloadavg(),
                **{k: round(statistics.median(v), 2) for k, v in out.items()}}
    finally:
        sock.close()
        os.close(efd)
        proc.terminate()
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", help="source tree(s) to run (default .)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--calls", action="store_true", help="count Python calls per message")
    args = ap.parse_args()
    if args.calls:
        print(json.dumps(run_calls(args.n)), flush=True)
        return 0
    for tree in args.tree or ["."]:
        print(json.dumps(run_tree(tree, args.rounds, args.n)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
