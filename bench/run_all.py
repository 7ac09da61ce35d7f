"""Our server against a C peer, in the same run: the figures of BENCHMARKS.md.

The C peer is QEMU's own vfio-user server (``-machine x-remote,vfio-user=on`` plus an
``x-vfio-user-server`` object, libvfio-user inside) exporting QEMU's ``edu`` device; ours is
``vfio-user-server edu`` (devices/edu.py). Build the peer once with ``bash
bench/build_c_peer.sh`` (or point ``$PYVFIO_CPEER`` at such a ``qemu-system-x86_64``); without
it the C columns are skipped with a message.

    python bench/run_all.py                       # everything, 3 repetitions, medians
    python bench/run_all.py --only raw --reps 5   # only the raw-client round trips
    python bench/run_all.py --only guest,memory

Benchmarks (each repeated ``--reps`` times, servers interleaved, the median reported):

* ``raw``: round trip of a 4-byte REGION_READ / REGION_WRITE on BAR0 offset 4 (liveness)
  from a raw blocking client (bench/access_latency.py), each server freshly started; also the
  transport floor (a Python server that answers without decoding).
* ``guest``: a Linux guest (QEMU 11.1, TCG, from ``vfio_user_server.testing.provision``) runs
  bench/mmio_loop.c, which times trapped 4-byte reads and writes of BAR0 through
  ``resource0``; plus QEMU's in-process ``edu`` (``-device edu`` in the guest's own QEMU) as
  the no-vfio-user reference.
* ``memory``: VmRSS and PSS of the server process idle (before a client), and after the
  guest attached and ran the loop.

Output: one JSON line per figure (each repetition, then the medians), then a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import access_latency  # noqa: E402

from vfio_user_server.testing.provision import cache_root  # noqa: E402

OFFSET = 4  # edu's liveness register: readable and writable on both servers
#: What edu's identification register (BAR0 0x00) reads on every server (QEMU's and ours):
#: mmio_loop prints the last value it read, and a timing whose ID is wrong is refused.
EDU_ID = 0x010000ED


# --------------------------------------------------------------------------------------------
# Servers


def cpeer_binary() -> Path | None:
    env = os.environ.get("PYVFIO_CPEER")
    if env:
        return Path(env) if Path(env).is_file() else None
    path = cache_root() / "c-peer" / "build" / "qemu-system-x86_64"
    stamp = cache_root() / "c-peer" / "stamp"
    return path if path.is_file() and stamp.is_file() else None


def ours_argv(sock: str) -> list[str]:
    return [sys.executable, "-m", "vfio_user_server.cli", "--socket", sock,
            "--log-level", "WARNING", "edu"]


def cpeer_argv(binary: Path, sock: str) -> list[str]:
    obj = {"qom-type": "x-vfio-user-server", "id": "vfuobj0",
           "socket": {"type": "unix", "path": sock}, "device": "edu0"}
    return [str(binary), "-machine", "x-remote,vfio-user=on", "-nodefaults", "-display", "none",
            "-device", "edu,id=edu0", "-object", json.dumps(obj)]


@contextlib.contextmanager
def server(argv: list[str], sock: str) -> Iterator[subprocess.Popen[bytes]]:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(800):
            if os.path.exists(sock):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited with {proc.returncode} before listening")
            time.sleep(0.025)
        else:
            raise RuntimeError(f"{argv[0]} did not create {sock}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def memory_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, key in (("status", "VmRSS"), ("smaps_rollup", "Pss")):
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{pid}/{name}").read_text()
            m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
            if m:
                out["rss_kib" if key == "VmRSS" else "pss_kib"] = int(m.group(1))
    return out


# --------------------------------------------------------------------------------------------
# Benchmarks


def raw_once(path: str, n: int) -> dict[str, float]:
    ns = argparse.Namespace(offset=OFFSET, bar=0, n=n)
    return access_latency.measure(path, ns)


def raw_floor(tmp: str, n: int) -> dict[str, float]:
    sock = os.path.join(tmp, "floor.sock")
    argv = [sys.executable, str(HERE / "access_latency.py"), "--floor-server", sock]
    with server(argv, sock):
        return raw_once(sock, n)


def build_mmio_loop() -> Path:
    """Compile bench/mmio_loop.c like the guest test programs (static, -O2), cached by hash."""
    import hashlib

    from vfio_user_server.testing.guestprog import CFLAGS, is_static_elf

    src = HERE / "mmio_loop.c"
    key = hashlib.sha256(src.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out = cache_root() / "guest-programs" / f"mmio_loop-{key}" / "mmio_loop"
    if out.is_file() and is_static_elf(out.read_bytes()):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("PYVFIO_CC", "gcc")
    subprocess.run([cc, *CFLAGS, "-o", str(out), str(src)], check=True)
    return out


_LOOP_RE = re.compile(r"read_ns=(\d+) write_ns=(\d+) id=(0x[0-9a-f]+)")


def guest_session(sockets: list[str], extra_args: list[str], loop: Path, n: int, runs: int,
                  server_pid: int | None, props: dict[str, Any] | None = None) -> dict[str, Any]:
    """Boot a guest, run mmio_loop ``runs`` times; server memory after attach and after."""
    from vfio_user_server.testing.guest import QemuMachine, VfioUserDevice

    devs = [VfioUserDevice(s, props=props or {}) for s in sockets]
    result: dict[str, Any] = {"read_ns": [], "write_ns": []}
    with QemuMachine(sockets=devs, extra_args=extra_args, files={"/bin/mmio_loop": loop},
                     name="bench") as vm:
        if server_pid is not None:
            result["attached"] = memory_kib(server_pid)
        for _ in range(runs):
            res = vm.run(f"/bin/mmio_loop -n {n}", timeout=600).check()
            m = _LOOP_RE.search(res.output)
            if not m:
                raise RuntimeError(f"mmio_loop said: {res.output!r}")
            check_id(m.group(3))
            result["read_ns"].append(int(m.group(1)))
            result["write_ns"].append(int(m.group(2)))
            result["id"] = m.group(3)
        if server_pid is not None:
            result["after_loop"] = memory_kib(server_pid)
    return result


def check_id(read: str) -> None:
    """Refuse a timing whose device did not answer edu's ID (a wrong BAR, a dead device)."""
    if int(read, 16) != EDU_ID:
        raise RuntimeError(f"mmio_loop read ID {read}, expected {EDU_ID:#010x}: the timing of "
                           "this run is refused")


