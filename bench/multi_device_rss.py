"""Memory per extra device when one ``vfio-user-server`` process serves several devices.

Starts the installed command with 1 and with N devices (``--socket A edu -- --socket B edu
...``), waits for its ``READY=1`` (NOTIFY_SOCKET), and reads ``VmRSS`` and ``Pss``: idle, then
with a negotiated client on every device. Prints JSON lines and the cost per extra device::

    python bench/multi_device_rss.py --devices 1,11,21 --device edu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from vfio_user_server.client import Client

CLI = str(Path(sys.executable).parent / "vfio-user-server")


def kib(pid: int, key: str, name: str) -> int:
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure(n: int, device: str, folder: Path) -> dict[str, object]:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    npath = folder / f"notify-{n}"
    notify.bind(str(npath))
    notify.settimeout(120)
    socks = [folder / f"d{n}-{i}.sock" for i in range(n)]
    args: list[str] = []
    for i, s in enumerate(socks):
        args += (["--"] if i else []) + ["--socket", str(s), device]
    env = {**os.environ, "NOTIFY_SOCKET": str(npath)}
    proc = subprocess.Popen([CLI, "--log-level", "WARNING", *args], env=env,
                            stderr=subprocess.DEVNULL)
    try:
        while b"READY=1" not in notify.recv(4096).splitlines():
            pass
        idle = (kib(proc.pid, "VmRSS", "status"), kib(proc.pid, "Pss", "smaps_rollup"))
        clients = [Client.connect(s, timeout=60) for s in socks]
        for c in clients:
            c.negotiate()
            c.get_device_info()
        conn = (kib(proc.pid, "VmRSS", "status"), kib(proc.pid, "Pss", "smaps_rollup"))
        threads = kib(proc.pid, "Threads", "status")
        for c in clients:
            c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        notify.close()
    return {"devices": n, "device": device, "rss_idle_kib": idle[0], "pss_idle_kib": idle[1],
            "rss_connected_kib": conn[0], "pss_connected_kib": conn[1],
            "threads_connected": threads}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="1,11,21", help="device counts (comma-separated)")
    p.add_argument("--device", default="edu", help="built-in device to serve (edu)")
    args = p.parse_args()
    counts = [int(x) for x in args.devices.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="vfu-rss-", dir="/tmp"))
    try:
        rows = [measure(n, args.device, folder) for n in counts]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for row in rows:
        print(json.dumps(row))
    base = rows[0]
    for row in rows[1:]:
        extra = int(str(row["devices"])) - int(str(base["devices"]))
        for key in ("rss_idle_kib", "rss_connected_kib"):
            per = (int(str(row[key])) - int(str(base[key]))) / extra / 1024
            print(f"{row['devices']} devices, {key}: {per:.2f} MiB per extra device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
