"""What one trapped BAR access costs each server, per message, from /proc, strace and callgrind.

A round trip's time moves by 20-50 % with the load of this shared machine; what a server does
per message does not. For each server (ours with the C shim, ours pure Python, QEMU's
x-vfio-user-server edu) a raw blocking client (bench/access_latency.py's) does ``-n`` 4-byte
REGION_READs of edu's ID register and REGION_WRITEs of its liveness register (the registers
bench/mmio_loop.c times in the guest) after a warm-up, and around the timed part this reads:

* per message: the server's user and system CPU time (utime, stime of every thread), its
  voluntary and involuntary context switches, and which threads ran (/proc/PID/task);
* with ``--strace``, a second pass under ``strace -c -f`` attached to the server: system calls
  per message by name, and those that failed (a non-blocking read that found nothing);
* with ``--callgrind``, a third pass with the server started under callgrind with
  instrumentation off, turned on for the timed part only: user-space instructions per message.

    python bench/msg_cost.py --servers shim,peer -n 20000 --strace --callgrind
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import access_latency  # noqa: E402
import run_all  # noqa: E402

from vfio_user_server.protocol import codec  # noqa: E402
from vfio_user_server.protocol.constants import Command  # noqa: E402
from vfio_user_server.protocol.structs import RegionAccess  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")
#: the registers bench/mmio_loop.c times: reads of the ID, writes of the liveness register
READ_OFFSET, WRITE_OFFSET = 0x00, 0x04


def thread_stats(pid: int) -> dict[int, tuple[float, float, int, int]]:
    """Per live thread: (utime s, stime s, voluntary, involuntary context switches)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, TypeError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
            vol = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)
            inv = re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M)
            assert vol and inv
            out[int(task.name)] = (int(fields[11]) / _TICK, int(fields[12]) / _TICK,
                                   int(vol[1]), int(inv[1]))
    return out


def per_message(before: dict[int, tuple[float, float, int, int]],
                after: dict[int, tuple[float, float, int, int]], n: int) -> dict[str, float]:
    d = [0.0, 0.0, 0.0, 0.0]
    ran = 0
    for tid, a in after.items():
        b = before.get(tid, (0.0, 0.0, 0, 0))
        delta = [x - y for x, y in zip(a, b, strict=True)]
        ran += any(delta)
        d = [x + y for x, y in zip(d, delta, strict=True)]
    return {"user_us": round(d[0] / n * 1e6, 2), "sys_us": round(d[1] / n * 1e6, 2),
            "vol_switches": round(d[2] / n, 3), "invol_switches": round(d[3] / n, 3),
            "threads": len(after), "threads_that_ran": ran}


def traced_threads(pid: int) -> bool:
    """Whether every thread of ``pid`` has a tracer (strace has attached to all)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            m = re.search(r"^TracerPid:\s+(\d+)", (task / "status").read_text(), re.M)
            if not m or m[1] == "0":
                return False
    return True


@contextlib.contextmanager
def straced(pid: int, out: Path) -> Iterator[None]:
    proc = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not traced_threads(pid):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("strace did not attach")
        time.sleep(0.01)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def syscall_counts(path: Path) -> dict[str, tuple[int, int]]:
    """strace -c's table: name -> (calls, errors)."""
    counts: dict[str, tuple[int, int]] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            with contextlib.suppress(ValueError):
                errors = int(parts[4]) if len(parts) == 6 else 0
                counts[parts[-1]] = (int(parts[3]), errors)
    return counts


