"""One exception hierarchy for the whole package.

Everything the package raises on purpose derives from :class:`VfioUserError`, so a caller can
catch one class. Errors that map onto a vfio-user error reply carry the positive ``errno`` the
server sends back to the client.
"""

from __future__ import annotations

import errno as _errno


class VfioUserError(Exception):
    """Base class of every error raised by pyvfio-user."""

    #: errno sent to the client when this error ends a request (positive).
    errno: int = _errno.EINVAL

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class ProtocolError(VfioUserError):
    """A message that breaks the vfio-user protocol (bad size, unknown command, bad state)."""


class ConnectionClosed(VfioUserError):
    """The peer closed the connection, or the connection was shut down."""

    errno = _errno.ENOTCONN


class DeviceDefinitionError(VfioUserError):
    """A device class is not a valid PCI device (bad BAR size, overlapping capabilities, ...)."""


class ConfigSpaceError(VfioUserError):
    """An access outside the configuration space."""


class RegionAccessError(VfioUserError):
    """A region access outside the region, of a bad size, or to a region that does not exist."""


class DmaError(VfioUserError):
    """A DMA access outside the mapped ranges, against a map's permissions, or that failed."""

    errno = _errno.EFAULT


class DmaTimeoutError(DmaError):
    """A DMA_READ / DMA_WRITE request to the client got no answer in time."""

    errno = _errno.ETIMEDOUT


class IrqError(VfioUserError):
    """A SET_IRQS request that is not valid for the device's interrupts."""


class ProvisioningError(VfioUserError):
    """QEMU, the guest kernel or busybox could not be provisioned."""


class GuestError(VfioUserError):
    """The guest did not boot, did not answer, or a command in it failed to run."""
