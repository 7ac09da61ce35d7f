"""Our server against its peers, in the same run: the figures of BENCHMARKS.md.

One command, one table. Every figure of ours is measured twice, with the C shim and with the
pure-Python path (``PYVFIO_NO_SHIM=1`` in the server's environment), and divided by its peer
measured in the same repetition; the table gives the medians and the median of the per-run
ratios. Peers: QEMU's own vfio-user server (``-machine x-remote,vfio-user=on`` plus an
``x-vfio-user-server`` object, libvfio-user inside) exporting QEMU's ``edu`` or ``nvme``;
QEMU's in-process ``nvme``; memcpy in the same process; the issue's RSS targets. Build the C
peer once with ``bash bench/build_c_peer.sh`` (or point ``$PYVFIO_CPEER`` at such a
``qemu-system-x86_64``); without it its columns are skipped with a message.

    python bench/run_all.py                       # everything, 3 repetitions
    python bench/run_all.py --only raw --reps 5   # only the raw-client round trips
    python bench/run_all.py --only nvme --nvme-configs ours-msix,qemu-msix
    python bench/run_all.py --short               # CI: proves every section still works

Sections (each repeated ``--reps`` times, servers interleaved within a repetition):

* ``raw``: round trip of a 4-byte REGION_READ / REGION_WRITE on edu's BAR0 offset 4 from a
  raw blocking client (bench/access_latency.py), each server freshly started; also the
  transport floor (a Python server that answers without decoding).
* ``guest``: a Linux guest (QEMU 11.1, TCG) runs bench/mmio_loop.c, which times trapped
  4-byte reads and writes of edu's BAR0 through ``resource0`` (writes posted, and again with
  ``x-no-posted-writes=on``); QEMU's in-process ``edu`` is the no-vfio-user note.
* ``memory``: VmRSS and PSS of the edu server idle, attached, and after the loop.
* ``nvme``: bench/nvme_bench.py: 4 KiB random reads and writes at QD1 and QD32 (IOPS) and
  128 KiB sequential reads and writes (MB/s) in a guest through bench/aio_qd.c (native AIO,
  O_DIRECT); ours with INTx against QEMU's x-vfio-user-server ``nvme`` (INTx: its MSI-X never
  fires with QEMU's client) and ours with MSI-X against QEMU's in-process ``nvme``, also with
  ``--polled-doorbells`` (``ours-msix-polled``); the same writeback cache mode on every side.
* ``dma``: bench/dma_bench.py: DmaAccessor reads and writes of 4 KiB, 128 KiB and 1 MiB
  against memcpy in the same process, through guarded copies and zero-copy views.
* ``rss``: bench/multi_device_rss.py: RSS idle with one edu device, and per extra device
  (idle, and with a client connected to each).

``--short`` (CI, no timing is asserted anywhere): one repetition, tiny counts, ours only (no C
peer), no edu guest loops, one NVMe guest (ours, MSI-X).

Output: one JSON line per figure and repetition, then the medians, then a markdown table.
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
import dma_bench  # noqa: E402
import nvme_bench  # noqa: E402

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
def server(argv: list[str], sock: str, env: dict[str, str] | None = None
           ) -> Iterator[subprocess.Popen[bytes]]:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
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
    """bench/mmio_loop.c built like the guest test programs (static, -O2), cached by hash."""
    from vfio_user_server.testing.guestprog import guest_program

    return guest_program("mmio_loop", source=HERE / "mmio_loop.c")


_LOOP_RE = re.compile(r"read_ns=(\d+) write_ns=(\d+) id=(0x[0-9a-f]+)")


# Slots of the guest section's devices (one guest holds them all, see guest_rep())
_SLOT0 = 0x10


def guest_rep(servers: dict[str, tuple[Callable[[str], list[str]], dict[str, str] | None]],
              tmp: str, loop: Path, n: int, rounds: int, rep: int) -> list[dict[str, Any]]:
    """One repetition of the guest section: ONE guest holding every edu under test.

    QEMU's in-process ``edu``, then for each server (ours with the shim, ours pure Python, the
    C peer) two devices: one with QEMU's default posted writes and one with
    ``x-no-posted-writes=on``, each served by its own process. ``mmio_loop -d BDF`` then times
    each device in turn, ``rounds`` times, the order rotated every round, and every round gives
    one figure per server (one record each). Timing every server inside the same guest takes
    the guest's boot-to-boot variation (up to 1.8x between boots of the same configuration on
    a quiet machine) out of the ratios: a round's figures are taken seconds apart in the same
    TCG guest. The memory figures are the posted-write server's: idle before the boot, attached
    after it, after the last round.
    """
    from vfio_user_server.testing.guest import QemuMachine, VfioUserDevice

    plan: list[tuple[str, str, str]] = [("qemu-in-process", "posted", "")]  # name, kind, sock
    for name in servers:
        for kind in ("posted", "sync"):
            plan.append((name, kind, os.path.join(tmp, f"{name}-{kind}-{rep}.sock")))
    slot = {key[:2]: _SLOT0 + i for i, key in enumerate(plan)}
    bdf = {key: f"0000:00:{s:02x}.0" for key, s in slot.items()}
    with contextlib.ExitStack() as stack:
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for name, kind, sock in plan[1:]:
            argv, env = servers[name]
            proc = stack.enter_context(server(argv(sock), sock, env))
            if kind == "posted":
                procs[name] = proc
        time.sleep(0.5)
        recs: dict[str, dict[str, Any]] = {
            name: {"bench": "guest", "rep": rep, "server": name, "read_ns": [],
                   "write_ns": [], "sync_write_ns": []} for name, _, _ in plan}
        for name, proc in procs.items():
            recs[name]["idle"] = memory_kib(proc.pid)
        devs = [VfioUserDevice(sock, props={"addr": f"{slot[(name, kind)]:#x}",
                                            **({"x-no-posted-writes": True}
                                               if kind == "sync" else {})})
                for name, kind, sock in plan[1:]]
        inproc = ["-device", f"edu,addr={_SLOT0:#x}"]
        # booted cold: the in-process reference must be on QEMU's command line
        with QemuMachine(sockets=devs, extra_args=inproc, files={"/bin/mmio_loop": loop},
                         cold_boot=True, name="bench") as vm:
            for name, proc in procs.items():
                recs[name]["attached"] = memory_kib(proc.pid)
            for rnd in range(rounds):
                shift = rnd % len(plan)
                for name, kind, _ in plan[shift:] + plan[:shift]:
                    res = vm.run(f"/bin/mmio_loop -d {bdf[(name, kind)]} -n {n}",
                                 timeout=600).check()
                    m = _LOOP_RE.search(res.output)
                    if not m:
                        raise RuntimeError(f"mmio_loop said: {res.output!r}")
                    check_id(m.group(3))
                    rec = recs[name]
                    if kind == "posted":
                        rec["read_ns"].append(int(m.group(1)))
                        rec["write_ns"].append(int(m.group(2)))
                    else:
                        rec["sync_write_ns"].append(int(m.group(2)))
            for name, proc in procs.items():
                recs[name]["after_loop"] = memory_kib(proc.pid)
    out: list[dict[str, Any]] = []
    for rnd in range(rounds):  # one record per server and round: the rows pair them by index
        for name, _, _ in plan:
            rec = dict(recs[name])
            for k in ("read_ns", "write_ns", "sync_write_ns"):
                rec[k] = rec[k][rnd] if rec[k] else None
            rec["round"] = rnd
            if rnd:
                for phase in ("idle", "attached", "after_loop"):
                    rec.pop(phase, None)
            out.append(rec)
    return out


def check_id(read: str) -> None:
    """Refuse a timing whose device did not answer edu's ID (a wrong BAR, a dead device)."""
    if int(read, 16) != EDU_ID:
        raise RuntimeError(f"mmio_loop read ID {read}, expected {EDU_ID:#010x}: the timing of "
                           "this run is refused")


