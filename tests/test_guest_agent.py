"""The guest command agent's host side: the framing of a command and the stream parser (the
agent script itself: tests/e2e/test_guest_agent_script.py)."""

from __future__ import annotations

import pytest

from vfio_user_server.errors import GuestError
from vfio_user_server.testing.guest_agent import (
    AgentReady,
    AgentResult,
    AgentStream,
    frame_command,
)
from vfio_user_server.testing.initramfs import AGENT_BEGIN, AGENT_END, AGENT_READY


def test_frame_command_sends_the_lines_as_they_are() -> None:
    tag, frame = frame_command(7, 30, "echo a\n  b \\ $x\r")
    header, body = frame.split(b"\n", 1)
    assert header == f"7 30 2 {tag}".encode()
    assert body == b"echo a\n  b \\ $x\r\n"
    tag, frame = frame_command(1, 0, "")
    assert frame == f"1 0 1 {tag}\n\n".encode()  # one empty line
    assert frame_command(1, 0, "x")[0] != frame_command(1, 0, "x")[0]  # a fresh tag each time
    with pytest.raises(GuestError, match="NUL"):
        frame_command(1, 0, "a\0b")


def _result(cid: int, tag: str, output: bytes, status: int) -> bytes:
    return (f"{AGENT_BEGIN} {cid} {tag}\n".encode() + output
            + f"\n{AGENT_END} {cid} {tag} {status}\n".encode())


def test_stream_yields_ready_and_results_byte_for_byte() -> None:
    stream = AgentStream()
    tricky = b"a\r\n\x00" + f"\n{AGENT_END} 2 ab 0\n{AGENT_READY}\n".encode() + b"no newline"
    data = (b"noise\r\n" + f"{AGENT_READY}\n".encode() + _result(2, "abcd", tricky, 3)
            + _result(3, "ef01", b"", 0) + _result(4, "ef02", b"x\n", -1))
    events: list[AgentReady | AgentResult] = []
    for i in range(len(data)):  # one byte at a time: every split point
        events += stream.feed(data[i : i + 1])
    assert events == [AgentReady(), AgentResult(2, 3, tricky), AgentResult(3, 0, b""),
                      AgentResult(4, -1, b"x\n")]
    assert AgentStream().feed(data) == events
