"""``python bench/run_all.py --short`` runs every section it has (raw client, DMA copies, RSS,
NVMe in a guest through bench/aio_qd.c) and prints the full table: the benchmark still works.

No timing is checked: only that every figure was measured and is a positive number.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent.parent


def test_run_all_short_measures_every_section(tmp_path: Path) -> None:
    table = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--short",
                           "--markdown", str(table)], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in table.read_text().splitlines()[2:]]
    labels = [r[0].strip() for r in rows]
    for prefix in ("raw client REGION_READ", "DMA read 128 KiB, guarded",
                   "RSS idle", "RSS per extra", "NVMe 4k randread qd1, MSIX",
                   "NVMe 4k randwrite qd32, MSIX", "NVMe 128k write qd1, MSIX"):
        assert any(label.startswith(prefix) for label in labels), (prefix, labels)
    for r in rows:
        label, shim = r[0].strip(), r[2].strip()
        if label.startswith("RSS per extra"):
            continue  # a difference of two samples: may be 0 or below
        assert float(shim.replace(",", "")) > 0, r
        if label.startswith(("raw", "DMA", "RSS")):
            # the pure-Python path (PYVFIO_NO_SHIM=1) was measured as its own column
            assert float(r[3].strip().replace(",", "")) > 0, r
