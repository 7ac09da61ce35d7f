"""BAR and expansion ROM registers: sizing, types, 64-bit pairs, definition errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfio_user_server.errors import DeviceDefinitionError
from vfio_user_server.pci import Bar, BarTable, Header, PciConfig

HEADER = Header(vendor_id=0x1B36, device_id=0x0001)
ONES = b"\xff\xff\xff\xff"


def _config(bars: dict[int, Bar | None], rom_size: int | None = None) -> PciConfig:
    return PciConfig(HEADER, bars=bars, rom_size=rom_size)


def _size_bar(config: PciConfig, index: int) -> int:
    offset = 0x10 + 4 * index
    config.write(offset, ONES)
    return config.space.u32(offset)


@pytest.mark.parametrize(
    ("bar", "expected"),
    [
        (Bar(16), 0xFFFFFFF0),
        (Bar(4096), 0xFFFFF000),
        (Bar(1 << 20, prefetchable=True), 0xFFF00008),
        (Bar(1 << 31), 0x80000000),
        (Bar(4, kind="io"), 0xFFFFFFFD),
        (Bar(256, kind="io"), 0xFFFFFF01),
        (Bar(0x10000, kind="io"), 0xFFFF0001),
        (Bar(0x4000, kind="mem64"), 0xFFFFC004),
        (Bar(0x4000, kind="mem64", prefetchable=True), 0xFFFFC00C),
    ],
)
@pytest.mark.parametrize("index", [0, 2, 4])
def test_bar_sizing(bar: Bar, expected: int, index: int) -> None:
    config = _config({index: bar})
    # type bits are visible before sizing
    assert config.space.u32(0x10 + 4 * index) == expected & (0x1 if bar.is_io else 0xF)
    assert _size_bar(config, index) == expected
    # ~(readback & mask) + 1 is the size, as the OS computes it
    low = 0x3 if bar.is_io else 0xF
    if not bar.is_64bit:
        assert (~(expected & ~low) + 1) & 0xFFFFFFFF == bar.size


def test_sizing_with_byte_and_word_writes() -> None:
    config = _config({0: Bar(0x1000)})
    for offset in range(0x10, 0x14):
        config.write(offset, b"\xff")
    assert config.space.u32(0x10) == 0xFFFFF000
    config.write(0x10, b"\x00\x00")
    config.write(0x12, b"\x00\x00")
    assert config.space.u32(0x10) == 0


def test_mem64_pair() -> None:
    config = _config({2: Bar(0x4000, kind="mem64")})
    assert config.space.u32(0x18) == 0x4
    assert config.space.u32(0x1C) == 0
    assert _size_bar(config, 2) == 0xFFFFC004
    assert _size_bar(config, 3) == 0xFFFFFFFF  # upper half, size < 4 GiB
    config.write(0x18, (0xFEB00000).to_bytes(4, "little"))
    config.write(0x1C, (0x00000001).to_bytes(4, "little"))
    assert config.bar_address(2) == 0x1_FEB0_0000
    assert config.bar_address(3) == 0  # the upper slot is not a BAR of its own
    assert config.bars.is_upper_half(3)


def test_mem64_larger_than_4g() -> None:
    config = _config({0: Bar(1 << 33, kind="mem64", prefetchable=True)})
    assert _size_bar(config, 0) == 0x0000000C
    assert _size_bar(config, 1) == 0xFFFFFFFE
    assert Bar(1 << 33, kind="mem64").address_mask == 0xFFFFFFFE_00000000


def test_unused_bars_read_zero_and_ignore_writes() -> None:
    config = _config({0: Bar(4096)})
    for index in range(1, 6):
        assert _size_bar(config, index) == 0
        assert config.bar_address(index) == 0


@given(index=st.integers(0, 5), value=st.integers(0, 0xFFFFFFFF))
def test_programmed_address_keeps_type_bits(index: int, value: int) -> None:
    config = _config({index: Bar(0x100)})
    config.write(0x10 + 4 * index, value.to_bytes(4, "little"))
    assert config.space.u32(0x10 + 4 * index) == value & 0xFFFFFF00
    assert config.bar_address(index) == value & 0xFFFFFF00


def test_io_bar_address() -> None:
    config = _config({1: Bar(32, kind="io")})
    config.write(0x14, (0xC041).to_bytes(4, "little"))
    assert config.space.u32(0x14) == 0xC041
    assert config.bar_address(1) == 0xC040


def test_rom_sizing_with_rom() -> None:
    config = _config({}, rom_size=0x10000)
    assert config.space.u32(0x30) == 0
    config.write(0x30, (0xFFFFF800).to_bytes(4, "little"))
    assert config.space.u32(0x30) == 0xFFFF0000
    config.write(0x30, ONES)
    assert config.space.u32(0x30) == 0xFFFF0001
    config.write(0x30, (0xFEB40001).to_bytes(4, "little"))
    assert config.bars.rom_address == 0xFEB40000
    assert config.bars.rom_enabled
    config.reset()
    assert config.space.u32(0x30) == 0


def test_rom_minimum_size() -> None:
    config = _config({}, rom_size=2048)
    config.write(0x30, ONES)
    assert config.space.u32(0x30) == 0xFFFFF801


def test_no_rom_reads_zero() -> None:
    config = _config({})
    config.write(0x30, ONES)
    assert config.space.u32(0x30) == 0
    assert config.bars.rom_address == 0
    assert not config.bars.rom_enabled


def test_reset_clears_bar_addresses() -> None:
    config = _config({0: Bar(0x1000, kind="mem64"), 2: Bar(16, kind="io")})
    config.write(0x10, (0xFE000000).to_bytes(4, "little"))
    config.write(0x18, (0xC001).to_bytes(4, "little"))
    config.reset()
    assert config.space.u32(0x10) == 0x4
    assert config.space.u32(0x18) == 0x1


def test_sequence_form() -> None:
    table = BarTable([Bar(4096), None, Bar(16, kind="io")])
    assert table[0] == Bar(4096)
    assert table[1] is None
    assert table[2] is not None and table[2].is_io
    assert table[5] is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: Bar(3000),
        lambda: Bar(0),
        lambda: Bar(8),  # memory BAR < 16
        lambda: Bar(2, kind="io"),
        lambda: Bar(1 << 17, kind="io"),
        lambda: Bar(16, kind="io", prefetchable=True),
        lambda: Bar(1 << 32),  # mem32 too large
        lambda: Bar(4096, kind="mem16"),  # type: ignore[arg-type]
    ],
)
def test_bar_definition_errors(make: object) -> None:
    assert callable(make)
    with pytest.raises(DeviceDefinitionError):
        make()


def test_small_memory_bar_allowed() -> None:
    assert Bar(16).size == 16
    assert Bar(2048).size == 2048


@pytest.mark.parametrize(
    ("bars", "rom"),
    [
        ({5: Bar(4096, kind="mem64")}, None),
        ({0: Bar(4096, kind="mem64"), 1: Bar(16)}, None),
        ({6: Bar(4096)}, None),
        ({-1: Bar(4096)}, None),
        ({}, 1024),
        ({}, 3000),
        ({}, 1 << 25),
    ],
)
def test_table_definition_errors(bars: dict[int, Bar | None], rom: int | None) -> None:
    with pytest.raises(DeviceDefinitionError):
        BarTable(bars, rom)


def test_table_not_installed() -> None:
    with pytest.raises(DeviceDefinitionError):
        BarTable({0: Bar(16)}).address(0)


@given(
    writes=st.lists(
        st.tuples(
            st.integers(0x10, 0x33), st.sampled_from([1, 2, 4]), st.binary(min_size=4, max_size=4)
        ),
        max_size=20,
    )
)
def test_random_writes_keep_bar_type_bits(writes: list[tuple[int, int, bytes]]) -> None:
    bars: dict[int, Bar | None] = {
        0: Bar(0x1000, kind="mem64", prefetchable=True),
        2: Bar(64, kind="io"),
        3: Bar(16),
    }
    config = _config(bars, rom_size=0x1000)
    for offset, size, payload in writes:
        config.write(offset, payload[:size])
        assert config.space.u32(0x10) & 0xFFF == 0xC
        assert config.space.u32(0x18) & 0x3F == 0x1
        assert config.space.u32(0x1C) & 0xF == 0x0
        assert config.space.u32(0x20) == 0  # unused slots
        assert config.space.u32(0x24) == 0
        assert config.space.u32(0x30) & 0xFFE == 0
