"""Messages as values: encoding to bytes, decoding headers and payloads.

Nothing here touches a socket. A transport reads bytes (and the fds that came with them),
feeds them to the one reader, :class:`~vfio_user_server.protocol.framing.MessageReader`, and
gets :class:`Message` values back; to send, it calls :func:`encode` and writes the bytes with
the message's fds in one ``sendmsg``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProtocolError
from ..fds import close_fds
from .constants import (
    HEADER_SIZE,
    MSG_TYPE_MASK,
    Command,
    HeaderFlag,
    MsgType,
    RegionCapId,
    RegionInfoFlag,
)
from .structs import (
    COMMANDS,
    Header,
    RegionCapHeader,
    RegionInfo,
    SparseMmap,
    SparseMmapArea,
    Tail,
    Version,
    WireStruct,
)

_HEADER = Header.STRUCT
# Plain ints for the hot path (IntFlag arithmetic costs a microsecond a message).
_TYPE_MASK = int(MSG_TYPE_MASK)
_REPLY = int(MsgType.REPLY)
_NO_REPLY = int(HeaderFlag.NO_REPLY)
_ERROR = int(HeaderFlag.ERROR)
_REPLY_ERROR = _REPLY | _ERROR


@dataclass(slots=True)
class Message:
    """One vfio-user message: the header's fields, the payload after it, and its fds."""

    msg_id: int
    command: int
    flags: int = 0
    error: int = 0
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return self.flags & _TYPE_MASK == _REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & _NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & _ERROR)

    @property
    def size(self) -> int:
        return HEADER_SIZE + len(self.payload)

    def command_name(self) -> str:
        try:
            return Command(self.command).name
        except ValueError:
            return f"UNKNOWN({self.command})"

    def close_fds(self) -> None:
        """Close every fd this message carries (ownership ends here)."""
        fds, self.fds = self.fds, []
        close_fds(fds, "message fd")


def encode_header(msg_id: int, command: int, size: int, flags: int, error: int = 0) -> bytes:
    return _HEADER.pack(msg_id, command, size, flags, error)


def encode(msg: Message) -> bytes:
    """The bytes of ``msg`` (header and payload). Its fds travel beside them."""
    return _HEADER.pack(msg.msg_id, msg.command, msg.size, msg.flags, msg.error) + msg.payload


def request(msg_id: int, command: int, payload: bytes = b"", fds: Sequence[int] = (),
            *, no_reply: bool = False) -> Message:
    flags = MsgType.COMMAND | (HeaderFlag.NO_REPLY if no_reply else 0)
    return Message(msg_id, command, int(flags), 0, payload, list(fds))


def reply_to(req: Message, payload: bytes = b"") -> Message:
    return Message(req.msg_id, req.command, _REPLY, 0, payload, [])


def error_reply(req: Message, errno: int) -> Message:
    """A header-only error reply carrying a positive errno."""
    return Message(req.msg_id, req.command, _REPLY_ERROR, errno, b"")


# --- Payload helpers ------------------------------------------------------------------------


def split(payload: bytes, cls: type[WireStruct]) -> tuple[Any, bytes]:
    """Decode the fixed structure at the start of ``payload``; return it and the rest."""
    return cls.unpack(payload), payload[cls.SIZE:]


def check_request_size(command: Command, payload: bytes) -> None:
    """Reject a request whose payload does not fit its command's layout in the table.

    The fixed structure must be there; a command with nothing after it (``Tail.NONE``) must be
    exactly that long.
    """
    spec = COMMANDS[command]
    size = spec.request.SIZE if spec.request is not None else 0
    if len(payload) < size:
        raise ProtocolError(
            f"{command.name}: payload of {len(payload)} bytes is shorter than {size}"
        )
    if spec.request_tail is Tail.NONE and len(payload) != size:
        raise ProtocolError(
            f"{command.name}: payload of {len(payload)} bytes, its layout has {size}"
        )


def encode_version(major: int, minor: int, capabilities: dict[str, Any] | None) -> bytes:
    body = Version(major, minor).pack()
    if capabilities is None:
        return body
    text = json.dumps({"capabilities": capabilities}, separators=(",", ":"))
    return body + text.encode() + b"\0"