# --------------------------------------------------------------------------------------------
# Driver


def med(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="raw,guest,memory",
                    help="comma-separated subset of raw,guest,memory (memory needs a guest)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each measurement")
    ap.add_argument("-n", type=int, default=20000, help="accesses per raw-client measurement")
    ap.add_argument("--guest-n", type=int, default=5000, help="accesses per guest loop")
    ap.add_argument("--markdown", help="also write the markdown table to this file")
    args = ap.parse_args()
    want = set(args.only.split(","))
    cpeer = cpeer_binary()
    emit: Callable[[dict[str, Any]], None] = lambda rec: print(json.dumps(rec), flush=True)  # noqa: E731
    if cpeer is None:
        print("# C peer not built: skipping its columns (run `bash bench/build_c_peer.sh` or set "
              "PYVFIO_CPEER)", file=sys.stderr, flush=True)
    tmp = tempfile.mkdtemp(prefix="pyvfio-bench-")
    peers: dict[str, Callable[[str], list[str]]] = {"ours": ours_argv}
    if cpeer is not None:
        binary = cpeer
        peers["c"] = lambda sock: cpeer_argv(binary, sock)
    emit({"bench": "env", "nproc": os.cpu_count(), "loadavg": os.getloadavg(),
          "python": sys.version.split()[0], "c_peer": str(cpeer) if cpeer else None})
    rows: list[tuple[str, str, float | None, float | None, str]] = []

    def row(label: str, unit: str, ours: float | None, c: float | None, extra: str = "",
            pairs: tuple[list[float], list[float]] | None = None) -> None:
        """One result; ``pairs`` (ours, C per run) adds the median of the per-run ratios."""
        paired = None
        if pairs is not None and pairs[1]:
            paired = med([a / b for a, b in zip(*pairs, strict=True)])
            extra = f"{extra}; per-run ratio median {paired:.2f}".lstrip("; ")
        rows.append((label, unit, ours, c, extra))
        emit({"bench": "median", "what": label, "unit": unit, "ours": ours, "c": c,
              "ratio": round(ours / c, 2) if ours is not None and c else None,
              "paired_ratio": paired})

    try:
        if "raw" in want:
            samples: dict[str, dict[str, list[float]]] = {
                k: {"read": [], "write": []} for k in ("floor", *peers)}
            for rep in range(args.reps):
                for name in ("floor", *peers):
                    if name == "floor":
                        res = raw_floor(tmp, args.n)
                    else:
                        sock = os.path.join(tmp, f"{name}.sock")
                        with server(peers[name](sock), sock):
                            res = raw_once(sock, args.n)
                    emit({"bench": "raw", "rep": rep, "server": name, "n": args.n,
                          "read_us": round(res["read"], 2), "write_us": round(res["write"], 2)})
                    for op in ("read", "write"):
                        samples[name][op].append(res[op])
            for op in ("read", "write"):
                c = med(samples["c"][op]) if "c" in samples else None
                row(f"raw client REGION_{op.upper()} round trip", "us",
                    med(samples["ours"][op]), c, f"floor {med(samples['floor'][op])} us",
                    (samples["ours"][op], samples["c"][op]) if "c" in samples else None)
        if "guest" in want or "memory" in want:
            loop = build_mmio_loop()
            g: dict[str, dict[str, list[float]]] = {}
            for rep in range(args.reps):
                for name in ("qemu-in-process", *peers):
                    if name == "qemu-in-process":
                        res2 = guest_session([], ["-device", "edu"], loop, args.guest_n, 1, None)
                        idle: dict[str, int] = {}
                        # x-no-posted-writes is a vfio-user-pci property: there is no such
                        # reference in process (its writes are the posted row's figure)
                        sync_write = None
                    else:
                        sock = os.path.join(tmp, f"{name}.sock")
                        with server(peers[name](sock), sock) as proc:
                            time.sleep(0.5)
                            idle = memory_kib(proc.pid)
                            res2 = guest_session([sock], [], loop, args.guest_n, 1, proc.pid)
                        # Again with QEMU's posted writes off: each write waits for its reply.
                        with server(peers[name](sock), sock) as proc:
                            sync = guest_session([sock], [], loop, args.guest_n, 1, None,
                                                 {"x-no-posted-writes": True})
                        sync_write = sync["write_ns"][0]
                    rec = {"bench": "guest", "rep": rep, "server": name, "n": args.guest_n,
                           "read_ns": res2["read_ns"][0], "write_ns": res2["write_ns"][0],
                           "sync_write_ns": sync_write,
                           "id": res2.get("id"), "idle": idle,
                           "attached": res2.get("attached"), "after_loop": res2.get("after_loop")}
                    emit(rec)
                    s = g.setdefault(name, {})
                    for k in ("read_ns", "write_ns", "sync_write_ns"):
                        if rec[k] is not None:
                            s.setdefault(k, []).append(rec[k])
                    for phase in ("idle", "attached", "after_loop"):
                        for k, v in (rec.get(phase) or {}).items():
                            s.setdefault(f"{phase}_{k}", []).append(v)
            if "guest" in want:
                for op, title in (("read", "read"), ("write", "write, posted (QEMU default)"),
                                  ("sync_write", "write, x-no-posted-writes=on")):
                    key = f"{op}_ns"
                    c = med(g["c"][key]) if "c" in g else None
                    ref = g["qemu-in-process"].get(key)
                    note = (f"in-process edu {round(med(ref) / 1000, 2)} us" if ref
                            else "in-process edu n/a (no vfio-user writes to post)")
                    row(f"guest trapped BAR0 {title}", "us",
                        round(med(g["ours"][key]) / 1000, 2),
                        round(c / 1000, 2) if c is not None else None,
                        note, (g["ours"][key], g["c"][key]) if "c" in g else None)
            if "memory" in want:
                for phase in ("idle", "attached", "after_loop"):
                    for k in ("rss_kib", "pss_kib"):
                        key = f"{phase}_{k}"
                        c = med(g["c"][key]) if "c" in g and key in g["c"] else None
                        mine = med(g["ours"][key]) if key in g["ours"] else None
                        row(f"server {k.split('_')[0].upper()} {phase.replace('_', ' ')}", "MiB",
                            round(mine / 1024, 1) if mine is not None else None,
                            round(c / 1024, 1) if c is not None else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = ["| measurement | ours | C peer (QEMU x-vfio-user-server) | ours / C | note |",
             "| --- | ---: | ---: | ---: | --- |"]
    for label, unit, ours, c, extra in rows:
        ratio = f"{ours / c:.2f}" if ours is not None and c else "—"
        lines.append(f"| {label} | {ours} {unit} | "
                     f"{f'{c} {unit}' if c is not None else 'skipped (C peer not built)'} | "
                     f"{ratio} | {extra} |")
    table = "\n".join(lines)
    print(f"\n{table}\n(medians of {args.reps} runs; load average at the end "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())})")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
