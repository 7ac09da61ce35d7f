"""ConfigSpace and the type-0 header: masks, RW1C, hooks, bounds, reset."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfio_user_server.errors import ConfigSpaceError, DeviceDefinitionError, VfioUserError
from vfio_user_server.pci import Bar, ConfigSpace, Header, PciConfig, PowerManagement

HEADER = Header(
    vendor_id=0x1B36,
    device_id=0x1234,
    revision=0x05,
    class_code=0x018002,
    subsystem_vendor_id=0x1AF4,
    subsystem_id=0x1100,
    interrupt_pin=1,
    cache_line_size=0x10,
)


def _expected_header_masks(express: bool) -> tuple[bytearray, bytearray]:
    """The header's write and RW1C masks, written out from the spec (not from the code)."""
    wmask = bytearray(64)
    w1c = bytearray(64)
    wmask[0x04] = 0x47  # IO, MEM, MASTER, PARITY(6)
    wmask[0x05] = 0x05  # SERR(8), INTX_DISABLE(10)
    w1c[0x07] = 0xF9  # bits 8, 11..15
    wmask[0x0C] = 0xFF  # cache line size
    wmask[0x0D] = 0x00 if express else 0xFF  # latency timer
    wmask[0x3C] = 0xFF  # interrupt line
    return wmask, w1c


def _make(express: bool = False, caps: bool = False) -> PciConfig:
    return PciConfig(HEADER, capabilities=[PowerManagement()] if caps else [], express=express)


def _apply(
    model: bytearray, wmask: bytes | bytearray, w1c: bytes | bytearray, offset: int, data: bytes
) -> None:
    for i, value in enumerate(data):
        pos = offset + i
        old = model[pos]
        model[pos] = ((old & ~wmask[pos]) | (value & wmask[pos])) & ~(value & w1c[pos]) & 0xFF


def test_header_initial_values() -> None:
    config = _make()
    space = config.space
    assert config.size == 256
    assert space.u16(0x00) == 0x1B36
    assert space.u16(0x02) == 0x1234
    assert space.u8(0x08) == 0x05
    assert space.get(0x09, 3) == 0x018002
    assert space.u8(0x0E) == 0  # header type 0
    assert space.u16(0x2C) == 0x1AF4
    assert space.u16(0x2E) == 0x1100
    assert space.u8(0x3D) == 1
    assert space.u8(0x0C) == 0x10
    assert space.u16(0x04) == 0
    assert space.u16(0x06) == 0  # no capabilities: CAP_LIST clear
    assert space.u8(0x34) == 0


def test_capability_list_bit_set_when_there_are_capabilities() -> None:
    config = _make(caps=True)
    assert config.space.u16(0x06) & 0x10
    assert config.space.u8(0x34) == 0x40


def test_multifunction_bit() -> None:
    config = PciConfig(Header(vendor_id=1, device_id=2, multifunction=True))
    assert config.space.u8(0x0E) == 0x80


@pytest.mark.parametrize("express", [False, True])
def test_header_masks_match_spec(express: bool) -> None:
    config = _make(express=express)
    wmask, w1c = _expected_header_masks(express)
    # BAR and ROM registers are tested in test_pci_bars.py: no BARs here, so they are RO 0.
    assert bytes(config.space.wmask[:64]) == bytes(wmask)
    assert bytes(config.space.w1cmask[:64]) == bytes(w1c)


@pytest.mark.parametrize("express", [False, True])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_every_header_offset_all_ones_then_zeros(express: bool, size: int) -> None:
    wmask, w1c = _expected_header_masks(express)
    for offset in range(0, 64 - size + 1):
        config = _make(express=express)
        before = bytearray(config.space.data[:64])
        config.space.set_u16(0x06, 0xF9F8)  # every status bit set, RO ones included
        before[6:8] = (0xF9F8).to_bytes(2, "little")
        model = bytearray(before)
        for pattern in (b"\xff" * size, b"\x00" * size, b"\xa5" * size):
            config.write(offset, pattern)
            _apply(model, wmask, w1c, offset, pattern)
            assert config.read(0, 64) == bytes(model), (offset, size, pattern)


@settings(max_examples=300, deadline=None)
@given(
    express=st.booleans(),
    writes=st.lists(
        st.tuples(
            st.integers(0, 63), st.sampled_from([1, 2, 4]), st.binary(min_size=4, max_size=4)
        ),
        max_size=20,
    ),
    status=st.integers(0, 0xFFFF),
)
def test_random_writes_follow_masks(
    express: bool, writes: list[tuple[int, int, bytes]], status: int
) -> None:
    config = _make(express=express)
    config.space.set_u16(0x06, status)
    wmask, w1c = _expected_header_masks(express)
    model = bytearray(config.space.data[:64])
    for offset, size, payload in writes:
        offset = min(offset, 64 - size)
        data = payload[:size]
        config.write(offset, data)
        _apply(model, wmask, w1c, offset, data)
        got = config.read(0, 64)
        assert got == bytes(model)
        # read-only bits never change
        for pos in range(64):
            ro = ~(wmask[pos] | w1c[pos]) & 0xFF
            assert got[pos] & ro == model[pos] & ro


@settings(max_examples=200, deadline=None)
@given(status=st.integers(0, 0xFFFF), value=st.integers(0, 0xFFFF))
def test_status_rw1c_clears_only_on_one(status: int, value: int) -> None:
    config = _make()
    config.space.set_u16(0x06, status)
    config.write(0x06, value.to_bytes(2, "little"))
    w1c = 0xF900
    assert config.space.u16(0x06) == status & ~(value & w1c)


