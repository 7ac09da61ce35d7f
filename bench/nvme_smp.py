"""NVMe with a 2-vCPU guest: two I/O queue pairs (Linux makes one per CPU), served at once.

Boots our server (MSI-X, C shim) under a guest with ``--smp`` vCPUs and runs ``bench/aio_qd.c``
4 KiB random reads: once as one process at QD32 (one queue: the CPU it runs on), and once as
one process per vCPU at QD32/vCPUs each, pinned with ``taskset`` (every queue busy), printing
IOPS, the hardware queues the guest's driver made, and the server's CPU time per command.
``--tree DIR`` runs the server from another checkout (a before/after comparison; interleave
the runs, the machine's load moves the figures more than the change does).

    python bench/nvme_smp.py [--smp 2] [--ops 4000] [--tree /tmp/main-copy] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from nvme_bench import DISK, SERIAL, SIZE, build_aio_qd  # noqa: E402
from nvme_cost import cpu_seconds  # noqa: E402

_AIO = re.compile(r"iops=([0-9.]+)")


def run_once(tree: str | None, smp: int, ops: int, tool: Path) -> dict[str, float]:
    from run_all import server

    from vfio_user_server.testing.guest import QemuMachine, VfioUserDevice
    from vfio_user_server.testing.provision import provision

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="nvme-smp-") as d:
        work = Path(d)
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.truncate(SIZE)
        sock = str(work / "ours.sock")
        env = dict(os.environ)
        env.pop("PYVFIO_NO_SHIM", None)
        if tree:
            env["PYTHONPATH"] = f"{tree}:{tree}/devices"
        argv = [sys.executable, "-m", "vfio_user_server.cli", "--socket", sock, "--log-level",
                "WARNING", "nvme", "--image", str(image), "--serial", SERIAL]
        with server(argv, sock, env=env) as proc, QemuMachine(
                provision(), sockets=[VfioUserDevice(sock)], modules=["nvme"], workdir=work,
                cold_boot=True, smp=smp, files={"/bin/aio_qd": tool},
                name=f"bench-nvme-smp{smp}") as m:
            def run(cmd: str, timeout: float = 900) -> str:
                return m.run(cmd, timeout, check=True).output

            run(f"for i in $(seq 300); do [ -b {DISK} ] && break; sleep 0.1; done; "
                f"[ -b {DISK} ]", 60)
            out["hw_queues"] = float(run("ls /sys/block/nvme0n1/mq | wc -l").strip())
            run(f"dd if=/dev/zero of={DISK} bs=1M count=32 oflag=direct 2>/dev/null")
            base = f"/bin/aio_qd -f {DISK} -m randread -b 4096 -s {32 << 20}"
            t0 = cpu_seconds(proc.pid)
            text = run(f"{base} -q 32 -n {ops}")
            t1 = cpu_seconds(proc.pid)
            out["qd32_one_process"] = float(_AIO.findall(text)[0])
            out["server_us_per_cmd_one"] = (t1 - t0) * 1e6 / ops
            per = 32 // smp
            jobs = " ".join(f"taskset -c {cpu} {base} -q {per} -n {ops // smp} > /tmp/o{cpu} &"
                            for cpu in range(smp))
            t0 = cpu_seconds(proc.pid)
            text = run(f"{jobs} wait; cat " + " ".join(f"/tmp/o{c}" for c in range(smp)))
            t1 = cpu_seconds(proc.pid)
            rates = [float(x) for x in _AIO.findall(text)]
            if len(rates) != smp:
                raise RuntimeError(f"aio_qd said: {text!r}")
            out["qd32_per_cpu_sum"] = sum(rates)
            out["server_us_per_cmd_all"] = (t1 - t0) * 1e6 / (ops // smp * smp)
            out["server_threads"] = float(len(os.listdir(f"/proc/{proc.pid}/task")))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smp", type=int, default=2)
    p.add_argument("--ops", type=int, default=4000)
    p.add_argument("--tree", action="append", default=[],
                   help="a checkout to run the server from (repeat; 'here' for this one)")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    tool = build_aio_qd()
    trees = args.tree or ["here"]
    for r in range(args.rounds):
        for tree in trees:
            res = run_once(None if tree == "here" else tree, args.smp, args.ops, tool)
            print(f"round {r} {tree}: " + " ".join(f"{k}={v:.1f}" for k, v in res.items()),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
