"""Device state: save_state / load_state round trips, behaviour after a load, refusals."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest
from helpers import MSI_CAP_ID, MSIX_CAP_ID, find_capability
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_nvme import ASQ, DATA, RAM, Rig

from vfio_user_devices.edu import Edu
from vfio_user_devices.idio16 import PciIdio16
from vfio_user_devices.nvme import NvmeController
from vfio_user_devices.nvme_spec import AdminOpcode, Feature, IoOpcode
from vfio_user_server import state as state_mod
from vfio_user_server.client import MemoryRegion
from vfio_user_server.device import PciDevice, state_dma_maps
from vfio_user_server.errors import DeviceDefinitionError, StateError, VfioUserError
from vfio_user_server.pci import Bar
from vfio_user_server.protocol.constants import IrqIndex, IrqSetFlag
from vfio_user_server.testing import serve


class Leds(PciDevice):
    """A device with declared fields of every kind."""

    vendor_id = 0x1B36
    device_id = 0x1234
    bars: ClassVar = {0: Bar(4096)}
    msix_vectors = 4
    msix_table_offset = 0x800
    state_fields: ClassVar[tuple[str, ...]] = ("leds", "name", "blob", "buf", "table",
                                                "history", "maybe", "on")

    def __init__(self) -> None:
        super().__init__()
        self.leds = 0
        self.name = "x"
        self.blob = b""
        self.buf = bytearray(4)
        self.table: dict[int | str, Any] = {}
        self.history: list[Any] = []
        self.maybe: int | None = None
        self.on = False

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        return self.leds

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.leds = value


def _fill(d: Leds) -> None:
    d.leds = 0xA5
    d.name = "blink é"
    d.blob = bytes(range(256))
    d.buf[:] = b"\x01\x02\x03\x04"
    d.table = {1: [1, 2, {"x": None}], "k": b"\x00\xff", -3: True}
    d.history = [[1, "a"], [], (2, 3)]
    d.maybe = 7
    d.on = True


def _rebuild(body: dict[str, Any]) -> bytes:
    """A state with a valid checksum around ``body`` (what a hostile peer can make)."""
    return state_mod.encode(body)


def _body(data: bytes) -> dict[str, Any]:
    return json.loads(data)["body"]  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ round trips

def test_declared_fields_round_trip() -> None:
    a = Leds()
    _fill(a)
    data = a.save_state()
    b = Leds()
    b.load_state(data)
    assert b.save_state() == data
    assert (b.leds, b.name, b.blob, b.maybe, b.on) == (0xA5, "blink é", bytes(range(256)), 7,
                                                        True)
    assert isinstance(b.buf, bytearray) and b.buf == b"\x01\x02\x03\x04"
    assert b.table == {1: [1, 2, {"x": None}], "k": b"\x00\xff", -3: True}
    assert list(b.table) == [1, "k", -3]
    assert b.history == [[1, "a"], [], [2, 3]]  # a tuple comes back as a list
    doc = json.loads(data)
    assert doc["format"] == state_mod.FORMAT
    assert doc["format_version"] == state_mod.FORMAT_VERSION
    assert doc["body"]["state_version"] == 1
    assert doc["body"]["dma_maps"] == []


@pytest.mark.parametrize("make", [Edu, PciIdio16, lambda: NvmeController(size=1 << 20,
                                                                         serial="S")])
def test_fresh_device_round_trip(make: Any) -> None:
    a = make()
    data = a.save_state()
    b = make()
    b.load_state(data)
    assert b.save_state() == data


def test_config_msix_and_irq_state_survive(tmp_path: Path) -> None:
    """MSI-X table, PBA, masks, pending bits and config bytes, through two servers."""
    with serve(Leds(), enable=True) as s:
        c = s.client
        cap = find_capability(c, MSIX_CAP_ID)
        c.config_write(cap + 2, 2, c.config_read(cap + 2, 2) | 0x8000)
        fds = c.enable_msix(4)
        for v in range(4):  # program the table through the BAR: address, data, unmasked
            c.bar_write(0, 0x800 + 16 * v, 4, 0xFEE00000 + 4 * v)
            c.bar_write(0, 0x800 + 16 * v + 8, 4, 0x40 + v)
            c.bar_write(0, 0x800 + 16 * v + 12, 4, 1 if v == 2 else 0)
        c.bar_write(0, 0, 4, 0x5A)
        assert s.device.interrupt(2) is False  # masked: pending
        c.set_irqs(IrqIndex.MSIX, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_MASK, 3, 1)
        assert s.device.interrupt(3) is False
        c.config_write(0x3C, 1, 0x0B)  # interrupt line
        before_cfg = c.region_read(7, 0, 256)
        before_table = c.region_read(0, 0x800, 4 * 16 + 8)
        data = s.device.save_state()
        for fd in fds:
            os.close(fd)
    b = Leds()
    with serve(b) as s2:
        s2.device.load_state(data)
        c2 = s2.client
        assert c2.region_read(7, 0, 256) == before_cfg
        assert c2.region_read(0, 0x800, 4 * 16 + 8) == before_table
        assert c2.bar_read(0, 0, 4) == 0x5A
        assert b.msix is not None and b.msix.enabled
        assert b.msix.table.pending_vectors() == [2, 3]
        st3 = b.irqs.state(IrqIndex.MSIX)
        assert st3.masked == (False, False, False, True)
        assert st3.pending == (False, False, True, True)
        # behaviour: unmasking vector 2 in the table delivers its pending interrupt
        fds2 = c2.enable_msix(4)
        c2.bar_write(0, 0x800 + 16 * 2 + 12, 4, 0)
        assert c2.eventfd_count(fds2[2]) == 1
        assert b.msix.table.pending_vectors() == [3]
        for fd in fds2:
            os.close(fd)


def test_bar_sizing_and_power_state_survive() -> None:
    """A BAR in the middle of sizing and the PM state are in the config bytes."""
    with serve(Leds()) as s:
        c = s.client
        c.config_write(0x10, 4, 0xFFFFFFFF)
        sizing = c.config_read(0x10, 4)
        pm = find_capability(c, 0x01)
        c.config_write(pm + 4, 2, 3)  # D3hot
        data = s.device.save_state()
    b = Leds()
    with serve(b) as s2:
        b.load_state(data)
        assert s2.client.config_read(0x10, 4) == sizing == 0xFFFFF000
        assert s2.client.config_read(pm + 4, 2) & 3 == 3
        s2.client.config_write(0x10, 4, 0xFEB00000)
        assert b.config.bar_address(0) == 0xFEB00000


def test_edu_registers_and_msi_after_load() -> None:
    a = Edu()
    with serve(a, memory=1 << 20, enable=True) as s:
        c = s.client
        cap = find_capability(c, MSI_CAP_ID)
        c.config_write(cap + 4, 4, 0xFEE00000)
        c.config_write(cap + 2, 2, c.config_read(cap + 2, 2) | 1)
        c.bar_write(0, 0x04, 4, 0x1234)
        c.bar_write(0, 0x80, 8, 0x40000)
        c.bar_write(0, 0x88, 8, 0x1000)
        c.bar_write(0, 0x90, 8, 16)
        c.write_memory(0x2000, b"0123456789abcdef")
        c.bar_write(0, 0x80, 8, 0x2000)
        c.bar_write(0, 0x88, 8, 0x40000)
        c.bar_write(0, 0x98, 8, 1)  # RAM -> device buffer
        c.bar_write(0, 0x08, 4, 10)  # factorial: quiesce waits for both
        data = a.save_state()
        regs = [c.bar_read(0, off, 4) for off in (0, 4, 8, 0x20, 0x24)]
        regs += [c.bar_read(0, off, 8) for off in (0x80, 0x88, 0x90, 0x98)]
    assert a.dma_buffer[:16] == b"0123456789abcdef"
    b = Edu()
    with serve(b, memory=1 << 20) as s2:
        b.load_state(data)
        c2 = s2.client
        got = [c2.bar_read(0, off, 4) for off in (0, 4, 8, 0x20, 0x24)]
        got += [c2.bar_read(0, off, 8) for off in (0x80, 0x88, 0x90, 0x98)]
        assert got == regs
        assert b.msi is not None and b.msi.enabled
        # the device buffer came along: DMA it back out to RAM
        c2.bar_write(0, 0x80, 8, 0x40000)
        c2.bar_write(0, 0x88, 8, 0x3000)
        c2.config_write(4, 2, c2.config_read(4, 2) | 4)  # a fresh guest-side COMMAND.MASTER
        c2.bar_write(0, 0x98, 8, 1 | 2)
        b.wait_idle()
        assert c2.read_memory(0x3000, 16) == b"0123456789abcdef"


def test_idio16_after_load() -> None:
    a = PciIdio16(inputs=0x00F0)
    with serve(a, enable=True) as s:
        c = s.client
        c.bar_write(2, 0, 1, 0x3C)  # outputs 0-7
        c.bar_read(2, 2, 1)  # enable the interrupt
        a.set_input(0, True)
        data = a.save_state()
        regs = [c.bar_read(2, off, 1) for off in range(8)]
    b = PciIdio16()
    b.load_state(data)
    assert (b.outputs, b.inputs, b.irq_enabled, b.irq_pending) == (0x3C, 0x00F1, True, True)
    assert b.intx_level == a.intx_level
    with serve(b) as s2:
        assert [s2.client.bar_read(2, off, 1) for off in range(8)] == regs


# --------------------------------------------------------------------------------- NVMe

def test_nvme_io_continues_on_restored_queues(image: Path) -> None:
    """Save with a write submitted but not fetched; the loading controller, on the same guest
    memory, completes it and goes on with the same queues."""
    pattern = bytes(range(256)) * 16
    a = NvmeController(image, serial="STATE1")
    stack = contextlib.ExitStack()
    s1 = stack.enter_context(serve(a, memory=RAM, fd_backed=True))
    rig = Rig(s1)
    try:
        rig.d.enable()
        rig.d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 3 | 3 << 16))
        fds = rig.msix()
        rig.d.create_queues(1)
        rig.c.write_memory(DATA, pattern)
        assert rig.d.rw(1, IoOpcode.WRITE, 0, 8).status == 0
        with a.quiesced():
            rig.c.write_memory(DATA, pattern[::-1])
            cid = rig.d.submit(1, IoOpcode.WRITE, nsid=1, prp1=DATA, cdw=(8, 0, 7))
            regs = [rig.d.r32(off) for off in (0x14, 0x1C, 0x24)]  # also syncs the doorbell
            assert a.sqs[1].tail != a.sqs[1].head
            data = a.save_state()
            region = rig.c.memory[0]
            assert region.fd is not None
            keep = os.dup(region.fd)
            stack.close()
        for fd in fds:
            os.close(fd)
    finally:
        stack.close()
        a.close()
    maps = state_dma_maps(data)
    assert [(m.iova, m.size, m.fd) for m in maps] == [(0, RAM, True)]
    b = NvmeController(image)
    try:
        with serve(b) as s2:
            c2 = s2.client
            c2.dma_map(0, RAM, 3, fd=os.dup(keep))
            c2.memory.append(MemoryRegion(0, RAM, keep, mmap.mmap(keep, RAM), 3))
            rig2 = Rig(s2)
            rig2.d.sq, rig2.d.cq, rig2.d.cids = rig.d.sq, rig.d.cq, rig.d.cids
            fds2 = c2.enable_msix(17)
            b.load_state(data)
            assert b.serial == "STATE1"
            assert [rig2.d.r32(off) for off in (0x14, 0x1C, 0x24)] == regs
            e = rig2.d.poll(1)  # the carried write, fetched by the new controller
            rig2.d.ring_cq(1)
            assert (e.cid, e.status) == (cid, 0)
            assert c2.eventfd_count(fds2[1]) >= 1
            c2.write_memory(DATA, bytes(len(pattern)))
            assert rig2.d.rw(1, IoOpcode.READ, 0, 8).status == 0
            assert c2.read_memory(DATA, len(pattern)) == pattern
            assert rig2.d.rw(1, IoOpcode.READ, 8, 8).status == 0
            assert c2.read_memory(DATA, len(pattern)) == pattern[::-1]
            assert len(rig2.d.identify(1)) == 4096  # admin queue too
            assert b.sqs[0].base == ASQ
            for fd in fds2:
                os.close(fd)
    finally:
        b.close()


@pytest.mark.parametrize("fd_backed", [True, False])
def test_nvme_state_is_saved_between_commands(image: Path, fd_backed: bool) -> None:
    """Saved while commands run (by message DMA too): every fetched command is completed in
    the state, the others are still submitted (SQ tail ahead of head)."""
    a = NvmeController(image)
    try:
        with serve(a, memory=RAM, fd_backed=fd_backed) as s:
            rig = Rig(s)
            rig.d.enable()
            rig.d.ok(0, AdminOpcode.SET_FEATURES, cdw=(Feature.NUMBER_OF_QUEUES, 3 | 3 << 16))
            rig.d.create_queues(1)
            n = 24
            for i in range(n):
                rig.d.submit(1, IoOpcode.WRITE, nsid=1, prp1=DATA + 4096 * i,
                             cdw=(8 * i, 0, 7), ring=False)
            rig.d.ring_sq(1)
            rig.d.r32(0x1C)  # the (posted) doorbell has arrived
            with a.quiesced():
                data = a.save_state()
                posted = sum(1 for i in range(n)
                             if rig.c.read_memory(rig.d.cq[1][0] + 16 * i + 14, 2)[0] & 1)
            queues: Any = state_mod.decode_value(_body(data)["fields"]["queue_state"])
            (sq,) = [q for q in queues["sqs"] if q[0] == 1]
            (cq,) = [q for q in queues["cqs"] if q[0] == 1]
            assert (sq[4], cq[6]) == (posted, posted), (sq, cq, posted)  # SQ head, CQ tail
            assert sq[5] == n
            for _ in range(n):  # and the rest completes after resume
                assert rig.d.poll(1).status == 0
    finally:
        a.close()


def test_nvme_refuses_other_geometry_and_bad_queues() -> None:
    a = NvmeController(size=1 << 20, serial="G")
    data = a.save_state()
    other = NvmeController(size=2 << 20, serial="G")
    before = other.save_state()
    with pytest.raises(StateError, match="blocks"):
        other.load_state(data)
    assert other.save_state() == before
    body = _body(data)
    fields = body["fields"]
    queues: Any = state_mod.decode_value(fields["queue_state"])
    assert isinstance(queues, dict)
    bads: list[Any] = [
        {**queues, "cqs": [[0, 0x1000, 4, 0, True, 9, 0, 1, [0]]],
         "sqs": [[0, 0x2000, 4, 0, 0, 0]]},                       # head beyond size
        {**queues, "sqs": [[1, 0x2000, 4, 7, 0, 0]]},             # CQ 7 missing
        {**queues, "cqs": [[0, 0x1000, 1 << 20, 0, True, 0, 0, 1, []]]},  # too large
        {**queues, "held_aers": list(range(10))},
    ]
    for bad in bads:
        fields["queue_state"] = state_mod.encode_value(bad)
        b = NvmeController(size=1 << 20, serial="G")
        ref = b.save_state()
        with pytest.raises(StateError):
            b.load_state(_rebuild(body))
        assert b.save_state() == ref


# ------------------------------------------------------------------------------ refusals

def test_version_mismatch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = Edu().save_state()
    monkeypatch.setattr(Edu, "state_version", 2)
    b = Edu()
    b.liveness = 5
    before = b.save_state()
    with pytest.raises(StateError, match=r"state version 1.*reads version 2"):
        b.load_state(data)
    assert b.save_state() == before
    doc = json.loads(data)
    doc["format_version"] = 2
    with pytest.raises(StateError, match="format version 2"):
        b.load_state(json.dumps(doc).encode())


def test_other_device_is_refused() -> None:
    data = PciIdio16().save_state()
    e = Edu()
    before = e.save_state()
    with pytest.raises(StateError, match="another device"):
        e.load_state(data)
    assert e.save_state() == before
    body = _body(Edu().save_state())
    body["device"]["device_id"] = 0x1111  # IDs are checked, not only the class
    with pytest.raises(StateError, match="another device"):
        e.load_state(_rebuild(body))


def test_corrupt_and_truncated_states_are_refused() -> None:
    a = Leds()
    _fill(a)
    data = a.save_state()
    b = Leds()
    before = b.save_state()
    for cut in (0, 1, len(data) // 3, len(data) // 2, len(data) - 1):
        with pytest.raises(StateError):
            b.load_state(data[:cut])
    for pos in (10, len(data) // 2, len(data) - 10):
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        with pytest.raises(StateError):
            b.load_state(bytes(flipped))
    with pytest.raises(StateError):
        b.load_state("not bytes")  # type: ignore[arg-type]
    with pytest.raises(StateError, match="exceeds"):
        b.load_state(b" " * (state_mod.MAX_STATE_SIZE + 1))
    assert b.save_state() == before


@pytest.mark.parametrize("mutate", [
    lambda b: b["fields"].update(leds="five"),                       # wrong kind
    lambda b: b["fields"].update(blob={"bytes": "!!"}),              # bad base64
    lambda b: b["fields"].update(table={"dict": [[1, 2], [1, 3]]}),  # repeated key
    lambda b: b["fields"].update(table={"set": [1]}),                # unknown tag
    lambda b: b["fields"].pop("leds"),                               # missing field
    lambda b: b["fields"].update(extra=1),                           # unknown field
    lambda b: b["config"].update(bytes=b["config"]["bytes"][:-8]),   # short config
    lambda b: b.update(msix=None),                                   # MSI-X missing
    lambda b: b["msix"].update(pending=1 << 9),                      # beyond the vectors
    lambda b: b["irqs"]["vectors"]["MSIX"].update(masked=[True]),    # wrong count
    lambda b: b.update(dma_maps=[{"iova": -1}]),
    lambda b: b.update(state_version=True),
])
def test_hostile_bodies_are_refused(mutate: Any) -> None:
    a = Leds()
    _fill(a)
    body = _body(a.save_state())
    mutate(body)
    b = Leds()
    before = b.save_state()
    with pytest.raises(StateError):
        b.load_state(_rebuild(body))
    assert b.save_state() == before


def test_hostile_config_bytes_are_refused() -> None:
    import base64
    body = _body(Leds().save_state())
    cfg = bytearray(base64.b64decode(body["config"]["bytes"]))
    cfg[0x34] ^= 0x08  # another capability pointer
    body["config"]["bytes"] = base64.b64encode(bytes(cfg)).decode()
    with pytest.raises(StateError, match="differ"):
        Leds().load_state(_rebuild(body))


def test_json_tricks_are_refused() -> None:
    b = Leds()
    good = json.loads(Leds().save_state())
    for text in (
        '{"format": "pyvfio-user/device-state", "format": 1}',
        json.dumps({**good, "format_version": 1.0}),
        '[' * 100000 + ']' * 100000,
        json.dumps({**good, "extra": 1}),
        '{"a": NaN}',
    ):
        with pytest.raises(StateError):
            b.load_state(text.encode())
    deep: Any = 0
    for _ in range(state_mod.MAX_DEPTH + 2):
        deep = [deep]
    body = _body(Leds().save_state())
    body["fields"]["history"] = deep
    with pytest.raises(StateError, match="deeper"):
        b.load_state(_rebuild(body))


def test_failed_apply_rolls_back() -> None:
    class Picky(Leds):
        state_fields = ("picky",)

        def __init__(self) -> None:
            self._picky = 0
            super().__init__()

        @property
        def picky(self) -> int:
            return self._picky

        @picky.setter
        def picky(self, value: int) -> None:
            if value == 13:
                raise ValueError("unlucky")
            self._picky = value

    a = Picky()
    _fill(a)
    a._picky = 13
    data = a.save_state()
    b = Picky()
    b.leds = 3
    before = b.save_state()
    with pytest.raises(StateError, match="unlucky"):
        b.load_state(data)
    assert b.save_state() == before and b.leds == 3


def test_unsaveable_values_and_bad_declarations() -> None:
    a = Leds()
    a.maybe = 1.5  # type: ignore[assignment]
    with pytest.raises(StateError, match="float"):
        a.save_state()
    with pytest.raises(DeviceDefinitionError):
        type("Bad", (Leds,), {"state_fields": "leds"})
    with pytest.raises(DeviceDefinitionError):
        type("Bad", (Leds,), {"state_version": -1})


def test_state_error_is_in_the_tree() -> None:
    assert issubclass(StateError, VfioUserError)


# ------------------------------------------------------------------------------ fuzzing

_GOOD = Leds()
_fill(_GOOD)
_GOOD_STATE = _GOOD.save_state()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_bytes_never_half_load(data: st.DataObject) -> None:
    raw = bytearray(_GOOD_STATE)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    raw = raw[:data.draw(st.integers(0, len(raw)))]
    b = Leds()
    before = b.save_state()
    try:
        b.load_state(bytes(raw))
    except StateError:
        assert b.save_state() == before
    else:
        assert b.save_state() == _GOOD_STATE


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["device", "state_version", "config", "msix", "irqs", "dma_maps",
                        "fields"]), _json)
def test_fuzzed_bodies_never_half_load(key: str, value: Any) -> None:
    """A peer that signs whatever it likes: each part replaced by arbitrary JSON."""
    body = _body(_GOOD_STATE)
    body[key] = value
    b = Leds()
    before = b.save_state()
    try:
        b.load_state(_rebuild(body))
    except StateError:
        assert b.save_state() == before
    else:  # only what the good state holds there (or DMA maps, which are not loaded)
        assert b.save_state() == _GOOD_STATE


_NVME = NvmeController(size=1 << 20, serial="F")
_NVME_STATE = _NVME.save_state()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["queue_state", "features", "temperature_thresholds", "cc", "stats"]),
       _json)
def test_fuzzed_nvme_fields_never_half_load(key: str, value: Any) -> None:
    body = _body(_NVME_STATE)
    body["fields"][key] = state_mod.encode_value(value)
    before = _NVME.save_state()
    try:
        _NVME.load_state(_rebuild(body))
    except StateError:
        assert _NVME.save_state() == before
    else:
        _NVME.load_state(before)


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.integers() | st.text(max_size=4), children, max_size=4),
    max_leaves=20))
def test_value_codec_round_trips(value: Any) -> None:
    encoded = state_mod.encode_value(value)
    assert state_mod.decode_value(json.loads(json.dumps(encoded))) == value
