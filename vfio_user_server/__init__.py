"""pyvfio-user: vfio-user PCI device servers written in Python."""

from __future__ import annotations

__version__ = "0.1.0"
