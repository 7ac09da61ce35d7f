"""Every end-to-end test module is marked the same way: ``pytestmark = pytest.mark.e2e``.

(So ``-m e2e`` / ``-m 'not e2e'`` select exactly the tests that boot a guest.)
"""

from __future__ import annotations

import ast
from pathlib import Path

E2E = Path(__file__).resolve().parent / "e2e"


def _marks(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            found.append(ast.unparse(node.value))
    return found


def test_every_e2e_module_has_the_module_level_mark() -> None:
    modules = sorted(E2E.glob("test_*.py"))
    assert modules
    wrong = {p.name: _marks(p) for p in modules if _marks(p) != ["pytest.mark.e2e"]}
    assert not wrong, f"tests/e2e modules without `pytestmark = pytest.mark.e2e`: {wrong}"


def test_no_e2e_mark_outside_tests_e2e() -> None:
    outside = [p.name for p in E2E.parent.glob("test_*.py") if "mark.e2e" in p.read_text()
               and p.name != Path(__file__).name]
    assert not outside, f"guest tests belong in tests/e2e: {outside}"