def shim_env(shim: bool) -> dict[str, str]:
    """The server's environment: the C shim (the default) or the pure-Python path."""
    env = dict(os.environ)
    env.pop("PYVFIO_NO_SHIM", None)
    if not shim:
        env["PYVFIO_NO_SHIM"] = "1"
    return env


def rss_per_device(tmp: str, shim: bool, counts: tuple[int, int]) -> dict[str, float]:
    """RSS idle with ``counts[0]`` and ``counts[1]`` edu devices in one process (MiB), and the
    cost per extra device, idle and with a client on each (bench/multi_device_rss.py)."""
    import multi_device_rss

    saved = os.environ.get("PYVFIO_NO_SHIM")
    os.environ.pop("PYVFIO_NO_SHIM", None)
    if not shim:
        os.environ["PYVFIO_NO_SHIM"] = "1"
    try:
        a, b = (multi_device_rss.measure(n, "edu", Path(tempfile.mkdtemp(dir=tmp)))
                for n in counts)
    finally:
        os.environ.pop("PYVFIO_NO_SHIM", None)
        if saved is not None:
            os.environ["PYVFIO_NO_SHIM"] = saved
    extra = counts[1] - counts[0]

    def kib(rec: dict[str, object], key: str) -> int:
        return int(str(rec[key]))

    return {"idle": kib(a, "rss_idle_kib") / 1024,
            "per_device_idle": (kib(b, "rss_idle_kib") - kib(a, "rss_idle_kib")) / extra / 1024,
            "per_device_connected":
                (kib(b, "rss_connected_kib") - kib(a, "rss_connected_kib")) / extra / 1024}


