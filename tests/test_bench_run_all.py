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


def test_a_run_without_a_figure_keeps_the_runs_paired() -> None:
    # the peer stalled in the second run: its place stays, and that run has no ratio
    r = run_all.Row("x", "IOPS", "peer")
    for ours, peer in ((100, 200), (300, None), (90, 100)):
        r.add("shim", ours)
        r.add("peer", peer)
    assert r.median("peer") == 150
    assert r.ratio("shim") == pytest.approx(0.7)  # median of 0.5 and 0.9, not of 300/100
    r.add("python", None)
    assert r.median("python") is None and r.ratio("python") is None


def test_a_workload_that_times_out_is_a_stall_with_the_figures_before_it() -> None:
    import nvme_bench

    from vfio_user_server.errors import GuestError

    def run(cmd: str, timeout: float) -> str:
        if cmd.startswith("/bin/aio_qd"):
            assert timeout == nvme_bench.WORKLOAD_LIMIT
        if "randwrite" in cmd:
            raise GuestError(f"guest command {cmd!r} timed out; output:\n")
        return "iops=1000.0 mbs=4.0" if cmd.startswith("/bin/aio_qd") else ""

    with pytest.raises(nvme_bench.Stalled) as info:
        nvme_bench.measure(run, 100)
    assert info.value.key == "4k_randwrite_qd1"
    assert info.value.figures == {"4k_randread_qd1": 1000.0}

    def failing(cmd: str, timeout: float) -> str:
        if cmd.startswith("/bin/aio_qd"):
            raise GuestError(f"guest command {cmd!r} exited with status 1; output:\n")
        return ""

    with pytest.raises(GuestError) as other:  # a failure is not a stall
        nvme_bench.measure(failing, 100)
    assert not isinstance(other.value, nvme_bench.Stalled)
