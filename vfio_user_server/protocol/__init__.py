"""The vfio-user protocol, free of I/O: constants, wire layouts, codec, framing, session states."""

from __future__ import annotations

from .codec import Message, encode, error_reply, reply_to, request
from .constants import Command, DmaLayout, HeaderFlag, IrqIndex, IrqSetFlag, RegionIndex
from .framing import MessageReader
from .session import Session, SessionState

__all__ = [
    "Command",
    "DmaLayout",
    "HeaderFlag",
    "IrqIndex",
    "IrqSetFlag",
    "Message",
    "MessageReader",
    "RegionIndex",
    "Session",
    "SessionState",
    "encode",
    "error_reply",
    "reply_to",
    "request",
]
