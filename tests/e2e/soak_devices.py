"""Devices the soak tests serve with the installed ``vfio-user-server`` (``module:Class``)."""

from __future__ import annotations

from vfio_user_server.sample import SampleDevice


class NoMsixSample(SampleDevice):
    """The sample device without MSI-X: QEMU 11.1.3 aborts on unplug of a vfio-user device
    with MSI-X (docs/qemu-issues.md)."""

    msix_vectors = 0
