"""The long fuzz run: a million inputs (or more) into the reader, the session and the endpoint.

Coverage-guided, with atheris (libFuzzer for Python, from PyPI: ``pip install atheris`` or
``pip install -e '.[fuzz]'``). Each target runs in its own process, instrumented, on inputs
turned into QEMU-shaped messages by tests/fuzzing.py (the builder the hypothesis tests use)::

    python tests/fuzz_long.py                          # 10^6 inputs per target, all three
    python tests/fuzz_long.py --runs 200000 --targets endpoint
    python tests/fuzz_long.py --markdown out.md        # also the table for docs/reliability.md

Targets: ``reader`` (valid messages cut anywhere, with noise: the same messages or a
ProtocolError), ``session`` (the state table under any commands and capabilities),
``endpoint`` (a sequence of requests with fds into a fresh endpoint: never an exception, a reply
exactly when NO_REPLY is clear, no fd leaked). A crash is any other exception (libFuzzer stops
and saves the input under the artifacts folder); a hang is an input that runs longer than
``--timeout`` seconds. The summary gives inputs, crashes, hangs, time and rate per target, and
how many endpoint inputs reached and completed each command's handler.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGETS = ("reader", "session", "endpoint")


def child(target: str, runs: int, stats_path: str, fuzzer_args: list[str]) -> None:
    """Run one target under libFuzzer in this process (never returns)."""
    import atheris  # the long mode's only extra dependency

    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["vfio_user_server", "fuzzing"]):
        import fuzzing

        from vfio_user_server.protocol.constants import Command
        from vfio_user_server.sample import SampleDevice

    logging.disable(logging.CRITICAL)  # every bad input logs a warning: keep the run quiet
    device = SampleDevice()
    counter = fuzzing.HandlerCounter().install() if target == "endpoint" else None
    done = 0

    def one(data: bytes) -> None:
        nonlocal done
        src = fuzzing.BytesSource(atheris.FuzzedDataProvider(data))
        if target == "endpoint":
            state, messages = fuzzing.build_session(src)
            fuzzing.check_endpoint(device, state, messages)
        elif target == "reader":
            messages = [fuzzing.build_message(src) for _ in range(src.number(1, 5))]
            cuts = [src.number(0, 600) for _ in range(src.number(0, 8))]
            noise = src.blob(24) if fuzzing.rare(src, 4) else b""
            fuzzing.check_reader(messages, cuts, noise, src.number(0, 600),
                                 fuzzing.pick(src, [1 << 16, 1 << 16, 64]))
        else:
            cmds = [int(fuzzing.pick(src, list(Command))) if src.number(0, 3)
                    else src.number(0, 0xFFFF) for _ in range(src.number(0, 12))]
            caps = [{"max_msg_fds": src.number(-2, 2048),
                     "max_data_xfer_size": src.number(0, 1 << 21)}
                    for _ in range(src.number(0, 2))]
            fuzzing.check_session(cmds, caps)
        done += 1
        if done == runs or done % 50000 == 0:
            stats: dict[str, Any] = {"inputs": done}
            if counter is not None:
                stats["reached"] = dict(counter.reached)
                stats["completed"] = dict(counter.completed)
            Path(stats_path).write_text(json.dumps(stats))

    atheris.Setup([sys.argv[0], *fuzzer_args], one)
    atheris.Fuzz()


_DONE = re.compile(r"Done (\d+) runs in (\d+) second|stat::number_of_executed_units: (\d+)")


def run_target(target: str, runs: int, timeout: int, workdir: Path) -> dict[str, Any]:
    stats = workdir / f"{target}.json"
    artifacts = workdir / f"{target}-artifacts"
    artifacts.mkdir(exist_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", target,
            "--runs", str(runs), "--stats", str(stats), "--",
            f"-runs={runs}", f"-timeout={timeout}", "-rss_limit_mb=4096",
            f"-artifact_prefix={artifacts}/", "-print_final_stats=1", "-max_len=4096"]
    t0 = time.monotonic()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace", check=False)
    elapsed = time.monotonic() - t0
    out = proc.stdout
    (workdir / f"{target}.log").write_text(out)
    hangs = len(re.findall(r"ERROR: libFuzzer: timeout|ALARM: working on the last Unit", out))
    hangs = min(hangs, 1)
    crashed = proc.returncode != 0 and not hangs
    seen: dict[str, Any] = json.loads(stats.read_text()) if stats.exists() else {}
    m = _DONE.search(out)
    inputs = int(m.group(1) or m.group(3)) if m else int(seen.get("inputs", 0))
    result = {
        "target": target, "inputs": inputs, "crashes": int(crashed), "hangs": hangs,
        "seconds": round(elapsed, 1), "rate_per_s": round(inputs / elapsed) if elapsed else 0,
        "returncode": proc.returncode, "artifacts": sorted(p.name for p in artifacts.iterdir()),
    }
    if "reached" in seen:
        result["reached"] = seen["reached"]
        result["completed"] = seen["completed"]
    if proc.returncode != 0:
        result["tail"] = out[-3000:]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1_000_000, help="inputs per target (10^6)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets")
    ap.add_argument("--timeout", type=int, default=10, help="seconds before an input is a hang")
    ap.add_argument("--workdir", help="logs, stats and crash inputs (default: a temp folder)")
    ap.add_argument("--markdown", help="also write the summary table to this file")
    ap.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    ap.add_argument("fuzzer_args", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.runs, args.stats, args.fuzzer_args)
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pyvfio-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for target in args.targets.split(","):
        res = run_target(target, args.runs, args.timeout, workdir)
        print(json.dumps({k: v for k, v in res.items() if k != "tail"}), flush=True)
        if "tail" in res:
            print(res["tail"], file=sys.stderr)
        results.append(res)
    lines = ["| target | inputs | crashes | hangs | time | rate |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['target']} | {r['inputs']:,} | {r['crashes']} | {r['hangs']} | "
                     f"{r['seconds']:.0f} s | {r['rate_per_s']:,}/s |")
    for r in results:
        if "reached" in r:
            counts = ", ".join(f"{k} {v}/{r['completed'].get(k, 0)}"
                               for k, v in sorted(r["reached"].items()))
            lines.append(f"\nendpoint inputs reaching/completing each handler: {counts}")
    table = "\n".join(lines)
    print(f"\n{table}\n(logs in {workdir}; {os.cpu_count()} CPUs, load "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())})")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 1 if any(r["crashes"] or r["hangs"] or r["returncode"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
