"""Round-trip cost of one trapped BAR access, as QEMU's vCPU pays it.

A raw blocking client (no reader thread: send, then read the reply, like QEMU's synchronous
path) does REGION_READ and REGION_WRITE of 4 bytes on BAR0 of a server and reports the mean
round trip. The server is ours (in a subprocess, so the two do not share a GIL) or any other
vfio-user server given with --socket (e.g. QEMU's x-vfio-user-server exporting `edu`).

    python bench/access_latency.py                    # our sample device
    python bench/access_latency.py --device edu       # our edu device
    python bench/access_latency.py --socket /tmp/peer.sock --offset 0 --label qemu-edu
    python bench/access_latency.py --supervise        # ours in crash-recovery mode

Every run also measures a peer in the same run: ``floor``, a server that answers each message
with a well-formed reply without decoding it (the cost of the socket round trip alone in
Python), and reports our server's cost as a ratio to it. The server's own CPU time per message
(from /proc, all threads) is reported too: unlike the round trip it hardly moves with the load
of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

from vfio_user_server.pci import COMMAND, COMMAND_MEMORY
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command
from vfio_user_server.protocol.structs import RegionAccess

HDR = struct.Struct("<HHIII")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def call(sock: socket.socket, msg_id: int, cmd: int, payload: bytes) -> bytes:
    sock.sendall(HDR.pack(msg_id, cmd, 16 + len(payload), 0, 0) + payload)
    head = recv_exact(sock, 16)
    _, _, size, flags, err = HDR.unpack(head)
    body = recv_exact(sock, size - 16)
    if flags & 0x20:
        raise OSError(err, os.strerror(err))
    return body


def floor_server(path: str) -> None:
    """Answer every request with a same-sized reply (+count bytes for REGION_READ)."""
    if os.path.exists(path):
        os.unlink(path)
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    conn, _ = lsock.accept()
    while True:
        try:
            head = recv_exact(conn, 16)
        except EOFError:
            return
        msg_id, cmd, size, _flags, _err = HDR.unpack(head)
        body = recv_exact(conn, size - 16)
        extra = b""
        if cmd == Command.REGION_READ:
            extra = bytes(struct.unpack_from("<QII", body)[2])
        elif cmd == Command.VERSION:
            body = body[:4] + b'{"capabilities":{}}\0'
        elif cmd == Command.REGION_WRITE:
            body = body[:16]
        conn.sendall(HDR.pack(msg_id, cmd, 16 + len(body) + len(extra), 1, 0) + body + extra)


CONFIG_REGION = 7  # VFIO_PCI_CONFIG_REGION_INDEX
BAR0_ADDRESS = 0xFE000000


def program_bar0(sock: socket.socket) -> None:
    """Give BAR0 an address and turn on memory decoding, as a guest's PCI enumeration does.

    QEMU's x-vfio-user-server forwards a BAR access to the device's memory region at the
    address the BAR is programmed with, and fails it (EINVAL) while the BAR is unassigned.
    Our server does not care; the same two config writes are sent to both.
    """
    bar = RegionAccess(0x10, CONFIG_REGION, 4).pack() + struct.pack("<I", BAR0_ADDRESS)
    call(sock, 2, Command.REGION_WRITE, bar)
    head = call(sock, 3, Command.REGION_READ, RegionAccess(COMMAND, CONFIG_REGION, 2).pack())
    command = struct.unpack_from("<H", head, 16)[0] | COMMAND_MEMORY
    call(sock, 4, Command.REGION_WRITE,
         RegionAccess(COMMAND, CONFIG_REGION, 2).pack() + struct.pack("<H", command))


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(path: str, args: argparse.Namespace, pid: int | None = None) -> dict[str, float]:
    """Mean round trip (µs) per op, and the server's CPU time per op when its pid is known."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    try:
        caps = {"max_msg_fds": 16, "max_data_xfer_size": 1048576}
        call(sock, 0, Command.VERSION, codec.encode_version(0, 0, caps))
        call(sock, 1, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
        if args.bar == 0:
            program_bar0(sock)
        read = RegionAccess(args.offset, args.bar, 4).pack()
        write = RegionAccess(args.offset, args.bar, 4).pack() + b"\x01\0\0\0"
        results = {}
        for name, cmd, payload in (("read", Command.REGION_READ, read),
                                   ("write", Command.REGION_WRITE, write)):
            for i in range(min(1000, args.n)):  # warm up
                call(sock, i & 0xFFFF, cmd, payload)
            c0 = cpu_seconds(pid)
            t0 = time.perf_counter()
            for i in range(args.n):
                call(sock, i & 0xFFFF, cmd, payload)
            results[name] = (time.perf_counter() - t0) / args.n * 1e6
            if pid is not None:
                results[f"{name}_cpu"] = (cpu_seconds(pid) - c0) / args.n * 1e6
        return results
    finally:
        sock.close()


def start(argv: list[str], path: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv)
    for _ in range(400):
        if os.path.exists(path):
            return proc
        time.sleep(0.025)
    proc.kill()
    raise RuntimeError(f"server did not create {path}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", help="benchmark an already running server")
    ap.add_argument("--device", default="sample", help="our device to start (default sample)")
    ap.add_argument("--bar", type=int, default=0)
    ap.add_argument("--offset", type=lambda s: int(s, 0), default=4)
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--label", default=None)
    ap.add_argument("--pid", type=int, default=None,
                    help="pid of the --socket server, to report its CPU time per message")
    ap.add_argument("--supervise", action="store_true",
                    help="start our server with --supervise (crash recovery); the CPU time "
                    "reported is the device process's")
    ap.add_argument("--floor-server", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor_server:
        floor_server(args.floor_server)
        return 0
    tmp = tempfile.mkdtemp()
    floor_path = os.path.join(tmp, "floor.sock")
    floor = start([sys.executable, __file__, "--floor-server", floor_path], floor_path)
    try:
        base = measure(floor_path, args, floor.pid)
    finally:
        floor.terminate()
        floor.wait(10)
    proc = None
    path = args.socket
    if path is None:
        path = os.path.join(tmp, "bench.sock")
        proc = start([sys.executable, "-m", "vfio_user_server.cli",
                      *(["--supervise"] if args.supervise else []), "--socket", path,
                      "--log-level", "WARNING", args.device], path)
    pid = proc.pid if proc is not None else args.pid
    if proc is not None and args.supervise:  # the device process, the supervisor's child
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            pid = int(f.read().split()[0])
    try:
        ours = measure(path, args, pid)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    label = args.label or (args.device if args.socket is None else path)
    if args.supervise:
        label += " (supervised)"
    out = {"server": label, "n": args.n}
    for op in ("read", "write"):
        out[f"{op}_us"] = round(ours[op], 2)
        out[f"floor_{op}_us"] = round(base[op], 2)
        out[f"{op}_ratio"] = round(ours[op] / base[op], 2)
        if f"{op}_cpu" in ours:
            out[f"server_cpu_{op}_us"] = round(ours[f"{op}_cpu"], 2)
            out[f"floor_cpu_{op}_us"] = round(base[f"{op}_cpu"], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
