"""The server's session states and what each one accepts, as one table.

::

    AWAIT_VERSION --VERSION ok--> NEGOTIATED --DEVICE_GET_INFO--> RUNNING
          |                           |                              |
          +-----------disconnect / fatal error-----------------------+--> CLOSED

* ``AWAIT_VERSION``: only VERSION; anything else gets an EINVAL error reply (negotiation comes
  first), and the client may still negotiate.
* ``NEGOTIATED``: QEMU sends its DMA maps (and may do anything else) before it asks for the
  device info. The device may not yet send server->client requests.
* ``RUNNING``: the client knows the device; everything is accepted and the device may DMA.
* ``CLOSED``: nothing.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProtocolError
from .constants import VERSION_MAJOR, VERSION_MINOR, Command, DmaLayout
from .structs import COMMANDS


class SessionState(enum.Enum):
    AWAIT_VERSION = "await-version"
    NEGOTIATED = "negotiated"
    RUNNING = "running"
    CLOSED = "closed"


#: Every command a client may send: all but the server's own requests (DMA_READ, DMA_WRITE)
#: and VERSION, which only opens a session.
_CLIENT_COMMANDS = frozenset(
    c for c, spec in COMMANDS.items() if not spec.server_request and c is not Command.VERSION
)

#: What each state accepts from the client.
ACCEPTS: dict[SessionState, frozenset[Command]] = {
    SessionState.AWAIT_VERSION: frozenset({Command.VERSION}),
    SessionState.NEGOTIATED: _CLIENT_COMMANDS,
    SessionState.RUNNING: _CLIENT_COMMANDS,
    SessionState.CLOSED: frozenset(),
}

#: The same, as plain ints, for the per-message check.
ACCEPTS_INT: dict[SessionState, frozenset[int]] = {
    state: frozenset(int(c) for c in cmds) for state, cmds in ACCEPTS.items()
}

#: State changes caused by a successfully handled command.
TRANSITIONS: dict[tuple[SessionState, Command], SessionState] = {
    (SessionState.AWAIT_VERSION, Command.VERSION): SessionState.NEGOTIATED,
    (SessionState.NEGOTIATED, Command.DEVICE_GET_INFO): SessionState.RUNNING,
}

_TRANSITION_COMMANDS = frozenset(int(c) for _, c in TRANSITIONS)

#: States in which the server may send DMA_READ / DMA_WRITE to the client.
MAY_REQUEST = frozenset({SessionState.NEGOTIATED, SessionState.RUNNING})

# --- Limits. Each is written here once; the server advertises them in its VERSION reply
# (ServerCapabilities) and enforces what it advertises: the reader (message size), the endpoint
# (fds per message, data per access) and the session all read them from ServerCapabilities.

#: Most fds one message may carry (QEMU's own max_msg_fds; it sends SET_IRQS in chunks of it).
MAX_MSG_FDS = 16
#: Most data bytes one message may carry (REGION_READ/WRITE, DMA_READ/WRITE), QEMU's value.
MAX_DATA_XFER_SIZE = 1 << 20
#: Room in a message for the header and the fixed structures around its data.
MESSAGE_OVERHEAD = 4096
#: The kernel's own limit of fds one sendmsg carries (SCM_MAX_FD): one read never has more.
SCM_MAX_FD = 253


#: The ``pgsize`` of the ``migration`` capability (the old spec's "page size of dirty pages
#: bitmap; the smallest between the client and the server is used"). Advertised only for a
#: device that supports migration; no dirty page bitmap is ever sent (DMA logging is ENOTSUP),
#: so no smaller page size is taken from a client.
MIGRATION_PGSIZE = 4096


def max_message_size(max_data_xfer_size: int) -> int:
    """Largest message (header included) a peer may send when its data is limited as given."""
    return max_data_xfer_size + MESSAGE_OVERHEAD


# Limits a client may announce (QEMU's own bounds; the spec's defaults otherwise).
MAX_MSG_FDS_LIMIT = 1024
DEFAULT_CLIENT_MAX_FDS = 1
DEFAULT_MAX_DATA_XFER = 1 << 20


@dataclass
class ServerCapabilities:
    """What the server advertises in its VERSION reply.

    Defaults follow QEMU's limits: the JSON must fit QEMU's 214-byte reply buffer, and
    ``write_multiple`` is left out on purpose (advertising it makes QEMU 10.x queue every
    send through its IOThread).
    """

    max_msg_fds: int = MAX_MSG_FDS
    max_data_xfer_size: int = MAX_DATA_XFER_SIZE
    pgsizes: int = 4096
    max_dma_maps: int = 65535

    def __post_init__(self) -> None:
        # advertise only what the server can enforce: more fds than one read carries could
        # never arrive, and data below the spec's 512-byte floor would break every client
        if not 1 <= self.max_msg_fds <= SCM_MAX_FD:
            raise ValueError(f"max_msg_fds {self.max_msg_fds} not in 1..{SCM_MAX_FD}")
        if not 512 <= self.max_data_xfer_size <= 1 << 30:
            raise ValueError(f"max_data_xfer_size {self.max_data_xfer_size} not in 512..2**30")

    @property
    def max_message_size(self) -> int:
        """Largest message the server reads: a bigger header size is a framing error."""
        return max_message_size(self.max_data_xfer_size)

    def to_json(self) -> dict[str, Any]:
        return {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": self.pgsizes,
            "max_dma_maps": self.max_dma_maps,
        }


@dataclass
class Session:
    """State of one client connection, free of I/O."""

    caps: ServerCapabilities = field(default_factory=ServerCapabilities)
    dma_layout: DmaLayout = DmaLayout.AUTO
    state: SessionState = SessionState.AWAIT_VERSION
    client_max_msg_fds: int = DEFAULT_CLIENT_MAX_FDS
    client_max_data_xfer: int = DEFAULT_MAX_DATA_XFER
    client_caps: dict[str, Any] = field(default_factory=dict)

    def accepts(self, command: int) -> bool:
        """Whether this state accepts ``command`` (the fast check; :meth:`check` explains)."""
        return command in ACCEPTS_INT[self.state]

    def check(self, command: int) -> Command:
        """Return the command if this state accepts it, else raise :class:`ProtocolError`."""
        try:
            cmd = Command(command)
        except ValueError:
            raise ProtocolError(f"unknown command {command}", errno=errno.ENOSYS) from None
        if cmd not in ACCEPTS[self.state]:
            if self.state is SessionState.AWAIT_VERSION:
                raise ProtocolError(f"{cmd.name} before VERSION", errno=errno.EINVAL)
            raise ProtocolError(
                f"{cmd.name} not accepted in state {self.state.value}", errno=errno.EINVAL
            )
        return cmd

    def completed(self, command: int) -> None:
        """Record that ``command`` was handled successfully (drives the transitions)."""
        if command not in _TRANSITION_COMMANDS:
            return
        nxt = TRANSITIONS.get((self.state, Command(command)))
        if nxt is not None:
            self.state = nxt

    def may_request(self) -> bool:
        return self.state in MAY_REQUEST

    def negotiate(self, major: int, minor: int, client_caps: dict[str, Any], *,
                  migration: bool = False) -> dict[str, Any]:
        """Validate the client's VERSION and return the capabilities to answer with
        (``migration``: the device supports migration v2, which is advertised then)."""
        if major != VERSION_MAJOR:
            raise ProtocolError(
                f"client speaks protocol major {major}, server {VERSION_MAJOR}",
                errno=errno.ENOTSUP,
            )
        del minor  # every minor of major 0 is answered with ours, which is the lowest (0)
        fds = client_caps.get("max_msg_fds", DEFAULT_CLIENT_MAX_FDS)
        xfer = client_caps.get("max_data_xfer_size", DEFAULT_MAX_DATA_XFER)
        if not isinstance(fds, int) or isinstance(fds, bool) or not 0 <= fds <= MAX_MSG_FDS_LIMIT:
            raise ProtocolError(f"bad max_msg_fds {fds!r}", errno=errno.EINVAL)
        if not isinstance(xfer, int) or isinstance(xfer, bool) or xfer < 512:
            raise ProtocolError(f"bad max_data_xfer_size {xfer!r}", errno=errno.EINVAL)
        _check_migration_cap(client_caps.get("migration"))
        self.client_caps = client_caps
        self.client_max_msg_fds = fds
        self.client_max_data_xfer = xfer
        ours = self.caps.to_json()
        if migration:
            ours["migration"] = {"pgsize": MIGRATION_PGSIZE}
        return ours

    def reply_version(self) -> tuple[int, int]:
        return VERSION_MAJOR, VERSION_MINOR

    def close(self) -> None:
        self.state = SessionState.CLOSED


def _check_migration_cap(cap: Any) -> None:
    """A client's ``migration`` capability: an object whose ``pgsize`` (if any) is a power of
    two of at least 4 KiB and whose ``max_bitmap_size`` (if any) an integer (QEMU sends both)."""
    if cap is None:
        return
    if not isinstance(cap, dict):
        raise ProtocolError(f"bad migration capability {cap!r}", errno=errno.EINVAL)
    pgsize = cap.get("pgsize", MIGRATION_PGSIZE)
    if (not isinstance(pgsize, int) or isinstance(pgsize, bool) or pgsize < MIGRATION_PGSIZE
            or pgsize & (pgsize - 1)):
        raise ProtocolError(f"bad migration pgsize {pgsize!r}", errno=errno.EINVAL)
    bitmap = cap.get("max_bitmap_size", 0)
    if not isinstance(bitmap, int) or isinstance(bitmap, bool) or bitmap < 0:
        raise ProtocolError(f"bad migration max_bitmap_size {bitmap!r}", errno=errno.EINVAL)
