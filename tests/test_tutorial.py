"""docs/tutorial.md runs: its python blocks, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "tutorial.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_tutorial_has_code() -> None:
    assert len(python_blocks(TUTORIAL.read_text())) >= 6


def test_tutorial_runs() -> None:
    namespace: dict[str, object] = {"__name__": "tutorial"}
    for i, block in enumerate(python_blocks(TUTORIAL.read_text())):
        code = compile(block, f"{TUTORIAL}:block{i}", "exec")
        exec(code, namespace)
    device = namespace["device"]
    assert device.messages == []  # type: ignore[attr-defined]  # reset ran last


def test_err_index_is_wired() -> None:
    """A device's report_error() writes the ERR eventfd QEMU gave (QEMU then stops the VM)."""
    import os
    import tempfile

    from vfio_user_server.client import Client
    from vfio_user_server.protocol.constants import IrqIndex
    from vfio_user_server.sample import SampleDevice
    from vfio_user_server.server import Server

    path = os.path.join(tempfile.mkdtemp(), "err.sock")
    device = SampleDevice()
    with Server(device, path), Client.connect(path) as client:
        client.negotiate()
        client.get_device_info()
        assert client.get_irq_info(IrqIndex.ERR).count == 1
        assert device.report_error() is False  # no eventfd yet
        (efd,) = client.enable_irq(IrqIndex.ERR, 1)
        assert device.report_error() is True
        assert Client.eventfd_count(efd) == 1
        os.close(efd)
