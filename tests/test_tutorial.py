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
    assert callable(namespace["test_mailbox"])  # and the last block ran it

