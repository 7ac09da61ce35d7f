"""What one NVMe command costs each process, measured from /proc rather than by a clock.

On a shared machine IOPS move by 20 % between runs; CPU time per command and context switches
per command move much less. For each configuration of bench/nvme_bench.py (a fresh server,
guest and image each) the guest runs 4 KiB random reads and writes at QD1 through
bench/aio_qd.c, and around each run this reads:

* the guest's figure (us per command, wall time, for reference);
* the server's CPU time per command (utime + stime of every thread, /proc/PID/stat), and its
  context switches per command summed over its threads (voluntary: a thread went to sleep,
  i.e. one wake-up each; /proc/PID/task/*/status);
* QEMU's (the client's) CPU time per command: the vCPU running the guest's driver and ISR,
  and QEMU's main loop (eventfds, the vfio-user client's messages);
* with ``--strace``, a second run under ``strace -c -f`` attached to the server: system calls
  per command by name (the run's wall time is then meaningless).

    python bench/nvme_cost.py --configs ours-intx,cpeer-intx,ours-msix,qemu-msix --ops 2000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import nvme_bench  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")
_NS_RE = re.compile(r"ops=(\d+) ns=(\d+)")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far (exited threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches summed over the live threads of ``pid``."""
    vol = invol = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            text = (task / "status").read_text()
            vol += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", text, re.M)[1])  # type: ignore[index]
            invol += int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", text, re.M)[1])  # type: ignore[index]
    return vol, invol


@contextlib.contextmanager
def straced(pid: int, out: Path) -> Iterator[None]:
    proc = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached to every thread (strace prints nothing to wait for)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def syscall_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] not in ("total",):
            with contextlib.suppress(ValueError):
                counts[parts[-1]] = int(parts[3])
    return counts


def run_one(config: nvme_bench.Config, folder: Path, tool: Path, ops: int,
            use_strace: bool) -> list[dict[str, object]]:
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "disk.img"
    with open(image, "wb") as f:
        f.truncate(nvme_bench.SIZE)
    out: list[dict[str, object]] = []
    try:
        with config.make(folder, image, tool, config.irq, config.shim) as guest:
            disk = nvme_bench.DISK
            guest(f"dd if=/dev/zero of={disk} bs=1M count=32 oflag=direct 2>/dev/null", 600)
            for mode in ("randread", "randwrite"):
                cmd = f"/bin/aio_qd -f {disk} -m {mode} -b 4096 -q 1 -n {ops} -s {32 << 20}"
                guest(cmd.replace(f"-n {ops}", "-n 200"), 300)  # warm up
                pids = {"server": guest.server_pid, "qemu": guest.qemu_pid}
                cpu0 = {k: cpu_seconds(p) for k, p in pids.items() if p}
                sw0 = switches(guest.server_pid) if guest.server_pid else (0, 0)
                text = guest(cmd, 900)
                cpu1 = {k: cpu_seconds(p) for k, p in pids.items() if p}
                sw1 = switches(guest.server_pid) if guest.server_pid else (0, 0)
                m = _NS_RE.search(text)
                assert m, text
                n = int(m[1])
                rec: dict[str, object] = {
                    "config": config.name, "mode": mode, "ops": n,
                    "loadavg": [round(x, 2) for x in os.getloadavg()],
                    "us_per_cmd": round(int(m[2]) / n / 1000, 1)}
                for k in cpu0:
                    rec[f"{k}_cpu_us"] = round((cpu1[k] - cpu0[k]) / n * 1e6, 1)
                if guest.server_pid:
                    rec["server_vol_switches"] = round((sw1[0] - sw0[0]) / n, 2)
                    rec["server_invol_switches"] = round((sw1[1] - sw0[1]) / n, 2)
                if use_strace and guest.server_pid:
                    trace = folder / f"strace-{mode}.txt"
                    with straced(guest.server_pid, trace):
                        guest(cmd, 900)
                    rec["syscalls_per_cmd"] = {
                        k: round(v / n, 2) for k, v in sorted(syscall_counts(trace).items())
                        if v / n >= 0.05}
                print(json.dumps(rec), flush=True)
                out.append(rec)
    finally:
        image.unlink(missing_ok=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="ours-intx,cpeer-intx,ours-msix,qemu-msix")
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--strace", action="store_true", help="also count the server's syscalls")
    args = ap.parse_args()
    names = [n for n in args.configs.split(",") if n]
    for n in names:
        if n not in nvme_bench.CONFIGS:
            ap.error(f"unknown configuration {n!r}")
    tool = nvme_bench.build_aio_qd()
    with tempfile.TemporaryDirectory(prefix="pyvfio-nvme-cost-") as tmp:
        for rep in range(args.reps):
            for name in names:
                run_one(nvme_bench.CONFIGS[name], Path(tmp) / f"{name}-{rep}", tool, args.ops,
                        args.strace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
