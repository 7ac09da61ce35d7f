"""The pytest plugin's marker, run as a user would: pytest in a subprocess on a test file.

No guest boots here: the user's tests ask for the ``vfio_user_devices`` fixture (what the
``guest`` fixture is built from), not for ``guest``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

DEVICE = '''
from vfio_user_server.sample import SampleDevice

class MyDevice(SampleDevice):
    pass
'''


def run_pytest(folder: Path, body: str) -> subprocess.CompletedProcess[str]:
    (folder / "test_user.py").write_text(DEVICE + textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        cwd=folder, capture_output=True, text=True, timeout=120, check=False,
    )


def test_lone_class_fails_collection_with_an_explanation(tmp_path: Path) -> None:
    proc = run_pytest(tmp_path, '''
        import pytest

        @pytest.mark.vfio_user_devices(MyDevice)
        def test_x(vfio_user_devices):
            pass
    ''')
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "TypeError" in out, out
    assert "@pytest.mark.vfio_user_devices(devices=[MyDevice])" in out, out


def test_devices_keyword_takes_classes_names_and_options(tmp_path: Path) -> None:
    proc = run_pytest(tmp_path, '''
        import pytest

        @pytest.mark.vfio_user_devices(devices=[MyDevice])
        def test_class_alone(vfio_user_devices):
            assert vfio_user_devices == ([MyDevice], {})

        @pytest.mark.vfio_user_devices("edu", devices=[MyDevice], cold_boot=True,
                                       modules=["uio_pci_generic"])
        def test_mixed(vfio_user_devices):
            assert vfio_user_devices == (
                ["edu", MyDevice], {"cold_boot": True, "modules": ["uio_pci_generic"]})

        @pytest.mark.vfio_user_devices(MyDevice, trace=True)
        def test_class_with_a_keyword(vfio_user_devices):
            assert vfio_user_devices == ([MyDevice], {"trace": True})

        def test_default_is_the_sample(vfio_user_devices):
            assert vfio_user_devices == (["sample"], {})
    ''')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 passed" in proc.stdout, proc.stdout
