"""The work supervised mode (crash recovery) adds to each message, apart from the round trip.

Per message the normal server reads with one ``recvmsg_into``; the supervised one peeks
(``MSG_PEEK`` from ``SO_PEEK_OFF``), takes the handled message out with one ``recv`` and
writes its record page four times (handling, consuming, replying, idle). Both are timed here
in this thread's CPU time (not wall time: the figure holds on a loaded machine) over a
socketpair, interleaved, and the medians printed.

    python bench/supervised_overhead.py [-n 50000] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

from vfio_user_server.supervised import (
    CONSUMING,
    HANDLING,
    IDLE,
    REPLYING,
    SO_PEEK_OFF,
    Record,
)

MESSAGE = bytes(36)  # a REGION_READ of 4 bytes: header and RegionAccess


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=50000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    a, b = socket.socketpair()
    b.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    view = memoryview(bytearray(1 << 18))
    scratch = memoryview(bytearray(1 << 20))
    fd = Record.create()
    record = Record(fd)
    head = bytes(16)
    n: int = args.n

    def normal() -> float:
        t = time.thread_time_ns()
        for _ in range(n):
            a.send(MESSAGE)
            b.recvmsg_into([view], 1024)
        return (time.thread_time_ns() - t) / n / 1000

    def supervised() -> float:
        t = time.thread_time_ns()
        for _ in range(n):
            a.send(MESSAGE)
            b.recvmsg_into([view], 1024, socket.MSG_PEEK)
            record.write(HANDLING, head)
            record.write(CONSUMING, head, head)
            b.recv_into(scratch, len(MESSAGE))
            record.write(REPLYING, head, head)
            record.write(IDLE)
        return (time.thread_time_ns() - t) / n / 1000

    runs = [(normal(), supervised()) for _ in range(args.runs)]
    record.close()
    os.close(fd)
    print(json.dumps({
        "n": n, "runs": args.runs,
        "normal_cpu_us": round(statistics.median(x for x, _ in runs), 2),
        "supervised_cpu_us": round(statistics.median(y for _, y in runs), 2),
        "added_cpu_us": round(statistics.median(y - x for x, y in runs), 2),
        "loadavg": os.getloadavg()[0],
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
