"""The guest command agent script, run by the provisioned busybox on a pseudo-terminal (as it
runs on the guest's serial port), driven through the host's framing and stream parser."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfio_user_server.testing.guest_agent import (
    AgentReady,
    AgentResult,
    AgentStream,
    frame_command,
)
from vfio_user_server.testing.initramfs import AGENT_SCRIPT
from vfio_user_server.testing.provision import Provisioned

pytestmark = pytest.mark.e2e


@pytest.fixture
def host_agent(vfio_user_provisioned: Provisioned, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """The agent script under the provisioned busybox on a pty, its files in tmp_path."""
    script = tmp_path / "agent.sh"
    script.write_text(AGENT_SCRIPT.replace("/tmp/.agent", f"{tmp_path}/.agent"))
    master, slave = pty.openpty()
    tty.setraw(master)
    proc = subprocess.Popen(
        [str(vfio_user_provisioned.busybox), "sh", str(script), os.ttyname(slave)],
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        yield master, tmp_path
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        os.close(master)
        os.close(slave)


def test_agent_script_runs_commands_with_their_status_output_and_timeout(
    host_agent: tuple[int, Path],
) -> None:
    master, folder = host_agent
    stream = AgentStream()

    def events(until: float) -> list[AgentReady | AgentResult]:
        got: list[AgentReady | AgentResult] = []
        while not got:
            assert time.monotonic() < until, "the agent did not answer"
            if select.select([master], [], [], 0.2)[0]:
                got = stream.feed(os.read(master, 65536))
        return got

    def run(cid: int, command: str, timeout: int = 30) -> AgentResult:
        os.write(master, frame_command(cid, timeout, command)[1])
        [event] = events(time.monotonic() + timeout + 30)
        assert isinstance(event, AgentResult) and event.cid == cid
        return event

    assert events(time.monotonic() + 30) == [AgentReady()]
    assert run(1, "echo hi; printf 'a\\0b'; echo err >&2; exit 3") == AgentResult(
        1, 3, b"hi\na\x00berr\n")
    # The script's lines arrive as they are; the agent's variables are not the script's.
    assert run(2, "echo \"[$_id$_tag$port]\"; cat <<'E'\n  sp \\\\ $x\nE").output == (
        b"[]\n  sp \\\\ $x\n")
    assert run(3, "sleep 30", timeout=1).status == 137  # the watchdog killed it
    assert run(4, "echo after").output == b"after\n"  # ... and was cancelled in time
    # What a command leaves running cannot write into the next command's output.
    assert run(5, "(sleep 0.5; echo late) & echo now").output == b"now\n"
    assert run(6, "sleep 1; echo next").output == b"next\n"
    assert run(32, "ls -a " + str(folder)).output.count(b".agent-out.") == 1  # rm'd every 32