class Client:
    """access_latency's raw blocking client, set up as QEMU sets up a device."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        caps = {"max_msg_fds": 16, "max_data_xfer_size": 1048576}
        access_latency.call(self.sock, 0, Command.VERSION, codec.encode_version(0, 0, caps))
        access_latency.call(self.sock, 1, Command.DEVICE_GET_INFO,
                            struct.pack("<IIII", 16, 0, 0, 0))
        access_latency.program_bar0(self.sock)
        self.ops = {
            "read": (Command.REGION_READ, RegionAccess(READ_OFFSET, 0, 4).pack()),
            "write": (Command.REGION_WRITE,
                      RegionAccess(WRITE_OFFSET, 0, 4).pack() + b"\x01\0\0\0")}

    def run(self, op: str, n: int) -> None:
        cmd, payload = self.ops[op]
        for i in range(n):
            access_latency.call(self.sock, i & 0xFFFF, cmd, payload)

    def close(self) -> None:
        self.sock.close()


def callgrind_dump(pid: int, out: str) -> int:
    """Dump callgrind's counters of ``pid`` and return the instructions since the last zero."""
    before = set(Path(out).parent.glob(Path(out).name + "*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while True:
        new = set(Path(out).parent.glob(Path(out).name + "*")) - before
        for path in new:
            m = re.search(r"^(?:totals|summary):\s+(\d+)", path.read_text(), re.M)
            if m:
                path.unlink()
                return int(m[1])
        if time.monotonic() > deadline:
            raise RuntimeError("callgrind did not dump")
        time.sleep(0.05)


def measure(name: str, argv: Callable[[str], list[str]], env: dict[str, str] | None,
            tmp: str, n: int, use_strace: bool, use_callgrind: bool) -> dict[str, object]:
    rec: dict[str, object] = {"server": name, "n": n,
                              "loadavg": [round(x, 2) for x in os.getloadavg()]}
    sock = os.path.join(tmp, f"{name}.sock")
    with run_all.server(argv(sock), sock, env) as proc:
        client = Client(sock)
        try:
            for op in ("read", "write"):
                client.run(op, min(n, 2000))  # warm up
                before = thread_stats(proc.pid)
                t0 = time.perf_counter()
                client.run(op, n)
                rec[f"{op}_us"] = round((time.perf_counter() - t0) / n * 1e6, 2)
                rec[op] = per_message(before, thread_stats(proc.pid), n)
                if use_strace:
                    trace = Path(tmp) / f"{name}-{op}.strace"
                    with straced(proc.pid, trace):
                        client.run(op, n)
                    rec[f"{op}_syscalls"] = {
                        k: [round(c / n, 3), round(e / n, 3)]
                        for k, (c, e) in sorted(syscall_counts(trace).items())
                        if c / n >= 0.005}
        finally:
            client.close()
    if use_callgrind:
        out = os.path.join(tmp, f"{name}.callgrind")
        grind = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                 f"--callgrind-out-file={out}.%p"]
        with run_all.server(grind + argv(sock), sock, env) as proc:
            client = Client(sock)
            try:
                for op in ("read", "write"):
                    client.run(op, 200)  # warm up (uninstrumented)
                    subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)],
                                   check=True, capture_output=True)
                    callgrind_dump(proc.pid, f"{out}.{proc.pid}")  # zero
                    m = max(n // 10, 100)
                    client.run(op, m)
                    rec[f"{op}_instructions"] = round(callgrind_dump(proc.pid,
                                                                     f"{out}.{proc.pid}") / m)
                    subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)],
                                   check=True, capture_output=True)
            finally:
                client.close()
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default="shim,python,peer",
                    help="a subset of shim,python,peer (peer: QEMU's x-vfio-user-server)")
    ap.add_argument("-n", type=int, default=20000, help="accesses of each kind")
    ap.add_argument("--strace", action="store_true", help="count the servers' system calls")
    ap.add_argument("--callgrind", action="store_true",
                    help="count the servers' user-space instructions (n/10 accesses)")
    args = ap.parse_args()
    servers: dict[str, tuple[Callable[[str], list[str]], dict[str, str] | None]] = {
        "shim": (run_all.ours_argv, run_all.shim_env(True)),
        "python": (run_all.ours_argv, run_all.shim_env(False))}
    binary = run_all.cpeer_binary()
    if binary is not None:
        servers["peer"] = (lambda sock: run_all.cpeer_argv(binary, sock), None)
    with tempfile.TemporaryDirectory(prefix="pyvfio-msg-cost-") as tmp:
        for name in args.servers.split(","):
            if name not in servers:
                print(f"msg_cost: no server {name!r} (the C peer is not built?)",
                      file=sys.stderr)
                continue
            argv, env = servers[name]
            print(json.dumps(measure(name, argv, env, tmp, args.n, args.strace,
                                     args.callgrind)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
