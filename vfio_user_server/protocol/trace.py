"""One-line descriptions of messages, for ``--trace`` and the golden traces."""

from __future__ import annotations

from ..errors import ProtocolError
from .codec import Message, decode_version
from .constants import Command
from .structs import COMMANDS, DmaAccess, WireStruct


def _fields(obj: WireStruct) -> str:
    parts = []
    for name in obj._field_names():
        value = getattr(obj, name)
        if isinstance(value, int) and name not in ("index", "region", "count", "nr_areas",
                                                   "num_regions", "num_irqs", "major", "minor",
                                                   "start", "wr_cnt"):
            parts.append(f"{name}={value:#x}")
        else:
            parts.append(f"{name}={value!r}" if isinstance(value, bytes) else f"{name}={value}")
    return " ".join(parts)


def describe(msg: Message, *, direction: str = "") -> str:
    """Describe ``msg`` in one line: direction, id, command, flags and decoded fields."""
    kind = "reply" if msg.is_reply else "req"
    head = f"{direction}{' ' if direction else ''}#{msg.msg_id} {msg.command_name()} {kind}"
    if msg.no_reply:
        head += " no-reply"
    if msg.is_error:
        return f"{head} ERROR errno={msg.error}"
    body = ""
    try:
        cmd = Command(msg.command)
        spec = COMMANDS[cmd]
        cls: type[WireStruct] | None = spec.reply if msg.is_reply else spec.request
        if cmd is Command.VERSION and msg.payload:
            major, minor, caps = decode_version(msg.payload)
            body = f"major={major} minor={minor} caps={caps}"
        elif cmd in (Command.DMA_READ, Command.DMA_WRITE):
            if len(msg.payload) >= DmaAccess.SIZE:
                acc = DmaAccess.unpack(msg.payload)
                body = f"addr={acc.addr:#x} count={acc.count & 0xFFFFFFFF:#x}"
            body += f" payload={len(msg.payload)}"
        elif cls is not None and len(msg.payload) >= cls.SIZE:
            body = _fields(cls.unpack(msg.payload))
            extra = len(msg.payload) - cls.SIZE
            if extra:
                body += f" +{extra}B"
        elif msg.payload:
            body = f"payload={len(msg.payload)}B"
    except (ValueError, KeyError, ProtocolError):
        body = f"payload={len(msg.payload)}B (undecodable)"
    if msg.fds:
        body += f" fds={len(msg.fds)}"
    return f"{head} {body}".rstrip()
