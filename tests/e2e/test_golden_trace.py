"""Golden trace: the messages of QEMU attaching the sample device and Linux probing it.

The sequence is recorded once in tests/golden/ and compared on every run; a change shows as a
unified diff. After an intended change (a new QEMU, a new kernel, a device change), record it
again with ``PYVFIO_UPDATE_GOLDEN=1 pytest tests/e2e/test_golden_trace.py`` and review the diff
in git. Without that variable a missing golden file fails the test (it is never recorded
silently).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import pytest

from vfio_user_server.testing.harness import Guest

pytestmark = pytest.mark.e2e

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "sample_attach.trace"
_ID = re.compile(r"#\d+ ")


def normalize(lines: list[str]) -> list[str]:
    """Drop what legitimately varies between runs: message ids."""
    return [_ID.sub("", line) for line in lines]


def check_golden(got: list[str], header: list[str], golden: Path = GOLDEN) -> None:
    """Compare ``got`` with the golden file; record it only when PYVFIO_UPDATE_GOLDEN=1."""
    if os.environ.get("PYVFIO_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text("\n".join(header + got) + "\n")
    elif not golden.exists():
        # never record silently: a missing file would make the test pass whatever the trace
        pytest.fail(f"{golden} is missing: record it with PYVFIO_UPDATE_GOLDEN=1 and review it")
    want = [ln for ln in golden.read_text().splitlines() if not ln.startswith("#")]
    if got != want:
        diff = "\n".join(difflib.unified_diff(want, got, "golden", "this run", lineterm="", n=2))
        pytest.fail(f"the attach/probe trace changed ({len(want)} -> {len(got)} lines):\n{diff}")


# Booted cold: the trace is of the device present at power-on (firmware, then Linux's probe).
@pytest.mark.vfio_user_devices("sample", trace=True, cold_boot=True)
def test_attach_and_probe_trace_matches_golden(guest: Guest) -> None:
    # Everything up to the guest's boot marker: QEMU's realize, firmware, Linux's PCI probe.
    got = normalize(list(guest.trace_lines))
    prov = guest.started_machine.prov
    assert not guest.started_machine.restored
    header = [
        f"# QEMU {prov.qemu.version if prov else '?'}, "
        f"kernel {prov.kernel.release if prov else '?'}, sample device",
    ]
    check_golden(got, header)


def test_a_missing_golden_file_fails_unless_recording_was_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "golden" / "x.trace"
    monkeypatch.delenv("PYVFIO_UPDATE_GOLDEN", raising=False)
    with pytest.raises(pytest.fail.Exception, match="is missing"):
        check_golden(["a"], ["# h"], missing)
    assert not missing.exists()
    monkeypatch.setenv("PYVFIO_UPDATE_GOLDEN", "1")
    check_golden(["a"], ["# h"], missing)
    assert missing.read_text() == "# h\na\n"
    monkeypatch.delenv("PYVFIO_UPDATE_GOLDEN")
    check_golden(["a"], ["# h"], missing)
    with pytest.raises(pytest.fail.Exception, match="changed"):
        check_golden(["b"], ["# h"], missing)
