"""Without the compiled shims (a machine without a C compiler) the server runs on its
pure-Python paths and says so."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from helpers import RecordingSample, negotiated

from vfio_user_server import dmacopy, msgshim
from vfio_user_server.client import Client
from vfio_user_server.protocol.framing import MessageReader
from vfio_user_server.sample import REG_SCRATCH
from vfio_user_server.server import Server


def test_the_server_works_when_the_shim_is_not_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(dmacopy.ENV_NO_SHIM, raising=False)
    for name in ("vfio_user_server._msg_shim", "vfio_user_server._dma_shim"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if never built
    assert isinstance(msgshim.new_reader(100), MessageReader)
    assert not dmacopy.shim_available()
    caplog.set_level(logging.INFO, logger="vfio_user_server.server")
    with Server(RecordingSample(), tmp_path / "s.sock") as server, \
            negotiated(Client.connect(server.path)) as c:
        conn = server.wait_for_client()
        assert isinstance(conn.reader.reader, MessageReader) and conn.fast is None
        c.region_write(0, REG_SCRATCH, (0xABCD).to_bytes(4, "little"))
        assert c.region_read(0, REG_SCRATCH, 4) == (0xABCD).to_bytes(4, "little")
    assert "message path: python (the C shim is not built)" in caplog.text
