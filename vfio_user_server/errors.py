"""One exception hierarchy for the whole package.

Everything the package raises on purpose derives from :class:`VfioUserError`, so a caller can
catch one class. ``errno`` is the positive errno an error reply carries when the error ends a
client's request. As in h11, errors caused by the remote peer (:class:`ClientError`: for the
server, its client) are told apart from local ones (this process or its device is at fault)::

    VfioUserError                 base; .errno for the error reply (EINVAL unless said)
    ├── ClientError               the remote peer broke the protocol or refused a request
    │   ├── FramingError          the byte stream can no longer be cut into messages (bad
    │   │                         header or size, fds in the middle of a message, ancillary
    │   │                         data cut short): the connection is dropped, no reply
    │   ├── ProtocolError         one message breaks the protocol (bad size, unknown command,
    │   │                         wrong state, bad fds): an error reply, the connection goes on
    │   └── ErrorReply            the server answered the Client's request with an error reply
    ├── ConnectionClosed          the peer hung up, or the connection was shut down (ENOTCONN)
    ├── EncodeError               local: a value this process tried to put on the wire does not
    │                             fit its field (a bug here, never the peer's fault; EIO)
    ├── DmaError                  DMA outside the maps, against their permissions, or refused
    │   └── DmaTimeoutError       a DMA_READ / DMA_WRITE request got no answer (ETIMEDOUT)
    ├── RegionAccessError         a region access outside a region, or of a bad size
    ├── ConfigSpaceError          an access outside the configuration space
    ├── IrqError                  a SET_IRQS request, or a device's trigger, that does not fit
    ├── DeviceDefinitionError     local: a device class is not a valid PCI device
    ├── StateError                a saved device state that cannot be loaded here (other
    │                             format or version, other device, corrupt): nothing loaded
    ├── ProvisioningError         local: QEMU, the kernel or busybox could not be provisioned
    └── GuestError                local: the test guest did not boot or a command in it failed

What the server does with an error is decided by its type, never by where it was raised: a
:class:`FramingError` out of the reader drops the client; any other :class:`VfioUserError` out
of a request handler becomes an error reply with its ``errno``; anything else out of a device
handler is a bug, logged, answered with EIO.
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


class ClientError(VfioUserError):
    """Caused by the remote peer, not by this process (h11's "remote" errors).

    The server's peer is its client, hence the name; the test :class:`~vfio_user_server.client.
    Client` raises the same classes about the server it talks to.
    """


class FramingError(ClientError):
    """The byte stream cannot be cut into messages any more: the connection is dropped.

    Raised by the message reader (a header smaller than itself, a bad message type, a size
    over the limit, fds in the middle of a message) and by the transport (ancillary data cut
    short). Nothing after it in the stream can be trusted, so no reply is sent.
    """


class ProtocolError(ClientError):
    """One message breaks the vfio-user protocol (bad size, unknown command, bad state).

    The server answers it with an error reply carrying :attr:`errno`; the connection goes on.
    """


class ErrorReply(ClientError):
    """The peer answered a request with an error reply (``errno`` is the one it sent)."""


class ConnectionClosed(VfioUserError):
    """The peer closed the connection, or the connection was shut down."""

    errno = _errno.ENOTCONN


class EncodeError(VfioUserError):
    """A value this process tried to put on the wire does not fit its field (h11's "local").

    Raised while encoding, so never caused by the peer: the peer's bad values are caught when
    they are decoded (:class:`ProtocolError`). The server answers a request that ends in this
    error with EIO, as for any other bug of its own.
    """

    errno = _errno.EIO


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


class StateError(VfioUserError):
    """A saved device state is refused: another format or state version, another device
    class or IDs, corrupt, truncated or hostile bytes, or a value the device cannot take.

    Raised before anything is applied (or after rolling back): the device is left as it was.
    """


class ProvisioningError(VfioUserError):
    """QEMU, the guest kernel or busybox could not be provisioned."""


class GuestError(VfioUserError):
    """The guest did not boot, did not answer, or a command in it failed to run."""