def test_command_writable_bits() -> None:
    config = _make()
    config.write(0x04, b"\xff\xff")
    assert config.command == 0x0547
    config.write(0x04, b"\x00\x00")
    assert config.command == 0


def test_interrupt_line_rw_pin_ro() -> None:
    config = _make()
    config.write(0x3C, b"\x0b\x04")
    assert config.space.u8(0x3C) == 0x0B
    assert config.space.u8(0x3D) == 1


def test_interrupt_status_bit_is_device_controlled() -> None:
    config = _make()
    config.set_interrupt_status(True)
    assert config.space.u16(0x06) & 0x08
    config.write(0x06, b"\xff\xff")  # RO for the client
    assert config.space.u16(0x06) & 0x08
    config.set_interrupt_status(False)
    assert not config.space.u16(0x06) & 0x08


@pytest.mark.parametrize("size", [256, 4096])
def test_whole_space_read_and_bounds(size: int) -> None:
    config = _make(express=size == 4096)
    assert config.size == size
    assert len(config.read(0, size)) == size
    assert config.read(0, size)[:4] == bytes.fromhex("361b3412")
    for offset, length in [(size, 1), (size - 1, 2), (size - 3, 4), (-1, 1), (0, size + 1)]:
        with pytest.raises(ConfigSpaceError):
            config.read(offset, length)
        with pytest.raises(ConfigSpaceError):
            config.write(offset, b"\x00" * max(length, 0))
    # ConfigSpaceError is part of the package's hierarchy
    assert issubclass(ConfigSpaceError, VfioUserError)
    # a big write of the whole space only changes writable bits
    before = config.read(0, size)
    config.write(0, b"\x00" * size)
    after = config.read(0, size)
    assert after[:4] == before[:4]


def test_bad_space_size() -> None:
    with pytest.raises(DeviceDefinitionError):
        ConfigSpace(512)


def test_device_side_setters_bypass_masks() -> None:
    space = ConfigSpace(256)
    space.set_u32(0x40, 0xDEADBEEF)
    assert space.u32(0x40) == 0xDEADBEEF
    assert space.u16(0x42) == 0xDEAD
    assert space.u8(0x40) == 0xEF
    space.write(0x40, b"\x00\x00\x00\x00")  # wmask 0: ignored
    assert space.u32(0x40) == 0xDEADBEEF
    with pytest.raises(ValueError):
        space.set_u8(0, 0x100)


def test_write_hook_receives_overlap_and_old_bytes() -> None:
    space = ConfigSpace(256)
    space.define(0x40, 4, 0x11223344, wmask=0xFFFFFFFF)
    calls: list[tuple[int, int, bytes, bytes]] = []

    def hook(offset: int, length: int, old: bytes) -> None:
        calls.append((offset, length, old, bytes(space.data[offset : offset + length])))

    space.on_write(0x42, 0x44, hook)
    space.write(0x40, b"\xaa")  # no overlap
    assert calls == []
    space.write(0x41, b"\xbb\xcc\xdd")  # overlaps 0x42..0x43
    assert calls == [(0x42, 2, b"\x22\x11", b"\xcc\xdd")]


def test_read_hook_refreshes_before_copy() -> None:
    space = ConfigSpace(256)
    counter = [0]

    def refresh(offset: int, length: int) -> None:
        counter[0] += 1
        space.set_u8(0x50, counter[0])

    space.on_read(0x50, 0x51, refresh)
    assert space.read(0x50, 1) == b"\x01"
    assert space.read(0x4C, 8)[4] == 2
    assert space.read(0x40, 4) == b"\x00" * 4
    assert counter[0] == 2


def test_reset_restores_power_on_and_keeps_ids() -> None:
    config = _make()
    config.write(0x04, b"\x07\x04")
    config.write(0x3C, b"\x0a")
    config.write(0x0C, b"\x20")
    config.space.set_u16(0x2E, 0x4242)  # device changed its subsystem ID at runtime
    config.reset()
    assert config.command == 0
    assert config.space.u8(0x3C) == 0
    assert config.space.u8(0x0C) == 0x10
    assert config.space.u16(0x00) == 0x1B36
    assert config.space.u16(0x2E) == 0x4242


def test_reset_before_capture_fails() -> None:
    with pytest.raises(ConfigSpaceError):
        ConfigSpace(256).reset()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vendor_id": 0x10000, "device_id": 0},
        {"vendor_id": 0xFFFF, "device_id": 0},
        {"vendor_id": 1, "device_id": 1, "interrupt_pin": 5},
        {"vendor_id": 1, "device_id": 1, "class_code": 1 << 24},
    ],
)
def test_header_definition_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(DeviceDefinitionError):
        Header(**kwargs)


def test_define_rejects_bits_both_rw_and_rw1c() -> None:
    with pytest.raises(DeviceDefinitionError):
        ConfigSpace(256).define(0x40, 1, wmask=0x3, w1cmask=0x2)


def test_bars_in_header_do_not_affect_other_fields() -> None:
    config = PciConfig(HEADER, bars=[Bar(4096)])
    config.write(0x10, b"\xff" * 0x30)
    assert config.space.u16(0x00) == 0x1B36
    assert config.space.u8(0x3D) == 1