def decode_version(payload: bytes) -> tuple[int, int, dict[str, Any]]:
    """Return (major, minor, capabilities) of a VERSION payload."""
    ver, rest = split(payload, Version)
    caps: dict[str, Any] = {}
    if rest:
        if rest[-1:] != b"\0":
            raise ProtocolError("VERSION: JSON capabilities are not NUL-terminated")
        text = rest[:-1].split(b"\0", 1)[0]
        try:
            doc = json.loads(text.decode()) if text else {}
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"VERSION: capabilities are not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ProtocolError("VERSION: capabilities JSON is not an object")
        inner = doc.get("capabilities", {})
        if not isinstance(inner, dict):
            raise ProtocolError("VERSION: 'capabilities' is not an object")
        caps = inner
    return ver.major, ver.minor, caps


def encode_region_info(
    argsz: int,
    index: int,
    flags: int,
    size: int,
    offset: int,
    sparse_areas: Sequence[tuple[int, int]] | None = None,
    msix_mappable: bool = False,
) -> tuple[bytes, bool]:
    """Build a REGION_INFO reply that fits the client's ``argsz``.

    Returns the payload and whether it is the full answer (only a full answer may carry the
    region's fd). When the caps do not fit, the reply is the bare 32-byte structure with the
    needed ``argsz`` and without the CAPS flag, so the client asks again.
    """
    caps: list[bytes] = []
    cap_ids: list[int] = []
    if sparse_areas is not None:
        body = SparseMmap(len(sparse_areas), 0).pack() + b"".join(
            SparseMmapArea(o, s).pack() for o, s in sparse_areas
        )
        caps.append(body)
        cap_ids.append(RegionCapId.SPARSE_MMAP)
    if msix_mappable:
        caps.append(b"")
        cap_ids.append(RegionCapId.MSIX_MAPPABLE)
    needed = RegionInfo.SIZE + sum(RegionCapHeader.SIZE + len(c) for c in caps)
    if not caps:
        return RegionInfo(RegionInfo.SIZE, flags, index, 0, size, offset).pack(), True
    if argsz < needed:
        bare = RegionInfo(needed, flags & ~RegionInfoFlag.CAPS, index, 0, size, offset)
        return bare.pack(), False
    out = bytearray()
    pos = RegionInfo.SIZE
    for i, (cap_id, body) in enumerate(zip(cap_ids, caps, strict=True)):
        end = pos + RegionCapHeader.SIZE + len(body)
        nxt = end if i + 1 < len(caps) else 0
        out += RegionCapHeader(cap_id, 1, nxt).pack() + body
        pos = end
    head = RegionInfo(needed, flags | RegionInfoFlag.CAPS, index, RegionInfo.SIZE, size, offset)
    return head.pack() + bytes(out), True


def decode_region_info(payload: bytes) -> tuple[RegionInfo, list[tuple[int, int]] | None, bool]:
    """Parse a REGION_INFO reply: (info, sparse areas or None, msix_mappable)."""
    info = RegionInfo.unpack(payload)
    sparse: list[tuple[int, int]] | None = None
    mappable = False
    if info.flags & RegionInfoFlag.CAPS and info.cap_offset:
        pos = info.cap_offset
        seen = 0
        while pos and seen < 16:
            seen += 1
            cap = RegionCapHeader.unpack(payload, pos)
            if cap.id == RegionCapId.SPARSE_MMAP:
                sm = SparseMmap.unpack(payload, pos + RegionCapHeader.SIZE)
                base = pos + RegionCapHeader.SIZE + SparseMmap.SIZE
                sparse = []
                for i in range(sm.nr_areas):
                    area = SparseMmapArea.unpack(payload, base + i * SparseMmapArea.SIZE)
                    sparse.append((area.offset, area.size))
            elif cap.id == RegionCapId.MSIX_MAPPABLE:
                mappable = True
            if cap.next and cap.next <= pos:
                raise ProtocolError("REGION_INFO: capability chain loops")
            pos = cap.next
    return info, sparse, mappable
