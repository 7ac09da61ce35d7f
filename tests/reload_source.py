"""The source of a small user device for the hot reload tests (written to a temporary folder
and served with ``--app-dir``): BAR0 offset 0 reads ``MAGIC``, offset 4 is a scratch register
kept in the device state. A test rewrites the file with another ``MAGIC`` (or another
``state_version``, or a mistake) and watches the served device follow."""

from __future__ import annotations

from pathlib import Path

MODULE = "reloadable"
SPEC = f"{MODULE}:Reloadable"
REG_MAGIC = 0x0
REG_SCRATCH = 0x4
VENDOR, DEVICE = 0x1B36, 0x70AA

TEMPLATE = '''\
from typing import ClassVar

from vfio_user_server.device import PciDevice
from vfio_user_server.pci import Bar

MAGIC = {magic:#x}


class Reloadable(PciDevice):
    vendor_id = {vendor:#x}
    device_id = {device:#x}
    bars: ClassVar = {{0: Bar(0x1000, kind="mem32")}}
    state_fields = ("scratch",)
    state_version = {version}

    def __init__(self) -> None:
        super().__init__()
        self.scratch = 0
{extra}
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if offset == 0:
            return MAGIC
        if offset == 4:
            return self.scratch
        return 0

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if offset == 4:
            self.scratch = value
'''


def write_device(folder: Path, magic: int, *, version: int = 1, extra: str = "") -> Path:
    """Write the device's module (``extra``: lines added to ``__init__``, 8 spaces in);
    replaced by a rename, as editors save."""
    path = folder / f"{MODULE}.py"
    tmp = folder / f".{MODULE}.py.tmp"
    tmp.write_text(TEMPLATE.format(magic=magic, vendor=VENDOR, device=DEVICE, version=version,
                                   extra=extra))
    tmp.replace(path)
    return path
