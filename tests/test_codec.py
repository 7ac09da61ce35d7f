"""Codec round trips: the sans-IO core (framing: test_framing.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfio_user_server.errors import ClientError, EncodeError, ProtocolError
from vfio_user_server.protocol import codec
from vfio_user_server.protocol.constants import Command, RegionInfoFlag
from vfio_user_server.protocol.structs import (
    COMMANDS,
    DmaMap,
    Header,
    IrqSet,
    RegionAccess,
    RegionInfo,
    WireStruct,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


@given(u16, u16, u32, u32, u32)
def test_header_round_trip(msg_id: int, cmd: int, size: int, flags: int, err: int) -> None:
    h = Header(msg_id, cmd, size, flags, err)
    assert Header.unpack(h.pack()) == h
    assert len(h.pack()) == 16


@given(u32, u32, u64, u64, u64)
def test_dma_map_round_trip(argsz: int, flags: int, off: int, addr: int, size: int) -> None:
    m = DmaMap(argsz, flags, off, addr, size)
    assert DmaMap.unpack(m.pack()) == m


def test_every_table_struct_round_trips() -> None:
    seen: set[type[WireStruct]] = set()
    for spec in COMMANDS.values():
        for cls in (spec.request, spec.reply):
            if cls is None or cls in seen:
                continue
            seen.add(cls)
            values = []
            for ch in cls.STRUCT.format.lstrip("<"):
                values.append(b"abcdefgh" if ch == "s" else 1)
            obj = cls(*values)
            assert cls.unpack(obj.pack()) == obj
    assert len(seen) >= 10


def test_short_buffer_is_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        RegionInfo.unpack(b"\0" * 31)


def test_out_of_range_value_is_a_local_encode_error() -> None:
    with pytest.raises(EncodeError) as exc:
        Header(1 << 16, 0, 16, 0, 0).pack()
    assert not isinstance(exc.value, ClientError)  # our own bug, never blamed on the peer


def test_version_round_trip_and_errors() -> None:
    payload = codec.encode_version(0, 0, {"max_msg_fds": 8})
    assert codec.decode_version(payload) == (0, 0, {"max_msg_fds": 8})
    assert codec.decode_version(b"\0\0\0\0") == (0, 0, {})
    with pytest.raises(ProtocolError):
        codec.decode_version(b"\0\0\0\0{}")  # no NUL
    with pytest.raises(ProtocolError):
        codec.decode_version(b"\0\0\0\0[1]\0")
    with pytest.raises(ProtocolError):
        codec.decode_version(b"\0\0\0\0{bad\0")


def test_region_info_argsz_retry_rule() -> None:
    areas = [(0, 4096), (8192, 4096)]
    short, full = codec.encode_region_info(32, 0, 7, 16384, 0, sparse_areas=areas)
    assert not full and len(short) == 32
    info = RegionInfo.unpack(short)
    assert info.argsz == 32 + 8 + 8 + 32 and not info.flags & RegionInfoFlag.CAPS
    payload, full = codec.encode_region_info(info.argsz, 0, 7, 16384, 0, sparse_areas=areas)
    assert full and len(payload) == info.argsz
    parsed, sparse, mappable = codec.decode_region_info(payload)
    assert sparse == areas and not mappable
    assert parsed.flags & RegionInfoFlag.CAPS and parsed.cap_offset == 32
    both, full = codec.encode_region_info(200, 0, 7, 16384, 0, sparse_areas=areas,
                                          msix_mappable=True)
    assert full and len(both) == 32 + 48 + 8
    _, sparse, mappable = codec.decode_region_info(both)
    assert sparse == areas and mappable


def test_irq_set_and_region_access_sizes() -> None:
    assert IrqSet.SIZE == 20
    assert RegionAccess.SIZE == 16
    assert RegionInfo.SIZE == 32


def test_request_sizes_follow_the_command_table() -> None:
    # a fixed structure is required; nothing may follow it where the table says so
    codec.check_request_size(Command.DEVICE_GET_INFO, bytes(16))
    codec.check_request_size(Command.DEVICE_RESET, b"")
    codec.check_request_size(Command.REGION_WRITE, bytes(16 + 4))  # data follows
    for command, payload in ((Command.DEVICE_GET_INFO, bytes(15)),
                             (Command.DEVICE_GET_INFO, bytes(17)),
                             (Command.REGION_READ, bytes(20)),
                             (Command.DEVICE_RESET, b"x")):
        with pytest.raises(ProtocolError):
            codec.check_request_size(command, payload)
