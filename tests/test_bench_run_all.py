"""bench/run_all.py refuses a guest timing whose device did not answer edu's ID."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import run_all

from vfio_user_devices.edu import EDU_ID


def test_the_id_run_all_expects_is_edus() -> None:
    assert run_all.EDU_ID == EDU_ID
    run_all.check_id(f"{EDU_ID:#010x}")


@pytest.mark.parametrize("read", ["0xffffffff", "0x00000000", "0x010000ee"])
def test_a_timing_with_a_wrong_id_is_refused(read: str) -> None:
    with pytest.raises(RuntimeError, match="refused"):
        run_all.check_id(read)


def test_a_rows_ratio_is_the_median_of_the_per_run_ratios() -> None:
    r = run_all.Row("x", "IOPS", "peer")
    for ours, peer in ((100, 200), (300, 200), (90, 100)):
        r.add("shim", ours)
        r.add("peer", peer)
    assert r.median("shim") == 100
    assert r.ratio("shim") == 0.9  # median of 0.5, 1.5, 0.9
    assert r.ratio("python") is None
    assert "| x | IOPS | 100.0 | — | peer | 200.0 | 0.90 | — |" in run_all.markdown([r])
