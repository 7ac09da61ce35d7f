"""The code's shape: no module over 600 lines and no class over 400 in the package and devices,
except where docs/ARCHITECTURE.md ("Sizes") says why; and every path the architecture guide names
exists (issue 7: the docs describe the code as it is)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (ROOT / "vfio_user_server", ROOT / "devices" / "vfio_user_devices")
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400

#: Exceptions, each justified in docs/ARCHITECTURE.md, section "Sizes", with a ceiling so that
#: growth is seen.
ALLOWED_MODULES = {
    # "Sizes": a catalogue of small register-layout classes (PM, MSI, MSI-X, PCIe, ...), none
    # over 400 lines; left whole while device state save/load is added to it.
    "vfio_user_server/pci/capabilities.py": 1300,
    # "Sizes": provisioning is one recipe (QEMU, kernel, busybox, the cache) read top to
    # bottom; the private apt is in testing/apt.py, the bzImage decoding in testing/vmlinux.py.
    "vfio_user_server/testing/provision.py": 700,
    # "Sizes": a known item for the virtio owner (the transport as one PciDevice).
    "vfio_user_server/virtio/pci.py": 700,
    # "Sizes": known items for their owners (device state save/load; NVMe flush/FUA), which
    # grew past the limits as they landed.
    "vfio_user_server/device.py": 770,
    "devices/vfio_user_devices/nvme.py": 650,
}
ALLOWED_CLASSES = {
    # "Sizes": a known item for the virtio owner.
    "vfio_user_server/virtio/pci.py:VirtioPciDevice": 480,
    # "Sizes": known items for their owners.
    "vfio_user_server/device.py:PciDevice": 600,
    "devices/vfio_user_devices/nvme.py:NvmeController": 520,
}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in pkg.rglob("*.py"))


def test_module_and_class_sizes() -> None:
    problems = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        lines = text.count("\n")
        limit = ALLOWED_MODULES.get(rel, MAX_MODULE_LINES)
        if lines > limit:
            problems.append(f"{rel}: {lines} lines (limit {limit})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                span = (node.end_lineno or node.lineno) - node.lineno + 1
                climit = ALLOWED_CLASSES.get(f"{rel}:{node.name}", MAX_CLASS_LINES)
                if span > climit:
                    problems.append(f"{rel}: class {node.name} {span} lines (limit {climit})")
    assert not problems, "\n".join(problems)


def test_allow_lists_are_justified_and_needed() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    sizes = doc[doc.index("### Sizes") :]
    for key in (*ALLOWED_MODULES, *ALLOWED_CLASSES):
        rel, _, cls = key.partition(":")
        assert f"`{rel}`" in sizes, f"{key} is allowed but ARCHITECTURE.md 'Sizes' does not say why"
        if cls:
            assert f"`{cls}`" in sizes, key
        assert (ROOT / rel).exists(), f"{rel} is allowed but no longer exists"
    for rel in ALLOWED_MODULES:
        # An exception that is no longer needed is removed from the list.
        assert (ROOT / rel).read_text().count("\n") > MAX_MODULE_LINES, rel


#: Names in the docs that are the reader's own files, not ours.
_EXAMPLES = {"mymodule.py", "mailbox.py"}

def _docs() -> list[Path]:
    return sorted(p for p in ROOT.glob("*.md")) + sorted((ROOT / "docs").glob("*.md")) + [
        ROOT / "vfio_user_server" / "testing" / "README.md"
    ]


def test_paths_named_in_docs_exist() -> None:
    missing = []
    for doc in _docs():
        name = doc.relative_to(ROOT).as_posix()
        text = doc.read_text()
        refs = re.findall(r"`([\w./-]+\.(?:py|c|md|sh))(?::\w+)?`", text)
        commands = r"^\s*(?:python3? )?((?:bench|ci|tests)/[\w./-]+\.(?:py|sh))"
        refs += re.findall(commands, text, re.M)
        for ref in refs:
            if ref in _EXAMPLES or ref.startswith("../"):  # the reader's files; outside the repo
                continue
            candidates = [ROOT / ref, doc.parent / ref]
            candidates += [pkg / ref for pkg in PACKAGES] + [ROOT / "devices" / ref]
            if "/" not in ref:
                # A bare file name names a module somewhere in the packages, tests or bench.
                candidates += list(ROOT.glob(f"*/**/{ref}"))
            if not any(c.exists() for c in candidates):
                missing.append(f"{name}: `{ref}`")
    assert not missing, "\n".join(missing)


def test_architecture_module_map_is_complete() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = doc[doc.index("```") : doc.index("```", doc.index("```") + 3)]
    absent = []
    for path in _modules():
        if path.name == "__init__.py" or "virtio" in path.parts or "testing" in path.parts:
            continue  # packages and the sub-packages summarised on one line each
        if path.name not in block:
            absent.append(path.relative_to(ROOT).as_posix())
    assert not absent, "modules missing from the ARCHITECTURE.md map: " + ", ".join(absent)


def test_classes_named_in_architecture_exist() -> None:
    defined: set[str] = set()
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Assign):
                defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    # `ClassName`, `ClassName.method` or `ClassName(args)`: the CamelCase name must exist.
    named = set(re.findall(r"`([A-Z][a-z]+[A-Z]\w*)[.(`]", doc))
    assert not sorted(named - defined), sorted(named - defined)
