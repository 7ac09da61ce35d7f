"""docs/virtio.md runs: its python blocks, in order, in one namespace."""

from __future__ import annotations

from pathlib import Path

from test_tutorial import python_blocks

TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "virtio.md"


def test_virtio_tutorial_has_code() -> None:
    assert len(python_blocks(TUTORIAL.read_text())) >= 6


def test_virtio_tutorial_runs() -> None:
    namespace: dict[str, object] = {"__name__": "virtio_tutorial"}
    for i, block in enumerate(python_blocks(TUTORIAL.read_text())):
        code = compile(block, f"{TUTORIAL}:block{i}", "exec")
        exec(code, namespace)
    device = namespace["device"]
    # the client left: the device was reset
    assert device.handled == 0  # type: ignore[attr-defined]
    assert device.status == 0  # type: ignore[attr-defined]
