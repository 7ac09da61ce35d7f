"""pyvfio-user: vfio-user PCI device servers written in Python."""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# c_shim/sanitize.sh: the C shim's modules built with sanitizers, found first in their own folder
# (never in the source tree, where a copy left behind would shadow the normal build).
if _shim_dir := _os.environ.get("PYVFIO_SHIM_DIR"):
    __path__.insert(0, _shim_dir)
