"""Migration v2 on the wire: the state table, DEVICE_FEATURE, MIG_DATA_READ / MIG_DATA_WRITE,
and ``Client.migrate_to`` moving a running device between two ``vfio-user-server`` processes.

QEMU's client does not send these commands yet: our client drives them, and the workload is
checked before and after without a guest.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from helpers import MSIX_CAP_ID, WAIT, find_capability, wait_until
from test_nvme import DATA, RAM, Driver

from vfio_user_devices.edu import (
    DMA_RUN,
    DMA_START,
    DMA_TO_RAM,
    REG_DMA_CMD,
    REG_DMA_COUNT,
    REG_DMA_DST,
    REG_DMA_SRC,
    REG_FACTORIAL,
    REG_LIVENESS,
    REG_STATUS,
    STATUS_COMPUTING,
    Edu,
)
from vfio_user_devices.nvme import NvmeController
from vfio_user_devices.nvme_spec import AdminOpcode, Feature, IoOpcode
from vfio_user_server.client import Client
from vfio_user_server.errors import ErrorReply, ProtocolError
from vfio_user_server.protocol.constants import (
    Command,
    FeatureFlag,
    IrqIndex,
    IrqSetFlag,
    MigFlag,
    MigState,
)
from vfio_user_server.protocol.constants import Feature as DevFeature
from vfio_user_server.protocol.migration import ARCS, STATES, InStream, path, stream
from vfio_user_server.protocol.structs import MigData, MigDeviceState
from vfio_user_server.sample import REG_SCRATCH, SampleDevice
from vfio_user_server.server import Server
from vfio_user_server.testing import serve
from vfio_user_server.upgrade import HandoverError, hand_over

CLI = Path(sys.executable).parent / "vfio-user-server"
RAM_IOVA = 0x200000
S = MigState


# --------------------------------------------------------------------------- the state table

@pytest.mark.parametrize(("start", "target", "steps"), [
    (S.RUNNING, S.STOP, (S.STOP,)),
    (S.RUNNING, S.STOP_COPY, (S.STOP, S.STOP_COPY)),
    (S.RUNNING, S.RESUMING, (S.STOP, S.RESUMING)),
    (S.STOP_COPY, S.RUNNING, (S.STOP, S.RUNNING)),
    (S.STOP_COPY, S.RESUMING, (S.STOP, S.RESUMING)),
    (S.RESUMING, S.RUNNING, (S.STOP, S.RUNNING)),
    (S.RESUMING, S.STOP_COPY, (S.STOP, S.STOP_COPY)),
    (S.STOP, S.STOP, ()),
])
def test_paths_are_the_shortest_ways(start: MigState, target: MigState,
                                     steps: tuple[MigState, ...]) -> None:
    assert path(start, target) == steps


def test_every_path_is_made_of_arcs_and_never_passes_through_a_saving_state() -> None:
    states = [s for s in STATES if s is not S.ERROR]
    for a, b in itertools.product(states, states):
        steps = path(a, b)
        assert all(pair in ARCS for pair in zip((a, *steps), steps, strict=False))
        assert not any(STATES[s].reads for s in steps[:-1])


@pytest.mark.parametrize("target", [S.ERROR, S.PRE_COPY, S.RUNNING_P2P, S.PRE_COPY_P2P])
def test_states_the_server_has_not_are_einval(target: MigState) -> None:
    with pytest.raises(ProtocolError) as err:
        path(S.RUNNING, target)
    assert err.value.errno == errno.EINVAL


def test_only_a_reset_leaves_error() -> None:
    with pytest.raises(ProtocolError) as err:
        path(S.ERROR, S.RUNNING)
    assert err.value.errno == errno.EINVAL


def test_in_stream_takes_pieces_and_refuses_what_cannot_belong() -> None:
    data = stream(b"x" * 100)
    s = InStream(1000)
    for piece in (data[:3], data[3:20], data[20:50]):
        assert s.check(piece) is None
        s.accept(piece, whole=False)
    assert s.check(data[50:]) == b"x" * 100
    with pytest.raises(ProtocolError):
        s.check(data[50:] + b"!")  # past the end: refused, nothing kept
    assert s.received == 50
    s.accept(data[50:], whole=True)
    assert s.loaded
    with pytest.raises(ProtocolError):
        s.check(b"more")
    for bad in (b"XYZ", stream(b"y" * 2000), data[:8] + struct.pack("<I", 9) + data[12:]):
        with pytest.raises(ProtocolError):
            InStream(1000).check(bad)


# --------------------------------------------------------------------- one server, in process

def feature(c: Client, flags: int, data: bytes = b"", argsz: int = 64) -> bytes:
    _, out = c.device_feature(flags, data, argsz)
    return out


def refused(fn: object, *args: object) -> int:
    with pytest.raises(ErrorReply) as err:
        fn(*args)  # type: ignore[operator]
    return err.value.errno


@pytest.fixture
def edu() -> Iterator[tuple[Edu, Client]]:
    with serve(Edu(), memory=0) as s:
        s.client.add_memory(RAM_IOVA, 0x20000)
        yield s.device, s.client


def test_version_advertises_migration_only_for_a_device_with_state(
        edu: tuple[Edu, Client]) -> None:
    assert edu[1].server_caps["migration"] == {"pgsize": 4096}
    with serve(SampleDevice()) as s:
        assert "migration" not in s.client.server_caps
        get = DevFeature.MIGRATION | FeatureFlag.GET
        assert refused(s.client.device_feature, get) == errno.ENOTSUP
        assert refused(s.client.mig_read, 16) == errno.ENOTSUP


@pytest.mark.parametrize("cap", [5, {"pgsize": 1000}, {"pgsize": "4096"},
                                 {"max_bitmap_size": -1}])
def test_a_bad_migration_capability_is_refused(cap: object) -> None:
    with serve(Edu()) as s:
        s.client.close()
        c = Client.connect(s.path, timeout=WAIT)
        try:
            with pytest.raises(ErrorReply) as err:
                c.negotiate({"migration": cap})
            assert err.value.errno == errno.EINVAL
        finally:
            c.close()


def test_device_feature_get_probe_and_refusals(edu: tuple[Edu, Client]) -> None:
    _, c = edu
    assert c.migration_flags() == MigFlag.STOP_COPY
    assert c.mig_state() is S.RUNNING
    head, data = c.device_feature(DevFeature.MIGRATION | FeatureFlag.GET, b"", 16)
    assert (head.argsz, len(data)) == (16, 8)
    probe = DevFeature.MIG_DEVICE_STATE | FeatureFlag.PROBE | FeatureFlag.SET
    assert feature(c, probe) == b""
    bad = [
        (DevFeature.MIGRATION | FeatureFlag.GET, b"", 15, errno.EINVAL),  # argsz too small
        (DevFeature.MIGRATION | FeatureFlag.SET, bytes(8), 64, errno.EINVAL),
        (DevFeature.MIGRATION | FeatureFlag.PROBE | FeatureFlag.SET, b"", 64, errno.EINVAL),
        (DevFeature.MIG_DEVICE_STATE, b"", 64, errno.EINVAL),  # no operation
        (DevFeature.MIG_DEVICE_STATE | FeatureFlag.GET | FeatureFlag.SET, bytes(8), 64,
         errno.EINVAL),
        (DevFeature.MIG_DEVICE_STATE | 1 << 20 | FeatureFlag.GET, b"", 64, errno.EINVAL),
        (DevFeature.MIG_DEVICE_STATE | FeatureFlag.SET, b"\x02", 64, errno.EINVAL),  # short
        (DevFeature.MIG_DEVICE_STATE | FeatureFlag.SET, MigDeviceState(99, 0).pack(), 64,
         errno.EINVAL),
        (DevFeature.MIG_DEVICE_STATE | FeatureFlag.SET, MigDeviceState(S.PRE_COPY, 0).pack(),
         64, errno.EINVAL),
        (DevFeature.MIG_DEVICE_STATE | FeatureFlag.SET, MigDeviceState(S.ERROR, 0).pack(), 64,
         errno.EINVAL),
        (DevFeature.DMA_LOGGING_START | FeatureFlag.SET, bytes(16), 64, errno.ENOTSUP),
        (DevFeature.DMA_LOGGING_REPORT | FeatureFlag.GET, bytes(24), 64, errno.ENOTSUP),
        (DevFeature.DMA_LOGGING_STOP | FeatureFlag.PROBE, b"", 64, errno.ENOTSUP),
        (3 | FeatureFlag.GET, b"", 64, errno.ENOTSUP),  # no such feature
    ]
    for flags, data, argsz, want in bad:
        assert refused(c.device_feature, flags, data, argsz) == want, hex(flags)
    assert c.mig_state() is S.RUNNING  # nothing refused changed the state


def test_a_stopped_device_refuses_its_bars_and_keeps_config_space(
        edu: tuple[Edu, Client]) -> None:
    dev, c = edu
    c.bar_write(0, REG_LIVENESS, 4, 0x1234)
    before = dev.liveness
    for state in (S.STOP, S.STOP_COPY, S.STOP, S.RESUMING):
        c.set_mig_state(state)
        assert c.mig_state() is state
        assert refused(c.bar_read, 0, REG_LIVENESS, 4) == errno.EBUSY
        assert refused(c.bar_write, 0, REG_LIVENESS, 4, 1) == errno.EBUSY
        assert c.config_read(0, 4) == 0x11E81234
        c.config_write(0x3C, 1, 0x0B)  # config space stays writable
    with pytest.raises(ErrorReply):
        c.request(Command.REGION_WRITE_MULTI, struct.pack("<Q", 1)
                  + struct.pack("<QII8s", REG_LIVENESS, 0, 4, bytes(8)))
    assert dev.liveness == before  # nothing reached the device
    c.reset()  # DEVICE_RESET: from any state, running again
    assert c.mig_state() is S.RUNNING
    c.bar_write(0, REG_LIVENESS, 4, 0x77)
    assert c.bar_read(0, REG_LIVENESS, 4) == ~0x77 & 0xFFFFFFFF


def test_mig_data_in_the_wrong_state_gets_an_error_reply(edu: tuple[Edu, Client]) -> None:
    _, c = edu
    assert refused(c.mig_read, 64) == errno.EINVAL  # RUNNING
    assert refused(c.mig_write, b"abc") == errno.EINVAL
    c.set_mig_state(S.STOP)
    assert refused(c.mig_read, 64) == errno.EINVAL
    c.set_mig_state(S.STOP_COPY)
    assert refused(c.mig_write, b"abc") == errno.EINVAL
    with pytest.raises(ErrorReply):  # argsz smaller than the data asked for
        c.request(Command.MIG_DATA_READ, MigData(MigData.SIZE + 7, 8).pack())
    with pytest.raises(ErrorReply):  # more than max_data_xfer_size
        c.request(Command.MIG_DATA_READ, MigData(0xFFFFFFFF, (1 << 20) + 1).pack())
    data = c.mig_read_all()
    assert c.mig_read(64) == b""  # the end stays the end
    c.set_mig_state(S.RUNNING)
    assert refused(c.mig_read, 64) == errno.EINVAL
    assert data.startswith(b"PYVFUMIG")


def test_corrupt_or_truncated_data_is_refused_and_nothing_is_applied(
        edu: tuple[Edu, Client]) -> None:
    dev, c = edu
    c.bar_write(0, REG_LIVENESS, 4, 0xAAAA)
    c.set_mig_state(S.STOP_COPY)
    good = c.mig_read_all()
    c.set_mig_state(S.RUNNING)
    c.bar_write(0, REG_LIVENESS, 4, 0x5555)
    before = dev.liveness
    c.set_mig_state(S.RESUMING)
    state = json.loads(good[24:])
    state["body"]["fields"]["liveness"] = 0xBBBB  # the checksum no longer matches
    corrupt = good[:24] + json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
    corrupt = corrupt[:16] + struct.pack("<Q", len(corrupt) - 24) + corrupt[24:]
    assert refused(c.mig_write, corrupt) == errno.EINVAL
    # a message whose size says more than it carries (truncated in transit)
    with pytest.raises(ErrorReply) as err:
        c.request(Command.MIG_DATA_WRITE, MigData(MigData.SIZE + 64, 64).pack() + good[:10])
    assert err.value.errno == errno.EINVAL
    c.mig_write(good[:40])  # a stream cut short: RESUMING cannot be left
    assert refused(c.set_mig_state, S.STOP) == errno.EINVAL
    assert refused(c.set_mig_state, S.RUNNING) == errno.EINVAL
    assert c.mig_state() is S.RESUMING
    assert dev.liveness == before  # nothing applied
    assert refused(c.mig_write, good[40:] + b"!") == errno.EINVAL  # past its end
    c.mig_write(good[40:])  # the rest: whole, checked, loaded
    assert refused(c.mig_write, b"x") == errno.EINVAL
    c.set_mig_state(S.RUNNING)
    assert c.bar_read(0, REG_LIVENESS, 4) == ~0xAAAA & 0xFFFFFFFF


def test_a_destination_that_refuses_leaves_the_source_running() -> None:
    with serve(Edu()) as s1, serve(Fragile()) as s2:
        a, b = s1.client, s2.client
        a.bar_write(0, REG_LIVENESS, 4, 0x42)
        with pytest.raises(ErrorReply) as err:
            a.migrate_to(b)  # another device: its state is refused by the last write
        assert err.value.errno == errno.EINVAL
        assert a.mig_state() is S.RUNNING and b.mig_state() is S.RESUMING
        assert a.bar_read(0, REG_LIVENESS, 4) == ~0x42 & 0xFFFFFFFF
        b.reset()
        assert b.mig_state() is S.RUNNING


def test_a_client_that_leaves_a_stopped_device_leaves_it_running() -> None:
    with serve(Edu()) as s:
        s.client.set_mig_state(S.STOP_COPY)
        s.client.close()
        with Client.connect(s.path, timeout=WAIT) as c2:
            c2.negotiate()
            assert c2.mig_state() is S.RUNNING
            c2.bar_write(0, REG_LIVENESS, 4, 3)
            assert c2.bar_read(0, REG_LIVENESS, 4) == ~3 & 0xFFFFFFFF


class Fragile(SampleDevice):
    """A device with state whose hooks fail on demand."""

    state_fields = ("scratch", "thing")

    def __init__(self) -> None:
        super().__init__()
        self.thing: object = 0
        self.fail_quiesce = self.fail_resume = False
        self.resumes = 0

    def quiesce(self) -> None:
        if self.fail_quiesce:
            raise TimeoutError(errno.ETIMEDOUT, "still busy")

    def resume(self) -> None:
        self.resumes += 1
        if self.fail_resume:
            raise RuntimeError("cannot start")


def test_a_failed_arc_leaves_the_last_state_and_error_needs_a_reset() -> None:
    dev = Fragile()
    with serve(dev) as s:
        c = s.client
        dev.fail_quiesce = True
        assert refused(c.set_mig_state, S.STOP_COPY) == errno.ETIMEDOUT
        assert c.mig_state() is S.RUNNING and dev.resumes == 1  # quiesced() resumed it
        c.bar_write(0, REG_SCRATCH, 4, 9)  # and it runs
        dev.fail_quiesce = False
        dev.thing = 1.5  # a float cannot be saved: STOP_COPY fails, STOP was reached
        assert refused(c.set_mig_state, S.STOP_COPY) == errno.EINVAL
        assert c.mig_state() is S.STOP
        dev.thing = 0
        dev.fail_resume = True  # the device fails to run again: ERROR
        assert refused(c.set_mig_state, S.RUNNING) == errno.EIO
        assert c.mig_state() is S.ERROR
        for target in (S.RUNNING, S.STOP):
            assert refused(c.set_mig_state, target) == errno.EINVAL
        assert refused(c.bar_read, 0, REG_SCRATCH, 4) == errno.EBUSY
        dev.fail_resume = False
        c.reset()
        assert c.mig_state() is S.RUNNING
        c.bar_write(0, REG_SCRATCH, 4, 3)
        assert c.bar_read(0, REG_SCRATCH, 4) == 3


def test_no_live_upgrade_while_migrating(tmp_path: Path) -> None:
    class Keeper(SampleDevice):
        state_fields = ("scratch",)

    server = Server(Keeper(), tmp_path / "k.sock", upgradable=True).start()
    try:
        with Client.connect(server.path, timeout=WAIT) as c:
            c.negotiate()
            c.set_mig_state(S.STOP)
            a, b = socket.socketpair()
            with a, b, pytest.raises(HandoverError, match="migrating"):
                hand_over(server, a, timeout=WAIT)
            assert not server.handed_over
            c.set_mig_state(S.RUNNING)
            c.bar_write(0, REG_SCRATCH, 4, 1)  # serving on
            assert c.bar_read(0, REG_SCRATCH, 4) == 1
    finally:
        server.close()


# ------------------------------------------------------- between two vfio-user-server processes

class CliServer:
    """``vfio-user-server --socket PATH DEVICE ARGS...`` in its own process."""

    def __init__(self, folder: Path, name: str, *args: str) -> None:
        self.sock = folder / f"{name}.sock"
        self.log_path = folder / f"{name}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen([str(CLI), "--socket", str(self.sock), *args],
                                     stdout=self._log, stderr=self._log)

        def up() -> bool:
            assert self.proc.poll() is None, self.log_path.read_text()
            return self.sock.exists()

        wait_until(up, 6 * WAIT, f"{name}'s socket")

    def client(self) -> Client:
        c = Client.connect(self.sock, timeout=WAIT)
        c.negotiate()
        c.get_device_info()
        return c

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(6 * WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def two(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[CliServer, CliServer]]:
    folder = Path(os.path.realpath("/tmp")) / f"mig-{os.getpid()}-{tmp_path.name[-12:]}"
    folder.mkdir()
    image = folder / "disk.img"  # one namespace file both servers open (shared storage)
    with image.open("wb") as f:
        f.truncate(8 << 20)
    args = tuple(str(image) if a == "IMAGE" else a for a in request.param)
    servers: list[CliServer] = []
    try:
        servers.append(CliServer(folder, "src", *args))
        servers.append(CliServer(folder, "dst", *args))
        yield servers[0], servers[1]
    finally:
        for s in servers:
            s.close()
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def wait_edu(c: Client, reg: int, mask: int) -> None:
    wait_until(lambda: not c.bar_read(0, reg, 4) & mask, WAIT, f"edu register {reg:#x}")


@pytest.mark.parametrize("two", [("edu",)], indirect=True)
def test_edu_moves_between_processes(two: tuple[CliServer, CliServer]) -> None:
    src, dst = two
    with src.client() as a, dst.client() as b:
        a.add_memory(RAM_IOVA, 0x20000)
        a.config_write(0x04, 2, 0x06)  # memory space and bus master (carried in config space)
        pattern = bytes(range(256)) * 4
        a.write_memory(RAM_IOVA, pattern)
        a.bar_write(0, REG_LIVENESS, 4, 0xC0FFEE)
        a.bar_write(0, REG_FACTORIAL, 4, 6)
        wait_edu(a, REG_STATUS, STATUS_COMPUTING)
        for reg, value in ((REG_DMA_SRC, RAM_IOVA), (REG_DMA_DST, DMA_START),
                           (REG_DMA_COUNT, len(pattern))):
            a.bar_write(0, reg, 8, value)
        a.bar_write(0, REG_DMA_CMD, 8, DMA_RUN)  # RAM -> the device's buffer
        wait_edu(a, REG_DMA_CMD, DMA_RUN)
        regs = [a.bar_read(0, off, 4) for off in (REG_LIVENESS, REG_FACTORIAL, REG_STATUS)]
        config = a.region_read(7, 0, 256)
        assert regs[1] == 720
        assert a.migrate_to(b) > 0
        assert a.mig_state() is S.STOP and b.mig_state() is S.RUNNING
        assert refused(a.bar_read, 0, REG_LIVENESS, 4) == errno.EBUSY  # the source stays stopped
        assert [b.bar_read(0, off, 4) for off in (REG_LIVENESS, REG_FACTORIAL,
                                                   REG_STATUS)] == regs
        assert b.region_read(7, 0, 256) == config
        # the device's buffer came along: DMA it back into (shared) guest RAM
        for reg, value in ((REG_DMA_SRC, DMA_START), (REG_DMA_DST, RAM_IOVA + 0x8000),
                           (REG_DMA_COUNT, len(pattern))):
            b.bar_write(0, reg, 8, value)
        b.bar_write(0, REG_DMA_CMD, 8, DMA_RUN | DMA_TO_RAM)
        wait_edu(b, REG_DMA_CMD, DMA_RUN)
        assert a.read_memory(RAM_IOVA + 0x8000, len(pattern)) == pattern


IDIO, PLX = 2, 1


@pytest.mark.parametrize("two", [("gpio-pci-idio-16",)], indirect=True)
def test_idio16_moves_between_processes(two: tuple[CliServer, CliServer]) -> None:
    src, dst = two
    with src.client() as a, dst.client() as b:
        a.bar_read(IDIO, 2, 1)  # a read enables the interrupt
        a.bar_read(IDIO, 3, 1)  # and activates the filters
        a.bar_write(IDIO, 0, 1, 0xA5)
        a.bar_write(IDIO, 4, 1, 0x3C)
        a.bar_write(PLX, 0x4C, 4, 0x43)
        regs = [a.bar_read(IDIO, off, 1) for off in (0, 1, 4, 5, 6)] + [
            a.bar_read(PLX, 0x4C, 4)]
        assert regs[:3] == [0xA5, regs[1], 0x3C]
        a.migrate_to(b)
        assert [b.bar_read(IDIO, off, 1) for off in (0, 1, 4, 5, 6)] + [
            b.bar_read(PLX, 0x4C, 4)] == regs
        b.bar_write(IDIO, 0, 1, 0x0F)
        assert b.bar_read(IDIO, 0, 1) == 0x0F


def nvme_msix(c: Client, vectors: int = 2) -> list[int]:
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]
    c.set_irqs(IrqIndex.MSIX, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, 0,
               vectors, fds)
    return fds


@pytest.mark.parametrize("two", [("nvme", "--image", "IMAGE")], indirect=True)
def test_nvme_moves_between_processes(two: tuple[CliServer, CliServer]) -> None:
    src, dst = two
    with src.client() as a, dst.client() as b:
        a.add_memory(0, RAM)
        fds_b = nvme_msix(b)  # the destination's interrupts, set up as QEMU's would be
        cap = find_capability(a, MSIX_CAP_ID)
        a.config_write(cap + 2, 2, a.config_read(cap + 2, 2) | 0x8000)
        fds_a = nvme_msix(a)
        d = Driver(a, cast(NvmeController, None))
        d.enable()
        d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 0))
        d.create_queues(1)
        patterns = [bytes([n]) * 4096 for n in range(1, 5)]
        for n, pattern in enumerate(patterns):
            a.write_memory(DATA, pattern)
            assert d.rw(1, IoOpcode.WRITE, 8 * n, 8).status == 0
        assert a.eventfd_count(fds_a[1]) >= 1
        # one more write in the submission queue, its doorbell not rung yet
        a.write_memory(DATA, b"\x77" * 4096)
        d.submit(1, IoOpcode.WRITE, nsid=1, prp1=DATA, cdw=(32, 0, 7), ring=False)
        regs = [d.r32(off) for off in (0x14, 0x1C, 0x24)] + [d.r64(0x28), d.r64(0x30)]
        a.set_mig_state(S.STOP)
        # a stopped device takes no doorbell: it is rung on the destination, after the move
        assert refused(a.bar_write, 0, 0x1008, 4, d.sq[1][2]) == errno.EBUSY
        a.migrate_to(b)
        d.c = b  # the driver goes on with the same queues, on the destination
        assert [d.r32(off) for off in (0x14, 0x1C, 0x24)] + [d.r64(0x28), d.r64(0x30)] == regs
        d.ring_sq(1)  # the carried SQ and its doorbell: the destination fetches the write
        e = d.poll(1)
        d.ring_cq(1)
        assert e.status == 0
        wait_until(lambda: b.eventfd_count(fds_b[1]) >= 1, WAIT, "the destination's MSI-X")
        for n, pattern in enumerate([*patterns, b"\x77" * 4096]):
            b.write_memory(DATA, bytes(4096))
            assert d.rw(1, IoOpcode.READ, 8 * n, 8).status == 0
            assert b.read_memory(DATA, 4096) == pattern
        assert len(d.identify(1)) == 4096  # the admin queue came along too
        for fd in fds_a + fds_b:
            os.close(fd)
