"""Per-test wall time of a user's own guest test: restored from a snapshot vs booted cold.

Writes a 20-line device and a test file with ``--tests`` guest tests (each: the plugin's
``guest`` fixture with the device, a command in the guest that finds it and reads a register
through its BAR, teardown) into a temporary folder, runs pytest there as a user would, once
per mode, and reports each test's wall time (setup + call + teardown, from pytest's JUnit XML)::

    python bench/guest_tests.py                  # restore vs cold, 8 tests each
    python bench/guest_tests.py --modes restore --tests 20 --workers 2   # pytest-xdist

The first test of a restore run pays for the template (a cold boot and the save) unless a
template for this setup is already cached; the figure that matters is the median of the
others. JSON lines on stdout, a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

DEVICE = '''
from typing import ClassVar

from vfio_user_server.device import PciDevice
from vfio_user_server.pci import Bar


class Counter(PciDevice):
    """Register 0: a magic value; register 4: counts the guest's writes."""

    vendor_id = 0x1B36
    device_id = 0x7010
    class_code = 0xFF0000
    bars: ClassVar = {0: Bar(0x1000)}

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        return 0xC0FFEE if offset == 0 else self.writes

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.writes += 1
'''

TESTS = '''
import pytest

from counter import Counter

FIND = "for d in /sys/bus/pci/devices/*; do grep -q 0x7010 $d/device && echo $d; done; true"


@pytest.mark.parametrize("n", range({n}))
@pytest.mark.vfio_user_devices(devices=[Counter])
def test_counter(guest, n):
    path = guest.run(FIND, check=True).output.strip()
    guest.run(f"echo 1 > {{path}}/enable", check=True)
    base = int(guest.run(f"cut -d' ' -f1 {{path}}/resource | head -1", check=True).output, 16)
    assert int(guest.run(f"devmem {{base:#x}} 32", check=True).output, 16) == 0xC0FFEE
    # QEMU posts BAR writes (no reply awaited); the read after it is ordered behind it
    out = guest.run(f"devmem {{base + 4:#x}} 32 {{n}}; devmem {{base + 4:#x}} 32", check=True)
    assert int(out.output, 16) == 1 and guest.device.writes == 1
'''


def run(folder: Path, mode: str, tests: int, workers: int) -> dict[str, object]:
    xml = folder / f"junit-{mode}-{workers}.xml"
    env = dict(os.environ, PYVFIO_COLD_BOOT="1" if mode == "cold" else "0")
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
            "-o", "junit_duration_report=total", "test_counter.py"]
    if workers:
        argv += ["-n", str(workers)]
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True,
                          check=False)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"pytest failed ({mode}):\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}")
    times = [float(tc.get("time", "0")) for tc in ET.parse(xml).iter("testcase")]
    rest = times[1:] if not workers else sorted(times)[:-workers]
    return {"mode": mode, "tests": tests, "workers": workers, "wall_s": round(wall, 2),
            "first_s": round(times[0], 2), "median_after_first_s": round(
                statistics.median(rest), 2), "min_s": round(min(times), 2),
            "max_s": round(max(times), 2), "per_test_s": [round(t, 2) for t in times]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tests", type=int, default=8)
    p.add_argument("--modes", default="restore,cold")
    p.add_argument("--workers", type=int, default=0, help="pytest-xdist workers (0: none)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyvfio-bench-") as tmp:
        folder = Path(tmp)
        (folder / "counter.py").write_text(textwrap.dedent(DEVICE))
        (folder / "test_counter.py").write_text(TESTS.format(n=args.tests))
        for mode in args.modes.split(","):
            row = run(folder, mode, args.tests, args.workers)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print("| mode | tests | workers | first test | median of the others | min-max | wall |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['tests']} | {r['workers']} | {r['first_s']} s | "
              f"{r['median_after_first_s']} s | {r['min_s']}-{r['max_s']} s | {r['wall_s']} s |")


if __name__ == "__main__":
    main()