# --------------------------------------------------------------------------------------------
# The table: every figure of ours (C shim and pure Python) against its peer of the same run


class Row:
    """One measurement: per-run values of ours with the shim, without it, and of the peer."""

    def __init__(self, label: str, unit: str, peer: str, note: str = "") -> None:
        self.label, self.unit, self.peer, self.note = label, unit, peer, note
        self.runs: dict[str, list[float | None]] = {"shim": [], "python": [], "peer": []}

    def add(self, column: str, value: float | None) -> None:
        """One run's value; None keeps the run's place (a run without a figure, e.g. a
        server that stalled), so that runs stay paired by position."""
        self.runs.setdefault(column, []).append(value)

    def values(self, column: str) -> list[float]:
        return [v for v in self.runs[column] if v is not None]

    def median(self, column: str) -> float | None:
        v = self.values(column)
        return statistics.median(v) if v else None

    def ratio(self, column: str) -> float | None:
        """Median of the per-run ratios ours / peer (runs paired by position)."""
        ours, peer = self.values(column), self.values("peer")
        if not ours or not peer:
            return None
        if len(self.runs["peer"]) == 1:
            return statistics.median(ours) / peer[0] if peer[0] else None
        pairs = [a / b for a, b in zip(self.runs[column], self.runs["peer"], strict=False)
                 if a is not None and b]
        return statistics.median(pairs) if pairs else None


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown(rows: list[Row]) -> str:
    lines = ["| measurement | unit | ours, C shim | ours, pure Python | peer | peer | "
             "shim / peer | Python / peer | note |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        ratios = [r.ratio(c) for c in ("shim", "python")]
        lines.append(f"| {r.label} | {r.unit} | {fmt(r.median('shim'))} | "
                     f"{fmt(r.median('python'))} | {r.peer} | {fmt(r.median('peer'))} | "
                     + " | ".join(f"{x:.2f}" if x is not None else "—" for x in ratios)
                     + f" | {r.note} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Driver

SECTIONS = ("raw", "guest", "memory", "nvme", "dma", "rss")


def med(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each measurement")
    ap.add_argument("-n", type=int, default=20000, help="accesses per raw-client measurement")
    ap.add_argument("--guest-n", type=int, default=5000, help="accesses per guest loop")
    ap.add_argument("--guest-rounds", type=int, default=3,
                    help="loops per device and repetition, in the one guest of a repetition")
    ap.add_argument("--nvme-ops", type=int, default=2000,
                    help="4 KiB requests per NVMe figure (128 KiB: an eighth)")
    ap.add_argument("--nvme-configs", default=",".join(nvme_bench.CONFIGS),
                    help="NVMe configurations, run in this order each repetition")
    ap.add_argument("--short", action="store_true",
                    help="prove the benchmark works (CI): one repetition of everything but "
                         "the edu guest loops, tiny counts, ours only (no C peer), one NVMe "
                         "guest (ours, MSI-X)")
    ap.add_argument("--markdown", help="also write the markdown table to this file")
    args = ap.parse_args()
    want = set(args.only.split(","))
    unknown = want - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    nvme_names = [n for n in args.nvme_configs.split(",") if n]
    for n in nvme_names:
        if n not in nvme_bench.CONFIGS:
            ap.error(f"unknown NVMe configuration {n!r}")
    cpeer = cpeer_binary()
    if args.short:
        args.reps, args.n, args.nvme_ops = 1, 300, 48
        want.discard("guest")
        want.discard("memory")
        cpeer = None
        nvme_names = ["ours-msix"]
    emit: Callable[[dict[str, Any]], None] = lambda rec: print(json.dumps(rec), flush=True)  # noqa: E731
    if cpeer is None and not args.short:
        print("# C peer not built: skipping its columns (run `bash bench/build_c_peer.sh` or set "
              "PYVFIO_CPEER)", file=sys.stderr, flush=True)
    if cpeer is None:
        nvme_names = [n for n in nvme_names if n != "cpeer-intx"]
    tmp = tempfile.mkdtemp(prefix="pyvfio-bench-")
    # ours with the C shim, ours with the pure-Python path, the C peer: each its own server
    servers: dict[str, tuple[Callable[[str], list[str]], dict[str, str] | None]] = {
        "shim": (ours_argv, shim_env(True)), "python": (ours_argv, shim_env(False))}
    if cpeer is not None:
        binary = cpeer
        servers["peer"] = (lambda sock: cpeer_argv(binary, sock), None)
    emit({"bench": "env", "nproc": os.cpu_count(), "loadavg": os.getloadavg(),
          "python": sys.version.split()[0], "c_peer": str(cpeer) if cpeer else None,
          "short": args.short})
    rows: dict[str, Row] = {}
    cpeer_label = "QEMU x-vfio-user-server edu (C)"

    def row(key: str, unit: str, peer: str, note: str = "") -> Row:
        if key not in rows:
            rows[key] = Row(key, unit, peer, note)
        return rows[key]

    try:
        # NVMe first: the longest section and the one issue 8's NVMe targets are read from
        if "nvme" in want and nvme_names:
            tool = nvme_bench.build_aio_qd()
            results: dict[str, dict[str, list[float | None]]] = {n: {} for n in nvme_names}
            for rep in range(args.reps):
                for name in nvme_names:
                    config = nvme_bench.CONFIGS[name]
                    stalled = None
                    try:
                        figures = nvme_bench.run_config(
                            config, Path(tmp) / f"nvme-{name}-{rep}", args.nvme_ops, tool)
                    except nvme_bench.Stalled as e:
                        # this run has no figure from here on; the table goes on
                        figures, stalled = e.figures, e.key
                        print(f"run_all: {name}, run {rep + 1}: {e}", file=sys.stderr)
                    emit({"bench": "nvme", "rep": rep, "config": name, "irq": config.irq,
                          "shim": config.shim, **{k: round(v, 1) for k, v in figures.items()},
                          **({"stalled": stalled} if stalled else {})})
                    for w in nvme_bench.WORKLOADS:  # None: no figure (stalled, or after)
                        results[name].setdefault(w.key, []).append(figures.get(w.key))
            # (row suffix, peer, our configurations by column); polled doorbells: shim only
            nvme_rows = (
                ("INTX", "cpeer-intx", {"shim": "ours-intx", "python": "ours-intx-py"}),
                ("MSIX", "qemu-msix", {"shim": "ours-msix", "python": "ours-msix-py"}),
                ("MSIX, polled doorbells", "qemu-msix", {"shim": "ours-msix-polled"}))
            for w in nvme_bench.WORKLOADS:
                for suffix, peer_name, mine in nvme_rows:
                    if not any(m in results for m in mine.values()):
                        continue
                    peer_label = nvme_bench.CONFIGS[peer_name].label
                    # QEMU's C server drops INTx edges when completions overlap (BENCHMARKS.md,
                    # "QEMU's C server at QD32 with INTx"): its QD32 figures are not a peer's
                    note = ("C server stalls: lost INTx edges" if peer_name == "cpeer-intx"
                            and w.qd > 1 else "")
                    for cname in (peer_name, *mine.values()):
                        lost = results.get(cname, {}).get(w.key, []).count(None)
                        if lost:
                            note = "; ".join(filter(None, (note, (
                                f"{cname}: no figure in {lost} of "
                                f"{args.reps} runs (stalled or after a stall)"))))
                    r = row(f"NVMe {w.key.replace('_', ' ')}, {suffix}", w.unit,
                            peer_label if peer_name in results else "(not run)", note)
                    for col, cname in mine.items():
                        for x in results.get(cname, {}).get(w.key, []):
                            r.add(col, x)
                    for x in results.get(peer_name, {}).get(w.key, []):
                        r.add("peer", x)
        if "raw" in want:
            for rep in range(args.reps):
                floor = raw_floor(tmp, args.n)
                emit({"bench": "raw", "rep": rep, "server": "floor", **floor})
                for name, (argv, env) in servers.items():
                    sock = os.path.join(tmp, f"{name}.sock")
                    with server(argv(sock), sock, env):
                        res = raw_once(sock, args.n)
                    emit({"bench": "raw", "rep": rep, "server": name, "n": args.n,
                          "read_us": round(res["read"], 2), "write_us": round(res["write"], 2)})
                    for op in ("read", "write"):
                        row(f"raw client REGION_{op.upper()} round trip", "us",
                            cpeer_label).add(name, res[op])
                for op in ("read", "write"):
                    r = rows[f"raw client REGION_{op.upper()} round trip"]
                    r.runs.setdefault("floor", []).append(floor[op])
                    r.note = f"Python echo floor {med(r.values('floor'))} us"
        if "guest" in want or "memory" in want:
            loop = build_mmio_loop()
            for rep in range(args.reps):
                recs = guest_rep(servers, tmp, loop, args.guest_n, args.guest_rounds, rep)
                for rec in recs:
                    emit(rec)
                for rec in recs:
                    name = rec["server"]
                    if "guest" in want and name != "qemu-in-process":
                        for k, title in (("read_ns", "read"),
                                         ("write_ns", "write, posted (QEMU default)"),
                                         ("sync_write_ns", "write, x-no-posted-writes=on")):
                            r = row(f"guest trapped edu BAR0 {title}", "us", cpeer_label)
                            r.add(name, rec[k] / 1000)
                    elif "guest" in want:
                        for k, title in (("read_ns", "read"),
                                         ("write_ns", "write, posted (QEMU default)")):
                            r = row(f"guest trapped edu BAR0 {title}", "us", cpeer_label)
                            r.runs.setdefault("inproc", []).append(rec[k] / 1000)
                            r.note = f"QEMU in-process edu {med(r.values('inproc'))} us"
                for rec in recs:
                    if "memory" in want and "idle" in rec:
                        for phase in ("idle", "attached", "after_loop"):
                            for k, v in (rec.get(phase) or {}).items():
                                row(f"edu server {k.split('_')[0].upper()} "
                                    f"{phase.replace('_', ' ')}", "MiB",
                                    cpeer_label).add(rec["server"], v / 1024)
        if "dma" in want:
            dma = dma_bench.measure(0.02 if args.short else 0.25, args.reps)
            for fig, s in dma.items():
                emit({"bench": "dma", "what": fig, **{k: [round(x) for x in v]
                                                      for k, v in s.items()}})
                r = row(fig, "MB/s", "memcpy, same process")
                for col in ("shim", "python"):
                    for x in s.get(col, []):
                        r.add(col, x)
                for x in s["memcpy"]:
                    r.add("peer", x)
        if "rss" in want:
            counts = (1, 3) if args.short else (1, 11)
            for rep in range(args.reps):
                for col, shim in (("shim", True), ("python", False)):
                    res3 = rss_per_device(tmp, shim, counts)
                    emit({"bench": "rss", "rep": rep, "server": col, "devices": counts,
                          **{k: round(v, 3) for k, v in res3.items()}})
                    row("RSS idle, one edu device", "MiB", "target", "target < 40 MiB"
                        ).add(col, res3["idle"])
                    row(f"RSS per extra edu device, idle ({counts[1]} vs {counts[0]})", "MiB",
                        "target", "target < 2 MiB").add(col, res3["per_device_idle"])
                    row(f"RSS per extra edu device, client connected ({counts[1]} vs "
                        f"{counts[0]})", "MiB", "target", "target < 2 MiB"
                        ).add(col, res3["per_device_connected"])
            for key, target in (("RSS idle, one edu device", 40.0),):
                rows[key].add("peer", target)
            for key in list(rows):
                if key.startswith("RSS per extra"):
                    rows[key].add("peer", 2.0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for r in rows.values():
        emit({"bench": "median", "what": r.label, "unit": r.unit, "peer_name": r.peer,
              **{c: r.median(c) for c in ("shim", "python", "peer")},
              "shim_ratio": r.ratio("shim"), "python_ratio": r.ratio("python")})
    table = markdown(list(rows.values()))
    print(f"\n{table}\n\n(medians of {args.reps} interleaved runs; ratios are medians of the "
          f"per-run ratios; load average at the end "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())})")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
